#!/usr/bin/env bash
# `pilot-tun netcheck` from a public host, from behind an easy and a hard
# NAT, next to a running daemon, against a wrong key and a stopped registry.
#
#                         inet (bridge, 203.0.113.0/24)
#   reg .1 (registry, STUN also on :7947)   rly .2 (relay-only)   pub .10
#        nE .21 (easy NAT) -- e lan 192.0.2.0/26 -- hE 192.0.2.10
#        nH .23 (hard NAT) -- h lan 198.51.100.0/26 -- hH 198.51.100.10
#
# 1. pub, no daemon, --registry: UDP works, key ok, pings answered, no NAT,
#    public endpoint on 203.0.113.10, no default gateway; --relay is timed.
# 2. hE, no daemon: endpoint-independent NAT, public endpoint on the NAT's
#    address (the same for both STUN ports); the gateway is asked for
#    NAT-PMP/PCP and nothing answers.
# 3. hH, no daemon: per-destination NAT (two public ports).
# 4. hE with its daemon up: no --registry needed, and the daemon's own view.
# 5. pub with the registry's key altered: UDP works, the key is wrong, exit 1.
# 6. registry stopped: from pub (--registry) and from hE (the URL saved in
#    its state dir, daemon down): UDP not working, exit 5, and it says so.
SCENARIO=${SCENARIO:-s24_netcheck}
source "$(dirname "$0")/lib.sh"
setup_lab
need nft

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns rly; plug rly inet 203.0.113.2/24
mkns pub; plug pub inet 203.0.113.10/24
nat_router nE 203.0.113.21 e 192.0.2.1/26 easy
nat_router nH 203.0.113.23 h 198.51.100.1/26 hard
behind hE e 192.0.2.10/26 192.0.2.1
behind hH h 198.51.100.10/26 198.51.100.1

start_registry reg 203.0.113.1 --relay 203.0.113.2:7946
bg rly relay "$BIN/pilot-registry" --relay-only --listen 203.0.113.2:7946 --state-dir "$WORK/registry"
wait_for 10 "relay-only instance up" grep -q "^relay: 203.0.113.2:7946" "$WORK/relay.log"

# netcheck NS LABEL [ARGS...]: `pilot-tun --json netcheck ARGS` in NS with
# the state dir of node LABEL (made empty if new); the document goes to
# $WORK/nc-LABEL.json and the exit code to NC_RC.
netcheck() {
  local ns=$1 label=$2; shift 2
  mkdir -p "$WORK/$label"
  NC_RC=0
  on "$ns" "$BIN/pilot-tun" --state-dir "$WORK/$label" --json netcheck "$@" \
    >"$WORK/nc-$label.json" || NC_RC=$?
  log "netcheck in $ns: exit $NC_RC"
  cat "$WORK/nc-$label.json" >&2
}
# nc_of LABEL KEY: one field (dotted path) of the last netcheck of LABEL.
nc_of() { python3 -c "$_JSON_FIELD" "" "$2" <"$WORK/nc-$1.json"; }
# nc_is LABEL KEY WANT
nc_is() {
  local got; got=$(nc_of "$1" "$2")
  [ "$got" = "$3" ] || fail "netcheck of $1: $2 is '$got', not '$3'"
}
# all_answered LABEL KEY: every round trip in that list is a number.
all_answered() {
  python3 -c 'import json,sys; v=json.loads(sys.argv[1]); sys.exit(0 if v and all(isinstance(x,(int,float)) for x in v) else 1)' \
    "$(nc_of "$1" "$2")" || fail "netcheck of $1: $2 has unanswered pings: $(nc_of "$1" "$2")"
}

log "---- 1. a public host, no daemon"
netcheck pub p1 --registry "$JOIN" --relay 203.0.113.2:7946
[ "$NC_RC" -eq 0 ] || fail "netcheck from pub exited $NC_RC"
nc_is p1 udp true
nc_is p1 registry_key_ok true
nc_is p1 nat none
nc_is p1 registry 203.0.113.1:7946
[[ $(nc_of p1 public_endpoint) == 203.0.113.10:* ]] || fail "pub's public endpoint: $(nc_of p1 public_endpoint)"
all_answered p1 registry_rtt_ms
nc_is p1 relay.addr 203.0.113.2:7946
all_answered p1 relay.rtt_ms
nc_is p1 port_mapping.gateway null
nc_is p1 daemon null
nc_is p1 problem null
# The text report says the same for people.
on pub "$BIN/pilot-tun" --state-dir "$WORK/p1" netcheck --registry "$JOIN" >"$WORK/p1.txt"
grep -q "UDP: works" "$WORK/p1.txt" || fail "text report: $(cat "$WORK/p1.txt")"
grep -q "NAT: none" "$WORK/p1.txt" || fail "text report: $(cat "$WORK/p1.txt")"

log "---- 2. behind an easy NAT, no daemon"
netcheck hE e1 --registry "$JOIN"
[ "$NC_RC" -eq 0 ] || fail "netcheck from hE exited $NC_RC"
nc_is e1 udp true
nc_is e1 nat endpoint-independent
[[ $(nc_of e1 public_endpoint) == 203.0.113.21:* ]] || fail "hE's public endpoint: $(nc_of e1 public_endpoint)"
nc_is e1 public_endpoint_alt "$(nc_of e1 public_endpoint)"
all_answered e1 registry_rtt_ms
nc_is e1 port_mapping.gateway 192.0.2.1
nc_is e1 port_mapping.nat_pmp false
nc_is e1 port_mapping.pcp false
nc_is e1 relay null

log "---- 3. behind a hard NAT, no daemon"
netcheck hH h1 --registry "$JOIN"
[ "$NC_RC" -eq 0 ] || fail "netcheck from hH exited $NC_RC"
nc_is h1 nat "per-destination (hard)"
[[ $(nc_of h1 public_endpoint) == 203.0.113.23:* ]] || fail "hH's public endpoint: $(nc_of h1 public_endpoint)"
[ "$(nc_of h1 public_endpoint)" != "$(nc_of h1 public_endpoint_alt)" ] \
  || fail "a hard NAT must show two public endpoints, got $(nc_of h1 public_endpoint) twice"

log "---- 4. next to a running daemon (no --registry: the daemon's)"
node_up hE he --registry "$JOIN" >/dev/null
wait_for 10 "he measured its NAT" status_is hE he nat endpoint-independent
netcheck hE he
[ "$NC_RC" -eq 0 ] || fail "netcheck next to the daemon exited $NC_RC"
nc_is he registry 203.0.113.1:7946
nc_is he nat endpoint-independent
nc_is he daemon.nat endpoint-independent
nc_is he daemon.registry_reachable true
nc_is he daemon.public_endpoint "$(status_of hE he public_endpoint)"
[[ $(nc_of he daemon.public_endpoint) == 203.0.113.21:* ]] || fail "the daemon's endpoint: $(nc_of he daemon.public_endpoint)"

log "---- 5. a join URL with another key"
KEY=${JOIN#pilot://}; KEY=${KEY%%@*}
WRONG="pilot://$(printf '%064x' 7)@${JOIN##*@}"
[ "$KEY" != "$(printf '%064x' 7)" ] || fail "the test's wrong key is the registry's"
netcheck pub p5 --registry "$WRONG"
[ "$NC_RC" -eq 1 ] || fail "netcheck with a wrong key exited $NC_RC, not 1"
nc_is p5 udp true
nc_is p5 registry_key_ok false
grep -q "key in the join URL" <<<"$(nc_of p5 problem)" || fail "problem: $(nc_of p5 problem)"

log "---- 6. the registry stopped"
stop_bg relay
stop_registry
netcheck pub p6 --registry "$JOIN"
[ "$NC_RC" -eq 5 ] || fail "netcheck with the registry down exited $NC_RC, not 5"
nc_is p6 udp false
nc_is p6 registry_key_ok null
nc_is p6 public_endpoint null
grep -q "UDP to the registry does not work" <<<"$(nc_of p6 problem)" || fail "problem: $(nc_of p6 problem)"
# Text, from the URL the daemon saved (daemon down): same verdict, in words.
node_down hE he
rc=0
on_to "$WORK/e6.txt" hE "$BIN/pilot-tun" --state-dir "$WORK/he" netcheck || rc=$?
cat "$WORK/e6.txt" >&2
[ "$rc" -eq 5 ] || fail "netcheck from the saved URL exited $rc, not 5"
grep -q "UDP: NOT working" "$WORK/e6.txt" || fail "the text report does not say UDP is not working"
grep -q "problem: UDP to the registry does not work: 203.0.113.1:7946" "$WORK/e6.txt" \
  || fail "the text report does not name the registry"

pass "netcheck: public/easy/hard NAT types and endpoints, registry and relay RTTs, daemon view, wrong key (exit 1), registry down (exit 5)"
