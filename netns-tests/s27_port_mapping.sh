#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s27 — port mapping: a host behind a hard NAT whose router runs miniupnpd
# (PCP and NAT-PMP on UDP 5351) gets a direct path to a host behind another
# hard NAT; it maps with PCP, the first protocol it tries. (UPnP IGD, and
# the fallback from PCP to NAT-PMP: s33.)
#
#                      203.0.113.0/24 (switch "inet")
#   +-----------------+   +-------------------+   +-------------------+
#   | reg .1          |   | nM  .23 miniupnpd |   | nH  .24           |
#   | registry        |   | hard NAT, PCP     |   | hard NAT          |
#   | stund .2 / .3   |   +---------+---------+   +---------+---------+
#   +-----------------+             | 198.51.100.0/26       | 198.51.100.64/26
#                                hM .10                  hH .74
#
# Without the mapping this pair is the matrix's hard<->hard cell: relayed
# (s06). miniupnpd refuses to forward when its external address is in a
# reserved range, and the documentation ranges are; its STUN mode (against
# stund, which answers CHANGE-REQUEST from a second address) learns that
# the address is reachable from outside and lifts that. Checks:
# - the node on hM gets a mapping at start, by PCP (status: port_mapping,
#   port_mapping_protocol, and its NAT counts as endpoint-independent), and
#   miniupnpd installed it;
# - hM <-> hH goes direct, both ends, with a checksummed transfer;
# - `down` on hM removes the mapping at the router.
# TTFB_JSON=<file> also writes the time from a cold start of hH to the first
# byte of an HTTP GET from hM (used by scripts/nat-bench.sh).
SCENARIO=s27_port_mapping
source "$(dirname "$0")/lib.sh"
setup_lab
for t in nft miniupnpd stund python3 nc; do need "$t"; done

switch inet
mkns reg; plug reg inet 203.0.113.1/24
onq reg ip addr add 203.0.113.2/24 dev eth0
onq reg ip addr add 203.0.113.3/24 dev eth0
bg reg stund stund -h 203.0.113.2 -a 203.0.113.3

# The miniupnpd router: a hard NAT (a new port per destination) with a
# stateful firewall, except for what miniupnpd forwards (ct status dnat);
# miniupnpd's own chains in the table it manages ("inet filter").
mkns nM; switch m
plug nM inet 203.0.113.23/24 wan
plug nM m 198.51.100.1/26 lan
onq nM sysctl -qw net.ipv4.ip_forward=1
onq nM nft -f - <<'NFT'
table ip nat {
  chain post { type nat hook postrouting priority 100; policy accept; ip saddr 198.51.100.0/26 oifname "wan" masquerade fully-random; }
}
table inet fw {
  chain forward { type filter hook forward priority 0; policy accept; iifname "wan" ct state established,related accept; iifname "wan" ct status dnat accept; iifname "wan" drop; }
}
table inet filter {
  chain forward { type filter hook forward priority 1; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 99; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
NFT
# enable_natpmp serves PCP and NAT-PMP on 5351 (miniupnpd 2.3.1 names
# it so; later versions call it enable_pcp_pmp).
cat >"$WORK/miniupnpd.conf" <<CONF
ext_ifname=wan
listening_ip=lan
enable_natpmp=yes
enable_upnp=no
ext_perform_stun=yes
ext_stun_host=203.0.113.2
ext_stun_port=3478
secure_mode=yes
system_uptime=no
lease_file=$WORK/upnp.leases
uuid=3c6b9a2e-5f1d-4e8a-9b7c-2d4e6f8a0b1c
allow 1024-65535 198.51.100.0/26 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
# Its own pid file: the default one is shared with every other miniupnpd
# on the machine (another scenario's would refuse to start).
bg nM miniupnpd miniupnpd -f "$WORK/miniupnpd.conf" -P "$WORK/miniupnpd.pidfile" -d
behind hM m 198.51.100.10/26 198.51.100.1

nat_router nH 203.0.113.24 h 198.51.100.65/26 hard
behind hH h 198.51.100.74/26 198.51.100.65

# miniupnpd answers NAT-PMP once its STUN check is done (a few seconds).
natpmp_up() {
  onq hM python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.sendto(bytes([0, 0]), ("198.51.100.1", 5351))
d = s.recv(64)
assert d[:4] == bytes([0, 128, 0, 0]), d.hex()'
}
wait_for 20 "miniupnpd answers NAT-PMP with success" natpmp_up
grep -q "Port forwarding is now enabled" "$WORK/miniupnpd.log" \
  || fail "miniupnpd did not enable port forwarding: $(tail -5 "$WORK/miniupnpd.log")"

start_registry reg 203.0.113.1
node_up hM hm --registry "$JOIN" >/dev/null
node_up hH hh --registry "$JOIN" >/dev/null

# --- the mapping ------------------------------------------------------------------
mapped() { local m; m=$(status_of hM hm port_mapping 2>/dev/null) && [ "${m%%:*}" = 203.0.113.23 ]; }
wait_for 10 "hm has a port mapping at 203.0.113.23" mapped
MAP=$(status_of hM hm port_mapping)
[ "$(status_of hM hm nat)" = endpoint-independent ] \
  || fail "with a mapping, hm's NAT should count as endpoint-independent, got $(status_of hM hm nat)"
[ "$(status_of hH hh nat)" = "per-destination (hard)" ] || fail "hh should see a hard NAT"
[ "$(status_of hM hm port_mapping_protocol)" = pcp ] \
  || fail "hm should have mapped with PCP, got $(status_of hM hm port_mapping_protocol)"
grep -q "PCP MAP: added mapping UDP" "$WORK/miniupnpd.log" \
  || fail "miniupnpd logged no PCP mapping: $(tail -5 "$WORK/miniupnpd.log")"
PORT=$(status_of hM hm listen); PORT=${PORT##*:}
# Matched on the captured listing: `nft … | grep -q` under pipefail fails
# whenever grep exits before nft has written everything (SIGPIPE).
dnat_rule() { grep -q "dport ${MAP##*:} dnat ip to 198.51.100.10:$PORT" <<<"$(onq nM nft list chain inet filter prerouting_miniupnpd)"; }
dnat_rule || fail "miniupnpd has no rule forwarding ${MAP##*:} to 198.51.100.10:$PORT: $(onq nM nft list chain inet filter prerouting_miniupnpd)"
pass "the node behind the miniupnpd router holds a PCP mapping ($MAP -> :$PORT)"

# --- direct between two hard NATs -----------------------------------------------------
trust_pair hM hm hH hh
HH=$(addr_of hH hh); HM=$(addr_of hM hm)
wait_for 15 "hm reaches hh over 10.x" onq hM ping -c1 -W1 "$HH"
direct() { [ "$(peer_of "$1" "$2" "$3" path)" = direct ]; }
wait_for 15 "hm's path to hh is direct" direct hM hm hh
wait_for 15 "hh's path to hm is direct" direct hH hh hm
EP=$(peer_of hH hh hm endpoint)
[ "$EP" = "$MAP" ] || fail "hh reaches hm at $EP, not at the mapped endpoint $MAP"
transfer_ok hH hM "$HM" 3000000 mapped
pass "two hard NATs, one with a port-mapping router: direct both ways ($EP), 3 MB identical"

# Time to first byte from a cold start of the host behind the plain hard NAT,
# to the one behind the mapping router (scripts/nat-bench.sh).
if [ -n "${TTFB_JSON:-}" ]; then
  ttfb_cold hH hh hM hm mapped-hard
  [ "$TTFB_PATH" = direct ] || fail "after a cold start hh's path to hm is $TTFB_PATH, not direct"
  echo "[{\"cell\":\"mapped-hard\",\"path\":\"$TTFB_PATH\",\"ttfb_s\":$TTFB_S,\"iperf_mbps\":null}]" >"$TTFB_JSON"
fi

# --- down removes the mapping ---------------------------------------------------------
node_down hM hm
no_dnat() { ! dnat_rule; }
wait_for 5 "miniupnpd's rule for hm is gone after down" no_dnat
pass "down removes the mapping at the router"
