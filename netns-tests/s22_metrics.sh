#!/usr/bin/env bash
# s22 — metrics and the registry's status page, scraped as an operator would.
#
#              192.0.2.0/24 (one L2 segment, bridge in namespace "sw")
#   +--------------------+   +--------------------+   +----------------------+
#   |        reg         |   |         a          |   |          b           |
#   | registry .1:7946   |   | alpha  .11         |   | beta   .12           |
#   | --metrics .1:9100  |   | --metrics 9464     |   | --metrics 9464       |
#   | --status-list-nodes|   |  (127.0.0.1 only)  |   | --metrics-per-peer   |
#   +---------+----------+   +---------+----------+   +----------+-----------+
#             |eth0                    |eth0 pilot0=A             |eth0 pilot0=B
#   ==========+========================+==========================+=====  br0 (sw)
#
# Two nodes join, trust each other and move 1 MB and some pings. Then curl,
# inside each namespace, scrapes alpha's and beta's /metrics on loopback and
# the registry's on its address; `promtool check metrics` must accept each
# scrape, and the counters must have moved: bytes and packets both ways,
# at least one completed handshake per node, a round trip in the histogram,
# two registrations. Per-peer series (node id, hostname) appear only on beta,
# which asked for them; alpha's loopback listener is not reachable from
# beta's namespace. Headless Chromium loads the registry's status page: its
# DOM shows two nodes online and lists both hostnames, and a screenshot is
# written. A second daemon asking for a port already taken fails to start
# and names it.
SCENARIO=s22_metrics
source "$(dirname "$0")/lib.sh"
setup_lab
reap_on_exit   # Chromium's helper processes must not outlive the namespace
for t in ip ping nc curl promtool chromium timeout python3 ss od; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
start_registry reg 192.0.2.1 --metrics 192.0.2.1:9100 --status-list-nodes
node_up a alpha --registry "$JOIN" --metrics 9464
node_up b beta --registry "$JOIN" --metrics 9464 --metrics-per-peer
A=$(addr_of a alpha); B=$(addr_of b beta)
log "alpha=$A beta=$B"

# --- traffic ----------------------------------------------------------------
trust_pair a alpha b beta
transfer_ok a b "$B" $((1024 * 1024)) one-mb
on a ping -c5 -i0.2 -W2 "$B" >/dev/null || fail "ping alpha -> beta failed"
on b ping -c5 -i0.2 -W2 "$A" >/dev/null || fail "ping beta -> alpha failed"
pass "1 MB alpha -> beta and pings both ways"

# --- scrapes ------------------------------------------------------------------
# scrape NS URL FILE: GET URL from inside NS into FILE; promtool must accept it.
scrape() {
  local ns=$1 url=$2 file=$3
  on "$ns" curl -sS --fail --max-time 5 -o "$file" "$url" || fail "GET $url in $ns failed"
  [ -s "$file" ] || fail "GET $url in $ns returned nothing"
  promtool check metrics <"$file" >"$file.promtool" 2>&1 \
    || fail "promtool check metrics rejects $url: $(cat "$file.promtool")"
  log "$url: $(grep -vc '^#' "$file") samples, promtool: ok"
}
# value FILE SERIES: the value of SERIES (name with its labels, exactly as
# written) in FILE; fails if it is not there.
value() {
  local v
  v=$(awk -v k="$2" '$1 == k { print $2 }' "$1")
  [ -n "$v" ] || fail "no series $2 in ${1##*/}"
  echo "$v"
}
# at_least FILE SERIES MIN: the series' value is an integer >= MIN.
at_least() {
  local v; v=$(value "$1" "$2")
  [[ $v =~ ^[0-9]+$ ]] && [ "$v" -ge "$3" ] || fail "${1##*/}: $2 is $v, expected at least $3"
}

scrape a http://127.0.0.1:9464/metrics "$WORK/alpha.prom"
scrape b http://127.0.0.1:9464/metrics "$WORK/beta.prom"
# The registry counts nodes on its ticks: wait until both are online there.
wait_for 10 "registry metrics show 2 nodes online" \
  sh -c "ip netns exec $PFX-reg curl -sf --max-time 3 http://192.0.2.1:9100/metrics | grep -qx 'pilot_registry_nodes_online 2'"
scrape reg http://192.0.2.1:9100/metrics "$WORK/registry.prom"

for f in alpha beta; do
  p="$WORK/$f.prom"
  at_least "$p" pilot_tun_rx_bytes_total 1
  at_least "$p" pilot_tun_tx_bytes_total 1
  at_least "$p" pilot_tun_rx_packets_total 5
  at_least "$p" pilot_tun_tx_packets_total 5
  hs=$(( $(value "$p" 'pilot_tun_handshakes_completed_total{role="initiator"}') \
       + $(value "$p" 'pilot_tun_handshakes_completed_total{role="responder"}') ))
  [ "$hs" -ge 1 ] || fail "$f: no completed handshake counted"
  [ "$(value "$p" pilot_tun_sessions)" = 1 ] || fail "$f: sessions is not 1"
  [ "$(value "$p" 'pilot_tun_peers{trust="trusted"}')" = 1 ] || fail "$f: trusted peers is not 1"
done
at_least "$WORK/alpha.prom" pilot_tun_tx_bytes_total $((1024 * 1024))
at_least "$WORK/beta.prom" pilot_tun_rx_bytes_total $((1024 * 1024))
started=$(( $(value "$WORK/alpha.prom" pilot_tun_handshakes_started_total) + $(value "$WORK/beta.prom" pilot_tun_handshakes_started_total) ))
[ "$started" -ge 1 ] || fail "neither node counted a handshake it started"
rtts=$(( $(value "$WORK/alpha.prom" pilot_tun_rtt_seconds_count) + $(value "$WORK/beta.prom" pilot_tun_rtt_seconds_count) ))
[ "$rtts" -ge 1 ] || fail "no handshake round trip in either node's histogram"
pass "daemons: bytes, packets, handshakes, sessions and $rtts round trip(s) counted"

r="$WORK/registry.prom"
at_least "$r" pilot_registry_registrations_total 2
at_least "$r" pilot_registry_statements_total 2
at_least "$r" pilot_registry_lookups_total 1
at_least "$r" pilot_registry_handshakes_total 2
[ "$(value "$r" pilot_registry_nodes_registered)" = 2 ] || fail "registry: nodes_registered is not 2"
at_least "$r" 'pilot_registry_storage_duration_seconds_count{job="register"}' 2
pass "registry: $(value "$r" pilot_registry_registrations_total) registrations, 2 nodes online, storage latencies"

# --- privacy: per-peer labels only where asked for, loopback by default -------
! grep -q 'node_id=' "$WORK/alpha.prom" || fail "alpha exports per-peer series without --metrics-per-peer"
at_least "$WORK/beta.prom" "pilot_tun_peer_rx_bytes_total{node_id=\"$(status_of a alpha node_id)\",hostname=\"alpha\"}" $((1024 * 1024))
if onq b curl -s --max-time 3 -o /dev/null "http://192.0.2.11:9464/metrics"; then
  fail "alpha's metrics (--metrics 9464) answer on its underlay address; a port alone must mean loopback"
fi
pass "per-peer series on beta only; alpha's listener is loopback only"

# --- the status page in a real browser -----------------------------------------
mkdir -p "$WORK/chromium"
chrome() {
  on reg env HOME="$WORK/chromium" timeout 60 chromium --headless --no-sandbox --disable-gpu \
    --no-first-run --user-data-dir="$WORK/chromium/profile" "$@"
}
chrome --dump-dom http://192.0.2.1:9100/ >"$WORK/status.html" 2>"$WORK/chromium-dom.log" \
  || fail "chromium --dump-dom failed: $(tail -5 "$WORK/chromium-dom.log")"
grep -q '<span id="nodes-online">2</span>' "$WORK/status.html" \
  || fail "the status page's DOM does not show 2 nodes online: $(grep -o 'id="nodes-online">[^<]*' "$WORK/status.html")"
grep -q '<span id="nodes-registered">2</span>' "$WORK/status.html" || fail "the status page does not show 2 nodes registered"
for n in alpha beta; do
  grep -q "<td>$n</td><td>$(addr_of "${n:0:1}" "$n")</td>" "$WORK/status.html" \
    || fail "the status page's node list does not show $n"
done
! grep -qi '<script' "$WORK/status.html" || fail "the status page carries a script"
chrome --screenshot="$WORK/status.png" --window-size=1000,900 http://192.0.2.1:9100/ \
  >"$WORK/chromium-shot.log" 2>&1 || fail "chromium --screenshot failed: $(tail -5 "$WORK/chromium-shot.log")"
[ -s "$WORK/status.png" ] || fail "the screenshot is empty"
[ "$(od -An -tx1 -N4 "$WORK/status.png" | tr -d ' ')" = 89504e47 ] || fail "the screenshot is not a PNG"
pass "Chromium: the status page shows 2 nodes online and both hostnames; screenshot $(stat -c %s "$WORK/status.png") bytes"

# --- a taken port is named, and nothing is left running -----------------------
# (Last: were the port free, this third node would register and change the
# counts above; a taken port now fails the start before it registers.)
if on_to "$WORK/taken.txt" a "$BIN/pilot-tun" --state-dir "$WORK/gamma" up --name gamma \
  --dev pilot1 --registry "$JOIN" --metrics 9464; then
  fail "a second daemon in a started with --metrics on alpha's port 9464"
fi
grep -q "127.0.0.1:9464" "$WORK/taken.txt" \
  || fail "the error for a taken --metrics port does not name it: $(cat "$WORK/taken.txt")"
poll 10 eval '! onq a ip link show pilot1 >/dev/null 2>&1' || fail "the failed start left pilot1 behind"
pass "--metrics on a taken port fails the start: $(tail -1 "$WORK/taken.txt")"
