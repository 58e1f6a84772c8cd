#!/usr/bin/env bash
# An underlay with no IPv4 at all: registry and hosts reach each other only
# over IPv6 (2001:db8::/64, the documentation prefix).
#
#   reg [2001:db8::1] ---- inet (bridge) ---- hA [2001:db8::10]
#                                        \--- hB [2001:db8::11]
#
# The join URL names the registry's IPv6 address; the nodes open IPv6
# sockets, register, learn their public endpoint by STUN over IPv6 (no
# NAT), trust each other and talk over 10.x and over the overlay's IPv6
# addresses through a direct path between their IPv6 endpoints: ping, a
# compared TCP transfer, curl.
SCENARIO=${SCENARIO:-s36_ipv6_underlay}
source "$(dirname "$0")/lib.sh"
setup_lab
need curl

# v6_host NAME: a namespace whose new interfaces skip duplicate address
# detection (so an address is usable as soon as it is added).
v6_host() {
  mkns "$1"
  onq "$1" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
}

switch inet
v6_host reg; plug reg inet 2001:db8::1/64
v6_host hA; plug hA inet 2001:db8::10/64
v6_host hB; plug hB inet 2001:db8::11/64
for h in reg hA hB; do
  [ -z "$(onq "$h" ip -4 addr show dev eth0)" ] || fail "$h has an IPv4 address on its underlay"
done
wait_for 5 "hA reaches the registry over IPv6" onq hA ping -6 -c1 -W1 2001:db8::1

start_registry reg "[2001:db8::1]"
case "$JOIN" in
  *"@[2001:db8::1]:7946"*) ;;
  *) fail "the join URL does not name the registry's IPv6 address: $JOIN" ;;
esac
node_up hA alpha --registry "$JOIN" >/dev/null
node_up hB beta --registry "$JOIN" >/dev/null
status_is hA alpha nat none || fail "alpha's NAT type over IPv6 is not 'none'"
case "$(status_of hA alpha public_endpoint)" in
  "[2001:db8::10]:"*) ;;
  *) fail "alpha's public endpoint (STUN over IPv6) is $(status_of hA alpha public_endpoint)" ;;
esac
trust_pair hA alpha hB beta
B=$(addr_of hB beta)
wait_for 10 "alpha reaches beta over 10.x" onq hA ping -c1 -W1 "$B"
ep=$(peer_of hA alpha beta endpoint)
[[ $ep == "[2001:db8::11]:"* ]] || fail "alpha reaches beta by $ep, not beta's IPv6 endpoint"
peer_is hA alpha beta path direct || fail "the pair is not direct over IPv6"
log "alpha -> beta over $ep; TUN MTU $(status_of hA alpha mtu)"
transfer_ok hA hB "$B" 300000 over-v6
mkdir -p "$WORK/www"; echo "hello over IPv6" >"$WORK/www/index.html"
bg hB http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
wait_listen 5 hB 8080 "$B"
body=$(on hA curl -sf --max-time 5 "http://$B:8080/") || fail "curl over 10.x failed"
[ "$body" = "hello over IPv6" ] || fail "curl got '$body'"
B6=$(status_of hB beta address6)
wait_for 10 "ping -6 to beta's overlay address" onq hA ping -6 -c1 -W1 "$B6"
pass "an IPv6-only underlay carries the overlay (10.x and its IPv6 addresses), direct"
