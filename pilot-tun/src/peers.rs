//! Peers: the table the data plane reads on every packet, and the control
//! side's record of each peer (its state machine and what `peers` shows).
//!
//! Only trusted peers are in [`PeerTable`]. Removing a peer from it is what
//! makes a revocation take effect: the next packet either way finds nothing.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pilot_proto::filter::{Direction, Filter, Noted, Verdict};
use pilot_proto::identity::NodeId;
use pilot_proto::path::Path;
use pilot_proto::policy::EffectiveGrant;
use pilot_proto::session::Session;

/// A counter on a cache line of its own: the TUN loop writes the send-side
/// counters and the UDP loop the receive-side ones, on different cores;
/// sharing a line would make each write stall the other core.
#[derive(Default)]
#[repr(align(64))]
pub struct Padded(AtomicU64);

impl std::ops::Deref for Padded {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// What the data plane needs about one trusted peer.
pub struct PeerData {
    /// Its node id.
    pub id: NodeId,
    /// Its overlay address: inner packets from it must carry this source.
    pub address: Ipv4Addr,
    /// Sessions older than this are never used.
    reject_after: Duration,
    current: RwLock<Option<Arc<Session>>>,
    endpoint: RwLock<Option<Path>>,
    /// Inner bytes received.
    pub rx_bytes: Padded,
    /// Inner bytes sent.
    pub tx_bytes: Padded,
    /// Inner packets received (for `--metrics-per-peer`).
    pub rx_packets: Padded,
    /// Inner packets sent (for `--metrics-per-peer`).
    pub tx_packets: Padded,
    /// Milliseconds since the node's epoch of the last authenticated packet.
    pub last_rx_ms: Padded,
    /// Milliseconds since the node's epoch of the last packet sent.
    pub last_tx_ms: Padded,
    /// Milliseconds since the node's epoch of the last data (not keepalive)
    /// packet received.
    pub last_data_rx_ms: Padded,
    /// The control task wants to hear of the next data packet either way
    /// (its machine sleeps until then).
    pub wake: AtomicBool,
    /// The largest outer datagram its current path carries, from path MTU
    /// discovery (`crate::pathmtu`); 0 while unknown (no limit but the
    /// TUN's).
    path_mtu: AtomicU32,
    /// Both grants open everything for good: no packet is filtered (plain
    /// mutual trust, the common case, costs one relaxed load).
    open: AtomicBool,
    /// The filter for scoped or expiring grants (`None` while open).
    filter: Mutex<Option<Filter>>,
}

impl PeerData {
    /// A peer with no session yet.
    pub fn new(id: NodeId, address: Ipv4Addr, reject_after: Duration) -> Self {
        PeerData {
            id,
            address,
            reject_after,
            current: RwLock::new(None),
            endpoint: RwLock::new(None),
            rx_bytes: Padded::default(),
            tx_bytes: Padded::default(),
            rx_packets: Padded::default(),
            tx_packets: Padded::default(),
            last_rx_ms: Padded::default(),
            last_tx_ms: Padded::default(),
            last_data_rx_ms: Padded::default(),
            wake: AtomicBool::new(false),
            path_mtu: AtomicU32::new(0),
            open: AtomicBool::new(true),
            filter: Mutex::new(None),
        }
    }

    /// Installs the grants: `inbound`, what the peer may open on us, and
    /// `outbound`, what we may open on it. Flows already open stay open.
    pub fn set_grants(&self, inbound: EffectiveGrant, outbound: EffectiveGrant, unix: u64) {
        let mut f = self.filter.lock();
        if Filter::open(&inbound, &outbound, unix) {
            *f = None;
            self.open.store(true, Ordering::Release);
            return;
        }
        match f.as_mut() {
            Some(filter) => filter.set_grants(inbound, outbound),
            None => *f = Some(Filter::new(inbound, outbound)),
        }
        self.open.store(false, Ordering::Release);
    }

    /// True if no packet needs the filter.
    #[inline]
    pub fn unfiltered(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The filter's verdict on `pkt` (pass, if there is no filter).
    pub fn check(
        &self,
        pkt: &[u8],
        direction: Direction,
        now: Instant,
        unix: u64,
    ) -> (Verdict, Option<Noted>) {
        match self.filter.lock().as_mut() {
            Some(f) => f.check(pkt, direction, now, unix),
            None => (Verdict::Pass, None),
        }
    }

    /// Runs `f` on the filter, if there is one (the control side: counts,
    /// scopes).
    pub fn with_filter<R>(&self, f: impl FnOnce(&mut Filter) -> R) -> Option<R> {
        self.filter.lock().as_mut().map(f)
    }

    /// The largest outer datagram its path carries (0: unknown).
    pub fn path_mtu(&self) -> u16 {
        self.path_mtu.load(Ordering::Relaxed) as u16
    }

    /// Sets what [`PeerData::path_mtu`] returns.
    pub fn set_path_mtu(&self, mtu: u16) {
        self.path_mtu.store(u32::from(mtu), Ordering::Relaxed);
    }

    /// The session to send with, if it is still young enough.
    pub fn current(&self, now: Instant) -> Option<Arc<Session>> {
        let cur = self.current.read();
        cur.as_ref()
            .filter(|s| now.saturating_duration_since(s.created) < self.reject_after)
            .cloned()
    }

    /// The local index of the session to send with.
    pub fn current_index(&self) -> Option<u32> {
        self.current.read().as_ref().map(|s| s.local_index)
    }

    /// True if a session is current.
    pub fn has_session(&self) -> bool {
        self.current.read().is_some()
    }

    /// Makes `s` current if it is newer than the current one. Returns true if
    /// it changed.
    pub fn promote(&self, s: &Arc<Session>) -> bool {
        // Called for every packet on a responder session: the common case
        // (already current) takes only the shared lock.
        if self
            .current
            .read()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, s))
        {
            return false;
        }
        let mut cur = self.current.write();
        match cur.as_ref() {
            Some(c) if Arc::ptr_eq(c, s) || c.created >= s.created => false,
            _ => {
                *cur = Some(s.clone());
                true
            }
        }
    }

    /// Drops the current session.
    pub fn clear_session(&self) {
        *self.current.write() = None;
    }

    /// Drops the current session if it is `s`.
    pub fn clear_if(&self, s: &Arc<Session>) {
        let mut cur = self.current.write();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, s)) {
            *cur = None;
        }
    }

    /// Where we send to.
    pub fn endpoint(&self) -> Option<Path> {
        *self.endpoint.read()
    }

    /// Records where authenticated packets come from (roaming, upgrade from
    /// relay to direct). A packet through the relay never replaces a direct
    /// endpoint: direct wins while it works, and one relayed packet (late
    /// from an older session, or one an attacker replays) proves nothing
    /// about the direct path. Leaving a direct endpoint for the relay is the
    /// peer machine's call, made with [`force_endpoint`](Self::force_endpoint)
    /// when a new session came through the relay or the direct path went
    /// silent. True if it replaced another endpoint (a path change; the
    /// first endpoint is none).
    pub fn set_endpoint(&self, e: Path) -> bool {
        // Called for every received packet: unchanged is the common case
        // and needs only the shared lock.
        if *self.endpoint.read() == Some(e) {
            return false;
        }
        let mut ep = self.endpoint.write();
        match (*ep, e) {
            (Some(Path::Direct(_)), Path::Relay) => false,
            (cur, new) if cur != Some(new) => {
                *ep = Some(new);
                cur.is_some()
            }
            _ => false,
        }
    }

    /// Sends to `e` from now on, even the relay in place of a direct
    /// endpoint (the machine's [`Event::UsePath`](pilot_proto::peer::Event)).
    /// True if it replaced another endpoint.
    pub fn force_endpoint(&self, e: Path) -> bool {
        let old = self.endpoint.write().replace(e);
        old.is_some_and(|o| o != e)
    }
}

/// The data plane's view: trusted peers by address, live sessions by index.
#[derive(Default)]
pub struct PeerTable {
    /// Trusted peers by overlay address.
    pub by_addr: HashMap<Ipv4Addr, Arc<PeerData>>,
    /// Live sessions by our local index.
    pub by_index: HashMap<u32, (Arc<PeerData>, Arc<Session>)>,
}

/// Node-wide totals for `/metrics` (`--metrics`): traffic, handshakes,
/// path changes and round trips. The packet loops add their traffic once
/// per batch, so these cost nothing per packet; the rest is written by the
/// control task. Unlike the per-peer counters they survive the peer.
#[derive(Default)]
pub struct Totals {
    /// Inner bytes received (the UDP loop).
    pub rx_bytes: Padded,
    /// Inner packets received (the UDP loop).
    pub rx_packets: Padded,
    /// Of the inner bytes received, those that came through a relay.
    pub rx_relayed_bytes: Padded,
    /// Inner bytes sent (the TUN loop).
    pub tx_bytes: Padded,
    /// Inner packets sent (the TUN loop).
    pub tx_packets: Padded,
    /// Of the inner bytes sent, those that went through a relay.
    pub tx_relayed_bytes: Padded,
    /// Handshake initiations sent to peers (retries count again).
    pub handshakes_started: AtomicU64,
    /// Sessions we initiated that came up.
    pub handshakes_completed_initiator: AtomicU64,
    /// Sessions a peer initiated that came up.
    pub handshakes_completed_responder: AtomicU64,
    /// A peer's packets moved from one path to another (roaming, relay to
    /// direct and back).
    pub path_changes: AtomicU64,
    /// Round trips to peers: handshakes we initiated, and pings.
    pub rtt: RttHistogram,
}

/// Round trips in seconds ([`pilot_metrics::histogram::LATENCY_SECONDS`]).
pub struct RttHistogram(pub pilot_metrics::Histogram);

impl Default for RttHistogram {
    fn default() -> Self {
        RttHistogram(pilot_metrics::Histogram::new(
            pilot_metrics::histogram::LATENCY_SECONDS,
        ))
    }
}

impl Totals {
    /// One packet sent outside the TUN loop (by the control task: packets
    /// that waited for a session).
    pub fn sent(&self, len: usize, relayed: bool) {
        self.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        bump(&self.tx_packets);
        if relayed {
            self.tx_relayed_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
        }
    }

    /// Counts a path change if `changed` (what [`PeerData::set_endpoint`]
    /// and [`PeerData::force_endpoint`] return).
    pub fn path_changed(&self, changed: bool) {
        if changed {
            bump(&self.path_changes);
        }
    }
}

/// Counters for `status`.
#[derive(Default)]
pub struct Drops {
    /// Data packets that failed authentication or named no session.
    pub auth: AtomicU64,
    /// Data packets replayed or too old.
    pub replay: AtomicU64,
    /// Inner packets whose addresses were not the peer's and ours.
    pub inner_address: AtomicU64,
    /// Handshakes from keys we do not trust.
    pub untrusted_handshake: AtomicU64,
    /// Handshakes refused: bad MAC, Noise failure, replayed timestamp.
    pub bad_handshake: AtomicU64,
    /// Handshakes over the per-source rate limit.
    pub rate_limited: AtomicU64,
    /// Initiations answered with a cookie (under load).
    pub cookie_sent: AtomicU64,
    /// Local packets to untrusted or unknown addresses (answered with ICMP).
    pub refused_local: AtomicU64,
    /// Datagrams of no known kind.
    pub malformed: AtomicU64,
    /// Packets from peers outside the grant we gave them (or belonging to
    /// no open flow), dropped after decryption.
    pub policy_in: AtomicU64,
    /// Local packets outside the grant a peer gave us (answered with ICMP
    /// administratively prohibited when they open something).
    pub policy_out: AtomicU64,
    /// Local packets larger than their peer's path allows, by what became
    /// of them (none is dropped unless its send fails).
    pub too_big: TooBig,
}

/// Counters of local packets larger than their peer's path MTU.
#[derive(Default)]
pub struct TooBig {
    /// ICMP "fragmentation needed" answers written to the TUN (for packets
    /// with "don't fragment"; at most one per peer per read batch).
    pub icmp_sent: AtomicU64,
    /// IPv4 packets without "don't fragment", sent as inner fragments.
    pub fragmented_inner: AtomicU64,
    /// Packets sent in an outer datagram the underlay fragments ("don't
    /// fragment" packets, while their sender learns the smaller MTU).
    pub fragmented_outer: AtomicU64,
    /// Of those, the sends that failed: the only ones dropped.
    pub send_failed: AtomicU64,
}

impl TooBig {
    /// The counters now, for `status`.
    pub fn snapshot(&self) -> crate::api::TooBigCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::api::TooBigCounts {
            icmp_sent: l(&self.icmp_sent),
            fragmented_inner: l(&self.fragmented_inner),
            fragmented_outer: l(&self.fragmented_outer),
            send_failed: l(&self.send_failed),
        }
    }
}

impl Drops {
    /// The counters now, for `status`.
    pub fn snapshot(&self) -> crate::api::DropCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::api::DropCounts {
            auth: l(&self.auth),
            replay: l(&self.replay),
            inner_address: l(&self.inner_address),
            untrusted_handshake: l(&self.untrusted_handshake),
            bad_handshake: l(&self.bad_handshake),
            rate_limited: l(&self.rate_limited),
            cookie_sent: l(&self.cookie_sent),
            refused_local: l(&self.refused_local),
            policy_in: l(&self.policy_in),
            policy_out: l(&self.policy_out),
            malformed: l(&self.malformed),
            queue_full: 0,
        }
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilot_proto::identity::NodeId;

    fn direct(port: u16) -> Path {
        Path::Direct(([192, 0, 2, 11], port).into())
    }

    #[test]
    fn a_relayed_packet_never_replaces_a_direct_endpoint_but_the_machine_may() {
        let p = PeerData::new(
            NodeId([7; 16]),
            Ipv4Addr::new(10, 0, 0, 7),
            Duration::from_secs(180),
        );
        p.set_endpoint(Path::Relay);
        assert_eq!(p.endpoint(), Some(Path::Relay), "nothing better known");
        p.set_endpoint(direct(1000));
        assert_eq!(p.endpoint(), Some(direct(1000)), "direct wins");
        p.set_endpoint(Path::Relay);
        assert_eq!(
            p.endpoint(),
            Some(direct(1000)),
            "a relayed packet moves nothing"
        );
        p.set_endpoint(direct(2000));
        assert_eq!(p.endpoint(), Some(direct(2000)), "roaming");
        p.force_endpoint(Path::Relay);
        assert_eq!(p.endpoint(), Some(Path::Relay), "the machine's choice");
        p.set_endpoint(direct(2000));
        assert_eq!(
            p.endpoint(),
            Some(direct(2000)),
            "and direct again once it answers"
        );
    }

    #[test]
    fn a_path_change_is_a_replaced_endpoint() {
        let p = PeerData::new(
            NodeId([1; 16]),
            Ipv4Addr::new(10, 77, 0, 2),
            Duration::from_secs(180),
        );
        let direct = |port| Path::Direct(([192, 0, 2, 12], port).into());
        let totals = Totals::default();
        let count = |changed| totals.path_changed(changed);
        // The first endpoint is not a change; the same one again neither.
        count(p.set_endpoint(direct(4000)));
        count(p.set_endpoint(direct(4000)));
        assert_eq!(totals.path_changes.load(Ordering::Relaxed), 0);
        // Roaming to another port is.
        count(p.set_endpoint(direct(4001)));
        assert_eq!(totals.path_changes.load(Ordering::Relaxed), 1);
        // A relayed packet does not replace a direct path...
        count(p.set_endpoint(Path::Relay));
        assert_eq!(p.endpoint(), Some(direct(4001)));
        assert_eq!(totals.path_changes.load(Ordering::Relaxed), 1);
        // ...but forcing the relay does, and back to direct again.
        count(p.force_endpoint(Path::Relay));
        count(p.force_endpoint(Path::Relay));
        count(p.set_endpoint(direct(4001)));
        assert_eq!(p.endpoint(), Some(direct(4001)));
        assert_eq!(totals.path_changes.load(Ordering::Relaxed), 3);
    }
}
