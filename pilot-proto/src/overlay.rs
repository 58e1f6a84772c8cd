//! Bounds on the overlay network a registry hands out.
//!
//! A node puts its overlay prefix on a local interface, so the prefix is a
//! route: a registry that answered with `0.0.0.0/1` would swallow half the
//! Internet into the tunnel device, and one whose network contained the
//! registry's own address or a peer's endpoint would route the tunnel into
//! itself. [`check_assignment`] is the one place that decides what a node
//! accepts: a private range (RFC 1918 or the RFC 6598 shared space), a
//! prefix between [`MIN_PREFIX`] and [`MAX_PREFIX`], an address that is a
//! host of that network, and no underlay address it must keep reaching.
//! Pure: the caller passes what must stay reachable.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The widest overlay a node accepts (a /8: all of 10.0.0.0/8).
pub const MIN_PREFIX: u8 = 8;
/// The narrowest (a /28: 14 hosts).
pub const MAX_PREFIX: u8 = 28;

/// The ranges an overlay may come from: RFC 1918 and RFC 6598.
pub const PRIVATE_RANGES: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];

/// An address assignment was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    /// The prefix length is outside [`MIN_PREFIX`]..=[`MAX_PREFIX`].
    #[error("prefix /{0} is outside /{MIN_PREFIX}../{MAX_PREFIX}")]
    Prefix(u8),
    /// The network is not inside a private range.
    #[error("{0} is not inside a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10)")]
    NotPrivate(Ipv4Net),
    /// The address is the network's own or its broadcast address.
    #[error("{address} is not a host address of {network}")]
    NotAHost {
        /// The address.
        address: Ipv4Addr,
        /// The network.
        network: Ipv4Net,
    },
    /// The network contains an underlay address this node must reach
    /// outside the tunnel.
    #[error(
        "{network} contains {address} ({what}), which must stay reachable outside the overlay"
    )]
    Captures {
        /// The network.
        network: Ipv4Net,
        /// The address it would capture.
        address: Ipv4Addr,
        /// What that address is.
        what: String,
    },
}

/// True if `net` lies inside one of [`PRIVATE_RANGES`].
pub fn is_private(net: &Ipv4Net) -> bool {
    PRIVATE_RANGES.iter().any(|(a, p)| {
        Ipv4Net::new(*a, *p)
            .map(|r| r.contains(net))
            .unwrap_or(false)
    })
}

/// Checks an address and prefix a registry assigned (or a node cached)
/// and returns the overlay network. `keep` lists underlay addresses that
/// must stay reachable outside the overlay, each with what it is (the
/// registry, a relay, a peer's endpoint).
pub fn check_assignment(
    address: Ipv4Addr,
    prefix_len: u8,
    keep: &[(Ipv4Addr, String)],
) -> Result<Ipv4Net, OverlayError> {
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix_len) {
        return Err(OverlayError::Prefix(prefix_len));
    }
    let network = Ipv4Net::new(address, prefix_len)
        .map_err(|_| OverlayError::Prefix(prefix_len))?
        .trunc();
    if !is_private(&network) {
        return Err(OverlayError::NotPrivate(network));
    }
    if address == network.network() || address == network.broadcast() {
        return Err(OverlayError::NotAHost { address, network });
    }
    if let Some((a, what)) = keep.iter().find(|(a, _)| network.contains(a)) {
        return Err(OverlayError::Captures {
            network,
            address: *a,
            what: what.clone(),
        });
    }
    Ok(network)
}

/// The routes of `routes` that overlap `net` (either contains the other),
/// leaving out default routes, which every overlay overlaps.
pub fn overlapping(net: &Ipv4Net, routes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    routes
        .iter()
        .filter(|r| r.prefix_len() > 0 && (r.contains(net) || net.contains(*r)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_private_network_of_sane_size_is_accepted() {
        for (addr, p) in [
            ("10.77.0.5", 16),
            ("10.1.2.3", 8),
            ("172.20.0.9", 16),
            ("192.168.7.1", 24),
            ("100.64.3.4", 10),
            ("10.9.9.1", 28),
        ] {
            let net = check_assignment(a(addr), p, &[]).unwrap();
            assert_eq!(net.prefix_len(), p);
            assert!(net.contains(&a(addr)));
        }
    }

    #[test]
    fn huge_tiny_and_public_networks_are_refused() {
        assert_eq!(
            check_assignment(a("10.0.0.1"), 1, &[]),
            Err(OverlayError::Prefix(1))
        );
        assert_eq!(
            check_assignment(a("10.0.0.1"), 7, &[]),
            Err(OverlayError::Prefix(7))
        );
        assert_eq!(
            check_assignment(a("10.0.0.1"), 29, &[]),
            Err(OverlayError::Prefix(29))
        );
        assert_eq!(
            check_assignment(a("10.0.0.1"), 33, &[]),
            Err(OverlayError::Prefix(33))
        );
        assert!(matches!(
            check_assignment(a("11.0.0.1"), 16, &[]),
            Err(OverlayError::NotPrivate(_))
        ));
        // Straddles 172.16.0.0/12 and public space.
        assert!(matches!(
            check_assignment(a("172.16.0.1"), 11, &[]),
            Err(OverlayError::NotPrivate(_))
        ));
        assert!(matches!(
            check_assignment(a("198.18.0.1"), 16, &[]),
            Err(OverlayError::NotPrivate(_))
        ));
    }

    #[test]
    fn network_and_broadcast_addresses_are_not_hosts() {
        assert!(matches!(
            check_assignment(a("10.77.0.0"), 16, &[]),
            Err(OverlayError::NotAHost { .. })
        ));
        assert!(matches!(
            check_assignment(a("10.77.255.255"), 16, &[]),
            Err(OverlayError::NotAHost { .. })
        ));
    }

    #[test]
    fn an_overlay_that_captures_the_registry_or_a_peer_is_refused() {
        let keep = vec![
            (a("192.0.2.1"), "the registry".to_string()),
            (a("10.20.30.40"), "the endpoint of peer x".to_string()),
        ];
        assert_eq!(
            check_assignment(a("10.20.0.2"), 16, &keep),
            Err(OverlayError::Captures {
                network: "10.20.0.0/16".parse().unwrap(),
                address: a("10.20.30.40"),
                what: "the endpoint of peer x".into(),
            })
        );
        assert!(check_assignment(a("10.21.0.2"), 16, &keep).is_ok());
    }

    #[test]
    fn overlapping_routes_are_named_but_default_routes_are_not() {
        let net: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let routes: Vec<Ipv4Net> = ["0.0.0.0/0", "10.0.0.0/8", "10.77.5.0/24", "192.168.1.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            overlapping(&net, &routes),
            vec![
                "10.0.0.0/8".parse::<Ipv4Net>().unwrap(),
                "10.77.5.0/24".parse().unwrap()
            ]
        );
    }
}
