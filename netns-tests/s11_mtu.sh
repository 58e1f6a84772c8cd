#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s11 — the overlay works on every underlay MTU, with no flag: 1460 (Google
# Cloud's default), 1450 (VXLAN pod networks), 1400 and 1280 (VPNs and
# tunnels), 1500; and it follows the underlay when the MTU changes under it.
#
#              192.0.2.0/24 (one L2 segment, bridge in namespace "sw"),
#              every port and every host interface at MTU X
#   +-----------+        +-----------+        +-----------+
#   |    reg    |        |     a     |        |     b     |
#   | registry  |        |   alpha   |        |   beta    |
#   | .1:7946   |        |   .11     |        |   .12     |
#   +-----+-----+        +-----+-----+        +-----+-----+
#         |eth0 mtu X          |eth0 pilot0=A       |eth0 pilot0=B
#   ======+====================+====================+======  br0 (sw)
#
# For each X (1460 first: on the code before issue 8 a 3 MB curl got 0 bytes
# there, so this scenario fails at once without the fix): set every link to
# X, restart both daemons (the TUN MTU is chosen at start: X minus the
# tunnel's 80 bytes with the relay header), then
#   - 10 MB alpha -> beta over TCP, sha256 compared, and an iperf3 figure;
#   - both daemons' `status` show mtu X-80;
#   - alpha's probes confirmed beta's path MTU as exactly X;
#   - nothing was too big for the path (the TUN MTU alone fits).
# Then the links go from 1500 to 1400 under running daemons: the periodic
# re-check (10 s) lowers the TUN MTU and the transfer still arrives whole.
# Last, `--mtu 1300` caps the TUN MTU, and `--mtu 500` is refused.
SCENARIO=${SCENARIO:-s11_mtu}
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip nc iperf3 python3 ss timeout sha256sum; do need "$t"; done

# underlay_mtu X: every port of the switch and every host's eth0 at X.
underlay_mtu() {
  local x=$1 l ns
  for l in $(ip -n "$PFX-sw" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    [ "$l" = lo ] || ip -n "$PFX-sw" link set dev "$l" mtu "$x"
  done
  for ns in reg a b; do ip -n "$PFX-$ns" link set dev eth0 mtu "$x"; done
  log "underlay MTU $x on every link"
}

# peer_field NS NAME PEER FIELD: FIELD of PEER in NAME's `peers --json`.
peer_field() { peer_of "$1" "$2" "$3" "$4"; }

# path_mtu_confirmed NS NAME PEER MTU: NAME's probes confirmed PEER's path MTU.
path_mtu_confirmed() { peer_is "$1" "$2" "$3" path_mtu "$4" && peer_is "$1" "$2" "$3" path_mtu_state confirmed; }

switch sw
mkns reg; mkns a; mkns b
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta)
trust_pair a alpha b beta
log "alpha=$A beta=$B"

RESULTS=()
for X in 1460 1450 1400 1280 1500; do
  underlay_mtu "$X"
  node_restart a alpha >/dev/null
  node_restart b beta >/dev/null
  wait_for 10 "alpha reaches beta at underlay MTU $X" onq a ping -c1 -W1 "$B"
  xfer_10mb a b "$B" "mtu$X"
  iperf_mbps a b "$B" 2 "mtu$X"
  want=$(( X - 80 ))
  for n in a:alpha b:beta; do
    got=$(status_of "${n%%:*}" "${n#*:}" mtu)
    [ "$got" = "$want" ] || fail "underlay $X: ${n#*:}'s status shows mtu $got, expected $want"
    dev=$(ip -n "$PFX-${n%%:*}" -o link show pilot0 | grep -o 'mtu [0-9]*' | cut -d' ' -f2)
    [ "$dev" = "$want" ] || fail "underlay $X: ${n#*:}'s pilot0 has mtu $dev, expected $want"
  done
  wait_for 10 "alpha's probes confirm beta's path MTU $X" path_mtu_confirmed a alpha beta "$X"
  [ "$(peer_field a alpha beta mtu)" = "$want" ] || fail "underlay $X: alpha's peers entry for beta shows mtu $(peer_field a alpha beta mtu), expected $want"
  big=$(( $(status_of a alpha too_big.icmp_sent) + $(status_of a alpha too_big.fragmented_outer) + $(status_of a alpha too_big.fragmented_inner) ))
  [ "$big" = 0 ] || fail "underlay $X: $big packets were too big for the path although the TUN MTU fits it"
  pass "underlay MTU $X: TUN mtu $want, path MTU $X confirmed, 10 MB identical in ${XFER_MS} ms, iperf3 $MBPS Mbit/s"
  RESULTS+=("underlay $X  tun $want  10MB ${XFER_MS}ms  iperf3 ${MBPS} Mbit/s")
done

# --- the underlay narrows under running daemons --------------------------------
underlay_mtu 1400
wait_for 25 "alpha's TUN MTU follows the route (1320)" status_is a alpha mtu 1320
wait_for 25 "beta's TUN MTU follows the route (1320)" status_is b beta mtu 1320
xfer_10mb a b "$B" live1400
iperf_mbps a b "$B" 2 live1400
pass "1500 -> 1400 under running daemons: TUN mtu 1320 without a restart, 10 MB identical in ${XFER_MS} ms, iperf3 $MBPS Mbit/s"
RESULTS+=("live 1500->1400  tun 1320  10MB ${XFER_MS}ms  iperf3 ${MBPS} Mbit/s")

# --- --mtu caps it; too small a cap is refused --------------------------------
node_restart a alpha --mtu 1300 >/dev/null
[ "$(status_of a alpha mtu) $(status_of a alpha mtu_cap)" = "1300 1300" ] \
  || fail "--mtu 1300: status shows mtu $(status_of a alpha mtu), mtu_cap $(status_of a alpha mtu_cap)"
wait_for 10 "alpha reaches beta with --mtu 1300" onq a ping -c1 -W1 "$B"
if ptq a alpha up --mtu 500 >"$WORK/mtu500.txt" 2>&1; then
  fail "--mtu 500 was accepted"
fi
grep -q "576" "$WORK/mtu500.txt" || fail "--mtu 500 refused without naming the minimum: $(cat "$WORK/mtu500.txt")"
pass "--mtu 1300 caps the TUN MTU; --mtu 500 is refused"

for r in "${RESULTS[@]}"; do log "$r"; done
