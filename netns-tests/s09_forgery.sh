#!/usr/bin/env bash
# Forged and replayed packets from a third host, and the relay's refusals.
#
#   reg 203.0.113.1 --- inet (bridge) --- alpha .10 --- beta .11 --- carol .12
#
# alpha and beta trust each other; carol joined and asked alpha, who never
# approved. Then:
# 1. carol replays datagrams beta really sent to alpha (captured on alpha's
#    link), from her own address: alpha must drop them and keep beta's
#    endpoint (no unauthenticated or replayed packet moves a session).
# 2. relay: a datagram handed to the relay from a registered node's address
#    is forwarded only between nodes that approved each other. Positive
#    control: from beta's address to alpha it is relayed; from carol's
#    address to alpha it is not; from an unregistered address it is not.
SCENARIO=${SCENARIO:-s09_forgery}
source "$(dirname "$0")/lib.sh"
setup_lab
trap_errors
need tcpdump; need python3
switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns a; plug a inet 203.0.113.10/24
mkns b; plug b inet 203.0.113.11/24
mkns c; plug c inet 203.0.113.12/24
start_registry reg 203.0.113.1
node_up a alpha --registry "$JOIN" >/dev/null
node_up b beta --registry "$JOIN" >/dev/null
node_up c carol --registry "$JOIN" >/dev/null
trust_pair a alpha b beta
pt c carol trust request alpha >/dev/null
A=$(addr_of a alpha); B=$(addr_of b beta)
APORT=$(json_get a alpha "d['listen'].split(':')[1]" status)
wait_for 10 "beta reaches alpha" onq b ping -c1 -W1 "$A"
ep_b() { json_get a alpha "[p.get('endpoint') for p in d if p['hostname']=='beta'][0]" peers; }
EP0=$(ep_b)
log "alpha reaches beta at $EP0"

# 1. Replays from a third address.
bg a cap tcpdump -i eth0 -n -U --immediate-mode -Z root -s 0 -c 10 -w "$WORK/b2a.pcap" "udp and src host 203.0.113.11 and dst port $APORT"
wait_for 5 "capture running" grep -q "listening on eth0" "$WORK/cap.log"
onq b ping -c 15 -i 0.05 "$A" >/dev/null
wait_for 5 "10 packets captured" sh -c "! kill -0 $(cat "$WORK/cap.pid")"
R0=$(json_get a alpha "d['drops']['replay'] + d['drops']['auth']" status)
python3 - "$WORK/b2a.pcap" > "$WORK/payloads.hex" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
off = 24
while off + 16 <= len(data):
    incl = struct.unpack_from("<I", data, off + 8)[0]
    pkt = data[off + 16: off + 16 + incl]
    off += 16 + incl
    ihl = (pkt[14] & 0x0f) * 4
    print(pkt[14 + ihl + 8:].hex())
PY
[ "$(wc -l <"$WORK/payloads.hex")" -ge 8 ] || fail "captured too few of beta's datagrams"
onq c python3 - "$WORK/payloads.hex" 203.0.113.10 "$APORT" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in open(sys.argv[1]):
    s.sendto(bytes.fromhex(line.strip()), (sys.argv[2], int(sys.argv[3])))
PY
wait_for 5 "alpha drops carol's replays" sh -c "[ \$(ip netns exec $PFX-a $BIN/pilot-tun --state-dir $WORK/alpha --json status | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d[\"drops\"][\"replay\"] + d[\"drops\"][\"auth\"])') -gt $R0 ]"
[ "$(ep_b)" = "$EP0" ] || fail "a replay from carol moved beta's endpoint to $(ep_b)"
onq a ping -c2 -W1 "$B" >/dev/null || fail "alpha <-> beta broke after the replays"
pass "replayed datagrams from a third host were dropped; beta's endpoint stayed $EP0"

# 2. The relay forwards only between nodes that approved each other.
# frame SRC_NS SRC_STATE PORT: send one relay frame to alpha's node id from
# the given node's UDP port (its daemon stopped, so the port is free while the
# registry still knows the address), and report whether alpha received a
# relayed datagram.
AID=$(json_get a alpha "d['node_id']" status)
relay_from() {
  local ns=$1 name=$2 port=$3
  bg a cap2 tcpdump -i eth0 -n -U --immediate-mode -Z root -s 0 -w "$WORK/relay-$name.pcap" "udp and src host 203.0.113.1 and udp[8] = 0xa6"
  wait_for 5 "capture running" grep -q "listening on eth0" "$WORK/cap2.log"
  onq "$ns" python3 - "$AID" "$port" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
frame = bytes([0xA5, 0, 0, 0]) + bytes.fromhex(sys.argv[1]) + bytes([0xA4, 0, 0, 0]) + b"\x00" * 40
for _ in range(5):
    s.sendto(frame, ("203.0.113.1", 7946))
PY
  sleep 0.5
  kill -INT "$(cat "$WORK/cap2.pid")"
  wait_for 5 "tcpdump exits" sh -c "! kill -0 $(cat "$WORK/cap2.pid")"
  tcpdump -r "$WORK/relay-$name.pcap" 2>/dev/null | wc -l
}
BPORT=$(json_get b beta "d['listen'].split(':')[1]" status)
CPORT=$(json_get c carol "d['listen'].split(':')[1]" status)
node_down b beta; node_down c carol
sleep 0.3
NB=$(relay_from b beta "$BPORT")
[ "$NB" -ge 1 ] || fail "positive control: a frame from beta's address was not relayed to alpha"
NC=$(relay_from c carol "$CPORT")
[ "$NC" -eq 0 ] || fail "the relay forwarded $NC frames from carol, whom alpha never approved"
NX=$(relay_from c stranger 40000)
[ "$NX" -eq 0 ] || fail "the relay forwarded $NX frames from an unregistered address"
pass "relay: beta->alpha forwarded ($NB), carol->alpha refused, unregistered refused"
