#!/usr/bin/env bash
# s33 — port mapping protocols other than PCP (s27): a host behind a hard NAT
# whose router runs miniupnpd with only UPnP IGD gets a mapping by UPnP and a
# direct path to a host behind another hard NAT; a host whose router answers
# NAT-PMP but not PCP falls back to NAT-PMP. Both mappings go at `down`.
#
#                      203.0.113.0/24 (switch "inet")
#   +---------------+  +------------------+  +------------------+  +-------------+
#   | reg .1        |  | nU .25 miniupnpd |  | nP .26 miniupnpd |  | nH .24      |
#   | registry      |  | hard NAT,        |  | hard NAT, NAT-PMP|  | hard NAT    |
#   | stund .2 / .3 |  | UPnP IGD only    |  | (PCP dropped)    |  |             |
#   +---------------+  +--------+---------+  +--------+---------+  +------+------+
#                               | 198.51.100.0/26     | .128/26           | .64/26
#                            hU .10                hP .138             hH .74
#
# miniupnpd 2.3.1 serves PCP and NAT-PMP together (enable_natpmp); no setting
# keeps PCP off while NAT-PMP is on, so nP's input filter drops PCP requests
# (version byte 2) and the node meets silence there, as it would at a
# NAT-PMP-only router that does not answer PCP at all. Both routers pass
# miniupnpd's reserved-address check by STUN, as in s27. Checks:
# - hU maps by UPnP IGD (SSDP, description, AddPortMapping): status says
#   upnp-igd, miniupnpd installed the rule; hU <-> hH goes direct, both ends,
#   at the mapped endpoint, with a checksummed transfer; `down` on hU
#   removes the rule (DeletePortMapping);
# - hP maps by NAT-PMP after PCP got no answer; `down` removes its rule.
SCENARIO=s33_port_mapping_protocols
source "$(dirname "$0")/lib.sh"
setup_lab
for t in nft miniupnpd stund python3 nc; do need "$t"; done

switch inet
mkns reg; plug reg inet 203.0.113.1/24
onq reg ip addr add 203.0.113.2/24 dev eth0
onq reg ip addr add 203.0.113.3/24 dev eth0
bg reg stund stund -h 203.0.113.2 -a 203.0.113.3

# upnp_router NAME WAN_IP LAN_SW LAN_GW/LEN LAN_NET: a hard NAT (a new port
# per destination) with a stateful firewall, except for what miniupnpd
# forwards (ct status dnat), and the chains miniupnpd manages ("inet filter").
upnp_router() {
  local name=$1 wan=$2 lan=$3 gw=$4 net=$5
  mkns "$name"; switch "$lan"
  plug "$name" inet "$wan/24" wan
  plug "$name" "$lan" "$gw" lan
  onq "$name" sysctl -qw net.ipv4.ip_forward=1
  onq "$name" nft -f - <<NFT
table ip nat {
  chain post { type nat hook postrouting priority 100; policy accept; ip saddr $net oifname "wan" masquerade fully-random; }
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
}

# miniupnpd_conf NAME LAN_NET NATPMP UPNP UUID: its configuration file. Each
# daemon gets its own pid file (-P): with the default one, shared by all
# namespaces, the second refuses to start ("already running").
miniupnpd_conf() {
  cat >"$WORK/miniupnpd-$1.conf" <<CONF
ext_ifname=wan
listening_ip=lan
enable_natpmp=$3
enable_upnp=$4
ext_perform_stun=yes
ext_stun_host=203.0.113.2
ext_stun_port=3478
secure_mode=yes
system_uptime=no
lease_file=$WORK/upnp-$1.leases
uuid=$5
allow 1024-65535 $2 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
}

upnp_router nU 203.0.113.25 u 198.51.100.1/26 198.51.100.0/26
miniupnpd_conf nU 198.51.100.0/26 no yes 5e1a7c3d-2b4f-4d6e-8a9c-0b1d2e3f4a5b
bg nU miniupnpd-nU miniupnpd -f "$WORK/miniupnpd-nU.conf" -P "$WORK/miniupnpd-nU.pidfile" -d
behind hU u 198.51.100.10/26 198.51.100.1

upnp_router nP 203.0.113.26 p 198.51.100.129/26 198.51.100.128/26
onq nP nft -f - <<'NFT'
table inet nopcp {
  chain input { type filter hook input priority -10; policy accept; iifname "lan" udp dport 5351 @th,64,8 2 drop; }
}
NFT
miniupnpd_conf nP 198.51.100.128/26 yes no 7c2e9b4a-1d3f-4a5b-9c6d-8e0f1a2b3c4d
bg nP miniupnpd-nP miniupnpd -f "$WORK/miniupnpd-nP.conf" -P "$WORK/miniupnpd-nP.pidfile" -d
behind hP p 198.51.100.138/26 198.51.100.129

nat_router nH 203.0.113.24 h 198.51.100.65/26 hard
behind hH h 198.51.100.74/26 198.51.100.65

# Both daemons map only once their STUN check is done (a few seconds).
forwarding() { grep -q "Port forwarding is now enabled" "$WORK/miniupnpd-$1.log"; }
wait_for 20 "miniupnpd on nU enables port forwarding" forwarding nU
wait_for 20 "miniupnpd on nP enables port forwarding" forwarding nP
# nP: NAT-PMP answers, PCP does not (dropped).
natpmp_only() {
  onq hP python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.connect(("198.51.100.129", 5351))
s.send(bytes([0, 0]))
d = s.recv(64)
assert d[:4] == bytes([0, 128, 0, 0]), d.hex()
s.send(bytes([2, 0]) + bytes(58))
try:
    d = s.recv(1100)
    raise SystemExit("PCP answered: " + d.hex())
except socket.timeout:
    pass'
}
wait_for 20 "nP answers NAT-PMP and not PCP" natpmp_only

start_registry reg 203.0.113.1
node_up hU hu --registry "$JOIN" >/dev/null
node_up hP hp --registry "$JOIN" >/dev/null
node_up hH hh --registry "$JOIN" >/dev/null

# dnat_rule NS EXT_PORT TO: miniupnpd's rule forwarding EXT_PORT to TO.
# Matched on the captured listing (no `nft … | grep -q` under pipefail).
dnat_rule() { grep -q "dport $2 dnat ip to $3" <<<"$(onq "$1" nft list chain inet filter prerouting_miniupnpd)"; }
no_dnat() { ! dnat_rule "$@"; }

# --- UPnP IGD -----------------------------------------------------------------------
mapped_at() { local m; m=$(status_of "$1" "$2" port_mapping 2>/dev/null) && [ "${m%%:*}" = "$3" ]; }
wait_for 15 "hu has a port mapping at 203.0.113.25" mapped_at hU hu 203.0.113.25
MAP=$(status_of hU hu port_mapping)
[ "$(status_of hU hu port_mapping_protocol)" = upnp-igd ] \
  || fail "hu should have mapped with UPnP IGD, got $(status_of hU hu port_mapping_protocol)"
[ "$(status_of hU hu nat)" = endpoint-independent ] \
  || fail "with a mapping, hu's NAT should count as endpoint-independent, got $(status_of hU hu nat)"
PORT=$(status_of hU hu listen); PORT=${PORT##*:}
dnat_rule nU "${MAP##*:}" "198.51.100.10:$PORT" \
  || fail "miniupnpd has no rule forwarding ${MAP##*:} to 198.51.100.10:$PORT: $(onq nU nft list chain inet filter prerouting_miniupnpd)"
grep -q "AddPortMapping" "$WORK/miniupnpd-nU.log" || fail "miniupnpd logged no AddPortMapping"
pass "the node behind the UPnP-only router holds a UPnP IGD mapping ($MAP -> :$PORT)"

trust_pair hU hu hH hh
HH=$(addr_of hH hh); HU=$(addr_of hU hu)
wait_for 15 "hu reaches hh over 10.x" onq hU ping -c1 -W1 "$HH"
direct() { [ "$(peer_of "$1" "$2" "$3" path)" = direct ]; }
wait_for 15 "hu's path to hh is direct" direct hU hu hh
wait_for 15 "hh's path to hu is direct" direct hH hh hu
EP=$(peer_of hH hh hu endpoint)
[ "$EP" = "$MAP" ] || fail "hh reaches hu at $EP, not at the mapped endpoint $MAP"
transfer_ok hH hU "$HU" 3000000 upnp
pass "two hard NATs, one with a UPnP IGD router: direct both ways ($EP), 3 MB identical"

node_down hU hu
wait_for 5 "miniupnpd's rule for hu is gone after down" no_dnat nU "${MAP##*:}" "198.51.100.10:$PORT"
pass "down removes the UPnP IGD mapping (DeletePortMapping)"

# --- NAT-PMP after PCP -------------------------------------------------------------
wait_for 20 "hp has a port mapping at 203.0.113.26" mapped_at hP hp 203.0.113.26
PMAP=$(status_of hP hp port_mapping)
[ "$(status_of hP hp port_mapping_protocol)" = nat-pmp ] \
  || fail "hp should have mapped with NAT-PMP, got $(status_of hP hp port_mapping_protocol)"
PPORT=$(status_of hP hp listen); PPORT=${PPORT##*:}
dnat_rule nP "${PMAP##*:}" "198.51.100.138:$PPORT" \
  || fail "miniupnpd has no rule forwarding ${PMAP##*:} to 198.51.100.138:$PPORT"
if grep -q "PCP request received" "$WORK/miniupnpd-nP.log"; then
  fail "a PCP request reached miniupnpd on nP: the drop rule does not hold"
fi
pass "with PCP unanswered, the node maps by NAT-PMP ($PMAP -> :$PPORT)"
node_down hP hp
wait_for 5 "miniupnpd's rule for hp is gone after down" no_dnat nP "${PMAP##*:}" "198.51.100.138:$PPORT"
pass "down removes the NAT-PMP mapping"
