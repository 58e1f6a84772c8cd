#!/usr/bin/env bash
# Fuzz smoke run: every target in fuzz_targets/ for a short while, coverage
# guided, on the stable toolchain. Exits non-zero if any target crashes
# (panic, failed assertion, sanitizer report, timeout or out-of-memory).
#
#   cd fuzz && ./smoke.sh                     # 20 s per target
#   FUZZ_SECONDS=300 ./smoke.sh               # longer
#   FUZZ_SECONDS=60 ./smoke.sh stun control   # only some targets
#
# How it runs on stable:
# - cargo-fuzz is installed with `cargo install cargo-fuzz --locked` when it
#   is missing (CI machines are fresh).
# - `cargo fuzz` passes nightly-only flags (`-Zsanitizer=address`, and
#   `-Cpasses=sancov-module` with `-Cllvm-args=-sanitizer-coverage-*` for
#   libFuzzer's coverage counters and compare tracing). RUSTC_BOOTSTRAP=1,
#   set for this script's commands only, lets the stable compiler accept
#   them; the stable toolchain ships the ASan runtime and the LLVM passes, so
#   nothing else is needed and no nightly is fetched. libfuzzer-sys compiles
#   libFuzzer itself from its bundled C++ sources.
# - The build is `cargo fuzz build -O`, once for all targets: the release
#   profile of Cargo.toml, with debug assertions and overflow checks in
#   pilot-proto and the targets, not in third-party crates. About 100 s from
#   scratch on an idle 2-vCPU machine, most of it ring, snow and the dalek
#   crates, plus about 45 s to install cargo-fuzz on a fresh machine.
#   A failing target does not stop the others; all are reported.
# - Each target starts from the committed seeds in seeds/<target>/ (written
#   by `cargo run --example seeds`) and from corpus/<target>/, where libFuzzer
#   keeps what it finds (git-ignored, reused by the next run). A crashing
#   input lands in artifacts/<target>/ and is printed here as hex; replay it
#   with `RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> artifacts/<target>/<file>`.

set -euo pipefail

cd "$(dirname "$0")"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
CARGO_FUZZ_VERSION="0.13.2"
export RUSTC_BOOTSTRAP=1

step() { printf '\n==> %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
echo "$(cargo fuzz --version), $(rustc --version)"

# Refuse to run against a lock file that would need changes (cargo fuzz has
# no --locked of its own).
if ! cargo metadata --locked --format-version 1 >/dev/null; then
    echo "fuzz/Cargo.lock is out of date (did pilot-proto's dependencies change?):" >&2
    echo "run 'cargo metadata --format-version 1 >/dev/null' in fuzz/ and commit Cargo.lock" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

step "building ${#targets[@]} targets: ${targets[*]}"
build_start=$(date +%s)
cargo fuzz build -O
build_secs=$(( $(date +%s) - build_start ))
echo "build took ${build_secs}s"

mkdir -p artifacts
failed=()
summary=()
for t in "${targets[@]}"; do
    step "fuzzing $t for ${SECONDS_PER_TARGET}s"
    mkdir -p "corpus/$t" "seeds/$t"
    log="artifacts/$t.log"
    rc=0
    cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -timeout=10 \
        -print_final_stats=1 \
        >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)
    if [ "$rc" -eq 0 ] && [ -n "$runs" ]; then
        echo "$t: ok, ${runs} executions, coverage ${cov:-?} edges"
        summary+=("$(printf '%-10s ok    %10s runs  %6s edges' "$t" "$runs" "${cov:-?}")")
    else
        failed+=("$t")
        summary+=("$(printf '%-10s FAIL  (exit %s, log %s)' "$t" "$rc" "$log")")
        echo "$t: FAILED (exit $rc); last lines of $log:"
        tail -n 40 "$log"
        for f in $(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log"); do
            for p in "$f" "${f#fuzz/}"; do
                if [ -f "$p" ]; then
                    echo "crashing input $p ($(wc -c <"$p") bytes):"
                    od -An -tx1 -v "$p" | tr -d ' \n'
                    echo
                    break
                fi
            done
        done
    fi
done

step "summary (build ${build_secs}s, ${SECONDS_PER_TARGET}s per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
echo "no crash in ${#targets[@]} targets"
