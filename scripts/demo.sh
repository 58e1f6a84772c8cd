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
setup_lab   # everything below is removed on exit; a failing step says where

echo "==> a registry, and two hosts joining it"
lab_two_hosts   # netns-tests/lib.sh: registry 192.0.2.1, alpha .11, beta .12; sets A, B

echo "==> beta serves HTTP on its 10.x address"
mkdir -p "$WORK/www"; echo "hello from beta over the overlay" >"$WORK/www/index.html"
bg b http python3 -m http.server 8080 --bind "$B" --directory "$WORK/www"
wait_listen 5 b 8080 "$B"

echo "==> joined is not trusted: alpha cannot reach beta yet"
if onq a curl -sS --max-time 3 "http://$B:8080/" 2>&1; then fail "reached beta before trust"; fi

echo "==> alpha asks beta for trust; beta's operator approves"
pt a alpha trust request beta --note "demo: alpha would like to talk"
wait_for 5 "beta sees alpha's request" has_peer b beta alpha trust pending
pt b beta trust pending
pt b beta trust approve alpha
wait_for 5 "alpha sees the approval" peer_is a alpha beta state trusted trust list

echo "==> ordinary programs over 10.x"
on a ping -c 3 -i 0.2 "$B"
on a curl -sS "http://$B:8080/"
bg b iperf iperf3 -s -1 -B "$B"
wait_listen 5 b 5201 "$B"
on a iperf3 -c "$B" -t 3 | tail -4
pt a alpha peers
pt a alpha status
echo
echo "demo done: alpha ($A) and beta ($B) talked over pilot-tun after mutual approval"
