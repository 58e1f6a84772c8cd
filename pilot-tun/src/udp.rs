//! The UDP side: one socket, batched receive with GRO and batched send with
//! GSO through `quinn-udp`, falling back to one datagram per call where the
//! kernel refuses (or when offloads are switched off).
//!
//! "Don't fragment" is decided per datagram. The socket is in Linux's
//! `IP_PMTUDISC_PROBE` mode (set by `quinn-udp`): every datagram leaves with
//! DF set and is sized by our own path MTU discovery, not the kernel's
//! cache. That is what the probes need (a probe that a router fragments
//! would prove nothing), and GSO sends cannot be fragmented anyway. The few
//! datagrams that must cross a narrower path whole — an inner packet with
//! DF set while its sender has not yet lowered its MTU, or one no ICMP
//! error can shrink — go out one by one through
//! [`Udp::send_fragmentable`], which switches the socket to
//! `IP_PMTUDISC_DONT` for that one send (the kernel and routers may then
//! fragment it). A second socket on the same port is not an option (the
//! kernel would spread our incoming datagrams over both), so a lock keeps
//! every other send out of that window.
//!
//! While UDP is blocked, datagrams for the registry go over the TCP relay
//! instead ([`crate::divert`]): every send checks the switch, and the
//! receive also returns what the stream delivered.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use parking_lot::RwLock;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::divert::Divert;

/// Receive buffers per batch; each takes one GRO super-datagram.
pub const RECV_BATCH: usize = 8;
/// Size of each receive buffer (the largest GRO result).
pub const RECV_BUF: usize = 65_536;

/// A UDP socket with batching.
pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    gso: bool,
    /// Held shared by every send, and exclusively while the socket lets the
    /// kernel fragment one datagram (so no other datagram leaves without
    /// DF meanwhile).
    df: RwLock<()>,
    /// Datagrams for the registry over the TCP relay, while UDP is blocked.
    pub divert: Divert,
    /// An IPv6 socket (that also takes IPv4): IPv4 destinations are sent
    /// as `::ffff:a.b.c.d`, and such sources are reported as IPv4.
    v6: bool,
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
        let v6 = socket.local_addr()?.is_ipv6();
        Ok(Udp {
            v6,
            socket: UdpSocket::from_std(socket)?,
            state,
            gso,
            df: RwLock::new(()),
            divert: Divert::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// True if the socket is IPv6 (and takes IPv4 too, unless bound to one
    /// IPv6 address).
    pub fn is_ipv6(&self) -> bool {
        self.v6
    }

    /// `to` as this socket's family spells it: an IPv4 address becomes
    /// `::ffff:a.b.c.d` on an IPv6 socket.
    fn wire(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => other,
        }
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
        loop {
            let n = self.divert.take(bufs, metas);
            if n > 0 {
                return Ok(n);
            }
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            tokio::select! {
                biased;
                r = self.socket.async_io(Interest::READABLE, || {
                    self.state.recv((&self.socket).into(), &mut iovs, metas)
                }) => {
                    // IPv4 sources on an IPv6 socket, as IPv4: every table
                    // (endpoints, candidates, the registry's address) holds
                    // them that way.
                    if let Ok(n) = r {
                        if self.v6 {
                            for m in &mut metas[..n] {
                                m.addr = canonical(m.addr);
                            }
                        }
                    }
                    return r;
                }
                () = self.divert.arrived() => {}
            }
        }
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
        if self.divert.diverts(to) {
            for chunk in contents.chunks(segment_size.unwrap_or(contents.len()).max(1)) {
                self.divert.send(chunk);
            }
            return Ok(());
        }
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
            destination: self.wire(to),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                let _df = self.df.read();
                self.state.try_send((&self.socket).into(), &t)
            })
            .await
    }

    /// Sends one datagram, for the control path.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        if self.divert.diverts(to) {
            self.divert.send(buf);
            return Ok(());
        }
        self.send_to_udp(buf, to).await
    }

    /// Sends one datagram over UDP even while the registry is diverted
    /// (the probes that tell whether UDP works again).
    pub async fn send_to_udp(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket
            .async_io(Interest::WRITABLE, || {
                let _df = self.df.read();
                send_to(self.socket.as_fd(), buf, self.wire(to))
            })
            .await
    }

    /// Sends one datagram over UDP whose IP TTL (hop limit) is `ttl`, the
    /// socket's own left as it is: a NAT traversal probe that must die at
    /// or just past our own NAT (`pilot_proto::path`). Same socket, so the
    /// same 5-tuple as every other datagram to `to`.
    pub async fn send_to_ttl(&self, buf: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
        if self.divert.diverts(to) {
            return Ok(());
        }
        self.socket
            .async_io(Interest::WRITABLE, || {
                let _df = self.df.read();
                send_to_ttl(self.socket.as_fd(), buf, self.wire(to), ttl)
            })
            .await
    }

    /// Sends one datagram without "don't fragment": larger than the path
    /// (or the interface) allows, it arrives in IP fragments instead of
    /// being dropped. Slow (three system calls and an exclusive lock); only
    /// for the rare datagram that needs it.
    pub async fn send_fragmentable(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        if self.divert.diverts(to) {
            self.divert.send(buf);
            return Ok(());
        }
        self.socket
            .async_io(Interest::WRITABLE, || {
                let _df = self.df.write();
                let fd = self.socket.as_fd();
                let v6 = self.socket.local_addr()?.is_ipv6();
                set_pmtu_discover(fd, v6, false)?;
                let sent = send_to(fd, buf, self.wire(to));
                // Back to DF for everything else; if that failed, the socket
                // would fragment instead of dropping: no harm, but say so.
                if let Err(e) = set_pmtu_discover(fd, v6, true) {
                    tracing::warn!("cannot restore don't-fragment on the UDP socket: {e}");
                }
                sent
            })
            .await
    }
}

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

/// One `sendto` on the socket, without touching tokio's readiness (the
/// caller is inside `async_io`).
fn send_to(fd: BorrowedFd<'_>, buf: &[u8], to: SocketAddr) -> io::Result<()> {
    let addr = nix::sys::socket::SockaddrStorage::from(to);
    nix::sys::socket::sendto(
        fd.as_raw_fd(),
        buf,
        &addr,
        nix::sys::socket::MsgFlags::empty(),
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// One `sendmsg` with the TTL in a control message (`IP_TTL`, or
/// `IPV6_HOPLIMIT` for a native IPv6 destination): only this datagram gets it.
fn send_to_ttl(fd: BorrowedFd<'_>, buf: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    let addr = SockaddrStorage::from(to);
    let hops = libc::c_int::from(ttl);
    let iov = [std::io::IoSlice::new(buf)];
    let v4 = match to {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let cmsg = if v4 {
        ControlMessage::Ipv4Ttl(&hops)
    } else {
        ControlMessage::Ipv6HopLimit(&hops)
    };
    sendmsg(
        fd.as_raw_fd(),
        &iov,
        &[cmsg],
        MsgFlags::empty(),
        Some(&addr),
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Switches the socket between `IP_PMTUDISC_PROBE` (DF on every datagram,
/// the kernel's path MTU cache ignored: `quinn-udp`'s setting) and
/// `IP_PMTUDISC_DONT` (no DF; the kernel fragments to the route's MTU). An
/// IPv6 socket gets both options, like `quinn-udp` does (IPv4-mapped
/// destinations follow the IPv4 one).
fn set_pmtu_discover(fd: BorrowedFd<'_>, v6: bool, df: bool) -> io::Result<()> {
    let (v4_mode, v6_mode) = if df {
        (libc::IP_PMTUDISC_PROBE, libc::IPV6_PMTUDISC_PROBE)
    } else {
        (libc::IP_PMTUDISC_DONT, libc::IPV6_PMTUDISC_DONT)
    };
    let v4 = set_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, v4_mode);
    if !v6 {
        return v4;
    }
    set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, v6_mode)
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

    /// Sends every packet on its own, allowed to be fragmented on the way
    /// ([`Udp::send_fragmentable`]); returns how many sends failed.
    pub async fn flush_fragmentable(&mut self, udp: &Udp) -> usize {
        let mut failed = 0;
        for &(to, start, len) in &self.packets {
            if udp
                .send_fragmentable(&self.buf[start..start + len], to)
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        self.clear();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 socket that takes IPv4 too, as the node binds one for a
    /// registry with an IPv6 endpoint; `None` on a host without IPv6.
    fn dual_stack() -> Option<std::net::UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).ok()?;
        s.set_only_v6(false).ok()?;
        let any: SocketAddr = "[::]:0".parse().unwrap();
        s.bind(&any.into()).ok()?;
        Some(s.into())
    }

    #[test]
    fn mapped_addresses_read_as_ipv4() {
        let v4: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn a_dual_stack_socket_speaks_ipv4_as_ipv4() {
        let Some(sock) = dual_stack() else {
            eprintln!("no IPv6 on this host: nothing to test");
            return;
        };
        for offload in [false, true] {
            let udp = Udp::new(sock.try_clone().unwrap(), offload).unwrap();
            assert!(udp.is_ipv6());
            let port = udp.local_addr().unwrap().port();
            let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let peer_addr = peer.local_addr().unwrap();
            peer.send_to(b"hello", ("127.0.0.1", port)).await.unwrap();
            let mut bufs = vec![vec![0u8; 2048]];
            let mut metas = vec![RecvMeta::default()];
            let n = udp.recv_batch(&mut bufs, &mut metas).await.unwrap();
            assert_eq!(n, 1);
            // The sender as the IPv4 address it is, not ::ffff:127.0.0.1.
            assert_eq!(metas[0].addr, peer_addr);
            assert_eq!(&bufs[0][..metas[0].len], b"hello");
            // Every send path takes an IPv4 destination.
            udp.send_to(b"one", peer_addr).await.unwrap();
            udp.send_to_ttl(b"two", peer_addr, 9).await.unwrap();
            udp.send_fragmentable(b"three", peer_addr).await.unwrap();
            udp.send(peer_addr, b"fourfive", Some(4)).await.unwrap();
            let mut got = vec![];
            let mut buf = [0u8; 64];
            for _ in 0..5 {
                let (n, from) = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    peer.recv_from(&mut buf),
                )
                .await
                .expect("a datagram in time")
                .unwrap();
                assert_eq!(from.port(), port);
                got.push(buf[..n].to_vec());
            }
            let want: Vec<&[u8]> = vec![b"one", b"two", b"three", b"four", b"five"];
            assert_eq!(got, want);
        }
    }
}
