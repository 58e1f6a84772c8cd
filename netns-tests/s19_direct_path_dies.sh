#!/usr/bin/env bash
# s19 — the direct path of a pair dies while both still reach the relay
# (docs/stress.md, finding 1); then it heals.
#
#              192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+          +---------+           +---------+
#   |   reg   |          |    a    |           |    b    |
#   |registry |          |  alpha  |<- trust ->|  beta   |
#   |  relay  |          |   .11   |           |   .12   |
#   |   .1    |          |         |           |         |
#   +----+----+          +----+----+           +----+----+
#   =====+====================+======= X =========+=====  br0
#   The cut (X) is an nftables table on the bridge that drops every frame
#   between .11 and .12: frames vanish silently, as in a real partition;
#   both still reach the registry and its relay. Production timers.
#
# 1. alpha pings beta every 0.5 s over a direct session; the direct path
#    is cut. Within 15 s of the cut pings must answer again, both ways,
#    and both sides must show `path relay` (the heartbeat finds the path
#    silent at 6.5 s; the new session through the relay moves beta too).
# 2. The cut heals. Both sides must be direct again within 15 s (the side
#    that gave the direct path up pings it every 3 s on the session it
#    has; an authenticated answer moves both back) and answer pings both
#    ways.
SCENARIO=${SCENARIO:-s19_direct_path_dies}
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nft python3; do need "$t"; done

lab_two_hosts
trust_pair a alpha b beta
wait_for 10 "alpha reaches beta" ping_until a "$B" 1
wait_for 10 "beta reaches alpha" ping_until b "$A" 1
wait_for 5 "alpha's path to beta is direct" peer_is a alpha beta path direct
wait_for 5 "beta's path to alpha is direct" peer_is b beta alpha path direct
log "alpha sends to beta at $(peer_of a alpha beta endpoint), beta to alpha at $(peer_of b beta alpha endpoint)"

# cut / heal: the bridge drops (and counts) every frame between the two.
cut() {
  log "cut: 192.0.2.11 <-> 192.0.2.12 on the bridge"
  onq sw nft -f - <<'NFT'
table bridge cut {
  chain frames {
    type filter hook forward priority 0; policy accept;
    ip saddr 192.0.2.11 ip daddr 192.0.2.12 counter drop
    ip saddr 192.0.2.12 ip daddr 192.0.2.11 counter drop
  }
}
NFT
}
dropped() { onq sw nft list table bridge cut | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }'; }
heal() { log "heal (the cut dropped $(dropped) frames)"; onq sw nft delete table bridge cut; }
both_answer() { ping_until a "$B" 1 && ping_until b "$A" 1; }
both_relayed() { peer_is a alpha beta path relay && peer_is b beta alpha path relay; }
both_direct() { peer_is a alpha beta path direct && peer_is b beta alpha path direct; }

# --- 1. the direct path dies -----------------------------------------------
bg a pinger ping -i 0.5 "$B"   # the application that keeps talking
sleep 2                        # it is under way (and answered) before the cut
cut
t0=$(now_ms)
sleep 1                        # the pings before the cut are answered or lost
poll 15 both_answer || fail "phase 1: no ping answered both ways within 15 s of the cut; alpha: $(peer_of a alpha beta '' 2>&1 | head -c 400); beta: $(peer_of b beta alpha '' 2>&1 | head -c 400)"
back_ms=$(( $(now_ms) - t0 ))
wait_for 5 "both sides carry the pair through the relay" both_relayed
[ "$(dropped)" -gt 0 ] || fail "phase 1: the cut dropped nothing: the pings never tried the direct path"
ping_until a "$B" 1 || fail "phase 1: alpha -> beta stopped answering through the relay"
ping_until b "$A" 1 || fail "phase 1: beta -> alpha stopped answering through the relay"
pass "phase 1: direct path cut: pings answer both ways ${back_ms} ms after the cut, through the relay (alpha: $(peer_of a alpha beta relay_reason); beta: $(peer_of b beta alpha relay_reason))"

# --- 2. the direct path heals ----------------------------------------------
heal
t1=$(now_ms)
wait_for 15 "both sides direct again after the heal" both_direct
direct_ms=$(( $(now_ms) - t1 ))
wait_for 5 "alpha reaches beta after the heal" ping_until a "$B" 1
wait_for 5 "beta reaches alpha after the heal" ping_until b "$A" 1
stop_bg pinger INT
pass "phase 2: healed: both sides direct again after ${direct_ms} ms (alpha at $(peer_of b beta alpha endpoint), beta at $(peer_of a alpha beta endpoint))"
