//! Identity rotation in process: trust, address and name follow a rotation
//! with no action on the peer's side; the old key is refused by the
//! registry and by the peer; a forged succession changes nothing; two
//! successors of one id (a leaked key) end trust in the whole lineage.

use std::net::SocketAddr;
use std::time::Duration;

use pilot_proto::identity::Identity;
use pilot_proto::messages::{ErrorCode, FromRegistry, Signed, Statement, StatementKind};
use pilot_proto::policy::Grant;
use pilot_proto::session::CipherSuite;
use pilot_proto::succession::Succession;
use pilot_proto::wire::{self, Kind};
use pilot_tests::*;
use pilot_tun::api::{IdentityRotated, Request, TrustState};

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Rotates `n`'s identity; the daemon stops to restart (the CLI executes
/// itself again; here the test starts the node again from its state).
async fn rotate(n: TestNode) -> (TestNode, IdentityRotated) {
    let r: IdentityRotated = n.get(Request::IdentityRotate).await;
    tokio::time::timeout(Duration::from_secs(3), n.node.stopped())
        .await
        .expect("the node stops to restart after a rotation");
    assert!(n.node.restart_requested());
    let (dir, name) = (n.dir.clone(), n.name.clone());
    n.node.shutdown().await;
    let n = TestNode::start(dir, &name, None)
        .await
        .expect("restarts under the new identity");
    (n, r)
}

/// `b`'s trust state for node id `id` (None: no record).
async fn state_of(b: &TestNode, id: &str) -> Option<TrustState> {
    b.trust_list()
        .await
        .into_iter()
        .find(|e| e.node_id == id)
        .map(|e| e.state)
}

/// True if a handshake initiation with `from`'s key is answered by `to`.
async fn answers_key_of(from: &Identity, to: &TestNode) -> bool {
    let listen: SocketAddr = to.status().await.listen.expect("a listening socket");
    let to_at = SocketAddr::from(([127, 0, 0, 1], listen.port()));
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (_, init) = pilot_proto::handshake::initiate(
        from.static_secret(),
        &identity_of(&to.dir).static_public(),
        0x0707,
        ts,
        CipherSuite::Aes256Gcm,
    )
    .unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&init, to_at).await.unwrap();
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(Duration::from_millis(1500), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => wire::classify(&buf[..n]) == Kind::HandshakeResp,
        _ => false,
    }
}

/// A `Succeed` statement from `from` to `to`, carrying `st`.
fn succeed_statement(from: &Identity, to: &TestNode, st: &Succession) -> Signed<Statement> {
    Signed::sign(
        Statement {
            kind: StatementKind::Succeed {
                succession: st.to_bytes(),
                allow: Grant::everything(),
                cert: None,
            },
            from: from.public(),
            to: identity_of(&to.dir).node_id(),
            seq: 1,
        },
        from,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_address_name_and_trust_and_retires_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    deliver(&a, &mut b, b"before").await;
    let old = identity_of(&a.dir);
    let (address, old_id) = (a.addr(), old.node_id().to_string());
    assert!(
        answers_key_of(&old, &b).await,
        "beta answers alpha's key before the rotation"
    );

    let (mut a, r) = rotate(a).await;
    assert_eq!(r.old_node_id, old_id);
    assert_ne!(r.new_node_id, old_id);
    assert_eq!((r.rotation, r.peers_told), (1, 1));
    let st = a.status().await;
    assert_eq!(
        st.node_id, r.new_node_id,
        "the daemon runs the new identity"
    );
    assert_eq!(a.addr(), address, "the address stays");
    assert_eq!(st.hostname.as_deref(), Some("alpha"), "the name stays");

    // Beta follows with no action: the record moves, the old one goes.
    eventually(
        Duration::from_secs(10),
        "beta trusts alpha's new id",
        || async { state_of(&b, &r.new_node_id).await == Some(TrustState::Trusted) },
    )
    .await;
    assert_eq!(state_of(&b, &old_id).await, None);
    deliver(&a, &mut b, b"after, a to b").await;
    deliver(&b, &mut a, b"after, b to a").await;

    // The old key: the registry refuses it, and so does beta.
    let (_, answer) = RawClient::try_register(reg.join, &old, "alpha").await;
    assert!(
        matches!(
            answer,
            FromRegistry::Error {
                code: ErrorCode::Retired,
                ..
            }
        ),
        "{answer:?}"
    );
    assert!(
        !answers_key_of(&old, &b).await,
        "beta answered a handshake with alpha's retired key"
    );
    // Nothing is lost over a restart of beta.
    b.node.shutdown().await;
    let mut b = TestNode::start(dir.path().join("b"), "beta", None)
        .await
        .unwrap();
    assert_eq!(state_of(&b, &old_id).await, None);
    deliver(&a, &mut b, b"after beta restarted").await;
    assert!(!answers_key_of(&old, &b).await);
    for n in [a, b] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_successions_change_nothing_and_a_fork_ends_the_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    let old = identity_of(&a.dir);
    let (a, r) = rotate(a).await;
    eventually(
        Duration::from_secs(10),
        "beta follows the rotation",
        || async { state_of(&b, &r.new_node_id).await == Some(TrustState::Trusted) },
    )
    .await;

    // Mallory, a joined node, claims to continue alpha without its key.
    let mallory = Identity::from_bytes(&[0x4d; 64]);
    let other = Identity::from_bytes(&[0x4e; 64]);
    let mut forged = Succession::sign(&other, &mallory, 1, now());
    forged.body.old = old.public();
    let mut m = RawClient::register(reg.join, &mallory, "mallory").await;
    let answer = m.statement(succeed_statement(&mallory, &b, &forged)).await;
    assert!(matches!(answer, FromRegistry::Ok { .. }), "{answer:?}");
    // A genuine succession of someone beta never dealt with is no better.
    let stranger = Succession::sign(&other, &mallory, 1, now());
    let mut st2 = succeed_statement(&mallory, &b, &stranger);
    st2.body.seq = 2;
    let st2 = Signed::sign(st2.body, &mallory);
    m.statement(st2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(&b, &mallory.node_id().to_string()).await, None);
    assert_eq!(
        state_of(&b, &r.new_node_id).await,
        Some(TrustState::Trusted),
        "a forged succession changed beta's record of alpha"
    );
    let mut a = a;
    deliver(&a, &mut b, b"still alpha").await;

    // Alpha's old key leaks: a second successor, properly signed by it.
    let thief = Identity::from_bytes(&[0x54; 64]);
    let fork = Succession::sign(&old, &thief, 1, now());
    let mut t = RawClient::register(reg.join, &thief, "thief").await;
    let answer = t.statement(succeed_statement(&thief, &b, &fork)).await;
    assert!(matches!(answer, FromRegistry::Ok { .. }), "{answer:?}");
    eventually(
        Duration::from_secs(5),
        "beta drops the forked lineage",
        || async { state_of(&b, &r.new_node_id).await.is_none() },
    )
    .await;
    assert_eq!(state_of(&b, &thief.node_id().to_string()).await, None);
    blocked(&a, &mut b, b"forked").await;
    // And for good: approving either successor again is refused.
    let again = b
        .call(Request::TrustApprove {
            peer: r.new_node_id.clone(),
            allow: None,
            expires_in_secs: None,
        })
        .await;
    assert!(again.is_err(), "approving a forked id went through");
    a.drain();
    for n in [a, b] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}
