//! The registry's socket in batches: many datagrams per receive call
//! (`recvmmsg`, and UDP GRO's super-datagrams, which a node's GSO send
//! becomes on the way), and a run of relayed datagrams to one destination
//! in one send call (UDP GSO), through `quinn-udp` as the node does. The
//! [`Plan`] collects what one batch asks to send, merging relayed
//! datagrams into runs, so that the loop sends after it looked at all of
//! them.
//!
//! The node's own socket wrapper (pilot-tun's `udp` module) is not shared:
//! it carries the node's "don't fragment" switching and its TCP diversion,
//! which the registry has neither of; what both share is `quinn-udp`.
//! Unlike `quinn-udp`'s default, the socket keeps the kernel's usual
//! fragmentation rule (`IP_PMTUDISC_WANT`), as a plain socket has: a
//! relayed datagram larger than the next link still leaves, in fragments,
//! as it did before batching.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc::Receiver;
use tracing::debug;

use crate::sessions::Reply;
use crate::tcp;

/// Receive buffers per call; each takes one datagram or one GRO
/// super-datagram.
pub const RECV_BATCH: usize = 16;
/// Size of each receive buffer (the largest GRO result).
pub const RECV_BUF: usize = 65_536;
/// Datagrams in one GSO send at most (the kernel's limit).
const MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO send at most (an IP packet's length field).
const MAX_RUN_BYTES: usize = 65_000;

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// The batching state of the registry's socket.
pub struct Batched {
    state: UdpSocketState,
}

impl Batched {
    /// Prepares `socket` for batches (GRO on, large buffers).
    pub fn new(socket: &UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(socket.into())?;
        // Large buffers absorb bursts while the loop does other work.
        let _ = state.set_recv_buffer_size(socket.into(), 8 << 20);
        let _ = state.set_send_buffer_size(socket.into(), 8 << 20);
        let fd = std::os::fd::AsFd::as_fd(socket);
        let v6 = socket.local_addr()?.is_ipv6();
        if let Err(e) = kernel_fragmentation(fd, v6) {
            debug!("cannot restore the kernel's fragmentation rule: {e}");
        }
        Ok(Batched { state })
    }

    /// Datagrams one send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, MAX_SEGMENTS)
    }

    /// Waits for datagrams, from the socket or from a TCP-attached node
    /// (`tcp`, with its marker address). Returns how many buffers were
    /// filled; each meta gives the length, the sender, and the stride of
    /// the datagrams in it (GRO).
    pub async fn recv(
        &self,
        socket: &UdpSocket,
        tcp: &mut Option<Receiver<(Vec<u8>, SocketAddr)>>,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> io::Result<usize> {
        // When both are ready, `select!` picks one at random: neither side
        // can starve the other.
        let first = {
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let from_tcp = async {
                match tcp {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = socket.async_io(Interest::READABLE, || {
                    self.state.recv(socket.into(), &mut iovs, metas)
                }) => {
                    // On a socket bound to [::], IPv4 senders arrive as
                    // ::ffff:a.b.c.d: kept (and told to nodes) as IPv4.
                    if let Ok(n) = r {
                        for m in &mut metas[..n] {
                            m.addr = canonical(m.addr);
                        }
                    }
                    return r;
                }
                Some(d) = from_tcp => d,
            }
        };
        Ok(take_tcp(tcp, bufs, metas, first))
    }

    /// Sends `contents` to `to` as datagrams of `segment` bytes (the last
    /// may be shorter): in one call with GSO, else one by one (also when
    /// the GSO send fails, e.g. a link narrower than a segment).
    pub async fn send(
        &self,
        socket: &UdpSocket,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let segment = segment.max(1);
        if contents.len() > segment && self.max_segments() > 1 {
            let t = Transmit {
                destination: to,
                ecn: None,
                contents,
                segment_size: Some(segment),
                src_ip: None,
            };
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    self.state.try_send(socket.into(), &t)
                })
                .await;
            match sent {
                Ok(()) => return Ok(()),
                Err(e) => debug!("GSO send of {} bytes to {to}: {e}", contents.len()),
            }
        }
        let mut result = Ok(());
        for d in contents.chunks(segment) {
            if let Err(e) = socket.send_to(d, to).await {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

/// Moves `first` and what else the TCP side has ready into the buffers;
/// returns how many were filled.
fn take_tcp(
    tcp: &mut Option<Receiver<(Vec<u8>, SocketAddr)>>,
    bufs: &mut [Vec<u8>],
    metas: &mut [RecvMeta],
    first: (Vec<u8>, SocketAddr),
) -> usize {
    let mut first = Some(first);
    let Some(rx) = tcp else { return 0 };
    let mut n = 0;
    for (buf, meta) in bufs.iter_mut().zip(metas.iter_mut()) {
        let Some((d, from)) = first.take().or_else(|| rx.try_recv().ok()) else {
            break;
        };
        // Frames are at most `streamframe::MAX_FRAME`, far below a buffer.
        let len = d.len().min(buf.len());
        buf[..len].copy_from_slice(&d[..len]);
        meta.addr = from;
        meta.len = len;
        meta.stride = len;
        n += 1;
    }
    n
}

/// The datagrams in a received buffer of `len` bytes whose datagrams are
/// `stride` bytes each (the last may be shorter), as byte ranges.
pub fn datagrams(len: usize, stride: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let stride = if stride == 0 { len.max(1) } else { stride };
    (0..len)
        .step_by(stride)
        .map(move |start| start..(start + stride).min(len))
}

/// One thing a batch asks to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Bytes `start..end` of receive buffer `buf`: relayed datagrams of
    /// `segment` bytes each (the last may be shorter), all to `to`.
    Forward {
        buf: usize,
        to: SocketAddr,
        start: usize,
        end: usize,
        segment: usize,
    },
    /// These bytes there (a STUN answer).
    Owned(Vec<u8>, SocketAddr),
    /// Control replies, to seal and send.
    Replies(Vec<Reply>),
}

/// What one received batch asks to send, in order.
pub struct Plan {
    /// The steps, in the order their datagrams came in.
    pub steps: Vec<Step>,
    max_segments: usize,
}

impl Plan {
    /// An empty plan whose runs hold at most `max_segments` datagrams.
    pub fn new(max_segments: usize) -> Self {
        Plan {
            steps: Vec::with_capacity(RECV_BATCH * 4),
            max_segments: max_segments.max(1),
        }
    }

    /// A relayed datagram, bytes `start..end` of buffer `buf`, goes to `to`:
    /// it joins the run before it if it follows that run in the same
    /// buffer, goes to the same UDP destination, and is as long as the
    /// run's datagrams (or shorter, which ends the run).
    pub fn forward(&mut self, buf: usize, to: SocketAddr, start: usize, end: usize) {
        let len = end - start;
        if let Some(Step::Forward {
            buf: b,
            to: t,
            start: s,
            end: e,
            segment,
        }) = self.steps.last_mut()
        {
            let joins = *b == buf
                && *t == to
                && *e == start
                && len <= *segment
                // A shorter datagram ended the run.
                && (*e - *s) % *segment == 0
                && (*e - *s) / *segment < self.max_segments
                && end - *s <= MAX_RUN_BYTES
                // Down a TCP connection datagrams go one by one.
                && !tcp::is_marker(to);
            if joins {
                *e = end;
                return;
            }
        }
        self.steps.push(Step::Forward {
            buf,
            to,
            start,
            end,
            segment: len,
        });
    }

    /// Forgets every step.
    pub fn clear(&mut self) {
        self.steps.clear();
    }
}

/// Sets the socket back to the kernel's default for a plain UDP socket
/// (`IP_PMTUDISC_WANT`: "don't fragment" while the datagram fits the known
/// path MTU, fragments when it does not), which `quinn-udp` replaced with
/// `IP_PMTUDISC_PROBE`.
fn kernel_fragmentation(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let v4 = set_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    if !v6 {
        return v4;
    }
    set_int(
        fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        libc::IPV6_PMTUDISC_WANT,
    )
}

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is an open socket for the duration of the call, and the
    // option value is a live c_int whose size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 7], port))
    }

    #[test]
    fn a_buffer_splits_at_its_stride() {
        let d: Vec<_> = datagrams(3000, 1400).collect();
        assert_eq!(d, [0..1400, 1400..2800, 2800..3000]);
        // One datagram: the whole buffer.
        for stride in [100, 0] {
            let d: Vec<_> = datagrams(100, stride).map(|r| (r.start, r.end)).collect();
            assert_eq!(d, [(0, 100)]);
        }
        assert_eq!(datagrams(0, 1400).count(), 0);
    }

    fn forward(buf: usize, to: SocketAddr, start: usize, end: usize, segment: usize) -> Step {
        Step::Forward {
            buf,
            to,
            start,
            end,
            segment,
        }
    }

    #[test]
    fn runs_join_only_what_one_gso_send_can_carry() {
        let mut p = Plan::new(3);
        // Three equal datagrams to one place, then a fourth: the limit.
        for i in 0..4 {
            p.forward(0, a(1), i * 100, (i + 1) * 100);
        }
        // Another destination; then back (a new run).
        p.forward(0, a(2), 400, 500);
        p.forward(0, a(1), 500, 600);
        // A shorter one ends a run; the next starts a new one.
        p.forward(0, a(1), 600, 650);
        p.forward(0, a(1), 650, 750);
        // A longer one does not join.
        p.forward(0, a(1), 750, 900);
        // Not contiguous, or another buffer: new runs.
        p.forward(0, a(1), 1000, 1150);
        p.forward(1, a(1), 1150, 1300);
        assert_eq!(
            p.steps,
            [
                forward(0, a(1), 0, 300, 100),
                forward(0, a(1), 300, 400, 100),
                forward(0, a(2), 400, 500, 100),
                forward(0, a(1), 500, 650, 100),
                forward(0, a(1), 650, 750, 100),
                forward(0, a(1), 750, 900, 150),
                forward(0, a(1), 1000, 1150, 150),
                forward(1, a(1), 1150, 1300, 150),
            ]
        );
    }

    #[test]
    fn datagrams_for_a_tcp_connection_stay_apart() {
        let m = tcp::marker(a(9), 1);
        let mut p = Plan::new(64);
        p.forward(0, m, 0, 100);
        p.forward(0, m, 100, 200);
        assert_eq!(
            p.steps,
            [forward(0, m, 0, 100, 100), forward(0, m, 100, 200, 100)]
        );
        // Without GSO nothing joins.
        let mut p = Plan::new(1);
        p.forward(0, a(1), 0, 100);
        p.forward(0, a(1), 100, 200);
        assert_eq!(p.steps.len(), 2);
    }

    #[test]
    fn a_run_stays_under_the_largest_send() {
        let mut p = Plan::new(64);
        for i in 0..60 {
            p.forward(0, a(1), i * 1400, (i + 1) * 1400);
        }
        let Some(Step::Forward { start, end, .. }) = p.steps.first() else {
            panic!()
        };
        assert!(end - start <= MAX_RUN_BYTES);
        assert_eq!(p.steps.len(), 2);
    }

    /// A registry on `[::]` (IPv6, taking IPv4 too): an IPv4 sender is
    /// reported as IPv4, and a GSO run goes back to it.
    #[tokio::test]
    async fn on_a_dual_stack_socket_ipv4_stays_ipv4() {
        let Ok(sock) = UdpSocket::bind("[::]:0").await else {
            eprintln!("no IPv6 on this host: nothing to test");
            return;
        };
        let port = sock.local_addr().unwrap().port();
        let io = Batched::new(&sock).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = client.local_addr().unwrap();
        client.send_to(b"hello", ("127.0.0.1", port)).await.unwrap();
        let mut bufs = vec![vec![0u8; RECV_BUF]; 1];
        let mut metas = vec![RecvMeta::default(); 1];
        let mut tcp = None;
        let n = io
            .recv(&sock, &mut tcp, &mut bufs, &mut metas)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(metas[0].addr, from, "not ::ffff:127.0.0.1");
        let contents: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        io.send(&sock, metas[0].addr, &contents, 1000)
            .await
            .unwrap();
        let mut b = [0u8; 2000];
        let mut total = 0;
        for _ in 0..3 {
            let (n, _) = client.recv_from(&mut b).await.unwrap();
            total += n;
        }
        assert_eq!(total, contents.len());
    }

    /// Over real loopback sockets: a GSO send arrives as its datagrams,
    /// and a receive returns what a TCP-attached node sent next to them.
    #[tokio::test]
    async fn a_run_goes_out_as_its_datagrams() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let io = Batched::new(&tx).unwrap();
        let to = rx.local_addr().unwrap();
        let contents: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        io.send(&tx, to, &contents, 1000).await.unwrap();
        let mut got = vec![];
        let mut b = [0u8; 2000];
        for _ in 0..3 {
            let (n, _) = rx.recv_from(&mut b).await.unwrap();
            got.push(b[..n].to_vec());
        }
        assert_eq!(
            got,
            [&contents[..1000], &contents[1000..2000], &contents[2000..]]
        );

        let (t, r) = tokio::sync::mpsc::channel(4);
        let mut tcp = Some(r);
        let marker = tcp::marker(a(5), 7);
        t.send((b"over tcp".to_vec(), marker)).await.unwrap();
        let io_rx = Batched::new(&rx).unwrap();
        let mut bufs = vec![vec![0u8; RECV_BUF]; 2];
        let mut metas = vec![RecvMeta::default(); 2];
        let n = io_rx
            .recv(&rx, &mut tcp, &mut bufs, &mut metas)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!((metas[0].addr, metas[0].len), (marker, 8));
        assert_eq!(&bufs[0][..8], b"over tcp");
        tx.send_to(b"over udp", rx.local_addr().unwrap())
            .await
            .unwrap();
        let n = io_rx
            .recv(&rx, &mut tcp, &mut bufs, &mut metas)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(metas[0].addr, tx.local_addr().unwrap());
        assert_eq!(&bufs[0][..metas[0].len], b"over udp");
    }
}
