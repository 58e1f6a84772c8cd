#!/usr/bin/env bash
# Run the netns scenarios: every netns-tests/s*.sh, or the ones named.
#
#   sudo netns-tests/run.sh                 # all scenarios, in order
#   sudo netns-tests/run.sh s02 s05_revoke_stops_traffic.sh
#
# Each scenario runs in its own shell with its own namespace prefix (PFX),
# under a time limit; its output goes to a log file, shown when it fails
# (NETNS_VERBOSE=1 shows it always). The last line is
# `netns: N passed, M failed`; the exit status is non-zero if any failed.
#
# Environment: PILOT_BIN (default <repo>/target/release), NETNS_TIMEOUT
# (seconds per scenario, default 120), NETNS_JOBS (light scenarios run at
# once, default 2; 1 runs them one by one), NETNS_KEEP=1 keeps each
# scenario's work directory, NETNS_LOGS (where the per-scenario logs go).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PILOT_BIN=${PILOT_BIN:-$ROOT/target/release}
TIMEOUT=${NETNS_TIMEOUT:-120}

if [ "$(id -u)" -ne 0 ]; then
  echo "netns-tests/run.sh: needs root (network namespaces, TUN devices, tcpdump): run it with sudo" >&2
  exit 2
fi
for b in pilot-registry pilot-tun forge-handshake; do
  if [ ! -x "$PILOT_BIN/$b" ]; then
    echo "netns-tests/run.sh: $PILOT_BIN/$b not found: run \`cargo build --release\` in $ROOT first (or set PILOT_BIN)" >&2
    exit 2
  fi
done
missing=()
for t in ip ping nc iperf3 tcpdump python3 ss timeout sha256sum od; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "netns-tests/run.sh: missing tools: ${missing[*]} (scripts/test.sh installs them:" \
    "iproute2 iputils-ping netcat-openbsd iperf3 tcpdump python3 coreutils)" >&2
  exit 2
fi

# Which scenarios: all s*.sh, or the given names (with or without .sh, or a prefix like s03).
scenarios=()
if [ $# -eq 0 ]; then
  for f in "$HERE"/s*.sh; do scenarios+=("$f"); done
else
  for name in "$@"; do
    name=${name##*/}; name=${name%.sh}
    matches=("$HERE/$name".sh)
    [ -f "${matches[0]}" ] || matches=("$HERE/$name"_*.sh)
    if [ ! -f "${matches[0]}" ]; then
      echo "netns-tests/run.sh: no scenario named '$name' in $HERE" >&2
      exit 2
    fi
    scenarios+=("${matches[@]}")
  done
fi

# The one dialect (netns-tests/lib.sh): every scenario calls setup_lab (so
# the error trap is on, and cleanup runs), and leaves pids to lib.sh.
dialect=0
for script in "${scenarios[@]}"; do
  if ! grep -q '^setup_lab' "$script"; then
    echo "netns-tests/run.sh: ${script##*/} does not call setup_lab" >&2; dialect=1
  fi
  if grep -nE 'trap_errors|trap +-|\bkill(all)?\b|pkill|\.pid\b|\$!' "$script" | grep -vE '^[0-9]+: *#' >&2; then
    echo "netns-tests/run.sh: ${script##*/}: the lines above handle the error trap or pids themselves;" \
      "use setup_lab and lib.sh's bg/stop_bg/wait_bg_exit/bg_running/node_down" >&2
    dialect=1
  fi
done
[ "$dialect" -eq 0 ] || exit 2

own_logs=no   # a log dir we made ourselves is removed when all passed
[ -n "${NETNS_LOGS:-}" ] || own_logs=yes
LOGS=${NETNS_LOGS:-$(mktemp -d /tmp/netns-logs.XXXX)}
mkdir -p "$LOGS"

# 10.x routes in the root namespace before the run: none may be added by a test.
root_ten_routes() { ip -4 route show table all 2>/dev/null | grep -E '(^|[^0-9.])10\.' | sort; }
ten_before=$(root_ten_routes)

# Leftovers of a scenario that was killed: its own namespaces (by its prefix),
# and the processes inside them (by pid), then the namespaces themselves.
reap() {
  local pfx=$1 ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$pfx-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null && echo "  (cleaned up leftover namespace $ns)" >&2
  done
  [ -n "${NETNS_KEEP:-}" ] || rm -rf /tmp/"$pfx".????
  rm -rf /etc/netns/"$pfx"-*   # resolv.conf files of its namespaces (netns_resolv)
  return 0
}

passed=0; failed=0; failed_names=()
run_id=$$
# /etc/netns exists before any scenario starts, so none of them makes (or
# removes) it while another one runs; removed at the end if we made it.
etc_netns_made=no
[ -d /etc/netns ] || etc_netns_made=yes
mkdir -p /etc/netns

# run_one SCRIPT: one scenario under its time limit; writes its exit status
# and duration next to its log.
run_one() {
  local script=$1 name pfx log t0 limit rc
  name=$(basename "$script" .sh)
  pfx="nt${run_id}${name%%_*}"          # e.g. nt4242s01: short, unique per run
  log="$LOGS/$name.log"
  t0=$(date +%s%N)
  # A scenario that waits on the kernel's own timers (s32 waits out conntrack's
  # 30 s) may ask for more with a `# netns-timeout: SECONDS` line.
  limit=$(sed -n 's/^# netns-timeout: *\([0-9][0-9]*\)$/\1/p' "$script" | head -n 1)
  limit=${limit:-$TIMEOUT}; [ "$limit" -ge "$TIMEOUT" ] || limit=$TIMEOUT
  PFX=$pfx timeout -k 15 "$limit" bash "$script" >"$log" 2>&1
  rc=$?
  awk -v d=$(( $(date +%s%N) - t0 )) 'BEGIN { printf "%.1f\n", d / 1e9 }' >"$LOGS/$name.secs"
  reap "$pfx"
  [ "$rc" -eq 124 ] && echo "[$name] FAIL: timed out after ${limit}s" >>"$log"
  echo "$rc" >"$LOGS/$name.rc"
}

# report SCRIPT: the verdict of a finished scenario.
report() {
  local name rc secs log
  name=$(basename "$1" .sh)
  log="$LOGS/$name.log"
  rc=$(cat "$LOGS/$name.rc" 2>/dev/null || echo 1)
  secs=$(cat "$LOGS/$name.secs" 2>/dev/null || echo "?")
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    printf 'PASS  %-36s %6ss\n' "$name" "$secs"
    [ -n "${NETNS_VERBOSE:-}" ] && cat "$log"
  else
    failed=$((failed + 1)); failed_names+=("$name")
    printf 'FAIL  %-36s %6ss  (exit %s, log %s)\n' "$name" "$secs" "$rc" "$log"
    echo "----- $name: last 150 lines of $log" >&2
    tail -n 150 "$log" | sed 's/\x1b\[[0-9;]*m//g' >&2
    echo "----- end of $name" >&2
  fi
}

# Light scenarios run NETNS_JOBS at a time (default 2: most of a scenario's
# time is spent waiting on timers and handshakes); one with a
# `# netns-serial` line (it loads the CPU: bulk transfers, floods) runs
# alone. Verdicts are printed in the scenarios' order.
JOBS=${NETNS_JOBS:-2}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "netns-tests/run.sh: NETNS_JOBS must be a positive number" >&2; exit 2; }
running=()   # pids of scenarios in the background
started=()   # scripts started, in order, not yet reported
wait_all() {
  local p
  for p in "${running[@]}"; do wait "$p" 2>/dev/null; done
  running=()
}
report_started() {
  local s
  for s in "${started[@]}"; do report "$s"; done
  started=()
}
for script in "${scenarios[@]}"; do
  if [ "$JOBS" -eq 1 ] || grep -q '^# netns-serial' "$script"; then
    wait_all; report_started
    run_one "$script"
    report "$script"
    continue
  fi
  while [ "${#running[@]}" -ge "$JOBS" ]; do
    wait -n 2>/dev/null
    alive_pids=()
    for p in "${running[@]}"; do kill -0 "$p" 2>/dev/null && alive_pids+=("$p"); done
    running=("${alive_pids[@]}")
  done
  run_one "$script" &
  running+=("$!")
  started+=("$script")
done
wait_all; report_started

[ "$etc_netns_made" = yes ] && rmdir /etc/netns 2>/dev/null

ten_after=$(root_ten_routes)
if [ "$ten_before" != "$ten_after" ]; then
  echo "NETWORK SAFETY: the root namespace's 10.x routes changed during the run:" >&2
  diff <(echo "$ten_before") <(echo "$ten_after") >&2
  failed=$((failed + 1)); failed_names+=("root-namespace-10.x-routes")
fi

if [ "$failed" -eq 0 ]; then
  [ "$own_logs" = yes ] && [ -z "${NETNS_VERBOSE:-}" ] && rm -rf "$LOGS"
else
  echo "failed: ${failed_names[*]}  (logs in $LOGS)"
fi
echo "netns: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
