//! PCP (RFC 6887) MAP messages, without I/O: asking a gateway to map a UDP
//! port to us, and reading its answer. The nonce that ties an answer to
//! its request is the caller's (it must stay the same to renew or remove a
//! mapping). A gateway's bytes are untrusted input: every length and field
//! is checked, nothing panics.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

/// The gateway's PCP port (the same as NAT-PMP's).
pub const PORT: u16 = 5351;
/// The longest answer a server may send (RFC 6887 §7).
pub const MAX_RESPONSE: usize = 1100;
/// A MAP request or response without options.
pub const MAP_LEN: usize = 60;

const VERSION: u8 = 2;
const OP_MAP: u8 = 1;
const RESPONSE_BIT: u8 = 128;
const UDP: u8 = 17;
const HEADER_LEN: usize = 24;

/// "Map UDP `internal` on `client` (our address as the gateway sees it) to
/// an external port, `suggested` if it can, for `lifetime` seconds" (0
/// removes the mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// Ties answers to this request; the same for every renewal and the
    /// removal of one mapping (RFC 6887 §11.1).
    pub nonce: [u8; 12],
    /// Our address on the link to the gateway (the source of the request:
    /// a server refuses a request whose source differs).
    pub client: Ipv4Addr,
    /// Our port.
    pub internal: u16,
    /// The external endpoint we would like (0.0.0.0 and 0: any).
    pub suggested: SocketAddrV4,
    /// Seconds asked for.
    pub lifetime: u32,
}

impl MapRequest {
    /// The request's bytes.
    pub fn encode(&self) -> [u8; MAP_LEN] {
        let mut m = [0u8; MAP_LEN];
        m[0] = VERSION;
        m[1] = OP_MAP;
        m[4..8].copy_from_slice(&self.lifetime.to_be_bytes());
        m[8..24].copy_from_slice(&self.client.to_ipv6_mapped().octets());
        m[24..36].copy_from_slice(&self.nonce);
        m[36] = UDP;
        m[40..42].copy_from_slice(&self.internal.to_be_bytes());
        m[42..44].copy_from_slice(&self.suggested.port().to_be_bytes());
        m[44..60].copy_from_slice(&self.suggested.ip().to_ipv6_mapped().octets());
        m
    }
}

/// A successful answer to a [`MapRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapResponse {
    /// Seconds the mapping lasts (0 after a removal).
    pub lifetime: u32,
    /// The server's epoch: a smaller value than before means it forgot
    /// its mappings.
    pub epoch: u32,
    /// Where peers reach us.
    pub external: SocketAddrV4,
}

/// An answer that is not a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a PCP MAP response, cut short, or badly laid out.
    #[error("not a PCP MAP answer")]
    Malformed,
    /// A NAT-PMP answer (version 0): the gateway speaks only NAT-PMP.
    #[error("the gateway speaks NAT-PMP, not PCP")]
    NatPmpOnly,
    /// A MAP answer for another request: its nonce, protocol or port are
    /// not ours (a late answer, or a forgery by someone off the path who
    /// cannot know the nonce).
    #[error("a PCP answer to another request (nonce, protocol or port differ)")]
    NotOurs,
    /// The gateway refused, with this result code.
    #[error("the gateway refused: {}", result_text(*.0))]
    Refused(u8),
}

/// Reads a gateway's answer to `req`.
pub fn parse_map(b: &[u8], req: &MapRequest) -> Result<MapResponse, ResponseError> {
    let Some((header, body)) = b.split_first_chunk::<HEADER_LEN>() else {
        // A NAT-PMP server answers any other version with 8 bytes.
        return match b {
            [0, op, ..] if op & RESPONSE_BIT != 0 => Err(ResponseError::NatPmpOnly),
            _ => Err(ResponseError::Malformed),
        };
    };
    match (header[0], header[1]) {
        (0, op) if op & RESPONSE_BIT != 0 => return Err(ResponseError::NatPmpOnly),
        (VERSION, op) if op == RESPONSE_BIT | OP_MAP => {}
        _ => return Err(ResponseError::Malformed),
    }
    // Options follow the opcode's 36 bytes in whole 32-bit words, up to
    // the size limit; we ask for none and read none.
    if body.len() < MAP_LEN - HEADER_LEN || b.len() % 4 != 0 || b.len() > MAX_RESPONSE {
        return Err(ResponseError::Malformed);
    }
    let code = header[3];
    let lifetime = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let epoch = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    // An error answer repeats the request's fields too (§11.4), so the
    // nonce is checked first: a refusal from someone who does not know it
    // must not end our attempt.
    let (nonce, rest) = body.split_at(12);
    if nonce != req.nonce || rest[0] != UDP || rest[4..6] != req.internal.to_be_bytes() {
        return Err(ResponseError::NotOurs);
    }
    if code != 0 {
        return Err(ResponseError::Refused(code));
    }
    let port = u16::from_be_bytes([rest[6], rest[7]]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&rest[8..24]);
    // We ask for IPv4; an IPv6 or zero answer is no mapping we can use.
    let Some(ip) = Ipv6Addr::from(ip).to_ipv4_mapped() else {
        return Err(ResponseError::Malformed);
    };
    if ip.is_unspecified() || (port == 0 && lifetime != 0) {
        return Err(ResponseError::Malformed);
    }
    Ok(MapResponse {
        lifetime,
        epoch,
        external: SocketAddrV4::new(ip, port),
    })
}

/// What a result code means (RFC 6887 §7.4).
pub fn result_text(code: u8) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized (mapping is turned off on the gateway)",
        3 => "malformed request",
        4 => "unsupported opcode",
        5 => "unsupported option",
        6 => "malformed option",
        7 => "network failure (the gateway has no usable external address)",
        8 => "out of resources",
        9 => "unsupported protocol",
        10 => "quota exceeded",
        11 => "cannot provide the external port",
        12 => "address mismatch (a NAT between us and the gateway)",
        13 => "too many remote peers",
        _ => "unknown result code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn req() -> MapRequest {
        MapRequest {
            nonce: NONCE,
            client: Ipv4Addr::new(198, 51, 100, 10),
            internal: 40000,
            suggested: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 40000),
            lifetime: 7200,
        }
    }

    /// A success answer to `req()`: 203.0.113.23:41000 for 3600 s, epoch 9.
    fn answer() -> Vec<u8> {
        let mut a = vec![2, 0x81, 0, 0, 0, 0, 0x0e, 0x10, 0, 0, 0, 9];
        a.extend_from_slice(&[0; 12]);
        a.extend_from_slice(&NONCE);
        a.extend_from_slice(&[17, 0, 0, 0, 0x9c, 0x40, 0xa0, 0x28]);
        a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        a.extend_from_slice(&[203, 0, 113, 23]);
        a
    }

    #[test]
    fn the_request_is_laid_out_as_the_rfc_says() {
        let m = req().encode();
        assert_eq!(m[..8], [2, 1, 0, 0, 0, 0, 0x1c, 0x20]);
        assert_eq!(
            m[8..24],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 10]
        );
        assert_eq!(m[24..36], NONCE);
        assert_eq!(m[36..44], [17, 0, 0, 0, 0x9c, 0x40, 0x9c, 0x40]);
        assert_eq!(
            m[44..60],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]
        );
    }

    #[test]
    fn an_answer_from_miniupnpd_parses() {
        // Captured from miniupnpd 2.3.1 (see netns s27), answering a MAP of
        // UDP 40000 from 198.51.100.10 for 7200 s.
        let captured = crate::hex::decode(
            "0281000000001c20000000060000000000000000000000004136e24ddd432f6b\
             55f04b7e110000009c409c4000000000000000000000ffffcb007117",
        )
        .unwrap();
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&captured[24..36]);
        let asked = MapRequest { nonce, ..req() };
        assert_eq!(
            parse_map(&captured, &asked),
            Ok(MapResponse {
                lifetime: 7200,
                epoch: 6,
                external: "203.0.113.23:40000".parse().unwrap(),
            })
        );
        assert_eq!(parse_map(&captured, &req()), Err(ResponseError::NotOurs));
    }

    #[test]
    fn a_success_answer_parses() {
        assert_eq!(
            parse_map(&answer(), &req()),
            Ok(MapResponse {
                lifetime: 3600,
                epoch: 9,
                external: "203.0.113.23:41000".parse().unwrap(),
            })
        );
        // Options after the body (whole words) are skipped.
        let mut opt = answer();
        opt.extend_from_slice(&[0x80, 0, 0, 0]);
        assert!(parse_map(&opt, &req()).is_ok());
        // A removal's answer: lifetime 0 and port 0 are fine then.
        let mut gone = answer();
        gone[4..8].copy_from_slice(&[0; 4]);
        gone[42..44].copy_from_slice(&[0; 2]);
        assert_eq!(parse_map(&gone, &req()).map(|r| r.lifetime), Ok(0));
    }

    #[test]
    fn a_wrong_nonce_is_refused_even_on_an_error_answer() {
        for i in 0..12 {
            let mut a = answer();
            a[24 + i] ^= 0x40;
            assert_eq!(parse_map(&a, &req()), Err(ResponseError::NotOurs), "{i}");
            // A forged refusal with a wrong nonce does not count either.
            a[3] = 2;
            assert_eq!(parse_map(&a, &req()), Err(ResponseError::NotOurs), "{i}");
        }
        // Another protocol or port: not ours.
        let mut tcp = answer();
        tcp[36] = 6;
        assert_eq!(parse_map(&tcp, &req()), Err(ResponseError::NotOurs));
        let mut port = answer();
        port[41] ^= 1;
        assert_eq!(parse_map(&port, &req()), Err(ResponseError::NotOurs));
    }

    #[test]
    fn refusals_and_nat_pmp_answers_are_told_apart() {
        let mut refused = answer();
        refused[3] = 2;
        assert_eq!(parse_map(&refused, &req()), Err(ResponseError::Refused(2)));
        assert!(ResponseError::Refused(2)
            .to_string()
            .contains("not authorized"));
        refused[3] = 1;
        assert_eq!(parse_map(&refused, &req()), Err(ResponseError::Refused(1)));
        // A NAT-PMP gateway's "unsupported version" (RFC 6886 §3.5).
        let natpmp = [0, 0x81, 0, 1, 0, 0, 0, 7];
        assert_eq!(parse_map(&natpmp, &req()), Err(ResponseError::NatPmpOnly));
        let natpmp_map = [0, 0x81, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_map(&natpmp_map, &req()),
            Err(ResponseError::NatPmpOnly)
        );
        let mut long = natpmp_map.to_vec();
        long.resize(60, 0);
        assert_eq!(parse_map(&long, &req()), Err(ResponseError::NatPmpOnly));
    }

    #[test]
    fn anything_else_is_malformed_never_a_panic() {
        let good = answer();
        for n in 0..good.len() {
            let r = parse_map(&good[..n], &req());
            assert_eq!(r, Err(ResponseError::Malformed), "{n}");
        }
        // Not a whole number of words, or over the size limit.
        let mut odd = good.clone();
        odd.push(0);
        assert_eq!(parse_map(&odd, &req()), Err(ResponseError::Malformed));
        let mut huge = good.clone();
        huge.resize(MAX_RESPONSE + 4, 0);
        assert_eq!(parse_map(&huge, &req()), Err(ResponseError::Malformed));
        // Our own request (no response bit), another opcode or version.
        assert_eq!(
            parse_map(&req().encode(), &req()),
            Err(ResponseError::Malformed)
        );
        for (i, v) in [(1, 0x82), (1, 0x80), (0, 1), (0, 3)] {
            let mut a = good.clone();
            a[i] = v;
            assert_eq!(parse_map(&a, &req()), Err(ResponseError::Malformed));
        }
        // An IPv6 or unspecified external address, or port 0 with a lifetime.
        let mut v6 = good.clone();
        v6[44] = 0x20;
        assert_eq!(parse_map(&v6, &req()), Err(ResponseError::Malformed));
        let mut zero = good.clone();
        zero[56..60].copy_from_slice(&[0; 4]);
        assert_eq!(parse_map(&zero, &req()), Err(ResponseError::Malformed));
        let mut no_port = good;
        no_port[42..44].copy_from_slice(&[0; 2]);
        assert_eq!(parse_map(&no_port, &req()), Err(ResponseError::Malformed));
    }
}
