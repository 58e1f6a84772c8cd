//! The overlay's DNS server: a task that answers the questions of programs
//! on this host (`<name>.pilot`, reverse names of overlay addresses) with
//! [`pilot_proto::dns::answer`], from the name table the control task
//! publishes on a watch channel (it never touches the control state), and
//! drops every query from elsewhere.
//!
//! Where it listens: the node's own overlay address, UDP port 53. That
//! address is unique to this daemon (two daemons in one namespace each
//! have their own), and a program on the host reaches it over loopback.
//! A packet for it from anywhere else arrives with another source: a
//! peer's comes out of its tunnel with the peer's overlay address (the
//! data plane refuses any other inner source), and Linux drops a packet
//! from a network interface that claims one of the host's own addresses
//! as its source. So a query is answered only if its source is our
//! overlay address or a loopback address; every other one is dropped
//! without an answer and counted, and a trusted peer cannot sweep our
//! reverse names to read our trust list.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
pub use pilot_proto::dns::{answer, Domain, DomainError, Names, DEFAULT_DOMAIN, MAX_QUERY};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::api::DnsStatus;

/// The port the server listens on (the one stub resolvers ask).
pub const PORT: u16 = 53;

/// A query may be answered: it came from this host (see the module
/// comment).
pub fn from_this_host(src: IpAddr, own: Ipv4Addr) -> bool {
    match src {
        IpAddr::V4(a) => a.is_loopback() || a == own,
        IpAddr::V6(a) => a.is_loopback(),
    }
}

/// What the server shares with the rest of the node: the name table the
/// control task publishes, where it listens, and its counters.
pub struct DnsShared {
    names: watch::Sender<Arc<Names>>,
    /// [`Names::fingerprint`] of the table last published.
    published: AtomicU64,
    /// Where the server listens and how the host's resolver uses it, once
    /// it runs.
    pub serving: Mutex<Option<DnsStatus>>,
    /// The interface whose resolved settings `down` reverts.
    pub hooked: Mutex<Option<String>>,
    /// Questions answered.
    pub answered: AtomicU64,
    /// Datagrams dropped because they did not come from this host.
    pub not_local: AtomicU64,
    /// Datagrams dropped for their size or for being responses.
    pub dropped: AtomicU64,
}

impl Default for DnsShared {
    fn default() -> Self {
        DnsShared {
            names: watch::channel(Arc::new(Names::default())).0,
            published: AtomicU64::new(0),
            serving: Mutex::new(None),
            hooked: Mutex::new(None),
            answered: AtomicU64::new(0),
            not_local: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl DnsShared {
    /// Publishes the table `build` makes unless `fingerprint` says it is
    /// the one published last.
    pub fn publish_with(&self, fingerprint: u64, build: impl FnOnce() -> Names) {
        if self.published.swap(fingerprint, Ordering::Relaxed) != fingerprint {
            self.publish(build());
        }
    }

    /// Publishes `names` if they differ from the last ones.
    pub fn publish(&self, names: Names) {
        self.names.send_if_modified(|cur| {
            if **cur == names {
                false
            } else {
                *cur = Arc::new(names);
                true
            }
        });
    }

    /// The names as last published.
    pub fn names(&self) -> Arc<Names> {
        self.names.borrow().clone()
    }

    /// A receiver of every table published from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Names>> {
        self.names.subscribe()
    }

    /// `status`'s `dns`: where the server listens, with the counters.
    pub fn status(&self) -> Option<DnsStatus> {
        let mut s = self.serving.lock().clone()?;
        s.names = self.names.borrow().len() as u64;
        s.answered = self.answered.load(Ordering::Relaxed);
        s.dropped_not_local = self.not_local.load(Ordering::Relaxed);
        Some(s)
    }
}

/// Binds the server's socket at our overlay address (the TUN must have
/// it). Port 53 needs root or CAP_NET_BIND_SERVICE.
pub fn bind(own: Ipv4Addr, port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(SocketAddr::from((own, port)))?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// Serves DNS on `socket` until the task is stopped: each datagram from
/// this host gets its [`answer`] from the latest published names.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    own: Ipv4Addr,
    domain: Domain,
    shared: Arc<DnsShared>,
) {
    let names = shared.subscribe();
    // One byte more than a query may have, to tell a longer one.
    let mut buf = [0u8; MAX_QUERY + 1];
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!("DNS socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !from_this_host(src.ip(), own) {
            shared.not_local.fetch_add(1, Ordering::Relaxed);
            debug!(%src, "DNS query from outside this host dropped");
            continue;
        }
        let table = names.borrow().clone();
        match answer(&buf[..len], &domain, &table) {
            Some(reply) => {
                shared.answered.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = socket.send_to(&reply, src).await {
                    debug!(%src, "DNS answer not sent: {e}");
                }
            }
            None => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    const OWN: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const CACHE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    fn net() -> ipnet::Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    fn table() -> Names {
        Names::build(Some(("alpha", OWN)), Some(net()), [("cache", CACHE)])
    }

    fn a_of(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn only_this_host_may_ask() {
        assert!(from_this_host(IpAddr::V4(OWN), OWN));
        assert!(from_this_host("127.0.0.1".parse().unwrap(), OWN));
        assert!(from_this_host("::1".parse().unwrap(), OWN));
        assert!(!from_this_host(IpAddr::V4(CACHE), OWN), "a peer");
        assert!(!from_this_host("192.0.2.7".parse().unwrap(), OWN));
    }

    #[tokio::test]
    async fn the_server_answers_over_udp() {
        let socket = bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        let at = socket.local_addr().unwrap();
        let shared = Arc::new(DnsShared::default());
        shared.publish(table());
        let task = tokio::spawn(serve(socket, OWN, Domain::default(), shared.clone()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut q = Message::new();
        q.set_id(7);
        q.add_query(Query::query(
            Name::from_ascii("cache.pilot.").unwrap(),
            RecordType::A,
        ));
        client.send_to(&q.to_vec().unwrap(), at).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .expect("an answer in time")
        .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(a_of(&m), vec![CACHE]);
        // A new table is used at once.
        shared.publish(Names::build(None, Some(net()), []));
        client.send_to(&q.to_vec().unwrap(), at).await.unwrap();
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .expect("an answer in time")
        .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        assert_eq!(shared.answered.load(Ordering::Relaxed), 2);
        task.abort();
    }
}
