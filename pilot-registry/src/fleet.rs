//! The registry's rules for fleet trust, over any [`Storage`]: which owner
//! certificate a node may publish, which owner revocation is kept, and the
//! pages nodes read them in. Runs on the storage thread.
//!
//! The registry vouches for nothing here. It checks that a certificate is
//! signed by the owner it names, is its sender's own and is live, and that a
//! revocation is signed by its owner, so that it keeps and hands out only
//! what a node would accept anyway; every node checks each again before it
//! trusts (or distrusts) anyone because of it.
//!
//! What a node can make the registry keep is bounded: one certificate per
//! registered node (at most [`MAX_ENCODED`] bytes, [`MAX_TAGS`] tags);
//! revocations at most [`MAX_REVOCATIONS_PER_OWNER`] per owner and
//! [`MAX_REVOCATIONS`] in all. Revocations are rare and permanent, so the
//! caps are far above any real fleet's, yet a flood of self-made owner keys
//! stops at a few hundred megabytes.
//!
//! [`MAX_ENCODED`]: pilot_proto::cert::MAX_ENCODED
//! [`MAX_TAGS`]: pilot_proto::cert::MAX_TAGS

use pilot_proto::cert::{CertError, Certificate, OwnerPublic, Revocation, Tag};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, FromRegistry};

use crate::storage::{CertRow, RevocationRow, Storage, StorageError};

/// Most revocations kept for one owner.
pub const MAX_REVOCATIONS_PER_OWNER: u64 = 100_000;
/// Most revocations kept for all owners together.
pub const MAX_REVOCATIONS: u64 = 1_000_000;
/// Rows read for one page: more than ever fit in one answer (the smallest
/// certificate or revocation takes about 115 bytes of the 1200), so the
/// page is bounded by its encoded size, and one row more tells whether
/// more follow.
pub const PAGE_ROWS: usize = 16;

/// SHA-256 of bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a certificate said, for the log and the audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// The node it certifies (its sender).
    pub holder: NodeId,
    /// The owner that signed it.
    pub owner: OwnerPublic,
    /// Its tags.
    pub tags: Vec<Tag>,
    /// Unix time it stops being valid.
    pub expires_at: u64,
    /// SHA-256 of its binary form as kept.
    pub hash: [u8; 32],
}

/// Why a published certificate was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CertRefusal {
    /// The bytes are not a certificate.
    Malformed(String),
    /// It does not verify for its sender now: a bad signature, another
    /// node's, expired, not yet valid, an impossible lifetime.
    Invalid(CertError),
    /// Its owner revoked its holder.
    Revoked(OwnerPublic),
}

impl CertRefusal {
    /// A short reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            CertRefusal::Malformed(_) => "malformed",
            CertRefusal::Invalid(CertError::BadSignature | CertError::WrongOwner { .. }) => {
                "bad-signature"
            }
            CertRefusal::Invalid(CertError::OtherNode { .. }) => "other-node",
            CertRefusal::Invalid(CertError::Expired(_)) => "expired",
            CertRefusal::Invalid(CertError::NotYetValid(_)) => "not-yet-valid",
            CertRefusal::Invalid(CertError::BadLifetime | CertError::TooManyTags) => "bad-lifetime",
            CertRefusal::Revoked(_) => "revoked",
        }
    }

    /// What the node is told.
    pub fn message(&self) -> String {
        match self {
            CertRefusal::Malformed(e) => format!("not a certificate: {e}"),
            CertRefusal::Invalid(e @ CertError::OtherNode { .. }) => {
                format!("{e}; a node may publish only its own certificate")
            }
            CertRefusal::Invalid(e) => format!("certificate refused: {e}"),
            CertRefusal::Revoked(o) => {
                format!("certificate refused: owner {o} revoked this node")
            }
        }
    }
}

/// The result of publishing a certificate.
#[derive(Debug, PartialEq, Eq)]
pub enum CertOutcome {
    /// Kept as the sender's certificate.
    Stored {
        /// What it says.
        facts: CertFacts,
        /// False if exactly this certificate was kept already (a resend).
        changed: bool,
    },
    /// Refused; nothing changed.
    Refused(CertRefusal),
}

/// Checks and keeps `bytes` as the certificate of `me`, replacing the one
/// kept before, at Unix time `now`.
pub fn publish_cert(
    s: &mut dyn Storage,
    me: &NodeId,
    bytes: &[u8],
    now: u64,
) -> Result<CertOutcome, StorageError> {
    let cert = match Certificate::from_bytes(bytes) {
        Ok(c) => c,
        Err(e) => return Ok(CertOutcome::Refused(CertRefusal::Malformed(e.to_string()))),
    };
    let owner = cert.body.owner;
    let verified = match cert.verify(&owner, me, now) {
        Ok(v) => v,
        Err(e) => return Ok(CertOutcome::Refused(CertRefusal::Invalid(e))),
    };
    if s.revoked(&owner, me)? {
        return Ok(CertOutcome::Refused(CertRefusal::Revoked(owner)));
    }
    // Kept in its canonical form, so what nodes read is exactly what the
    // owner signed, however the sender encoded it.
    let bytes = cert.to_bytes();
    let facts = CertFacts {
        holder: *me,
        owner,
        tags: verified.tags().to_vec(),
        expires_at: verified.expires_at(),
        hash: sha256(&bytes),
    };
    let changed = s.put_cert(&CertRow {
        holder: *me,
        owner,
        tags: facts.tags.clone(),
        expires_at: facts.expires_at,
        bytes,
    })?;
    Ok(CertOutcome::Stored { facts, changed })
}

/// What a revocation said, for the log, the audit and the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationFacts {
    /// The owner that signed it.
    pub owner: OwnerPublic,
    /// The node it withdraws.
    pub node: NodeId,
    /// SHA-256 of its binary form as kept.
    pub hash: [u8; 32],
    /// Its binary form, as kept and sent on.
    pub bytes: Vec<u8>,
}

/// Why a revocation was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RevocationRefusal {
    /// The bytes are not a revocation.
    Malformed(String),
    /// Not signed by the owner it names.
    BadSignature,
    /// Its owner has [`MAX_REVOCATIONS_PER_OWNER`] kept already.
    OwnerFull(OwnerPublic),
    /// [`MAX_REVOCATIONS`] are kept already.
    Full,
}

impl RevocationRefusal {
    /// A short reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            RevocationRefusal::Malformed(_) => "malformed",
            RevocationRefusal::BadSignature => "bad-signature",
            RevocationRefusal::OwnerFull(_) => "owner-full",
            RevocationRefusal::Full => "full",
        }
    }

    /// What the node is told.
    pub fn message(&self) -> String {
        match self {
            RevocationRefusal::Malformed(e) => format!("not a revocation: {e}"),
            RevocationRefusal::BadSignature => {
                "revocation refused: its signature is not its owner's (forged or altered)".into()
            }
            RevocationRefusal::OwnerFull(o) => format!(
                "revocation refused: this registry keeps at most {MAX_REVOCATIONS_PER_OWNER} revocations per owner, and owner {o} has that many"
            ),
            RevocationRefusal::Full => format!(
                "revocation refused: this registry keeps at most {MAX_REVOCATIONS} revocations and is full; ask its operator"
            ),
        }
    }
}

/// The result of handing in a revocation.
#[derive(Debug, PartialEq, Eq)]
pub enum RevocationOutcome {
    /// Kept now: to be sent to every node online.
    Kept(RevocationFacts),
    /// Its owner's revocation of its node was kept already (this one or
    /// an earlier one): nothing changed.
    Known(RevocationFacts),
    /// Refused; nothing changed.
    Refused(RevocationRefusal),
}

/// Checks and keeps a revocation (withdrawing the certificate of the node
/// it names from that owner).
pub fn publish_revocation(
    s: &mut dyn Storage,
    bytes: &[u8],
) -> Result<RevocationOutcome, StorageError> {
    let refused = |r| Ok(RevocationOutcome::Refused(r));
    let rev = match Revocation::from_bytes(bytes) {
        Ok(r) => r,
        Err(e) => return refused(RevocationRefusal::Malformed(e.to_string())),
    };
    let owner = rev.body.owner;
    if rev.verify(&owner).is_err() {
        return refused(RevocationRefusal::BadSignature);
    }
    let bytes = rev.to_bytes();
    let facts = RevocationFacts {
        owner,
        node: rev.body.node,
        hash: sha256(&bytes),
        bytes,
    };
    if s.revoked(&owner, &facts.node)? {
        return Ok(RevocationOutcome::Known(facts));
    }
    let (mine, all) = s.revocation_counts(&owner)?;
    if mine >= MAX_REVOCATIONS_PER_OWNER {
        return refused(RevocationRefusal::OwnerFull(owner));
    }
    if all >= MAX_REVOCATIONS {
        return refused(RevocationRefusal::Full);
    }
    let row = RevocationRow {
        owner,
        node: facts.node,
        bytes: facts.bytes.clone(),
    };
    Ok(match s.put_revocation(&row)? {
        true => RevocationOutcome::Kept(facts),
        // Another instance kept one meanwhile (a shared database).
        false => RevocationOutcome::Known(facts),
    })
}

/// One answer's worth of certificates or revocations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The items, in node id order.
    pub items: Vec<Vec<u8>>,
    /// More follow after the last one.
    pub more: bool,
}

/// Fills a page from `rows` (read with a limit of [`PAGE_ROWS`] + 1) while
/// the answer `wrap` makes of it still encodes within
/// [`messages::MAX_MESSAGE`], the most one control datagram carries.
fn fill(rows: Vec<(NodeId, Vec<u8>)>, wrap: impl Fn(Vec<Vec<u8>>) -> FromRegistry) -> Page {
    let total = rows.len();
    let mut items = Vec::new();
    for (_, bytes) in rows {
        if items.len() == PAGE_ROWS {
            break;
        }
        items.push(bytes);
        if messages::encode(&wrap(items.clone())).is_err() {
            items.pop();
            break;
        }
    }
    Page {
        more: items.len() < total,
        items,
    }
}

/// The page of live certificates from `owner` with `tag` after `after`.
pub fn find_certs(
    s: &dyn Storage,
    owner: &OwnerPublic,
    tag: &Tag,
    after: Option<&NodeId>,
    now: u64,
) -> Result<Page, StorageError> {
    let rows = s.find_certs(owner, tag, after, now, PAGE_ROWS + 1)?;
    Ok(fill(rows, |certs| FromRegistry::Certs {
        // The largest request id: the real answer is never longer.
        req: u32::MAX,
        certs,
        more: true,
    }))
}

/// The page of `owner`'s revocations after `after`.
pub fn find_revocations(
    s: &dyn Storage,
    owner: &OwnerPublic,
    after: Option<&NodeId>,
) -> Result<Page, StorageError> {
    let rows = s.find_revocations(owner, after, PAGE_ROWS + 1)?;
    Ok(fill(rows, |revocations| FromRegistry::Revocations {
        req: u32::MAX,
        revocations,
        more: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SqliteStorage;
    use pilot_proto::cert::{parse_tags, OwnerKey, DEFAULT_LIFETIME, MAX_TAGS, MAX_TAG_LEN};
    use pilot_proto::lifetime::DAY;

    const NOW: u64 = 1_750_000_000;

    fn owner(n: u8) -> OwnerKey {
        OwnerKey::from_secret(&[n; 32])
    }

    fn node(n: u8) -> NodeId {
        NodeId([n; 16])
    }

    fn cert(o: &OwnerKey, n: NodeId, tags: &str) -> Vec<u8> {
        Certificate::issue(o, n, parse_tags(tags).unwrap(), NOW, DEFAULT_LIFETIME)
            .unwrap()
            .to_bytes()
    }

    fn refusal(out: CertOutcome) -> CertRefusal {
        match out {
            CertOutcome::Refused(r) => r,
            other => panic!("expected a refusal: {other:?}"),
        }
    }

    #[test]
    fn a_node_publishes_only_its_own_live_genuine_certificate() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let o = owner(1);
        let me = node(7);
        let good = cert(&o, me, "build,ci");
        let out = publish_cert(&mut s, &me, &good, NOW).unwrap();
        let CertOutcome::Stored { facts, changed } = out else {
            panic!("{out:?}")
        };
        assert!(changed);
        assert_eq!(
            facts,
            CertFacts {
                holder: me,
                owner: o.public(),
                tags: parse_tags("build,ci").unwrap(),
                expires_at: NOW + DEFAULT_LIFETIME,
                hash: sha256(&good),
            }
        );
        // The same again changes nothing.
        let out = publish_cert(&mut s, &me, &good, NOW + 1).unwrap();
        assert!(matches!(out, CertOutcome::Stored { changed: false, .. }));

        // Another node's certificate.
        let theirs = cert(&o, node(8), "build");
        let r = refusal(publish_cert(&mut s, &me, &theirs, NOW).unwrap());
        assert_eq!(r.reason(), "other-node");
        assert!(r.message().contains("only its own"), "{}", r.message());
        // Forged: signed by another key, naming owner 1.
        let mut forged = Certificate::issue(
            &owner(2),
            me,
            parse_tags("admin").unwrap(),
            NOW,
            DEFAULT_LIFETIME,
        )
        .unwrap();
        forged.body.owner = o.public();
        let r = refusal(publish_cert(&mut s, &me, &forged.to_bytes(), NOW).unwrap());
        assert_eq!(r, CertRefusal::Invalid(CertError::BadSignature));
        // Expired, and not yet valid beyond the clock skew.
        let r = refusal(publish_cert(&mut s, &me, &good, NOW + DEFAULT_LIFETIME).unwrap());
        assert_eq!(r.reason(), "expired");
        let r = refusal(publish_cert(&mut s, &me, &good, NOW - DAY).unwrap());
        assert_eq!(r.reason(), "not-yet-valid");
        // Garbage.
        for bad in [&[][..], &[1, 2, 3], &[9; 600], &good[..good.len() - 1]] {
            let r = refusal(publish_cert(&mut s, &me, bad, NOW).unwrap());
            assert_eq!(r.reason(), "malformed");
        }
        // None of the refused ones replaced the good one.
        let page = find_certs(&s, &o.public(), &"build".parse().unwrap(), None, NOW).unwrap();
        assert_eq!(page.items, vec![good.clone()]);
        assert!(
            find_certs(&s, &o.public(), &"admin".parse().unwrap(), None, NOW)
                .unwrap()
                .items
                .is_empty()
        );
        // A certificate for a revoked node is refused.
        let rev = Revocation::sign(&o, me, NOW).to_bytes();
        assert!(matches!(
            publish_revocation(&mut s, &rev).unwrap(),
            RevocationOutcome::Kept(_)
        ));
        let r = refusal(publish_cert(&mut s, &me, &good, NOW).unwrap());
        assert_eq!(r, CertRefusal::Revoked(o.public()));
        // ... but another owner's certificate of it is its business.
        let other = cert(&owner(3), me, "build");
        assert!(matches!(
            publish_cert(&mut s, &me, &other, NOW).unwrap(),
            CertOutcome::Stored { .. }
        ));
    }

    #[test]
    fn revocations_are_checked_kept_once_and_withdraw_the_certificate() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let o = owner(1);
        let build: Tag = "build".parse().unwrap();
        for n in 1..=3 {
            let c = cert(&o, node(n), "build");
            publish_cert(&mut s, &node(n), &c, NOW).unwrap();
        }
        // A forged revocation: signed by owner 2, naming owner 1.
        let mut forged = Revocation::sign(&owner(2), node(2), NOW);
        forged.body.owner = o.public();
        assert_eq!(
            publish_revocation(&mut s, &forged.to_bytes()).unwrap(),
            RevocationOutcome::Refused(RevocationRefusal::BadSignature)
        );
        assert!(matches!(
            publish_revocation(&mut s, &[1, 0, 0]).unwrap(),
            RevocationOutcome::Refused(RevocationRefusal::Malformed(_))
        ));
        // A certificate's bytes are not a revocation.
        let c = cert(&o, node(1), "build");
        assert!(matches!(
            publish_revocation(&mut s, &c).unwrap(),
            RevocationOutcome::Refused(RevocationRefusal::Malformed(_))
        ));
        assert_eq!(s.revocation_counts(&o.public()).unwrap(), (0, 0));

        let rev = Revocation::sign(&o, node(2), NOW).to_bytes();
        let RevocationOutcome::Kept(facts) = publish_revocation(&mut s, &rev).unwrap() else {
            panic!("kept")
        };
        assert_eq!((facts.owner, facts.node), (o.public(), node(2)));
        assert_eq!((facts.hash, &facts.bytes), (sha256(&rev), &rev));
        // A resend, or a later revocation of the same node: known.
        assert!(matches!(
            publish_revocation(&mut s, &rev).unwrap(),
            RevocationOutcome::Known(_)
        ));
        let later = Revocation::sign(&o, node(2), NOW + 5).to_bytes();
        let RevocationOutcome::Known(known) = publish_revocation(&mut s, &later).unwrap() else {
            panic!("known")
        };
        assert_eq!(known.node, node(2));
        assert_eq!(s.revocation_counts(&o.public()).unwrap(), (1, 1));
        // Node 2 is no longer found.
        let page = find_certs(&s, &o.public(), &build, None, NOW).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(!page.items.contains(&cert(&o, node(2), "build")));
        let page = find_revocations(&s, &o.public(), None).unwrap();
        assert_eq!(
            page,
            Page {
                items: vec![rev],
                more: false
            }
        );
    }

    #[test]
    fn revocations_are_capped_per_owner_and_in_all() {
        // One revocation counts as the per-owner cap, one as half the
        // total one.
        let mut inner = SqliteStorage::in_memory().unwrap();
        let mut scaled = Scaled(&mut inner);
        let (a, b, d) = (owner(1), owner(2), owner(3));
        let r = |o: &OwnerKey, n| Revocation::sign(o, node(n), NOW).to_bytes();
        assert!(matches!(
            publish_revocation(&mut scaled, &r(&a, 1)).unwrap(),
            RevocationOutcome::Kept(_)
        ));
        assert_eq!(
            publish_revocation(&mut scaled, &r(&a, 2)).unwrap(),
            RevocationOutcome::Refused(RevocationRefusal::OwnerFull(a.public()))
        );
        // A known one is still answered as known at the cap.
        assert!(matches!(
            publish_revocation(&mut scaled, &r(&a, 1)).unwrap(),
            RevocationOutcome::Known(_)
        ));
        assert!(matches!(
            publish_revocation(&mut scaled, &r(&b, 1)).unwrap(),
            RevocationOutcome::Kept(_)
        ));
        let out = publish_revocation(&mut scaled, &r(&d, 1)).unwrap();
        assert_eq!(out, RevocationOutcome::Refused(RevocationRefusal::Full));
        let RevocationOutcome::Refused(refusal) = out else {
            unreachable!()
        };
        assert!(
            refusal.message().contains("1000000"),
            "{}",
            refusal.message()
        );
        assert_eq!(inner.revocation_counts(&d.public()).unwrap(), (0, 2));
    }

    /// Storage whose revocation counts are scaled up, so a test reaches
    /// the caps with a handful of rows.
    struct Scaled<'a>(&'a mut SqliteStorage);

    impl Storage for Scaled<'_> {
        fn node(&self, id: &NodeId) -> Result<Option<crate::storage::NodeRow>, StorageError> {
            self.0.node(id)
        }
        fn node_by_address(
            &self,
            a: std::net::Ipv4Addr,
        ) -> Result<Option<crate::storage::NodeRow>, StorageError> {
            self.0.node_by_address(a)
        }
        fn node_by_name(
            &self,
            name: &str,
        ) -> Result<Option<crate::storage::NodeRow>, StorageError> {
            self.0.node_by_name(name)
        }
        fn address_taken(&self, a: std::net::Ipv4Addr) -> Result<bool, StorageError> {
            self.0.address_taken(a)
        }
        fn insert_node(&mut self, row: &crate::storage::NodeRow) -> Result<(), StorageError> {
            self.0.insert_node(row)
        }
        fn update_node(&mut self, row: &crate::storage::NodeRow) -> Result<(), StorageError> {
            self.0.update_node(row)
        }
        fn set_endpoints(
            &mut self,
            id: &NodeId,
            e: &[std::net::SocketAddr],
        ) -> Result<(), StorageError> {
            self.0.set_endpoints(id, e)
        }
        fn statement_seq(&self, f: &NodeId, t: &NodeId) -> Result<Option<u64>, StorageError> {
            self.0.statement_seq(f, t)
        }
        fn put_statement(
            &mut self,
            st: &messages::Signed<messages::Statement>,
        ) -> Result<u64, StorageError> {
            self.0.put_statement(st)
        }
        fn approves(&self, f: &NodeId, t: &NodeId) -> Result<bool, StorageError> {
            self.0.approves(f, t)
        }
        fn inbox(
            &self,
            to: &NodeId,
        ) -> Result<Vec<(u64, messages::Signed<messages::Statement>)>, StorageError> {
            self.0.inbox(to)
        }
        fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
            self.0.ack(to, push)
        }
        fn node_count(&self) -> Result<u64, StorageError> {
            self.0.node_count()
        }
        fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
            self.0.put_revocation(r)
        }
        fn revoked(&self, o: &OwnerPublic, n: &NodeId) -> Result<bool, StorageError> {
            self.0.revoked(o, n)
        }
        fn revocation_counts(&self, o: &OwnerPublic) -> Result<(u64, u64), StorageError> {
            let (mine, all) = self.0.revocation_counts(o)?;
            Ok((
                mine * MAX_REVOCATIONS_PER_OWNER,
                all * (MAX_REVOCATIONS / 2),
            ))
        }
    }

    /// The largest certificates there are: eight tags of 32 characters.
    fn large(o: &OwnerKey, n: NodeId) -> Vec<u8> {
        let tags = (0..MAX_TAGS)
            .map(|i| format!("{i}{}", "t".repeat(MAX_TAG_LEN - 1)))
            .collect::<Vec<_>>()
            .join(",");
        cert(o, n, &tags)
    }

    #[test]
    fn pages_of_twenty_large_certificates_fit_one_datagram_each_and_cover_all() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let o = owner(1);
        let tag: Tag = format!("0{}", "t".repeat(MAX_TAG_LEN - 1)).parse().unwrap();
        let mut all = vec![];
        for n in 1..=20 {
            let c = large(&o, node(n));
            assert!(c.len() > 380, "{} bytes", c.len());
            publish_cert(&mut s, &node(n), &c, NOW).unwrap();
            all.push(c);
        }
        let mut got = vec![];
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = find_certs(&s, &o.public(), &tag, after.as_ref(), NOW).unwrap();
            pages += 1;
            assert!(!page.items.is_empty(), "a page makes progress");
            let answer = FromRegistry::Certs {
                req: u32::MAX,
                certs: page.items.clone(),
                more: page.more,
            };
            let len = messages::encode(&answer)
                .expect("fits one control message")
                .len();
            assert!(len <= messages::MAX_MESSAGE, "{len}");
            // Full: one more certificate would not have fit.
            if page.more {
                let mut one_more = page.items.clone();
                one_more.push(all[0].clone());
                assert!(messages::encode(&FromRegistry::Certs {
                    req: u32::MAX,
                    certs: one_more,
                    more: true
                })
                .is_err());
            }
            let last = Certificate::from_bytes(page.items.last().unwrap()).unwrap();
            after = Some(last.body.node);
            got.extend(page.items);
            if !page.more {
                break;
            }
            assert!(pages < 20, "paging ends");
        }
        assert_eq!(got, all, "every certificate once, in holder order");
        assert!(pages >= 7, "{pages} pages of at most 3 large certificates");
    }

    #[test]
    fn small_items_fill_a_page_up_to_its_row_bound() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let o = owner(1);
        for n in 1..=(PAGE_ROWS as u8 + 5) {
            let r = Revocation::sign(&o, node(n), 0).to_bytes();
            publish_revocation(&mut s, &r).unwrap();
        }
        let p1 = find_revocations(&s, &o.public(), None).unwrap();
        assert!(p1.more);
        let n1 = p1.items.len();
        assert!((5..=PAGE_ROWS).contains(&n1), "{n1}");
        let last = Revocation::from_bytes(p1.items.last().unwrap()).unwrap();
        let mut rest = vec![];
        let mut after = Some(last.body.node);
        loop {
            let p = find_revocations(&s, &o.public(), after.as_ref()).unwrap();
            after = Some(
                Revocation::from_bytes(p.items.last().unwrap())
                    .unwrap()
                    .body
                    .node,
            );
            rest.extend(p.items);
            if !p.more {
                break;
            }
        }
        assert_eq!(n1 + rest.len(), PAGE_ROWS + 5);
        // Nothing kept: an empty last page.
        let s = SqliteStorage::in_memory().unwrap();
        assert_eq!(
            find_revocations(&s, &o.public(), None).unwrap(),
            Page {
                items: vec![],
                more: false
            }
        );
    }
}
