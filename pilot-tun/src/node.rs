//! The node: startup, the control side (handshakes, timers, the registry
//! session, trust changes) and the requests of the control socket. The
//! packet path is in [`crate::dataplane`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use parking_lot::{Mutex, RwLock};
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{
    FromRegistry, PeerInfo, PeerRef, Registration, Signed, Statement, StatementKind, ToRegistry,
};
use pilot_proto::ratelimit::RateLimiter;
use pilot_proto::session::CipherSuite;
use pilot_proto::timers::REKEY_AFTER;
use pilot_proto::trust::{Change, TrustStore};
use pilot_proto::wire::INIT_LEN;
use serde_json::json;
use std::collections::HashMap;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::control::{Request, Response};
use crate::link::{LinkError, RegistryLink};
use crate::peers::{Drops, PeerData, PeerRuntime, PeerTable};
use crate::state::{NodeState, StateDir, StateError};
use crate::tun::Tun;
use crate::udp::Udp;

/// How the node is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The state directory.
    pub state: StateDir,
    /// The registry (None: use the one remembered in the state directory).
    pub registry: Option<JoinUrl>,
    /// Hostname to claim.
    pub hostname: Option<String>,
    /// UDP address to listen on (None: last port, or any).
    pub listen: Option<SocketAddr>,
    /// Data cipher for sessions we initiate.
    pub suite: CipherSuite,
    /// Use UDP GSO/GRO and TUN offloads where the kernel allows.
    pub offload: bool,
    /// How long start-up waits for the registry before using the cached
    /// address.
    pub register_timeout: Duration,
    /// `--mtu`: the TUN MTU never exceeds it (otherwise it follows the
    /// underlay routes, see [`crate::pathmtu`]).
    pub mtu: Option<u16>,
}

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// No registry given and none remembered.
    #[error("no registry given: pass --registry pilot://<key>@<ip:port> (printed by pilot-registry) on the first `up`")]
    NoRegistry,
    /// The remembered registry URL does not parse.
    #[error(
        "the registry URL remembered in node.json does not parse ({0}); pass --registry again"
    )]
    BadRegistry(String),
    /// UDP socket.
    #[error("cannot bind UDP {addr}: {source} (is another pilot-tun using the port? choose one with --listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The registry could not be reached and there is no cached address.
    #[error("{0}; this node has no cached address yet, so it needs the registry once (check the join URL and that UDP to it is open)")]
    Registry(LinkError),
    /// The TUN device.
    #[error("{0}")]
    Tun(String),
}

/// An item for the control side.
pub enum Slow {
    /// A datagram that is not data for a peer session.
    Datagram(Vec<u8>, SocketAddr),
    /// A tunnel datagram the relay delivered from this node.
    Relayed(NodeId, Vec<u8>),
    /// A packet for a trusted peer that has no session.
    NeedSession(NodeId, Vec<u8>),
    /// An authenticated in-tunnel control message (not an IP packet).
    Control(NodeId, Vec<u8>),
}

/// The control side's state, behind one lock (never held across an await).
pub struct Brain {
    /// The trust store.
    pub trust: TrustStore,
    /// node.json.
    pub node_state: NodeState,
    /// Trusted peers.
    pub peers: HashMap<NodeId, PeerRuntime>,
    /// Trusted peers by static key, for answering handshakes.
    pub by_static: HashMap<[u8; 32], NodeId>,
    pub(crate) last_timestamp: u64,
    pub(crate) limiter: RateLimiter<std::net::IpAddr>,
}

/// Everything a running node shares between its tasks.
pub struct Inner<T: Tun> {
    /// Our keys.
    pub identity: Identity,
    /// Our node id.
    pub id: NodeId,
    /// MAC key for handshakes addressed to us.
    pub own_mac: MacKey,
    /// Configuration.
    pub cfg: NodeConfig,
    /// The registry session.
    pub link: RegistryLink,
    /// The session with a relay-only instance the registry told us about.
    pub relay_link: RwLock<Option<Arc<RegistryLink>>>,
    /// Our address and the overlay network, once known.
    pub net: OnceLock<(Ipv4Addr, Ipv4Net)>,
    /// The TUN device, once created.
    pub tun: OnceLock<T>,
    /// The UDP socket.
    pub udp: Udp,
    /// What the data plane reads.
    pub table: RwLock<PeerTable>,
    /// What the control side owns.
    pub brain: Mutex<Brain>,
    /// Drop counters.
    pub drops: Drops,
    /// The TUN MTU.
    pub mtu: crate::pathmtu::NodeMtu,
    /// Items for the control side.
    pub slow_tx: mpsc::Sender<Slow>,
    /// Reference instant for the peers' millisecond clocks.
    pub epoch: Instant,
    /// Signals `down`.
    pub stop: Notify,
    /// Our NAT type, as last measured.
    pub nat: Mutex<pilot_proto::messages::NatType>,
    /// STUN transactions waiting for an answer.
    pub stun_pending: Mutex<HashMap<[u8; 12], tokio::sync::oneshot::Sender<SocketAddr>>>,
    /// In-tunnel pings waiting for their echo.
    pub pings: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Instant>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    started: SystemTime,
}

/// A running node.
pub struct Node<T: Tun> {
    /// Shared state (public for tests and the data plane).
    pub inner: Arc<Inner<T>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // The system generator does not fail on Linux; a zero index is still valid.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b)
}

impl<T: Tun> Node<T> {
    /// Starts a node: state, UDP, registry, then the TUN (from `make_tun`,
    /// given our address and the overlay network), then the packet loops.
    pub async fn start(
        cfg: NodeConfig,
        make_tun: impl FnOnce(Ipv4Addr, Ipv4Net) -> Result<T, String>,
    ) -> Result<Self, StartError> {
        cfg.state.create()?;
        let (identity, new) = cfg.state.load_or_create_identity()?;
        let mut node_state = cfg.state.load_node()?;
        let trust = cfg.state.load_trust()?;
        let join: JoinUrl = match (&cfg.registry, &node_state.registry) {
            (Some(j), _) => *j,
            (None, Some(s)) => s.parse().map_err(|_| StartError::BadRegistry(s.clone()))?,
            (None, None) => return Err(StartError::NoRegistry),
        };
        if new {
            info!(id = %identity.node_id(), "created a new identity");
        }
        if node_state.registry.as_deref() != Some(&join.to_string()) {
            if node_state.registry.is_some() && node_state.address.is_some() {
                warn!("registry changed; the cached address belongs to the old network");
                node_state.address = None;
                node_state.prefix_len = None;
            }
            node_state.registry = Some(join.to_string());
            cfg.state.save_node(&node_state)?;
        }

        let socket = bind_udp(cfg.listen, node_state.port)?;
        let udp = Udp::new(socket, cfg.offload).map_err(|e| StartError::Bind {
            addr: cfg
                .listen
                .unwrap_or_else(|| "0.0.0.0:0".parse().expect("literal")),
            source: e,
        })?;
        let port = udp.local_addr().map(|a| a.port()).ok();
        if port.is_some() && node_state.port != port {
            node_state.port = port;
            cfg.state.save_node(&node_state)?;
        }

        let (slow_tx, slow_rx) = mpsc::channel(4096);
        let id = identity.node_id();
        let own_mac = MacKey::for_static(&identity.static_public());
        let inner = Arc::new(Inner {
            id,
            own_mac,
            identity,
            link: RegistryLink::new(join),
            relay_link: RwLock::new(None),
            net: OnceLock::new(),
            tun: OnceLock::new(),
            udp,
            table: RwLock::new(PeerTable::default()),
            brain: Mutex::new(Brain {
                trust,
                node_state,
                peers: HashMap::new(),
                by_static: HashMap::new(),
                last_timestamp: 0,
                limiter: RateLimiter::new(20, 5),
            }),
            drops: Drops::default(),
            mtu: crate::pathmtu::NodeMtu::new(cfg.mtu),
            slow_tx,
            epoch: Instant::now(),
            stop: Notify::new(),
            nat: Mutex::new(pilot_proto::messages::NatType::Unknown),
            stun_pending: Mutex::new(HashMap::new()),
            pings: Mutex::new(HashMap::new()),
            tasks: Mutex::new(vec![]),
            started: SystemTime::now(),
            cfg,
        });
        {
            let mut tasks = inner.tasks.lock();
            tasks.push(tokio::spawn(crate::dataplane::udp_loop(inner.clone())));
            tasks.push(tokio::spawn(slow_loop(inner.clone(), slow_rx)));
        }

        // Register, or fall back to the cached address.
        let registered =
            tokio::time::timeout(inner.cfg.register_timeout, inner.connect_registry()).await;
        let cached = {
            let b = inner.brain.lock();
            b.node_state
                .address
                .zip(b.node_state.prefix_len)
                .and_then(|(a, p)| Ipv4Net::new(a, p).ok().map(|n| (a, n.trunc())))
        };
        match (registered, cached) {
            (Ok(Ok(())), _) => {}
            (r, Some((a, n))) => {
                let why = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".into(),
                };
                warn!("registry not reachable ({why}); coming up on cached address {a}");
                let _ = inner.net.set((a, n));
            }
            (Ok(Err(e)), None) => {
                inner.shutdown().await;
                return Err(StartError::Registry(e));
            }
            (Err(_), None) => {
                inner.shutdown().await;
                return Err(StartError::Registry(LinkError::Unreachable(
                    inner.link.join.addr,
                )));
            }
        }
        let (address, network) = *inner.net.get().expect("address set above");
        let tun = match make_tun(address, network) {
            Ok(t) => t,
            Err(e) => {
                inner.shutdown().await;
                return Err(StartError::Tun(e));
            }
        };
        let _ = inner.tun.set(tun);
        let cached_endpoints = {
            let mut brain = inner.brain.lock();
            let trusted: Vec<_> = brain
                .trust
                .iter()
                .filter(|(_, r)| r.trusted())
                .map(|(id, r)| (id, r.address, r.identity.static_public, r.last_endpoint))
                .collect();
            let mut table = inner.table.write();
            let mut cached = vec![];
            for (pid, addr, st, last) in trusted {
                add_peer(&mut brain, &mut table, pid, addr, st);
                if let Some(rt) = brain.peers.get_mut(&pid) {
                    rt.candidates.extend(last);
                }
                cached.extend(last);
            }
            cached
        };
        // The TUN MTU that fits the routes to the registry and the peers.
        inner.update_tun_mtu(&cached_endpoints);
        {
            let mut tasks = inner.tasks.lock();
            tasks.push(tokio::spawn(crate::dataplane::tun_loop(inner.clone())));
            tasks.push(tokio::spawn(tick_loop(inner.clone())));
            tasks.push(tokio::spawn(registry_keeper(inner.clone())));
            tasks.push(tokio::spawn(relay_keeper(inner.clone())));
            tasks.push(tokio::spawn(crate::pathmtu::keeper(inner.clone())));
        }
        // Reconnect to trusted peers now: from their cached endpoints at
        // once (works while the registry is down), and from what the
        // registry says.
        inner.reconnect_all().await;
        Ok(Node { inner })
    }

    /// Handles one control request.
    pub async fn request(&self, req: Request) -> Response {
        self.inner.request(req).await
    }

    /// Stops every task of the node and waits until they are gone (the UDP
    /// port and the TUN device are released when the last handle drops).
    pub async fn shutdown(self) {
        self.inner.shutdown().await;
    }

    /// Our overlay address.
    pub fn address(&self) -> Ipv4Addr {
        self.inner
            .net
            .get()
            .map(|n| n.0)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

fn bind_udp(
    listen: Option<SocketAddr>,
    last_port: Option<u16>,
) -> Result<std::net::UdpSocket, StartError> {
    let bind = |a: SocketAddr| {
        std::net::UdpSocket::bind(a).map_err(|e| StartError::Bind { addr: a, source: e })
    };
    match (listen, last_port) {
        (Some(a), _) => bind(a),
        (None, Some(p)) => bind(SocketAddr::from(([0, 0, 0, 0], p)))
            .or_else(|_| bind(SocketAddr::from(([0, 0, 0, 0], 0)))),
        (None, None) => bind(SocketAddr::from(([0, 0, 0, 0], 0))),
    }
}

/// Adds a trusted peer to the control state and the data plane's table.
fn add_peer(
    brain: &mut Brain,
    table: &mut PeerTable,
    id: NodeId,
    address: Ipv4Addr,
    static_public: [u8; 32],
) {
    if brain.peers.contains_key(&id) {
        return;
    }
    let data = Arc::new(PeerData::new(id, address));
    table.by_addr.insert(address, data.clone());
    brain.by_static.insert(static_public, id);
    brain
        .peers
        .insert(id, PeerRuntime::new(data, static_public));
}

/// Removes a peer from the data plane at once: its sessions and its address.
fn remove_peer(brain: &mut Brain, table: &mut PeerTable, id: &NodeId) {
    if let Some(rt) = brain.peers.remove(id) {
        table.by_addr.remove(&rt.data.address);
        for s in &rt.sessions {
            table.by_index.remove(&s.local_index);
        }
        rt.data.clear_session();
        brain.by_static.remove(&rt.static_public);
    }
}

impl<T: Tun> Inner<T> {
    /// Milliseconds since the node's epoch.
    pub fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub(crate) fn instant_of(&self, ms: u64) -> Option<Instant> {
        (ms > 0).then(|| self.epoch + Duration::from_millis(ms))
    }

    /// Our overlay address (unspecified before start-up finished).
    pub fn address(&self) -> Ipv4Addr {
        self.net.get().map(|n| n.0).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Our overlay network.
    pub fn network(&self) -> Option<Ipv4Net> {
        self.net.get().map(|n| n.1)
    }

    async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock());
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn next_seq(&self, brain: &mut Brain) -> Result<u64, StateError> {
        let seq = (brain.node_state.seq + 1).max(unix_micros());
        brain.node_state.seq = seq;
        // Written before use, so a crash can never make us reuse a number.
        self.cfg.state.save_node(&brain.node_state)?;
        Ok(seq)
    }

    pub(crate) fn next_timestamp(brain: &mut Brain) -> u64 {
        let ts = (brain.last_timestamp + 1).max(unix_micros() * 1000);
        brain.last_timestamp = ts;
        ts
    }

    pub(crate) fn fresh_index(&self) -> u32 {
        loop {
            let i = random_u32();
            let relay_owns = self
                .relay_link
                .read()
                .as_ref()
                .is_some_and(|l| l.owns_index(i));
            if !self.table.read().by_index.contains_key(&i)
                && !self.link.owns_index(i)
                && !relay_owns
            {
                return i;
            }
        }
    }

    /// Where relayed datagrams go: a relay-only instance when we have a
    /// session with one, else the registry's own port.
    pub fn relay_addr(&self) -> SocketAddr {
        match self.relay_link.read().as_ref() {
            Some(l) if l.session().is_some() => l.join.addr,
            _ => self.link.join.addr,
        }
    }

    /// True if `from` is a relay we use (datagrams from it may carry other
    /// nodes' tunnel datagrams).
    pub fn is_relay(&self, from: SocketAddr) -> bool {
        from == self.link.join.addr
            || self
                .relay_link
                .read()
                .as_ref()
                .is_some_and(|l| l.join.addr == from)
    }

    /// A signed registration for the registry or a relay.
    fn registration(
        &self,
        nat: pilot_proto::messages::NatType,
    ) -> Result<Signed<Registration>, LinkError> {
        let (seq, hostname) = {
            let mut b = self.brain.lock();
            let seq = self.next_seq(&mut b).map_err(|_| LinkError::Protocol)?;
            let host = self
                .cfg
                .hostname
                .clone()
                .or_else(|| b.node_state.hostname.clone());
            (seq, host)
        };
        let locals = local_endpoints(self.udp.local_addr().map(|a| a.port()).unwrap_or(0));
        Ok(Signed::sign(
            Registration {
                identity: self.identity.public(),
                hostname,
                seq,
                local_endpoints: locals,
                nat,
            },
            &self.identity,
        ))
    }

    fn make_init(&self, key: &[u8; 32]) -> Option<(handshake::Initiator, [u8; INIT_LEN])> {
        let ts = Self::next_timestamp(&mut self.brain.lock());
        handshake::initiate(
            self.identity.static_secret(),
            key,
            self.fresh_index(),
            ts,
            CipherSuite::Aes256Gcm,
        )
        .ok()
    }

    /// Handshake and registration with a relay-only instance.
    pub(crate) async fn connect_relay(&self, relay: &RegistryLink) -> Result<(), LinkError> {
        relay
            .handshake(&self.udp, || self.make_init(&relay.join.key))
            .await?;
        let reg = self.registration(*self.nat.lock())?;
        match relay
            .call(&self.udp, |req| ToRegistry::Register {
                req,
                reg: reg.clone(),
            })
            .await?
        {
            FromRegistry::Registered { .. } => Ok(()),
            _ => Err(LinkError::Protocol),
        }
    }

    /// Handshake with the registry, then register.
    async fn connect_registry(&self) -> Result<(), LinkError> {
        self.link
            .handshake(&self.udp, || self.make_init(&self.link.join.key))
            .await?;
        let nat = self.detect_nat().await;
        let reg = self.registration(nat)?;
        let answer = self
            .link
            .call(&self.udp, |req| ToRegistry::Register {
                req,
                reg: reg.clone(),
            })
            .await?;
        let FromRegistry::Registered {
            address,
            prefix_len,
            hostname: granted,
            hostname_refused,
            observed,
            relays,
            ..
        } = answer
        else {
            return Err(LinkError::Protocol);
        };
        if let Some(&first) = relays.first() {
            let mut rl = self.relay_link.write();
            if rl.as_ref().is_none_or(|l| l.join.addr != first) {
                *rl = Some(Arc::new(RegistryLink::new(JoinUrl {
                    key: self.link.join.key,
                    addr: first,
                })));
            }
        }
        if let Some(why) = hostname_refused {
            warn!("hostname not granted: {why}");
        }
        self.link.set_observed(observed);
        let network = Ipv4Net::new(address, prefix_len)
            .map_err(|_| LinkError::Protocol)?
            .trunc();
        if let Some((a, _)) = self.net.get() {
            if *a != address {
                warn!(cached = %a, assigned = %address, "registry assigned a different address than the cached one; keeping the interface as is until restart");
            }
        } else {
            let _ = self.net.set((address, network));
        }
        let mut b = self.brain.lock();
        let changed = b.node_state.address != Some(address)
            || b.node_state.prefix_len != Some(prefix_len)
            || b.node_state.hostname != granted;
        if changed {
            b.node_state.address = Some(address);
            b.node_state.prefix_len = Some(prefix_len);
            b.node_state.hostname = granted;
            if let Err(e) = self.cfg.state.save_node(&b.node_state) {
                warn!("cannot save node state: {e}");
            }
        }
        info!(%address, %observed, "registered");
        Ok(())
    }

    /// Looks a peer up at the registry and checks what it says.
    pub(crate) async fn lookup(&self, peer: &PeerRef) -> Result<PeerInfo, String> {
        let answer = self
            .link
            .call(&self.udp, |req| ToRegistry::Lookup {
                req,
                peer: peer.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let FromRegistry::Peer { info, .. } = answer else {
            return Err("unexpected answer from the registry".into());
        };
        if !info.identity.binding_valid() {
            return Err(format!(
                "the registry returned keys for {peer} that do not belong together; refusing them"
            ));
        }
        if let PeerRef::Id(id) = peer {
            if info.identity.node_id() != *id {
                return Err(format!(
                    "the registry returned another node's keys for {peer}; refusing them"
                ));
            }
        }
        if let Some(net) = self.network() {
            if !net.contains(&info.address) {
                return Err(format!(
                    "the registry returned address {} outside the overlay {net}",
                    info.address
                ));
            }
        }
        Ok(info)
    }

    /// Applies a trust change to the data plane.
    pub(crate) fn apply_change(self: &Arc<Self>, brain: &mut Brain, id: NodeId, change: Change) {
        if change.now_trusted && !change.was_trusted {
            if let Some(r) = brain.trust.get(&id) {
                let (addr, st) = (r.address, r.identity.static_public);
                let mut table = self.table.write();
                add_peer(brain, &mut table, id, addr, st);
            }
            crate::tunnels::spawn_lookup_locked(self, brain, id);
            info!(peer = %id, "peer trusted");
        } else if change.was_trusted && !change.now_trusted {
            let mut table = self.table.write();
            remove_peer(brain, &mut table, &id);
            info!(peer = %id, "peer no longer trusted; sessions dropped");
        }
    }

    /// Resolves a CLI peer name: the trust store first, then the registry.
    async fn resolve(&self, name: &str) -> Result<PeerInfo, String> {
        let r: PeerRef = name.parse().unwrap_or(PeerRef::Name(name.into()));
        let local = {
            let b = self.brain.lock();
            let found = b
                .trust
                .iter()
                .find(|(id, rec)| match &r {
                    PeerRef::Id(x) => id == x,
                    PeerRef::Addr(a) => rec.address == *a,
                    PeerRef::Name(n) => rec.hostname.as_deref() == Some(n.as_str()),
                })
                .map(|(_, rec)| PeerInfo {
                    identity: rec.identity.clone(),
                    address: rec.address,
                    hostname: rec.hostname.clone(),
                    endpoints: vec![],
                    nat: Default::default(),
                });
            found
        };
        match local {
            Some(i) => Ok(i),
            None => self.lookup(&r).await,
        }
    }

    async fn trust_statement(self: &Arc<Self>, peer: &str, kind: StatementKind) -> Response {
        let info = match self.resolve(peer).await {
            Ok(i) => i,
            Err(e) => return Response::err(format!("cannot find {peer}: {e}")),
        };
        let pid = info.identity.node_id();
        if pid == self.id {
            return Response::err("that is this node itself");
        }
        let seq = match self.next_seq(&mut self.brain.lock()) {
            Ok(s) => s,
            Err(e) => return Response::err(e.to_string()),
        };
        let statement = Signed::sign(
            Statement {
                kind: kind.clone(),
                from: self.identity.public(),
                to: pid,
                seq,
            },
            &self.identity,
        );
        let grants = kind.approves();
        let record_local = |this: &Arc<Self>| -> Result<Change, String> {
            let mut brain = this.brain.lock();
            let change = brain.trust.decide(
                &info.identity,
                info.address,
                info.hostname.clone(),
                &kind,
                unix_now(),
            );
            this.cfg
                .state
                .save_trust(&brain.trust)
                .map_err(|e| e.to_string())?;
            this.apply_change(&mut brain, pid, change);
            Ok(change)
        };
        // Withdrawing trust takes effect locally first, whatever the registry
        // does; granting it is recorded only once the registry has it.
        let mut change = None;
        if !grants {
            match record_local(self) {
                Ok(c) => change = Some(c),
                Err(e) => return Response::err(e),
            }
        }
        let sent = self
            .link
            .call(&self.udp, |req| ToRegistry::Statement {
                req,
                statement: statement.clone(),
            })
            .await;
        let delivered = match sent {
            Ok(FromRegistry::Ok { .. }) => Ok(()),
            Ok(_) => Err("unexpected answer from the registry".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if grants {
            if let Err(e) = delivered {
                return Response::err(format!("{} not sent, nothing changed: {e}", kind.name()));
            }
            match record_local(self) {
                Ok(c) => change = Some(c),
                Err(e) => return Response::err(e),
            }
        }
        let trusted = change.is_some_and(|c| c.now_trusted);
        let rec = self
            .brain
            .lock()
            .trust
            .get(&pid)
            .map(|r| r.state())
            .unwrap_or("none");
        Response::ok(json!({
            "peer": pid.to_string(),
            "hostname": info.hostname,
            "address": info.address.to_string(),
            "state": rec,
            "trusted": trusted,
            "delivered": delivered.is_ok(),
            "delivery_error": delivered.err(),
        }))
    }

    /// Handles one control request.
    pub async fn request(self: &Arc<Self>, req: Request) -> Response {
        match req {
            Request::Status => Response::ok(self.status()),
            Request::Peers => Response::ok(self.peers_json()),
            Request::TrustRequest { peer, note } => {
                if note.len() > pilot_proto::messages::MAX_NOTE {
                    return Response::err(format!(
                        "the note is longer than {} bytes",
                        pilot_proto::messages::MAX_NOTE
                    ));
                }
                self.trust_statement(&peer, StatementKind::Request { note })
                    .await
            }
            Request::TrustApprove { peer } => {
                self.trust_statement(&peer, StatementKind::Approve).await
            }
            Request::TrustDeny { peer } => self.trust_statement(&peer, StatementKind::Deny).await,
            Request::TrustRevoke { peer } => {
                self.trust_statement(&peer, StatementKind::Revoke).await
            }
            Request::TrustPending => {
                let b = self.brain.lock();
                let list: Vec<_> = b
                    .trust
                    .iter()
                    .filter(|(_, r)| r.pending())
                    .map(|(id, r)| {
                        json!({
                            "node_id": id.to_string(),
                            "hostname": r.hostname,
                            "address": r.address.to_string(),
                            "note": r.note_in,
                        })
                    })
                    .collect();
                Response::ok(json!(list))
            }
            Request::TrustList => {
                let b = self.brain.lock();
                let list: Vec<_> = b
                    .trust
                    .iter()
                    .map(|(id, r)| {
                        json!({
                            "node_id": id.to_string(),
                            "hostname": r.hostname,
                            "address": r.address.to_string(),
                            "state": r.state(),
                            "ours": format!("{:?}", r.ours).to_lowercase(),
                            "theirs": format!("{:?}", r.theirs).to_lowercase(),
                        })
                    })
                    .collect();
                Response::ok(json!(list))
            }
            Request::Ping { peer, count } => self.ping_request(&peer, count).await,
            Request::Down => {
                self.stop.notify_one();
                Response::ok(json!({"stopping": true}))
            }
        }
    }

    async fn ping_request(self: &Arc<Self>, peer: &str, count: u32) -> Response {
        let info = match self.resolve(peer).await {
            Ok(i) => i,
            Err(e) => return Response::err(format!("cannot find {peer}: {e}")),
        };
        let id = info.identity.node_id();
        if !self.brain.lock().peers.contains_key(&id) {
            return Response::err(format!(
                "{peer} is not trusted (both sides must approve: `pilot-tun trust request {peer}`)"
            ));
        }
        let mut rtts = vec![];
        for i in 0..count.clamp(1, 100) {
            // The first echo may wait for a handshake (and a relay fallback).
            let timeout = if i == 0 {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            let r = self.ping(id, timeout).await;
            rtts.push(r.map(|d| d.as_secs_f64() * 1000.0));
            if i + 1 < count {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let (path, reason) = {
            let b = self.brain.lock();
            b.peers
                .get(&id)
                .map(|rt| {
                    (
                        rt.data.endpoint().map(|e| e.to_string()),
                        rt.path.relay_reason().map(|r| r.text()),
                    )
                })
                .unwrap_or((None, None))
        };
        Response::ok(json!({
            "peer": id.to_string(),
            "hostname": info.hostname,
            "address": info.address.to_string(),
            "path": path,
            "relay_reason": reason,
            "rtt_ms": rtts,
        }))
    }

    fn status(&self) -> serde_json::Value {
        let b = self.brain.lock();
        let now = Instant::now();
        let connected = b
            .peers
            .values()
            .filter(|p| p.data.current(now).is_some())
            .count();
        let trusted = b.peers.len();
        json!({
            "address": self.address().to_string(),
            "network": self.network().map(|n| n.to_string()),
            "node_id": self.id.to_string(),
            "hostname": b.node_state.hostname,
            "listen": self.udp.local_addr().map(|a| a.to_string()).ok(),
            "registry": {
                "url": self.link.join.to_string(),
                "reachable": self.link.reachable(),
                "last_contact_secs": self.link.last_contact().map(|t| now.saturating_duration_since(t).as_secs()),
                "observed_endpoint": self.link.observed().map(|a| a.to_string()),
            },
            "relay": self.relay_addr().to_string(),
            "nat": self.nat.lock().name(),
            "public_endpoint": self.link.observed().map(|a| a.to_string()),
            "peers": { "known": b.trust.iter().count(), "trusted": trusted, "connected": connected },
            "pending_requests": b.trust.iter().filter(|(_, r)| r.pending()).count(),
            "cipher": match self.cfg.suite { CipherSuite::Aes256Gcm => "aes-256-gcm", CipherSuite::ChaCha20Poly1305 => "chacha20-poly1305" },
            "offload": { "udp_gso": self.udp.gso() },
            "mtu": self.mtu.tun(),
            "mtu_cap": self.mtu.cap,
            "underlay_below_mtu_floor": self.mtu.below_floor(),
            "too_big": self.drops.too_big.snapshot(),
            "pid": std::process::id(),
            "uptime_secs": SystemTime::now().duration_since(self.started).map(|d| d.as_secs()).unwrap_or(0),
            "drops": self.drops.snapshot(),
        })
    }

    fn peers_json(&self) -> serde_json::Value {
        let b = self.brain.lock();
        let now = Instant::now();
        let list: Vec<_> = b
            .trust
            .iter()
            .map(|(id, r)| {
                let rt = b.peers.get(&id);
                json!({
                    "node_id": id.to_string(),
                    "hostname": r.hostname,
                    "address": r.address.to_string(),
                    "trust": r.state(),
                    "endpoint": rt.and_then(|p| p.data.endpoint()).map(|e| e.to_string()),
                    "path": rt.and_then(|p| p.data.endpoint()).map(|e| match e {
                        crate::peers::Endpoint::Direct(_) => "direct",
                        crate::peers::Endpoint::Relay => "relay",
                    }),
                    "relay_reason": rt.and_then(|p| p.path.relay_reason()).map(|r| r.text()),
                    "rtt_ms": rt.and_then(|p| p.rtt_us).map(|u| u as f64 / 1000.0),
                    "session": rt.is_some_and(|p| p.data.current(now).is_some()),
                    "last_handshake_secs": rt.and_then(|p| p.last_handshake).and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs()),
                    "rx_bytes": rt.map(|p| p.data.rx_bytes.load(Ordering::Relaxed)).unwrap_or(0),
                    "tx_bytes": rt.map(|p| p.data.tx_bytes.load(Ordering::Relaxed)).unwrap_or(0),
                    "mtu": rt.map(|p| p.pmtu.inner_mtu(self.mtu.tun())),
                    "path_mtu": rt.and_then(|p| p.pmtu.path_mtu()),
                    "path_mtu_state": rt.and_then(|p| p.pmtu.state()),
                })
            })
            .collect();
        json!(list)
    }
}

/// UDP endpoints on this host's own interfaces, as candidates for peers.
pub(crate) fn local_endpoints(port: u16) -> Vec<SocketAddr> {
    let mut out = vec![];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) else {
                continue;
            };
            let ip = sin.ip();
            if ip.is_loopback() || ip.is_unspecified() || ip.is_link_local() {
                continue;
            }
            let e = SocketAddr::from((ip, port));
            if !out.contains(&e) && out.len() < pilot_proto::messages::MAX_ENDPOINTS - 1 {
                out.push(e);
            }
        }
    }
    out
}

async fn slow_loop<T: Tun>(inner: Arc<Inner<T>>, mut rx: mpsc::Receiver<Slow>) {
    while let Some(item) = rx.recv().await {
        inner.on_slow(item).await;
    }
}

async fn tick_loop<T: Tun>(inner: Arc<Inner<T>>) {
    let mut t = tokio::time::interval(Duration::from_millis(250));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        inner.tick().await;
    }
}

/// Keeps the registry session alive: pings every 10 s, reconnects with
/// backoff when it stops answering, and renews the session before its keys
/// grow old.
async fn registry_keeper<T: Tun>(inner: Arc<Inner<T>>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let stale = inner
            .link
            .session()
            .is_none_or(|s| s.created.elapsed() >= REKEY_AFTER);
        if stale {
            match inner.connect_registry().await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    // Peers may have moved while we could not ask.
                    inner.reconnect_all().await;
                }
                Err(e) => {
                    debug!("registry: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        match inner
            .link
            .call(&inner.udp, |req| ToRegistry::Ping { req })
            .await
        {
            Ok(FromRegistry::Pong { observed, .. }) => inner.link.set_observed(observed),
            _ => {
                warn!("registry stopped answering; reconnecting");
                inner.link.drop_session();
            }
        }
    }
}

/// Keeps a session with the relay-only instance the registry named, if
/// any: while it is up, relayed traffic goes there instead of the registry.
async fn relay_keeper<T: Tun>(inner: Arc<Inner<T>>) {
    loop {
        let link = inner.relay_link.read().clone();
        let Some(link) = link else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let stale = link
            .session()
            .is_none_or(|s| s.created.elapsed() >= REKEY_AFTER);
        if stale {
            if let Err(e) = inner.connect_relay(&link).await {
                debug!(relay = %link.join.addr, "relay: {e}");
                link.drop_session();
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            info!(relay = %link.join.addr, "attached to relay");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        if !matches!(
            link.call(&inner.udp, |req| ToRegistry::Ping { req }).await,
            Ok(FromRegistry::Pong { .. })
        ) {
            warn!(relay = %link.join.addr, "relay stopped answering; relaying through the registry");
            link.drop_session();
        }
    }
}

/// Runs the control socket server until the node stops.
pub async fn serve_control<T: Tun>(inner: Arc<Inner<T>>, listener: tokio::net::UnixListener) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut reader = BufReader::new(r);
            let mut line = String::new();
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => inner.request(req).await,
                Err(e) => Response::err(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

impl<T: Tun> Node<T> {
    /// Serves the control socket at the state directory's socket path.
    pub fn serve_control(&self) -> std::io::Result<()> {
        let path = self.inner.cfg.state.socket();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let t = tokio::spawn(serve_control(self.inner.clone(), listener));
        self.inner.tasks.lock().push(t);
        Ok(())
    }

    /// Waits for a `down` request.
    pub async fn stopped(&self) {
        self.inner.stop.notified().await;
    }
}
