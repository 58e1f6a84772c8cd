//! Regression tests for the adversarial review (issue 10): a registry that
//! lies, nodes that claim what is not theirs, replayed handshakes, hostile
//! notes and names, and retries that must not lose or misreport anything.
//! Each test failed before its fix.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pilot_proto::handshake;
use pilot_proto::identity::Identity;
use pilot_proto::messages::{FromRegistry, StatementKind};
use pilot_proto::session::CipherSuite;
use pilot_proto::wire::{self, Kind};
use pilot_registry::SqliteStorage;
use pilot_tests::*;
use pilot_tun::api::{Endpoint, Request, TrustChange, TrustState};

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A registry whose storage lies as the test says.
async fn lying_registry(dir: &std::path::Path) -> (RegistryHandle, LiesHandle) {
    let rdir = dir.join("registry");
    std::fs::create_dir_all(&rdir).unwrap();
    let (storage, lies) = Tamper::new(SqliteStorage::open(&rdir.join("registry.db")).unwrap());
    let reg =
        RegistryHandle::start_with(&rdir, lo(), "10.77.0.0/16".parse().unwrap(), storage).await;
    (reg, lies)
}

type LiesHandle = std::sync::Arc<std::sync::Mutex<Lies>>;

fn node_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("node.json")).unwrap()).unwrap()
}

fn trust_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("trust.json")).unwrap()).unwrap()
}

/// Where a lab node receives tunnel datagrams.
async fn listen_addr(n: &TestNode) -> SocketAddr {
    let listen: SocketAddr = n.status().await.listen.expect("a listening socket");
    SocketAddr::from(([127, 0, 0, 1], listen.port()))
}

/// True if a handshake response arrives at `sock` within 1.5 s.
async fn answered(sock: &tokio::net::UdpSocket) -> bool {
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(Duration::from_millis(1500), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => wire::classify(&buf[..n]) == Kind::HandshakeResp,
        _ => false,
    }
}

fn fresh_identity(seed: u8) -> Identity {
    let mut bytes = [seed; 64];
    bytes[0] = 0xfe;
    Identity::from_bytes(&bytes)
}

/// Finding 1: a registry answers a first contact by name with a newcomer's
/// key and the address of a peer we already trust. Our traffic for that
/// peer must not go to the newcomer: the record is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_registry_cannot_give_a_trusted_address_to_a_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, lies) = lying_registry(dir.path()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    let c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();
    trust(&a, &b).await;
    deliver(&a, &mut b, b"before").await;
    // From now on the registry says gamma lives at beta's address.
    let gamma = identity_of(&c.dir).node_id();
    lies.lock().unwrap().address.insert(gamma, b.addr());
    let r = a
        .call(Request::TrustRequest {
            peer: "gamma".into(),
            note: String::new(),
            allow: None,
            expires_in_secs: None,
            want: None,
        })
        .await;
    let err = r.expect_err("the request must be refused").error;
    assert!(
        err.contains(&b.addr().to_string()) && err.contains("already belongs"),
        "{err}"
    );
    assert_eq!(a.trust_state("gamma").await, TrustState::None);
    // Nothing was signed or sent: gamma never hears of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.trust_state("alpha").await, TrustState::None);
    // Beta still gets what is sent to its address.
    deliver(&a, &mut b, b"after").await;
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

/// Finding 1: a registry that hands out a huge, or a public, network is
/// refused before anything is routed into the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_or_public_overlay_is_refused() {
    for (net, why) in [("0.0.0.0/1", "/1"), ("11.0.0.0/16", "private")] {
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("registry");
        std::fs::create_dir_all(&rdir).unwrap();
        let storage = SqliteStorage::open(&rdir.join("registry.db")).unwrap();
        let reg = RegistryHandle::start_with(&rdir, lo(), net.parse().unwrap(), storage).await;
        let err = TestNode::start(dir.path().join("a"), "alpha", Some(reg.join))
            .await
            .err()
            .unwrap_or_else(|| panic!("a node must not come up on {net}"));
        let msg = err.to_string();
        assert!(msg.contains(why), "{net}: {msg}");
        let state = dir.path().join("a").join("node.json");
        if state.exists() {
            assert_eq!(
                node_json(&dir.path().join("a"))["address"],
                serde_json::Value::Null
            );
        }
        reg.stop().await;
    }
}

/// Finding 1: the node's own address is pinned after its first
/// registration; a registry that later assigns another one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_address_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, lies) = lying_registry(dir.path()).await;
    let a = TestNode::start(dir.path().join("a"), "alpha", Some(reg.join))
        .await
        .unwrap();
    let pinned = a.addr();
    let id = identity_of(&a.dir).node_id();
    a.node.shutdown().await;
    let other = Ipv4Addr::new(10, 77, 200, 200);
    assert_ne!(pinned, other);
    lies.lock().unwrap().address.insert(id, other);
    let a = TestNode::start(dir.path().join("a"), "alpha", None)
        .await
        .unwrap();
    assert_eq!(a.addr(), pinned);
    assert_eq!(node_json(&a.dir)["address"], pinned.to_string());
    a.node.shutdown().await;
    // And the next start still uses the pinned address.
    let a = TestNode::start(dir.path().join("a"), "alpha", None)
        .await
        .unwrap();
    assert_eq!(a.addr(), pinned);
    a.node.shutdown().await;
    reg.stop().await;
}

/// Finding 3: an initiation captured on the wire (here: made with alpha's
/// keys, which gives the same bytes alpha would send) is answered once;
/// replayed after beta restarts, it must get no answer. And an initiation
/// that is never completed must not move beta's endpoint for alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_initiation_does_not_replay_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    deliver(&b, &mut a, b"up").await;
    let alpha = identity_of(&a.dir);
    let beta = identity_of(&b.dir);
    let beta_at = listen_addr(&b).await;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (_, captured) = handshake::initiate(
        alpha.static_secret(),
        &beta.static_public(),
        0x0bad,
        ts,
        CipherSuite::Aes256Gcm,
    )
    .unwrap();
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let attacker_at = attacker.local_addr().unwrap();
    attacker.send_to(&captured, beta_at).await.unwrap();
    assert!(
        answered(&attacker).await,
        "beta answers a fresh initiation from alpha's key"
    );
    // Nobody completed that handshake: beta still sends to alpha.
    let peers = b.peers().await;
    assert_ne!(
        peers[0].endpoint,
        Some(Endpoint::Direct(attacker_at)),
        "beta's endpoint for alpha moved to the attacker"
    );
    let rec = trust_json(&b.dir);
    assert!(
        !rec.to_string().contains(&attacker_at.to_string()),
        "the attacker's address was saved: {rec}"
    );
    // Beta restarts; the replay gets nothing.
    b.node.shutdown().await;
    let b = TestNode::start(dir.path().join("b"), "beta", None)
        .await
        .unwrap();
    // (The lab's nodes take a new port on every start.)
    let beta_at = listen_addr(&b).await;
    let before = b.drops().await.bad_handshake;
    attacker.send_to(&captured, beta_at).await.unwrap();
    assert!(
        !answered(&attacker).await,
        "beta answered a replayed initiation after its restart"
    );
    assert!(b.drops().await.bad_handshake > before);
    // The real alpha still gets through.
    let mut b = b;
    deliver(&a, &mut b, b"still here").await;
    for n in [a, b] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

/// Findings 2 and 5: a node that claims a proven peer's tunnel key, and a
/// request with an oversized note, leave no record; an ordinary request
/// after them is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_keys_and_oversized_notes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    // A handshake with beta's key succeeded: it is proven.
    deliver(&a, &mut b, b"proven").await;
    let alpha = identity_of(&a.dir);
    let beta = identity_of(&b.dir);

    // Mallory registers with its own keys, then signs a request whose
    // identity carries beta's X25519 key (the binding signs any 32 bytes;
    // beta's secret is used here only to derive beta's public key).
    let mallory = fresh_identity(0x31);
    let mut m = RawClient::register(reg.join, &mallory, "mallory").await;
    let mut claim = mallory.to_bytes();
    claim[32..].copy_from_slice(&beta.to_bytes()[32..]);
    let claiming = Identity::from_bytes(&claim);
    assert_eq!(claiming.node_id(), mallory.node_id());
    let st = statement(
        &claiming,
        &alpha,
        StatementKind::Request { note: "hi".into() },
        10,
    );
    // The registry refuses it: the key is not the one mallory's session
    // proved (registry side of finding 2). A registry that carried it
    // anyway would still not get a record into alpha's store: the trust
    // store refuses a key a proven record holds (its unit tests).
    assert!(
        matches!(m.statement(st).await, FromRegistry::Error { .. }),
        "the registry carried a statement naming another node's key"
    );

    // Nora sends a request with a 300-byte note.
    let nora = fresh_identity(0x32);
    let mut n = RawClient::register(reg.join, &nora, "nora").await;
    let long = "\u{1b}[2J".repeat(75);
    assert_eq!(long.len(), 300);
    let st = statement(&nora, &alpha, StatementKind::Request { note: long }, 10);
    assert!(matches!(n.statement(st).await, FromRegistry::Ok { .. }));

    // Oscar's ordinary request comes after both.
    let oscar = fresh_identity(0x33);
    let mut o = RawClient::register(reg.join, &oscar, "oscar").await;
    let st = statement(
        &oscar,
        &alpha,
        StatementKind::Request { note: "ok".into() },
        10,
    );
    assert!(matches!(o.statement(st).await, FromRegistry::Ok { .. }));
    eventually(
        Duration::from_secs(5),
        "oscar's request arrives",
        || async { a.trust_state("oscar").await == TrustState::Pending },
    )
    .await;
    let pending = a.pending().await;
    let names: Vec<&str> = pending
        .iter()
        .filter_map(|p| p.hostname.as_deref())
        .collect();
    assert_eq!(names, vec!["oscar"], "{pending:?}");
    assert_eq!(a.trust_state("mallory").await, TrustState::None);
    assert_eq!(a.trust_state("nora").await, TrustState::None);
    // Beta's sessions are still beta's.
    deliver(&b, &mut a, b"beta").await;
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

/// Finding 8: two records with one name make that name ambiguous; the
/// address or node id still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_name_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, lies) = lying_registry(dir.path()).await;
    let (a, b) = alpha_beta(dir.path(), &reg).await;
    let c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();
    // The registry calls gamma "beta" too.
    let gamma = identity_of(&c.dir).node_id();
    lies.lock().unwrap().hostname.insert(gamma, "beta".into());
    for n in [&b, &c] {
        n.ok(Request::TrustRequest {
            peer: "alpha".into(),
            note: String::new(),
            allow: None,
            expires_in_secs: None,
            want: None,
        })
        .await;
    }
    eventually(Duration::from_secs(5), "both requests arrive", || async {
        a.pending().await.len() == 2
    })
    .await;
    let r = a
        .call(Request::TrustApprove {
            peer: "beta".into(),
            allow: None,
            expires_in_secs: None,
        })
        .await;
    let err = r.expect_err("approved one of two 'beta's").error;
    assert!(err.contains("ambiguous"), "{err}");
    a.ok(Request::TrustApprove {
        peer: b.addr().to_string(),
        allow: None,
        expires_in_secs: None,
    })
    .await;
    assert_eq!(a.pending().await.len(), 1);
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

/// Finding 7: a revocation made while the registry is down reaches the
/// peer once it is back, even across a restart of the revoking node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_while_the_registry_is_down_is_delivered_later() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("registry");
    let reg = RegistryHandle::start(&rdir, lo()).await;
    let raddr = reg.addr;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    deliver(&a, &mut b, b"before").await;
    reg.stop().await;
    let r: TrustChange = b
        .get(Request::TrustRevoke {
            peer: "alpha".into(),
        })
        .await;
    assert!(!r.delivered);
    assert_eq!(b.trust_state("alpha").await, TrustState::Revoked);
    // Beta restarts while the registry is still down.
    b.node.shutdown().await;
    let b = TestNode::start(dir.path().join("b"), "beta", None)
        .await
        .unwrap();
    assert_eq!(b.trust_state("alpha").await, TrustState::Revoked);
    let reg = RegistryHandle::start(&rdir, raddr).await;
    eventually(
        Duration::from_secs(40),
        "alpha learns of the revocation",
        || async { a.trust_state("beta").await == TrustState::RevokedByPeer },
    )
    .await;
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

/// Finding 10: the registry stores an approval but its answer is late; the
/// node's resend is answered "replayed". The approval was stored and
/// delivered, so the node must report success, not "nothing changed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_to_a_stored_statement_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let proxy = DelayProxy::start(reg.addr).await;
    let via_proxy = pilot_proto::join::JoinUrl::single(reg.join.key, proxy.addr);
    let a = TestNode::start(dir.path().join("a"), "alpha", Some(via_proxy))
        .await
        .unwrap();
    let b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join))
        .await
        .unwrap();
    b.ok(Request::TrustRequest {
        peer: "alpha".into(),
        note: String::new(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(Duration::from_secs(5), "the request arrives", || async {
        a.trust_state("beta").await == TrustState::Pending
    })
    .await;
    // The answer to the first copy is held back past the node's resend.
    proxy.hold_answers(Duration::from_millis(300), Duration::from_millis(1000));
    let r = a
        .call(Request::TrustApprove {
            peer: "beta".into(),
            allow: None,
            expires_in_secs: None,
        })
        .await;
    let r = r.expect("approve reported as failed");
    let r = TrustChange::try_from(r).expect("a trust change");
    assert!(r.delivered, "{r:?}");
    assert_eq!(a.trust_state("beta").await, TrustState::Trusted);
    eventually(Duration::from_secs(5), "beta sees the approval", || async {
        b.trust_state("alpha").await == TrustState::Trusted
    })
    .await;
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

/// Finding 4: anyone who knows a node's public key can make initiations
/// whose MAC checks, from any source address. A flood of them puts the node
/// under load: it answers them with cookie replies instead of spending a
/// Diffie-Hellman on each, and a trusted peer still gets through (its
/// initiation is answered with a cookie, and sent again with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_valid_mac_initiations_is_answered_with_cookies() {
    use pilot_proto::wire::{INIT_LEN, MAC_LEN};
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    let beta = identity_of(&b.dir);
    let beta_at = listen_addr(&b).await;
    let mac = handshake::MacKey::for_static(&beta.static_public());
    // From its own address: cookie replies are rationed per source, and
    // the lab's nodes all live on 127.0.0.1.
    let flood = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap());
    let junk = move |i: u32| {
        let mut init = [0x5au8; INIT_LEN];
        init[0] = wire::MSG_HANDSHAKE_INIT;
        init[1..4].fill(0);
        init[4..8].copy_from_slice(&i.to_le_bytes());
        let m = mac.compute(&init[..INIT_LEN - MAC_LEN]);
        init[INIT_LEN - MAC_LEN..].copy_from_slice(&m);
        init
    };
    // Past the load threshold at once.
    for i in 0..300u32 {
        flood.send_to(&junk(i), beta_at).await.unwrap();
    }
    let mut buf = vec![0u8; 2048];
    let mut cookies = 0;
    for _ in 0..400 {
        match tokio::time::timeout(Duration::from_millis(300), flood.recv(&mut buf)).await {
            Ok(Ok(n)) if wire::classify(&buf[..n]) == Kind::CookieReply => cookies += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    assert!(cookies > 0, "no cookie reply came back to the flood");
    let sent = b.drops().await.cookie_sent;
    assert!(sent >= cookies, "cookie_sent {sent} < {cookies} received");
    // The flood goes on (about 400/s) while alpha and beta make friends and
    // their first handshake; the flood's own cookies keep coming, so beta
    // stays under load all along.
    let f = flood.clone();
    let flooding = tokio::spawn(async move {
        for round in 0..1200u32 {
            for k in 0..10 {
                let _ = f.send_to(&junk(1000 + round * 10 + k), beta_at).await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let f = flood.clone();
    let counting = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut n = 0u32;
        while let Ok(Ok(len)) = tokio::time::timeout(Duration::from_secs(2), f.recv(&mut buf)).await
        {
            n += u32::from(wire::classify(&buf[..len]) == Kind::CookieReply);
        }
        n
    });
    trust(&a, &b).await;
    deliver(&a, &mut b, b"through the flood").await;
    deliver(&b, &mut a, b"and back").await;
    flooding.abort();
    let during = counting.await.unwrap();
    assert!(during > 0, "beta was not under load during the handshake");
    assert!(b.drops().await.cookie_sent > sent);
    for n in [a, b] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

/// CI stop 6: the port-map keeper registered while the start's own
/// registration was in flight; the registry took the newer one and refused
/// the start's as a replay, so the node came up on its cached address.
/// Registrations that overlap now run one after the other: every one of
/// them is accepted, and the node keeps its address and its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_registrations_are_all_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(dir.path(), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    let before = a.addr();
    let results = futures_join_all((0..6).map(|_| a.node.register_again())).await;
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.is_ok(),
            "registration {i} of 6 overlapping ones failed: {r:?}"
        );
    }
    assert_eq!(a.addr(), before, "the address moved");
    deliver(&a, &mut b, b"after six registrations").await;
    for n in [a, b] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

/// Runs the futures concurrently on this task and returns their outputs in
/// order (a small join_all, to keep the test crate's dependencies as they
/// are).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
