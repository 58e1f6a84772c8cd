#!/usr/bin/env bash
# s26 — names: <name>.pilot for ordinary programs on the host, and only there.
#
#                  192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +---------+   +---------+   +---------+   +----------+   +---------+   +---------+
#   |   reg   |   |    a    |   |    b    |   |    c     |   |    d    |   |    e    |
#   |registry |   |  alpha  |   |  cache  |   | stranger |   | "Cache" |   |(no name)|
#   |  .1     |   |  .11    |   |  .12    |   |  .13     |   |  .14    |   |  .15    |
#   +----+----+   +----+----+   +----+----+   +----+-----+   +----+----+   +----+----+
#   =====+=============+=============+=============+==============+=============+=====
#
# alpha's namespace gets /etc/netns/<ns>/resolv.conf naming alpha's DNS server
# (its overlay address, port 53). alpha and cache trust each other; stranger
# joined and asked alpha for trust (so alpha holds a record of it) but was
# never approved. Checks:
#  - `getent hosts cache.pilot` and `curl http://cache.pilot:8080/` work in a;
#  - `dig -x` of cache's and alpha's own overlay address gives the names;
#  - stranger.pilot does not resolve (NXDOMAIN), example.com is REFUSED;
#  - cache asking alpha's server through the tunnel gets no answer at all,
#    and alpha counts the dropped query (so it did arrive);
#  - after alpha revokes cache, cache.pilot stops resolving;
#  - `--name Cache` becomes "cache", which is taken: the node is "cache-2",
#    and `up` says so; a node started without --name takes the machine's
#    hostname as a label.
SCENARIO=s26_dns
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip nc python3 ss timeout curl dig getent; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b; mkns c; mkns d; mkns e
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug c sw 192.0.2.13/24
plug d sw 192.0.2.14/24
plug e sw 192.0.2.15/24
start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN"
node_up b cache --registry "$JOIN"
node_up c stranger --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b cache); C=$(addr_of c stranger)
log "alpha=$A cache=$B stranger=$C"

# --- where alpha's DNS server is ---------------------------------------------
dns=$(status_of a alpha dns.address)
[ "$dns" = "$A:53" ] || fail "alpha's DNS address is '$dns', expected its overlay address $A:53"
DNS=${dns%:53}
grep -q "$A:53" <<<"$(on a ss -Hlun "sport = :53")" || fail "nothing listens on $A:53 in a"
hint=$(status_of a alpha dns.hint)
case "$hint" in *"nameserver $A"*) ;; *) fail "status's dns hint does not say what to add: $hint" ;; esac
pt a alpha dns print >"$WORK/dns-print.txt"
grep -qx "nameserver $A" "$WORK/dns-print.txt" || fail "dns print has no 'nameserver $A' line: $(cat "$WORK/dns-print.txt")"
pass "alpha serves DNS at $dns; status and dns print say what to add"

netns_resolv a "$DNS"

# --- trust, and a stranger that only asked -----------------------------------
trust_pair a alpha b cache
pt c stranger trust request alpha --note "let me in" >&2
wait_for 5 "alpha sees stranger's request" has_peer a alpha stranger trust pending

# dig_status NS SERVER NAME [TYPE]: the status word of the answer (NOERROR, ...).
dig_status() {
  onq "$1" dig +time=2 +tries=1 @"$2" "$3" "${4:-A}" | sed -n 's/.*status: \([A-Z]*\),.*/\1/p'
}
# resolves_to NAME ADDR: NAME's IPv4 address (A) in a is ADDR. (`getent
# hosts` asks for IPv6 first, and the overlay has AAAA records too.)
resolves_to() { [ "$(onq a getent ahostsv4 "$1" | awk 'NR == 1 {print $1}')" = "$2" ]; }

wait_for 5 "cache.pilot resolves to $B in a" resolves_to cache.pilot "$B"
on a getent hosts cache.pilot >&2
resolves_to alpha.pilot "$A" || fail "alpha.pilot (our own name) does not resolve to $A"
B6=$(status_of b cache address6)
got=$(onq a getent hosts cache.pilot | awk '{print $1}')
[ "$got" = "$B6" ] || fail "getent hosts cache.pilot gave '$got', expected cache's IPv6 overlay address $B6 (AAAA first)"
pass "getent: cache.pilot -> $B (and $B6 for getent hosts, AAAA first), alpha.pilot -> $A"

mkdir -p "$WORK/www"; echo "hello from cache" >"$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
wait_listen 5 b 8080
body=$(on a curl -sf --max-time 5 http://cache.pilot:8080/) || fail "curl http://cache.pilot:8080/ failed"
[ "$body" = "hello from cache" ] || fail "curl http://cache.pilot:8080/ got '$body'"
pass "curl http://cache.pilot:8080/ works by name"

ptr=$(on a dig +short +time=2 +tries=1 -x "$B" @"$DNS")
[ "$ptr" = "cache.pilot." ] || fail "dig -x $B gave '$ptr', expected cache.pilot."
ptr=$(on a dig +short +time=2 +tries=1 -x "$A" @"$DNS")
[ "$ptr" = "alpha.pilot." ] || fail "dig -x $A (our own) gave '$ptr', expected alpha.pilot."
pass "dig -x: $B -> cache.pilot., $A -> alpha.pilot."

# --- what does not resolve -----------------------------------------------------
st=$(dig_status a "$DNS" stranger.pilot)
[ "$st" = NXDOMAIN ] || fail "stranger.pilot (joined, asked, never approved) answered $st, expected NXDOMAIN"
if onq a getent hosts stranger.pilot; then fail "getent hosts stranger.pilot resolved"; fi
st=$(dig_status a "$DNS" nobody.pilot)
[ "$st" = NXDOMAIN ] || fail "nobody.pilot answered $st"
ptr=$(onq a dig +short +time=2 +tries=1 -x "$C" @"$DNS")
[ -z "$ptr" ] || fail "dig -x $C (stranger) gave '$ptr'"
st=$(dig_status a "$DNS" example.com)
[ "$st" = REFUSED ] || fail "example.com answered $st, expected REFUSED (nothing is forwarded)"
pass "stranger.pilot and nobody.pilot: NXDOMAIN; stranger's address has no name; example.com: REFUSED"

# --- a peer asking through the tunnel gets nothing -------------------------------
# Positive control first: cache's own server answers cache's own programs.
st=$(dig_status b "$B" alpha.pilot)
[ "$st" = NOERROR ] || fail "cache's own server answered $st for alpha.pilot, expected NOERROR"
before=$(status_of a alpha dns.dropped_not_local)
rc=0
on b dig +time=2 +tries=1 @"$A" cache.pilot >"$WORK/dig-remote.txt" 2>&1 || rc=$?
grep -q "status:" "$WORK/dig-remote.txt" && fail "cache got an answer from alpha's DNS through the tunnel: $(cat "$WORK/dig-remote.txt")"
[ "$rc" -ne 0 ] || fail "dig from cache to alpha's server succeeded"
on b dig +time=2 +tries=1 -x "$A" @"$A" >"$WORK/dig-remote-ptr.txt" 2>&1 || true
grep -q "status:" "$WORK/dig-remote-ptr.txt" && fail "cache got a reverse answer through the tunnel"
wait_for 5 "alpha counts the dropped queries" \
  eval '[ "$(status_of a alpha dns.dropped_not_local)" -ge $((before + 2)) ]'
pass "queries from cache through the tunnel: no answer (dig exit $rc), dropped and counted by alpha"

# --- a revoked peer stops resolving ------------------------------------------------
pt a alpha trust revoke cache >&2
wait_for 5 "cache.pilot is gone after the revocation" \
  eval '[ "$(dig_status a "$DNS" cache.pilot)" = NXDOMAIN ]'
pass "after trust revoke, cache.pilot: NXDOMAIN"

# --- names: normalized, collisions, the machine's hostname -------------------------
node_up d Cache --registry "$JOIN"
got=$(status_of d Cache hostname)
[ "$got" = cache-2 ] || fail "--name Cache with cache taken became '$got', expected cache-2"
grep -q 'taken on this network: this node is "cache-2"' "$WORK/Cache.up" \
  || fail "up did not report the chosen name: $(cat "$WORK/Cache.up")"
grep -q 'using "cache"' "$WORK/Cache.up" \
  || fail "up did not say --name Cache was made into cache: $(cat "$WORK/Cache.up")"
pass "--name Cache -> cache (taken) -> cache-2, reported by up"

want=$(python3 -c '
import re, socket
h = socket.gethostname().split(".")[0].lower()
h = re.sub("[^a-z0-9-]", "-", h).strip("-")[:63].rstrip("-")
print(h)')
node_up_unnamed e noname --registry "$JOIN"
got=$(status_of e noname hostname)
[ "$got" = "$want" ] || [ "$got" = "$want-2" ] || fail "a node without --name is '$got', expected the machine's hostname '$want'"
pass "no --name: the node is '$got' (machine hostname $(hostname))"
