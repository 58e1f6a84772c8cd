#!/usr/bin/env bash
# Soak: an hour (by default) of traffic and rekeys through real daemons in
# network namespaces; samples every daemon's memory and the bytes moved each
# minute, and reports whether memory stays flat and whether traffic ever
# stalled. A benchmark, not a test: it prints figures and exits non-zero
# only when the lab breaks or a checksummed transfer fails.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+   +---------+   +---------+   +---------+   +---------+
#   |   reg   |   |    a    |   |    b    |   |    c    |   |    d    |
#   |registry |   |  alpha  |<=>|  beta   |   |  gamma  |<=>|  delta  |
#   +----+----+   +----+----+   +----+----+   +----+----+   +----+----+
#   =====+=============+=============+=============+=============+=====  br0
#
# Two trusted pairs. In each, a worker sends 4 MB of random bytes over TCP
# on 10.x, paced at --kbps kB/s, sha256 checked, one way then the other,
# for the whole run. Tunnel timers run --time-scale times faster (default
# 20: every session rekeys every 6 s, so an hour holds some 600 rekeys per
# pair). Every --sample seconds (default 60) it reads VmRSS of the four
# daemons and the registry from /proc/<pid>/status and the bytes each pair
# moved (`pilot-tun --json peers`, tx_bytes); an interval in which a pair
# moved nothing is a stall.
#
# Usage:  sudo scripts/soak.sh [--duration SECONDS] [--sample SECONDS]
#                              [--time-scale N] [--kbps N] [--json FILE]
#                              [--no-build]
# Prints one line per sample, then start, end and max RSS per process, the
# growth from the first sample to the last, stalls, transfers and the
# number of sessions established.
set -euo pipefail

DURATION=3600 SAMPLE=60 SCALE=20 KBPS=1024 JSON= BUILD=1
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --sample) SAMPLE=$2; shift 2 ;;
    --time-scale) SCALE=$2; shift 2 ;;
    --kbps) KBPS=$2; shift 2 ;;
    --json) JSON=$(realpath -m "$2"); shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in DURATION SAMPLE SCALE KBPS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || { echo "soak.sh: --$(echo "$v" | tr 'A-Z_' 'a-z-') takes a positive whole number" >&2; exit 2; }
done
[ "$DURATION" -ge "$SAMPLE" ] || { echo "soak.sh: --duration must be at least one --sample" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "soak.sh needs root (network namespaces, TUN devices): sudo scripts/soak.sh" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/deps.sh
if [ "$BUILD" = 1 ]; then cargo build --locked --release --workspace --bins 2>&1 | tail -n 1; fi

SCENARIO=soak
PFX=sk$$
source "$ROOT/netns-tests/lib.sh"
setup_lab
reap_on_exit
for t in ip ping nc python3 timeout sha256sum; do need "$t"; done
export PILOT_TEST_TIME_SCALE=$SCALE

switch sw
mkns reg; plug reg sw 192.0.2.1/24
start_registry reg 192.0.2.1 2>/dev/null
declare -A NS_OF=([alpha]=a [beta]=b [gamma]=c [delta]=d) ADDR
i=11
for n in alpha beta gamma delta; do
  mkns "${NS_OF[$n]}"; plug "${NS_OF[$n]}" sw "192.0.2.$i/24"; i=$((i + 1))
  node_up "${NS_OF[$n]}" "$n" --registry "$JOIN" >/dev/null 2>&1
  ADDR[$n]=$(addr_of "${NS_OF[$n]}" "$n")
done
trust_pair a alpha b beta >/dev/null 2>&1
trust_pair c gamma d delta >/dev/null 2>&1
wait_for 10 "alpha reaches beta" ping_until a "${ADDR[beta]}" 1
wait_for 10 "gamma reaches delta" ping_until c "${ADDR[delta]}" 1

END=$(( $(date +%s) + DURATION ))
# pair_traffic X Y: 4 MB paced transfers X -> Y and back until END; one
# result line each in $WORK/xfers-X.
pair_traffic() {
  local x=$1 y=$2 k=0 from to
  head -c 4M /dev/urandom >"$WORK/data-$x"
  while [ "$(date +%s)" -lt "$END" ]; do
    k=$((k + 1))
    if [ $((k % 2)) -eq 1 ]; then from=$x to=$y; else from=$y to=$x; fi
    if xfer_try "${NS_OF[$from]}" "${NS_OF[$to]}" "${ADDR[$to]}" 9000 "$WORK/data-$x" "$x-$k" 120 "$KBPS"; then
      echo "ok $XFER_MS" >>"$WORK/xfers-$x"
    else
      echo "fail $from->$to $XFER_WHY" >>"$WORK/xfers-$x"
    fi
  done
}
: >"$WORK/xfers-alpha"; : >"$WORK/xfers-gamma"
bg_fn traffic-ab pair_traffic alpha beta
bg_fn traffic-cd pair_traffic gamma delta

# tx NAME PEER: bytes NAME has sent PEER through the tunnel.
tx() { peer_of "${NS_OF[$1]}" "$1" "$2" tx_bytes; }
rss() { daemon_rss_kb "$1"; }
printf '%8s %9s %9s %9s %9s %9s %10s %10s\n' secs alpha_kB beta_kB gamma_kB delta_kB reg_kB ab_MB cd_MB
T0=$(date +%s)
prev_ab=$(( $(tx alpha beta) + $(tx beta alpha) )); prev_cd=$(( $(tx gamma delta) + $(tx delta gamma) ))
: >"$WORK/samples"
while [ "$(date +%s)" -lt "$END" ]; do
  sleep "$SAMPLE"   # the sampling interval
  ab=$(( $(tx alpha beta) + $(tx beta alpha) )); cd=$(( $(tx gamma delta) + $(tx delta gamma) ))
  line="$(( $(date +%s) - T0 )) $(rss alpha) $(rss beta) $(rss gamma) $(rss delta) $(rss registry) $(( ab - prev_ab )) $(( cd - prev_cd ))"
  echo "$line" >>"$WORK/samples"
  read -r s ra rb rc rd rr dab dcd <<<"$line"
  printf '%8s %9s %9s %9s %9s %9s %10.1f %10.1f\n' "$s" "$ra" "$rb" "$rc" "$rd" "$rr" \
    "$(echo "$dab" | awk '{ print $1 / 1048576 }')" "$(echo "$dcd" | awk '{ print $1 / 1048576 }')"
  prev_ab=$ab; prev_cd=$cd
done
wait_fn 180 traffic-ab
wait_fn 180 traffic-cd
sessions=$(cat "$WORK"/*/pilot-tun.log | grep -c "session established" || true)

python3 - "$WORK" "$SAMPLE" "$sessions" "$DURATION" "$SCALE" "$JSON" <<'PY'
import json, sys
work, sample, sessions, duration, scale, out = sys.argv[1:7]
rows = [list(map(int, l.split())) for l in open(f"{work}/samples") if l.strip()]
names = ["alpha", "beta", "gamma", "delta", "registry"]
mem = {}
print()
print(f"{'process':<9} {'start kB':>9} {'end kB':>9} {'max kB':>9} {'growth':>8}")
for i, n in enumerate(names, start=1):
    col = [r[i] for r in rows]
    g = (col[-1] - col[0]) / col[0] * 100 if col[0] else 0.0
    mem[n] = {"start_kb": col[0], "end_kb": col[-1], "max_kb": max(col), "growth_pct": round(g, 1)}
    print(f"{n:<9} {col[0]:>9} {col[-1]:>9} {max(col):>9} {g:>+7.1f}%")
stalls = [(r[0], p) for r in rows for p, c in (("alpha-beta", r[6]), ("gamma-delta", r[7])) if c == 0]
xf = {}
for p in ("alpha", "gamma"):
    lines = [l.split(maxsplit=1) for l in open(f"{work}/xfers-{p}") if l.strip()]
    xf[p] = {"ok": sum(1 for l in lines if l[0] == "ok"), "failed": [l[1].strip() for l in lines if l[0] != "ok"]}
moved = sum(r[6] + r[7] for r in rows)
print(f"\nsamples: {len(rows)} every {sample} s; moved {moved / 1048576:.0f} MB; "
      f"stalls (an interval in which a pair moved nothing): {len(stalls)} {stalls if stalls else ''}")
print(f"transfers (4 MB, sha256 checked): alpha-beta {xf['alpha']['ok']} ok / {len(xf['alpha']['failed'])} failed, "
      f"gamma-delta {xf['gamma']['ok']} ok / {len(xf['gamma']['failed'])} failed")
for p in xf:
    for f in xf[p]["failed"]:
        print("  failed: " + f)
print(f"sessions established (log lines; rekeys every {120 // int(scale)} s per pair): {sessions}")
if out:
    json.dump({"duration_s": int(duration), "sample_s": int(sample), "time_scale": int(scale), "rss": mem,
               "stalls": stalls, "moved_mb": round(moved / 1048576), "transfers": xf,
               "sessions_established": int(sessions), "samples": rows}, open(out, "w"), indent=2)
    print(f"JSON: {out}")
sys.exit(1 if any(xf[p]["failed"] for p in xf) else 0)
PY
