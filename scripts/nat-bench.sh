#!/usr/bin/env bash
# Time to first byte across the NAT matrix: for every cell of
# netns-tests/s06_nat_matrix.sh (public, easy and hard NATs made of nftables),
# restart one side's daemon and time an HTTP GET over 10.x from that cold
# start to the first byte (curl's time_starttransfer): handshake, hole
# punching or relay fallback included; and the UDP-blocked cell
# (netns-tests/s29_udp_blocked.sh: relay over TCP with TLS), and the bare
# masquerade cells (netns-tests/s32_bare_nats.sh). Prints a table and
# writes JSON.
# A benchmark, not a test: it reports figures, it does not judge them.
#   sudo scripts/nat-bench.sh            (JSON to nat-bench.json, or $NAT_JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root: sudo scripts/nat-bench.sh" >&2; exit 1; }
scripts/deps.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
out=${NAT_JSON:-nat-bench.json}
rm -f "$out"   # no figures from an earlier run
log=$(mktemp /tmp/nat-bench.XXXX.log)
if ! TTFB_JSON=$(realpath -m "$out") netns-tests/s06_nat_matrix.sh >"$log" 2>&1; then
  tail -n 80 "$log" >&2
  echo "the matrix failed, so there are no figures (its whole output: $log)" >&2
  exit 1
fi
grep -E 'PASS|time to first byte' "$log"
# The UDP-blocked cell (relay over TCP with TLS) is its own scenario.
blocked=$(mktemp /tmp/nat-bench.XXXX.json)
if ! TTFB_JSON=$blocked netns-tests/s29_udp_blocked.sh >"$log" 2>&1; then
  tail -n 80 "$log" >&2
  echo "the UDP-blocked scenario failed, so there is no figure for it (its whole output: $log)" >&2
  exit 1
fi
grep -E 'PASS|time to first byte' "$log"
python3 - "$out" "$blocked" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1])) + json.load(open(sys.argv[2]))
json.dump(cells, open(sys.argv[1], "w"))
PY
rm -f "$log" "$blocked"
# The bare masquerade cells (no stateful firewall: routers between, and side
# by side, which goes direct only after a reopening round) are their own
# scenario.
bare=$(mktemp /tmp/nat-bench.XXXX.json); barelog=$(mktemp /tmp/nat-bench.XXXX.log)
if ! TTFB_JSON=$bare netns-tests/s32_bare_nats.sh >"$barelog" 2>&1; then
  tail -n 80 "$barelog" >&2
  echo "the bare-NAT scenario failed, so there are no figures for it (its whole output: $barelog)" >&2
  exit 1
fi
grep -E 'PASS|time to first byte|direct after' "$barelog"
python3 - "$out" "$bare" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1])) + json.load(open(sys.argv[2]))
json.dump(cells, open(sys.argv[1], "w"))
PY
rm -f "$bare" "$barelog"
python3 - "$out" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))
print(f"\n{'cell':<15} {'path':<9} {'first byte':>11} {'iperf3':>12}")
for c in cells:
    mbps = "-" if c['iperf_mbps'] is None else c['iperf_mbps']
    print(f"{c['cell']:<15} {c['path']:<9} {c['ttfb_s']*1000:>8.0f} ms {mbps:>7} Mbit/s")
print("\ngoal: under 1 s direct, under 3 s relayed (Pilot Protocol falls back to its relay after ~7 s)")
PY
