#!/usr/bin/env bash
# s21 — running as a systemd service: readiness (READY=1) only once the
#       registry serves and once the node's interface is up with its
#       address; no READY=1 from an `up` that fails (and a wrong registry
#       key is told apart from an unreachable registry); logs without
#       colour codes, without our own timestamps under journald, JSON
#       lines when asked.
#
#                    192.0.2.0/24 (bridge br0 in namespace "sw")
#   +-----------------------+        +------------------------------+
#   |  reg       .1         |        |  a            .11            |
#   |  pilot-registry       |        |  pilot-tun up --foreground   |
#   |  notify listener      |        |  notify listener             |
#   |  (@abstract socket)   |        |  ($WORK/notify-a.sock)       |
#   +-----------+-----------+        +--------------+---------------+
#   ============+===================================+=================  br0
#
# PID 1 is not systemd here: each program gets NOTIFY_SOCKET pointing at a
# datagram socket a small listener binds, as systemd would. When READY=1
# arrives, the listener checks at once what it promises (the registry
# answers STUN; pilot0 is UP with its 10.x address) and records the result.
#
# 1. registry with NOTIFY_SOCKET=@name: READY=1, and STUN answered then.
# 2. daemon (foreground, JOURNAL_STREAM set): STATUS=starting, then READY=1
#    with pilot0 up and addressed; its log lines have no timestamp of ours
#    and no colour; STOPPING=1 on SIGTERM.
# 3. `up` with a wrong registry key, and with no registry at the address:
#    each fails with its own sentence, and no READY=1 is sent.
# 4. background `up`: its log file has no colour codes; --log-format json
#    writes JSON lines.
SCENARIO=s21_systemd_notify
source "$(dirname "$0")/lib.sh"
setup_lab
for t in ip python3 timeout stat; do need "$t"; done

# The listener: binds the socket (a path, or @name for an abstract one),
# writes one JSON line per datagram to OUT (the first line: "listening"),
# runs CHECK... at once on READY=1 and records its status and output;
# ends on STOPPING=1 or after 90 s.
LISTEN='
import json, socket, subprocess, sys, time
where, out, check = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + where[1:] if where.startswith("@") else where)
s.settimeout(0.5)
end = time.time() + 90
with open(out, "a") as f:
    f.write(json.dumps({"listening": where}) + "\n"); f.flush()
    while time.time() < end:
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            continue
        ev = {"t": time.time(), "msg": msg}
        lines = msg.split("\n")
        if "READY=1" in lines and check:
            r = subprocess.run(check, capture_output=True, text=True, timeout=10)
            ev["check_rc"], ev["check_out"] = r.returncode, r.stdout + r.stderr
        f.write(json.dumps(ev) + "\n"); f.flush()
        if "STOPPING=1" in lines:
            break
'

# STUN binding request to HOST PORT; exit 0 if answered (1 s).
STUN_PROBE='
import os, socket, struct, sys
tid = os.urandom(12)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.sendto(struct.pack(">HHI", 1, 0, 0x2112A442) + tid, (sys.argv[1], int(sys.argv[2])))
data = s.recv(2048)
sys.exit(0 if data[:2] == b"\x01\x01" and data[8:20] == tid else 1)
'

# pilot0 is UP and holds a 10.x address (from `ip -j addr show dev pilot0`
# on stdin); prints the address.
IF_UP='
import json, sys
i = json.load(sys.stdin)[0]
addrs = [a["local"] for a in i.get("addr_info", []) if a.get("family") == "inet"]
ok = "UP" in i.get("flags", []) and any(a.startswith("10.") for a in addrs)
print(" ".join(addrs))
sys.exit(0 if ok else 1)
'

# events FILE: the datagrams received (not the "listening" line).
events() { grep -c '"msg"' "$1" || true; }
# event_field FILE N KEY: KEY of the Nth datagram (1-based) in FILE.
event_field() {
  python3 -c 'import json,sys; e=[json.loads(l) for l in open(sys.argv[1]) if "\"msg\"" in l][int(sys.argv[2])-1]; v=e.get(sys.argv[3]); print(v if isinstance(v,str) else json.dumps(v))' "$1" "$2" "$3"
}
# got_ready FILE: a READY=1 datagram is in FILE.
got_ready() { grep -q 'READY=1' "$1"; }

switch sw
mkns reg; mkns a
plug reg sw 192.0.2.1/24
plug a sw 192.0.2.11/24

# --- 1. the registry --------------------------------------------------------
mkdir -p "$WORK/registry"
RN="$WORK/notify-reg.jsonl"
bg reg notify-reg python3 -c "$LISTEN" "@$PFX-registry-notify" "$RN" python3 -c "$STUN_PROBE" 192.0.2.1 7946
wait_for 5 "the registry's notify listener" grep -q listening "$RN"
bg reg registry env NOTIFY_SOCKET="@$PFX-registry-notify" "$BIN/pilot-registry" \
  --listen 192.0.2.1:7946 --state-dir "$WORK/registry" --config /dev/null
wait_for 10 "READY=1 from the registry" got_ready "$RN"
log "registry said: $(event_field "$RN" 1 msg | tr '\n' '|')"
[ "$(event_field "$RN" 1 check_rc)" = 0 ] || fail "READY=1 came before the registry answered STUN: $(event_field "$RN" 1 check_out)"
grep -q '^STATUS=serving 192.0.2.1:7946' <<<"$(event_field "$RN" 1 msg)" || fail "no serving status with READY=1: $(cat "$RN")"
JOIN=$(cat "$WORK/registry/join-url")
pass "registry: READY=1 over an abstract socket once it served STUN ($JOIN)"

# --- 2. the daemon in the foreground, as under systemd ----------------------
mkdir -p "$WORK/alpha"
AN="$WORK/notify-a.sock"
AE="$WORK/notify-a.jsonl"
bg a notify-a python3 -c "$LISTEN" "$AN" "$AE" ip -j addr show dev pilot0
wait_for 5 "alpha's notify listener" grep -q listening "$AE"
# journald's stream is the daemon's stderr: the file bg writes it to.
: >"$WORK/daemon-a.log"
JS=$(stat -c '%d:%i' "$WORK/daemon-a.log")
bg a daemon-a env NOTIFY_SOCKET="$AN" JOURNAL_STREAM="$JS" "$BIN/pilot-tun" \
  --state-dir "$WORK/alpha" --config /dev/null up --foreground --name alpha --registry "$JOIN" --log debug
wait_for 15 "READY=1 from alpha's daemon" got_ready "$AE"
n=$(events "$AE")
[ "$n" -ge 2 ] || fail "expected a STATUS before READY=1, got $n datagrams: $(cat "$AE")"
grep -q '^STATUS=starting' <<<"$(event_field "$AE" 1 msg)" || fail "the first datagram is not a starting status: $(event_field "$AE" 1 msg)"
! grep -q READY <<<"$(event_field "$AE" 1 msg)" || fail "READY=1 in the first datagram"
[ "$(event_field "$AE" "$n" check_rc)" != null ] || fail "the last datagram is not READY=1: $(cat "$AE")"
A=$(event_field "$AE" "$n" check_out | python3 -c "$IF_UP") \
  || fail "pilot0 was not up with a 10.x address when READY=1 arrived: $(event_field "$AE" "$n" check_out)"
grep -q "STATUS=pilot0 up: $A/" <<<"$(event_field "$AE" "$n" msg)" || fail "READY=1 without the up line: $(event_field "$AE" "$n" msg)"
log "alpha: READY=1 with pilot0 up at $A"
# Logs: journald stamps lines itself; no colour codes off a terminal.
grep -q 'INFO\|DEBUG' "$WORK/daemon-a.log" || fail "no log lines from the daemon: $(head -5 "$WORK/daemon-a.log")"
if grep -E '^[0-9]{4}-[0-9]{2}-[0-9]{2}T' "$WORK/daemon-a.log" | head -3 | grep .; then
  fail "log lines carry our own timestamps under journald (above)"
fi
if grep -q $'\x1b' "$WORK/daemon-a.log"; then fail "colour codes in the daemon's log"; fi
stop_bg daemon-a
wait_bg_exit 5 notify-a
grep -q 'STOPPING=1' "$AE" || fail "no STOPPING=1 on SIGTERM: $(cat "$AE")"
pass "daemon: STATUS, then READY=1 only with pilot0 up at $A; STOPPING=1 on SIGTERM; journald-style log"

# --- 3. an `up` that fails sends no READY=1 -------------------------------
KEY=${JOIN#pilot://}; KEY=${KEY%@*}
WRONG="pilot://$(printf '%s' "$KEY" | tr '0-9a-f' '1-9a-f0')@192.0.2.1:7946"
for case in "wrong-key $WRONG answered-but-not-with-the-key" \
            "no-registry pilot://$KEY@192.0.2.99:7946 unreachable"; do
  set -- $case
  label=$1 url=$2 want=${3//-/ }
  mkdir -p "$WORK/$label"
  ev="$WORK/notify-$label.jsonl"
  bg a "notify-$label" python3 -c "$LISTEN" "$WORK/$label.sock" "$ev" true
  wait_for 5 "listener $label" grep -q listening "$ev"
  rc=0
  on_to "$WORK/$label.out" a env NOTIFY_SOCKET="$WORK/$label.sock" "$BIN/pilot-tun" \
    --state-dir "$WORK/$label" --config /dev/null up --foreground --registry "$url" || rc=$?
  [ "$rc" -ne 0 ] || fail "$label: up succeeded"
  grep -q "$want" "$WORK/$label.out" || fail "$label: the error does not say '$want': $(tail -3 "$WORK/$label.out")"
  ! got_ready "$ev" || fail "$label: READY=1 from an up that failed: $(cat "$ev")"
  ! ip -n "$PFX-a" link show pilot0 >/dev/null 2>&1 || fail "$label: pilot0 exists after a failed up"
  stop_bg "notify-$label"
  log "$label: exit $rc, $(grep -o "error: .*" "$WORK/$label.out" | head -1 | cut -c1-160)"
done
pass "a failed up sends no READY=1; a wrong key and no registry each say what they are"

# --- 4. the background daemon's log file ------------------------------------
node_up a alpha --log debug
L="$WORK/alpha/pilot-tun.log"
[ -s "$L" ] || fail "no log file $L"
if grep -q $'\x1b' "$L"; then fail "colour codes in $L: $(grep -m1 $'\x1b' "$L" | od -c | head -3)"; fi
grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2}T.*(INFO|DEBUG)' "$L" || fail "the log file's lines carry no timestamps: $(head -3 "$L")"
node_down a alpha
: >"$L"
node_up a alpha --log-format json
node_down a alpha
jl=$(python3 -c '
import json, sys
n = 0
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        assert "level" in d and "timestamp" in d, line
        n += 1
print(n)' "$L") || fail "a log line that starts with { is not JSON: $(head -5 "$L")"
[ "$jl" -gt 0 ] || fail "no JSON log lines in $L: $(head -5 "$L")"
pass "background log: no colour codes, timestamps kept; --log-format json: $jl JSON lines"
