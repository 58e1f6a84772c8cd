# shellcheck shell=bash
# The benchmark lab, shared by scripts/bench.sh and scripts/profile.sh: two
# namespaces "a" and "b" on one veth (192.0.2.11 -> 192.0.2.12), processes
# stopped by pid, daemon CPU read from /proc, one iperf3 run with its facts,
# and a pilot-tun pair (registry in a, one daemon on each side, mutual trust).
#
# Defines functions only, so it may be sourced first; they use what
# netns-tests/lib.sh gives (on/onq/bg/wait_for/node_up/..., WORK, PIDS, BIN,
# PFX), and the caller sets RES (where results go) and SECS (seconds per
# iperf3 test).

step() { printf '\n==> %s\n' "$*" >&2; }

# Stop a process we started (by pid), wait for it, and forget it, so that the
# exit cleanup never signals a pid that may have been reused meanwhile.
forget_pid() {
  local p=$1 keep=() q
  for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
  PIDS=("${keep[@]}")
}
stop_pid() {
  local p=$1 i
  kill "$p" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
  wait "$p" 2>/dev/null || true
  forget_pid "$p"
}

# cpu_ticks PID...: utime+stime (clock ticks) summed over the processes
# (all their threads). Fields 14 and 15 of /proc/PID/stat, counted after the
# ")" that ends the command name.
cpu_ticks() {
  local total=0 p s
  for p in "$@"; do
    s=$(cat "/proc/$p/stat") || fail "process $p is gone"
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    total=$(( total + ${12} + ${13} ))
  done
  echo "$total"
}
# mem_kb FIELD PID: VmRSS / VmHWM of a process, in kB.
mem_kb() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status"; }

mtu_of() { ip -n "$PFX-$1" -o link show "$2" | grep -o 'mtu [0-9]*' | cut -d' ' -f2; }

# fact SYS KEY VALUE: one line of results/<SYS>/facts.txt.
fact() { mkdir -p "$RES/$1"; echo "$2 $3" >>"$RES/$1/facts.txt"; }
note_error() { mkdir -p "$RES/$1"; echo "$2" >>"$RES/$1/errors.txt"; log "$1: $2"; }

# iperf SYS TEST SERVER_ADDR PIDS -- IPERF_ARGS...: one iperf3 run from a to b,
# with a fresh one-shot server; CPU ticks of PIDS before and after.
iperf() {
  local sys=$1 test=$2 addr=$3 pids=$4; shift 5
  local spid rc=0 t0 t1
  mkdir -p "$RES/$sys"
  bg b "iperf3-s-$sys-$test" iperf3 -s -1 -B "$addr"
  spid=$(cat "$WORK/iperf3-s-$sys-$test.pid")
  wait_listen 10 b 5201
  # shellcheck disable=SC2086
  [ -z "$pids" ] || t0=$(cpu_ticks $pids)
  on_to "$RES/$sys/$test.json" a timeout $(( SECS + 30 )) iperf3 -c "$addr" -t "$SECS" -J "$@" || rc=$?
  # shellcheck disable=SC2086
  [ -z "$pids" ] || { t1=$(cpu_ticks $pids); fact "$sys" "cpu_ticks_$test" $(( t1 - t0 )); }
  [ "$rc" -eq 0 ] || note_error "$sys" "iperf3 $test ($*) exited with status $rc: $(grep -o '"error":.*' "$RES/$sys/$test.json" | head -c 300)"
  stop_pid "$spid"
  sleep 1
}

# underlay_mtu X: the veth between a and b at MTU X (both ends).
underlay_mtu() { ip -n "$PFX-a" link set dev eth0 mtu "$1"; ip -n "$PFX-b" link set dev eth0 mtu "$1"; }

# bench_lab: namespaces a and b joined by the veth, the path checked.
bench_lab() {
  mkns a; mkns b
  link a b 192.0.2.11/24 192.0.2.12/24 eth0 eth0
  wait_for 5 "veth path a -> b" onq a ping -c1 -W1 192.0.2.12
}

# pilot_pair: the registry in a, daemons alpha (a) and beta (b) with mutual
# trust, and the tunnel checked with a ping. Sets PA/PB (daemon pids) and
# A/B (overlay addresses).
# shellcheck disable=SC2034  # PA/PB/A/B are for the caller
pilot_pair() {
  start_registry a 192.0.2.11
  node_up a alpha --registry "$JOIN"
  node_up b beta --registry "$JOIN"
  PA=$(cat "$WORK/alpha/daemon.pid"); PB=$(cat "$WORK/beta/daemon.pid")
  A=$(addr_of a alpha); B=$(addr_of b beta)
  [[ $A == 10.* && $B == 10.* ]] || fail "overlay addresses not in 10.x: alpha=$A beta=$B"
  trust_pair a alpha b beta
}
