//! The control side of tunnels: drives each trusted peer's state machine
//! ([`pilot_proto::peer::Peer`]) with what arrives (handshakes, registry
//! pushes and punches, in-tunnel control, the data plane's activity), and
//! carries out what it asks for (datagrams, session installs, lookups).
//! Also NAT detection. Runs off the packet path, one item at a time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_proto::handshake;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{FromRegistry, NatType, PeerRef, PushItem, ToRegistry};
use pilot_proto::path::Path;
use pilot_proto::peer::{Activity, Env, Event, Peer};
use pilot_proto::session::CipherSuite;
use pilot_proto::stun;
use pilot_proto::wire::{
    self, Kind, RelayHeader, DATA_OVERHEAD, MSG_DATA, MSG_RELAY_TO, RELAY_HEADER_LEN,
};
use tracing::{debug, info, warn};

use crate::node::{Brain, Inner, Slow};
use crate::peers::{bump, PeerRuntime};
use crate::tun::Tun;

/// A datagram the control side sends.
pub struct Outgoing {
    /// The tunnel datagram.
    pub bytes: Vec<u8>,
    /// Where it goes: straight, or through the relay to `peer`.
    pub to: Path,
    /// The peer it is for (names the relay's destination).
    pub peer: NodeId,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// The node as the peer machines see it: our keys, fresh indexes, growing
/// handshake timestamps, jitter.
struct NodeEnv<'a, T: Tun> {
    inner: &'a Inner<T>,
    last_timestamp: &'a mut u64,
}

impl<T: Tun> Env for NodeEnv<'_, T> {
    fn static_secret(&self) -> &[u8; 32] {
        self.inner.identity.static_secret()
    }
    fn suite(&self) -> CipherSuite {
        self.inner.cfg.suite
    }
    fn fresh_index(&mut self) -> u32 {
        self.inner.fresh_index()
    }
    fn next_timestamp(&mut self) -> u64 {
        Inner::<T>::next_timestamp_from(self.last_timestamp)
    }
    fn jitter(&mut self) -> Duration {
        Duration::from_millis(random_u64() % 334)
    }
}

/// What driving a machine left for after the locks are released.
#[derive(Default)]
pub(crate) struct Effects {
    out: Vec<Outgoing>,
    lookups: Vec<NodeId>,
}

impl Effects {
    fn extend(&mut self, other: Effects) {
        self.out.extend(other.out);
        self.lookups.extend(other.lookups);
    }
}

/// The data plane's view of a peer since the last sync.
fn activity<T: Tun>(inner: &Inner<T>, rt: &PeerRuntime) -> Activity {
    let d = &rt.data;
    Activity {
        last_rx: inner.instant_of(d.last_rx_ms.load(Ordering::Relaxed)),
        last_tx: inner.instant_of(d.last_tx_ms.load(Ordering::Relaxed)),
        last_data_rx: inner.instant_of(d.last_data_rx_ms.load(Ordering::Relaxed)),
        endpoint: d.endpoint(),
        current: d.current_index(),
    }
}

impl<T: Tun> Inner<T> {
    /// Sends the control side's datagrams.
    pub(crate) async fn send_all(&self, out: Vec<Outgoing>) {
        for o in out {
            match o.to {
                Path::Direct(a) => {
                    let _ = self.udp.send_to(&o.bytes, a).await;
                }
                Path::Relay => {
                    let mut buf = vec![0u8; RELAY_HEADER_LEN + o.bytes.len()];
                    RelayHeader {
                        ty: MSG_RELAY_TO,
                        node: o.peer,
                    }
                    .emit(&mut buf);
                    buf[RELAY_HEADER_LEN..].copy_from_slice(&o.bytes);
                    let _ = self.udp.send_to(&buf, self.relay_addr()).await;
                }
            }
        }
    }

    /// Sends what driving the machines produced and starts the lookups
    /// they asked for. Call with no lock held.
    pub(crate) async fn finish(self: &Arc<Self>, fx: Effects) {
        self.send_all(fx.out).await;
        for id in fx.lookups {
            spawn_lookup(self, id);
        }
    }

    /// Runs `f` on one peer's machine, then applies what it produced to the
    /// data plane's table and the trust store. Returns the datagrams and
    /// lookups to carry out once the brain is unlocked.
    pub(crate) fn drive<R>(
        &self,
        brain: &mut Brain,
        id: &NodeId,
        f: impl FnOnce(&mut Peer, &mut dyn Env) -> R,
    ) -> (Option<R>, Effects) {
        let Brain {
            peers,
            last_timestamp,
            trust,
            ..
        } = brain;
        let Some(rt) = peers.get_mut(id) else {
            return (None, Effects::default());
        };
        let mut env = NodeEnv {
            inner: self,
            last_timestamp,
        };
        let r = f(&mut rt.machine, &mut env);
        let mut fx = Effects::default();
        while let Some(t) = rt.machine.poll_transmit() {
            if t.bytes.first() == Some(&MSG_DATA) {
                let inner_len = t.bytes.len().saturating_sub(DATA_OVERHEAD);
                rt.data
                    .tx_bytes
                    .fetch_add(inner_len as u64, Ordering::Relaxed);
            }
            fx.out.push(Outgoing {
                bytes: t.bytes,
                to: t.to,
                peer: *id,
            });
        }
        while let Some(e) = rt.machine.poll_event() {
            match e {
                Event::Install { session, current } => {
                    self.table
                        .write()
                        .by_index
                        .insert(session.local_index, (rt.data.clone(), session.clone()));
                    if current {
                        rt.data.promote(&session);
                    }
                }
                Event::Retire { local_index } => {
                    if let Some((_, s)) = self.table.write().by_index.remove(&local_index) {
                        rt.data.clear_if(&s);
                    }
                }
                Event::ClearCurrent => rt.data.clear_session(),
                Event::UsePath(p) => rt.data.force_endpoint(p),
                Event::OfferPath(p) => rt.data.set_endpoint(p),
                Event::Established { path, initiator } => {
                    rt.last_handshake = Some(std::time::SystemTime::now());
                    if initiator {
                        info!(peer = %id, path = %path, "session established");
                    } else {
                        debug!(peer = %id, path = %path, "handshake answered");
                    }
                }
                Event::DirectWorked(a) => {
                    if trust.set_endpoint(id, a) {
                        if let Err(e) = self.cfg.state.save_trust(trust) {
                            warn!("cannot save trust store: {e}");
                        }
                    }
                }
                Event::NeedLookup => fx.lookups.push(*id),
                Event::RelayFallback(reason) => {
                    info!(peer = %id, reason = reason.text(), "no direct path; using the relay");
                }
                Event::GaveUp => debug!(peer = %id, "peer unreachable; gave up for now"),
                Event::Pong { nonce } => {
                    if let Some(tx) = self.pings.lock().remove(&nonce) {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        }
        (Some(r), fx)
    }

    /// Handles one item for the control side.
    pub(crate) async fn on_slow(self: &Arc<Self>, item: Slow) {
        let now = Instant::now();
        match item {
            Slow::NeedSession(id, pkt) => {
                let (_, fx) = self.drive(&mut self.brain.lock(), &id, |p, env| {
                    p.handle_outbound(now, pkt, env)
                });
                self.finish(fx).await;
            }
            Slow::Datagram(mut buf, from) => match wire::classify(&buf) {
                Kind::HandshakeInit => self.on_init(&buf, Path::Direct(from), None, now).await,
                Kind::HandshakeResp => self.on_resp(&buf, Path::Direct(from), now).await,
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
                Kind::HandshakeInit => self.on_init(&buf, Path::Relay, Some(src), now).await,
                Kind::HandshakeResp => self.on_resp(&buf, Path::Relay, now).await,
                _ => bump(&self.drops.malformed),
            },
            Slow::Control(id, msg) => {
                let (known, fx) = self.drive(&mut self.brain.lock(), &id, |p, _| {
                    p.handle_control(now, &msg)
                });
                if known == Some(false) {
                    bump(&self.drops.malformed);
                }
                self.finish(fx).await;
            }
        }
    }

    /// Measures one round trip through the tunnel to a trusted peer.
    pub(crate) async fn ping(self: &Arc<Self>, id: NodeId, timeout: Duration) -> Option<Duration> {
        let nonce = random_u64();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pings.lock().insert(nonce, tx);
        let sent = Instant::now();
        let (_, fx) = self.drive(&mut self.brain.lock(), &id, |p, env| {
            p.send_ping(sent, nonce, env)
        });
        self.finish(fx).await;
        let r = tokio::time::timeout(timeout, rx).await;
        self.pings.lock().remove(&nonce);
        match r {
            Ok(Ok(t)) => {
                let rtt = t.saturating_duration_since(sent);
                if let Some(rt) = self.brain.lock().peers.get_mut(&id) {
                    rt.machine.set_rtt(rtt);
                }
                Some(rtt)
            }
            _ => None,
        }
    }

    async fn on_init(
        self: &Arc<Self>,
        buf: &[u8],
        via: Path,
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
        let limit_key = match via {
            Path::Direct(a) => a.ip(),
            Path::Relay => self.link.join.addr.ip(),
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
        let fx = {
            let mut brain = self.brain.lock();
            // Only the local trust store decides: an unknown or untrusted key
            // gets no answer at all.
            let Some(id) = brain.by_static.get(resp.remote_static()).copied() else {
                bump(&self.drops.untrusted_handshake);
                debug!(?via, "handshake from an untrusted key ignored");
                return;
            };
            if relayed_from.is_some_and(|r| r != id) {
                bump(&self.drops.bad_handshake);
                return;
            }
            let (r, fx) = self.drive(&mut brain, &id, |p, _| p.handle_init(now, resp, via, index));
            if let Some(Err(e)) = r {
                debug!(peer = %id, "initiation refused: {e}");
                bump(&self.drops.bad_handshake);
            }
            fx
        };
        self.finish(fx).await;
    }

    async fn on_resp(self: &Arc<Self>, buf: &[u8], via: Path, now: Instant) {
        let Ok(resp) = wire::HandshakeResp::new_checked(buf) else {
            bump(&self.drops.malformed);
            return;
        };
        if via != Path::Relay {
            if self.link.on_handshake_response(&self.own_mac, resp, now) {
                return;
            }
            let relay = self.relay_link.read().clone();
            if relay.is_some_and(|r| r.on_handshake_response(&self.own_mac, resp, now)) {
                return;
            }
        }
        let fx = {
            let mut brain = self.brain.lock();
            let found = brain
                .peers
                .iter()
                .find(|(_, rt)| rt.machine.owns_initiation(resp.receiver_index()))
                .map(|(id, _)| *id);
            let Some(id) = found else {
                bump(&self.drops.bad_handshake);
                return;
            };
            let own_mac = &self.own_mac;
            let (r, fx) = self.drive(&mut brain, &id, |p, _| {
                p.handle_resp(now, own_mac, resp, via)
            });
            if let Some(Err(e)) = r {
                debug!(peer = %id, "handshake response refused: {e}");
                bump(&self.drops.bad_handshake);
            }
            fx
        };
        self.finish(fx).await;
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
                let local = *self.nat.lock();
                let (_, fx) = self.drive(&mut self.brain.lock(), &peer, |p, env| {
                    // Probe straight away, in a burst, so our NAT opens
                    // towards the peer while its probes are on the way.
                    p.handle_punch(now, endpoints, nat, local, env)
                });
                self.finish(fx).await;
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

    /// Syncs every peer's machine with the data plane and runs the timers
    /// that are due.
    pub(crate) async fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        let mut fx = Effects::default();
        {
            let mut brain = self.brain.lock();
            let ids: Vec<NodeId> = brain.peers.keys().copied().collect();
            for id in ids {
                let Some(rt) = brain.peers.get_mut(&id) else {
                    continue;
                };
                let a = activity(self, rt);
                rt.machine.handle_activity(now, a);
                if rt.machine.poll_timeout().is_some_and(|t| t <= now) {
                    let (_, f) = self.drive(&mut brain, &id, |p, env| p.handle_timeout(now, env));
                    fx.extend(f);
                }
            }
        }
        self.finish(fx).await;
    }

    /// Starts handshakes with every trusted peer that has no session, and
    /// asks the registry where they are.
    pub(crate) async fn reconnect_all(self: &Arc<Self>) {
        let now = Instant::now();
        let mut fx = Effects::default();
        {
            let mut brain = self.brain.lock();
            let ids: Vec<NodeId> = brain.peers.keys().copied().collect();
            for id in ids {
                let (_, f) = self.drive(&mut brain, &id, |p, env| p.reconnect(now, env));
                fx.extend(f);
            }
        }
        self.finish(fx).await;
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
/// tell the peer to probe us), and hands the answer to the peer's machine.
pub(crate) fn spawn_lookup<T: Tun>(inner: &Arc<Inner<T>>, id: NodeId) {
    let inner = inner.clone();
    tokio::spawn(async move {
        let r = inner.lookup(&PeerRef::Id(id)).await;
        let now = Instant::now();
        let answer = match r {
            Ok(info) => Some((info.endpoints, info.nat)),
            Err(e) => {
                debug!(peer = %id, "lookup failed: {e}");
                None
            }
        };
        let local = *inner.nat.lock();
        let (_, fx) = inner.drive(&mut inner.brain.lock(), &id, |p, env| {
            p.handle_lookup(now, answer, local, env)
        });
        inner.finish(fx).await;
    });
}
