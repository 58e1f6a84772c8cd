#!/usr/bin/env bash
# Long fuzzing: every target in fuzz/fuzz_targets/ for at least N executions
# (default 10,000,000), one target after the other, and a table of the
# executions and crashes per target at the end.
#
#   scripts/fuzz-long.sh                         # 10,000,000 per target
#   scripts/fuzz-long.sh --runs 100000           # a quick pass
#   scripts/fuzz-long.sh --runs 1e7 wire stun    # only some targets
#
# Options:  --runs N          executions per target (default 10000000; 1e7 works)
#           --max-seconds S   stop a target after S seconds even short of N
#                             (default 21600: six hours; the table says so)
#           --max-crashes K   stop a target after K crashing inputs (default 20)
#           --json FILE       also write the table as JSON
#
# It builds like fuzz/smoke.sh (cargo fuzz build -O on the stable toolchain
# with RUSTC_BOOTSTRAP=1; see that script's header for why) and runs libFuzzer
# at nice 19, one process, so the machine stays usable. The first run of a
# target reads the committed seeds (fuzz/seeds/<target>/) and the corpus
# libFuzzer keeps (fuzz/corpus/<target>/, git-ignored).
#
# A crash stops libFuzzer; this script then copies the input into the
# target's seed directory (fuzz/seeds/<target>/crash-<sha256 prefix>, to be
# committed: the smoke run in scripts/test.sh replays every seed, so the crash
# stays a failing regression test until it is fixed), prints it as hex, and
# goes on from the corpus alone (the seeds now hold the crash) until the
# target has N executions. Executions are counted from libFuzzer's own
# statistics (stat::number_of_executed_units), over every restart.
# Exit status: 1 if any target crashed, else 0.
set -euo pipefail

RUNS=10000000
MAX_SECS=21600
MAX_CRASHES=20
JSON=
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --max-seconds) MAX_SECS=$2; shift 2 ;;
    --max-crashes) MAX_CRASHES=$2; shift 2 ;;
    --json) JSON=$(realpath -m "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz-long.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
RUNS=$(python3 -c 'import sys; print(int(float(sys.argv[1])))' "$RUNS") \
  || { echo "--runs takes a number of executions" >&2; exit 2; }
for v in RUNS MAX_SECS MAX_CRASHES; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || { echo "fuzz-long.sh: ${v} must be a positive integer" >&2; exit 2; }
done

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
step() { printf '\n==> %s\n' "$*"; }

command -v cargo-fuzz >/dev/null 2>&1 || cargo fuzz --version >/dev/null 2>&1 \
  || { echo "cargo-fuzz is missing: run fuzz/smoke.sh once (it installs it)" >&2; exit 1; }
cargo metadata --locked --format-version 1 >/dev/null \
  || { echo "fuzz/Cargo.lock is out of date: see fuzz/smoke.sh" >&2; exit 1; }
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)

step "building ${#targets[@]} targets: ${targets[*]}"
cargo fuzz build -O

mkdir -p artifacts
LOGDIR=$(mktemp -d /tmp/fuzz-long.XXXX)
rows=()
any_crash=0
for t in "${targets[@]}"; do
  step "fuzzing $t for $RUNS executions (at most ${MAX_SECS}s)"
  mkdir -p "corpus/$t" "seeds/$t"
  done_runs=0 crashes=0 round=0 t0=$(date +%s) stop=""
  dirs=("corpus/$t" "seeds/$t")
  while [ "$done_runs" -lt "$RUNS" ]; do
    left_secs=$(( MAX_SECS - ($(date +%s) - t0) ))
    [ "$left_secs" -gt 0 ] || { stop="time limit"; break; }
    round=$((round + 1))
    log="$LOGDIR/$t.$round.log"
    rc=0
    nice -n 19 cargo fuzz run -O "$t" "${dirs[@]}" -- \
      -runs=$(( RUNS - done_runs )) -max_total_time="$left_secs" \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    n=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    done_runs=$(( done_runs + ${n:-0} ))
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
      [ "$done_runs" -ge "$RUNS" ] || { stop="libFuzzer stopped early (time limit)"; break; }
      continue
    fi
    if [ -z "$crash" ] || [ ! -f "$crash" ]; then
      echo "$t: libFuzzer failed (exit $rc) without a crash input; last lines of $log:" >&2
      tail -n 30 "$log" >&2
      stop="libFuzzer failed (exit $rc, $log)"; any_crash=1; break
    fi
    crashes=$((crashes + 1)); any_crash=1
    seed="seeds/$t/crash-$(sha256sum "$crash" | cut -c1-16)"
    cp "$crash" "$seed"
    echo "$t: CRASH #$crashes after $done_runs executions ($(grep -m1 -E 'panicked|ERROR: ' "$log" || echo 'see log'))"
    echo "  input ($(wc -c <"$crash") bytes) copied to fuzz/$seed: $(od -An -tx1 -v "$crash" | tr -d ' \n' | cut -c1-200)"
    echo "  log: $log"
    [ "$crashes" -lt "$MAX_CRASHES" ] || { stop="$crashes crashes"; break; }
    dirs=("corpus/$t")   # the seeds hold the crash now: go on from the corpus
  done
  secs=$(( $(date +%s) - t0 ))
  cov=$(grep -ho 'cov: [0-9]*' "$LOGDIR/$t".*.log | tail -n 1 | cut -d' ' -f2 || true)
  echo "$t: $done_runs executions in ${secs}s, $crashes crashes${stop:+ (stopped: $stop)}"
  rows+=("$t|$done_runs|$crashes|$secs|${cov:-?}|$stop")
done

step "summary ($RUNS executions asked per target; logs in $LOGDIR)"
printf '%-10s %14s %8s %8s %10s %7s  %s\n' target executions crashes seconds execs/s edges note
for r in "${rows[@]}"; do
  IFS='|' read -r t n c s cov note <<<"$r"
  printf '%-10s %14s %8s %8s %10s %7s  %s\n' "$t" "$n" "$c" "$s" "$(( n / (s > 0 ? s : 1) ))" "$cov" "$note"
done
if [ -n "$JSON" ]; then
  printf '%s\n' "${rows[@]}" | python3 -c '
import json, sys
out = []
for line in sys.stdin.read().splitlines():
    t, n, c, s, cov, note = line.split("|")
    out.append({"target": t, "executions": int(n), "crashes": int(c), "seconds": int(s),
                "edges": None if cov == "?" else int(cov), "stopped": note or None})
json.dump(out, open(sys.argv[1], "w"), indent=2)
' "$JSON"
  echo "JSON: $JSON"
fi
[ "$any_crash" -eq 0 ] || { echo "crashes found: their inputs are in fuzz/seeds/<target>/crash-* (commit them)"; exit 1; }
echo "no crash in ${#targets[@]} targets"
