#!/usr/bin/env bash
# Time to first byte across the NAT matrix: for every cell of
# netns-tests/s06_nat_matrix.sh (public, easy and hard NATs made of nftables),
# restart one side's daemon and time an HTTP GET over 10.x from that cold
# start to the first byte (curl's time_starttransfer): handshake, hole
# punching or relay fallback included; and the UDP-blocked cell
# (netns-tests/s29_udp_blocked.sh: relay over TCP with TLS), and the bare
# masquerade cells (netns-tests/s32_bare_nats.sh). Prints a table and writes
# JSON. Every cell also gets iperf3's Mbit/s and the registry's CPU seconds
# (user + system, from /proc/<pid>/stat) per GB of iperf3 payload while
# iperf3 ran: for a relayed cell, what relaying costs the registry.
# A benchmark, not a test: it reports figures, it does not judge them.
#   sudo scripts/nat-bench.sh [OPTIONS]   (JSON to nat-bench.json, or $NAT_JSON)
#     --relay-mbps N        the registry's relay limit per node (default: its own, 400)
#     --relay-total-mbps N  ... and for all nodes together (default: its own, 1000);
#                           raise both to measure the relay rather than its limits
#     --iperf-secs N        iperf3 time per cell (default 3)
#     --no-blocked          skip the UDP-blocked cell (s29)
#     --bin DIR             use the binaries in DIR (no build), e.g. a copy of an
#                           older target/release to compare against
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root: sudo scripts/nat-bench.sh" >&2; exit 1; }
registry_args=() blocked=1 bin=
while [ $# -gt 0 ]; do
  case $1 in
    --relay-mbps|--relay-total-mbps)
      [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "$1 takes megabits per second" >&2; exit 2; }
      registry_args+=("$1" "$2"); shift 2 ;;
    --iperf-secs)
      [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "$1 takes seconds" >&2; exit 2; }
      export IPERF_SECS=$2; shift 2 ;;
    --no-blocked) blocked=0; shift ;;
    --bin)
      [ -x "${2:-}/pilot-registry" ] && [ -x "$2/pilot-tun" ] \
        || { echo "$1 takes a directory holding pilot-registry and pilot-tun" >&2; exit 2; }
      bin=$(realpath "$2"); shift 2 ;;
    *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
  esac
done
export REGISTRY_ARGS="${registry_args[*]}"
scripts/deps.sh
if [ -n "$bin" ]; then
  export PILOT_BIN=$bin
  echo "binaries from $bin"
else
  cargo build --locked --release --workspace --bins 2>&1 | tail -1
fi
[ -z "$REGISTRY_ARGS" ] || echo "registry: $REGISTRY_ARGS"
out=${NAT_JSON:-nat-bench.json}
rm -f "$out"   # no figures from an earlier run
log=$(mktemp /tmp/nat-bench.XXXX.log)
if ! TTFB_JSON=$(realpath -m "$out") netns-tests/s06_nat_matrix.sh >"$log" 2>&1; then
  tail -n 80 "$log" >&2
  echo "the matrix failed, so there are no figures (its whole output: $log)" >&2
  exit 1
fi
grep -E 'PASS|time to first byte' "$log"
rm -f "$log"
# more_cells SCENARIO WHAT: run a scenario that writes cells of its own
# (TTFB_JSON) and add them to the table.
more_cells() {
  local cells mlog
  cells=$(mktemp /tmp/nat-bench.XXXX.json); mlog=$(mktemp /tmp/nat-bench.XXXX.log)
  if ! TTFB_JSON=$cells bash "netns-tests/$1.sh" >"$mlog" 2>&1; then
    tail -n 80 "$mlog" >&2
    echo "$2 failed, so there are no figures for it (its whole output: $mlog)" >&2
    exit 1
  fi
  grep -E 'PASS|time to first byte|direct after' "$mlog"
  python3 - "$out" "$cells" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1])) + json.load(open(sys.argv[2]))
json.dump(cells, open(sys.argv[1], "w"))
PY
  rm -f "$cells" "$mlog"
}
# The UDP-blocked cell (relay over TCP with TLS) is its own scenario.
[ "$blocked" -eq 0 ] || more_cells s29_udp_blocked "the UDP-blocked scenario"
# A hard NAT whose router maps a port (PCP, from miniupnpd) to a hard NAT.
more_cells s27_port_mapping "the port-mapping scenario"
# The bare masquerade cells (no stateful firewall: routers between, and side
# by side, which goes direct only after a reopening round).
more_cells s32_bare_nats "the bare-NAT scenario"
python3 - "$out" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))
print(f"\n{'cell':<15} {'path':<9} {'first byte':>11} {'iperf3':>12} {'registry CPU':>14}")
for c in cells:
    mbps = "-" if c['iperf_mbps'] is None else c['iperf_mbps']
    cpu = c.get('registry_cpu_s_per_gb')
    cpu = "-" if cpu is None else f"{cpu:.2f} s/GB"
    print(f"{c['cell']:<15} {c['path']:<9} {c['ttfb_s']*1000:>8.0f} ms {mbps:>7} Mbit/s {cpu:>14}")
relayed = [c['iperf_mbps'] for c in cells if c['path'] == 'relay' and c['cell'] != 'udp-blocked' and c['iperf_mbps']]
direct = [c['iperf_mbps'] for c in cells if c['path'] == 'direct' and c['iperf_mbps']]
if relayed and direct:
    r, d = sum(relayed) / len(relayed), sum(direct) / len(direct)
    print(f"\nrelayed over UDP {r:.0f} Mbit/s, direct {d:.0f} Mbit/s (means): relayed is {100 * r / d:.0f} % of direct")
print("\ngoal: under 1 s direct, under 3 s relayed (Pilot Protocol falls back to its relay after ~7 s)")
PY
