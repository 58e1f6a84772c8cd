//! What the packet loops share with the control task: the peer table, the
//! drop counters, the UDP socket, the TUN device, our overlay address, the
//! relay's address and the channel on which the loops hand over what is not
//! data for a live session. A leaf: nothing here knows the control side.
//!
//! Lock order. The packet loops take `table` (read) and, under it, a
//! [`PeerData`](crate::peers::PeerData)'s own small locks; `relay` is taken
//! alone. The control task takes `table` for writing only to add or remove
//! peers and sessions, holds no other lock of this module meanwhile, and
//! never holds one across an `.await`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use parking_lot::RwLock;
use pilot_proto::identity::NodeId;
use tokio::sync::mpsc;

use crate::peers::{Drops, PeerTable};
use crate::tun::Tun;
use crate::udp::Udp;

/// An item the packet loops hand to the control task.
pub enum Slow {
    /// A datagram that is not data for a peer session.
    Datagram(Vec<u8>, SocketAddr),
    /// A tunnel datagram the relay delivered from this node.
    Relayed(NodeId, Vec<u8>),
    /// A packet for a trusted peer that has no session.
    NeedSession(NodeId, Vec<u8>),
    /// An authenticated in-tunnel control message (not an IP packet).
    Control(NodeId, Vec<u8>),
    /// Data moved for a peer whose machine asked to be woken by it.
    Wake(NodeId),
}

/// The TUN MTU and how it came about, shared by the node's tasks.
pub struct NodeMtu {
    /// `--mtu`: the TUN MTU never exceeds it.
    pub cap: Option<u16>,
    pub(crate) tun: AtomicU32,
    pub(crate) below_floor: AtomicBool,
}

impl NodeMtu {
    /// Before the TUN exists.
    pub fn new(cap: Option<u16>) -> Self {
        NodeMtu {
            cap,
            tun: AtomicU32::new(0),
            below_floor: AtomicBool::new(false),
        }
    }

    /// The TUN MTU in use (0 before the TUN exists).
    pub fn tun(&self) -> u16 {
        self.tun.load(Ordering::Relaxed) as u16
    }

    /// True if the underlay is narrower than the TUN MTU's floor needs
    /// (outer datagrams of the largest packets are then fragmented).
    pub fn below_floor(&self) -> bool {
        self.below_floor.load(Ordering::Relaxed)
    }
}

/// Where relayed datagrams go.
struct RelayAddrs {
    registry: SocketAddr,
    relay_only: Option<SocketAddr>,
    attached: bool,
}

/// The state the packet loops and the control task share.
pub struct Shared<T: Tun> {
    /// Trusted peers and live sessions.
    pub table: RwLock<PeerTable>,
    /// Drop counters.
    pub drops: Drops,
    /// The tunnel socket.
    pub udp: Udp,
    /// The TUN device, once created.
    pub tun: OnceLock<T>,
    /// Our address and the overlay network, once known.
    pub net: OnceLock<(Ipv4Addr, Ipv4Net)>,
    /// Items for the control task.
    pub slow_tx: mpsc::Sender<Slow>,
    /// Reference instant for the peers' millisecond clocks.
    pub epoch: Instant,
    /// The TUN MTU.
    pub mtu: NodeMtu,
    relay: RwLock<RelayAddrs>,
}

impl<T: Tun> Shared<T> {
    /// Shared state around a bound socket; `registry` is the registry's
    /// address (also its relay).
    pub fn new(
        udp: Udp,
        slow_tx: mpsc::Sender<Slow>,
        registry: SocketAddr,
        mtu_cap: Option<u16>,
    ) -> Self {
        Shared {
            table: RwLock::new(PeerTable::default()),
            drops: Drops::default(),
            udp,
            tun: OnceLock::new(),
            net: OnceLock::new(),
            slow_tx,
            epoch: Instant::now(),
            mtu: NodeMtu::new(mtu_cap),
            relay: RwLock::new(RelayAddrs {
                registry,
                relay_only: None,
                attached: false,
            }),
        }
    }

    /// Milliseconds since the node's epoch.
    pub fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The instant of a millisecond stamp (0 means never).
    pub fn instant_of(&self, ms: u64) -> Option<Instant> {
        (ms > 0).then(|| self.epoch + Duration::from_millis(ms))
    }

    /// Our overlay address (unspecified before start-up finished).
    pub fn address(&self) -> Ipv4Addr {
        self.net.get().map(|n| n.0).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Our overlay network.
    pub fn network(&self) -> Option<Ipv4Net> {
        self.net.get().map(|n| n.1)
    }

    /// Where relayed datagrams go: a relay-only instance while we are
    /// attached to one, else the registry's own port.
    pub fn relay_addr(&self) -> SocketAddr {
        let r = self.relay.read();
        match (r.relay_only, r.attached) {
            (Some(a), true) => a,
            _ => r.registry,
        }
    }

    /// True if `from` is a relay we use (datagrams from it may carry other
    /// nodes' tunnel datagrams).
    pub fn is_relay(&self, from: SocketAddr) -> bool {
        let r = self.relay.read();
        from == r.registry || r.relay_only == Some(from)
    }

    /// The relay-only instance the registry named, and whether we are
    /// attached to it.
    pub fn set_relay_only(&self, addr: Option<SocketAddr>, attached: bool) {
        let mut r = self.relay.write();
        r.relay_only = addr;
        r.attached = attached && addr.is_some();
    }
}
