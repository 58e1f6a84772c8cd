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
#    (Each refusal is checked once a frame from beta sent after it has been
#    relayed: the relay handles datagrams in order, so by then it has
#    decided on the refused ones.)
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
# frames NS PORT TAG N: from NS, UDP port PORT (a stopped daemon's port is
# free while the registry still knows the address), hand the relay N frames
# for alpha's node id, each payload carrying TAG; alpha's capture counts them.
AID=$(status_of a alpha node_id)
frames() {
  onq "$1" python3 - "$AID" "$2" "$3" "$4" <<'PY'
import socket, sys
aid, port, tag, n = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
frame = bytes([0xA5, 0, 0, 0]) + bytes.fromhex(aid) + bytes([0xA4, 0, 0, 0]) + tag.ljust(40, b"\x00")
for _ in range(n):
    s.sendto(frame, ("203.0.113.1", 7946))
PY
}
# relayed TAG: how many frames with TAG alpha received from the relay.
relayed() { python3 -c 'import sys; print(open(sys.argv[1], "rb").read().count(sys.argv[2].encode()))' "$WORK/relay.pcap" "$1"; }
at_least_relayed() { [ "$(relayed "$1")" -ge "$2" ]; }   # TAG N
BPORT=$(status_of b beta listen); BPORT=${BPORT##*:}
CPORT=$(status_of c carol listen); CPORT=${CPORT##*:}
node_down b beta; node_down c carol
capture a cap2 "$WORK/relay.pcap" "udp and src host 203.0.113.1 and udp[8] = 0xa6"
frames b "$BPORT" FROM-BETA 5
wait_for 5 "the relay forwards beta's frames to alpha" at_least_relayed FROM-BETA 1
NB=$(relayed FROM-BETA)
[ "$NB" -ge 1 ] || fail "positive control: a frame from beta's address was not relayed to alpha"
frames c "$CPORT" FROM-CAROL 5
frames b "$BPORT" FENCE-1 1
wait_for 5 "beta's frame sent after carol's is relayed" at_least_relayed FENCE-1 1
NC=$(relayed FROM-CAROL)
[ "$NC" -eq 0 ] || fail "the relay forwarded $NC frames from carol, whom alpha never approved"
frames c 40000 FROM-STRANGER 5
frames b "$BPORT" FENCE-2 1
wait_for 5 "beta's frame sent after the stranger's is relayed" at_least_relayed FENCE-2 1
NX=$(relayed FROM-STRANGER)
[ "$NX" -eq 0 ] || fail "the relay forwarded $NX frames from an unregistered address"
# Only beta's frames reached alpha: nothing else came through the relay.
stop_bg cap2 INT
NB=$(relayed FROM-BETA)
NALL=$(pcap_count "$WORK/relay.pcap")
[ "$NALL" -eq $(( NB + 2 )) ] || fail "alpha got $NALL relayed frames, but only $NB from beta and 2 fences were sent through"
pass "relay: beta->alpha forwarded ($NB), carol->alpha refused, unregistered refused"
