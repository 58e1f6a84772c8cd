//! Return routability (issue 11): the registry moves a node to a new
//! address (where its pushes, punch requests and relayed traffic go) only
//! once the node answered a path check from there. A source rewritten on
//! the path moves nothing; a NAT that gives the node a new mapping does,
//! one round trip later. Nodes from before the checks never answer one and
//! move as they always did (shown side by side, so the tests show what the
//! check changes).

use std::net::SocketAddr;
use std::time::Duration;

use pilot_proto::identity::Identity;
use pilot_proto::messages::{FromRegistry, StatementKind, ToRegistry};
use pilot_tests::{eventually, statement, NatProxy, RawClient, RegistryHandle, TestNode};
use pilot_tun::api::{Request, TrustState};

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn identity(seed: u8) -> Identity {
    let mut bytes = [seed; 64];
    bytes[0] = 0xd7;
    Identity::from_bytes(&bytes)
}

/// What the registry sent to `sock` within `wait`, opened with `owner`'s
/// session (what an attacker there receives, read by the test).
async fn caught(
    sock: &tokio::net::UdpSocket,
    owner: &RawClient,
    wait: Duration,
) -> Vec<FromRegistry> {
    let mut got = vec![];
    let mut buf = vec![0u8; 2048];
    let until = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, sock.recv(&mut buf)).await {
        got.push(owner.open(&mut buf[..n]).expect("sealed for the node"));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_source_moves_only_a_node_that_does_not_answer_checks() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (ia, ib, ic) = (identity(1), identity(2), identity(3));
    let mut a = RawClient::register(reg.join, &ia, "alpha").await;
    let mut old = RawClient::register_without_checks(reg.join, &ic, "gamma").await;
    let mut b = RawClient::register(reg.join, &ib, "beta").await;

    for (node, name) in [(&mut a, "alpha"), (&mut old, "gamma")] {
        // On the path: a fresh datagram of the node's, its source
        // rewritten to a host of the attacker's choosing (the original
        // dropped).
        let evil = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        evil.send_to(&node.sealed(&ToRegistry::Ping { req: 900 }), reg.addr)
            .await
            .unwrap();
        let at_evil = caught(&evil, node, Duration::from_millis(700)).await;
        // A trust request for the node: pushed to where the registry
        // thinks the node is.
        let to = if name == "alpha" { &ia } else { &ic };
        assert!(matches!(
            b.statement(statement(&ib, to, StatementKind::Approve, 1))
                .await,
            FromRegistry::Ok { .. }
        ));
        let push_at_evil = caught(&evil, node, Duration::from_millis(700)).await;
        if name == "alpha" {
            // The check went there, and nothing else: the answer to the
            // ping and the push reach the node where it is.
            assert!(
                matches!(at_evil[..], [FromRegistry::PathCheck { .. }]),
                "{name}: the attacker's host got {at_evil:?}"
            );
            assert!(push_at_evil.is_empty(), "{name}: {push_at_evil:?}");
            assert!(
                matches!(
                    node.unsolicited(Duration::from_secs(3)).await,
                    Some(FromRegistry::Push { .. })
                ),
                "{name} gets its push where it is"
            );
        } else {
            // A node from before the checks moved with its newest
            // datagram: the answer and the push went to the attacker.
            assert!(
                matches!(at_evil[..], [FromRegistry::Pong { req: 900, .. }]),
                "{name}: {at_evil:?}"
            );
            assert!(
                push_at_evil
                    .iter()
                    .any(|m| matches!(m, FromRegistry::Push { .. })),
                "{name}: {push_at_evil:?}"
            );
        }
    }
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_new_mapping_moves_once_it_answered_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (ia, ib) = (identity(4), identity(5));
    let mut a = RawClient::register(reg.join, &ia, "alpha").await;
    let mut b = RawClient::register(reg.join, &ib, "beta").await;
    let before = a.local_addr();
    a.rebind().await;
    assert_ne!(a.local_addr(), before);
    // The node speaks from its new address; the check comes there and
    // the node answers it (in `unsolicited`), then it is moved.
    a.send(&ToRegistry::Ping { req: 901 }).await;
    assert_eq!(a.unsolicited(Duration::from_millis(500)).await, None);
    assert!(matches!(
        b.statement(statement(&ib, &ia, StatementKind::Approve, 1))
            .await,
        FromRegistry::Ok { .. }
    ));
    assert!(
        matches!(
            a.unsolicited(Duration::from_secs(3)).await,
            Some(FromRegistry::Push { .. })
        ),
        "the push reaches the node at its new address"
    );
    reg.stop().await;
}

/// The real node answers the checks: a rewritten acknowledgement (a
/// datagram nobody answers, so the node does not speak again soon) leaves
/// it where it is, and the next push reaches it at once. A node that did
/// not answer would be moved to the attacker's host, and would hear the
/// push only after its next ping (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_path_checks_and_a_rewritten_datagram_leaves_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let nat = NatProxy::start(reg.addr).await;
    let via_nat = pilot_proto::join::JoinUrl::single(reg.join.key, nat.addr);
    let a = TestNode::start(dir.path().join("a"), "alpha", Some(via_nat))
        .await
        .unwrap();
    let b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join))
        .await
        .unwrap();
    // Beta asks; alpha's acknowledgement of the push is rewritten.
    nat.rewrite_next();
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
    eventually(
        Duration::from_secs(5),
        "a datagram was rewritten",
        || async { !nat.rewrite_pending() },
    )
    .await;
    eventually(
        Duration::from_secs(3),
        "the attacker's host got the check",
        || async { nat.caught() >= 1 },
    )
    .await;
    // Beta withdraws: the push must reach alpha where it is.
    b.ok(Request::TrustRevoke {
        peer: "alpha".into(),
    })
    .await;
    eventually(
        Duration::from_secs(3),
        "the withdrawal reaches alpha",
        || async { a.trust_state("beta").await == TrustState::None },
    )
    .await;
    assert_eq!(
        nat.caught(),
        1,
        "only the check went to the attacker's host"
    );

    // A new mapping: alpha moves once it speaks from there (its next
    // ping) and answers the check; a push then reaches it.
    nat.rebind().await;
    b.ok(Request::TrustRequest {
        peer: "alpha".into(),
        note: String::new(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "alpha hears beta at its new mapping",
        || async { a.trust_state("beta").await == TrustState::Pending },
    )
    .await;
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}
