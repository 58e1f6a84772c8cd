//! STUN (RFC 8489): the header check, Binding requests (registry side) and
//! Binding responses (node side).
//!
//! Input layout: the whole input is tried as a request and as a response to
//! its own transaction id (bytes 8..20, so the attribute walk is reachable
//! without guessing a tid), and `input[12..]` is tried as a response to the
//! tid `input[..12]`.

#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use pilot_proto::stun::{self, TransactionId};

/// Our own response to `tid` must be a STUN message, not a request, and must
/// parse back to the address it carries.
fn check_round_trip(tid: &TransactionId, addr: SocketAddr) {
    let resp = stun::binding_response(tid, addr);
    assert!(
        stun::looks_like_stun(&resp),
        "our response is not STUN: {resp:02x?}"
    );
    assert_eq!(stun::parse_binding_request(&resp), None);
    assert_eq!(
        stun::parse_binding_response(&resp, tid),
        Some(addr),
        "round trip of {addr} with tid {tid:02x?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let is_stun = stun::looks_like_stun(data);

    if let Some(tid) = stun::parse_binding_request(data) {
        assert!(is_stun);
        assert_eq!(tid[..], data[8..20]);
        // The registry answers with the observed address; derive one of
        // each family from the request so the fuzzer controls it too.
        let port = u16::from_be_bytes([tid[0], tid[1]]);
        let v4 = Ipv4Addr::new(tid[2], tid[3], tid[4], tid[5]);
        check_round_trip(&tid, SocketAddr::new(v4.into(), port));
        let mut o = [0u8; 16];
        o[..12].copy_from_slice(&tid);
        o[12..].copy_from_slice(&data[..4]);
        check_round_trip(&tid, SocketAddr::new(Ipv6Addr::from(o).into(), port));
    }

    if data.len() >= 20 {
        let tid: TransactionId = data[8..20].try_into().expect("12 bytes");
        if let Some(addr) = stun::parse_binding_response(data, &tid) {
            assert!(is_stun);
            check_round_trip(&tid, addr);
        }
    }

    if data.len() >= 12 {
        let (tid, msg) = data.split_at(12);
        let tid: TransactionId = tid.try_into().expect("12 bytes");
        if let Some(addr) = stun::parse_binding_response(msg, &tid) {
            assert!(stun::looks_like_stun(msg));
            check_round_trip(&tid, addr);
        }
    }
});
