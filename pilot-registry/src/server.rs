//! The registry server: one UDP socket carries STUN, node control sessions
//! (Noise IK towards the registry key, then sealed control messages), and
//! later relayed packets. The server owns all its state in one task.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{
    self, ErrorCode, FromRegistry, NatType, PeerInfo, PeerRef, ToRegistry,
};
use pilot_proto::ratelimit::RateLimiter;
use pilot_proto::session::Session;
use pilot_proto::stun;
use pilot_proto::timers::REJECT_AFTER;
use pilot_proto::wire::{self, Kind, DATA_HEADER_LEN, TAG_LEN};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use crate::registrar::{self, RegisterOutcome, StatementOutcome};
use crate::storage::{NodeRow, Storage};

/// Counters of what the registry saw and dropped.
#[derive(Debug, Default)]
pub struct Stats {
    /// STUN Binding requests answered.
    pub stun: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Control messages handled.
    pub messages: AtomicU64,
    /// Datagrams that were not any known kind, or malformed.
    pub dropped_malformed: AtomicU64,
    /// Handshakes with a bad MAC, a failed Noise read, or a replayed timestamp.
    pub dropped_handshake: AtomicU64,
    /// Handshakes over the per-source rate limit.
    pub dropped_rate: AtomicU64,
    /// Data packets for no session, failing authentication, or replayed.
    pub dropped_auth: AtomicU64,
    /// Control messages that did not decode, or were badly signed, or replays.
    pub refused: AtomicU64,
    /// Datagrams relayed.
    pub relayed: AtomicU64,
    /// Relay requests refused: unknown sender, offline or unapproved pair.
    pub relay_refused: AtomicU64,
    /// Relay requests over the sender's bandwidth limit.
    pub relay_limited: AtomicU64,
}

impl Stats {
    /// A snapshot as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("stun", l(&self.stun)),
            ("handshakes", l(&self.handshakes)),
            ("messages", l(&self.messages)),
            ("dropped_malformed", l(&self.dropped_malformed)),
            ("dropped_handshake", l(&self.dropped_handshake)),
            ("dropped_rate", l(&self.dropped_rate)),
            ("dropped_auth", l(&self.dropped_auth)),
            ("refused", l(&self.refused)),
            ("relayed", l(&self.relayed)),
            ("relay_refused", l(&self.relay_refused)),
            ("relay_limited", l(&self.relay_limited)),
        ]
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the registry is configured with.
pub struct Config {
    /// The registry's X25519 secret key (its identity; the join URL pins the
    /// public half).
    pub secret: [u8; 32],
    /// The overlay network addresses come from.
    pub network: Ipv4Net,
    /// Relay bandwidth each node may use, in bytes per second.
    pub relay_rate: u32,
    /// Relay-only instances next to this registry, told to every node.
    pub relays: Vec<SocketAddr>,
    /// This instance only relays: it shares the registry's key and
    /// database, accepts the registration of known nodes (to learn their
    /// addresses) and forwards between nodes that approved each other.
    pub relay_only: bool,
}

/// How long a relay trusts a cached approval (a relay-only instance sees
/// the registry's changes only through the shared database).
const APPROVAL_TTL: Duration = Duration::from_secs(2);

struct Conn {
    session: Session,
    static_public: [u8; 32],
    node: Option<NodeId>,
    addr: SocketAddr,
    last_seen: Instant,
    nat: NatType,
}

/// The rendezvous server.
pub struct Registry<S: Storage> {
    socket: Arc<UdpSocket>,
    secret: [u8; 32],
    mac: MacKey,
    network: Ipv4Net,
    storage: S,
    conns: HashMap<u32, Conn>,
    online: HashMap<NodeId, u32>,
    last_timestamp: HashMap<[u8; 32], u64>,
    mail: HashSet<NodeId>,
    limiter: RateLimiter<IpAddr>,
    alt_stun: Option<UdpSocket>,
    by_addr: HashMap<SocketAddr, NodeId>,
    approvals: HashMap<(NodeId, NodeId), (bool, Instant)>,
    relays: Vec<SocketAddr>,
    relay_only: bool,
    relay_limiter: RateLimiter<NodeId>,
    stats: Arc<Stats>,
    rng: ring::rand::SystemRandom,
}

/// The public key for a secret key.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    x25519_public(secret)
}

fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    // Same derivation snow and the node use: the identity module.
    let mut bytes = [0u8; 64];
    bytes[32..].copy_from_slice(secret);
    pilot_proto::identity::Identity::from_bytes(&bytes).static_public()
}

impl<S: Storage> Registry<S> {
    /// A registry serving on an already-bound socket.
    pub fn new(socket: UdpSocket, config: Config, storage: S) -> Self {
        let public = x25519_public(&config.secret);
        Registry {
            socket: Arc::new(socket),
            secret: config.secret,
            mac: MacKey::for_static(&public),
            network: config.network,
            storage,
            conns: HashMap::new(),
            online: HashMap::new(),
            last_timestamp: HashMap::new(),
            mail: HashSet::new(),
            limiter: RateLimiter::new(20, 5),
            alt_stun: None,
            by_addr: HashMap::new(),
            approvals: HashMap::new(),
            relays: config.relays.clone(),
            relay_only: config.relay_only,
            relay_limiter: RateLimiter::new(config.relay_rate, config.relay_rate.max(1 << 20) / 4),
            stats: Arc::new(Stats::default()),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// Also answers STUN on a second socket (another port), so nodes can
    /// tell whether their NAT maps per destination.
    pub fn with_alt_stun(mut self, socket: UdpSocket) -> Self {
        self.alt_stun = Some(socket);
        self
    }

    /// The counters (shared; keep a clone to read them while it runs).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; 65_536];
        let mut alt_buf = vec![0u8; 1500];
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let alt = self.alt_stun.take();
        let alt_recv = async |b: &mut [u8]| match &alt {
            Some(s) => s.recv_from(b).await,
            None => std::future::pending().await,
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = alt_recv(&mut alt_buf) => {
                    if let (Ok((n, from)), Some(s)) = (r, &alt) {
                        if let Some(tid) = stun::parse_binding_request(&alt_buf[..n]) {
                            bump(&self.stats.stun);
                            let _ = s.send_to(&stun::binding_response(&tid, from), from).await;
                        }
                    }
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.on_datagram(&mut buf[..n], from, Instant::now()).await,
                    // ICMP errors from earlier sends surface here; keep serving.
                    Err(e) => debug!("recv: {e}"),
                },
                _ = tick.tick() => self.on_tick(Instant::now()).await,
            }
        }
    }

    async fn on_datagram(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        match wire::classify(buf) {
            Kind::Stun => {
                if let Some(tid) = stun::parse_binding_request(buf) {
                    bump(&self.stats.stun);
                    let resp = stun::binding_response(&tid, from);
                    let _ = self.socket.send_to(&resp, from).await;
                } else {
                    bump(&self.stats.dropped_malformed);
                }
            }
            Kind::HandshakeInit => self.on_handshake(buf, from, now).await,
            Kind::Data => self.on_data(buf, from, now).await,
            Kind::RelayTo => self.on_relay(buf, from, now).await,
            Kind::HandshakeResp | Kind::RelayFrom | Kind::Unknown => {
                bump(&self.stats.dropped_malformed)
            }
        }
    }

    /// Forwards a tunnel datagram to another node, unread, if the two
    /// approved each other. The sender is known by the address of its
    /// control session: a datagram from anywhere else is dropped.
    async fn on_relay(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let Ok(h) = wire::RelayHeader::parse(buf) else {
            bump(&self.stats.dropped_malformed);
            return;
        };
        let Some(&src) = self.by_addr.get(&from) else {
            bump(&self.stats.relay_refused);
            return;
        };
        let dst = h.node;
        let Some(to) = self
            .online
            .get(&dst)
            .and_then(|i| self.conns.get(i))
            .map(|c| c.addr)
        else {
            bump(&self.stats.relay_refused);
            return;
        };
        if !(self.approved(&src, &dst) && self.approved(&dst, &src)) {
            bump(&self.stats.relay_refused);
            return;
        }
        if !self.relay_limiter.allow_n(&src, buf.len() as u32, now) {
            bump(&self.stats.relay_limited);
            return;
        }
        wire::RelayHeader {
            ty: wire::MSG_RELAY_FROM,
            node: src,
        }
        .emit(buf);
        bump(&self.stats.relayed);
        let _ = self.socket.send_to(buf, to).await;
    }

    /// Does `from` approve `to`? Cached; the cache is dropped whenever a
    /// statement is stored.
    fn approved(&mut self, from: &NodeId, to: &NodeId) -> bool {
        let now = Instant::now();
        if let Some(&(a, t)) = self.approvals.get(&(*from, *to)) {
            if now.saturating_duration_since(t) < APPROVAL_TTL {
                return a;
            }
        }
        let a = self.storage.approves(from, to).unwrap_or(false);
        self.approvals.insert((*from, *to), (a, now));
        a
    }

    fn random_index(&self) -> u32 {
        loop {
            let mut b = [0u8; 4];
            if ring::rand::SecureRandom::fill(&self.rng, &mut b).is_err() {
                continue;
            }
            let i = u32::from_le_bytes(b);
            if !self.conns.contains_key(&i) {
                return i;
            }
        }
    }

    async fn on_handshake(&mut self, buf: &[u8], from: SocketAddr, now: Instant) {
        let Ok(init) = wire::HandshakeInit::new_checked(buf) else {
            bump(&self.stats.dropped_malformed);
            return;
        };
        // Cheap checks first: MAC (one HMAC), then the per-source limit,
        // and only then the Diffie-Hellman work.
        if !self.mac.verify(init.mac_covered(), init.mac()) {
            bump(&self.stats.dropped_handshake);
            return;
        }
        if !self.limiter.allow(&from.ip(), now) {
            bump(&self.stats.dropped_rate);
            return;
        }
        let resp = match handshake::respond(&self.secret, &self.mac, init) {
            Ok(r) => r,
            Err(e) => {
                debug!(%from, "handshake refused: {e}");
                bump(&self.stats.dropped_handshake);
                return;
            }
        };
        let static_public = *resp.remote_static();
        let last = self
            .last_timestamp
            .get(&static_public)
            .copied()
            .unwrap_or(0);
        if resp.timestamp() <= last {
            debug!(%from, "replayed handshake initiation");
            bump(&self.stats.dropped_handshake);
            return;
        }
        self.last_timestamp.insert(static_public, resp.timestamp());
        let index = self.random_index();
        let Ok((session, out)) = resp.accept(index, now) else {
            bump(&self.stats.dropped_handshake);
            return;
        };
        bump(&self.stats.handshakes);
        self.conns.insert(
            index,
            Conn {
                session,
                static_public,
                node: None,
                addr: from,
                last_seen: now,
                nat: NatType::Unknown,
            },
        );
        let _ = self.socket.send_to(&out, from).await;
    }

    async fn on_data(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let Ok(h) = wire::DataHeader::parse(buf) else {
            bump(&self.stats.dropped_malformed);
            return;
        };
        let Some(conn) = self.conns.get_mut(&h.receiver_index) else {
            bump(&self.stats.dropped_auth);
            return;
        };
        let n = match conn.session.open(buf) {
            Ok(n) => n,
            Err(_) => {
                bump(&self.stats.dropped_auth);
                return;
            }
        };
        conn.last_seen = now;
        let roamed = conn.addr != from;
        conn.addr = from;
        let node = conn.node;
        if n == 0 {
            return; // keepalive
        }
        let msg: ToRegistry = match messages::decode(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + n]) {
            Ok(m) => m,
            Err(e) => {
                debug!(%from, "undecodable control message: {e}");
                bump(&self.stats.refused);
                return;
            }
        };
        bump(&self.stats.messages);
        if roamed {
            if let Some(id) = node {
                self.by_addr.retain(|_, n| *n != id);
                self.by_addr.insert(from, id);
                if let Err(e) = registrar::observed_at(&mut self.storage, &id, from) {
                    warn!("storage: {e}");
                }
            }
        }
        self.on_message(h.receiver_index, msg, from).await;
    }

    async fn on_message(&mut self, index: u32, msg: ToRegistry, from: SocketAddr) {
        let node = self.conns.get(&index).and_then(|c| c.node);
        if self.relay_only {
            return self.on_relay_only_message(index, msg, from).await;
        }
        let reply = match (msg, node) {
            (ToRegistry::Register { req, reg }, _) => {
                let static_ok = self
                    .conns
                    .get(&index)
                    .is_some_and(|c| c.static_public == reg.body.identity.static_public);
                if !static_ok || !reg.verify() {
                    bump(&self.stats.refused);
                    error(
                        req,
                        ErrorCode::Invalid,
                        "registration signature or key binding invalid",
                    )
                } else {
                    match registrar::register(&mut self.storage, &reg, self.network, from) {
                        Ok(RegisterOutcome::Ok {
                            node,
                            hostname_refused,
                        }) => {
                            let id = reg.body.identity.node_id();
                            if let Some(c) = self.conns.get_mut(&index) {
                                c.node = Some(id);
                                c.nat = reg.body.nat;
                            }
                            self.by_addr.retain(|_, n| *n != id);
                            self.by_addr.insert(from, id);
                            if let Some(old) = self.online.insert(id, index) {
                                if old != index {
                                    debug!(%id, "node reconnected");
                                }
                            }
                            self.mail.insert(id);
                            info!(%id, address = %node.address, hostname = ?node.hostname, %from, "registered");
                            FromRegistry::Registered {
                                req,
                                address: node.address,
                                prefix_len: self.network.prefix_len(),
                                hostname: node.hostname,
                                hostname_refused,
                                observed: from,
                                relays: self.relays.clone(),
                            }
                        }
                        Ok(RegisterOutcome::BadSignature) => {
                            bump(&self.stats.refused);
                            error(
                                req,
                                ErrorCode::Invalid,
                                "registration signature or key binding invalid",
                            )
                        }
                        Ok(RegisterOutcome::Replayed) => {
                            bump(&self.stats.refused);
                            error(
                                req,
                                ErrorCode::Replayed,
                                "registration sequence number is not newer",
                            )
                        }
                        Ok(RegisterOutcome::PoolExhausted) => error(
                            req,
                            ErrorCode::PoolExhausted,
                            "no free address in the overlay network",
                        ),
                        Err(e) => {
                            warn!("storage: {e}");
                            error(req, ErrorCode::Internal, "registry storage failed")
                        }
                    }
                }
            }
            (ToRegistry::Ping { req }, _) => FromRegistry::Pong {
                req,
                observed: from,
            },
            (ToRegistry::Lookup { req, .. }, None) | (ToRegistry::Statement { req, .. }, None) => {
                error(req, ErrorCode::NotRegistered, "register first")
            }
            (ToRegistry::Ack { .. }, None) => return,
            (ToRegistry::Lookup { req, peer }, Some(me)) => {
                let (reply, punch) = self.lookup(req, &peer, &me);
                if let Some((to, msg)) = punch {
                    self.send(to, &msg).await;
                }
                reply
            }
            (ToRegistry::Statement { req, statement }, Some(me)) => {
                if statement.body.from.node_id() != me || !statement.verify() {
                    bump(&self.stats.refused);
                    error(req, ErrorCode::Invalid, "statement not signed by this node")
                } else {
                    match registrar::store_statement(&mut self.storage, &statement) {
                        Ok(StatementOutcome::Stored(_)) => {
                            self.approvals.clear();
                            info!(from = %me, to = %statement.body.to, kind = statement.body.kind.name(), "trust statement");
                            self.mail.insert(statement.body.to);
                            let to = statement.body.to;
                            self.deliver(&to).await;
                            FromRegistry::Ok { req }
                        }
                        Ok(StatementOutcome::NoSuchNode) => {
                            error(req, ErrorCode::NotFound, "no such node")
                        }
                        Ok(StatementOutcome::BadSignature) => {
                            bump(&self.stats.refused);
                            error(req, ErrorCode::Invalid, "statement not signed by this node")
                        }
                        Ok(StatementOutcome::Replayed) => {
                            bump(&self.stats.refused);
                            error(
                                req,
                                ErrorCode::Replayed,
                                "statement sequence number is not newer",
                            )
                        }
                        Err(e) => {
                            warn!("storage: {e}");
                            error(req, ErrorCode::Internal, "registry storage failed")
                        }
                    }
                }
            }
            (ToRegistry::Ack { push }, Some(me)) => {
                if let Err(e) = self.storage.ack(&me, push) {
                    warn!("storage: {e}");
                }
                return;
            }
        };
        let registered = matches!(reply, FromRegistry::Registered { .. });
        self.send(index, &reply).await;
        if registered {
            if let Some(id) = self.conns.get(&index).and_then(|c| c.node) {
                self.deliver(&id).await;
            }
        }
    }

    /// A relay-only instance: learns which node is behind which address
    /// (from a signed registration of a node the registry already knows),
    /// answers pings, and refuses everything that belongs to the registry.
    async fn on_relay_only_message(&mut self, index: u32, msg: ToRegistry, from: SocketAddr) {
        let reply = match msg {
            ToRegistry::Register { req, reg } => {
                let static_ok = self
                    .conns
                    .get(&index)
                    .is_some_and(|c| c.static_public == reg.body.identity.static_public);
                let id = reg.body.identity.node_id();
                match (static_ok && reg.verify(), self.storage.node(&id)) {
                    (false, _) => {
                        bump(&self.stats.refused);
                        error(
                            req,
                            ErrorCode::Invalid,
                            "registration signature or key binding invalid",
                        )
                    }
                    (true, Ok(Some(row))) => {
                        if let Some(c) = self.conns.get_mut(&index) {
                            c.node = Some(id);
                            c.nat = reg.body.nat;
                        }
                        self.online.insert(id, index);
                        self.by_addr.retain(|_, n| *n != id);
                        self.by_addr.insert(from, id);
                        info!(%id, %from, "node attached to this relay");
                        FromRegistry::Registered {
                            req,
                            address: row.address,
                            prefix_len: self.network.prefix_len(),
                            hostname: row.hostname,
                            hostname_refused: None,
                            observed: from,
                            relays: vec![],
                        }
                    }
                    (true, Ok(None)) => error(
                        req,
                        ErrorCode::NotRegistered,
                        "unknown node: register with the registry first",
                    ),
                    (true, Err(e)) => {
                        warn!("storage: {e}");
                        error(req, ErrorCode::Internal, "relay storage failed")
                    }
                }
            }
            ToRegistry::Ping { req } => FromRegistry::Pong {
                req,
                observed: from,
            },
            ToRegistry::Lookup { req, .. } | ToRegistry::Statement { req, .. } => error(
                req,
                ErrorCode::Invalid,
                "this instance only relays; ask the registry",
            ),
            ToRegistry::Ack { .. } => return,
        };
        self.send(index, &reply).await;
    }

    /// Answers a lookup. When the peer approved the asker and is online, also
    /// returns a punch request for the peer (its session index and the
    /// message), so both sides probe each other at the same time.
    fn lookup(
        &mut self,
        req: u32,
        peer: &PeerRef,
        me: &NodeId,
    ) -> (FromRegistry, Option<(u32, FromRegistry)>) {
        let row = match peer {
            PeerRef::Id(id) => self.storage.node(id),
            PeerRef::Addr(a) => self.storage.node_by_address(*a),
            PeerRef::Name(n) => self.storage.node_by_name(n),
        };
        let row: NodeRow = match row {
            Ok(Some(r)) => r,
            Ok(None) => {
                return (
                    error(req, ErrorCode::NotFound, &format!("no node named {peer}")),
                    None,
                )
            }
            Err(e) => {
                warn!("storage: {e}");
                return (
                    error(req, ErrorCode::Internal, "registry storage failed"),
                    None,
                );
            }
        };
        let their_id = row.identity.node_id();
        // Endpoints are revealed only to nodes the peer approved.
        let approved = self.approved(&their_id, me);
        let mut endpoints = if approved { row.endpoints } else { vec![] };
        // The live session's address beats the stored one.
        if approved {
            if let Some(c) = self.online.get(&their_id).and_then(|i| self.conns.get(i)) {
                endpoints.retain(|e| *e != c.addr);
                endpoints.insert(0, c.addr);
                endpoints.truncate(messages::MAX_ENDPOINTS);
            }
        }
        let their_conn = self.online.get(&their_id).copied();
        let nat = their_conn
            .and_then(|i| self.conns.get(&i))
            .map_or(NatType::Unknown, |c| c.nat);
        // Punching needs both sides to send at once: tell the peer to probe
        // the asker now, if the peer approved it and both are online.
        let punch = match (
            approved,
            their_conn,
            self.online.get(me).and_then(|i| self.conns.get(i)),
        ) {
            (true, Some(their_index), Some(mine)) => {
                let mut eps = vec![mine.addr];
                if let Ok(Some(row)) = self.storage.node(me) {
                    for e in row.endpoints {
                        if !eps.contains(&e) && eps.len() < messages::MAX_ENDPOINTS {
                            eps.push(e);
                        }
                    }
                }
                Some((
                    their_index,
                    FromRegistry::Punch {
                        peer: *me,
                        endpoints: eps,
                        nat: mine.nat,
                    },
                ))
            }
            _ => None,
        };
        (
            FromRegistry::Peer {
                req,
                info: PeerInfo {
                    identity: row.identity,
                    address: row.address,
                    hostname: row.hostname,
                    endpoints,
                    nat,
                },
            },
            punch,
        )
    }

    /// Sends a node everything waiting in its inbox, if it is online.
    async fn deliver(&mut self, to: &NodeId) {
        let Some(&index) = self.online.get(to) else {
            return;
        };
        let items = match registrar::mail(&mut self.storage, to) {
            Ok(i) => i,
            Err(e) => {
                warn!("storage: {e}");
                return;
            }
        };
        if items.is_empty() {
            self.mail.remove(to);
            return;
        }
        for (id, item) in items {
            self.send(index, &FromRegistry::Push { id, item }).await;
        }
    }

    async fn send(&mut self, index: u32, msg: &FromRegistry) {
        let Some(conn) = self.conns.get(&index) else {
            return;
        };
        let bytes = match messages::encode(msg) {
            Ok(b) => b,
            Err(e) => {
                warn!("cannot encode reply: {e}");
                return;
            }
        };
        let mut out = vec![0u8; DATA_HEADER_LEN + bytes.len() + TAG_LEN];
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + bytes.len()].copy_from_slice(&bytes);
        let Ok(n) = conn.session.sender.seal(&mut out, bytes.len()) else {
            return;
        };
        let _ = self.socket.send_to(&out[..n], conn.addr).await;
    }

    async fn on_tick(&mut self, now: Instant) {
        // Sessions past their reject age, or silent as long, are gone; the
        // node rekeys well before either.
        self.conns.retain(|_, c| {
            now.saturating_duration_since(c.session.created) < REJECT_AFTER
                && now.saturating_duration_since(c.last_seen) < REJECT_AFTER
        });
        let conns = &self.conns;
        self.online.retain(|_, i| conns.contains_key(i));
        let online = &self.online;
        self.by_addr.retain(|_, n| online.contains_key(n));
        // Redeliver unacknowledged pushes (lost datagrams).
        let waiting: Vec<NodeId> = self
            .mail
            .iter()
            .filter(|id| self.online.contains_key(id))
            .copied()
            .collect();
        for id in waiting {
            self.deliver(&id).await;
        }
    }
}

fn error(req: u32, code: ErrorCode, message: &str) -> FromRegistry {
    FromRegistry::Error {
        req,
        code,
        message: message.to_string(),
    }
}
