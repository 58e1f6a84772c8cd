#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# The per-packet fallback: both daemons with --no-offload (no IFF_VNET_HDR on
# the TUN, no UDP GSO: one packet per system call), as when a kernel refuses
# the offloads. Traffic must work exactly as with them.
#
#   a 192.0.2.11 (registry too) ======= veth ======= b 192.0.2.12
SCENARIO=${SCENARIO:-s08_no_offload_fallback}
source "$(dirname "$0")/lib.sh"
setup_lab
mkns a; mkns b
link a b 192.0.2.11/24 192.0.2.12/24 eth0 eth0
start_registry a 192.0.2.11
node_up a alpha --registry "$JOIN" --no-offload >/dev/null
node_up b beta --registry "$JOIN" --no-offload >/dev/null
status_is a alpha offload.udp_gso false || fail "--no-offload did not turn UDP GSO off"
trust_pair a alpha b beta
B=$(addr_of b beta); A=$(addr_of a alpha)
wait_for 10 "alpha reaches beta" onq a ping -c1 -W1 "$B"
onq b ping -c3 -i0.2 "$A" >/dev/null || fail "ping beta -> alpha"
transfer_ok a b "$B" 10000000 nooffload
iperf_mbps a b "$B" 2 nooffload
pass "without offloads: 10 MB identical, ping both ways, iperf3 $MBPS Mbit/s"
