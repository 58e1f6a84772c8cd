//! The fleet-trust formats a node reads from others: owner certificates,
//! owner revocations and identity successions (binary and armored), port
//! scopes and lifetimes typed by people, the packet inspection that grants
//! run on and a scoped peer's filter, an audit log handed to `audit
//! verify`, and cookie replies. None
//! may panic; a decoded certificate, revocation or succession re-encodes to
//! bytes that decode to the same value, and checking it gives the same
//! answer after the round trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::audit::{self, VerifyOptions};
use pilot_proto::cert::{Certificate, OwnerPublic, Revocation};
use pilot_proto::identity::NodeId;
use pilot_proto::ports::{Scope, Traffic};
use pilot_proto::succession::Succession;
use pilot_proto::{cookie, filter, flow, lifetime};

const OWNER: OwnerPublic = OwnerPublic([7; 32]);
const NODE: NodeId = NodeId([9; 16]);
const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Certificate::from_bytes(data) {
        let back = Certificate::from_bytes(&c.to_bytes()).expect("our own encoding decodes");
        assert_eq!(back, c);
        assert_eq!(
            back.verify(&OWNER, &NODE, NOW).is_ok(),
            c.verify(&OWNER, &NODE, NOW).is_ok()
        );
        let _ = c.verify_inherited(&OWNER, &NODE, &[NodeId([1; 16])], NOW);
    }
    if let Ok(r) = Revocation::from_bytes(data) {
        let back = Revocation::from_bytes(&r.to_bytes()).expect("our own encoding decodes");
        assert_eq!(back, r);
        assert_eq!(back.verify(&OWNER).is_ok(), r.verify(&OWNER).is_ok());
    }
    if let Ok(s) = Succession::from_bytes(data) {
        let back = Succession::from_bytes(&s.to_bytes()).expect("our own encoding decodes");
        assert_eq!(back, s);
        assert_eq!(back.verify().is_ok(), s.verify().is_ok());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Certificate::from_armored(text);
        let _ = Revocation::from_armored(text);
        let _ = Succession::from_armored(text);
        let _ = text.parse::<OwnerPublic>();
        let _ = text.parse::<Traffic>();
        let _ = lifetime::parse(text);
        if let Ok(scope) = text.parse::<Scope>() {
            // The printed form is the canonical one: it parses back to the
            // same scope.
            let again: Scope = scope.to_string().parse().expect("printed scope parses");
            assert_eq!(again, scope);
        }
    }
    let _ = flow::inspect(data);
    // A scoped peer's filter, both ways, on the same bytes: never panics,
    // and a packet it cannot read never passes.
    let grant = |s: &str| {
        pilot_proto::policy::EffectiveGrant::from_peer(s.parse().expect("a valid scope"), None, NOW)
    };
    let mut f = filter::Filter::new(grant("tcp/22,udp/53,icmp"), grant("tcp/8080"));
    let now = std::time::Instant::now();
    for dir in [filter::Direction::Outbound, filter::Direction::Inbound] {
        let (v, _) = f.check(data, dir, now, NOW);
        if flow::inspect(data).is_err() {
            assert_eq!(v, filter::Verdict::Drop);
        }
    }
    let _ = audit::verify(data, &[[7; 32]], VerifyOptions::default());
    let _ = cookie::open_reply(&[5; 32], data, data);
});
