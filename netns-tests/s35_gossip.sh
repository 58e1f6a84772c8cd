#!/usr/bin/env bash
# Gossip among trusted peers while the registry is down.
#
#   reg 203.0.113.1 ---- inet (bridge) ---- hA 203.0.113.10 -> 203.0.113.30 (moves)
#                                      +--- hB 203.0.113.11 -> 203.0.113.31 (moves)
#                                      +--- hC 203.0.113.12 (common peer)
#                                      +--- hD 203.0.113.13
#
# Trust: alpha-beta, alpha-gamma, beta-gamma, gamma-delta, delta-beta.
# The registry is killed, then:
# 1. delta revokes beta. Delta drops beta at once, so only gamma (which
#    trusts both) can tell beta: beta must show delta as revoked-by-peer
#    and drop its session, with no registry and no session to delta.
# 2. alpha's daemon stops; both alpha's and beta's underlay addresses
#    change; alpha comes back. Each remembers only the other's old
#    endpoint and nobody can look the new one up: alpha reaches beta over
#    10.x (ping and a compared TCP transfer) only because gamma, which
#    beta told of its new endpoint, answers alpha's "where is beta" with
#    beta's signed record. (tests/tests/gossip.rs shows the same fails with
#    gamma's gossip off.)
SCENARIO=${SCENARIO:-s35_gossip}
source "$(dirname "$0")/lib.sh"
setup_lab

switch inet
mkns reg; plug reg inet 203.0.113.1/24
mkns hA; plug hA inet 203.0.113.10/24
mkns hB; plug hB inet 203.0.113.11/24
mkns hC; plug hC inet 203.0.113.12/24
mkns hD; plug hD inet 203.0.113.13/24
start_registry reg 203.0.113.1
node_up hA alpha --registry "$JOIN" >/dev/null
node_up hB beta --registry "$JOIN" >/dev/null
node_up hC gamma --registry "$JOIN" >/dev/null
node_up hD delta --registry "$JOIN" >/dev/null
trust_pair hA alpha hB beta
trust_pair hA alpha hC gamma
trust_pair hB beta hC gamma
trust_pair hC gamma hD delta
trust_pair hD delta hB beta
A=$(addr_of hA alpha)
B=$(addr_of hB beta)
C=$(addr_of hC gamma)
wait_for 10 "alpha reaches gamma" onq hA ping -c1 -W1 "$C"
wait_for 10 "beta reaches gamma" onq hB ping -c1 -W1 "$C"
wait_for 10 "delta reaches gamma" onq hD ping -c1 -W1 "$C"
wait_for 10 "alpha reaches beta" onq hA ping -c1 -W1 "$B"
stop_registry

# beta_at NS NAME PREFIX: NAME's endpoint for beta starts with PREFIX.
beta_at() { local ep; ep=$(peer_of "$1" "$2" beta endpoint) && [[ $ep == "$3"* ]]; }

# 1. A revocation through a common peer.
pt hD delta trust revoke beta >&2 || true   # the registry is away: queued on disk
peer_is hD delta beta state revoked trust list || fail "delta does not show beta as revoked"
wait_for 10 "beta hears delta's revocation through gamma" \
  peer_is hB beta delta state revoked-by-peer trust list
peer_is hB beta delta session false || fail "beta kept its session with delta"
pass "a revocation made during the outage reached its subject through a common peer"

# 2. Both ends move; gamma tells.
node_down hA alpha
for h in hA:203.0.113.10:203.0.113.30 hB:203.0.113.11:203.0.113.31; do
  IFS=: read -r ns old new <<<"$h"
  onq "$ns" sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1
  on "$ns" ip addr add "$new/24" dev eth0
  on "$ns" ip addr del "$old/24" dev eth0
done
# Beta's session with gamma follows beta (gamma did not move), and beta's
# gossip hands gamma its new signed endpoints.
wait_for 10 "beta reaches gamma from its new address" onq hB ping -c1 -W1 "$C"
wait_for 10 "gamma sees beta at its new address" beta_at hC gamma 203.0.113.31:
node_up hA alpha >/dev/null
grep -q "up: $A/" "$WORK/alpha.up" || fail "alpha did not come up on its cached address $A: $(cat "$WORK/alpha.up")"
T0=$(now_ms)
wait_for 30 "alpha reaches beta at its new address, told by gamma" onq hA ping -c1 -W1 "$B"
T1=$(now_ms)
log "alpha found beta in $((T1 - T0)) ms after coming back"
beta_at hA alpha 203.0.113.31: || fail "alpha reaches beta by $(peer_of hA alpha beta endpoint), not at beta's new address"
transfer_ok hA hB "$B" 200000 moved
pass "with the registry down, alpha found beta again through gamma after both moved"
