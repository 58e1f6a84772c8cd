//! Port mapping answers from a gateway: PCP MAP (RFC 6887) and NAT-PMP
//! (RFC 6886).
//!
//! Input layout: `input[14..]` is read as a PCP answer to a MAP request
//! whose nonce is `input[..12]` and port `input[12..14]`; the whole input is
//! read as a PCP answer to a request with the answer's own nonce and port
//! (bytes 24..36 and 40..42, so the success path is reachable without
//! guessing a nonce), and as a NAT-PMP answer.

#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use pilot_proto::{natpmp, pcp};

fn request(nonce: &[u8], port: &[u8]) -> pcp::MapRequest {
    pcp::MapRequest {
        nonce: nonce.try_into().expect("12 bytes"),
        client: Ipv4Addr::new(198, 51, 100, 10),
        internal: u16::from_be_bytes(port.try_into().expect("2 bytes")),
        suggested: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        lifetime: 7200,
    }
}

/// Whatever `parse_map` accepts carries the request's nonce, UDP and port; a
/// success has a usable address; a refusal is never code 0.
fn check_pcp(answer: &[u8], req: &pcp::MapRequest) {
    let ours = answer.len() >= pcp::MAP_LEN
        && answer[24..36] == req.nonce
        && answer[36] == 17
        && answer[40..42] == req.internal.to_be_bytes();
    match pcp::parse_map(answer, req) {
        Ok(r) => {
            assert!(ours, "accepted an answer to another request");
            assert_eq!(answer[..4], [2, 0x81, answer[2], 0]);
            assert_eq!(answer.len() % 4, 0);
            assert!(answer.len() <= pcp::MAX_RESPONSE);
            assert!(!r.external.ip().is_unspecified());
        }
        Err(pcp::ResponseError::Refused(code)) => {
            assert!(ours, "took a refusal for another request");
            assert_ne!(code, 0);
        }
        Err(pcp::ResponseError::NotOurs) => assert!(!ours),
        Err(pcp::ResponseError::NatPmpOnly) => assert_eq!(answer[0], 0),
        Err(pcp::ResponseError::Malformed) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 14 {
        let (head, answer) = data.split_at(14);
        check_pcp(answer, &request(&head[..12], &head[12..]));
    }
    if data.len() >= pcp::MAP_LEN {
        check_pcp(data, &request(&data[24..36], &data[40..42]));
    }
    match natpmp::parse(data) {
        Ok(natpmp::Response::Address { .. }) => assert_eq!(data.len(), 12),
        Ok(natpmp::Response::MappedUdp { .. }) => assert_eq!(data.len(), 16),
        Err(natpmp::ResponseError::Refused(code)) => assert_ne!(code, 0),
        Err(natpmp::ResponseError::Malformed) => {}
    }
});
