//! The daemon's side of MTU handling, kept in one place so the per-peer
//! machine can take it over: route MTU lookups (a UDP socket connected to
//! the destination, then `IP_MTU`), the TUN MTU at start and its periodic
//! re-check, and each peer's path MTU prober ([`pilot_proto::pmtu`]) driven
//! from the control side's tick, with its probes and acknowledgements
//! travelling as in-tunnel control messages.
//!
//! The rules themselves are pure and live in `pilot_proto::mtu` (overhead,
//! TUN MTU, what to do with a packet that does not fit) and
//! `pilot_proto::pmtu` (the probe search). What this module adds is I/O and
//! the conversion between the prober's outer datagram sizes and inner
//! packet lengths.
//!
//! ICMP "fragmentation needed" from routers is not read directly: the
//! kernel already records it as a path MTU exception for the destination
//! (also for our `IP_PMTUDISC_PROBE` socket), and a fresh connected socket's
//! `IP_MTU` shows it. Each prober's route is read every second while it
//! searches and every five otherwise; a drop is fed to the prober as
//! "too big".

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_proto::mtu::{self, Family, Route};
use pilot_proto::path::Path as Endpoint;
use pilot_proto::peer::Transmit as Outgoing;
use pilot_proto::pmtu::{self, Config, Prober, State};
use pilot_proto::session::Session;
use pilot_proto::wire::{DATA_HEADER_LEN, TAG_LEN};
use tracing::{info, warn};

use crate::context::Context;
use crate::peers::PeerData;
use crate::tun::Tun;

/// How often the TUN MTU is recomputed from the routes (a changed route or
/// interface MTU is noticed this late; there is no netlink watch).
pub const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// The TUN MTU keeps IPv4's floor, not IPv6's 1280: on an underlay too
/// narrow for 1280-byte inner packets the overlay carries IPv4 only, at the
/// MTU that fits, and turns IPv6 off (`crate::ipv6`), rather than
/// fragmenting the outer datagrams of every large packet to keep IPv6.
pub const CARRIES_IPV6: bool = false;

/// The MTU of the route to `dest` as the kernel sees it now: the outgoing
/// interface's MTU, or less if an ICMP "fragmentation needed" taught it a
/// smaller path MTU. A fresh socket each time: a connected socket's cached
/// route would not show exceptions learned after it connected. `None` if
/// there is no route.
pub fn route_mtu(dest: SocketAddr) -> Option<u16> {
    let bind: SocketAddr = match dest {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(dest).ok()?;
    let v = match dest {
        SocketAddr::V4(_) => {
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::IpMtu).ok()?
        }
        SocketAddr::V6(_) => ipv6_mtu(&s)?,
    };
    (v > 0).then(|| u16::try_from(v).unwrap_or(u16::MAX))
}

/// `IPV6_MTU` of a connected IPv6 socket: its route's MTU.
fn ipv6_mtu(s: &std::net::UdpSocket) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given, and
    // the descriptor is open for the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// The TUN MTU for routes to `relays` (the registry and a relay-only
/// instance: relayed datagrams go there) and `peers` (direct endpoints),
/// capped by `cap`. Destinations without a route are left out.
pub fn compute_tun_mtu(
    relays: &[SocketAddr],
    peers: &[SocketAddr],
    cap: Option<u16>,
) -> mtu::TunMtu {
    let routes = relays
        .iter()
        .map(|a| (a, true))
        .chain(peers.iter().map(|a| (a, false)))
        .filter_map(|(a, relayed)| {
            route_mtu(*a).map(|m| Route {
                mtu: m,
                family: Family::of(a.ip()),
                relayed,
            })
        });
    mtu::tun_mtu(routes, cap, CARRIES_IPV6, pilot_proto::DEFAULT_MTU)
}

/// Where relayed datagrams may go: the registry, and a relay-only
/// instance if the registry named one.
fn relay_addrs<T: Tun>(ctx: &Context<T>) -> Vec<SocketAddr> {
    // Every instance of the registry: the node may move to any of them.
    let mut v = ctx.link.join.endpoints().to_vec();
    if let Some(l) = ctx.relay_link.read().as_ref() {
        if !v.contains(&l.endpoint()) {
            v.push(l.endpoint());
        }
    }
    v
}

/// Recomputes the TUN MTU from the current routes and sets it if it
/// changed (also the first time). `extra` are endpoints to count that are
/// not in the peer table yet (cached ones at start).
pub(crate) fn update_tun_mtu<T: Tun>(ctx: &Context<T>, extra: &[SocketAddr]) {
    let shared = &ctx.shared;
    let mut peers: Vec<SocketAddr> = shared
        .table
        .read()
        .by_addr
        .values()
        .filter_map(|p| match p.endpoint() {
            Some(Endpoint::Direct(a)) => Some(a),
            _ => None,
        })
        .collect();
    peers.extend_from_slice(extra);
    peers.sort_unstable();
    peers.dedup();
    let t = compute_tun_mtu(&relay_addrs(ctx), &peers, shared.mtu.cap);
    let old = shared.mtu.tun();
    shared
        .mtu
        .below_floor
        .store(t.below_floor, Ordering::Relaxed);
    if t.mtu == old {
        return;
    }
    let Some(tun) = shared.tun.get() else { return };
    match tun.set_mtu(t.mtu) {
        Ok(()) => {
            shared.mtu.tun.store(u32::from(t.mtu), Ordering::Relaxed);
            info!(
                mtu = t.mtu,
                previous = old,
                capped = t.capped,
                below_floor = t.below_floor,
                "TUN MTU set from the underlay routes"
            );
            crate::ipv6::on_mtu(shared, t.mtu);
        }
        Err(e) => warn!(mtu = t.mtu, "cannot set the TUN MTU: {e}"),
    }
}

/// Re-checks the TUN MTU every [`RECHECK_EVERY`] (routes and interface
/// MTUs change without telling us).
pub(crate) async fn keeper<T: Tun>(ctx: Arc<Context<T>>) {
    loop {
        tokio::time::sleep(RECHECK_EVERY).await;
        // Route lookups are a few system calls each: off the async workers.
        let c = ctx.clone();
        let _ = tokio::task::spawn_blocking(move || update_tun_mtu(&c, &[])).await;
    }
}

/// Path MTU discovery towards one peer: the prober for its current path
/// and what it needs to know about that path.
#[derive(Default)]
pub struct PeerPmtu {
    prober: Option<Prober>,
    /// The path the prober measures: how we reach the peer, and the
    /// underlay address the datagrams go to (the relay's, when relayed).
    path: Option<(Endpoint, SocketAddr)>,
    /// The kernel's route MTU towards it at the last look.
    route_mtu: u16,
    next_route_check: Option<Instant>,
    /// The size last logged, so each change is logged once.
    logged: Option<(u16, State)>,
}

impl PeerPmtu {
    /// The outer datagram size in use on the current path, if probing ran.
    pub fn path_mtu(&self) -> Option<u16> {
        self.prober.as_ref().map(Prober::mtu)
    }

    /// "searching", "confirmed" or "unconfirmed" (no answers to probes).
    pub fn state(&self) -> Option<&'static str> {
        self.prober.as_ref().map(|p| match p.state() {
            State::Searching => "searching",
            State::Confirmed => "confirmed",
            State::Unconfirmed => "unconfirmed",
        })
    }

    /// When [`on_tick`] has something to do for this peer: a probe due or
    /// its route to read again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let probe = self.prober.as_ref().and_then(Prober::poll_timeout);
        match (probe, self.next_route_check.filter(|_| self.path.is_some())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The inner packet size in use for this peer: what its path carries,
    /// but never more than the TUN allows.
    pub fn inner_mtu(&self, tun_mtu: u16) -> u16 {
        match (&self.prober, self.path) {
            (Some(p), Some((ep, dest))) => tun_mtu.min(mtu::inner_mtu(
                p.mtu(),
                Family::of(dest.ip()),
                ep == Endpoint::Relay,
            )),
            _ => tun_mtu,
        }
    }
}

/// Plaintext length of a probe of outer size `size` on a path.
fn probe_len(size: u16, ep: Endpoint, dest: SocketAddr) -> usize {
    usize::from(mtu::inner_mtu(
        size,
        Family::of(dest.ip()),
        ep == Endpoint::Relay,
    ))
}

/// Seals one in-tunnel control message. Not counted in the peer's byte
/// counters (those count the traffic of its programs).
pub(crate) fn seal_control(session: &Session, msg: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; DATA_HEADER_LEN + msg.len() + TAG_LEN];
    buf[DATA_HEADER_LEN..DATA_HEADER_LEN + msg.len()].copy_from_slice(msg);
    let n = session.sender.seal(&mut buf, msg.len()).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// The part of the control side's tick for one peer: follows path changes,
/// reads the kernel's route MTU now and then, and returns the probes due.
/// Nothing happens while the peer has no session (a probe could not be
/// sealed); when one is up again, the search starts over.
pub(crate) fn on_tick<T: Tun>(
    ctx: &Context<T>,
    st: &mut PeerPmtu,
    data: &PeerData,
    now: Instant,
) -> Vec<Outgoing> {
    let (Some(session), Some(ep)) = (data.current(now), data.endpoint()) else {
        st.path = None;
        return vec![];
    };
    let dest = match ep {
        Endpoint::Direct(a) => a,
        Endpoint::Relay => ctx.shared.relay_addr(),
    };
    if st.path != Some((ep, dest)) {
        let Some(route) = route_mtu(dest) else {
            return vec![];
        };
        let cfg = if Family::of(dest.ip()) == Family::V4 {
            Config::ipv4()
        } else {
            Config::ipv6()
        };
        match &mut st.prober {
            Some(p) => p.on_roamed(route),
            None => st.prober = Some(Prober::new(cfg, route)),
        }
        st.path = Some((ep, dest));
        st.route_mtu = route;
        st.next_route_check = Some(now + Duration::from_secs(1));
    } else if st.next_route_check.is_none_or(|t| now >= t) {
        if let (Some(v), Some(p)) = (route_mtu(dest), st.prober.as_mut()) {
            // Lower: ICMP taught the kernel a smaller path MTU (or the
            // interface shrank). Higher: that expired, or it grew.
            if v < st.route_mtu {
                p.on_icmp_too_big(v);
            } else if v > st.route_mtu {
                p.set_ceiling(v);
            }
            st.route_mtu = v;
        }
        let searching = st
            .prober
            .as_ref()
            .is_some_and(|p| p.state() == State::Searching);
        let every = if searching { 1 } else { 5 };
        st.next_route_check = Some(now + Duration::from_secs(every));
    }
    pump(st, data, &session, now)
}

/// An in-tunnel acknowledgement of one of our probes arrived; returns the
/// probes that are due now (the search goes on at the pace of the answers,
/// not of the tick).
pub(crate) fn on_ack(
    st: &mut PeerPmtu,
    data: &PeerData,
    plain_len: u16,
    now: Instant,
) -> Vec<Outgoing> {
    let (Some((ep, dest)), Some(session)) = (st.path, data.current(now)) else {
        return vec![];
    };
    let Some(p) = st.prober.as_mut() else {
        return vec![];
    };
    let over = mtu::overhead(Family::of(dest.ip()), ep == Endpoint::Relay);
    if let Some(size) = plain_len.checked_add(over) {
        p.on_probe_acked(now, size);
    }
    pump(st, data, &session, now)
}

/// The acknowledgement to send for a received probe (`msg` is its
/// plaintext), sealed for the peer's current path.
pub(crate) fn answer_probe(data: &PeerData, msg: &[u8], now: Instant) -> Option<Outgoing> {
    let ack = pmtu::ack_for(msg)?;
    let session = data.current(now)?;
    let ep = data.endpoint()?;
    Some(Outgoing {
        bytes: seal_control(&session, &ack)?,
        to: ep,
        hop_limit: None,
    })
}

/// Sends what the prober wants sent and publishes its size to the data
/// plane.
fn pump(st: &mut PeerPmtu, data: &PeerData, session: &Session, now: Instant) -> Vec<Outgoing> {
    let (Some(p), Some((ep, dest))) = (st.prober.as_mut(), st.path) else {
        return vec![];
    };
    let mut out = vec![];
    while let Some(size) = p.next_probe(now) {
        let len = probe_len(size, ep, dest);
        if len == 0 {
            continue;
        }
        let mut msg = vec![0u8; len];
        pmtu::write_probe(&mut msg);
        if let Some(bytes) = seal_control(session, &msg) {
            out.push(Outgoing {
                bytes,
                to: ep,
                hop_limit: None,
            });
        }
    }
    let now_state = (p.mtu(), p.state());
    if st.logged != Some(now_state) && now_state.1 != State::Searching {
        info!(
            peer = %data.id,
            path = %ep,
            path_mtu = now_state.0,
            inner = mtu::inner_mtu(now_state.0, Family::of(dest.ip()), ep == Endpoint::Relay),
            state = ?now_state.1,
            "path MTU"
        );
        st.logged = Some(now_state);
    }
    data.set_path_mtu(p.mtu());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_route_mtu() {
        // The loopback interface's MTU (65536) does not fit a u16.
        let m = route_mtu("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(m >= 1500, "{m}");
        let t = compute_tun_mtu(&["127.0.0.1:7946".parse().unwrap()], &[], Some(1400));
        assert_eq!((t.mtu, t.capped), (1400, true));
    }

    #[test]
    fn ipv6_route_mtu() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here: nothing to test");
            return;
        }
        // IPV6_MTU, not IP_MTU (which an IPv6 socket does not answer).
        let m = route_mtu("[::1]:9".parse().unwrap()).expect("the IPv6 loopback route's MTU");
        assert!(m >= 1280, "{m}");
    }

    #[test]
    fn probe_lengths() {
        let d: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(probe_len(1500, Endpoint::Direct(d), d), 1440);
        assert_eq!(probe_len(1500, Endpoint::Relay, d), 1420);
    }
}
