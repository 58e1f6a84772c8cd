//! The audit log of real nodes: a request, an approval and a revocation
//! leave entries on both sides carrying the same statement hashes; the
//! real `pilot-tun` binary verifies a copy of the state directory and names
//! the line after one byte is changed; a restart continues the chain; a
//! flood of refused handshakes leaves a few lines whose counts add up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pilot_audit::read;
use pilot_proto::identity::Identity;
use pilot_proto::session::CipherSuite;
use pilot_tests::*;
use pilot_tun::api::{Request, TrustState};
use serde_json::Value;

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The entries of a node's log: (kind, details).
fn entries(dir: &Path) -> Vec<(String, Value)> {
    let (shown, bad) = read::entries(dir, pilot_audit::LOG_FILE).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    shown
        .into_iter()
        .map(|s| (s.entry.kind, s.entry.details))
        .collect()
}

fn find(dir: &Path, kind: &str) -> Vec<Value> {
    entries(dir)
        .into_iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, d)| d)
        .collect()
}

fn verify(dir: &Path) -> read::Outcome {
    let key = identity_of(dir).ed_public();
    read::verify(dir, pilot_audit::LOG_FILE, &[key], None).unwrap()
}

/// The `pilot-tun` binary of this build (scripts/test.sh builds every
/// binary before the tests; so does `cargo build --bins`).
fn pilot_tun_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("pilot-tun"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --release --bins`, as scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn cli(state: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let o = Command::new(pilot_tun_bin())
        .arg("--state-dir")
        .arg(state)
        .arg("--json")
        .args(args)
        .env_remove("PILOT_STATE_DIR")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
    (o.status.code(), v)
}

/// Copies the files `audit verify` reads (the key and the logs).
fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "identity.key" || name.starts_with("audit.jsonl") {
            std::fs::copy(e.path(), to.join(name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_changes_are_logged_with_their_statement_hashes_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    a.ok(Request::TrustRevoke {
        peer: "beta".into(),
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "beta hears of the revocation",
        || async { b.trust_state("alpha").await == TrustState::RevokedByPeer },
    )
    .await;
    let (ad, bd) = (a.dir.clone(), b.dir.clone());
    let a_id = identity_of(&ad).node_id().to_string();
    let b_id = identity_of(&bd).node_id().to_string();
    // What each side sent is what the other received, hash for hash.
    let sent_received = [
        (&ad, "request", &bd, &a_id),
        (&bd, "approve", &ad, &b_id),
        (&ad, "revoke", &bd, &a_id),
    ];
    for (from, kind, to, from_id) in sent_received {
        let sent = find(from, kind);
        assert_eq!(sent.len(), 1, "{kind}: {sent:?}");
        let hash = sent[0]["statement"].as_str().unwrap();
        assert_eq!(hash.len(), 64);
        assert_eq!(sent[0]["delivered"], true);
        let received: Vec<Value> = find(to, "statement-received")
            .into_iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(received.len(), 1, "{kind}: {received:?}");
        assert_eq!(received[0]["statement"], hash, "{kind}");
        assert_eq!(received[0]["peer"].as_str(), Some(from_id.as_str()));
        assert_eq!(received[0]["seq"], sent[0]["seq"]);
    }
    // The registry carried each of them and logged the same hash.
    let rd = dir.path().join("registry");
    for (from, kind, _, _) in sent_received {
        let hash = find(from, kind)[0]["statement"].clone();
        eventually(Duration::from_secs(5), "the registry logs it", || {
            let (rd, hash) = (rd.clone(), hash.clone());
            async move {
                find(&rd, "statement-carried")
                    .iter()
                    .any(|d| d["statement"] == hash && d["kind"] == kind)
            }
        })
        .await;
    }
    assert!(!find(&rd, "registration").is_empty());
    assert_eq!(find(&ad, "revoke")[0]["state"], "revoked");
    assert_eq!(find(&bd, "approve")[0]["state"], "trusted");
    assert_eq!(entries(&ad)[0].0, "node-start");
    // Both logs verify; what came after the last checkpoint is unsigned
    // until the nodes stop.
    for d in [&ad, &bd] {
        let out = verify(d);
        assert!(out.result.is_ok(), "{:?}", out.result);
        assert!(out.unsigned_after > 0);
    }
    a.node.shutdown().await;
    let out = verify(&ad);
    assert_eq!(out.unsigned_after, 0, "signed at shutdown");
    assert_eq!(entries(&ad).last().unwrap().0, "checkpoint");
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_verifies_a_copy_and_names_a_changed_line_and_a_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    let ad = a.dir.clone();
    a.node.shutdown().await;
    // A restart continues the same chain.
    let a = TestNode::start(ad.clone(), "alpha", Some(reg.join))
        .await
        .unwrap();
    a.ok(Request::TrustRevoke {
        peer: "beta".into(),
    })
    .await;
    a.node.shutdown().await;
    assert_eq!(find(&ad, "node-start").len(), 2);
    assert_eq!(find(&ad, "node-stop").len(), 2);

    let copy = dir.path().join("copy");
    copy_state(&ad, &copy);
    let (code, v) = cli(&copy, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["unsigned_after"], 0);
    let head = v["signed_head"].as_str().unwrap().to_string();
    let (code, v) = cli(&copy, &["audit", "head"]);
    assert_eq!((code, v["head"].as_str()), (Some(0), Some(head.as_str())));

    // One byte of line 3 changes.
    let path = copy.join(pilot_audit::LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let starts: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    bytes[starts[1] + 12] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (code, v) = cli(&copy, &["audit", "verify", "--expect-head", &head]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["bad_line"]["line"], 3, "{v}");
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_verify_with_the_binary() {
    use pilot_audit::file::Limits;
    use pilot_tun::audit::NodeAudit;
    use pilot_tun::state::StateDir;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let (id, _) = state.load_or_create_identity().unwrap();
    let limits = Limits {
        rotate_bytes: 4_000,
        keep: 3,
        checkpoint_every: 10,
    };
    let mut log = NodeAudit::open_with(&state, &id, 1_750_000_000, limits).unwrap();
    for i in 0..100 {
        log.record(
            &id,
            1_750_000_000 + i,
            "approve",
            serde_json::json!({"i": i}),
        );
    }
    drop(log);
    // A restart after rotation goes on from where the files left off.
    let mut log = NodeAudit::open_with(&state, &id, 1_750_000_200, limits).unwrap();
    log.close(&id, 1_750_000_201);
    let files = read::files(dir.path(), pilot_audit::LOG_FILE).unwrap();
    assert_eq!(files.len(), 4, "{files:?}");
    let (code, v) = cli(dir.path(), &["audit", "verify"]);
    assert_eq!(code, Some(0), "{v}");
    assert!(v["first_seq"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["files"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_a_few_lines_whose_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let a = TestNode::start(dir.path().join("a"), "alpha", Some(reg.join))
        .await
        .unwrap();
    let to = a.status().await.listen.unwrap();
    let target = identity_of(&a.dir).static_public();
    // An identity alpha does not trust, from one socket: a few are
    // answered by nothing (untrusted key), the rest hit the rate limit or
    // the cookie, and all are refused.
    let stranger = Identity::from_bytes(&[0x5a; 64]);
    let sock = tokio::net::UdpSocket::bind(lo()).await.unwrap();
    const SENT: u64 = 400;
    for i in 0..SENT {
        let (_, msg) = pilot_proto::handshake::initiate(
            stranger.static_secret(),
            &target,
            i as u32,
            1_000 + i,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        sock.send_to(&msg, to).await.unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let refused = |d: &pilot_tun::api::DropCounts| {
        d.untrusted_handshake + d.bad_handshake + d.rate_limited + d.cookie_sent
    };
    eventually(
        Duration::from_secs(5),
        "every initiation is handled",
        || async {
            let d = a.drops().await;
            refused(&d) + d.queue_full >= SENT
        },
    )
    .await;
    let d = a.drops().await;
    assert!(d.untrusted_handshake >= 1, "{d:?}");
    let ad = a.dir.clone();
    a.node.shutdown().await;
    let sum = |kind: &str| -> u64 {
        find(&ad, kind)
            .iter()
            .map(|d| d["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        sum("handshake-refused-count") + sum("handshake-refused-dropped"),
        refused(&d),
        "every refusal the node counted is in the log"
    );
    // One source, a few reasons, a minute or two: a handful of lines.
    let lines = find(&ad, "handshake-refused").len() + find(&ad, "handshake-refused-count").len();
    assert!(lines <= 16, "{lines} lines for {SENT} refusals");
    let first = &find(&ad, "handshake-refused")[0];
    assert_eq!(first["source"], "127.0.0.1");
    assert!(verify(&ad).result.is_ok());
    reg.stop().await;
}
