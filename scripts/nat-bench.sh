#!/usr/bin/env bash
# Time to first byte across the NAT matrix: for every cell of
# netns-tests/s06_nat_matrix.sh (public, easy and hard NATs made of nftables),
# restart one side's daemon and time an HTTP GET over 10.x from that cold
# start to the first byte (curl's time_starttransfer): handshake, hole
# punching or relay fallback included. Prints a table and writes JSON.
# A benchmark, not a test: it reports figures, it does not judge them.
#   sudo scripts/nat-bench.sh            (JSON to nat-bench.json, or $NAT_JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root: sudo scripts/nat-bench.sh" >&2; exit 1; }
scripts/deps.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
out=${NAT_JSON:-nat-bench.json}
TTFB_JSON=$(realpath -m "$out") netns-tests/s06_nat_matrix.sh 2>&1 | grep -E 'PASS|FAIL|time to first byte' || true
[ -s "$out" ] || { echo "the matrix did not finish; see netns-tests/s06_nat_matrix.sh output" >&2; exit 1; }
python3 - "$out" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))
print(f"\n{'cell':<15} {'path':<7} {'first byte':>11} {'iperf3':>12}")
for c in cells:
    print(f"{c['cell']:<15} {c['path']:<7} {c['ttfb_s']*1000:>8.0f} ms {c['iperf_mbps']:>7} Mbit/s")
print("\ngoal: under 1 s direct, under 3 s relayed (Pilot Protocol falls back to its relay after ~7 s)")
PY
