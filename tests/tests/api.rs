//! The control API as a client sees it: real nodes answer on their real
//! control socket, and every answer must be exactly one of the documented
//! types (nothing missing, nothing extra), errors included.

use std::path::Path;
use std::time::Duration;

use pilot_tests::*;
use pilot_tun::api::{Endpoint, Envelope, ErrorCode, PathKind, Reply, Request, Status, TrustState};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn lo() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Sends one raw line on the control socket and returns the raw answer.
async fn raw(socket: &Path, line: &str) -> Value {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the control socket");
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(r).read_line(&mut answer),
    )
    .await
    .expect("the daemon answers in time")
    .unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

/// Asks `req` and checks the answer is a success whose document is exactly
/// the request's type: decoding and encoding again gives the same JSON, so
/// the daemon sends no field the type lacks and lacks none it has.
async fn ask(socket: &Path, req: &Request) -> Reply {
    let answer = raw(socket, &serde_json::to_string(req).unwrap()).await;
    assert_eq!(answer["ok"], true, "{req:?}: {answer}");
    assert_eq!(
        answer.as_object().map(|o| o.len()),
        Some(2),
        "{req:?}: an answer is ok + data: {answer}"
    );
    let data = answer["data"].clone();
    let reply = Reply::decode(req, data.clone())
        .unwrap_or_else(|e| panic!("{req:?}: the answer does not fit its type ({e}): {data}"));
    assert_eq!(
        serde_json::to_value(&reply).unwrap(),
        data,
        "{req:?}: the answer has fields the type does not"
    );
    reply
}

/// Asks `req` and checks it fails with `code`, in the documented shape.
async fn refused(socket: &Path, line: &str, code: ErrorCode) -> String {
    let answer = raw(socket, line).await;
    let env: Envelope = serde_json::from_value(answer.clone()).unwrap();
    assert!(!env.ok, "{line}: {answer}");
    assert_eq!(env.code, Some(code), "{line}: {answer}");
    let keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "ok, error, code: {answer}");
    env.error.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_answers_are_the_documented_types() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("registry"), lo()).await;
    let (a, mut b) = alpha_beta(dir.path(), &reg).await;
    let c = TestNode::start(dir.path().join("c"), "gamma", Some(reg.join))
        .await
        .unwrap();
    trust(&a, &b).await;
    deliver(&a, &mut b, b"some traffic").await;
    c.ok(Request::TrustRequest {
        peer: "alpha".into(),
        note: "let me in".into(),
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "alpha sees gamma's request",
        || async { a.trust_state("gamma").await == TrustState::Pending },
    )
    .await;
    a.node.serve_control().expect("control socket");
    let sock = pilot_tun::state::StateDir::new(&a.dir).socket();
    assert!(sock.exists(), "the socket is where the CLI looks");

    let s: Status = ask(&sock, &Request::Status).await.try_into().unwrap();
    assert_eq!(s.address, a.addr());
    assert_eq!(s.hostname.as_deref(), Some("alpha"));
    assert_eq!(s.node_id.len(), 32);
    assert!(s.registry.reachable);
    assert_eq!(s.relay, reg.addr);
    assert_eq!((s.peers.known, s.peers.trusted), (2, 1));
    assert_eq!(s.pending_requests, 1);
    assert_eq!(s.pid, std::process::id());

    let peers: Vec<pilot_tun::api::Peer> = ask(&sock, &Request::Peers).await.try_into().unwrap();
    let beta = peers
        .iter()
        .find(|p| p.hostname.as_deref() == Some("beta"))
        .unwrap();
    assert_eq!(beta.address, b.addr());
    assert_eq!(beta.trust, TrustState::Trusted);
    assert!(beta.session && beta.tx_bytes > 0);
    assert!(matches!(beta.endpoint, Some(Endpoint::Direct(_))));
    assert_eq!(beta.path, Some(PathKind::Direct));
    let gamma = peers
        .iter()
        .find(|p| p.hostname.as_deref() == Some("gamma"))
        .unwrap();
    assert_eq!(gamma.trust, TrustState::Pending);
    assert_eq!(
        (gamma.endpoint, gamma.path, gamma.session),
        (None, None, false)
    );

    let pending: Vec<pilot_tun::api::PendingRequest> =
        ask(&sock, &Request::TrustPending).await.try_into().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].hostname.as_deref(), Some("gamma"));
    assert_eq!(pending[0].note.as_deref(), Some("let me in"));
    assert_eq!(pending[0].address, c.addr());

    let list: Vec<pilot_tun::api::TrustEntry> =
        ask(&sock, &Request::TrustList).await.try_into().unwrap();
    assert_eq!(list.len(), 2);

    let ping: pilot_tun::api::PingReport = ask(
        &sock,
        &Request::Ping {
            peer: "beta".into(),
            count: 2,
        },
    )
    .await
    .try_into()
    .unwrap();
    assert_eq!(ping.rtt_ms.len(), 2);
    assert!(ping.answered(), "{ping:?}");
    assert!(matches!(ping.path, Some(Endpoint::Direct(_))));

    // Errors carry their code.
    let e = refused(
        &sock,
        r#"{"cmd":"ping","peer":"gamma","count":1}"#,
        ErrorCode::NotTrusted,
    )
    .await;
    assert!(e.contains("trust request gamma"), "says what to do: {e}");
    let e = refused(
        &sock,
        r#"{"cmd":"trust_request","peer":"nobody-here","note":""}"#,
        ErrorCode::UnknownPeer,
    )
    .await;
    assert!(e.contains("nobody-here"), "{e}");
    refused(
        &sock,
        r#"{"cmd":"trust_approve","peer":"alpha"}"#,
        ErrorCode::InvalidRequest,
    )
    .await;
    let long = "x".repeat(pilot_proto::messages::MAX_NOTE + 1);
    let line = serde_json::to_string(&Request::TrustRequest {
        peer: "gamma".into(),
        note: long,
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .unwrap();
    refused(&sock, &line, ErrorCode::InvalidRequest).await;
    refused(&sock, r#"{"cmd":"reboot"}"#, ErrorCode::Protocol).await;
    refused(&sock, "not json at all", ErrorCode::Protocol).await;

    // A grant changes the state and answers with the change.
    let change: pilot_tun::api::TrustChange = ask(
        &sock,
        &Request::TrustApprove {
            peer: "gamma".into(),
            allow: None,
            expires_in_secs: None,
        },
    )
    .await
    .try_into()
    .unwrap();
    assert_eq!(change.state, TrustState::Trusted);
    assert!(change.trusted && change.delivered);
    assert_eq!(change.delivery_error, None);
    assert_eq!(change.address, c.addr());

    // With the registry gone, a name nobody knows locally cannot be
    // looked up: that is "try again later", not "no such peer".
    reg.stop().await;
    refused(
        &sock,
        r#"{"cmd":"trust_request","peer":"nobody-here","note":""}"#,
        ErrorCode::RegistryUnreachable,
    )
    .await;

    // `down` answers, then the node stops.
    ask(&sock, &Request::Down).await;
    tokio::time::timeout(Duration::from_secs(5), a.node.stopped())
        .await
        .expect("down stops the node");
    for n in [a, b, c] {
        n.node.shutdown().await;
    }
}
