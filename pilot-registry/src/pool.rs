//! The address pool rules: which overlay address a new node gets. Pure
//! code; a storage backend only answers "is this address taken?".
//!
//! A node's first candidate is a spot derived from its node id (so two
//! registries seeded alike mostly agree, and a pool fills evenly), then the
//! following addresses, wrapping around. Never the network or broadcast
//! address; in pools larger than a /24, never an address ending in .0 or
//! .255 either (valid, but they confuse people and some tools).
//!
//! An address whose node was removed or expired stays taken, as a
//! tombstone: other hosts may hold IP-based rules for it. Only when no
//! candidate is free does the registrar hand one out again, the oldest
//! whose old id no registered node approved ([`bounds`] is the range it
//! asks the storage for).
//!
//! The pool itself is bounded ([`check_network`]): every node installs it
//! as a route into its tunnel device, so it must be a private range
//! (RFC 1918 or RFC 6598) and neither huge nor too small to be useful.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;

/// The private ranges an overlay network may come from: RFC 1918 and the
/// shared address space of RFC 6598.
pub const PRIVATE_RANGES: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];
/// The widest overlay network: wider would reach past 10.0.0.0/8, the
/// largest private range.
pub const MIN_PREFIX: u8 = 8;
/// The narrowest overlay network: a /28 holds 14 nodes.
pub const MAX_PREFIX: u8 = 28;

/// Why a network cannot be the overlay network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// The prefix is wider than [`MIN_PREFIX`] or narrower than
    /// [`MAX_PREFIX`].
    #[error("{0}: a /{len} prefix is out of bounds; use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}, such as 10.77.0.0/16", len = .0.prefix_len())]
    Prefix(Ipv4Net),
    /// Host bits are set, so it is unclear which network is meant.
    #[error("{given} has host bits set; write the network as {network}")]
    HostBits {
        /// As given.
        given: Ipv4Net,
        /// The network it lies in.
        network: Ipv4Net,
    },
    /// Not inside one of [`PRIVATE_RANGES`].
    #[error("{0} is not a private range: use part of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 (RFC 1918) or of 100.64.0.0/10 (RFC 6598), such as 10.77.0.0/16")]
    NotPrivate(Ipv4Net),
}

/// Checks that `network` may be the overlay network: a prefix between
/// [`MIN_PREFIX`] and [`MAX_PREFIX`], no host bits, and wholly inside one
/// of [`PRIVATE_RANGES`].
pub fn check_network(network: Ipv4Net) -> Result<(), NetworkError> {
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&network.prefix_len()) {
        return Err(NetworkError::Prefix(network));
    }
    if network.addr() != network.network() {
        return Err(NetworkError::HostBits {
            given: network,
            network: network.trunc(),
        });
    }
    let private = PRIVATE_RANGES.iter().any(|r| {
        // The constants above parse; a range that did not would only
        // refuse more.
        r.parse::<Ipv4Net>().is_ok_and(|r| r.contains(&network))
    });
    if !private {
        return Err(NetworkError::NotPrivate(network));
    }
    Ok(())
}

/// The addresses `id` may get in `network`, in the order they are tried.
/// Empty for a network too small to hold a node besides its network and
/// broadcast addresses (a /31 or /32).
pub fn candidates(id: &NodeId, network: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(network.network());
    let size: u64 = 1u64 << (32 - u32::from(network.prefix_len()));
    let usable = if size < 4 { 0 } else { size - 2 };
    let mut first = [0u8; 8];
    first.copy_from_slice(&id.0[..8]);
    let start = if usable == 0 {
        0
    } else {
        u64::from_be_bytes(first) % usable
    };
    (0..usable).filter_map(move |i| {
        // `usable` < 2^32, so the offset fits and stays inside the network.
        let candidate = base + 1 + ((start + i) % usable) as u32;
        let last = candidate & 0xff;
        if size > 256 && (last == 0 || last == 255) {
            return None;
        }
        Some(Ipv4Addr::from(candidate))
    })
}

/// The lowest and highest address any node may get in `network` (the
/// range its tombstones are reused from); `None` for a network with no
/// room.
pub fn bounds(network: Ipv4Net) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let size: u64 = 1u64 << (32 - u32::from(network.prefix_len()));
    if size < 4 {
        return None;
    }
    let base = u32::from(network.network());
    // `size` >= 4 and the network is aligned: both stay inside it.
    Some((
        Ipv4Addr::from(base + 1),
        Ipv4Addr::from(base + (size - 2) as u32),
    ))
}

/// The first candidate for `id` that `taken` says is free; `None` when the
/// pool is full.
pub fn pick<E>(
    id: &NodeId,
    network: Ipv4Net,
    mut taken: impl FnMut(Ipv4Addr) -> Result<bool, E>,
) -> Result<Option<Ipv4Addr>, E> {
    for candidate in candidates(id, network) {
        if !taken(candidate)? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::convert::Infallible;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn node(first: u64) -> NodeId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&first.to_be_bytes());
        NodeId(id)
    }

    fn pick_free(id: &NodeId, n: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        pick::<Infallible>(id, n, |a| Ok(used.contains(&a))).unwrap()
    }

    #[test]
    fn first_candidate_is_derived_from_the_node_id() {
        let n = net("10.77.0.0/16");
        // start = id % (65536 - 2); candidate = base + 1 + start.
        assert_eq!(
            candidates(&node(0), n).next(),
            Some(Ipv4Addr::new(10, 77, 0, 1))
        );
        assert_eq!(
            candidates(&node(0x0102), n).next(),
            Some(Ipv4Addr::new(10, 77, 1, 3))
        );
        // 65534 wraps to 0.
        assert_eq!(
            candidates(&node(65_534), n).next(),
            Some(Ipv4Addr::new(10, 77, 0, 1))
        );
    }

    #[test]
    fn big_pools_skip_dot_zero_and_dot_255_small_ones_do_not() {
        let n = net("10.77.0.0/16");
        // Starting at .254 of the first /24: .254, then .255 skipped, .0 skipped, .1.
        let got: Vec<Ipv4Addr> = candidates(&node(253), n).take(3).collect();
        assert_eq!(
            got,
            [
                Ipv4Addr::new(10, 77, 0, 254),
                Ipv4Addr::new(10, 77, 1, 1),
                Ipv4Addr::new(10, 77, 1, 2)
            ]
        );
        assert!(candidates(&node(7), n).all(|a| a.octets()[3] != 0 && a.octets()[3] != 255));
        assert_eq!(candidates(&node(7), n).count(), 65_534 - 2 * 256 + 2);
        // A /24 is its own broadcast domain: .0 and .255 are network and
        // broadcast, everything else is usable.
        let small = net("10.9.0.0/24");
        let all: HashSet<Ipv4Addr> = candidates(&node(99), small).collect();
        assert_eq!(all.len(), 254);
        assert!(!all.contains(&Ipv4Addr::new(10, 9, 0, 0)));
        assert!(!all.contains(&Ipv4Addr::new(10, 9, 0, 255)));
    }

    #[test]
    fn every_candidate_is_inside_the_network_and_each_once() {
        for (n, usable) in [
            ("10.9.0.0/29", 6),
            ("10.9.0.8/30", 2),
            ("192.168.4.0/23", 510 - 2),
        ] {
            let n = net(n);
            for seed in [0, 1, 5, u64::MAX] {
                let c: Vec<Ipv4Addr> = candidates(&node(seed), n).collect();
                let unique: HashSet<&Ipv4Addr> = c.iter().collect();
                assert_eq!(c.len(), usable, "{n}");
                assert_eq!(unique.len(), usable, "{n}: no repeats");
                for a in &c {
                    assert!(n.contains(a), "{a} in {n}");
                    assert_ne!(*a, n.network());
                    assert_ne!(*a, n.broadcast());
                }
            }
        }
    }

    #[test]
    fn tiny_networks_have_no_room() {
        assert_eq!(candidates(&node(1), net("10.9.0.0/31")).count(), 0);
        assert_eq!(candidates(&node(1), net("10.9.0.1/32")).count(), 0);
        assert_eq!(
            pick_free(&node(1), net("10.9.0.0/31"), &HashSet::new()),
            None
        );
    }

    #[test]
    fn taken_addresses_are_passed_over_until_the_pool_is_full() {
        let n = net("10.9.0.0/30"); // two usable: .1 and .2
        let mut used = HashSet::new();
        let a = pick_free(&node(0), n, &used).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 1));
        used.insert(a);
        let b = pick_free(&node(0), n, &used).unwrap();
        assert_eq!(
            b,
            Ipv4Addr::new(10, 9, 0, 2),
            "the next one after a taken spot"
        );
        used.insert(b);
        assert_eq!(pick_free(&node(0), n, &used), None, "exhausted");
    }

    #[test]
    fn bounds_are_the_first_and_last_usable_addresses() {
        assert_eq!(
            bounds(net("10.9.0.8/29")),
            Some((Ipv4Addr::new(10, 9, 0, 9), Ipv4Addr::new(10, 9, 0, 14)))
        );
        assert_eq!(
            bounds(net("10.77.0.0/16")),
            Some((Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 255, 254)))
        );
        assert_eq!(bounds(net("10.9.0.0/31")), None);
        for n in ["10.9.0.0/29", "10.9.0.0/30", "192.168.4.0/23"] {
            let n = net(n);
            let (lo, hi) = bounds(n).unwrap();
            let all: Vec<Ipv4Addr> = candidates(&node(3), n).collect();
            assert_eq!(all.iter().min(), Some(&lo), "{n}");
            assert_eq!(all.iter().max(), Some(&hi), "{n}");
        }
    }

    #[test]
    fn a_storage_error_stops_the_search() {
        let mut asked = 0;
        let r = pick(&node(0), net("10.77.0.0/16"), |_| {
            asked += 1;
            Err("disk")
        });
        assert_eq!(r, Err("disk"));
        assert_eq!(asked, 1);
    }

    /// Issue 10, finding 1 (registry side): the overlay network is a
    /// private range between /8 and /28.
    #[test]
    fn the_overlay_network_is_a_private_range_of_sane_size() {
        for ok in [
            "10.77.0.0/16",
            "10.0.0.0/8",
            "10.9.0.0/28",
            "172.16.0.0/12",
            "172.31.255.240/28",
            "192.168.0.0/16",
            "192.168.5.0/24",
            "100.64.0.0/10",
            "100.127.0.0/16",
        ] {
            assert_eq!(check_network(net(ok)), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0/0", "prefix"),
            ("0.0.0.0/1", "prefix"),
            ("10.0.0.0/7", "prefix"),
            ("10.9.0.0/29", "prefix"),
            ("10.9.0.0/30", "prefix"),
            ("10.9.0.1/32", "prefix"),
            ("10.77.1.5/16", "host bits"),
            ("8.8.0.0/16", "public"),
            ("11.0.0.0/8", "public"),
            ("172.0.0.0/12", "public"),
            ("172.32.0.0/16", "public"),
            ("172.16.0.0/11", "host bits"),
            ("172.0.0.0/11", "public"),
            ("192.168.0.0/15", "public"),
            ("192.169.0.0/16", "public"),
            ("100.0.0.0/10", "public"),
            ("100.0.0.0/9", "public"),
            ("100.128.0.0/16", "public"),
            ("127.0.0.0/8", "public"),
            ("169.254.0.0/16", "public"),
            ("192.0.2.0/24", "public"),
            ("224.0.0.0/8", "public"),
        ] {
            let e = check_network(net(bad)).unwrap_err();
            let kind = match e {
                NetworkError::Prefix(_) => "prefix",
                NetworkError::HostBits { .. } => "host bits",
                NetworkError::NotPrivate(_) => "public",
            };
            assert_eq!(kind, why, "{bad}: {e}");
        }
        assert_eq!(
            check_network(net("10.77.1.5/16")),
            Err(NetworkError::HostBits {
                given: net("10.77.1.5/16"),
                network: net("10.77.0.0/16")
            })
        );
        let text = check_network(net("8.8.0.0/16")).unwrap_err().to_string();
        assert!(
            text.contains("8.8.0.0/16") && text.contains("RFC 1918"),
            "{text}"
        );
        let text = check_network(net("10.0.0.0/7")).unwrap_err().to_string();
        assert!(
            text.contains("/7") && text.contains("between /8 and /28"),
            "{text}"
        );
        for r in PRIVATE_RANGES {
            assert!(r.parse::<Ipv4Net>().is_ok(), "{r}");
        }
    }
}
