#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s29 — a network that blocks UDP: the host's router drops every UDP
# datagram leaving its LAN (TCP passes), so the node reaches the registry
# over TCP with TLS (the join URL's ?tcp=443) and is relayed over it.
#
#                       inet (bridge, 203.0.113.0/24)
#   +--------------------+   +-----------+   +-------------+   +-------------------+
#   | reg .1             |   | pubA .10  |   | nE .21      |   | nB .25            |
#   | registry UDP :7946 |   | public    |   | easy NAT    |   | easy NAT, and     |
#   |  + --tcp-listen 443|   +-----------+   +------+------+   | drops UDP lan->wan|
#   +--------------------+                          |          +---------+---------+
#                                     192.0.2.0/26  |       198.51.100.0/26 |
#                                                hE .10                  hB .10
#
# Checks:
# - hB comes up although no UDP gets out: status shows tcp_relay (the
#   registry's TCP address and why);
# - hB <-> pubA and hB <-> hE (behind an easy NAT) connect through the
#   relay, with checksummed transfers; hB's `peers --json` says relay with
#   relay_transport "tcp", the UDP side sees a plain relay;
# - nothing but TCP left hB's router (the block's counter stays 0 only if
#   no UDP is tried; here it must count the node's UDP probes, and TCP 443
#   must carry the traffic);
# - the block is lifted: hB moves back to UDP (tcp_relay gone, the peers
#   on direct or UDP relay) within 30 s, and traffic flows.
# TTFB_JSON=<file> adds the UDP-blocked cell's time to first byte from a
# cold start (scripts/nat-bench.sh).
SCENARIO=${SCENARIO:-s29_udp_blocked}
source "$(dirname "$0")/lib.sh"
setup_lab
need nft; need curl

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns pubA; plug pubA inet 203.0.113.10/24
nat_router nE 203.0.113.21 e 192.0.2.1/26 easy
nat_router nB 203.0.113.25 b 198.51.100.1/26 easy
behind hE e 192.0.2.10/26 192.0.2.1
behind hB b 198.51.100.10/26 198.51.100.1

# The egress policy: no UDP from the LAN to anywhere (TCP passes).
block_udp() {
  onq nB nft -f - <<'NFT'
table inet egress {
  chain out_udp { type filter hook forward priority -10; policy accept; iifname "lan" meta l4proto udp counter drop; }
}
NFT
}
block_udp
log "nB drops all UDP leaving its LAN"

start_registry reg 203.0.113.1 --tcp-listen 203.0.113.1:443
case "$JOIN" in *'?tcp=443') ;; *) fail "the join URL does not carry ?tcp=443: $JOIN" ;; esac

node_up pubA puba --registry "$JOIN" >/dev/null
node_up hE he --registry "$JOIN" >/dev/null
T0=$(now_ms)
node_up hB hb --registry "$JOIN" >/dev/null
log "hB up after $(( $(now_ms) - T0 )) ms with UDP blocked"
wait_for 10 "hB on the TCP relay" status_is hB hb tcp_relay.address 203.0.113.1:443
log "hB: $(status_of hB hb tcp_relay.why)"
wait_for 10 "hB's registry session over TCP" status_is hB hb registry.reachable true

# cell NS_X X: hB <-> X through the TCP relay, with a checksummed transfer.
cell() {
  local nx=$1 x=$2
  log "---- hB <-> $x"
  trust_pair hB hb "$nx" "$x"
  local X; X=$(addr_of "$nx" "$x")
  local HB; HB=$(addr_of hB hb)
  wait_for 20 "hb reaches $x over 10.x" onq hB ping -c1 -W1 "$X"
  wait_for 5 "hb's path to $x is the relay" peer_is hB hb "$x" path relay
  peer_is hB hb "$x" relay_transport tcp || fail "hb's peers --json does not say relay over TCP for $x"
  wait_for 10 "$x's path to hb is the relay" peer_is "$nx" "$x" hb path relay
  transfer_ok hB "$nx" "$X" 2000000 "hb-to-$x"
  transfer_ok "$nx" hB "$HB" 2000000 "$x-to-hb"
  log "hB <-> $x: relay over TCP, 2 MB each way identical"
}
cell pubA puba
cell hE he
pt hB hb peers >&2

# Only TCP carried it: the router dropped the node's UDP (its probes),
# and the registry's TCP port saw the node's NAT address.
DROPPED=$(onq nB nft list table inet egress | grep -o 'packets [0-9]*' | awk '{print $2}')
[ "${DROPPED:-0}" -gt 0 ] || fail "the UDP block dropped nothing: the node did not even try UDP"
grep -q 203.0.113.25 <<<"$(onq reg ss -tn state established '( sport = :443 )')" \
  || fail "no TCP connection from hB's router to the registry's port 443"
log "nB dropped $DROPPED UDP datagrams; the traffic went over TCP 443"

# Time to first byte from a cold start, UDP blocked (for nat-bench).
if [ -n "${TTFB_JSON:-}" ]; then
  PUBA=$(addr_of pubA puba)
  mkdir -p "$WORK/www"; echo hi >"$WORK/www/index.html"
  bg pubA http python3 -m http.server 8080 --bind "$PUBA" --directory "$WORK/www"
  wait_listen 5 pubA 8080 "$PUBA"
  t0=$(now_ms)
  node_restart hB hb --registry "$JOIN" >/dev/null
  UP_MS=$(( $(now_ms) - t0 ))
  t=$(onq hB curl -s -o /dev/null -w '%{time_starttransfer}' --max-time 20 "http://$PUBA:8080/")
  log "udp-blocked: time to first byte after a cold start: ${t}s (the restart itself: $UP_MS ms)"
  echo "[{\"cell\":\"udp-blocked\",\"path\":\"relay-tcp\",\"ttfb_s\":$t,\"iperf_mbps\":null,\"up_ms\":$UP_MS}]" >"$TTFB_JSON"
  stop_bg http
fi

# Lift the block: UDP is probed every 10 s; back on UDP within 30 s.
onq nB nft delete table inet egress
T1=$(now_ms)
log "block lifted"
back_on_udp() {
  local doc
  doc=$(status_of hB hb "") || return 1
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if "tcp_relay" not in d and d["registry"]["reachable"] else 1)' "$doc"
}
wait_for 30 "hB back on UDP" back_on_udp
log "hB back on UDP $(( $(now_ms) - T1 )) ms after the block was lifted"
no_tcp_transport() {
  ptq hB hb --json peers | python3 -c 'import json,sys; sys.exit(any(p.get("relay_transport") for p in json.load(sys.stdin)))'
}
wait_for 5 "no peer relayed over TCP" no_tcp_transport
PUBA=$(addr_of pubA puba)
wait_for 15 "hb reaches puba over UDP" onq hB ping -c1 -W1 "$PUBA"
transfer_ok hB pubA "$PUBA" 1000000 "after-lift"
log "hb's path to puba after the lift: $(peer_of hB hb puba path)"
pass "UDP blocked: relay over TCP to a public and an easy-NAT host, and back to UDP when the block is lifted"
