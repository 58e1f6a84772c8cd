//! What the packet loops share with the control task: the peer table, the
//! drop counters, the UDP socket, the TUN device, our overlay address, the
//! relay's address and the queue on which the loops hand over what is not
//! data for a live session ([`SlowSender`], bounded in items and in bytes,
//! and taking only datagrams of a size the control side can use). A leaf:
//! nothing here knows the control side.
//!
//! Lock order. The packet loops take `table` (read) and, under it, a
//! [`PeerData`](crate::peers::PeerData)'s own small locks; `relay` is taken
//! alone. The control task takes `table` for writing only to add or remove
//! peers and sessions, holds no other lock of this module meanwhile, and
//! never holds one across an `.await`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use parking_lot::RwLock;
use pilot_proto::filter::Noted;
use pilot_proto::identity::NodeId;
use pilot_proto::ipv6::Ula;
use pilot_proto::messages::MAX_MESSAGE;
use pilot_proto::wire::{
    self, Kind, COOKIE_REPLY_LEN, DATA_OVERHEAD, INIT_COOKIE_LEN, INIT_LEN, RESP_LEN,
};
use tokio::sync::mpsc;

use crate::peers::{Drops, PeerTable, Totals};
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
    /// A peer's filter decided something for the first time this minute
    /// (for the audit log).
    Noted(NodeId, Noted),
}

impl Slow {
    /// The bytes it carries.
    pub fn len(&self) -> usize {
        match self {
            Slow::Datagram(b, _)
            | Slow::Relayed(_, b)
            | Slow::NeedSession(_, b)
            | Slow::Control(_, b) => b.len(),
            Slow::Wake(_) | Slow::Noted(..) => 0,
        }
    }

    /// True if it carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Items the slow-path queue holds at most.
pub const SLOW_QUEUE_ITEMS: usize = 4096;
/// Bytes the slow-path queue holds at most (a flood must not make the node
/// hold hundreds of megabytes in packets it will mostly drop).
pub const SLOW_QUEUE_BYTES: usize = 2 << 20;
/// The longest STUN answer taken (RFC 8489's 548-byte guidance).
pub const MAX_STUN: usize = 548;

/// True if a datagram that is not data for a live session is worth the
/// slow path: a handshake of its exact size, or (not through the relay) a
/// STUN answer or a registry message that fits one datagram. Checked
/// before the datagram is copied; anything else is dropped unread.
pub fn slow_fits(seg: &[u8], relayed: bool) -> bool {
    let len = seg.len();
    match wire::classify(seg) {
        Kind::HandshakeInit => len == INIT_LEN || len == INIT_COOKIE_LEN,
        Kind::CookieReply => len == COOKIE_REPLY_LEN,
        Kind::HandshakeResp => len == RESP_LEN,
        Kind::Stun => !relayed && len <= MAX_STUN,
        Kind::Data => !relayed && (DATA_OVERHEAD..=DATA_OVERHEAD + MAX_MESSAGE).contains(&len),
        _ => false,
    }
}

/// The packet loops' end of the slow-path queue: never blocks, and refuses
/// an item when the queue is full in items or in bytes.
pub struct SlowSender {
    tx: mpsc::Sender<Slow>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    refused: AtomicU64,
}

/// The control task's end of the slow-path queue.
pub struct SlowReceiver {
    rx: mpsc::Receiver<Slow>,
    bytes: Arc<AtomicUsize>,
}

/// A slow-path queue of at most `items` items and `max_bytes` bytes.
pub fn slow_queue(items: usize, max_bytes: usize) -> (SlowSender, SlowReceiver) {
    let (tx, rx) = mpsc::channel(items);
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        SlowSender {
            tx,
            bytes: bytes.clone(),
            max_bytes,
            refused: AtomicU64::new(0),
        },
        SlowReceiver { rx, bytes },
    )
}

/// The slow-path queue is full (in items or bytes), or its reader is gone.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("slow-path queue full")]
pub struct QueueFull;

impl SlowSender {
    /// Queues `item` unless that would pass a bound.
    pub fn try_send(&self, item: Slow) -> Result<(), QueueFull> {
        let n = item.len();
        let refuse = || {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            QueueFull
        };
        // Reserve the bytes first, so two loops cannot both pass the bound.
        if self.bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
            return Err(refuse());
        }
        self.tx.try_send(item).map_err(|_| refuse())
    }

    /// Items refused so far (for `status`).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl SlowReceiver {
    /// The next item (None once every sender is gone).
    pub async fn recv(&mut self) -> Option<Slow> {
        let item = self.rx.recv().await?;
        self.bytes.fetch_sub(item.len(), Ordering::Relaxed);
        Some(item)
    }
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
    /// Node-wide traffic and event totals (for `--metrics`).
    pub totals: Totals,
    /// The tunnel socket.
    pub udp: Udp,
    /// The TUN device, once created.
    pub tun: OnceLock<T>,
    /// Our address and the overlay network, once known.
    pub net: OnceLock<(Ipv4Addr, Ipv4Net)>,
    /// The overlay's IPv6 prefix, derived from the registry's key and the
    /// network once both are known (see `pilot_proto::ipv6`).
    pub ula: OnceLock<Ula>,
    /// Our IPv6 overlay address is on the TUN: the MTU allows IPv6 and
    /// the kernel took it (see `crate::ipv6`).
    pub ipv6_up: AtomicBool,
    /// Items for the control task.
    pub slow_tx: SlowSender,
    /// Reference instant for the peers' millisecond clocks.
    pub epoch: Instant,
    /// The TUN MTU.
    pub mtu: NodeMtu,
    relay: RwLock<RelayAddrs>,
}

impl<T: Tun> Shared<T> {
    /// Shared state around a bound socket; `registry` is the registry's
    /// address (also its relay).
    pub fn new(udp: Udp, slow_tx: SlowSender, registry: SocketAddr, mtu_cap: Option<u16>) -> Self {
        Shared {
            table: RwLock::new(PeerTable::default()),
            drops: Drops::default(),
            totals: Totals::default(),
            udp,
            tun: OnceLock::new(),
            net: OnceLock::new(),
            ula: OnceLock::new(),
            ipv6_up: AtomicBool::new(false),
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

    /// The overlay's IPv6 prefix, once known.
    pub fn ula(&self) -> Option<Ula> {
        self.ula.get().copied()
    }

    /// Our IPv6 overlay address, once the prefix is known (whether or not
    /// the TUN carries it).
    pub fn address6(&self) -> Option<Ipv6Addr> {
        Some(self.ula()?.address(self.net.get()?.0))
    }

    /// The IPv6 overlay address of the peer at `v4`.
    pub fn peer_address6(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        Some(self.ula()?.address(v4))
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

    /// The registry endpoint in use (the join URL may name several
    /// instances; the node talks to one at a time).
    pub fn set_registry(&self, addr: SocketAddr) {
        self.relay.write().registry = addr;
    }

    /// The relay-only instance the registry named, and whether we are
    /// attached to it.
    pub fn set_relay_only(&self, addr: Option<SocketAddr>, attached: bool) {
        let mut r = self.relay.write();
        r.relay_only = addr;
        r.attached = attached && addr.is_some();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> NodeId {
        NodeId([7; 16])
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_items() {
        let (tx, mut rx) = slow_queue(4, 1000);
        assert!(tx.try_send(Slow::NeedSession(id(), vec![0; 400])).is_ok());
        assert!(tx.try_send(Slow::NeedSession(id(), vec![0; 400])).is_ok());
        assert_eq!(
            tx.try_send(Slow::NeedSession(id(), vec![0; 400])),
            Err(QueueFull),
            "1200 bytes would pass the 1000-byte bound"
        );
        assert_eq!(tx.queued_bytes(), 800);
        // Taking one out makes room for it again.
        assert_eq!(rx.recv().await.map(|i| i.len()), Some(400));
        assert_eq!(tx.queued_bytes(), 400);
        assert!(tx.try_send(Slow::NeedSession(id(), vec![0; 400])).is_ok());
        // The item bound holds for items that carry nothing, too.
        assert!(tx.try_send(Slow::Wake(id())).is_ok());
        assert!(tx.try_send(Slow::Wake(id())).is_ok());
        assert_eq!(tx.try_send(Slow::Wake(id())), Err(QueueFull));
        assert_eq!(
            tx.queued_bytes(),
            800,
            "a refused item leaves no bytes counted"
        );
        assert_eq!(tx.refused(), 2);
    }

    #[tokio::test]
    async fn the_relay_follows_the_registry_instance() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = Udp::new(sock, false).unwrap();
        let (tx, _rx) = slow_queue(4, 1000);
        let (one, two): (SocketAddr, SocketAddr) = (
            "192.0.2.1:7946".parse().unwrap(),
            "192.0.2.2:7946".parse().unwrap(),
        );
        let shared: Shared<crate::tun::FakeTun> = Shared::new(udp, tx, one, None);
        assert!(shared.is_relay(one) && !shared.is_relay(two));
        assert_eq!(shared.relay_addr(), one);
        shared.set_registry(two);
        // The instance left behind no longer counts as the relay.
        assert!(shared.is_relay(two) && !shared.is_relay(one));
        assert_eq!(shared.relay_addr(), two);
    }

    #[test]
    fn only_usable_datagrams_take_the_slow_path() {
        let sized = |first: u8, len: usize| {
            let mut v = vec![0u8; len];
            v[0] = first;
            v
        };
        let init = sized(wire::MSG_HANDSHAKE_INIT, INIT_LEN);
        let resp = sized(wire::MSG_HANDSHAKE_RESP, RESP_LEN);
        assert!(slow_fits(&init, false) && slow_fits(&init, true));
        assert!(slow_fits(&resp, false) && slow_fits(&resp, true));
        // A 64 KiB datagram that starts like a handshake is dropped unread.
        assert!(!slow_fits(&sized(wire::MSG_HANDSHAKE_INIT, 65_000), false));
        assert!(!slow_fits(
            &sized(wire::MSG_HANDSHAKE_RESP, RESP_LEN + 1),
            true
        ));
        // Registry messages fit one datagram; longer is not one.
        let msg = sized(wire::MSG_DATA, DATA_OVERHEAD + MAX_MESSAGE);
        assert!(slow_fits(&msg, false));
        assert!(
            !slow_fits(&msg, true),
            "the relay carries no registry messages"
        );
        assert!(!slow_fits(
            &sized(wire::MSG_DATA, DATA_OVERHEAD + MAX_MESSAGE + 1),
            false
        ));
        assert!(!slow_fits(&sized(wire::MSG_DATA, DATA_OVERHEAD - 1), false));
        // Unknown kinds never.
        assert!(!slow_fits(&sized(0x00, 100), false));
        assert!(!slow_fits(&sized(wire::MSG_RELAY_TO, 100), false));
        assert!(!slow_fits(&[], false));
    }
}
