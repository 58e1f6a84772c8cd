#!/usr/bin/env bash
# Helpers for the netns scenarios: namespaces with documentation-range
# underlay addresses, processes tracked by pid, cleanup on any exit.
#
# Every namespace a scenario creates is named "$PFX-<name>" (PFX is unique per
# run), every process it starts is recorded by pid, and `cleanup` (installed
# as an EXIT trap by `setup_lab`) kills exactly those pids and deletes exactly
# those namespaces, also when the scenario fails half-way.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PILOT_BIN:-$ROOT/target/release}
PFX=${PFX:-pt$$}
WORK=$(mktemp -d "/tmp/$PFX.XXXX")
PIDS=()
NSES=()
SCENARIO=${SCENARIO:-$(basename "$0" .sh)}

log()  { printf '[%s] %s\n' "$SCENARIO" "$*" >&2; }
fail() { printf '[%s] FAIL: %s\n' "$SCENARIO" "$*" >&2; dump_logs; exit 1; }
pass() { printf '[%s] PASS: %s\n' "$SCENARIO" "$*" >&2; }

# on NS CMD...: run CMD inside namespace NS, echoing it like a lab notebook.
on() { local ns=$1; shift; printf '  (%s)$ %s\n' "$ns" "$*" >&2; ip netns exec "$PFX-$ns" "$@"; }
# on_to FILE NS CMD...: like `on`, with CMD's stdout and stderr going to FILE.
on_to() { local f=$1 ns=$2; shift 2; printf '  (%s)$ %s  >%s\n' "$ns" "$*" "${f##*/}" >&2; ip netns exec "$PFX-$ns" "$@" >"$f" 2>&1; }
# quiet variant for polling loops
onq() { local ns=$1; shift; ip netns exec "$PFX-$ns" "$@"; }

# bg NS LOGNAME CMD...: start CMD in NS in the background, record its pid.
bg() {
  local ns=$1 name=$2; shift 2
  printf '  (%s)$ %s &\n' "$ns" "$*" >&2
  ip netns exec "$PFX-$ns" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$name.pid"
}

dump_logs() {
  for f in "$WORK"/*.log "$WORK"/*/pilot-tun.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 25 lines)" >&2
    tail -n 25 "$f" >&2 || true
  done
}

cleanup() {
  local rc=$?
  set +e
  trap - ERR
  # Daemons started with `pilot-tun up` (background) record their pid via status.
  for f in "$WORK"/*/daemon.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3
  for f in "$WORK"/*/daemon.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ns in "${NSES[@]}"; do ip netns del "$PFX-$ns" 2>/dev/null; done
  if [ -n "${NETNS_KEEP:-}" ]; then echo "[$SCENARIO] kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}

setup_lab() { trap cleanup EXIT INT TERM; }

# mkns NAME: a namespace with loopback up.
mkns() {
  ip netns add "$PFX-$1"
  NSES+=("$1")
  ip -n "$PFX-$1" link set lo up
}

# switch NAME: a namespace holding a bridge "br0" (an L2 segment).
switch() {
  mkns "$1"
  ip -n "$PFX-$1" link add br0 type bridge
  ip -n "$PFX-$1" link set br0 up
}

# plug HOST SWITCH ADDR/LEN [IFNAME]: veth from HOST to SWITCH's bridge.
plug() {
  local host=$1 sw=$2 addr=$3 ifn=${4:-eth0}
  PLUG_SEQ=$(( ${PLUG_SEQ:-0} + 1 ))
  local peer="v${PLUG_SEQ}-${host:0:10}"
  ip link add "$peer" netns "$PFX-$sw" type veth peer name "$ifn" netns "$PFX-$host"
  ip -n "$PFX-$sw" link set "$peer" master br0 up
  ip -n "$PFX-$host" addr add "$addr" dev "$ifn"
  ip -n "$PFX-$host" link set "$ifn" up
}

# link A B ADDR_A/LEN ADDR_B/LEN IF_A IF_B: a point-to-point veth.
link() {
  ip link add "$5" netns "$PFX-$1" type veth peer name "$6" netns "$PFX-$2"
  ip -n "$PFX-$1" addr add "$3" dev "$5"; ip -n "$PFX-$1" link set "$5" up
  ip -n "$PFX-$2" addr add "$4" dev "$6"; ip -n "$PFX-$2" link set "$6" up
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s%N) + secs * 1000000000 ))
  while [ "$(date +%s%N)" -lt $end ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  fail "timed out after ${secs}s waiting for: $what"
}

# wait_for_ok SECONDS CMD...: like wait_for, but returns 1 on timeout instead
# of failing, so the caller can say more about what it saw.
wait_for_ok() {
  local secs=$1; shift
  local end=$(( $(date +%s%N) + secs * 1000000000 ))
  while [ "$(date +%s%N)" -lt $end ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# registry NS IP: start pilot-registry on IP:7946 in NS; sets JOIN.
start_registry() {
  local ns=$1 ip=$2
  mkdir -p "$WORK/registry"
  bg "$ns" registry "$BIN/pilot-registry" --listen "$ip:7946" --state-dir "$WORK/registry"
  wait_for 10 "registry join URL" test -s "$WORK/registry/join-url"
  JOIN=$(cat "$WORK/registry/join-url")
  log "registry up: $JOIN"
}

restart_registry() {
  local ns=$1 ip=$2
  kill "$(cat "$WORK/registry.pid")"; wait "$(cat "$WORK/registry.pid")" 2>/dev/null || true
  rm -f "$WORK/registry/join-url"
  bg "$ns" registry "$BIN/pilot-registry" --listen "$ip:7946" --state-dir "$WORK/registry"
  wait_for 10 "restarted registry writes its join URL" test -s "$WORK/registry/join-url"
  sleep 0.5
}

# stop_registry: kill the registry (by its recorded pid) and wait until it is gone.
# `start_registry` brings it back on the same state dir (same key, same JOIN).
stop_registry() {
  local pid; pid=$(cat "$WORK/registry.pid")
  log "stopping registry (pid $pid)"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # so that a later start_registry waits for the new process's URL
  rm -f "$WORK/registry/join-url"
}

# node NS NAME [extra up args...]: `pilot-tun up` (background) in NS with its
# own state dir; records the daemon pid.
node_up() {
  local ns=$1 name=$2; shift 2
  mkdir -p "$WORK/$name"
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" up --name "$name" "$@" \
    | tee "$WORK/$name.up" >&2
  onq "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" --json status \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])' >"$WORK/$name/daemon.pid"
}

node_down() {
  local ns=$1 name=$2
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" down >&2
}

# node_restart NS NAME [up args...]: `down`, wait until the old daemon process
# has exited (by its recorded pid), then `up` again on the same state dir.
node_restart() {
  local ns=$1 name=$2; shift 2
  local old; old=$(cat "$WORK/$name/daemon.pid")
  node_down "$ns" "$name"
  wait_for 10 "$name's old daemon (pid $old) exits" sh -c "! kill -0 $old"
  node_up "$ns" "$name" "$@"
}

# pt NS NAME ARGS...: run a pilot-tun command against NAME's daemon.
pt() { local ns=$1 name=$2; shift 2; on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" "$@"; }
ptq() { local ns=$1 name=$2; shift 2; onq "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" "$@"; }

# addr_of NS NAME: the node's overlay address.
addr_of() {
  ptq "$1" "$2" --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["address"])'
}

# json_get NS NAME EXPR ARGS...: evaluate a python expression on `--json ARGS` output (d).
json_get() {
  local ns=$1 name=$2 expr=$3; shift 3
  ptq "$ns" "$name" --json "$@" | python3 -c "import json,sys; d=json.load(sys.stdin); print($expr)"
}

# trust_pair NS_A A NS_B B: A requests, B approves; waits until both trusted.
trust_pair() {
  local na=$1 a=$2 nb=$3 b=$4
  pt "$na" "$a" trust request "$b" --note "netns test" >&2
  wait_for 5 "$b sees $a's request" sh -c "ip netns exec $PFX-$nb $BIN/pilot-tun --state-dir $WORK/$b --json trust pending | grep -q '\"$a\"'"
  pt "$nb" "$b" trust approve "$a" >&2
  wait_for 5 "$a sees $b's approval" sh -c "ip netns exec $PFX-$na $BIN/pilot-tun --state-dir $WORK/$a --json trust list | grep -q '\"trusted\"'"
}

need() { command -v "$1" >/dev/null 2>&1 || fail "missing tool: $1 (scripts/test.sh installs it)"; }

# trap_errors: any unexpected failing command fails the scenario (with its
# line, and the logs) instead of ending it silently through `set -e`.
# Also: killed by a time limit (TERM/INT) shows the logs before cleaning up.
trap_errors() {
  set -E
  trap '_err_trap $? "$BASH_COMMAND" "$LINENO"' ERR
  trap 'trap - ERR; printf "[%s] FAIL: terminated by a signal\n" "$SCENARIO" >&2; dump_logs; exit 143' TERM INT
}
_err_trap() {
  local rc=$1 cmd=$2 line=$3 i where=""
  # Inside $(...) just hand the status up: the outer command reports it.
  [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"
  trap - ERR
  # The innermost frame that belongs to the scenario file itself.
  for ((i = 1; i < ${#BASH_SOURCE[@]}; i++)); do
    if [ "${BASH_SOURCE[i]}" = "$0" ]; then where="$0:${BASH_LINENO[i-1]}"; break; fi
  done
  fail "unexpected exit status $rc at ${where:-line $line}: $cmd"
}

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# wait_listen SECONDS NS PORT: poll until a TCP listener on PORT exists in NS.
wait_listen() {
  wait_for "$1" "TCP listener on port $3 in $2" \
    sh -c "ip netns exec $PFX-$2 ss -Hltn 'sport = :$3' | grep -q LISTEN"
}

# tcp_blocked_fast NS ADDR PORT: a TCP connect from NS to ADDR:PORT must fail,
# and within 2 s (the refusal is an ICMP error, not a timeout). Sets ELAPSED_MS.
tcp_blocked_fast() {
  local ns=$1 addr=$2 port=$3 t0 rc=0
  t0=$(now_ms)
  on "$ns" timeout 3 nc -z -w 2 "$addr" "$port" || rc=$?
  ELAPSED_MS=$(( $(now_ms) - t0 ))
  [ "$rc" -ne 0 ] || fail "TCP connect $ns -> $addr:$port succeeded; it must be refused"
  [ "$ELAPSED_MS" -lt 2000 ] || fail "TCP connect $ns -> $addr:$port took ${ELAPSED_MS} ms to fail (must fail fast, < 2000 ms)"
  log "TCP connect $ns -> $addr:$port refused after ${ELAPSED_MS} ms (exit $rc)"
}

# NAT routers for the NAT scenarios (WANs plugged into the switch "inet").
# nat_router NAME WAN_IP LAN_SW LAN_GW/LEN MODE: a NAT router namespace.
nat_router() {
  local name=$1 wan=$2 lan=$3 gw=$4 mode=$5
  mkns "$name"; switch "$lan"
  plug "$name" inet "$wan/24" wan
  plug "$name" "$lan" "$gw" lan
  onq "$name" sysctl -qw net.ipv4.ip_forward=1
  local masq="masquerade"
  [ "$mode" = hard ] && masq="masquerade fully-random"
  # Like a home router: masquerade on the way out, and a stateful firewall
  # that drops unsolicited packets from the internet (dropped before
  # conntrack confirms them, so they leave no state behind).
  onq "$name" nft -f - <<NFT
table ip nat {
  chain post { type nat hook postrouting priority 100; policy accept; oifname "wan" $masq; }
}
table inet fw {
  chain input { type filter hook input priority 0; policy accept; iifname "wan" ct state established,related accept; iifname "wan" drop; }
  chain forward { type filter hook forward priority 0; policy accept; iifname "wan" ct state established,related accept; iifname "wan" drop; }
}
NFT
}
# behind HOST LAN_SW ADDR/LEN GW
behind() {
  mkns "$1"; plug "$1" "$2" "$3"; onq "$1" ip route add default via "$4"
}

# transfer_ok FROM_NS TO_NS TO_ADDR BYTES LABEL: send BYTES random bytes with
# nc from FROM_NS to TO_ADDR:9000 (listener in TO_NS); fail unless identical.
transfer_ok() {
  local from=$1 to=$2 addr=$3 bytes=$4 label=$5
  head -c "$bytes" /dev/urandom >"$WORK/$label.in"
  bg "$to" "nc-$label" sh -c "nc -l $addr 9000 > $WORK/$label.out"
  wait_for 5 "nc listens ($label)" onq "$to" sh -c "ss -ltn | grep -q '$addr:9000'"
  onq "$from" nc -N -w 10 "$addr" 9000 <"$WORK/$label.in"
  wait_for 10 "transfer complete ($label)" sh -c "[ \$(stat -c %s $WORK/$label.out) -eq $bytes ]"
  cmp -s "$WORK/$label.in" "$WORK/$label.out" || fail "$label: $bytes bytes differ after the transfer"
}

# iperf_mbps FROM_NS TO_NS TO_ADDR SECONDS LABEL: iperf3 for SECONDS; prints
# the receiver's Mbit/s and fails if nothing moved.
iperf_mbps() {
  local from=$1 to=$2 addr=$3 secs=$4 label=$5 mbps
  bg "$to" "iperf-$label" iperf3 -s -1 -B "$addr"
  wait_for 5 "iperf3 listens ($label)" onq "$to" sh -c "ss -ltn | grep -q '$addr:5201'"
  mbps=$(onq "$from" iperf3 -c "$addr" -t "$secs" -J | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  [ "$mbps" -gt 0 ] || fail "$label: iperf3 moved nothing"
  echo "$mbps"
}

# lab_two_hosts: the basic lab — a switch "sw" with the registry (reg,
# 192.0.2.1) and two nodes, alpha (ns a, 192.0.2.11) and beta (ns b,
# 192.0.2.12), up and registered. Sets JOIN, A and B (overlay addresses).
lab_two_hosts() {
  switch sw
  mkns reg; mkns a; mkns b
  plug reg sw 192.0.2.1/24
  plug a sw 192.0.2.11/24
  plug b sw 192.0.2.12/24
  start_registry reg 192.0.2.1
  node_up a alpha --registry "$JOIN"
  node_up b beta --registry "$JOIN"
  A=$(addr_of a alpha); B=$(addr_of b beta)
  log "alpha=$A beta=$B"
}
