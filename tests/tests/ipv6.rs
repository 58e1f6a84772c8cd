//! The IPv6 overlay in one process, over fake TUN devices: every node has
//! a /128 in the network's /48 that embeds its IPv4 address, IPv6 packets
//! cross the tunnels between trusted nodes, an untrusted destination is
//! answered with ICMPv6 "administratively prohibited", a scoped grant holds
//! for IPv6 as for IPv4, and a peer that claims another node's IPv6 source
//! is dropped.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use pilot_tests::*;
use pilot_tun::api::{Request, TrustState};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An IPv6/UDP packet from port `sp` to `dp` (UDP checksum left zero: the
/// fake TUN does not check it).
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([17, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(sp.to_be_bytes());
    p.extend(dp.to_be_bytes());
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend_from_slice(payload);
    p
}

/// True if `pkt` is an ICMPv6 "administratively prohibited" from `from`
/// with a checksum that verifies.
fn is_admin_prohibited6(pkt: &[u8], from: Ipv6Addr) -> bool {
    pkt.len() >= 48
        && pkt[0] >> 4 == 6
        && pkt[6] == 58
        && pkt[8..24] == from.octets()
        && (pkt[40], pkt[41]) == (1, 1)
        && pilot_proto::ipv6::icmp_checksum(pkt) == 0
}

async fn address6(n: &TestNode) -> Ipv6Addr {
    n.status()
        .await
        .address6
        .expect("status shows an IPv6 address")
}

/// Sends `pkt` from `a` until `b` gets exactly it.
async fn arrives(a: &TestNode, b: &mut TestNode, pkt: &[u8]) {
    b.drain();
    for _ in 0..40 {
        a.send(pkt.to_vec()).await;
        if let Some(got) = b.recv(Duration::from_millis(250)).await {
            assert_eq!(got, pkt, "{} got other bytes", b.name);
            return;
        }
    }
    panic!("{} never received the IPv6 packet from {}", b.name, a.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_crosses_tunnels_between_trusted_nodes_only() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    let c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();

    // Every node's /128 lies in one /48 and embeds its IPv4 address.
    let (a6, b6, c6) = (address6(&a).await, address6(&b).await, address6(&c).await);
    let net6 = a.status().await.network6.expect("status shows the /48");
    assert_eq!(Some(net6.clone()), b.status().await.network6);
    assert!(net6.starts_with("fd") && net6.ends_with("::/48"), "{net6}");
    for (v6, v4) in [(a6, a.addr()), (b6, b.addr()), (c6, c.addr())] {
        assert_eq!(v6.octets()[12..], v4.octets(), "{v6} embeds {v4}");
        assert_eq!(v6.octets()[..6], a6.octets()[..6]);
    }

    // Untrusted: refused at once with ICMPv6, nothing crosses.
    a.drain();
    b.drain();
    a.send(udp6(a6, b6, 4000, 5000, b"too early")).await;
    let answer = a
        .recv(Duration::from_secs(1))
        .await
        .expect("an ICMPv6 answer to the refused packet");
    assert!(is_admin_prohibited6(&answer, b6), "{answer:?}");
    assert!(b.recv(Duration::from_millis(300)).await.is_none());

    trust(&a, &b).await;
    // `peers` shows the peer's IPv6 address next to its IPv4 one.
    let peer = a
        .peers()
        .await
        .into_iter()
        .find(|p| p.hostname.as_deref() == Some("beta"))
        .unwrap();
    assert_eq!((peer.address, peer.address6), (b.addr(), Some(b6)));

    // Both ways, byte for byte.
    arrives(&a, &mut b, &udp6(a6, b6, 4000, 5000, b"over v6")).await;
    arrives(&b, &mut a, &udp6(b6, a6, 5000, 4000, b"and back")).await;

    // gamma is not trusted by alpha: ICMPv6 prohibited, as for IPv4. So is
    // an address in the /48 that is no node's.
    let mut nobody = b6.octets();
    nobody[8] = 0x77;
    for (to, what) in [(c6, "gamma"), (Ipv6Addr::from(nobody), "no node")] {
        a.drain();
        a.send(udp6(a6, to, 4000, 5000, b"no")).await;
        let answer = a.recv(Duration::from_secs(1)).await;
        assert!(
            answer.is_some_and(|p| is_admin_prohibited6(&p, to)),
            "{what}: refused with ICMPv6"
        );
    }
    assert_eq!(b.drops().await.inner_address, 0);
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_another_ipv6_source_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    trust(&a, &b).await;
    let (a6, b6) = (address6(&a).await, address6(&b).await);
    arrives(&a, &mut b, &udp6(a6, b6, 1, 2, b"real")).await;

    // Another node's /128 (10.77.1.1's), a stray bit in alpha's own, and
    // an address outside the overlay: each dropped after decryption.
    let mut other = a6.octets();
    other[12..].copy_from_slice(&Ipv4Addr::new(10, 77, 1, 1).octets());
    let mut stray = a6.octets();
    stray[9] = 1;
    let outside: Ipv6Addr = "2001:db8::1".parse().unwrap();
    for (n, src) in [Ipv6Addr::from(other), Ipv6Addr::from(stray), outside]
        .into_iter()
        .enumerate()
    {
        a.send(udp6(src, b6, 1, 2, b"spoofed")).await;
        eventually(
            Duration::from_secs(2),
            "beta counts the spoofed IPv6 packet",
            || async { b.drops().await.inner_address > n as u64 },
        )
        .await;
    }
    assert!(
        b.recv(Duration::from_millis(300)).await.is_none(),
        "a spoofed IPv6 packet was delivered"
    );
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_grants_hold_for_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (mut a, mut b) = alpha_beta(dir.path(), &reg).await;
    // beta lets alpha open udp/5000 only.
    a.ok(Request::TrustRequest {
        peer: "beta".into(),
        note: String::new(),
        allow: Some("all".parse().unwrap()),
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(Duration::from_secs(5), "request arrives", || async {
        b.trust_state("alpha").await == TrustState::Pending
    })
    .await;
    b.ok(Request::TrustApprove {
        peer: "alpha".into(),
        allow: Some("udp/5000".parse().unwrap()),
        expires_in_secs: None,
    })
    .await;
    eventually(Duration::from_secs(5), "approval arrives", || async {
        a.trust_state("beta").await == TrustState::Trusted
    })
    .await;
    let (a6, b6) = (address6(&a).await, address6(&b).await);
    arrives(&a, &mut b, &udp6(a6, b6, 4000, 5000, b"granted")).await;
    // udp/22 is refused by alpha itself, with ICMPv6, and never arrives.
    a.drain();
    b.drain();
    a.send(udp6(a6, b6, 4000, 22, b"not granted")).await;
    let answer = a.recv(Duration::from_secs(1)).await;
    assert!(
        answer.is_some_and(|p| is_admin_prohibited6(&p, b6)),
        "refused with ICMPv6"
    );
    assert!(b.recv(Duration::from_millis(400)).await.is_none());
    a.node.shutdown().await;
    b.node.shutdown().await;
    reg.stop().await;
}
