#!/usr/bin/env bash
# Benchmark: raw veth vs pilot-tun vs wireguard-go, in namespaces this script
# builds itself, one system after the other, with the same tests and durations.
#
#   namespace "a" (client side)                 namespace "b" (server side)
#   +------------------------------+            +------------------------------+
#   | eth0    192.0.2.11/24        |   direct   | eth0    192.0.2.12/24        |
#   | pilot-registry :7946         |====veth====|                              |
#   | pilot0  10.77.x.y  (phase 2) |    pair    | pilot0  10.77.x.y  (phase 2) |
#   | wg*a    10.99.0.1  (phase 3) |            | wg*b    10.99.0.2  (phase 3) |
#   | iperf3 -c, ping              |            | iperf3 -s                    |
#   +------------------------------+            +------------------------------+
#
#   phase 1  veth          : the tests straight over 192.0.2.11 -> 192.0.2.12
#   phase 2  pilot-tun     : registry + two daemons, mutual trust, tests over
#                            pilot0 (its UDP tunnel rides the same veth); then
#                            the daemons and the registry are stopped
#   phase 3  wireguard-go  : userspace WireGuard (from apt; no kernel module is
#                            used), configured with `wg`, tests over 10.99.0.x;
#                            then stopped
#   underlay MTU 1460      : at the end of phases 2 and 3 the veth goes to
#                            MTU 1460 (Google Cloud's default) and TCP is
#                            measured again: pilot-tun restarted with no flag
#                            (it picks its MTU from the route); wireguard-go
#                            with MTU 1380 (what wg-quick picks: route - 80)
#                            and with its default 1420 (its datagrams are
#                            then fragmented by the kernel)
#
# For each system it measures
#   - TCP throughput, 1 stream and 4 streams:  iperf3 -t N [-P 4], the
#     receiver's bitrate from iperf3's JSON;
#   - small-packet UDP rate: iperf3 -u -b 0 -l 64 -t N, packets per second that
#     arrived at the receiver (and the loss);
#   - latency: ping -c 200 -i 0.01 on an idle path, average and p99 of the
#     individual RTTs;
#   - daemon CPU: utime+stime of the tunnel daemons at BOTH ends (from
#     /proc/PID/stat) across the 1-stream TCP test, divided by the GB (1e9 B)
#     the receiver got (n/a for raw veth);
#   - daemon memory: VmRSS idle with one peer (after the handshake, before any
#     load) and VmHWM (peak RSS) after all the load.
# It prints a table (each system's ratio to raw veth), a block pilot-tun ÷
# wireguard-go with the targets marked pass/miss, and writes everything as
# JSON. Benchmarks are not tests: a figure never makes this script fail; it
# exits non-zero only when the setup itself breaks (build, namespaces,
# daemons not starting, no tunnel).
#
# Usage:   sudo scripts/bench.sh
# Env:     BENCH_SECONDS   seconds per iperf3 test (default 5)
#          BENCH_PINGS     pings per system (default 200, 10 ms apart)
#          BENCH_JSON      where the JSON goes (default ./bench-results.json)
#          BENCH_SKIP_BUILD=1  use the binaries already in target/release
#                          (or PILOT_BIN) instead of running cargo build
#          BENCH_GRANT     a scope such as "tcp/5201,udp/5201,icmp": both
#                          daemons approve each other with --allow BENCH_GRANT,
#                          so every packet both ways goes through the per-peer
#                          policy filter (default: plain trust, no filter).
#                          Compare a run with it and one without for the
#                          policy's cost.
#          NETNS_KEEP=1    keep the work directory (raw iperf3/ping output, logs)
#
# Network safety: traffic flows only between the two namespaces created here;
# the underlay uses 192.0.2.0/24 (documentation range); the 10.x addresses
# exist only on the TUN devices inside those namespaces; nothing is added to
# the root namespace. Namespaces and processes are removed (by name and pid) on
# any exit, also on Ctrl-C (netns-tests/lib.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT_JSON=${BENCH_JSON:-$PWD/bench-results.json}
case "$OUT_JSON" in /*) ;; *) OUT_JSON=$PWD/$OUT_JSON ;; esac
SECS=${BENCH_SECONDS:-5}
PINGS=${BENCH_PINGS:-200}
UDP_LEN=64

[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || { echo "BENCH_SECONDS must be a positive integer (got '$SECS')" >&2; exit 2; }
[[ $PINGS =~ ^[0-9]+$ && $PINGS -ge 10 ]] || { echo "BENCH_PINGS must be an integer >= 10 (got '$PINGS')" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "the benchmark creates network namespaces and TUN devices: run 'sudo scripts/bench.sh'" >&2; exit 1; }

cd "$ROOT"
step() { printf '\n==> %s\n' "$*" >&2; }

# --- packages and binaries -------------------------------------------------
step "system packages (iperf3, wireguard-go, wireguard-tools, ...)"
scripts/deps.sh wireguard-go wg

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --locked --release --workspace --bins"
  CARGO=$(command -v cargo || true)
  if [ -z "$CARGO" ]; then
    # `sudo` drops ~/.cargo/bin from PATH: look in the invoking user's home.
    for home in ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)"} "$HOME" /root; do
      [ -x "$home/.cargo/bin/cargo" ] && { CARGO=$home/.cargo/bin/cargo; break; }
    done
  fi
  [ -n "$CARGO" ] || { echo "cargo not found (install Rust from https://rustup.rs, or set BENCH_SKIP_BUILD=1 with PILOT_BIN)" >&2; exit 1; }
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U "$ROOT")" = "$SUDO_USER" ]; then
    # Build as the user who owns the checkout, so target/ does not end up root's.
    sudo -u "$SUDO_USER" -H "$CARGO" build --locked --release --workspace --bins
  else
    "$CARGO" build --locked --release --workspace --bins
  fi
fi

# --- the lab ---------------------------------------------------------------
SCENARIO=bench
PFX=ptb$$
source "$ROOT/netns-tests/lib.sh"
setup_lab
trap_errors
for t in ip ping iperf3 python3 ss timeout wireguard-go wg getconf; do need "$t"; done
for b in pilot-tun pilot-registry; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b not found (build with cargo build --release, or set PILOT_BIN)"
done

RES=$WORK/results
mkdir -p "$RES"
CLK_TCK=$(getconf CLK_TCK)
WGA=wg${$}a    # wireguard-go's UAPI socket is /var/run/wireguard/<if>.sock,
WGB=wg${$}b    # shared by all namespaces: the names must be unique per run
WG_SOCKS=(/var/run/wireguard/$WGA.sock /var/run/wireguard/$WGB.sock)
{
  echo "seconds $SECS"
  echo "pings $PINGS"
  echo "udp_len $UDP_LEN"
  echo "clk_tck $CLK_TCK"
  echo "kernel $(uname -r)"
  echo "cpus $(nproc)"
  echo "cpu_model $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "iperf3 $(iperf3 --version | head -1)"
  echo "wireguard_go $(wireguard-go --version 2>/dev/null | head -1)"
  echo "pilot_tun $("$BIN/pilot-tun" --version 2>/dev/null)"
  echo "loadavg_start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "git $(git -c safe.directory="$ROOT" -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
} >"$RES/meta.txt"

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
bench_cleanup() {
  local rc=$? f
  set +e
  # wireguard-go removes its control socket on SIGTERM; stop it here (by pid)
  # so that a socket left by a SIGKILL can be removed too.
  for f in "$WORK/wireguard-go-a.pid" "$WORK/wireguard-go-b.pid"; do
    [ -f "$f" ] && stop_pid "$(cat "$f")"
  done
  rm -f "${WG_SOCKS[@]}"
  (exit $rc)   # hand the exit status on to lib.sh's cleanup
  cleanup
}
trap bench_cleanup EXIT
trap 'trap - ERR; printf "[bench] terminated by a signal\n" >&2; dump_logs; exit 143' TERM INT

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
  bg b "iperf3-s-$sys-$test" iperf3 -s -1 -B "$addr"
  spid=$(cat "$WORK/iperf3-s-$sys-$test.pid")
  wait_listen 10 b 5201
  [ -z "$pids" ] || t0=$(cpu_ticks $pids)
  on_to "$RES/$sys/$test.json" a timeout $(( SECS + 30 )) iperf3 -c "$addr" -t "$SECS" -J "$@" || rc=$?
  [ -z "$pids" ] || { t1=$(cpu_ticks $pids); fact "$sys" "cpu_ticks_$test" $(( t1 - t0 )); }
  [ "$rc" -eq 0 ] || note_error "$sys" "iperf3 $test ($*) exited with status $rc: $(grep -o '"error":.*' "$RES/$sys/$test.json" | head -c 300)"
  stop_pid "$spid"
  sleep 1
}

# underlay_mtu X: the veth between a and b at MTU X (both ends).
underlay_mtu() { ip -n "$PFX-a" link set dev eth0 mtu "$1"; ip -n "$PFX-b" link set dev eth0 mtu "$1"; }

# measure_tcp SYS ADDR DAEMON_PIDS: TCP 1 and 4 streams only (the underlay
# MTU 1460 rows).
measure_tcp() {
  local sys=$1 addr=$2 pids=$3
  mkdir -p "$RES/$sys"
  step "$sys: TCP, 1 stream, ${SECS}s"
  iperf "$sys" tcp1 "$addr" "$pids" --
  step "$sys: TCP, 4 streams, ${SECS}s"
  iperf "$sys" tcp4 "$addr" "$pids" -- -P 4
  python3 "$HERE/bench/report.py" summary "$RES" "$sys" >&2 || true
}

# measure SYS ADDR DAEMON_PIDS: the whole set of tests against ADDR (in b).
measure() {
  local sys=$1 addr=$2 pids=$3 p rc=0
  mkdir -p "$RES/$sys"
  if [ -n "$pids" ]; then
    sleep 2   # settle after the handshake: the "idle with one peer" memory
    fact "$sys" rss_idle_kb_a "$(mem_kb VmRSS "${pids%% *}")"
    fact "$sys" rss_idle_kb_b "$(mem_kb VmRSS "${pids##* }")"
  fi
  step "$sys: ping -c $PINGS -i 0.01 $addr"
  on_to "$RES/$sys/ping.txt" a ping -c "$PINGS" -i 0.01 -W 1 "$addr" || rc=$?
  [ "$rc" -eq 0 ] || note_error "$sys" "ping exited with status $rc"
  tail -n 2 "$RES/$sys/ping.txt" >&2
  step "$sys: TCP, 1 stream, ${SECS}s"
  iperf "$sys" tcp1 "$addr" "$pids" --
  step "$sys: TCP, 4 streams, ${SECS}s"
  iperf "$sys" tcp4 "$addr" "$pids" -- -P 4
  step "$sys: UDP, ${UDP_LEN}-byte datagrams, unlimited rate, ${SECS}s"
  iperf "$sys" udp "$addr" "$pids" -- -u -b 0 -l "$UDP_LEN"
  if [ -n "$pids" ]; then
    for p in $pids; do kill -0 "$p" 2>/dev/null || fail "$sys: daemon pid $p died during the tests"; done
    fact "$sys" rss_peak_kb_a "$(mem_kb VmHWM "${pids%% *}")"
    fact "$sys" rss_peak_kb_b "$(mem_kb VmHWM "${pids##* }")"
    fact "$sys" rss_after_kb_a "$(mem_kb VmRSS "${pids%% *}")"
    fact "$sys" rss_after_kb_b "$(mem_kb VmRSS "${pids##* }")"
  fi
  python3 "$HERE/bench/report.py" summary "$RES" "$sys" >&2 || true
}

mkns a; mkns b
link a b 192.0.2.11/24 192.0.2.12/24 eth0 eth0

# --- phase 1: raw veth -----------------------------------------------------
step "phase 1: raw veth (192.0.2.11 -> 192.0.2.12)"
wait_for 5 "veth path a -> b" onq a ping -c1 -W1 192.0.2.12
measure veth 192.0.2.12 ""

# --- phase 2: pilot-tun ----------------------------------------------------
step "phase 2: pilot-tun"
start_registry a 192.0.2.11
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
PA=$(cat "$WORK/alpha/daemon.pid"); PB=$(cat "$WORK/beta/daemon.pid")
A=$(addr_of a alpha); B=$(addr_of b beta)
[[ $A == 10.* && $B == 10.* ]] || fail "overlay addresses not in 10.x: alpha=$A beta=$B"
trust_pair a alpha b beta
if [ -n "${BENCH_GRANT:-}" ]; then
  step "scoped grants both ways: $BENCH_GRANT"
  ptq b beta trust approve alpha --allow "$BENCH_GRANT" >&2
  ptq a alpha trust approve beta --allow "$BENCH_GRANT" >&2
  fact pilot-tun grant "$BENCH_GRANT"
fi
wait_for 15 "ping alpha -> beta over pilot-tun" onq a ping -c1 -W1 "$B"
ptq a alpha --json peers >"$RES/pilot-tun-peers-before.json"
EP=$(python3 -c 'import json,sys; print(" ".join(str(p.get("endpoint")) for p in json.load(open(sys.argv[1]))))' "$RES/pilot-tun-peers-before.json")
log "pilot-tun: alpha=$A (pid $PA) beta=$B (pid $PB); alpha's path to beta: $EP"
fact pilot-tun endpoint "$EP"
fact pilot-tun pid_a "$PA"; fact pilot-tun pid_b "$PB"
fact pilot-tun mtu "$(mtu_of a pilot0)"
measure pilot-tun "$B" "$PA $PB"
ptq a alpha --json status >"$RES/pilot-tun-status-a.json" || true
ptq b beta --json status >"$RES/pilot-tun-status-b.json" || true
ptq a alpha --json peers >"$RES/pilot-tun-peers-after.json" || true
step "pilot-tun at underlay MTU 1460: restart both daemons, no flag"
underlay_mtu 1460
node_restart a alpha; node_restart b beta
PA=$(cat "$WORK/alpha/daemon.pid"); PB=$(cat "$WORK/beta/daemon.pid")
wait_for 15 "ping alpha -> beta over pilot-tun at underlay MTU 1460" onq a ping -c1 -W1 "$B"
fact pilot-tun@1460 mtu "$(mtu_of a pilot0)"
measure_tcp pilot-tun@1460 "$B" "$PA $PB"
ptq a alpha --json peers >"$RES/pilot-tun@1460-peers-after.json" || true
underlay_mtu 1500
node_down a alpha; node_down b beta
wait_for 10 "pilot-tun daemons exit" sh -c "! kill -0 $PA 2>/dev/null && ! kill -0 $PB 2>/dev/null"
rm -f "$WORK/alpha/daemon.pid" "$WORK/beta/daemon.pid"
cp "$WORK/alpha/pilot-tun.log" "$RES/pilot-tun-a.log" 2>/dev/null || true
cp "$WORK/beta/pilot-tun.log" "$RES/pilot-tun-b.log" 2>/dev/null || true
REG_PID=$(cat "$WORK/registry.pid"); stop_pid "$REG_PID"

# --- phase 3: wireguard-go -------------------------------------------------
step "phase 3: wireguard-go $(wireguard-go --version 2>/dev/null | head -1 | awk '{print $2}') (userspace)"
mkdir -p "$WORK/wg"
umask 077
wg genkey >"$WORK/wg/a.key"; wg pubkey <"$WORK/wg/a.key" >"$WORK/wg/a.pub"
wg genkey >"$WORK/wg/b.key"; wg pubkey <"$WORK/wg/b.key" >"$WORK/wg/b.pub"
umask 022
for side in a b; do
  ifn=$WGA; [ $side = b ] && ifn=$WGB
  bg $side "wireguard-go-$side" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$ifn"
  wait_for 10 "wireguard-go creates $ifn and its control socket" \
    sh -c "ip -n $PFX-$side link show $ifn && test -S /var/run/wireguard/$ifn.sock"
done
WPA=$(cat "$WORK/wireguard-go-a.pid"); WPB=$(cat "$WORK/wireguard-go-b.pid")
on a wg set "$WGA" private-key "$WORK/wg/a.key" listen-port 51820 \
  peer "$(cat "$WORK/wg/b.pub")" endpoint 192.0.2.12:51820 allowed-ips 10.99.0.2/32
on b wg set "$WGB" private-key "$WORK/wg/b.key" listen-port 51820 \
  peer "$(cat "$WORK/wg/a.pub")" endpoint 192.0.2.11:51820 allowed-ips 10.99.0.1/32
on a ip addr add 10.99.0.1/24 dev "$WGA"; on a ip link set "$WGA" up
on b ip addr add 10.99.0.2/24 dev "$WGB"; on b ip link set "$WGB" up
wait_for 15 "ping over wireguard-go" onq a ping -c1 -W1 10.99.0.2
log "wireguard-go: a=10.99.0.1 (pid $WPA) b=10.99.0.2 (pid $WPB), mtu $(mtu_of a "$WGA")"
fact wireguard-go mtu "$(mtu_of a "$WGA")"
fact wireguard-go pid_a "$WPA"; fact wireguard-go pid_b "$WPB"
measure wireguard-go 10.99.0.2 "$WPA $WPB"
onq a wg show "$WGA" >"$RES/wireguard-go-show-a.txt" 2>&1 || true
step "wireguard-go at underlay MTU 1460: interface MTU 1380 (wg-quick's choice), then its default 1420"
underlay_mtu 1460
on a ip link set dev "$WGA" mtu 1380; on b ip link set dev "$WGB" mtu 1380
wait_for 15 "ping over wireguard-go at underlay MTU 1460" onq a ping -c1 -W1 10.99.0.2
fact wireguard-go@1460 mtu "$(mtu_of a "$WGA")"
measure_tcp wireguard-go@1460 10.99.0.2 "$WPA $WPB"
on a ip link set dev "$WGA" mtu 1420; on b ip link set dev "$WGB" mtu 1420
fact wireguard-go@1460-mtu1420 mtu "$(mtu_of a "$WGA")"
measure_tcp wireguard-go@1460-mtu1420 10.99.0.2 "$WPA $WPB"
underlay_mtu 1500
stop_pid "$WPA"; stop_pid "$WPB"; rm -f "$WORK/wireguard-go-a.pid" "$WORK/wireguard-go-b.pid"

# --- report ----------------------------------------------------------------
step "results"
echo "loadavg_end $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/meta.txt"
python3 "$HERE/bench/report.py" report "$RES" "$OUT_JSON"
if [ -n "${SUDO_UID:-}" ]; then chown "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$OUT_JSON" 2>/dev/null || true; fi
echo "JSON written to $OUT_JSON"
