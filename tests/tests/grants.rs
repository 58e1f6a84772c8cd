//! Scoped grants on manual trust, in process: a grant opens only its ports,
//! both ends enforce it (the sender refuses locally with ICMP, the receiver
//! drops what a lying sender lets out), replies pass whatever the grants,
//! an expiry ends it with the registry down, and `peers`, `trust list` and
//! `explain` show it.

use std::net::Ipv4Addr;
use std::time::Duration;

use pilot_proto::ports::Scope;
use pilot_tests::*;
use pilot_tun::api::{Explanation, Request, TrustState};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An IPv4/UDP packet from `sp` to `dp`.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = udp_packet(src, dst, payload);
    p[20..22].copy_from_slice(&sp.to_be_bytes());
    p[22..24].copy_from_slice(&dp.to_be_bytes());
    p
}

/// True if `pkt` is an ICMP "administratively prohibited" from `from`.
fn is_admin_prohibited(pkt: &[u8], from: Ipv4Addr) -> bool {
    pkt.len() >= 28 && pkt[9] == 1 && pkt[20] == 3 && pkt[21] == 13 && pkt[12..16] == from.octets()
}

/// `a` asks `b` with `a_allows` (what b may open on a), `b` approves with
/// `b_allows` (what a may open on b), for `b_secs` seconds if given.
async fn scoped_trust(
    a: &TestNode,
    b: &TestNode,
    a_allows: &str,
    b_allows: &str,
    b_secs: Option<u64>,
) {
    a.ok(Request::TrustRequest {
        peer: b.name.clone(),
        note: "scoped".into(),
        allow: Some(a_allows.parse().unwrap()),
        expires_in_secs: None,
        want: Some(b_allows.parse().unwrap()),
    })
    .await;
    eventually(Duration::from_secs(5), "request arrives", || async {
        b.trust_state(&a.name).await == TrustState::Pending
    })
    .await;
    let pending = b.pending().await;
    assert_eq!(
        pending[0].want.as_ref().map(|w| w.to_string()).as_deref(),
        Some(b_allows),
        "trust pending shows what the peer asks for"
    );
    b.ok(Request::TrustApprove {
        peer: a.name.clone(),
        allow: Some(b_allows.parse().unwrap()),
        expires_in_secs: b_secs,
    })
    .await;
    eventually(Duration::from_secs(5), "approval arrives", || async {
        a.trust_state(&b.name).await == TrustState::Trusted
    })
    .await;
}

/// Sends `pkt` from `a` until `b` gets it (a session takes a round trip).
async fn arrives(a: &TestNode, b: &mut TestNode, pkt: &[u8]) {
    b.drain();
    for _ in 0..40 {
        a.send(pkt.to_vec()).await;
        if let Some(got) = b.recv(Duration::from_millis(250)).await {
            assert_eq!(got, pkt, "{} got other bytes", b.name);
            return;
        }
    }
    panic!("{} never received the packet from {}", b.name, a.name);
}

/// `a`'s packet is refused by `a` itself: an ICMP answer from `to` comes
/// back at once and `b` gets nothing.
async fn refused_locally(a: &mut TestNode, b: &mut TestNode, pkt: &[u8]) {
    a.drain();
    b.drain();
    a.send(pkt.to_vec()).await;
    let answer = a
        .recv(Duration::from_secs(1))
        .await
        .expect("an ICMP answer to the refused packet");
    assert!(
        is_admin_prohibited(&answer, b.addr()),
        "administratively prohibited from the peer: {answer:?}"
    );
    assert!(
        b.recv(Duration::from_millis(400)).await.is_none(),
        "{} got a packet its grant does not open",
        b.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_opens_only_its_ports_and_replies_pass() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    // beta may only ping alpha; alpha may open udp/5000 on beta.
    scoped_trust(&a, &b, "icmp", "udp/5000", None).await;
    eventually(
        Duration::from_secs(5),
        "alpha learns beta's grant",
        || async {
            a.peers().await[0]
                .granted_us
                .as_ref()
                .is_some_and(|g| g.scope.to_string() == "udp/5000")
        },
    )
    .await;

    let open = udp(a.addr(), b.addr(), 4000, 5000, b"to the cache");
    arrives(&a, &mut b, &open).await;
    // beta's answer is a reply: it passes although alpha grants beta only
    // icmp.
    let reply = udp(b.addr(), a.addr(), 5000, 4000, b"cached");
    arrives(&b, &mut a, &reply).await;

    // Outside the grant, both ways: refused at once by the sender.
    let (aa, ba) = (a.addr(), b.addr());
    refused_locally(&mut a, &mut b, &udp(aa, ba, 4000, 22, b"ssh?")).await;
    refused_locally(&mut b, &mut a, &udp(ba, aa, 5000, 4001, b"new")).await;
    assert!(a.drops().await.policy_out >= 1);
    assert!(b.drops().await.policy_out >= 1);

    // What both sides show.
    let list = a.trust_list().await;
    let beta = &list[0];
    assert_eq!(beta.granted.as_ref().unwrap().scope.to_string(), "icmp");
    assert_eq!(
        beta.granted_us.as_ref().unwrap().scope.to_string(),
        "udp/5000"
    );
    let e: Explanation = a
        .get(Request::Explain {
            peer: "beta".into(),
            traffic: Some("udp/22".into()),
        })
        .await;
    assert_eq!(e.outbound.passes, Some(false));
    assert_eq!(e.outbound.decided_by, "not granted");
    assert_eq!(e.inbound.passes, Some(false));
    let e: Explanation = a
        .get(Request::Explain {
            peer: "beta".into(),
            traffic: Some("udp/5000".into()),
        })
        .await;
    assert_eq!(e.outbound.passes, Some(true));
    assert_eq!(e.outbound.decided_by, "the peer's grant");
    let e: Explanation = b
        .get(Request::Explain {
            peer: "alpha".into(),
            traffic: Some("udp/5000".into()),
        })
        .await;
    assert_eq!(e.inbound.passes, Some(true));
    assert_eq!(e.inbound.decided_by, "manual grant");

    // Widening by approving again: alpha may now open udp/22 too.
    b.ok(Request::TrustApprove {
        peer: "alpha".into(),
        allow: Some("udp/5000,udp/22".parse().unwrap()),
        expires_in_secs: None,
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "alpha learns the wider grant",
        || async {
            a.peers().await[0]
                .granted_us
                .as_ref()
                .is_some_and(|g| g.scope.to_string() == "udp/22,udp/5000")
        },
    )
    .await;
    arrives(&a, &mut b, &udp(aa, ba, 4002, 22, b"ssh now")).await;

    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;

    // The audit logs: the grants in force, and the first decision of each
    // kind (the refused udp/22 out of alpha, with its count at shutdown).
    let log = |who: &str, kind: &str| {
        let (shown, bad) =
            pilot_audit::read::entries(&dir.path().join(who), pilot_audit::LOG_FILE).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        shown
            .into_iter()
            .filter(|s| s.entry.kind == kind)
            .map(|s| s.entry.details)
            .collect::<Vec<_>>()
    };
    let grants = log("b", "grant");
    assert!(
        grants
            .iter()
            .any(|g| g["inbound"] == "udp/22,udp/5000" && g["outbound"] == "icmp"),
        "{grants:?}"
    );
    let denied = log("a", "policy-deny");
    assert!(
        denied
            .iter()
            .any(|d| d["direction"] == "out" && d["traffic"] == "udp/22"),
        "{denied:?}"
    );
    let counts = log("a", "policy-count");
    assert!(
        counts
            .iter()
            .any(|c| c["traffic"] == "udp/22" && c["allowed"] == false && c["count"] == 1),
        "{counts:?}"
    );
    assert!(!log("b", "policy-allow").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_drops_what_a_lying_sender_lets_out() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    scoped_trust(&a, &b, "all", "udp/5000", None).await;
    let open = udp(a.addr(), b.addr(), 4000, 5000, b"fine");
    arrives(&a, &mut b, &open).await;

    // alpha's operator edits alpha's trust store to claim beta granted
    // everything: alpha's own check now lets udp/22 out.
    a.node.shutdown().await;
    let path = dir.path().join("a").join("trust.json");
    let mut store: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for rec in store["records"].as_object_mut().unwrap().values_mut() {
        rec["granted_us"] = serde_json::json!({"scope": "all", "expires_at": null});
    }
    std::fs::write(&path, serde_json::to_vec(&store).unwrap()).unwrap();
    let mut a = TestNode::start(dir.path().join("a"), "alpha", None)
        .await
        .unwrap();
    arrives(&a, &mut b, &open).await;

    let before = b.drops().await.policy_in;
    a.drain();
    b.drain();
    let ssh = udp(a.addr(), b.addr(), 4000, 22, b"let me in");
    a.send(ssh.clone()).await;
    // beta drops it after decryption and tells alpha's program at once.
    let answer = a
        .recv(Duration::from_secs(2))
        .await
        .expect("beta's ICMP answer through the tunnel");
    assert!(is_admin_prohibited(&answer, b.addr()), "{answer:?}");
    assert!(b.recv(Duration::from_millis(400)).await.is_none());
    assert!(b.drops().await.policy_in > before);

    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_stops_traffic_with_the_registry_down() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    scoped_trust(&a, &b, "all", "udp/5000", Some(3)).await;
    let open = udp(a.addr(), b.addr(), 4000, 5000, b"while it lasts");
    arrives(&a, &mut b, &open).await;
    reg.stop().await;
    // The expiry is a unix second; wait past it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late = udp(a.addr(), b.addr(), 4100, 5000, b"too late");
    refused_locally(&mut a, &mut b, &late).await;
    let list = a.trust_list().await;
    assert_eq!(
        list[0].granted_us.as_ref().unwrap().scope.to_string(),
        "none",
        "an ended grant shows as none"
    );
    a.node.shutdown().await;
    b.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grants_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, b) = alpha_beta(dir.path(), &reg).await;
    for (allow, secs, needle) in [
        (Some(Scope::none()), None, "a grant of nothing"),
        (None, Some(0), "in the future"),
        (None, Some(400 * 86_400), "at most"),
    ] {
        let e = a
            .call(Request::TrustRequest {
                peer: "beta".into(),
                note: String::new(),
                allow,
                expires_in_secs: secs,
                want: None,
            })
            .await
            .expect_err("refused");
        assert!(e.error.contains(needle), "{}", e.error);
    }
    assert_eq!(b.pending().await.len(), 0, "nothing was sent");
    let e = a
        .call(Request::Explain {
            peer: "beta".into(),
            traffic: Some("sctp/1".into()),
        })
        .await
        .expect_err("bad traffic refused");
    assert!(e.error.contains("tcp/22"), "{}", e.error);
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}
