//! Gossip among trusted peers: what lets the network heal while the
//! registry is away.
//!
//! Three messages travel inside a tunnel, as in-tunnel control messages
//! (first byte [`CTL_GOSSIP`], then the postcard encoding of [`Gossip`]):
//!
//! - [`Gossip::Endpoints`]: a node's own endpoints, signed by the node with
//!   a sequence number (unix milliseconds), so an old record cannot be
//!   replayed over a newer one. A node sends its record to every peer with
//!   a live session when the session comes up and when its endpoints
//!   change; each receiver keeps the newest record of each peer *it*
//!   trusts, and of no one else.
//! - [`Gossip::Where`]: "where is N?", asked of the peers with a live
//!   session when the registry cannot answer a lookup. It carries N's
//!   signed approval of the asker: a peer answers with N's record only when
//!   that proof holds (signed by N, naming the asker, granting trust), so
//!   nobody learns the endpoints of a node that has not approved it, and a
//!   peer never tells who else it knows.
//! - [`Gossip::Pass`]: a withdrawal (revoke or deny) signed by its origin,
//!   handed to the origin's peers to pass on to its subject. A forwarder
//!   takes it only from its signer (one hop, no floods) and passes it only
//!   to a peer it trusts itself; the subject applies it as if the registry
//!   had delivered it (same signature and sequence checks).
//!
//! - [`Gossip::OwnerRevoked`]: an owner's signed revocation of a node,
//!   handed on to the peers whose certificate the same owner signed; each
//!   checks it against its own rules, and only one it did not hold yet
//!   goes further.
//!
//! Gossip never creates trust: records are accepted only from peers the
//! receiver already trusts, the only trust statements it carries withdraw
//! trust, and a forwarder adds nothing of its own. Every message is checked
//! here, sans-IO; the node does the sending.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, PublicIdentity};
use crate::messages::{NatType, Signable, Signed, Statement, StatementKind, MAX_ENDPOINTS};
use crate::ratelimit::RateLimiter;

/// In-tunnel control type byte of a gossip message.
pub const CTL_GOSSIP: u8 = 0x05;
/// Largest gossip message (type byte included), so one always fits one
/// tunnel datagram at the smallest overlay MTU.
pub const MAX_GOSSIP: usize = 1100;
/// Gossip messages taken from one peer per second, and in a burst.
pub const PEER_RATE: u32 = 10;
/// See [`PEER_RATE`].
pub const PEER_BURST: u32 = 40;
/// A "where is" for one node is asked at most this often.
pub const ASK_EVERY: Duration = Duration::from_secs(3);
/// Withdrawals remembered for deduplication (then forgotten all at once;
/// the sequence check at the subject still refuses a repeat).
const MAX_PASSED: usize = 4096;

const ENDPOINTS_DOMAIN: &[u8] = b"pilot-tun/v1/gossip-endpoints";

/// Where a node says it can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The node (must be the signer).
    pub node: PublicIdentity,
    /// Its UDP endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Its NAT type as it measured it.
    pub nat: NatType,
    /// Grows with every record the node makes (unix milliseconds).
    pub seq: u64,
}

impl Signable for EndpointRecord {
    const DOMAIN: &'static [u8] = ENDPOINTS_DOMAIN;
    fn signer(&self) -> &PublicIdentity {
        &self.node
    }
}

/// A gossip message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gossip {
    /// A node's signed endpoints: the sender's own, or an answer to
    /// [`Gossip::Where`].
    Endpoints(Signed<EndpointRecord>),
    /// "Where is the signer of `proof`?", with its approval of the asker.
    Where {
        /// The approval the asked-about node signed for the asker.
        proof: Signed<Statement>,
    },
    /// A withdrawal for its subject, from its signer.
    Pass(Signed<Statement>),
    /// An owner's revocation of a node ([`crate::cert::Revocation::to_bytes`]),
    /// for the peers whose certificate that owner signed. Each receiver
    /// checks it against its own rules and passes on only one it did not
    /// hold, so it spreads through a fleet once. Added last, so the
    /// messages above keep their encoding.
    OwnerRevoked(Vec<u8>),
}

/// Why a gossip message was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Too long, or not gossip, or not decodable.
    #[error("malformed gossip")]
    Malformed,
    /// The sender sends more than [`PEER_RATE`] a second.
    #[error("sender over its gossip rate")]
    Rate,
    /// A signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A record of a node we do not trust, or of ourselves.
    #[error("record of a node we do not trust")]
    NotTrusted,
    /// Older than the record we hold, or as old and different.
    #[error("not newer than the record held")]
    Old,
    /// The very record we hold, again (a peer sends its record at every
    /// handshake): nothing wrong, nothing new.
    #[error("the record held, again")]
    Duplicate,
    /// A proof that does not name the asker, does not grant trust, or
    /// names the asker as its own signer.
    #[error("proof does not entitle the asker")]
    NotEntitled,
    /// Nothing known about the node asked for.
    #[error("no record of that node")]
    Unknown,
    /// A statement that grants trust, or one not passed by its signer.
    #[error("only withdrawals, from their signer, are passed on")]
    NotWithdrawal,
    /// A withdrawal already passed on.
    #[error("already passed on")]
    Repeated,
    /// A withdrawal for a peer we do not trust.
    #[error("subject not trusted here")]
    NoRoute,
}

impl Gossip {
    /// The in-tunnel control message: type byte and encoding. `None` if it
    /// would not fit [`MAX_GOSSIP`] (too many endpoints, never in
    /// practice).
    pub fn to_control(&self) -> Option<Vec<u8>> {
        let out = vec![CTL_GOSSIP];
        postcard::to_extend(self, out)
            .ok()
            .filter(|v: &Vec<u8>| v.len() <= MAX_GOSSIP)
    }

    /// Reads an in-tunnel control message; trailing bytes are refused.
    pub fn from_control(msg: &[u8]) -> Result<Gossip, Refused> {
        if msg.len() > MAX_GOSSIP || msg.first() != Some(&CTL_GOSSIP) {
            return Err(Refused::Malformed);
        }
        match postcard::take_from_bytes::<Gossip>(&msg[1..]) {
            Ok((g, [])) => Ok(g),
            _ => Err(Refused::Malformed),
        }
    }
}

/// What to do with a withdrawal that was passed to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassAction {
    /// It is about us: apply it (the trust store checks it again).
    Apply,
    /// Send it on to its subject, a peer we trust.
    Forward(NodeId),
}

/// The gossip state of one node: the newest record of each trusted peer,
/// the rate limits, and what was asked and passed lately. The caller says
/// who is trusted (it owns the trust store) and does the sending.
#[derive(Debug)]
pub struct Book {
    me: NodeId,
    records: HashMap<NodeId, Signed<EndpointRecord>>,
    asked: HashMap<NodeId, Instant>,
    passed: HashMap<(NodeId, NodeId), u64>,
    rate: RateLimiter<NodeId>,
}

impl Book {
    /// An empty book for node `me`.
    pub fn new(me: NodeId) -> Self {
        Book {
            me,
            records: HashMap::new(),
            asked: HashMap::new(),
            passed: HashMap::new(),
            rate: RateLimiter::new(PEER_RATE, PEER_BURST),
        }
    }

    /// Reads a gossip message from peer `from` (authenticated by its
    /// tunnel), within `from`'s rate.
    pub fn read(&mut self, from: &NodeId, msg: &[u8], now: Instant) -> Result<Gossip, Refused> {
        if !self.rate.allow(from, now) {
            return Err(Refused::Rate);
        }
        Gossip::from_control(msg)
    }

    /// Takes a node's record if it is signed by the node, the node is one
    /// we trust (`trusted`), and it is newer than the one held. Returns the
    /// record's node id.
    pub fn accept(
        &mut self,
        rec: Signed<EndpointRecord>,
        trusted: impl Fn(&NodeId) -> bool,
    ) -> Result<NodeId, Refused> {
        let node = rec.body.node.node_id();
        if node == self.me || !trusted(&node) {
            return Err(Refused::NotTrusted);
        }
        if rec.body.endpoints.len() > MAX_ENDPOINTS {
            return Err(Refused::Malformed);
        }
        if let Some(held) = self.records.get(&node) {
            if held == &rec {
                return Err(Refused::Duplicate);
            }
            if held.body.seq >= rec.body.seq {
                return Err(Refused::Old);
            }
        }
        if !rec.verify() {
            return Err(Refused::BadSignature);
        }
        self.records.insert(node, rec);
        Ok(node)
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True if no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The newest record held of `node`.
    pub fn record(&self, node: &NodeId) -> Option<&Signed<EndpointRecord>> {
        self.records.get(node)
    }

    /// Forgets a node (no longer trusted, or gone).
    pub fn forget(&mut self, node: &NodeId) {
        self.records.remove(node);
        self.asked.remove(node);
    }

    /// Keeps only the records of nodes still trusted.
    pub fn retain(&mut self, trusted: impl Fn(&NodeId) -> bool) {
        self.records.retain(|id, _| trusted(id));
    }

    /// The answer to `asker`'s "where is": the record of the proof's signer,
    /// if the proof is that node's approval of the asker and we hold one.
    pub fn answer(
        &self,
        asker: &NodeId,
        proof: &Signed<Statement>,
    ) -> Result<Signed<EndpointRecord>, Refused> {
        let target = proof.body.from.node_id();
        if &proof.body.to != asker || target == *asker || !proof.body.kind.approves() {
            return Err(Refused::NotEntitled);
        }
        // A withdrawal we passed on since outranks the proof.
        if self
            .passed
            .get(&(target, *asker))
            .is_some_and(|s| *s > proof.body.seq)
        {
            return Err(Refused::NotEntitled);
        }
        let Some(rec) = self.records.get(&target) else {
            return Err(Refused::Unknown);
        };
        if !proof.verify() {
            return Err(Refused::BadSignature);
        }
        Ok(rec.clone())
    }

    /// True if a "where is" for `node` may go out now (at most one per
    /// [`ASK_EVERY`]); records the asking.
    pub fn may_ask(&mut self, node: &NodeId, now: Instant) -> bool {
        match self.asked.get(node) {
            Some(t) if now.saturating_duration_since(*t) < ASK_EVERY => false,
            _ => {
                if self.asked.len() >= MAX_PASSED {
                    self.asked.clear();
                }
                self.asked.insert(*node, now);
                true
            }
        }
    }

    /// What to do with a withdrawal peer `from` passed to us: it must be
    /// signed by `from` itself, withdraw trust, and be new; it is applied
    /// if it is about us and forwarded if it is about a peer we trust.
    pub fn pass(
        &mut self,
        from: &NodeId,
        st: &Signed<Statement>,
        trusted: impl Fn(&NodeId) -> bool,
    ) -> Result<PassAction, Refused> {
        let signer = st.body.from.node_id();
        let withdraws = matches!(st.body.kind, StatementKind::Revoke | StatementKind::Deny);
        let subject = st.body.to;
        // About us, it may come from the signer or from a forwarder (the
        // signature is the signer's either way); to be passed on, only
        // from its signer.
        if !withdraws || (subject != self.me && &signer != from) {
            return Err(Refused::NotWithdrawal);
        }
        if subject != self.me && !trusted(&subject) {
            return Err(Refused::NoRoute);
        }
        let key = (signer, subject);
        if self.passed.get(&key).is_some_and(|s| *s >= st.body.seq) {
            return Err(Refused::Repeated);
        }
        if !st.verify() {
            return Err(Refused::BadSignature);
        }
        if subject == self.me {
            self.mark_passed(st);
            Ok(PassAction::Apply)
        } else {
            // Recorded by the caller once it could send it on
            // ([`Book::mark_passed`]): without a session to the subject
            // now, the signer's next copy may get through.
            Ok(PassAction::Forward(subject))
        }
    }

    /// Records that a withdrawal was passed on (or applied), so a repeat
    /// is refused and an older approval no longer entitles its subject.
    pub fn mark_passed(&mut self, st: &Signed<Statement>) {
        if self.passed.len() >= MAX_PASSED {
            self.passed.clear();
        }
        let key = (st.body.from.node_id(), st.body.to);
        let seq = self.passed.entry(key).or_insert(0);
        *seq = (*seq).max(st.body.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    fn record(of: &Identity, seq: u64, port: u16) -> Signed<EndpointRecord> {
        Signed::sign(
            EndpointRecord {
                node: of.public(),
                endpoints: vec![SocketAddr::from(([198, 51, 100, 7], port))],
                nat: NatType::None,
                seq,
            },
            of,
        )
    }

    fn statement(
        from: &Identity,
        to: &Identity,
        kind: StatementKind,
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

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let (a, b) = (id(1), id(2));
        for g in [
            Gossip::Endpoints(record(&a, 5, 4000)),
            Gossip::Where {
                proof: statement(&a, &b, StatementKind::Approve, 3),
            },
            Gossip::Pass(statement(&a, &b, StatementKind::Revoke, 4)),
            Gossip::OwnerRevoked(vec![1, 2, 3]),
        ] {
            let bytes = g.to_control().unwrap();
            assert_eq!(bytes[0], CTL_GOSSIP);
            assert!(bytes.len() <= MAX_GOSSIP);
            assert_eq!(Gossip::from_control(&bytes), Ok(g));
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert_eq!(Gossip::from_control(&trailing), Err(Refused::Malformed));
            for cut in 0..bytes.len() {
                assert!(Gossip::from_control(&bytes[..cut]).is_err());
            }
        }
        assert_eq!(Gossip::from_control(&[0x01, 0]), Err(Refused::Malformed));
        assert_eq!(
            Gossip::from_control(&vec![CTL_GOSSIP; MAX_GOSSIP + 1]),
            Err(Refused::Malformed)
        );
    }

    #[test]
    fn records_only_of_trusted_nodes_signed_by_them_and_newer() {
        let (me, b, stranger) = (id(1), id(2), id(3));
        let mut book = Book::new(me.node_id());
        let trusted = |n: &NodeId| *n == b.node_id();
        // A stranger's record, however well signed, is not kept.
        assert_eq!(
            book.accept(record(&stranger, 9, 1), trusted),
            Err(Refused::NotTrusted)
        );
        // Nor our own.
        assert_eq!(
            book.accept(record(&me, 9, 1), |_| true),
            Err(Refused::NotTrusted)
        );
        // A forged one: b's identity, someone else's signature.
        let mut forged = record(&b, 9, 6666);
        forged.sig = record(&stranger, 9, 6666).sig;
        assert_eq!(book.accept(forged, trusted), Err(Refused::BadSignature));
        // An altered one: signed for one port, claiming another.
        let mut altered = record(&b, 9, 4000);
        altered.body.endpoints[0].set_port(6666);
        assert_eq!(book.accept(altered, trusted), Err(Refused::BadSignature));
        assert!(book.record(&b.node_id()).is_none());
        // The genuine record, then an old one replayed over it.
        assert_eq!(book.accept(record(&b, 9, 4000), trusted), Ok(b.node_id()));
        assert_eq!(book.accept(record(&b, 8, 5000), trusted), Err(Refused::Old));
        assert_eq!(book.accept(record(&b, 9, 5000), trusted), Err(Refused::Old));
        assert_eq!(
            book.record(&b.node_id()).unwrap().body.endpoints[0].port(),
            4000
        );
        assert_eq!(book.accept(record(&b, 10, 5000), trusted), Ok(b.node_id()));
        assert_eq!(
            book.record(&b.node_id()).unwrap().body.endpoints[0].port(),
            5000
        );
        // The same record again is a repeat, not a refusal.
        assert_eq!(
            book.accept(record(&b, 10, 5000), trusted),
            Err(Refused::Duplicate)
        );
        // Too many endpoints.
        let mut many = record(&b, 11, 1).body;
        many.endpoints = vec![many.endpoints[0]; MAX_ENDPOINTS + 1];
        assert_eq!(
            book.accept(Signed::sign(many, &b), trusted),
            Err(Refused::Malformed)
        );
        book.retain(|_| false);
        assert!(book.record(&b.node_id()).is_none());
    }

    #[test]
    fn where_is_answered_only_with_the_targets_approval_of_the_asker() {
        let (me, target, asker, other) = (id(1), id(2), id(3), id(4));
        let mut book = Book::new(me.node_id());
        book.accept(record(&target, 1, 4000), |_| true).unwrap();
        let q = asker.node_id();
        // The genuine proof.
        let proof = statement(&target, &asker, StatementKind::Approve, 7);
        assert_eq!(book.answer(&q, &proof).unwrap(), record(&target, 1, 4000));
        // The target approved someone else, not the asker.
        let theirs = statement(&target, &other, StatementKind::Approve, 7);
        assert_eq!(book.answer(&q, &theirs), Err(Refused::NotEntitled));
        // The target refused or revoked the asker.
        for kind in [StatementKind::Revoke, StatementKind::Deny] {
            let no = statement(&target, &asker, kind, 8);
            assert_eq!(book.answer(&q, &no), Err(Refused::NotEntitled));
        }
        // The asker signed its own "approval" in the target's name.
        let mut forged = statement(&target, &asker, StatementKind::Approve, 9);
        forged.sig = statement(&asker, &asker, StatementKind::Approve, 9).sig;
        assert_eq!(book.answer(&q, &forged), Err(Refused::BadSignature));
        // The target's later revocation, passed on through us, outranks
        // the approval.
        let revoke = statement(&target, &asker, StatementKind::Revoke, 8);
        let t = target.node_id();
        assert_eq!(book.pass(&t, &revoke, |_| true), Ok(PassAction::Forward(q)));
        book.mark_passed(&revoke);
        assert_eq!(book.answer(&q, &proof), Err(Refused::NotEntitled));
        // A node we hold nothing of.
        let unknown = statement(&other, &asker, StatementKind::Approve, 1);
        assert_eq!(book.answer(&q, &unknown), Err(Refused::Unknown));
    }

    #[test]
    fn asking_is_throttled_per_node() {
        let mut book = Book::new(id(1).node_id());
        let (b, c) = (id(2).node_id(), id(3).node_id());
        let t = Instant::now();
        assert!(book.may_ask(&b, t));
        assert!(!book.may_ask(&b, t + Duration::from_secs(1)));
        assert!(book.may_ask(&c, t + Duration::from_secs(1)));
        assert!(book.may_ask(&b, t + ASK_EVERY));
    }

    #[test]
    fn withdrawals_pass_one_hop_from_their_signer_and_never_grant() {
        let (me, signer, subject, stranger) = (id(1), id(2), id(3), id(4));
        let mut book = Book::new(me.node_id());
        let trusted = |n: &NodeId| *n == subject.node_id() || *n == signer.node_id();
        let s = signer.node_id();
        let revoke = statement(&signer, &subject, StatementKind::Revoke, 5);
        // Handed on by someone other than its signer: refused (one hop).
        assert_eq!(
            book.pass(&stranger.node_id(), &revoke, trusted),
            Err(Refused::NotWithdrawal)
        );
        // An approval is never passed on.
        let approve = statement(&signer, &subject, StatementKind::Approve, 6);
        assert_eq!(
            book.pass(&s, &approve, trusted),
            Err(Refused::NotWithdrawal)
        );
        // About a node we do not trust: we do not even say we know it.
        let elsewhere = statement(&signer, &stranger, StatementKind::Revoke, 5);
        assert_eq!(book.pass(&s, &elsewhere, trusted), Err(Refused::NoRoute));
        // Forged.
        let mut forged = revoke.clone();
        forged.body.seq = 99;
        assert_eq!(book.pass(&s, &forged, trusted), Err(Refused::BadSignature));
        // The genuine one goes on to its subject, once.
        assert_eq!(
            book.pass(&s, &revoke, trusted),
            Ok(PassAction::Forward(subject.node_id()))
        );
        // Not sent on yet (no session to the subject): the next copy may go.
        assert_eq!(
            book.pass(&s, &revoke, trusted),
            Ok(PassAction::Forward(subject.node_id()))
        );
        book.mark_passed(&revoke);
        assert_eq!(book.pass(&s, &revoke, trusted), Err(Refused::Repeated));
        // About us: applied, from its signer or handed on by a forwarder,
        // once; a forged one is not.
        let ours = statement(&signer, &me, StatementKind::Deny, 7);
        assert_eq!(
            book.pass(&subject.node_id(), &ours, trusted),
            Ok(PassAction::Apply)
        );
        assert_eq!(book.pass(&s, &ours, trusted), Err(Refused::Repeated));
        let mut forged = statement(&signer, &me, StatementKind::Revoke, 8);
        forged.sig = statement(&stranger, &me, StatementKind::Revoke, 8).sig;
        assert_eq!(
            book.pass(&subject.node_id(), &forged, trusted),
            Err(Refused::BadSignature)
        );
        let approve_us = statement(&signer, &me, StatementKind::Approve, 9);
        assert_eq!(
            book.pass(&s, &approve_us, trusted),
            Err(Refused::NotWithdrawal)
        );
    }

    #[test]
    fn a_flooding_peer_is_cut_off() {
        let mut book = Book::new(id(1).node_id());
        let b = id(2).node_id();
        let msg = Gossip::Endpoints(record(&id(2), 1, 1))
            .to_control()
            .unwrap();
        let t = Instant::now();
        let taken = (0..1000).filter(|_| book.read(&b, &msg, t).is_ok()).count();
        assert_eq!(taken, PEER_BURST as usize);
        assert_eq!(book.read(&b, &msg, t), Err(Refused::Rate));
        // Another peer is not affected.
        assert!(book.read(&id(3).node_id(), &msg, t).is_ok());
    }
}
