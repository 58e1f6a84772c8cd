#!/usr/bin/env bash
# s18 — scoped and expiring grants on manual trust, with real kernel TCP.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +-----------+        +-----------+              +-----------+
#   |    reg    |        |     a     |  curl :8080  |     b     |
#   | registry  |        |   build   | -----------> |   cache   |
#   |    .1     |        |    .11    |  (not :22)   |    .12    |
#   +-----+-----+        +-----+-----+              +-----+-----+
#   ======+====================+==========================+======  br0
#
# build asks cache for trust wanting tcp/8080 and lets cache only ping it;
# cache approves build for tcp/8080 only. Then, with no further command:
# - curl build -> cache:8080 works; a connect to cache:22 (a listener is
#   there) fails within 1 s, refused by build itself;
# - cache may ping build, build may not ping cache; cache's TCP to build's
#   listener fails fast;
# - `explain` and `peers` say so; `status` counts the refusals;
# - cache re-approves with `--expires 4s`: curl works, then fails fast once
#   the grant ends, while the registry is down (expiry needs no registry);
# - both audit logs verify, record the grants and the refused tcp/22, and
#   `audit verify` names the line after one byte of it is changed.
SCENARIO=s18_scoped_grants
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc curl python3 ss timeout; do need "$t"; done

lab_two_hosts
A_ID=$(status_of a alpha node_id)

# cache serves 8080 and has a listener on 22; build has one on 9000.
mkdir -p "$WORK/www"
echo "cache says hello" > "$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
bg b ssh-like python3 -m http.server 22 --bind "$B" --directory "$WORK/www"
bg a build-srv python3 -m http.server 9000 --bind "$A" --directory "$WORK/www"
wait_listen 5 b 8080
wait_listen 5 b 22
wait_listen 5 a 9000

# --- scoped trust ---------------------------------------------------------------
pt a alpha trust request beta --note "build needs the cache" --want tcp/8080 --allow icmp >&2
wait_for 5 "cache sees the request" has_peer b beta alpha trust pending
peer_is b beta alpha want tcp/8080 trust pending || fail "trust pending does not show what build wants"
pt b beta trust approve alpha --allow tcp/8080 >&2
wait_for 5 "build trusts cache" peer_is a alpha beta state trusted trust list
wait_for 5 "build learns cache's grant" python3 -c '
import json, subprocess, sys
peers = json.loads(subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout)
sys.exit(0 if peers[0]["granted_us"]["scope"] == "tcp/8080" else 1)' \
  ip netns exec "$PFX-a" "$BIN/pilot-tun" --state-dir "$WORK/alpha" --json peers

body=$(on a curl -sS --max-time 5 "http://$B:8080/index.html")
[ "$body" = "cache says hello" ] || fail "curl build -> cache:8080 got '$body'"
pass "curl build -> cache:8080 works with the scoped grant"

tcp_blocked_fast a "$B" 22
[ "$ELAPSED_MS" -lt 1000 ] || fail "the refused connect took ${ELAPSED_MS} ms (must be under 1 s)"
tcp_blocked_fast b "$A" 9000
on b ping -c 2 -W 2 "$A" >/dev/null || fail "cache cannot ping build although build allows icmp"
if on a ping -c 2 -W 1 "$B" >/dev/null 2>&1; then fail "build pinged cache although cache grants only tcp/8080"; fi
pass "outside the grants: TCP refused in under 1 s both ways, ping only where granted"

out=$(ptq a alpha --json explain beta tcp/22)
python3 -c '
import json, sys
e = json.loads(sys.argv[1])
assert e["outbound"]["passes"] is False and e["outbound"]["decided_by"] == "not granted", e
assert e["inbound"]["passes"] is False and e["inbound"]["scope"] == "icmp", e' "$out" \
  || fail "explain beta tcp/22 on build: $out"
out=$(ptq b beta --json explain alpha tcp/8080)
python3 -c '
import json, sys
e = json.loads(sys.argv[1])
assert e["inbound"]["passes"] is True and e["inbound"]["decided_by"] == "manual grant", e' "$out" \
  || fail "explain alpha tcp/8080 on cache: $out"
drops=$(status_of a alpha drops)
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["policy_out"] >= 1 else 1)' "$drops" \
  || fail "build's status does not count refused packets: $drops"
pass "explain and status say what decided"

# --- an expiring grant, enforced with the registry down ------------------------------
pt b beta trust approve alpha --allow tcp/8080 --expires 4s >&2
wait_for 5 "build learns the expiry" python3 -c '
import json, subprocess, sys
peers = json.loads(subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout)
sys.exit(0 if peers[0]["granted_us"]["expires_at"] else 1)' \
  ip netns exec "$PFX-a" "$BIN/pilot-tun" --state-dir "$WORK/alpha" --json peers
on a curl -sS --max-time 5 -o /dev/null "http://$B:8080/index.html" || fail "curl before the expiry failed"
stop_registry
expired() { ! onq a curl -s --max-time 1 -o /dev/null "http://$B:8080/index.html"; }
wait_for 8 "the expired grant stops curl" expired
tcp_blocked_fast a "$B" 8080
pass "an expired grant stops traffic, with the registry down"

# --- audit ---------------------------------------------------------------------------
node_down a alpha
node_down b beta
for n in alpha beta; do
  pt a "$n" audit verify >&2 || fail "$n's audit log does not verify"
done
python3 - "$WORK/alpha/audit.jsonl" "$WORK/beta/audit.jsonl" "$A_ID" <<'PY' || fail "the audit logs lack the grants or the refusals"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
kinds = lambda es, k: [e for e in es if e.get("kind") == k]
assert any(e["details"]["traffic"] == "tcp/22" and e["details"]["direction"] == "out"
           for e in kinds(a, "policy-deny")), "build's log lacks the refused tcp/22"
assert any(e["details"]["peer"] == sys.argv[3] and e["details"]["inbound"] == "tcp/8080"
           for e in kinds(b, "grant")), "cache's log lacks the grant"
PY
python3 - "$WORK/alpha/audit.jsonl" <<'PY'
import sys
p = sys.argv[1]
data = bytearray(open(p, "rb").read())
at = data.index(b'"tcp/22"') + 5
data[at] = ord("3")          # tcp/22 -> tcp/32 in one entry
open(p, "wb").write(data)
PY
rc=0; ptq a alpha audit verify >"$WORK/verify.out" 2>&1 || rc=$?
[ "$rc" -eq 1 ] || fail "audit verify after a changed byte exited $rc, not 1: $(cat "$WORK/verify.out")"
grep -q "line" "$WORK/verify.out" || fail "audit verify did not name the bad line: $(cat "$WORK/verify.out")"
pass "audit logs verify and record grants and refusals; one changed byte is caught"
