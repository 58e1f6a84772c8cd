#!/usr/bin/env python3
"""Checks that no crate's modules import each other in a circle.

    scripts/check-modules.py CRATE_DIR...     e.g. pilot-proto pilot-registry
    scripts/check-modules.py --self-test      shows that the check can fail

For each crate directory, every file under src/ (except src/bin/, which holds
separate binaries) belongs to a top module: src/node.rs and src/node/*.rs to
`node`. A top module uses another when its code names it by a path:
`use crate::x::...`, `crate::x::...` in an expression or a type, or
`super::...` that resolves to x (followed through nested and inline modules).
A name the crate root re-exports (`pub use node::Node;` in lib.rs, then
`crate::Node` elsewhere) counts as a use of the module it comes from. Comments
and string literals are skipped. Methods reached through a value's type
(`inner.on_slow()` for an `impl Inner` block in another file) are not imports
and are not counted.

The uses form a graph between top modules; a depth-first search finds its
cycles. Each cycle is printed with the lines that make its edges, and the
exit status is 1. Exit status 2: bad arguments (not a crate directory).
"""

import contextlib
import io
import os
import re
import sys
import tempfile

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


RAW_STRING = re.compile(r'b?r(#*)"')


def strip_comments_and_strings(src):
    """Blanks out comments, string and char literals, keeping line breaks (so
    offsets still give line numbers) and everything else as it was."""
    out = []
    i, n = 0, len(src)

    def blank(text):
        out.append("".join(c if c == "\n" else " " for c in text))

    def starts_token(k):  # not in the middle of an identifier
        return k == 0 or not (src[k - 1].isalnum() or src[k - 1] == "_")

    while i < n:
        c, j = src[i], None
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):  # block comments nest
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
        elif (m := RAW_STRING.match(src, i)) and starts_token(i):  # r"..", br#".."#
            end = src.find('"' + m.group(1), m.end())
            j = n if end < 0 else end + 1 + len(m.group(1))
        elif c == '"' or (src.startswith('b"', i) and starts_token(i)):  # "..", b".."
            j = i + (2 if c == "b" else 1)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
        elif c == "'":  # a char literal ('x', '\'', '\u{1F600}') or a lifetime ('a)
            if src.startswith("\\", i + 1):
                end = src.find("'", i + 3)
                j = n if end < 0 else end + 1
            elif i + 2 < n and src[i + 2] == "'":
                j = i + 3
        if j is None:
            out.append(c)
            i += 1
        else:
            blank(src[i:j])
            i = j
    return "".join(out)


def split_top(s, sep=","):
    """Splits s at sep outside braces."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_use_tree(tree):
    """`a::{b::{C, D}, e}` -> [[a, b, C], [a, b, D], [a, e]] (with `self` in
    a group meaning the group's own path). Renames are already removed."""
    tree = re.sub(r"\s+", "", tree)
    if tree.startswith("::"):
        tree = tree[2:]
    brace = tree.find("{")
    if brace < 0:
        return [[s for s in tree.split("::") if s]]
    prefix = [s for s in tree[:brace].split("::") if s]
    inner = tree[brace + 1 : tree.rfind("}")]
    paths = []
    for part in split_top(inner):
        if part == "self":
            paths.append(list(prefix))
        else:
            paths.extend(prefix + p for p in expand_use_tree(part))
    return paths


def use_paths(stmt):
    """Paths named by one `use` statement's tree (with renames dropped)."""
    stmt = re.sub(r"\s+as\s+" + IDENT, "", stmt)  # `X as Y` -> `X`
    return expand_use_tree(stmt)


class Crate:
    def __init__(self, root):
        self.root = root.rstrip("/")
        self.name = os.path.basename(os.path.abspath(self.root))
        self.src = os.path.join(self.root, "src")
        if not os.path.isdir(self.src):
            raise ValueError(f"{self.root}: no src/ directory (not a crate?)")
        self.files = []  # (path, module path as a list)
        for dirpath, dirnames, filenames in os.walk(self.src):
            rel = os.path.relpath(dirpath, self.src)
            if rel == "bin" or rel.startswith("bin" + os.sep):
                continue
            dirnames.sort()
            for f in sorted(filenames):
                if f.endswith(".rs"):
                    self.files.append((os.path.join(dirpath, f), self.module_path(rel, f)))
        self.tops = sorted({m[0] for _, m in self.files if m})
        self.reexports = {}  # name at the crate root -> top module it comes from
        self.edges = {}  # (from, to) -> ["file:line: text", ...]

    @staticmethod
    def module_path(rel, f):
        parts = [] if rel == "." else rel.split(os.sep)
        stem = f[:-3]
        if not parts and stem in ("lib", "main"):
            return []
        if stem == "mod":
            return parts
        return parts + [stem]

    def scan(self):
        parsed = []
        for path, mod in self.files:
            with open(path, encoding="utf-8") as fh:
                raw = fh.read()
            parsed.append((path, mod, raw, strip_comments_and_strings(raw)))
        for path, mod, raw, code in parsed:
            if not mod:  # the crate root: learn its re-exports
                for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
                    for segs in use_paths(m.group(1)):
                        if segs and segs[0] in ("crate", "self"):
                            segs = segs[1:]
                        if len(segs) >= 2 and segs[0] in self.tops:
                            self.reexports[segs[-1]] = segs[0]
        for path, mod, raw, code in parsed:
            if mod:
                self.scan_file(path, mod, raw, code)

    def inline_mods(self, code):
        """(open, close, name) of every inline `mod name { ... }`."""
        mods = []
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", code):
            depth, j = 0, m.end() - 1
            while j < len(code):
                if code[j] == "{":
                    depth += 1
                elif code[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            mods.append((m.start(), j, m.group(1)))
        return mods

    def scan_file(self, path, mod, raw, code):
        mods = self.inline_mods(code)
        lines = raw.split("\n")

        def here(offset):
            return mod + [name for (a, b, name) in mods if a < offset < b]

        def note(offset, segs):
            top = self.resolve(here(offset), segs)
            if top and top != mod[0]:
                line = code.count("\n", 0, offset) + 1
                shown = os.path.relpath(path, os.path.dirname(os.path.abspath(self.root)))
                where = f"{shown}:{line}: {lines[line - 1].strip()}"
                seen = self.edges.setdefault((mod[0], top), [])
                if where not in seen:
                    seen.append(where)

        use_spans = []
        for m in re.finditer(r"(?<![A-Za-z0-9_$])use\s+([^;]+);", code):
            use_spans.append((m.start(), m.end()))
            for segs in use_paths(m.group(1)):
                note(m.start(), segs)
        path_re = r"(?<![A-Za-z0-9_$:])((?:crate|super)(?:\s*::\s*(?:" + IDENT + r"))+)"
        for m in re.finditer(path_re, code):
            if any(a <= m.start() < b for a, b in use_spans):
                continue
            note(m.start(), [s.strip() for s in m.group(1).split("::")])

    def resolve(self, here, segs):
        """The top module a path names, seen from module path `here`; None
        for paths outside the crate, inside the root, or unknown."""
        if not segs:
            return None
        if segs[0] == "crate":
            base, rest = [], segs[1:]
        elif segs[0] == "super":
            base, rest = list(here), list(segs)
            while rest and rest[0] == "super":
                if not base:
                    return None  # above the crate root: not valid Rust
                base.pop()
                rest.pop(0)
        elif segs[0] == "self":
            base, rest = list(here), segs[1:]
        else:
            return None  # another crate (or a local name)
        if base:
            return base[0]
        if not rest or rest[0] in ("*", "self"):
            return None  # a glob of the root, or the root itself
        if rest[0] in self.tops:
            return rest[0]
        return self.reexports.get(rest[0])

    def cycles(self):
        """Every elementary cycle of the module graph (a DFS from each module,
        visiting only modules after it in order, so each cycle appears once,
        starting at its smallest module)."""
        graph = {}
        for a, b in self.edges:
            graph.setdefault(a, set()).add(b)
        order = sorted(set(graph) | {b for bs in graph.values() for b in bs})
        rank = {m: i for i, m in enumerate(order)}
        found = []

        def dfs(start, node, stack, on_stack):
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(stack + [start])
                elif rank[nxt] > rank[start] and nxt not in on_stack:
                    on_stack.add(nxt)
                    dfs(start, nxt, stack + [nxt], on_stack)
                    on_stack.discard(nxt)

        for m in order:
            dfs(m, m, [m], {m})
        return sorted(found, key=lambda c: (len(c), c))


def check(crate_dir, quiet=False):
    """Returns the list of cycles (each a list of module names, first repeated
    last) and prints the verdict."""
    crate = Crate(crate_dir)
    crate.scan()
    cycles = crate.cycles()
    if not cycles:
        if not quiet:
            print(f"check-modules: {crate.name}: {len(crate.tops)} modules, "
              f"{len(crate.edges)} module-to-module uses, no cycle")
        return cycles
    knot = sorted({m for c in cycles for m in c})
    print(f"check-modules: {crate.name}: {len(cycles)} import cycle(s) between modules "
          f"({', '.join(knot)}):")
    for c in cycles:
        print("  " + " -> ".join(c))
        for a, b in zip(c, c[1:]):
            for where in crate.edges[(a, b)]:
                print(f"      {a} -> {b}  {where}")
    return cycles


FIXTURE = {
    # a -> b (use), b -> c (super:: path in an expression), c -> a (through a
    # root re-export, in a group): the cycle a -> b -> c -> a.
    "src/lib.rs": "mod a;\nmod b;\nmod c;\nmod d;\npub use a::Alpha;\n",
    "src/a.rs": "//! a\nuse crate::b::Beta;\npub struct Alpha(Beta);\n",
    "src/b.rs": "pub struct Beta;\nfn f() { super::c::gamma() }\n",
    "src/c.rs": "use crate::{d::Delta, Alpha as A};\npub fn gamma() {}\n",
    # d names a only where it does not count: a comment, a string, `$crate`,
    # its own inline test module's `super`, and a nested file's `super`.
    "src/d/mod.rs": (
        "// use crate::a::Alpha;\n/* crate::a:: */\npub struct Delta;\n"
        'const S: &str = "crate::a::Alpha";\n'
        "macro_rules! m { () => { $crate::a::Alpha } }\nmod e;\n"
        "#[cfg(test)]\nmod tests {\n    use super::*;\n    fn t(_: Delta, _: char) {}\n    const C: char = '\\'';\n}\n"
    ),
    "src/d/e.rs": "use super::Delta;\nfn g<'x>(_: &'x Delta) {}\n",
}


def self_test():
    """The check finds the fixture's cycle, exactly, and passes once it is
    broken. Prints one line, or everything the checks said when it fails."""
    problems = []
    said = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="check-modules.") as tmp, \
            contextlib.redirect_stdout(said):
        crate = os.path.join(tmp, "fixture")
        for rel, text in FIXTURE.items():
            os.makedirs(os.path.dirname(os.path.join(crate, rel)), exist_ok=True)
            with open(os.path.join(crate, rel), "w", encoding="utf-8") as fh:
                fh.write(text)
        got = check(crate)
        if got != [["a", "b", "c", "a"]]:
            problems.append(f"expected exactly the cycle a -> b -> c -> a, found {got}")
        # Break the cycle: c no longer uses a.
        with open(os.path.join(crate, "src/c.rs"), "w", encoding="utf-8") as fh:
            fh.write("use crate::d::Delta;\npub fn gamma() {}\n")
        got = check(crate)
        if got:
            problems.append(f"expected no cycle once c -> a is gone, found {got}")
    if problems:
        sys.stdout.write(said.getvalue())
        for p in problems:
            print(f"check-modules: self-test FAILED: {p}")
        return False
    print("check-modules: self-test passed (a fixture's cycle a -> b -> c -> a is found, "
          "and nothing once it is broken)")
    return True


def main(argv):
    if argv == ["--self-test"]:
        return 0 if self_test() else 1
    if not argv or any(a.startswith("-") for a in argv):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    failed = False
    for d in argv:
        try:
            failed |= bool(check(d))
        except (ValueError, OSError) as e:
            print(f"check-modules: {e}", file=sys.stderr)
            return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
