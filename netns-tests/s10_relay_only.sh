#!/usr/bin/env bash
# A relay-only instance next to the registry carries the relayed traffic.
#
#   reg 203.0.113.1 (registry, --relay 203.0.113.2:7946)
#   rly 203.0.113.2 (pilot-registry --relay-only, same state dir: key + db)
#        |  inet (bridge)
#   nH1 .23 (hard NAT) -- hH1 198.51.100.10     nH2 .24 (hard NAT) -- hH2 198.51.100.74
#
# Two hosts behind hard NATs must be relayed; the relayed datagrams must go
# through the relay-only instance (captured on its link), not the registry
# (nothing relayed captured on the registry's link), and carry a checksummed
# transfer and iperf3.
SCENARIO=${SCENARIO:-s10_relay_only}
source "$(dirname "$0")/lib.sh"
setup_lab
trap_errors
need nft; need tcpdump; need iperf3

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns rly; plug rly inet 203.0.113.2/24
nat_router nH1 203.0.113.23 h1 198.51.100.1/26 hard
nat_router nH2 203.0.113.24 h2 198.51.100.65/26 hard
behind hH1 h1 198.51.100.10/26 198.51.100.1
behind hH2 h2 198.51.100.74/26 198.51.100.65

mkdir -p "$WORK/registry"
bg reg registry "$BIN/pilot-registry" --listen 203.0.113.1:7946 --state-dir "$WORK/registry" --relay 203.0.113.2:7946
wait_for 10 "registry join URL" test -s "$WORK/registry/join-url"
JOIN=$(cat "$WORK/registry/join-url")
bg rly relay "$BIN/pilot-registry" --relay-only --listen 203.0.113.2:7946 --state-dir "$WORK/registry"
wait_for 10 "relay-only instance up" grep -q "^relay: 203.0.113.2:7946" "$WORK/relay.log"

node_up hH1 hh1 --registry "$JOIN" >/dev/null
node_up hH2 hh2 --registry "$JOIN" >/dev/null
relay_of() { json_get "$1" "$2" "d['relay']" status; }
wait_for 15 "hh1 attached to the relay-only instance" sh -c "[ \"\$(ip netns exec $PFX-hH1 $BIN/pilot-tun --state-dir $WORK/hh1 --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"relay\"])')\" = 203.0.113.2:7946 ]"
wait_for 15 "hh2 attached to the relay-only instance" sh -c "[ \"\$(ip netns exec $PFX-hH2 $BIN/pilot-tun --state-dir $WORK/hh2 --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"relay\"])')\" = 203.0.113.2:7946 ]"

bg rly caprly tcpdump -i eth0 -n -U --immediate-mode -Z root -s 0 -w "$WORK/rly.pcap" "udp and (udp[8] = 0xa5 or udp[8] = 0xa6)"
bg reg capreg tcpdump -i eth0 -n -U --immediate-mode -Z root -s 0 -w "$WORK/reg.pcap" "udp and (udp[8] = 0xa5 or udp[8] = 0xa6)"
wait_for 5 "capture on the relay" grep -q "listening on eth0" "$WORK/caprly.log"
wait_for 5 "capture on the registry" grep -q "listening on eth0" "$WORK/capreg.log"

trust_pair hH1 hh1 hH2 hh2
B=$(addr_of hH2 hh2)
wait_for 15 "hh1 reaches hh2" onq hH1 ping -c1 -W1 "$B"
PATHB=$(json_get hH1 hh1 "[p.get('path') for p in d if p['hostname']=='hh2'][0]" peers)
[ "$PATHB" = relay ] || fail "two hard NATs should be relayed, path is $PATHB"
transfer_ok hH1 hH2 "$B" 3000000 relayed
MBPS=$(iperf_mbps hH1 hH2 "$B" 2 relayed)
for c in caprly capreg; do
  kill -INT "$(cat "$WORK/$c.pid")"
  wait_for 5 "tcpdump exits" sh -c "! kill -0 $(cat "$WORK/$c.pid")"
done
NR=$(tcpdump -r "$WORK/rly.pcap" 2>/dev/null | wc -l)
NG=$(tcpdump -r "$WORK/reg.pcap" 2>/dev/null | wc -l)
[ "$NR" -gt 100 ] || fail "only $NR relayed datagrams crossed the relay-only instance"
[ "$NG" -eq 0 ] || fail "$NG relayed datagrams went through the registry instead of the relay"
pass "relay-only instance carried $NR relayed datagrams (registry: $NG), 3 MB identical, iperf3 $MBPS Mbit/s"
