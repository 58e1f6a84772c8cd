//! The UDP side: one socket, batched receive with GRO and batched send with
//! GSO through `quinn-udp`, falling back to one datagram per call where the
//! kernel refuses (or when offloads are switched off).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Receive buffers per batch; each takes one GRO super-datagram.
pub const RECV_BATCH: usize = 8;
/// Size of each receive buffer (the largest GRO result).
pub const RECV_BUF: usize = 65_536;

/// A UDP socket with batching.
pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    gso: bool,
}

impl Udp {
    /// Wraps a bound socket. `offload` false forces one datagram per send.
    pub fn new(socket: std::net::UdpSocket, offload: bool) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        // Large buffers absorb bursts between batches.
        let _ = state.set_recv_buffer_size((&socket).into(), 8 << 20);
        let _ = state.set_send_buffer_size((&socket).into(), 8 << 20);
        let gso = offload && state.max_gso_segments() > 1;
        Ok(Udp {
            socket: UdpSocket::from_std(socket)?,
            state,
            gso,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// True if sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Largest number of segments one GSO send may carry.
    pub fn max_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments().min(64)
        } else {
            1
        }
    }

    /// Waits for datagrams. Returns how many buffers were filled; each meta
    /// gives the length and the stride of the segments (GRO).
    pub async fn recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let mut iovs: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        self.socket
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), &mut iovs, metas)
            })
            .await
    }

    /// Sends `contents` to `to`; with `segment` set, as several datagrams of
    /// that size (the last may be shorter).
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let segment_size = segment.filter(|s| *s < contents.len());
        if segment_size.is_some() && !self.gso {
            for chunk in contents.chunks(segment_size.unwrap_or(contents.len())) {
                self.send_one(to, chunk, None).await?;
            }
            return Ok(());
        }
        self.send_one(to, contents, segment_size).await
    }

    async fn send_one(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &t)
            })
            .await
    }

    /// Sends one datagram, for the control path.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket.send_to(buf, to).await.map(|_| ())
    }
}

/// Sealed packets waiting to be sent, laid end to end in one buffer so that
/// a run of equal-sized packets to one destination goes out in one GSO call.
pub struct SendBatch {
    /// The packets, end to end.
    pub buf: Vec<u8>,
    /// (destination, start, length) of each packet, in order.
    pub packets: Vec<(SocketAddr, usize, usize)>,
}

impl SendBatch {
    /// An empty batch with room for `packets` full-size packets.
    pub fn with_capacity(packets: usize) -> Self {
        SendBatch {
            buf: Vec::with_capacity(packets * 1600),
            packets: Vec::with_capacity(packets),
        }
    }

    /// Forgets all packets, keeping the memory.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.packets.clear();
    }

    /// Sends everything: consecutive packets to the same destination with the
    /// same length (the last of a run may be shorter) share one send.
    pub async fn flush(&mut self, udp: &Udp) -> io::Result<()> {
        let max = udp.max_segments();
        let mut i = 0;
        let mut result = Ok(());
        while i < self.packets.len() {
            let (to, start, len) = self.packets[i];
            let mut end = start + len;
            let mut j = i + 1;
            while j < self.packets.len() && j - i < max {
                let (t2, s2, l2) = self.packets[j];
                if t2 != to || s2 != end || l2 > len || end + l2 - start > 65_000 {
                    break;
                }
                end += l2;
                j += 1;
                if l2 < len {
                    break;
                }
            }
            let seg = if j - i > 1 { Some(len) } else { None };
            if let Err(e) = udp.send(to, &self.buf[start..end], seg).await {
                // A send error for one peer (unreachable, no route) must not
                // stop the others; report the first.
                if result.is_ok() {
                    result = Err(e);
                }
            }
            i = j;
        }
        self.clear();
        result
    }
}
