#!/usr/bin/env bash
# netns-serial: loads the CPU (bulk transfers or floods): runs alone
# s01 — trust, then traffic: ordinary TCP programs over the 10.x addresses.
#
#              192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +-----------+        +-----------+        +-----------+
#   |    reg    |        |     a     |        |     b     |
#   | registry  |        |   alpha   |        |   beta    |
#   | .1:7946   |        |   .11     |        |   .12     |
#   +-----+-----+        +-----+-----+        +-----+-----+
#         |eth0                |eth0 pilot0=A       |eth0 pilot0=B
#   ======+====================+====================+======  br0 (sw)
#
# Both nodes join the registry. Before trust: a TCP connect from alpha to a
# port beta really listens on fails, and fails fast (ICMP administratively
# prohibited, not a timeout). After a request and an approval: 10 MB cross
# with the same sha256, ping works both ways, iperf3 moves data for 3 s.
SCENARIO=s01_trust_and_traffic
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping nc iperf3 python3 ss timeout sha256sum; do need "$t"; done

lab_two_hosts
[[ $A == 10.* && $B == 10.* ]] || fail "overlay addresses not in 10.x: alpha=$A beta=$B"
[ "$A" != "$B" ] || fail "alpha and beta got the same address $A"

# --- before trust -------------------------------------------------------
# beta really listens on 8080, so a refused connect means "blocked by the
# overlay", not "nobody home".
mkdir -p "$WORK/www"   # an empty directory to serve (not the state dirs)
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
wait_listen 5 b 8080
tcp_blocked_fast a "$B" 8080
if on_to "$WORK/ping-untrusted.txt" a ping -c1 -W2 "$B"; then
  fail "ping alpha -> beta answered before trust"
fi
grep -q "Packet filtered" "$WORK/ping-untrusted.txt" \
  || fail "ping before trust did not report 'Packet filtered' (ICMP admin-prohibited): $(cat "$WORK/ping-untrusted.txt")"
pass "before trust: TCP refused in ${ELAPSED_MS} ms, ping 'Packet filtered'"

# --- trust ----------------------------------------------------------------
trust_pair a alpha b beta
peer_is b beta alpha state trusted trust list \
  || fail "beta's trust list does not show alpha as trusted"

# The same connect now works (positive control for the check above).
wait_for 5 "TCP connect alpha -> beta:8080 after trust" onq a nc -z -w 2 "$B" 8080

# --- 10 MB over TCP, checksums match ----------------------------------------
head -c 10M /dev/urandom >"$WORK/send.bin"
# What beta's daemon writes into its TUN (one count per write).
rx_packets0=$(onq b cat /sys/class/net/pilot0/statistics/rx_packets)
rx_bytes0=$(onq b cat /sys/class/net/pilot0/statistics/rx_bytes)
bg b nc-recv sh -c "exec nc -l $B 9000 >$WORK/recv.bin"
wait_listen 5 b 9000
t0=$(now_ms)
on a timeout 30 nc -N -w 5 "$B" 9000 <"$WORK/send.bin"
wait_bg_exit 20 nc-recv   # beta's nc ends once it has received everything
ms=$(( $(now_ms) - t0 ))
want=$(sha256sum <"$WORK/send.bin" | cut -d' ' -f1)
got=$(sha256sum <"$WORK/recv.bin" | cut -d' ' -f1)
size=$(stat -c %s "$WORK/recv.bin")
[ "$size" -eq $((10 * 1024 * 1024)) ] || fail "beta received $size bytes, expected 10485760"
[ "$want" = "$got" ] || fail "sha256 mismatch: sent $want, received $got"
pass "10 MB alpha -> beta over TCP in ${ms} ms, sha256 $want"
# Beta hands its kernel runs of segments as one super-packet each
# (pilot_proto::gro): the TUN counts one packet per write, so the average
# write is far above the MTU. One write per segment averages under it.
rx_packets=$(( $(onq b cat /sys/class/net/pilot0/statistics/rx_packets) - rx_packets0 ))
rx_bytes=$(( $(onq b cat /sys/class/net/pilot0/statistics/rx_bytes) - rx_bytes0 ))
[ "$rx_packets" -gt 0 ] || fail "beta's pilot0 counted no packets written for the transfer"
avg=$(( rx_bytes / rx_packets ))
[ "$avg" -ge 4000 ] || fail "beta's TUN writes average $avg bytes ($rx_packets writes, $rx_bytes bytes): segments were not coalesced"
pass "beta's TUN took the transfer in $rx_packets writes, $avg bytes on average (coalesced)"

# --- ping both ways ---------------------------------------------------------
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "ping alpha -> beta failed after trust"
on b ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "ping beta -> alpha failed after trust"
pass "ping works both ways"

# --- iperf3 for 3 s ---------------------------------------------------------
bg b iperf3-server iperf3 -s -1 -B "$B"
wait_listen 5 b 5201
on a timeout 20 iperf3 -c "$B" -t 3 -J >"$WORK/iperf3.json"
bps=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]))' "$WORK/iperf3.json")
[ "$bps" -gt 0 ] || fail "iperf3 reported $bps bit/s"
pass "iperf3 alpha -> beta: $(( bps / 1000000 )) Mbit/s"

# --- learned state: each side sees the other's underlay endpoint, a session, bytes
ep=$(peer_of a alpha beta endpoint)
case "$ep" in 192.0.2.12:*) ;; *) fail "alpha's endpoint for beta is '$ep', expected 192.0.2.12:<port>" ;; esac
peer_is a alpha beta session true && [ "$(peer_of a alpha beta tx_bytes)" -gt 10000000 ] \
  || fail "alpha's peers entry for beta shows no session or fewer than 10 MB sent"
pass "alpha reaches beta directly at $ep"
