//! The local trust store: what this node decided about each peer, and what
//! each peer (provably, by signature) decided about this node.
//!
//! Two nodes exchange packets only when both said yes: a peer is *trusted*
//! when our decision and theirs are both [`Decision::Approved`]. The data
//! plane consults only this store.
//!
//! What the registry tells about a peer (its address, its hostname) is not
//! signed, so the store holds it to rules of its own:
//! - an overlay address belongs to one record only, and stops changing once
//!   we approved the peer (a registry cannot hand a trusted peer's address
//!   to a newcomer, or move a peer we trust);
//! - a record's X25519 key is provisional until a handshake with it
//!   succeeded ([`TrustRecord::key_proven`]); a record whose key a proven
//!   record already holds is refused (the binding signature signs any 32
//!   bytes, so a node could otherwise claim another's key);
//! - notes longer than [`MAX_NOTE`] are refused (they are signed, so they
//!   are never cut), hostnames that are not valid are dropped;
//! - pending requests are capped and expire ([`PendingLimits`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, PublicIdentity};
use crate::messages::{valid_hostname, PeerRef, Signed, Statement, StatementKind, MAX_NOTE};
use crate::policy::{Contribution, EffectiveGrant, Grant, RuleId, Source};
use crate::ports::Scope;
use crate::succession::{Standing, Succession, SuccessionError, Successions};

/// One side's decision about the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Decision {
    /// Nothing said yet.
    #[default]
    None,
    /// Approved (by a request or an approval).
    Approved,
    /// Refused a request.
    Denied,
    /// Withdrew an earlier approval.
    Revoked,
}

impl Decision {
    fn from_kind(kind: &StatementKind) -> Self {
        match kind {
            _ if kind.approves() => Decision::Approved,
            StatementKind::Deny => Decision::Denied,
            _ => Decision::Revoked,
        }
    }
}

/// What we know about one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRecord {
    /// The peer's keys.
    pub identity: PublicIdentity,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Our decision about it.
    pub ours: Decision,
    /// Its decision about us, from its signed statement.
    pub theirs: Decision,
    /// Sequence number of the last statement accepted from it.
    pub their_seq: u64,
    /// The note on its request to us.
    pub note_in: Option<String>,
    /// The note on our request to it.
    pub note_out: Option<String>,
    /// Unix seconds of the last change.
    pub updated: u64,
    /// Where its last session came from, so the two can find each other
    /// again without the registry.
    #[serde(default)]
    pub last_endpoint: Option<SocketAddr>,
    /// A handshake with `identity.static_public` succeeded: the key is the
    /// peer's, not one it claimed.
    #[serde(default)]
    pub key_proven: bool,
    /// Timestamp of the newest handshake initiation accepted from the
    /// peer, kept across restarts so a captured one cannot be replayed.
    #[serde(default)]
    pub last_init_timestamp: u64,
    /// What we let it open on us, while `ours` is approved (records from
    /// before scopes: everything).
    #[serde(default = "Grant::everything")]
    pub granted: Grant,
    /// What it lets us open on it, from its signed statement, while
    /// `theirs` is approved.
    #[serde(default = "Grant::everything")]
    pub granted_us: Grant,
    /// What its request asked to open on us, if it said.
    #[serde(default)]
    pub want_in: Option<Scope>,
    /// What our request asked to open on it, if we said.
    #[serde(default)]
    pub want_out: Option<Scope>,
    /// Its owner certificate, as it presented it (checked again at every
    /// use, never trusted for being here).
    #[serde(default)]
    pub cert: Option<Vec<u8>>,
    /// The policy rules whose match made our approval (empty: the
    /// operator approved by hand).
    #[serde(default)]
    pub by_rules: Vec<RuleId>,
    /// Its signed statement approving us, while `theirs` is approved: the
    /// proof a common peer asks before it says where the peer is
    /// ([`crate::gossip`]).
    #[serde(default)]
    pub their_approval: Option<Signed<Statement>>,
}

impl TrustRecord {
    /// A record of a peer nothing was said about yet.
    pub fn new(identity: PublicIdentity, address: Ipv4Addr, hostname: Option<String>) -> Self {
        TrustRecord {
            identity,
            address,
            hostname,
            ours: Decision::None,
            theirs: Decision::None,
            their_seq: 0,
            note_in: None,
            note_out: None,
            updated: 0,
            last_endpoint: None,
            key_proven: false,
            last_init_timestamp: 0,
            granted: Grant::everything(),
            granted_us: Grant::everything(),
            want_in: None,
            want_out: None,
            cert: None,
            by_rules: Vec::new(),
            their_approval: None,
        }
    }

    /// Both sides approved.
    pub fn trusted(&self) -> bool {
        self.ours == Decision::Approved && self.theirs == Decision::Approved
    }
    /// The grants in force at `unix`: what the peer may open on us (our
    /// grant) and what we may open on it (its signed grant). Nothing either
    /// way unless both approved.
    pub fn grants(&self, unix: u64) -> (EffectiveGrant, EffectiveGrant) {
        if !self.trusted() {
            return (EffectiveGrant::none(), EffectiveGrant::none());
        }
        let source = match self.by_rules.first() {
            Some(id) => Source::Rule(*id),
            None => Source::Manual,
        };
        let ours = EffectiveGrant::build(
            vec![Contribution {
                source,
                scope: self.granted.scope.clone(),
                until: self.granted.expires_at,
            }],
            unix,
        );
        let theirs = EffectiveGrant::from_peer(
            self.granted_us.scope.clone(),
            self.granted_us.expires_at,
            unix,
        );
        (ours, theirs)
    }

    /// It asked us and we have not answered.
    pub fn pending(&self) -> bool {
        self.theirs == Decision::Approved && self.ours == Decision::None
    }
    /// One word for the CLI.
    pub fn state(&self) -> &'static str {
        match (self.ours, self.theirs) {
            (Decision::Approved, Decision::Approved) => "trusted",
            (Decision::None, Decision::Approved) => "pending",
            (Decision::Approved, Decision::None) => "requested",
            (Decision::Approved, Decision::Denied) => "denied-by-peer",
            (Decision::Approved, Decision::Revoked) => "revoked-by-peer",
            (Decision::Denied, _) => "denied",
            (Decision::Revoked, _) => "revoked",
            _ => "none",
        }
    }
}

/// A remote statement was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Signature invalid or tunnel key not bound to the identity.
    #[error("statement signature is invalid")]
    BadSignature,
    /// Addressed to someone else.
    #[error("statement is addressed to another node")]
    NotForUs,
    /// Not newer than the last accepted statement from the same node.
    #[error("statement is older than one already accepted (replay)")]
    Replayed,
    /// The signer's node id does not match its keys.
    #[error("peer identity changed its keys")]
    KeyMismatch,
    /// Another record already has this overlay address.
    #[error("address {address} already belongs to peer {holder}")]
    AddressTaken {
        /// The address.
        address: Ipv4Addr,
        /// The record that has it.
        holder: NodeId,
    },
    /// The peer was approved at another address; addresses of approved
    /// peers do not change.
    #[error(
        "peer is approved at {pinned}, not {offered}; addresses of approved peers never change"
    )]
    AddressChanged {
        /// The address on record.
        pinned: Ipv4Addr,
        /// The one offered now.
        offered: Ipv4Addr,
    },
    /// A record whose key is proven already holds this X25519 key.
    #[error("its tunnel key is already proven to belong to peer {holder}")]
    KeyTaken {
        /// The record that holds the key.
        holder: NodeId,
    },
    /// A request's note is longer than [`MAX_NOTE`] bytes.
    #[error("note of {0} bytes is longer than {MAX_NOTE}")]
    NoteTooLong(usize),
    /// The id was succeeded (identity rotation): refused from then on.
    #[error("{id} was retired by an identity rotation; its successor is {head}")]
    Retired {
        /// The retired id.
        id: NodeId,
        /// The current id of its lineage.
        head: NodeId,
    },
    /// The id belongs to a lineage with two successors of one id (a leaked
    /// key): refused for good.
    #[error("{0} belongs to a forked succession (two successors of one identity): refused")]
    Forked(NodeId),
    /// A succession statement was refused.
    #[error("succession refused: {0}")]
    Succession(#[from] SuccessionError),
    /// A succession of an id this node has no record of.
    #[error("succession of {0}, a node this one has no record of: ignored")]
    UnknownPredecessor(NodeId),
}

/// What accepting a succession changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuccessionOutcome {
    /// The record of `old` now belongs to `new`.
    Moved {
        /// The retired id.
        old: NodeId,
        /// Its successor.
        new: NodeId,
        /// The old id was trusted (so the new one is).
        trusted: bool,
    },
    /// Already applied (a redelivery): nothing changed.
    Known,
    /// A second successor of one id: every record of the lineage from it
    /// on was removed (with whether each was trusted), and it stays refused.
    Forked {
        /// The removed records.
        removed: Vec<(NodeId, bool)>,
    },
}

/// A name matched more than one record.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name} is ambiguous: {count} peers have that name; use the address or node id")]
pub struct Ambiguous {
    /// The name.
    pub name: String,
    /// How many records have it.
    pub count: usize,
}

/// Bounds on the requests waiting for our answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most pending requests kept; beyond it the oldest go.
    pub max: usize,
    /// A request is forgotten this many seconds after it arrived.
    pub ttl_secs: u64,
}

impl Default for PendingLimits {
    /// 1,000 requests, seven days.
    fn default() -> Self {
        PendingLimits {
            max: 1000,
            ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// The effect of a change on the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// Trusted before the change.
    pub was_trusted: bool,
    /// Trusted after it.
    pub now_trusted: bool,
}

/// All trust records of this node, by peer id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustStore {
    records: BTreeMap<String, TrustRecord>,
    /// The identity rotations of peers this node accepted (and the forks
    /// it saw): retired and forked ids are refused.
    #[serde(default)]
    successions: Successions,
}

impl TrustStore {
    /// The record of a peer.
    pub fn get(&self, id: &NodeId) -> Option<&TrustRecord> {
        self.records.get(&id.to_string())
    }

    /// All records, ordered by node id.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &TrustRecord)> {
        self.records.values().map(|r| (r.identity.node_id(), r))
    }

    /// Is this peer trusted (both sides approved)?
    pub fn is_trusted(&self, id: &NodeId) -> bool {
        self.get(id).is_some_and(TrustRecord::trusted)
    }

    /// A peer named by node id, address or hostname. A hostname that
    /// several records carry is [`Ambiguous`], never the first match.
    pub fn find(&self, r: &PeerRef) -> Result<Option<(NodeId, &TrustRecord)>, Ambiguous> {
        let mut hits = self.iter().filter(|(id, rec)| match r {
            PeerRef::Id(x) => id == x,
            PeerRef::Addr(a) => rec.address == *a,
            PeerRef::Name(n) => rec.hostname.as_deref() == Some(n.as_str()),
        });
        let first = hits.next();
        let more = hits.count();
        match (first, r) {
            (Some(_), PeerRef::Name(n)) if more > 0 => Err(Ambiguous {
                name: n.clone(),
                count: more + 1,
            }),
            (hit, _) => Ok(hit),
        }
    }

    /// Checks that a record for `identity` at `address` may be created or
    /// updated, without changing anything.
    pub fn admissible(
        &self,
        identity: &PublicIdentity,
        address: Ipv4Addr,
    ) -> Result<(), TrustError> {
        let id = identity.node_id();
        match self.successions.standing(&id) {
            Standing::Current => {}
            Standing::Succeeded { head } => return Err(TrustError::Retired { id, head }),
            Standing::Forked => return Err(TrustError::Forked(id)),
        }
        if let Some(rec) = self.get(&id) {
            if rec.identity.ed_public != identity.ed_public {
                return Err(TrustError::KeyMismatch);
            }
            if rec.address != address && rec.ours == Decision::Approved {
                return Err(TrustError::AddressChanged {
                    pinned: rec.address,
                    offered: address,
                });
            }
        }
        for (other, rec) in self.iter().filter(|(other, _)| *other != id) {
            if rec.address == address {
                return Err(TrustError::AddressTaken {
                    address,
                    holder: other,
                });
            }
            if rec.key_proven && rec.identity.static_public == identity.static_public {
                return Err(TrustError::KeyTaken { holder: other });
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        identity: &PublicIdentity,
        address: Ipv4Addr,
        hostname: Option<String>,
    ) -> Result<&mut TrustRecord, TrustError> {
        self.admissible(identity, address)?;
        // Hostnames come unsigned from the registry: keep only valid ones.
        let hostname = hostname.filter(|h| valid_hostname(h));
        let key = identity.node_id().to_string();
        let rec = self
            .records
            .entry(key)
            .or_insert_with(|| TrustRecord::new(identity.clone(), address, hostname.clone()));
        if rec.identity.static_public != identity.static_public {
            // A new tunnel key is provisional again, and so is the
            // handshake history that belonged to the old one.
            rec.key_proven = false;
            rec.last_init_timestamp = 0;
        }
        rec.identity = identity.clone();
        rec.address = address;
        if hostname.is_some() {
            rec.hostname = hostname;
        }
        Ok(rec)
    }

    /// Records our own decision about a peer. Refused, changing nothing,
    /// if the record would break the store's rules (see the module text).
    pub fn decide(
        &mut self,
        peer: &PublicIdentity,
        address: Ipv4Addr,
        hostname: Option<String>,
        kind: &StatementKind,
        now_unix: u64,
    ) -> Result<Change, TrustError> {
        let was = self.is_trusted(&peer.node_id());
        let rec = self.entry(peer, address, hostname)?;
        rec.ours = Decision::from_kind(kind);
        if let Some(note) = kind.note() {
            rec.note_out = Some(note.to_owned());
            rec.want_out = kind.want().cloned();
        }
        if let Some(g) = kind.grant() {
            rec.granted = g;
        }
        rec.updated = now_unix;
        Ok(Change {
            was_trusted: was,
            now_trusted: rec.trusted(),
        })
    }

    /// Applies a peer's signed statement about us.
    pub fn receive(
        &mut self,
        me: &NodeId,
        st: &Signed<Statement>,
        address: Ipv4Addr,
        hostname: Option<String>,
        now_unix: u64,
    ) -> Result<Change, TrustError> {
        if !st.verify() {
            return Err(TrustError::BadSignature);
        }
        if &st.body.to != me {
            return Err(TrustError::NotForUs);
        }
        if let Some(note) = st.body.kind.note() {
            if note.len() > MAX_NOTE {
                return Err(TrustError::NoteTooLong(note.len()));
            }
        }
        let from = st.body.from.node_id();
        let was = self.is_trusted(&from);
        match self.get(&from) {
            Some(r) if st.body.seq <= r.their_seq => return Err(TrustError::Replayed),
            // A refusal or withdrawal from a node we never dealt with
            // changes nothing: no record for it.
            None if !st.body.kind.approves() => {
                return Ok(Change {
                    was_trusted: false,
                    now_trusted: false,
                })
            }
            _ => {}
        }
        let rec = self.entry(&st.body.from, address, hostname)?;
        rec.theirs = Decision::from_kind(&st.body.kind);
        rec.their_seq = st.body.seq;
        if let Some(note) = st.body.kind.note() {
            rec.note_in = Some(note.to_owned());
            rec.want_in = st.body.kind.want().cloned();
        }
        if let Some(g) = st.body.kind.grant() {
            rec.granted_us = g;
        }
        rec.their_approval = st.body.kind.approves().then(|| st.clone());
        rec.updated = now_unix;
        Ok(Change {
            was_trusted: was,
            now_trusted: rec.trusted(),
        })
    }

    /// Records what policy made our approval of `id`: the certificate the
    /// rules admitted (`None` keeps the one recorded) and the rules (empty:
    /// the operator approved by hand).
    pub fn set_policy(&mut self, id: &NodeId, cert: Option<Vec<u8>>, by_rules: Vec<RuleId>) {
        if let Some(r) = self.records.get_mut(&id.to_string()) {
            if cert.is_some() {
                r.cert = cert;
            }
            r.by_rules = by_rules;
        }
    }

    /// Records the certificate a peer presented (checked at every use).
    pub fn set_peer_cert(&mut self, id: &NodeId, cert: Vec<u8>) {
        if let Some(r) = self.records.get_mut(&id.to_string()) {
            r.cert = Some(cert);
        }
    }

    /// A handshake with the peer's recorded key succeeded. Returns true if
    /// that is new (the caller saves the store).
    pub fn set_key_proven(&mut self, id: &NodeId) -> bool {
        match self.records.get_mut(&id.to_string()) {
            Some(r) if !r.key_proven => {
                r.key_proven = true;
                true
            }
            _ => false,
        }
    }

    /// Records the timestamp of an initiation accepted from the peer.
    /// Returns true if it grew (the caller saves the store).
    pub fn set_last_init_timestamp(&mut self, id: &NodeId, ts: u64) -> bool {
        match self.records.get_mut(&id.to_string()) {
            Some(r) if ts > r.last_init_timestamp => {
                r.last_init_timestamp = ts;
                true
            }
            _ => false,
        }
    }

    /// Forgets pending requests (asked, not answered) older than the limit,
    /// then the oldest beyond the cap, so the newest stay visible. Returns
    /// the ids forgotten.
    pub fn prune_pending(&mut self, now_unix: u64, limits: PendingLimits) -> Vec<NodeId> {
        let mut pending: Vec<(u64, String)> = self
            .records
            .iter()
            .filter(|(_, r)| r.pending())
            .map(|(k, r)| (r.updated, k.clone()))
            .collect();
        // Oldest first; ties by id, so the order is deterministic.
        pending.sort();
        let expired = pending
            .iter()
            .take_while(|(t, _)| t.saturating_add(limits.ttl_secs) <= now_unix)
            .count();
        let over = (pending.len() - expired).saturating_sub(limits.max);
        pending
            .iter()
            .take(expired + over)
            .filter_map(|(_, k)| self.records.remove(k))
            .map(|r| r.identity.node_id())
            .collect()
    }

    /// Accepts a peer's identity rotation: the record of the old id moves to
    /// the new one (keys replaced; address, name, decisions and grants kept;
    /// the new key unproven until its first handshake). Applied only to ids
    /// this node has a record of or already followed, which bounds what a
    /// stranger can make it store. A fork removes every record of the
    /// lineage from the forked id on.
    pub fn succeed(
        &mut self,
        st: &Succession,
        now_unix: u64,
    ) -> Result<SuccessionOutcome, TrustError> {
        let old = st.old_id();
        if self.get(&old).is_none() && self.successions.standing(&old) == Standing::Current {
            return Err(TrustError::UnknownPredecessor(old));
        }
        match self.successions.apply(st) {
            Ok(applied) => {
                let rec = self
                    .records
                    .remove(&old.to_string())
                    .ok_or(TrustError::UnknownPredecessor(old))?;
                let trusted = rec.trusted();
                let mut moved = rec;
                moved.identity = st.body.new.clone();
                moved.their_seq = 0;
                moved.their_approval = None;
                moved.key_proven = false;
                moved.last_init_timestamp = 0;
                moved.updated = now_unix;
                self.records.insert(applied.new.to_string(), moved);
                Ok(SuccessionOutcome::Moved {
                    old,
                    new: applied.new,
                    trusted,
                })
            }
            Err(SuccessionError::Replayed { .. }) => Ok(SuccessionOutcome::Known),
            Err(SuccessionError::Fork { .. }) => {
                let forked: Vec<String> = self
                    .records
                    .iter()
                    .filter(|(_, r)| {
                        self.successions.standing(&r.identity.node_id()) == Standing::Forked
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                let removed = forked
                    .iter()
                    .filter_map(|k| self.records.remove(k))
                    .map(|r| (r.identity.node_id(), r.trusted()))
                    .collect();
                Ok(SuccessionOutcome::Forked { removed })
            }
            Err(e) => Err(TrustError::Succession(e)),
        }
    }

    /// The predecessors of `id` this node followed, oldest first (what an
    /// inherited certificate or revocation of an earlier id reaches).
    pub fn ancestry(&self, id: &NodeId) -> Vec<NodeId> {
        self.successions.ancestry(id)
    }

    /// Where `id` stands after the rotations this node followed.
    pub fn standing(&self, id: &NodeId) -> Standing {
        self.successions.standing(id)
    }

    /// Remembers where a peer's session came from. Returns true if that is
    /// new (the caller saves the store).
    pub fn set_endpoint(&mut self, id: &NodeId, endpoint: SocketAddr) -> bool {
        match self.records.get_mut(&id.to_string()) {
            Some(r) if r.last_endpoint != Some(endpoint) => {
                r.last_endpoint = Some(endpoint);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
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

    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    #[test]
    fn request_then_approve_makes_both_trusted() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        let mut sb = TrustStore::default();
        let req = StatementKind::Request { note: "hi".into() };
        // A requests B.
        sa.decide(&b.public(), ADDR, None, &req, 1).unwrap();
        assert!(!sa.is_trusted(&b.node_id()));
        assert_eq!(sa.get(&b.node_id()).unwrap().state(), "requested");
        // B receives the request: pending, not trusted.
        sb.receive(&b.node_id(), &statement(&a, &b, req, 1), ADDR, None, 1)
            .unwrap();
        let r = sb.get(&a.node_id()).unwrap();
        assert!(r.pending() && !r.trusted());
        assert_eq!(r.note_in.as_deref(), Some("hi"));
        // B approves: trusted on B.
        let c = sb
            .decide(&a.public(), ADDR, None, &StatementKind::Approve, 2)
            .unwrap();
        assert!(c.now_trusted && !c.was_trusted);
        // A receives the approval: trusted on A.
        let c = sa
            .receive(
                &a.node_id(),
                &statement(&b, &a, StatementKind::Approve, 1),
                ADDR,
                None,
                2,
            )
            .unwrap();
        assert!(c.now_trusted);
    }

    /// `me` trusts `peer` both ways at ADDR with `granted` on our side.
    fn trusted_pair(me: &Identity, peer: &Identity, granted: StatementKind) -> TrustStore {
        let mut s = TrustStore::default();
        s.decide(&peer.public(), ADDR, Some("cache".into()), &granted, 1)
            .unwrap();
        s.receive(
            &me.node_id(),
            &statement(peer, me, StatementKind::Approve, 5),
            ADDR,
            None,
            1,
        )
        .unwrap();
        assert!(s.is_trusted(&peer.node_id()));
        s
    }

    #[test]
    fn a_succession_moves_the_record_and_retires_the_old_id() {
        use crate::succession::Succession;
        let (me, a, b) = (id(1), id(2), id(3));
        let scope = StatementKind::approve(Grant {
            scope: "tcp/8080".parse().unwrap(),
            expires_at: None,
        });
        let mut s = trusted_pair(&me, &a, scope.clone());
        let before = s.get(&a.node_id()).unwrap().clone();
        let st = Succession::sign(&a, &b, 1, 100);
        assert_eq!(
            s.succeed(&st, 200).unwrap(),
            SuccessionOutcome::Moved {
                old: a.node_id(),
                new: b.node_id(),
                trusted: true
            }
        );
        assert!(s.get(&a.node_id()).is_none());
        let r = s.get(&b.node_id()).unwrap();
        assert!(r.trusted(), "trust moves with the identity");
        assert_eq!(r.identity, b.public());
        assert_eq!((r.address, &r.hostname), (before.address, &before.hostname));
        assert_eq!(
            (&r.granted, &r.granted_us),
            (&before.granted, &before.granted_us)
        );
        assert_eq!((r.their_seq, r.key_proven), (0, false));
        assert_eq!(s.ancestry(&b.node_id()), vec![a.node_id()]);
        // A redelivery changes nothing.
        assert_eq!(s.succeed(&st, 300).unwrap(), SuccessionOutcome::Known);
        // The successor's statements are taken from seq 1 on.
        s.receive(
            &me.node_id(),
            &statement(&b, &me, StatementKind::Approve, 1),
            ADDR,
            None,
            3,
        )
        .unwrap();
        // The old key is refused from now on: its statements and any new
        // record of it.
        let old = statement(&a, &me, StatementKind::Request { note: "x".into() }, 9);
        assert!(matches!(
            s.receive(&me.node_id(), &old, Ipv4Addr::new(10, 77, 0, 9), None, 4),
            Err(TrustError::Retired { .. })
        ));
        assert!(matches!(
            s.decide(
                &a.public(),
                Ipv4Addr::new(10, 77, 0, 9),
                None,
                &StatementKind::Approve,
                4
            ),
            Err(TrustError::Retired { .. })
        ));
        // It survives a save and a load.
        let back: TrustStore = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.standing(&a.node_id()), s.standing(&a.node_id()));
    }

    #[test]
    fn forged_and_unknown_successions_change_nothing() {
        use crate::succession::Succession;
        let (me, a, b, x) = (id(1), id(2), id(3), id(4));
        let mut s = trusted_pair(&me, &a, StatementKind::Approve);
        let before = s.clone();
        // Signed by the new key only (the attacker does not hold a's key).
        let mut forged = Succession::sign(&x, &b, 1, 100);
        forged.body.old = a.public();
        assert!(matches!(
            s.succeed(&forged, 1),
            Err(TrustError::Succession(_))
        ));
        // A rotation of a node we never dealt with is not stored.
        let stranger = Succession::sign(&x, &b, 1, 100);
        assert_eq!(
            s.succeed(&stranger, 1),
            Err(TrustError::UnknownPredecessor(x.node_id()))
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_fork_refuses_both_successors_and_the_old_id() {
        use crate::succession::{Standing, Succession};
        let (me, a, b, c) = (id(1), id(2), id(3), id(4));
        let mut s = trusted_pair(&me, &a, StatementKind::Approve);
        s.succeed(&Succession::sign(&a, &b, 1, 100), 1).unwrap();
        // The leaked old key makes a second successor.
        let out = s.succeed(&Succession::sign(&a, &c, 1, 101), 2).unwrap();
        assert_eq!(
            out,
            SuccessionOutcome::Forked {
                removed: vec![(b.node_id(), true)]
            }
        );
        for n in [&a, &b, &c] {
            assert!(!s.is_trusted(&n.node_id()));
            assert_eq!(s.standing(&n.node_id()), Standing::Forked);
            assert!(matches!(
                s.decide(&n.public(), ADDR, None, &StatementKind::Approve, 3),
                Err(TrustError::Forked(_))
            ));
        }
    }

    #[test]
    fn scoped_statements_carry_their_grants_both_ways() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        let mut sb = TrustStore::default();
        let grant = |s: &str, t| Grant {
            scope: s.parse().unwrap(),
            expires_at: t,
        };
        // Everything for good still travels in the plain form that nodes
        // without scopes read.
        assert_eq!(
            StatementKind::request("n".into(), Grant::everything(), None),
            StatementKind::Request { note: "n".into() }
        );
        assert_eq!(
            StatementKind::approve(Grant::everything()),
            StatementKind::Approve
        );
        let req = StatementKind::request(
            "n".into(),
            grant("icmp", None),
            Some("tcp/8080".parse().unwrap()),
        );
        assert_eq!(req.name(), "request");
        sa.decide(&b.public(), ADDR, None, &req, 1).unwrap();
        let st = statement(&a, &b, req, 1);
        // Signed bytes survive the wire.
        let back: Signed<Statement> =
            crate::messages::decode(&crate::messages::encode(&st).unwrap()).unwrap();
        assert!(back.verify());
        sb.receive(&b.node_id(), &back, ADDR, None, 1).unwrap();
        let r = sb.get(&a.node_id()).unwrap();
        assert!(r.pending());
        assert_eq!(r.want_in, Some("tcp/8080".parse().unwrap()));
        assert_eq!(r.granted_us, grant("icmp", None));
        let appr = StatementKind::approve(grant("tcp/8080", Some(5000)));
        assert_eq!(appr.name(), "approve");
        sb.decide(&a.public(), ADDR, None, &appr, 2).unwrap();
        sa.receive(&a.node_id(), &statement(&b, &a, appr, 1), ADDR, None, 2)
            .unwrap();
        let ra = sa.get(&b.node_id()).unwrap();
        assert!(ra.trusted());
        // a's view: it granted icmp, and may open tcp/8080 until 5000.
        let (inbound, outbound) = ra.grants(4000);
        assert_eq!(inbound.scope(4000).to_string(), "icmp");
        assert_eq!(outbound.scope(4000).to_string(), "tcp/8080");
        assert_eq!(outbound.valid_until(), Some(5000));
        assert!(!outbound.admits(5000), "ended at its expiry");
        // b's view mirrors it.
        let (inbound, outbound) = sb.get(&a.node_id()).unwrap().grants(4000);
        assert_eq!(inbound.scope(4000).to_string(), "tcp/8080");
        assert_eq!(outbound.scope(4000).to_string(), "icmp");
        // A forged scope (the registry widening it) breaks the signature.
        let mut forged = statement(&b, &a, StatementKind::approve(grant("tcp/8080", None)), 2);
        forged.body.kind = StatementKind::Approve;
        assert!(matches!(
            sa.receive(&a.node_id(), &forged, ADDR, None, 3),
            Err(TrustError::BadSignature)
        ));
        // Not trusted: nothing either way, whatever the records say.
        let lone = TrustRecord::new(b.public(), ADDR, None);
        assert!(!lone.grants(1).0.admits(1) && !lone.grants(1).1.admits(1));
        // Records written before scopes read as everything.
        let old = r#"{"identity":IDENT,"address":"10.77.0.2","hostname":null,"ours":"Approved","theirs":"Approved","their_seq":1,"note_in":null,"note_out":null,"updated":1}"#
            .replace("IDENT", &serde_json::to_string(&b.public()).unwrap());
        let rec: TrustRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(rec.granted, Grant::everything());
        assert_eq!(rec.granted_us, Grant::everything());
    }

    #[test]
    fn one_sided_approval_is_not_trust() {
        let a = id(1);
        let mut sb = TrustStore::default();
        sb.decide(&a.public(), ADDR, None, &StatementKind::Approve, 1)
            .unwrap();
        assert!(!sb.is_trusted(&a.node_id()));
    }

    #[test]
    fn replayed_old_approval_cannot_undo_a_revoke() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        sa.decide(&b.public(), ADDR, None, &StatementKind::Approve, 1)
            .unwrap();
        let approve = statement(&b, &a, StatementKind::Approve, 5);
        sa.receive(&a.node_id(), &approve, ADDR, None, 1).unwrap();
        assert!(sa.is_trusted(&b.node_id()));
        // Its approval is kept as the proof gossip asks for.
        let kept = sa.get(&b.node_id()).unwrap().their_approval.clone();
        assert_eq!(kept.as_ref(), Some(&approve));
        let json = serde_json::to_string(&sa).unwrap();
        let back: TrustStore = serde_json::from_str(&json).unwrap();
        assert_eq!(back.get(&b.node_id()).unwrap().their_approval, kept);
        let revoke = statement(&b, &a, StatementKind::Revoke, 6);
        let c = sa.receive(&a.node_id(), &revoke, ADDR, None, 2).unwrap();
        assert!(c.was_trusted && !c.now_trusted);
        // A withdrawn approval is no proof any more.
        assert!(sa.get(&b.node_id()).unwrap().their_approval.is_none());
        // A malicious registry replays the old approval.
        assert_eq!(
            sa.receive(&a.node_id(), &approve, ADDR, None, 3),
            Err(TrustError::Replayed)
        );
        assert!(!sa.is_trusted(&b.node_id()));
    }

    #[test]
    fn forged_or_misaddressed_statements_are_refused() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut sa = TrustStore::default();
        // Signed by c but claiming to be from b.
        let mut forged = statement(&c, &a, StatementKind::Approve, 1);
        forged.body.from = b.public();
        assert_eq!(
            sa.receive(&a.node_id(), &forged, ADDR, None, 1),
            Err(TrustError::BadSignature)
        );
        // Genuine, but addressed to c.
        let other = statement(&b, &c, StatementKind::Approve, 1);
        assert_eq!(
            sa.receive(&a.node_id(), &other, ADDR, None, 1),
            Err(TrustError::NotForUs)
        );
        assert!(sa.get(&b.node_id()).is_none());
    }

    #[test]
    fn json_round_trip() {
        let (a, b) = (id(1), id(2));
        let mut s = TrustStore::default();
        s.decide(
            &b.public(),
            ADDR,
            Some("bee".into()),
            &StatementKind::Approve,
            9,
        )
        .unwrap();
        let _ = a;
        let text = serde_json_like(&s);
        assert!(text.len() > 10);
    }

    const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
    const ADDR_C: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);

    fn request(note: &str) -> StatementKind {
        StatementKind::Request { note: note.into() }
    }

    /// `me` trusts `peer` at `addr`: both sides approved.
    fn trusted_store(me: &Identity, peer: &Identity, addr: Ipv4Addr) -> TrustStore {
        let mut s = TrustStore::default();
        s.decide(&peer.public(), addr, Some("bee".into()), &request(""), 1)
            .unwrap();
        s.receive(
            &me.node_id(),
            &statement(peer, me, StatementKind::Approve, 1),
            addr,
            Some("bee".into()),
            1,
        )
        .unwrap();
        assert!(s.is_trusted(&peer.node_id()));
        s
    }

    #[test]
    fn a_trusted_peers_address_cannot_be_given_to_a_newcomer() {
        // A lying registry answers a first contact with its own key and
        // the address of a peer we trust.
        let (a, b, m) = (id(1), id(2), id(3));
        let mut sa = trusted_store(&a, &b, ADDR_B);
        let before = sa.clone();
        assert_eq!(
            sa.decide(&m.public(), ADDR_B, None, &request("hi"), 2),
            Err(TrustError::AddressTaken {
                address: ADDR_B,
                holder: b.node_id()
            })
        );
        // Nor through a pushed statement.
        assert_eq!(
            sa.receive(
                &a.node_id(),
                &statement(&m, &a, request("hi"), 1),
                ADDR_B,
                None,
                2
            ),
            Err(TrustError::AddressTaken {
                address: ADDR_B,
                holder: b.node_id()
            })
        );
        assert_eq!(sa, before, "nothing recorded");
        // At an address of its own it is an ordinary request.
        assert!(sa
            .receive(
                &a.node_id(),
                &statement(&m, &a, request("hi"), 1),
                ADDR_C,
                None,
                2
            )
            .is_ok());
        assert!(sa.get(&m.node_id()).unwrap().pending());
    }

    #[test]
    fn an_approved_peers_address_never_changes() {
        let (a, b) = (id(1), id(2));
        let mut sa = trusted_store(&a, &b, ADDR_B);
        assert_eq!(
            sa.receive(
                &a.node_id(),
                &statement(&b, &a, StatementKind::Approve, 2),
                ADDR_C,
                None,
                2
            ),
            Err(TrustError::AddressChanged {
                pinned: ADDR_B,
                offered: ADDR_C
            })
        );
        assert_eq!(sa.get(&b.node_id()).unwrap().address, ADDR_B);
        // Before we approved, a registry may still correct it.
        let mut sb = TrustStore::default();
        sb.receive(
            &b.node_id(),
            &statement(&a, &b, request(""), 1),
            ADDR_B,
            None,
            1,
        )
        .unwrap();
        sb.receive(
            &b.node_id(),
            &statement(&a, &b, request(""), 2),
            ADDR_C,
            None,
            1,
        )
        .unwrap();
        assert_eq!(sb.get(&a.node_id()).unwrap().address, ADDR_C);
    }

    /// `m` claims `b`'s tunnel key: the binding signature signs any 32
    /// bytes, so `m` can bind `b`'s public key to its own identity.
    fn claiming(m: &Identity, b: &Identity) -> Identity {
        let mut bytes = m.to_bytes();
        bytes[32..].copy_from_slice(&b.to_bytes()[32..]);
        // Only m's Ed25519 key signs below; b's X25519 secret is used here
        // solely to derive b's public key, which an attacker has anyway.
        Identity::from_bytes(&bytes)
    }

    #[test]
    fn a_record_claiming_a_proven_key_is_refused() {
        let (a, b, m) = (id(1), id(2), id(3));
        let mut sa = trusted_store(&a, &b, ADDR_B);
        let fake = claiming(&m, &b);
        assert_eq!(fake.node_id(), m.node_id());
        let st = statement(&fake, &a, request("let me in"), 1);
        assert!(st.verify(), "the claim is validly signed");
        // Unproven, the key is only provisional: both records may exist.
        assert!(sa.admissible(&fake.public(), ADDR_C).is_ok());
        // Once a handshake proved b's key, nobody else may claim it.
        assert!(sa.set_key_proven(&b.node_id()));
        assert!(!sa.set_key_proven(&b.node_id()), "already proven");
        assert_eq!(
            sa.receive(&a.node_id(), &st, ADDR_C, None, 2),
            Err(TrustError::KeyTaken {
                holder: b.node_id()
            })
        );
        assert_eq!(
            sa.decide(&fake.public(), ADDR_C, None, &StatementKind::Approve, 2),
            Err(TrustError::KeyTaken {
                holder: b.node_id()
            })
        );
        assert!(sa.get(&m.node_id()).is_none());
    }

    #[test]
    fn a_new_tunnel_key_is_provisional_again() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut sa = trusted_store(&a, &b, ADDR_B);
        sa.set_key_proven(&b.node_id());
        sa.set_last_init_timestamp(&b.node_id(), 99);
        // b's identity with another X25519 key (c's), validly bound by b.
        let rotated = claiming(&b, &c);
        sa.receive(
            &a.node_id(),
            &statement(&rotated, &a, StatementKind::Approve, 2),
            ADDR_B,
            None,
            2,
        )
        .unwrap();
        let r = sa.get(&b.node_id()).unwrap();
        assert!(!r.key_proven);
        assert_eq!(r.last_init_timestamp, 0);
        assert_eq!(r.identity.static_public, c.static_public());
    }

    #[test]
    fn init_timestamps_only_grow_and_survive_serialization() {
        let (a, b) = (id(1), id(2));
        let mut sa = trusted_store(&a, &b, ADDR_B);
        assert!(sa.set_last_init_timestamp(&b.node_id(), 1000));
        assert!(!sa.set_last_init_timestamp(&b.node_id(), 999));
        assert!(!sa.set_last_init_timestamp(&b.node_id(), 1000));
        let bytes = serde_json_like(&sa);
        let back: TrustStore = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.get(&b.node_id()).unwrap().last_init_timestamp, 1000);
    }

    #[test]
    fn long_notes_are_refused_and_bad_hostnames_dropped() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        let long = statement(&b, &a, request(&"x".repeat(MAX_NOTE + 1)), 1);
        assert!(long.verify());
        assert_eq!(
            sa.receive(&a.node_id(), &long, ADDR_B, None, 1),
            Err(TrustError::NoteTooLong(MAX_NOTE + 1))
        );
        assert!(sa.get(&b.node_id()).is_none());
        let fits = statement(&b, &a, request(&"x".repeat(MAX_NOTE)), 2);
        sa.receive(
            &a.node_id(),
            &fits,
            ADDR_B,
            Some("evil\u{1b}[2Jname".into()),
            1,
        )
        .unwrap();
        assert_eq!(sa.get(&b.node_id()).unwrap().hostname, None);
    }

    #[test]
    fn refusals_from_strangers_leave_no_record() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        for (seq, kind) in [(1, StatementKind::Deny), (2, StatementKind::Revoke)] {
            let c = sa
                .receive(&a.node_id(), &statement(&b, &a, kind, seq), ADDR_B, None, 1)
                .unwrap();
            assert!(!c.now_trusted);
        }
        assert_eq!(sa.iter().count(), 0);
    }

    #[test]
    fn a_shared_name_is_ambiguous_not_first_match() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut sa = TrustStore::default();
        for (p, addr) in [(&b, ADDR_B), (&c, ADDR_C)] {
            sa.receive(
                &a.node_id(),
                &statement(p, &a, request(""), 1),
                addr,
                Some("builder".into()),
                1,
            )
            .unwrap();
        }
        assert_eq!(
            sa.find(&PeerRef::Name("builder".into())).err(),
            Some(Ambiguous {
                name: "builder".into(),
                count: 2
            })
        );
        assert!(sa
            .find(&PeerRef::Name("builder".into()))
            .unwrap_err()
            .to_string()
            .contains("use the address or node id"));
        // Address and id still name one record each.
        let (id_c, _) = sa.find(&PeerRef::Addr(ADDR_C)).unwrap().unwrap();
        assert_eq!(id_c, c.node_id());
        let (id_b, _) = sa.find(&PeerRef::Id(b.node_id())).unwrap().unwrap();
        assert_eq!(id_b, b.node_id());
        assert!(sa.find(&PeerRef::Name("nobody".into())).unwrap().is_none());
    }

    #[test]
    fn pending_requests_are_capped_and_expire_newest_kept() {
        let a = id(1);
        let mut sa = TrustStore::default();
        let limits = PendingLimits {
            max: 3,
            ttl_secs: 100,
        };
        // Five requests from five nodes, one per second.
        let peers: Vec<Identity> = (10..15).map(id).collect();
        for (i, p) in peers.iter().enumerate() {
            let addr = Ipv4Addr::new(10, 77, 1, i as u8 + 1);
            sa.receive(
                &a.node_id(),
                &statement(p, &a, request(""), 1),
                addr,
                None,
                1000 + i as u64,
            )
            .unwrap();
        }
        // A trusted peer is never pruned.
        let b = id(2);
        sa.decide(&b.public(), ADDR_B, None, &StatementKind::Approve, 900)
            .unwrap();
        sa.receive(
            &a.node_id(),
            &statement(&b, &a, StatementKind::Approve, 1),
            ADDR_B,
            None,
            900,
        )
        .unwrap();
        let gone = sa.prune_pending(1004, limits);
        assert_eq!(
            gone,
            vec![peers[0].node_id(), peers[1].node_id()],
            "the oldest go"
        );
        let left: Vec<NodeId> = sa
            .iter()
            .filter(|(_, r)| r.pending())
            .map(|(id, _)| id)
            .collect();
        assert_eq!(left.len(), 3);
        assert!(left.contains(&peers[4].node_id()), "the newest stays");
        assert!(sa.is_trusted(&b.node_id()));
        // A week (here: 100 s) later the rest expire; trust stays.
        let gone = sa.prune_pending(1103, limits);
        assert_eq!(gone, vec![peers[2].node_id(), peers[3].node_id()]);
        let gone = sa.prune_pending(1104, limits);
        assert_eq!(gone, vec![peers[4].node_id()]);
        assert_eq!(sa.iter().count(), 1);
        assert!(sa.is_trusted(&b.node_id()));
    }

    // pilot-proto has no JSON dependency; postcard stands in to show the
    // store serializes and deserializes losslessly.
    fn serde_json_like(s: &TrustStore) -> Vec<u8> {
        let bytes = postcard::to_allocvec(s).unwrap();
        let back: TrustStore = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&back, s);
        bytes
    }
}
