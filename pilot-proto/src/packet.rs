//! The few facts about inner IP packets the data plane needs, read straight
//! from the bytes, and the ICMP error it sends for refused destinations.

use std::net::Ipv4Addr;

/// Source and destination of an IPv4 packet, or `None` if the bytes are not
/// a plausible IPv4 packet.
pub fn ipv4_addrs(pkt: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let ihl = ((pkt.first()? & 0x0f) as usize) * 4;
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || ihl < 20 || ihl > pkt.len() {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    Some((src, dst))
}

/// Destination of an IPv4 packet.
pub fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    ipv4_addrs(pkt).map(|(_, d)| d)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const ICMP_DEST_UNREACH: u8 = 3;
/// "Communication administratively prohibited" (RFC 1812).
pub const ICMP_ADMIN_PROHIBITED: u8 = 13;

/// Writes into `out` an ICMPv4 "destination unreachable, administratively
/// prohibited" answer to `orig`, as if sent by the refused destination, so
/// the local program fails at once instead of waiting for a timeout. Returns
/// the length, or `None` when no error may be sent (not IPv4, a fragment
/// other than the first, or itself an ICMP error).
pub fn icmp_admin_prohibited(orig: &[u8], out: &mut [u8]) -> Option<usize> {
    let (src, dst) = ipv4_addrs(orig)?;
    let ihl = ((orig[0] & 0x0f) as usize) * 4;
    if orig.len() < ihl {
        return None;
    }
    let frag_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if frag_offset != 0 {
        return None;
    }
    // Never answer an ICMP error with an ICMP error (RFC 1122 3.2.2).
    if orig[9] == 1 {
        let t = *orig.get(ihl)?;
        if !matches!(t, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) {
            return None;
        }
    }
    let quoted = orig.len().min(ihl + 8);
    let total = 20 + 8 + quoted;
    if out.len() < total {
        return None;
    }
    let out = &mut out[..total];
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[6] = 0x40; // don't fragment
    out[8] = 64; // TTL
    out[9] = 1; // ICMP
    out[12..16].copy_from_slice(&dst.octets());
    out[16..20].copy_from_slice(&src.octets());
    let c = checksum(&out[..20]);
    out[10..12].copy_from_slice(&c.to_be_bytes());
    out[20] = ICMP_DEST_UNREACH;
    out[21] = ICMP_ADMIN_PROHIBITED;
    out[28..].copy_from_slice(&orig[..quoted]);
    let c = checksum(&out[20..]);
    out[22..24].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP SYN from 10.77.0.1:40000 to 10.77.0.2:80 (checksums not needed).
    fn syn() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2,
        ];
        p.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
        ]);
        p.extend_from_slice(&[0, 0, 0, 0]);
        p
    }

    #[test]
    fn addresses() {
        let p = syn();
        assert_eq!(
            ipv4_addrs(&p),
            Some((Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2)))
        );
        assert_eq!(ipv4_addrs(&p[..19]), None);
        let mut long_header = p.clone();
        long_header[0] = 0x4f; // claims 60 header bytes
        assert_eq!(ipv4_addrs(&long_header[..40]), None);
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(ipv4_addrs(&v6), None);
    }

    #[test]
    fn checksum_rfc1071_example() {
        // RFC 1071 section 3 example bytes sum to 0xddf2 (before complement).
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn admin_prohibited_fixture() {
        let p = syn();
        let mut out = [0u8; 128];
        let n = icmp_admin_prohibited(&p, &mut out).unwrap();
        let icmp = &out[..n];
        assert_eq!(n, 20 + 8 + 28);
        assert_eq!(
            &icmp[12..16],
            &[10, 77, 0, 2],
            "from the refused destination"
        );
        assert_eq!(&icmp[16..20], &[10, 77, 0, 1], "to the sender");
        assert_eq!((icmp[20], icmp[21]), (3, 13));
        assert_eq!(checksum(&icmp[..20]), 0, "valid IP header checksum");
        assert_eq!(checksum(&icmp[20..]), 0, "valid ICMP checksum");
        assert_eq!(&icmp[28..], &p[..28], "quotes header + 8 bytes");
    }

    #[test]
    fn no_error_for_errors_or_fragments() {
        let mut out = [0u8; 128];
        let mut p = syn();
        p[9] = 1;
        p[20] = 3; // an ICMP error
        assert_eq!(icmp_admin_prohibited(&p, &mut out), None);
        p[20] = 8; // echo request is fine
        assert!(icmp_admin_prohibited(&p, &mut out).is_some());
        let mut f = syn();
        f[7] = 1; // fragment offset 8
        assert_eq!(icmp_admin_prohibited(&f, &mut out), None);
        assert_eq!(icmp_admin_prohibited(&syn(), &mut [0u8; 10]), None);
    }
}
