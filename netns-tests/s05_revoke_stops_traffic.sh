#!/usr/bin/env bash
# s05 — `trust revoke` stops traffic at once, in both directions.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +-----------+        +-----------+  ping -i0.1  +-----------+
#   |    reg    |        |     a     | -----------> |     b     |
#   | registry  |        |   alpha   | <----------- |   beta    |
#   |    .1     |        |    .11    |  ping -i0.1  |    .12    |
#   +-----+-----+        +-----+-----+              +-----+-----+
#   ======+====================+==========================+======  br0
#
# alpha and beta trust each other and ping each other ten times a second,
# each reply timestamped (ping -D). alpha runs `trust revoke beta`. Measured
# from the moment that command returns: no reply in either direction more
# than 1 s later (while both pings keep sending), beta's trust list shows
# alpha as revoked-by-peer within 2 s, and a new TCP connection from beta to
# alpha (which beta could open before) is refused fast.
SCENARIO=s05_revoke_stops_traffic
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc python3 ss timeout; do need "$t"; done

lab_two_hosts
trust_pair a alpha b beta

# alpha serves TCP; beta can connect before the revoke (control for the end).
mkdir -p "$WORK/www"   # an empty directory to serve (not the state dirs)
bg a http python3 -m http.server 8080 --bind "$A" --directory "$WORK/www"
wait_listen 5 a 8080
wait_for 5 "beta connects to alpha:8080 before the revoke" onq b nc -z -w 2 "$A" 8080

# --- continuous pings both ways -------------------------------------------------
bg a ping-ab ping -D -n -i0.1 -c150 -W1 "$B"
bg b ping-ba ping -D -n -i0.1 -c150 -W1 "$A"
replies_at_least() { [ "$(grep -c "bytes from" "$WORK/$1.log")" -ge "$2" ]; }   # LABEL N
wait_for 5 "10 replies alpha -> beta" replies_at_least ping-ab 10
wait_for 5 "10 replies beta -> alpha" replies_at_least ping-ba 10

# --- revoke -------------------------------------------------------------------------
T_CALL=$(date +%s.%N)
pt a alpha trust revoke beta >&2
T_REV=$(date +%s.%N)
log "revoke returned after $(python3 -c "print(round(($T_REV-$T_CALL)*1000))") ms"

# beta learns it was revoked (pushed through the registry).
wait_for 2 "beta's trust list shows alpha as revoked-by-peer" \
  peer_is b beta alpha state revoked-by-peer trust list
log "beta saw revoked-by-peer $(python3 -c "import time; print(round((time.time()-$T_REV)*1000))") ms after the revoke"
peer_is a alpha beta state revoked trust list \
  || fail "alpha's trust list does not show beta as revoked"

# An observation window: the pings keep running until at least T_REV + 3 s.
# (A test of time passing: the sleep is the point.)
sleep "$(python3 -c "import time; print(max(0.0, $T_REV + 3 - time.time()))")"
for f in ping-ab ping-ba; do
  bg_running "$f" || fail "$f stopped before the end of the observation window"
done

python3 - "$T_CALL" "$T_REV" "$WORK/ping-ab.log" "$WORK/ping-ba.log" <<'PY' || fail "traffic did not stop within 1 s of the revoke (see above)"
import re, sys
t_call, t_rev = float(sys.argv[1]), float(sys.argv[2])
bad = False
for path, what in ((sys.argv[3], "alpha -> beta"), (sys.argv[4], "beta -> alpha")):
    replies, sent_after = [], 0
    for line in open(path):
        m = re.match(r"\[(\d+\.\d+)\] (.*)", line)
        if not m:
            continue
        ts, rest = float(m.group(1)), m.group(2)
        if "bytes from" in rest:
            replies.append(ts)
        elif ts > t_rev:
            sent_after += 1          # errors / no-answer lines after the revoke
    before = [t for t in replies if t_call - 1.0 <= t <= t_call]
    late = [t for t in replies if t > t_rev + 1.0]
    last = max(replies) if replies else float("nan")
    print(f"  {what}: {len(replies)} replies, {len(before)} in the last second before the revoke, "
          f"last reply {1000 * (last - t_rev):+.0f} ms from the revoke, {len(late)} later than +1 s, "
          f"{sent_after} error lines after it", file=sys.stderr)
    if len(before) < 3:
        print(f"  problem: {what}: traffic was not flowing right before the revoke", file=sys.stderr); bad = True
    if late:
        print(f"  problem: {what}: {len(late)} replies more than 1 s after the revoke", file=sys.stderr); bad = True
sys.exit(1 if bad else 0)
PY
pass "traffic stopped both ways within 1 s of the revoke"

stop_bg ping-ab; stop_bg ping-ba

# A fresh TCP connection from beta to alpha is refused fast (and the other way).
tcp_blocked_fast b "$A" 8080
tcp_blocked_fast a "$B" 8080
peer_is a alpha beta session false || fail "alpha still has a session with beta after the revoke"
peer_is b beta alpha session false || fail "beta still has a session with alpha after the revoke"
pass "after the revoke: TCP refused fast both ways, no session on either side"
