//! The registry control protocol (postcard), both directions. A decoded
//! message must re-encode to bytes that decode to the same value, and
//! checking any signature it carries must not panic (and must give the same
//! answer after the round trip), certificates and revocations included.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::cert::{Certificate, Revocation};
use pilot_proto::messages::{self, FromRegistry, PushItem, ToRegistry};
use pilot_proto::succession::Succession;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decode, and if that works: encode, decode again, compare.
fn round_trip<T>(data: &[u8]) -> Option<(T, T)>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let msg: T = messages::decode(data).ok()?;
    let bytes = messages::encode(&msg)
        .unwrap_or_else(|e| panic!("decoded {msg:?} but cannot encode it: {e}"));
    let back: T = messages::decode(&bytes)
        .unwrap_or_else(|e| panic!("cannot decode our own encoding {bytes:02x?} of {msg:?}: {e}"));
    assert_eq!(back, msg, "round trip through {bytes:02x?}");
    // The canonical encoding is a fixed point.
    assert_eq!(messages::encode(&back).expect("encoded once"), bytes);
    Some((msg, back))
}

/// Every signature check a receiver of `m` would run.
fn verify_to(m: &ToRegistry) -> Vec<bool> {
    match m {
        ToRegistry::Register { reg, .. } | ToRegistry::RegisterWithToken { reg, .. } => {
            vec![reg.verify()]
        }
        ToRegistry::Statement { statement, .. } => vec![statement.verify()],
        ToRegistry::PublishCert { cert, .. } => vec![cert_ok(cert)],
        ToRegistry::PublishRevocation { revocation, .. } => vec![revocation_ok(revocation)],
        ToRegistry::Succeed { succession, .. } => vec![Succession::from_bytes(succession)
            .is_ok_and(|s| s.verify().is_ok())],
        ToRegistry::Lookup { .. }
        | ToRegistry::Ack { .. }
        | ToRegistry::PathConfirm { .. }
        | ToRegistry::Ping { .. }
        | ToRegistry::FindCerts { .. }
        | ToRegistry::FindRevocations { .. } => vec![],
    }
}

/// A certificate as carried: decoded and checked under the owner it names
/// (for the node it names, at a fixed time).
fn cert_ok(bytes: &[u8]) -> bool {
    Certificate::from_bytes(bytes)
        .is_ok_and(|c| c.verify(&c.body.owner, &c.body.node, 1_800_000_000).is_ok())
}

/// A revocation as carried: decoded and checked under the owner it names.
fn revocation_ok(bytes: &[u8]) -> bool {
    Revocation::from_bytes(bytes).is_ok_and(|r| r.verify(&r.body.owner).is_ok())
}

fn verify_from(m: &FromRegistry) -> Vec<bool> {
    match m {
        FromRegistry::Peer { info, .. } => vec![info.identity.binding_valid()],
        FromRegistry::Push {
            item: PushItem::Statement { statement, .. },
            ..
        } => vec![statement.verify()],
        FromRegistry::Registered { .. }
        | FromRegistry::Punch { .. }
        | FromRegistry::Ok { .. }
        | FromRegistry::Error { .. }
        | FromRegistry::Pong { .. }
        | FromRegistry::PathCheck { .. } => vec![],
        FromRegistry::Certs { certs, .. } => certs.iter().map(|c| cert_ok(c)).collect(),
        FromRegistry::Revocations { revocations, .. } => {
            revocations.iter().map(|r| revocation_ok(r)).collect()
        }
        FromRegistry::Revoked { revocation } => vec![revocation_ok(revocation)],
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((msg, back)) = round_trip::<ToRegistry>(data) {
        assert_eq!(verify_to(&msg), verify_to(&back));
    }
    if let Some((msg, back)) = round_trip::<FromRegistry>(data) {
        assert_eq!(verify_from(&msg), verify_from(&back));
    }
});
