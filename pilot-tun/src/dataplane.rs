//! The packet path, in two loops that run in parallel:
//!
//! - [`tun_loop`]: TUN → seal → UDP. A batch read from the TUN (one TSO
//!   super-packet is split into segments by the device layer) is sealed
//!   packet by packet straight into one send buffer, and runs of equal-sized
//!   packets to one peer leave in one GSO send. A packet (segment) larger
//!   than its peer's path MTU allows is fragmented (IPv4 without DF), or
//!   answered with ICMP "fragmentation needed" into the TUN and sent in an
//!   outer datagram the underlay may fragment (see `pilot_proto::mtu::fit`).
//! - [`udp_loop`]: UDP → open → TUN. A batch of datagrams (GRO-coalesced by
//!   the kernel) is cut into its segments; each is copied once into its own
//!   TUN buffer, opened in place there and written to the TUN in one batch.
//!   There, runs of segments of one TCP stream leave as one super-packet
//!   each (`pilot_proto::gro`: a virtio-net header with the segment size,
//!   the first packet and the other segments' payloads gathered by one
//!   `writev`), so the kernel's TCP stack takes a 64 KB packet where it
//!   would take 45; other packets go through tun-rs (whose GRO makes UDP
//!   runs one USO packet). The copy into a buffer of its own keeps each
//!   decrypted packet apart from the shared receive buffer, which the next
//!   receive reuses; it costs about 3 % of the receiving daemon's CPU
//!   (`scripts/profile.sh`: all of `memmove` together).
//!
//! Both read the peer table under a read lock once per batch. Anything that
//! is not data for a live session goes to the control side.
//!
//! IPv6 rides the same path: a peer's IPv6 overlay address embeds its IPv4
//! one (`pilot_proto::ipv6`), so an IPv6 destination in our /48 is mapped
//! to that IPv4 address and looked up in the same table, and an inbound
//! IPv6 packet must come from the peer's own /128 to ours, as an IPv4 one
//! must from its 10.x address to ours. The IPv4 path reads the version
//! nibble it read before; nothing is added to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use pilot_proto::filter::{Direction, Noted, Verdict};
use pilot_proto::identity::NodeId;
use pilot_proto::ipv6::{self, Ula};
use pilot_proto::mtu::{self, Family, Fit};
use pilot_proto::packet;
use pilot_proto::session::{OpenError, Session};
use pilot_proto::wire::{
    self, Kind, RelayHeader, DATA_HEADER_LEN, DATA_OVERHEAD, MSG_RELAY_TO, RELAY_HEADER_LEN,
    TAG_LEN,
};
use quinn_udp::RecvMeta;
use tracing::warn;

use crate::peers::{bump, PeerData, TooBig};
use crate::shared::{slow_fits, Shared, Slow};
use crate::tun::{Tun, BATCH, TUN_OFFSET};
use crate::udp::{SendBatch, RECV_BATCH, RECV_BUF};
use pilot_proto::path::Path;
use std::net::{Ipv4Addr, SocketAddr};

/// How packets for one peer leave: its session, and where the datagrams go.
struct Via<'a> {
    peer: &'a PeerData,
    session: &'a Session,
    /// The peer's endpoint, or the relay's address.
    dest: SocketAddr,
    relayed: bool,
}

/// Seals one inner packet of `len` bytes, written by `fill` into the
/// plaintext area, into `batch` (behind the relay header when relayed).
/// False if the session refused (its counter is spent); the batch is then
/// unchanged.
fn seal_into(
    batch: &mut SendBatch,
    via: &Via<'_>,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> bool {
    let Via {
        peer,
        session,
        dest,
        relayed,
    } = *via;
    let start = batch.buf.len();
    // Through the relay, the datagram is prefixed with the relay header
    // naming the peer.
    let pre = if relayed { RELAY_HEADER_LEN } else { 0 };
    batch
        .buf
        .resize(start + pre + DATA_HEADER_LEN + len + TAG_LEN, 0);
    if relayed {
        RelayHeader {
            ty: MSG_RELAY_TO,
            node: peer.id,
        }
        .emit(&mut batch.buf[start..]);
    }
    let at = start + pre;
    fill(&mut batch.buf[at + DATA_HEADER_LEN..at + DATA_HEADER_LEN + len]);
    match session.sender.seal(&mut batch.buf[at..], len) {
        Ok(total) => {
            batch.packets.push((dest, start, pre + total));
            true
        }
        Err(_) => {
            batch.buf.truncate(start);
            false
        }
    }
}

/// The largest inner packet `peer`'s path carries, by its path MTU
/// (unknown: no limit here, the TUN MTU already bounds what we read).
fn inner_limit(peer: &PeerData, dest: SocketAddr, relayed: bool) -> usize {
    match peer.path_mtu() {
        0 => usize::MAX,
        m => usize::from(mtu::inner_mtu(m, Family::of(dest.ip()), relayed)),
    }
}

/// A peer's route for a run of packets: session, endpoint, where the
/// datagrams go, whether relayed, and the largest inner packet that fits.
type Route = (Arc<PeerData>, Arc<Session>, SocketAddr, bool, usize);

/// Reads local packets from the TUN and sends them to peers.
pub async fn tun_loop<T: Tun>(inner: Arc<Shared<T>>) {
    let Some(tun) = inner.tun.get() else { return };
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; TUN_OFFSET + 65_535]).collect();
    let mut sizes = vec![0usize; BATCH];
    let mut batch = SendBatch::with_capacity(BATCH);
    // Datagrams that must cross a narrower path whole (sent without DF).
    let mut oversize = SendBatch::with_capacity(4);
    let mut icmp: Vec<Vec<u8>> = Vec::with_capacity(8);
    // Peers that got an ICMP "fragmentation needed" in this batch: one each
    // is enough for the sender's kernel.
    let mut told: Vec<Ipv4Addr> = Vec::with_capacity(8);
    let network = inner.network();
    let me = inner.address();
    // Set before this loop starts (with the TUN), never changed.
    let ula = inner.ula();
    loop {
        let n = match tun.recv_batch(&mut bufs, &mut sizes).await {
            Ok(n) => n,
            Err(e) => {
                warn!("TUN read: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let now = Instant::now();
        let now_ms = inner.now_ms(now);
        let unix = UnixClock::default();
        let relay = inner.relay_addr();
        icmp.clear();
        told.clear();
        let mut route: Option<Route> = None;
        // This batch's traffic, added to the node's totals once at its end.
        let mut sent = BatchCount::default();
        {
            let table = inner.table.read();
            for i in 0..n {
                let pkt = &bufs[i][TUN_OFFSET..TUN_OFFSET + sizes[i]];
                // The peer's IPv4 address; for IPv6, the one its /128
                // embeds.
                let (dst, v6) = match packet::ipv4_dst(pkt) {
                    Some(d) => (d, false),
                    None => match v6_destination(pkt, ula.as_ref()) {
                        V6Dst::Node(d) => (d, true),
                        V6Dst::Overlay => {
                            // In our /48 but no node's address.
                            bump(&inner.drops.refused_local);
                            icmp.extend(admin_prohibited(pkt, TUN_OFFSET));
                            continue;
                        }
                        V6Dst::Elsewhere => continue,
                    },
                };
                let Some(peer) = table.by_addr.get(&dst) else {
                    // Not a trusted peer: refuse at once so the program does
                    // not hang (unless it is outside the overlay or us).
                    if dst != me && (v6 || network.is_some_and(|n| n.contains(&dst))) {
                        bump(&inner.drops.refused_local);
                        icmp.extend(admin_prohibited(pkt, TUN_OFFSET));
                    }
                    continue;
                };
                // Scoped or expiring trust: what the peer granted us decides
                // what we may open on it; a refusal is answered at once.
                if !peer.unfiltered() {
                    let (verdict, noted) = peer.check(pkt, Direction::Outbound, now, unix.get());
                    note(&inner, peer, noted);
                    match verdict {
                        Verdict::Pass => {}
                        Verdict::Deny(..) => {
                            bump(&inner.drops.policy_out);
                            icmp.extend(admin_prohibited(pkt, TUN_OFFSET));
                            continue;
                        }
                        Verdict::Drop => {
                            bump(&inner.drops.policy_out);
                            continue;
                        }
                    }
                }
                // Consecutive packets mostly go to the same peer: look its
                // session, endpoint and path MTU up once per run, not per
                // packet (the locks are shared with the receiving loop on
                // another core).
                let cached = match &route {
                    Some((p, s, d, r, l)) if Arc::ptr_eq(p, peer) => Some((s.clone(), *d, *r, *l)),
                    _ => None,
                };
                let (session, dest, relayed, limit) = match cached {
                    Some(c) => c,
                    None => {
                        let (Some(session), Some(to)) = (peer.current(now), peer.endpoint()) else {
                            let _ = inner
                                .slow_tx
                                .try_send(Slow::NeedSession(peer.id, pkt.to_vec()));
                            continue;
                        };
                        let (dest, relayed) = match to {
                            Path::Direct(a) => (a, false),
                            Path::Relay => (relay, true),
                        };
                        let limit = inner_limit(peer, dest, relayed);
                        wake(&inner, peer);
                        route = Some((peer.clone(), session.clone(), dest, relayed, limit));
                        (session, dest, relayed, limit)
                    }
                };
                let len = pkt.len();
                let via = Via {
                    peer,
                    session: &session,
                    dest,
                    relayed,
                };
                let sealed = if len <= limit {
                    seal_into(&mut batch, &via, len, |b| b.copy_from_slice(pkt))
                } else {
                    let out = Out {
                        batch: &mut batch,
                        oversize: &mut oversize,
                        icmp: &mut icmp,
                        told: &mut told,
                    };
                    too_big(&inner.drops.too_big, pkt, dst, limit, &via, out)
                };
                if sealed {
                    peer.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    peer.tx_packets.fetch_add(1, Ordering::Relaxed);
                    sent.add(len, relayed);
                    peer.last_tx_ms.store(now_ms, Ordering::Relaxed);
                } else {
                    let _ = inner
                        .slow_tx
                        .try_send(Slow::NeedSession(peer.id, pkt.to_vec()));
                }
            }
        }
        let t = &inner.totals;
        sent.flush(&t.tx_bytes, &t.tx_packets, &t.tx_relayed_bytes);
        if let Err(e) = batch.flush(&inner.udp).await {
            tracing::debug!("UDP send: {e}");
        }
        if !oversize.packets.is_empty() {
            let failed = oversize.flush_fragmentable(&inner.udp).await;
            inner
                .drops
                .too_big
                .send_failed
                .fetch_add(failed as u64, Ordering::Relaxed);
        }
        if !icmp.is_empty() {
            let _ = tun.send_batch(&mut icmp).await;
        }
    }
}

/// Where an IPv6 packet from the TUN goes.
#[derive(Debug, PartialEq, Eq)]
enum V6Dst {
    /// To the node whose IPv4 overlay address this is.
    Node(Ipv4Addr),
    /// Into our /48, but to no node's address.
    Overlay,
    /// Not IPv6, or outside the overlay (or we have no IPv6 prefix).
    Elsewhere,
}

/// Reads where an IPv6 packet from the TUN goes.
#[inline]
fn v6_destination(pkt: &[u8], ula: Option<&Ula>) -> V6Dst {
    let (Some(u), Some((_, d))) = (ula, ipv6::addr_bytes(pkt)) else {
        return V6Dst::Elsewhere;
    };
    match u.v4_of_bytes(d) {
        Some(v4) => V6Dst::Node(v4),
        None if u.contains(&(*d).into()) => V6Dst::Overlay,
        None => V6Dst::Elsewhere,
    }
}

/// True if an authenticated inner IPv6 packet from the peer at `peer_v4`
/// comes from the peer's own /128 and goes to ours (`me6`).
#[inline]
fn v6_from_peer_to_us(pkt: &[u8], ula: Option<&Ula>, peer_v4: Ipv4Addr, me6: &[u8; 16]) -> bool {
    match (ula, ipv6::addr_bytes(pkt)) {
        (Some(u), Some((s, d))) => u.v4_of_bytes(s) == Some(peer_v4) && d == me6,
        _ => false,
    }
}

/// The ICMP (or ICMPv6) "administratively prohibited" answer to `pkt`,
/// behind `offset` bytes of room, if one may be sent.
fn admin_prohibited(pkt: &[u8], offset: usize) -> Option<Vec<u8>> {
    let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
    let room = if v6 { usize::from(ipv6::MIN_MTU) } else { 128 };
    let mut out = vec![0u8; offset + room];
    let len = if v6 {
        ipv6::icmp_admin_prohibited(pkt, &mut out[offset..])?
    } else {
        packet::icmp_admin_prohibited(pkt, &mut out[offset..])?
    };
    out.truncate(offset + len);
    Some(out)
}

/// The ICMP "fragmentation needed" (ICMPv6 "packet too big") answer to
/// `pkt` for a path of `mtu` inner bytes, ready for the TUN.
fn too_big_answer(pkt: &[u8], mtu: u16) -> Option<Vec<u8>> {
    let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
    let room = if v6 { usize::from(ipv6::MIN_MTU) } else { 128 };
    let mut out = vec![0u8; TUN_OFFSET + room];
    let len = if v6 {
        ipv6::icmp_packet_too_big(pkt, mtu, &mut out[TUN_OFFSET..])?
    } else {
        packet::icmp_frag_needed(pkt, mtu, &mut out[TUN_OFFSET..])?
    };
    out.truncate(TUN_OFFSET + len);
    Some(out)
}

/// Where [`too_big`] puts what it makes.
struct Out<'a> {
    /// Datagrams sent with DF, as usual.
    batch: &'a mut SendBatch,
    /// Datagrams sent without DF.
    oversize: &'a mut SendBatch,
    /// ICMP errors for the TUN.
    icmp: &'a mut Vec<Vec<u8>>,
    /// Destinations that got an ICMP error in this batch.
    told: &'a mut Vec<Ipv4Addr>,
}

/// A packet larger than its peer's path carries (`limit` inner bytes):
/// fragmented (IPv4 without DF), or sealed whole into the datagrams sent
/// without DF (so the underlay fragments it), with an ICMP "fragmentation
/// needed" (IPv6: "packet too big") for its sender if it may have one (once
/// per destination and batch: one is enough for the sender's kernel). Every case is counted.
/// False if the session refused to seal.
fn too_big(
    counters: &TooBig,
    pkt: &[u8],
    dst: Ipv4Addr,
    limit: usize,
    via: &Via<'_>,
    out: Out<'_>,
) -> bool {
    let mtu16 = u16::try_from(limit).unwrap_or(u16::MAX);
    match mtu::fit(pkt, mtu16) {
        Fit::Send => seal_into(out.batch, via, pkt.len(), |b| b.copy_from_slice(pkt)),
        Fit::FragmentInner => {
            let Ok(mut frags) = packet::Fragments::new(pkt, limit) else {
                // `fit` checked this; never drop silently all the same.
                bump(&counters.send_failed);
                return true;
            };
            bump(&counters.fragmented_inner);
            while let Some(flen) = frags.next_len() {
                let ok = seal_into(out.batch, via, flen, |b| {
                    let _ = frags.write_next(b);
                });
                if !ok {
                    return false;
                }
            }
            true
        }
        fit @ (Fit::TooBig | Fit::FragmentOuter) => {
            if fit == Fit::TooBig && !out.told.contains(&dst) {
                if let Some(icmp) = too_big_answer(pkt, mtu16) {
                    out.icmp.push(icmp);
                    out.told.push(dst);
                    bump(&counters.icmp_sent);
                }
            }
            bump(&counters.fragmented_outer);
            seal_into(out.oversize, via, pkt.len(), |b| b.copy_from_slice(pkt))
        }
    }
}

/// Receives datagrams: data for live sessions goes to the TUN, the rest to
/// the control side.
pub async fn udp_loop<T: Tun>(inner: Arc<Shared<T>>) {
    let mut bufs: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUF]).collect();
    let mut metas = vec![RecvMeta::default(); RECV_BATCH];
    // One output buffer per segment a full receive batch can hold, so the
    // loop never has to stop mid-batch.
    let mut out: Vec<Vec<u8>> = (0..RECV_BATCH * 64)
        .map(|_| Vec::with_capacity(TUN_OFFSET + 2048))
        .collect();
    // Peers told of a refused packet in this batch.
    let mut told: Vec<NodeId> = Vec::with_capacity(4);
    loop {
        let n = match inner.udp.recv_batch(&mut bufs, &mut metas).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("UDP receive: {e}");
                continue;
            }
        };
        let now = Instant::now();
        let now_ms = inner.now_ms(now);
        let unix = UnixClock::default();
        told.clear();
        let me = inner.address();
        let ula = inner.ula();
        let me6 = inner.address6().map_or([0; 16], |a| a.octets());
        let mut k = 0;
        let mut last: Option<(Arc<Session>, Path)> = None;
        let mut received = BatchCount::default();
        {
            let table = inner.table.read();
            for (buf, meta) in bufs.iter().zip(metas.iter()).take(n) {
                let stride = meta.stride.max(1);
                for seg in buf[..meta.len].chunks(stride) {
                    if k == out.len() {
                        break; // cannot happen: GRO carries at most 64 segments
                    }
                    // A datagram from the relay carries another node's
                    // tunnel datagram; it is authenticated like any other.
                    let (seg, via, relayed_from) = match wire::classify(seg) {
                        Kind::RelayFrom if inner.is_relay(meta.addr) => {
                            match RelayHeader::parse(seg) {
                                Ok(h) => (&seg[RELAY_HEADER_LEN..], Path::Relay, Some(h.node)),
                                Err(_) => {
                                    bump(&inner.drops.malformed);
                                    continue;
                                }
                            }
                        }
                        _ => (seg, Path::Direct(meta.addr), None),
                    };
                    // Sized before it is copied: nothing else is worth it.
                    let slow = |seg: &[u8]| {
                        if !slow_fits(seg, relayed_from.is_some()) {
                            bump(&inner.drops.malformed);
                            return;
                        }
                        let _ = inner.slow_tx.try_send(match relayed_from {
                            Some(src) => Slow::Relayed(src, seg.to_vec()),
                            None => Slow::Datagram(seg.to_vec(), meta.addr),
                        });
                    };
                    if wire::classify(seg) != Kind::Data || seg.len() < DATA_OVERHEAD {
                        slow(seg);
                        continue;
                    }
                    let Ok(h) = wire::DataHeader::parse(seg) else {
                        bump(&inner.drops.malformed);
                        continue;
                    };
                    let Some((peer, session)) = table.by_index.get(&h.receiver_index) else {
                        // The registry session, or no session at all.
                        slow(seg);
                        continue;
                    };
                    if relayed_from.is_some_and(|src| src != peer.id) {
                        bump(&inner.drops.auth);
                        continue;
                    }
                    let o = &mut out[k];
                    o.clear();
                    o.extend_from_slice(seg);
                    let plain = match session.open(o) {
                        Ok(p) => p,
                        Err(OpenError::Replay) => {
                            bump(&inner.drops.replay);
                            continue;
                        }
                        Err(_) => {
                            bump(&inner.drops.auth);
                            continue;
                        }
                    };
                    // Authenticated: now it may move state (roaming, the
                    // switch from relay to direct, the new session).
                    // Once per run of packets from one session and path.
                    let same = last
                        .as_ref()
                        .is_some_and(|(s, v)| Arc::ptr_eq(s, session) && *v == via);
                    if !same {
                        peer.last_rx_ms.store(now_ms, Ordering::Relaxed);
                        inner.totals.path_changed(peer.set_endpoint(via));
                        if !session.initiator {
                            peer.promote(session);
                        }
                        last = Some((session.clone(), via));
                    }
                    if plain == 0 {
                        continue; // keepalive
                    }
                    peer.last_data_rx_ms.store(now_ms, Ordering::Relaxed);
                    wake(&inner, peer);
                    let inner_pkt = &o[DATA_HEADER_LEN..DATA_HEADER_LEN + plain];
                    let version = inner_pkt[0] >> 4;
                    if version != 4 && version != 6 {
                        // Not an IP packet: an in-tunnel control message.
                        let _ = inner
                            .slow_tx
                            .try_send(Slow::Control(peer.id, inner_pkt.to_vec()));
                        continue;
                    }
                    // From the peer's own address to ours, in either family.
                    let genuine = if version == 4 {
                        matches!(packet::ipv4_addrs(inner_pkt),
                            Some((src, dst)) if src == peer.address && dst == me)
                    } else {
                        v6_from_peer_to_us(inner_pkt, ula.as_ref(), peer.address, &me6)
                    };
                    if !genuine {
                        bump(&inner.drops.inner_address);
                        continue;
                    }
                    if !peer.unfiltered() {
                        let (verdict, noted) =
                            peer.check(inner_pkt, Direction::Inbound, now, unix.get());
                        note(&inner, peer, noted);
                        if verdict != Verdict::Pass {
                            bump(&inner.drops.policy_in);
                            // Tell the peer's program at once (its node
                            // may not know our grant yet), once per peer
                            // and batch.
                            if matches!(verdict, Verdict::Deny(..)) && !told.contains(&peer.id) {
                                if let Some(icmp) = admin_prohibited(inner_pkt, 0) {
                                    told.push(peer.id);
                                    let _ =
                                        inner.slow_tx.try_send(Slow::NeedSession(peer.id, icmp));
                                }
                            }
                            continue;
                        }
                    }
                    peer.rx_bytes.fetch_add(plain as u64, Ordering::Relaxed);
                    peer.rx_packets.fetch_add(1, Ordering::Relaxed);
                    received.add(plain, via == Path::Relay);
                    o.truncate(DATA_HEADER_LEN + plain);
                    k += 1;
                }
            }
        }
        let t = &inner.totals;
        received.flush(&t.rx_bytes, &t.rx_packets, &t.rx_relayed_bytes);
        if k > 0 {
            if let Some(tun) = inner.tun.get() {
                if let Err(e) = tun.send_batch(&mut out[..k]).await {
                    tracing::debug!("TUN write: {e}");
                }
            }
        }
    }
}

/// One batch's inner traffic in one direction, counted in plain integers
/// and added to the node's totals once per batch.
#[derive(Default)]
struct BatchCount {
    bytes: u64,
    packets: u64,
    relayed_bytes: u64,
}

impl BatchCount {
    fn add(&mut self, len: usize, relayed: bool) {
        self.bytes += len as u64;
        self.packets += 1;
        if relayed {
            self.relayed_bytes += len as u64;
        }
    }

    fn flush(&self, bytes: &AtomicU64, packets: &AtomicU64, relayed: &AtomicU64) {
        if self.packets > 0 {
            bytes.fetch_add(self.bytes, Ordering::Relaxed);
            packets.fetch_add(self.packets, Ordering::Relaxed);
            relayed.fetch_add(self.relayed_bytes, Ordering::Relaxed);
        }
    }
}

/// Passes a filter decision worth an audit entry to the control task.
#[inline]
fn note<T: Tun>(shared: &Shared<T>, peer: &PeerData, noted: Option<Noted>) {
    if let Some(n) = noted {
        let _ = shared.slow_tx.try_send(Slow::Noted(peer.id, n));
    }
}

/// The wall clock in unix seconds, read at most once per batch and only
/// if a filtered peer needs it.
#[derive(Default)]
struct UnixClock(std::cell::Cell<Option<u64>>);

impl UnixClock {
    fn get(&self) -> u64 {
        if let Some(t) = self.0.get() {
            return t;
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.set(Some(t));
        t
    }
}

/// Tells the control task that data moved for `peer`, if it asked to hear
/// of it (one relaxed load in the common case).
#[inline]
fn wake<T: Tun>(shared: &Shared<T>, peer: &PeerData) {
    if peer.wake.load(Ordering::Relaxed) && peer.wake.swap(false, Ordering::Relaxed) {
        let _ = shared.slow_tx.try_send(Slow::Wake(peer.id));
    }
}
