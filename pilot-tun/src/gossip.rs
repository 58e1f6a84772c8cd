//! Gossip on the node: what lets trusted peers find each other and hear of
//! revocations while the registry is away. The messages and the rules for
//! taking them are in [`pilot_proto::gossip`]; this part knows the node's
//! own endpoints, which peers have a live session (gossip goes only through
//! tunnels, so only to peers that trust us and that we trust), and seals
//! what goes out. Owned by the control task; no I/O here.
//!
//! - Our signed endpoint record goes to each peer when a session with it
//!   comes up, and to every live peer when our endpoints change (checked
//!   every [`TICK`]).
//! - A lookup the registry cannot answer asks the live peers "where is"
//!   the node, with its signed approval of us as the proof; an answer feeds
//!   the peer's tunnel as a registry answer would.
//! - A withdrawal of trust we made goes to every live peer at once and
//!   again every [`PASS_AGAIN`] while the registry has not taken it; a peer
//!   that trusts its subject passes it on.
//! - An owner's revocation new here goes to the live peers whose
//!   certificate the same owner signed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pilot_proto::gossip::{Book, EndpointRecord, Gossip, PassAction, Refused};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{NatType, Signed, Statement, MAX_ENDPOINTS};
use tracing::debug;

use crate::api::GossipStatus;
use crate::context::{local_endpoints, Context};
use crate::tun::Tun;
use crate::tunnels::{Outgoing, Tunnels};

/// How often the node checks its own endpoints and who still lacks its
/// record.
pub const TICK: Duration = Duration::from_secs(2);
/// A withdrawal the registry has not taken yet is handed to the live
/// peers again this often.
pub const PASS_AGAIN: Duration = Duration::from_secs(10);
/// A peer the registry could not find is asked about (every
/// [`pilot_proto::gossip::ASK_EVERY`], of the peers live then) for this
/// long after the failed lookup; the tunnel's next lookup renews it.
pub const LOST_FOR: Duration = Duration::from_secs(60);

/// Most peers asked about at once.
const MAX_LOST: usize = 1024;
/// Most live peers one "where is" round asks.
pub const ASK_FANOUT: usize = 8;

/// What a gossip message asks of the control task beyond sending.
#[derive(Default)]
pub struct Heard {
    /// Datagrams to send.
    pub out: Vec<Outgoing>,
    /// A peer without a session was found: hand these to its tunnel.
    pub found: Option<(NodeId, Vec<SocketAddr>, NatType)>,
    /// A withdrawal about us, to apply through the trust store.
    pub apply: Option<Signed<Statement>>,
    /// An owner's revocation, to check against our rules (and pass on if
    /// it is new here).
    pub owner_revoked: Option<Vec<u8>>,
}

/// The node's gossip state.
pub struct NodeGossip {
    /// Off with `--no-gossip`: nothing is sent and nothing taken.
    pub enabled: bool,
    book: Book,
    own: Option<Signed<EndpointRecord>>,
    sent_to: HashSet<NodeId>,
    last_pass: Option<Instant>,
    /// Peers the registry could not find, with when and the proof to ask
    /// with.
    lost: HashMap<NodeId, (Instant, Signed<Statement>)>,
    /// Datagrams queued by [`NodeGossip::owner_revocation`].
    later: Vec<Outgoing>,
    /// Where the next "where is" round starts among the live peers.
    ask_round: usize,
    /// What happened so far (`records` is filled in by
    /// [`NodeGossip::status`]).
    pub counts: GossipStatus,
}

impl NodeGossip {
    /// What `status` shows (nothing while gossip is off).
    pub fn status(&self) -> Option<GossipStatus> {
        self.enabled.then(|| GossipStatus {
            records: self.book.len() as u64,
            ..self.counts.clone()
        })
    }

    /// The state of node `me`.
    pub fn new(me: NodeId, enabled: bool) -> Self {
        NodeGossip {
            enabled,
            book: Book::new(me),
            own: None,
            sent_to: HashSet::new(),
            last_pass: None,
            lost: HashMap::new(),
            later: Vec::new(),
            ask_round: 0,
            counts: GossipStatus::default(),
        }
    }

    /// Our endpoints as peers should try them: a mapped port first, then
    /// the public endpoint the registry saw (behind a NAT), then our
    /// interfaces'.
    fn own_endpoints<T: Tun>(ctx: &Context<T>) -> (Vec<SocketAddr>, NatType) {
        let bound = ctx.shared.udp.local_addr().ok();
        let port = bound.map(|a| a.port()).unwrap_or(0);
        let nat = ctx.mapped_nat(*ctx.nat.lock());
        let mut eps = Vec::new();
        if let Some(m) = ctx.mapped.lock().as_ref().map(|m| m.external) {
            eps.push(m);
        }
        if !matches!(nat, NatType::None) {
            eps.extend(ctx.link.observed());
        }
        // A socket bound to one address (`--listen`) is reached there
        // only; one bound to any, on every interface.
        let locals = match bound {
            Some(b) if !b.ip().is_unspecified() => vec![b],
            _ => local_endpoints(port, ctx.shared.udp.is_ipv6()),
        };
        for e in locals {
            if !eps.contains(&e) {
                eps.push(e);
            }
        }
        eps.truncate(MAX_ENDPOINTS);
        (eps, nat)
    }

    /// Signs a new record of ours if our endpoints changed. True if so.
    fn refresh_own<T: Tun>(&mut self, ctx: &Context<T>) -> bool {
        let (endpoints, nat) = Self::own_endpoints(ctx);
        if self
            .own
            .as_ref()
            .is_some_and(|o| o.body.endpoints == endpoints && o.body.nat == nat)
        {
            return false;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seq = now_ms.max(self.own.as_ref().map_or(0, |o| o.body.seq + 1));
        debug!(?endpoints, seq, "own endpoint record signed");
        self.own = Some(Signed::sign(
            EndpointRecord {
                node: ctx.identity.public(),
                endpoints,
                nat,
                seq,
            },
            &ctx.identity,
        ));
        self.sent_to.clear();
        true
    }

    /// The periodic work: our record to every live peer that lacks it (all
    /// of them after our endpoints changed), withdrawals from `outbox`
    /// handed on again, and records of nodes no longer trusted dropped.
    pub fn tick<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        tunnels: &Tunnels,
        outbox: &[Signed<Statement>],
        now: Instant,
    ) -> Vec<Outgoing> {
        if !self.enabled {
            return vec![];
        }
        self.book.retain(|id| tunnels.contains(id));
        self.sent_to.retain(|id| tunnels.contains(id));
        self.refresh_own(ctx);
        let mut out = vec![];
        if let Some(msg) = self.own.as_ref().and_then(own_message) {
            for id in live(tunnels, now) {
                if !self.sent_to.contains(&id) {
                    if let Some(o) = seal_to(tunnels, &id, &msg, now) {
                        out.push(o);
                        self.sent_to.insert(id);
                    }
                }
            }
        }
        // Peers still lost: ask the peers live now (throttled per node).
        self.lost.retain(|id, (since, _)| {
            let found = tunnels
                .peers()
                .get(id)
                .is_some_and(|rt| rt.data.current(now).is_some());
            tunnels.contains(id) && !found && now.saturating_duration_since(*since) < LOST_FOR
        });
        let lost: Vec<(NodeId, Signed<Statement>)> = self
            .lost
            .iter()
            .map(|(id, (_, proof))| (*id, proof.clone()))
            .collect();
        for (id, proof) in lost {
            out.extend(self.ask(tunnels, &id, proof, now));
        }
        let due = self
            .last_pass
            .is_none_or(|t| now.saturating_duration_since(t) >= PASS_AGAIN);
        if !outbox.is_empty() && due {
            self.last_pass = Some(now);
            for st in outbox {
                out.extend(self.pass_out(tunnels, st, now));
            }
        }
        out
    }

    /// A session with `id` came up: our record goes to it now.
    pub fn established<T: Tun>(
        &mut self,
        ctx: &Context<T>,
        tunnels: &Tunnels,
        id: &NodeId,
        now: Instant,
    ) -> Option<Outgoing> {
        if !self.enabled {
            return None;
        }
        if self.own.is_none() {
            self.refresh_own(ctx);
        }
        let msg = own_message(self.own.as_ref()?)?;
        let o = seal_to(tunnels, id, &msg, now)?;
        self.sent_to.insert(*id);
        Some(o)
    }

    /// A withdrawal we just made: to every live peer (its subject
    /// included, if it is one).
    pub fn withdrawal(
        &mut self,
        tunnels: &Tunnels,
        st: &Signed<Statement>,
        now: Instant,
    ) -> Vec<Outgoing> {
        if !self.enabled {
            return vec![];
        }
        self.last_pass = Some(now);
        self.pass_out(tunnels, st, now)
    }

    /// An owner's revocation new here: to the live peers `entitled` to it
    /// (those whose certificate the same owner signed).
    pub fn owner_revocation(
        &mut self,
        tunnels: &Tunnels,
        bytes: Vec<u8>,
        entitled: impl Fn(&NodeId) -> bool,
        now: Instant,
    ) {
        if !self.enabled {
            return;
        }
        let Some(msg) = Gossip::OwnerRevoked(bytes).to_control() else {
            return;
        };
        let out: Vec<Outgoing> = live(tunnels, now)
            .filter(|id| entitled(id))
            .filter_map(|id| seal_to(tunnels, &id, &msg, now))
            .collect();
        self.counts.passed_on += out.len() as u64;
        self.later.extend(out);
    }

    /// What was queued to send outside a message's own effects (owner
    /// revocations, decided deep in the fleet code).
    pub fn take_later(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.later)
    }

    fn pass_out(&self, tunnels: &Tunnels, st: &Signed<Statement>, now: Instant) -> Vec<Outgoing> {
        let Some(msg) = Gossip::Pass(st.clone()).to_control() else {
            return vec![];
        };
        live(tunnels, now)
            .filter_map(|id| seal_to(tunnels, &id, &msg, now))
            .collect()
    }

    /// The registry could not say where `target` is. Returns the record we
    /// hold of it, if any (it may be stale), and the "where is" questions
    /// for the live peers (none without `proof`, `target`'s approval of
    /// us, or within [`pilot_proto::gossip::ASK_EVERY`] of the last).
    pub fn lookup_failed(
        &mut self,
        tunnels: &Tunnels,
        target: &NodeId,
        proof: Option<Signed<Statement>>,
        now: Instant,
    ) -> (Option<(Vec<SocketAddr>, NatType)>, Vec<Outgoing>) {
        if !self.enabled {
            return (None, vec![]);
        }
        let held = self
            .book
            .record(target)
            .map(|r| (r.body.endpoints.clone(), r.body.nat));
        let Some(proof) = proof else {
            return (held, vec![]);
        };
        if self.lost.len() < MAX_LOST || self.lost.contains_key(target) {
            self.lost.insert(*target, (now, proof.clone()));
        }
        (held, self.ask(tunnels, target, proof, now))
    }

    /// "Where is `target`" to every live peer but `target`, unless asked
    /// within [`pilot_proto::gossip::ASK_EVERY`] (or nobody is live).
    fn ask(
        &mut self,
        tunnels: &Tunnels,
        target: &NodeId,
        proof: Signed<Statement>,
        now: Instant,
    ) -> Vec<Outgoing> {
        let mut peers: Vec<NodeId> = live(tunnels, now).filter(|id| id != target).collect();
        if peers.is_empty() || !self.book.may_ask(target, now) {
            return vec![];
        }
        let Some(msg) = (Gossip::Where { proof }).to_control() else {
            return vec![];
        };
        // At most ASK_FANOUT peers a round, other ones each round (in a
        // large fleet a question must not cost a datagram per peer).
        peers.sort_unstable();
        let start = self.ask_round % peers.len();
        self.ask_round = self.ask_round.wrapping_add(ASK_FANOUT);
        let out: Vec<Outgoing> = peers
            .iter()
            .cycle()
            .skip(start)
            .take(peers.len().min(ASK_FANOUT))
            .filter_map(|id| seal_to(tunnels, id, &msg, now))
            .collect();
        debug!(peer = %target, asked = out.len(), "registry unreachable: asking trusted peers where the peer is");
        out
    }

    /// A gossip message from peer `from` (it came through `from`'s tunnel).
    pub fn on_message(
        &mut self,
        tunnels: &Tunnels,
        from: &NodeId,
        msg: &[u8],
        now: Instant,
    ) -> Heard {
        let mut heard = Heard::default();
        if !self.enabled {
            return heard;
        }
        let result = self
            .book
            .read(from, msg, now)
            .and_then(|g| self.take(tunnels, from, g, now, &mut heard));
        match result {
            Ok(()) | Err(Refused::Duplicate) => {}
            Err(why) => {
                self.counts.refused += 1;
                debug!(peer = %from, "gossip refused: {why}");
            }
        }
        heard
    }

    fn take(
        &mut self,
        tunnels: &Tunnels,
        from: &NodeId,
        g: Gossip,
        now: Instant,
        heard: &mut Heard,
    ) -> Result<(), Refused> {
        match g {
            Gossip::Endpoints(rec) => {
                let (eps, nat) = (rec.body.endpoints.clone(), rec.body.nat);
                let node = self.book.accept(rec, |id| tunnels.contains(id))?;
                self.counts.records_taken += 1;
                let live = tunnels
                    .peers()
                    .get(&node)
                    .is_some_and(|rt| rt.data.current(now).is_some());
                if !live {
                    self.counts.found += 1;
                    debug!(peer = %node, via = %from, "peer's endpoints heard from a trusted peer");
                    heard.found = Some((node, eps, nat));
                }
            }
            Gossip::Where { proof } => {
                let rec = self.book.answer(from, &proof)?;
                if let Some(o) = Gossip::Endpoints(rec)
                    .to_control()
                    .and_then(|m| seal_to(tunnels, from, &m, now))
                {
                    self.counts.answered += 1;
                    heard.out.push(o);
                }
            }
            Gossip::OwnerRevoked(bytes) => heard.owner_revoked = Some(bytes),
            Gossip::Pass(st) => match self.book.pass(from, &st, |id| tunnels.contains(id))? {
                PassAction::Apply => {
                    self.counts.applied += 1;
                    heard.apply = Some(st);
                }
                PassAction::Forward(to) => {
                    if let Some(o) = Gossip::Pass(st.clone())
                        .to_control()
                        .and_then(|m| seal_to(tunnels, &to, &m, now))
                    {
                        self.book.mark_passed(&st);
                        self.counts.passed_on += 1;
                        heard.out.push(o);
                    }
                }
            },
        }
        Ok(())
    }
}

fn own_message(rec: &Signed<EndpointRecord>) -> Option<Vec<u8>> {
    Gossip::Endpoints(rec.clone()).to_control()
}

/// Trusted peers with a session we can send on now.
fn live(tunnels: &Tunnels, now: Instant) -> impl Iterator<Item = NodeId> + '_ {
    tunnels
        .peers()
        .iter()
        .filter(move |(_, rt)| rt.data.current(now).is_some() && rt.data.endpoint().is_some())
        .map(|(id, _)| *id)
}

/// `msg` sealed for `id`'s current session and path.
fn seal_to(tunnels: &Tunnels, id: &NodeId, msg: &[u8], now: Instant) -> Option<Outgoing> {
    let rt = tunnels.peers().get(id)?;
    let session = rt.data.current(now)?;
    let to = rt.data.endpoint()?;
    Some(Outgoing {
        bytes: crate::pathmtu::seal_control(&session, msg)?,
        to,
        peer: *id,
        hop_limit: None,
    })
}
