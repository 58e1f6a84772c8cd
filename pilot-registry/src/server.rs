//! The socket loop: one UDP socket carries STUN, node control sessions
//! (Noise IK towards the registry key, then sealed control messages) and
//! relayed tunnel datagrams. The loop reads a batch of datagrams
//! ([`crate::batch`]: one call, GRO super-datagrams split at their stride),
//! hands each to the role it belongs to, and then sends what the roles
//! returned, relayed datagrams to one destination in one GSO call; it also
//! drains what the admission and storage threads finished, and ticks every
//! half second.
//!
//! ```text
//!            datagrams                          +--> STUN answer (inline)
//!   socket ------------> classify --------------+--> relay: forward (inline, no disk)
//!     ^                     |                   +--> control message: rendezvous / relay-only
//!     |                     | initiation                 |  replies        | jobs (bounded; full: "busy")
//!     |                     v                            v                 v
//!     |   [admission thread: Noise, timestamp]    seal + send      [storage thread: rules, SQLite]
//!     |        | new session + response                                    | done, committed
//!     +--------+------------------------------------------------------------+
//! ```
//! Nothing on this loop waits for a disk or does a Diffie-Hellman.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use pilot_proto::admission::{Admission, Refused};
use pilot_proto::messages::{ErrorCode, ToRegistry};
use pilot_proto::stun;
use pilot_proto::wire::{self, Kind};
use tokio::net::UdpSocket;
use tracing::debug;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::admission::{self, Admitted, Gate};
use crate::audit;
use crate::batch::{self, Batched, Plan, Step};
use crate::cluster::{Cluster, Event, Heard};
use crate::fleet::{CertOutcome, RevocationOutcome};
use crate::mailbox::Mailbox;
use crate::registrar::{RegisterOutcome, StatementOutcome};
use crate::relay::{Relay, Verdict};
use crate::relay_only::RelayOnly;
use crate::rendezvous::{Cx, Rendezvous};
use crate::sessions::{Reply, Sessions};
use crate::stats::{bump, Stats};
use crate::storage::Storage;
use crate::store::{self, Done, Store};
use crate::tcp;
use crate::view::View;
use pilot_proto::identity::NodeId;

/// What the registry is configured with.
pub struct Config {
    /// The registry's X25519 secret key (its identity; the join URL pins the
    /// public half).
    pub secret: [u8; 32],
    /// The overlay network addresses come from.
    pub network: Ipv4Net,
    /// Relay bandwidth each node may use, in bytes per second (0: no
    /// relaying).
    pub relay_rate: u32,
    /// Relay-only instances next to this registry, told to every node.
    pub relays: Vec<SocketAddr>,
    /// This instance only relays: it shares the registry's key and
    /// database, accepts the registration of known nodes (to learn their
    /// addresses) and forwards between nodes that approved each other.
    pub relay_only: bool,
}

/// Limits on what nodes may ask of the registry, with defaults
/// ([`Registry::with_limits`]).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Control messages per second per session (twice as many in a
    /// burst; 0: no limit). Pings are not counted.
    pub control_rate: u32,
    /// Bytes per second relayed for all nodes together (0: no relaying),
    /// next to [`Config::relay_rate`] per node.
    pub relay_total_rate: u32,
    /// A node id the registry does not know registers only with a valid
    /// join token (`--require-token`).
    pub require_token: bool,
    /// New node ids registered per source address and minute (a burst of
    /// as many; 0: no limit).
    pub new_nodes_per_minute: u32,
}

/// New node ids per source address and minute by default.
pub const DEFAULT_NEW_NODES_PER_MINUTE: u32 = 60;

/// The relay's budget for all nodes together by default: 1000 Mbit/s.
pub const DEFAULT_RELAY_TOTAL_MBPS: u32 = 1000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            control_rate: crate::sessions::DEFAULT_CONTROL_RATE,
            relay_total_rate: DEFAULT_RELAY_TOTAL_MBPS * 125_000,
            require_token: false,
            new_nodes_per_minute: DEFAULT_NEW_NODES_PER_MINUTE,
        }
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ZeroizeOnDrop for Config {}

/// The public key for a secret key.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    // Same derivation snow and the node use: the identity module.
    let mut bytes = zeroize::Zeroizing::new([0u8; 64]);
    bytes[32..].copy_from_slice(secret);
    pilot_proto::identity::Identity::from_bytes(&bytes).static_public()
}

/// The wall clock, as Unix seconds (0 if it is before 1970).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The rendezvous server.
pub struct Registry<S: Storage> {
    socket: UdpSocket,
    alt_stun: Option<UdpSocket>,
    tcp: Option<(tokio::net::TcpListener, tcp::Limits)>,
    config: Config,
    storage: S,
    stats: Arc<Stats>,
    view: Arc<View>,
    audit_dir: Option<std::path::PathBuf>,
    limits: Limits,
    cluster: Option<(Cluster, tokio::sync::mpsc::Receiver<Heard>)>,
}

/// Ticks (half seconds) between two counts of the registered nodes.
const CENSUS_EVERY: u32 = 4;

/// The role that answers control messages.
enum Role {
    Registry(Rendezvous),
    RelayOnly(RelayOnly),
}

/// Everything the loop owns besides its sockets.
struct Core {
    admission: Admission,
    gate: Gate,
    sessions: Sessions,
    relay: Relay,
    mailbox: Mailbox,
    role: Role,
    store: Store,
    stats: Arc<Stats>,
    audit: audit::Audit,
    view: Arc<View>,
    ticks: u32,
    /// This instance, when several share the database.
    cluster: Option<Cluster>,
    /// A path check a datagram asked for (sealed, with where it goes),
    /// sent before the datagram's own answer.
    check: Option<(Vec<u8>, SocketAddr)>,
}

impl<S: Storage + 'static> Registry<S> {
    /// A registry serving on an already-bound socket.
    pub fn new(socket: UdpSocket, config: Config, storage: S) -> Self {
        let view = View::new(
            config.network,
            config.relays.clone(),
            config.relay_only,
            socket.local_addr().ok(),
        );
        Registry {
            view: Arc::new(view),
            socket,
            alt_stun: None,
            tcp: None,
            config,
            storage,
            stats: Arc::new(Stats::default()),
            audit_dir: None,
            limits: Limits::default(),
            cluster: None,
        }
    }

    /// One of several instances on one database: `cluster` is this
    /// instance, `heard` what the others say ([`crate::cluster::listen`]).
    pub fn with_cluster(
        mut self,
        cluster: Cluster,
        heard: tokio::sync::mpsc::Receiver<Heard>,
    ) -> Self {
        self.cluster = Some((cluster, heard));
        self
    }

    /// Applies `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keeps the audit log ([`crate::audit`]) in `dir` (the state
    /// directory).
    pub fn with_audit(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.audit_dir = Some(dir.into());
        self
    }

    /// Also answers STUN on a second socket (another port), so nodes can
    /// tell whether their NAT maps per destination.
    pub fn with_alt_stun(mut self, socket: UdpSocket) -> Self {
        self.alt_stun = Some(socket);
        self
    }

    /// Also accepts nodes over TCP with TLS on `listener` (`--tcp-listen`,
    /// see [`crate::tcp`]), within `limits`.
    pub fn with_tcp(mut self, listener: tokio::net::TcpListener, limits: tcp::Limits) -> Self {
        self.tcp = Some((listener, limits));
        self
    }

    /// The counters (shared; keep a clone to read them while it runs).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// What the metrics and the status page see (shared, like
    /// [`Registry::stats`]).
    pub fn view(&self) -> Arc<View> {
        self.view.clone()
    }

    /// Serves until `shutdown` completes. On the way out the storage
    /// thread finishes the jobs already queued before this returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let Registry {
            socket,
            alt_stun,
            tcp,
            config,
            storage,
            stats,
            view,
            audit_dir,
            limits,
            cluster,
        } = self;
        let (cluster, mut heard) = match cluster {
            Some((c, h)) => (Some(c), Some(h)),
            None => (None, None),
        };
        let (sink, audit_thread) = match &audit_dir {
            Some(dir) => {
                let name = match config.relay_only {
                    true => audit::RELAY_LOG,
                    false => audit::REGISTRY_LOG,
                };
                let (sink, t) = audit::Sink::spawn(dir, name, &config.secret)?;
                (sink, Some(t))
            }
            None => (audit::Sink::off(), None),
        };
        let public = public_key(&config.secret);
        let tcp = match tcp {
            Some((listener, limits)) => {
                Some(tcp::spawn(listener, &config.secret, limits).map_err(std::io::Error::other)?)
            }
            None => None,
        };
        let admission = Admission::new(config.secret, &public);
        let (store, mut done, store_thread) = Store::spawn_joining(
            storage,
            config.network,
            store::DEFAULT_QUEUE_DEPTH,
            stats.clone(),
            crate::registrar::Joining::new(limits.require_token, limits.new_nodes_per_minute),
        )?;
        let (gate, mut admitted, gate_thread) = Gate::spawn(
            admission.keys().clone(),
            stats.clone(),
            admission::DEFAULT_QUEUE_DEPTH,
        )?;
        let role = if config.relay_only {
            Role::RelayOnly(RelayOnly::new(config.network.prefix_len()))
        } else {
            Role::Registry(Rendezvous::new(config.network, config.relays.clone()))
        };
        let mut core = Core {
            admission,
            gate,
            sessions: Sessions::new(limits.control_rate, crate::sessions::MAX_SESSIONS),
            relay: {
                let r = Relay::new(config.relay_rate).with_total(limits.relay_total_rate);
                match &cluster {
                    Some(c) => r.with_cluster(c.clone()),
                    None => r,
                }
            },
            mailbox: Mailbox::default(),
            role,
            store,
            stats,
            audit: audit::Audit::new(sink),
            view,
            ticks: 0,
            cluster,
            check: None,
        };
        let tcp_task = tcp.as_ref().map(|t| t.task.abort_handle());
        let result = serve(
            &socket,
            alt_stun,
            tcp,
            &mut core,
            &mut done,
            &mut admitted,
            &mut heard,
            shutdown,
        )
        .await;
        if let Some(t) = tcp_task {
            t.abort();
        }
        // Closing the queues ends both threads; the storage thread first
        // finishes what is queued (commits nobody will hear about are fine:
        // nothing was acknowledged).
        drop(core);
        drop(done);
        drop(admitted);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = store_thread.join();
            let _ = gate_thread.join();
            if let Some(t) = audit_thread {
                let _ = t.join();
            }
        })
        .await;
        result
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    socket: &UdpSocket,
    alt: Option<UdpSocket>,
    tcp: Option<tcp::TcpSide>,
    core: &mut Core,
    done: &mut tokio::sync::mpsc::Receiver<Done>,
    admitted: &mut tokio::sync::mpsc::Receiver<Admitted>,
    heard: &mut Option<tokio::sync::mpsc::Receiver<Heard>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let io = Batched::new(socket)?;
    let mut bufs = vec![vec![0u8; batch::RECV_BUF]; batch::RECV_BATCH];
    let mut metas = vec![quinn_udp::RecvMeta::default(); batch::RECV_BATCH];
    let mut plan = Plan::new(io.max_segments());
    let mut alt_buf = vec![0u8; 1500];
    let mut sealed = Vec::with_capacity(2048);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let alt_recv = async |b: &mut [u8]| match &alt {
        Some(s) => s.recv_from(b).await,
        None => std::future::pending().await,
    };
    // Datagrams from TCP-attached nodes come in beside the socket's, from
    // their marker addresses; what goes to a marker address goes back down
    // its connection.
    let (hub, mut tcp_in) = match tcp {
        Some(t) => (Some(t.hub), Some(t.incoming)),
        None => (None, None),
    };
    let out = Out {
        socket,
        io: &io,
        hub: hub.as_deref(),
    };
    loop {
        let replies = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = alt_recv(&mut alt_buf) => {
                if let (Ok((n, from)), Some(s)) = (r, &alt) {
                    let from = crate::batch::canonical(from);
                    if let Some(tid) = stun::parse_binding_request(&alt_buf[..n]) {
                        bump(&core.stats.stun);
                        let _ = s.send_to(&stun::binding_response(&tid, from), from).await;
                    }
                }
                continue;
            }
            r = io.recv(socket, &mut tcp_in, &mut bufs, &mut metas) => match r {
                Ok(n) => {
                    let now = Instant::now();
                    for (i, (buf, meta)) in bufs.iter_mut().zip(&metas).take(n).enumerate() {
                        core.on_received(i, &mut buf[..meta.len], meta.stride, meta.addr, now, &mut plan);
                    }
                    out.carry_out(&mut plan, &bufs, &core.sessions, &mut sealed).await;
                    continue;
                }
                // ICMP errors from earlier sends surface here; keep serving.
                Err(e) => {
                    debug!("recv: {e}");
                    continue;
                }
            },
            a = admitted.recv() => {
                let Some(Admitted { session, static_public, from, response }) = a else {
                    return Err(std::io::Error::other("the admission thread stopped"));
                };
                if core.sessions.install(session, static_public, from, Instant::now()) {
                    out.send_to(&response, from).await;
                }
                continue;
            }
            d = done.recv() => {
                let Some(d) = d else {
                    return Err(std::io::Error::other("the storage thread stopped"));
                };
                let now = Instant::now();
                if let Done::Approvals { approvals, located } = d {
                    for (to, bytes) in core.relay.learned(approvals, located, now, &core.sessions, &core.stats) {
                        out.send_to(&bytes, to).await;
                    }
                    continue;
                }
                if let Done::Census { count, nodes } = d {
                    core.view.census(count.ok(), nodes, &core.sessions);
                    continue;
                }
                core.on_done(d, now)
            }
            _ = tick.tick() => {
                core.on_tick(Instant::now());
                continue;
            }
            h = async {
                match heard.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(h) = h else {
                    // The listening thread ended: serve on without events.
                    *heard = None;
                    continue;
                };
                core.on_heard(h, Instant::now())
            }
        };
        out.seal_and_send(&replies, &core.sessions, &mut sealed)
            .await;
    }
}

/// The request id a message is answered under (an acknowledgement has
/// none).
fn request_id(msg: &ToRegistry) -> Option<u32> {
    match msg {
        ToRegistry::Register { req, .. }
        | ToRegistry::RegisterWithToken { req, .. }
        | ToRegistry::Lookup { req, .. }
        | ToRegistry::Statement { req, .. }
        | ToRegistry::Ping { req }
        | ToRegistry::PublishCert { req, .. }
        | ToRegistry::FindCerts { req, .. }
        | ToRegistry::PublishRevocation { req, .. }
        | ToRegistry::FindRevocations { req, .. }
        | ToRegistry::Succeed { req, .. } => Some(*req),
        ToRegistry::Ack { .. } | ToRegistry::PathConfirm { .. } => None,
    }
}

/// Where the loop's datagrams leave: the UDP socket, or the TCP
/// connection behind a marker address.
struct Out<'a> {
    socket: &'a UdpSocket,
    io: &'a Batched,
    hub: Option<&'a tcp::Hub>,
}

impl Out<'_> {
    async fn send_to(&self, bytes: &[u8], to: SocketAddr) {
        match self.hub {
            Some(hub) if tcp::is_marker(to) => hub.send(bytes, to),
            _ => {
                let _ = self.socket.send_to(bytes, to).await;
            }
        }
    }

    /// Seals each reply for its session and sends it.
    async fn seal_and_send(&self, replies: &[Reply], sessions: &Sessions, sealed: &mut Vec<u8>) {
        for r in replies {
            if let Some(to) = sessions.seal(r, sealed) {
                self.send_to(sealed, to).await;
            }
        }
    }

    /// Sends what a batch asked for, in order, and empties the plan.
    async fn carry_out(
        &self,
        plan: &mut Plan,
        bufs: &[Vec<u8>],
        sessions: &Sessions,
        sealed: &mut Vec<u8>,
    ) {
        for step in &plan.steps {
            match step {
                Step::Forward {
                    buf,
                    to,
                    start,
                    end,
                    segment,
                } => {
                    let bytes = &bufs[*buf][*start..*end];
                    if bytes.len() <= *segment || tcp::is_marker(*to) {
                        // One datagram (runs never form towards a marker).
                        self.send_to(bytes, *to).await;
                    } else {
                        let _ = self.io.send(self.socket, *to, bytes, *segment).await;
                    }
                }
                Step::Owned(bytes, to) => self.send_to(bytes, *to).await,
                Step::Replies(replies) => self.seal_and_send(replies, sessions, sealed).await,
            }
        }
        plan.clear();
    }
}

/// What the loop does with a datagram after its role looked at it.
enum Action {
    /// Send the (rewritten) datagram itself there.
    Send(SocketAddr),
    /// Send these bytes there.
    SendOwned(Vec<u8>, SocketAddr),
    /// Send the datagram without its first bytes there.
    SendTail(usize, SocketAddr),
    /// Seal and send these control replies.
    Reply(Vec<Reply>),
    /// Nothing to send.
    Nothing,
}

impl Core {
    /// A received buffer (buffer `index` of the batch): one datagram, or
    /// several of `stride` bytes (GRO), each handled as if it came alone;
    /// what they ask to send goes into `plan`.
    fn on_received(
        &mut self,
        index: usize,
        buf: &mut [u8],
        stride: usize,
        from: SocketAddr,
        now: Instant,
        plan: &mut Plan,
    ) {
        for range in batch::datagrams(buf.len(), stride) {
            let (start, end) = (range.start, range.end);
            let action = self.on_datagram(&mut buf[range], from, now);
            if let Some((bytes, to)) = self.check.take() {
                plan.steps.push(Step::Owned(bytes, to));
            }
            match action {
                Action::Send(to) => plan.forward(index, to, start, end),
                Action::SendTail(skip, to) => plan.forward(index, to, start + skip, end),
                Action::SendOwned(bytes, to) => plan.steps.push(Step::Owned(bytes, to)),
                Action::Reply(replies) => plan.steps.push(Step::Replies(replies)),
                Action::Nothing => {}
            }
        }
    }

    fn on_datagram(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) -> Action {
        match wire::classify(buf) {
            Kind::Stun => match stun::parse_binding_request(buf) {
                Some(tid) => {
                    bump(&self.stats.stun);
                    Action::SendOwned(stun::binding_response(&tid, from), from)
                }
                None => {
                    bump(&self.stats.dropped_malformed);
                    Action::Nothing
                }
            },
            Kind::RelayTo => {
                // Who and to whom, for the audit's per-minute counts (read
                // before the relay rewrites the header).
                let to = wire::RelayHeader::parse(buf).ok().map(|h| h.node);
                let sender = match self.sessions.node_at(&from) {
                    Some(n) => audit::From::Node(n),
                    None => audit::From::Addr(from.ip()),
                };
                let verdict = self.relay.on_datagram(
                    buf,
                    from,
                    now,
                    &self.sessions,
                    &self.store,
                    &self.stats,
                );
                let what = match verdict {
                    Verdict::Forward(_) | Verdict::ToInstance(..) => "admitted",
                    Verdict::Held => "held",
                    Verdict::Drop => "refused",
                };
                self.audit.count(audit::Key {
                    kind: "relay",
                    what,
                    from: sender,
                    to,
                });
                match verdict {
                    Verdict::Forward(to) => Action::Send(to),
                    Verdict::ToInstance(to, frame) => Action::SendOwned(frame, to),
                    Verdict::Held | Verdict::Drop => Action::Nothing,
                }
            }
            Kind::Instance => {
                // A relayed datagram another instance passes on to a node
                // attached here.
                let Some(c) = &self.cluster else {
                    bump(&self.stats.dropped_malformed);
                    return Action::Nothing;
                };
                let Some(to) = c.open_frame(buf, Cluster::now_ms()) else {
                    bump(&self.stats.relay_refused);
                    return Action::Nothing;
                };
                match self.sessions.online(&to) {
                    Some((_, conn)) => {
                        bump(&self.stats.relayed);
                        Action::SendTail(crate::cluster::FRAME_HEADER_LEN, conn.addr)
                    }
                    None => {
                        bump(&self.stats.relay_refused);
                        Action::Nothing
                    }
                }
            }
            Kind::HandshakeInit => {
                // The cheap steps here; the DH on the admission thread.
                match self.admission.precheck(buf, from.ip(), now) {
                    Ok(_) => {
                        self.gate.submit(buf, from, now, &self.stats);
                    }
                    Err(Refused::Malformed(_)) => bump(&self.stats.dropped_malformed),
                    Err(Refused::RateLimited) => bump(&self.stats.dropped_rate),
                    Err(_) => bump(&self.stats.dropped_handshake),
                }
                Action::Nothing
            }
            Kind::Data => {
                let Some(opened) = self.sessions.open(buf, from, now, &self.stats) else {
                    return Action::Nothing;
                };
                if let Some((to, token)) = opened.check {
                    let mut sealed = Vec::with_capacity(64);
                    if self.sessions.seal_check(opened.index, token, &mut sealed) {
                        self.check = Some((sealed, to));
                    }
                }
                if let Some(id) = opened.roamed {
                    // Where a node is matters to peers looking it up; a full
                    // queue loses this update until the node's next roam or
                    // registration.
                    if self
                        .store
                        .submit(store::Job::Observed { id, at: from })
                        .is_err()
                    {
                        bump(&self.stats.dropped_busy);
                    }
                }
                let Some(msg) = opened.msg else {
                    return Action::Nothing;
                };
                // Pings cost nothing but the answer (and carry NAT
                // keepalives); everything else counts against the budget.
                if !matches!(msg, ToRegistry::Ping { .. })
                    && !self.sessions.allow(opened.index, now)
                {
                    bump(&self.stats.control_limited);
                    return match request_id(&msg) {
                        Some(req) => Action::Reply(vec![Reply {
                            to: opened.index,
                            msg: crate::rendezvous::error(
                                req,
                                ErrorCode::Busy,
                                "too many control messages from this node; try again in a moment",
                            ),
                        }]),
                        None => Action::Nothing,
                    };
                }
                let (role, mut cx) = self.split(now);
                Action::Reply(match role {
                    Role::Registry(r) => r.on_message(opened.index, msg, from, &mut cx),
                    Role::RelayOnly(r) => r.on_message(opened.index, msg, from, &mut cx),
                })
            }
            Kind::HandshakeResp | Kind::CookieReply | Kind::RelayFrom | Kind::Unknown => {
                bump(&self.stats.dropped_malformed);
                Action::Nothing
            }
        }
    }

    fn on_done(&mut self, done: Done, now: Instant) -> Vec<Reply> {
        self.audit_done(&done);
        if let (
            Some(c),
            Done::Registered {
                id,
                outcome: Ok(RegisterOutcome::Ok { .. }),
                ..
            },
        ) = (&self.cluster, &done)
        {
            // Attached here now: the database and the other instances
            // hear it (a full queue: the next registration says it).
            let _ = self.store.submit(store::Job::Present {
                id: *id,
                instance: c.me,
            });
            if let Some(payload) = c.payload(&Event::Attached {
                node: *id,
                instance: c.me,
            }) {
                let _ = self.store.submit(store::Job::Notify { payload });
            }
        }
        let (role, mut cx) = self.split(now);
        match role {
            Role::Registry(r) => r.on_done(done, &mut cx),
            Role::RelayOnly(r) => r.on_done(done, &mut cx),
        }
    }

    /// What a committed job leaves in the audit log.
    fn audit_done(&mut self, done: &Done) {
        match done {
            Done::Registered { id, outcome, .. } => {
                let reason = match outcome {
                    Ok(RegisterOutcome::Ok { node, .. }) => {
                        self.audit
                            .registered(*id, node.address, node.hostname.clone());
                        return;
                    }
                    Ok(RegisterOutcome::BadSignature) => "bad-signature",
                    Ok(RegisterOutcome::Replayed) => "replayed",
                    Ok(RegisterOutcome::PoolExhausted) => "pool-exhausted",
                    Ok(RegisterOutcome::Retired) => "retired",
                    Ok(RegisterOutcome::NotAdmitted(_)) => "not-admitted",
                    Err(_) => return,
                };
                self.audit.count(audit::Key {
                    kind: "registration-refused",
                    what: reason,
                    from: audit::From::Node(*id),
                    to: None,
                });
            }
            Done::Stated {
                from,
                to,
                kind,
                statement,
                outcome: Ok(StatementOutcome::Stored(_)),
                ..
            } => self.audit.carried(*from, *to, kind, statement),
            Done::Succeeded {
                outcome: Ok(crate::registrar::SucceedOutcome::Moved { old, node }),
                ..
            } => self.audit.succeeded(*old, node),
            Done::CertPublished { from, outcome, .. } => match outcome {
                Ok(CertOutcome::Stored {
                    facts,
                    changed: true,
                }) => self.audit.cert_published(facts),
                Ok(CertOutcome::Refused(r)) => self.audit.count(audit::Key {
                    kind: "cert-refused",
                    what: r.reason(),
                    from: audit::From::Node(*from),
                    to: None,
                }),
                _ => {}
            },
            Done::RevocationPublished { from, outcome, .. } => match outcome {
                Ok(RevocationOutcome::Kept(facts)) => self.audit.revocation_kept(facts, *from),
                Ok(RevocationOutcome::Refused(r)) => self.audit.count(audit::Key {
                    kind: "revocation-refused",
                    what: r.reason(),
                    from: audit::From::Node(*from),
                    to: None,
                }),
                _ => {}
            },
            _ => {}
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.audit.tick();
        self.sessions.expire(now);
        if matches!(self.role, Role::Registry(_)) {
            self.mailbox.on_tick(&self.sessions, &self.store);
        }
        self.relay.on_tick(now, &self.store, &self.stats);
        self.view.tick(&self.sessions, self.relay.active_pairs());
        // Counting the nodes is the storage thread's work; when its queue
        // is full the count waits for the next round.
        if self.ticks % CENSUS_EVERY == 0 {
            let _ = self.store.submit(store::Job::Census {
                list: self.view.list(),
            });
        }
        self.ticks = self.ticks.wrapping_add(1);
    }

    /// What another instance said.
    fn on_heard(&mut self, heard: Heard, now: Instant) -> Vec<Reply> {
        match heard {
            Heard::Resync => {
                // Events may have been missed: read every online node's
                // mail, and ask storage where nodes are again.
                let online: Vec<NodeId> = self
                    .sessions
                    .registered()
                    .filter_map(|i| self.sessions.get(i).and_then(|c| c.node))
                    .collect();
                for id in online {
                    self.mailbox.note(id);
                }
                self.relay.forget_locations();
                vec![]
            }
            Heard::Event(Event::Mail { to }) => {
                if self.sessions.online(&to).is_some() {
                    self.mailbox.note(to);
                    self.mailbox.on_tick(&self.sessions, &self.store);
                }
                vec![]
            }
            Heard::Event(Event::Punch {
                to,
                from,
                nat,
                endpoints,
            }) => match self.sessions.online(&to) {
                Some((index, _)) => {
                    let mut endpoints = endpoints;
                    endpoints.truncate(pilot_proto::messages::MAX_ENDPOINTS);
                    vec![Reply {
                        to: index,
                        msg: pilot_proto::messages::FromRegistry::Punch {
                            peer: from,
                            endpoints,
                            nat,
                        },
                    }]
                }
                None => vec![],
            },
            Heard::Event(Event::Revoked { revocation }) => {
                let Some(bytes) = pilot_proto::hex::decode(&revocation) else {
                    return vec![];
                };
                let mut online: Vec<u32> = self.sessions.registered().collect();
                online.sort_unstable();
                online
                    .into_iter()
                    .map(|to| Reply {
                        to,
                        msg: pilot_proto::messages::FromRegistry::Revoked {
                            revocation: bytes.clone(),
                        },
                    })
                    .collect()
            }
            Heard::Event(Event::Attached { node, instance }) => {
                if self.sessions.detach(&node) {
                    debug!(%node, %instance, "node attached to another instance");
                }
                self.relay.locate(node, Some(instance), now);
                vec![]
            }
        }
    }

    /// The role and the state it may touch, borrowed apart.
    fn split(&mut self, now: Instant) -> (&mut Role, Cx<'_>) {
        (
            &mut self.role,
            Cx {
                sessions: &mut self.sessions,
                relay: &mut self.relay,
                mailbox: &mut self.mailbox,
                store: &self.store,
                stats: &self.stats,
                now,
                unix: unix_now(),
                cluster: self.cluster.as_ref(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{close_gate, gated, open_gate};
    use pilot_proto::frame;
    use pilot_proto::handshake::{self, MacKey};
    use pilot_proto::identity::{Identity, NodeId};
    use pilot_proto::messages::{
        self, FromRegistry, NatType, Registration, Signed, Statement, StatementKind, ToRegistry,
    };
    use pilot_proto::session::{CipherSuite, Session};
    use pilot_proto::wire::{RelayHeader, DATA_HEADER_LEN, MSG_RELAY_FROM, MSG_RELAY_TO};

    #[test]
    fn the_secret_key_is_wiped_when_dropped() {
        // Compile-time: the configuration and the admission keys holding
        // the registry's secret wipe it (reading freed memory would be UB).
        fn wiped<T: ZeroizeOnDrop>() {}
        wiped::<Config>();
        wiped::<pilot_proto::admission::ResponderKeys>();
    }

    /// A loop's state with no socket: nodes a and b on UDP addresses, c
    /// behind a TCP connection (a marker address), all approving each
    /// other; each node may relay `rate` bytes per second.
    fn core_with_three_nodes(rate: u32) -> (Core, [SocketAddr; 3]) {
        let secret = [7u8; 32];
        let network: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let stats = Arc::new(Stats::default());
        let admission = Admission::new(secret, &public_key(&secret));
        let (gate, _, _) = Gate::spawn(admission.keys().clone(), stats.clone(), 4).unwrap();
        let storage = crate::storage::SqliteStorage::in_memory().unwrap();
        let (store, _, _) = Store::spawn(storage, network, 16).unwrap();
        let mut core = Core {
            admission,
            gate,
            sessions: Sessions::default(),
            relay: Relay::new(rate),
            mailbox: Mailbox::default(),
            role: Role::Registry(Rendezvous::new(network, vec![])),
            store,
            stats,
            audit: audit::Audit::new(audit::Sink::off()),
            view: Arc::new(View::new(network, vec![], false, None)),
            ticks: 0,
            cluster: None,
            check: None,
        };
        let addrs = [
            SocketAddr::from(([203, 0, 113, 7], 5001)),
            SocketAddr::from(([203, 0, 113, 8], 5002)),
            tcp::marker(SocketAddr::from(([203, 0, 113, 9], 5003)), 1),
        ];
        let now = Instant::now();
        let ids: Vec<NodeId> = (1..=3u8)
            .map(|i| Identity::from_bytes(&[i; 64]).node_id())
            .collect();
        for (i, (id, at)) in ids.iter().zip(addrs).enumerate() {
            let index = i as u32 + 1;
            let (session, _) = crate::sessions::tests::pair(index, now);
            let key = Identity::from_bytes(&[index as u8; 64]).static_public();
            assert!(core.sessions.install(session, key, at, now));
            core.sessions.attach(index, *id, NatType::None);
            for other in &ids {
                core.relay.set(*id, *other, true, now);
            }
        }
        (core, addrs)
    }

    /// `count` relayed datagrams of `len` bytes to node `to`, end to end
    /// in one buffer as GRO delivers them.
    fn relayed(to: u8, count: usize, len: usize) -> Vec<u8> {
        let to = Identity::from_bytes(&[to; 64]).node_id();
        let mut buf = vec![0x55u8; count * len];
        for d in buf.chunks_mut(len) {
            RelayHeader {
                ty: MSG_RELAY_TO,
                node: to,
            }
            .emit(d);
        }
        buf
    }

    /// The batched path decides on every datagram as the one-by-one path
    /// did: a GRO buffer's datagrams become one run to their recipient, and
    /// in one batch a datagram from an address with no session is refused,
    /// one over its sender's budget is limited, datagrams to a node behind
    /// TCP go one by one down its connection, and a STUN request is
    /// answered.
    #[tokio::test]
    async fn a_batch_is_decided_datagram_by_datagram() {
        use std::sync::atomic::Ordering::Relaxed;
        // 1 MB/s each: a burst of a quarter MB.
        let (mut core, [a, b, c]) = core_with_three_nodes(1 << 20);
        let now = Instant::now();
        let mut plan = Plan::new(64);
        let mut run = relayed(2, 40, 1000);
        core.on_received(0, &mut run, 1000, a, now, &mut plan);
        assert_eq!(
            plan.steps,
            [Step::Forward {
                buf: 0,
                to: b,
                start: 0,
                end: 40_000,
                segment: 1000
            }]
        );
        let a_id = Identity::from_bytes(&[1; 64]).node_id();
        for d in run.chunks(1000) {
            let h = RelayHeader::parse(d).unwrap();
            assert_eq!((h.ty, h.node), (MSG_RELAY_FROM, a_id), "each names a");
        }
        assert_eq!(core.stats.relayed.load(Relaxed), 40);
        plan.clear();
        // b spends its budget on a.
        let mut spent = 0;
        while core.stats.relay_limited.load(Relaxed) == 0 {
            let mut d = relayed(1, 50, 1000);
            core.on_received(0, &mut d, 1000, b, now, &mut plan);
            spent += 1;
            assert!(spent < 10, "the budget holds a quarter MB");
        }
        plan.clear();
        let (relayed_before, limited_before, refused_before) = (
            core.stats.relayed.load(Relaxed),
            core.stats.relay_limited.load(Relaxed),
            core.stats.relay_refused.load(Relaxed),
        );

        let mut batch = [
            relayed(2, 1, 500), // from nowhere known
            relayed(1, 1, 500), // b, over its budget
            relayed(3, 2, 500), // a to c, behind TCP
            relayed(1, 1, 500), // c to a
            stun::binding_request(&[9; 12]).to_vec(),
        ];
        let from = [SocketAddr::from(([198, 51, 100, 1], 9)), b, a, c, a];
        for (i, (buf, from)) in batch.iter_mut().zip(from).enumerate() {
            let stride = buf.len().min(500);
            core.on_received(i, buf, stride, from, now, &mut plan);
        }
        assert_eq!(core.stats.relay_refused.load(Relaxed), refused_before + 1);
        assert_eq!(core.stats.relay_limited.load(Relaxed), limited_before + 1);
        assert_eq!(core.stats.relayed.load(Relaxed), relayed_before + 3);
        let forward = |buf, to, start| Step::Forward {
            buf,
            to,
            start,
            end: start + 500,
            segment: 500,
        };
        assert_eq!(
            plan.steps,
            [
                forward(2, c, 0),
                forward(2, c, 500),
                forward(3, a, 0),
                Step::Owned(stun::binding_response(&[9; 12], a), a),
            ]
        );

        // Carried out: the marker's datagrams go to the TCP side (which
        // has no connection open here, so it counts them dropped), the
        // rest to the socket.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let io = Batched::new(&socket).unwrap();
        let hub = tcp::Hub::default();
        let out = Out {
            socket: &socket,
            io: &io,
            hub: Some(&hub),
        };
        let bufs: Vec<Vec<u8>> = batch.iter().map(|b| b.to_vec()).collect();
        out.carry_out(&mut plan, &bufs, &core.sessions, &mut vec![])
            .await;
        assert_eq!(hub.dropped.load(Relaxed), 2);
        assert!(plan.steps.is_empty());
    }

    const WAIT: Duration = Duration::from_secs(2);

    /// A node's control side, by hand: a socket, an identity, a session.
    struct Client {
        sock: UdpSocket,
        id: Identity,
        session: Session,
        to: SocketAddr,
        req: u32,
    }

    impl Client {
        async fn connect(to: SocketAddr, key: &[u8; 32], n: u8) -> Client {
            let id = Identity::from_bytes(&[n; 64]);
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let (init, msg) = handshake::initiate(
                id.static_secret(),
                key,
                100 + u32::from(n),
                1,
                CipherSuite::Aes256Gcm,
            )
            .unwrap();
            sock.send_to(&msg, to).await.unwrap();
            let mut buf = [0u8; 256];
            let (len, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
                .await
                .expect("handshake answered")
                .unwrap();
            let resp = pilot_proto::wire::HandshakeResp::new_checked(&buf[..len]).unwrap();
            let session = init
                .finish(
                    &MacKey::for_static(&id.static_public()),
                    resp,
                    Instant::now(),
                )
                .unwrap();
            Client {
                sock,
                id,
                session,
                to,
                req: 0,
            }
        }

        async fn send(&mut self, make: impl FnOnce(u32) -> ToRegistry) -> u32 {
            self.req += 1;
            self.send_as(&make(self.req)).await;
            self.req
        }

        /// Sends `msg` as is (a resend keeps its request id).
        async fn send_as(&self, msg: &ToRegistry) {
            let bytes = messages::encode(msg).unwrap();
            let mut out = vec![];
            frame::push_sealed(&mut out, &self.session.sender, None, &bytes).unwrap();
            self.sock.send_to(&out, self.to).await.unwrap();
        }

        /// The next datagram, if it comes within `WAIT`.
        async fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 2048];
            let (n, _) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            buf.truncate(n);
            Some(buf)
        }

        /// Waits for the answer to request `req`, skipping pushes and the rest.
        async fn answer(&self, req: u32) -> Option<FromRegistry> {
            loop {
                let mut d = self.recv().await?;
                let Ok(n) = self.session.open(&mut d) else {
                    continue;
                };
                let msg: FromRegistry =
                    messages::decode(&d[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap();
                match &msg {
                    FromRegistry::Registered { req: r, .. }
                    | FromRegistry::Ok { req: r }
                    | FromRegistry::Error { req: r, .. }
                    | FromRegistry::Peer { req: r, .. }
                    | FromRegistry::Pong { req: r, .. }
                    | FromRegistry::Certs { req: r, .. }
                    | FromRegistry::Revocations { req: r, .. }
                        if *r == req =>
                    {
                        return Some(msg)
                    }
                    _ => continue,
                }
            }
        }

        /// The next message that answers no request (a push), if one
        /// comes within `WAIT`.
        async fn unsolicited(&self) -> Option<FromRegistry> {
            loop {
                let mut d = self.recv().await?;
                let Ok(n) = self.session.open(&mut d) else {
                    continue;
                };
                let msg: FromRegistry =
                    messages::decode(&d[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap();
                if let FromRegistry::Revoked { .. }
                | FromRegistry::Push { .. }
                | FromRegistry::Punch { .. } = msg
                {
                    return Some(msg);
                }
            }
        }

        /// Sends a registration; returns its request id.
        async fn register(&mut self, seq: u64) -> u32 {
            let reg = Signed::sign(
                Registration {
                    identity: self.id.public(),
                    hostname: None,
                    seq,
                    local_endpoints: vec![],
                    nat: NatType::PerDestination,
                },
                &self.id,
            );
            self.send(|req| ToRegistry::Register { req, reg }).await
        }

        async fn approve(&mut self, peer: NodeId) {
            let statement = Signed::sign(
                Statement {
                    kind: StatementKind::Approve,
                    from: self.id.public(),
                    to: peer,
                    seq: 1,
                },
                &self.id,
            );
            let req = self
                .send(|req| ToRegistry::Statement { req, statement })
                .await;
            assert_eq!(self.answer(req).await, Some(FromRegistry::Ok { req }));
        }
    }

    /// The claim of the split: with the storage thread stuck in a write,
    /// the loop still answers STUN and relays between approved nodes, and
    /// the stuck request is answered once its write commits.
    #[tokio::test]
    async fn stun_and_relay_do_not_wait_for_a_stuck_disk() {
        let (storage, gate) = gated();
        open_gate(&gate);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let secret = [7u8; 32];
        let registry = Registry::new(
            socket,
            Config {
                secret,
                network: "10.77.0.0/16".parse().unwrap(),
                relay_rate: 10_000_000,
                relays: vec![],
                relay_only: false,
            },
            storage,
        );
        let stats = registry.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(registry.run(async {
            let _ = stopped.await;
        }));
        let key = public_key(&secret);
        let mut a = Client::connect(addr, &key, 1).await;
        let mut b = Client::connect(addr, &key, 2).await;
        for c in [&mut a, &mut b] {
            let req = c.register(1).await;
            assert!(matches!(
                c.answer(req).await,
                Some(FromRegistry::Registered { .. })
            ));
        }
        let (a_id, b_id) = (a.id.node_id(), b.id.node_id());
        a.approve(b_id).await;
        b.approve(a_id).await;

        // The disk gets stuck: a's re-registration waits in its write.
        close_gate(&gate);
        let stuck = a.register(2).await;

        // STUN is answered.
        let prober = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tid = [9u8; 12];
        prober
            .send_to(&stun::binding_request(&tid), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 128];
        let (n, _) = tokio::time::timeout(WAIT, prober.recv_from(&mut buf))
            .await
            .expect("STUN answered while storage is stuck")
            .unwrap();
        assert_eq!(
            stun::parse_binding_response(&buf[..n], &tid),
            Some(prober.local_addr().unwrap())
        );
        // a -> b through the relay is forwarded, ciphertext untouched.
        let mut d = vec![0u8; pilot_proto::wire::RELAY_HEADER_LEN + 6];
        RelayHeader {
            ty: MSG_RELAY_TO,
            node: b_id,
        }
        .emit(&mut d);
        d[pilot_proto::wire::RELAY_HEADER_LEN..].copy_from_slice(b"opaque");
        a.sock.send_to(&d, addr).await.unwrap();
        let got = loop {
            let got = b.recv().await.expect("relayed while storage is stuck");
            if got[0] == MSG_RELAY_FROM {
                break got;
            }
        };
        assert_eq!(
            RelayHeader::parse(&got).unwrap(),
            RelayHeader {
                ty: MSG_RELAY_FROM,
                node: a_id
            }
        );
        assert_eq!(&got[pilot_proto::wire::RELAY_HEADER_LEN..], b"opaque");
        // The stuck request has no answer yet; it gets one after the commit.
        assert_eq!(
            a.answer(stuck).await,
            None,
            "acknowledged before the commit"
        );
        open_gate(&gate);
        assert!(matches!(
            a.answer(stuck).await,
            Some(FromRegistry::Registered { .. })
        ));
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(stats.relayed.load(Relaxed), 1);
        assert_eq!(stats.handshakes.load(Relaxed), 2);
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    /// A joined node floods lookups: past its budget they are answered
    /// "busy" at once (nothing reaches storage) and counted; its pings
    /// are still answered, and another node is not slowed.
    #[tokio::test]
    async fn a_session_flooding_control_messages_is_limited() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let secret = [7u8; 32];
        let registry = Registry::new(
            socket,
            Config {
                secret,
                network: "10.77.0.0/16".parse().unwrap(),
                relay_rate: 10_000_000,
                relays: vec![],
                relay_only: false,
            },
            crate::storage::SqliteStorage::in_memory().unwrap(),
        )
        .with_limits(Limits {
            control_rate: 5,
            ..Limits::default()
        });
        let stats = registry.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(registry.run(async {
            let _ = stopped.await;
        }));
        let key = public_key(&secret);
        let mut a = Client::connect(addr, &key, 1).await;
        let mut b = Client::connect(addr, &key, 2).await;
        for c in [&mut a, &mut b] {
            let req = c.register(1).await;
            assert!(matches!(
                c.answer(req).await,
                Some(FromRegistry::Registered { .. })
            ));
        }
        let peer = messages::PeerRef::Id(b.id.node_id());
        let mut reqs = vec![];
        for _ in 0..30 {
            let peer = peer.clone();
            reqs.push(a.send(|req| ToRegistry::Lookup { req, peer }).await);
        }
        // Answers come in any order (the refusals at once, the lookups
        // after storage): collect them all.
        let (mut found, mut limited) = (0, 0);
        let mut answered = std::collections::BTreeSet::new();
        while answered.len() < reqs.len() {
            let mut d = a.recv().await.expect("every request answered");
            let Ok(n) = a.session.open(&mut d) else {
                continue;
            };
            match messages::decode(&d[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap() {
                FromRegistry::Peer { req, .. } => {
                    found += 1;
                    answered.insert(req);
                }
                FromRegistry::Error {
                    req,
                    code: messages::ErrorCode::Busy,
                    message,
                } if message.contains("too many control messages") => {
                    limited += 1;
                    answered.insert(req);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(answered, reqs.iter().copied().collect());
        // The registration took one of the burst of 10.
        assert!((9..=11).contains(&found), "{found} found");
        assert_eq!(found + limited, 30);
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(stats.control_limited.load(Relaxed), limited as u64);
        let req = a.send(|req| ToRegistry::Ping { req }).await;
        assert!(matches!(
            a.answer(req).await,
            Some(FromRegistry::Pong { .. })
        ));
        let peer = messages::PeerRef::Id(a.id.node_id());
        let req = b.send(|req| ToRegistry::Lookup { req, peer }).await;
        assert!(matches!(
            b.answer(req).await,
            Some(FromRegistry::Peer { .. })
        ));
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    /// Issue 10, finding 10, as a node sees it: its request is answered
    /// late (a slow disk), it resends with the same request id and
    /// sequence number after 700 ms, and the answer to one copy is lost.
    /// Every copy of what was stored is acknowledged as stored, the
    /// statement is delivered once, and a different message under the same
    /// sequence number is still a replay.
    #[tokio::test]
    async fn a_resend_of_what_was_stored_is_acknowledged() {
        let (storage, gate) = gated();
        open_gate(&gate);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let secret = [7u8; 32];
        let registry = Registry::new(
            socket,
            Config {
                secret,
                network: "10.77.0.0/16".parse().unwrap(),
                relay_rate: 10_000_000,
                relays: vec![],
                relay_only: false,
            },
            storage,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(registry.run(async {
            let _ = stopped.await;
        }));
        let key = public_key(&secret);
        let mut a = Client::connect(addr, &key, 1).await;
        let mut b = Client::connect(addr, &key, 2).await;
        let reg_req = a.register(1).await;
        let Some(registered @ FromRegistry::Registered { .. }) = a.answer(reg_req).await else {
            panic!("a registers")
        };
        let req = b.register(1).await;
        assert!(matches!(
            b.answer(req).await,
            Some(FromRegistry::Registered { .. })
        ));

        // The disk is slow: a's statement gets no answer for a while.
        close_gate(&gate);
        let statement = Signed::sign(
            Statement {
                kind: StatementKind::Approve,
                from: a.id.public(),
                to: b.id.node_id(),
                seq: 2,
            },
            &a.id,
        );
        let msg = ToRegistry::Statement {
            req: 50,
            statement: statement.clone(),
        };
        a.send_as(&msg).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.send_as(&msg).await; // the node's resend, while the first waits
        open_gate(&gate);
        assert_eq!(a.answer(50).await, Some(FromRegistry::Ok { req: 50 }));
        // The answer to the last copy is lost: the node sends it again.
        a.send_as(&msg).await;
        assert_eq!(
            a.answer(50).await,
            Some(FromRegistry::Ok { req: 50 }),
            "a resend of the stored statement is not a replay"
        );
        // A different statement under the same sequence number is.
        let mut other = statement.clone();
        other.body.kind = StatementKind::Revoke;
        let other = Signed::sign(other.body, &a.id);
        a.send_as(&ToRegistry::Statement {
            req: 51,
            statement: other,
        })
        .await;
        assert!(matches!(
            a.answer(51).await,
            Some(FromRegistry::Error {
                code: messages::ErrorCode::Replayed,
                ..
            })
        ));
        // The same for a registration whose answer was lost.
        let reg = Signed::sign(
            Registration {
                identity: a.id.public(),
                hostname: None,
                seq: 1,
                local_endpoints: vec![],
                nat: NatType::PerDestination,
            },
            &a.id,
        );
        a.send_as(&ToRegistry::Register { req: reg_req, reg }).await;
        assert_eq!(a.answer(reg_req).await, Some(registered));

        // b was pushed the statement under one push id only: pushes are
        // resent until acknowledged, so b acknowledges the first, and for
        // three mailbox ticks nothing else comes.
        let mut pushes = std::collections::BTreeSet::new();
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let Ok(Some(mut d)) = tokio::time::timeout(WAIT, b.recv()).await else {
                break;
            };
            let Ok(n) = b.session.open(&mut d) else {
                continue;
            };
            let msg: FromRegistry =
                messages::decode(&d[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap();
            if let FromRegistry::Push {
                id,
                item: messages::PushItem::Statement { statement: s, .. },
            } = msg
            {
                assert_eq!(s, statement);
                if pushes.insert(id) {
                    b.send_as(&ToRegistry::Ack { push: id }).await;
                }
            }
        }
        assert_eq!(pushes.len(), 1, "delivered once: {pushes:?}");
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    /// Fleet trust over the real socket: a node publishes its own owner
    /// certificate and no one else's, a forged certificate or revocation is
    /// refused, a genuine revocation reaches every connected node as
    /// `Revoked`, and the audit log records what was kept and refused.
    #[tokio::test]
    async fn certificates_and_revocations_over_the_wire_with_their_audit() {
        use pilot_proto::cert::{parse_tags, Certificate, OwnerKey, Revocation};
        let dir = tempfile::tempdir().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let secret = [7u8; 32];
        let registry = Registry::new(
            socket,
            Config {
                secret,
                network: "10.77.0.0/16".parse().unwrap(),
                relay_rate: 10_000_000,
                relays: vec![],
                relay_only: false,
            },
            crate::storage::SqliteStorage::in_memory().unwrap(),
        )
        .with_audit(dir.path());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(registry.run(async {
            let _ = stopped.await;
        }));
        let key = public_key(&secret);
        let mut a = Client::connect(addr, &key, 1).await;
        let mut b = Client::connect(addr, &key, 2).await;
        let mut c = Client::connect(addr, &key, 3).await;
        for n in [&mut a, &mut b, &mut c] {
            let req = n.register(1).await;
            assert!(matches!(
                n.answer(req).await,
                Some(FromRegistry::Registered { .. })
            ));
        }
        let owner = OwnerKey::from_secret(&[5; 32]);
        let now = unix_now();
        let issue = |node: NodeId, tags: &str| {
            Certificate::issue(&owner, node, parse_tags(tags).unwrap(), now, 3600).unwrap()
        };
        let a_cert = issue(a.id.node_id(), "build").to_bytes();
        let invalid = |m: Option<FromRegistry>| match m {
            Some(FromRegistry::Error {
                code: messages::ErrorCode::Invalid,
                message,
                ..
            }) => message,
            other => panic!("expected a refusal: {other:?}"),
        };

        let req = a
            .send(|req| ToRegistry::PublishCert {
                req,
                cert: a_cert.clone(),
            })
            .await;
        assert_eq!(a.answer(req).await, Some(FromRegistry::Ok { req }));
        // b hands in a's certificate; c a forged one of its own.
        let cert = a_cert.clone();
        let req = b.send(|req| ToRegistry::PublishCert { req, cert }).await;
        assert!(invalid(b.answer(req).await).contains("only its own"));
        let mut forged = issue(c.id.node_id(), "build");
        forged.body.tags = parse_tags("admin").unwrap();
        let cert = forged.to_bytes();
        let req = c.send(|req| ToRegistry::PublishCert { req, cert }).await;
        assert!(invalid(c.answer(req).await).contains("signature"));
        // b finds a, and only a.
        let find = |req| ToRegistry::FindCerts {
            req,
            owner: owner.public(),
            tag: "build".parse().unwrap(),
            after: None,
        };
        let req = b.send(find).await;
        assert_eq!(
            b.answer(req).await,
            Some(FromRegistry::Certs {
                req,
                certs: vec![a_cert.clone()],
                more: false
            })
        );

        // c hands in a revocation of a: first forged, then genuine.
        let mut bad = Revocation::sign(&OwnerKey::from_secret(&[6; 32]), a.id.node_id(), now);
        bad.body.owner = owner.public();
        let revocation = bad.to_bytes();
        let req = c
            .send(|req| ToRegistry::PublishRevocation { req, revocation })
            .await;
        assert!(invalid(c.answer(req).await).contains("not its owner's"));
        let rev = Revocation::sign(&owner, a.id.node_id(), now).to_bytes();
        let revocation = rev.clone();
        let req = c
            .send(|req| ToRegistry::PublishRevocation { req, revocation })
            .await;
        assert_eq!(c.answer(req).await, Some(FromRegistry::Ok { req }));
        let told = Some(FromRegistry::Revoked {
            revocation: rev.clone(),
        });
        assert_eq!(a.unsolicited().await, told, "the revoked node too");
        assert_eq!(b.unsolicited().await, told);
        let req = b.send(find).await;
        assert_eq!(
            b.answer(req).await,
            Some(FromRegistry::Certs {
                req,
                certs: vec![],
                more: false
            })
        );

        let _ = stop.send(());
        task.await.unwrap().unwrap();
        let log = crate::audit::REGISTRY_LOG;
        let out =
            pilot_audit::read::verify(dir.path(), log, &[crate::audit::public_key(&secret)], None)
                .unwrap();
        out.result.expect("the audit chain verifies");
        let (entries, _) = pilot_audit::read::entries(dir.path(), log).unwrap();
        let of = |kind: &str| -> Vec<serde_json::Value> {
            entries
                .iter()
                .filter(|e| e.entry.kind == kind)
                .map(|e| e.entry.details.clone())
                .collect()
        };
        let hash = |b: &[u8]| pilot_proto::hex::encode(&crate::fleet::sha256(b));
        let published = of("cert-published");
        assert_eq!(published.len(), 1, "{published:?}");
        assert_eq!(published[0]["holder"], a.id.node_id().to_string());
        assert_eq!(published[0]["owner"], owner.public().to_string());
        assert_eq!(published[0]["tags"], serde_json::json!(["build"]));
        assert_eq!(published[0]["expires_at"], now + 3600);
        assert_eq!(published[0]["cert"], hash(&a_cert));
        let mut reasons: Vec<String> = of("cert-refused")
            .iter()
            .map(|d| d["reason"].as_str().unwrap().to_string())
            .collect();
        reasons.sort();
        assert_eq!(reasons, ["bad-signature", "other-node"]);
        let kept = of("revocation-kept");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0]["node"], a.id.node_id().to_string());
        assert_eq!(kept[0]["by"], c.id.node_id().to_string());
        assert_eq!(kept[0]["revocation"], hash(&rev));
        let refused = of("revocation-refused");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0]["reason"], "bad-signature");
        assert_eq!(refused[0]["from"], c.id.node_id().to_string());
        assert_eq!(of("revocation-refused-count")[0]["count"], 1);
    }
}
