//! The `pilot-tun` binary as a script sees it: exit codes, `--json` errors
//! of the CLI itself, and the documents it prints, against a stand-in
//! daemon on the control socket (no root, no TUN).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

fn pilot_tun(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilot-tun"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("PILOT_STATE_DIR")
        .output()
        .expect("run pilot-tun")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one JSON error line of a failed `--json` command.
fn json_error(o: &Output) -> Value {
    let out = stdout(o);
    assert_eq!(out.lines().count(), 1, "one line: {out:?}");
    let v: Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 3, "ok, error, code: {v}");
    v
}

/// A stand-in daemon: takes one connection on the state directory's
/// socket, records the request line and writes `answer` (None: keeps the
/// connection open without answering for a while).
fn fake_daemon(state: &Path, answer: Option<String>) -> JoinHandle<String> {
    let listener = UnixListener::bind(state.join("control.sock")).expect("bind");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        match answer {
            Some(a) => {
                let _ = stream.write_all(format!("{a}\n").as_bytes());
            }
            None => std::thread::sleep(Duration::from_secs(3)),
        }
        line
    })
}

#[test]
fn no_daemon_is_exit_3_in_json_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let o = pilot_tun(dir.path(), &["--json", "status"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v = json_error(&o);
    assert_eq!(v["code"], "not_running");
    assert!(v["error"].as_str().unwrap().contains("sudo pilot-tun up"));
    assert_eq!(stderr(&o), "", "--json keeps stderr quiet");

    let o = pilot_tun(dir.path(), &["peers"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "");
    let e = stderr(&o);
    assert!(
        e.starts_with("pilot-tun: error: no pilot-tun daemon is running")
            && e.contains("--state-dir"),
        "{e}"
    );
}

#[test]
fn a_bad_peer_name_is_a_usage_error_before_any_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // No daemon runs: exit 2 (not 3) shows the name is checked first.
    for args in [
        &["--json", "trust", "request", "no such host"][..],
        &["--json", "ping", "a_b"],
        &["--json", "trust", "revoke", "10.77.1"],
    ] {
        let o = pilot_tun(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let v = json_error(&o);
        assert_eq!(v["code"], "usage", "{args:?}");
        assert!(v["error"].as_str().unwrap().contains("node id"), "{v}");
    }
}

#[test]
fn bad_arguments_are_exit_2_and_json_under_json() {
    let dir = tempfile::tempdir().unwrap();
    let o = pilot_tun(dir.path(), &["--json", "status", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let v = json_error(&o);
    assert_eq!(v["code"], "usage");
    assert!(v["error"].as_str().unwrap().contains("--bogus"), "{v}");

    let o = pilot_tun(dir.path(), &["status", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--bogus"));

    let o = pilot_tun(dir.path(), &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("Exit codes: 0 success"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_silent_daemon_is_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = fake_daemon(dir.path(), None);
    let o = pilot_tun(dir.path(), &["--json", "--timeout", "1", "status"]);
    assert_eq!(o.status.code(), Some(5));
    let v = json_error(&o);
    assert_eq!(v["code"], "timeout");
    assert!(v["error"].as_str().unwrap().contains("--timeout"), "{v}");
    assert_eq!(d.join().unwrap().trim(), r#"{"cmd":"status"}"#);
}

#[test]
fn an_answer_that_does_not_parse_is_a_protocol_error() {
    for answer in [
        "garbage",
        r#"{"ok":true,"data":{"address":"10.77.0.1"}}"#,
        r#"{"ok":true,"data":[{"hostname":"beta"}]}"#,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let _d = fake_daemon(dir.path(), Some(answer.into()));
        let o = pilot_tun(dir.path(), &["--json", "status"]);
        assert_eq!(o.status.code(), Some(1), "{answer}");
        let v = json_error(&o);
        assert_eq!(v["code"], "protocol", "{answer}");
        assert!(
            v["error"].as_str().unwrap().contains("pilot-tun down"),
            "says what to do: {v}"
        );
    }
}

#[test]
fn daemon_errors_keep_their_code_and_exit_code() {
    for (code, exit) in [
        ("unknown_peer", 1),
        ("not_trusted", 1),
        ("registry_unreachable", 5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let line = json!({"ok": false, "error": "cannot find zeta: it is not there", "code": code});
        let d = fake_daemon(dir.path(), Some(line.to_string()));
        let o = pilot_tun(dir.path(), &["--json", "ping", "zeta", "-c", "2"]);
        assert_eq!(o.status.code(), Some(exit), "{code}");
        let v = json_error(&o);
        assert_eq!(v["code"], code);
        assert_eq!(v["error"], "cannot find zeta: it is not there");
        let req: Value = serde_json::from_str(&d.join().unwrap()).unwrap();
        assert_eq!(req, json!({"cmd": "ping", "peer": "zeta", "count": 2}));
    }
    // Text: the sentence on stderr.
    let dir = tempfile::tempdir().unwrap();
    let line = json!({"ok": false, "error": "nope, and here is why", "code": "failed"});
    let _d = fake_daemon(dir.path(), Some(line.to_string()));
    let o = pilot_tun(dir.path(), &["trust", "approve", "zeta"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "pilot-tun: error: nope, and here is why\n");
}

fn status_doc() -> Value {
    json!({
        "address": "10.77.0.9",
        "network": "10.77.0.0/16",
        "node_id": "140a67f3f7622d9b6c1aea0abb8702a5",
        "hostname": null,
        "listen": "0.0.0.0:41641",
        "registry": {
            "url": "pilot://00@192.0.2.1:7946",
            "reachable": false,
            "last_contact_secs": null,
            "observed_endpoint": null
        },
        "relay": "192.0.2.1:7946",
        "nat": "per-destination (hard)",
        "public_endpoint": null,
        "peers": {"known": 0, "trusted": 0, "connected": 0},
        "pending_requests": 0,
        "cipher": "chacha20-poly1305",
        "offload": {"udp_gso": false},
        "pid": 4242,
        "uptime_secs": 7,
        "drops": {
            "auth": 1, "replay": 2, "inner_address": 3, "untrusted_handshake": 4,
            "bad_handshake": 5, "rate_limited": 6, "cookie_sent": 10, "refused_local": 7,
            "malformed": 8, "queue_full": 9, "policy_in": 11, "policy_out": 12
        },
        "mtu": 1380,
        "mtu_cap": null,
        "underlay_below_mtu_floor": false,
        "too_big": {"icmp_sent": 0, "fragmented_inner": 0, "fragmented_outer": 0, "send_failed": 0}
    })
}

#[test]
fn status_prints_the_daemons_document() {
    let dir = tempfile::tempdir().unwrap();
    let line = json!({"ok": true, "data": status_doc()});
    let _d = fake_daemon(dir.path(), Some(line.to_string()));
    let o = pilot_tun(dir.path(), &["--json", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let printed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed, status_doc());

    let dir = tempfile::tempdir().unwrap();
    let _d = fake_daemon(dir.path(), Some(line.to_string()));
    let o = pilot_tun(dir.path(), &["status"]);
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    for want in [
        "address:   10.77.0.9 (10.77.0.0/16)",
        "hostname:  -",
        "UNREACHABLE",
        "nat:       per-destination (hard)",
        "cipher:    chacha20-poly1305  udp gso: false",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

#[test]
fn ping_without_any_echo_exits_1_after_its_report() {
    let report = json!({
        "peer": "5f0b6d8e2c4a19377a1e0c9d3b2f4e61",
        "hostname": "beta",
        "address": "10.77.84.77",
        "path": "relay",
        "relay_reason": "direct probes unanswered",
        "rtt_ms": [null, null]
    });
    let line = json!({"ok": true, "data": report});
    let dir = tempfile::tempdir().unwrap();
    let _d = fake_daemon(dir.path(), Some(line.to_string()));
    let o = pilot_tun(dir.path(), &["--json", "ping", "beta", "-c", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let printed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed, report);

    let dir = tempfile::tempdir().unwrap();
    let _d = fake_daemon(dir.path(), Some(line.to_string()));
    let o = pilot_tun(dir.path(), &["ping", "beta", "-c", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "beta (10.77.84.77) seq=0 no answer\nbeta (10.77.84.77) seq=1 no answer\n"
    );
    assert!(stderr(&o).contains("pilot-tun peers"), "{}", stderr(&o));
}

/// A state directory with an identity and an audit log of `n` entries
/// (signed at the end, as a daemon that stopped leaves it).
fn audit_state(n: u64) -> tempfile::TempDir {
    use pilot_tun::audit::NodeAudit;
    use pilot_tun::state::StateDir;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let (id, _) = state.load_or_create_identity().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut log = NodeAudit::open(&state, &id, now - 7200).unwrap();
    for i in 0..n {
        // The first half two hours ago, the rest now.
        let t = if i < n / 2 { now - 7200 } else { now };
        log.record(&id, t, "approve", json!({"peer": format!("p{i}")}));
    }
    log.close(&id, now);
    dir
}

fn audit_json(state: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json", "audit"];
    all.extend_from_slice(args);
    let o = pilot_tun(state, &all);
    let v = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    (o.status.code(), v)
}

#[test]
fn audit_verify_passes_then_names_the_changed_line_without_a_daemon() {
    let dir = audit_state(150);
    let (code, v) = audit_json(dir.path(), &["verify"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["ok"], true);
    // 150 entries, node-stop, two checkpoints.
    assert_eq!(v["lines"], 153);
    assert_eq!(v["unsigned_after"], 0);
    let head = v["signed_head"].as_str().unwrap().to_string();
    assert!(head.starts_with("152:"), "{head}");

    // `audit head` prints the same head, alone on its line.
    let o = pilot_tun(dir.path(), &["audit", "head"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).trim(), head);
    let o = pilot_tun(dir.path(), &["audit", "verify", "--expect-head", &head]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("present and unchanged"),
        "{}",
        stdout(&o)
    );

    // One byte of line 40 changes: exit 1, line 40 named.
    let path = dir.path().join("audit.jsonl");
    let text = std::fs::read(&path).unwrap();
    let mut bytes = text.clone();
    let line40 = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(38)
        .unwrap()
        .0
        + 1;
    let at = line40 + 30;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (code, v) = audit_json(dir.path(), &["verify"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["bad_line"]["line"], 40, "{v}");
    assert_eq!(v["lines"], 39);
    let o = pilot_tun(dir.path(), &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("NOT intact") && stdout(&o).contains("line 40"),
        "{}",
        stdout(&o)
    );
    // `audit head` has nothing to vouch for now.
    let o = pilot_tun(dir.path(), &["audit", "head"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));

    // Restored, but cut after the head: only --expect-head shows it.
    let cut = text
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(99)
        .unwrap()
        .0
        + 1;
    std::fs::write(&path, &text[..cut]).unwrap();
    let (code, v) = audit_json(dir.path(), &["verify"]);
    assert_eq!(code, Some(0), "a shorter log verifies: {v}");
    let (code, v) = audit_json(dir.path(), &["verify", "--expect-head", &head]);
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["problem"].as_str().unwrap().contains("ends before"),
        "{v}"
    );
}

#[test]
fn audit_show_filters_by_time_and_reads_without_a_daemon() {
    let dir = audit_state(10);
    let (code, v) = audit_json(dir.path(), &["show"]);
    assert_eq!(code, Some(0), "{v}");
    let all = v["entries"].as_array().unwrap().len();
    assert_eq!(all, 12, "10 entries, node-stop, checkpoint");
    assert_eq!(v["entries"][0]["details"]["peer"], "p0");
    assert_eq!(v["entries"][0]["line"], 1);
    let (_, v) = audit_json(dir.path(), &["show", "--since", "1h"]);
    assert_eq!(v["entries"].as_array().unwrap().len(), 7, "{v}");
    let o = pilot_tun(dir.path(), &["audit", "show", "--since", "2h"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("approve"), "{}", stdout(&o));
    let (code, v) = audit_json(dir.path(), &["show", "--since", "yesterday"]);
    assert_eq!((code, v["code"].as_str()), (Some(2), Some("usage")), "{v}");
}

#[test]
fn audit_commands_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (code, v) = audit_json(dir.path(), &["verify"]);
    assert_eq!(code, Some(1));
    assert!(v["error"].as_str().unwrap().contains("no audit log"), "{v}");
    let dir = audit_state(3);
    std::fs::remove_file(dir.path().join("identity.key")).unwrap();
    let (code, v) = audit_json(dir.path(), &["verify"]);
    assert_eq!(code, Some(1));
    assert!(v["error"].as_str().unwrap().contains("node key"), "{v}");
    let (code, v) = audit_json(dir.path(), &["verify", "--expect-head", "nonsense"]);
    assert_eq!((code, v["code"].as_str()), (Some(2), Some("usage")), "{v}");
}

#[test]
fn config_file_errors_are_usage_errors_in_json_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pilot-tun.toml");
    std::fs::write(&cfg, "dev = \"pt0\"\nmtu = 10\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = pilot_tun(dir.path(), &["--json", "--config", cfg, "up"]);
    assert_eq!(o.status.code(), Some(2));
    let v = json_error(&o);
    assert_eq!(v["code"], "usage");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("pilot-tun.toml:2: `mtu`: expected a whole number"),
        "{e}"
    );

    let o = pilot_tun(dir.path(), &["--config", cfg, "up"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(":2: `mtu`"), "{}", stderr(&o));

    // A file named with --config must exist; every command reads it.
    let o = pilot_tun(
        dir.path(),
        &["--json", "status", "--config", "/nonexistent/p.toml"],
    );
    assert_eq!(o.status.code(), Some(2));
    let v = json_error(&o);
    assert!(
        v["error"].as_str().unwrap().contains("/nonexistent/p.toml"),
        "{v}"
    );
}

/// `up` without CAP_NET_ADMIN says so, in JSON too, and leaves the state
/// directory alone (it used to fail on it first with a bare "Permission
/// denied"). As root the test drops to nobody (which drops every
/// capability).
#[test]
fn up_without_cap_net_admin_says_so_before_touching_the_state_directory() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pilot-tun"));
    cmd.arg("--json")
        .arg("--state-dir")
        .arg(&state)
        .args(["up", "--registry", "pilot://00@192.0.2.1:7946"])
        .env_remove("PILOT_STATE_DIR");
    if nix::unistd::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    } else if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("CapEff:") && !l.ends_with("0000000000000000"))
    {
        eprintln!("skipped: this user has capabilities and is not root to drop them");
        return;
    }
    let o = cmd.output().expect("run pilot-tun");
    assert_eq!(o.status.code(), Some(4), "{}", stdout(&o));
    let v = json_error(&o);
    assert_eq!(v["code"], "permission_denied");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("root or CAP_NET_ADMIN") && e.contains("sudo"),
        "{e}"
    );
    assert!(!state.exists(), "the state directory was not created");
}
