#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s13 — rekeys under traffic, in real daemons, with every tunnel timer 20x
# shorter (PILOT_TEST_TIME_SCALE=20: rekey every 6 s, keys refused after
# 9 s, keepalive every 1.25 s), so minutes of protocol time fit in seconds.
#
#              192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +-----------+        +-----------+        +-----------+
#   |    reg    |        |     a     |        |     b     |
#   | registry  |        |   alpha   |        |   beta    |
#   +-----+-----+        +-----+-----+        +-----+-----+
#   ======+====================+====================+======  br0 (sw)
#
# A 20 s iperf3 run spans at least three rekeys: no one-second interval may
# go empty, the daemons must log new sessions during it, and a 10 MB
# checksummed transfer afterwards arrives whole. Then the link idles past
# the key lifetime and a ping still answers at once (keepalives kept the
# session fresh).
SCENARIO=s13_rekey_under_traffic
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc iperf3 python3 timeout; do need "$t"; done

export PILOT_TEST_TIME_SCALE=20
lab_two_hosts
trust_pair a alpha b beta
wait_for 10 "alpha reaches beta" onq a ping -c1 -W1 "$B"

sessions() { cat "$WORK"/alpha/pilot-tun.log "$WORK"/beta/pilot-tun.log 2>/dev/null | grep -c "session established" || true; }
before=$(sessions)

bg b iperf iperf3 -s -1 -B "$B"
wait_listen 5 b 5201 "$B"
onq a timeout 60 iperf3 -c "$B" -t 20 -i 1 -J >"$WORK/iperf.json"
read -r empty mbps < <(python3 - "$WORK/iperf.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
iv = [i["sum"]["bytes"] for i in d["intervals"]]
print(sum(1 for b in iv if b == 0), int(d["end"]["sum_received"]["bits_per_second"] / 1e6))
PY
)
after=$(sessions)
log "iperf3: $mbps Mbit/s over 20 s, $empty empty one-second intervals; sessions established: $before before, $after after"
[ "$empty" -eq 0 ] || fail "$empty one-second intervals moved nothing (a rekey stalled the flow)"
[ $(( after - before )) -ge 3 ] || fail "only $(( after - before )) new sessions in 20 s with rekey every 6 s"
pass "20 s of iperf3 across $(( after - before )) rekeys: $mbps Mbit/s, no empty interval"

transfer_ok a b "$B" $((10 * 1024 * 1024)) after-rekeys
pass "10 MB after the rekeys: checksums match"

# Idle past the key lifetime (9 s at this scale): keepalives keep rekeying,
# so the first ping needs no new handshake round trip to answer.
sleep 12   # the test is about time passing with no traffic
on a ping -c1 -W1 "$B" >/dev/null || fail "no answer after 12 s idle"
pass "after 12 s idle (key lifetime 9 s) the first ping answers"
