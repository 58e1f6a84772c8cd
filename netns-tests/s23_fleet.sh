#!/usr/bin/env bash
# s23 — fleet trust: an owner key, certificates, policy rules, expiry and an
# owner revocation, with real kernel TCP.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +--------+   +---------+   +---------+   +---------+   +---------+
#   |  reg   |   |    a    |   |    b    |   |    c    |   |    e    |
#   |registry|   |  build  |   |  cache  |   |  gamma  |   | build2  |
#   |  .1    |   |   .11   |   |   .12   |   |   .13   |   |   .15   |
#   +---+----+   +----+----+   +----+----+   +----+----+   +----+----+
#   ====+=============+=============+=============+=============+=====  br0
#
# An owner certifies build and build2 with tag "build" (build2's certificate
# lasts 60 s) and cache with tag "cache"; gamma joins with no certificate.
# cache's rule admits "build" to tcp/8080; build's rules admit "cache" to
# icmp. With no trust command typed:
# - curl build -> cache:8080 works, a connect to cache:22 fails within 1 s;
# - gamma gets nothing (its connect to cache:8080 fails fast);
# - build2's traffic stops when its certificate expires;
# - `identity rotate` on build keeps its address and its curl working, with
#   no action on cache's side;
# - `owner revoke` of build's first id, handed to gamma's daemon, stops the
#   rotated build's curl within 5 s, and cache refuses to approve build by
#   hand afterwards;
# - the audit logs verify.
SCENARIO=s23_fleet
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip nc curl python3 ss timeout; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b; mkns c; mkns e
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug c sw 192.0.2.13/24
plug e sw 192.0.2.15/24
start_registry reg 192.0.2.1
node_up a build --registry "$JOIN"
node_up b cache --registry "$JOIN"
node_up c gamma --registry "$JOIN"
node_up e build2 --registry "$JOIN"
B=$(addr_of b cache)
ID_A=$(status_of a build node_id); ID_B=$(status_of b cache node_id); ID_E=$(status_of e build2 node_id)

# --- the owner and the certificates (no daemon needed) ----------------------
OWNER=$(ptq a build --json owner new --out "$WORK/owner.key" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"])')
if ptq a build owner new --out "$WORK/owner.key" 2>/dev/null; then fail "owner new overwrote a key"; fi
SIGNED=$(ptq a build --json owner sign --key "$WORK/owner.key" --node "$ID_A" --tags build --out "$WORK/build.cert" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"])')
[ "$SIGNED" = "$OWNER" ] || fail "owner sign names owner $SIGNED, not $OWNER"
pt a build owner sign --key "$WORK/owner.key" --node "$ID_B" --tags cache --out "$WORK/cache.cert" >&2
pt a build owner sign --key "$WORK/owner.key" --node "$ID_E" --tags build --expires 60s --out "$WORK/build2.cert" >&2
[ "$(stat -c %a "$WORK/owner.key")" = 600 ] || fail "owner.key is not mode 0600"
pt a build cert install "$WORK/build.cert" >&2
pt b cache cert install "$WORK/cache.cert" >&2
pt e build2 cert install "$WORK/build2.cert" >&2
if ptq c gamma cert install "$WORK/cache.cert" 2>/dev/null; then fail "gamma installed cache's certificate"; fi

mkdir -p "$WORK/www"; echo "cache says hello" > "$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
bg b ssh-like python3 -m http.server 22 --bind "$B" --directory "$WORK/www"
wait_listen 5 b 8080; wait_listen 5 b 22

# --- rules: trust with nothing typed -------------------------------------------------
pt b cache policy allow --owner "$OWNER" --tag build --ports tcp/8080 >&2
pt a build policy allow --owner "$OWNER" --tag cache --ports icmp >&2
pt e build2 policy allow --owner "$OWNER" --tag cache --ports icmp >&2
wait_for 40 "build and cache trust each other by their rules" \
  peer_is a build cache state trusted trust list
wait_for 10 "cache trusts build" peer_is b cache build state trusted trust list
wait_for 40 "cache and build2 trust each other" peer_is e build2 cache state trusted trust list

body=$(on a curl -sS --max-time 5 "http://$B:8080/index.html")
[ "$body" = "cache says hello" ] || fail "curl build -> cache:8080 got '$body'"
tcp_blocked_fast a "$B" 22
[ "$ELAPSED_MS" -lt 1000 ] || fail "the refused connect took ${ELAPSED_MS} ms (must be under 1 s)"
out=$(ptq b cache --json explain build tcp/8080)
python3 -c 'import json,sys; e=json.loads(sys.argv[1]); assert e["inbound"]["decided_by"]=="rule 1", e' "$out" \
  || fail "explain does not name the rule: $out"
pass "rules admit build -> cache tcp/8080 only, with nothing typed"

tcp_blocked_fast c "$B" 8080
peer_is b cache gamma state trusted trust list 2>/dev/null && fail "cache trusts the uncertified gamma"
pass "the uncertified node gets nothing"

# --- build2's certificate expires -------------------------------------------------------
on e curl -sS --max-time 5 -o /dev/null "http://$B:8080/index.html" || fail "build2's curl before its expiry failed"
build2_stopped() { ! onq e curl -s --max-time 1 -o /dev/null "http://$B:8080/index.html"; }
wait_for 80 "build2's traffic stops when its certificate expires" build2_stopped
pass "an expired certificate stops traffic"

# --- an identity rotation: curl keeps working, the address stays -----------------------
A_ADDR=$(addr_of a build)
PID_A=$(status_of a build pid)
pt a build identity rotate >&2
T0=$(now_ms)
rotated() { local id; id=$(status_of a build node_id 2>/dev/null) && [ -n "$id" ] && [ "$id" != "$ID_A" ]; }
wait_for 10 "build runs under its new identity" rotated
ID_A2=$(status_of a build node_id)
[ "$(addr_of a build)" = "$A_ADDR" ] || fail "build's address changed in the rotation"
[ "$(status_of a build pid)" = "$PID_A" ] || fail "the daemon's pid changed (it must restart in place)"
curl_ok() { onq a curl -s --max-time 1 -o /dev/null "http://$B:8080/index.html"; }
wait_for 10 "build's curl works after the rotation" curl_ok
log "build's curl worked $(( $(now_ms) - T0 )) ms after the rotation"
wait_for 5 "cache trusts build's new id" peer_is b cache "$ID_A2" state trusted trust list
peer_is b cache "$ID_A" state trusted trust list 2>/dev/null && fail "cache still lists build's retired id"
tcp_blocked_fast a "$B" 22
pass "an identity rotation keeps curl working and the address, with the rule's scope"

# --- an owner revocation, handed to any daemon ------------------------------------------
# It names build's first id: a revocation covers every successor of the id.
on a curl -sS --max-time 5 -o /dev/null "http://$B:8080/index.html" || fail "build's curl before the revocation failed"
pt c gamma owner revoke --key "$WORK/owner.key" --node "$ID_A" >&2
T0=$(now_ms)
build_stopped() { ! onq a curl -s --max-time 1 -o /dev/null "http://$B:8080/index.html"; }
wait_for 5 "build's traffic stops after the revocation" build_stopped
log "build's curl failed $(( $(now_ms) - T0 )) ms after the revocation"
if ptq b cache trust approve build 2>/dev/null; then fail "cache approved the revoked build by hand"; fi
pass "an owner revocation stops traffic within 5 s and sticks"

# --- audit --------------------------------------------------------------------------------
for n in build cache; do
  pt a "$n" audit verify >&2 || fail "$n's audit log does not verify"
done
grep -q '"owner-revocation"' "$WORK/cache/audit.jsonl" || fail "cache's audit log lacks the revocation"
grep -q '"policy-rule-added"' "$WORK/cache/audit.jsonl" || fail "cache's audit log lacks the rule"
pass "audit logs verify and record the fleet changes"
