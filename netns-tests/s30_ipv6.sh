#!/usr/bin/env bash
# s30 — IPv6 in the overlay: every node's /128 in the network's ULA /48.
#
#                  192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +---------+   +---------+   +---------+   +----------+
#   |   reg   |   |    a    |   |    b    |   |    c     |
#   |registry |   |  alpha  |   |  beta   |   | stranger |
#   |  .1     |   |  .11    |   |  .12    |   |  .13     |
#   +----+----+   +----+----+   +----+----+   +----+-----+
#   =====+=============+=============+=============+=====
#
# The underlay is IPv4; the overlay carries IPv4 and IPv6. alpha and beta
# trust each other; stranger joined and was never approved. Checks:
#  - status shows each node's address6 in one /48 (fd...), embedding its
#    10.x address; pilot0 has it, and the /48 is routed into pilot0;
#    `peers` shows the peer's address6;
#  - `ping -6` and `curl -6` (to a python http server bound to beta's
#    address6) work between alpha and beta;
#  - stranger gets nothing over IPv6: its ping -6 to alpha is answered at
#    once with ICMPv6 "administratively prohibited" by its own node, a TCP
#    connect fails fast, and alpha's server never sees a request;
#  - alpha's DNS: `dig AAAA beta.pilot` gives beta's address6 and
#    `dig -x` of it gives beta.pilot.;
#  - with `--mtu 1200` (below IPv6's 1280) the node comes up IPv4-only
#    and says so in its log.
SCENARIO=s30_ipv6
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc python3 ss timeout curl dig; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b; mkns c
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug c sw 192.0.2.13/24
start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
node_up c stranger --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta); C=$(addr_of c stranger)

# --- addresses -------------------------------------------------------------------
wait_for 5 "alpha's status shows address6" status_of a alpha address6
A6=$(status_of a alpha address6); B6=$(status_of b beta address6); C6=$(status_of c stranger address6)
NET6=$(status_of a alpha network6)
log "alpha=$A/$A6 beta=$B/$B6 stranger=$C/$C6 net6=$NET6"
[ "$(status_of b beta network6)" = "$NET6" ] || fail "beta's /48 $(status_of b beta network6) differs from alpha's $NET6"
case "$NET6" in fd*::/48) ;; *) fail "the overlay's IPv6 prefix '$NET6' is not a ULA /48" ;; esac
# embeds NS NAME V4 V6: V6 is in the /48 and its last 32 bits are V4.
embeds() {
  python3 - "$1" "$2" "$NET6" <<'PY'
import ipaddress, sys
v4, v6, net = ipaddress.IPv4Address(sys.argv[1]), ipaddress.IPv6Address(sys.argv[2]), ipaddress.IPv6Network(sys.argv[3])
assert v6 in net, f"{v6} not in {net}"
assert v6.packed[12:] == v4.packed and v6.packed[6:12] == bytes(6), f"{v6} does not embed {v4}"
PY
}
embeds "$A" "$A6" || fail "alpha's $A6 does not embed $A"
embeds "$B" "$B6" || fail "beta's $B6 does not embed $B"
grep -q "inet6 $A6/48" <<<"$(on a ip -6 addr show dev pilot0)" || fail "pilot0 in a does not carry $A6/48"
grep -q "^${NET6%::/48}::/48" <<<"$(on a ip -6 route show dev pilot0)" || fail "the /48 is not routed into pilot0 in a: $(onq a ip -6 route)"
pass "address6: alpha $A6, beta $B6 in $NET6 (embedding their 10.x addresses), on pilot0 with the /48 route"

# --- between trusted nodes ----------------------------------------------------------
trust_pair a alpha b beta
wait_for 5 "alpha's peers show beta's address6" peer_is a alpha beta address6 "$B6"
wait_for 10 "ping -6 alpha -> beta" ping_until a "$B6" 1
on a ping -6 -c 3 -i 0.2 -W 2 "$B6" >&2 || fail "ping -6 $B6 from alpha failed"
on b ping -6 -c 3 -i 0.2 -W 2 "$A6" >&2 || fail "ping -6 $A6 from beta failed"
pass "ping -6 both ways between alpha and beta"

mkdir -p "$WORK/www"; echo "hello over IPv6" >"$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B6" --directory "$WORK/www"
wait_listen 5 b 8080 "[$B6]"
body=$(on a curl -6 -sf --max-time 5 "http://[$B6]:8080/") || fail "curl -6 http://[$B6]:8080/ failed"
[ "$body" = "hello over IPv6" ] || fail "curl -6 got '$body'"
pass "curl -6 http://[$B6]:8080/ from alpha: '$body'"
# A bulk transfer over IPv6: the receiving node hands runs of TCP segments
# to its kernel as IPv6 super-packets (GSO TCPV6); the bytes must match.
xfer_10mb a b "$B6" bulk6
pass "10 MB over TCP/IPv6 alpha -> beta arrived identical (sha256) in ${XFER_MS} ms"

# --- the stranger gets nothing ----------------------------------------------------------
bg a http-a python3 -m http.server 8081 --bind "$A6" --directory "$WORK/www"
wait_listen 5 a 8081 "[$A6]"
before=$(status_of c stranger drops.refused_local)
out=$(onq c ping -6 -c 1 -W 2 "$A6" 2>&1) && fail "stranger's ping -6 to alpha got an answer: $out"
echo "$out" >&2
grep -qi "administratively prohibited" <<<"$out" || fail "stranger's ping -6 was not answered with ICMPv6 administratively prohibited: $out"
[ "$(status_of c stranger drops.refused_local)" -gt "$before" ] || fail "stranger's node did not count the refused packet"
tcp_blocked_fast c "$A6" 8081
out=$(onq a ping -6 -c 1 -W 2 "$C6" 2>&1) && fail "alpha's ping -6 to stranger got an answer"
grep -qi "administratively prohibited" <<<"$out" || fail "alpha's ping -6 to stranger: no ICMPv6 prohibited: $out"
grep -q "GET" "$WORK/http-a.log" && fail "alpha's server saw a request from the stranger: $(cat "$WORK/http-a.log")"
pass "stranger <-> alpha over IPv6: ICMPv6 administratively prohibited at once (ping), TCP refused in ${ELAPSED_MS} ms, nothing reached alpha's server"

# --- DNS: AAAA and ip6.arpa -----------------------------------------------------------------
aaaa=$(on a dig +short +time=2 +tries=1 AAAA beta.pilot @"$A")
[ "$aaaa" = "$B6" ] || fail "dig AAAA beta.pilot gave '$aaaa', expected $B6"
a4=$(on a dig +short +time=2 +tries=1 A beta.pilot @"$A")
[ "$a4" = "$B" ] || fail "dig A beta.pilot gave '$a4', expected $B"
ptr=$(on a dig +short +time=2 +tries=1 -x "$B6" @"$A")
[ "$ptr" = "beta.pilot." ] || fail "dig -x $B6 gave '$ptr', expected beta.pilot."
st=$(onq a dig +time=2 +tries=1 AAAA stranger.pilot @"$A" | sed -n 's/.*status: \([A-Z]*\),.*/\1/p')
[ "$st" = NXDOMAIN ] || fail "dig AAAA stranger.pilot answered $st, expected NXDOMAIN"
pass "dig AAAA beta.pilot -> $B6, dig -x $B6 -> beta.pilot., stranger.pilot NXDOMAIN"

# --- too small an MTU for IPv6 ---------------------------------------------------------------
node_restart c stranger --mtu 1200
[ "$(status_of c stranger mtu)" = 1200 ] || fail "--mtu 1200: status shows mtu $(status_of c stranger mtu)"
if status_of c stranger address6 >/dev/null 2>&1; then fail "with mtu 1200 the status still shows address6"; fi
grep -q "below IPv6's minimum" "$WORK/stranger/pilot-tun.log" || fail "no log line says why IPv6 is off"
grep -q "inet6 fd" <<<"$(onq c ip -6 addr show dev pilot0)" && fail "pilot0 carries an IPv6 overlay address at mtu 1200"
pass "--mtu 1200: IPv4 only, no address6, and the log says why"
