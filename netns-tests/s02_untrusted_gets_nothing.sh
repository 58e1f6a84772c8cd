#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s02 — joined is not trusted: an untrusted node gets nothing.
#
#                    192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+     +---------+     +---------+     +---------+
#   |   reg   |     |    a    |     |    b    |     |    c    |
#   |registry |     |  alpha  |<===>|  beta   |     | charlie |
#   |   .1    |     |   .11   |trust|   .12   |     |   .13   |
#   +----+----+     +----+----+     +----+----+     +----+----+
#   =====+===============+===============+===============+=====  br0
#
# alpha and beta approved each other. charlie joined the same registry and
# asks alpha for trust, which alpha never approves. charlie must get nothing
# from alpha: no TCP (refused fast), no ping, no endpoint from the registry,
# and no answer at all to a real Noise initiation made with charlie's own
# identity (or to broken ones) sent straight to alpha's UDP port — while
# alpha counts those refusals. alpha <-> beta keeps working throughout.
SCENARIO=s02_untrusted_gets_nothing
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc python3 ss timeout; do need "$t"; done
[ -x "$BIN/forge-handshake" ] || fail "missing $BIN/forge-handshake (cargo build --release)"

switch sw
mkns reg; mkns a; mkns b; mkns c
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug c sw 192.0.2.13/24

start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
node_up c charlie --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta); C=$(addr_of c charlie)
log "alpha=$A beta=$B charlie=$C"

trust_pair a alpha b beta
on a ping -c2 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed after trust"

# charlie asks; alpha sees the request (so charlie is known to alpha) and never answers.
pt c charlie trust request alpha --note "let me in" >&2
wait_for 5 "alpha sees charlie's request in trust pending" has_peer a alpha charlie trust pending
peer_is c charlie alpha state requested trust list \
  || fail "charlie's trust list should show alpha as 'requested'"

# alpha serves TCP on its 10.x address; beta can connect (positive control).
mkdir -p "$WORK/www"   # an empty directory to serve (not the state dirs)
bg a http python3 -m http.server 8080 --bind "$A" --directory "$WORK/www"
wait_listen 5 a 8080
wait_for 5 "beta connects to alpha:8080" onq b nc -z -w 2 "$A" 8080

# --- charlie gets nothing -----------------------------------------------
tcp_blocked_fast c "$A" 8080
if on_to "$WORK/ping-c.txt" c ping -c3 -i0.2 -W1 "$A"; then
  fail "charlie's ping to alpha was answered"
fi
grep -q " 0 received" "$WORK/ping-c.txt" || fail "charlie got ping replies: $(cat "$WORK/ping-c.txt")"
# and the other way: alpha does not deliver to charlie either
if on a ping -c2 -i0.2 -W1 "$C" >/dev/null 2>&1; then fail "alpha -> charlie ping answered"; fi
tcp_blocked_fast a "$C" 8080
pass "charlie: TCP refused, ping unanswered (both directions)"

# The registry tells a node where a peer is only once that peer approved it.
# (Each knows the other from the request: the entries exist, with no endpoint
# and no session.)
ep=$(peer_of c charlie alpha endpoint)
case "$ep" in null|"") ;; *) fail "charlie learned alpha's endpoint ($ep) although alpha never approved it" ;; esac
peer_is a alpha charlie session false || fail "alpha has a session with charlie"

# --- a hostile charlie: forged handshakes straight at alpha's UDP port -----
port=$(status_of a alpha listen); port=${port##*:}
drops_before=$(status_of a alpha drops)
untrusted0=$(status_of a alpha drops.untrusted_handshake)
bad0=$(status_of a alpha drops.bad_handshake)
rc=0
on_to "$WORK/forge.out" c "$BIN/forge-handshake" "$WORK/charlie" "$WORK/alpha" "192.0.2.11:$port" || rc=$?
cat "$WORK/forge.out" >&2
[ "$rc" -eq 0 ] && grep -qx "no answer" "$WORK/forge.out" \
  || fail "alpha answered charlie's forged handshake (exit $rc): $(cat "$WORK/forge.out")"
# The packets did arrive: alpha counted them. (So "no answer" cannot come
# from a wrong address or port.)
counted() {
  [ "$(status_of a alpha drops.untrusted_handshake)" -gt "$untrusted0" ] \
    && [ "$(status_of a alpha drops.bad_handshake)" -gt "$bad0" ]
}
# (polled for up to 10 s: a daemon stalled by a loaded machine is slow, not wrong)
if ! poll 10 counted; then
  fail "alpha did not count charlie's handshakes: drops before $drops_before, after $(status_of a alpha drops)"
fi
log "alpha's drops before: $drops_before"
log "alpha's drops after:  $(status_of a alpha drops)"
pass "forged handshakes from charlie: no answer, counted by alpha"

# Positive control: the same tool with beta's (trusted) identity IS answered,
# so "no answer" above is alpha's refusal, not a tool that cannot hear.
# (Up to 3 tries: the tool listens 2 s only, a loaded machine may be slower.)
rc=0
for try in 1 2 3; do
  rc=0
  on_to "$WORK/forge-beta.out" b "$BIN/forge-handshake" "$WORK/beta" "$WORK/alpha" "192.0.2.11:$port" || rc=$?
  cat "$WORK/forge-beta.out" >&2
  [ "$rc" -eq 1 ] && grep -q "^ANSWERED" "$WORK/forge-beta.out" && break
done
[ "$rc" -eq 1 ] && grep -q "^ANSWERED" "$WORK/forge-beta.out" \
  || fail "control: alpha did not answer a handshake made with trusted beta's identity (exit $rc, 3 tries)"
pass "control: the same initiation from beta's identity is answered"

# --- alpha <-> beta unaffected ---------------------------------------------
# (the control handshake came from another UDP port of beta's host; beta's
# own traffic must win the endpoint back)
wait_for 5 "beta -> alpha ping" onq b ping -c1 -W1 "$A"
wait_for 5 "alpha -> beta ping" onq a ping -c1 -W1 "$B"
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed after charlie's attempts"
on b ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "beta -> alpha ping failed after charlie's attempts"
peer_is a alpha charlie state pending trust list \
  || fail "alpha's trust list changed for charlie: $(peer_of a alpha charlie "" trust list)"
pass "alpha <-> beta still fine; charlie still only pending at alpha"
