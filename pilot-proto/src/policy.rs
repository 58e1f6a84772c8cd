//! Policy evaluation: what a peer may open on this node, and per packet
//! whether it may, and what decided.
//!
//! Three things can open ports to a peer: the operator's manual [`Grant`],
//! local [`Rule`]s that match the peer's verified owner certificate, and (in
//! the other direction) the grant the peer itself signed for us. The
//! [`EffectiveGrant`] is their union, computed once per change by
//! [`evaluate`]; anything expired contributes nothing and a revocation
//! removes everything. When several contributions open the same port, the
//! first in a fixed order decides it (the manual grant, then rules by id),
//! so `explain` always names one.
//!
//! The per-packet check, [`EffectiveGrant::decide`], allocates nothing: a
//! binary search in a short sorted vector of port ranges per protocol, each
//! labelled with its deciding source. Its cost does not grow with the number
//! of rules, only (logarithmically) with the number of distinct ranges.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cert::{OwnerPublic, Tag, VerifiedCert};
use crate::ports::{PortRange, Scope, Traffic};

/// Identifies a rule on this node; never reused after removal.
pub type RuleId = u32;

/// "Admit peers whose certificate from `owner` carries `tag`, to `scope`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Its id, for `policy remove` and `explain`.
    pub id: RuleId,
    /// The owner whose certificates it trusts.
    pub owner: OwnerPublic,
    /// The tag a certificate must carry.
    pub tag: Tag,
    /// What a matching peer may open.
    pub scope: Scope,
    /// Unix time it stops admitting anyone, if it expires.
    pub expires_at: Option<u64>,
}

impl Rule {
    /// True if `cert` is from this rule's owner and carries its tag.
    pub fn matches(&self, cert: &VerifiedCert) -> bool {
        cert.owner() == &self.owner && cert.tags().contains(&self.tag)
    }

    /// True if it has not expired at `now`.
    pub fn live_at(&self, now: u64) -> bool {
        live(self.expires_at, now)
    }
}

fn live(until: Option<u64>, now: u64) -> bool {
    until.is_none_or(|t| now < t)
}

/// A node's rules, in id order. Serialisable, so they survive restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    rules: Vec<Rule>,
    next_id: RuleId,
}

impl Rules {
    /// Adds a rule and returns its id (ids start at 1 and only grow).
    pub fn add(
        &mut self,
        owner: OwnerPublic,
        tag: Tag,
        scope: Scope,
        expires_at: Option<u64>,
    ) -> RuleId {
        self.next_id = self.next_id.max(self.rules.last().map_or(0, |r| r.id)) + 1;
        let id = self.next_id;
        self.rules.push(Rule {
            id,
            owner,
            tag,
            scope,
            expires_at,
        });
        id
    }

    /// Removes a rule; `None` if there is no such id.
    pub fn remove(&mut self, id: RuleId) -> Option<Rule> {
        let i = self.rules.iter().position(|r| r.id == id)?;
        Some(self.rules.remove(i))
    }

    /// A rule by id.
    pub fn get(&self, id: RuleId) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// All rules, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True if some rule trusts `owner`: only then do its certificates and
    /// revocations matter to this node.
    pub fn names_owner(&self, owner: &OwnerPublic) -> bool {
        self.rules.iter().any(|r| &r.owner == owner)
    }

    /// Removes the rules that expired at `now` and returns them (for the
    /// audit log).
    pub fn prune(&mut self, now: u64) -> Vec<Rule> {
        let (live, dead) = std::mem::take(&mut self.rules)
            .into_iter()
            .partition(|r| r.live_at(now));
        self.rules = live;
        dead
    }
}

/// What an operator granted a peer by hand (`trust approve --allow`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What the peer may open.
    pub scope: Scope,
    /// Unix time it ends, if it does.
    pub expires_at: Option<u64>,
}

impl Grant {
    /// Everything, for good: an approval without `--allow`, as before scopes.
    pub fn everything() -> Self {
        Grant {
            scope: Scope::all(),
            expires_at: None,
        }
    }
}

/// What opened a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Source {
    /// The operator's manual grant.
    Manual,
    /// A local rule matched the peer's certificate.
    Rule(RuleId),
    /// The peer's own signed grant to us (the outbound direction).
    Peer,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Manual => f.write_str("manual grant"),
            Source::Rule(id) => write!(f, "rule {id}"),
            Source::Peer => f.write_str("the peer's grant"),
        }
    }
}

/// One source's share of an effective grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution {
    /// Who opened it.
    pub source: Source,
    /// What it opens.
    pub scope: Scope,
    /// Unix time it ends, if it does.
    pub until: Option<u64>,
}

/// The verdict on one packet, with what decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Let it through: this source opens it.
    Allow(Source),
    /// Drop it (and answer with ICMP administratively prohibited or RST).
    Deny(Denial),
}

/// Why a packet was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Denial {
    /// The peer is revoked (by us, by its owner, or a succession fork):
    /// nothing passes.
    Revoked,
    /// No live grant or rule opens this protocol and port.
    NotGranted,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(s) => write!(f, "allowed by {s}"),
            Decision::Deny(Denial::Revoked) => f.write_str("denied: revoked"),
            Decision::Deny(Denial::NotGranted) => f.write_str("denied: not granted"),
        }
    }
}

/// A run of ports opened by one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    lo: u16,
    hi: u16,
    source: Source,
}

/// Everything a peer may open on this node (or we on it), ready for the
/// per-packet check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveGrant {
    revoked: bool,
    tcp: Vec<Segment>,
    udp: Vec<Segment>,
    icmp: Option<Source>,
    other: Option<Source>,
    /// The earliest end among the contributions: from then on the
    /// precomputed segments may be stale.
    valid_until: Option<u64>,
    /// The live contributions, in deciding order.
    parts: Vec<Contribution>,
}

/// What [`evaluate`] knows about one peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerFacts<'a> {
    /// The operator's manual grant, if any.
    pub manual: Option<&'a Grant>,
    /// The peer's certificate, verified for this peer (and checked against
    /// revocations) by the caller.
    pub cert: Option<&'a VerifiedCert>,
    /// Revoked by us, by its owner, or through a succession fork.
    pub revoked: bool,
}

/// The effective grant of a peer at `now`: the union of its live manual
/// grant and the live rules its live certificate matches.
pub fn evaluate(rules: &Rules, peer: &PeerFacts<'_>, now: u64) -> EffectiveGrant {
    if peer.revoked {
        return EffectiveGrant::revoked();
    }
    let mut parts = Vec::new();
    if let Some(g) = peer.manual {
        parts.push(Contribution {
            source: Source::Manual,
            scope: g.scope.clone(),
            until: g.expires_at,
        });
    }
    if let Some(cert) = peer.cert {
        for r in rules.iter().filter(|r| r.matches(cert)) {
            let until = r
                .expires_at
                .map_or(cert.expires_at(), |t| t.min(cert.expires_at()));
            parts.push(Contribution {
                source: Source::Rule(r.id),
                scope: r.scope.clone(),
                until: Some(until),
            });
        }
    }
    EffectiveGrant::build(parts, now)
}

impl EffectiveGrant {
    /// Opens nothing.
    pub fn none() -> Self {
        EffectiveGrant::build(Vec::new(), 0)
    }

    /// Opens nothing, and says why.
    pub fn revoked() -> Self {
        EffectiveGrant {
            revoked: true,
            ..EffectiveGrant::none()
        }
    }

    /// The grant made of `parts` (in deciding order) at `now`; parts that
    /// ended or open nothing are left out.
    pub fn build(mut parts: Vec<Contribution>, now: u64) -> Self {
        parts.retain(|p| live(p.until, now) && !p.scope.is_empty());
        EffectiveGrant {
            revoked: false,
            tcp: segments(&parts, Scope::tcp),
            udp: segments(&parts, Scope::udp),
            icmp: parts.iter().find(|p| p.scope.icmp()).map(|p| p.source),
            other: parts.iter().find(|p| p.scope.is_all()).map(|p| p.source),
            valid_until: parts.iter().filter_map(|p| p.until).min(),
            parts,
        }
    }

    /// The grant a peer signed for us, for checking our outbound packets.
    pub fn from_peer(scope: Scope, until: Option<u64>, now: u64) -> Self {
        EffectiveGrant::build(
            vec![Contribution {
                source: Source::Peer,
                scope,
                until,
            }],
            now,
        )
    }

    /// Whether a packet that opens `traffic` passes at `now`.
    ///
    /// Exact at any `now` not earlier than the time the grant was built:
    /// until [`EffectiveGrant::valid_until`] it is a binary search; after it,
    /// a scan of the contributions that skips the ended ones (rebuild then to
    /// get the fast path back). Never allocates.
    pub fn decide(&self, traffic: Traffic, now: u64) -> Decision {
        if self.revoked {
            return Decision::Deny(Denial::Revoked);
        }
        if !live(self.valid_until, now) {
            return self.decide_by_scan(traffic, now);
        }
        let source = match traffic {
            Traffic::Tcp(p) => find(&self.tcp, p),
            Traffic::Udp(p) => find(&self.udp, p),
            Traffic::Icmp => self.icmp,
            Traffic::Other(_) => self.other,
        };
        source.map_or(Decision::Deny(Denial::NotGranted), Decision::Allow)
    }

    fn decide_by_scan(&self, traffic: Traffic, now: u64) -> Decision {
        self.parts
            .iter()
            .find(|p| live(p.until, now) && p.scope.covers(traffic))
            .map_or(Decision::Deny(Denial::NotGranted), |p| {
                Decision::Allow(p.source)
            })
    }

    /// The earliest time a contribution ends: rebuild the grant then (the
    /// caller's timer), so [`EffectiveGrant::decide`] stays on its fast path.
    pub fn valid_until(&self) -> Option<u64> {
        self.valid_until
    }

    /// True if it was revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }

    /// True if anything is open at `now`. A peer is admitted only when the
    /// grants both ways admit.
    pub fn admits(&self, now: u64) -> bool {
        !self.revoked && self.parts.iter().any(|p| live(p.until, now))
    }

    /// Everything open at `now`, as one scope: what `trust list` shows and
    /// what we sign for the peer.
    pub fn scope(&self, now: u64) -> Scope {
        self.parts
            .iter()
            .filter(|p| !self.revoked && live(p.until, now))
            .fold(Scope::none(), |acc, p| acc.union(&p.scope))
    }

    /// The contributions, in deciding order, for `explain`.
    pub fn parts(&self) -> &[Contribution] {
        &self.parts
    }
}

/// The source deciding `port`, if any.
fn find(segs: &[Segment], port: u16) -> Option<Source> {
    let i = segs.partition_point(|s| s.hi < port);
    segs.get(i).filter(|s| s.lo <= port).map(|s| s.source)
}

/// Splits the port space into runs with one deciding source each: a sweep
/// over range starts and ends, where the deciding source at each point is
/// the first (lowest index) contribution covering it.
fn segments(parts: &[Contribution], ranges: fn(&Scope) -> &[PortRange]) -> Vec<Segment> {
    // (position, is_start, contribution index); an end sits one past `hi`.
    let mut events: Vec<(u32, bool, usize)> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        for r in ranges(&p.scope) {
            events.push((u32::from(r.lo), true, i));
            events.push((u32::from(r.hi) + 1, false, i));
        }
    }
    events.sort_unstable();
    let mut active = BTreeSet::new();
    let mut out = Vec::new();
    // The run being built: where it starts and its deciding contribution.
    let mut run: Option<(u32, usize)> = None;
    let mut k = 0;
    while k < events.len() {
        let pos = events[k].0;
        while let Some(&(at, start, i)) = events.get(k).filter(|e| e.0 == pos) {
            debug_assert_eq!(at, pos);
            if start {
                active.insert(i);
            } else {
                active.remove(&i);
            }
            k += 1;
        }
        let top = active.first().copied();
        if run.map(|(_, i)| i) != top {
            if let Some((lo, i)) = run {
                // Positions below 65536 here: `pos` ends a run that started
                // at a port, and ends never exceed 65536.
                out.push(Segment {
                    lo: lo as u16,
                    hi: (pos - 1) as u16,
                    source: parts[i].source,
                });
            }
            run = top.map(|i| (pos, i));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{parse_tags, Certificate, OwnerKey};
    use crate::identity::NodeId;
    use crate::lifetime::{DAY, HOUR};

    const NOW: u64 = 1_750_000_000;
    const PEER: NodeId = NodeId([9; 16]);

    fn owner(n: u8) -> OwnerKey {
        OwnerKey::from_secret(&[n; 32])
    }

    fn cert(o: &OwnerKey, tags: &str, lifetime: u64) -> VerifiedCert {
        Certificate::issue(o, PEER, parse_tags(tags).unwrap(), NOW, lifetime)
            .unwrap()
            .verify(&o.public(), &PEER, NOW)
            .unwrap()
    }

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    #[test]
    fn a_matching_rule_opens_its_scope_and_nothing_else() {
        let o = owner(1);
        let mut rules = Rules::default();
        let id = rules.add(
            o.public(),
            "build".parse().unwrap(),
            scope("tcp/8080"),
            None,
        );
        let c = cert(&o, "build,ci", 30 * DAY);
        let g = evaluate(
            &rules,
            &PeerFacts {
                cert: Some(&c),
                ..Default::default()
            },
            NOW,
        );
        assert!(g.admits(NOW));
        assert_eq!(
            g.decide(Traffic::Tcp(8080), NOW),
            Decision::Allow(Source::Rule(id))
        );
        assert_eq!(
            g.decide(Traffic::Tcp(22), NOW),
            Decision::Deny(Denial::NotGranted)
        );
        assert_eq!(
            g.decide(Traffic::Udp(8080), NOW),
            Decision::Deny(Denial::NotGranted)
        );
        assert_eq!(
            g.decide(Traffic::Icmp, NOW),
            Decision::Deny(Denial::NotGranted)
        );
        assert_eq!(g.scope(NOW).to_string(), "tcp/8080");
    }

    #[test]
    fn rules_for_another_owner_or_tag_do_not_match() {
        let (o, other) = (owner(1), owner(2));
        let mut rules = Rules::default();
        rules.add(other.public(), "build".parse().unwrap(), Scope::all(), None);
        rules.add(o.public(), "cache".parse().unwrap(), Scope::all(), None);
        let c = cert(&o, "build", 30 * DAY);
        let g = evaluate(
            &rules,
            &PeerFacts {
                cert: Some(&c),
                ..Default::default()
            },
            NOW,
        );
        assert!(!g.admits(NOW));
        assert_eq!(
            g.decide(Traffic::Tcp(1), NOW),
            Decision::Deny(Denial::NotGranted)
        );
        // Without a certificate, rules never apply.
        let g = evaluate(&rules, &PeerFacts::default(), NOW);
        assert!(!g.admits(NOW) && g.parts().is_empty());
    }

    #[test]
    fn union_of_manual_grant_and_rules_with_the_first_source_deciding() {
        let o = owner(1);
        let mut rules = Rules::default();
        let r1 = rules.add(
            o.public(),
            "build".parse().unwrap(),
            scope("tcp/9000-9100,icmp"),
            None,
        );
        let r2 = rules.add(
            o.public(),
            "ci".parse().unwrap(),
            scope("tcp/9050-9200,udp/53"),
            None,
        );
        let manual = Grant {
            scope: scope("tcp/22,tcp/9099"),
            expires_at: None,
        };
        let c = cert(&o, "build,ci", 30 * DAY);
        let facts = PeerFacts {
            manual: Some(&manual),
            cert: Some(&c),
            revoked: false,
        };
        let g = evaluate(&rules, &facts, NOW);
        let d = |t| g.decide(t, NOW);
        assert_eq!(d(Traffic::Tcp(22)), Decision::Allow(Source::Manual));
        assert_eq!(d(Traffic::Tcp(9099)), Decision::Allow(Source::Manual));
        assert_eq!(d(Traffic::Tcp(9000)), Decision::Allow(Source::Rule(r1)));
        assert_eq!(d(Traffic::Tcp(9100)), Decision::Allow(Source::Rule(r1)));
        assert_eq!(d(Traffic::Tcp(9101)), Decision::Allow(Source::Rule(r2)));
        assert_eq!(d(Traffic::Tcp(9201)), Decision::Deny(Denial::NotGranted));
        assert_eq!(d(Traffic::Udp(53)), Decision::Allow(Source::Rule(r2)));
        assert_eq!(d(Traffic::Icmp), Decision::Allow(Source::Rule(r1)));
        assert_eq!(d(Traffic::Other(47)), Decision::Deny(Denial::NotGranted));
        assert_eq!(g.scope(NOW).to_string(), "tcp/22,tcp/9000-9200,udp/53,icmp");
    }

    #[test]
    fn expired_rules_grants_and_certificates_contribute_nothing() {
        let o = owner(1);
        let mut rules = Rules::default();
        let short = rules.add(
            o.public(),
            "build".parse().unwrap(),
            scope("tcp/80"),
            Some(NOW + HOUR),
        );
        let long = rules.add(
            o.public(),
            "build".parse().unwrap(),
            scope("tcp/80-81"),
            None,
        );
        let manual = Grant {
            scope: scope("tcp/22"),
            expires_at: Some(NOW + 2 * HOUR),
        };
        let c = cert(&o, "build", DAY);
        let facts = PeerFacts {
            manual: Some(&manual),
            cert: Some(&c),
            revoked: false,
        };
        let g = evaluate(&rules, &facts, NOW);
        assert_eq!(g.valid_until(), Some(NOW + HOUR));
        assert_eq!(
            g.decide(Traffic::Tcp(80), NOW),
            Decision::Allow(Source::Rule(short))
        );
        // Past the rule's end, the same grant (not rebuilt) still answers
        // exactly: the next source takes over.
        let t = NOW + HOUR;
        assert_eq!(
            g.decide(Traffic::Tcp(80), t),
            Decision::Allow(Source::Rule(long))
        );
        assert_eq!(
            g.decide(Traffic::Tcp(22), t),
            Decision::Allow(Source::Manual)
        );
        let t = NOW + 2 * HOUR;
        assert_eq!(
            g.decide(Traffic::Tcp(22), t),
            Decision::Deny(Denial::NotGranted)
        );
        assert_eq!(
            g.decide(Traffic::Tcp(81), t),
            Decision::Allow(Source::Rule(long))
        );
        // The certificate's expiry ends every rule it matched.
        let t = NOW + DAY;
        assert_eq!(
            g.decide(Traffic::Tcp(81), t),
            Decision::Deny(Denial::NotGranted)
        );
        assert!(!g.admits(t));
        // Rebuilt after the end, nothing is left.
        let g = evaluate(&rules, &facts, t);
        assert!(!g.admits(t) && g.parts().is_empty() && g.valid_until().is_none());
    }

    #[test]
    fn revocation_removes_everything() {
        let o = owner(1);
        let mut rules = Rules::default();
        rules.add(o.public(), "build".parse().unwrap(), Scope::all(), None);
        let c = cert(&o, "build", DAY);
        let manual = Grant::everything();
        let facts = PeerFacts {
            manual: Some(&manual),
            cert: Some(&c),
            revoked: true,
        };
        let g = evaluate(&rules, &facts, NOW);
        assert!(g.is_revoked() && !g.admits(NOW));
        assert_eq!(
            g.decide(Traffic::Tcp(22), NOW),
            Decision::Deny(Denial::Revoked)
        );
        assert_eq!(g.scope(NOW), Scope::none());
        assert_eq!(
            g.decide(Traffic::Tcp(22), NOW).to_string(),
            "denied: revoked"
        );
    }

    #[test]
    fn everything_and_other_protocols() {
        let g = EffectiveGrant::build(
            vec![Contribution {
                source: Source::Manual,
                scope: Scope::all(),
                until: None,
            }],
            NOW,
        );
        for t in [
            Traffic::Tcp(0),
            Traffic::Tcp(65535),
            Traffic::Udp(1),
            Traffic::Icmp,
            Traffic::Other(47),
        ] {
            assert_eq!(g.decide(t, NOW), Decision::Allow(Source::Manual));
        }
        let g = EffectiveGrant::from_peer(scope("tcp/8080"), Some(NOW + 10), NOW);
        assert_eq!(
            g.decide(Traffic::Tcp(8080), NOW),
            Decision::Allow(Source::Peer)
        );
        assert_eq!(
            g.decide(Traffic::Tcp(8080), NOW + 10),
            Decision::Deny(Denial::NotGranted)
        );
        assert_eq!(
            Decision::Allow(Source::Peer).to_string(),
            "allowed by the peer's grant"
        );
        assert!(!EffectiveGrant::none().admits(NOW));
    }

    #[test]
    fn rule_ids_are_never_reused_and_rules_survive_serialisation() {
        let o = owner(1);
        let mut rules = Rules::default();
        let a = rules.add(o.public(), "a".parse().unwrap(), Scope::all(), None);
        let b = rules.add(o.public(), "b".parse().unwrap(), scope("udp/53"), Some(NOW));
        assert_eq!((a, b), (1, 2));
        assert!(rules.remove(b).is_some() && rules.remove(b).is_none());
        assert_eq!(
            rules.add(o.public(), "c".parse().unwrap(), Scope::all(), None),
            3
        );
        assert!(rules.names_owner(&o.public()) && !rules.names_owner(&owner(2).public()));
        let bytes = postcard::to_allocvec(&rules).unwrap();
        let back: Rules = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, rules);
        rules.add(o.public(), "d".parse().unwrap(), Scope::all(), Some(NOW));
        let pruned = rules.prune(NOW);
        assert_eq!(pruned.len(), 1);
        assert_eq!(rules.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(rules.get(3).unwrap().tag.as_str(), "c");
    }

    /// The model: each contribution as a flat list of what it opens, checked
    /// one by one in deciding order.
    #[derive(Clone, Debug)]
    struct ModelScope {
        all: bool,
        tcp: Vec<(u16, u16)>,
        udp: Vec<(u16, u16)>,
        icmp: bool,
    }

    impl ModelScope {
        fn covers(&self, t: Traffic) -> bool {
            let within = |rs: &[(u16, u16)], p: u16| rs.iter().any(|&(lo, hi)| lo <= p && p <= hi);
            self.all
                || match t {
                    Traffic::Tcp(p) => within(&self.tcp, p),
                    Traffic::Udp(p) => within(&self.udp, p),
                    Traffic::Icmp => self.icmp,
                    Traffic::Other(_) => false,
                }
        }
        fn scope(&self) -> Scope {
            if self.all {
                return Scope::all();
            }
            let r = |v: &[(u16, u16)]| v.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect();
            Scope::new(r(&self.tcp), r(&self.udp), self.icmp)
        }
    }

    fn model_scope() -> impl proptest::strategy::Strategy<Value = ModelScope> {
        use proptest::prelude::*;
        let ranges =
            proptest::collection::vec((0u16..60, 0u16..15).prop_map(|(lo, n)| (lo, lo + n)), 0..4);
        (
            prop::bool::weighted(0.1),
            ranges.clone(),
            ranges,
            any::<bool>(),
        )
            .prop_map(|(all, tcp, udp, icmp)| ModelScope {
                all,
                tcp,
                udp,
                icmp,
            })
    }

    fn traffic() -> impl proptest::strategy::Strategy<Value = Traffic> {
        use proptest::prelude::*;
        prop_oneof![
            (0u16..80).prop_map(Traffic::Tcp),
            (0u16..80).prop_map(Traffic::Udp),
            Just(Traffic::Icmp),
            Just(Traffic::Other(47)),
            Just(Traffic::Tcp(65535)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// `evaluate` + `decide` against a naive model of the rules: at any
        /// later time, the first live contribution (manual grant, then rules
        /// by id, each only while its rule and the certificate live) that
        /// covers the packet decides it; a revoked peer gets nothing.
        #[test]
        fn evaluation_agrees_with_a_naive_model(
            rules in proptest::collection::vec((0u8..2, 0u8..3, model_scope(), proptest::option::of(1u64..100)), 0..6),
            manual in proptest::option::of((model_scope(), proptest::option::of(1u64..100))),
            cert in proptest::option::of((0u8..2, proptest::collection::btree_set(0u8..3, 1..3), 1u64..100)),
            revoked in proptest::bool::weighted(0.1),
            later in 0u64..120,
            probes in proptest::collection::vec(traffic(), 1..16),
        ) {
            let owners = [owner(1), owner(2)];
            let tag = |t: u8| -> Tag { ["build", "ci", "cache"][t as usize].parse().unwrap() };
            let mut set = Rules::default();
            for (o, t, s, exp) in &rules {
                set.add(owners[*o as usize].public(), tag(*t), s.scope(), exp.map(|e| NOW + e));
            }
            let grant = manual.as_ref().map(|(s, exp)| Grant { scope: s.scope(), expires_at: exp.map(|e| NOW + e) });
            let verified = cert.as_ref().map(|(o, tags, life)| {
                let o = &owners[*o as usize];
                let tags = tags.iter().map(|&t| tag(t)).collect();
                Certificate::issue(o, PEER, tags, NOW, *life).unwrap().verify(&o.public(), &PEER, NOW).unwrap()
            });
            let facts = PeerFacts { manual: grant.as_ref(), cert: verified.as_ref(), revoked };
            let g = evaluate(&set, &facts, NOW);
            let now = NOW + later;

            // The model.
            let lives = |exp: &Option<u64>| exp.is_none_or(|e| later < e);
            let mut order: Vec<(Source, &ModelScope)> = Vec::new();
            if let Some((s, exp)) = &manual {
                if lives(exp) {
                    order.push((Source::Manual, s));
                }
            }
            if let Some((co, ctags, clife)) = &cert {
                for (i, (o, t, s, exp)) in rules.iter().enumerate() {
                    if o == co && ctags.contains(t) && lives(exp) && later < *clife {
                        order.push((Source::Rule(i as RuleId + 1), s));
                    }
                }
            }
            for t in probes {
                let want = if revoked {
                    Decision::Deny(Denial::Revoked)
                } else {
                    order.iter().find(|(_, s)| s.covers(t)).map_or(Decision::Deny(Denial::NotGranted), |(src, _)| Decision::Allow(*src))
                };
                proptest::prop_assert_eq!(g.decide(t, now), want, "{:?} at +{}", t, later);
                // A grant rebuilt at `now` agrees too.
                proptest::prop_assert_eq!(evaluate(&set, &facts, now).decide(t, now), want);
            }
        }
    }
}
