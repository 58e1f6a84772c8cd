//! Fleet trust on this node: its owner certificate, its policy rules and
//! the owner revocations it keeps (`fleet.json`), and what they decide:
//! whose certificate the rules admit and with what grant, and who is
//! revoked for good.
//!
//! Nothing here trusts the registry: a certificate counts only once its
//! owner's signature verifies for the node that presents it, and a
//! revocation only once its owner's signature verifies. A revocation
//! matters only to a node with a rule naming its owner (others neither
//! keep it nor act on it).

use std::collections::HashMap;

use pilot_proto::cert::{Certificate, OwnerPublic, Revocation, Tag, VerifiedCert};
use pilot_proto::identity::NodeId;
use pilot_proto::policy::{evaluate, Grant, PeerFacts, RuleId, Rules};
use serde::{Deserialize, Serialize};

/// How often the rules are checked again and the registry asked for new
/// certificates and revocations (also after every registration and every
/// change of the certificate or the rules).
pub const FLEET_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// What the control task remembers between choosing to act on a peer by
/// policy and recording the statement (so a typed statement is told from
/// one the rules made).
#[derive(Default)]
pub struct PolicyPending {
    pub(crate) by_peer: HashMap<NodeId, Pending>,
}

pub(crate) enum Pending {
    /// An approval: the certificate admitted and the rules that did.
    Approve(Vec<u8>, Vec<RuleId>),
    /// A withdrawal.
    Withdraw,
}

/// The most revocations kept (the oldest go first past it).
pub const MAX_REVOCATIONS: usize = 10_000;
/// The most rules a node holds.
pub const MAX_RULES: usize = 256;

/// `fleet.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    /// This node's certificate, once installed.
    #[serde(default)]
    pub cert: Option<Certificate>,
    /// This node's policy rules.
    #[serde(default)]
    pub rules: Rules,
    /// Owner revocations kept (from owners the rules name).
    #[serde(default)]
    pub revocations: Vec<Revocation>,
}

/// What the rules say about a peer's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The verified certificate.
    pub cert: VerifiedCert,
    /// What the peer may open here: the union of the live matching rules,
    /// ending no later than the certificate.
    pub grant: Grant,
    /// The rules that matched, by id.
    pub rules: Vec<RuleId>,
}

/// Why a certificate admits nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmitted {
    /// Not a certificate, or not valid for this peer now.
    #[error("certificate refused: {0}")]
    Invalid(String),
    /// Valid, but no live rule matches its owner and tags.
    #[error("no policy rule matches its owner and tags")]
    NoRule,
    /// Its holder is revoked by its owner.
    #[error("revoked by its owner")]
    Revoked,
}

impl FleetState {
    /// Drops what does not verify (a damaged or edited file must not
    /// create trust): a certificate that is not for `me` (or an id `me`
    /// succeeded, `ancestry`), revocations whose signature fails. Returns
    /// what was dropped, for the log.
    pub fn sanitize(&mut self, me: &NodeId, ancestry: &[NodeId], now: u64) -> Vec<String> {
        let mut dropped = Vec::new();
        if let Some(c) = &self.cert {
            if let Err(e) = c.verify_inherited(&c.body.owner, me, ancestry, now) {
                if !matches!(e, pilot_proto::cert::CertError::Expired(_)) {
                    dropped.push(format!("this node's certificate: {e}"));
                    self.cert = None;
                }
            }
        }
        self.revocations.retain(|r| match r.verify(&r.body.owner) {
            Ok(()) => true,
            Err(e) => {
                dropped.push(format!("a revocation of {}: {e}", r.body.node));
                false
            }
        });
        dropped
    }

    /// This node's certificate, if installed and valid at `now` for `me`
    /// or an id `me` succeeded (`ancestry`): a certificate follows its
    /// node through identity rotations until it expires.
    pub fn own_cert(&self, me: &NodeId, ancestry: &[NodeId], now: u64) -> Option<&Certificate> {
        self.cert
            .as_ref()
            .filter(|c| c.verify_inherited(&c.body.owner, me, ancestry, now).is_ok())
    }

    /// True if an owner the rules name revoked `node`, or an id it
    /// succeeded (`ancestry`).
    pub fn is_revoked(&self, node: &NodeId, ancestry: &[NodeId]) -> bool {
        self.revocations
            .iter()
            .any(|r| r.covers(node, ancestry) && self.rules.names_owner(&r.body.owner))
    }

    /// The (owner, tag) pairs of the live rules: what to look for at the
    /// registry.
    pub fn wanted(&self, now: u64) -> Vec<(OwnerPublic, Tag)> {
        let mut v: Vec<_> = self
            .rules
            .iter()
            .filter(|r| r.live_at(now))
            .map(|r| (r.owner, r.tag.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The owners the rules name.
    pub fn owners(&self) -> Vec<OwnerPublic> {
        let mut v: Vec<_> = self.rules.iter().map(|r| r.owner).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks `cert` (bytes as they travel) presented by `holder` against
    /// the rules at `now`; `ancestry` are the ids `holder` succeeded, as
    /// this node verified (a certificate issued to one of them counts).
    pub fn admit(
        &self,
        cert: &[u8],
        holder: &NodeId,
        ancestry: &[NodeId],
        now: u64,
    ) -> Result<Admission, NotAdmitted> {
        let c = Certificate::from_bytes(cert).map_err(|e| NotAdmitted::Invalid(e.to_string()))?;
        let verified = c
            .verify_inherited(&c.body.owner, holder, ancestry, now)
            .map_err(|e| NotAdmitted::Invalid(e.to_string()))?;
        if self.is_revoked(holder, ancestry) {
            return Err(NotAdmitted::Revoked);
        }
        let facts = PeerFacts {
            cert: Some(&verified),
            ..Default::default()
        };
        let effective = evaluate(&self.rules, &facts, now);
        if !effective.admits(now) {
            return Err(NotAdmitted::NoRule);
        }
        let rules = effective
            .parts()
            .iter()
            .filter_map(|p| match p.source {
                pilot_proto::policy::Source::Rule(id) => Some(id),
                _ => None,
            })
            .collect();
        Ok(Admission {
            grant: Grant {
                scope: effective.scope(now),
                expires_at: effective.valid_until(),
            },
            cert: verified,
            rules,
        })
    }

    /// Keeps a revocation if its signature verifies and a rule names its
    /// owner. `Ok(true)` if it is new.
    pub fn add_revocation(&mut self, r: Revocation) -> Result<bool, String> {
        r.verify(&r.body.owner).map_err(|e| e.to_string())?;
        if !self.rules.names_owner(&r.body.owner) {
            return Err(format!(
                "no policy rule names owner {}: nothing to revoke here",
                r.body.owner
            ));
        }
        if self
            .revocations
            .iter()
            .any(|k| k.body.owner == r.body.owner && k.body.node == r.body.node)
        {
            return Ok(false);
        }
        if self.revocations.len() >= MAX_REVOCATIONS {
            self.revocations.remove(0);
        }
        self.revocations.push(r);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilot_proto::cert::OwnerKey;
    use pilot_proto::lifetime::DAY;

    const NOW: u64 = 1_800_000_000;
    const A: NodeId = NodeId([1; 16]);
    const B: NodeId = NodeId([2; 16]);

    fn owner(n: u8) -> OwnerKey {
        OwnerKey::from_secret(&[n; 32])
    }

    fn cert(o: &OwnerKey, node: NodeId, tags: &str, life: u64) -> Vec<u8> {
        Certificate::issue(
            o,
            node,
            pilot_proto::cert::parse_tags(tags).unwrap(),
            NOW - 10,
            life,
        )
        .unwrap()
        .to_bytes()
    }

    fn fleet_with_rule(o: &OwnerKey, tag: &str, scope: &str) -> FleetState {
        let mut f = FleetState::default();
        f.rules.add(
            o.public(),
            tag.parse().unwrap(),
            scope.parse().unwrap(),
            None,
        );
        f
    }

    #[test]
    fn a_matching_certificate_is_admitted_with_the_rules_scope_until_it_expires() {
        let o = owner(1);
        let f = fleet_with_rule(&o, "cache", "tcp/8080");
        let a = f
            .admit(&cert(&o, B, "cache,db", DAY), &B, &[], NOW)
            .unwrap();
        assert_eq!(a.grant.scope.to_string(), "tcp/8080");
        assert_eq!(a.grant.expires_at, Some(NOW - 10 + DAY));
        assert_eq!(a.rules, vec![1]);
    }

    #[test]
    fn every_negative_case_is_refused() {
        let (o, other) = (owner(1), owner(2));
        let f = fleet_with_rule(&o, "cache", "all");
        // Another owner, another tag, another node's certificate, expired,
        // tampered, garbage.
        assert_eq!(
            f.admit(&cert(&other, B, "cache", DAY), &B, &[], NOW),
            Err(NotAdmitted::NoRule)
        );
        assert_eq!(
            f.admit(&cert(&o, B, "build", DAY), &B, &[], NOW),
            Err(NotAdmitted::NoRule)
        );
        assert!(matches!(
            f.admit(&cert(&o, A, "cache", DAY), &B, &[], NOW),
            Err(NotAdmitted::Invalid(_))
        ));
        assert!(matches!(
            f.admit(&cert(&o, B, "cache", 5), &B, &[], NOW),
            Err(NotAdmitted::Invalid(_))
        ));
        let mut c = Certificate::from_bytes(&cert(&o, B, "build", DAY)).unwrap();
        c.body.tags = vec!["cache".parse().unwrap()];
        assert!(matches!(
            f.admit(&c.to_bytes(), &B, &[], NOW),
            Err(NotAdmitted::Invalid(_))
        ));
        assert!(matches!(
            f.admit(b"not a certificate", &B, &[], NOW),
            Err(NotAdmitted::Invalid(_))
        ));
    }

    #[test]
    fn a_revocation_counts_only_signed_and_for_an_owner_the_rules_name() {
        let (o, other) = (owner(1), owner(2));
        let mut f = fleet_with_rule(&o, "cache", "all");
        let c = cert(&o, B, "cache", DAY);
        assert!(f.admit(&c, &B, &[], NOW).is_ok());
        // A forged one (signed by another key, claiming the owner).
        let mut forged = Revocation::sign(&other, B, NOW);
        forged.body.owner = o.public();
        assert!(f.add_revocation(forged).is_err());
        // One from an owner no rule names.
        assert!(f.add_revocation(Revocation::sign(&other, B, NOW)).is_err());
        assert!(f.admit(&c, &B, &[], NOW).is_ok());
        // The real one: B is refused from now on, once only kept.
        assert_eq!(f.add_revocation(Revocation::sign(&o, B, NOW)), Ok(true));
        assert_eq!(f.add_revocation(Revocation::sign(&o, B, NOW)), Ok(false));
        assert_eq!(f.admit(&c, &B, &[], NOW), Err(NotAdmitted::Revoked));
        assert!(f.is_revoked(&B, &[]) && !f.is_revoked(&A, &[]));
        // It survives a round trip through fleet.json and a sanitize.
        let mut back: FleetState =
            serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert!(back.sanitize(&A, &[], NOW).is_empty());
        assert!(back.is_revoked(&B, &[]));
    }

    #[test]
    fn sanitize_drops_a_certificate_for_another_node_and_bad_revocations() {
        let o = owner(1);
        let mut f = fleet_with_rule(&o, "cache", "all");
        f.cert = Some(Certificate::from_bytes(&cert(&o, B, "cache", DAY)).unwrap());
        let mut bad = Revocation::sign(&o, B, NOW);
        bad.body.node = A;
        f.revocations.push(bad);
        let dropped = f.sanitize(&A, &[], NOW);
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert!(f.cert.is_none() && f.revocations.is_empty());
    }
}
