#!/usr/bin/env bash
# s16 — crashes: SIGKILL the daemons and the registry, again and again,
# during transfers and trust changes; nothing is lost.
#
#                  192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------+   +---------+   +---------+   +---------+   +---------+
#   |   reg   |   |    a    |   |    b    |   |    c    |   |    d    |
#   |registry |   |  alpha  |   |  beta   |   |  gamma  |   |  delta  |
#   |   .1    |   |   .11   |   |   .12   |   |   .13   |   |   .14   |
#   +----+----+   +----+----+   +----+----+   +----+----+   +----+----+
#   =====+=============+=============+=============+=============+=====  br0
#
#   trusted, never touched: alpha-beta, alpha-gamma, gamma-delta
#   changing every round:   beta-delta (revoked by beta, granted again, ...)
#   a worker sends 2 MB alpha <-> beta (sha256 checked) the whole time
#
# Each round (CRASH_ROUNDS, default 10; `scripts/stress.sh crashes` runs 100)
# picks a target at random (one of the four daemons, or the registry; each
# at least once when there are 5 rounds or more), snapshots every node
# (node id, address, hostname, trust records and their states), starts the
# next change on the beta-delta edge, and SIGKILLs the target 0-300 ms
# later. Then:
#   - the dead daemon's node.json and trust.json parse, the registry's
#     SQLite files pass `PRAGMA integrity_check` (nothing half-written);
#   - the target starts again, clean: same node id and address (a daemon),
#     same key and join URL (the registry);
#   - every node's snapshot is as before (no identity, address or trust
#     record lost or changed), apart from the edge being changed;
#   - a daemon's sessions are back: a ping answers both ways with each of
#     its trusted peers within 10 s of `up` returning (the time is printed,
#     and the time `up` took; the goal is 2 s); after a registry crash
#     every node reaches the registry again within 30 s;
#   - a change the CLI acknowledged (exit 0) is in the restarted daemon's
#     records, and the edge converges on both sides (a change that was not
#     acknowledged is issued again first);
#   - transfers alpha <-> beta: every one that did not overlap a crash of
#     alpha or beta arrived whole (a registry crash may not break one).
# Figures: how long `up` takes after a crash, sessions back after it
# (p50/p99/max, from `up` returning and from the SIGKILL), registry
# reachable again, transfers.
# CRASH_JSON=<file> writes them as JSON (`scripts/stress.sh crashes --json`).
SCENARIO=${SCENARIO:-s16_crashes}
source "$(dirname "$0")/lib.sh"
setup_lab
reap_on_exit
for t in ip ping nc python3 timeout sha256sum; do need "$t"; done
ROUNDS=${CRASH_ROUNDS:-10}
SEED=${CRASH_SEED:-$(( $(date +%s) % 32768 ))}
RANDOM=$SEED
log "$ROUNDS rounds, seed $SEED (CRASH_SEED=$SEED repeats the choices)"

switch sw
mkns reg; plug reg sw 192.0.2.1/24
NODES=(a:alpha:11 b:beta:12 c:gamma:13 d:delta:14)
for n in "${NODES[@]}"; do IFS=: read -r ns name ip <<<"$n"; mkns "$ns"; plug "$ns" sw "192.0.2.$ip/24"; done
start_registry reg 192.0.2.1
JOIN0=$JOIN
declare -A NS_OF ADDR ID
for n in "${NODES[@]}"; do
  IFS=: read -r ns name ip <<<"$n"
  node_up "$ns" "$name" --registry "$JOIN" >/dev/null
  NS_OF[$name]=$ns; ADDR[$name]=$(addr_of "$ns" "$name"); ID[$name]=$(status_of "$ns" "$name" node_id)
done
trust_pair a alpha b beta
trust_pair a alpha c gamma
trust_pair c gamma d delta
trust_pair b beta d delta
# Trusted peers of each node, for the "sessions back" check.
declare -A PEERS=([alpha]="beta gamma" [beta]="alpha" [gamma]="alpha delta" [delta]="gamma")
for n in alpha gamma; do
  for p in ${PEERS[$n]}; do wait_for 10 "$n reaches $p" ping_until "${NS_OF[$n]}" "${ADDR[$p]}" 1; done
done

# snapshot NAME: node id, address and hostname of NAME, and its trust
# records (peer, address, hostname, state, ours, theirs), sorted; the
# beta-delta edge is left out (it changes on purpose).
SNAP='
import json, sys
st, tl, skip = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print("self", st["node_id"], st["address"], st["hostname"])
for r in sorted(tl, key=lambda r: r["node_id"]):
    if r["node_id"] != skip:
        print("peer", r["node_id"], r["address"], r["hostname"], r["state"], r["ours"], r["theirs"])
'
snapshot() {
  local name=$1 ns=${NS_OF[$1]} skip=none
  case $name in beta) skip=${ID[delta]} ;; delta) skip=${ID[beta]} ;; esac
  python3 -c "$SNAP" "$(ptq "$ns" "$name" --json status)" "$(ptq "$ns" "$name" --json trust list)" "$skip"
}
snapshot_all() { local n; for n in alpha beta gamma delta; do snapshot "$n"; done; }

# state_files_parse NAME: the daemon's JSON state files load.
state_files_parse() {
  local f
  for f in "$WORK/$1"/*.json; do
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$f" \
      || fail "$1's $f does not parse after the crash: $(head -c 300 "$f" | od -c | head -5)"
  done
}
# registry_db_ok: every SQLite file in the registry's state dir passes
# integrity_check (opened read-only, the WAL included).
registry_db_ok() {
  python3 - "$WORK/registry" <<'PY' || fail "the registry's database is damaged after the crash"
import glob, sqlite3, sys
n = 0
for f in glob.glob(sys.argv[1] + "/*"):
    with open(f, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            continue
    n += 1
    r = sqlite3.connect(f"file:{f}?mode=ro", uri=True).execute("PRAGMA integrity_check").fetchall()
    if r != [("ok",)]:
        sys.exit(f"{f}: {r}")
if n == 0:
    sys.exit("no SQLite file in the registry's state dir")
PY
}

# The edge under change. edge_is BETA_STATE DELTA_STATE: both sides show it.
edge_is() {
  peer_is b beta delta state "$1" trust list && peer_is d delta beta state "$2" trust list
}

# The traffic worker: 2 MB alpha <-> beta, alternating, until told to stop.
# One line per transfer in xfers: START_MS END_MS ok|fail WHY.
head -c 2M /dev/urandom >"$WORK/blob"
traffic() {
  local i=0 t0 from to fns tns addr
  while [ ! -e "$WORK/stop" ]; do
    i=$((i + 1))
    if [ $((i % 2)) -eq 1 ]; then from=alpha to=beta; else from=beta to=alpha; fi
    t0=$(now_ms)
    if xfer_try "${NS_OF[$from]}" "${NS_OF[$to]}" "${ADDR[$to]}" 9000 "$WORK/blob" "x$i" 30; then
      echo "$t0 $(now_ms) ok $from->$to" >>"$WORK/xfers"
    else
      echo "$t0 $(now_ms) fail $from->$to $XFER_WHY" >>"$WORK/xfers"
    fi
    sleep 0.2
  done
}
: >"$WORK/xfers"
bg_fn traffic traffic

# trust_op KIND K: start the next change of the edge in the background:
# "revoke" (beta revokes delta) or "grant" (beta asks, delta approves).
# Each command's exit status goes to $WORK/op-K-<who>.rc.
trust_op() {
  OPS=(beta)
  if [ "$1" = revoke ]; then
    bg b "op-$2-beta" sh -c '"$@"; echo $? >'"$WORK/op-$2-beta.rc" sh \
      "$BIN/pilot-tun" --state-dir "$WORK/beta" trust revoke delta
  else
    bg b "op-$2-beta" sh -c '"$@"; echo $? >'"$WORK/op-$2-beta.rc" sh \
      "$BIN/pilot-tun" --state-dir "$WORK/beta" trust request delta --note "round $2"
    OPS+=(delta)
    bg d "op-$2-delta" sh -c '"$@"; echo $? >'"$WORK/op-$2-delta.rc" sh \
      "$BIN/pilot-tun" --state-dir "$WORK/delta" trust approve beta
  fi
}
# redo_op KIND: issue the change again, in the foreground, until the CLI
# acknowledges it (the registry may still be on its way back).
redo_op() {
  local try
  for try in 1 2 3 4 5 6; do
    if [ "$1" = revoke ]; then
      ptq b beta trust revoke delta >/dev/null 2>&1 && return 0
    else
      ptq b beta trust request delta >/dev/null 2>&1 && ptq d delta trust approve beta >/dev/null 2>&1 && return 0
    fi
    sleep 2   # the registry or the daemon is still coming back
  done
  fail "the CLI did not acknowledge '$1' on the beta-delta edge in 6 tries"
}

TARGETS=(alpha beta gamma delta registry)
# With 5 rounds or more, every target once (in a random order), then at random.
ORDER=()
if [ "$ROUNDS" -ge 5 ]; then
  mapfile -t ORDER < <(printf '%s\n' "${TARGETS[@]}" | python3 -c 'import random, sys; r = random.Random(int(sys.argv[1])); l = sys.stdin.read().split(); r.shuffle(l); print("\n".join(l))' "$SEED")
fi
: >"$WORK/back.ms"; : >"$WORK/back-crash.ms"; : >"$WORK/up.ms"; : >"$WORK/reg-back.ms"; : >"$WORK/windows"
KIND=revoke
for ((k = 1; k <= ROUNDS; k++)); do
  target=${ORDER[k-1]:-${TARGETS[RANDOM % 5]}}
  snapshot_all >"$WORK/snap-before"
  trust_op "$KIND" "$k"
  sleep "0.$(printf '%03d' $((RANDOM % 300)))"   # the crash lands somewhere in the change
  if [ "$target" = registry ]; then
    t_kill=$(now_ms)
    stop_bg registry KILL
    registry_db_ok
    start_registry reg 192.0.2.1
    [ "$JOIN" = "$JOIN0" ] || fail "round $k: the registry came back with another join URL (key lost): $JOIN"
    t_up=$(now_ms)
    for n in alpha beta gamma delta; do
      wait_for 30 "round $k: $n reaches the registry again" status_is "${NS_OF[$n]}" "$n" registry.reachable true
    done
    echo $(( $(now_ms) - t_up )) >>"$WORK/reg-back.ms"
    echo "$t_kill $(now_ms) registry" >>"$WORK/windows"
    what="registry back for every node after $(( $(now_ms) - t_up )) ms"
  else
    ns=${NS_OF[$target]}
    node_crash "$ns" "$target"
    t_kill=$CRASH_MS
    state_files_parse "$target"
    t_restart=$(now_ms)
    node_up "$ns" "$target" >/dev/null
    t_up=$(now_ms)
    echo $(( t_up - t_restart )) >>"$WORK/up.ms"
    [ "$(status_of "$ns" "$target" node_id)" = "${ID[$target]}" ] || fail "round $k: $target came back with another node id"
    [ "$(addr_of "$ns" "$target")" = "${ADDR[$target]}" ] || fail "round $k: $target came back with another address"
    for p in ${PEERS[$target]}; do
      ping_until "${NS_OF[$p]}" "${ADDR[$target]}" 10 || fail "round $k: $p -> $target: no answer within 10 s of the restart"
      ping_until "$ns" "${ADDR[$p]}" 10 || fail "round $k: $target -> $p: no answer within 10 s of the restart"
    done
    t_back=$(now_ms)
    echo $(( t_back - t_up )) >>"$WORK/back.ms"
    echo $(( t_back - t_kill )) >>"$WORK/back-crash.ms"
    echo "$t_kill $t_back $target" >>"$WORK/windows"
    what="sessions back $(( t_back - t_up )) ms after \`up\` returned ($(( t_up - t_restart )) ms), $(( t_back - t_kill )) ms after the crash"
  fi
  # The change's commands end (they give up after 15 s without an answer).
  acked=1
  for who in "${OPS[@]}"; do
    wait_bg_exit 25 "op-$k-$who"
    [ "$(cat "$WORK/op-$k-$who.rc" 2>/dev/null)" = 0 ] || acked=0
  done
  snapshot_all >"$WORK/snap-after"
  diff "$WORK/snap-before" "$WORK/snap-after" >&2 \
    || fail "round $k ($target killed): a node's identity, address or trust records changed (diff above: < before, > after)"
  if [ "$KIND" = revoke ]; then want="revoked revoked-by-peer"; else want="trusted trusted"; fi
  if [ "$acked" = 1 ] && [ "$target" = beta ]; then
    # Acknowledged, then the daemon died: the change must be on disk.
    peer_is b beta delta ours "$([ "$KIND" = revoke ] && echo revoked || echo approved)" trust list \
      || fail "round $k: beta acknowledged '$KIND' and lost it in the crash"
  fi
  if [ "$acked" = 0 ]; then
    log "round $k: the '$KIND' was not acknowledged (its daemon or the registry died): issuing it again"
    redo_op "$KIND"
  fi
  wait_for 40 "round $k: the beta-delta edge converges on '$want' (${KIND}, acknowledged=$acked)" edge_is $want
  log "round $k: killed $target during '$KIND' (acknowledged=$acked): records intact, $what"
  if [ "$KIND" = revoke ]; then KIND=grant; else KIND=revoke; fi
done

touch "$WORK/stop"
wait_fn 40 traffic

# Transfers: those that overlap a crash of alpha or beta may break; none else.
read -r total ok hit broke clean_fail < <(python3 - "$WORK/xfers" "$WORK/windows" <<'PY'
import sys
wins = [l.split() for l in open(sys.argv[2]) if l.strip()]
wins = [(int(a), int(b), t) for a, b, t in wins if t in ("alpha", "beta")]
total = ok = hit = broke = clean_fail = 0
for l in open(sys.argv[1]):
    f = l.split(maxsplit=3)
    if len(f) < 3:
        continue
    s, e, res = int(f[0]), int(f[1]), f[2]
    total += 1
    ok += res == "ok"
    overlaps = any(s <= b and e >= a for a, b, _ in wins)
    hit += overlaps
    broke += overlaps and res != "ok"
    clean_fail += (not overlaps) and res != "ok"
print(total, ok, hit, broke, clean_fail)
PY
)
log "transfers alpha <-> beta: $total, $ok whole; $hit overlapped a crash of alpha or beta ($broke of those broke); $clean_fail others failed"
[ "$clean_fail" -eq 0 ] || { grep fail "$WORK/xfers" >&2; fail "$clean_fail transfers failed that no crash of alpha or beta explains"; }
[ "$ok" -gt 0 ] || fail "no transfer completed"

BACK=$(stats_ms "$WORK/back.ms"); BACKK=$(stats_ms "$WORK/back-crash.ms"); REG=$(stats_ms "$WORK/reg-back.ms")
log "figure: \`pilot-tun up\` after a crash, until it returns (ms): $(stats_ms "$WORK/up.ms")"
log "figure: sessions back after a daemon restart (ms from \`up\` returning to a ping both ways with every trusted peer): $BACK"
log "figure: sessions back after a daemon crash (ms from the SIGKILL): $BACKK"
log "figure: every node reaches the registry again after its restart (ms): $REG"
if [ -n "${CRASH_JSON:-}" ]; then
  python3 - "$CRASH_JSON" "$ROUNDS" "$SEED" "$WORK/back.ms" "$WORK/back-crash.ms" "$WORK/reg-back.ms" \
    "$total" "$ok" "$hit" "$broke" "$WORK/up.ms" <<'PY'
import json, sys
out, rounds, seed, back, backk, reg = sys.argv[1:7]
total, ok, hit, broke = map(int, sys.argv[7:11])
ms = lambda f: [int(l) for l in open(f) if l.strip()]
json.dump({"rounds": int(rounds), "seed": int(seed), "up_ms": ms(sys.argv[11]), "sessions_back_ms": ms(back),
           "sessions_back_from_kill_ms": ms(backk), "registry_back_ms": ms(reg),
           "transfers": total, "transfers_ok": ok, "transfers_overlapping_a_crash": hit,
           "transfers_broken_by_a_crash": broke}, open(out, "w"), indent=2)
PY
fi
pass "$ROUNDS crashes (seed $SEED): no identity, address or trust record lost, state files intact, sessions back, $ok/$total transfers whole"
