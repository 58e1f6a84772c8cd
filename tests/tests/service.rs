//! Start-up errors an operator meets first, told apart in process: a join
//! URL with the wrong registry key against no registry at all.

use std::net::SocketAddr;

use pilot_proto::join::JoinUrl;
use pilot_tests::*;
use pilot_tun::link::LinkError;
use pilot_tun::StartError;

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_registry_key_is_told_apart_from_no_registry() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;

    // The registry is there, but the URL carries another key.
    let wrong = JoinUrl::single([0x42; 32], reg.join.first());
    let e = TestNode::start(dir.path().join("a"), "alpha", Some(wrong))
        .await
        .err()
        .expect("no start with the wrong key");
    assert!(
        matches!(e, StartError::WrongRegistryKey(a) if a == reg.join.first()),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("answered but not with the key in the join URL"),
        "{e}"
    );

    // Nothing answers at the address: unreachable, as before.
    let silent = std::net::UdpSocket::bind(lo()).unwrap();
    let nobody = JoinUrl::single(reg.join.key, silent.local_addr().unwrap());
    let e = TestNode::start(dir.path().join("b"), "beta", Some(nobody))
        .await
        .err()
        .expect("no start without a registry");
    assert!(
        matches!(e, StartError::Registry(LinkError::Unreachable(_))),
        "{e}"
    );

    // The right key: up.
    TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    reg.stop().await;
}
