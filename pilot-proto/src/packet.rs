//! The few facts about inner IP packets the data plane needs, read straight
//! from the bytes, the ICMP errors it sends back into the TUN (refused
//! destination, fragmentation needed), and IPv4 fragmentation for packets
//! larger than a peer's path allows.

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
/// "Fragmentation needed and DF set" (RFC 792), carrying the next-hop MTU
/// (RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// The smallest MTU an IPv4 host must accept (RFC 791): no ICMP
/// "fragmentation needed" asks for less.
pub const IPV4_MIN_MTU: u16 = 68;

/// The "don't fragment" flag of an IPv4 packet (false if it is not IPv4).
pub fn ipv4_df(pkt: &[u8]) -> bool {
    ipv4_addrs(pkt).is_some() && pkt[6] & 0x40 != 0
}

/// True if `pkt` is an IPv4 ICMP error message (anything but the query
/// types), which must never be answered with another ICMP error
/// (RFC 1122 3.2.2). False for non-ICMP and unparsable packets.
pub fn is_icmp_error(pkt: &[u8]) -> bool {
    if ipv4_addrs(pkt).is_none() || pkt[9] != 1 {
        return false;
    }
    let ihl = ((pkt[0] & 0x0f) as usize) * 4;
    match pkt.get(ihl) {
        Some(t) => !matches!(t, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18),
        // Too short to say: treat it as an error, so it is not answered.
        None => true,
    }
}

/// Writes into `out` an ICMPv4 "destination unreachable, administratively
/// prohibited" answer to `orig`, as if sent by the refused destination, so
/// the local program fails at once instead of waiting for a timeout. Returns
/// the length, or `None` when no error may be sent (not IPv4, a fragment
/// other than the first, or itself an ICMP error).
pub fn icmp_admin_prohibited(orig: &[u8], out: &mut [u8]) -> Option<usize> {
    icmp_unreachable(orig, ICMP_ADMIN_PROHIBITED, 0, out)
}

/// Writes into `out` an ICMPv4 "fragmentation needed and DF set" answer to
/// `orig` with next-hop MTU `mtu`, as if sent by `orig`'s destination (the
/// only address on the far side of the TUN that the kernel does not treat
/// as its own), so the sending program's TCP lowers its segment size at
/// once. Returns the length, or `None` when no error may be sent: not IPv4,
/// a fragment other than the first, itself an ICMP error, or an MTU below
/// the IPv4 minimum of 68.
pub fn icmp_frag_needed(orig: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    if mtu < IPV4_MIN_MTU {
        return None;
    }
    icmp_unreachable(orig, ICMP_FRAG_NEEDED, mtu, out)
}

/// An ICMPv4 "destination unreachable" with `code` and, in the last two
/// bytes of the ICMP header, `next_hop_mtu` (zero for every code but 4).
fn icmp_unreachable(orig: &[u8], code: u8, next_hop_mtu: u16, out: &mut [u8]) -> Option<usize> {
    let (src, dst) = ipv4_addrs(orig)?;
    let ihl = ((orig[0] & 0x0f) as usize) * 4;
    let frag_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if frag_offset != 0 {
        return None;
    }
    // Never answer an ICMP error with an ICMP error (RFC 1122 3.2.2).
    if is_icmp_error(orig) {
        return None;
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
    out[21] = code;
    out[26..28].copy_from_slice(&next_hop_mtu.to_be_bytes());
    out[28..].copy_from_slice(&orig[..quoted]);
    let c = checksum(&out[20..]);
    out[22..24].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// Why an IPv4 packet cannot be fragmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// Not a well-formed IPv4 packet (bad version, header length or total
    /// length).
    #[error("not a well-formed IPv4 packet")]
    Malformed,
    /// The packet has "don't fragment" set.
    #[error("the packet has don't-fragment set")]
    DontFragment,
    /// The MTU leaves no room for 8 payload bytes after the header.
    #[error("MTU {0} is too small to fragment into")]
    MtuTooSmall(usize),
}

/// The fragments of an IPv4 packet that is larger than an MTU (RFC 791),
/// written one by one into buffers the caller owns, so the data plane can
/// seal each straight into its send buffer.
///
/// Every fragment keeps the identification, TTL, protocol, addresses and
/// the options that must be copied (the first fragment keeps them all);
/// each but the last carries a multiple of 8 payload bytes and "more
/// fragments". A packet that is itself a fragment is split further with
/// offsets continuing from its own, keeping its own "more fragments" on the
/// last piece.
#[derive(Clone, Debug)]
pub struct Fragments<'a> {
    pkt: &'a [u8],
    /// Header length of the original (and of the first fragment).
    ihl: usize,
    /// Header length of the fragments after the first: the options that
    /// must be copied, padded to 4 bytes with zeros (end of options).
    later_ihl: usize,
    later_opts: [u8; 40],
    /// Largest payload of the first fragment and of the later ones (a
    /// multiple of 8).
    first_max: usize,
    later_max: usize,
    /// The packet fits the MTU: it is its own only fragment.
    whole: bool,
    /// Payload bytes already written.
    done: usize,
    finished: bool,
    /// The original's fragment offset (in bytes) and "more fragments" flag.
    base: usize,
    more: bool,
}

impl<'a> Fragments<'a> {
    /// Prepares to split `pkt` into fragments of at most `mtu` bytes. The
    /// slice must be exactly the packet (its length equal to the header's
    /// total length). A packet that fits is one "fragment": itself.
    pub fn new(pkt: &'a [u8], mtu: usize) -> Result<Self, FragmentError> {
        if ipv4_addrs(pkt).is_none()
            || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
        {
            return Err(FragmentError::Malformed);
        }
        let ihl = ((pkt[0] & 0x0f) as usize) * 4;
        let flags_off = u16::from_be_bytes([pkt[6], pkt[7]]);
        let whole = pkt.len() <= mtu;
        if !whole && flags_off & 0x4000 != 0 {
            return Err(FragmentError::DontFragment);
        }
        // RFC 791: only options with the "copied" bit go into every fragment.
        let mut later_opts = [0u8; 40];
        let mut later_len = 0;
        let opts = &pkt[20..ihl];
        let mut i = 0;
        while i < opts.len() {
            let kind = opts[i];
            let len = match kind {
                0 => break, // end of options
                1 => 1,     // no operation
                _ => match opts.get(i + 1) {
                    Some(&l) if l >= 2 && i + usize::from(l) <= opts.len() => usize::from(l),
                    // A broken option list: copy nothing further.
                    _ => break,
                },
            };
            if kind & 0x80 != 0 {
                later_opts[later_len..later_len + len].copy_from_slice(&opts[i..i + len]);
                later_len += len;
            }
            i += len;
        }
        let later_ihl = 20 + later_len.div_ceil(4) * 4;
        let room = |hl: usize| mtu.saturating_sub(hl) / 8 * 8;
        let (first_max, later_max) = (room(ihl), room(later_ihl));
        if !whole && (first_max == 0 || later_max == 0) {
            return Err(FragmentError::MtuTooSmall(mtu));
        }
        Ok(Fragments {
            pkt,
            ihl,
            later_ihl,
            later_opts,
            first_max,
            later_max,
            whole,
            done: 0,
            finished: false,
            base: usize::from(flags_off & 0x1fff) * 8,
            more: flags_off & 0x2000 != 0,
        })
    }

    /// The length of the next fragment, or `None` when all are written.
    pub fn next_len(&self) -> Option<usize> {
        if self.finished {
            return None;
        }
        if self.whole {
            return Some(self.pkt.len());
        }
        let left = self.pkt.len() - self.ihl - self.done;
        Some(if self.done == 0 {
            self.ihl + self.first_max.min(left)
        } else {
            self.later_ihl + self.later_max.min(left)
        })
    }

    /// Writes the next fragment at the start of `out` and returns its
    /// length; `None` when all are written or `out` is shorter than
    /// [`Fragments::next_len`].
    pub fn write_next(&mut self, out: &mut [u8]) -> Option<usize> {
        let len = self.next_len()?;
        if out.len() < len {
            return None;
        }
        let out = &mut out[..len];
        if self.whole {
            out.copy_from_slice(self.pkt);
            self.finished = true;
            return Some(len);
        }
        let first = self.done == 0;
        let hl = if first { self.ihl } else { self.later_ihl };
        let chunk = len - hl;
        out[..20].copy_from_slice(&self.pkt[..20]);
        if first {
            out[20..hl].copy_from_slice(&self.pkt[20..hl]);
        } else {
            out[20..hl].copy_from_slice(&self.later_opts[..hl - 20]);
        }
        out[0] = 0x40 | (hl / 4) as u8;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let start = self.ihl + self.done;
        out[hl..].copy_from_slice(&self.pkt[start..start + chunk]);
        self.done += chunk;
        self.finished = self.ihl + self.done >= self.pkt.len();
        // The offset in 8-byte units; "more fragments" on all but the last,
        // and on the last too if the original was not the end of its packet.
        let mut flags_off = (((self.base + self.done - chunk) / 8) as u16) & 0x1fff;
        if !self.finished || self.more {
            flags_off |= 0x2000;
        }
        out[6..8].copy_from_slice(&flags_off.to_be_bytes());
        out[10..12].fill(0);
        let c = checksum(&out[..hl]);
        out[10..12].copy_from_slice(&c.to_be_bytes());
        Some(len)
    }
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

    #[test]
    fn frag_needed_fixture() {
        // The SYN answered with "fragmentation needed, next-hop MTU 1340",
        // byte for byte; both checksums computed independently.
        let p = syn();
        let mut out = [0u8; 128];
        let n = icmp_frag_needed(&p, 1340, &mut out).unwrap();
        let mut want = vec![
            0x45, 0x00, 0x00, 0x38, 0x00, 0x00, 0x40, 0x00, 0x40, 0x01, 0x26, 0x29, // IPv4
            0x0a, 0x4d, 0x00, 0x02, 0x0a, 0x4d, 0x00, 0x01, // from beta, to alpha
            0x03, 0x04, 0x6f, 0x2e, 0x00, 0x00, 0x05, 0x3c, // type 3 code 4, MTU 1340
        ];
        want.extend_from_slice(&p[..28]);
        assert_eq!(&out[..n], &want[..]);
        assert_eq!(checksum(&out[..20]), 0, "valid IP header checksum");
        assert_eq!(checksum(&out[20..n]), 0, "valid ICMP checksum");
        assert_eq!(
            icmp_frag_needed(&p, 67, &mut out),
            None,
            "below the IPv4 minimum MTU"
        );
        let mut err = syn();
        err[9] = 1;
        err[20] = 3;
        assert_eq!(
            icmp_frag_needed(&err, 1340, &mut out),
            None,
            "an ICMP error"
        );
    }

    #[test]
    fn df_and_icmp_error() {
        let mut p = syn();
        assert!(ipv4_df(&p));
        p[6] = 0;
        assert!(!ipv4_df(&p));
        assert!(!ipv4_df(&[0x60; 40]));
        assert!(!is_icmp_error(&p));
        p[9] = 1;
        p[20] = 8;
        assert!(!is_icmp_error(&p), "echo request");
        p[20] = 11;
        assert!(is_icmp_error(&p), "time exceeded");
        assert!(is_icmp_error(&p[..20]), "too short to tell");
    }

    /// An IPv4 packet with `opts` as options, `payload` bytes of payload, the
    /// given flags/offset word, and a valid header checksum.
    fn packet(opts: &[u8], payload: &[u8], flags_off: u16) -> Vec<u8> {
        let hl = 20 + opts.len();
        assert_eq!(hl % 4, 0);
        let mut p = vec![0u8; hl];
        p[0] = 0x40 | (hl / 4) as u8;
        p[2..4].copy_from_slice(&((hl + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xbeefu16.to_be_bytes());
        p[6..8].copy_from_slice(&flags_off.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[20..].copy_from_slice(opts);
        let c = checksum(&p[..hl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn fragments(p: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
        let mut f = Fragments::new(p, mtu)?;
        let mut out = vec![];
        while let Some(len) = f.next_len() {
            let mut b = vec![0u8; len];
            assert_eq!(f.write_next(&mut b), Some(len));
            out.push(b);
        }
        Ok(out)
    }

    #[test]
    fn fragment_fixture() {
        // 1400 payload bytes at MTU 576: 552 + 552 + 296, offsets 0, 69, 138.
        let payload: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
        let p = packet(&[], &payload, 0);
        let f = fragments(&p, 576).unwrap();
        assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), [572, 572, 316]);
        let words: Vec<u16> = f.iter().map(|x| u16::from_be_bytes([x[6], x[7]])).collect();
        assert_eq!(words, [0x2000, 0x2000 | 69, 138]);
        for x in &f {
            assert_eq!(checksum(&x[..20]), 0);
            assert_eq!(&x[4..6], &[0xbe, 0xef], "same identification");
            assert_eq!(usize::from(u16::from_be_bytes([x[2], x[3]])), x.len());
        }
        assert_eq!(f[1][20..], payload[552..1104]);

        // A packet that fits is itself; DF refuses; a tiny MTU refuses.
        assert_eq!(fragments(&p, 1420).unwrap(), vec![p.clone()]);
        let df = packet(&[], &payload, 0x4000);
        assert_eq!(fragments(&df, 576), Err(FragmentError::DontFragment));
        assert_eq!(fragments(&df, 1420).unwrap(), vec![df.clone()]);
        assert_eq!(fragments(&p, 27), Err(FragmentError::MtuTooSmall(27)));
        assert_eq!(
            fragments(&p[..100], 576),
            Err(FragmentError::Malformed),
            "length disagrees with the header"
        );
    }

    #[test]
    fn fragment_options_copied_only_when_marked() {
        // Option 0x94 (router alert, copied) and 0x07 (record route, not
        // copied), then end of options.
        let opts = [0x07, 3, 0, 0x94, 4, 0, 0, 0];
        let p = packet(&opts, &[7u8; 200], 0);
        let f = fragments(&p, 100).unwrap();
        assert_eq!(&f[0][20..28], &opts, "the first fragment keeps them all");
        assert_eq!(f[1][0], 0x46, "later ones: 4 bytes of copied options");
        assert_eq!(&f[1][20..24], &[0x94, 4, 0, 0]);
        for x in &f {
            let hl = usize::from(x[0] & 0x0f) * 4;
            assert_eq!(checksum(&x[..hl]), 0);
        }
    }

    /// Reassembles fragments the way a receiving host does (RFC 791).
    fn reassemble(frags: &[Vec<u8>]) -> (Vec<u8>, bool) {
        let mut data = vec![];
        let mut more_at_end = false;
        for f in frags {
            let hl = usize::from(f[0] & 0x0f) * 4;
            let w = u16::from_be_bytes([f[6], f[7]]);
            let off = usize::from(w & 0x1fff) * 8;
            let end = off + f.len() - hl;
            if data.len() < end {
                data.resize(end, 0);
            }
            data[off..end].copy_from_slice(&f[hl..]);
            more_at_end = w & 0x2000 != 0;
        }
        (data, more_at_end)
    }

    proptest::proptest! {
        #[test]
        fn fragments_reassemble(
            len in 0usize..3000,
            mtu in 68usize..1600,
            copied in proptest::bool::ANY,
            more in proptest::bool::ANY,
            offset in 0u16..100,
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let opts: &[u8] = if copied { &[0x94, 4, 0, 0] } else { &[] };
            let word = offset | if more { 0x2000 } else { 0 };
            let p = packet(opts, &payload, word);
            let frags = fragments(&p, mtu).unwrap();
            let (data, more_at_end) = reassemble(&frags);
            let base = usize::from(offset) * 8;
            proptest::prop_assert_eq!(&data[base..], &payload[..]);
            proptest::prop_assert_eq!(more_at_end, more, "the last keeps the original's flag");
            for (i, f) in frags.iter().enumerate() {
                proptest::prop_assert!(f.len() <= mtu);
                let hl = usize::from(f[0] & 0x0f) * 4;
                proptest::prop_assert_eq!(checksum(&f[..hl]), 0);
                proptest::prop_assert_eq!(&f[12..20], &p[12..20]);
                let w = u16::from_be_bytes([f[6], f[7]]);
                proptest::prop_assert_eq!(w & 0x4000, 0);
                if i + 1 < frags.len() {
                    proptest::prop_assert_eq!((f.len() - hl) % 8, 0);
                    proptest::prop_assert!(w & 0x2000 != 0);
                }
            }
        }

        #[test]
        fn frag_needed_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80), mtu in 0u16..2000) {
            let mut out = [0u8; 128];
            if let Some(n) = icmp_frag_needed(&bytes, mtu, &mut out) {
                proptest::prop_assert_eq!(checksum(&out[..20]), 0);
                proptest::prop_assert_eq!(checksum(&out[20..n]), 0);
                proptest::prop_assert_eq!(u16::from_be_bytes([out[26], out[27]]), mtu);
            }
            let _ = Fragments::new(&bytes, usize::from(mtu));
        }
    }
}
