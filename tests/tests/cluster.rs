//! Two registry instances on one PostgreSQL database (needs
//! `PILOT_TEST_PG`, which `scripts/test.sh` sets): what one instance
//! learns for a node attached to the other reaches it — a trust statement
//! at once, a punch request, relayed datagrams — and nothing reaches a
//! node that did not approve, nor through a frame an instance did not
//! make.

use std::time::Duration;

use pilot_proto::identity::Identity;
use pilot_proto::messages::{FromRegistry, PeerRef, StatementKind, ToRegistry};
use pilot_proto::wire::{MSG_INSTANCE, MSG_RELAY_TO};
use pilot_registry::cluster::FRAME_HEADER_LEN;
use pilot_tests::{statement, RawClient, RegistryHandle, TestPg};

fn identity(seed: u8) -> Identity {
    let mut bytes = [seed; 64];
    bytes[0] = 0xc1;
    Identity::from_bytes(&bytes)
}

/// A datagram for the relay: to `to`, carrying `payload`.
fn relay_to(to: &Identity, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![MSG_RELAY_TO, 0, 0, 0];
    d.extend_from_slice(&to.node_id().0);
    d.extend_from_slice(payload);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_two_instances_trust_punch_and_relay_through_both() {
    let Some(pg) = TestPg::new("the two-instance registry test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let one =
        RegistryHandle::start_pg_instance(&dir.path().join("one"), None, pg.config.clone()).await;
    let two = RegistryHandle::start_pg_instance(
        &dir.path().join("two"),
        Some(&dir.path().join("one")),
        pg.config.clone(),
    )
    .await;
    assert_eq!(one.join.key, two.join.key, "one registry key");
    let (ia, ib, ic) = (identity(1), identity(2), identity(3));
    let mut a = RawClient::register(one.join, &ia, "alpha").await;
    let mut b = RawClient::register(two.join, &ib, "beta").await;
    let mut c = RawClient::register(two.join, &ic, "gamma").await;

    // A trust request stored by instance one reaches beta, online at
    // instance two, at once (not at its next registration).
    let started = std::time::Instant::now();
    assert!(matches!(
        a.statement(statement(&ia, &ib, StatementKind::Approve, 1))
            .await,
        FromRegistry::Ok { .. }
    ));
    match b.unsolicited(Duration::from_secs(10)).await {
        Some(FromRegistry::Push { item, .. }) => {
            println!("the push crossed instances in {:?}", started.elapsed());
            let pilot_proto::messages::PushItem::Statement { statement, .. } = item;
            assert_eq!(statement.body.from.node_id(), ia.node_id());
        }
        other => panic!("beta gets alpha's request pushed, got {other:?}"),
    }
    // Beta approves back; alpha (at instance one) hears it too.
    assert!(matches!(
        b.statement(statement(&ib, &ia, StatementKind::Approve, 1))
            .await,
        FromRegistry::Ok { .. }
    ));
    assert!(matches!(
        a.unsolicited(Duration::from_secs(10)).await,
        Some(FromRegistry::Push { .. })
    ));

    // Alpha looks beta up at instance one: beta is told to probe alpha.
    let peer = a
        .call(|req| ToRegistry::Lookup {
            req,
            peer: PeerRef::Id(ib.node_id()),
        })
        .await;
    assert!(matches!(peer, FromRegistry::Peer { .. }), "{peer:?}");
    match b.unsolicited(Duration::from_secs(10)).await {
        Some(FromRegistry::Punch {
            peer, endpoints, ..
        }) => {
            assert_eq!(peer, ia.node_id());
            assert!(!endpoints.is_empty());
        }
        other => panic!("beta gets a punch request for alpha, got {other:?}"),
    }

    // Relayed: alpha hands instance one a datagram for beta; beta gets it
    // from its own instance, two, naming alpha.
    let payload = b"tunnel bytes the relay cannot read";
    let mut got = None;
    for _ in 0..10 {
        a.send_raw(&relay_to(&ib, payload)).await;
        if let Some(d) = b.relayed(Duration::from_millis(500)).await {
            got = Some(d);
            break;
        }
    }
    let (d, from) = got.expect("a relayed datagram crosses the instances");
    assert_eq!(from, two.addr, "delivered by beta's own instance");
    assert_eq!(&d[4..20], &ia.node_id().0, "naming alpha");
    assert_eq!(&d[20..], payload);
    // And back, beta to alpha.
    let mut back = None;
    for _ in 0..10 {
        b.send_raw(&relay_to(&ia, b"and back")).await;
        if let Some(d) = a.relayed(Duration::from_millis(500)).await {
            back = Some(d);
            break;
        }
    }
    let (d, from) = back.expect("relayed back");
    assert_eq!(from, one.addr);
    assert_eq!(&d[20..], b"and back");

    // Negative: gamma (instance two) never approved alpha: nothing of
    // alpha's reaches it through the relay.
    for _ in 0..5 {
        a.send_raw(&relay_to(&ic, b"for gamma")).await;
    }
    assert!(
        c.relayed(Duration::from_secs(3)).await.is_none(),
        "an unapproved node gets nothing relayed"
    );

    // Negative: an instance frame not made with the registry's key (a
    // forged tag, or the right frame altered) is dropped by instance two.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut forged = vec![MSG_INSTANCE, 0, 0, 0];
    forged.extend_from_slice(&ib.node_id().0);
    let now_ms = pilot_registry::cluster::Cluster::now_ms();
    forged.extend_from_slice(&now_ms.to_le_bytes());
    forged.extend_from_slice(&[0u8; 16]);
    assert_eq!(forged.len(), FRAME_HEADER_LEN);
    let mut inner = vec![pilot_proto::wire::MSG_RELAY_FROM, 0, 0, 0];
    inner.extend_from_slice(&ic.node_id().0);
    inner.extend_from_slice(b"forged");
    forged.extend_from_slice(&inner);
    let refused = two
        .stats
        .relay_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        sock.send_to(&forged, two.addr).await.unwrap();
    }
    assert!(
        b.relayed(Duration::from_secs(2)).await.is_none(),
        "a forged instance frame delivers nothing"
    );
    assert!(
        two.stats
            .relay_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= refused + 3
    );

    one.stop().await;
    two.stop().await;
}
