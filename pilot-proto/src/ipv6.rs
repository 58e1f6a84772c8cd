//! The IPv6 side of the overlay: each network's ULA /48 and each node's
//! /128 in it ([`Ula`]), the facts of an inner IPv6 packet the data plane
//! and the filter need (addresses, the upper-layer protocol behind the
//! extension headers, fragments), and the ICMPv6 errors the data plane
//! sends back into the TUN (administratively prohibited, packet too big).
//!
//! How the addresses are derived (and why):
//! - The /48 is `fd` followed by 40 bits of SHA-256 over a fixed label, the
//!   registry's public key and the IPv4 overlay network (RFC 4193 asks for
//!   40 pseudo-random bits; a hash of the network's identity gives every
//!   node of one network the same prefix with nothing to agree on, and two
//!   networks different prefixes, so two daemons on one host do not
//!   overlap).
//! - A node's /128 is the /48, subnet 0, and its IPv4 overlay address in
//!   the last 32 bits: `fdxx:xxxx:xxxx::a4d:1` for 10.77.0.1. The IPv4
//!   address is unique in the network (the registry never gives it twice),
//!   kept across restarts and identity rotations, and known for every peer
//!   already, so the IPv6 address needs no allocation, no state of its own
//!   and no registry change, and the data plane maps an IPv6 destination
//!   to its peer with the same table lookup as an IPv4 one.
//!
//! Pure: nothing here does I/O. Every reader of packet bytes returns `None`
//! or an error on bad input and never panics.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The overlay's IPv6 prefix length.
pub const ULA_PREFIX: u8 = 48;
/// The fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// IPv6's minimum link MTU (RFC 8200): ICMPv6 errors are kept within it,
/// and no "packet too big" asks for less.
pub const MIN_MTU: u16 = 1280;
/// ICMPv6's next-header number.
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 "destination unreachable" (RFC 4443).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// Its code "communication with destination administratively prohibited".
pub const ICMPV6_ADMIN_PROHIBITED: u8 = 1;
/// ICMPv6 "packet too big".
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;

const LABEL: &[u8] = b"pilot-tun overlay ULA v1";

/// One network's unique local /48 (RFC 4193).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ula {
    /// The first six bytes: `fd` and the 40-bit global id.
    prefix: [u8; 6],
}

impl Ula {
    /// The /48 of the network the registry with `registry_key` hands out
    /// as `network`: the same on every node of that network.
    pub fn derive(registry_key: &[u8; 32], network: Ipv4Net) -> Ula {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(LABEL);
        ctx.update(registry_key);
        ctx.update(&network.network().octets());
        ctx.update(&[network.prefix_len()]);
        let h = ctx.finish();
        let h = h.as_ref();
        Ula {
            prefix: [0xfd, h[0], h[1], h[2], h[3], h[4]],
        }
    }

    /// The /48 as a network.
    pub fn net(&self) -> Ipv6Net {
        // The prefix length is a constant below 128.
        Ipv6Net::new(self.address(Ipv4Addr::UNSPECIFIED), ULA_PREFIX).expect("48 <= 128")
    }

    /// The /128 of the node whose IPv4 overlay address is `v4`.
    pub fn address(&self, v4: Ipv4Addr) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.prefix);
        b[12..].copy_from_slice(&v4.octets());
        Ipv6Addr::from(b)
    }

    /// The IPv4 overlay address of a node's /128, or `None` if `v6` is not
    /// one of this prefix's node addresses (another prefix, another subnet,
    /// or bits set between the subnet and the embedded IPv4 address).
    pub fn v4_of(&self, v6: &Ipv6Addr) -> Option<Ipv4Addr> {
        self.v4_of_bytes(&v6.octets())
    }

    /// [`Ula::v4_of`] on the 16 bytes of an address, as they sit in a
    /// packet (no conversion on the packet path).
    #[inline]
    pub fn v4_of_bytes(&self, b: &[u8; 16]) -> Option<Ipv4Addr> {
        (b[..6] == self.prefix && b[6..12] == [0; 6])
            .then(|| Ipv4Addr::new(b[12], b[13], b[14], b[15]))
    }

    /// True if `v6` lies in the /48.
    pub fn contains(&self, v6: &Ipv6Addr) -> bool {
        v6.octets()[..6] == self.prefix
    }
}

/// Source and destination of an IPv6 packet, or `None` if the bytes are
/// not a plausible IPv6 packet.
pub fn addrs(pkt: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    let (s, d) = addr_bytes(pkt)?;
    Some((Ipv6Addr::from(*s), Ipv6Addr::from(*d)))
}

/// The 16 bytes of source and destination, borrowed from the packet.
#[inline]
pub fn addr_bytes(pkt: &[u8]) -> Option<(&[u8; 16], &[u8; 16])> {
    if pkt.len() < HEADER_LEN || pkt[0] >> 4 != 6 {
        return None;
    }
    let s = pkt[8..24].try_into().ok()?;
    let d = pkt[24..40].try_into().ok()?;
    Some((s, d))
}

/// What follows an IPv6 packet's extension headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upper {
    /// The upper-layer protocol (next header) number.
    pub proto: u8,
    /// Where its header starts in the packet.
    pub offset: usize,
    /// The fragment header, if the packet is a fragment.
    pub fragment: Option<Fragment>,
}

/// An IPv6 fragment header's facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Identification.
    pub id: u32,
    /// Offset in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// The most extension headers [`upper`] walks (a longer chain is refused,
/// so a crafted packet cannot make the walk long).
const MAX_EXTENSIONS: usize = 8;

/// Walks the extension headers (hop-by-hop, routing, destination options,
/// fragment, authentication) to the upper-layer protocol. `None` if the
/// packet is not IPv6, a header runs past the end, or the chain is longer
/// than 8. Behind a fragment header with a non-zero offset nothing is read
/// (the upper-layer header is in the first fragment): `offset` then points
/// just past the fragment header.
pub fn upper(pkt: &[u8]) -> Option<Upper> {
    addr_bytes(pkt)?;
    let mut next = pkt[6];
    let mut at = HEADER_LEN;
    let mut fragment = None;
    for _ in 0..MAX_EXTENSIONS {
        match next {
            // Hop-by-hop, routing, destination options: 8-byte units
            // after the first 8.
            0 | 43 | 60 => {
                let h = pkt.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                let h = pkt.get(at..at + 8)?;
                let off = u16::from_be_bytes([h[2], h[3]]);
                let f = Fragment {
                    id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                    offset: off >> 3,
                    more: off & 1 != 0,
                };
                fragment = Some(f);
                next = h[0];
                at += 8;
                if f.offset != 0 {
                    return Some(Upper {
                        proto: next,
                        offset: at,
                        fragment,
                    });
                }
            }
            // Authentication header: 4-byte units after the first 8.
            51 => {
                let h = pkt.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 2) * 4;
            }
            _ => {
                if at > pkt.len() {
                    return None;
                }
                return Some(Upper {
                    proto: next,
                    offset: at,
                    fragment,
                });
            }
        }
    }
    None
}

/// True if `pkt` is an ICMPv6 error (types below 128), which must never be
/// answered with another error (RFC 4443 2.4 e.1). Also true if the packet
/// cannot be read far enough to say, so it is not answered.
pub fn is_icmp_error(pkt: &[u8]) -> bool {
    match upper(pkt) {
        Some(u) if u.proto == IPPROTO_ICMPV6 => pkt.get(u.offset).is_none_or(|t| *t < 128),
        Some(_) => false,
        None => true,
    }
}

/// Writes into `out` an ICMPv6 "destination unreachable, administratively
/// prohibited" answer to `orig`, as if sent by the refused destination, so
/// the local program fails at once. Returns the length, or `None` when no
/// error may be sent (see [`icmp_error`]).
pub fn icmp_admin_prohibited(orig: &[u8], out: &mut [u8]) -> Option<usize> {
    icmp_error(orig, ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED, 0, out)
}

/// Writes into `out` an ICMPv6 "packet too big" answer to `orig` with MTU
/// `mtu`, as if sent by `orig`'s destination. `None` when no error may be
/// sent, or `mtu` is below IPv6's minimum of 1280.
pub fn icmp_packet_too_big(orig: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    if mtu < MIN_MTU {
        return None;
    }
    icmp_error(orig, ICMPV6_PACKET_TOO_BIG, 0, u32::from(mtu), out)
}

/// An ICMPv6 error of `ty`/`code` with the 32-bit `param` (the MTU of a
/// "packet too big", else zero), quoting as much of `orig` as keeps the
/// answer within 1280 bytes (RFC 4443 2.4 c). `None` if `orig` is not
/// IPv6, is itself an ICMPv6 error, is a fragment other than the first, has
/// an unspecified or multicast source, or `out` is too short.
pub fn icmp_error(orig: &[u8], ty: u8, code: u8, param: u32, out: &mut [u8]) -> Option<usize> {
    let (src, dst) = addrs(orig)?;
    if src.is_unspecified() || src.is_multicast() || is_icmp_error(orig) {
        return None;
    }
    if upper(orig)?.fragment.is_some_and(|f| f.offset != 0) {
        return None;
    }
    let quoted = orig.len().min(usize::from(MIN_MTU) - HEADER_LEN - 8);
    let total = HEADER_LEN + 8 + quoted;
    let out = out.get_mut(..total)?;
    out.fill(0);
    out[0] = 0x60;
    let plen = (8 + quoted) as u16;
    out[4..6].copy_from_slice(&plen.to_be_bytes());
    out[6] = IPPROTO_ICMPV6;
    out[7] = 64; // hop limit
    out[8..24].copy_from_slice(&dst.octets());
    out[24..40].copy_from_slice(&src.octets());
    out[40] = ty;
    out[41] = code;
    out[44..48].copy_from_slice(&param.to_be_bytes());
    out[48..].copy_from_slice(&orig[..quoted]);
    let c = icmp_checksum(out);
    out[42..44].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// The ICMPv6 checksum of an ICMPv6 packet `pkt` (fixed header, no
/// extension headers), its checksum field taken as it is: over the pseudo
/// header (source, destination, length, next header 58) and the message.
/// Zero when written into a correct packet's field and computed again.
pub fn icmp_checksum(pkt: &[u8]) -> u16 {
    let msg = pkt.get(HEADER_LEN..).unwrap_or_default();
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        let mut chunks = b.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    };
    add(pkt.get(8..40).unwrap_or_default());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(msg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn net() -> Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    /// An IPv6 packet from `src` to `dst` with next header `nh` and
    /// payload `l4`.
    pub(crate) fn ipv6(nh: u8, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend((l4.len() as u16).to_be_bytes());
        p.extend([nh, 64]);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn the_prefix_is_a_ula_of_the_network_and_the_same_everywhere() {
        let u = Ula::derive(&KEY, net());
        assert_eq!(u, Ula::derive(&KEY, net()), "every node computes the same");
        assert_eq!(u.net().prefix_len(), 48);
        assert_eq!(u.net().network().octets()[0], 0xfd, "RFC 4193 local bit");
        // Another registry or another network: another prefix.
        assert_ne!(u, Ula::derive(&[8; 32], net()));
        assert_ne!(u, Ula::derive(&KEY, "10.78.0.0/16".parse().unwrap()));
        assert_ne!(u, Ula::derive(&KEY, "10.77.0.0/17".parse().unwrap()));
        // A fixture, so the derivation cannot change unnoticed (every
        // node of a network must agree, across versions too).
        assert_eq!(u.net().to_string(), FIXTURE);
    }
    const FIXTURE: &str = "fd42:626e:82bd::/48";

    #[test]
    fn a_node_address_embeds_its_ipv4_address_and_maps_back() {
        let u = Ula::derive(&KEY, net());
        let v4 = Ipv4Addr::new(10, 77, 0, 1);
        let v6 = u.address(v4);
        assert!(u.contains(&v6) && u.net().contains(&v6));
        assert_eq!(u.v4_of(&v6), Some(v4));
        assert!(v6.to_string().ends_with("::a4d:1"), "{v6}");
        // Other prefixes, another subnet, stray bits: not a node address.
        let other = Ula::derive(&[8; 32], net()).address(v4);
        assert_eq!(u.v4_of(&other), None);
        let mut b = v6.octets();
        b[7] = 1;
        assert_eq!(u.v4_of(&Ipv6Addr::from(b)), None);
        let mut b = v6.octets();
        b[10] = 1;
        assert_eq!(u.v4_of(&Ipv6Addr::from(b)), None);
    }

    #[test]
    fn upper_walks_extension_headers_and_fragments() {
        let (a, b) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let p = ipv6(6, a, b, &[0; 20]);
        assert_eq!(addrs(&p), Some((a, b)));
        assert_eq!(
            upper(&p),
            Some(Upper {
                proto: 6,
                offset: 40,
                fragment: None
            })
        );
        // Hop-by-hop (8 bytes), then a first fragment, then UDP.
        let mut l = vec![44, 0, 0, 0, 0, 0, 0, 0];
        l.extend([17, 0, 0, 1, 0, 0, 0, 9]);
        l.extend([0; 8]);
        let p = ipv6(0, a, b, &l);
        let u = upper(&p).unwrap();
        assert_eq!((u.proto, u.offset), (17, 56));
        assert_eq!(
            u.fragment,
            Some(Fragment {
                id: 9,
                offset: 0,
                more: true
            })
        );
        // A later fragment stops at the fragment header.
        let p = ipv6(44, a, b, &[17, 0, 0, 0x10, 0, 0, 0, 9, 1, 2]);
        let u = upper(&p).unwrap();
        assert_eq!(u.fragment.map(|f| (f.offset, f.more)), Some((2, false)));
        // Truncated, too long a chain, not IPv6.
        assert_eq!(upper(&ipv6(0, a, b, &[6])), None);
        let chain: Vec<u8> = (0..9).flat_map(|_| [60u8, 0, 0, 0, 0, 0, 0, 0]).collect();
        assert_eq!(upper(&ipv6(60, a, b, &chain)), None);
        assert_eq!(upper(&[0x45; 60]), None);
        assert_eq!(addrs(&[0x60; 39]), None);
    }

    #[test]
    fn admin_prohibited_is_a_correct_icmpv6_error() {
        let (a, b): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let orig = ipv6(6, a, b, &[0x9c, 0x40, 0, 22, 0, 0, 0, 0]);
        let mut out = [0u8; 1500];
        let n = icmp_admin_prohibited(&orig, &mut out).unwrap();
        let r = &out[..n];
        assert_eq!(n, 40 + 8 + orig.len());
        assert_eq!(addrs(r), Some((b, a)), "from the refused destination");
        assert_eq!((r[6], r[40], r[41]), (58, 1, 1));
        assert_eq!(usize::from(u16::from_be_bytes([r[4], r[5]])), n - 40);
        assert_eq!(&r[48..], &orig[..]);
        assert_eq!(icmp_checksum(r), 0, "the checksum verifies");
        // A fixed vector: the checksum of this exact packet, computed
        // apart from this code (a plain RFC 1071 sum in Python over the
        // pseudo header and the message).
        assert_eq!(u16::from_be_bytes([r[42], r[43]]), 0x07e4);
        // Never about an error, a multicast source, a later fragment.
        assert_eq!(icmp_admin_prohibited(r, &mut out.clone()), None);
        let m = ipv6(6, "ff02::1".parse().unwrap(), b, &[0; 8]);
        assert_eq!(icmp_admin_prohibited(&m, &mut out), None);
        let later = ipv6(44, a, b, &[6, 0, 0, 0x10, 0, 0, 0, 1]);
        assert_eq!(icmp_admin_prohibited(&later, &mut out), None);
        // Too short a buffer, and IPv4, are refused without a panic.
        assert_eq!(icmp_admin_prohibited(&orig, &mut [0u8; 40]), None);
        assert_eq!(icmp_admin_prohibited(&[0x45; 40], &mut out), None);
    }

    #[test]
    fn packet_too_big_carries_the_mtu_and_quotes_within_1280() {
        let (a, b) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let orig = ipv6(17, a, b, &[0; 1400]);
        let mut out = [0u8; 2000];
        let n = icmp_packet_too_big(&orig, 1300, &mut out).unwrap();
        assert_eq!(n, 1280);
        assert_eq!((out[40], out[41]), (2, 0));
        assert_eq!(
            u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
            1300
        );
        assert_eq!(icmp_checksum(&out[..n]), 0);
        assert_eq!(icmp_packet_too_big(&orig, 1279, &mut out), None);
    }

    #[test]
    fn readers_never_panic_on_any_short_input() {
        let mut out = [0u8; 1400];
        for len in 0..120 {
            for fill in [0u8, 0x60, 0xff, 44, 58] {
                let mut p = vec![fill; len];
                if let Some(b) = p.first_mut() {
                    *b = 0x60;
                }
                let _ = upper(&p);
                let _ = is_icmp_error(&p);
                let _ = icmp_admin_prohibited(&p, &mut out);
                let _ = icmp_packet_too_big(&p, 1280, &mut out);
                let _ = icmp_checksum(&p);
            }
        }
    }
}
