//! NAT-PMP (RFC 6886) messages, without I/O: asking a gateway for its
//! external address and for a UDP port mapping, and reading its answers.
//! A gateway's bytes are untrusted input: every length and field is
//! checked, nothing panics.

use std::net::Ipv4Addr;

/// The gateway's NAT-PMP port.
pub const PORT: u16 = 5351;
/// The longest answer we read (a mapping response is 16 bytes).
pub const MAX_RESPONSE: usize = 16;

const VERSION: u8 = 0;
const OP_ADDRESS: u8 = 0;
const OP_MAP_UDP: u8 = 1;
const RESPONSE_BIT: u8 = 128;

/// "What is your external address?"
pub fn address_request() -> [u8; 2] {
    [VERSION, OP_ADDRESS]
}

/// "Map UDP `internal` on my address to an external port, `suggested` if
/// you can, for `lifetime` seconds" (0 removes the mapping).
pub fn map_udp_request(internal: u16, suggested: u16, lifetime: u32) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[0] = VERSION;
    m[1] = OP_MAP_UDP;
    m[4..6].copy_from_slice(&internal.to_be_bytes());
    m[6..8].copy_from_slice(&suggested.to_be_bytes());
    m[8..12].copy_from_slice(&lifetime.to_be_bytes());
    m
}

/// A successful answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// The gateway's external address.
    Address {
        /// Seconds since the gateway's mapping table was (re)started: a
        /// smaller value than before means it forgot its mappings.
        epoch: u32,
        /// The address.
        external: Ipv4Addr,
    },
    /// A UDP mapping was made (or renewed, or removed with lifetime 0).
    MappedUdp {
        /// As in `Address`.
        epoch: u32,
        /// Our port it maps to.
        internal: u16,
        /// The external port the gateway chose.
        external: u16,
        /// Seconds it lasts.
        lifetime: u32,
    },
}

/// An answer that is not a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a NAT-PMP response of a kind we ask for, or cut short.
    #[error("not a NAT-PMP answer")]
    Malformed,
    /// The gateway refused, with this result code.
    #[error("the gateway refused: {}", result_text(*.0))]
    Refused(u16),
}

/// Reads a gateway's answer.
pub fn parse(b: &[u8]) -> Result<Response, ResponseError> {
    let Some((&[version, op], rest)) = b.split_first_chunk::<2>() else {
        return Err(ResponseError::Malformed);
    };
    if version != VERSION || op & RESPONSE_BIT == 0 || rest.len() < 6 {
        return Err(ResponseError::Malformed);
    }
    let code = u16::from_be_bytes([rest[0], rest[1]]);
    let epoch = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]);
    let body = &rest[6..];
    if code != 0 {
        return Err(ResponseError::Refused(code));
    }
    match op & !RESPONSE_BIT {
        OP_ADDRESS if body.len() == 4 => Ok(Response::Address {
            epoch,
            external: Ipv4Addr::new(body[0], body[1], body[2], body[3]),
        }),
        OP_MAP_UDP if body.len() == 8 => Ok(Response::MappedUdp {
            epoch,
            internal: u16::from_be_bytes([body[0], body[1]]),
            external: u16::from_be_bytes([body[2], body[3]]),
            lifetime: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        }),
        _ => Err(ResponseError::Malformed),
    }
}

/// What a result code means (RFC 6886 §3.5).
pub fn result_text(code: u16) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized (mapping is turned off on the gateway)",
        3 => "network failure (the gateway has no usable external address)",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown result code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_as_the_rfc_says() {
        assert_eq!(address_request(), [0, 0]);
        assert_eq!(
            map_udp_request(40000, 40001, 7200),
            [0, 1, 0, 0, 0x9c, 0x40, 0x9c, 0x41, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn answers_from_miniupnpd_parse() {
        // Captured from miniupnpd 2.3.1 (see netns s25).
        let addr = [0, 0x80, 0, 0, 0, 0, 0, 8, 0xcb, 0, 0x71, 0x0a];
        assert_eq!(
            parse(&addr),
            Ok(Response::Address {
                epoch: 8,
                external: Ipv4Addr::new(203, 0, 113, 10)
            })
        );
        let map = [
            0, 0x81, 0, 0, 0, 0, 0, 8, 0x9c, 0x40, 0x9c, 0x40, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(
            parse(&map),
            Ok(Response::MappedUdp {
                epoch: 8,
                internal: 40000,
                external: 40000,
                lifetime: 3600
            })
        );
        // Port forwarding turned off: "network failure".
        let refused = [
            0, 0x81, 0, 3, 0, 0, 0, 9, 0x9c, 0x40, 0x9c, 0x40, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(parse(&refused), Err(ResponseError::Refused(3)));
        assert!(ResponseError::Refused(3)
            .to_string()
            .contains("network failure"));
    }

    #[test]
    fn anything_else_is_malformed_never_a_panic() {
        let good = [
            0, 0x81, 0, 0, 0, 0, 0, 8, 0x9c, 0x40, 0x9c, 0x40, 0, 0, 0x0e, 0x10,
        ];
        for n in 0..good.len() {
            assert_eq!(parse(&good[..n]), Err(ResponseError::Malformed), "{n}");
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(parse(&longer), Err(ResponseError::Malformed));
        // Our own requests (no response bit), PCP (version 2), another op.
        assert_eq!(
            parse(&map_udp_request(1, 1, 1)),
            Err(ResponseError::Malformed)
        );
        let mut pcp = good;
        pcp[0] = 2;
        assert_eq!(parse(&pcp), Err(ResponseError::Malformed));
        let mut tcp = good;
        tcp[1] = 0x82;
        assert_eq!(parse(&tcp), Err(ResponseError::Malformed));
    }
}
