#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# Roaming and registry outage.
#
#   reg 203.0.113.1 ---- inet (bridge) ---- pubA 203.0.113.10 -> 203.0.113.30 (moves)
#                                      \--- pubB 203.0.113.11
#
# 1. iperf3 pubA -> pubB runs for 8 s; once it has moved 1 MB, pubA's
#    underlay address changes (the old one is removed). The TCP connection
#    over 10.x must survive: pubB learns pubA's new endpoint from
#    authenticated packets.
# 2. iperf3 again for 6 s; once it has moved 1 MB, the registry is killed.
#    The transfer must finish: established sessions do not need the registry.
SCENARIO=${SCENARIO:-s07_roaming_and_outage}
source "$(dirname "$0")/lib.sh"
setup_lab
need iperf3

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns pubA; plug pubA inet 203.0.113.10/24
mkns pubB; plug pubB inet 203.0.113.11/24
start_registry reg 203.0.113.1
node_up pubA puba --registry "$JOIN" >/dev/null
node_up pubB pubb --registry "$JOIN" >/dev/null
trust_pair pubA puba pubB pubb
B=$(addr_of pubB pubb)
wait_for 10 "puba reaches pubb" onq pubA ping -c1 -W1 "$B"

endpoint_of_a() { peer_of pubB pubb puba endpoint; }
# a_moved MB0: puba has sent pubb 1 MB more than MB0 bytes (a transfer is under way).
a_moved() { [ "$(peer_of pubA puba pubb tx_bytes)" -gt $(( $1 + 1000000 )) ]; }
# a_seen_at PREFIX: pubb's endpoint for puba starts with PREFIX.
a_seen_at() { local ep; ep=$(endpoint_of_a) && [[ $ep == "$1"* ]]; }
log "pubb sees puba at $(endpoint_of_a)"
case "$(endpoint_of_a)" in 203.0.113.10:*) ;; *) fail "unexpected endpoint before the move: $(endpoint_of_a)";; esac

# 1. Roaming.
bg pubB iperf1 iperf3 -s -1 -B "$B"
wait_listen 5 pubB 5201 "$B"
TX0=$(peer_of pubA puba pubb tx_bytes)
bg pubA client1 sh -c "exec iperf3 -c $B -t 8 -J > $WORK/roam.json"
wait_for 5 "the transfer is under way" a_moved "$TX0"
# The new address becomes the only one (promote_secondaries keeps it when
# the old primary goes).
onq pubA sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1
on pubA ip addr add 203.0.113.30/24 dev eth0
on pubA ip addr del 203.0.113.10/24 dev eth0
T0=$(now_ms)
wait_for 5 "pubb learns puba's new endpoint" a_seen_at 203.0.113.30:
T1=$(now_ms)
log "pubb switched to $(endpoint_of_a) within $((T1 - T0)) ms of the move"
wait_bg_exit 15 client1   # iperf3 through the move finishes
python3 - "$WORK/roam.json" <<'PY' || fail "the TCP connection did not survive the move"
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d: sys.exit(f"iperf3 error: {d['error']}")
secs = [i["sum"]["bits_per_second"] for i in d["intervals"]]
print(f"roaming: per-second Mbit/s {[round(s/1e6) for s in secs]}", file=sys.stderr)
if d["end"]["sum_received"]["bytes"] <= 0: sys.exit("nothing received")
# Traffic must flow again after the move (last seconds non-zero).
if min(secs[-3:]) <= 0: sys.exit("no traffic after the move")
PY
pass "TCP over 10.x survived the underlay address change"

# 2. Registry outage mid-transfer.
bg pubB iperf2 iperf3 -s -1 -B "$B"
wait_listen 5 pubB 5201 "$B"
TX0=$(peer_of pubA puba pubb tx_bytes)
bg pubA client2 sh -c "exec iperf3 -c $B -t 6 -J > $WORK/outage.json"
wait_for 5 "the transfer is under way" a_moved "$TX0"
stop_registry
wait_bg_exit 15 client2   # iperf3 through the outage finishes
python3 - "$WORK/outage.json" <<'PY' || fail "the transfer broke when the registry died"
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d: sys.exit(f"iperf3 error: {d['error']}")
secs = [i["sum"]["bits_per_second"] for i in d["intervals"]]
print(f"outage: per-second Mbit/s {[round(s/1e6) for s in secs]}", file=sys.stderr)
if min(secs[-3:]) <= 0: sys.exit("traffic stopped after the registry died")
PY
onq pubA ping -c2 -W1 "$B" >/dev/null || fail "ping fails while the registry is down"
pass "established sessions carry on while the registry is down"
