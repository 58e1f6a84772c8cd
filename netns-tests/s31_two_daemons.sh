#!/usr/bin/env bash
# s31 — two daemons in one namespace, on two networks from two registries.
#
#                  192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +-------------+   +-------------+   +-------------------------+   +--------+   +--------+
#   |    reg      |   |    reg2     |   |            h            |   |   p1   |   |   p2   |
#   | registry 1  |   | registry 2  |   | home1: pilot0, net 1    |   | peer1  |   | peer2  |
#   | 10.77/16    |   | 10.78/16    |   | home2: pilot1, net 2    |   | net 1  |   | net 2  |
#   |  .1         |   |  .2         |   |  .10                    |   |  .11   |   |  .12   |
#   +------+------+   +------+------+   +-----------+-------------+   +---+----+   +---+----+
#   =======+=================+======================+=====================+============+====
#
# Namespace h runs two daemons (different --dev, --state-dir, --metrics
# port, networks and registries). Checks:
#  - each has its own address, /16 route and IPv6 /48 on its own device, its
#    own DNS server (on its own overlay address) and its own metrics port;
#  - each reaches its own peer (ping, TCP, ping -6) at the same time;
#  - a third daemon in h on network 1 is refused with a clear error, and
#    home1 keeps working;
#  - `down` of home1 removes pilot0 and its routes only: home2's routes,
#    DNS, metrics and traffic keep working.
# Output is matched with `grep -q PAT <<<"$(cmd)"`, not `cmd | grep -q PAT`:
# under pipefail, grep quitting at its first match can fail the pipeline
# with the writer's SIGPIPE.
SCENARIO=s31_two_daemons
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc python3 ss timeout curl dig; do need "$t"; done

switch sw
mkns reg; mkns reg2; mkns h; mkns p1; mkns p2
plug reg sw 192.0.2.1/24
plug reg2 sw 192.0.2.2/24
plug h sw 192.0.2.10/24
plug p1 sw 192.0.2.11/24
plug p2 sw 192.0.2.12/24

start_registry reg 192.0.2.1
JOIN1=$JOIN
# The second registry: its own state and key, another address range.
mkdir -p "$WORK/registry2"
bg reg2 registry2 "$BIN/pilot-registry" --listen 192.0.2.2:7946 --state-dir "$WORK/registry2" --network 10.78.0.0/16
wait_for 10 "registry 2 join URL" test -s "$WORK/registry2/join-url"
JOIN2=$(cat "$WORK/registry2/join-url")
[ "$JOIN1" != "$JOIN2" ] || fail "the two registries have the same join URL"

node_up h home1 --registry "$JOIN1" --dev pilot0 --metrics 127.0.0.1:9464
node_up h home2 --registry "$JOIN2" --dev pilot1 --metrics 127.0.0.1:9465
node_up p1 peer1 --registry "$JOIN1"
node_up p2 peer2 --registry "$JOIN2"
H1=$(addr_of h home1); H2=$(addr_of h home2); P1=$(addr_of p1 peer1); P2=$(addr_of p2 peer2)
log "home1=$H1 home2=$H2 peer1=$P1 peer2=$P2"
case "$H1/$H2" in 10.77.*/10.78.*) ;; *) fail "home1 $H1 / home2 $H2 are not on networks 1 and 2" ;; esac

# --- each daemon has its own of everything ---------------------------------------------
on h ip -4 route show >&2
grep -q "^10.77.0.0/16" <<<"$(on h ip -4 route show dev pilot0)" || fail "no 10.77.0.0/16 route on pilot0"
grep -q "^10.78.0.0/16" <<<"$(on h ip -4 route show dev pilot1)" || fail "no 10.78.0.0/16 route on pilot1"
N61=$(status_of h home1 network6); N62=$(status_of h home2 network6)
[ "$N61" != "$N62" ] || fail "both networks derived the same IPv6 prefix $N61"
grep -q "^${N61%::/48}::/48" <<<"$(on h ip -6 route show dev pilot0)" || fail "no $N61 route on pilot0"
grep -q "^${N62%::/48}::/48" <<<"$(on h ip -6 route show dev pilot1)" || fail "no $N62 route on pilot1"
[ "$(status_of h home1 dns.address)" = "$H1:53" ] || fail "home1's DNS is at $(status_of h home1 dns.address)"
[ "$(status_of h home2 dns.address)" = "$H2:53" ] || fail "home2's DNS is at $(status_of h home2 dns.address)"
[ "$(status_of h home1 dns.interface)" = pilot0 ] && [ "$(status_of h home2 dns.interface)" = pilot1 ] \
  || fail "the DNS servers are not on their own interfaces"
for port in 9464 9465; do
  grep -q "^pilot_" <<<"$(onq h curl -sf --max-time 3 "http://127.0.0.1:$port/metrics")" \
    || fail "no metrics on 127.0.0.1:$port"
done
pass "two daemons in h: routes 10.77/16 on pilot0 and 10.78/16 on pilot1, /48s $N61 and $N62, DNS at $H1:53 and $H2:53, metrics on 9464 and 9465"

# --- each reaches its own peer -------------------------------------------------------------
trust_pair h home1 p1 peer1
trust_pair h home2 p2 peer2
wait_for 10 "home1 reaches peer1" ping_until h "$P1" 1
wait_for 10 "home2 reaches peer2" ping_until h "$P2" 1
on h ping -c 3 -i 0.2 -W 2 "$P1" >&2 || fail "ping $P1 (network 1) from h failed"
on h ping -c 3 -i 0.2 -W 2 "$P2" >&2 || fail "ping $P2 (network 2) from h failed"
P16=$(status_of p1 peer1 address6); P26=$(status_of p2 peer2 address6)
on h ping -6 -c 2 -i 0.2 -W 2 "$P16" >&2 || fail "ping -6 $P16 (network 1) from h failed"
on h ping -6 -c 2 -i 0.2 -W 2 "$P26" >&2 || fail "ping -6 $P26 (network 2) from h failed"
mkdir -p "$WORK/www"; echo "peer2 here" >"$WORK/www/index.html"
bg p2 http python3 -m http.server 8080 --bind "$P2" --directory "$WORK/www"
wait_listen 5 p2 8080 "$P2"
body=$(on h curl -sf --max-time 5 "http://$P2:8080/") || fail "curl http://$P2:8080/ from h failed"
[ "$body" = "peer2 here" ] || fail "curl from h got '$body'"
[ "$(on h dig +short +time=2 +tries=1 peer1.pilot @"$H1")" = "$P1" ] || fail "home1's DNS does not answer peer1.pilot"
[ "$(on h dig +short +time=2 +tries=1 peer2.pilot @"$H2")" = "$P2" ] || fail "home2's DNS does not answer peer2.pilot"
pass "h reaches peer1 over pilot0 and peer2 over pilot1 (ping, ping -6, TCP); each DNS server names its own peer"

# --- a second daemon on network 1 in the same namespace is refused ---------------------------
mkdir -p "$WORK/home3"
rc=0
on h "$BIN/pilot-tun" --state-dir "$WORK/home3" up --name home3 --registry "$JOIN1" --dev pilot2 \
  >"$WORK/home3.up" 2>&1 || rc=$?
cat "$WORK/home3.up" >&2
[ "$rc" -ne 0 ] || fail "a second daemon on network 1 in h started"
grep -q "pilot0 already routes 10.77.0.0/16" "$WORK/home3.up" || fail "the refusal does not say which device routes the network: $(cat "$WORK/home3.up")"
onq h ip link show pilot2 >/dev/null 2>&1 && fail "the refused daemon left pilot2 behind"
on h ping -c 2 -i 0.2 -W 2 "$P1" >&2 || fail "home1 lost peer1 after the refused start"
pass "a third daemon on network 1 is refused (exit $rc, names pilot0), home1 keeps working"

# --- down of one leaves the other alone ---------------------------------------------------------
node_down h home1
onq h ip link show pilot0 >/dev/null 2>&1 && fail "pilot0 still exists after home1's down"
grep -q "^10.77.0.0/16" <<<"$(onq h ip -4 route show)" && fail "the 10.77.0.0/16 route is still there after home1's down"
grep -q "^10.78.0.0/16" <<<"$(on h ip -4 route show dev pilot1)" || fail "home1's down removed home2's route"
grep -q "^${N62%::/48}::/48" <<<"$(on h ip -6 route show dev pilot1)" || fail "home1's down removed home2's /48"
on h ping -c 3 -i 0.2 -W 2 "$P2" >&2 || fail "home2 lost peer2 after home1's down"
on h ping -6 -c 2 -i 0.2 -W 2 "$P26" >&2 || fail "home2 lost IPv6 to peer2 after home1's down"
body=$(on h curl -sf --max-time 5 "http://$P2:8080/") || fail "TCP to peer2 failed after home1's down"
[ "$(on h dig +short +time=2 +tries=1 peer2.pilot @"$H2")" = "$P2" ] || fail "home2's DNS stopped answering after home1's down"
grep -q "^pilot_" <<<"$(onq h curl -sf --max-time 3 "http://127.0.0.1:9465/metrics")" || fail "home2's metrics stopped after home1's down"
[ "$(status_of h home2 registry.reachable)" = true ] || fail "home2 lost its registry after home1's down"
pass "down of home1: pilot0 and 10.77/16 gone; home2's routes, traffic (ping, ping -6, TCP), DNS and metrics unchanged"
