#!/usr/bin/env bash
# s15 — partitions: nftables cuts node<->registry, node<->node, a node from
# everyone, and the registry from everyone; then heals them.
#
#              192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+      +---------+      +---------+      +---------+
#   |   reg   |      |    a    |      |    b    |      |    c    |
#   |registry |      |  alpha  |<====>|  beta   |<====>|  gamma  |
#   |   .1    |      |   .11   |trust |   .12   |trust |   .13   |
#   +----+----+      +----+----+      +----+----+      +----+----+
#   =====+================+================+================+=====  br0
#   A cut is a table of drop rules on the bridge (nftables, bridge family):
#   frames vanish silently, as in a real partition. Healing deletes it.
#   Production timers (no time scale).
#
# Each cut lasts PART_CUT_SECONDS (default 8; `scripts/stress.sh partitions`
# takes 30 s to 10 min):
#   1. alpha <-> registry, while a paced, checksummed transfer alpha -> beta
#      runs across the whole cut: it must arrive whole (established flows
#      do not need the registry); alpha must reach the registry again after
#      the heal (time printed).
#   2. alpha <-> beta on the underlay (both still reach the registry):
#      how long until pings flow again during the cut (through the relay)
#      is printed; after the heal a ping must answer within 15 s, and the
#      time until the pair is direct again is printed.
#   3. alpha from everyone (registry and peers), pinging beta all along:
#      after the heal, alpha and beta must reach each other within 15 s
#      (the time is printed; the goal is 5 s), and alpha the registry.
#   4. the registry from everyone, while a paced transfer beta -> gamma runs
#      across the cut: it must arrive whole, pings alpha -> beta keep
#      answering during the cut, and every node reaches the registry again
#      after the heal (time printed).
# PART_JSON=<file> writes the figures as JSON.
SCENARIO=${SCENARIO:-s15_partitions}
source "$(dirname "$0")/lib.sh"
setup_lab
reap_on_exit
for t in ip ping nc nft python3 timeout sha256sum; do need "$t"; done
CUT=${PART_CUT_SECONDS:-8}
[[ $CUT =~ ^[0-9]+$ && $CUT -ge 3 ]] || fail "PART_CUT_SECONDS must be a whole number of seconds, at least 3"
# Paced transfers run 2 s before the cut to 4 s after it, at most 64 MB.
KBPS=$(( 64 * 1024 / (CUT + 6) )); [ "$KBPS" -le 512 ] || KBPS=512

switch sw
mkns reg; plug reg sw 192.0.2.1/24
mkns a; plug a sw 192.0.2.11/24
mkns b; plug b sw 192.0.2.12/24
mkns c; plug c sw 192.0.2.13/24
start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN" >/dev/null
node_up b beta --registry "$JOIN" >/dev/null
node_up c gamma --registry "$JOIN" >/dev/null
A=$(addr_of a alpha); B=$(addr_of b beta); C=$(addr_of c gamma)
trust_pair a alpha b beta
trust_pair b beta c gamma
wait_for 10 "alpha reaches beta" ping_until a "$B" 1
wait_for 10 "beta reaches gamma" ping_until b "$C" 1
head -c $(( KBPS * 1024 * (CUT + 6) )) /dev/urandom >"$WORK/paced.in"
log "cuts of ${CUT} s; paced transfers: $(( $(stat -c %s "$WORK/paced.in") / 1048576 )) MB at ${KBPS} kB/s"

# partition X Y: the bridge drops every IPv4 frame between underlay address
# X and Y (Y "any": every frame from or to X). The packets vanish in the
# network, as in a real partition; a drop in the hosts' own output hook
# would make their sends fail with EPERM instead, which a daemon notices.
# One partition at a time; `heal` removes it.
partition() {
  local rules
  if [ "$2" = any ]; then
    rules="ip saddr $1 counter drop; ip daddr $1 counter drop;"
  else
    rules="ip saddr $1 ip daddr $2 counter drop; ip saddr $2 ip daddr $1 counter drop;"
  fi
  log "partition: $1 <-> $2"
  onq sw nft -f - <<NFT
table bridge cut {
  chain frames { type filter hook forward priority 0; policy accept; $rules }
}
NFT
}
# heal: remove the partition; logs how many frames it dropped.
heal() {
  local n
  n=$(onq sw nft list table bridge cut | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
  onq sw nft delete table bridge cut
  log "healed (the partition dropped $n frames)"
}
reachable() { status_is "$1" "$2" registry.reachable true; }
# reach_ms SECS NAME NS: time until NAME reports the registry reachable;
# fails after SECS.
reach_ms() {
  local t0; t0=$(now_ms)
  wait_for "$1" "$2 reaches the registry again" reachable "$3" "$2"
  echo $(( $(now_ms) - t0 ))
}
declare -A FIG

# --- 1. alpha <-> registry, a transfer across it ----------------------------
bg_fn xfer1 xfer_try a b "$B" 9001 "$WORK/paced.in" p1 $(( CUT + 60 )) "$KBPS"
sleep 2   # the transfer is under way before the cut
partition 192.0.2.11 192.0.2.1
sleep "$CUT"   # the partition lasts this long
ping_until a "$B" 2 || fail "phase 1: alpha cannot reach beta while only the registry is cut off"
FIG[reg_seen_down]=$(status_of a alpha registry.reachable)
heal
FIG[node_reg_back_ms]=$(reach_ms 30 alpha a)
wait_fn $(( CUT + 60 )) xfer1
pass "phase 1: a transfer alpha -> beta ran across a ${CUT} s cut between alpha and the registry and arrived whole; alpha reached the registry ${FIG[node_reg_back_ms]} ms after the heal (reachable at the heal: ${FIG[reg_seen_down]})"

# --- 2. alpha <-> beta on the underlay ---------------------------------------
partition 192.0.2.11 192.0.2.12
t0=$(now_ms)
if ping_until a "$B" "$CUT"; then
  FIG[relay_fallback_ms]=$(( $(now_ms) - t0 ))
  FIG[path_during_cut]=$(peer_of a alpha beta path)
  log "phase 2: during the cut, pings flow again after ${FIG[relay_fallback_ms]} ms, path ${FIG[path_during_cut]}"
else
  FIG[relay_fallback_ms]=null; FIG[path_during_cut]=none
  log "phase 2: no ping answered during the ${CUT} s cut"
fi
left=$(( CUT * 1000 - ($(now_ms) - t0) ))
[ "$left" -le 0 ] || sleep "$(( left / 1000 )).$(printf '%03d' $(( left % 1000 )))"   # the rest of the cut
heal
t0=$(now_ms)
ping_until a "$B" 15 || fail "phase 2: alpha -> beta: no answer within 15 s of the heal"
ping_until b "$A" 15 || fail "phase 2: beta -> alpha: no answer within 15 s of the heal"
FIG[pair_back_ms]=$(( $(now_ms) - t0 ))
direct() { peer_is a alpha beta path direct; }
if poll "$(( CUT > 90 ? 90 : 15 ))" direct; then FIG[direct_again_ms]=$(( $(now_ms) - t0 )); else FIG[direct_again_ms]=null; fi
pass "phase 2: alpha <-> beta cut ${CUT} s: answers ${FIG[pair_back_ms]} ms after the heal; direct again after ${FIG[direct_again_ms]} ms"

# --- 3. alpha from everyone ------------------------------------------------------
bg a pinger ping -i 0.2 "$B"   # an application that keeps trying
partition 192.0.2.11 any
sleep "$CUT"   # the partition lasts this long
ping_until b "$A" 1 && fail "phase 3: beta reached alpha through a total cut: the cut does not work"
heal
t0=$(now_ms)
ping_until b "$A" 15 || fail "phase 3: beta -> alpha: no answer within 15 s of the heal"
ping_until a "$B" 15 || fail "phase 3: alpha -> beta: no answer within 15 s of the heal"
FIG[isolated_back_ms]=$(( $(now_ms) - t0 ))
stop_bg pinger INT
FIG[isolated_reg_back_ms]=$(reach_ms 30 alpha a)
pass "phase 3: alpha cut from everyone for ${CUT} s: alpha <-> beta answer ${FIG[isolated_back_ms]} ms after the heal (goal 5000), the registry after ${FIG[isolated_reg_back_ms]} ms"

# --- 4. the registry from everyone, a transfer across it --------------------------
bg_fn xfer4 xfer_try b c "$C" 9004 "$WORK/paced.in" p4 $(( CUT + 60 )) "$KBPS"
sleep 2   # the transfer is under way before the cut
partition 192.0.2.1 any
t_end=$(( $(now_ms) + CUT * 1000 ))
while [ "$(now_ms)" -lt "$t_end" ]; do
  ping_until a "$B" 3 || fail "phase 4: alpha -> beta: no answer while the registry is cut off"
  sleep 1
done
heal
wait_fn $(( CUT + 60 )) xfer4
t0=$(now_ms)
for n in a:alpha b:beta c:gamma; do
  wait_for 30 "${n#*:} reaches the registry again" reachable "${n%%:*}" "${n#*:}"
done
FIG[all_reg_back_ms]=$(( $(now_ms) - t0 ))
pass "phase 4: registry cut off ${CUT} s: a transfer beta -> gamma across it arrived whole, pings kept answering, every node reached the registry ${FIG[all_reg_back_ms]} ms after the heal"

for k in node_reg_back_ms relay_fallback_ms path_during_cut pair_back_ms direct_again_ms isolated_back_ms isolated_reg_back_ms all_reg_back_ms; do
  log "figure: $k=${FIG[$k]}"
done
if [ -n "${PART_JSON:-}" ]; then
  for k in "${!FIG[@]}"; do echo "$k ${FIG[$k]}"; done | python3 -c '
import json, sys
d = {"cut_seconds": int(sys.argv[2])}
for line in sys.stdin:
    k, v = line.split()
    d[k] = None if v == "null" else (int(v) if v.lstrip("-").isdigit() else v)
json.dump(d, open(sys.argv[1], "w"), indent=2, sort_keys=True)
' "$PART_JSON" "$CUT"
fi
pass "partitions of ${CUT} s: flows survive registry cuts, cut pairs reconnect after the heal"
