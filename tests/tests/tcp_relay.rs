//! The TCP relay in process: a node whose registry gets no UDP answer
//! registers over TCP with TLS and trusts and reaches a UDP-attached peer;
//! the TLS pin refuses a registry with another key; the listener's limits
//! (handshake deadline, new connections per source, connections per
//! source) hold.

use std::net::SocketAddr;
use std::time::Duration;

use pilot_proto::join::JoinUrl;
use pilot_registry::server::public_key;
use pilot_registry::tcp::{self, Limits};
use pilot_tests::*;
use pilot_tun::tcplink::{self, TcpLinkError};
use tokio::io::AsyncReadExt;

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_udp_to_the_registry_registers_over_tcp_and_reaches_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let reg =
        RegistryHandle::start_with_tcp(&dir.path().join("registry"), lo(), Limits::default()).await;
    assert!(reg.join.tcp.is_some());
    // alpha's "registry UDP address" swallows everything: UDP to the
    // registry is blocked, as far as alpha can tell.
    let silent = std::net::UdpSocket::bind(lo()).unwrap();
    let mut join_a = JoinUrl::single(reg.join.key, silent.local_addr().unwrap());
    join_a.tcp = reg.join.tcp;
    let mut a = TestNode::start(dir.path().join("a"), "alpha", Some(join_a))
        .await
        .expect("alpha registers over TCP");
    let status = a.status().await;
    let relay = status.tcp_relay.expect("alpha says it uses the TCP relay");
    assert_eq!(relay.address.port(), reg.join.tcp.unwrap());
    assert!(status.registry.reachable);
    let mut b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join))
        .await
        .unwrap();
    assert!(b.status().await.tcp_relay.is_none());
    // Trust requests and approvals travel over alpha's TCP link.
    trust(&a, &b).await;
    deliver(&a, &mut b, b"over the TCP relay's control channel").await;
    deliver(&b, &mut a, b"and back").await;
    drop(silent);
    b.node.shutdown().await;
    a.node.shutdown().await;
    reg.stop().await;
}

#[tokio::test]
async fn tls_signed_by_another_key_than_the_pinned_one_is_refused() {
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let at = listener.local_addr().unwrap();
    let side = tcp::spawn(listener, &[7; 32], Limits::default()).unwrap();
    tcplink::connect(at, public_key(&[7; 32]))
        .await
        .expect("the pinned key's registry");
    // A registry with another key (or a man in the middle with its own
    // certificate) cannot complete the handshake.
    let e = tcplink::connect(at, public_key(&[8; 32]))
        .await
        .expect_err("refused");
    assert!(matches!(e, TcpLinkError::Tls { .. }), "{e}");
    side.task.abort();
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let at = listener.local_addr().unwrap();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let side = tcp::spawn(listener, &[7; 32], limits).unwrap();
    let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("closed well before 5 s");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    side.task.abort();
}

#[tokio::test]
async fn new_connections_per_source_are_rate_limited_and_capped() {
    // Two new connections at once from one address, then one a second.
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let at = listener.local_addr().unwrap();
    let limits = Limits {
        per_ip_rate: 1,
        per_ip_burst: 2,
        ..Limits::default()
    };
    let side = tcp::spawn(listener, &[7; 32], limits).unwrap();
    let key = public_key(&[7; 32]);
    let _c1 = tcplink::connect(at, key).await.unwrap();
    let _c2 = tcplink::connect(at, key).await.unwrap();
    assert!(
        tcplink::connect(at, key).await.is_err(),
        "the third at once"
    );
    side.task.abort();

    // One connection at a time from one address.
    let listener = tokio::net::TcpListener::bind(lo()).await.unwrap();
    let at = listener.local_addr().unwrap();
    let limits = Limits {
        max_per_ip: 1,
        ..Limits::default()
    };
    let side = tcp::spawn(listener, &[7; 32], limits).unwrap();
    let c1 = tcplink::connect(at, key).await.unwrap();
    assert!(tcplink::connect(at, key).await.is_err(), "a second one");
    drop(c1);
    eventually(Duration::from_secs(5), "the place comes back", || async {
        tcplink::connect(at, key).await.is_ok()
    })
    .await;
    side.task.abort();
}
