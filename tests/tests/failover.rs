//! A registry run as two instances (one key, one database) and a node whose
//! join URL names both: when its instance stops, the node moves to the
//! other one, keeps its address, and its tunnel to a peer carries traffic
//! the whole time. A node whose URL names one instance stays with it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pilot_proto::join::JoinUrl;
use pilot_tests::*;

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Sends one packet from `a` to `b`; true if it arrived within `t`.
async fn one_packet(a: &TestNode, b: &mut TestNode, n: u32, t: Duration) -> bool {
    let payload = format!("packet {n}");
    let pkt = udp_packet(a.addr(), b.addr(), payload.as_bytes());
    a.send(pkt.clone()).await;
    let end = tokio::time::Instant::now() + t;
    // An earlier packet that came late is not this one.
    while let Some(got) = b
        .recv(end.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if got == pkt {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_to_the_other_instance_and_keeps_its_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("registry-1"), dir.path().join("registry-2"));
    let r1 = RegistryHandle::start(&d1, lo()).await;
    let r2 = RegistryHandle::start_instance(&d2, &d1, lo()).await;
    assert_eq!(r1.join.key, r2.join.key, "one registry, one key");
    let both = JoinUrl::new(r1.join.key, &[r1.addr, r2.addr]).unwrap();

    let mut a = TestNode::start(dir.path().join("a"), "alpha", Some(both))
        .await
        .expect("alpha starts");
    let status = a.status().await;
    let first = status.registry.endpoint.expect("status names the instance");
    assert!(both.has_endpoint(first), "{first} is one of the URL's");
    assert_eq!(status.registry.url, both.to_string());
    let (dying, other) = match first == r1.addr {
        true => (r1, r2),
        false => (r2, r1),
    };
    // beta's URL names alpha's instance only: the control, it must stay.
    let mut b = TestNode::start(dir.path().join("b"), "beta", Some(dying.join))
        .await
        .expect("beta starts");
    trust(&a, &b).await;
    deliver(&a, &mut b, b"before").await;
    deliver(&b, &mut a, b"before, back").await;
    let address = a.addr();
    let registered_before = other.stats.registrations.load(Ordering::Relaxed);

    // Stop alpha's instance; keep sending alpha -> beta meanwhile.
    dying.stop().await;
    let stopped = Instant::now();
    let (mut sent, mut arrived, mut n) = (0u32, 0u32, 0u32);
    let mut switched = None;
    let moved = loop {
        n += 1;
        sent += 1;
        if one_packet(&a, &mut b, n, Duration::from_millis(300)).await {
            arrived += 1;
        }
        // Moved, and registered there (the registration comes after the
        // handshake that makes the instance reachable).
        let s = a.status().await;
        let registered = other.stats.registrations.load(Ordering::Relaxed) > registered_before;
        if s.registry.endpoint == Some(other.addr) && switched.is_none() {
            switched = Some(stopped.elapsed());
        }
        if s.registry.endpoint == Some(other.addr) && s.registry.reachable && registered {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "alpha did not move to and register at {} within 20 s (status: {:?})",
            other.addr,
            s.registry
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "failover: alpha moved to {} {:.2} s and registered there {:.2} s after {} stopped; {arrived} of {sent} packets alpha -> beta arrived meanwhile",
        other.addr,
        switched.unwrap_or(moved).as_secs_f64(),
        moved.as_secs_f64(),
        first
    );
    assert!(
        arrived * 2 >= sent && arrived > 0,
        "the tunnel must carry traffic during the failover: {arrived} of {sent} arrived"
    );
    assert_eq!(a.addr(), address, "the same identity keeps its address");
    assert_eq!(a.status().await.address, address);

    // After: the tunnel works both ways, and beta (one endpoint) never
    // moved although its instance is gone.
    deliver(&a, &mut b, b"after").await;
    deliver(&b, &mut a, b"after, back").await;
    let sb = b.status().await;
    assert_eq!(
        sb.registry.endpoint,
        Some(first),
        "a node with one endpoint does not change it"
    );
    // alpha stays with the other instance (its pings there are answered).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = a.status().await;
    assert_eq!(s.registry.endpoint, Some(other.addr));
    assert!(s.registry.reachable, "{:?}", s.registry);
    assert_eq!(b.status().await.registry.endpoint, Some(first));
    deliver(&a, &mut b, b"later").await;

    // A restart with other endpoints of the same registry (none of them
    // answering) is the same network: alpha comes up on its cached
    // address instead of refusing to start for want of one.
    a.node.shutdown().await;
    let silent = std::net::UdpSocket::bind(lo()).unwrap();
    let elsewhere = JoinUrl::new(both.key, &[first, silent.local_addr().unwrap()]).unwrap();
    let a = TestNode::start(dir.path().join("a"), "alpha", Some(elsewhere))
        .await
        .unwrap_or_else(|e| panic!("alpha restarts on its cached address: {e}"));
    assert_eq!(a.addr(), address);
    assert_eq!(a.status().await.registry.url, elsewhere.to_string());

    a.node.shutdown().await;
    b.node.shutdown().await;
    other.stop().await;
}
