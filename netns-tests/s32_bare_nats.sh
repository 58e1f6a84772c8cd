#!/usr/bin/env bash
# netns-timeout: 240
# Bare Linux masquerade NATs: nftables masquerade and nothing else (no
# stateful firewall, accepting input and forward policies), as on container
# hosts and VM hosts. Two cells:
#
#   routers between (as on the Internet)      side by side (one office, one VPC)
#
#       registry .1 ---- inet 203.0.113.0/24 ---- nA2 .41   nB2 .42
#          |                 |          |          |          |
#       rA .31            rB .32        |       a2 lan      b2 lan
#          | 198.51.100.128/30 |  .132/30         192.0.2.128/26  192.0.2.192/26
#       nA1 .130          nB1 .134                hA2 .140    hB2 .200
#          |                 |
#       a1 lan 192.0.2.0/26  b1 lan 192.0.2.64/26
#       hA1 .10              hB1 .74
#
# Between routers, each side's first probe of a punch leaves with TTL 2: it
# opens its own NAT and dies at the next router, so neither probe reaches
# the other NAT before that NAT's own host sent: direct at once.
# Side by side there is no router to die at: the first probe that reaches
# the other NAT leaves an unreplied conntrack entry there (shown below), the
# other host's mapping moves to a new port, and the pair is relayed. It
# goes direct in a later round (pilot_proto::path): one side keeps its own
# mapping alive with TTL-1 packets while the entry at the other NAT expires
# (30 s), then the other side probes first. Expected within 90 s, with the
# relayed path carrying traffic all along.
#
# TTFB_JSON=<file> writes each cell's time to first byte after a cold start
# (scripts/nat-bench.sh), and the side-by-side pair's time to direct.
SCENARIO=${SCENARIO:-s32_bare_nats}
source "$(dirname "$0")/lib.sh"
setup_lab
need nft; need curl

# bare_nat NAME LAN_SW LAN_GW/LEN: masquerade out of NAME's "wan", nothing else.
bare_nat() {
  local name=$1 lan=$2 gw=$3
  switch "$lan"
  plug "$name" "$lan" "$gw" lan
  onq "$name" sysctl -qw net.ipv4.ip_forward=1
  onq "$name" nft -f - <<NFT
table ip nat {
  chain post { type nat hook postrouting priority 100; policy accept; oifname "wan" masquerade; }
}
NFT
}

switch inet
mkns reg; plug reg inet 203.0.113.1/24
# Routers between: nA1 and nB1 each behind a router of its own.
mkns rA; plug rA inet 203.0.113.31/24
mkns rB; plug rB inet 203.0.113.32/24
mkns nA1; mkns nB1
link rA nA1 198.51.100.129/30 198.51.100.130/30 eth1 wan
link rB nB1 198.51.100.133/30 198.51.100.134/30 eth1 wan
for r in rA rB; do onq "$r" sysctl -qw net.ipv4.ip_forward=1; done
onq reg ip route add 198.51.100.128/30 via 203.0.113.31
onq reg ip route add 198.51.100.132/30 via 203.0.113.32
onq rA ip route add 198.51.100.132/30 via 203.0.113.32
onq rB ip route add 198.51.100.128/30 via 203.0.113.31
onq nA1 ip route add default via 198.51.100.129
onq nB1 ip route add default via 198.51.100.133
bare_nat nA1 a1 192.0.2.1/26
bare_nat nB1 b1 192.0.2.65/26
behind hA1 a1 192.0.2.10/26 192.0.2.1
behind hB1 b1 192.0.2.74/26 192.0.2.65
# Side by side: nA2 and nB2 on the registry's segment.
mkns nA2; plug nA2 inet 203.0.113.41/24 wan
mkns nB2; plug nB2 inet 203.0.113.42/24 wan
bare_nat nA2 a2 192.0.2.129/26
bare_nat nB2 b2 192.0.2.193/26
behind hA2 a2 192.0.2.140/26 192.0.2.129
behind hB2 b2 192.0.2.200/26 192.0.2.193

start_registry reg 203.0.113.1
for n in hA1 hB1 hA2 hB2; do
  node_up "$n" "$(echo "$n" | tr 'A-Z' 'a-z')" --registry "$JOIN" >/dev/null
done
nat_of() { status_of "$1" "$(echo "$1" | tr 'A-Z' 'a-z')" nat; }
for n in hA1 hA2; do
  [ "$(nat_of "$n")" = endpoint-independent ] || fail "$n should see a port-preserving NAT, got $(nat_of "$n")"
done

path_of() { peer_of "$1" "$2" "$3" path; }
both_direct() {
  [ "$(path_of "$1" "$2" "$3")" = direct ] && [ "$(path_of "$4" "$3" "$2")" = direct ]
}

# The side-by-side pair starts first: its rounds run while the other cell is checked.
trust_pair hA2 ha2 hB2 hb2
HB2=$(addr_of hB2 hb2)
T0=$(now_ms)
wait_for 15 "ha2 reaches hb2 over 10.x" onq hA2 ping -c1 -W1 "$HB2"
FIRST=$(path_of hA2 ha2 hb2)
log "side by side: first path $FIRST after $(( $(now_ms) - T0 )) ms"
if command -v conntrack >/dev/null; then
  log "conntrack at the two NATs after the first punch (an UNREPLIED entry for the other NAT's probe is the poison):"
  for n in nA2 nB2; do onq "$n" conntrack -L -p udp 2>/dev/null | grep -v -e 'dport=794[67] ' -e 'dport=5351 ' >&2 || true; done
fi

log "---- cell bare-routers: ha1 <-> hb1, expecting direct at once"
trust_pair hA1 ha1 hB1 hb1
HB1=$(addr_of hB1 hb1)
wait_for 15 "ha1 reaches hb1 over 10.x" onq hA1 ping -c1 -W1 "$HB1"
for s in "hA1 ha1 hb1" "hB1 hb1 ha1"; do
  set -- $s
  got=$(path_of "$1" "$2" "$3")
  [ "$got" = direct ] || { pt "$1" "$2" peers >&2; fail "bare-routers: $2's path to $3 is $got, expected direct"; }
done
transfer_ok hA1 hB1 "$HB1" 3000000 bare-routers
log "cell bare-routers: direct at once, 3 MB transfer identical"

log "---- cell bare-side-by-side: ha2 <-> hb2, expecting direct within 90 s of the first packet"
# Every second: the pair answers a ping (over whichever path it is on),
# until both sides are direct.
LOST=0
while ! both_direct hA2 ha2 hb2 hB2; do
  [ $(( $(now_ms) - T0 )) -lt 90000 ] || { pt hA2 ha2 peers >&2; pt hB2 hb2 peers >&2; fail "bare-side-by-side: not direct 90 s after the first packet"; }
  onq hA2 ping -q -c1 -W2 "$HB2" >/dev/null 2>&1 || LOST=$((LOST + 1))
  sleep 1
done
UPGRADE_MS=$(( $(now_ms) - T0 ))
[ "$LOST" -le 1 ] || fail "bare-side-by-side: $LOST pings lost while the pair waited for direct (the relay must carry it meanwhile)"
log "cell bare-side-by-side: first path $FIRST, direct after ${UPGRADE_MS} ms, $LOST pings lost on the way"
transfer_ok hA2 hB2 "$HB2" 3000000 bare-side-by-side
log "cell bare-side-by-side: 3 MB transfer identical over the direct path"

if [ -n "${TTFB_JSON:-}" ]; then
  CELLS=()
  ttfb_cold hA1 ha1 hB1 hb1 bare-routers
  CELLS+=("{\"cell\":\"bare-routers\",\"path\":\"$TTFB_PATH\",\"ttfb_s\":$TTFB_S,\"iperf_mbps\":null}")
  ttfb_cold hA2 ha2 hB2 hb2 bare-side-by-side
  CELLS+=("{\"cell\":\"bare-side-by-side\",\"path\":\"$TTFB_PATH\",\"ttfb_s\":$TTFB_S,\"iperf_mbps\":null,\"direct_after_s\":$(awk -v m="$UPGRADE_MS" 'BEGIN { printf "%.1f", m / 1000 }')}")
  (IFS=,; echo "[${CELLS[*]}]") >"$TTFB_JSON"
fi
pass "bare masquerade NATs: routers between direct at once; side by side direct after ${UPGRADE_MS} ms (first $FIRST)"
