#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# NAT matrix: which path (direct or relay) each pair of hosts ends up on,
# with an ordinary TCP transfer and iperf3 over 10.x for every cell.
#
#                         inet (bridge, 203.0.113.0/24)
#   registry .1   pubA .10   pubB .11   nE1 .21   nE2 .22   nH1 .23   nH2 .24
#                                        |         |         |         |
#                                e1 lan 192.0.2.0/26  e2 lan 192.0.2.64/26
#                                hE1 .10, hE1b .11    hE2 .74
#                                                  h1 lan 198.51.100.0/26  h2 lan 198.51.100.64/26
#                                                  hH1 .10                 hH2 .74
#
# nE1, nE2: nftables masquerade, port-preserving ("easy", endpoint-independent)
# nH1, nH2: nftables masquerade fully-random ("hard", per-destination ports)
# All four also drop unsolicited inbound packets, as home routers do.
#
# Cells and the path each must take:
#   public<->public  pubA-pubB   direct
#   easy<->public    hE1-pubB    direct
#   easy<->easy      hE1-hE2     direct (coordinated hole punching)
#   same NAT         hE1-hE1b    direct (local candidates)
#   hard<->easy      hH1-hE2     relay  (direct probes unanswered, after 2 s)
#   hard<->hard      hH1-hH2     relay  (at once: both NATs map per destination)
# Plus: the relay's own capture never shows a marker sent over a relayed pair.
#
# TTFB_JSON=<file> writes each cell's time from a cold start to the first
# byte of an HTTP exchange (used by scripts/nat-bench.sh), with the iperf3
# figure and the registry's CPU seconds per GB of iperf3 payload meanwhile.
# REGISTRY_ARGS (words) go to pilot-registry (nat-bench.sh raises the relay
# limits with them); IPERF_SECS sets the iperf3 time (default 3).
SCENARIO=${SCENARIO:-s06_nat_matrix}
source "$(dirname "$0")/lib.sh"
setup_lab
need nft; need iperf3; need curl; need tcpdump

switch inet
mkns reg; plug reg inet 203.0.113.1/24
for h in pubA:10 pubB:11; do
  mkns "${h%%:*}"; plug "${h%%:*}" inet "203.0.113.${h##*:}/24"
done

nat_router nE1 203.0.113.21 e1 192.0.2.1/26 easy
nat_router nE2 203.0.113.22 e2 192.0.2.65/26 easy
nat_router nH1 203.0.113.23 h1 198.51.100.1/26 hard
nat_router nH2 203.0.113.24 h2 198.51.100.65/26 hard
behind hE1 e1 192.0.2.10/26 192.0.2.1
behind hE1b e1 192.0.2.11/26 192.0.2.1
behind hE2 e2 192.0.2.74/26 192.0.2.65
behind hH1 h1 198.51.100.10/26 198.51.100.1
behind hH2 h2 198.51.100.74/26 198.51.100.65

read -ra REG_ARGS <<<"${REGISTRY_ARGS:-}"
start_registry reg 203.0.113.1 "${REG_ARGS[@]}"
for n in pubA pubB hE1 hE1b hE2 hH1 hH2; do
  node_up "$n" "$(echo "$n" | tr 'A-Z' 'a-z')" --registry "$JOIN" >/dev/null
done

nat_of() { status_of "$1" "$(echo "$1" | tr 'A-Z' 'a-z')" nat; }
log "NAT types: pubA=$(nat_of pubA) hE1=$(nat_of hE1) hH1=$(nat_of hH1)"
[ "$(nat_of pubA)" = none ] || fail "pubA should see no NAT, got $(nat_of pubA)"
[ "$(nat_of hE1)" = endpoint-independent ] || fail "hE1 should see an easy NAT, got $(nat_of hE1)"
[ "$(nat_of hH1)" = "per-destination (hard)" ] || fail "hH1 should see a hard NAT, got $(nat_of hH1)"

# path_of NS NAME PEER: direct|relay|null, from `peers --json`.
path_of() { peer_of "$1" "$2" "$3" path; }

TTFB=()
# registry_cpu_ticks: user + system clock ticks the registry used so far.
registry_cpu_ticks() {
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$(bg_pid registry)/stat"
}
# cell LABEL NS_A NS_B EXPECTED
cell() {
  local label=$1 na=$2 nb=$3 want=$4
  local a; a=$(echo "$na" | tr 'A-Z' 'a-z'); local b; b=$(echo "$nb" | tr 'A-Z' 'a-z')
  log "---- cell $label: $a <-> $b, expecting $want"
  pt "$na" "$a" trust request "$b" >/dev/null
  wait_for 5 "$b sees $a's request" has_peer "$nb" "$b" "$a" trust pending
  pt "$nb" "$b" trust approve "$a" >/dev/null
  wait_for 5 "$a trusts $b" peer_is "$na" "$a" "$b" trust trusted
  local B; B=$(addr_of "$nb" "$b")
  # Traffic decides the path: ping until it answers (relay fallback included).
  wait_for 15 "$a reaches $b over 10.x" onq "$na" ping -c1 -W1 "$B"
  local got; got=$(path_of "$na" "$a" "$b")
  [ "$got" = "$want" ] || { pt "$na" "$a" peers >&2; fail "cell $label: path is $got, expected $want"; }
  local gotb; gotb=$(path_of "$nb" "$b" "$a")
  [ "$gotb" = "$want" ] || { pt "$nb" "$b" peers >&2; fail "cell $label: $b's path is $gotb, expected $want"; }
  # An ordinary TCP transfer with a checksum.
  transfer_ok "$na" "$nb" "$B" 3000000 "$label"
  # iperf3 (3 s by default), with the registry's CPU time meanwhile.
  local secs=${IPERF_SECS:-3} t0; t0=$(registry_cpu_ticks)
  iperf_mbps "$na" "$nb" "$B" "$secs" "$label"; local mbps=$MBPS
  local cpu_ticks=$(( $(registry_cpu_ticks) - t0 ))
  # CPU seconds per GB (10^9 bytes) of iperf3 payload.
  local cpu_gb; cpu_gb=$(awk -v t="$cpu_ticks" -v hz="$(getconf CLK_TCK)" -v m="$mbps" -v s="$secs" \
    'BEGIN { printf "%.2f", (t / hz) / (m * s / 8000) }')
  log "cell $label: path $got, iperf3 $mbps Mbit/s, registry CPU $cpu_gb s/GB, 3 MB transfer identical"
  RESULTS+=("$label|$want|$mbps")
  # Time to first byte from a cold start: restart a, then fetch from b.
  if [ -n "${TTFB_JSON:-}" ]; then
    mkdir -p "$WORK/www-$label"; echo hi >"$WORK/www-$label/index.html"
    bg "$nb" "http-$label" python3 -m http.server 8080 --bind "$B" --directory "$WORK/www-$label"
    wait_listen 5 "$nb" 8080 "$B"
    node_restart "$na" "$a" >/dev/null
    local t; t=$(onq "$na" curl -s -o /dev/null -w '%{time_starttransfer}' --max-time 15 "http://$B:8080/")
    log "cell $label: time to first byte after a cold start: ${t}s"
    TTFB+=("{\"cell\":\"$label\",\"path\":\"$want\",\"ttfb_s\":$t,\"iperf_mbps\":$mbps,\"registry_cpu_s_per_gb\":$cpu_gb}")
    stop_bg "http-$label"
  fi
}

RESULTS=()
cell public-public pubA pubB direct
cell easy-public hE1 pubB direct
cell easy-easy hE1 hE2 direct
cell same-nat hE1 hE1b direct
cell hard-easy hH1 hE2 relay
# Relay negative: the relay never sees plaintext. Capture on the registry
# while a marker crosses the relayed pair hH1 -> hE2.
MARK="PILOT-RELAY-MARK-$RANDOM$RANDOM"
HE2=$(addr_of hE2 he2)
capture reg cap "$WORK/relay.pcap" udp
bg hE2 marknc sh -c "exec nc -l $HE2 9100 > $WORK/mark.out"
wait_listen 5 hE2 9100 "$HE2"
for _ in 1 2 3; do echo "$MARK"; done | onq hH1 nc -N -w 5 "$HE2" 9100
wait_for 5 "marker delivered" grep -q "$MARK" "$WORK/mark.out"
# Everything that carried the marker crossed the relay's link before it was
# delivered; a fence datagram sent to the relay now is captured after all of
# it, so once the fence is in the file, so is the marker's traffic.
FENCE="CAPTURE-FENCE-$RANDOM$RANDOM"
onq pubA python3 -c 'import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), ("203.0.113.1", 9))' "$FENCE"
wait_for 5 "the fence datagram is in the relay's capture" grep -qa "$FENCE" "$WORK/relay.pcap"
stop_bg cap INT
NPKT=$(pcap_count "$WORK/relay.pcap" not dst port 9)
[ "$NPKT" -ge 6 ] || fail "relay capture holds $NPKT packets: the marker did not cross the relay"
if grep -qa "$MARK" "$WORK/relay.pcap"; then fail "the relay saw plaintext"; fi
log "relay capture: $NPKT UDP packets carried the marker, none shows it"
cell hard-hard hH1 hH2 relay
RR=$(peer_of hH1 hh1 hh2 relay_reason)
[ "$RR" = "both NATs map per destination" ] \
  || fail "hard-hard should be relayed because both NATs are hard, reason was: $RR"

printf '\n%-15s %-7s %s\n' CELL PATH IPERF3 >&2
for r in "${RESULTS[@]}"; do IFS='|' read -r l p m <<<"$r"; printf '%-15s %-7s %s Mbit/s\n' "$l" "$p" "$m" >&2; done
if [ -n "${TTFB_JSON:-}" ]; then
  (IFS=,; echo "[${TTFB[*]}]") >"$TTFB_JSON"
fi
pass "NAT matrix: every cell on its expected path, data and iperf3 through each"
