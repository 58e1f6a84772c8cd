#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: both binaries, their man pages
# and shell completions (generated here from the built binaries into
# target/release/package/), README.Debian, and — when the tree has them — the
# systemd units and example configuration files (dist/systemd/*.service,
# dist/*.toml). Then checks it with dpkg-deb: the control fields and every
# path it must contain.
#
# Usage: scripts/package.sh            build (release) and package
#        scripts/package.sh --no-build package the binaries already in
#                                      target/release (what scripts/test.sh does)
# Prints the path of the .deb on its last line. Install it with
#   sudo dpkg -i target/debian/pilot-tun_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    *) echo "usage: scripts/package.sh [--no-build]" >&2; exit 2 ;;
  esac
done

say() { printf '[package] %s\n' "$*" >&2; }
die() { printf '[package] error: %s\n' "$*" >&2; exit 1; }

command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"
if ! cargo deb --version >/dev/null 2>&1; then
  say "cargo-deb is missing; installing it: cargo install cargo-deb --locked"
  cargo install cargo-deb --locked
fi

TARGET=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET/release
if [ "$build" -eq 1 ]; then
  say "cargo build --locked --release -p pilot-tun -p pilot-registry --bins"
  cargo build --locked --release -p pilot-tun -p pilot-registry --bins
fi
for b in pilot-tun pilot-registry; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found: run without --no-build (or cargo build --release)"
done

# Man pages and completions, from the binaries being packaged (the asset
# paths in pilot-tun/Cargo.toml point here).
GEN=$BIN/package
rm -rf "$GEN"; mkdir -p "$GEN/man" "$GEN/completions"
for b in pilot-tun pilot-registry; do
  "$BIN/$b" man --out-dir "$GEN/man" >/dev/null
  "$BIN/$b" completions bash >"$GEN/completions/$b.bash"
  "$BIN/$b" completions zsh >"$GEN/completions/_$b"
  "$BIN/$b" completions fish >"$GEN/completions/$b.fish"
done
gzip -9n "$GEN"/man/*.1
say "generated $(ls "$GEN/man" | wc -l) man pages and 6 completion scripts in $GEN"

# The service files come from the service work (dist/): with all of them
# the package uses the `service` variant; a missing one is named and the
# package is built without the service files.
SERVICE_FILES=(dist/systemd/pilot-tun.service dist/systemd/pilot-registry.service
  dist/pilot-tun.toml dist/pilot-registry.toml)
missing=()
for f in "${SERVICE_FILES[@]}"; do [ -f "$f" ] || missing+=("$f"); done
variant=()
if [ ${#missing[@]} -eq 0 ]; then
  variant=(--variant service)
  say "with the systemd units and example configs: ${SERVICE_FILES[*]}"
else
  for f in "${missing[@]}"; do say "skipping the service files: $f does not exist in this tree"; done
  say "building the package WITHOUT systemd units and /etc configs (all of ${SERVICE_FILES[*]} are needed)"
fi

OUT=$TARGET/debian
mkdir -p "$OUT"
rm -f "$OUT"/pilot-tun_*.deb
# --no-build: the binaries above; --fast: lighter compression (seconds
# instead of a minute for ~30 MB of binaries on a small machine).
cargo deb -p pilot-tun --no-build --fast "${variant[@]}" --output "$OUT" >&2
DEB=$(ls "$OUT"/pilot-tun_*.deb)

# The check: control fields, and every path the package must hold.
info=$(dpkg-deb --info "$DEB")
for field in "Package: pilot-tun" "Version: " "Architecture: " "Depends: " "Section: net"; do
  grep -q "^ $field" <<<"$info" || die "$DEB: no '$field' in its control file:
$info"
done
contents=$(dpkg-deb --contents "$DEB" | awk '{print $6}' | sed 's|^\./|/|')
want=(/usr/bin/pilot-tun /usr/bin/pilot-registry
  /usr/share/man/man1/pilot-tun.1.gz /usr/share/man/man1/pilot-tun-up.1.gz
  /usr/share/man/man1/pilot-tun-netcheck.1.gz
  /usr/share/man/man1/pilot-registry.1.gz
  /usr/share/bash-completion/completions/pilot-tun
  /usr/share/bash-completion/completions/pilot-registry
  /usr/share/zsh/vendor-completions/_pilot-tun /usr/share/fish/vendor_completions.d/pilot-tun.fish
  /usr/share/doc/pilot-tun/README.Debian /usr/share/doc/pilot-tun/README.md)
if [ ${#missing[@]} -eq 0 ]; then
  want+=(/usr/lib/systemd/system/pilot-tun.service /usr/lib/systemd/system/pilot-registry.service
    /etc/pilot-tun/pilot-tun.toml /etc/pilot-registry/pilot-registry.toml)
fi
for p in "${want[@]}"; do
  grep -qxF "$p" <<<"$contents" || die "$DEB does not contain $p; it has:
$contents"
done
if [ ${#missing[@]} -eq 0 ]; then
  grep -qx /etc/pilot-tun/pilot-tun.toml <<<"$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" \
    || die "$DEB: /etc/pilot-tun/pilot-tun.toml is not a conffile"
fi
# The packaged binary is the one built here, and runs.
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$DEB" "$tmp"
grep -q "wire protocol" <<<"$("$tmp/usr/bin/pilot-tun" --version)" || die "the packaged pilot-tun does not run"
say "$(basename "$DEB"): $(du -h "$DEB" | cut -f1), ${#want[@]} expected paths present"
echo "$DEB"
