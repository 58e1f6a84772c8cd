#!/usr/bin/env bash
# s28 — join tokens: under --require-token only a node with a valid token
# joins, and the operator sees the nodes.
#
#                 192.0.2.0/24 (bridge br0 in namespace "sw")
#   +----------------+   +---------+   +---------+   +---------+
#   |      reg       |   |    a    |   |    b    |   |    c    |
#   |    registry    |   |  alpha  |   |  beta   |   |  gamma  |
#   | --require-token|   |   .11   |   |   .12   |   |   .13   |
#   |       .1       |   +----+----+   +----+----+   +----+----+
#   +-------+--------+        |             |             |
#   ========+=================+=============+=============+======  br0
#
# 1. alpha joins with the plain join URL: `pilot-tun up` fails and says a
#    join token is needed.
# 2. `pilot-registry token create --uses 2`: alpha and beta join with the
#    URL it prints, trust each other and ping over 10.x.
# 3. gamma joins with the same URL: refused, the token is used up.
# 4. `pilot-registry nodes list --json` shows alpha and beta, on the
#    addresses they have, and not gamma; `token list` shows 2/2 used;
#    `nodes remove beta` leaves alpha alone in the list.
SCENARIO=s28_quotas
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping python3 timeout; do need "$t"; done

switch sw
mkns reg; mkns a; mkns b; mkns c
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug c sw 192.0.2.13/24

start_registry reg 192.0.2.1 --require-token
REGCMD=("$BIN/pilot-registry" --state-dir "$WORK/registry")

# --- 1. no token --------------------------------------------------------------
mkdir -p "$WORK/alpha"
if on_to "$WORK/alpha.refused" a "$BIN/pilot-tun" --state-dir "$WORK/alpha" up --name alpha --registry "$JOIN"; then
  fail "alpha came up without a join token"
fi
grep -q "only with a join token" "$WORK/alpha.refused" \
  || fail "up did not say a token is needed: $(cat "$WORK/alpha.refused")"
pass "without a token: $(grep -o 'the registry refused.*' "$WORK/alpha.refused" | head -1)"

# --- 2. a token for two nodes ---------------------------------------------------
on_to "$WORK/token" reg "${REGCMD[@]}" token create --uses 2 --expires 1h
URL=$(sed -n 's/^join: //p' "$WORK/token")
[[ $URL == "$JOIN?token="* ]] || fail "token create printed no join URL with a token: $(cat "$WORK/token")"
node_up a alpha --registry "$URL"
node_up b beta --registry "$URL"
A=$(addr_of a alpha); B=$(addr_of b beta)
trust_pair a alpha b beta
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed"
pass "alpha ($A) and beta ($B) joined with the token, trust each other, ping"

# --- 3. the token is used up ----------------------------------------------------
mkdir -p "$WORK/gamma"
if on_to "$WORK/gamma.refused" c "$BIN/pilot-tun" --state-dir "$WORK/gamma" up --name gamma --registry "$URL"; then
  fail "gamma came up with a used-up token"
fi
grep -q "used up" "$WORK/gamma.refused" || fail "up did not say the token is used up: $(cat "$WORK/gamma.refused")"
pass "a third node with the same token: $(grep -o 'the registry refused.*' "$WORK/gamma.refused" | head -1)"

# --- 4. what the operator sees --------------------------------------------------
on_to "$WORK/nodes.json" reg "${REGCMD[@]}" nodes list --json
python3 - "$WORK/nodes.json" "$A" "$B" <<'PY' || fail "nodes list --json: $(cat "$WORK/nodes.json")"
import json, sys
doc = json.load(open(sys.argv[1]))
got = sorted((n["hostname"], n["address"]) for n in doc["nodes"])
want = sorted([("alpha", sys.argv[2]), ("beta", sys.argv[3])])
assert got == want, (got, want)
PY
on_to "$WORK/tokens" reg "${REGCMD[@]}" token list
grep -q "2/2 used .*used up" "$WORK/tokens" || fail "token list: $(cat "$WORK/tokens")"
pass "nodes list --json shows alpha and beta only; token list shows it used up"
on reg "${REGCMD[@]}" nodes remove beta >&2
on_to "$WORK/nodes2.json" reg "${REGCMD[@]}" nodes list --json
python3 - "$WORK/nodes2.json" "$A" <<'PY' || fail "nodes list --json after remove: $(cat "$WORK/nodes2.json")"
import json, sys
doc = json.load(open(sys.argv[1]))
assert [(n["hostname"], n["address"]) for n in doc["nodes"]] == [("alpha", sys.argv[2])], doc
PY
pass "nodes remove beta: alpha is the only node listed"
