//! The tunnels part of the control state: every trusted peer's state machine
//! ([`pilot_proto::peer::Peer`]), handshake admission, and the schedule of
//! when each machine is due. It feeds the machines what arrives
//! (handshakes, punches, lookups, in-tunnel control, the data plane's
//! activity), applies what they produce to the shared peer table, and hands
//! back the I/O to do as [`Effects`]. Owned by the control task; no I/O and
//! no `.await` here.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pilot_proto::admission::{Admission, Refused, LOAD_THRESHOLD};
use pilot_proto::cookie::{CookieBinding, MAX_BINDING};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::NatType;
use pilot_proto::path::Path;
use pilot_proto::peer::{Activity, Env, Event, Peer};
use pilot_proto::pmtu;
use pilot_proto::session::CipherSuite;
use pilot_proto::trust::TrustRecord;
use pilot_proto::wire::{self, DATA_OVERHEAD, MSG_DATA, MSG_HANDSHAKE_INIT};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::context::{random_u64, Context};
use crate::pathmtu::PeerPmtu;
use crate::peers::{bump, PeerData};
use crate::tun::Tun;

/// A datagram to send.
pub struct Outgoing {
    /// The tunnel datagram.
    pub bytes: Vec<u8>,
    /// Where it goes: straight, or through the relay to `peer`.
    pub to: Path,
    /// The peer it is for (names the relay's destination).
    pub peer: NodeId,
    /// Send it with this IP TTL, not the socket's (NAT traversal: a probe
    /// that must die at or just past our own NAT).
    pub hop_limit: Option<u8>,
}

/// The I/O that driving the machines asks for, done by the control task.
#[derive(Default)]
pub struct Effects {
    /// Datagrams to send.
    pub out: Vec<Outgoing>,
    /// Peers to look up at the registry.
    pub lookups: Vec<NodeId>,
    /// Direct endpoints that worked (kept in the trust store).
    pub worked: Vec<(NodeId, SocketAddr)>,
    /// Timestamps of initiations accepted, kept in the trust store before
    /// the answers go out, so a restart cannot make one replayable.
    pub init_timestamps: Vec<(NodeId, u64)>,
    /// Peers with which a handshake succeeded: their tunnel key is theirs
    /// (kept in the trust store).
    pub proven: Vec<NodeId>,
    /// Initiations refused, for the audit log's per-minute counts.
    pub refused: Vec<Refusal>,
}

impl Effects {
    /// Adds another batch.
    pub fn extend(&mut self, other: Effects) {
        self.out.extend(other.out);
        self.lookups.extend(other.lookups);
        self.worked.extend(other.worked);
        self.init_timestamps.extend(other.init_timestamps);
        self.proven.extend(other.proven);
        self.refused.extend(other.refused);
    }

    /// Nothing to do but record a refused initiation.
    fn refusal(reason: RefusalReason, source: HandshakeSource) -> Self {
        Effects {
            refused: vec![Refusal { reason, source }],
            ..Effects::default()
        }
    }
}

/// The control side's state of one trusted peer.
pub struct PeerRuntime {
    /// Shared with the table.
    pub data: Arc<PeerData>,
    /// Its tunnel's state machine (handshakes, sessions, path, timers).
    pub machine: Peer,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Path MTU discovery towards it.
    pub pmtu: PeerPmtu,
}

impl PeerRuntime {
    /// A freshly trusted peer.
    pub fn new(data: Arc<PeerData>, machine: Peer) -> Self {
        PeerRuntime {
            data,
            machine,
            last_handshake: None,
            pmtu: PeerPmtu::default(),
        }
    }
}

/// The node as the machines see it.
struct NodeEnv<'a, T: Tun> {
    ctx: &'a Context<T>,
}

impl<T: Tun> Env for NodeEnv<'_, T> {
    fn static_secret(&self) -> &[u8; 32] {
        self.ctx.identity.static_secret()
    }
    fn suite(&self) -> CipherSuite {
        self.ctx.cfg.suite
    }
    fn fresh_index(&mut self) -> u32 {
        self.ctx.fresh_index()
    }
    fn next_timestamp(&mut self) -> u64 {
        self.ctx.next_timestamp()
    }
    fn jitter(&mut self) -> Duration {
        Duration::from_millis(random_u64() % 334)
    }
}

/// Whose handshake bucket an initiation takes from: its source address,
/// or, for one the relay carried, the node the relay names. Every relayed
/// initiation arrives from the relay's address; keyed by that, one node
/// flooding through the relay would use up every other relayed peer's
/// share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandshakeSource {
    /// Straight from this address.
    Addr(IpAddr),
    /// Through the relay, from this node.
    Relayed(NodeId),
}

impl CookieBinding for HandshakeSource {
    /// A direct initiation's cookie is bound to its source address; a
    /// relayed one's to the sending node the relay names (the relay is the
    /// registry's, the one every relayed datagram comes through).
    fn binding(&self, out: &mut [u8; MAX_BINDING]) -> usize {
        match self {
            HandshakeSource::Addr(ip) => ip.binding(out),
            HandshakeSource::Relayed(node) => {
                out[0] = b'r';
                out[1..17].copy_from_slice(&node.0);
                17
            }
        }
    }
}

impl HandshakeSource {
    /// The source of an initiation that came over `via` (from
    /// `relayed_from` if the relay carried it; `relay` is the relay's
    /// address, for a relayed one that names no node).
    pub fn of(via: Path, relayed_from: Option<NodeId>, relay: IpAddr) -> Self {
        match (relayed_from, via) {
            (Some(n), _) => HandshakeSource::Relayed(n),
            (None, Path::Direct(a)) => HandshakeSource::Addr(a.ip()),
            (None, Path::Relay) => HandshakeSource::Addr(relay),
        }
    }
}

/// Why a handshake initiation was refused (for the audit log's counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// A valid initiation from a key this node does not trust.
    UntrustedKey,
    /// A bad MAC, a failed Noise read, a replayed timestamp.
    BadHandshake,
    /// Over the per-source rate limit.
    RateLimited,
    /// Under load: answered with a cookie instead.
    CookieSent,
}

impl RefusalReason {
    /// The word in the log.
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::UntrustedKey => "untrusted-key",
            RefusalReason::BadHandshake => "bad-handshake",
            RefusalReason::RateLimited => "rate-limited",
            RefusalReason::CookieSent => "cookie-sent",
        }
    }
}

/// A refused initiation: why, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// From where (an address, or the node the relay named).
    pub source: HandshakeSource,
}

/// Every trusted peer's tunnel.
pub struct Tunnels {
    peers: HashMap<NodeId, PeerRuntime>,
    by_static: HashMap<[u8; 32], NodeId>,
    admission: Admission<HandshakeSource>,
    pings: HashMap<u64, oneshot::Sender<Instant>>,
    /// When each machine is due, earliest first.
    schedule: BTreeSet<(Instant, NodeId)>,
    due: HashMap<NodeId, Instant>,
}

impl Tunnels {
    /// No peers yet; initiations to the owner of `secret` are admitted
    /// with the default per-source rate limit, and need a cookie while
    /// more than [`LOAD_THRESHOLD`] a second arrive.
    pub fn new(secret: [u8; 32], static_public: &[u8; 32]) -> Self {
        Tunnels {
            peers: HashMap::new(),
            by_static: HashMap::new(),
            admission: Admission::new(secret, static_public).with_cookies(LOAD_THRESHOLD),
            pings: HashMap::new(),
            schedule: BTreeSet::new(),
            due: HashMap::new(),
        }
    }
}

impl Tunnels {
    /// The peers, for `status` and `peers`.
    pub fn peers(&self) -> &HashMap<NodeId, PeerRuntime> {
        &self.peers
    }

    /// True if `id` is a trusted peer.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.peers.contains_key(id)
    }

    /// The earliest instant a machine is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.schedule.first().map(|(t, _)| *t)
    }

    /// Adds a trusted peer to the control state and the data plane's table.
    /// A peer whose address or tunnel key another peer already has is not
    /// added (the trust store refuses such records; this holds even for a
    /// store written by an older version).
    pub fn add_peer<T: Tun>(&mut self, ctx: &Context<T>, id: NodeId, rec: &TrustRecord) {
        if self.peers.contains_key(&id) {
            return;
        }
        let (address, static_public) = (rec.address, rec.identity.static_public);
        let mut table = ctx.shared.table.write();
        let addr_holder = table.by_addr.get(&address).map(|d| d.id);
        let key_holder = self.by_static.get(&static_public).copied();
        if let Some(holder) = addr_holder.or(key_holder) {
            warn!(peer = %id, %holder, %address, "not connecting: another trusted peer has its address or tunnel key");
            return;
        }
        let data = Arc::new(PeerData::new(id, address, ctx.timing.reject_after));
        table.by_addr.insert(address, data.clone());
        drop(table);
        self.by_static.insert(static_public, id);
        let last = outside_overlay(ctx, rec.last_endpoint.into_iter().collect());
        let mut machine = Peer::with_timing(id, static_public, last.first().copied(), ctx.timing);
        machine.restore_last_init_timestamp(rec.last_init_timestamp);
        // Who keeps first when punching fails (see pilot_proto::path): both
        // sides compare the same two ids.
        machine.set_lead(ctx.identity.node_id() < id);
        self.peers.insert(id, PeerRuntime::new(data, machine));
    }

    /// Removes a peer from the data plane at once: its sessions and its
    /// address.
    pub fn remove_peer<T: Tun>(&mut self, ctx: &Context<T>, id: &NodeId) {
        if let Some(mut rt) = self.peers.remove(id) {
            let mut table = ctx.shared.table.write();
            table.by_addr.remove(&rt.data.address);
            for i in rt.machine.session_indexes() {
                table.by_index.remove(&i);
            }
            drop(table);
            rt.machine.close();
            rt.data.clear_session();
            self.by_static.remove(rt.machine.static_public());
        }
        if let Some(t) = self.due.remove(id) {
            self.schedule.remove(&(t, *id));
        }
    }

    /// Syncs a peer's machine with the data plane, runs `f` on it, then
    /// applies what it produced to the data plane's table, reschedules it,
    /// and returns the I/O to do.
    pub fn drive<T: Tun, R>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        now: Instant,
        f: impl FnOnce(&mut Peer, &mut dyn Env) -> R,
    ) -> (Option<R>, Effects) {
        let mut fx = Effects::default();
        let Some(rt) = self.peers.get_mut(id) else {
            return (None, fx);
        };
        let shared = &ctx.shared;
        let d = &rt.data;
        rt.machine.handle_activity(
            now,
            Activity {
                last_rx: shared.instant_of(d.last_rx_ms.load(Ordering::Relaxed)),
                last_tx: shared.instant_of(d.last_tx_ms.load(Ordering::Relaxed)),
                last_data_rx: shared.instant_of(d.last_data_rx_ms.load(Ordering::Relaxed)),
                endpoint: d.endpoint(),
                current: d.current_index(),
            },
        );
        let r = f(&mut rt.machine, &mut NodeEnv { ctx });
        while let Some(t) = rt.machine.poll_transmit() {
            if t.bytes.first() == Some(&MSG_HANDSHAKE_INIT) {
                bump(&shared.totals.handshakes_started);
            }
            if t.bytes.first() == Some(&MSG_DATA) {
                let inner_len = t.bytes.len().saturating_sub(DATA_OVERHEAD);
                rt.data
                    .tx_bytes
                    .fetch_add(inner_len as u64, Ordering::Relaxed);
                // Packets that waited for the session (keepalives carry none).
                if inner_len > 0 {
                    rt.data.tx_packets.fetch_add(1, Ordering::Relaxed);
                    shared.totals.sent(inner_len, t.to == Path::Relay);
                }
            }
            fx.out.push(Outgoing {
                bytes: t.bytes,
                to: t.to,
                peer: *id,
                hop_limit: t.hop_limit,
            });
        }
        while let Some(e) = rt.machine.poll_event() {
            match e {
                Event::Install { session, current } => {
                    shared
                        .table
                        .write()
                        .by_index
                        .insert(session.local_index, (rt.data.clone(), session.clone()));
                    if current {
                        rt.data.promote(&session);
                    }
                }
                Event::Retire { local_index } => {
                    let gone = shared.table.write().by_index.remove(&local_index);
                    if let Some((_, s)) = gone {
                        rt.data.clear_if(&s);
                    }
                }
                Event::ClearCurrent => rt.data.clear_session(),
                Event::UsePath(p) => shared.totals.path_changed(rt.data.force_endpoint(p)),
                Event::OfferPath(p) => shared.totals.path_changed(rt.data.set_endpoint(p)),
                Event::Established { path, initiator } => {
                    rt.last_handshake = Some(SystemTime::now());
                    // Our own handshake just completed: its round trip is
                    // the machine's RTT now.
                    let t = &shared.totals;
                    if initiator {
                        bump(&t.handshakes_completed_initiator);
                        if let Some(rtt) = rt.machine.rtt() {
                            t.rtt.0.observe_duration(rtt);
                        }
                    } else {
                        bump(&t.handshakes_completed_responder);
                    }
                    fx.proven.push(*id);
                    if initiator {
                        info!(peer = %id, path = %path, "session established");
                    } else {
                        debug!(peer = %id, path = %path, "handshake answered");
                    }
                }
                Event::DirectWorked(a) => fx.worked.push((*id, a)),
                Event::NeedLookup => fx.lookups.push(*id),
                Event::RelayFallback(reason) => {
                    info!(peer = %id, reason = reason.text(), "no direct path; using the relay");
                }
                Event::GaveUp => debug!(peer = %id, "peer unreachable; gave up for now"),
                Event::Pong { nonce } => {
                    if let Some(tx) = self.pings.remove(&nonce) {
                        let _ = tx.send(now);
                    }
                }
            }
        }
        // Path MTU discovery follows the session and path the machine left.
        for t in crate::pathmtu::on_tick(ctx, &mut rt.pmtu, &rt.data, now) {
            fx.out.push(Outgoing {
                bytes: t.bytes,
                to: t.to,
                peer: *id,
                hop_limit: t.hop_limit,
            });
        }
        // Data after a quiet spell wakes the machine (it schedules no sync
        // while nothing moves).
        rt.data
            .wake
            .store(rt.machine.wants_data_wake(), Ordering::Relaxed);
        let next = match (rt.machine.poll_timeout(), rt.pmtu.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(t) = self.due.remove(id) {
            self.schedule.remove(&(t, *id));
        }
        if let Some(t) = next {
            self.due.insert(*id, t);
            self.schedule.insert((t, *id));
        }
        (Some(r), fx)
    }

    /// Runs every machine that is due at `now`.
    pub fn on_timeout<T: Tun>(&mut self, ctx: &Context<T>, now: Instant) -> Effects {
        let mut fx = Effects::default();
        // Bounded: each machine runs once per call.
        let due: Vec<NodeId> = self
            .schedule
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect();
        for id in due {
            let (_, f) = self.drive(ctx, &id, now, |p, env| p.handle_timeout(now, env));
            fx.extend(f);
        }
        fx
    }

    /// Data moved for a peer that asked to be woken by it.
    pub fn on_wake<T: Tun>(&mut self, ctx: &Context<T>, id: &NodeId, now: Instant) -> Effects {
        self.drive(ctx, id, now, |_, _| ()).1
    }

    /// A packet for a trusted peer found no session.
    pub fn on_need_session<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        pkt: Vec<u8>,
        now: Instant,
    ) -> Effects {
        self.drive(ctx, id, now, |p, env| p.handle_outbound(now, pkt, env))
            .1
    }

    /// An authenticated in-tunnel control message.
    pub fn on_control<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        msg: &[u8],
        now: Instant,
    ) -> Effects {
        // Path MTU probes and their answers (crate::pathmtu).
        if let Some(rt) = self.peers.get_mut(id) {
            let pmtu_out = match (msg.first(), msg.len()) {
                (Some(&pmtu::CTL_PROBE), _) => Some(
                    crate::pathmtu::answer_probe(&rt.data, msg, now)
                        .into_iter()
                        .collect(),
                ),
                (Some(&pmtu::CTL_PROBE_ACK), pmtu::ACK_LEN) => pmtu::parse_ack(msg)
                    .map(|len| crate::pathmtu::on_ack(&mut rt.pmtu, &rt.data, len, now)),
                _ => None,
            };
            if let Some(out) = pmtu_out {
                let out: Vec<pilot_proto::peer::Transmit> = out;
                let mut fx = Effects::default();
                fx.out.extend(out.into_iter().map(|t| Outgoing {
                    bytes: t.bytes,
                    to: t.to,
                    peer: *id,
                    hop_limit: t.hop_limit,
                }));
                return fx;
            }
        }
        let (known, fx) = self.drive(ctx, id, now, |p, _| p.handle_control(now, msg));
        if known == Some(false) {
            bump(&ctx.shared.drops.malformed);
        }
        fx
    }

    /// Sends an in-tunnel echo; `reply` gets the instant the answer came.
    /// Returns None (and drops `reply`) if the peer is not trusted.
    pub fn ping<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        reply: oneshot::Sender<Instant>,
        now: Instant,
    ) -> Option<Effects> {
        if !self.peers.contains_key(id) {
            return None;
        }
        // Forget echoes whose asker stopped waiting.
        self.pings.retain(|_, tx| !tx.is_closed());
        let nonce = random_u64();
        self.pings.insert(nonce, reply);
        Some(
            self.drive(ctx, id, now, |p, env| p.send_ping(now, nonce, env))
                .1,
        )
    }

    /// Records an RTT measured by a ping.
    pub fn set_rtt(&mut self, id: &NodeId, rtt: Duration) {
        if let Some(rt) = self.peers.get_mut(id) {
            rt.machine.set_rtt(rtt);
        }
    }

    /// The registry's answer to a lookup.
    pub fn on_lookup<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        answer: Option<(Vec<SocketAddr>, NatType)>,
        now: Instant,
    ) -> Effects {
        let local = *ctx.nat.lock();
        let answer = answer.map(|(e, nat)| (outside_overlay(ctx, e), nat));
        self.drive(ctx, id, now, |p, env| {
            p.handle_lookup(now, answer, local, env)
        })
        .1
    }

    /// The registry says `id` is probing us now: probe back.
    pub fn on_punch<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        id: &NodeId,
        endpoints: Vec<SocketAddr>,
        nat: NatType,
        now: Instant,
    ) -> Effects {
        let local = *ctx.nat.lock();
        let endpoints = outside_overlay(ctx, endpoints);
        self.drive(ctx, id, now, |p, env| {
            p.handle_punch(now, endpoints, nat, local, env)
        })
        .1
    }

    /// Connects a peer (or all of them) that has no session: from the
    /// endpoints known, and by asking the registry.
    pub fn reconnect<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        only: Option<&NodeId>,
        now: Instant,
    ) -> Effects {
        let ids: Vec<NodeId> = match only {
            Some(id) => vec![*id],
            None => self.peers.keys().copied().collect(),
        };
        let mut fx = Effects::default();
        for id in ids {
            fx.extend(self.drive(ctx, &id, now, |p, env| p.reconnect(now, env)).1);
        }
        fx
    }

    /// An initiation, direct from `via` or relayed from `relayed_from`.
    pub fn on_init<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        buf: &[u8],
        via: Path,
        relayed_from: Option<NodeId>,
        now: Instant,
    ) -> Effects {
        let drops = &ctx.shared.drops;
        let source = HandshakeSource::of(via, relayed_from, ctx.shared.relay_addr().ip());
        // The one admission path (shared with the registry): shape, the
        // cheap MAC before any Diffie-Hellman, the per-source rate limit,
        // then Noise.
        let resp = match self.admission.screen(buf, source, now) {
            Ok(s) => s.into_responder(),
            Err(Refused::Malformed(_)) => {
                bump(&drops.malformed);
                return Effects::default();
            }
            Err(Refused::RateLimited) => {
                bump(&drops.rate_limited);
                return Effects::refusal(RefusalReason::RateLimited, source);
            }
            Err(Refused::Cookie(reply)) => {
                // Under load: the cookie goes back where the initiation
                // came from, and that is all it costs us.
                bump(&drops.cookie_sent);
                let mut fx = Effects::refusal(RefusalReason::CookieSent, source);
                let out = match (via, relayed_from) {
                    (Path::Direct(_), _) => Outgoing {
                        bytes: reply.to_vec(),
                        to: via,
                        peer: NodeId([0; 16]),
                        hop_limit: None,
                    },
                    (Path::Relay, Some(node)) => Outgoing {
                        bytes: reply.to_vec(),
                        to: Path::Relay,
                        peer: node,
                        hop_limit: None,
                    },
                    (Path::Relay, None) => return fx,
                };
                fx.out.push(out);
                return fx;
            }
            Err(_) => {
                bump(&drops.bad_handshake);
                return Effects::refusal(RefusalReason::BadHandshake, source);
            }
        };
        // Only the local trust store decides: an unknown or untrusted key
        // gets no answer at all.
        let Some(id) = self.by_static.get(resp.remote_static()).copied() else {
            bump(&drops.untrusted_handshake);
            debug!(?via, "handshake from an untrusted key ignored");
            return Effects::refusal(RefusalReason::UntrustedKey, source);
        };
        if relayed_from.is_some_and(|r| r != id) {
            bump(&drops.bad_handshake);
            return Effects::refusal(RefusalReason::BadHandshake, source);
        }
        let index = ctx.fresh_index();
        let (r, mut fx) = self.drive(ctx, &id, now, |p, _| {
            p.handle_init(now, resp, via, index)
                .map(|()| p.last_init_timestamp())
        });
        match r {
            Some(Ok(ts)) => fx.init_timestamps.push((id, ts)),
            Some(Err(e)) => {
                debug!(peer = %id, "initiation refused: {e}");
                bump(&drops.bad_handshake);
                fx.refused.push(Refusal {
                    reason: RefusalReason::BadHandshake,
                    source,
                });
            }
            None => {}
        }
        fx
    }

    /// A cookie reply to one of our initiations: that peer is under load.
    pub fn on_cookie<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        buf: &[u8],
        via: Path,
        now: Instant,
    ) -> Effects {
        let Ok(reply) = wire::CookieReply::new_checked(buf) else {
            bump(&ctx.shared.drops.malformed);
            return Effects::default();
        };
        let found = self
            .peers
            .iter()
            .find(|(_, rt)| rt.machine.owns_initiation(reply.receiver_index()))
            .map(|(id, _)| *id);
        let Some(id) = found else {
            bump(&ctx.shared.drops.bad_handshake);
            return Effects::default();
        };
        let (r, fx) = self.drive(ctx, &id, now, |p, _| p.handle_cookie(now, buf, via));
        if let Some(Err(e)) = r {
            debug!(peer = %id, "cookie reply refused: {e}");
            bump(&ctx.shared.drops.bad_handshake);
        }
        fx
    }

    /// A response to one of our initiations (registry link responses are
    /// handled before this).
    pub fn on_resp<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        resp: wire::HandshakeResp<'_>,
        via: Path,
        now: Instant,
    ) -> Effects {
        let found = self
            .peers
            .iter()
            .find(|(_, rt)| rt.machine.owns_initiation(resp.receiver_index()))
            .map(|(id, _)| *id);
        let Some(id) = found else {
            bump(&ctx.shared.drops.bad_handshake);
            return Effects::default();
        };
        let own_mac = &ctx.own_mac;
        let (r, fx) = self.drive(ctx, &id, now, |p, _| p.handle_resp(now, own_mac, resp, via));
        if let Some(Err(e)) = r {
            debug!(peer = %id, "handshake response refused: {e}");
            bump(&ctx.shared.drops.bad_handshake);
        }
        fx
    }
}

/// Drops candidate endpoints inside our overlay (a tunnel sent there would
/// be routed into the tunnel device itself), in the overlay's IPv6 /48,
/// and IPv6 ones when our socket is IPv4 only (it cannot send there).
fn outside_overlay<T: Tun>(ctx: &Context<T>, mut endpoints: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let net = ctx.shared.network();
    let ula = ctx.shared.ula();
    let v6 = ctx.shared.udp.is_ipv6();
    endpoints.retain(|e| match e.ip() {
        IpAddr::V4(ip) => !net.is_some_and(|n| n.contains(&ip)),
        IpAddr::V6(ip) => v6 && !ula.as_ref().is_some_and(|u| u.contains(&ip)),
    });
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_initiations_take_from_their_senders_bucket() {
        let relay: IpAddr = "192.0.2.1".parse().unwrap();
        let (m, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let of = |n| HandshakeSource::of(Path::Relay, Some(n), relay);
        assert_ne!(of(m), of(b));
        let direct = |a: &str| HandshakeSource::of(Path::Direct(a.parse().unwrap()), None, relay);
        assert_eq!(direct("198.51.100.7:1000"), direct("198.51.100.7:2000"));
        // M floods through the relay: its bucket runs dry, B's does not.
        let mut limiter = pilot_proto::ratelimit::RateLimiter::new(
            pilot_proto::admission::HANDSHAKE_RATE,
            pilot_proto::admission::HANDSHAKE_BURST,
        );
        let now = Instant::now();
        let allowed = (0..100).filter(|_| limiter.allow(&of(m), now)).count();
        assert_eq!(allowed, 5, "the burst, then nothing");
        assert!(
            limiter.allow(&of(b), now),
            "another relayed peer still gets through"
        );
    }
}
