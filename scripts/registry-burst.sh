#!/usr/bin/env bash
# Benchmark: does a burst of registrations disturb what the registry does on
# its packet path (relaying and STUN)? In namespaces this script builds:
#
#                     inet (bridge, 203.0.113.0/24)
#   reg .1 (pilot-registry, --listen 0.0.0.0:7946)     prb .5 (STUN prober)
#   nH1 .23 (hard NAT)                                 nH2 .24 (hard NAT)
#     |  h1 lan 198.51.100.0/26                          |  h2 lan 198.51.100.64/26
#   hH1 .10 (pilot-tun hh1, iperf3 -c)                 hH2 .74 (pilot-tun hh2, iperf3 -s)
#
# Both nodes sit behind NATs that map per destination, so their traffic is
# relayed by the registry at once (the hard<->hard cell of the NAT matrix).
#
#   phase 1 "quiet": iperf3 hh1 -> hh2 over 10.x (through the relay) and a
#                    STUN Binding request every 5 ms from prb, for N seconds;
#   phase 2 "burst": the same, and 2 s in, a burst of 1,000 registrations of
#                    fresh identities (Noise IK handshake + signed Register,
#                    what a node does) from 250 loopback sources inside the
#                    registry's namespace (one source may start 20
#                    handshakes/s), 200 in flight; "busy" answers are retried.
#                    The generator runs at nice 19: in real life those nodes'
#                    keys and signatures are computed on their own machines,
#                    not on the registry's.
#
# iperf3 is a single TCP stream, unlimited by default (then the figure is
# the relay's capacity, and anything else on the machine shows in it); with
# BURST_RELAY_MBPS it offers a fixed rate (the relay should keep carrying
# it).
#
# It prints STUN RTT p50/p99 and relayed Mbit/s for the quiet phase and for
# the burst window (from the first registration sent to the last answered),
# and writes them as JSON. A benchmark, not a test: the figures never make it
# fail; it exits non-zero only when the setup itself breaks.
#
# Usage:   sudo scripts/registry-burst.sh
# Env:     REGISTRY_BIN   the pilot-registry binary to measure (default the
#                         one in target/release; point it at another build
#                         to compare before and after a change)
#          BURST_SECONDS  length of each phase (default 12)
#          BURST_COUNT    registrations in the burst (default 1000)
#          BURST_SOURCES  loopback source addresses (default 250)
#          BURST_IN_FLIGHT registrations in flight (default 200)
#          BURST_RELAY_MBPS iperf3 -b for the relayed stream (default 0:
#                         unlimited)
#          BURST_JSON     where the JSON goes (default ./registry-burst.json)
#          BURST_SKIP_BUILD=1  use the binaries already in target/release
#          NETNS_KEEP=1   keep the work directory (raw JSON, logs)
#
# Network safety: traffic stays between the namespaces created here and on
# their loopback; the underlay uses documentation ranges; 10.x exists only on
# the TUN devices inside the namespaces; processes and namespaces are removed
# (by pid and by this run's prefix) on any exit (netns-tests/lib.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT_JSON=${BURST_JSON:-$PWD/registry-burst.json}
case "$OUT_JSON" in /*) ;; *) OUT_JSON=$PWD/$OUT_JSON ;; esac
SECS=${BURST_SECONDS:-12}
COUNT=${BURST_COUNT:-1000}
SOURCES=${BURST_SOURCES:-250}
IN_FLIGHT=${BURST_IN_FLIGHT:-200}
RELAY_MBPS=${BURST_RELAY_MBPS:-0}
for v in SECS COUNT SOURCES IN_FLIGHT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || { echo "$v must be a positive integer (got '${!v}')" >&2; exit 2; }
done
[[ $RELAY_MBPS =~ ^[0-9]+$ ]] || { echo "BURST_RELAY_MBPS must be an integer (got '$RELAY_MBPS')" >&2; exit 2; }
[ "$SECS" -ge 6 ] || { echo "BURST_SECONDS must be at least 6" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "the benchmark creates network namespaces and TUN devices: run 'sudo scripts/registry-burst.sh'" >&2; exit 1; }

cd "$ROOT"
step() { printf '\n==> %s\n' "$*" >&2; }

step "system packages"
scripts/deps.sh
if [ "${BURST_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --locked --release --workspace --bins"
  cargo build --locked --release --workspace --bins
fi

SCENARIO=registry-burst
PFX=ptr$$
source "$ROOT/netns-tests/lib.sh"
setup_lab
trap_errors
for t in ip iperf3 python3 nft; do need "$t"; done
REG_BIN=${REGISTRY_BIN:-$BIN/pilot-registry}
for b in "$BIN/pilot-tun" "$REG_BIN" "$BIN/registry-burst"; do
  [ -x "$b" ] || fail "$b not found (build with cargo build --release, or set PILOT_BIN / REGISTRY_BIN)"
done
RES=$WORK/results
mkdir -p "$RES"

step "lab: registry, two nodes behind hard NATs, a prober"
switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns prb; plug prb inet 203.0.113.5/24
nat_router nH1 203.0.113.23 h1 198.51.100.1/26 hard
nat_router nH2 203.0.113.24 h2 198.51.100.65/26 hard
behind hH1 h1 198.51.100.10/26 198.51.100.1
behind hH2 h2 198.51.100.74/26 198.51.100.65

# The registry listens on every address of its namespace, so the burst can
# come from 127.x sources on its loopback; nodes use 203.0.113.1. The relay
# bandwidth cap is lifted: the figure wanted is what the registry can carry.
mkdir -p "$WORK/registry"
bg reg registry "$REG_BIN" --listen 0.0.0.0:7946 --advertise 203.0.113.1:7946 \
  --state-dir "$WORK/registry" --relay-mbps 100000 --log warn
wait_for 10 "registry join URL" test -s "$WORK/registry/join-url"
JOIN=$(cat "$WORK/registry/join-url")
LOCAL_JOIN=${JOIN%@*}@127.0.0.1:7946
node_up hH1 hh1 --registry "$JOIN" >/dev/null
node_up hH2 hh2 --registry "$JOIN" >/dev/null
trust_pair hH1 hh1 hH2 hh2
B=$(addr_of hH2 hh2)
wait_for 15 "hh1 reaches hh2 over 10.x" onq hH1 ping -c1 -W1 "$B"
PATH_AB=$(json_get hH1 hh1 "[p.get('path') for p in d if p['hostname']=='hh2'][0]" peers)
[ "$PATH_AB" = relay ] || fail "hh1 -> hh2 should be relayed (two hard NATs), path is $PATH_AB"
log "hh1 -> hh2 relayed by the registry; registry: $REG_BIN"

# phase NAME WITH_BURST: iperf3 and the STUN prober for SECS seconds, and
# the burst 2 s in if asked. Raw results in $RES/<name>-*.json.
phase() {
  local name=$1 burst=$2 spid cpid ppid bpid=
  bg hH2 "iperf-s-$name" iperf3 -s -1 -B "$B"
  spid=$(cat "$WORK/iperf-s-$name.pid")
  wait_listen 10 hH2 5201
  date +%s.%N >"$RES/$name-t0"
  bg hH1 "iperf-c-$name" iperf3 -c "$B" -t "$SECS" -i 0.5 -b "${RELAY_MBPS}M" -J
  cpid=$(cat "$WORK/iperf-c-$name.pid")
  bg prb "stun-$name" "$BIN/registry-burst" stun 203.0.113.1:7946 "$SECS" 5
  ppid=$(cat "$WORK/stun-$name.pid")
  if [ "$burst" = 1 ]; then
    sleep 2
    bg reg "burst-$name" nice -n 19 "$BIN/registry-burst" register "$LOCAL_JOIN" "$COUNT" "$SOURCES" "$IN_FLIGHT" $(( SECS - 3 ))
    bpid=$(cat "$WORK/burst-$name.pid")
  fi
  wait "$cpid" || fail "iperf3 client failed in phase $name: $(tail -c 300 "$WORK/iperf-c-$name.log")"
  wait "$ppid" || fail "STUN prober failed in phase $name"
  [ -z "$bpid" ] || wait "$bpid" || fail "burst generator failed: $(tail -c 300 "$WORK/burst-$name.log")"
  wait "$spid" 2>/dev/null || true
  cp "$WORK/iperf-c-$name.log" "$RES/$name-iperf.json"
  cp "$WORK/stun-$name.log" "$RES/$name-stun.json"
  [ -z "$bpid" ] || cp "$WORK/burst-$name.log" "$RES/$name-burst.json"
}

step "phase 1: relayed iperf3 + STUN probes, no burst (${SECS} s)"
phase quiet 0
sleep 1
step "phase 2: the same, with a burst of $COUNT registrations 2 s in (${SECS} s)"
phase burst 1
cp "$WORK/registry.log" "$RES/registry.log" 2>/dev/null || true

step "figures"
python3 - "$RES" "$OUT_JSON" "$REG_BIN" "$(cut -d' ' -f1-3 /proc/loadavg)" "$RELAY_MBPS" <<'PY'
import json, sys
res, out, reg_bin, load, offered = sys.argv[1:6]

def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]

def figures(name, window=None):
    t0 = float(open(f"{res}/{name}-t0").read())
    ip = json.load(open(f"{res}/{name}-iperf.json"))
    st = json.load(open(f"{res}/{name}-stun.json"))["samples"]
    if window is None:
        # Skip the first second (TCP slow start, ARP).
        lo, hi = t0 + 1.0, t0 + 1e9
    else:
        lo, hi = window
    rtts = [r for t, r in st if lo <= t <= hi and r is not None]
    lost = sum(1 for t, r in st if lo <= t <= hi and r is None)
    ivs = []
    for iv in ip.get("intervals", []):
        s = iv["sum"]
        a, b = t0 + s["start"], t0 + s["end"]
        overlap = max(0.0, min(b, hi) - max(a, lo))
        if overlap > 0:
            ivs.append((overlap, s["bits_per_second"]))
    w = sum(o for o, _ in ivs)
    mbps = sum(o * bps for o, bps in ivs) / w / 1e6 if w else float("nan")
    return {
        "stun_rtt_ms_p50": round(pct(rtts, 0.5), 3),
        "stun_rtt_ms_p99": round(pct(rtts, 0.99), 3),
        "stun_samples": len(rtts),
        "stun_lost": lost,
        "relay_mbps": round(mbps, 1),
    }

quiet = figures("quiet")
b = json.load(open(f"{res}/burst-burst.json"))
during = figures("burst", (b["start"], b["end"]))
during["window_s"] = round(b["end"] - b["start"], 3)
result = {"registry": reg_bin, "offered_mbps": int(offered) or None, "loadavg_end": load,
          "quiet": quiet, "burst": during, "registrations": b}
json.dump(result, open(out, "w"), indent=2)
print(f"\nregistry: {reg_bin}; relayed stream: {'iperf3 -b ' + offered + 'M' if int(offered) else 'unlimited'}")
print(f"burst: {b['ok']}/{b['count']} registered in {b['end'] - b['start']:.2f} s, "
      f"{b['busy_answers']} busy answers (retried), {b['refused']} refused, {b['timed_out']} timed out, "
      f"{b['handshake_failed']} handshakes failed; registration latency p50 {b['latency_ms_p50']} ms p99 {b['latency_ms_p99']} ms")
print(f"\n{'':<14} {'STUN p50':>10} {'STUN p99':>10} {'lost':>6} {'samples':>8} {'relayed':>14}")
for label, f in (("no burst", quiet), ("during burst", during)):
    print(f"{label:<14} {f['stun_rtt_ms_p50']:>7.3f} ms {f['stun_rtt_ms_p99']:>7.3f} ms {f['stun_lost']:>6} "
          f"{f['stun_samples']:>8} {f['relay_mbps']:>8.1f} Mbit/s")
def change(a, b):
    return "n/a" if not a or a != a or b != b else f"{(b - a) / a * 100:+.0f} %"
print(f"\nchange during the burst: STUN p99 {change(quiet['stun_rtt_ms_p99'], during['stun_rtt_ms_p99'])}, "
      f"relayed {change(quiet['relay_mbps'], during['relay_mbps'])} (goal: within 10 %)")
print(f"load average at the end: {load}; JSON: {out}")
PY
