#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
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
need nft; need tcpdump; need iperf3

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns rly; plug rly inet 203.0.113.2/24
nat_router nH1 203.0.113.23 h1 198.51.100.1/26 hard
nat_router nH2 203.0.113.24 h2 198.51.100.65/26 hard
behind hH1 h1 198.51.100.10/26 198.51.100.1
behind hH2 h2 198.51.100.74/26 198.51.100.65

start_registry reg 203.0.113.1 --relay 203.0.113.2:7946
bg rly relay "$BIN/pilot-registry" --relay-only --listen 203.0.113.2:7946 --state-dir "$WORK/registry"
wait_for 10 "relay-only instance up" grep -q "^relay: 203.0.113.2:7946" "$WORK/relay.log"

node_up hH1 hh1 --registry "$JOIN" >/dev/null
node_up hH2 hh2 --registry "$JOIN" >/dev/null
wait_for 15 "hh1 attached to the relay-only instance" status_is hH1 hh1 relay 203.0.113.2:7946
wait_for 15 "hh2 attached to the relay-only instance" status_is hH2 hh2 relay 203.0.113.2:7946

capture rly caprly "$WORK/rly.pcap" "udp and (udp[8] = 0xa5 or udp[8] = 0xa6)"
capture reg capreg "$WORK/reg.pcap" "udp and (udp[8] = 0xa5 or udp[8] = 0xa6)"

trust_pair hH1 hh1 hH2 hh2
B=$(addr_of hH2 hh2)
wait_for 15 "hh1 reaches hh2" onq hH1 ping -c1 -W1 "$B"
PATHB=$(peer_of hH1 hh1 hh2 path)
[ "$PATHB" = relay ] || fail "two hard NATs should be relayed, path is $PATHB"
transfer_ok hH1 hH2 "$B" 3000000 relayed
iperf_mbps hH1 hH2 "$B" 2 relayed
stop_bg caprly INT; stop_bg capreg INT
NR=$(pcap_count "$WORK/rly.pcap")
NG=$(pcap_count "$WORK/reg.pcap")
[ "$NR" -gt 100 ] || fail "only $NR relayed datagrams crossed the relay-only instance"
[ "$NG" -eq 0 ] || fail "$NG relayed datagrams went through the registry instead of the relay"
pass "relay-only instance carried $NR relayed datagrams (registry: $NG), 3 MB identical, iperf3 $MBPS Mbit/s"
