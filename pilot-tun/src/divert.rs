//! The switch that carries the node's datagrams for the registry over the
//! TCP relay while UDP is blocked ([`crate::tcplink`] owns the
//! connection). The UDP socket wrapper asks it on every send whether the
//! destination is diverted (one atomic load while it is not), and its
//! receive takes what the stream delivered as datagrams from the
//! registry's UDP address, so the packet loops, the registry link and the
//! relay path work unchanged over either transport.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use pilot_proto::streamframe;
use quinn_udp::RecvMeta;
use tokio::sync::{mpsc, Notify};

/// Datagrams from the stream waiting for the receive loop; more are
/// dropped, as a full socket buffer would.
const INBOX: usize = 2048;

/// While engaged: where datagrams are diverted and why.
struct Engaged {
    /// The registry's UDP address (what is diverted, and the source the
    /// stream's datagrams get).
    registry: SocketAddr,
    /// The registry's TCP address.
    tcp: SocketAddr,
    /// Frames for the connection's writer.
    out: mpsc::Sender<Vec<u8>>,
    since: SystemTime,
    why: String,
}

/// What `status` and `peers` show of the TCP relay.
#[derive(Clone, Debug)]
pub struct Engagement {
    /// The registry's TCP address.
    pub tcp: SocketAddr,
    /// Since when.
    pub since: SystemTime,
    /// Why UDP is not used.
    pub why: String,
}

/// The switch (one per UDP socket).
#[derive(Default)]
pub struct Divert {
    active: AtomicBool,
    engaged: Mutex<Option<Engaged>>,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    arrived: Notify,
    /// Datagrams dropped: a queue was full, or one did not fit a frame.
    pub dropped: AtomicU64,
}

impl Divert {
    /// Sends datagrams for `registry` into `out` (framed) from now on.
    pub fn engage(
        &self,
        registry: SocketAddr,
        tcp: SocketAddr,
        out: mpsc::Sender<Vec<u8>>,
        why: String,
    ) {
        *self.engaged.lock() = Some(Engaged {
            registry,
            tcp,
            out,
            since: SystemTime::now(),
            why,
        });
        self.active.store(true, Ordering::Release);
    }

    /// Back to UDP; what the stream delivered and was not read is dropped.
    pub fn release(&self) {
        self.active.store(false, Ordering::Release);
        *self.engaged.lock() = None;
        self.inbox.lock().clear();
    }

    /// The engagement, while there is one.
    pub fn engagement(&self) -> Option<Engagement> {
        self.engaged.lock().as_ref().map(|e| Engagement {
            tcp: e.tcp,
            since: e.since,
            why: e.why.clone(),
        })
    }

    /// True if datagrams to `to` go over the stream now.
    #[inline]
    pub fn diverts(&self, to: SocketAddr) -> bool {
        self.active.load(Ordering::Acquire)
            && self
                .engaged
                .lock()
                .as_ref()
                .is_some_and(|e| e.registry == to)
    }

    /// Queues one datagram for the stream (dropped if the queue is full).
    pub fn send(&self, datagram: &[u8]) {
        let mut frame = Vec::with_capacity(streamframe::PREFIX + datagram.len());
        let sent = streamframe::encode(datagram, &mut frame).is_ok()
            && self
                .engaged
                .lock()
                .as_ref()
                .is_some_and(|e| e.out.try_send(frame).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A datagram the stream delivered, for the receive loop.
    pub fn deliver(&self, datagram: &[u8]) {
        {
            let mut inbox = self.inbox.lock();
            if inbox.len() >= INBOX {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inbox.push_back(datagram.to_vec());
        }
        self.arrived.notify_one();
    }

    /// Moves delivered datagrams into the receive buffers (one each, as
    /// from the registry's address); returns how many.
    pub fn take(&self, bufs: &mut [Vec<u8>], metas: &mut [RecvMeta]) -> usize {
        let Some(from) = self.engaged.lock().as_ref().map(|e| e.registry) else {
            return 0;
        };
        let mut inbox = self.inbox.lock();
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(metas.iter_mut()) {
            let Some(d) = inbox.pop_front() else { break };
            // Frames are at most `MAX_FRAME`, far below a receive buffer.
            let len = d.len().min(buf.len());
            buf[..len].copy_from_slice(&d[..len]);
            meta.addr = from;
            meta.len = len;
            meta.stride = len;
            meta.ecn = None;
            meta.dst_ip = None;
            n += 1;
        }
        n
    }

    /// Waits until the stream delivered something (or spuriously).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn diverts_only_the_registry_and_only_while_engaged() {
        let d = Divert::default();
        let reg: SocketAddr = "192.0.2.1:7946".parse().unwrap();
        let tcp: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let peer: SocketAddr = "198.51.100.2:5000".parse().unwrap();
        assert!(!d.diverts(reg));
        let (tx, mut rx) = mpsc::channel(4);
        d.engage(reg, tcp, tx, "test".into());
        assert!(d.diverts(reg));
        assert!(!d.diverts(peer));
        d.send(b"abc");
        assert_eq!(rx.recv().await.unwrap(), vec![0, 3, b'a', b'b', b'c']);
        d.deliver(b"hello");
        let mut bufs = vec![vec![0u8; 100]; 2];
        let mut metas = vec![RecvMeta::default(); 2];
        assert_eq!(d.take(&mut bufs, &mut metas), 1);
        assert_eq!((metas[0].addr, metas[0].len), (reg, 5));
        assert_eq!(&bufs[0][..5], b"hello");
        assert_eq!(d.engagement().unwrap().tcp, tcp);
        d.release();
        assert!(!d.diverts(reg));
        d.send(b"lost");
        assert_eq!(d.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(d.take(&mut bufs, &mut metas), 0);
    }
}
