#!/usr/bin/env bash
# The per-packet fallback: both daemons with --no-offload (no IFF_VNET_HDR on
# the TUN, no UDP GSO: one packet per system call), as when a kernel refuses
# the offloads. Traffic must work exactly as with them.
#
#   a 192.0.2.11 (registry too) ======= veth ======= b 192.0.2.12
SCENARIO=${SCENARIO:-s08_no_offload_fallback}
source "$(dirname "$0")/lib.sh"
setup_lab
trap_errors 2>/dev/null || true
mkns a; mkns b
link a b 192.0.2.11/24 192.0.2.12/24 eth0 eth0
start_registry a 192.0.2.11
node_up a alpha --registry "$JOIN" --no-offload >/dev/null
node_up b beta --registry "$JOIN" --no-offload >/dev/null
[ "$(json_get a alpha "d['offload']['udp_gso']" status)" = False ] || fail "--no-offload did not turn UDP GSO off"
trust_pair a alpha b beta
B=$(addr_of b beta); A=$(addr_of a alpha)
wait_for 10 "alpha reaches beta" onq a ping -c1 -W1 "$B"
onq b ping -c3 -i0.2 "$A" >/dev/null || fail "ping beta -> alpha"
head -c 10000000 /dev/urandom >"$WORK/in"
bg b nc sh -c "nc -l $B 9000 > $WORK/out"
wait_for 5 "nc listens" onq b sh -c "ss -ltn | grep -q ':9000'"
onq a nc -N -w 10 "$B" 9000 <"$WORK/in"
wait_for 10 "transfer complete" sh -c "[ \$(stat -c %s $WORK/out) -eq 10000000 ]"
cmp -s "$WORK/in" "$WORK/out" || fail "10 MB differ after the transfer"
bg b iperf iperf3 -s -1 -B "$B"
wait_for 5 "iperf3 listens" onq b sh -c "ss -ltn | grep -q ':5201'"
MBPS=$(onq a iperf3 -c "$B" -t 2 -J | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))')
[ "$MBPS" -gt 0 ] || fail "iperf3 moved nothing"
pass "without offloads: 10 MB identical, ping both ways, iperf3 $MBPS Mbit/s"
