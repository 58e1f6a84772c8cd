//! Puts our IPv6 overlay address (`pilot_proto::ipv6`) on the TUN, with the
//! route for the overlay's /48, whenever the TUN MTU allows IPv6, and says
//! so in the log when it does not: IPv6 needs a link MTU of at least 1280,
//! and the kernel takes every IPv6 address off a device whose MTU drops
//! below that (the overlay then carries IPv4 only, at the narrower MTU,
//! instead of fragmenting every outer datagram to keep IPv6).

use std::sync::atomic::Ordering;

use pilot_proto::ipv6::{MIN_MTU, ULA_PREFIX};
use tracing::{info, warn};

use crate::shared::Shared;
use crate::tun::Tun;

/// Brings the IPv6 address up after the TUN MTU was set to `mtu` (at start
/// and on every change), or notes that it is gone.
pub(crate) fn on_mtu<T: Tun>(shared: &Shared<T>, mtu: u16) {
    let (Some(tun), Some(addr)) = (shared.tun.get(), shared.address6()) else {
        return;
    };
    if mtu < MIN_MTU {
        shared.ipv6_up.store(false, Ordering::Relaxed);
        warn!(
            mtu,
            "the TUN MTU is below IPv6's minimum of {MIN_MTU}: the overlay carries IPv4 only until it rises (a wider underlay, or a larger --mtu)"
        );
        return;
    }
    // Added again after each change: the kernel dropped it if the MTU
    // went below 1280 in between (adding it twice is harmless).
    match tun.add_ipv6(addr, ULA_PREFIX) {
        Ok(()) => {
            if !shared.ipv6_up.swap(true, Ordering::Relaxed) {
                info!(%addr, "IPv6 overlay address on the TUN (/{ULA_PREFIX} routed into the overlay)");
            }
        }
        Err(e) => {
            shared.ipv6_up.store(false, Ordering::Relaxed);
            warn!(
                %addr,
                "cannot put the IPv6 overlay address on the TUN: {e}; the overlay carries IPv4 only (is IPv6 disabled? see sysctl net.ipv6.conf.all.disable_ipv6)"
            );
        }
    }
}
