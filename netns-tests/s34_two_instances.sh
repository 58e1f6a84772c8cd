#!/usr/bin/env bash
# netns-timeout: 180
# s34 — two registry instances on one PostgreSQL; one dies, nobody notices.
#
#                              203.0.113.0/24 (switch "inet")
#   +------------------------+   +-------+ +-------+ +-------+   +-----+   +-----+
#   |          reg           |   | alpha | | beta  | | erin  |   | nC  |   | nD  |
#   | instance one .1:7946   |   |  .11  | |  .12  | |  .15  |   | .21 |   | .22 |
#   | instance two .2:7946   |   +-------+ +-------+ +-------+   +--+--+   +--+--+
#   | PostgreSQL 127.0.0.1   |                                     | hard     | hard
#   +------------------------+                                   carol      dave
#
# Both instances share the database and a copy of the registry key.
# alpha and carol join instance one only; beta and dave get the join URL
# with both endpoints while instance one is down, so they attach to two.
# 1. Across instances: alpha requests beta's trust (pushed to beta by the
#    other instance), ping; carol and dave (both behind per-destination
#    NATs) are relayed, through both instances: a checksummed transfer.
# 2. kill -9 instance two: alpha's pings to beta (a direct tunnel) go on;
#    beta and dave move to instance one (timed, printed); carol <-> dave
#    relayed again.
# 3. A new trust request between nodes that were on different instances
#    (alpha, dave) goes through; a new node (erin) joins through the
#    survivor with the dead instance listed first.
SCENARIO=s34_two_instances
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc python3 timeout setpriv psql cmp; do need "$t"; done
PG="$ROOT/scripts/pg.sh"

switch inet
mkns reg
plug reg inet 203.0.113.1/24
onq reg ip addr add 203.0.113.2/24 dev eth0
for n in a:alpha:11 b:beta:12 e:erin:15; do
  IFS=: read -r ns _ ip <<<"$n"
  mkns "$ns"; plug "$ns" inet "203.0.113.$ip/24"
done
nat_router nC 203.0.113.21 lc 198.51.100.1/26 hard
nat_router nD 203.0.113.22 ld 198.51.100.65/26 hard
behind c lc 198.51.100.10/26 198.51.100.1
behind d ld 198.51.100.74/26 198.51.100.65

chmod o+x "$WORK"
"$PG" init "$WORK/pg"
bg reg postgres "$PG" serve "$WORK/pg" 5432
DB=$(on reg "$PG" url "$WORK/pg" 5432)

ONE=203.0.113.1:7946
TWO=203.0.113.2:7946
# instance LABEL IP: pilot-registry LABEL on IP:7946 with its own state
# dir, on the shared database; the key is instance one's (copied).
instance() {
  local label=$1 ip=$2
  mkdir -p "$WORK/$label"
  if [ "$label" != one ] && [ ! -e "$WORK/$label/registry.key" ]; then
    install -m 600 "$WORK/one/registry.key" "$WORK/$label/registry.key"
  fi
  rm -f "$WORK/$label/join-url"
  bg reg "$label" "$BIN/pilot-registry" --listen "$ip:7946" --state-dir "$WORK/$label" --database "$DB"
  wait_for 10 "instance $label's join URL" test -s "$WORK/$label/join-url"
  wait_for 10 "instance $label listens for the other's events" \
    grep -q "listening for the other instances' events" "$WORK/$label.log"
}

# Instance one makes the key; it is down while beta and dave join, so they
# end up on instance two whatever endpoint they try first.
instance one 203.0.113.1
stop_bg one
instance two 203.0.113.2
KEY=$(sed -n 's|^pilot://\([0-9a-f]*\)@.*|\1|p' "$WORK/one/join-url")
[ -n "$KEY" ] || fail "no key in instance one's join URL: $(cat "$WORK/one/join-url")"
[ "$(cat "$WORK/two/join-url")" = "pilot://$KEY@$TWO" ] || fail "instance two has another key: $(cat "$WORK/two/join-url")"
BOTH="pilot://$KEY@$ONE,$TWO"
node_up b beta --registry "$BOTH"
node_up d dave --registry "$BOTH"
status_is b beta registry.endpoint "$TWO" || fail "beta is not on instance two"
status_is d dave registry.endpoint "$TWO" || fail "dave is not on instance two"
instance one 203.0.113.1
node_up a alpha --registry "pilot://$KEY@$ONE"
node_up c carol --registry "pilot://$KEY@$ONE"
A=$(addr_of a alpha); B=$(addr_of b beta); C=$(addr_of c carol); D=$(addr_of d dave)
log "alpha=$A carol=$C on instance one; beta=$B dave=$D on instance two"

# --- 1. across instances ------------------------------------------------------
trust_pair a alpha b beta
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed"
on b ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "beta -> alpha ping failed"
pass "a trust request from instance one's node reached instance two's node at once; ping both ways"

trust_pair c carol d dave
wait_for 10 "carol reaches dave" ping_until c "$D" 2
wait_for 10 "carol's path to dave is the relay" peer_is c carol dave path relay
transfer_ok c d "$D" 2000000 relayed-across
pass "carol (instance one) and dave (instance two), both behind per-destination NATs: relayed through both instances, 2 MB identical"

# --- 2. kill -9 instance two ----------------------------------------------------
bg a ping-ab ping -i 0.1 -c 100 -W 1 "$B"
sleep 1
log "SIGKILL to instance two (pid $(bg_pid two))"
t0=$(now_ms)
stop_bg two KILL
wait_for 20 "beta moves to instance one" status_is b beta registry.endpoint "$ONE"
moved_b=$(( $(now_ms) - t0 ))
wait_for 20 "dave moves to instance one" status_is d dave registry.endpoint "$ONE"
moved_d=$(( $(now_ms) - t0 ))
log "beta moved after ${moved_b} ms, dave after ${moved_d} ms"
wait_bg_exit 20 ping-ab
got=$(sed -n 's/.* \([0-9]*\) received.*/\1/p' "$WORK/ping-ab.log")
[ -n "$got" ] && [ "$got" -ge 95 ] || fail "alpha's pings to beta across the failover: ${got:-none} of 100 answered ($(tail -n2 "$WORK/ping-ab.log"))"
[ "$(addr_of b beta)" = "$B" ] && [ "$(addr_of d dave)" = "$D" ] || fail "an address changed in the failover"
wait_for 15 "carol reaches dave again" ping_until c "$D" 2
transfer_ok c d "$D" 2000000 relayed-after
pass "instance two killed: beta moved in ${moved_b} ms, dave in ${moved_d} ms; alpha -> beta $got/100 pings across it; carol <-> dave relayed again, 2 MB identical"

# --- 3. after the failover -----------------------------------------------------
trust_pair a alpha d dave
wait_for 10 "alpha reaches dave" ping_until a "$D" 2
on d ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "dave -> alpha ping failed"
node_up e erin --registry "pilot://$KEY@$TWO,$ONE"
status_is e erin registry.endpoint "$ONE" || fail "erin is not on the surviving instance"
E=$(addr_of e erin)
trust_pair e erin a alpha
on e ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "erin -> alpha ping failed"
pass "after the failover: alpha and dave (once on different instances) trust each other and ping; erin ($E) joined through the survivor"

stop_bg one
stop_bg postgres INT
