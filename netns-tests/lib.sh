#!/usr/bin/env bash
# Helpers for the netns scenarios (and scripts/demo.sh): namespaces with
# documentation-range underlay addresses, processes tracked by pid, cleanup on
# any exit, and the reading and polling of the daemons' JSON.
#
# Every namespace a scenario creates is named "$PFX-<name>" (PFX is unique per
# run), every process it starts is recorded by pid, and `cleanup` (installed
# as an EXIT trap by `setup_lab`) kills exactly those pids and deletes exactly
# those namespaces, also when the scenario fails half-way. Pids are handled
# here only: a scenario names a process by the label it gave `bg` (`stop_bg`,
# `wait_bg_exit`, `bg_running`) and a daemon by its node name (`node_down`).
#
# One dialect for every scenario:
#   setup_lab                        first thing: cleanup on exit, error trap on
#   status_of / peer_of              one field of `pilot-tun --json status|peers|trust ...`
#   status_is / peer_is / has_peer   the same as conditions, for checks and polls
#   wait_for SECS WHAT CMD...        the one poll: bounded in tries and in time
# No fixed sleeps: wait for a condition; a sleep is only for time that must pass.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PILOT_BIN:-$ROOT/target/release}
PFX=${PFX:-pt$$}
WORK=$(mktemp -d "/tmp/$PFX.XXXX")
PIDS=()
NSES=()
ETC_NETNS=()
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

# --- processes, by pid -------------------------------------------------------

# bg NS LABEL CMD...: start CMD in NS in the background, its output in
# $WORK/LABEL.log; its pid is recorded (for cleanup, and for the helpers below).
bg() {
  local ns=$1 label=$2; shift 2
  printf '  (%s)$ %s &\n' "$ns" "$*" >&2
  ip netns exec "$PFX-$ns" "$@" >"$WORK/$label.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$label.pid"
}

# alive PID: the process exists and is not a zombie.
alive() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st%% *}" != Z ]
}
gone() { ! alive "$1"; }

# forget PID: reap it if it is our child, and drop it from the cleanup list
# (so that cleanup never signals a pid the system may have reused).
forget() {
  local p=$1 keep=() q
  wait "$p" 2>/dev/null || true
  for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
  PIDS=("${keep[@]}")
}

bg_pid() { cat "$WORK/$1.pid"; }
# bg_running LABEL: the process started as `bg NS LABEL ...` is still running.
bg_running() { alive "$(bg_pid "$1")"; }
# wait_bg_exit SECONDS LABEL: wait until that process has exited by itself.
wait_bg_exit() {
  local pid; pid=$(bg_pid "$2")
  wait_for "$1" "$2 (pid $pid) exits" gone "$pid"
  forget "$pid"
}
# stop_bg LABEL [SIGNAL]: send SIGNAL (default TERM; INT makes tcpdump flush
# its capture) to that process and wait until it has exited.
stop_bg() {
  local label=$1 sig=${2:-TERM} pid
  pid=$(bg_pid "$label")
  kill -s "$sig" "$pid" 2>/dev/null || true
  wait_for 10 "$label (pid $pid) exits on SIG$sig" gone "$pid"
  forget "$pid"
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
  # Our background processes, and the daemons `node_up` started (they
  # detach; each one's pid is recorded from its own status).
  local all=("${PIDS[@]}") f p i
  for f in "$WORK"/*/daemon.pid; do [ -f "$f" ] && all+=("$(cat "$f")"); done
  for p in "${all[@]}"; do kill "$p" 2>/dev/null; done
  # Up to 3 s for them to exit on SIGTERM, then SIGKILL for the rest.
  for ((i = 0; i < 30; i++)); do
    local left=0
    for p in "${all[@]}"; do alive "$p" && left=1; done
    [ "$left" -eq 1 ] || break
    sleep 0.1
  done
  for p in "${all[@]}"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
  for ns in "${NSES[@]}"; do ip netns del "$PFX-$ns" 2>/dev/null; done
  # Only the /etc/netns directories of this run's namespaces (netns_resolv).
  for d in "${ETC_NETNS[@]}"; do rm -rf -- "$d"; done
  [ -z "${ETC_NETNS_MADE:-}" ] || rmdir /etc/netns 2>/dev/null
  if [ -n "${NETNS_KEEP:-}" ]; then echo "[$SCENARIO] kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}

# setup_lab: the first line of every scenario after sourcing this file:
# cleanup on any exit, and the error trap (trap_errors).
setup_lab() { trap cleanup EXIT INT TERM; trap_errors; }

# --- topology ------------------------------------------------------------------

# mkns NAME: a namespace with loopback up, whose programs resolve names
# through 127.0.0.1 (where nothing answers, so lookups fail at once): no
# question leaves for the host's nameserver, and none waits for an ICMP
# answer that the kernel's ICMP rate limit may hold back (python's
# http.server looks its own address up when it binds).
mkns() {
  ip netns add "$PFX-$1"
  NSES+=("$1")
  ip -n "$PFX-$1" link set lo up
  netns_resolv "$1" 127.0.0.1
}

# netns_resolv NAME NAMESERVER: /etc/netns/$PFX-NAME/resolv.conf with only
# NAMESERVER in it: programs started in NAME by `ip netns exec` (`on`, `bg`)
# from now on resolve through it. Cleanup removes exactly that directory (and
# /etc/netns itself if this run made it and it is empty).
netns_resolv() {
  local dir="/etc/netns/$PFX-$1"
  if [ ! -d /etc/netns ]; then mkdir /etc/netns; ETC_NETNS_MADE=1; fi
  mkdir -p "$dir"
  ETC_NETNS+=("$dir")
  printf 'nameserver %s\noptions timeout:2 attempts:1\n' "$2" >"$dir/resolv.conf"
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

# --- polling -------------------------------------------------------------------

# poll SECONDS CMD...: run CMD (a command or a function) until it succeeds:
# every 0.1 s, at most SECONDS*10+1 tries and at most SECONDS of wall time
# (a try that has started runs to its end; pilot-tun calls give up after
# 15 s). Returns 1 when it never did; CMD's last output is in POLL_OUT.
poll() {
  local secs=$1; shift
  local tries=$(( secs * 10 + 1 )) end=$(( $(date +%s%N) + secs * 1000000000 ))
  POLL_OUT=
  while :; do
    if POLL_OUT=$("$@" 2>&1); then return 0; fi
    tries=$(( tries - 1 ))
    [ "$tries" -gt 0 ] && [ "$(date +%s%N)" -lt "$end" ] || return 1
    sleep 0.1
  done
}

# wait_for SECONDS WHAT CMD...: poll CMD; on timeout fail the scenario, saying
# what it waited for and what CMD said last.
wait_for() {
  local secs=$1 what=$2; shift 2
  poll "$secs" "$@" && return 0
  fail "timed out after ${secs}s waiting for: $what${POLL_OUT:+ (last: ${POLL_OUT:0:400})}"
}

# --- reading the daemons' JSON -------------------------------------------------

# The one reader behind status_of and peer_of: JSON on stdin; argv PEER (""
# for the whole document) and KEY (a dotted path; "" for the whole value).
# Prints like `jq -r`: strings bare, anything else as JSON (true, null, 42, {...}).
_JSON_FIELD='
import json, sys
doc, peer, key = json.load(sys.stdin), sys.argv[1], sys.argv[2]
if peer:
    if not isinstance(doc, list):
        sys.exit(f"expected a list of entries, got {json.dumps(doc)[:300]}")
    hits = [e for e in doc if peer in (e.get("hostname"), e.get("address"), e.get("node_id"))]
    if len(hits) != 1:
        sys.exit(f"{len(hits)} entries for {peer!r} (want exactly one)")
    doc = hits[0]
for k in key.split(".") if key else []:
    if not isinstance(doc, dict) or k not in doc:
        sys.exit(f"no field {key!r} in {json.dumps(doc)[:300]}")
    doc = doc[k]
print(doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":")))
'

# status_of NS NAME KEY: one field of NAME's `pilot-tun --json status`; KEY is
# a dotted path (address, drops.replay, registry.reachable; "" for all of it).
status_of() { ptq "$1" "$2" --json status | python3 -c "$_JSON_FIELD" "" "$3"; }

# peer_of NS NAME PEER KEY [CMD...]: field KEY of PEER's entry in NAME's
# `pilot-tun --json peers`, or in `--json CMD...` (trust list, trust pending).
# PEER (hostname, 10.x address or node id) must match exactly one entry;
# KEY "" prints the whole entry. Fails when there is no such entry or field.
peer_of() {
  local ns=$1 name=$2 peer=$3 key=$4; shift 4
  [ $# -gt 0 ] || set -- peers
  ptq "$ns" "$name" --json "$@" | python3 -c "$_JSON_FIELD" "$peer" "$key"
}

# status_is NS NAME KEY WANT: that status field prints as WANT (else says what
# it is, on stderr).
status_is() {
  local got
  got=$(status_of "$1" "$2" "$3") || return 1
  [ "$got" = "$4" ] || { echo "$2's status: $3 is '$got', not '$4'" >&2; return 1; }
}

# peer_is NS NAME PEER KEY WANT [CMD...]: that peer field prints as WANT.
peer_is() {
  local ns=$1 name=$2 peer=$3 key=$4 want=$5 got; shift 5
  got=$(peer_of "$ns" "$name" "$peer" "$key" "$@") || return 1
  [ "$got" = "$want" ] || { echo "$name's ${*:-peers}: $peer's $key is '$got', not '$want'" >&2; return 1; }
}

# has_peer NS NAME PEER [CMD...]: PEER has an entry in that list.
has_peer() {
  local ns=$1 name=$2 peer=$3; shift 3
  peer_of "$ns" "$name" "$peer" "" "$@" >/dev/null
}

# --- registry and nodes --------------------------------------------------------

# start_registry NS IP [ARGS...]: start pilot-registry on IP:7946 in NS (with
# ARGS); sets JOIN. On an existing state dir it keeps its key (same JOIN).
start_registry() {
  local ns=$1 ip=$2; shift 2
  mkdir -p "$WORK/registry"
  rm -f "$WORK/registry/join-url"   # written again once the socket is bound
  bg "$ns" registry "$BIN/pilot-registry" --listen "$ip:7946" --state-dir "$WORK/registry" "$@"
  wait_for 10 "registry join URL" test -s "$WORK/registry/join-url"
  JOIN=$(cat "$WORK/registry/join-url")
  log "registry up: $JOIN"
}

# stop_registry: stop the registry and wait until it is gone.
# `start_registry` brings it back on the same state dir (same key, same JOIN).
stop_registry() {
  log "stopping registry (pid $(bg_pid registry))"
  stop_bg registry
}

# restart_registry NS IP [ARGS...]: stop it, start it again on its state dir.
restart_registry() { stop_registry; start_registry "$@"; }

# node_up NS NAME [extra up args...]: `pilot-tun up` (background) in NS with its
# own state dir; records the daemon's pid (from its status).
node_up() {
  local ns=$1 name=$2; shift 2
  mkdir -p "$WORK/$name"
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" up --name "$name" "$@" \
    | tee "$WORK/$name.up" >&2
  status_of "$ns" "$name" pid >"$WORK/$name/daemon.pid"
}

# node_up_unnamed NS LABEL [extra up args...]: like node_up, without --name
# (the node names itself after the machine); LABEL names its state dir.
node_up_unnamed() {
  local ns=$1 label=$2; shift 2
  mkdir -p "$WORK/$label"
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$label" up "$@" \
    | tee "$WORK/$label.up" >&2
  status_of "$ns" "$label" pid >"$WORK/$label/daemon.pid"
}

# node_down NS NAME: `pilot-tun down`, then wait until the daemon process has
# exited (its UDP port is free again).
node_down() {
  local ns=$1 name=$2 pid
  pid=$(cat "$WORK/$name/daemon.pid")
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" down >&2
  wait_for 15 "$name's daemon (pid $pid) exits" gone "$pid"
  rm -f "$WORK/$name/daemon.pid"
}

# node_restart NS NAME [up args...]: `node_down`, then `node_up` again on the
# same state dir.
node_restart() {
  local ns=$1 name=$2; shift 2
  node_down "$ns" "$name"
  node_up "$ns" "$name" "$@"
}

# ttfb_cold NS_A A NS_B B LABEL: serve a page on B's overlay address, restart
# A's daemon, and time an HTTP GET from A to B (curl's time_starttransfer:
# handshake, punching or relay fallback included). Sets TTFB_S (seconds)
# and TTFB_PATH (A's path to B right after). For scripts/nat-bench.sh.
ttfb_cold() {
  local na=$1 a=$2 nb=$3 b=$4 label=$5 addr
  addr=$(addr_of "$nb" "$b")
  mkdir -p "$WORK/www-$label"; echo hi >"$WORK/www-$label/index.html"
  bg "$nb" "http-$label" python3 -m http.server 8080 --bind "$addr" --directory "$WORK/www-$label"
  wait_listen 5 "$nb" 8080 "$addr"
  node_restart "$na" "$a" >/dev/null
  TTFB_S=$(onq "$na" curl -s -o /dev/null -w '%{time_starttransfer}' --max-time 15 "http://$addr:8080/")
  TTFB_PATH=$(peer_of "$na" "$a" "$b" path)
  log "cell $label: time to first byte after a cold start: ${TTFB_S}s ($TTFB_PATH)"
  stop_bg "http-$label"
}

# pt NS NAME ARGS...: run a pilot-tun command against NAME's daemon.
pt() { local ns=$1 name=$2; shift 2; on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" "$@"; }
ptq() { local ns=$1 name=$2; shift 2; onq "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$name" "$@"; }

# addr_of NS NAME: the node's overlay address.
addr_of() { status_of "$1" "$2" address; }

# trust_pair NS_A A NS_B B: A requests, B approves; waits until each side
# shows the other as trusted.
trust_pair() {
  local na=$1 a=$2 nb=$3 b=$4
  pt "$na" "$a" trust request "$b" --note "netns test" >&2
  wait_for 5 "$b sees $a's request" has_peer "$nb" "$b" "$a" trust pending
  pt "$nb" "$b" trust approve "$a" >&2
  wait_for 5 "$a sees $b's approval" peer_is "$na" "$a" "$b" state trusted trust list
  wait_for 5 "$b trusts $a" peer_is "$nb" "$b" "$a" state trusted trust list
}

need() { command -v "$1" >/dev/null 2>&1 || fail "missing tool: $1 (scripts/test.sh installs it)"; }

# trap_errors: any unexpected failing command fails the scenario (with its
# line, and the logs) instead of ending it silently through `set -e`.
# Also: killed by a time limit (TERM/INT) shows the logs before cleaning up.
# (`setup_lab` calls it.)
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

# --- traffic and captures ------------------------------------------------------

# listening NS PORT [ADDR]: a TCP listener on PORT (bound to ADDR, if given) in NS.
listening() {
  local f="sport = :$2"
  [ -z "${3:-}" ] || f="src $3 and $f"
  [ -n "$(onq "$1" ss -Hltn "$f")" ]
}
# wait_listen SECONDS NS PORT [ADDR]: poll until that listener exists.
wait_listen() {
  wait_for "$1" "TCP listener on ${4:+$4:}$3 in $2" listening "$2" "$3" "${4:-}"
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

# capture NS LABEL PCAP [TCPDUMP ARGS...] [FILTER]: tcpdump on NS's eth0, each
# packet written to PCAP as it comes; returns once tcpdump listens.
# `stop_bg LABEL INT` ends it (or it ends by itself with -c N).
capture() {
  local ns=$1 label=$2 pcap=$3; shift 3
  bg "$ns" "$label" tcpdump -i eth0 -n -U --immediate-mode -Z root -s 0 -w "$pcap" "$@"
  wait_for 5 "capture $label listening on $ns's eth0" grep -q "listening on eth0" "$WORK/$label.log"
}
# pcap_count PCAP [FILTER]: how many packets PCAP holds (that match FILTER).
pcap_count() { local f=$1; shift; tcpdump -r "$f" "$@" 2>/dev/null | wc -l; }

# size_is FILE BYTES: FILE exists and holds exactly BYTES bytes.
size_is() { [ "$(stat -c %s "$1" 2>/dev/null)" = "$2" ]; }

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
  bg "$to" "nc-$label" sh -c "exec nc -l $addr 9000 > $WORK/$label.out"
  wait_listen 5 "$to" 9000 "$addr"
  onq "$from" nc -N -w 10 "$addr" 9000 <"$WORK/$label.in"
  wait_for 10 "transfer complete ($label)" size_is "$WORK/$label.out" "$bytes"
  cmp -s "$WORK/$label.in" "$WORK/$label.out" || fail "$label: $bytes bytes differ after the transfer"
}

# xfer_10mb FROM_NS TO_NS TO_ADDR LABEL: 10 MB of random bytes over TCP
# (nc) to TO_ADDR:9000; fails unless all arrive with the same sha256.
# Sets XFER_MS.
xfer_10mb() {
  local from=$1 to=$2 addr=$3 label=$4 t0 size want got
  head -c 10M /dev/urandom >"$WORK/$label.in"
  bg "$to" "rx-$label" sh -c "exec nc -l $addr 9000 >$WORK/$label.out"
  wait_listen 5 "$to" 9000
  t0=$(now_ms)
  on "$from" timeout 20 nc -N -w 5 "$addr" 9000 <"$WORK/$label.in" || true
  poll 10 size_is "$WORK/$label.out" 10485760 || true
  XFER_MS=$(( $(now_ms) - t0 ))
  size=$(stat -c %s "$WORK/$label.out")
  [ "$size" -eq 10485760 ] || fail "$label: received $size of 10485760 bytes"
  want=$(sha256sum <"$WORK/$label.in" | cut -d' ' -f1)
  got=$(sha256sum <"$WORK/$label.out" | cut -d' ' -f1)
  [ "$want" = "$got" ] || fail "$label: sha256 differs (sent $want, received $got)"
  rm -f "$WORK/$label.in" "$WORK/$label.out"
}

# iperf_mbps FROM_NS TO_NS TO_ADDR SECONDS LABEL: iperf3 for SECONDS; sets
# MBPS to the receiver's Mbit/s and fails if nothing moved.
iperf_mbps() {
  local from=$1 to=$2 addr=$3 secs=$4 label=$5
  bg "$to" "iperf-$label" iperf3 -s -1 -B "$addr"
  wait_listen 5 "$to" 5201 "$addr"
  MBPS=$(onq "$from" timeout $(( secs + 30 )) iperf3 -c "$addr" -t "$secs" -J | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
  [ "$MBPS" -gt 0 ] || fail "$label: iperf3 moved nothing"
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

# --- workers, crashes and reaping (stress scenarios s14-s17, scripts/stress-*.sh)

# bg_fn LABEL FUNC [ARGS...]: run FUNC (a function of the scenario, e.g. a
# worker loop) in a background subshell with its output in $WORK/LABEL.log;
# its pid is recorded as `bg` records one. Inside it, `fail` or a failing
# command ends the worker only (with the line, in its log), and whatever it
# started with `bg` is stopped when it ends. `wait_fn` collects its status.
bg_fn() {
  local label=$1; shift
  printf '  $ %s &   (worker %s)\n' "$*" "$label" >&2
  (
    PIDS=()
    WORKER_LEVEL=$BASH_SUBSHELL
    SCENARIO="$SCENARIO/$label"
    trap '_worker_exit' EXIT
    trap 'exit 143' TERM INT
    trap '_worker_err $? "$BASH_COMMAND" "$LINENO"' ERR
    "$@"
  ) >"$WORK/$label.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$label.pid"
}
_worker_exit() {
  local rc=$? p
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  exit $rc
}
_worker_err() {
  [ "$BASH_SUBSHELL" -le "$WORKER_LEVEL" ] || exit "$1"
  trap - ERR
  printf '[%s] FAIL: unexpected exit status %s at line %s: %s\n' "$SCENARIO" "$1" "$3" "$2" >&2
  exit "$1"
}

# wait_fn SECONDS LABEL: wait until the worker started as `bg_fn LABEL ...`
# has ended; fail the scenario (with the end of its log) unless it ended
# with status 0.
wait_fn() {
  local secs=$1 label=$2 pid rc=0
  pid=$(bg_pid "$label")
  wait_for "$secs" "worker $label (pid $pid) ends" gone "$pid"
  wait "$pid" || rc=$?
  forget "$pid"
  [ "$rc" -eq 0 ] || { tail -n 40 "$WORK/$label.log" >&2; fail "worker $label ended with status $rc (its log is above)"; }
}

# node_crash NS NAME: SIGKILL NAME's daemon (by the pid `node_up` recorded),
# wait until it is gone, and leave its state directory as the crash left it
# (`node_up` starts it again). Sets CRASH_MS (the time of the kill, now_ms).
node_crash() {
  local ns=$1 name=$2 pid
  pid=$(cat "$WORK/$name/daemon.pid")
  printf '  (%s)$ kill -9 %s   (%s'"'"'s daemon)\n' "$ns" "$pid" "$name" >&2
  CRASH_MS=$(now_ms)
  kill -9 "$pid"
  wait_for 10 "$name's daemon (pid $pid) dies on SIGKILL" gone "$pid"
  rm -f "$WORK/$name/daemon.pid"
}

# daemon_rss_kb NAME: the VmRSS (kB) of NAME's daemon, from /proc; "registry"
# names the registry started by `start_registry`.
daemon_rss_kb() {
  local pid
  if [ "$1" = registry ]; then pid=$(bg_pid registry); else pid=$(cat "$WORK/$1/daemon.pid"); fi
  awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"
}

# reap_on_exit: after `setup_lab`, in scenarios with workers: on exit, before
# `cleanup`, stop the workers and background processes (SIGTERM, SIGKILL
# after 3 s), then kill by pid whatever still runs inside this run's
# namespaces apart from the daemons (a worker's nc, ping or CLI call that
# outlived it), so that no process outlives its namespace.
reap_on_exit() { trap '_reap_then_cleanup' EXIT; }
_reap_then_cleanup() {
  local rc=$? p ns f i daemons=" "
  set +e
  trap - ERR
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for ((i = 0; i < 30; i++)); do
    local left=0
    for p in "${PIDS[@]}"; do alive "$p" && left=1; done
    [ "$left" -eq 1 ] || break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
  for f in "$WORK"/*/daemon.pid; do [ -f "$f" ] && daemons+="$(cat "$f") "; done
  for ns in "${NSES[@]}"; do
    for p in $(ip netns pids "$PFX-$ns" 2>/dev/null); do
      [[ $daemons == *" $p "* ]] || kill -9 "$p" 2>/dev/null
    done
  done
  (exit $rc)
  cleanup
}

# not_running LABEL: the process started as `bg NS LABEL ...` has exited.
not_running() { ! bg_running "$1"; }

# stats_ms FILE: "n=N p50=X p99=Y max=Z" of the integers (ms) in FILE, one a line.
stats_ms() {
  python3 - "$1" <<'PY'
import sys
xs = sorted(int(l) for l in open(sys.argv[1]) if l.strip())
def pct(p):
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))] if xs else "-"
print(f"n={len(xs)} p50={pct(0.5)} p99={pct(0.99)} max={xs[-1] if xs else '-'}")
PY
}

# The pacing filter of `xfer_try`: stdin to stdout at about argv[1] kB/s.
_PACE='
import sys, time
rate, sent, t0 = float(sys.argv[1]) * 1024, 0, time.monotonic()
while True:
    b = sys.stdin.buffer.read(16384)
    if not b:
        break
    sys.stdout.buffer.write(b)
    sys.stdout.buffer.flush()
    sent += len(b)
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
'

# xfer_try FROM_NS TO_NS TO_ADDR PORT FILE LABEL SECS [KBPS]: send FILE over
# TCP (nc) from FROM_NS to TO_ADDR:PORT, where it starts a listener in TO_NS;
# paced to about KBPS kB/s if given. Returns 0 if the receiver got exactly
# FILE (same sha256) within SECS, else 1, with the reason in XFER_WHY (also
# printed). Sets XFER_MS. It never fails the scenario: it is for loops that
# count failures (and, run by `bg_fn`, for a transfer that spans an event).
xfer_try() {
  local from=$1 to=$2 addr=$3 port=$4 file=$5 label=$6 secs=$7 kbps=${8:-0}
  local out="$WORK/$label.out" t0 rc=0 want got size
  XFER_WHY= XFER_MS=0
  rm -f "$out"
  # A listener left on the port (SO_REUSEPORT) would take half the connections.
  poll 5 eval '! listening "$to" "$port" "$addr"' \
    || { XFER_WHY="the port $addr:$port in $to is still taken"; log "transfer $label: $XFER_WHY"; return 1; }
  bg "$to" "rx-$label" timeout "$secs" sh -c "exec nc -l $addr $port >$out"
  if ! poll 5 listening "$to" "$port" "$addr"; then
    XFER_WHY="no listener on $addr:$port in $to"
  else
    t0=$(now_ms)
    if [ "$kbps" -gt 0 ]; then
      onq "$from" timeout "$secs" sh -c 'python3 -c "$1" "$2" <"$3" | nc -N -w 10 "$4" "$5"' \
        pace "$_PACE" "$kbps" "$file" "$addr" "$port" || rc=$?
    else
      onq "$from" timeout "$secs" nc -N -w 10 "$addr" "$port" <"$file" || rc=$?
    fi
    poll 10 not_running "rx-$label" || XFER_WHY="the receiver was still open 10 s after the sender ended (sender exit $rc)"
    XFER_MS=$(( $(now_ms) - t0 ))
  fi
  # TERM, not KILL: `timeout` passes it on to nc (a KILL would orphan nc).
  if bg_running "rx-$label"; then stop_bg "rx-$label"; else forget "$(bg_pid "rx-$label")"; fi
  if [ -z "$XFER_WHY" ]; then
    size=$(stat -c %s "$out" 2>/dev/null || echo 0)
    want=$(sha256sum <"$file" | cut -d' ' -f1)
    got=$(sha256sum <"$out" | cut -d' ' -f1)
    if [ "$size" -ne "$(stat -c %s "$file")" ]; then
      XFER_WHY="received $size of $(stat -c %s "$file") bytes (sender exit $rc)"
    elif [ "$want" != "$got" ]; then
      XFER_WHY="sha256 differs: sent $want, received $got"
    fi
  fi
  rm -f "$out"
  [ -n "$XFER_WHY" ] || return 0
  log "transfer $label $from -> $to $addr:$port failed: $XFER_WHY"
  return 1
}

# ping_until NS ADDR SECS: ping ADDR from NS every 50 ms until one echo is
# answered; returns 1 if none was within SECS. (For time measurements: its
# resolution is 50 ms, where `wait_for` polls every 100 ms.)
ping_until() { onq "$1" ping -q -c1 -i0.05 -w "$3" "$2" >/dev/null 2>&1; }
