//! Fleet trust in process: an owner certifies two nodes, rules on both
//! admit each other's tag, and they trust each other with no request or
//! approval typed, each limited to its rule's ports; an uncertified node
//! and a node with another owner's certificate get nothing; an owner
//! revocation handed to any daemon withdraws the revoked node everywhere,
//! also after a restart; forged certificates and revocations are refused.

use std::net::Ipv4Addr;
use std::time::Duration;

use pilot_proto::cert::{Certificate, OwnerKey, Revocation};
use pilot_tests::*;
use pilot_tun::api::{Request, RevocationReport, TrustState};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = udp_packet(src, dst, payload);
    p[22..24].copy_from_slice(&dp.to_be_bytes());
    p
}

/// Sends until `b` gets it.
async fn arrives(a: &TestNode, b: &mut TestNode, pkt: &[u8]) {
    b.drain();
    for _ in 0..40 {
        a.send(pkt.to_vec()).await;
        if let Some(got) = b.recv(Duration::from_millis(250)).await {
            assert_eq!(got, pkt);
            return;
        }
    }
    panic!("{} never got the packet from {}", b.name, a.name);
}

/// Nothing arrives, and the sender is answered at once.
async fn refused(a: &mut TestNode, b: &mut TestNode, pkt: &[u8]) {
    a.drain();
    b.drain();
    a.send(pkt.to_vec()).await;
    let answer = a
        .recv(Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("{} got no ICMP answer for a packet to {}", a.name, b.name));
    assert_eq!(
        (answer[9], answer[20], answer[21]),
        (1, 3, 13),
        "{answer:?}"
    );
    assert!(b.recv(Duration::from_millis(400)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_admit_certified_nodes_without_approvals_and_revocation_withdraws() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    let mut c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();
    let d = TestNode::start(dir.path().join("d"), "delta", Some(reg.join))
        .await
        .unwrap();
    let owner = OwnerKey::from_secret(&[7; 32]);
    let stranger = OwnerKey::from_secret(&[8; 32]);

    // alpha is a build agent, beta a cache; gamma joined but has no
    // certificate; delta has a "build" certificate from another owner.
    install_cert(&a, &owner, "build").await;
    install_cert(&b, &owner, "cache").await;
    install_cert(&d, &stranger, "build").await;
    // beta lets build agents open udp/5000; alpha lets caches ping it.
    let rule = allow(&b, &owner, "build", "udp/5000").await;
    assert_eq!(rule.id, 1);
    allow(&a, &owner, "cache", "icmp").await;

    eventually(
        Duration::from_secs(20),
        "alpha and beta trust each other",
        || async {
            a.trust_state("beta").await == TrustState::Trusted
                && b.trust_state("alpha").await == TrustState::Trusted
        },
    )
    .await;
    let (aa, ba) = (a.addr(), b.addr());
    arrives(&a, &mut b, &udp(aa, ba, 5000, b"build output")).await;
    refused(&mut a, &mut b, &udp(aa, ba, 22, b"ssh?")).await;
    let e: pilot_tun::api::Explanation = b
        .get(Request::Explain {
            peer: "alpha".into(),
            traffic: Some("udp/5000".into()),
        })
        .await;
    assert_eq!(e.inbound.decided_by, "rule 1");

    // Nobody else gets in: not the uncertified node, not the other owner's.
    for n in [&c, &d] {
        for who in ["alpha", "beta"] {
            assert_ne!(
                n.trust_state(who).await,
                TrustState::Trusted,
                "{} trusts {who}",
                n.name
            );
        }
    }
    assert_ne!(b.trust_state("delta").await, TrustState::Trusted);
    let (ca, cb) = (c.addr(), b.addr());
    refused(&mut c, &mut b, &udp(ca, cb, 5000, b"let me in")).await;

    // A forged certificate (tags changed after signing) is refused at
    // install, and so is another node's.
    let mut forged = Certificate::issue(
        &owner,
        id_of(&c),
        pilot_proto::cert::parse_tags("cache").unwrap(),
        now(),
        86_400,
    )
    .unwrap();
    forged.body.tags = pilot_proto::cert::parse_tags("build").unwrap();
    let err = c
        .call(Request::CertInstall {
            cert: forged.to_armored(),
        })
        .await
        .expect_err("forged certificate");
    assert!(err.error.contains("signature"), "{}", err.error);
    let theirs = Certificate::issue(
        &owner,
        id_of(&a),
        pilot_proto::cert::parse_tags("build").unwrap(),
        now(),
        86_400,
    )
    .unwrap();
    let err = c
        .call(Request::CertInstall {
            cert: theirs.to_armored(),
        })
        .await
        .expect_err("another node's certificate");
    assert!(err.error.contains("not"), "{}", err.error);

    // A revocation signed by another key is refused; the owner's, handed
    // to gamma's daemon (no rules there), reaches everyone.
    let mut fake = Revocation::sign(&stranger, id_of(&a), now());
    fake.body.owner = owner.public();
    let err = c
        .call(Request::OwnerRevoke {
            revocation: fake.to_armored(),
        })
        .await
        .expect_err("forged revocation");
    assert!(err.error.contains("verify"), "{}", err.error);
    let report: RevocationReport = c
        .get(Request::OwnerRevoke {
            revocation: Revocation::sign(&owner, id_of(&a), now()).to_armored(),
        })
        .await;
    assert!(report.delivered, "{report:?}");
    eventually(Duration::from_secs(5), "beta withdraws alpha", || async {
        b.trust_state("alpha").await != TrustState::Trusted
    })
    .await;
    eventually(Duration::from_secs(5), "alpha hears of it", || async {
        a.trust_state("beta").await != TrustState::Trusted
    })
    .await;
    let (aa, ba) = (a.addr(), b.addr());
    refused(&mut a, &mut b, &udp(aa, ba, 5000, b"revoked")).await;

    // Refused from then on, also after a restart, also by hand.
    b.node.shutdown().await;
    let b = TestNode::start(dir.path().join("b"), "beta", None)
        .await
        .unwrap();
    let err = b
        .call(Request::TrustApprove {
            peer: "alpha".into(),
            allow: None,
            expires_in_secs: None,
        })
        .await
        .expect_err("approving a revoked node");
    assert!(err.error.contains("revoked"), "{}", err.error);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(b.trust_state("alpha").await, TrustState::Trusted);

    for n in [a, b, c, d] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}
