#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s12 — a narrower link somewhere on the path, with and without ICMP, and a
# relayed pair on a 1460 underlay.
#
#   203.0.113.0/24 "inet" (bridge), 1500 (1460 in the relay case)
#   +-----+  +-----+  +--------------+  +-----------+  +-----------+
#   | reg |  |  a  |  |      r1      |  | nH1 .23   |  | nH2 .24   |
#   | .1  |  | .11 |  | .254         |  | hard NAT  |  | hard NAT  |
#   +--+--+  +--+--+  +--+-------+---+  +-----+-----+  +-----+-----+
#      |        |        |       | mid 192.0.2.0/30,         |
#   ===+========+========+==     | MTU 1400                  |
#                                |                     h1 198.51.100.0/26   h2 198.51.100.64/26
#                             +--+--+                   hH1 .10             hH2 .74
#                             | r2  | .129
#                             +--+--+
#                                | 198.51.100.128/26, 1500
#                             +--+--+
#                             |  c  | .130  gamma
#                             +-----+
#
# alpha (a) and gamma (c) have 1500-byte interfaces, so their TUN MTU is
# 1420; but r1 -- r2 carries 1400, so only inner packets up to 1340 cross.
#   1. r1 and r2 drop the ICMP "destination unreachable" they generate
#      (nftables, output hook): nobody hears about the narrow link, and only
#      alpha's and gamma's probes find the path MTU (1400).
#   2. ICMP allowed (fresh daemons, route caches flushed): the same, with
#      the kernel learning 1400 from the routers' ICMP too.
#   In both: 10 MB alpha -> gamma over TCP right after the tunnel is up,
#   sha256 compared (TCP's 1420-byte packets get the daemon's ICMP
#   "fragmentation needed", counted), and an iperf3 figure; path MTU 1400
#   confirmed both ways;
#   `ping -M do` of 1420 bytes reports mtu 1340; `ping -M dont` of 1420
#   bytes is answered (the daemon fragments it). Without ICMP, the outer
#   datagrams the daemon sends without DF are seen in fragments past r1.
#   3. hh1 and hh2 behind hard NATs must be relayed; with every link of
#      the relayed path at 1460, the TUN MTU is 1380, the relayed path's
#      MTU 1460 is confirmed, and 10 MB arrive whole.
SCENARIO=${SCENARIO:-s12_mtu_paths}
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc nft iperf3 python3 ss timeout sha256sum; do need "$t"; done

# peer_field NS NAME PEER FIELD: FIELD of PEER in NAME's `peers --json`.
peer_field() { peer_of "$1" "$2" "$3" "$4"; }

# path_mtu_confirmed NS NAME PEER MTU: NAME's probes confirmed PEER's path MTU.
path_mtu_confirmed() { peer_is "$1" "$2" "$3" path_mtu "$4" && peer_is "$1" "$2" "$3" path_mtu_state confirmed; }

# wait_path_mtu NS NAME PEER MTU: until NAME's probes confirm PEER's path MTU.
wait_path_mtu() {
  wait_for 15 "$2's probes confirm $3's path MTU $4" path_mtu_confirmed "$@"
}

# icmp_unreachable_dropped on|off: r1 and r2 drop (or not) the ICMP
# "destination unreachable" they send, like a firewall that filters ICMP.
icmp_unreachable_dropped() {
  local r
  for r in r1 r2; do
    if [ "$1" = on ]; then
      onq "$r" nft -f - <<'NFT'
table inet noicmp {
  chain out { type filter hook output priority 0; policy accept; icmp type destination-unreachable counter drop; }
}
NFT
    else
      onq "$r" nft delete table inet noicmp
    fi
  done
}

# router_case LABEL: the checks of cases 1 and 2, alpha -> gamma.
router_case() {
  local label=$1 out
  wait_for 10 "alpha reaches gamma ($label)" onq a ping -c1 -W1 "$C"
  # At once, while the probes may still be searching: TCP starts with
  # 1420-byte packets; once the path MTU is known, alpha's daemon answers
  # them with ICMP "fragmentation needed" (and carries them whole meanwhile).
  xfer_10mb a c "$C" "$label"
  iperf_mbps a c "$C" 2 "$label"
  wait_path_mtu a alpha gamma 1400
  wait_path_mtu c gamma alpha 1400
  [ "$(peer_field a alpha gamma mtu)" = 1340 ] \
    || fail "$label: alpha's peers entry for gamma shows mtu $(peer_field a alpha gamma mtu), expected 1340"
  ICMPS=$(status_of a alpha too_big.icmp_sent)
  [ "$ICMPS" -gt 0 ] || fail "$label: alpha sent no ICMP 'fragmentation needed' into its TUN"
  OUTER=$(status_of a alpha too_big.fragmented_outer)
  [ "$OUTER" -ge "$ICMPS" ] || fail "$label: only $OUTER of the too-big packets went on in fragmentable datagrams"
  [ "$(status_of a alpha too_big.send_failed)" = 0 ] \
    || fail "$label: alpha failed to send some fragmentable datagrams"
  # What alpha's kernel learned about gamma's underlay address (from the
  # routers' ICMP, if they send it).
  KERNEL_PMTU=$(onq a ip route show cache 198.51.100.130 | grep -o 'mtu [0-9]*' || true)
  # Forget what the kernel learned from that ICMP, then: 1420 bytes with
  # DF get the daemon's "fragmentation needed" (or, if the TUN MTU already
  # followed the route down, the kernel's own refusal), both with mtu 1340.
  onq a ip route flush cache
  out=$(onq a ping -c1 -W2 -M do -s 1392 "$C" 2>&1 || true)
  echo "$out" | grep -Eq 'mtu ?= ?1340' \
    || fail "$label: ping -M do -s 1392 did not report mtu 1340: $out"
  # 1420 bytes without DF: answered. Fragmented by the daemon while the
  # TUN MTU is 1420 (the cache flushed again, or the kernel would fragment
  # it to 1340 itself); with ICMP allowed, the TUN MTU may already have
  # followed the kernel's route MTU towards gamma (1400 - 60) down, and
  # then the kernel fragments it before the TUN.
  onq a ip route flush cache
  onq a ping -c2 -W2 -M dont -s 1392 "$C" >/dev/null \
    || fail "$label: ping -M dont -s 1392 got no answer"
  TUN_MTU=$(status_of a alpha mtu)
  if [ "$TUN_MTU" -gt 1340 ]; then
    [ "$(status_of a alpha too_big.fragmented_inner)" -gt 0 ] \
      || fail "$label: alpha fragmented no inner packet"
  fi
}

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns a; plug a inet 203.0.113.11/24
mkns r1; plug r1 inet 203.0.113.254/24
mkns r2; mkns c
link r1 r2 192.0.2.1/30 192.0.2.2/30 mid mid
link r2 c 198.51.100.129/26 198.51.100.130/26 east eth0
ip -n "$PFX-r1" link set dev mid mtu 1400
ip -n "$PFX-r2" link set dev mid mtu 1400
onq r1 sysctl -qw net.ipv4.ip_forward=1
onq r2 sysctl -qw net.ipv4.ip_forward=1
onq reg ip route add 198.51.100.128/26 via 203.0.113.254
onq a ip route add 198.51.100.128/26 via 203.0.113.254
onq r1 ip route add 198.51.100.128/26 via 192.0.2.2
onq r2 ip route add default via 192.0.2.1
onq c ip route add default via 198.51.100.129
nat_router nH1 203.0.113.23 h1 198.51.100.1/26 hard
nat_router nH2 203.0.113.24 h2 198.51.100.65/26 hard
behind hH1 h1 198.51.100.10/26 198.51.100.1
behind hH2 h2 198.51.100.74/26 198.51.100.65
wait_for 5 "a reaches c across the 1400 link" onq a ping -c1 -W1 198.51.100.130

start_registry reg 203.0.113.1
RESULTS=()

# --- 1. a 1400 link, ICMP dropped ----------------------------------------------
icmp_unreachable_dropped on
# IP fragments from alpha's underlay address crossing to gamma's side: the
# outer datagrams the daemon sends without DF, split by r1.
bg r2 capfrag tcpdump -i mid -n -U --immediate-mode -Z root -w "$WORK/frag.pcap" \
  "src host 203.0.113.11 and (ip[6:2] & 0x3fff != 0)"
wait_for 5 "capture on r2" grep -q "listening on mid" "$WORK/capfrag.log"
node_up a alpha --registry "$JOIN" >/dev/null
node_up c gamma --registry "$JOIN" >/dev/null
C=$(addr_of c gamma)
trust_pair a alpha c gamma
router_case no-icmp
[ -z "$KERNEL_PMTU" ] \
  || fail "no-icmp: alpha's kernel learned the path MTU although the routers drop ICMP"
[ "$(onq r1 nft list table inet noicmp | grep -o 'packets [0-9]*' | cut -d' ' -f2)" -gt 0 ] \
  || fail "no-icmp: r1 dropped no ICMP, so the narrow link was never hit"
stop_bg capfrag INT
FRAGS=$(pcap_count "$WORK/frag.pcap")
[ "$FRAGS" -ge 2 ] || fail "no-icmp: no outer datagram of alpha's crossed the 1400 link in fragments ($FRAGS captured)"
DROPPED=$(onq r1 nft list table inet noicmp | grep -o 'packets [0-9]*' | cut -d' ' -f2)
[ "$TUN_MTU" = 1420 ] || fail "no-icmp: alpha's TUN MTU is $TUN_MTU, expected 1420 (nothing tells the kernel about the narrow link)"
pass "1400 link, routers drop ICMP ($DROPPED dropped at r1): path MTU 1400 found by probes, 10 MB identical in ${XFER_MS} ms, iperf3 $MBPS Mbit/s, $ICMPS ICMP answers, $OUTER packets in fragmentable datagrams ($FRAGS fragments seen past r1)"
RESULTS+=("1400 link, ICMP dropped  10MB ${XFER_MS}ms  iperf3 ${MBPS} Mbit/s")

# --- 2. the same link, ICMP allowed -----------------------------------------------
icmp_unreachable_dropped off
node_down a alpha; node_down c gamma
onq a ip route flush cache; onq c ip route flush cache
node_up a alpha >/dev/null
node_up c gamma >/dev/null
router_case icmp
[ "$KERNEL_PMTU" = "mtu 1400" ] \
  || fail "icmp: alpha's kernel did not learn the path MTU from the routers' ICMP"
pass "1400 link, ICMP allowed: path MTU 1400 (the kernel learned it too; TUN mtu now $TUN_MTU), 10 MB identical in ${XFER_MS} ms, iperf3 $MBPS Mbit/s, $ICMPS ICMP answers"
RESULTS+=("1400 link, ICMP allowed  10MB ${XFER_MS}ms  iperf3 ${MBPS} Mbit/s")
node_down a alpha; node_down c gamma

# --- 3. relayed, 1460 underlay ----------------------------------------------------
for ns in inet h1 h2; do
  for l in $(ip -n "$PFX-$ns" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    [ "$l" = lo ] || ip -n "$PFX-$ns" link set dev "$l" mtu 1460
  done
done
for n in reg:eth0 nH1:wan nH1:lan nH2:wan nH2:lan hH1:eth0 hH2:eth0; do
  ip -n "$PFX-${n%%:*}" link set dev "${n#*:}" mtu 1460
done
node_up hH1 hh1 --registry "$JOIN" >/dev/null
node_up hH2 hh2 --registry "$JOIN" >/dev/null
trust_pair hH1 hh1 hH2 hh2
H2=$(addr_of hH2 hh2)
wait_for 15 "hh1 reaches hh2" onq hH1 ping -c1 -W1 "$H2"
[ "$(peer_field hH1 hh1 hh2 path)" = relay ] || fail "two hard NATs should be relayed, path is $(peer_field hH1 hh1 hh2 path)"
for n in hH1:hh1 hH2:hh2; do
  got=$(status_of "${n%%:*}" "${n#*:}" mtu)
  [ "$got" = 1380 ] || fail "relayed: ${n#*:}'s status shows mtu $got, expected 1380 (1460 - 80)"
done
wait_path_mtu hH1 hh1 hh2 1460
xfer_10mb hH1 hH2 "$H2" relay1460
iperf_mbps hH1 hH2 "$H2" 2 relay1460
pass "relayed pair on a 1460 underlay: TUN mtu 1380, relayed path MTU 1460 confirmed, 10 MB identical in ${XFER_MS} ms, iperf3 $MBPS Mbit/s"
RESULTS+=("relayed, 1460 underlay  10MB ${XFER_MS}ms  iperf3 ${MBPS} Mbit/s")

for r in "${RESULTS[@]}"; do log "$r"; done
