//! The TUN side, behind a narrow trait: the kernel device (with
//! `IFF_VNET_HDR` offloads when the kernel allows them) and a channel-backed
//! fake for in-process tests.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use pilot_proto::gro::{self, Plan};
use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::sync::mpsc;

/// Room every buffer handed to [`Tun::send_batch`] keeps before the packet.
/// It is at least the virtio-net header the kernel device prepends, and
/// exactly our data header, so a datagram decrypted in place is written to
/// the TUN without moving it.
pub const TUN_OFFSET: usize = pilot_proto::wire::DATA_HEADER_LEN;

// Our coalescing writes the same header tun-rs does, in the room before
// each packet.
const _: () = assert!(gro::VNET_HDR_LEN == tun_rs::VIRTIO_NET_HDR_LEN);
const _: () = assert!(TUN_OFFSET >= gro::VNET_HDR_LEN);

/// Most packets one read or write batch carries.
pub const BATCH: usize = 128;

/// A TUN device: reads and writes IP packets (IPv4 and IPv6) in batches.
pub trait Tun: Send + Sync + 'static {
    /// Waits for packets and reads as many as are ready (at most
    /// `bufs.len()`). Packet `i` is `bufs[i][TUN_OFFSET..TUN_OFFSET + sizes[i]]`;
    /// each buffer must be at least `TUN_OFFSET + 65535` long... or the MTU
    /// when offloads are off. Returns how many packets were read.
    fn recv_batch<'a>(
        &'a self,
        bufs: &'a mut [Vec<u8>],
        sizes: &'a mut [usize],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// Writes packets; each is `bufs[i][TUN_OFFSET..]` (the buffers may be
    /// merged and grown by receive offload).
    fn send_batch<'a>(
        &'a self,
        bufs: &'a mut [Vec<u8>],
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Changes the interface MTU (a fake has none to change).
    fn set_mtu(&self, _mtu: u16) -> io::Result<()> {
        Ok(())
    }

    /// Adds an IPv6 address with its prefix (the kernel routes the prefix
    /// into the device); one already there is not an error. A fake has no
    /// addresses.
    fn add_ipv6(&self, _addr: Ipv6Addr, _prefix_len: u8) -> io::Result<()> {
        Ok(())
    }
}

/// The kernel TUN device.
pub struct KernelTun {
    dev: tun_rs::AsyncDevice,
    name: String,
    offload: bool,
    // Async mutexes: each is used by one task only (the reader, the writer),
    // and the guard is held across the device await, so the buffers and the
    // GRO tables (about a megabyte of pooled vectors) are reused, never rebuilt.
    read_scratch: tokio::sync::Mutex<Vec<u8>>,
    writer: tokio::sync::Mutex<Writer>,
}

/// What the writing side reuses from batch to batch: our TCP coalescing
/// plan, and tun-rs's GRO table for the packets that are not TCP (UDP
/// runs become USO super-packets there) or for a device without offloads.
#[derive(Default)]
struct Writer {
    plan: Plan,
    gro: tun_rs::GROTable,
}

/// How a TUN device is set up.
#[derive(Clone, Debug)]
pub struct TunConfig {
    /// Interface name, e.g. `pilot0`.
    pub name: String,
    /// Our overlay address.
    pub address: Ipv4Addr,
    /// Overlay prefix length (the kernel adds the route for the prefix).
    pub prefix_len: u8,
    /// Interface MTU at creation (the node sets the one that fits the
    /// underlay right after).
    pub mtu: u16,
    /// Try TSO/GSO offloads (`IFF_VNET_HDR`); falls back when refused.
    pub offload: bool,
}

impl KernelTun {
    /// Creates and configures the device. With `offload`, asks for
    /// `IFF_VNET_HDR` and TSO; if the kernel refuses, retries without.
    pub fn create(cfg: &TunConfig) -> io::Result<Self> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&cfg.name)
                .ipv4(cfg.address, cfg.prefix_len, None)
                .mtu(cfg.mtu)
                .offload(offload)
                .build_async()
        };
        let (dev, offload) = if cfg.offload {
            match build(true) {
                Ok(d) => (d, true),
                Err(e) => {
                    tracing::warn!("TUN offloads refused ({e}); using one packet per read");
                    (build(false)?, false)
                }
            }
        } else {
            (build(false)?, false)
        };
        Ok(KernelTun {
            name: dev.name().unwrap_or_else(|_| cfg.name.clone()),
            dev,
            offload,
            read_scratch: tokio::sync::Mutex::new(vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535]),
            writer: tokio::sync::Mutex::new(Writer::default()),
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if TSO/GSO offloads are on.
    pub fn offload(&self) -> bool {
        self.offload
    }
}

impl Tun for KernelTun {
    async fn recv_batch<'a>(
        &'a self,
        bufs: &'a mut [Vec<u8>],
        sizes: &'a mut [usize],
    ) -> io::Result<usize> {
        let mut scratch = self.read_scratch.lock().await;
        let scratch = &mut *scratch;
        async {
            let mut n = self
                .dev
                .recv_multiple(scratch, bufs, sizes, TUN_OFFSET)
                .await?;
            // Drain what else is ready, so one wake-up serves a batch.
            while bufs.len() - n >= 64 {
                match self.dev.try_recv_multiple(
                    scratch,
                    &mut bufs[n..],
                    &mut sizes[n..],
                    TUN_OFFSET,
                ) {
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(n)
        }
        .await
    }

    async fn send_batch<'a>(&'a self, bufs: &'a mut [Vec<u8>]) -> io::Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock().await;
        let Writer { plan, gro } = &mut *w;
        if !self.offload {
            return self
                .dev
                .send_multiple(gro, bufs, TUN_OFFSET)
                .await
                .map(|_| ());
        }
        // TCP: runs of segments become one super-packet each, gathered
        // from the decrypted packets where they lie (pilot_proto::gro).
        plan.build(bufs, TUN_OFFSET);
        plan.finish(bufs, TUN_OFFSET);
        let mut result = Ok(());
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(usize::from(gro::MAX_SEGMENTS));
        for run in plan.runs() {
            iov.clear();
            iov.extend(plan.parts(run, bufs, TUN_OFFSET).map(IoSlice::new));
            let mut r = writev(self.dev.as_raw_fd(), &iov);
            if r.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
            {
                // A TUN write does not wait for room; if it ever asks to,
                // wait once.
                self.dev.writable().await?;
                r = writev(self.dev.as_raw_fd(), &iov);
            }
            if let Err(e) = r {
                result = Err(e);
            }
        }
        // Everything else through tun-rs, in order.
        if !plan.others().is_empty() {
            let others = plan.others();
            let mut rest: Vec<&mut Vec<u8>> = bufs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| others.binary_search(i).is_ok())
                .map(|(_, b)| b)
                .collect();
            if let Err(e) = self.dev.send_multiple(gro, &mut rest, TUN_OFFSET).await {
                result = Err(e);
            }
        }
        result
    }

    fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.dev.set_mtu(mtu)
    }

    fn add_ipv6(&self, addr: Ipv6Addr, prefix_len: u8) -> io::Result<()> {
        match self.dev.add_address_v6(addr, prefix_len) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }
}

/// One gathered write of `parts` to the device `fd`.
fn writev(fd: RawFd, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    let count = libc::c_int::try_from(parts.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many parts"))?;
    // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix, and
    // every slice it points to outlives the call.
    let n = unsafe { libc::writev(fd, parts.as_ptr().cast::<libc::iovec>(), count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A fake TUN for in-process tests: packets the node writes come out of
/// [`FakeTunHandle::from_node`]; packets pushed into
/// [`FakeTunHandle::to_node`] are what the node reads.
pub struct FakeTun {
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    tx: mpsc::Sender<Vec<u8>>,
}

/// The test's end of a [`FakeTun`].
pub struct FakeTunHandle {
    /// Inject packets as if a local program sent them.
    pub to_node: mpsc::Sender<Vec<u8>>,
    /// Packets the node delivered to "local programs".
    pub from_node: mpsc::Receiver<Vec<u8>>,
}

impl FakeTun {
    /// A fake device and the test's handle to it.
    pub fn new() -> (Self, FakeTunHandle) {
        let (to_node, rx) = mpsc::channel(1024);
        let (tx, from_node) = mpsc::channel(1024);
        (
            FakeTun {
                rx: tokio::sync::Mutex::new(rx),
                tx,
            },
            FakeTunHandle { to_node, from_node },
        )
    }
}

impl Tun for FakeTun {
    async fn recv_batch<'a>(
        &'a self,
        bufs: &'a mut [Vec<u8>],
        sizes: &'a mut [usize],
    ) -> io::Result<usize> {
        let mut rx = self.rx.lock().await;
        let Some(first) = rx.recv().await else {
            // The test dropped its handle: behave like a device that is gone.
            std::future::pending::<()>().await;
            unreachable!()
        };
        let mut n = 0;
        let mut next = Some(first);
        while let Some(p) = next {
            let len = p.len().min(bufs[n].len() - TUN_OFFSET);
            bufs[n][TUN_OFFSET..TUN_OFFSET + len].copy_from_slice(&p[..len]);
            sizes[n] = len;
            n += 1;
            next = if n < bufs.len() {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        Ok(n)
    }

    async fn send_batch<'a>(&'a self, bufs: &'a mut [Vec<u8>]) -> io::Result<()> {
        for b in bufs.iter() {
            let _ = self.tx.send(b[TUN_OFFSET..].to_vec()).await;
        }
        Ok(())
    }
}
