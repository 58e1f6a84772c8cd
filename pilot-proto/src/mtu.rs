//! MTU arithmetic: the bytes a tunnel datagram adds to an inner packet on
//! each kind of path, the TUN MTU that fits the underlay, and what to do
//! with an inner packet that is larger than its peer's path allows.
//!
//! Sizes named `path_mtu` or `route_mtu` are outer IP datagram sizes on the
//! underlay (what a router's MTU limits); `inner` sizes are the IP packets
//! the TUN carries.

use std::net::IpAddr;

use crate::packet;
use crate::wire::{DATA_OVERHEAD, RELAY_HEADER_LEN};

/// IPv4 header without options.
pub const IPV4_HEADER: u16 = 20;
/// IPv6 fixed header.
pub const IPV6_HEADER: u16 = 40;
/// UDP header.
pub const UDP_HEADER: u16 = 8;
/// IPv6's minimum link MTU (RFC 8200): no IPv6 packet of this size or less
/// may be refused, so a TUN carrying IPv6 never goes below it.
pub const IPV6_MIN_MTU: u16 = 1280;
/// The smallest TUN MTU we set: the datagram size every IPv4 host must be
/// able to reassemble (RFC 791). `--mtu` and narrow underlays stop here;
/// what does not fit is fragmented on the underlay instead.
pub const MIN_TUN_MTU: u16 = 576;
/// The largest TUN MTU (the IPv4 total-length limit).
pub const MAX_TUN_MTU: u16 = 65_535;

/// Address family of an underlay path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 underlay (20-byte header).
    V4,
    /// IPv6 underlay (40-byte header).
    V6,
}

impl Family {
    /// The family of an underlay address (an IPv4-mapped IPv6 address
    /// travels as IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Bytes a tunnel datagram adds to an inner packet on the underlay: the IP
/// and UDP headers, our data header and AEAD tag (32), and the relay header
/// (20) when the datagram goes through the relay.
///
/// IPv4 direct 60, IPv4 relayed 80, IPv6 direct 80, IPv6 relayed 100.
pub fn overhead(family: Family, relayed: bool) -> u16 {
    let ip = match family {
        Family::V4 => IPV4_HEADER,
        Family::V6 => IPV6_HEADER,
    };
    let relay = if relayed { RELAY_HEADER_LEN as u16 } else { 0 };
    ip + UDP_HEADER + DATA_OVERHEAD as u16 + relay
}

/// The largest inner packet whose tunnel datagram fits `path_mtu`.
pub fn inner_mtu(path_mtu: u16, family: Family, relayed: bool) -> u16 {
    path_mtu.saturating_sub(overhead(family, relayed))
}

/// One underlay route the tunnel's datagrams take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The route's MTU (the interface's, or what the kernel learned).
    pub mtu: u16,
    /// Its address family.
    pub family: Family,
    /// True for the route to a relay (the registry or a relay-only
    /// instance): datagrams on it carry the relay header.
    pub relayed: bool,
}

/// How the TUN MTU was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunMtu {
    /// The TUN MTU.
    pub mtu: u16,
    /// The underlay is narrower than the floor needs (`MIN_TUN_MTU`, or
    /// IPv6's 1280 while the overlay carries IPv6): inner packets up to the
    /// TUN MTU may not fit a single datagram, and their outer datagrams are
    /// fragmented instead.
    pub below_floor: bool,
    /// `--mtu` set the value (it was below what the routes allow).
    pub capped: bool,
}

/// The TUN MTU: the smallest inner MTU over `routes` (each route MTU minus
/// the overhead for its family, and for the relay), at most `cap`, never
/// below [`MIN_TUN_MTU`], and never below 1280 while `carries_ipv6`. With no
/// route known, `default` (then capped and floored the same way).
pub fn tun_mtu(
    routes: impl IntoIterator<Item = Route>,
    cap: Option<u16>,
    carries_ipv6: bool,
    default: u16,
) -> TunMtu {
    let fits = routes
        .into_iter()
        .map(|r| inner_mtu(r.mtu, r.family, r.relayed))
        .min()
        .unwrap_or(default);
    let floor = if carries_ipv6 {
        IPV6_MIN_MTU
    } else {
        MIN_TUN_MTU
    };
    let capped = cap.is_some_and(|c| c < fits);
    let wanted = cap.map_or(fits, |c| c.min(fits));
    TunMtu {
        mtu: wanted.max(floor),
        below_floor: fits < floor,
        capped,
    }
}

/// What to do with an inner packet to a peer whose path carries inner
/// packets of at most `mtu` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// It fits: seal it and send it.
    Send,
    /// IPv4 without "don't fragment": split it into fragments that fit
    /// ([`packet::Fragments`]) and send each.
    FragmentInner,
    /// "Don't fragment" is set: answer the sender with ICMP "fragmentation
    /// needed" carrying `mtu`, so its TCP lowers its segment size, and carry
    /// this packet in a fragmented outer datagram rather than drop it.
    TooBig,
    /// It does not fit, and no ICMP error can help: an ICMP error itself
    /// (never answered with another), an `mtu` below what hosts accept, or
    /// an IPv6 packet of at most 1280 bytes (IPv6 allows no smaller MTU).
    /// Carry it in a fragmented outer datagram.
    FragmentOuter,
}

/// Decides what to do with `pkt` (an inner IP packet, exactly its bytes)
/// for a peer whose path carries inner packets of at most `mtu` bytes.
pub fn fit(pkt: &[u8], mtu: u16) -> Fit {
    if pkt.len() <= usize::from(mtu) {
        return Fit::Send;
    }
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            if !packet::ipv4_df(pkt) {
                // An IPv4 packet (or fragment) without DF: routers may split
                // it, and so do we, unless the MTU leaves no room.
                return if packet::Fragments::new(pkt, usize::from(mtu)).is_ok() {
                    Fit::FragmentInner
                } else {
                    Fit::FragmentOuter
                };
            }
            if packet::is_icmp_error(pkt) || mtu < packet::IPV4_MIN_MTU {
                Fit::FragmentOuter
            } else {
                Fit::TooBig
            }
        }
        // IPv6 (once the overlay carries it): packets up to 1280 must pass;
        // larger ones get "packet too big" like IPv4's DF packets.
        Some(6) if pkt.len() <= usize::from(IPV6_MIN_MTU) || mtu < IPV6_MIN_MTU => {
            Fit::FragmentOuter
        }
        Some(6) => Fit::TooBig,
        _ => Fit::FragmentOuter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(mtu: u16) -> Route {
        Route {
            mtu,
            family: Family::V4,
            relayed: false,
        }
    }

    fn relay4(mtu: u16) -> Route {
        Route {
            relayed: true,
            ..v4(mtu)
        }
    }

    #[test]
    fn overhead_per_family_and_relay() {
        assert_eq!(overhead(Family::V4, false), 60);
        assert_eq!(overhead(Family::V4, true), 80);
        assert_eq!(overhead(Family::V6, false), 80);
        assert_eq!(overhead(Family::V6, true), 100);
        assert_eq!(inner_mtu(1500, Family::V4, false), 1440);
        assert_eq!(inner_mtu(1460, Family::V4, true), 1380);
        assert_eq!(inner_mtu(1280, Family::V6, false), 1200);
        assert_eq!(inner_mtu(40, Family::V4, false), 0, "saturates");
        assert_eq!(Family::of("192.0.2.1".parse().unwrap()), Family::V4);
        assert_eq!(Family::of("2001:db8::1".parse().unwrap()), Family::V6);
        assert_eq!(Family::of("::ffff:192.0.2.1".parse().unwrap()), Family::V4);
    }

    #[test]
    fn tun_mtu_is_the_narrowest_route() {
        // The registry is also the relay: its route counts with the relay
        // header, so a 1500 underlay gives the classic 1420.
        let t = tun_mtu([relay4(1500), v4(1500)], None, false, 1420);
        assert_eq!(t.mtu, 1420);
        assert!(!t.below_floor && !t.capped);
        for (underlay, want) in [(1460, 1380), (1450, 1370), (1400, 1320), (1280, 1200)] {
            assert_eq!(
                tun_mtu([relay4(underlay), v4(underlay)], None, false, 1420).mtu,
                want,
                "underlay {underlay}"
            );
        }
        // A peer behind a narrower local route lowers it for everyone.
        assert_eq!(
            tun_mtu([relay4(1500), v4(1400)], None, false, 1420).mtu,
            1340
        );
        let v6 = Route {
            mtu: 1500,
            family: Family::V6,
            relayed: false,
        };
        assert_eq!(tun_mtu([relay4(1500), v6], None, false, 1420).mtu, 1420);
        assert_eq!(tun_mtu([v6], None, false, 1420).mtu, 1420);
        // Loopback (65536, clamped by the caller to 65535).
        assert_eq!(tun_mtu([relay4(65_535)], None, false, 1420).mtu, 65_455);
    }

    #[test]
    fn cap_default_and_floors() {
        let t = tun_mtu([relay4(1500)], Some(1300), false, 1420);
        assert_eq!((t.mtu, t.capped), (1300, true));
        let t = tun_mtu([relay4(1460)], Some(1400), false, 1420);
        assert_eq!((t.mtu, t.capped), (1380, false), "a cap only lowers");
        assert_eq!(tun_mtu([], None, false, 1420).mtu, 1420, "no route known");
        assert_eq!(tun_mtu([], Some(1000), false, 1420).mtu, 1000);
        let t = tun_mtu([relay4(1500)], Some(100), false, 1420);
        assert_eq!(t.mtu, MIN_TUN_MTU, "never below 576");
        let t = tun_mtu([relay4(600)], None, false, 1420);
        assert_eq!((t.mtu, t.below_floor), (MIN_TUN_MTU, true));
        // Carrying IPv6: never below 1280, even if the underlay is 1280.
        let t = tun_mtu([relay4(1280)], None, true, 1420);
        assert_eq!((t.mtu, t.below_floor), (1280, true));
        let t = tun_mtu([relay4(1500)], Some(1000), true, 1420);
        assert_eq!((t.mtu, t.below_floor), (1280, false));
        let t = tun_mtu([relay4(1500)], None, true, 1420);
        assert_eq!((t.mtu, t.below_floor), (1420, false));
    }

    fn ipv4(len: usize, df: bool, proto: u8, icmp_type: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = proto;
        p[20] = icmp_type;
        p
    }

    #[test]
    fn what_to_do_with_a_large_packet() {
        assert_eq!(fit(&ipv4(1420, true, 6, 0), 1420), Fit::Send);
        assert_eq!(fit(&ipv4(1420, true, 6, 0), 1340), Fit::TooBig);
        assert_eq!(fit(&ipv4(1420, false, 17, 0), 1340), Fit::FragmentInner);
        assert_eq!(
            fit(&ipv4(1420, true, 1, 3), 1340),
            Fit::FragmentOuter,
            "an ICMP error is never answered with one"
        );
        assert_eq!(
            fit(&ipv4(1420, true, 1, 8), 1340),
            Fit::TooBig,
            "an echo request is"
        );
        assert_eq!(fit(&ipv4(1420, true, 6, 0), 60), Fit::FragmentOuter);
        assert_eq!(
            fit(&ipv4(1420, false, 17, 0), 24),
            Fit::FragmentOuter,
            "no room for 8 payload bytes per fragment"
        );
        let mut v6 = vec![0u8; 1280];
        v6[0] = 0x60;
        assert_eq!(
            fit(&v6, 1200),
            Fit::FragmentOuter,
            "IPv6 up to 1280 must pass"
        );
        v6.resize(1400, 0);
        assert_eq!(fit(&v6, 1300), Fit::TooBig);
        assert_eq!(fit(&v6, 1200), Fit::FragmentOuter);
        assert_eq!(fit(&[0u8; 1400], 1340), Fit::FragmentOuter, "not IP");
    }

    proptest::proptest! {
        #[test]
        fn tun_mtu_model(
            mtus in proptest::collection::vec((576u16..9000, proptest::bool::ANY, proptest::bool::ANY), 0..6),
            cap in proptest::option::of(0u16..9000),
            v6 in proptest::bool::ANY,
        ) {
            let routes: Vec<Route> = mtus
                .iter()
                .map(|&(mtu, six, relayed)| Route {
                    mtu,
                    family: if six { Family::V6 } else { Family::V4 },
                    relayed,
                })
                .collect();
            let t = tun_mtu(routes.clone(), cap, v6, 1420);
            // A naive model: every candidate, then the rules one by one.
            let mut m = 1420u32;
            if !routes.is_empty() {
                m = routes
                    .iter()
                    .map(|r| {
                        let over = if r.family == Family::V6 { 80 } else { 60 }
                            + if r.relayed { 20 } else { 0 };
                        u32::from(r.mtu).saturating_sub(over)
                    })
                    .min()
                    .unwrap();
            }
            let fits = m;
            if let Some(c) = cap {
                m = m.min(u32::from(c));
            }
            let floor = if v6 { 1280 } else { 576 };
            m = m.max(floor);
            proptest::prop_assert_eq!(u32::from(t.mtu), m);
            proptest::prop_assert_eq!(t.below_floor, fits < floor);
            // Whenever the floor did not intervene, every route's datagram fits.
            if !t.below_floor {
                for r in &routes {
                    proptest::prop_assert!(t.mtu + overhead(r.family, r.relayed) <= r.mtu);
                }
            }
        }

        #[test]
        fn fit_never_panics_and_sends_what_fits(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1600),
            mtu in 0u16..1600,
        ) {
            let f = fit(&bytes, mtu);
            proptest::prop_assert_eq!(f == Fit::Send, bytes.len() <= usize::from(mtu));
        }
    }
}
