#!/usr/bin/env bash
# The main job end to end, on this machine, in network namespaces:
#
#   [registry 192.0.2.1] ---- switch ---- [alpha 192.0.2.11]   pilot0: 10.77.x.y
#                                 \------- [beta  192.0.2.12]   pilot0: 10.77.x.y
#
# builds pilot-tun, starts a registry and two nodes, shows that they cannot
# talk before mutual approval, approves, and then runs ordinary programs over
# the 10.x addresses: ping, curl against an HTTP server, and iperf3.
# Everything it creates is removed when it ends (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "the demo creates network namespaces: run 'sudo scripts/demo.sh'" >&2; exit 1; }
scripts/deps.sh
echo "==> building (release)"
cargo build --locked --release --workspace --bins 2>&1 | tail -1

SCENARIO=demo
source netns-tests/lib.sh
setup_lab

switch sw
mkns reg; mkns a; mkns b
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24

echo "==> a registry, and two hosts joining it"
start_registry reg 192.0.2.1
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta)

echo "==> joined is not trusted: alpha cannot reach beta yet"
if onq a curl -sS --max-time 3 "http://$B:8080/" 2>&1; then fail "reached beta before trust"; fi

echo "==> alpha asks beta for trust; beta's operator approves"
pt a alpha trust request beta --note "demo: alpha would like to talk"
sleep 0.5
pt b beta trust pending
pt b beta trust approve alpha
wait_for 5 "alpha sees the approval" sh -c "ip netns exec $PFX-a $BIN/pilot-tun --state-dir $WORK/alpha --json trust list | grep -q '\"trusted\"'"

echo "==> ordinary programs over 10.x"
mkdir -p "$WORK/www"; echo "hello from beta over the overlay" >"$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
wait_for 5 "http server" onq b sh -c "nc -z $B 8080"
on a ping -c 3 -i 0.2 "$B"
on a curl -sS "http://$B:8080/"
bg b iperf iperf3 -s -1 -B "$B"
wait_for 5 "iperf3 server" onq b sh -c "ss -ltn | grep -q :5201"
on a iperf3 -c "$B" -t 3 | tail -4
pt a alpha peers
pt a alpha status
echo
echo "demo done: alpha ($A) and beta ($B) talked over pilot-tun after mutual approval"
