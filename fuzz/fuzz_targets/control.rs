//! The registry control protocol (postcard), both directions. A decoded
//! message must re-encode to bytes that decode to the same value, and
//! checking any signature it carries must not panic (and must give the same
//! answer after the round trip).

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::messages::{self, FromRegistry, PushItem, ToRegistry};
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
        ToRegistry::Register { reg, .. } => vec![reg.verify()],
        ToRegistry::Statement { statement, .. } => vec![statement.verify()],
        ToRegistry::Lookup { .. } | ToRegistry::Ack { .. } | ToRegistry::Ping { .. } => vec![],
    }
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
        | FromRegistry::Pong { .. } => vec![],
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
