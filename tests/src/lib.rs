//! A lab for in-process tests: a real registry (SQLite in a temp dir) and
//! real nodes on loopback UDP, each over a fake TUN device. No root needed.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use pilot_proto::join::JoinUrl;
use pilot_proto::session::CipherSuite;
use pilot_registry::{Config, Registry, SqliteStorage};
use pilot_tun::api::{
    DropCounts, Peer, PendingRequest, Reply, Request, Response, Status, TrustEntry, TrustState,
};
use pilot_tun::state::StateDir;
use pilot_tun::tun::{FakeTun, FakeTunHandle};
use pilot_tun::{Node, NodeConfig};
use tokio::sync::oneshot;

/// A running in-process registry.
pub struct RegistryHandle {
    /// Its address on loopback.
    pub addr: SocketAddr,
    /// The join URL.
    pub join: JoinUrl,
    /// Its counters.
    pub stats: std::sync::Arc<pilot_registry::Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RegistryHandle {
    /// Starts a registry with its state in `dir`, on `addr` (port 0 for any).
    pub async fn start(dir: &std::path::Path, addr: SocketAddr) -> Self {
        let secret = pilot_registry::state::load_or_create_key(dir).expect("registry key");
        let storage = SqliteStorage::open(&dir.join("registry.db")).expect("registry db");
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .expect("bind registry");
        let addr = socket.local_addr().unwrap();
        let reg = Registry::new(
            socket,
            Config {
                secret,
                network: "10.77.0.0/16".parse().unwrap(),
                relay_rate: 50_000_000,
                relays: vec![],
                relay_only: false,
            },
            storage,
        );
        let stats = reg.stats();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            reg.run(async {
                let _ = rx.await;
            })
            .await
            .expect("registry run");
        });
        RegistryHandle {
            addr,
            join: JoinUrl {
                key: pilot_registry::server::public_key(&secret),
                addr,
            },
            stats,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops it and waits until its socket is closed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A running node with its fake TUN.
pub struct TestNode {
    /// The node.
    pub node: Node<FakeTun>,
    /// The test's end of its TUN.
    pub tun: FakeTunHandle,
    /// Its state directory.
    pub dir: PathBuf,
    /// Its hostname.
    pub name: String,
}

impl TestNode {
    /// Starts a node named `name` with state in `dir`.
    pub async fn start(
        dir: PathBuf,
        name: &str,
        join: Option<JoinUrl>,
    ) -> Result<Self, pilot_tun::StartError> {
        let (fake, handle) = FakeTun::new();
        let cfg = NodeConfig {
            state: StateDir::new(&dir),
            registry: join,
            hostname: Some(name.to_string()),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            suite: CipherSuite::Aes256Gcm,
            offload: true,
            register_timeout: Duration::from_secs(3),
            mtu: None,
        };
        let node = Node::start(cfg, move |_, _| Ok(fake)).await?;
        Ok(TestNode {
            node,
            tun: handle,
            dir,
            name: name.to_string(),
        })
    }

    /// Its overlay address.
    pub fn addr(&self) -> Ipv4Addr {
        self.node.address()
    }

    /// Sends a control request; panics with the error if it fails.
    pub async fn ok(&self, req: Request) -> Reply {
        let r: Response = self.node.request(req.clone()).await;
        r.unwrap_or_else(|e| panic!("{} {req:?} failed: {e:?}", self.name))
    }

    /// Sends a control request.
    pub async fn call(&self, req: Request) -> Response {
        self.node.request(req).await
    }

    /// Sends a request whose answer is an `R`; panics if it fails or the
    /// answer is of another kind.
    pub async fn get<R: TryFrom<Reply, Error = Reply>>(&self, req: Request) -> R {
        let reply = self.ok(req.clone()).await;
        R::try_from(reply)
            .unwrap_or_else(|other| panic!("{} {req:?}: unexpected answer {other:?}", self.name))
    }

    /// `status`.
    pub async fn status(&self) -> Status {
        self.get(Request::Status).await
    }

    /// `peers`.
    pub async fn peers(&self) -> Vec<Peer> {
        self.get(Request::Peers).await
    }

    /// `trust pending`.
    pub async fn pending(&self) -> Vec<PendingRequest> {
        self.get(Request::TrustPending).await
    }

    /// `trust list`.
    pub async fn trust_list(&self) -> Vec<TrustEntry> {
        self.get(Request::TrustList).await
    }

    /// The trust state it has for `peer` (hostname), or `None`.
    pub async fn trust_state(&self, peer: &str) -> TrustState {
        self.trust_list()
            .await
            .into_iter()
            .find(|r| r.hostname.as_deref() == Some(peer))
            .map(|r| r.state)
            .unwrap_or(TrustState::None)
    }

    /// The drop counters from `status`.
    pub async fn drops(&self) -> DropCounts {
        self.status().await.drops
    }

    /// Injects a packet as if a local program sent it.
    pub async fn send(&self, pkt: Vec<u8>) {
        self.tun.to_node.send(pkt).await.unwrap();
    }

    /// The next packet delivered to local programs within `t`.
    pub async fn recv(&mut self, t: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(t, self.tun.from_node.recv())
            .await
            .ok()
            .flatten()
    }

    /// Forgets packets already delivered.
    pub fn drain(&mut self) {
        while self.tun.from_node.try_recv().is_ok() {}
    }
}

/// Starts nodes "alpha" and "beta" (state in `dir`/a and `dir`/b) joined to
/// `reg`, not yet trusting each other.
pub async fn alpha_beta(dir: &std::path::Path, reg: &RegistryHandle) -> (TestNode, TestNode) {
    let a = TestNode::start(dir.join("a"), "alpha", Some(reg.join))
        .await
        .expect("alpha starts");
    let b = TestNode::start(dir.join("b"), "beta", Some(reg.join))
        .await
        .expect("beta starts");
    (a, b)
}

/// An IPv4/UDP packet with a valid header checksum (UDP checksum 0).
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = pilot_proto::packet::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Polls `f` every 50 ms until it returns true or `t` passes.
pub async fn eventually<F, Fut>(t: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + t;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {t:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends packets from `a` to `b` until one arrives (sessions take a round
/// trip to set up), then checks the delivered bytes are exactly the sent ones.
pub async fn deliver(a: &TestNode, b: &mut TestNode, payload: &[u8]) {
    let pkt = udp_packet(a.addr(), b.addr(), payload);
    b.drain();
    for _ in 0..40 {
        a.send(pkt.clone()).await;
        if let Some(got) = b.recv(Duration::from_millis(250)).await {
            assert_eq!(
                got, pkt,
                "{} got different bytes than {} sent",
                b.name, a.name
            );
            b.drain();
            return;
        }
    }
    panic!("{} never received a packet from {}", b.name, a.name);
}

/// Asserts nothing from `a` reaches `b` for a while.
pub async fn blocked(a: &TestNode, b: &mut TestNode, payload: &[u8]) {
    b.drain();
    let pkt = udp_packet(a.addr(), b.addr(), payload);
    for _ in 0..5 {
        a.send(pkt.clone()).await;
    }
    if let Some(got) = b.recv(Duration::from_millis(1500)).await {
        panic!(
            "{} received {} bytes from {} although it must not",
            b.name,
            got.len(),
            a.name
        );
    }
}

/// Makes `a` and `b` trust each other (a requests, b approves).
pub async fn trust(a: &TestNode, b: &TestNode) {
    a.ok(Request::TrustRequest {
        peer: b.name.clone(),
        note: format!("{} wants in", a.name),
    })
    .await;
    eventually(Duration::from_secs(5), "request arrives", || async {
        b.trust_state(&a.name).await == TrustState::Pending
    })
    .await;
    b.ok(Request::TrustApprove {
        peer: a.name.clone(),
    })
    .await;
    eventually(Duration::from_secs(5), "approval arrives", || async {
        a.trust_state(&b.name).await == TrustState::Trusted
    })
    .await;
}
