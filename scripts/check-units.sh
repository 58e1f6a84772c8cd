#!/usr/bin/env bash
# Checks the systemd units in dist/systemd with `systemd-analyze verify`
# (syntax, known keys and values, the ExecStart= binaries exist and run)
# and prints their exposure score (`systemd-analyze security --offline`).
# PID 1 need not be systemd: the units are checked in a scratch root that
# holds them, the built binaries as /usr/bin/pilot-*, and the host's own
# unit files (for the targets they name).
#
#   scripts/check-units.sh              check (fails on any complaint)
#   scripts/check-units.sh --self-test  shows that the check can fail
#
# Environment: PILOT_BIN (default <repo>/target/release).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${PILOT_BIN:-$ROOT/target/release}
UNITS=(pilot-tun.service pilot-registry.service)

command -v systemd-analyze >/dev/null 2>&1 || {
  echo "check-units: systemd-analyze is missing: install the systemd package (scripts/deps.sh does)" >&2
  exit 2
}
for b in pilot-tun pilot-registry; do
  [ -x "$BIN/$b" ] || { echo "check-units: $BIN/$b not found: cargo build --release first (or set PILOT_BIN)" >&2; exit 2; }
done
SYSTEM_UNITS=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || true)
for d in "$SYSTEM_UNITS" /usr/lib/systemd/system /lib/systemd/system; do
  [ -n "$d" ] && [ -f "$d/multi-user.target" ] && { SYSTEM_UNITS=$d; break; }
done
[ -f "$SYSTEM_UNITS/multi-user.target" ] || { echo "check-units: no systemd unit directory with multi-user.target" >&2; exit 2; }

SCRATCH=$(mktemp -d /tmp/check-units.XXXX)
trap 'rm -rf "$SCRATCH"' EXIT

# make_root DIR: a root with the host's units, our binaries and units.
make_root() {
  mkdir -p "$1/usr/bin" "$1/usr/lib/systemd" "$1/etc/systemd/system"
  cp -a "$SYSTEM_UNITS" "$1/usr/lib/systemd/system"
  cp "$BIN/pilot-tun" "$BIN/pilot-registry" "$1/usr/bin/"
  cp "$ROOT"/dist/systemd/*.service "$1/etc/systemd/system/"
}

# verify DIR: systemd-analyze verify on our units in root DIR; its output
# goes to stdout; the status is non-zero if it failed or said anything.
verify() {
  local out rc=0
  out=$(systemd-analyze verify --root="$1" "${UNITS[@]}" 2>&1) || rc=$?
  printf '%s' "$out"
  [ "$rc" -eq 0 ] && [ -z "$out" ]
}

if [ "${1:-}" = --self-test ]; then
  bad=0
  for breakage in 's/^Type=notify$/Type=notifyy/' 's/^ExecStart=\/usr\/bin\/pilot-tun /ExecStart=\/usr\/bin\/pilot-tunx /' '/^\[Service\]/a ProtectSystm=strict'; do
    r="$SCRATCH/broken$bad"; make_root "$r"
    sed -i "$breakage" "$r/etc/systemd/system/pilot-tun.service"
    if out=$(verify "$r"); then
      echo "check-units self-test: FAIL: '$breakage' was not noticed" >&2; exit 1
    fi
    echo "self-test: '$breakage' noticed: $(echo "$out" | head -1)"
    bad=$((bad + 1))
  done
  echo "check-units self-test: every breakage noticed"
  exit 0
fi

make_root "$SCRATCH/root"
if ! out=$(verify "$SCRATCH/root"); then
  echo "check-units: systemd-analyze verify complained:" >&2
  echo "$out" >&2
  exit 1
fi
echo "systemd-analyze verify: ${UNITS[*]} OK"
for u in "${UNITS[@]}"; do
  systemd-analyze security --offline=true "$ROOT/dist/systemd/$u" 2>/dev/null | grep 'Overall exposure' || true
done
