//! The local trust store: what this node decided about each peer, and what
//! each peer (provably, by signature) decided about this node.
//!
//! Two nodes exchange packets only when both said yes: a peer is *trusted*
//! when our decision and theirs are both [`Decision::Approved`]. The data
//! plane consults only this store.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, PublicIdentity};
use crate::messages::{Signed, Statement, StatementKind};

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
            StatementKind::Request { .. } | StatementKind::Approve => Decision::Approved,
            StatementKind::Deny => Decision::Denied,
            StatementKind::Revoke => Decision::Revoked,
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
}

impl TrustRecord {
    /// Both sides approved.
    pub fn trusted(&self) -> bool {
        self.ours == Decision::Approved && self.theirs == Decision::Approved
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

    fn entry(
        &mut self,
        identity: &PublicIdentity,
        address: Ipv4Addr,
        hostname: Option<String>,
    ) -> Result<&mut TrustRecord, TrustError> {
        let key = identity.node_id().to_string();
        let rec = self.records.entry(key).or_insert_with(|| TrustRecord {
            identity: identity.clone(),
            address,
            hostname: hostname.clone(),
            ours: Decision::None,
            theirs: Decision::None,
            their_seq: 0,
            note_in: None,
            note_out: None,
            updated: 0,
            last_endpoint: None,
        });
        if rec.identity.ed_public != identity.ed_public {
            return Err(TrustError::KeyMismatch);
        }
        rec.identity = identity.clone();
        rec.address = address;
        if hostname.is_some() {
            rec.hostname = hostname;
        }
        Ok(rec)
    }

    /// Records our own decision about a peer.
    pub fn decide(
        &mut self,
        peer: &PublicIdentity,
        address: Ipv4Addr,
        hostname: Option<String>,
        kind: &StatementKind,
        now_unix: u64,
    ) -> Change {
        let was = self.is_trusted(&peer.node_id());
        // Our own decision about a known key cannot mismatch: the key comes
        // from the same lookup that named the peer.
        let Ok(rec) = self.entry(peer, address, hostname) else {
            return Change {
                was_trusted: was,
                now_trusted: was,
            };
        };
        rec.ours = Decision::from_kind(kind);
        if let StatementKind::Request { note } = kind {
            rec.note_out = Some(note.clone());
        }
        rec.updated = now_unix;
        Change {
            was_trusted: was,
            now_trusted: rec.trusted(),
        }
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
        let from = st.body.from.node_id();
        let was = self.is_trusted(&from);
        if let Some(r) = self.get(&from) {
            if st.body.seq <= r.their_seq {
                return Err(TrustError::Replayed);
            }
        }
        let rec = self.entry(&st.body.from, address, hostname)?;
        rec.theirs = Decision::from_kind(&st.body.kind);
        rec.their_seq = st.body.seq;
        if let StatementKind::Request { note } = &st.body.kind {
            rec.note_in = Some(note.clone());
        }
        rec.updated = now_unix;
        Ok(Change {
            was_trusted: was,
            now_trusted: rec.trusted(),
        })
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
        sa.decide(&b.public(), ADDR, None, &req, 1);
        assert!(!sa.is_trusted(&b.node_id()));
        assert_eq!(sa.get(&b.node_id()).unwrap().state(), "requested");
        // B receives the request: pending, not trusted.
        sb.receive(&b.node_id(), &statement(&a, &b, req, 1), ADDR, None, 1)
            .unwrap();
        let r = sb.get(&a.node_id()).unwrap();
        assert!(r.pending() && !r.trusted());
        assert_eq!(r.note_in.as_deref(), Some("hi"));
        // B approves: trusted on B.
        let c = sb.decide(&a.public(), ADDR, None, &StatementKind::Approve, 2);
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

    #[test]
    fn one_sided_approval_is_not_trust() {
        let a = id(1);
        let mut sb = TrustStore::default();
        sb.decide(&a.public(), ADDR, None, &StatementKind::Approve, 1);
        assert!(!sb.is_trusted(&a.node_id()));
    }

    #[test]
    fn replayed_old_approval_cannot_undo_a_revoke() {
        let (a, b) = (id(1), id(2));
        let mut sa = TrustStore::default();
        sa.decide(&b.public(), ADDR, None, &StatementKind::Approve, 1);
        let approve = statement(&b, &a, StatementKind::Approve, 5);
        sa.receive(&a.node_id(), &approve, ADDR, None, 1).unwrap();
        assert!(sa.is_trusted(&b.node_id()));
        let revoke = statement(&b, &a, StatementKind::Revoke, 6);
        let c = sa.receive(&a.node_id(), &revoke, ADDR, None, 2).unwrap();
        assert!(c.was_trusted && !c.now_trusted);
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
        );
        let _ = a;
        let text = serde_json_like(&s);
        assert!(text.len() > 10);
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
