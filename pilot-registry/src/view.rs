//! What the HTTP side (metrics, status page) sees of a running registry:
//! its fixed facts, and the gauges and node census the socket loop
//! publishes on its ticks. The loop writes, the HTTP tasks read a copy;
//! neither waits for the other longer than a copy takes, and nothing on
//! the datagram path touches it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ipnet::Ipv4Net;
use parking_lot::Mutex;
use pilot_proto::identity::NodeId;

use crate::sessions::Sessions;
use crate::storage::NodeRow;

/// The most nodes the status page lists (`--status-list-nodes`).
pub const MAX_LISTED: usize = 1000;

/// A registry as the HTTP side sees it.
pub struct View {
    /// When it started (for its uptime).
    pub started: Instant,
    /// The overlay network.
    pub network: Ipv4Net,
    /// The relay-only instances nodes are told about.
    pub relays: Vec<SocketAddr>,
    /// This instance only relays.
    pub relay_only: bool,
    /// The UDP address it serves on.
    pub listen: Option<SocketAddr>,
    list: AtomicUsize,
    published: Mutex<Published>,
}

/// What the socket loop last published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Control sessions (handshakes done, registered or not).
    pub sessions: u64,
    /// Nodes online: registered on a live control session.
    pub online: u64,
    /// Nodes registered (stored), once the first census came back.
    pub registered: Option<u64>,
    /// Node pairs the relay forwarded for in the last minute.
    pub relay_pairs: u64,
    /// The listed nodes (only with a node list configured), by address.
    pub nodes: Vec<NodeLine>,
}

/// One node on the status page's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLine {
    /// Its id.
    pub node_id: NodeId,
    /// Its hostname, as registered.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// True while it has a control session here.
    pub online: bool,
}

impl View {
    /// A view of a registry with these facts; lists no nodes.
    pub fn new(
        network: Ipv4Net,
        relays: Vec<SocketAddr>,
        relay_only: bool,
        listen: Option<SocketAddr>,
    ) -> Self {
        View {
            started: Instant::now(),
            network,
            relays,
            relay_only,
            listen,
            list: AtomicUsize::new(0),
            published: Mutex::new(Published::default()),
        }
    }

    /// Lists up to `n` nodes on the status page (0: counts only), at most
    /// [`MAX_LISTED`].
    pub fn set_list(&self, n: usize) {
        self.list.store(n.min(MAX_LISTED), Ordering::Relaxed);
    }

    /// How many nodes to list.
    pub fn list(&self) -> usize {
        self.list.load(Ordering::Relaxed)
    }

    /// A copy of what was last published.
    pub fn published(&self) -> Published {
        self.published.lock().clone()
    }

    /// The socket loop's tick: the live gauges, and who of the listed
    /// nodes is online now.
    pub fn tick(&self, sessions: &Sessions, relay_pairs: usize) {
        let mut p = self.published.lock();
        p.sessions = sessions.len() as u64;
        p.online = sessions.online_count() as u64;
        p.relay_pairs = relay_pairs as u64;
        for n in &mut p.nodes {
            n.online = sessions.online(&n.node_id).is_some();
        }
    }

    /// A census came back from storage.
    pub fn census(&self, count: Option<u64>, rows: Vec<NodeRow>, sessions: &Sessions) {
        let nodes = rows
            .into_iter()
            .map(|r| {
                let node_id = r.identity.node_id();
                NodeLine {
                    online: sessions.online(&node_id).is_some(),
                    node_id,
                    hostname: r.hostname,
                    address: r.address,
                }
            })
            .collect();
        let mut p = self.published.lock();
        if count.is_some() {
            p.registered = count;
        }
        p.nodes = nodes;
    }
}
