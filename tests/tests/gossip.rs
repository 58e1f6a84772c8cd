//! Gossip among trusted peers (issue 12), in process on loopback: with the
//! registry stopped, two nodes that both moved (restarted on new ports)
//! find each other again through a common trusted peer, a withdrawal of
//! trust reaches a node that has no session with its signer through a
//! common peer, and an owner's revocation handed to one node reaches the
//! rest of the fleet. Each case runs a
//! second time with the common peer's gossip off (`--no-gossip`) and shows
//! that then nothing gets through: nothing else carries it.

use std::time::Duration;

use pilot_tests::{
    allow, blocked, deliver, eventually, id_of, install_cert, now, trust, RegistryHandle, TestNode,
};
use pilot_tun::api::{GossipStatus, Request, TrustState};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Time for every node's gossip tick to hand its record to the peers it
/// has a session with (the tick is 2 s).
const SETTLE: Duration = Duration::from_millis(2600);

/// A registry and three nodes that all trust each other: `x`, `common`
/// (with gossip on or off) and `y`, with a session from each of `x` and
/// `y` to `common`.
struct Trio {
    dir: tempfile::TempDir,
    reg: RegistryHandle,
    x: TestNode,
    common: TestNode,
    y: TestNode,
}

async fn trio(names: [&str; 3], common_gossips: bool) -> Trio {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let join = Some(reg.join);
    let x = TestNode::start(dir.path().join(names[0]), names[0], join)
        .await
        .unwrap();
    let mut common =
        TestNode::start_gossip(dir.path().join(names[1]), names[1], join, common_gossips)
            .await
            .unwrap();
    let y = TestNode::start(dir.path().join(names[2]), names[2], join)
        .await
        .unwrap();
    trust(&x, &common).await;
    trust(&common, &y).await;
    trust(&y, &x).await;
    deliver(&x, &mut common, b"x to common").await;
    deliver(&y, &mut common, b"y to common").await;
    Trio {
        dir,
        reg,
        x,
        common,
        y,
    }
}

/// Whether alpha reached beta, and what gamma's status says of gossip.
async fn finds_through_common_peer(common_gossips: bool) -> (bool, Option<GossipStatus>) {
    let Trio {
        dir: _dir,
        reg,
        x: mut a,
        common: mut c,
        y: mut b,
    } = trio(["alpha", "gamma", "beta"], common_gossips).await;
    let join = Some(reg.join);
    deliver(&a, &mut b, b"a to b").await;
    reg.stop().await;
    // With the registry away, alpha and beta both go down and come back
    // on new ports: each remembers only the other's old endpoint, and
    // nobody can look the new one up.
    let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
    a.node.shutdown().await;
    b.node.shutdown().await;
    let mut b = TestNode::start(b_dir, "beta", join).await.unwrap();
    // Beta finds gamma (which did not move) from its cache; gamma hears
    // beta's new endpoints over that session.
    deliver(&b, &mut c, b"b to c again").await;
    a = TestNode::start(a_dir, "alpha", join).await.unwrap();
    deliver(&a, &mut c, b"a to c again").await;
    tokio::time::sleep(SETTLE).await;
    let pkt = pilot_tests::udp_packet(a.addr(), b.addr(), b"found you");
    b.drain();
    let mut reached = false;
    for _ in 0..40 {
        a.send(pkt.clone()).await;
        if let Some(got) = b.recv(Duration::from_millis(250)).await {
            assert_eq!(got, pkt);
            reached = true;
            break;
        }
    }
    (reached, c.status().await.gossip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_registry_down_a_moved_peer_is_found_again_through_a_common_trusted_peer() {
    let (reached, gamma) = finds_through_common_peer(true).await;
    assert!(reached, "alpha never reached beta through gamma's gossip");
    // Gamma holds both records and answered alpha's question.
    let gamma = gamma.expect("gamma's status shows gossip");
    assert_eq!(gamma.records, 2, "{gamma:?}");
    assert!(gamma.answered >= 1, "{gamma:?}");
    // Nothing honest is counted as refused (a record sent again at a
    // rekey is a repeat, not a refusal).
    assert_eq!(gamma.refused, 0, "{gamma:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gossip_at_the_common_peer_the_peer_stays_lost() {
    let (reached, gamma) = finds_through_common_peer(false).await;
    assert!(
        !reached,
        "alpha reached beta although nothing could tell it where beta is"
    );
    assert_eq!(gamma, None, "gossip is off at gamma: status leaves it out");
}

/// Delta revokes beta while the registry is down; beta has no session
/// with delta, gamma has one with each. Returns beta's view of delta after
/// a while.
async fn revocation_through_common_peer(common_gossips: bool) -> TrustState {
    let Trio {
        dir: _dir,
        reg,
        x: mut b,
        common: c,
        y: d,
    } = trio(["beta", "gamma", "delta"], common_gossips).await;
    deliver(&c, &mut b, b"c to b").await;
    assert_eq!(b.trust_state("delta").await, TrustState::Trusted);
    reg.stop().await;
    let revoke = d
        .call(Request::TrustRevoke {
            peer: b.addr().to_string(),
        })
        .await;
    // The registry is away: the revocation holds locally and waits on
    // disk for it.
    let change = match revoke {
        Ok(pilot_tun::api::Reply::Trust(t)) => t,
        other => panic!("revoke answered {other:?}"),
    };
    assert!(!change.delivered && change.state == TrustState::Revoked);
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < until {
        if b.trust_state("delta").await == TrustState::RevokedByPeer {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = b.trust_state("delta").await;
    if seen == TrustState::RevokedByPeer {
        // And it took effect: delta is out of beta's tunnels.
        eventually(
            Duration::from_secs(3),
            "beta drops delta's session",
            || async {
                b.peers()
                    .await
                    .iter()
                    .any(|p| p.hostname.as_deref() == Some("delta") && !p.session)
            },
        )
        .await;
        // Gamma still carries traffic between the two that trust it.
        blocked(&d, &mut b, b"revoked").await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_its_subject_through_a_common_peer_without_the_registry() {
    assert_eq!(
        revocation_through_common_peer(true).await,
        TrustState::RevokedByPeer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gossip_at_the_common_peer_the_revocation_waits_for_the_registry() {
    assert_eq!(
        revocation_through_common_peer(false).await,
        TrustState::Trusted
    );
}

/// An owner certifies alpha, gamma and beta ("fleet"), whose rules admit
/// each other; with the registry down the owner hands its revocation of
/// beta to gamma's daemon. Returns alpha's view of beta after a while:
/// alpha has no session with the owner, only with gamma.
async fn owner_revocation_through_common_peer(common_gossips: bool) -> TrustState {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let join = Some(reg.join);
    let a = TestNode::start(dir.path().join("a"), "alpha", join)
        .await
        .unwrap();
    let mut c = TestNode::start_gossip(dir.path().join("c"), "gamma", join, common_gossips)
        .await
        .unwrap();
    let b = TestNode::start(dir.path().join("b"), "beta", join)
        .await
        .unwrap();
    let owner = pilot_proto::cert::OwnerKey::from_secret(&[7; 32]);
    for n in [&a, &c, &b] {
        install_cert(n, &owner, "fleet").await;
        allow(n, &owner, "fleet", "udp/5000").await;
    }
    eventually(
        Duration::from_secs(30),
        "the fleet trusts itself",
        || async {
            a.trust_state("beta").await == TrustState::Trusted
                && a.trust_state("gamma").await == TrustState::Trusted
                && c.trust_state("beta").await == TrustState::Trusted
        },
    )
    .await;
    deliver(&a, &mut c, b"a to c").await;
    reg.stop().await;
    let revocation = pilot_proto::cert::Revocation::sign(&owner, id_of(&b), now());
    let report: pilot_tun::api::RevocationReport = c
        .get(Request::OwnerRevoke {
            revocation: revocation.to_armored(),
        })
        .await;
    assert!(report.kept_here && !report.delivered, "{report:?}");
    // Gamma's own rules withdraw beta there at once.
    eventually(Duration::from_secs(5), "gamma withdraws beta", || async {
        c.trust_state("beta").await == TrustState::Revoked
    })
    .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until && a.trust_state("beta").await != TrustState::Revoked
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.trust_state("beta").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_revocation_reaches_the_fleet_through_a_common_peer_without_the_registry() {
    assert_eq!(
        owner_revocation_through_common_peer(true).await,
        TrustState::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gossip_an_owner_revocation_waits_for_the_registry() {
    assert_eq!(
        owner_revocation_through_common_peer(false).await,
        TrustState::Trusted
    );
}
