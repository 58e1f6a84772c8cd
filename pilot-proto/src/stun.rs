//! The part of STUN (RFC 8489) a rendezvous server needs: Binding requests
//! answered with XOR-MAPPED-ADDRESS, and the client side to learn one's own
//! public endpoint.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed magic cookie of RFC 5389/8489.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const HEADER_LEN: usize = 20;

/// A 96-bit STUN transaction id.
pub type TransactionId = [u8; 12];

/// True if the bytes have a STUN header: top two bits zero, the magic
/// cookie, and a length that matches the datagram.
pub fn looks_like_stun(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN || buf[0] & 0xC0 != 0 {
        return false;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    cookie == MAGIC_COOKIE && len % 4 == 0 && len + HEADER_LEN == buf.len()
}

/// If `buf` is a Binding request, its transaction id.
pub fn parse_binding_request(buf: &[u8]) -> Option<TransactionId> {
    if !looks_like_stun(buf) || u16::from_be_bytes([buf[0], buf[1]]) != BINDING_REQUEST {
        return None;
    }
    let mut tid = [0u8; 12];
    tid.copy_from_slice(&buf[8..20]);
    Some(tid)
}

/// A Binding request with no attributes.
pub fn binding_request(tid: &TransactionId) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..].copy_from_slice(tid);
    out
}

/// A Binding success response carrying `observed` as XOR-MAPPED-ADDRESS.
pub fn binding_response(tid: &TransactionId, observed: SocketAddr) -> Vec<u8> {
    let (family, addr_len) = match observed.ip() {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + attr_len);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(tid);
    out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.push(0);
    out.push(family);
    out.extend_from_slice(&(observed.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(tid);
    match observed.ip() {
        IpAddr::V4(ip) => out.extend(ip.octets().iter().zip(key).map(|(a, k)| a ^ k)),
        IpAddr::V6(ip) => out.extend(ip.octets().iter().zip(key).map(|(a, k)| a ^ k)),
    }
    out
}

/// If `buf` is a Binding success response for `tid`, the mapped address.
pub fn parse_binding_response(buf: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    if !looks_like_stun(buf)
        || u16::from_be_bytes([buf[0], buf[1]]) != BINDING_SUCCESS
        || &buf[8..20] != tid
    {
        return None;
    }
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(tid);
    let mut rest = &buf[HEADER_LEN..];
    while rest.len() >= 4 {
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let padded = len.div_ceil(4) * 4;
        let value = rest.get(4..4 + len)?;
        if ty == ATTR_XOR_MAPPED_ADDRESS && len >= 8 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
            let ip = match (value[1], len) {
                (1, 8) => {
                    let mut o = [0u8; 4];
                    for i in 0..4 {
                        o[i] = value[4 + i] ^ key[i];
                    }
                    IpAddr::V4(Ipv4Addr::from(o))
                }
                (2, 20) => {
                    let mut o = [0u8; 16];
                    for i in 0..16 {
                        o[i] = value[4 + i] ^ key[i];
                    }
                    IpAddr::V6(Ipv6Addr::from(o))
                }
                _ => return None,
            };
            return Some(SocketAddr::new(ip, port));
        }
        rest = rest.get(4 + padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5769 section 2.2: sample IPv4 response, 192.0.2.1:32853.
    #[test]
    fn rfc5769_ipv4_response() {
        let resp = unhex(
            "0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 000b 74657374 20766563 746f7220
             0020 0008 0001 a147 e112a643
             0008 0014 2b91f599 fd9e9011 46384a09 2a55e6a0 95a4c5cb
             8028 0004 c07d4c96",
        );
        let tid: TransactionId = resp[8..20].try_into().unwrap();
        assert_eq!(
            parse_binding_response(&resp, &tid),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        assert_eq!(parse_binding_response(&resp, &[0; 12]), None, "wrong tid");
    }

    /// RFC 5769 section 2.1: the sample request, with attributes we ignore.
    #[test]
    fn rfc5769_request_is_a_binding_request() {
        let req = unhex(
            "0001 0058 2112a442 b7e7a701 bc34d686 fa87dfae
             8022 0010 5354554e 20746573 7420636c 69656e74
             0024 0004 6e0001ff
             8029 0008 932ff9b1 51263b36
             0006 0009 6576746a 3a683659 59202020
             0008 0014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
             8028 0004 e57a3bcf",
        );
        assert_eq!(
            parse_binding_request(&req).map(hex_tid),
            Some("b7e7a701bc34d686fa87dfae".to_string())
        );
        assert_eq!(parse_binding_request(&req[..40]), None, "length mismatch");
    }

    fn hex_tid(t: TransactionId) -> String {
        crate::hex::encode(&t)
    }

    #[test]
    fn our_response_round_trips_and_matches_rfc_bytes() {
        let tid: TransactionId = unhex("b7e7a701 bc34d686 fa87dfae").try_into().unwrap();
        let addr: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let resp = binding_response(&tid, addr);
        assert_eq!(&resp[20..], &unhex("0020 0008 0001 a147 e112a643")[..]);
        assert_eq!(parse_binding_response(&resp, &tid), Some(addr));
        let v6: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        assert_eq!(
            parse_binding_response(&binding_response(&tid, v6), &tid),
            Some(v6)
        );
    }

    #[test]
    fn truncated_attributes_do_not_panic() {
        let tid = [3u8; 12];
        let resp = binding_response(&tid, "203.0.113.5:9".parse().unwrap());
        for cut in 0..resp.len() {
            let mut r = resp[..cut].to_vec();
            if r.len() >= 4 {
                let l = (r.len().saturating_sub(20)) as u16;
                r[2..4].copy_from_slice(&l.to_be_bytes());
            }
            let _ = parse_binding_response(&r, &tid);
        }
    }
}
