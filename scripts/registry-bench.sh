#!/usr/bin/env bash
# Benchmark: how much load one registry takes (issue 11). Simulated nodes in
# one process (tests/src/bin/registry-load: real UDP on loopback, real Noise
# sessions, real signatures) against
#
#   sqlite   one registry, its SQLite file in a temporary state dir
#   pg-1     one registry on a throwaway PostgreSQL (scripts/pg.sh)
#   pg-2     two registries on one PostgreSQL database, each its own
#            --state-dir holding a copy of the same registry.key; the
#            generator puts node g on instance g % 2 (they share nodes and
#            statements through the database)
#
# and for each, four phases, each bounded in count and time:
#
#   register    N fresh nodes: Noise IK handshake + signed Register
#   statements  N Approve statements (node g approves g+1), pushes acked
#   lookups     L lookups, each of a node that approved the asker (so the
#               registry reads the row, the approval and the asker's row,
#               and sends the peer a Punch)
#   burst       a STUN prober (every 5 ms) and a relayed stream (100 Mbit/s
#               offered, between two nodes that approved each other), 2 s
#               quiet, then B fresh registrations at once
#
# then the memory: the nodes table seeded directly (SQL or COPY) with
# 100,000 and 1,000,000 identities, the registry started on it, lookups of
# seeded addresses all over it, its VmRSS read.
#
# The nodes sit on many 127.x.y.z source addresses, 40 a socket (the
# registry takes 5 handshakes at once and 20/s, and 60 new ids a minute,
# per source address). The generator, the registry and PostgreSQL share
# the machine's cores, so next to each rate the table gives the CPU
# seconds per 1,000 operations of each process (utime + stime from
# /proc/<pid>/stat, PostgreSQL's backends included), and the targets are
# judged per core of registry CPU: operations / registry CPU seconds.
#
# Figures, not a test: it prints them and a comparison with the targets;
# nothing fails on a slow machine. It exits non-zero only when the setup
# breaks.
#
# Usage: scripts/registry-bench.sh [--quick] [--identities N] [--skip-1m] [--no-pg]
#   --quick          small counts (seconds; the suite's tests/tests/registry_bench.rs
#                    runs the generator itself)
#   --identities N   nodes registered per backend (default 20000)
#   --skip-1m        measure memory at 100,000 identities only
#   --no-pg          SQLite only (PostgreSQL needs root to install, or an
#                    installed server)
# Env: REGISTRY_BENCH_SKIP_BUILD=1   use the binaries already built
#      REGISTRY_BENCH_JSON=FILE      every phase's JSON line (default ./registry-bench.jsonl)
#
# Loopback only. Every process started here is stopped by its pid on exit,
# and the temporary directories are removed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

QUICK=0 N=20000 SKIP_1M=0 PG=1 INNER=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --identities) N=${2:?--identities needs a number}; shift ;;
    --skip-1m) SKIP_1M=1 ;;
    --no-pg) PG=0 ;;
    --pg-inner) INNER=${2:?}; shift ;;   # internal: the PostgreSQL half, under scripts/pg.sh
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    *) echo "registry-bench: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $N =~ ^[0-9]+$ && $N -ge 2 ]] || { echo "--identities must be a number >= 2" >&2; exit 2; }
if [ "$QUICK" = 1 ]; then
  N=300 STATEMENTS=300 LOOKUPS=2000 BURST=200 RSS_SMALL=5000 SKIP_1M=1
else
  STATEMENTS=$N LOOKUPS=$((N * 5)) BURST=2000 RSS_SMALL=100000
fi

step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "registry-bench: $*" >&2; exit 1; }

PIDS=()
WORK=
cleanup() {
  local rc=$? p i
  set +e
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

WORK=$(mktemp -d /tmp/registry-bench.XXXX)
chmod 755 "$WORK"
RES=${REGISTRY_BENCH_RES:-$WORK/results}
mkdir -p "$RES"

free_port() {
  python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_registry DIR PORT [ARGS...]: a registry on 127.0.0.1:PORT; sets REG_PID.
start_registry() {
  local dir=$1 port=$2 i
  shift 2
  mkdir -p "$dir"
  rm -f "$dir/join-url"
  "$BIN/pilot-registry" --listen "127.0.0.1:$port" --state-dir "$dir" --network 10.0.0.0/8 \
    --relay-mbps 1000 --relay-total-mbps 2000 --stun-alt-port 0 --log warn "$@" \
    >"$dir/registry.log" 2>&1 &
  REG_PID=$!
  PIDS+=("$REG_PID")
  for ((i = 0; i < 300; i++)); do
    [ -s "$dir/join-url" ] && return 0
    kill -0 "$REG_PID" 2>/dev/null || { cat "$dir/registry.log" >&2; die "the registry in $dir exited at start"; }
    sleep 0.1
  done
  die "the registry in $dir wrote no join URL within 30 s"
}

# stop_pid PID: SIGTERM, wait (5 s), SIGKILL.
stop_pid() {
  local p=$1 i
  kill -TERM "$p" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  local keep=() q
  for q in "${PIDS[@]+"${PIDS[@]}"}"; do [ "$q" = "$p" ] || keep+=("$q"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

# The postmaster of the cluster at URL (by its port on the command line).
postmaster_of() {
  local port=${1##*:}; port=${port%%/*}
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "/postgres .*-p $port " && { basename "$p"; return 0; }
  done
  return 1
}

# load LABEL [--watch-tree postgres=PID] -- JOIN...: the generator's phases.
load() {
  local label=$1 pm=$2; shift 2
  local joins=() rss=() p
  for p in "${REG_PIDS[@]}"; do rss+=("$p"); done
  for p in "$@"; do joins+=(--join "$p"); done
  local watch=(--watch "registry=$(IFS=,; echo "${REG_PIDS[*]}")" --rss "$(IFS=,; echo "${rss[*]}")")
  [ -z "$pm" ] || watch+=(--watch-tree "postgres=$pm")
  step "$label: $N nodes register, $STATEMENTS statements, $LOOKUPS lookups, a burst of $BURST"
  "$BIN/registry-load" run --label "$label" "${joins[@]}" "${watch[@]}" \
    --identities "$N" --statements "$STATEMENTS" --lookups "$LOOKUPS" --burst "$BURST" \
    | tee -a "$RES/phases.jsonl"
}

# memory LABEL COUNT [DBURL]: seed COUNT nodes, start a registry, look up
# seeded addresses, report its RSS.
memory() {
  local label=$1 count=$2 url=${3:-} dir="$WORK/mem-$1-$2" pm=
  step "$label: memory with $count seeded identities"
  local db=()
  [ -z "$url" ] || db=(--database "$url")
  start_registry "$dir" "$(free_port)" "${db[@]}"   # makes the schema
  stop_pid "$REG_PID"
  local t0=$SECONDS
  if [ -z "$url" ]; then
    "$BIN/registry-load" seed --count "$count" --format sqlite | sqlite3 "$dir/registry.db"
  else
    "$BIN/registry-load" seed --count "$count" --format pg \
      | psql -q -v ON_ERROR_STOP=1 "$url" -c "\\copy nodes (node_id, ed_public, static_pub, binding, address, reg_seq, endpoints) FROM STDIN WITH (FORMAT csv)"
    psql -q "$url" -c 'VACUUM ANALYZE nodes' >/dev/null
    pm=$(postmaster_of "$url" || true)
  fi
  echo "seeded $count rows in $((SECONDS - t0)) s" >&2
  start_registry "$dir" "$(free_port)" "${db[@]}"
  REG_PIDS=("$REG_PID")
  local watch=(--watch "registry=$REG_PID" --rss "$REG_PID")
  [ -z "$pm" ] || watch+=(--watch-tree "postgres=$pm")
  "$BIN/registry-load" run --label "$label-$count" --join "$(cat "$dir/join-url")" "${watch[@]}" \
    --identities 400 --statements 400 --lookups 20000 --burst 0 --seeded "$count" \
    | tee -a "$RES/phases.jsonl"
  stop_pid "$REG_PID"
}

# The PostgreSQL half runs under scripts/pg.sh (PILOT_TEST_PG set).
if [ -n "$INNER" ]; then
  RES=$INNER
  URL=${PILOT_TEST_PG:?run under scripts/pg.sh}
  PM=$(postmaster_of "$URL") || die "no postmaster found for $URL"
  base=${URL%/*}
  for db in one two mem1 mem2; do psql -q "$URL" -c "CREATE DATABASE $db" >/dev/null; done

  start_registry "$WORK/pg1" "$(free_port)" --database "$base/one"
  REG_PIDS=("$REG_PID")
  load pg-1 "$PM" "$(cat "$WORK/pg1/join-url")"
  stop_pid "$REG_PID"

  # Two instances, one database, one key.
  start_registry "$WORK/pg2a" "$(free_port)" --database "$base/two"
  A=$REG_PID
  mkdir -p "$WORK/pg2b"
  cp "$WORK/pg2a/registry.key" "$WORK/pg2b/registry.key"
  start_registry "$WORK/pg2b" "$(free_port)" --database "$base/two"
  REG_PIDS=("$A" "$REG_PID")
  load pg-2 "$PM" "$(cat "$WORK/pg2a/join-url")" "$(cat "$WORK/pg2b/join-url")"
  stop_pid "$REG_PID"; stop_pid "$A"

  memory pg "$RSS_SMALL" "$base/mem1"
  [ "$SKIP_1M" = 1 ] || memory pg 1000000 "$base/mem2"
  exit 0
fi

cd "$ROOT"
if [ "${REGISTRY_BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --locked --release -p pilot-registry -p pilot-tests --bins"
  cargo build --locked --release -p pilot-registry -p pilot-tests --bins
fi
for b in pilot-registry registry-load; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found (cargo build --release)"
done
command -v sqlite3 >/dev/null || die "sqlite3 (the command) is needed to seed the SQLite database: apt-get install sqlite3"
OUT=${REGISTRY_BENCH_JSON:-$PWD/registry-bench.jsonl}
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac

start_registry "$WORK/sqlite" "$(free_port)"
REG_PIDS=("$REG_PID")
load sqlite "" "$(cat "$WORK/sqlite/join-url")"
stop_pid "$REG_PID"
memory sqlite "$RSS_SMALL"
[ "$SKIP_1M" = 1 ] || memory sqlite 1000000

if [ "$PG" = 1 ]; then
  step "PostgreSQL (scripts/pg.sh)"
  pgargs=(--identities "$N")
  [ "$QUICK" = 0 ] || pgargs+=(--quick)
  [ "$SKIP_1M" = 0 ] || pgargs+=(--skip-1m)
  chmod 777 "$RES"
  "$HERE/pg.sh" "$0" "${pgargs[@]}" --pg-inner "$RES" \
    || echo "registry-bench: the PostgreSQL half failed (figures above are SQLite only)" >&2
fi

cp "$RES/phases.jsonl" "$OUT"
step "figures"
python3 - "$OUT" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cores, load = sys.argv[2], sys.argv[3]

def per1k(r, who):
    c = r["cpu_s"].get(who)
    return "-" if c is None or not r["ok"] else f"{c / r['ok'] * 1000:.3f}"

def percore(r):
    c = r["cpu_s"].get("registry", 0)
    return r["ok"] / c if c > 0 else float("nan")

print(f"\n{cores} cores shared by the generator, the registry and PostgreSQL; load average at the end {load}")
hdr = f"{'backend':<16} {'phase':<15} {'ok/ops':>13} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'reg CPU-s/1k':>12} {'gen CPU-s/1k':>12} {'pg CPU-s/1k':>11} {'ops/reg-core-s':>14} {'RSS MB':>10}"
print(hdr)
print("-" * len(hdr))
for r in rows:
    rss = "+".join(f"{k / 1024:.0f}" for k in r["registry_rss_kib"])
    print(f"{r['label']:<16} {r['phase']:<15} {str(r['ok']) + '/' + str(r['ops']):>13} {r['ops_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
          f"{per1k(r, 'registry'):>12} {per1k(r, 'generator'):>12} {per1k(r, 'postgres'):>11} {percore(r):>14.0f} {rss:>10}")
for r in rows:
    b = r.get("burst")
    if b:
        print(f"{r['label']:<16} burst: STUN p50/p99 quiet {b['stun_quiet_p50_ms']:.2f}/{b['stun_quiet_p99_ms']:.2f} ms, "
              f"during {b['stun_burst_p50_ms']:.2f}/{b['stun_burst_p99_ms']:.2f} ms ({b['stun_lost']} of {b['stun_samples']} lost); "
              f"relayed {b['relay_quiet_mbps']:.0f} -> {b['relay_burst_mbps']:.0f} Mbit/s of {b['relay_offered_mbps']:.0f} offered")

def find(label, phase):
    return next((r for r in rows if r["label"] == label and r["phase"] == phase), None)

print("\ntargets (rates per core of registry CPU: ops / registry CPU-seconds):")
def verdict(ok):
    return "met" if ok else "NOT met"
for label in ("sqlite", "pg-1"):
    r = find(label, "lookups")
    if r:
        pc = percore(r)
        print(f"  >= 20,000 lookups/s per instance on one core ({label}): {pc:,.0f}/s per registry core "
              f"({r['ops_per_s']:,.0f}/s wall) -> {verdict(pc >= 20000)}")
one, two = find("pg-1", "lookups"), find("pg-2", "lookups")
if one and two:
    ratio = two["ops_per_s"] / one["ops_per_s"] if one["ops_per_s"] else float("nan")
    pc1, pc2 = percore(one), percore(two)
    print(f"  two instances >= 1.7x one: {ratio:.2f}x wall ({two['ops_per_s']:,.0f} vs {one['ops_per_s']:,.0f}/s; "
          f"per registry core {pc2:,.0f} vs {pc1:,.0f}: two instances on {cores} shared cores cannot show the "
          f"scaling of two machines) -> {verdict(ratio >= 1.7)}")
for r in rows:
    if r["phase"] == "seeded-lookups" and r["identities"] >= 1_000_000:
        mb = max(r["registry_rss_kib"]) / 1024
        print(f"  1,000,000 identities under 500 MB RSS ({r['label']}): {mb:.0f} MB -> {verdict(mb < 500)}")
for r in rows:
    b = r.get("burst")
    if b:
        print(f"  STUN p99 under 5 ms during the burst ({r['label']}): {b['stun_burst_p99_ms']:.2f} ms -> {verdict(b['stun_burst_p99_ms'] < 5)}")
print(f"\nJSON lines: {sys.argv[1]}")
PY
