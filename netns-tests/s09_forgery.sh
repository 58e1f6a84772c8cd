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
APORT=$(status_of a alpha listen); APORT=${APORT##*:}
wait_for 10 "beta reaches alpha" onq b ping -c1 -W1 "$A"
ep_b() { peer_of a alpha beta endpoint; }
EP0=$(ep_b)
log "alpha reaches beta at $EP0"

# 1. Replays from a third address.
capture a cap "$WORK/b2a.pcap" -c 10 "udp and src host 203.0.113.11 and dst port $APORT"
onq b ping -c 15 -i 0.05 "$A" >/dev/null
wait_bg_exit 5 cap   # tcpdump -c 10 ends after 10 packets
dropped() { local r a; r=$(status_of a alpha drops.replay) && a=$(status_of a alpha drops.auth) && echo $(( r + a )); }
R0=$(dropped)
more_dropped() { local n; n=$(dropped) && [ "$n" -gt "$R0" ]; }
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
wait_for 5 "alpha drops carol's replays" more_dropped
[ "$(ep_b)" = "$EP0" ] || fail "a replay from carol moved beta's endpoint to $(ep_b)"
onq a ping -c2 -W1 "$B" >/dev/null || fail "alpha <-> beta broke after the replays"
pass "replayed datagrams from a third host were dropped; beta's endpoint stayed $EP0"

# 2. The relay forwards only between nodes that approved each other.
# relay_from SRC_NS NAME PORT: send relay frames to alpha's node id from the
# given node's UDP port (its daemon stopped, so the port is free while the
# registry still knows the address); sets RELAYED to how many relayed
# datagrams alpha received.
AID=$(status_of a alpha node_id)
relay_from() {
  local ns=$1 name=$2 port=$3
  capture a cap2 "$WORK/relay-$name.pcap" "udp and src host 203.0.113.1 and udp[8] = 0xa6"
  onq "$ns" python3 - "$AID" "$port" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
frame = bytes([0xA5, 0, 0, 0]) + bytes.fromhex(sys.argv[1]) + bytes([0xA4, 0, 0, 0]) + b"\x00" * 40
for _ in range(5):
    s.sendto(frame, ("203.0.113.1", 7946))
PY
  sleep 0.5
  stop_bg cap2 INT
  RELAYED=$(pcap_count "$WORK/relay-$name.pcap")
}
BPORT=$(status_of b beta listen); BPORT=${BPORT##*:}
CPORT=$(status_of c carol listen); CPORT=${CPORT##*:}
node_down b beta; node_down c carol   # (each waits until its daemon has exited)
relay_from b beta "$BPORT"; NB=$RELAYED
[ "$NB" -ge 1 ] || fail "positive control: a frame from beta's address was not relayed to alpha"
relay_from c carol "$CPORT"; NC=$RELAYED
[ "$NC" -eq 0 ] || fail "the relay forwarded $NC frames from carol, whom alpha never approved"
relay_from c stranger 40000; NX=$RELAYED
[ "$NX" -eq 0 ] || fail "the relay forwarded $NX frames from an unregistered address"
pass "relay: beta->alpha forwarded ($NB), carol->alpha refused, unregistered refused"
