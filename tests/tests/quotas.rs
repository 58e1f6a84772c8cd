//! Join tokens in process: under `--require-token` a node without a token
//! does not come up and is told why, one with a token joins (and comes
//! back without it), and a used-up token is refused.

use std::net::SocketAddr;

use pilot_proto::join::JoinUrl;
use pilot_registry::{Limits, SqliteStorage};
use pilot_tests::*;

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_joins_only_with_a_token_that_is_not_used_up() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("registry");
    std::fs::create_dir_all(&rdir).unwrap();
    let db = rdir.join("registry.db");
    // The operator makes a token for one node, on the database.
    let token = {
        let mut s = SqliteStorage::open(&db).unwrap();
        pilot_registry::operator::create_token(&mut s, Some(1), None, 1_000)
            .unwrap()
            .token
    };
    let reg = RegistryHandle::start_limited(
        &rdir,
        lo(),
        "10.77.0.0/16".parse().unwrap(),
        SqliteStorage::open(&db).unwrap(),
        Limits {
            require_token: true,
            ..Limits::default()
        },
    )
    .await;
    let with = |t| JoinUrl {
        token: Some(t),
        ..reg.join
    };

    let e = TestNode::start(dir.path().join("a"), "alpha", Some(reg.join))
        .await
        .err()
        .expect("no start without a token");
    let e = e.to_string();
    assert!(e.contains("only with a join token"), "{e}");

    let b = TestNode::start(dir.path().join("b"), "beta", Some(with(token)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = b.addr();

    let e = TestNode::start(dir.path().join("c"), "gamma", Some(with(token)))
        .await
        .err()
        .expect("the token admits one node");
    assert!(e.to_string().contains("used up"), "{e}");

    // beta is known now: it comes back without a token, on its address.
    b.node.shutdown().await;
    let b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.addr(), addr);
    let nodes = pilot_registry::operator::list_nodes(&SqliteStorage::open(&db).unwrap()).unwrap();
    assert_eq!(nodes.nodes.len(), 1);
    assert_eq!(nodes.nodes[0].hostname.as_deref(), Some("beta"));
    b.node.shutdown().await;
    reg.stop().await;
}
