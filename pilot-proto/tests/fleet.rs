//! The fleet-trust pieces together, as the daemon will use them: an owner
//! certifies a node, a local rule admits it with a scope, the node rotates
//! its identity and keeps its admission, an owner revocation of its first id
//! reaches its current one, a fork refuses the lineage, and the audit log of
//! all of it verifies, until one byte changes.

use pilot_proto::audit::{self, VerifyOptions, Writer};
use pilot_proto::cert::{parse_tags, Certificate, OwnerKey, Revocation, DEFAULT_LIFETIME};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::policy::{evaluate, Decision, Denial, PeerFacts, Rules, Source};
use pilot_proto::ports::Traffic;
use pilot_proto::succession::{Standing, Succession, Successions};

const NOW: u64 = 1_750_000_000;

fn id(n: u8) -> Identity {
    Identity::from_bytes(&[n; 64])
}

/// What the cache node decides about a peer presenting `cert` as `peer`,
/// with the successions and revocations it knows: the daemon's admission
/// path, in a few lines.
fn decide(
    rules: &Rules,
    successions: &Successions,
    revocations: &[Revocation],
    owner: &OwnerKey,
    cert: &Certificate,
    peer: NodeId,
    traffic: Traffic,
) -> Decision {
    let refused = !matches!(successions.standing(&peer), Standing::Current);
    let ancestry = successions.ancestry(&peer);
    let revoked = refused || revocations.iter().any(|r| r.covers(&peer, &ancestry));
    let verified = cert
        .verify_inherited(&owner.public(), &peer, &ancestry, NOW + 60)
        .ok();
    let facts = PeerFacts {
        manual: None,
        cert: verified.as_ref(),
        revoked,
    };
    evaluate(rules, &facts, NOW + 60).decide(traffic, NOW + 60)
}

#[test]
fn rules_admit_a_certified_node_through_rotations_until_revoked() {
    let owner = OwnerKey::from_secret(&[42; 32]);
    let (build1, build2, build3) = (id(1), id(2), id(3));
    let cert = Certificate::issue(
        &owner,
        build1.node_id(),
        parse_tags("build").unwrap(),
        NOW,
        DEFAULT_LIFETIME,
    )
    .unwrap();
    // The certificate travels as bytes and is read back by the peer.
    let cert = Certificate::from_bytes(&cert.to_bytes()).unwrap();

    // The cache node's rule: build nodes of this owner may reach tcp/8080.
    let mut rules = Rules::default();
    let rule = rules.add(
        owner.public(),
        "build".parse().unwrap(),
        "tcp/8080".parse().unwrap(),
        None,
    );
    let mut successions = Successions::default();
    let mut revocations = Vec::new();
    let d = |s: &Successions, r: &[Revocation], peer: &Identity, t| {
        decide(&rules, s, r, &owner, &cert, peer.node_id(), t)
    };

    assert_eq!(
        d(&successions, &revocations, &build1, Traffic::Tcp(8080)),
        Decision::Allow(Source::Rule(rule))
    );
    assert_eq!(
        d(&successions, &revocations, &build1, Traffic::Tcp(22)),
        Decision::Deny(Denial::NotGranted)
    );
    // A node the owner never certified gets nothing with the same cert.
    assert_eq!(
        d(&successions, &revocations, &id(9), Traffic::Tcp(8080)),
        Decision::Deny(Denial::NotGranted)
    );

    // Two rotations: the certificate follows, the old ids are refused.
    let chain = [
        Succession::sign(&build1, &build2, 1, NOW + 10),
        Succession::sign(&build2, &build3, 2, NOW + 20),
    ];
    successions.apply_chain(&chain).unwrap();
    assert_eq!(
        d(&successions, &revocations, &build3, Traffic::Tcp(8080)),
        Decision::Allow(Source::Rule(rule))
    );
    for old in [&build1, &build2] {
        assert_eq!(
            d(&successions, &revocations, old, Traffic::Tcp(8080)),
            Decision::Deny(Denial::Revoked),
            "the old key after rotation"
        );
    }

    // The owner revokes the first id: it reaches the current one.
    let rev = Revocation::from_armored(
        &Revocation::sign(&owner, build1.node_id(), NOW + 30).to_armored(),
    )
    .unwrap();
    rev.verify(&owner.public()).unwrap();
    revocations.push(rev);
    assert_eq!(
        d(&successions, &revocations, &build3, Traffic::Tcp(8080)),
        Decision::Deny(Denial::Revoked)
    );

    // Without the revocation, a fork (build1's key leaked) does the same.
    let mut forked = successions.clone();
    assert!(forked
        .apply(&Succession::sign(&build1, &id(7), 1, NOW + 40))
        .is_err());
    assert_eq!(forked.standing(&build3.node_id()), Standing::Forked);
    assert_eq!(
        d(&forked, &[], &build3, Traffic::Tcp(8080)),
        Decision::Deny(Denial::Revoked)
    );
    assert_eq!(
        d(&forked, &[], &id(7), Traffic::Tcp(8080)),
        Decision::Deny(Denial::Revoked)
    );
}

#[test]
fn the_audit_log_of_a_rotation_verifies_with_both_keys() {
    let (old, new) = (id(1), id(2));
    let owner = OwnerKey::from_secret(&[42; 32]);
    let cert = Certificate::issue(
        &owner,
        old.node_id(),
        parse_tags("build").unwrap(),
        NOW,
        DEFAULT_LIFETIME,
    )
    .unwrap();
    let mut w = Writer::new();
    let mut log = Vec::new();
    let hash = pilot_proto::hex::encode(&cert.digest());
    log.extend(
        w.append(
            &old,
            NOW,
            "cert-install",
            &serde_json::json!({"sha256": hash}),
        )
        .unwrap(),
    );
    log.extend(w.checkpoint(&old, NOW + 1));
    let s = Succession::sign(&old, &new, 1, NOW + 2);
    log.extend(
        w.append(
            &new,
            NOW + 2,
            "identity-rotate",
            &serde_json::json!({"old": s.old_id().to_string(), "new": s.new_id().to_string()}),
        )
        .unwrap(),
    );
    log.extend(w.checkpoint(&new, NOW + 3));

    let keys = [old.ed_public(), new.ed_public()];
    let report = audit::verify(&log, &keys, VerifyOptions::default()).unwrap();
    assert_eq!(report.signed_head, w.signed_head());
    assert_eq!(report.signed_by, Some(1));
    // `audit head` then `audit verify --expect-head`.
    let head: audit::Head = w.signed_head().unwrap().to_string().parse().unwrap();
    let opts = VerifyOptions {
        expect_head: Some(head),
        after: None,
    };
    assert!(audit::verify(&log, &keys, opts).is_ok());
    // One byte changed anywhere: refused, and the line is named.
    let mut bad = log.clone();
    let pos = bad.iter().position(|&b| b == b'c').unwrap();
    bad[pos] = b'C';
    let err = audit::verify(&bad, &keys, opts).unwrap_err();
    assert_eq!(err.line, 1, "{err}");
}
