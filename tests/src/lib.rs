//! A lab for in-process tests: a real registry (SQLite in a temp dir) and
//! real nodes on loopback UDP, each over a fake TUN device. No root needed.
//! For the hostile cases: a registry whose storage lies ([`Tamper`]), a
//! bare registry client that signs what a test tells it to
//! ([`RawClient`]), and a UDP proxy that holds back the registry's answers
//! ([`DelayProxy`]).

pub mod load_report;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use pilot_proto::cert::{OwnerPublic, Tag};
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{
    self, FromRegistry, NatType, Registration, Signed, Statement, ToRegistry,
};
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::wire::{self, Kind, DATA_HEADER_LEN, TAG_LEN};
use pilot_registry::storage::{CertRow, NodeRow, RevocationRow, StorageError};
use pilot_registry::{Config, Limits, PgStorage, Registry, SqliteStorage, Storage};
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
        std::fs::create_dir_all(dir).expect("registry state directory");
        let storage = SqliteStorage::open(&dir.join("registry.db")).expect("registry db");
        Self::start_with(dir, addr, "10.77.0.0/16".parse().unwrap(), storage).await
    }

    /// Starts a registry handing out addresses from `network`, over
    /// `storage` (its key is kept in `dir`).
    pub async fn start_with<S: Storage + 'static>(
        dir: &std::path::Path,
        addr: SocketAddr,
        network: Ipv4Net,
        storage: S,
    ) -> Self {
        Self::start_inner(dir, addr, network, storage, Limits::default(), None, None).await
    }

    /// Another instance of the registry started by [`RegistryHandle::start`]
    /// in `first`: its key copied into `dir` (where this instance keeps its
    /// audit log) and the same database file, as instances of one registry
    /// share a database. On `addr` (port 0 for any).
    pub async fn start_instance(
        dir: &std::path::Path,
        first: &std::path::Path,
        addr: SocketAddr,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("registry state directory");
        let key = std::fs::read(first.join("registry.key")).expect("the first instance's key");
        pilot_registry::state::write_private(&dir.join("registry.key"), &key)
            .expect("copy the key");
        let storage =
            SqliteStorage::open(&first.join("registry.db")).expect("the shared registry db");
        Self::start_with(dir, addr, "10.77.0.0/16".parse().unwrap(), storage).await
    }

    /// [`RegistryHandle::start_with`] under `limits` (join tokens, rates).
    pub async fn start_limited<S: Storage + 'static>(
        dir: &std::path::Path,
        addr: SocketAddr,
        network: Ipv4Net,
        storage: S,
        limits: Limits,
    ) -> Self {
        Self::start_inner(dir, addr, network, storage, limits, None, None).await
    }

    /// Like [`RegistryHandle::start`], also accepting nodes over TCP with
    /// TLS (`--tcp-listen`) on a free port of the same IP, within
    /// `limits`; its join URL carries `?tcp=`.
    pub async fn start_with_tcp(
        dir: &std::path::Path,
        addr: SocketAddr,
        limits: pilot_registry::tcp::Limits,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("registry state directory");
        let storage = SqliteStorage::open(&dir.join("registry.db")).expect("registry db");
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))
            .await
            .expect("bind the registry's TCP port");
        let network = "10.77.0.0/16".parse().unwrap();
        Self::start_inner(
            dir,
            addr,
            network,
            storage,
            Limits::default(),
            Some((listener, limits)),
            None,
        )
        .await
    }

    /// One of several instances on one PostgreSQL database (`database`):
    /// state in `dir`, with a copy of the registry key from `key_from`
    /// when given (the instances share it), listening for the other
    /// instances' events; returns once it listens.
    pub async fn start_pg_instance(
        dir: &std::path::Path,
        key_from: Option<&std::path::Path>,
        database: postgres::Config,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("registry state directory");
        if let Some(from) = key_from {
            std::fs::copy(from.join("registry.key"), dir.join("registry.key"))
                .expect("copy the registry key");
        }
        let db = database.clone();
        let storage = tokio::task::spawn_blocking(move || PgStorage::open(db))
            .await
            .unwrap()
            .expect("open the PostgreSQL database");
        let network = "10.77.0.0/16".parse().unwrap();
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let (limits, tcp) = (Limits::default(), None);
        Self::start_inner(dir, local, network, storage, limits, tcp, Some(database)).await
    }

    async fn start_inner<S: Storage + 'static>(
        dir: &std::path::Path,
        addr: SocketAddr,
        network: Ipv4Net,
        storage: S,
        limits: Limits,
        tcp: Option<(tokio::net::TcpListener, pilot_registry::tcp::Limits)>,
        cluster: Option<postgres::Config>,
    ) -> Self {
        let tcp_port = tcp
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
            .map(|a| a.port());
        let secret = pilot_registry::state::load_or_create_key(dir).expect("registry key");
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .expect("bind registry");
        let addr = socket.local_addr().unwrap();
        let reg = Registry::new(
            socket,
            Config {
                secret,
                network,
                relay_rate: 50_000_000,
                relays: vec![],
                relay_only: false,
            },
            storage,
        )
        .with_audit(dir)
        .with_limits(limits);
        let reg = match tcp {
            Some((listener, limits)) => reg.with_tcp(listener, limits),
            None => reg,
        };
        let reg = match cluster {
            Some(database) => {
                let cluster = pilot_registry::cluster::Cluster::new(&secret, addr);
                let (tx, rx) = tokio::sync::mpsc::channel(pilot_registry::cluster::HEARD_QUEUE);
                let listening = pilot_registry::cluster::listen(database, cluster.clone(), tx)
                    .expect("listen thread");
                tokio::time::timeout(Duration::from_secs(10), listening.ready)
                    .await
                    .expect("the instance listens within 10 s")
                    .expect("the listening thread runs");
                reg.with_cluster(cluster, rx)
            }
            None => reg,
        };
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
            join: {
                let mut j = JoinUrl::single(pilot_registry::server::public_key(&secret), addr);
                j.tcp = tcp_port;
                j
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
        Self::start_gossip(dir, name, join, true).await
    }

    /// Like [`TestNode::start`], with gossip on or off (`--no-gossip`).
    pub async fn start_gossip(
        dir: PathBuf,
        name: &str,
        join: Option<JoinUrl>,
        gossip: bool,
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
            rotate_every: None,
            port_mapping: false,
            gossip,
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
        allow: None,
        expires_in_secs: None,
        want: None,
    })
    .await;
    eventually(Duration::from_secs(5), "request arrives", || async {
        b.trust_state(&a.name).await == TrustState::Pending
    })
    .await;
    b.ok(Request::TrustApprove {
        peer: a.name.clone(),
        allow: None,
        expires_in_secs: None,
    })
    .await;
    eventually(Duration::from_secs(5), "approval arrives", || async {
        a.trust_state(&b.name).await == TrustState::Trusted
    })
    .await;
}

/// What a [`Tamper`] storage lies about.
#[derive(Default)]
pub struct Lies {
    /// Rows of these nodes carry this address instead of their own.
    pub address: HashMap<NodeId, Ipv4Addr>,
    /// Rows of these nodes carry this hostname instead of their own.
    pub hostname: HashMap<NodeId, String>,
}

/// Registry storage that lies: every row it hands to the registry passes
/// through [`Lies`], which the test may change while the registry runs. The
/// registry behaves as a compromised one would.
pub struct Tamper<S> {
    inner: S,
    /// The lies, shared with the test.
    pub lies: Arc<Mutex<Lies>>,
}

impl<S> Tamper<S> {
    /// Wraps `inner`; returns it and the handle on its lies.
    pub fn new(inner: S) -> (Self, Arc<Mutex<Lies>>) {
        let lies = Arc::new(Mutex::new(Lies::default()));
        (
            Tamper {
                inner,
                lies: lies.clone(),
            },
            lies,
        )
    }

    fn lie(&self, row: Option<NodeRow>) -> Option<NodeRow> {
        let mut row = row?;
        let id = row.identity.node_id();
        let lies = self.lies.lock().unwrap();
        if let Some(a) = lies.address.get(&id) {
            row.address = *a;
        }
        if let Some(h) = lies.hostname.get(&id) {
            row.hostname = Some(h.clone());
        }
        Some(row)
    }
}

impl<S: Storage> Storage for Tamper<S> {
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
        Ok(self.lie(self.inner.node(id)?))
    }
    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
        Ok(self.lie(self.inner.node_by_address(a)?))
    }
    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
        Ok(self.lie(self.inner.node_by_name(name)?))
    }
    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
        self.inner.address_taken(a)
    }
    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        self.inner.insert_node(row)
    }
    fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        self.inner.update_node(row)
    }
    fn set_endpoints(&mut self, id: &NodeId, endpoints: &[SocketAddr]) -> Result<(), StorageError> {
        self.inner.set_endpoints(id, endpoints)
    }
    fn statement_seq(&self, from: &NodeId, to: &NodeId) -> Result<Option<u64>, StorageError> {
        self.inner.statement_seq(from, to)
    }
    fn statement(
        &self,
        from: &NodeId,
        to: &NodeId,
    ) -> Result<Option<Signed<Statement>>, StorageError> {
        self.inner.statement(from, to)
    }
    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError> {
        self.inner.put_statement(st)
    }
    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError> {
        self.inner.approves(from, to)
    }
    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError> {
        self.inner.inbox(to)
    }
    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
        self.inner.ack(to, push)
    }
    fn put_token(&mut self, t: &pilot_registry::storage::TokenRow) -> Result<(), StorageError> {
        self.inner.put_token(t)
    }
    fn tokens(&self) -> Result<Vec<pilot_registry::storage::TokenRow>, StorageError> {
        self.inner.tokens()
    }
    fn use_token(
        &mut self,
        hash: &[u8; 32],
        now: u64,
    ) -> Result<pilot_registry::storage::TokenUse, StorageError> {
        self.inner.use_token(hash, now)
    }
    fn revoke_token(&mut self, id: &str) -> Result<bool, StorageError> {
        self.inner.revoke_token(id)
    }
    fn remove_node(&mut self, id: &NodeId, now: u64) -> Result<bool, StorageError> {
        self.inner.remove_node(id, now)
    }
    fn node_count(&self) -> Result<u64, StorageError> {
        self.inner.node_count()
    }
    fn put_cert(&mut self, cert: &CertRow) -> Result<bool, StorageError> {
        self.inner.put_cert(cert)
    }
    fn find_certs(
        &self,
        owner: &OwnerPublic,
        tag: &Tag,
        after: Option<&NodeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        self.inner.find_certs(owner, tag, after, now, limit)
    }
    fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
        self.inner.put_revocation(r)
    }
    fn revoked(&self, owner: &OwnerPublic, node: &NodeId) -> Result<bool, StorageError> {
        self.inner.revoked(owner, node)
    }
    fn revocation_counts(&self, owner: &OwnerPublic) -> Result<(u64, u64), StorageError> {
        self.inner.revocation_counts(owner)
    }
    fn find_revocations(
        &self,
        owner: &OwnerPublic,
        after: Option<&NodeId>,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        self.inner.find_revocations(owner, after, limit)
    }
    fn succeed(
        &mut self,
        old: &NodeId,
        new: &NodeRow,
        succession: &[u8],
    ) -> Result<(), StorageError> {
        self.inner.succeed(old, new, succession)
    }
    fn successor(&self, old: &NodeId) -> Result<Option<(NodeId, Vec<u8>)>, StorageError> {
        self.inner.successor(old)
    }
}

/// The node id of the identity kept in a node's state directory.
/// A trust statement from `from` (signed by it) about `to`.
pub fn statement(
    from: &Identity,
    to: &Identity,
    kind: pilot_proto::messages::StatementKind,
    seq: u64,
) -> Signed<Statement> {
    Signed::sign(
        Statement {
            kind,
            from: from.public(),
            to: to.node_id(),
            seq,
        },
        from,
    )
}

/// The identity a node keeps in `dir`.
pub fn identity_of(dir: &std::path::Path) -> Identity {
    StateDir::new(dir)
        .load_or_create_identity()
        .expect("identity.key")
        .0
}

/// A bare registry client: handshakes and registers like a node, then
/// sends whatever signed statements a test builds (a hostile node).
pub struct RawClient {
    sock: tokio::net::UdpSocket,
    registry: SocketAddr,
    session: Session,
    next_req: u32,
    /// Answers the registry's path checks, as nodes do (false: as a node
    /// from before them).
    answers_checks: bool,
}

impl RawClient {
    /// Connects as `identity` (claiming `hostname`) to the registry of
    /// `join`.
    pub async fn register(join: JoinUrl, identity: &Identity, hostname: &str) -> Self {
        let (c, answer) = Self::try_register(join, identity, hostname).await;
        assert!(
            matches!(answer, FromRegistry::Registered { .. }),
            "{answer:?}"
        );
        c
    }

    /// Connects as `identity` and asks to register; returns the client and
    /// the registry's answer, whatever it is.
    pub async fn try_register(
        join: JoinUrl,
        identity: &Identity,
        hostname: &str,
    ) -> (Self, FromRegistry) {
        Self::try_register_as(join, identity, hostname, true).await
    }

    /// [`register`](Self::register) as a node from before path checks: it
    /// never answers one (so the registry moves it with its newest
    /// datagram, as it always did).
    pub async fn register_without_checks(
        join: JoinUrl,
        identity: &Identity,
        hostname: &str,
    ) -> Self {
        let (c, answer) = Self::try_register_as(join, identity, hostname, false).await;
        assert!(
            matches!(answer, FromRegistry::Registered { .. }),
            "{answer:?}"
        );
        c
    }

    async fn try_register_as(
        join: JoinUrl,
        identity: &Identity,
        hostname: &str,
        answers_checks: bool,
    ) -> (Self, FromRegistry) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let (init, msg) = handshake::initiate(
            identity.static_secret(),
            &join.key,
            0x5151,
            ts,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        sock.send_to(&msg, join.first()).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
            .await
            .expect("registry answers the handshake")
            .unwrap();
        let resp = wire::HandshakeResp::new_checked(&buf[..n]).expect("a handshake response");
        let own_mac = MacKey::for_static(&identity.static_public());
        let session = init
            .finish(&own_mac, resp, std::time::Instant::now())
            .expect("registry handshake completes");
        let mut c = RawClient {
            sock,
            registry: join.first(),
            session,
            next_req: 1,
            answers_checks,
        };
        let reg = Signed::sign(
            Registration {
                identity: identity.public(),
                hostname: Some(hostname.to_string()),
                seq: ts,
                local_endpoints: vec![],
                nat: NatType::Unknown,
            },
            identity,
        );
        let answer = c.call(|req| ToRegistry::Register { req, reg }).await;
        (c, answer)
    }

    /// A control message sealed on the session, as the client would send
    /// it (a test may send it from elsewhere: a source rewritten on the
    /// path).
    pub fn sealed(&self, msg: &ToRegistry) -> Vec<u8> {
        let bytes = messages::encode(msg).unwrap();
        let mut out = vec![0u8; DATA_HEADER_LEN + bytes.len() + TAG_LEN];
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + bytes.len()].copy_from_slice(&bytes);
        let n = self.session.sender.seal(&mut out, bytes.len()).unwrap();
        out.truncate(n);
        out
    }

    /// Sends a message and waits for nothing.
    pub async fn send(&self, msg: &ToRegistry) {
        self.sock
            .send_to(&self.sealed(msg), self.registry)
            .await
            .unwrap();
    }

    /// Opens a datagram sealed for this client (one a test caught
    /// elsewhere); `None` if it is not one.
    pub fn open(&self, datagram: &mut [u8]) -> Option<FromRegistry> {
        let n = self.session.open(datagram).ok()?;
        messages::decode(&datagram[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).ok()
    }

    /// Moves to a new socket (a NAT that gave the client a new mapping);
    /// the old one is closed.
    pub async fn rebind(&mut self) {
        self.sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    }

    /// Where the client sends from.
    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// Answers a path check if the client answers them; true if `msg` was
    /// one (it is nobody's answer).
    async fn on_check(&self, msg: &FromRegistry) -> bool {
        let FromRegistry::PathCheck { token } = *msg else {
            return false;
        };
        if self.answers_checks {
            self.send(&ToRegistry::PathConfirm { token }).await;
        }
        true
    }

    /// Sends a request and returns the registry's answer to it.
    pub async fn call(&mut self, make: impl FnOnce(u32) -> ToRegistry) -> FromRegistry {
        let req = self.next_req;
        self.next_req += 1;
        self.send(&make(req)).await;
        let mut buf = vec![0u8; 2048];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(3), self.sock.recv(&mut buf))
                .await
                .expect("registry answers")
                .unwrap();
            let Ok(plain) = self.session.open(&mut buf[..n]) else {
                continue;
            };
            let msg: FromRegistry =
                messages::decode(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + plain]).unwrap();
            if self.on_check(&msg).await {
                continue;
            }
            match &msg {
                FromRegistry::Ok { req: r }
                | FromRegistry::Error { req: r, .. }
                | FromRegistry::Registered { req: r, .. }
                | FromRegistry::Peer { req: r, .. }
                | FromRegistry::Certs { req: r, .. }
                | FromRegistry::Revocations { req: r, .. }
                    if *r == req =>
                {
                    return msg
                }
                _ => continue, // pushes and other answers
            }
        }
    }

    /// The next message that answers no request (a push, a punch, a
    /// revocation), if one comes within `wait`. Answers are skipped.
    pub async fn unsolicited(&mut self, wait: Duration) -> Option<FromRegistry> {
        let until = tokio::time::Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        loop {
            let n = tokio::time::timeout_at(until, self.sock.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            let Ok(plain) = self.session.open(&mut buf[..n]) else {
                continue;
            };
            let msg: FromRegistry =
                messages::decode(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + plain]).ok()?;
            if self.on_check(&msg).await {
                continue;
            }
            if let FromRegistry::Push { .. }
            | FromRegistry::Punch { .. }
            | FromRegistry::Revoked { .. } = msg
            {
                return Some(msg);
            }
        }
    }

    /// Sends `bytes` to the registry as they are (a relayed datagram).
    pub async fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.registry).await.unwrap();
    }

    /// The next datagram the relay delivers (`MSG_RELAY_FROM`), with where
    /// it came from, if one comes within `wait`. Anything else is skipped.
    pub async fn relayed(&mut self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let until = tokio::time::Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = tokio::time::timeout_at(until, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            if buf[..n].first() == Some(&wire::MSG_RELAY_FROM) {
                return Some((buf[..n].to_vec(), from));
            }
        }
    }

    /// Hands a signed statement to the registry for delivery.
    pub async fn statement(&mut self, statement: Signed<Statement>) -> FromRegistry {
        self.call(|req| ToRegistry::Statement { req, statement })
            .await
    }
}

/// A UDP proxy in front of a registry, for one node: the node uses the
/// proxy's address as the registry's. While armed, answers from the
/// registry are held back for a while before they reach the node (a slow
/// disk, a lost answer).
pub struct DelayProxy {
    /// The address the node sends to.
    pub addr: SocketAddr,
    hold: Arc<Mutex<Option<(tokio::time::Instant, Duration)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// A proxy to the registry at `registry`.
    pub async fn start(registry: SocketAddr) -> Self {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let hold: Arc<Mutex<Option<(tokio::time::Instant, Duration)>>> = Arc::default();
        let node: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (h, n) = (hold.clone(), node.clone());
        let task = tokio::spawn(async move {
            let mut fbuf = vec![0u8; 65536];
            let mut bbuf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut fbuf) => {
                        let Ok((len, from)) = r else { continue };
                        *n.lock().unwrap() = Some(from);
                        let _ = back.send_to(&fbuf[..len], registry).await;
                    }
                    r = back.recv_from(&mut bbuf) => {
                        let Ok((len, _)) = r else { continue };
                        let Some(to) = *n.lock().unwrap() else { continue };
                        let delay = match *h.lock().unwrap() {
                            Some((until, d)) if tokio::time::Instant::now() < until => Some(d),
                            _ => None,
                        };
                        let bytes = bbuf[..len].to_vec();
                        match delay {
                            Some(d) => {
                                let front = front.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(d).await;
                                    let _ = front.send_to(&bytes, to).await;
                                });
                            }
                            None => {
                                let _ = front.send_to(&bytes, to).await;
                            }
                        }
                    }
                }
            }
        });
        DelayProxy { addr, hold, task }
    }

    /// For the next `window`, every answer from the registry reaches the
    /// node only `delay` later.
    pub fn hold_answers(&self, window: Duration, delay: Duration) {
        *self.hold.lock().unwrap() = Some((tokio::time::Instant::now() + window, delay));
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP proxy in front of a registry for one node, as its NAT: the node
/// uses [`NatProxy::addr`] as the registry's address, and the registry
/// sees the proxy's outside socket. [`NatProxy::rebind`] gives the node a
/// new mapping (a new outside socket; the old one closes), and
/// [`NatProxy::rewrite_next`] plays an attacker on the path: the node's
/// next control datagram reaches the registry from a third socket instead
/// (the original is dropped), and what comes back there is only counted.
pub struct NatProxy {
    /// The address the node sends to.
    pub addr: SocketAddr,
    nat: Arc<Nat>,
    task: tokio::task::JoinHandle<()>,
    attacker: tokio::task::JoinHandle<()>,
}

struct Nat {
    front: Arc<tokio::net::UdpSocket>,
    node: Mutex<Option<SocketAddr>>,
    outside: Mutex<(
        Arc<tokio::net::UdpSocket>,
        Option<tokio::task::JoinHandle<()>>,
    )>,
    attacker: Arc<tokio::net::UdpSocket>,
    rewrite: std::sync::atomic::AtomicBool,
    caught: std::sync::atomic::AtomicUsize,
}

impl Nat {
    /// A new outside socket, whose datagrams go back to the node.
    async fn map(self: &Arc<Self>) {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (nat, inside) = (self.clone(), sock.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, _)) = inside.recv_from(&mut buf).await {
                let to = *nat.node.lock().unwrap();
                if let Some(to) = to {
                    let _ = nat.front.send_to(&buf[..len], to).await;
                }
            }
        });
        let old = std::mem::replace(&mut *self.outside.lock().unwrap(), (sock, Some(reader)));
        if let Some(t) = old.1 {
            t.abort();
        }
    }
}

impl NatProxy {
    /// A proxy to the registry at `registry`.
    pub async fn start(registry: SocketAddr) -> Self {
        let bind = || async { Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()) };
        let (front, first, attacker) = (bind().await, bind().await, bind().await);
        let nat = Arc::new(Nat {
            front: front.clone(),
            node: Mutex::new(None),
            outside: Mutex::new((first, None)),
            attacker: attacker.clone(),
            rewrite: false.into(),
            caught: 0.into(),
        });
        nat.map().await;
        let addr = front.local_addr().unwrap();
        let n = nat.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, from)) = front.recv_from(&mut buf).await {
                *n.node.lock().unwrap() = Some(from);
                let data = matches!(wire::classify(&buf[..len]), Kind::Data);
                let out = if data && n.rewrite.swap(false, Ordering::SeqCst) {
                    n.attacker.clone()
                } else {
                    n.outside.lock().unwrap().0.clone()
                };
                let _ = out.send_to(&buf[..len], registry).await;
            }
        });
        let n = nat.clone();
        let attacker = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while n.attacker.recv_from(&mut buf).await.is_ok() {
                n.caught.fetch_add(1, Ordering::SeqCst);
            }
        });
        NatProxy {
            addr,
            nat,
            task,
            attacker,
        }
    }

    /// Where the registry sees the node now.
    pub fn outside(&self) -> SocketAddr {
        self.nat.outside.lock().unwrap().0.local_addr().unwrap()
    }

    /// A new mapping: from now on the node's datagrams leave from a new
    /// socket, and the old one is closed.
    pub async fn rebind(&self) {
        self.nat.map().await;
    }

    /// The node's next control datagram (a data-type datagram on its
    /// session) leaves from the attacker's socket; the original is dropped.
    pub fn rewrite_next(&self) {
        self.nat.rewrite.store(true, Ordering::SeqCst);
    }

    /// True while the next control datagram is still to be rewritten.
    pub fn rewrite_pending(&self) -> bool {
        self.nat.rewrite.load(Ordering::SeqCst)
    }

    /// Datagrams the registry sent to the attacker's socket.
    pub fn caught(&self) -> usize {
        self.nat.caught.load(Ordering::SeqCst)
    }
}

impl Drop for NatProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.attacker.abort();
        if let Some(t) = self.nat.outside.lock().unwrap().1.take() {
            t.abort();
        }
    }
}

/// A schema of its own in the `PILOT_TEST_PG` database, dropped at the
/// end; `None` (said on stderr) when `PILOT_TEST_PG` is not set.
pub struct TestPg {
    /// Connects into the schema.
    pub config: postgres::Config,
    admin: Option<postgres::Client>,
    schema: String,
}

impl TestPg {
    /// A fresh schema, or `None` without `PILOT_TEST_PG`.
    pub fn new(what: &str) -> Option<Self> {
        let Ok(url) = std::env::var("PILOT_TEST_PG") else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\nSKIPPED: {what} (PILOT_TEST_PG is not set; scripts/test.sh sets it, or run it under scripts/pg.sh)\n"
            );
            return None;
        };
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let schema = format!(
            "pilot_lab_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut config = pilot_registry::storage_pg::parse_url(&url).expect("PILOT_TEST_PG");
        // postgres' blocking client must not run on an async worker.
        let (admin, config) = std::thread::scope(|s| {
            s.spawn(|| {
                let mut admin = config
                    .connect(postgres::NoTls)
                    .unwrap_or_else(|e| panic!("PILOT_TEST_PG is set but does not connect: {e:?}"));
                admin
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .unwrap();
                config.options(&format!("-c search_path={schema}"));
                (admin, config)
            })
            .join()
            .unwrap()
        });
        Some(TestPg {
            config,
            admin: Some(admin),
            schema,
        })
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if let Some(mut admin) = self.admin.take() {
            let schema = self.schema.clone();
            let _ = std::thread::spawn(move || {
                let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
            })
            .join();
        }
    }
}

/// The node id of a test node (from its key file).
pub fn id_of(n: &TestNode) -> pilot_proto::identity::NodeId {
    identity_of(&n.dir).node_id()
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Issues `n` a certificate from `owner` with `tags` and installs it.
pub async fn install_cert(n: &TestNode, owner: &pilot_proto::cert::OwnerKey, tags: &str) {
    let cert = pilot_proto::cert::Certificate::issue(
        owner,
        id_of(n),
        pilot_proto::cert::parse_tags(tags).unwrap(),
        now(),
        30 * 86_400,
    )
    .unwrap();
    let info: pilot_tun::api::CertInfo = n
        .get(pilot_tun::api::Request::CertInstall {
            cert: cert.to_armored(),
        })
        .await;
    assert_eq!(info.tags.join(","), tags);
    assert!(info.valid);
}

/// Adds a policy rule on `n`: `owner`'s nodes tagged `tag` may open `ports`.
pub async fn allow(
    n: &TestNode,
    owner: &pilot_proto::cert::OwnerKey,
    tag: &str,
    ports: &str,
) -> pilot_tun::api::PolicyRule {
    n.get(pilot_tun::api::Request::PolicyAllow {
        owner: owner.public().to_string(),
        tag: tag.into(),
        ports: Some(ports.parse().unwrap()),
        expires_in_secs: None,
    })
    .await
}
