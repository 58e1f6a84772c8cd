#!/usr/bin/env bash
# s25 — the registry on PostgreSQL: what it stored survives kill -9.
#
#                    192.0.2.0/24 (bridge br0 in namespace "sw")
#   +---------------------+     +---------+     +---------+     +---------+
#   |         reg         |     |    a    |     |    b    |     |    d    |
#   | registry --database |     |  alpha  |<===>|  beta   |     |  delta  |
#   |  postgres on its    |     |   .11   |trust|   .12   |     | .14 late|
#   |  own 127.0.0.1:5432 |     +----+----+     +----+----+     +----+----+
#   |         .1          |          |               |               |
#   +----------+----------+          |               |               |
#   ===========+=====================+===============+===============+====  br0
#
# A throwaway PostgreSQL cluster (scripts/pg.sh init/serve: initdb in the
# work directory, run as nobody) listens on the loopback of the registry's
# namespace only; the registry keeps everything there (--database), nothing
# in a SQLite file.
# 1. alpha and beta join and trust each other; ping over 10.x. The nodes,
#    their addresses and both approvals are rows in PostgreSQL.
# 2. kill -9 the registry; start it again on the same database: the rows
#    are all there, alpha and beta register again on their addresses, the
#    ping still works both ways.
# 3. a new node delta joins the restarted registry: it gets a fresh address
#    (the pool read A and B as taken from the database), asks alpha by
#    hostname (the name came from the database), alpha approves, they ping.
# 4. a registry given a wrong password stops at once and says why.
SCENARIO=s25_postgres
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip ping python3 timeout setpriv psql; do need "$t"; done
PG="$ROOT/scripts/pg.sh"

switch sw
mkns reg; mkns a; mkns b; mkns d
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24
plug b sw 192.0.2.12/24
plug d sw 192.0.2.14/24

# --- PostgreSQL in the registry's namespace ---------------------------------
# The cluster's user (nobody) must reach its directory inside $WORK: let
# others traverse $WORK (not list it; the state dirs in it are 0700).
chmod o+x "$WORK"
"$PG" init "$WORK/pg"
bg reg postgres "$PG" serve "$WORK/pg" 5432
DB=$(on reg "$PG" url "$WORK/pg" 5432)
sql() { onq reg psql "$DB" -qAt -v ON_ERROR_STOP=1 -c "$1"; }
log "PostgreSQL $(sql 'SHOW server_version') on the registry's 127.0.0.1:5432"

start_registry reg 192.0.2.1 --database "$DB"
JOIN0=$JOIN
wait_for 5 "the registry says it uses PostgreSQL (no password shown)" \
  grep -q "database: postgres://pilot@127.0.0.1:5432/pilot\$" "$WORK/registry.log"
! grep -qF "$(cat "$WORK/pg/password")" "$WORK/registry.log" \
  || fail "the registry printed the database password"
version=$(sql 'SELECT version FROM schema_version')
[[ $version =~ ^[1-9][0-9]*$ ]] || fail "no schema version in the database: '$version'"
log "the registry made the tables: schema version $version"

# --- 1. join, trust, traffic ---------------------------------------------------
node_up a alpha --registry "$JOIN"
node_up b beta --registry "$JOIN"
A=$(addr_of a alpha); B=$(addr_of b beta)
log "alpha=$A beta=$B"
trust_pair a alpha b beta
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed after trust"
on b ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "beta -> alpha ping failed after trust"
[ ! -e "$WORK/registry/registry.db" ] || fail "the registry made a SQLite file although --database was given"

# addr_in_db NAME: the address stored for hostname NAME, as a dotted quad.
addr_in_db() {
  sql "SELECT (address >> 24) || '.' || (address >> 16 & 255) || '.' || (address >> 8 & 255) || '.' || (address & 255) FROM nodes WHERE hostname = '$1'"
}
approvals() { sql 'SELECT count(*) FROM statements WHERE approves'; }
[ "$(addr_in_db alpha)" = "$A" ] && [ "$(addr_in_db beta)" = "$B" ] \
  || fail "PostgreSQL holds alpha=$(addr_in_db alpha) beta=$(addr_in_db beta), the nodes say $A $B"
[ "$(approvals)" = 2 ] || fail "PostgreSQL holds $(approvals) approvals, want 2 (alpha->beta, beta->alpha)"
pass "alpha ($A) and beta ($B) joined, trust each other, ping; nodes and approvals are rows in PostgreSQL"

# --- 2. kill -9 the registry, start it on the same database -------------------
log "SIGKILL to the registry (pid $(bg_pid registry))"
stop_bg registry KILL
start_registry reg 192.0.2.1 --database "$DB"
[ "$JOIN" = "$JOIN0" ] || fail "the join URL changed across the restart: $JOIN0 -> $JOIN"
[ "$(sql 'SELECT count(*) FROM nodes')" = 2 ] || fail "nodes after the crash: $(sql 'SELECT count(*) FROM nodes'), want 2"
[ "$(addr_in_db alpha)" = "$A" ] && [ "$(addr_in_db beta)" = "$B" ] || fail "addresses changed in the database across the crash"
[ "$(approvals)" = 2 ] || fail "approvals after the crash: $(approvals), want 2"
# The nodes notice the new registry process and register again: the new
# process logs each registration (its log starts empty).
registered_again() { grep -q "registered id=$(status_of "$1" "$2" node_id) " "$WORK/registry.log"; }
wait_for 40 "alpha registers with the restarted registry" registered_again a alpha
wait_for 40 "beta registers with the restarted registry" registered_again b beta
grep "registered id=" "$WORK/registry.log" >&2
[ "$(addr_of a alpha)" = "$A" ] && [ "$(addr_of b beta)" = "$B" ] || fail "a node's address changed after the registry restart"
on a ping -c3 -i0.2 -W2 "$B" >/dev/null || fail "alpha -> beta ping failed after the registry restart"
on b ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "beta -> alpha ping failed after the registry restart"
pass "registry killed (-9) and restarted on the same database: same key, 2 nodes and 2 approvals kept, both registered again, ping both ways"

# --- 3. a new node after the restart ------------------------------------------
node_up d delta --registry "$JOIN"
D=$(addr_of d delta)
[ "$D" != "$A" ] && [ "$D" != "$B" ] || fail "delta was given an address already in use: $D"
[ "$(addr_in_db delta)" = "$D" ] || fail "delta's address in PostgreSQL is $(addr_in_db delta), it says $D"
trust_pair d delta a alpha
on d ping -c3 -i0.2 -W2 "$A" >/dev/null || fail "delta -> alpha ping failed"
on a ping -c3 -i0.2 -W2 "$D" >/dev/null || fail "alpha -> delta ping failed"
[ "$(approvals)" = 4 ] || fail "approvals: $(approvals), want 4"
pass "delta ($D) joined the restarted registry, found alpha by name, trust and ping both ways"

# --- 4. a wrong password -------------------------------------------------------
bad=${DB/:$(cat "$WORK/pg/password")@/:wrong@}
mkdir -p "$WORK/reg2"
if on_to "$WORK/bad-password.txt" reg timeout 20 "$BIN/pilot-registry" --listen 192.0.2.1:7990 \
     --state-dir "$WORK/reg2" --database "$bad"; then
  fail "a registry with a wrong database password started"
fi
grep -q "cannot open the registry database postgres://pilot@127.0.0.1:5432/pilot" "$WORK/bad-password.txt" \
  && grep -q "password authentication failed" "$WORK/bad-password.txt" \
  || fail "the wrong password is not reported as such: $(cat "$WORK/bad-password.txt")"
! grep -q wrong "$WORK/bad-password.txt" || fail "the error printed the password"
pass "a wrong database password: the registry stops and says so ($(tail -n1 "$WORK/bad-password.txt" | cut -c1-160))"

stop_registry
stop_bg postgres INT
