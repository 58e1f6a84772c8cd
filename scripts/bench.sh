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
#   underlay loss          : right after each system's main tests (raw veth,
#                            pilot-tun, wireguard-go; underlay MTU 1500),
#                            nftables in both namespaces drops BENCH_LOSS_PCT
#                            % (default 1) of the packets arriving on eth0 at
#                            random (`numgen random mod 100 < N`; there is no
#                            netem here) and TCP 1 stream is measured again.
#                            For the drop to hit single packets, not 64 KB
#                            TSO/GSO super-packets that cross a veth whole,
#                            segmentation offloads (tso, gso,
#                            tx-udp-segmentation) are off on both veth ends
#                            meanwhile, for every system alike. The rule's
#                            counters give the loss achieved (printed).
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
#          BENCH_LOSS=0    skip the underlay loss measurements (default 1)
#          BENCH_LOSS_PCT  the share of underlay packets dropped, in % (an
#                          integer 1..99, default 1)
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
LOSS=${BENCH_LOSS:-1}
LOSS_PCT=${BENCH_LOSS_PCT:-1}

[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || { echo "BENCH_SECONDS must be a positive integer (got '$SECS')" >&2; exit 2; }
[[ $PINGS =~ ^[0-9]+$ && $PINGS -ge 10 ]] || { echo "BENCH_PINGS must be an integer >= 10 (got '$PINGS')" >&2; exit 2; }
[[ $LOSS =~ ^[01]$ ]] || { echo "BENCH_LOSS must be 0 or 1 (got '$LOSS')" >&2; exit 2; }
[[ $LOSS_PCT =~ ^[0-9]+$ && $LOSS_PCT -ge 1 && $LOSS_PCT -le 99 ]] || { echo "BENCH_LOSS_PCT must be an integer 1..99 (got '$LOSS_PCT')" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "the benchmark creates network namespaces and TUN devices: run 'sudo scripts/bench.sh'" >&2; exit 1; }

cd "$ROOT"
# Functions only (step, stop_pid, iperf, pilot_pair, ...): see the file.
source "$HERE/bench/lab.sh"

# --- packages and binaries -------------------------------------------------
step "system packages (iperf3, wireguard-go, wireguard-tools, ethtool, ...)"
if [ "$LOSS" = 1 ]; then scripts/deps.sh wireguard-go wg ethtool; else scripts/deps.sh wireguard-go wg; fi

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
if [ "$LOSS" = 1 ]; then for t in nft ethtool; do need "$t"; done; fi
for b in pilot-tun pilot-registry; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b not found (build with cargo build --release, or set PILOT_BIN)"
done

RES=$WORK/results
mkdir -p "$RES"
CLK_TCK=$(getconf CLK_TCK)
WGA=wg${$}a    # wireguard-go's UAPI socket is /var/run/wireguard/<if>.sock,
WGB=wg${$}b    # shared by all namespaces: the names must be unique per run
WG_SOCKS=("/var/run/wireguard/$WGA.sock" "/var/run/wireguard/$WGB.sock")
{
  echo "seconds $SECS"
  echo "pings $PINGS"
  echo "udp_len $UDP_LEN"
  if [ "$LOSS" = 1 ]; then echo "loss_pct $LOSS_PCT"; fi
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

# --- underlay loss -----------------------------------------------------------
# The segmentation offloads that let one skb carry many wire packets across
# the veth; off while packets are dropped, so that each drop is one packet.
LOSS_OFFLOADS=(tso gso tx-udp-segmentation)
# offload_state NS: "tso on gso on ..." as `ethtool -K` takes it, now.
offload_state() {
  onq "$1" ethtool -k eth0 | awk '
    $1 == "tcp-segmentation-offload:"     { printf "tso %s ", $2 }
    $1 == "generic-segmentation-offload:" { printf "gso %s ", $2 }
    $1 == "tx-udp-segmentation:"          { printf "tx-udp-segmentation %s ", $2 }
    END                                   { print "" }'
}
# loss_on: in a and b, offloads off and a fresh nftables table that counts
# every packet arriving on eth0 and drops LOSS_PCT % of them at random.
loss_on() {
  local side f off=()
  for f in "${LOSS_OFFLOADS[@]}"; do off+=("$f" off); done
  for side in a b; do
    offload_state "$side" >"$WORK/offloads-$side.txt"
    on "$side" ethtool -K eth0 "${off[@]}"
    on "$side" nft -f - <<EOF
table inet ptbloss {
  counter seen { }
  counter dropped { }
  chain pre {
    type filter hook prerouting priority -400; policy accept;
    iifname "eth0" counter name "seen"
    iifname "eth0" numgen random mod 100 < $LOSS_PCT counter name "dropped" drop
  }
}
EOF
  done
}
# loss_off SYS: the counters of both ends into SYS's facts (underlay packets
# seen and dropped), then the table removed and the offloads restored.
loss_off() {
  local sys=$1 side seen=0 dropped=0 counts state
  for side in a b; do
    counts=$(onq "$side" nft -j list counters table inet ptbloss | python3 -c '
import json, sys
c = {o["counter"]["name"]: o["counter"]["packets"] for o in json.load(sys.stdin)["nftables"] if "counter" in o}
print(c.get("seen", 0), c.get("dropped", 0))')
    seen=$(( seen + ${counts% *} )); dropped=$(( dropped + ${counts#* } ))
    on "$side" nft delete table inet ptbloss
    read -r -a state <"$WORK/offloads-$side.txt"
    on "$side" ethtool -K eth0 "${state[@]}"
  done
  fact "$sys" loss_seen "$seen"
  fact "$sys" loss_dropped "$dropped"
}
# measure_loss SYS ADDR DAEMON_PIDS: TCP 1 stream with LOSS_PCT % of the
# underlay packets dropped (results under SYS@loss).
measure_loss() {
  [ "$LOSS" = 1 ] || return 0
  local sys=$1@loss addr=$2 pids=$3
  mkdir -p "$RES/$sys"
  step "$1: TCP, 1 stream, ${SECS}s, ${LOSS_PCT}% of the underlay packets dropped at random"
  loss_on
  iperf "$sys" tcp1 "$addr" "$pids" --
  loss_off "$sys"
  python3 "$HERE/bench/report.py" summary "$RES" "$sys" >&2 || true
}

bench_lab

# --- phase 1: raw veth -----------------------------------------------------
step "phase 1: raw veth (192.0.2.11 -> 192.0.2.12)"
measure veth 192.0.2.12 ""
measure_loss veth 192.0.2.12 ""

# --- phase 2: pilot-tun ----------------------------------------------------
step "phase 2: pilot-tun"
pilot_pair
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
measure_loss pilot-tun "$B" "$PA $PB"
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
measure_loss wireguard-go 10.99.0.2 "$WPA $WPB"
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
