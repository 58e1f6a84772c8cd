#!/usr/bin/env bash
# s04 — the underlay never shows plaintext.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +-----------+        +-----------+        +-------------------+
#   |    reg    |        |     a     |        |         b         |
#   | registry  |        |   alpha   |        |       beta        |
#   |    .1     |        |    .11    |        |  .12   tcpdump -i |
#   +-----+-----+        +-----+-----+        +--eth0-------------+
#         |                    |                    | <- capture here
#   ======+====================+====================+======  br0
#
# alpha sends a unique marker string to beta's 10.x address over TCP, again
# and again, and as a ping payload pattern. beta's application must receive
# it (so traffic really flowed), while a capture of beta's underlay interface
# must contain the tunnel's UDP packets but neither the marker nor any packet
# with a 10.x address. A control marker sent in the clear over the underlay
# must be found by the same search (so the search can find plaintext).
SCENARIO=s04_no_plaintext_on_underlay
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc tcpdump python3 ss timeout od; do need "$t"; done

lab_two_hosts
trust_pair a alpha b beta

MARKER="PILOT-MARKER-$RANDOM$RANDOM$RANDOM"
PINGMARK=$(printf 'PiNg%06d%06d' $((RANDOM % 1000000)) $((RANDOM % 1000000)))   # 16 bytes
PINGHEX=$(printf '%s' "$PINGMARK" | od -An -tx1 | tr -d ' \n')
CONTROL="CLEAR-CONTROL-$RANDOM$RANDOM"
log "marker '$MARKER', ping pattern '$PINGMARK' (0x$PINGHEX), control '$CONTROL'"

# --- capture beta's underlay --------------------------------------------------
capture b tcpdump "$WORK/beta-eth0.pcap"

# --- the secret traffic ---------------------------------------------------------
bg b nc-recv sh -c "exec nc -lk $B 9000 >$WORK/received.txt"
wait_listen 5 b 9000
N=20
for i in $(seq 1 $N); do
  printf '%s %d\n' "$MARKER" "$i" | onq a timeout 5 nc -N -w 2 "$B" 9000 \
    || fail "TCP send $i of the marker alpha -> beta failed"
done
log "sent the marker $N times over TCP alpha -> $B:9000"
on a ping -c5 -i0.2 -W2 -s 200 -p "$PINGHEX" "$B" >"$WORK/ping-marker.txt" \
  || fail "ping with the marker pattern failed: $(cat "$WORK/ping-marker.txt")"
grep -q "wrong data byte" "$WORK/ping-marker.txt" && fail "ping replies came back with other bytes"
markers_in() { [ "$(grep -c "^$MARKER " "$1")" -ge "$2" ]; }   # FILE N
wait_for 5 "beta's application received all $N markers" markers_in "$WORK/received.txt" "$N"
pass "beta's application received the marker $N times; 5 ping replies carried the pattern"

# --- the control: plaintext on the underlay is visible to this capture ---------
# Sent last: once it is in the file, everything sent before it is too.
on a python3 -c 'import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), ("192.0.2.12", 9999))' "$CONTROL"

wait_for 5 "the clear control packet is written to the capture" grep -qa "$CONTROL" "$WORK/beta-eth0.pcap"

# --- stop the capture and search it ---------------------------------------------
stop_bg tcpdump INT
log "tcpdump: $(grep 'packets captured' "$WORK/tcpdump.log" || echo '?')"

python3 - "$WORK/beta-eth0.pcap" "$MARKER" "$PINGMARK" "$CONTROL" <<'PY' || fail "capture check failed (see above)"
import ipaddress, struct, sys
path, marker, pingmark, control = sys.argv[1], *[a.encode() for a in sys.argv[2:]]
raw = open(path, "rb").read()
magic = struct.unpack("<I", raw[:4])[0]
assert magic in (0xa1b2c3d4, 0xa1b23c4d), f"not a little-endian pcap: {magic:#x}"
linktype = struct.unpack("<I", raw[20:24])[0]
assert linktype == 1, f"linktype {linktype}, expected Ethernet"
off, frames, udp_ab, udp_bytes, ten = 24, 0, 0, 0, []
ab = {ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.12")}
while off + 16 <= len(raw):
    _, _, incl, _ = struct.unpack("<IIII", raw[off:off + 16])
    pkt = raw[off + 16: off + 16 + incl]
    off += 16 + incl
    frames += 1
    if len(pkt) < 34 or pkt[12:14] != b"\x08\x00":
        continue
    ihl = (pkt[14] & 0x0f) * 4
    proto = pkt[23]
    src, dst = ipaddress.ip_address(pkt[26:30]), ipaddress.ip_address(pkt[30:34])
    if src in ipaddress.ip_network("10.0.0.0/8") or dst in ipaddress.ip_network("10.0.0.0/8"):
        ten.append((str(src), str(dst), proto))
    if proto == 17 and {src, dst} == ab:
        udp_ab += 1
        udp_bytes += len(pkt) - 14 - ihl - 8
problems = []
if raw.count(marker): problems.append(f"marker found {raw.count(marker)} times in the capture")
if raw.count(pingmark): problems.append(f"ping pattern found {raw.count(pingmark)} times in the capture")
if ten: problems.append(f"{len(ten)} packets with 10.x addresses on the underlay, e.g. {ten[:3]}")
if udp_ab < 40: problems.append(f"only {udp_ab} UDP packets between 192.0.2.11 and .12: wrong interface?")
if not raw.count(control): problems.append("control string sent in the clear was NOT found: the search is blind")
print(f"capture: {frames} frames, {udp_ab} UDP packets alpha<->beta ({udp_bytes} payload bytes), "
      f"marker x{raw.count(marker)}, ping pattern x{raw.count(pingmark)}, 10.x packets {len(ten)}, "
      f"clear control x{raw.count(control)}", file=sys.stderr)
for p in problems: print("  problem:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
pass "underlay capture: tunnel UDP only; no marker, no ping pattern, no 10.x header; clear control found"
