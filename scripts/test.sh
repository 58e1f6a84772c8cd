#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. formatting, lints, no import cycles between a crate's modules, and
#      the systemd units (systemd-analyze verify),
#   2. the Debian package (scripts/package.sh --no-build: built from the
#      release binaries, its control fields and paths checked),
#   3. unit tests (pilot-proto, pilot-registry, pilot-tun) and the in-process
#      lab (pilot-tests: registry + nodes over fake TUN devices), with
#      PILOT_TEST_PG set to a throwaway PostgreSQL cluster (scripts/pg.sh),
#      so the registry's storage suite runs on both backends,
#   4. the netns scenarios (real TUN, real kernel TCP, real processes; root),
#   5. a short smoke run of every fuzz target.
# Usage: sudo scripts/test.sh            (everything)
#        FUZZ_SECONDS=60 scripts/test.sh (longer fuzzing)
#        SKIP_NETNS=1 scripts/test.sh    (no root: all but step 4)
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the suite has run so far (SECONDS: bash's clock).
step() { printf '\n==> %s  [%dm%02ds]\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }

if [ "${SKIP_NETNS:-0}" != 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "the netns scenarios need root: run 'sudo scripts/test.sh' (or SKIP_NETNS=1 for the rest)" >&2; exit 1; }
  step "system packages"
  scripts/deps.sh
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "no import cycles between a crate's modules"
scripts/check-modules.py --self-test
scripts/check-modules.py pilot-proto pilot-registry pilot-tun pilot-metrics pilot-service

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --locked --release --all-targets -- -D warnings

step "build"
cargo build --locked --release --workspace --bins

step "systemd units (systemd-analyze verify)"
scripts/check-units.sh --self-test
scripts/check-units.sh
step "Debian package (cargo deb on the binaries just built, checked with dpkg-deb)"
scripts/package.sh --no-build >/dev/null

step "unit and in-process tests (the storage suite also on a throwaway PostgreSQL: scripts/pg.sh)"
# The test-release profile (Cargo.toml): release settings without LTO, so
# the test binaries link in seconds; the binaries above keep `release`.
scripts/pg.sh cargo test --locked --profile test-release --workspace

if [ "${SKIP_NETNS:-0}" != 1 ]; then
  step "netns scenarios"
  netns-tests/run.sh
fi

step "fuzz smoke (${FUZZ_SECONDS:-10} s per target)"
FUZZ_SECONDS=${FUZZ_SECONDS:-10} fuzz/smoke.sh

printf '\nall tests passed in %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60))
