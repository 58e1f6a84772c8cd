//! Identity succession: a statement signed by both an old and a new node key
//! saying that the new identity continues the old one, and the record of
//! the successions this node accepted, which follows chains (A -> B -> C),
//! refuses forged and replayed statements, and detects forks.
//!
//! Both signatures are needed: the old key's, so nobody can claim an
//! identity they do not hold, and the new key's, so nobody can hand an
//! identity to a key they do not hold. A fork (two different successors of
//! one id, which only a leaked old key can make) poisons the whole lineage
//! from that id on: both successors and everything after them are refused,
//! and the old id counts as revoked. Recovery is an owner revocation and a
//! new certificate, not another rotation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::armor::{self, ArmorError};
use crate::identity::{self, Identity, NodeId, PublicIdentity};
use crate::lifetime;

const DOMAIN: &[u8] = b"pilot-tun/v1/succession";
const VERSION: u8 = 1;
const LABEL: &str = "SUCCESSION";
/// Largest encoded succession statement (a real one is about 400 bytes).
pub const MAX_ENCODED: usize = 1024;

/// What a succession says: `new` continues `old`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessionBody {
    /// The identity that is retired.
    pub old: PublicIdentity,
    /// The identity that continues it (with its new X25519 static key).
    pub new: PublicIdentity,
    /// Rotations of this lineage so far, this one included (1 for the first
    /// rotation of an original identity); grows along a chain.
    pub seq: u64,
    /// Unix time of the rotation.
    pub time: u64,
}

/// A succession statement, signed by both keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Succession {
    /// What is stated.
    pub body: SuccessionBody,
    /// The old key's signature over the domain and `postcard(body)`.
    pub old_sig: Vec<u8>,
    /// The new key's signature over the same.
    pub new_sig: Vec<u8>,
}

/// A succession statement was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuccessionError {
    /// The old key did not sign it.
    #[error("succession is not signed by the old key")]
    BadOldSignature,
    /// The new key did not sign it.
    #[error("succession is not signed by the new key")]
    BadNewSignature,
    /// An X25519 key is not bound to its identity.
    #[error("a tunnel key in the succession is not bound to its identity")]
    Unbound,
    /// Old and new are the same identity.
    #[error("an identity cannot succeed itself")]
    SameIdentity,
    /// Already accepted: nothing changes.
    #[error("succession {old} -> {new} is already known (replay)")]
    Replayed {
        /// The old id.
        old: NodeId,
        /// The new id.
        new: NodeId,
    },
    /// A second, different successor of one id: the lineage is now refused.
    #[error("{old} has two successors, {first} and {second}: both refused, {old} revoked")]
    Fork {
        /// The id with two successors.
        old: NodeId,
        /// The successor known before.
        first: NodeId,
        /// The one this statement names.
        second: NodeId,
    },
    /// The old id is, or descends from, an id with two successors.
    #[error("{0} belongs to a forked lineage: refused")]
    Forked(NodeId),
    /// The new id already has a history here (a cycle, or two identities
    /// claiming one successor).
    #[error("{0} already appears in a succession: an identity continues exactly one other, once")]
    Reused(NodeId),
    /// Not later than the statement before it in the chain.
    #[error("succession number {found} does not follow {previous}")]
    OutOfOrder {
        /// The number of the statement that made the old id.
        previous: u64,
        /// This statement's number.
        found: u64,
    },
}

/// Bytes or text are not a succession statement.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Empty input.
    #[error("empty input")]
    Empty,
    /// A format version this build does not know.
    #[error("unknown succession format version {0} (this build reads version 1)")]
    Version(u8),
    /// More than [`MAX_ENCODED`] bytes.
    #[error("{0} bytes is too large for a succession statement")]
    TooLarge(usize),
    /// Malformed or truncated.
    #[error("malformed succession statement: {0}")]
    Malformed(#[from] postcard::Error),
    /// Bytes after the statement.
    #[error("{0} unexpected bytes after the succession statement")]
    Trailing(usize),
    /// The text armour is broken.
    #[error(transparent)]
    Armor(#[from] ArmorError),
}

fn body_bytes(body: &SuccessionBody) -> Vec<u8> {
    // postcard encoding of our own plain struct into a Vec cannot fail.
    postcard::to_allocvec(body).expect("encode own succession")
}

impl Succession {
    /// The statement that `new` continues `old`, as the `seq`-th rotation
    /// of the lineage, at unix `time`; signed by both.
    pub fn sign(old: &Identity, new: &Identity, seq: u64, time: u64) -> Self {
        let body = SuccessionBody {
            old: old.public(),
            new: new.public(),
            seq,
            time,
        };
        let bytes = body_bytes(&body);
        Succession {
            old_sig: old.sign(DOMAIN, &bytes),
            new_sig: new.sign(DOMAIN, &bytes),
            body,
        }
    }

    /// Checks both signatures and both key bindings.
    pub fn verify(&self) -> Result<(), SuccessionError> {
        let b = &self.body;
        if b.old.ed_public == b.new.ed_public {
            return Err(SuccessionError::SameIdentity);
        }
        let bytes = body_bytes(b);
        if !identity::verify(&b.old.ed_public, DOMAIN, &bytes, &self.old_sig) {
            return Err(SuccessionError::BadOldSignature);
        }
        if !identity::verify(&b.new.ed_public, DOMAIN, &bytes, &self.new_sig) {
            return Err(SuccessionError::BadNewSignature);
        }
        if !b.old.binding_valid() || !b.new.binding_valid() {
            return Err(SuccessionError::Unbound);
        }
        Ok(())
    }

    /// The retired id.
    pub fn old_id(&self) -> NodeId {
        self.body.old.node_id()
    }

    /// The continuing id.
    pub fn new_id(&self) -> NodeId {
        self.body.new.node_id()
    }

    /// The versioned binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // As above: our own plain struct always encodes.
        out.extend(postcard::to_allocvec(self).expect("encode own succession"));
        out
    }

    /// Reads [`Succession::to_bytes`]; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&v, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if bytes.len() > MAX_ENCODED {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        if v != VERSION {
            return Err(DecodeError::Version(v));
        }
        let (s, trailing) = postcard::take_from_bytes(rest)?;
        if !trailing.is_empty() {
            return Err(DecodeError::Trailing(trailing.len()));
        }
        Ok(s)
    }

    /// The file form.
    pub fn to_armored(&self) -> String {
        let comments = [
            format!("old  {}", self.old_id()),
            format!("new  {}", self.new_id()),
            format!(
                "rotation {} at {}",
                self.body.seq,
                lifetime::utc(self.body.time)
            ),
        ];
        armor::encode(LABEL, &comments, &self.to_bytes())
    }

    /// Reads [`Succession::to_armored`].
    pub fn from_armored(text: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(&armor::decode(LABEL, text)?)
    }
}

/// Where an id stands after the successions this node accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// No successor: the id is in use (as far as this node knows).
    Current,
    /// Retired: `head` (the end of its chain) continues it; the id itself is
    /// refused from now on.
    Succeeded {
        /// The current id of the lineage.
        head: NodeId,
    },
    /// It, or an id before it, has two successors: refused, and so is
    /// everything after it.
    Forked,
}

/// A succession that was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The retired id.
    pub old: NodeId,
    /// The id that continues it.
    pub new: NodeId,
}

/// The successions this node accepted, and the forks it saw. Serialisable,
/// so it survives restarts. The caller applies only statements whose old id
/// it has a relationship with (a peer it trusts), which bounds its size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Successions {
    /// By old id: the accepted statement.
    by_old: BTreeMap<NodeId, Succession>,
    /// By new id: the id it continues.
    by_new: BTreeMap<NodeId, NodeId>,
    /// Ids with two successors, with the second statement as evidence.
    forks: BTreeMap<NodeId, Succession>,
}

impl Successions {
    /// Verifies a statement and records it; see [`SuccessionError`] for
    /// every refusal. A fork is recorded (and reported as an error): from
    /// then on the whole lineage from the forked id is refused.
    pub fn apply(&mut self, st: &Succession) -> Result<Applied, SuccessionError> {
        st.verify()?;
        let (old, new) = (st.old_id(), st.new_id());
        if let Some(first) = self.by_old.get(&old).map(Succession::new_id) {
            if first == new {
                return Err(SuccessionError::Replayed { old, new });
            }
            // Keep the evidence, and link the second successor to the old
            // id so that it stands as forked too.
            self.forks.entry(old).or_insert_with(|| st.clone());
            self.by_new.entry(new).or_insert(old);
            return Err(SuccessionError::Fork {
                old,
                first,
                second: new,
            });
        }
        if self.standing(&old) == Standing::Forked {
            return Err(SuccessionError::Forked(old));
        }
        // Every id before `old` has a successor, so this also refuses cycles.
        if self.by_old.contains_key(&new) || self.by_new.contains_key(&new) {
            return Err(SuccessionError::Reused(new));
        }
        if let Some(before) = self.by_new.get(&old).and_then(|p| self.by_old.get(p)) {
            if st.body.seq <= before.body.seq {
                return Err(SuccessionError::OutOfOrder {
                    previous: before.body.seq,
                    found: st.body.seq,
                });
            }
        }
        self.by_old.insert(old, st.clone());
        self.by_new.insert(new, old);
        Ok(Applied { old, new })
    }

    /// Applies a chain presented by a peer (oldest first): statements
    /// already known are skipped; the first refusal stops it, with its
    /// index.
    pub fn apply_chain(
        &mut self,
        chain: &[Succession],
    ) -> Result<Vec<Applied>, (usize, SuccessionError)> {
        let mut applied = Vec::new();
        for (i, st) in chain.iter().enumerate() {
            match self.apply(st) {
                Ok(a) => applied.push(a),
                Err(SuccessionError::Replayed { .. }) => {}
                Err(e) => return Err((i, e)),
            }
        }
        Ok(applied)
    }

    /// The ids `id` continues, oldest first (empty for an original id): what
    /// a certificate or a revocation of an earlier id reaches.
    pub fn ancestry(&self, id: &NodeId) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut cur = *id;
        // Each id has at most one predecessor and `apply` refuses cycles,
        // so this ends; the bound guards a hand-edited state file.
        while let Some(&prev) = self.by_new.get(&cur) {
            if out.contains(&prev) || out.len() > self.by_new.len() {
                break;
            }
            out.push(prev);
            cur = prev;
        }
        out.reverse();
        out
    }

    /// Where `id` stands: forked if a fork sits anywhere on its lineage,
    /// before it or between it and the head.
    pub fn standing(&self, id: &NodeId) -> Standing {
        let forked = |n: &NodeId| self.forks.contains_key(n);
        if forked(id) || self.ancestry(id).iter().any(forked) {
            return Standing::Forked;
        }
        let mut head = *id;
        let mut steps = 0;
        while let Some(st) = self.by_old.get(&head) {
            head = st.new_id();
            if forked(&head) {
                return Standing::Forked;
            }
            steps += 1;
            if steps > self.by_old.len() {
                break;
            }
        }
        if head == *id {
            Standing::Current
        } else {
            Standing::Succeeded { head }
        }
    }

    /// The accepted statements from `id` to the head of its lineage, oldest
    /// first: what a node presents to peers that knew an earlier id.
    pub fn chain_from(&self, id: &NodeId) -> Vec<Succession> {
        let mut out: Vec<Succession> = Vec::new();
        let mut cur = *id;
        while let Some(st) = self.by_old.get(&cur) {
            if out.len() > self.by_old.len() {
                break;
            }
            out.push(st.clone());
            cur = st.new_id();
        }
        out
    }

    /// The ids with two successors.
    pub fn forked_ids(&self) -> BTreeSet<NodeId> {
        self.forks.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_750_000_000;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    #[test]
    fn a_statement_signed_by_both_keys_verifies_and_round_trips() {
        let (a, b) = (id(1), id(2));
        let s = Succession::sign(&a, &b, 1, T);
        assert_eq!(s.verify(), Ok(()));
        assert_eq!((s.old_id(), s.new_id()), (a.node_id(), b.node_id()));
        assert_eq!(s.body.new.static_public, b.static_public());
        let bytes = s.to_bytes();
        assert!(bytes.len() <= MAX_ENCODED);
        assert_eq!(Succession::from_bytes(&bytes).unwrap(), s);
        assert_eq!(Succession::from_armored(&s.to_armored()).unwrap(), s);
        for n in 0..bytes.len() {
            assert!(Succession::from_bytes(&bytes[..n]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Succession::from_bytes(&longer),
            Err(DecodeError::Trailing(1))
        ));
        let mut v2 = bytes;
        v2[0] = 2;
        assert!(matches!(
            Succession::from_bytes(&v2),
            Err(DecodeError::Version(2))
        ));
    }

    #[test]
    fn forged_statements_with_one_valid_signature_are_refused() {
        let (a, b, mallory) = (id(1), id(2), id(3));
        // Mallory claims a's identity for her key: only her signature is good.
        let mut claim = Succession::sign(&mallory, &mallory_twin(), 1, T);
        claim.body.old = a.public();
        claim.body.new = mallory.public();
        claim.new_sig = mallory.sign(DOMAIN, &body_bytes(&claim.body));
        assert_eq!(claim.verify(), Err(SuccessionError::BadOldSignature));
        // Mallory, holding a leaked old key, hands it to b's key without b.
        let mut push = Succession::sign(&a, &mallory, 1, T);
        push.body.new = b.public();
        push.old_sig = a.sign(DOMAIN, &body_bytes(&push.body));
        assert_eq!(push.verify(), Err(SuccessionError::BadNewSignature));
        // A swapped tunnel key breaks the binding (and the signatures).
        let mut swapped = Succession::sign(&a, &b, 1, T);
        swapped.body.new.static_public = mallory.static_public();
        assert!(swapped.verify().is_err());
        let mut rebound = swapped.body.clone();
        rebound.new.static_public = mallory.static_public();
        let resigned = Succession {
            old_sig: a.sign(DOMAIN, &body_bytes(&rebound)),
            new_sig: b.sign(DOMAIN, &body_bytes(&rebound)),
            body: rebound,
        };
        assert_eq!(resigned.verify(), Err(SuccessionError::Unbound));
        // Tampering with the number or the time.
        let mut later = Succession::sign(&a, &b, 1, T);
        later.body.seq = 2;
        assert_eq!(later.verify(), Err(SuccessionError::BadOldSignature));
        let mut s = Succession::sign(&a, &a, 1, T);
        assert_eq!(s.verify(), Err(SuccessionError::SameIdentity));
        s.old_sig.clear();
        assert_eq!(s.verify(), Err(SuccessionError::SameIdentity));
        let mut store = Successions::default();
        assert_eq!(store.apply(&claim), Err(SuccessionError::BadOldSignature));
        assert_eq!(store, Successions::default(), "nothing recorded");
    }

    fn mallory_twin() -> Identity {
        id(4)
    }

    #[test]
    fn chains_are_followed_and_retired_ids_refused() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut s = Successions::default();
        let ab = Succession::sign(&a, &b, 1, T);
        let bc = Succession::sign(&b, &c, 2, T + 10);
        assert_eq!(
            s.apply(&ab),
            Ok(Applied {
                old: a.node_id(),
                new: b.node_id()
            })
        );
        assert_eq!(s.apply(&bc).unwrap().new, c.node_id());
        let head = Standing::Succeeded { head: c.node_id() };
        // The old keys after rotation: both retired, both lead to c.
        assert_eq!(s.standing(&a.node_id()), head);
        assert_eq!(s.standing(&b.node_id()), head);
        assert_eq!(s.standing(&c.node_id()), Standing::Current);
        assert_eq!(s.ancestry(&c.node_id()), vec![a.node_id(), b.node_id()]);
        assert_eq!(s.ancestry(&a.node_id()), vec![]);
        assert_eq!(s.chain_from(&a.node_id()), vec![ab.clone(), bc.clone()]);
        assert_eq!(s.chain_from(&b.node_id()), vec![bc.clone()]);
        // A peer that knew only a learns the whole chain at once.
        let mut other = Successions::default();
        assert_eq!(
            other.apply_chain(&[ab.clone(), bc.clone()]).unwrap().len(),
            2
        );
        assert_eq!(other.standing(&a.node_id()), head);
        // Presenting it again changes nothing.
        assert_eq!(other.apply_chain(&[ab, bc]).unwrap(), vec![]);
        // Survives a restart.
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<Successions>(&bytes).unwrap(), s);
    }

    #[test]
    fn replays_cycles_and_reordering_are_refused() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut s = Successions::default();
        let ab = Succession::sign(&a, &b, 1, T);
        s.apply(&ab).unwrap();
        let before = s.clone();
        assert_eq!(
            s.apply(&ab),
            Err(SuccessionError::Replayed {
                old: a.node_id(),
                new: b.node_id()
            })
        );
        // The same succession signed again with another number: still a
        // replay of the same fact, not a fork.
        assert!(matches!(
            s.apply(&Succession::sign(&a, &b, 7, T)),
            Err(SuccessionError::Replayed { .. })
        ));
        assert_eq!(s, before);
        // The old key coming back as a successor (a cycle).
        assert_eq!(
            s.apply(&Succession::sign(&b, &a, 2, T)),
            Err(SuccessionError::Reused(a.node_id()))
        );
        // Two identities claiming one successor.
        assert_eq!(
            s.apply(&Succession::sign(&c, &b, 1, T)),
            Err(SuccessionError::Reused(b.node_id()))
        );
        // A statement numbered no later than the one before it.
        assert_eq!(
            s.apply(&Succession::sign(&b, &c, 1, T)),
            Err(SuccessionError::OutOfOrder {
                previous: 1,
                found: 1
            })
        );
        assert_eq!(s, before);
        assert!(s.apply(&Succession::sign(&b, &c, 2, T)).is_ok());
    }

    #[test]
    fn a_fork_refuses_both_successors_and_everything_after() {
        let (a, b, c, x, y) = (id(1), id(2), id(3), id(5), id(6));
        let mut s = Successions::default();
        s.apply(&Succession::sign(&a, &b, 1, T)).unwrap();
        s.apply(&Succession::sign(&b, &c, 2, T)).unwrap();
        // Someone with a's leaked key makes another successor.
        assert_eq!(
            s.apply(&Succession::sign(&a, &x, 1, T)),
            Err(SuccessionError::Fork {
                old: a.node_id(),
                first: b.node_id(),
                second: x.node_id()
            })
        );
        // Both successors, and everything after them, are refused.
        for n in [&a, &b, &c, &x] {
            assert_eq!(
                s.standing(&n.node_id()),
                Standing::Forked,
                "{}",
                n.node_id()
            );
        }
        assert_eq!(
            s.apply(&Succession::sign(&x, &y, 2, T)),
            Err(SuccessionError::Forked(x.node_id()))
        );
        assert_eq!(
            s.apply(&Succession::sign(&c, &y, 3, T)),
            Err(SuccessionError::Forked(c.node_id()))
        );
        // The fork stays, however the statements come again.
        assert!(s.apply(&Succession::sign(&a, &x, 1, T)).is_err());
        assert!(s.apply(&Succession::sign(&a, &b, 1, T)).is_err());
        assert_eq!(s.forked_ids(), BTreeSet::from([a.node_id()]));
    }

    #[test]
    fn a_fork_further_down_poisons_the_ids_before_it() {
        let (a, b, c, x) = (id(1), id(2), id(3), id(5));
        let mut s = Successions::default();
        s.apply(&Succession::sign(&a, &b, 1, T)).unwrap();
        s.apply(&Succession::sign(&b, &c, 2, T)).unwrap();
        assert!(matches!(
            s.apply(&Succession::sign(&b, &x, 2, T)),
            Err(SuccessionError::Fork { .. })
        ));
        // A peer that trusted a must not move that trust to c or x.
        for n in [&a, &b, &c, &x] {
            assert_eq!(
                s.standing(&n.node_id()),
                Standing::Forked,
                "{}",
                n.node_id()
            );
        }
    }

    #[test]
    fn a_fork_seen_in_the_other_order_is_the_same_fork() {
        let (a, b, x) = (id(1), id(2), id(5));
        let mut s = Successions::default();
        s.apply(&Succession::sign(&a, &x, 1, T)).unwrap();
        assert!(matches!(
            s.apply(&Succession::sign(&a, &b, 1, T)),
            Err(SuccessionError::Fork { .. })
        ));
        assert_eq!(s.standing(&x.node_id()), Standing::Forked);
        assert_eq!(s.standing(&a.node_id()), Standing::Forked);
        // b was never accepted; a node that admits it must check
        // `standing` of the old id the chain names, which is forked.
        assert_eq!(
            s.apply_chain(&[Succession::sign(&a, &b, 1, T)])
                .unwrap_err()
                .0,
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1100)) {
            let _ = Succession::from_bytes(&bytes);
            let mut v1 = bytes.clone();
            v1.insert(0, VERSION);
            if let Ok(s) = Succession::from_bytes(&v1) {
                let _ = s.verify();
            }
        }
    }
}
