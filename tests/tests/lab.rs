//! A registry and several nodes in one process, over fake TUN devices and
//! loopback UDP: trust request/approve/deny/revoke, data both ways, restarts.

use std::time::Duration;

use pilot_tests::*;
use pilot_tun::api::{Request, TrustState};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_lifecycle_with_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let mut a = TestNode::start(dir.path().join("a"), "alpha", Some(reg.join))
        .await
        .unwrap();
    let mut b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join))
        .await
        .unwrap();
    let mut c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();
    assert_ne!(a.addr(), b.addr());
    assert_ne!(b.addr(), c.addr());
    assert!(a.addr().octets()[..2] == [10, 77]);

    // Joined is not trusted: A's packet to B is refused locally with ICMP
    // "administratively prohibited", and B gets nothing.
    let pkt = udp_packet(a.addr(), b.addr(), b"before trust");
    a.send(pkt).await;
    let icmp = a
        .recv(Duration::from_secs(2))
        .await
        .expect("ICMP answer for untrusted destination");
    assert_eq!(
        (icmp[9], icmp[20], icmp[21]),
        (1, 3, 13),
        "ICMP dest-unreachable admin-prohibited"
    );
    assert_eq!(
        &icmp[12..16],
        &b.addr().octets(),
        "from the refused address"
    );
    assert!(b.recv(Duration::from_millis(300)).await.is_none());

    // Request with a note, seen as pending on the other side.
    a.ok(Request::TrustRequest {
        peer: "beta".into(),
        note: "ci runner".into(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(Duration::from_secs(5), "beta sees the request", || async {
        let p = b.pending().await;
        p.iter().any(|r| {
            r.hostname.as_deref() == Some("alpha") && r.note.as_deref() == Some("ci runner")
        })
    })
    .await;
    assert_eq!(a.trust_state("beta").await, TrustState::Requested);
    // One-sided approval moves no packet.
    blocked(&a, &mut b, b"requested only").await;

    b.ok(Request::TrustApprove {
        peer: "alpha".into(),
        allow: None,
        expires_in_secs: None,
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "alpha sees the approval",
        || async { a.trust_state("beta").await == TrustState::Trusted },
    )
    .await;

    // Data both ways, byte for byte.
    deliver(&a, &mut b, b"hello beta").await;
    deliver(&b, &mut a, b"hello alpha").await;
    let big = vec![0xabu8; 1300];
    deliver(&a, &mut b, &big).await;
    let peers = a.peers().await;
    let beta = peers
        .iter()
        .find(|p| p.hostname.as_deref() == Some("beta"))
        .unwrap();
    assert_eq!(beta.trust, TrustState::Trusted);
    assert!(beta.session);
    assert!(beta.tx_bytes > 1300);
    assert!(beta.rx_bytes > 0);

    // Deny: gamma asks alpha, alpha refuses; nothing flows either way.
    c.ok(Request::TrustRequest {
        peer: a.addr().to_string(),
        note: String::new(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "alpha sees gamma's request",
        || async { a.trust_state("gamma").await == TrustState::Pending },
    )
    .await;
    a.ok(Request::TrustDeny {
        peer: "gamma".into(),
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "gamma learns it was denied",
        || async { c.trust_state("alpha").await == TrustState::DeniedByPeer },
    )
    .await;
    blocked(&c, &mut a, b"denied").await;
    blocked(&a, &mut c, b"denied").await;

    // Revoke: beta withdraws; traffic stops on both sides within a second.
    b.ok(Request::TrustRevoke {
        peer: "alpha".into(),
    })
    .await;
    let t0 = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(1),
        "alpha learns of the revocation",
        || async { a.trust_state("beta").await == TrustState::RevokedByPeer },
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1));
    blocked(&a, &mut b, b"after revoke").await;
    blocked(&b, &mut a, b"after revoke").await;
    assert_eq!(b.trust_state("alpha").await, TrustState::Revoked);

    // Nothing was dropped as malformed or forged along the way.
    assert_eq!(b.drops().await.auth, 0);
    assert_eq!(b.drops().await.inner_address, 0);
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_inner_source_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    deliver(&a, &mut b, b"real").await;
    // A trusted peer may not claim another overlay address as source.
    let spoofed = udp_packet("10.77.1.1".parse().unwrap(), b.addr(), b"spoofed");
    a.send(spoofed).await;
    eventually(
        Duration::from_secs(2),
        "beta counts the spoofed packet",
        || async { b.drops().await.inner_address >= 1 },
    )
    .await;
    assert!(
        b.recv(Duration::from_millis(300)).await.is_none(),
        "spoofed packet delivered"
    );
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("registry");
    let reg = RegistryHandle::start(&rdir, lo()).await;
    let raddr = reg.addr;
    let join = reg.join;
    let mut a = TestNode::start(dir.path().join("a"), "alpha", Some(join))
        .await
        .unwrap();
    let mut b = TestNode::start(dir.path().join("b"), "beta", Some(join))
        .await
        .unwrap();
    let (a_addr, b_addr) = (a.addr(), b.addr());
    trust(&a, &b).await;
    deliver(&a, &mut b, b"before").await;

    // A request to a node that is offline waits in the registry's inbox.
    let c = TestNode::start(dir.path().join("c"), "gamma", Some(join))
        .await
        .unwrap();
    b.node.shutdown().await;
    c.ok(Request::TrustRequest {
        peer: "beta".into(),
        note: "while you slept".into(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;

    // Registry down: the established session keeps working.
    reg.stop().await;
    let b = TestNode::start(dir.path().join("b"), "beta", None).await;
    let mut b = b.expect("beta comes up on its cached address while the registry is down");
    assert_eq!(b.addr(), b_addr, "cached address");
    // Registry back, same state: same addresses, trust intact, the waiting
    // request is delivered.
    let reg = RegistryHandle::start(&rdir, raddr).await;
    assert_eq!(reg.join, join, "same registry key");
    eventually(
        Duration::from_secs(20),
        "beta receives gamma's stored request",
        || async { b.trust_state("gamma").await == TrustState::Pending },
    )
    .await;
    deliver(&a, &mut b, b"after").await;
    deliver(&b, &mut a, b"after, back").await;
    // A brand-new node finds alpha by name: the registry kept its records.
    let d = TestNode::start(dir.path().join("d"), "delta", Some(join))
        .await
        .unwrap();
    d.ok(Request::TrustRequest {
        peer: "alpha".into(),
        note: String::new(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    assert_eq!(a.addr(), a_addr);
    for n in [a, b, c, d] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restart_keeps_address_and_trust() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    deliver(&a, &mut b, b"one").await;
    let addr = a.addr();
    a.node.shutdown().await;
    // Restart without naming the registry: it is remembered.
    let mut a = TestNode::start(dir.path().join("a"), "alpha", None)
        .await
        .unwrap();
    assert_eq!(a.addr(), addr);
    assert_eq!(a.trust_state("beta").await, TrustState::Trusted);
    deliver(&b, &mut a, b"welcome back").await;
    deliver(&a, &mut b, b"thanks").await;
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_without_registry_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // A registry key nobody serves, on a port nobody listens on.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let join = pilot_proto::join::JoinUrl::single([9; 32], sock.local_addr().unwrap());
    drop(sock);
    let err = TestNode::start(dir.path().join("a"), "alpha", Some(join))
        .await
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("unreachable") && msg.contains("no cached address"),
        "{msg}"
    );
    let err = TestNode::start(dir.path().join("b"), "beta", None)
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("--registry"), "{err}");
}
