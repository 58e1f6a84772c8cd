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
  rm -rf "$WORK"
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
  local peer="v${RANDOM}"
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
  bg "$ns" registry "$BIN/pilot-registry" --listen "$ip:7946" --state-dir "$WORK/registry"
  wait_for 10 "registry answers STUN" true
  sleep 0.5
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
