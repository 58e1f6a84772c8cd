//! Join tokens in process: under `--require-token` a node without a token
//! does not come up and is told why, one with a token joins (and comes
//! back without it), and a used-up token is refused. Expiry: a node unseen
//! for `--expire-unused` loses its registration (it needs a token again,
//! its hostname goes to another node, its address does not).

use std::net::SocketAddr;

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
    let with = |t| {
        let mut j = reg.join;
        j.token = Some(t);
        j
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_registration_expires_frees_its_name_and_needs_a_token_again() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("registry");
    std::fs::create_dir_all(&rdir).unwrap();
    let db = rdir.join("registry.db");
    let token = |uses| {
        let mut s = SqliteStorage::open(&db).unwrap();
        pilot_registry::operator::create_token(&mut s, Some(uses), None, 1_000)
            .unwrap()
            .token
    };
    let first = token(1);
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
    let with = |t| {
        let mut j = reg.join;
        j.token = Some(t);
        j
    };
    let b = TestNode::start(dir.path().join("b"), "beta", Some(with(first)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let old_addr = b.addr();
    b.node.shutdown().await;

    // The registry's sweeper, on its own connection: nodes unseen for a
    // second expire.
    let path = db.clone();
    let sweeper = pilot_registry::expiry::spawn(
        Box::new(move || {
            Ok(Box::new(SqliteStorage::open(&path)?) as Box<dyn pilot_registry::Storage>)
        }),
        1,
        std::time::Duration::from_millis(100),
    )
    .unwrap();
    let listed =
        || pilot_registry::operator::list_nodes(&SqliteStorage::open(&db).unwrap()).unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "beta expires",
        || async { listed().nodes.is_empty() },
    )
    .await;
    drop(sweeper);

    // beta is a stranger again: without a token it is not registered
    // again (it may come up on its cached address, unregistered).
    let b = TestNode::start(dir.path().join("b"), "beta", Some(reg.join)).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        listed().nodes.is_empty(),
        "an expired node needs a token again"
    );
    if let Ok(b) = b {
        b.node.shutdown().await;
    }

    // Its hostname went at once; its address did not.
    let c = TestNode::start(dir.path().join("c"), "beta", Some(with(token(1))))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(c.addr(), old_addr, "the address is a tombstone");
    let nodes = listed();
    assert_eq!(nodes.nodes.len(), 1);
    assert_eq!(nodes.nodes[0].hostname.as_deref(), Some("beta"));
    assert_eq!(nodes.nodes[0].address, c.addr());
    c.node.shutdown().await;
    reg.stop().await;
}
