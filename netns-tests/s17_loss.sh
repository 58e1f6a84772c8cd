#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s17 — random loss on the underlay: TCP over the tunnel keeps working and
# handshakes complete, at 1 % and at 5 % loss.
#
#              192.0.2.0/24 (one L2 segment, bridge br0 in namespace "sw")
#   +-----------+        +-----------+        +-----------+
#   |    reg    |        |     a     |        |     b     |
#   | registry  |        |   alpha   |        |   beta    |
#   +-----+-----+        +-----+-----+        +-----+-----+
#   ======+====================+====================+======  br0 (sw)
#                 nftables on br0: every IPv4 frame the bridge forwards
#                 is dropped with probability N % (numgen random mod 100 < N)
#
# Every eth0 sends one datagram per frame (gso_max_segs 1): without it a
# UDP GSO batch of up to 64 KB crosses the veth and the bridge as one frame,
# and the loss would hit whole batches, far fewer events than N % of the
# datagrams.
# The loss hits every underlay packet once (alpha <-> beta, and each node's
# control traffic with the registry). Tunnel timers run 20x faster
# (PILOT_TEST_TIME_SCALE=20: rekey every 6 s, handshake retry 0.25 s), so
# the run also sees rekeys under loss. For each loss rate:
#   1. four restarts (beta, alpha, beta, alpha): each new daemon's first
#      handshake happens under loss and must complete (a ping answers both
#      ways within 15 s; the times are printed);
#   2. a checksummed 10 MB transfer alpha -> beta over TCP on 10.x must
#      arrive whole (time printed; its throughput belongs to the throughput
#      benchmark, not here);
#   3. a checksummed 12 MB transfer beta -> alpha paced at 1 MB/s (12 s,
#      two rekeys at this scale) must arrive whole;
#   4. the daemons must have established a session per restart and rekeyed
#      during the phase, and the bridge's counter must show drops (else the
#      loss was not applied and the test proves nothing).
SCENARIO=s17_loss
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc nft python3 timeout sha256sum; do need "$t"; done

export PILOT_TEST_TIME_SCALE=20
lab_two_hosts
for ns in reg a b; do on "$ns" ip link set eth0 gso_max_segs 1; done
trust_pair a alpha b beta
wait_for 10 "alpha reaches beta" onq a ping -c1 -W1 "$B"

# sessions: "session established" lines in both daemons' logs (a handshake
# is logged by its initiator, a restart appends to the same log).
sessions() { cat "$WORK"/alpha/pilot-tun.log "$WORK"/beta/pilot-tun.log | grep -c "session established" || true; }
head -c 12M /dev/urandom >"$WORK/paced.in"

# set_loss PCT: drop PCT % of the IPv4 frames br0 forwards (0 removes the rule).
set_loss() {
  onq sw nft delete table bridge loss 2>/dev/null || true
  [ "$1" -gt 0 ] || return 0
  on sw nft -f - <<NFT
table bridge loss {
  chain frames {
    type filter hook forward priority 0; policy accept;
    ether type ip counter
    ether type ip numgen random mod 100 < $1 counter drop
  }
}
NFT
}
# frames: "SEEN DROPPED", the bridge's counters since set_loss.
frames() { onq sw nft list table bridge loss | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | paste -sd' '; }

# both_ways SECS: a ping answers alpha -> beta and beta -> alpha (each may
# take several tries under loss); sets BOTH_MS, the time until both did.
both_ways() {
  local t0; t0=$(now_ms)
  wait_for "$1" "alpha -> beta ping answered" onq a ping -c1 -W1 "$B"
  wait_for "$1" "beta -> alpha ping answered" onq b ping -c1 -W1 "$A"
  BOTH_MS=$(( $(now_ms) - t0 ))
}

FIGS=()
for pct in 1 5; do
  log "---- ${pct} % loss on the underlay"
  set_loss "$pct"
  s0=$(sessions)

  # 1. Handshakes from scratch under loss: each side restarts twice.
  : >"$WORK/hs$pct.ms"
  for who in "b beta" "a alpha" "b beta" "a alpha"; do
    set -- $who
    node_restart "$1" "$2" >/dev/null
    both_ways 15
    echo "$BOTH_MS" >>"$WORK/hs$pct.ms"
  done
  log "${pct} %: after each of 4 restarts a ping answered both ways within: $(tr '\n' ' ' <"$WORK/hs$pct.ms")ms"

  # 2. TCP over the tunnel: 10 MB with a checksum.
  xfer_10mb a b "$B" "loss$pct"
  TEN_MS=$XFER_MS
  log "${pct} %: 10 MB alpha -> beta arrived whole (sha256 equal) in ${XFER_MS} ms"

  # 3. A flow that lasts across rekeys.
  xfer_try b a "$A" 9100 "$WORK/paced.in" "paced$pct" 60 1024 \
    || fail "${pct} %: the paced 12 MB transfer beta -> alpha failed: $XFER_WHY"
  log "${pct} %: 12 MB beta -> alpha paced at 1 MB/s arrived whole in ${XFER_MS} ms"

  # 3. Handshakes happened under loss, and the loss was real.
  s1=$(sessions); read -r seen d < <(frames)
  log "${pct} %: $(( s1 - s0 )) sessions established during the phase; the bridge dropped $d of $seen frames ($(( d * 1000 / seen / 10 )).$(( d * 1000 / seen % 10 )) %)"
  [ $(( s1 - s0 )) -ge 5 ] || fail "${pct} %: only $(( s1 - s0 )) sessions established during the phase (4 restarts and at least one rekey expected)"
  [ "$d" -gt 0 ] || fail "${pct} %: the loss rule dropped nothing"
  FIGS+=("${pct}% loss: both ways after a restart in $(tr '\n' ' ' <"$WORK/hs$pct.ms")ms; 10 MB in ${TEN_MS} ms, $(( s1 - s0 )) handshakes, $d of $seen frames dropped")
  pass "${pct} % loss: handshakes complete, 10 MB over TCP arrives whole"
done
set_loss 0

for f in "${FIGS[@]}"; do log "figure: $f"; done
pass "TCP over the tunnel and handshakes survive 1 % and 5 % random underlay loss"
