#!/usr/bin/env bash
# s03 — restarts keep identity, address and trust; the registry keeps its keys
# and its database; tunnels that are up do not need the registry.
#
#                    192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+     +---------+     +---------+     +---------+
#   |   reg   |     |    a    |     |    b    |     |    d    |
#   |registry |     |  alpha  |<===>|  beta   |     |  delta  |
#   |   .1    |     |   .11   |trust|   .12   |     | .14 late|
#   +----+----+     +----+----+     +----+----+     +----+----+
#   =====+===============+===============+===============+=====  br0
#
# 1. restart alpha's daemon (down, up without --registry): same 10.x, beta
#    still trusted, ping works again with no new approval.
# 2. restart the registry while alpha pings beta: no ping lost, same join
#    URL (same key), same addresses, and a new node delta can still join and
#    send alpha a trust request (the registry still knows alpha).
# 3. stop the registry, restart beta's daemon: beta comes up on its cached
#    address and the tunnel to alpha is rebuilt from cached endpoints.
SCENARIO=s03_restart_keeps_state
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping python3 timeout; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b; mkns d
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug d sw 192.0.2.14/24

start_registry reg 192.0.2.1
JOIN0=$JOIN
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta)
log "alpha=$A beta=$B"
trust_pair a alpha b beta
on a ping -c2 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed after trust"

trusted_at() { # NS NAME PEER: NAME's trust list shows PEER trusted
  peer_is "$1" "$2" "$3" state trusted trust list
}
ping_works() { # NS ADDR: 3 pings, all answered
  on "$1" ping -c3 -i0.2 -W2 "$2" >/dev/null
}
# time_to_ping NS ADDR SECS: poll single pings until one is answered; sets T_MS.
time_to_ping() {
  local t0; t0=$(now_ms)
  wait_for "$3" "ping $1 -> $2" onq "$1" ping -c1 -W1 "$2"
  T_MS=$(( $(now_ms) - t0 ))
}

# --- 1. restart alpha's daemon ---------------------------------------------
old_pid=$(status_of a alpha pid)
node_restart a alpha
[ "$(status_of a alpha pid)" != "$old_pid" ] || fail "alpha's daemon pid did not change: not restarted"
grep -q "up: $A/" "$WORK/alpha.up" || fail "alpha came back with another address: $(cat "$WORK/alpha.up")"
[ "$(addr_of a alpha)" = "$A" ] || fail "alpha's status shows a different address after restart"
trusted_at a alpha beta || fail "alpha no longer trusts beta after its restart"
trusted_at b beta alpha || fail "beta no longer trusts alpha after alpha's restart"
# beta still holds the session from before; its traffic must reach the new alpha.
time_to_ping b "$A" 15
log "beta -> alpha answered ${T_MS} ms after alpha's restart"
ping_works a "$B" || fail "alpha -> beta ping failed after alpha's restart"
ping_works b "$A" || fail "beta -> alpha ping failed after alpha's restart"
pass "alpha restarted: same address $A, trust kept, ping both ways (no new approval)"

# --- 2. restart the registry while traffic flows --------------------------
bg a ping-during ping -i0.2 -c25 -W1 "$B"
wait_for 3 "first reply of the background ping" grep -q "bytes from" "$WORK/ping-during.log"
restart_registry reg 192.0.2.1   # sets JOIN from the URL the new process wrote
[ "$JOIN" = "$JOIN0" ] || fail "the registry's join URL changed on restart (key not kept): $JOIN0 -> $JOIN"
wait_bg_exit 15 ping-during
stats=$(grep "packets transmitted" "$WORK/ping-during.log") || fail "no ping statistics: $(cat "$WORK/ping-during.log")"
tx=$(echo "$stats" | awk '{print $1}'); rx=$(echo "$stats" | awk '{print $4}')
log "ping alpha -> beta across the registry restart: $stats"
[ "$tx" -ge 20 ] && [ "$rx" -eq "$tx" ] || fail "pings lost while the registry restarted: $stats"
ping_works b "$A" || fail "beta -> alpha ping failed after the registry restart"

# A new node joins the restarted registry and reaches alpha and beta by name:
# their requests arrive only once both have registered again with the new
# registry process, which must still know their names and addresses.
node_up d delta --registry "$JOIN"
D=$(addr_of d delta)
[ "$D" != "$A" ] && [ "$D" != "$B" ] || fail "delta was given an address already in use: $D"
pt d delta trust request alpha --note "after the registry restart" >&2
pt d delta trust request beta --note "after the registry restart" >&2
for nb in "a alpha" "b beta"; do
  set -- $nb
  wait_for 20 "$2 sees delta's request" has_peer "$1" "$2" delta trust pending
done
reachable() { status_is "$1" "$2" registry.reachable true; }
reachable a alpha && reachable b beta || fail "a node reports the restarted registry unreachable"
[ "$(addr_of a alpha)" = "$A" ] && [ "$(addr_of b beta)" = "$B" ] || fail "addresses changed after the registry restart"
pass "registry restarted: same key, 0/$tx pings lost, addresses kept, delta ($D) joined and asked alpha and beta"

# --- 3. registry down, restart beta ----------------------------------------
stop_registry
node_restart b beta
grep -q "up: $B/" "$WORK/beta.up" || fail "beta did not come up on its cached address $B while the registry is down: $(cat "$WORK/beta.up")"
[ "$(addr_of b beta)" = "$B" ] || fail "beta's status shows another address while the registry is down"
log "beta's view of alpha after the restart: $(peer_of b beta alpha "")"
# beta knows alpha's endpoint from before (cached on disk), so its own
# traffic to alpha can start a handshake at once; 10 s is generous.
time_to_ping b "$A" 10
log "beta -> alpha answered ${T_MS} ms after beta's restart (registry down)"
ping_works a "$B" || fail "alpha -> beta ping failed (registry down, beta restarted)"
ping_works b "$A" || fail "beta -> alpha ping failed (registry down, beta restarted)"
pass "registry down: beta restarted on $B, tunnel rebuilt from cached endpoints"

# The registry comes back: beta registers again on its own.
start_registry reg 192.0.2.1
wait_for 20 "beta reaches the registry again" reachable b beta
ping_works a "$B" || fail "alpha -> beta ping failed after the registry came back"
pass "registry back: beta registered again"
