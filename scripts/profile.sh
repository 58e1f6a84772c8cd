#!/usr/bin/env bash
# Profile: where the two pilot-tun daemons spend their CPU in the benchmark's
# TCP one-stream test (scripts/bench.sh, phase 2), as plain-text figures.
#
#   namespace "a" (client side)                 namespace "b" (server side)
#   +------------------------------+            +------------------------------+
#   | eth0    192.0.2.11/24        |====veth====| eth0    192.0.2.12/24        |
#   | pilot-registry :7946         |            |                              |
#   | pilot0  10.x  (alpha)        |            | pilot0  10.x  (beta)         |
#   | iperf3 -c                    |            | iperf3 -s                    |
#   +------------------------------+            +------------------------------+
#   perf record + perf stat attached to alpha's and beta's daemon (by pid)
#
# The lab and the pilot-tun pair come from scripts/bench/lab.sh, the same
# functions bench.sh uses. While iperf3 runs from a to b for
# PROFILE_SECONDS (one TCP stream unless PROFILE_TEST says otherwise), each daemon is sampled by `perf record` (with call
# graphs) and counted by `perf stat -e task-clock,context-switches,
# cpu-migrations,syscalls:sys_enter_{read,write,writev}`. For each daemon (alpha sends: TUN -> seal -> UDP; beta
# receives: UDP -> open -> TUN) it prints
#   - the 15 symbols with the most self time (samples in the symbol itself),
#   - the 15 symbols with the most inclusive time (samples with the symbol
#     anywhere on the call chain), leaving out the frames every stack
#     shares (thread start, std/core/alloc wrappers, tokio's runtime and
#     its task-budget scaffolding, the CLI's entry, unresolved addresses)
#     and showing one frame of a chain of wrappers with the same figure,
#   - the share of samples in the kernel and in user space, and the share
#     whose call chain passes through the scheduler (__schedule),
#   - context switches and CPU migrations per second, and CPUs used,
#   - read, write and writev calls per second and per MB received (the
#     TUN's: the sender reads it, the receiver writes it; one call per
#     packet or super-packet)
#     (task-clock / wall time),
# and the run's throughput and daemon CPU seconds per GB (as bench.sh counts
# it). The figures depend on the shared machine's load; nothing is asserted.
#
# Call graphs: the release build keeps no frame pointers, so `perf record -g`
# (frame-pointer unwinding) sees the kernel's stacks but loses user stacks
# after the first frame. The default is therefore DWARF unwinding, which
# gives inclusive times for our own functions too; PROFILE_CALLGRAPH=fp
# gives plain `-g` (cheaper to record and to report).
#
# Usage:   sudo scripts/profile.sh
# Env:     PROFILE_SECONDS   seconds of iperf3 under the profiler (default 5)
#          PROFILE_TEST      tcp1 (default: TCP, 1 stream), tcp4 (TCP, 4
#                            streams) or udp64 (UDP datagrams of 64 B at full
#                            speed, as bench.sh's small-packet test)
#          PROFILE_FREQ      samples per second per thread (default 499)
#          PROFILE_CALLGRAPH dwarf (default) or fp
#          PROFILE_OUT       also keep the perf.data files in this directory
#          BENCH_SKIP_BUILD=1 / PILOT_BIN   as for scripts/bench.sh
#          NETNS_KEEP=1      keep the work directory
#
# Network safety: as bench.sh (traffic only between the two namespaces made
# here; 192.0.2.0/24 underlay; 10.x only on the TUN devices inside them).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SECS=${PROFILE_SECONDS:-5}
FREQ=${PROFILE_FREQ:-499}
CALLGRAPH=${PROFILE_CALLGRAPH:-dwarf}
TEST=${PROFILE_TEST:-tcp1}
case "$TEST" in
  tcp1) TEST_ARGS=(); TEST_NAME="TCP 1 stream" ;;
  tcp4) TEST_ARGS=(-P 4); TEST_NAME="TCP 4 streams" ;;
  udp64) TEST_ARGS=(-u -b 0 -l 64); TEST_NAME="UDP 64 B datagrams" ;;
  *) echo "PROFILE_TEST must be tcp1, tcp4 or udp64 (got '$TEST')" >&2; exit 2 ;;
esac
[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || { echo "PROFILE_SECONDS must be a positive integer (got '$SECS')" >&2; exit 2; }
[[ $FREQ =~ ^[0-9]+$ && $FREQ -ge 1 ]] || { echo "PROFILE_FREQ must be a positive integer (got '$FREQ')" >&2; exit 2; }
# shellcheck disable=SC2054  # "dwarf,16384" is one argument
case "$CALLGRAPH" in
  dwarf) CG=(--call-graph dwarf,16384) ;;
  fp) CG=(-g) ;;
  *) echo "PROFILE_CALLGRAPH must be dwarf or fp (got '$CALLGRAPH')" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "the profile creates network namespaces and TUN devices and attaches perf: run 'sudo scripts/profile.sh'" >&2; exit 1; }

cd "$ROOT"
source "$HERE/bench/lab.sh"

step "system packages (iperf3, perf, ...)"
scripts/deps.sh perf

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --locked --release --workspace --bins"
  cargo build --locked --release --workspace --bins
fi

SCENARIO=profile
PFX=ptp$$
source "$ROOT/netns-tests/lib.sh"
setup_lab
trap_errors
for t in ip ping iperf3 python3 ss timeout perf; do need "$t"; done
for b in pilot-tun pilot-registry; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b not found (build with cargo build --release, or set PILOT_BIN)"
done
RES=$WORK/results
mkdir -p "$RES"

bench_lab
step "pilot-tun pair"
pilot_pair
wait_for 15 "ping alpha -> beta over pilot-tun" onq a ping -c1 -W1 "$B"
log "pilot-tun: alpha=$A (pid $PA) beta=$B (pid $PB)"
sleep 2   # settle after the handshake, as bench.sh does

# The profilers run a little longer than iperf3 (which starts after them
# and waits for its server), so the whole transfer is sampled.
PSECS=$(( SECS + 2 ))
step "perf on both daemons (${CALLGRAPH} call graphs, ${FREQ} Hz), iperf3 ${TEST_NAME} for ${SECS}s"
for side in a b; do
  p=$PA; [ $side = b ] && p=$PB
  bg a "perf-record-$side" perf record -F "$FREQ" "${CG[@]}" -p "$p" -o "$WORK/perf-$side.data" -- sleep "$PSECS"
  bg a "perf-stat-$side" perf stat -x, -e task-clock,context-switches,cpu-migrations,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_writev -p "$p" -o "$WORK/stat-$side.csv" -- sleep "$PSECS"
done
T0=$(date +%s%N)
iperf pilot-tun "$TEST" "$B" "$PA $PB" -- "${TEST_ARGS[@]}"
for side in a b; do
  wait_bg_exit $(( PSECS + 30 )) "perf-record-$side"
  wait_bg_exit 30 "perf-stat-$side"
done
log "profiled for $(( ($(date +%s%N) - T0) / 1000000 )) ms (iperf3 ${SECS}s inside)"

step "reports (perf report; DWARF unwinding takes a while)"
for side in a b; do
  perf report -i "$WORK/perf-$side.data" --no-children --sort sym -g none --stdio -q \
    --percent-limit 0 >"$RES/self-$side.txt" 2>/dev/null || true
  perf report -i "$WORK/perf-$side.data" --children --sort sym -g none --stdio -q \
    --percent-limit 0 >"$RES/children-$side.txt" 2>/dev/null || true
done
if [ -n "${PROFILE_OUT:-}" ]; then
  mkdir -p "$PROFILE_OUT"
  cp "$WORK"/perf-?.data "$WORK"/stat-?.csv "$RES"/*.txt "$PROFILE_OUT"/
fi

python3 - "$RES" "$WORK" "$PSECS" "$(getconf CLK_TCK)" "$CALLGRAPH" "$FREQ" "$TEST" "$TEST_NAME" <<'EOF'
import json, os, re, sys

res, work, psecs, clk, callgraph, freq, test, test_name = sys.argv[1:9]
psecs, clk = float(psecs), float(clk)

def rows(path):
    """(percent columns..., mode, symbol) from a perf report --stdio -q."""
    out = []
    if not os.path.exists(path):
        return out
    for line in open(path, errors="replace"):
        m = re.match(r"\s*((?:[0-9.]+%\s+)+)\[(.)\]\s+(.*\S)\s*$", line)
        if m:
            pcts = [float(x) for x in re.findall(r"([0-9.]+)%", m.group(1))]
            out.append((pcts, m.group(2), m.group(3)))
    return out

# Frames on (nearly) every stack, which say nothing about where time goes.
SCAFFOLD = re.compile(r"^(<?(std|core|alloc)::|<(std|core|alloc)::|clone3$|start_thread$|"
                      r"<?tokio::(runtime|loom)::|tokio::task::coop::|__libc_start|_start$|main$|"
                      r"pilot_tun::(cli|main)::|0x[0-9a-f]+$)")


def short(sym, n=90):
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    return sym if len(sym) <= n else sym[: n - 1] + "…"

def stat(path):
    d = {}
    if os.path.exists(path):
        for line in open(path):
            f = line.strip().split(",")
            if len(f) >= 3 and f[0] and f[0][0].isdigit():
                d[f[2]] = float(f[0])
    return d

tcp = {}
try:
    with open(os.path.join(res, "pilot-tun", f"{test}.json")) as f:
        end = json.load(f)["end"]
    if test == "udp64":
        r = end["sum"]
        arrived = r["packets"] - r["lost_packets"]
        tcp = {"bps": r["bits_per_second"], "bytes": arrived * 64,
               "pps": arrived / r["seconds"]}
    else:
        r = end["sum_received"]
        tcp = {"bps": r["bits_per_second"], "bytes": r["bytes"]}
except (OSError, ValueError, KeyError):
    pass
facts = {}
p = os.path.join(res, "pilot-tun", "facts.txt")
if os.path.exists(p):
    for line in open(p):
        k, _, v = line.strip().partition(" ")
        facts[k] = v
print()
print(f"pilot-tun profile: {test_name} a -> b, perf record -F {freq} ({callgraph} call graphs), "
      f"perf stat over {psecs:.0f} s")
if tcp:
    line = f"throughput {tcp['bps'] / 1e9:.2f} Gbit/s"
    if "pps" in tcp:
        line = f"{tcp['pps'] / 1e3:.0f} kpps arrived"
    if facts.get(f"cpu_ticks_{test}"):
        cpu = int(facts[f"cpu_ticks_{test}"]) / clk
        line += f"; daemons' CPU (both) {cpu:.2f} s = {cpu / (tcp['bytes'] / 1e9):.2f} s/GB"
    print(line)
for side, name, role in (("a", "alpha", "sender: TUN -> seal -> UDP"),
                         ("b", "beta", "receiver: UDP -> open -> TUN")):
    self_rows = rows(os.path.join(res, f"self-{side}.txt"))
    child_rows = rows(os.path.join(res, f"children-{side}.txt"))
    st = stat(os.path.join(work, f"stat-{side}.csv"))
    print()
    print(f"== {name} ({role})")
    total = sum(r[0][0] for r in self_rows) or float("nan")
    kern = sum(r[0][0] for r in self_rows if r[1] == "k")
    user = total - kern
    sched = max((r[0][0] for r in child_rows if r[2] in ("__schedule", "schedule")), default=0.0)
    print(f"samples: kernel {100 * kern / total:.1f}%, user {100 * user / total:.1f}%; "
          f"under the scheduler (__schedule inclusive) {sched:.1f}%")
    tc = st.get("task-clock")
    cs = st.get("context-switches")
    mig = st.get("cpu-migrations")
    if tc is not None:
        # task-clock in ms (what perf stat -x, prints), over the whole window
        print(f"perf stat over {psecs:.0f} s: {tc / 1000:.2f} CPU s ({tc / 1000 / psecs:.2f} CPUs); "
              f"{(cs or 0) / psecs:,.0f} context switches/s; {(mig or 0) / psecs:,.0f} CPU migrations/s")
    calls = [(n, st.get(f"syscalls:sys_enter_{n}")) for n in ("read", "write", "writev")]
    if all(c is not None for _, c in calls):
        mb = tcp.get("bytes", 0) / 1e6
        per = lambda c: f", {c / mb:,.1f}/MB" if mb else ""
        print("system calls: " + "; ".join(f"{n} {c / psecs:,.0f}/s{per(c)}" for n, c in calls))
    print(f"  top 15 by self time        self%  mode  symbol")
    for pcts, mode, sym in self_rows[:15]:
        print(f"  {'':24}  {pcts[0]:5.1f}%  {'kern' if mode == 'k' else 'user':4}  {short(sym)}")
    print(f"  top 15 by inclusive time   incl%  self%  mode  symbol")
    # A chain of wrappers (inlined layers of one call) shares one inclusive
    # figure: one line for each such figure, the frame perf lists first.
    shown, seen = [], set()
    for r in child_rows:
        key = round(r[0][0], 1)
        if SCAFFOLD.match(r[2]) or (key in seen and (len(r[0]) < 2 or r[0][1] == 0)):
            continue
        seen.add(key)
        shown.append(r)
    for pcts, mode, sym in shown[:15]:
        s = pcts[1] if len(pcts) > 1 else float("nan")
        print(f"  {'':24}  {pcts[0]:5.1f}%  {s:5.1f}%  {'kern' if mode == 'k' else 'user':4}  {short(sym)}")
EOF
