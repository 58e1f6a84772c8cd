//! The control side of tunnels: handshakes (direct or through the relay),
//! path choice, timers, NAT detection, registry pushes and hole punching,
//! and in-tunnel pings. Runs off the packet path, one item at a time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pilot_proto::handshake;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{FromRegistry, NatType, PeerRef, PushItem, ToRegistry};
use pilot_proto::path::{Path, PathAction, RelayReason};
use pilot_proto::pmtu;
use pilot_proto::session::Session;
use pilot_proto::stun;
use pilot_proto::timers::{TimerAction, REJECT_AFTER};
use pilot_proto::wire::{
    self, Kind, RelayHeader, DATA_HEADER_LEN, MSG_RELAY_TO, RELAY_HEADER_LEN, TAG_LEN,
};
use tracing::{debug, info, warn};

use crate::node::{Brain, Inner, Slow};
use crate::peers::{bump, Endpoint, PeerRuntime};
use crate::tun::Tun;

/// In-tunnel control: an echo request (8-byte nonce follows).
pub const CTL_PING: u8 = 0x01;
/// In-tunnel control: an echo reply.
pub const CTL_PONG: u8 = 0x02;

/// Initiations kept in flight per peer (direct probe and relay may race).
const MAX_INITIATORS: usize = 8;

/// A datagram the control side sends.
pub struct Outgoing {
    /// The tunnel datagram.
    pub bytes: Vec<u8>,
    /// Where it goes.
    pub to: Target,
}

/// Where an [`Outgoing`] goes.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Straight to an address.
    Addr(SocketAddr),
    /// Through the relay, to this node.
    Relay(NodeId),
}

pub(crate) fn target(id: NodeId, ep: Endpoint) -> Target {
    match ep {
        Endpoint::Direct(a) => Target::Addr(a),
        Endpoint::Relay => Target::Relay(id),
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// How a handshake is sent.
enum Via {
    Direct(Vec<SocketAddr>),
    Relay,
}

impl<T: Tun> Inner<T> {
    /// Sends the control side's datagrams.
    pub(crate) async fn send_all(&self, out: Vec<Outgoing>) {
        for o in out {
            match o.to {
                Target::Addr(a) => {
                    let _ = self.udp.send_to(&o.bytes, a).await;
                }
                Target::Relay(id) => {
                    let mut buf = vec![0u8; RELAY_HEADER_LEN + o.bytes.len()];
                    RelayHeader {
                        ty: MSG_RELAY_TO,
                        node: id,
                    }
                    .emit(&mut buf);
                    buf[RELAY_HEADER_LEN..].copy_from_slice(&o.bytes);
                    let _ = self.udp.send_to(&buf, self.relay_addr()).await;
                }
            }
        }
    }

    /// Sends one initiation, straight to some endpoints or via the relay.
    fn start_handshake(
        &self,
        brain: &mut Brain,
        id: &NodeId,
        via: Via,
        now: Instant,
    ) -> Vec<Outgoing> {
        let index = self.fresh_index();
        let ts = Self::next_timestamp(brain);
        let Some(rt) = brain.peers.get_mut(id) else {
            return vec![];
        };
        let Ok((init, msg)) = handshake::initiate(
            self.identity.static_secret(),
            &rt.static_public,
            index,
            ts,
            self.cfg.suite,
        ) else {
            return vec![];
        };
        let jitter = Duration::from_millis(random_u64() % 334);
        rt.timers.on_handshake_sent(now, jitter);
        rt.timers.on_sent(now);
        let (kind, out): (Endpoint, Vec<Outgoing>) = match via {
            Via::Direct(dests) => {
                if dests.is_empty() {
                    return vec![];
                }
                let first = dests[0];
                (
                    Endpoint::Direct(first),
                    dests
                        .into_iter()
                        .map(|d| Outgoing {
                            bytes: msg.to_vec(),
                            to: Target::Addr(d),
                        })
                        .collect(),
                )
            }
            Via::Relay => (
                Endpoint::Relay,
                vec![Outgoing {
                    bytes: msg.to_vec(),
                    to: Target::Relay(*id),
                }],
            ),
        };
        if rt.initiators.len() >= MAX_INITIATORS {
            rt.initiators.remove(0);
        }
        rt.initiators.push((init, kind, now));
        out
    }

    /// Starts a handshake on the path the peer's path state chooses.
    pub(crate) fn connect(&self, brain: &mut Brain, id: &NodeId, now: Instant) -> Vec<Outgoing> {
        let Some(rt) = brain.peers.get_mut(id) else {
            return vec![];
        };
        let via = match rt.path.selected() {
            Some(Path::Direct(_)) => Via::Direct(rt.destinations()),
            Some(Path::Relay) => Via::Relay,
            None => match rt.path.start(now) {
                PathAction::ProbeDirect(c) => {
                    let mut d = rt.destinations();
                    for e in c {
                        if !d.contains(&e) {
                            d.push(e);
                        }
                    }
                    Via::Direct(d)
                }
                PathAction::UseRelay(reason) => {
                    rt.path.on_relay(reason);
                    rt.data.force_endpoint(Endpoint::Relay);
                    Via::Relay
                }
                PathAction::Idle => return vec![],
            },
        };
        self.start_handshake(brain, id, via, now)
    }

    /// Seals queued packets (or a keepalive) for a peer with a session.
    fn drain_queue(rt: &mut PeerRuntime, session: &Session, keepalive: bool) -> Vec<Outgoing> {
        let Some(ep) = rt.data.endpoint() else {
            return vec![];
        };
        let to = target(rt.data.id, ep);
        let mut pkts: Vec<Vec<u8>> = rt.queue.drain(..).collect();
        if pkts.is_empty() && keepalive {
            pkts.push(vec![]);
        }
        let mut out = vec![];
        for p in pkts {
            let mut buf = vec![0u8; DATA_HEADER_LEN + p.len() + TAG_LEN];
            buf[DATA_HEADER_LEN..DATA_HEADER_LEN + p.len()].copy_from_slice(&p);
            if let Ok(n) = session.sender.seal(&mut buf, p.len()) {
                buf.truncate(n);
                rt.data
                    .tx_bytes
                    .fetch_add(p.len() as u64, Ordering::Relaxed);
                out.push(Outgoing { bytes: buf, to });
            }
        }
        out
    }

    /// Installs a new session for a peer, reached over `ep`.
    fn install(
        &self,
        brain: &mut Brain,
        id: &NodeId,
        session: Session,
        ep: Endpoint,
        now: Instant,
    ) -> Option<Arc<Session>> {
        let rt = brain.peers.get_mut(id)?;
        let session = Arc::new(session);
        let initiator = session.initiator;
        self.table
            .write()
            .by_index
            .insert(session.local_index, (rt.data.clone(), session.clone()));
        rt.sessions.push(session.clone());
        // The initiator knows the responder has the keys; the responder waits
        // for the first packet on the new session before switching to it,
        // unless it has nothing else.
        if initiator || !rt.data.has_session() {
            rt.data.promote(&session);
        }
        match ep {
            Endpoint::Direct(a) => {
                rt.path.on_direct(a);
                rt.data.force_endpoint(ep);
            }
            Endpoint::Relay => {
                let reason = rt.path.relay_reason().unwrap_or(if initiator {
                    RelayReason::NoDirectAnswer
                } else {
                    RelayReason::PeerRelayed
                });
                rt.path.on_relay(reason);
                if rt.path.selected() == Some(Path::Relay) {
                    rt.data.force_endpoint(ep);
                } else {
                    rt.data.set_endpoint(ep);
                }
            }
        }
        rt.timers.on_session(now, initiator);
        rt.last_handshake = Some(SystemTime::now());
        if let Endpoint::Direct(a) = ep {
            if brain.trust.set_endpoint(id, a) {
                if let Err(e) = self.cfg.state.save_trust(&brain.trust) {
                    warn!("cannot save trust store: {e}");
                }
            }
        }
        Some(session)
    }

    /// Handles one item for the control side.
    pub(crate) async fn on_slow(self: &Arc<Self>, item: Slow) {
        let now = Instant::now();
        match item {
            Slow::NeedSession(id, pkt) => {
                let out = {
                    let mut brain = self.brain.lock();
                    let Some(rt) = brain.peers.get_mut(&id) else {
                        return;
                    };
                    rt.enqueue(pkt);
                    if rt.timers.handshake_in_flight() {
                        return;
                    }
                    if rt.destinations().is_empty() && rt.path.selected().is_none() {
                        // Nothing known yet: ask the registry first (its
                        // answer also carries the peer's NAT type); the
                        // lookup handshakes when it returns.
                        if !rt.lookup_in_flight {
                            spawn_lookup_locked(self, &mut brain, id);
                        }
                        return;
                    }
                    self.connect(&mut brain, &id, now)
                };
                self.send_all(out).await;
            }
            Slow::Datagram(mut buf, from) => match wire::classify(&buf) {
                Kind::HandshakeInit => self.on_init(&buf, Endpoint::Direct(from), None, now).await,
                Kind::HandshakeResp => self.on_resp(&buf, Endpoint::Direct(from), now).await,
                Kind::Data => {
                    let index = wire::DataHeader::parse(&buf).map(|h| h.receiver_index).ok();
                    let relay = self.relay_link.read().clone();
                    let msg = match (index, relay) {
                        (Some(i), Some(r)) if r.session_index_is(i) => r.on_data(&mut buf),
                        _ => self.link.on_data(&mut buf),
                    };
                    if let Some(msg) = msg {
                        self.on_registry_message(msg).await;
                    }
                }
                Kind::Stun => {
                    if buf.len() >= 20 {
                        let tid: [u8; 12] = buf[8..20].try_into().unwrap_or_default();
                        if let Some(addr) = stun::parse_binding_response(&buf, &tid) {
                            if let Some(tx) = self.stun_pending.lock().remove(&tid) {
                                let _ = tx.send(addr);
                            }
                        }
                    }
                }
                _ => bump(&self.drops.malformed),
            },
            Slow::Relayed(src, buf) => match wire::classify(&buf) {
                Kind::HandshakeInit => self.on_init(&buf, Endpoint::Relay, Some(src), now).await,
                Kind::HandshakeResp => self.on_resp(&buf, Endpoint::Relay, now).await,
                _ => bump(&self.drops.malformed),
            },
            Slow::Control(id, msg) => self.on_tunnel_control(id, &msg, now).await,
        }
    }

    async fn on_tunnel_control(self: &Arc<Self>, id: NodeId, msg: &[u8], now: Instant) {
        match (msg.first(), msg.len()) {
            (Some(&CTL_PING), 9) => {
                let out = {
                    let mut brain = self.brain.lock();
                    let Some(rt) = brain.peers.get_mut(&id) else {
                        return;
                    };
                    let Some(s) = rt.data.current(now) else {
                        return;
                    };
                    let mut pong = msg.to_vec();
                    pong[0] = CTL_PONG;
                    rt.queue.push_front(pong);
                    let mut out = Self::drain_queue(rt, &s, false);
                    // Only the pong: leave other queued packets in order.
                    out.truncate(out.len().min(1));
                    out
                };
                self.send_all(out).await;
            }
            (Some(&CTL_PONG), 9) => {
                let nonce = u64::from_le_bytes(msg[1..9].try_into().unwrap_or_default());
                if let Some(tx) = self.pings.lock().remove(&nonce) {
                    let _ = tx.send(now);
                }
            }
            // Path MTU probes (crate::pathmtu): answer a probe with its
            // length; an answer to ours moves our search on.
            (Some(&pmtu::CTL_PROBE), _) => {
                let out = {
                    let brain = self.brain.lock();
                    let Some(rt) = brain.peers.get(&id) else {
                        return;
                    };
                    crate::pathmtu::answer_probe(rt, msg, now)
                };
                self.send_all(out.into_iter().collect()).await;
            }
            (Some(&pmtu::CTL_PROBE_ACK), pmtu::ACK_LEN) => {
                let Some(len) = pmtu::parse_ack(msg) else {
                    return;
                };
                let out = {
                    let mut brain = self.brain.lock();
                    let Some(rt) = brain.peers.get_mut(&id) else {
                        return;
                    };
                    crate::pathmtu::on_ack(rt, len, now)
                };
                self.send_all(out).await;
            }
            _ => bump(&self.drops.malformed),
        }
    }

    /// Measures one round trip through the tunnel to a trusted peer.
    pub(crate) async fn ping(self: &Arc<Self>, id: NodeId, timeout: Duration) -> Option<Duration> {
        let nonce = random_u64();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pings.lock().insert(nonce, tx);
        let mut msg = vec![CTL_PING];
        msg.extend_from_slice(&nonce.to_le_bytes());
        let sent = Instant::now();
        let out = {
            let mut brain = self.brain.lock();
            let now = Instant::now();
            match brain.peers.get_mut(&id) {
                Some(rt) => match rt.data.current(now) {
                    Some(s) => {
                        rt.queue.push_front(msg);
                        let mut out = Self::drain_queue(rt, &s, false);
                        out.truncate(1);
                        out
                    }
                    None => {
                        rt.enqueue(msg);
                        if rt.timers.handshake_in_flight() {
                            vec![]
                        } else {
                            self.connect(&mut brain, &id, now)
                        }
                    }
                },
                None => vec![],
            }
        };
        self.send_all(out).await;
        let r = tokio::time::timeout(timeout, rx).await;
        self.pings.lock().remove(&nonce);
        match r {
            Ok(Ok(t)) => {
                let rtt = t.saturating_duration_since(sent);
                if let Some(rt) = self.brain.lock().peers.get_mut(&id) {
                    rt.rtt_us = Some(rtt.as_micros() as u64);
                }
                Some(rtt)
            }
            _ => None,
        }
    }

    async fn on_init(
        self: &Arc<Self>,
        buf: &[u8],
        ep: Endpoint,
        relayed_from: Option<NodeId>,
        now: Instant,
    ) {
        let Ok(init) = wire::HandshakeInit::new_checked(buf) else {
            bump(&self.drops.malformed);
            return;
        };
        if !self.own_mac.verify(init.mac_covered(), init.mac()) {
            bump(&self.drops.bad_handshake);
            return;
        }
        let limit_key = match ep {
            Endpoint::Direct(a) => a.ip(),
            Endpoint::Relay => self.link.join.addr.ip(),
        };
        if !self.brain.lock().limiter.allow(&limit_key, now) {
            bump(&self.drops.rate_limited);
            return;
        }
        let resp = match handshake::respond(self.identity.static_secret(), &self.own_mac, init) {
            Ok(r) => r,
            Err(_) => {
                bump(&self.drops.bad_handshake);
                return;
            }
        };
        let index = self.fresh_index();
        let out = {
            let mut brain = self.brain.lock();
            // Only the local trust store decides: an unknown or untrusted key
            // gets no answer at all.
            let Some(id) = brain.by_static.get(resp.remote_static()).copied() else {
                bump(&self.drops.untrusted_handshake);
                debug!(?ep, "handshake from an untrusted key ignored");
                return;
            };
            if relayed_from.is_some_and(|r| r != id) {
                bump(&self.drops.bad_handshake);
                return;
            }
            let Some(rt) = brain.peers.get_mut(&id) else {
                return;
            };
            if resp.timestamp() <= rt.last_init_timestamp {
                bump(&self.drops.bad_handshake);
                return;
            }
            rt.last_init_timestamp = resp.timestamp();
            let Ok((session, msg)) = resp.accept(index, now) else {
                bump(&self.drops.bad_handshake);
                return;
            };
            if self.install(&mut brain, &id, session, ep, now).is_none() {
                return;
            }
            debug!(peer = %id, ?ep, "handshake answered");
            vec![Outgoing {
                bytes: msg.to_vec(),
                to: target(id, ep),
            }]
        };
        self.send_all(out).await;
    }

    async fn on_resp(self: &Arc<Self>, buf: &[u8], ep: Endpoint, now: Instant) {
        let Ok(resp) = wire::HandshakeResp::new_checked(buf) else {
            bump(&self.drops.malformed);
            return;
        };
        if ep != Endpoint::Relay {
            if self.link.on_handshake_response(&self.own_mac, resp, now) {
                return;
            }
            let relay = self.relay_link.read().clone();
            if relay.is_some_and(|r| r.on_handshake_response(&self.own_mac, resp, now)) {
                return;
            }
        }
        let out = {
            let mut brain = self.brain.lock();
            let found = brain.peers.iter().find_map(|(id, rt)| {
                rt.initiators
                    .iter()
                    .position(|(i, _, _)| i.local_index() == resp.receiver_index())
                    .map(|p| (*id, p))
            });
            let Some((id, pos)) = found else {
                bump(&self.drops.bad_handshake);
                return;
            };
            let Some(rt) = brain.peers.get_mut(&id) else {
                return;
            };
            let (init, _, sent) = rt.initiators.remove(pos);
            let session = match init.finish(&self.own_mac, resp, now) {
                Ok(s) => s,
                Err(_) => {
                    bump(&self.drops.bad_handshake);
                    return;
                }
            };
            rt.rtt_us = Some(now.saturating_duration_since(sent).as_micros() as u64);
            // Other initiations of this round are moot now.
            rt.initiators.clear();
            let Some(session) = self.install(&mut brain, &id, session, ep, now) else {
                return;
            };
            info!(peer = %id, path = %ep, "session established");
            let Some(rt) = brain.peers.get_mut(&id) else {
                return;
            };
            rt.timers.on_sent(now);
            // Send what waited, or a keepalive so the responder switches.
            Self::drain_queue(rt, &session, true)
        };
        self.send_all(out).await;
    }

    /// Handles a registry message that is not an answer: a push or a punch.
    async fn on_registry_message(self: &Arc<Self>, msg: FromRegistry) {
        match msg {
            FromRegistry::Push { id: push, item } => self.on_push(push, item).await,
            FromRegistry::Punch {
                peer,
                endpoints,
                nat,
            } => {
                let now = Instant::now();
                let out = {
                    let mut brain = self.brain.lock();
                    let local = *self.nat.lock();
                    let Some(rt) = brain.peers.get_mut(&peer) else {
                        return;
                    };
                    rt.path.set_nat(local, nat);
                    rt.candidates = endpoints.clone();
                    let _ = rt.path.set_candidates(endpoints, now);
                    // Probe straight away, in a burst, so our NAT opens
                    // towards the peer while its probes are on the way.
                    match rt.path.punch(now) {
                        PathAction::ProbeDirect(c) => {
                            self.start_handshake(&mut brain, &peer, Via::Direct(c), now)
                        }
                        _ => vec![],
                    }
                };
                self.send_all(out).await;
            }
            _ => {}
        }
    }

    async fn on_push(self: &Arc<Self>, push: u64, item: PushItem) {
        let PushItem::Statement {
            statement,
            address,
            hostname,
        } = item;
        let from = statement.body.from.node_id();
        let ack = {
            let mut brain = self.brain.lock();
            match brain.trust.receive(
                &self.id,
                &statement,
                address,
                hostname,
                crate::node::unix_now(),
            ) {
                Ok(change) => match self.cfg.state.save_trust(&brain.trust) {
                    Ok(()) => {
                        info!(peer = %from, kind = statement.body.kind.name(), "trust statement received");
                        self.apply_change(&mut brain, from, change);
                        true
                    }
                    Err(e) => {
                        // Not acknowledged: the registry will deliver it again.
                        warn!("cannot save trust store: {e}");
                        false
                    }
                },
                Err(pilot_proto::trust::TrustError::Replayed) => {
                    // A redelivery of a statement we already applied.
                    debug!(peer = %from, "trust statement already applied");
                    true
                }
                Err(e) => {
                    warn!(peer = %from, "trust statement refused: {e}");
                    true
                }
            }
        };
        if ack {
            self.link.send(&self.udp, &ToRegistry::Ack { push }).await;
        }
    }

    /// Runs every peer's timers and path rules.
    pub(crate) async fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        let mut out = vec![];
        let mut lookups = vec![];
        {
            let mut brain = self.brain.lock();
            let ids: Vec<NodeId> = brain.peers.keys().copied().collect();
            for id in ids {
                let Some(rt) = brain.peers.get_mut(&id) else {
                    continue;
                };
                if let Some(t) = self.instant_of(rt.data.last_rx_ms.load(Ordering::Relaxed)) {
                    rt.timers.on_received(t);
                }
                if let Some(t) = self.instant_of(rt.data.last_tx_ms.load(Ordering::Relaxed)) {
                    // The data plane sends only data.
                    rt.timers.on_sent(t);
                    rt.timers.on_data_sent(t);
                }
                if let Some(t) = self.instant_of(rt.data.last_data_rx_ms.load(Ordering::Relaxed)) {
                    rt.timers.on_data_received(t);
                }
                // The data plane moved to a direct endpoint (an authenticated
                // packet came straight from the peer): the path follows.
                if let (Some(Endpoint::Direct(a)), Some(Path::Relay)) =
                    (rt.data.endpoint(), rt.path.selected())
                {
                    rt.path.on_direct(a);
                }
                // Forget sessions past their reject age.
                let (old, live): (Vec<_>, Vec<_>) = rt
                    .sessions
                    .drain(..)
                    .partition(|s| now.saturating_duration_since(s.created) >= REJECT_AFTER);
                rt.sessions = live;
                if !old.is_empty() {
                    let mut table = self.table.write();
                    for s in &old {
                        table.by_index.remove(&s.local_index);
                        rt.data.clear_if(s);
                    }
                }
                rt.initiators.retain(|(_, _, t)| {
                    now.saturating_duration_since(*t) < Duration::from_secs(30)
                });
                // Path MTU discovery: follow the path, send the probes due.
                out.extend(crate::pathmtu::on_tick(self, rt, now));
                match rt.path.poll(now) {
                    PathAction::Idle => {}
                    PathAction::UseRelay(reason) => {
                        info!(peer = %id, reason = reason.text(), "no direct path; using the relay");
                        rt.path.on_relay(reason);
                        rt.data.force_endpoint(Endpoint::Relay);
                        out.extend(self.start_handshake(&mut brain, &id, Via::Relay, now));
                        continue;
                    }
                    PathAction::ProbeDirect(c) => {
                        debug!(peer = %id, "probing a direct path");
                        out.extend(self.start_handshake(&mut brain, &id, Via::Direct(c), now));
                        continue;
                    }
                }
                let Some(rt) = brain.peers.get_mut(&id) else {
                    continue;
                };
                match rt.timers.poll(now) {
                    TimerAction::Idle => {}
                    TimerAction::Handshake => {
                        let unanswered = rt.timers.handshake_in_flight();
                        if unanswered && rt.path.selected().is_some() && !rt.data.has_session() {
                            // The chosen path stopped answering: choose again.
                            rt.path.reset();
                        }
                        if rt.destinations().is_empty() && rt.path.selected().is_none() {
                            lookups.push(id);
                        }
                        out.extend(self.connect(&mut brain, &id, now));
                    }
                    TimerAction::Keepalive => {
                        rt.timers.on_sent(now);
                        if let Some(s) = rt.data.current(now) {
                            rt.data
                                .last_tx_ms
                                .store(self.now_ms(now), Ordering::Relaxed);
                            out.extend(Self::drain_queue(rt, &s, true));
                        }
                    }
                    TimerAction::ExpireSession => {
                        rt.data.clear_session();
                        rt.timers.clear_session();
                    }
                    TimerAction::GiveUp => {
                        rt.timers.cancel_handshake();
                        rt.initiators.clear();
                        rt.queue.clear();
                        rt.path.reset();
                        // Maybe it moved: ask the registry next time.
                        lookups.push(id);
                    }
                }
            }
        }
        self.send_all(out).await;
        for id in lookups {
            spawn_lookup(self, id);
        }
    }

    /// Starts handshakes with every trusted peer that has no session, and
    /// asks the registry where they are.
    pub(crate) async fn reconnect_all(self: &Arc<Self>) {
        let now = Instant::now();
        let out = {
            let mut brain = self.brain.lock();
            let ids: Vec<NodeId> = brain
                .peers
                .iter()
                .filter(|(_, rt)| !rt.data.has_session() && !rt.timers.handshake_in_flight())
                .map(|(id, _)| *id)
                .collect();
            let mut out = vec![];
            for id in ids {
                let dests = brain
                    .peers
                    .get(&id)
                    .map(|rt| rt.destinations())
                    .unwrap_or_default();
                if !dests.is_empty() {
                    out.extend(self.start_handshake(&mut brain, &id, Via::Direct(dests), now));
                }
                spawn_lookup_locked(self, &mut brain, id);
            }
            out
        };
        self.send_all(out).await;
    }

    /// Learns our public endpoint and NAT type: STUN to the registry's port
    /// and to its second STUN port, from the data socket. The same public
    /// endpoint for both means endpoint-independent mapping; one of our own
    /// addresses means no NAT.
    pub(crate) async fn detect_nat(&self) -> NatType {
        let primary = self.link.join.addr;
        let alt = SocketAddr::new(primary.ip(), primary.port().wrapping_add(1));
        let (a, b) = tokio::join!(self.stun(primary), self.stun(alt));
        let port = self.udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let own = crate::node::local_endpoints(port);
        let nat = match (a, b) {
            (Some(a), _) if own.contains(&a) => NatType::None,
            (Some(a), Some(b)) if a == b => NatType::EndpointIndependent,
            (Some(_), Some(_)) => NatType::PerDestination,
            _ => NatType::Unknown,
        };
        if let Some(a) = a {
            self.link.set_observed(a);
        }
        *self.nat.lock() = nat;
        nat
    }

    async fn stun(&self, to: SocketAddr) -> Option<SocketAddr> {
        for _ in 0..3 {
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&random_u64().to_le_bytes());
            tid[8..].copy_from_slice(&(random_u64() as u32).to_le_bytes());
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.stun_pending.lock().insert(tid, tx);
            let _ = self.udp.send_to(&stun::binding_request(&tid), to).await;
            let r = tokio::time::timeout(Duration::from_millis(400), rx).await;
            self.stun_pending.lock().remove(&tid);
            if let Ok(Ok(a)) = r {
                return Some(a);
            }
        }
        None
    }
}

/// Asks the registry where a trusted peer is (which also makes the registry
/// tell the peer to probe us), then handshakes if there is traffic waiting.
pub(crate) fn spawn_lookup<T: Tun>(inner: &Arc<Inner<T>>, id: NodeId) {
    spawn_lookup_locked(inner, &mut inner.brain.lock(), id);
}

/// [`spawn_lookup`] with the brain already locked; the task locks it later.
pub(crate) fn spawn_lookup_locked<T: Tun>(inner: &Arc<Inner<T>>, brain: &mut Brain, id: NodeId) {
    let Some(rt) = brain.peers.get_mut(&id) else {
        return;
    };
    if rt.lookup_in_flight {
        return;
    }
    rt.lookup_in_flight = true;
    let inner = inner.clone();
    tokio::spawn(async move {
        let r = inner.lookup(&PeerRef::Id(id)).await;
        let now = Instant::now();
        let out = {
            let mut brain = inner.brain.lock();
            let local = *inner.nat.lock();
            let Some(rt) = brain.peers.get_mut(&id) else {
                return;
            };
            rt.lookup_in_flight = false;
            match r {
                Ok(info) => {
                    rt.candidates = info.endpoints.clone();
                    rt.path.set_nat(local, info.nat);
                    let probe = rt.path.set_candidates(info.endpoints, now);
                    let wants = !rt.queue.is_empty() || !rt.data.has_session();
                    if let PathAction::ProbeDirect(c) = probe {
                        inner.start_handshake(&mut brain, &id, Via::Direct(c), now)
                    } else if wants && !rt.timers.handshake_in_flight() {
                        inner.connect(&mut brain, &id, now)
                    } else {
                        vec![]
                    }
                }
                Err(e) => {
                    debug!(peer = %id, "lookup failed: {e}");
                    if !rt.queue.is_empty() && !rt.timers.handshake_in_flight() {
                        // No registry answer: the relay path needs it too,
                        // but a cached direct endpoint may still work.
                        inner.connect(&mut brain, &id, now)
                    } else {
                        vec![]
                    }
                }
            }
        };
        inner.send_all(out).await;
    });
}
