//! The control task: the one owner of the node's control state — the trust
//! store, `node.json` and every peer's tunnel machine — held by value.
//!
//! Everything else reaches it by message. The packet loops send [`Slow`]
//! items; every other task (control-socket requests, the registry keeper,
//! lookups) sends a job through a [`Handle`]: a closure run on the state,
//! whose answer comes back on a reply channel. Between messages the task
//! sleeps until the earliest machine deadline. I/O that the state changes
//! ask for ([`Effects`]) is done by the task after the change, never in the
//! middle of one; registry calls that wait for an answer run in their own
//! tasks and report back with a job.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::Ipv4Net;
use pilot_proto::cert::Revocation;
use pilot_proto::filter::Direction;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{
    FromRegistry, PeerInfo, PeerRef, PushItem, Registration, Signed, Statement, StatementKind,
    ToRegistry,
};
use pilot_proto::overlay;
use pilot_proto::path::Path;
use pilot_proto::policy::{Decision, Denial, EffectiveGrant, Grant};
use pilot_proto::ports::{Scope, Traffic};
use pilot_proto::trust::{Change, Decision as TrustDecision, PendingLimits, TrustStore};
use pilot_proto::wire::{self, Kind, RelayHeader, MSG_RELAY_TO, RELAY_HEADER_LEN};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::api::{self, ApiError, ErrorCode, GrantView, Reply, Request, Response, TrustState};
use crate::audit::{statement_details, NodeAudit};
use crate::context::{unix_micros, unix_now, Context};
use crate::link::LinkError;
use crate::peers::bump;
use crate::shared::{Slow, SlowReceiver};
use crate::state::{NodeState, StateError};
use crate::tun::Tun;
use crate::tunnels::{Effects, Outgoing, Tunnels};

/// Work for the control task: a closure on its state.
pub type Job<T> = Box<dyn FnOnce(&mut Controller<T>) -> Effects + Send>;

/// Jobs waiting for the control task; a sender waits when it is full.
const JOB_QUEUE: usize = 1024;
/// How often expired trust requests are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How often the audit log's minute counts are written out (and a
/// checkpoint made if entries have waited long).
const AUDIT_TICK: Duration = Duration::from_secs(15);

/// The control task has stopped (the node is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the daemon is shutting down")]
pub struct Stopped;

/// How other tasks reach the control task.
pub struct Handle<T: Tun> {
    tx: mpsc::Sender<Job<T>>,
}

impl<T: Tun> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Tun> Handle<T> {
    /// Runs `f` on the control state and returns its answer.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller<T>) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        self.with_fx(move |c| (f(c), Effects::default())).await
    }

    /// Runs `f` on the control state; the task carries out the effects it
    /// returns, and the answer comes back.
    pub async fn with_fx<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Controller<T>) -> (R, Effects) + Send + 'static,
    ) -> Result<R, Stopped> {
        let (tx, rx) = oneshot::channel();
        let job: Job<T> = Box::new(move |c| {
            let (r, fx) = f(c);
            let _ = tx.send(r);
            fx
        });
        self.tx.send(job).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Queues `f` without waiting for it.
    pub async fn submit(&self, f: impl FnOnce(&mut Controller<T>) -> Effects + Send + 'static) {
        let _ = self.tx.send(Box::new(f)).await;
    }
}

/// The control state.
pub struct Controller<T: Tun> {
    /// The node's context (keys, links, shared state).
    pub ctx: Arc<Context<T>>,
    /// The trust store (`trust.json`).
    pub trust: TrustStore,
    /// `node.json`.
    pub node_state: NodeState,
    /// Every trusted peer's tunnel.
    pub tunnels: Tunnels,
    /// How many trust requests may wait for an answer, and how long.
    pub pending_limits: PendingLimits,
    /// The audit log (`audit.jsonl`).
    pub audit: NodeAudit,
    /// `fleet.json`: certificate, rules, revocations.
    pub fleet: crate::fleet::FleetState,
    /// Policy approvals chosen but not yet recorded.
    pub pending: crate::fleet::PolicyPending,
    /// Gossip among trusted peers ([`crate::gossip`]).
    pub gossip: crate::gossip::NodeGossip,
    pub(crate) handle: Handle<T>,
}

impl<T: Tun> Controller<T> {
    /// The control state, the handle to reach it, and the job queue its
    /// task reads.
    pub fn new(
        ctx: Arc<Context<T>>,
        trust: TrustStore,
        node_state: NodeState,
        audit: NodeAudit,
        fleet: crate::fleet::FleetState,
    ) -> (Self, Handle<T>, mpsc::Receiver<Job<T>>) {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let handle = Handle { tx };
        let tunnels = Tunnels::new(*ctx.identity.static_secret(), &ctx.identity.static_public());
        let gossip = crate::gossip::NodeGossip::new(ctx.id, ctx.cfg.gossip);
        let c = Controller {
            ctx,
            trust,
            node_state,
            tunnels,
            pending_limits: PendingLimits::default(),
            audit,
            fleet,
            pending: Default::default(),
            gossip,
            handle: handle.clone(),
        };
        (c, handle, rx)
    }

    /// The control task: jobs, packet-loop items and machine deadlines, one
    /// at a time, until the node stops.
    pub async fn run(mut self, mut slow: SlowReceiver, mut jobs: mpsc::Receiver<Job<T>>) {
        // Requests expire even when nothing new arrives.
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        let mut audit_tick = tokio::time::interval(AUDIT_TICK);
        let mut fleet_tick = tokio::time::interval(crate::fleet::FLEET_SYNC_EVERY);
        fleet_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gossip_tick = tokio::time::interval(crate::gossip::TICK);
        gossip_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.tunnels.next_deadline();
            let sleep = async move {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let mut names_may_change = true;
            let fx = tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => job(&mut self),
                    None => return,
                },
                item = slow.recv() => match item {
                    Some(item) => self.on_slow(item).await,
                    None => return,
                },
                () = sleep => {
                    names_may_change = false;
                    self.tunnels.on_timeout(&self.ctx, Instant::now())
                }
                _ = prune.tick() => {
                    if self.forget_old_requests() {
                        if let Err(e) = self.ctx.cfg.state.save_trust(&self.trust) {
                            warn!("cannot save trust store: {e}");
                        }
                    }
                    Effects::default()
                }
                _ = fleet_tick.tick() => {
                    if !self.fleet.rules.is_empty() || self.fleet.cert.is_some() {
                        self.fleet_sync_soon();
                    }
                    Effects::default()
                }
                _ = gossip_tick.tick() => {
                    names_may_change = false;
                    let out = self.gossip.tick(
                        &self.ctx,
                        &self.tunnels,
                        &self.node_state.outbox,
                        Instant::now(),
                    );
                    Effects { out, ..Effects::default() }
                }
                _ = audit_tick.tick() => {
                    self.flush_decisions(false);
                    self.audit.tick(&self.ctx.identity, unix_now());
                    Effects::default()
                }
            };
            self.carry_out(fx).await;
            if names_may_change {
                self.publish_names();
            }
        }
    }

    /// Publishes the names the DNS server may tell (ours and approved
    /// peers'), if they changed: after anything but a tunnel timer, which
    /// never changes a trust record or our name.
    fn publish_names(&self) {
        let own = self
            .node_state
            .hostname
            .as_deref()
            .zip(self.ctx.shared.net.get().map(|(a, _)| *a));
        let network = self.ctx.shared.network();
        let ula = self.ctx.shared.ula();
        let fingerprint = crate::dns::Names::fingerprint(&self.trust, own, network, ula);
        self.ctx.dns.publish_with(fingerprint, || {
            crate::dns::Names::from_trust(&self.trust, own, network).with_ula(ula)
        });
    }

    /// Does the I/O that state changes asked for. What goes into the trust
    /// store is saved before anything is sent: an initiation's timestamp
    /// is on disk before its answer leaves.
    async fn carry_out(&mut self, fx: Effects) {
        if !fx.refused.is_empty() {
            let now = unix_now();
            for r in fx.refused {
                self.audit.refused(&self.ctx.identity, now, r);
            }
        }
        let mut dirty = false;
        let mut out = fx.out;
        out.extend(self.gossip.take_later());
        let now = Instant::now();
        for id in &fx.proven {
            out.extend(self.gossip.established(&self.ctx, &self.tunnels, id, now));
        }
        for (id, ts) in fx.init_timestamps {
            dirty |= self.trust.set_last_init_timestamp(&id, ts);
        }
        for (id, a) in fx.worked {
            dirty |= self.trust.set_endpoint(&id, a);
        }
        for id in fx.proven {
            if self.trust.set_key_proven(&id) {
                debug!(peer = %id, "tunnel key proven by a handshake");
                dirty = true;
            }
        }
        if dirty {
            if let Err(e) = self.ctx.cfg.state.save_trust(&self.trust) {
                warn!("cannot save trust store: {e}");
            }
        }
        send_all(&self.ctx, out).await;
        for id in fx.lookups {
            spawn_lookup(self.ctx.clone(), self.handle.clone(), id);
        }
    }

    /// One item from the packet loops.
    async fn on_slow(&mut self, item: Slow) -> Effects {
        let now = Instant::now();
        let ctx = self.ctx.clone();
        match item {
            Slow::NeedSession(id, pkt) => self.tunnels.on_need_session(&ctx, &id, pkt, now),
            Slow::Wake(id) => self.tunnels.on_wake(&ctx, &id, now),
            Slow::Noted(id, n) => {
                self.audit.decision(&ctx.identity, unix_now(), &id, n);
                Effects::default()
            }
            Slow::Control(id, msg) if msg.first() == Some(&pilot_proto::gossip::CTL_GOSSIP) => {
                self.on_gossip(id, &msg, now)
            }
            Slow::Control(id, msg) => self.tunnels.on_control(&ctx, &id, &msg, now),
            Slow::Datagram(mut buf, from) => match wire::classify(&buf) {
                Kind::HandshakeInit => {
                    self.tunnels
                        .on_init(&ctx, &buf, Path::Direct(from), None, now)
                }
                Kind::CookieReply => self.tunnels.on_cookie(&ctx, &buf, Path::Direct(from), now),
                Kind::HandshakeResp => {
                    let Ok(resp) = wire::HandshakeResp::new_checked(&buf) else {
                        bump(&ctx.shared.drops.malformed);
                        return Effects::default();
                    };
                    if ctx.link.on_handshake_response(&ctx.own_mac, resp, now) {
                        return Effects::default();
                    }
                    let relay = ctx.relay_link.read().clone();
                    if relay.is_some_and(|r| r.on_handshake_response(&ctx.own_mac, resp, now)) {
                        return Effects::default();
                    }
                    self.tunnels.on_resp(&ctx, resp, Path::Direct(from), now)
                }
                Kind::Data => {
                    let index = wire::DataHeader::parse(&buf).map(|h| h.receiver_index).ok();
                    let relay = ctx.relay_link.read().clone();
                    let link = match (index, &relay) {
                        (Some(i), Some(r)) if r.session_index_is(i) => &**r,
                        _ => &ctx.link,
                    };
                    let msg = link.on_data(&mut buf);
                    if let Some(FromRegistry::PathCheck { token }) = msg {
                        // The registry asks whether we receive here: answer
                        // from this socket (it moves us only then).
                        link.send(&ctx.shared.udp, &ToRegistry::PathConfirm { token })
                            .await;
                        return Effects::default();
                    }
                    match msg {
                        Some(msg) => self.on_registry_message(msg).await,
                        None => Effects::default(),
                    }
                }
                Kind::Stun => {
                    ctx.on_stun_response(&buf);
                    Effects::default()
                }
                _ => {
                    bump(&ctx.shared.drops.malformed);
                    Effects::default()
                }
            },
            Slow::Relayed(src, buf) => match wire::classify(&buf) {
                Kind::HandshakeInit => {
                    self.tunnels
                        .on_init(&ctx, &buf, Path::Relay, Some(src), now)
                }
                Kind::CookieReply => self.tunnels.on_cookie(&ctx, &buf, Path::Relay, now),
                Kind::HandshakeResp => match wire::HandshakeResp::new_checked(&buf) {
                    Ok(resp) => self.tunnels.on_resp(&ctx, resp, Path::Relay, now),
                    Err(_) => {
                        bump(&ctx.shared.drops.malformed);
                        Effects::default()
                    }
                },
                _ => {
                    bump(&ctx.shared.drops.malformed);
                    Effects::default()
                }
            },
        }
    }

    /// A registry message that is not an answer: a push or a punch.
    async fn on_registry_message(&mut self, msg: FromRegistry) -> Effects {
        match msg {
            FromRegistry::Push { id: push, item } => {
                let (ack, fx) = self.on_push(item);
                if ack {
                    let ctx = &self.ctx;
                    ctx.link
                        .send(&ctx.shared.udp, &ToRegistry::Ack { push })
                        .await;
                }
                fx
            }
            FromRegistry::Punch {
                peer,
                endpoints,
                nat,
            } => {
                let ctx = self.ctx.clone();
                // Probe straight away, in a burst, so our NAT opens towards
                // the peer while its probes are on the way.
                self.tunnels
                    .on_punch(&ctx, &peer, endpoints, nat, Instant::now())
            }
            FromRegistry::Revoked { revocation } => {
                match Revocation::from_bytes(&revocation) {
                    Ok(r) => {
                        self.on_revocation(r);
                    }
                    Err(e) => debug!("unreadable revocation from the registry: {e}"),
                }
                Effects::default()
            }
            _ => Effects::default(),
        }
    }

    /// A gossip message from a trusted peer.
    fn on_gossip(&mut self, from: NodeId, msg: &[u8], now: Instant) -> Effects {
        let ctx = self.ctx.clone();
        let heard = self.gossip.on_message(&self.tunnels, &from, msg, now);
        let mut fx = Effects {
            out: heard.out,
            ..Effects::default()
        };
        if let Some((node, endpoints, nat)) = heard.found {
            fx.extend(
                self.tunnels
                    .on_lookup(&ctx, &node, Some((endpoints, nat)), now),
            );
        }
        if let Some(bytes) = heard.owner_revoked {
            match Revocation::from_bytes(&bytes) {
                Ok(r) => {
                    debug!(via = %from, node = %r.body.node, "owner revocation heard from a trusted peer");
                    self.on_revocation(r);
                }
                Err(e) => debug!(via = %from, "unreadable owner revocation from a peer: {e}"),
            }
        }
        if let Some(statement) = heard.apply {
            let signer = statement.body.from.node_id();
            // Only a node we hold a record of can withdraw anything here;
            // its address and name stay as recorded.
            if let Some(r) = self.trust.get(&signer) {
                let (address, hostname) = (r.address, r.hostname.clone());
                info!(peer = %signer, via = %from, kind = statement.body.kind.name(), "trust withdrawal heard from a trusted peer");
                let (_, applied) = self.on_push(PushItem::Statement {
                    statement,
                    address,
                    hostname,
                });
                fx.extend(applied);
            }
        }
        fx
    }

    /// The registry's answer to a lookup of `id`, or `None` when it gave
    /// none: then what gossip knows or can ask stands in for it.
    pub(crate) fn lookup_answered(
        &mut self,
        id: NodeId,
        answer: Option<(Vec<std::net::SocketAddr>, pilot_proto::messages::NatType)>,
    ) -> Effects {
        let ctx = self.ctx.clone();
        let now = Instant::now();
        if answer.is_some() {
            return self.tunnels.on_lookup(&ctx, &id, answer, now);
        }
        let proof = self.trust.get(&id).and_then(|r| r.their_approval.clone());
        let (held, ask) = self.gossip.lookup_failed(&self.tunnels, &id, proof, now);
        let mut fx = self.tunnels.on_lookup(&ctx, &id, held, now);
        fx.out.extend(ask);
        fx
    }

    /// A trust statement pushed by the registry. Returns whether to
    /// acknowledge it (not when it could not be saved: the registry will
    /// deliver it again).
    fn on_push(&mut self, item: PushItem) -> (bool, Effects) {
        let PushItem::Statement {
            statement,
            address,
            hostname,
        } = item;
        let from = statement.body.from.node_id();
        // The address comes from the registry, unsigned: it must be a
        // host of our overlay, and not ours.
        let net = self.ctx.shared.network();
        let mut details = statement_details(&statement, &from.to_string());
        if address == self.ctx.address() || net.is_some_and(|n| !n.contains(&address)) {
            warn!(peer = %from, %address, "trust statement refused: the registry gave an address that is ours or outside the overlay");
            details["reason"] =
                format!("the registry gave address {address}, ours or outside the overlay").into();
            self.record_audit("statement-refused", details);
            return (true, Effects::default());
        }
        // A rotated peer: its record moves to the new id first (or the
        // statement is refused with the succession).
        let mut moved = Effects::default();
        if let StatementKind::Succeed { succession, .. } = &statement.body.kind {
            match self.follow_succession(&statement, succession) {
                Ok(fx) => moved = fx,
                Err(why) => {
                    warn!(peer = %from, "succession refused: {}", crate::sanitize::printable(&why));
                    details["reason"] = why.into();
                    self.record_audit("statement-refused", details);
                    return (true, Effects::default());
                }
            }
        }
        match self
            .trust
            .receive(&self.ctx.id, &statement, address, hostname, unix_now())
        {
            Ok(change) => {
                self.forget_old_requests();
                match self.ctx.cfg.state.save_trust(&self.trust) {
                    Ok(()) => {
                        info!(peer = %from, kind = statement.body.kind.name(), "trust statement received");
                        details["state"] = self.state_word(&from).into();
                        self.record_audit("statement-received", details);
                        let mut fx = self.apply_change(from, change);
                        fx.extend(std::mem::take(&mut moved));
                        if let StatementKind::Policy { cert, .. } = &statement.body.kind {
                            // Its rules admit us; do ours admit it?
                            self.trust.set_peer_cert(&from, cert.clone());
                            if let Some(act) = self.policy_act(from, Some(cert)) {
                                self.spawn_act(from, act);
                            }
                        }
                        (true, fx)
                    }
                    Err(e) => {
                        warn!("cannot save trust store: {e}");
                        (false, Effects::default())
                    }
                }
            }
            Err(pilot_proto::trust::TrustError::Replayed) => {
                // A redelivery of a statement we already applied.
                debug!(peer = %from, "trust statement already applied");
                (true, Effects::default())
            }
            Err(e) => {
                warn!(peer = %from, "trust statement refused: {e}");
                details["reason"] = e.to_string().into();
                self.record_audit("statement-refused", details);
                (true, Effects::default())
            }
        }
    }

    /// Drops pending requests past their age and beyond the cap (the
    /// newest stay). Returns true if any went; the caller saves.
    fn forget_old_requests(&mut self) -> bool {
        let now = unix_now();
        let ttl = self.pending_limits.ttl_secs;
        let expired: std::collections::BTreeSet<NodeId> = self
            .trust
            .iter()
            .filter(|(_, r)| r.pending() && r.updated.saturating_add(ttl) <= now)
            .map(|(id, _)| id)
            .collect();
        let gone = self.trust.prune_pending(now, self.pending_limits);
        for id in &gone {
            info!(peer = %id, "pending trust request forgotten (expired, or too many pending)");
            let reason = if expired.contains(id) {
                "expired"
            } else {
                "over-cap"
            };
            self.record_audit(
                "pending-forgotten",
                serde_json::json!({"peer": id.to_string(), "reason": reason}),
            );
        }
        !gone.is_empty()
    }

    /// Appends an entry to the audit log.
    pub fn record_audit(&mut self, kind: &str, details: serde_json::Value) {
        self.audit
            .record(&self.ctx.identity, unix_now(), kind, details);
    }

    /// At shutdown: the last counts, `node-stop` and a signed head.
    pub fn close_audit(&mut self) {
        self.flush_decisions(true);
        self.audit.close(&self.ctx.identity, unix_now());
    }

    /// Moves the filters' per-minute decision counts into the audit log
    /// (every count with `all`, at shutdown).
    fn flush_decisions(&mut self, all: bool) {
        let now = unix_now();
        let counts: Vec<_> = self
            .tunnels
            .peers()
            .iter()
            .filter_map(|(id, rt)| Some((*id, rt.data.with_filter(|f| f.flush_noted(now, all))?)))
            .filter(|(_, f)| !f.is_empty())
            .collect();
        for (id, f) in counts {
            self.audit.decision_counts(&self.ctx.identity, now, &id, f);
        }
    }

    /// Installs the grants of a trusted peer's record in the data plane's
    /// filter; records them in the audit log when `audit` and they changed.
    pub(crate) fn refresh_grants(&mut self, id: &NodeId, audit: bool) {
        let now = unix_now();
        let Some(r) = self.trust.get(id) else { return };
        let Some(rt) = self.tunnels.peers().get(id) else {
            return;
        };
        let (inbound, outbound) = r.grants(now);
        let details = serde_json::json!({
            "peer": id.to_string(),
            "inbound": inbound.scope(now).to_string(),
            "inbound_until": inbound.valid_until(),
            "outbound": outbound.scope(now).to_string(),
            "outbound_until": outbound.valid_until(),
        });
        let before = rt.data.with_filter(|f| {
            (
                f.grant(Direction::Inbound).clone(),
                f.grant(Direction::Outbound).clone(),
            )
        });
        let changed = before.as_ref() != Some(&(inbound.clone(), outbound.clone()));
        rt.data.set_grants(inbound, outbound, now);
        if audit && changed {
            self.record_audit("grant", details);
        }
    }

    /// The trust state with a peer, as the CLI words it.
    fn state_word(&self, id: &NodeId) -> String {
        self.trust
            .get(id)
            .map(|r| TrustState::of(r.ours, r.theirs))
            .unwrap_or(TrustState::None)
            .to_string()
    }

    /// Applies a trust change to the tunnels and the data plane.
    fn apply_change(&mut self, id: NodeId, change: Change) -> Effects {
        let ctx = self.ctx.clone();
        if change.now_trusted && !change.was_trusted {
            if let Some(r) = self.trust.get(&id) {
                self.tunnels.add_peer(&ctx, id, r);
            }
            self.refresh_grants(&id, true);
            info!(peer = %id, "peer trusted");
            return self.tunnels.reconnect(&ctx, Some(&id), Instant::now());
        }
        if change.was_trusted && !change.now_trusted {
            self.tunnels.remove_peer(&ctx, &id);
            info!(peer = %id, "peer no longer trusted; sessions dropped");
        }
        if change.now_trusted && change.was_trusted {
            // Still trusted, perhaps with other grants.
            self.refresh_grants(&id, true);
        }
        Effects::default()
    }

    /// Puts every trusted peer of the trust store into the tunnels; returns
    /// the direct endpoints that worked for them last time.
    pub fn load_peers(&mut self) -> Vec<std::net::SocketAddr> {
        let ctx = self.ctx.clone();
        let trusted: Vec<_> = self
            .trust
            .iter()
            .filter(|(_, r)| r.trusted())
            .map(|(id, r)| (id, r.clone()))
            .collect();
        let mut cached = vec![];
        for (id, r) in trusted {
            self.tunnels.add_peer(&ctx, id, &r);
            self.refresh_grants(&id, false);
            cached.extend(r.last_endpoint);
        }
        cached
    }

    /// Looks every trusted peer up again (our endpoints changed: the
    /// registry passes them on in a punch request with each answer).
    pub fn relookup_all(&mut self) -> Effects {
        Effects {
            lookups: self
                .trust
                .iter()
                .filter(|(_, r)| r.trusted())
                .map(|(id, _)| id)
                .collect(),
            ..Effects::default()
        }
    }

    /// Connects every trusted peer without a session.
    pub fn reconnect_all(&mut self) -> Effects {
        let ctx = self.ctx.clone();
        self.tunnels.reconnect(&ctx, None, Instant::now())
    }

    /// The next sequence number for a signed message, saved before use so
    /// that a crash can never make us reuse one.
    pub fn next_seq(&mut self) -> Result<u64, StateError> {
        let seq = (self.node_state.seq + 1).max(unix_micros());
        self.node_state.seq = seq;
        self.ctx.cfg.state.save_node(&self.node_state)?;
        Ok(seq)
    }

    /// Queues a withdrawal of trust for delivery, on disk before it is
    /// sent; it replaces anything older queued for the same peer.
    pub fn queue_withdrawal(&mut self, st: Signed<Statement>) -> Result<(), StateError> {
        let outbox = &mut self.node_state.outbox;
        outbox.retain(|o| o.body.to != st.body.to);
        outbox.push(st);
        self.ctx.cfg.state.save_node(&self.node_state)
    }

    /// The registry has our statement `seq` about `to` (or a newer one):
    /// nothing up to it needs sending again.
    pub fn delivered(&mut self, to: NodeId, seq: u64) {
        let outbox = &mut self.node_state.outbox;
        let before = outbox.len();
        outbox.retain(|o| !(o.body.to == to && o.body.seq <= seq));
        if outbox.len() != before {
            if let Err(e) = self.ctx.cfg.state.save_node(&self.node_state) {
                warn!("cannot save node state: {e}");
            }
        }
    }

    /// A signed registration for the registry or a relay.
    pub fn registration(
        &mut self,
        nat: pilot_proto::messages::NatType,
    ) -> Result<Signed<Registration>, StateError> {
        let hostname = crate::hostname::wanted(
            self.ctx.cfg.hostname.as_deref(),
            self.node_state.hostname.as_deref(),
        );
        self.registration_named(nat, hostname)
    }

    /// A signed registration asking for `hostname`.
    pub fn registration_named(
        &mut self,
        nat: pilot_proto::messages::NatType,
        hostname: Option<String>,
    ) -> Result<Signed<Registration>, StateError> {
        let seq = self.next_seq()?;
        Ok(self.ctx.registration(seq, hostname, nat))
    }

    /// Underlay addresses the overlay must not capture: the registry, the
    /// relay, and (with `peers`) every endpoint a peer was reached at.
    fn must_reach(&self, peers: bool) -> Vec<(Ipv4Addr, String)> {
        let mut keep = vec![];
        let mut add = |a: std::net::SocketAddr, what: String| {
            if let std::net::IpAddr::V4(ip) = a.ip() {
                keep.push((ip, what));
            }
        };
        for &e in self.ctx.link.join.endpoints() {
            add(e, "the registry".into());
        }
        if let Some(r) = self.ctx.relay_link.read().as_ref() {
            add(r.endpoint(), "the relay".into());
        }
        for (id, r) in self.trust.iter().filter(|_| peers) {
            if let Some(e) = r.last_endpoint {
                add(e, format!("the endpoint of peer {id}"));
            }
        }
        keep
    }

    /// The registry granted an address (and maybe a hostname). The first
    /// assignment that passes the bounds ([`overlay::check_assignment`]) is
    /// pinned in `node.json`; a later, different one is refused. The
    /// address becomes the node's (if it has none yet) before any other
    /// message is handled. Returns the overlay network.
    pub fn on_registered(
        &mut self,
        address: Ipv4Addr,
        prefix_len: u8,
        hostname: Option<String>,
    ) -> Result<Ipv4Net, String> {
        // Peers' endpoints count for a first assignment; once pinned, an
        // endpoint a peer reported later does not unpin us (candidates
        // inside the overlay are dropped instead).
        let first = self.node_state.address.is_none();
        let network = overlay::check_assignment(address, prefix_len, &self.must_reach(first))
            .map_err(|e| e.to_string())?;
        let s = &mut self.node_state;
        if let (Some(a), Some(p)) = (s.address, s.prefix_len) {
            if (a, p) != (address, prefix_len) {
                return Err(format!(
                    "the registry now assigns {address}/{prefix_len}, but this node has had \
                     {a}/{p} since its first registration and keeps it (a registry must never \
                     move a node). If the registry's database was really reset, remove \
                     \"address\" and \"prefix_len\" from {} and start again",
                    self.ctx.cfg.state.file("node.json").display()
                ));
            }
        }
        let changed = s.address != Some(address)
            || s.prefix_len != Some(prefix_len)
            || s.hostname != hostname;
        if changed {
            s.address = Some(address);
            s.prefix_len = Some(prefix_len);
            s.hostname = hostname;
            if let Err(e) = self.ctx.cfg.state.save_node(&self.node_state) {
                warn!("cannot save node state: {e}");
            }
        }
        // Set once: a running interface keeps its address.
        let _ = self.ctx.shared.net.set((address, network));
        Ok(network)
    }

    /// The address pinned at an earlier registration, if it is within the
    /// bounds.
    pub fn cached_address(&self) -> Option<(Ipv4Addr, Ipv4Net)> {
        let s = &self.node_state;
        let (a, p) = s.address.zip(s.prefix_len)?;
        match overlay::check_assignment(a, p, &self.must_reach(false)) {
            Ok(net) => Some((a, net)),
            Err(e) => {
                warn!("the cached address {a}/{p} is refused: {e}");
                None
            }
        }
    }

    /// A peer of the trust store named by hostname, address or node id; an
    /// error if several records have that hostname.
    fn find_local(&self, r: &PeerRef) -> Result<Option<PeerInfo>, String> {
        let found = self.trust.find(r).map_err(|e| e.to_string())?;
        Ok(found.map(|(_, rec)| PeerInfo {
            identity: rec.identity.clone(),
            address: rec.address,
            hostname: rec.hostname.clone(),
            endpoints: vec![],
            nat: Default::default(),
        }))
    }

    /// Records our own trust statement about `info`.
    fn record(
        &mut self,
        info: &PeerInfo,
        kind: &StatementKind,
    ) -> (Result<Change, ApiError>, Effects) {
        let change = match self.trust.decide(
            &info.identity,
            info.address,
            info.hostname.clone(),
            kind,
            unix_now(),
        ) {
            Ok(c) => c,
            Err(e) => {
                let id = info.identity.node_id();
                warn!(peer = %id, "trust record refused: {e}");
                let e = ApiError::new(ErrorCode::InvalidRequest, format!("refused {id}: {e}"));
                return (Err(e), Effects::default());
            }
        };
        if let Err(e) = self.ctx.cfg.state.save_trust(&self.trust) {
            let e = ApiError::new(
                ErrorCode::Failed,
                format!(
                    "cannot save the trust store: {e} (check the disk and the state directory)"
                ),
            );
            return (Err(e), Effects::default());
        }
        self.note_policy_record(&info.identity.node_id(), kind);
        if let Err(e) = self.ctx.cfg.state.save_trust(&self.trust) {
            warn!("cannot save trust store: {e}");
        }
        let fx = self.apply_change(info.identity.node_id(), change);
        (Ok(change), fx)
    }

    /// `status`.
    pub fn status(&self) -> api::Status {
        let ctx = &self.ctx;
        let now = Instant::now();
        let peers = self.tunnels.peers();
        let connected = peers
            .values()
            .filter(|p| p.data.current(now).is_some())
            .count();
        let ipv6 = ctx.shared.ipv6_up.load(Ordering::Relaxed);
        // Read once, before the literal: a guard taken inside it would live
        // to its end, and a second lock of the same mutex there deadlocks.
        let mapped = ctx.mapped.lock().as_ref().map(|m| (m.external, m.protocol));
        api::Status {
            address: ctx.address(),
            network: ctx.shared.network().map(|n| n.to_string()),
            node_id: ctx.id.to_string(),
            hostname: self.node_state.hostname.clone(),
            listen: ctx.shared.udp.local_addr().ok(),
            registry: api::RegistryStatus {
                url: ctx.link.join.to_string(),
                endpoint: Some(ctx.link.endpoint()),
                reachable: ctx.link.reachable(),
                last_contact_secs: ctx
                    .link
                    .last_contact()
                    .map(|t| now.saturating_duration_since(t).as_secs()),
                observed_endpoint: ctx.link.observed(),
            },
            relay: ctx.shared.relay_addr(),
            nat: (*ctx.nat.lock()).into(),
            public_endpoint: ctx.link.observed(),
            peers: api::PeerCounts {
                known: self.trust.iter().count() as u64,
                trusted: peers.len() as u64,
                connected: connected as u64,
            },
            pending_requests: self.trust.iter().filter(|(_, r)| r.pending()).count() as u64,
            cipher: ctx.cfg.suite.into(),
            offload: api::Offload {
                udp_gso: ctx.shared.udp.gso(),
            },
            pid: std::process::id(),
            uptime_secs: SystemTime::now()
                .duration_since(ctx.started)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            drops: api::DropCounts {
                queue_full: ctx.shared.slow_tx.refused(),
                ..ctx.shared.drops.snapshot()
            },
            mtu: ctx.shared.mtu.tun(),
            mtu_cap: ctx.shared.mtu.cap,
            underlay_below_mtu_floor: ctx.shared.mtu.below_floor(),
            too_big: ctx.shared.drops.too_big.snapshot(),
            port_mapping: mapped.map(|m| m.0),
            port_mapping_protocol: mapped.map(|m| m.1),
            dns: ctx.dns.status(),
            address6: ipv6.then(|| ctx.shared.address6()).flatten(),
            network6: ipv6
                .then(|| ctx.shared.ula().map(|u| u.net().to_string()))
                .flatten(),
            tcp_relay: ctx
                .shared
                .udp
                .divert
                .engagement()
                .map(|e| api::TcpRelayStatus {
                    address: e.tcp,
                    since_secs: SystemTime::now()
                        .duration_since(e.since)
                        .map_or(0, |d| d.as_secs()),
                    why: e.why,
                }),
            gossip: self.gossip.status(),
        }
    }

    /// `peers`.
    pub fn peers(&self) -> Vec<api::Peer> {
        let now = Instant::now();
        let unix = unix_now();
        let ipv6 = self.ctx.shared.ipv6_up.load(Ordering::Relaxed);
        // While UDP is blocked, relayed packets go over the TCP relay, and
        // that is why they are relayed.
        let shared = &self.ctx.shared;
        let over_tcp = shared
            .udp
            .divert
            .engagement()
            .filter(|_| shared.udp.divert.diverts(shared.relay_addr()));
        self.trust
            .iter()
            .map(|(id, r)| {
                let rt = self.tunnels.peers().get(&id);
                let endpoint = rt.and_then(|p| p.data.endpoint()).map(api::Endpoint::from);
                let tcp = over_tcp
                    .as_ref()
                    .filter(|_| endpoint == Some(api::Endpoint::Relay));
                api::Peer {
                    node_id: id.to_string(),
                    hostname: r.hostname.clone(),
                    address: r.address,
                    trust: TrustState::of(r.ours, r.theirs),
                    endpoint,
                    path: endpoint.map(api::PathKind::from),
                    relay_reason: match tcp {
                        Some(e) => Some(e.why.clone()),
                        None => rt
                            .and_then(|p| p.machine.relay_reason())
                            .map(|r| r.text().to_string()),
                    },
                    rtt_ms: rt
                        .and_then(|p| p.machine.rtt())
                        .map(|d| d.as_micros() as f64 / 1000.0),
                    session: rt.is_some_and(|p| p.data.current(now).is_some()),
                    last_handshake_secs: rt
                        .and_then(|p| p.last_handshake)
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: rt
                        .map(|p| p.data.rx_bytes.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    tx_bytes: rt
                        .map(|p| p.data.tx_bytes.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    mtu: rt
                        .filter(|p| p.data.current(now).is_some())
                        .map(|p| p.pmtu.inner_mtu(self.ctx.shared.mtu.tun())),
                    path_mtu: rt.and_then(|p| p.pmtu.path_mtu()),
                    path_mtu_state: rt.and_then(|p| p.pmtu.state()).map(str::to_string),
                    granted: (r.ours == TrustDecision::Approved)
                        .then(|| GrantView::of(&r.granted, unix)),
                    granted_us: (r.theirs == TrustDecision::Approved)
                        .then(|| GrantView::of(&r.granted_us, unix)),
                    address6: ipv6
                        .then(|| self.ctx.shared.peer_address6(r.address))
                        .flatten(),
                    relay_transport: tcp.map(|_| "tcp".to_string()),
                }
            })
            .collect()
    }

    /// `trust pending`.
    pub fn trust_pending(&self) -> Vec<api::PendingRequest> {
        let unix = unix_now();
        self.trust
            .iter()
            .filter(|(_, r)| r.pending())
            .map(|(id, r)| api::PendingRequest {
                node_id: id.to_string(),
                hostname: r.hostname.clone(),
                address: r.address,
                note: r.note_in.clone(),
                want: r.want_in.clone(),
                offers: Some(GrantView::of(&r.granted_us, unix)),
            })
            .collect()
    }

    /// `trust list`.
    pub fn trust_list(&self) -> Vec<api::TrustEntry> {
        let unix = unix_now();
        self.trust
            .iter()
            .map(|(id, r)| api::TrustEntry {
                node_id: id.to_string(),
                hostname: r.hostname.clone(),
                address: r.address,
                state: TrustState::of(r.ours, r.theirs),
                ours: r.ours.into(),
                theirs: r.theirs.into(),
                granted: (r.ours == TrustDecision::Approved)
                    .then(|| GrantView::of(&r.granted, unix)),
                granted_us: (r.theirs == TrustDecision::Approved)
                    .then(|| GrantView::of(&r.granted_us, unix)),
            })
            .collect()
    }
}

/// Sends the control side's datagrams.
async fn send_all<T: Tun>(ctx: &Context<T>, out: Vec<Outgoing>) {
    let udp = &ctx.shared.udp;
    for o in out {
        match o.to {
            Path::Direct(a) => {
                let _ = match o.hop_limit {
                    Some(ttl) => udp.send_to_ttl(&o.bytes, a, ttl).await,
                    None => udp.send_to(&o.bytes, a).await,
                };
            }
            Path::Relay => {
                let mut buf = vec![0u8; RELAY_HEADER_LEN + o.bytes.len()];
                RelayHeader {
                    ty: MSG_RELAY_TO,
                    node: o.peer,
                }
                .emit(&mut buf);
                buf[RELAY_HEADER_LEN..].copy_from_slice(&o.bytes);
                let _ = udp.send_to(&buf, ctx.shared.relay_addr()).await;
            }
        }
    }
}

/// Asks the registry where a trusted peer is (which also makes the registry
/// tell the peer to probe us), and hands the answer to its machine.
fn spawn_lookup<T: Tun>(ctx: Arc<Context<T>>, handle: Handle<T>, id: NodeId) {
    tokio::spawn(async move {
        let answer = match ctx.lookup(&PeerRef::Id(id)).await {
            Ok(info) => Some((info.endpoints, info.nat)),
            Err(e) => {
                debug!(peer = %id, "lookup failed: {e}");
                None
            }
        };
        handle.submit(move |c| c.lookup_answered(id, answer)).await;
    });
}

// ---- control-socket requests, each in its own task ----

fn stopped(e: Stopped) -> ApiError {
    ApiError::new(ErrorCode::Failed, e.to_string())
}

/// Handles one control request.
pub async fn request<T: Tun>(ctx: &Arc<Context<T>>, h: &Handle<T>, req: Request) -> Response {
    match req {
        Request::Status => Ok(Reply::Status(Box::new(
            h.with(|c| c.status()).await.map_err(stopped)?,
        ))),
        Request::Peers => Ok(Reply::Peers(h.with(|c| c.peers()).await.map_err(stopped)?)),
        Request::TrustPending => Ok(Reply::Pending(
            h.with(|c| c.trust_pending()).await.map_err(stopped)?,
        )),
        Request::TrustList => Ok(Reply::TrustList(
            h.with(|c| c.trust_list()).await.map_err(stopped)?,
        )),
        Request::TrustRequest {
            peer,
            note,
            allow,
            expires_in_secs,
            want,
        } => {
            if note.len() > pilot_proto::messages::MAX_NOTE {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "the note is longer than {} bytes: shorten it",
                        pilot_proto::messages::MAX_NOTE
                    ),
                ));
            }
            let allow = grant_of(allow, expires_in_secs)?;
            trust_statement(ctx, h, &peer, StatementKind::request(note, allow, want)).await
        }
        Request::TrustApprove {
            peer,
            allow,
            expires_in_secs,
        } => {
            let allow = grant_of(allow, expires_in_secs)?;
            trust_statement(ctx, h, &peer, StatementKind::approve(allow)).await
        }
        Request::Explain { peer, traffic } => explain(ctx, h, &peer, traffic).await,
        Request::CertInstall { cert } => h
            .with(move |c| c.cert_install(&cert))
            .await
            .map_err(stopped)?
            .map(Reply::Cert),
        Request::CertShow => h
            .with(|c| c.cert_info())
            .await
            .map_err(stopped)?
            .map(Reply::Cert)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    "no certificate installed: `pilot-tun cert install <file>` installs the one `pilot-tun owner sign` wrote",
                )
            }),
        Request::PolicyAllow {
            owner,
            tag,
            ports,
            expires_in_secs,
        } => h
            .with(move |c| c.policy_allow(&owner, &tag, ports, expires_in_secs))
            .await
            .map_err(stopped)?
            .map(Reply::Rule),
        Request::PolicyList => Ok(Reply::Policy(
            h.with(|c| c.policy_list()).await.map_err(stopped)?,
        )),
        Request::PolicyRemove { id } => h
            .with(move |c| c.policy_remove(id))
            .await
            .map_err(stopped)?
            .map(Reply::Policy),
        Request::OwnerRevoke { revocation } => {
            owner_revoke(ctx, h, &revocation)
                .await
                .map(Reply::Revocation)
        }
        Request::TrustDeny { peer } => trust_statement(ctx, h, &peer, StatementKind::Deny).await,
        Request::TrustRevoke { peer } => {
            trust_statement(ctx, h, &peer, StatementKind::Revoke).await
        }
        Request::Ping { peer, count } => ping_request(ctx, h, &peer, count).await,
        Request::IdentityRotate => h
            .with(|c| c.rotate_identity())
            .await
            .map_err(stopped)?
            .map(Reply::Rotated),
        Request::Down => {
            ctx.stop.notify_one();
            Ok(Reply::Down(api::Stopping { stopping: true }))
        }
    }
}

/// The grant a `trust request|approve` asks for: `allow` (everything when
/// absent) until `expires_in_secs` from now.
fn grant_of(allow: Option<Scope>, expires_in_secs: Option<u64>) -> Result<Grant, ApiError> {
    let expires_at = match expires_in_secs {
        None => None,
        Some(0) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "an expiry must be in the future: give a lifetime such as 8h or 30d",
            ))
        }
        Some(s) if s > pilot_proto::cert::MAX_LIFETIME => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "a grant lasts at most {}: renew it by approving again",
                    pilot_proto::lifetime::format(pilot_proto::cert::MAX_LIFETIME)
                ),
            ))
        }
        Some(s) => Some(unix_now() + s),
    };
    let scope = allow.unwrap_or_else(Scope::all);
    if scope.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "a grant of nothing is a refusal: use `trust deny` or `trust revoke`",
        ));
    }
    Ok(Grant { scope, expires_at })
}

/// `explain`: whether `traffic` would pass each way with a known peer, and
/// what decides.
async fn explain<T: Tun>(
    ctx: &Arc<Context<T>>,
    h: &Handle<T>,
    peer: &str,
    traffic: Option<String>,
) -> Response {
    let parsed: Option<Traffic> = match &traffic {
        None => None,
        Some(t) => Some(t.parse().map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("{e}: give traffic as tcp/22, udp/53 or icmp"),
            )
        })?),
    };
    let info = resolve(ctx, h, peer).await?;
    let pid = info.identity.node_id();
    let now = unix_now();
    let found = h
        .with(move |c| c.trust.get(&pid).cloned())
        .await
        .map_err(stopped)?;
    let (state, inbound, outbound) = match &found {
        Some(r) => {
            let (i, o) = r.grants(now);
            (TrustState::of(r.ours, r.theirs), i, o)
        }
        None => (
            TrustState::None,
            EffectiveGrant::none(),
            EffectiveGrant::none(),
        ),
    };
    let side = |g: &EffectiveGrant| {
        let verdict = parsed.map(|t| g.decide(t, now));
        let decided_by = if state != TrustState::Trusted {
            format!("not trusted: {state}")
        } else {
            match verdict {
                Some(Decision::Allow(s)) => s.to_string(),
                Some(Decision::Deny(Denial::Revoked)) => "revoked".into(),
                Some(Decision::Deny(Denial::NotGranted)) => "not granted".into(),
                None => g
                    .parts()
                    .iter()
                    .map(|p| p.source.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        };
        api::DirectionExplained {
            scope: g.scope(now),
            until: g.valid_until(),
            passes: verdict
                .map(|v| state == TrustState::Trusted && matches!(v, Decision::Allow(_))),
            decided_by,
        }
    };
    Ok(Reply::Explain(api::Explanation {
        peer: info.identity.node_id().to_string(),
        hostname: info.hostname.clone(),
        address: info.address,
        state,
        traffic,
        inbound: side(&inbound),
        outbound: side(&outbound),
    }))
}

/// `owner revoke`: checks the revocation, hands it to the registry (which
/// sends it to every node online), and applies it here.
pub async fn owner_revoke<T: Tun>(
    ctx: &Arc<Context<T>>,
    h: &Handle<T>,
    text: &str,
) -> Result<api::RevocationReport, ApiError> {
    let invalid = |e: String| ApiError::new(ErrorCode::InvalidRequest, e);
    let r =
        Revocation::from_armored(text).map_err(|e| invalid(format!("not a revocation: {e}")))?;
    r.verify(&r.body.owner)
        .map_err(|e| invalid(format!("the revocation does not verify: {e}")))?;
    let bytes = r.to_bytes();
    let (delivered, delivery_error) = match ctx
        .link
        .call(&ctx.shared.udp, |req| ToRegistry::PublishRevocation {
            req,
            revocation: bytes.clone(),
        })
        .await
    {
        Ok(FromRegistry::Ok { .. }) => (true, None),
        Ok(FromRegistry::Error { message, .. }) => {
            (false, Some(crate::sanitize::printable(&message)))
        }
        Ok(_) => (
            false,
            Some("unexpected answer from the registry".to_string()),
        ),
        Err(e) => (false, Some(e.to_string())),
    };
    let (owner, node) = (r.body.owner, r.body.node);
    let (kept_here, withdrawn) = h
        .with(move |c| c.on_revocation(r))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Failed, e.to_string()))?;
    Ok(api::RevocationReport {
        owner: owner.to_string(),
        node_id: node.to_string(),
        delivered,
        delivery_error,
        kept_here,
        withdrawn: withdrawn.iter().map(|n| n.to_string()).collect(),
    })
}

/// Resolves a CLI peer name: the trust store first, then the registry.
async fn resolve<T: Tun>(
    ctx: &Context<T>,
    h: &Handle<T>,
    name: &str,
) -> Result<PeerInfo, ApiError> {
    let r: PeerRef = name.parse().unwrap_or(PeerRef::Name(name.into()));
    let wanted = r.clone();
    let local = h
        .with(move |c| c.find_local(&wanted))
        .await
        .map_err(stopped)?
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))?;
    if let Some(i) = local {
        return Ok(i);
    }
    ctx.lookup(&r).await.map_err(|e| {
        let away = LinkError::Unreachable(ctx.link.endpoint()).to_string();
        if !ctx.link.reachable() || e == away {
            ApiError::new(
                ErrorCode::RegistryUnreachable,
                format!("cannot find {name}: {e}"),
            )
        } else {
            ApiError::new(
                ErrorCode::UnknownPeer,
                format!("cannot find {name}: {e}; check the name (`pilot-tun trust list` shows the nodes this one knows), or name it by 10.x address or node id"),
            )
        }
    })
}

pub(crate) async fn trust_statement<T: Tun>(
    ctx: &Arc<Context<T>>,
    h: &Handle<T>,
    peer: &str,
    kind: StatementKind,
) -> Response {
    let info = resolve(ctx, h, peer).await?;
    let pid = info.identity.node_id();
    if pid == ctx.id {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{peer} is this node itself: name another node"),
        ));
    }
    if kind.approves()
        && h.with(move |c| c.fleet.is_revoked(&pid, &c.trust.ancestry(&pid)))
            .await
            .map_err(stopped)?
    {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{pid} was revoked by its owner: it cannot be approved here again"),
        ));
    }
    // A record the trust store would refuse (an address or key another
    // peer has) is refused before anything is signed or sent.
    let (identity, address) = (info.identity.clone(), info.address);
    if let Err(e) = h
        .with(move |c| c.trust.admissible(&identity, address))
        .await
        .map_err(stopped)?
    {
        warn!(peer = %pid, "trust record refused: {e}");
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("refused {pid}: {e}"),
        ));
    }
    let seq = h
        .with(|c| c.next_seq())
        .await
        .map_err(stopped)?
        .map_err(|e| ApiError::new(ErrorCode::Failed, e.to_string()))?;
    let statement = Signed::sign(
        Statement {
            kind: kind.clone(),
            from: ctx.identity.public(),
            to: pid,
            seq,
        },
        &ctx.identity,
    );
    let grants = kind.approves();
    let record = |info: PeerInfo, kind: StatementKind| async move {
        h.with_fx(move |c| c.record(&info, &kind))
            .await
            .map_err(stopped)
            .and_then(|r| r)
    };
    // Withdrawing trust takes effect locally first, whatever the registry
    // does, and is queued on disk until the registry has it (so it stops
    // handing our endpoints to the peer); granting it is recorded only
    // once the registry has it.
    let mut change = None;
    if !grants {
        change = Some(record(info.clone(), kind.clone()).await?);
        let queued = statement.clone();
        h.with_fx(move |c| {
            let r = c.queue_withdrawal(queued.clone());
            // Peers that trust the subject pass it on, in case the
            // registry is away.
            let out = c.gossip.withdrawal(&c.tunnels, &queued, Instant::now());
            (
                r,
                Effects {
                    out,
                    ..Effects::default()
                },
            )
        })
        .await
        .map_err(stopped)?
        .map_err(|e| ApiError::new(ErrorCode::Failed, e.to_string()))?;
    }
    let delivered = send_statement(ctx, &statement).await;
    if delivered.is_ok() {
        let _ = h.with(move |c| c.delivered(pid, seq)).await;
    }
    let delivered = delivered.map_err(|e| {
        let code = match &e {
            LinkError::Unreachable(_) => ErrorCode::RegistryUnreachable,
            LinkError::Refused {
                code: pilot_proto::messages::ErrorCode::NotFound,
                ..
            } => ErrorCode::UnknownPeer,
            LinkError::Refused { .. } | LinkError::Protocol | LinkError::Assignment(_) => {
                ErrorCode::Failed
            }
        };
        let text = match grants {
            true => e.to_string(),
            false => format!("{e}; it will be sent again until the registry has it"),
        };
        (code, text)
    });
    if grants {
        if let Err((code, e)) = delivered {
            return Err(ApiError::new(
                code,
                format!("{} not sent, nothing changed: {e}", kind.name()),
            ));
        }
        change = Some(record(info.clone(), kind.clone()).await?);
    }
    let trusted = change.is_some_and(|c| c.now_trusted);
    let state = h
        .with(move |c| {
            c.trust
                .get(&pid)
                .map(|r| TrustState::of(r.ours, r.theirs))
                .unwrap_or(TrustState::None)
        })
        .await
        .map_err(stopped)?;
    let mut details = statement_details(&statement, &pid.to_string());
    details["hostname"] = serde_json::json!(info.hostname);
    details["address"] = info.address.to_string().into();
    details["delivered"] = delivered.is_ok().into();
    details["state"] = state.to_string().into();
    let name = kind.name();
    let _ = h.with(move |c| c.record_audit(name, details)).await;
    Ok(Reply::Trust(api::TrustChange {
        peer: pid.to_string(),
        hostname: info.hostname,
        address: info.address,
        state,
        trusted,
        delivered: delivered.is_ok(),
        delivery_error: delivered.err().map(|(_, e)| e),
    }))
}

/// Hands a signed statement of ours to the registry.
///
/// The statement carries a sequence number never used before, so when a
/// resent copy is answered "replayed", the registry holds an earlier copy
/// of this very statement (its answer was lost or late): that is success.
async fn send_statement<T: Tun>(ctx: &Context<T>, st: &Signed<Statement>) -> Result<(), LinkError> {
    let (sent, sends) = ctx
        .link
        .call_counted(&ctx.shared.udp, |req| ToRegistry::Statement {
            req,
            statement: st.clone(),
        })
        .await;
    match sent {
        Ok(FromRegistry::Ok { .. }) => Ok(()),
        Err(LinkError::Refused {
            code: pilot_proto::messages::ErrorCode::Replayed,
            ..
        }) if sends > 1 => {
            debug!(peer = %st.body.to, "statement answered 'replayed' after a resend: the first copy was stored");
            Ok(())
        }
        Ok(_) => Err(LinkError::Protocol),
        Err(e) => Err(e),
    }
}

/// Sends again the withdrawals the registry has not acknowledged. One it
/// now has, or has something newer than (it answers "replayed": our
/// sequence numbers are never reused), is forgotten; one it refuses
/// outright is dropped with a warning; the rest wait for the next round.
pub async fn flush_outbox<T: Tun>(ctx: &Context<T>, h: &Handle<T>) {
    let Ok(queued) = h.with(|c| c.node_state.outbox.clone()).await else {
        return;
    };
    for st in queued {
        let (to, seq, kind) = (st.body.to, st.body.seq, st.body.kind.name());
        let mut details = statement_details(&st, &to.to_string());
        let entry = match send_statement(ctx, &st).await {
            Ok(()) => {
                info!(peer = %to, kind, "queued trust statement delivered");
                "statement-delivered"
            }
            Err(LinkError::Refused {
                code: pilot_proto::messages::ErrorCode::Replayed,
                ..
            }) => {
                info!(peer = %to, kind, "queued trust statement was already delivered");
                "statement-delivered"
            }
            Err(e @ LinkError::Refused { .. }) => {
                warn!(peer = %to, kind, "the registry refused a queued trust statement, dropping it: {e}");
                details["reason"] = e.to_string().into();
                "statement-dropped"
            }
            Err(_) => return, // unreachable: the next round tries again
        };
        let _ = h.with(move |c| c.record_audit(entry, details)).await;
        let _ = h.with(move |c| c.delivered(to, seq)).await;
    }
}

async fn ping_request<T: Tun>(
    ctx: &Arc<Context<T>>,
    h: &Handle<T>,
    peer: &str,
    count: u32,
) -> Response {
    let info = resolve(ctx, h, peer).await?;
    let id = info.identity.node_id();
    if !h
        .with(move |c| c.tunnels.contains(&id))
        .await
        .map_err(stopped)?
    {
        return Err(ApiError::new(
            ErrorCode::NotTrusted,
            format!(
                "{peer} is not trusted (both sides must approve: `pilot-tun trust request {peer}`)"
            ),
        ));
    }
    let mut rtts = vec![];
    for i in 0..count.clamp(1, api::MAX_PING_COUNT) {
        // The first echo may wait for a handshake (and a relay fallback).
        let timeout = if i == 0 {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        let (tx, rx) = oneshot::channel();
        let sent = Instant::now();
        let started = h
            .with_fx(move |c| {
                let ctx = c.ctx.clone();
                match c.tunnels.ping(&ctx, &id, tx, sent) {
                    Some(fx) => (true, fx),
                    None => (false, Effects::default()),
                }
            })
            .await
            .map_err(stopped)?;
        let rtt = match (started, tokio::time::timeout(timeout, rx).await) {
            (true, Ok(Ok(t))) => Some(t.saturating_duration_since(sent)),
            _ => None,
        };
        if let Some(rtt) = rtt {
            let _ = h.with(move |c| c.tunnels.set_rtt(&id, rtt)).await;
        }
        rtts.push(rtt.map(|d| d.as_secs_f64() * 1000.0));
        if i + 1 < count {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (path, relay_reason) = h
        .with(move |c| {
            c.tunnels
                .peers()
                .get(&id)
                .map(|rt| {
                    (
                        rt.data.endpoint().map(api::Endpoint::from),
                        rt.machine.relay_reason().map(|r| r.text().to_string()),
                    )
                })
                .unwrap_or((None, None))
        })
        .await
        .map_err(stopped)?;
    Ok(Reply::Ping(api::PingReport {
        peer: id.to_string(),
        hostname: info.hostname,
        address: info.address,
        path,
        relay_reason,
        rtt_ms: rtts,
    }))
}
