#!/usr/bin/env bash
# Stress runs: the long versions of the netns stress scenarios, with their
# figures. Each subcommand runs one scenario with bigger parameters (the
# test suite runs the same scenarios short):
#
#   sudo scripts/stress.sh churn      [--nodes 20] [--duration 600] [--time-scale 10]
#                                     [--xfer-kb 1024] [--seed N]
#                                     [--events "restart crash leave"]  (s14_churn)
#   sudo scripts/stress.sh partitions [--cut 60]                         (s15_partitions)
#   sudo scripts/stress.sh crashes    [--rounds 100] [--seed N]          (s16_crashes)
#   sudo scripts/stress.sh loss                                          (s17_loss)
#   Options for all: --json FILE (the figures as JSON, where the scenario
#   writes them), --no-build (use target/release as it is), --keep (keep
#   the work directory: daemon logs, per-pair results).
#
# churn:      nodes restart, crash, leave and come back, fresh identities join
#             and leave, sessions rekey (timers --time-scale times faster),
#             while every pair moves checksummed data. Prints transfers
#             completed and failed, reconnect times p50/p99. Goal: 0 failed
#             after reconnect. Default 20 nodes (+2 joiners), 10 minutes;
#             --events limits the churn to some kinds (e.g. "crash").
# partitions: cuts (on the underlay bridge) node<->registry with a transfer
#             across it, node<->node, a node from everyone, the registry
#             from everyone with a transfer across it; each lasts --cut
#             seconds (30 to 600); prints the time to reconnect after each
#             heal. Goal: a cut pair reconnects within 5 s of the heal.
# crashes:    SIGKILL of a random daemon or the registry, --rounds times,
#             during transfers and trust changes; checks nothing is lost and
#             prints how soon sessions are back. Goal: within 2 s.
# loss:       1 % and 5 % random underlay loss: handshakes and a checksummed
#             10 MB TCP transfer complete.
#
# Network safety: everything runs in network namespaces the scenario creates
# (documentation-range underlay, 10.x only on TUN devices inside them); a run
# that overstays its time limit is stopped, and whatever is left in its
# namespaces is killed by pid and the namespaces deleted.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
what=$1; shift
case $what in -h|--help) usage; exit 0 ;; churn|partitions|crashes|loss) ;;
  *) echo "stress.sh: unknown run '$what' (churn, partitions, crashes, loss)" >&2; exit 2 ;; esac

NODES=20 DURATION=600 SCALE=10 XFER_KB=1024 SEED= EVENTS= CUT=60 ROUNDS=100 JSON= BUILD=1 KEEP=
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --time-scale) SCALE=$2; shift 2 ;;
    --xfer-kb) XFER_KB=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --events) EVENTS=$2; shift 2 ;;
    --cut) CUT=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --json) JSON=$(realpath -m "$2"); shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "stress.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
num() { [[ $2 =~ ^[0-9]+$ ]] || { echo "stress.sh: $1 takes a whole number (got '$2')" >&2; exit 2; }; }
num --nodes "$NODES"; num --duration "$DURATION"; num --time-scale "$SCALE"; num --xfer-kb "$XFER_KB"
num --cut "$CUT"; num --rounds "$ROUNDS"; [ -z "$SEED" ] || num --seed "$SEED"
[ "$CUT" -ge 30 ] && [ "$CUT" -le 600 ] || { echo "stress.sh: --cut is 30 to 600 seconds" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "stress.sh needs root (network namespaces, TUN devices): sudo scripts/stress.sh $what" >&2; exit 1; }

cd "$(dirname "$0")/.."
scripts/deps.sh
if [ "$BUILD" = 1 ]; then cargo build --locked --release --workspace --bins 2>&1 | tail -n 1; fi

env=()
case $what in
  churn)
    scenario=netns-tests/s14_churn.sh; limit=$(( DURATION + 600 ))
    env=(CHURN_NODES="$NODES" CHURN_SECONDS="$DURATION" CHURN_TIME_SCALE="$SCALE" CHURN_XFER_KB="$XFER_KB")
    [ -z "$SEED" ] || env+=(CHURN_SEED="$SEED")
    [ -z "$EVENTS" ] || env+=(CHURN_EVENTS="$EVENTS")
    [ -z "$JSON" ] || env+=(CHURN_JSON="$JSON") ;;
  partitions)
    scenario=netns-tests/s15_partitions.sh; limit=$(( 4 * CUT + 600 ))
    env=(PART_CUT_SECONDS="$CUT")
    [ -z "$JSON" ] || env+=(PART_JSON="$JSON") ;;
  crashes)
    scenario=netns-tests/s16_crashes.sh; limit=$(( ROUNDS * 60 + 300 ))
    env=(CRASH_ROUNDS="$ROUNDS")
    [ -z "$SEED" ] || env+=(CRASH_SEED="$SEED")
    [ -z "$JSON" ] || env+=(CRASH_JSON="$JSON") ;;
  loss)
    scenario=netns-tests/s17_loss.sh; limit=600 ;;
esac
[ -z "$KEEP" ] || env+=(NETNS_KEEP=1)

pfx="st$$"
log=$(mktemp "/tmp/stress-$what.XXXX.log")
# Leftovers of a run that was stopped: processes in its namespaces (by pid),
# then the namespaces.
reap() {
  local ns p
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$pfx-" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap reap EXIT
echo "==> $what: $scenario ${env[*]} (time limit ${limit}s, log $log)"
t0=$(date +%s)
rc=0
env "${env[@]}" PFX="$pfx" timeout -k 15 "$limit" bash "$scenario" >"$log" 2>&1 || rc=$?
secs=$(( $(date +%s) - t0 ))
# The scenario's own summary lines: its log lines, not the lab notebook.
grep -E "^\[s1[4-7][a-z_]*\] " "$log" | grep -vE "registry up:|^\[[^]]*\] (partition|healed)" || true
[ "$rc" -ne 124 ] || echo "stopped: over the time limit of ${limit}s"
if [ "$rc" -ne 0 ]; then
  echo "==> $what FAILED (exit $rc) after ${secs}s; the end of its log ($log):"
  tail -n 60 "$log"
  exit 1
fi
[ -z "$JSON" ] || [ ! -f "$JSON" ] || echo "JSON: $JSON"
echo "==> $what passed in ${secs}s (log $log)"
