//! The address pool rules: which overlay address a new node gets. Pure
//! code; a storage backend only answers "is this address taken?".
//!
//! A node's first candidate is a spot derived from its node id (so two
//! registries seeded alike mostly agree, and a pool fills evenly), then the
//! following addresses, wrapping around. Never the network or broadcast
//! address; in pools larger than a /24, never an address ending in .0 or
//! .255 either (valid, but they confuse people and some tools).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;

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
    fn a_storage_error_stops_the_search() {
        let mut asked = 0;
        let r = pick(&node(0), net("10.77.0.0/16"), |_| {
            asked += 1;
            Err("disk")
        });
        assert_eq!(r, Err("disk"));
        assert_eq!(asked, 1);
    }
}
