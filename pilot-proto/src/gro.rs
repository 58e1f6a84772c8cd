//! Receive coalescing (GRO) of TCP segments for a TUN device with virtio-net
//! headers (`IFF_VNET_HDR`), planned without I/O.
//!
//! A receive batch is mostly consecutive segments of a few TCP streams.
//! Handing the kernel one super-packet per run of segments (a virtio-net
//! header with GSO type TCPV4/TCPV6 and the segment size) instead of one
//! write per segment saves most of its TCP stack's per-packet work.
//! [`Plan::build`] groups a batch's TCP packets into runs, in order;
//! [`Plan::finish`] writes each run's virtio-net header and rewrites its
//! first packet's headers into the super-packet's; [`Plan::parts`] gives
//! the slices one gathered write (`writev`) hands the device: the header
//! and the first packet, then only the payload of each further segment, so
//! no payload is copied in user space.
//!
//! A segment joins a run under the rules of the kernel's own TCP GRO
//! (`tcp_gro_receive`): same addresses and ports; same TOS (traffic
//! class), TTL (hop limit) and DF bit; no IPv4 options or IPv6 extension
//! headers, no fragment; flags ACK or ACK+PSH only; the same
//! acknowledgement number, window and TCP options as the run's first
//! segment; the next sequence number; no longer than the first segment. A
//! shorter segment or one with PSH ends its run; so does any other TCP
//! packet of the flow (a SYN, FIN, RST or bare ACK goes alone, after it).
//!
//! Checksums of the members are not verified: every byte was just
//! authenticated by the session's AEAD tag, so it is what the peer's
//! kernel handed the peer's daemon (the Linux WireGuard driver marks
//! decrypted packets `CHECKSUM_UNNECESSARY` on the same ground). A
//! super-packet goes with `NEEDS_CSUM` and the pseudo-header sum in its
//! checksum field, as a sending stack would hand it to a NIC; a packet
//! alone goes with an empty header and its own checksum, which the kernel
//! checks as before.
//!
//! Packets that are not TCP are left to the caller ([`Plan::others`]).

/// Length of the virtio-net header before each packet (`struct
/// virtio_net_hdr`, no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
const GSO_TCPV6: u8 = 4;
/// Most segments in one run (the kernel's GRO stops at 64 too).
pub const MAX_SEGMENTS: u16 = 64;
/// Most runs kept open at once; the oldest is ended for a new flow.
const MAX_OPEN: usize = 8;
/// Sentinel of the member chain.
const END: u32 = u32::MAX;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const PROTO_TCP: u8 = 6;

/// What a TCP packet's headers say, as far as coalescing cares.
#[derive(Clone, Copy, Debug)]
struct Seg {
    v6: bool,
    /// IP header length (20 or 40).
    iph: u8,
    /// TCP header length (20..=60).
    tcph: u8,
    /// Payload bytes.
    payload: u16,
    seq: u32,
    psh: bool,
    /// ACK or ACK+PSH with a payload, no IP options, not a fragment.
    joinable: bool,
}

/// Reads a TCP packet's headers; `None` if it is not a well-formed TCP
/// packet (those go to [`Plan::others`]).
fn parse(pkt: &[u8]) -> Option<Seg> {
    let (v6, iph, l4_len, ip_ok) = match pkt.first()? >> 4 {
        4 => {
            if pkt.len() < 20 || pkt[9] != PROTO_TCP {
                return None;
            }
            let iph = usize::from(pkt[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            if iph < 20 || total != pkt.len() || total < iph {
                return None;
            }
            // No options, not a fragment (MF clear, offset zero).
            let plain = iph == 20 && pkt[6] & 0x3f == 0 && pkt[7] == 0;
            (false, iph, total - iph, plain)
        }
        6 => {
            if pkt.len() < 40 || pkt[6] != PROTO_TCP {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            if plen != pkt.len() - 40 {
                return None;
            }
            (true, 40, plen, true)
        }
        _ => return None,
    };
    if l4_len < 20 {
        return None;
    }
    let tcp = &pkt[iph..];
    let tcph = usize::from(tcp[12] >> 4) * 4;
    if tcph < 20 || tcph > l4_len {
        return None;
    }
    let flags = tcp[13];
    let payload = l4_len - tcph;
    let joinable = ip_ok && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) && payload > 0;
    Some(Seg {
        v6,
        iph: iph as u8,
        tcph: tcph as u8,
        payload: payload as u16,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        psh: flags & TCP_PSH != 0,
        joinable,
    })
}

/// The bytes naming a packet's flow: addresses and ports.
fn flow_key<'a>(pkt: &'a [u8], s: &Seg) -> (&'a [u8], &'a [u8]) {
    let addrs = if s.v6 { &pkt[8..40] } else { &pkt[12..20] };
    let i = usize::from(s.iph);
    (addrs, &pkt[i..i + 4])
}

/// True if `b` may follow the run headed by `a` as far as their headers go
/// (the sequence number and the run's state are checked by the caller).
fn same_headers(a: &[u8], sa: &Seg, b: &[u8], sb: &Seg) -> bool {
    if sa.v6 != sb.v6 || sa.tcph != sb.tcph || sa.iph != sb.iph {
        return false;
    }
    let ip = if sa.v6 {
        // Version and traffic class, hop limit.
        a[0] == b[0] && a[1] >> 4 == b[1] >> 4 && a[7] == b[7]
    } else {
        // TOS, DF (and the reserved bit), TTL.
        a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8] == b[8]
    };
    let (ta, tb) = (&a[usize::from(sa.iph)..], &b[usize::from(sb.iph)..]);
    let tcph = usize::from(sa.tcph);
    // Acknowledgement number; data offset and window (the flags differ at
    // most in PSH, which `joinable` allowed); the options.
    ip && ta[8..12] == tb[8..12]
        && ta[12] == tb[12]
        && ta[14..16] == tb[14..16]
        && ta[20..tcph] == tb[20..tcph]
}

/// One run being built.
#[derive(Clone, Copy, Debug)]
struct RunState {
    first: u32,
    last: u32,
    count: u16,
    seg: Seg,
    /// Payload bytes of all members.
    payload: u32,
    next_seq: u32,
    /// True once nothing may join (PSH, a short segment, full).
    closed: bool,
    /// PSH seen on the last member.
    psh: bool,
}

/// One write to the device: a TCP packet alone or a run of segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Index of its first packet in the batch.
    pub first: usize,
    /// Number of packets in it.
    pub count: usize,
    /// IP and TCP header bytes of each of its packets.
    pub headers: usize,
}

/// The runs of one batch, rebuilt by each [`Plan::build`] with the same
/// allocations.
#[derive(Debug, Default)]
pub struct Plan {
    runs: Vec<RunState>,
    /// The next member of each packet's run, by batch index.
    next: Vec<u32>,
    /// Indexes (into `runs`) of the runs still open, oldest first.
    open: Vec<usize>,
    others: Vec<usize>,
}

impl Plan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Groups the TCP packets `bufs[i][offset..]` into runs; the rest go to
    /// [`Plan::others`]. Reads only.
    pub fn build<B: AsRef<[u8]>>(&mut self, bufs: &[B], offset: usize) {
        self.runs.clear();
        self.open.clear();
        self.others.clear();
        self.next.clear();
        self.next.resize(bufs.len(), END);
        for (i, b) in bufs.iter().enumerate() {
            let pkt = b.as_ref().get(offset..).unwrap_or(&[]);
            let Some(seg) = parse(pkt) else {
                self.others.push(i);
                continue;
            };
            let key = flow_key(pkt, &seg);
            // The open run of this flow, if any.
            let found = self.open.iter().position(|&r| {
                let run = &self.runs[r];
                let head = &bufs[run.first as usize].as_ref()[offset..];
                run.seg.v6 == seg.v6 && flow_key(head, &run.seg) == key
            });
            if let Some(o) = found {
                let r = self.open[o];
                if seg.joinable && self.may_join(r, bufs, offset, pkt, &seg) {
                    self.join(r, i, &seg);
                    if self.runs[r].closed {
                        self.open.remove(o);
                    }
                    continue;
                }
                // Anything else of the flow ends its run and goes after it.
                self.open.remove(o);
            }
            let r = self.runs.len();
            self.runs.push(RunState {
                first: i as u32,
                last: i as u32,
                count: 1,
                seg,
                payload: u32::from(seg.payload),
                next_seq: seg.seq.wrapping_add(u32::from(seg.payload)),
                closed: !seg.joinable || seg.psh,
                psh: seg.psh,
            });
            if !self.runs[r].closed {
                if self.open.len() == MAX_OPEN {
                    self.open.remove(0);
                }
                self.open.push(r);
            }
        }
    }

    fn may_join<B: AsRef<[u8]>>(
        &self,
        r: usize,
        bufs: &[B],
        offset: usize,
        pkt: &[u8],
        seg: &Seg,
    ) -> bool {
        let run = &self.runs[r];
        let head = &bufs[run.first as usize].as_ref()[offset..];
        let headers = usize::from(run.seg.iph) + usize::from(run.seg.tcph);
        // The super-packet's IP length field must hold it (IPv6: the
        // payload length, which leaves the IP header out).
        let room = if run.seg.v6 { 65_535 + 40 } else { 65_535 };
        !run.closed
            && seg.seq == run.next_seq
            && seg.payload <= run.seg.payload
            && headers + run.payload as usize + usize::from(seg.payload) <= room
            && same_headers(head, &run.seg, pkt, seg)
    }

    fn join(&mut self, r: usize, i: usize, seg: &Seg) {
        let run = &mut self.runs[r];
        self.next[run.last as usize] = i as u32;
        run.last = i as u32;
        run.count += 1;
        run.payload += u32::from(seg.payload);
        run.next_seq = run.next_seq.wrapping_add(u32::from(seg.payload));
        run.psh = seg.psh;
        run.closed = seg.psh || seg.payload < run.seg.payload || run.count >= MAX_SEGMENTS;
    }

    /// The runs, in the order their first packets arrived.
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.runs.iter().map(|r| Run {
            first: r.first as usize,
            count: usize::from(r.count),
            headers: usize::from(r.seg.iph) + usize::from(r.seg.tcph),
        })
    }

    /// The packets that are not TCP, in order.
    pub fn others(&self) -> &[usize] {
        &self.others
    }

    /// Writes each run's virtio-net header into the `VNET_HDR_LEN` bytes
    /// before its first packet and, for a run of several, rewrites that
    /// packet's headers into the super-packet's (lengths, IPv4 header
    /// checksum, PSH of the last member, the pseudo-header sum in the TCP
    /// checksum). `offset` must be at least `VNET_HDR_LEN`, as in `build`.
    pub fn finish<B: AsMut<[u8]>>(&self, bufs: &mut [B], offset: usize) {
        for run in &self.runs {
            let buf = bufs[run.first as usize].as_mut();
            let (hdr, pkt) = buf[offset - VNET_HDR_LEN..].split_at_mut(VNET_HDR_LEN);
            hdr.fill(0);
            if run.count == 1 {
                continue;
            }
            let s = run.seg;
            let (iph, tcph) = (usize::from(s.iph), usize::from(s.tcph));
            let l4_len = tcph + run.payload as usize;
            // Fits by `may_join`.
            let l4 = l4_len as u16;
            let sum = if s.v6 {
                pkt[4..6].copy_from_slice(&l4.to_be_bytes());
                pseudo_sum(&pkt[8..40], l4)
            } else {
                pkt[2..4].copy_from_slice(&((iph + l4_len) as u16).to_be_bytes());
                pkt[10..12].fill(0);
                let c = crate::packet::checksum(&pkt[..iph]);
                pkt[10..12].copy_from_slice(&c.to_be_bytes());
                pseudo_sum(&pkt[12..20], l4)
            };
            let tcp = &mut pkt[iph..];
            if run.psh {
                tcp[13] |= TCP_PSH;
            }
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let gso_type = if s.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            // struct virtio_net_hdr, in the host's byte order (the device
            // is not switched to little-endian headers; both are x86 here).
            hdr[0] = F_NEEDS_CSUM;
            hdr[1] = gso_type;
            hdr[2..4].copy_from_slice(&((iph + tcph) as u16).to_ne_bytes());
            hdr[4..6].copy_from_slice(&s.payload.to_ne_bytes());
            hdr[6..8].copy_from_slice(&(iph as u16).to_ne_bytes());
            hdr[8..10].copy_from_slice(&16u16.to_ne_bytes());
        }
    }

    /// The slices of `run`'s write, in order: the virtio-net header with the
    /// first packet, then each further member's payload. Call after
    /// [`Plan::finish`].
    pub fn parts<'a, B: AsRef<[u8]>>(
        &'a self,
        run: Run,
        bufs: &'a [B],
        offset: usize,
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let headers = run.headers;
        let mut at = self.next.get(run.first).copied().unwrap_or(END);
        let first = std::iter::once(&bufs[run.first].as_ref()[offset - VNET_HDR_LEN..]);
        first.chain(std::iter::from_fn(move || {
            if at == END {
                return None;
            }
            let i = at as usize;
            at = self.next[i];
            Some(&bufs[i].as_ref()[offset + headers..])
        }))
    }
}

/// The TCP pseudo-header sum (addresses, protocol, `l4_len`), folded and
/// not complemented: what a stack leaves in the checksum field for the
/// device to finish.
fn pseudo_sum(addrs: &[u8], l4_len: u16) -> u16 {
    let mut sum: u32 = u32::from(PROTO_TCP) + u32::from(l4_len);
    for c in addrs.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum;

    const OFF: usize = 16;

    /// Ones' complement sum, folded, not complemented.
    fn sum16(data: &[u8], mut sum: u32) -> u32 {
        let mut c = data.chunks_exact(2);
        for w in &mut c {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = c.remainder() {
            sum += u32::from(*last) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    /// Sets the TCP checksum of an IPv4 or IPv6 packet.
    fn tcp_checksum(pkt: &mut [u8]) {
        let (addrs, iph) = if pkt[0] >> 4 == 6 {
            (8..40, 40)
        } else {
            (12..20, 20)
        };
        let l4 = (pkt.len() - iph) as u32;
        pkt[iph + 16..iph + 18].fill(0);
        let s = sum16(&pkt[addrs], 6 + l4);
        let s = sum16(&pkt[iph..], s);
        pkt[iph + 16..iph + 18].copy_from_slice(&(!(s as u16)).to_be_bytes());
    }

    fn tcp_checksum_ok(pkt: &[u8]) -> bool {
        let (addrs, iph) = if pkt[0] >> 4 == 6 {
            (8..40, 40)
        } else {
            (12..20, 20)
        };
        let s = sum16(&pkt[addrs], 6 + (pkt.len() - iph) as u32);
        sum16(&pkt[iph..], s) == 0xffff
    }

    #[derive(Clone)]
    struct Tcp {
        v6: bool,
        src: u8,
        sport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        ttl: u8,
        tos: u8,
        id: u16,
        opts: Vec<u8>,
        payload: Vec<u8>,
    }

    fn seg(seq: u32, len: usize) -> Tcp {
        Tcp {
            v6: false,
            src: 1,
            sport: 40000,
            seq,
            ack: 777,
            flags: TCP_ACK,
            window: 512,
            ttl: 64,
            tos: 0,
            id: seq as u16,
            // NOP NOP timestamps, as Linux sends them.
            opts: vec![1, 1, 8, 10, 0, 0, 1, 2, 0, 0, 3, 4],
            payload: (0..len).map(|i| (seq as usize + i) as u8).collect(),
        }
    }

    /// The packet behind `OFF` bytes of room, checksums set.
    fn build(t: &Tcp) -> Vec<u8> {
        let tcph = 20 + t.opts.len();
        let mut tcp = vec![0u8; tcph];
        tcp[0..2].copy_from_slice(&t.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&t.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&t.ack.to_be_bytes());
        tcp[12] = ((tcph / 4) as u8) << 4;
        tcp[13] = t.flags;
        tcp[14..16].copy_from_slice(&t.window.to_be_bytes());
        tcp[20..].copy_from_slice(&t.opts);
        let mut pkt = if t.v6 {
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60 | (t.tos >> 4);
            ip[1] = t.tos << 4;
            ip[4..6].copy_from_slice(&((tcph + t.payload.len()) as u16).to_be_bytes());
            ip[6] = PROTO_TCP;
            ip[7] = t.ttl;
            ip[8] = 0xfd;
            ip[23] = t.src;
            ip[24] = 0xfd;
            ip[39] = 2;
            ip
        } else {
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[1] = t.tos;
            ip[2..4].copy_from_slice(&((20 + tcph + t.payload.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&t.id.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = t.ttl;
            ip[9] = PROTO_TCP;
            ip[12..16].copy_from_slice(&[10, 77, 0, t.src]);
            ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip
        };
        pkt.extend_from_slice(&tcp);
        pkt.extend_from_slice(&t.payload);
        tcp_checksum(&mut pkt);
        let mut buf = vec![0xaa; OFF];
        buf.extend_from_slice(&pkt);
        buf
    }

    /// Plans, finishes and returns, for each run, what the device gets.
    fn writes(bufs: &mut [Vec<u8>]) -> (Vec<(Run, Vec<u8>)>, Vec<usize>) {
        let mut plan = Plan::new();
        plan.build(bufs, OFF);
        plan.finish(bufs, OFF);
        let runs: Vec<Run> = plan.runs().collect();
        let out = runs
            .iter()
            .map(|&r| (r, plan.parts(r, bufs, OFF).flatten().copied().collect()))
            .collect();
        (out, plan.others().to_vec())
    }

    /// What the kernel's segmentation makes of one write: the packets
    /// (IPv4 IDs counted up from the first's, PSH on the last only,
    /// checksums computed).
    fn segment(write: &[u8]) -> Vec<Vec<u8>> {
        let (hdr, pkt) = write.split_at(VNET_HDR_LEN);
        if hdr[1] == 0 {
            assert_eq!(
                hdr, &[0; VNET_HDR_LEN],
                "a packet alone has an empty header"
            );
            return vec![pkt.to_vec()];
        }
        assert_eq!(hdr[0], F_NEEDS_CSUM);
        let hdr_len = usize::from(u16::from_ne_bytes([hdr[2], hdr[3]]));
        let gso = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
        let iph = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
        assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), 16);
        let v6 = pkt[0] >> 4 == 6;
        assert_eq!(hdr[1], if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        // The super-packet's own headers are consistent.
        if v6 {
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
                pkt.len() - 40
            );
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            assert_eq!(checksum(&pkt[..iph]), 0, "IPv4 header checksum");
        }
        // What the device would compute from the pseudo-header sum left
        // in the field: a valid checksum of the whole super-packet.
        let mut whole = pkt.to_vec();
        let s = sum16(&whole[iph..], 0);
        whole[iph + 16..iph + 18].copy_from_slice(&(!(s as u16)).to_be_bytes());
        assert!(
            tcp_checksum_ok(&whole),
            "pseudo-header sum left for the device"
        );
        let (head, data) = pkt.split_at(hdr_len);
        let seq0 = u32::from_be_bytes(head[iph + 4..iph + 8].try_into().unwrap());
        let id0 = u16::from_be_bytes([head[4], head[5]]);
        let chunks: Vec<&[u8]> = data.chunks(gso).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(k, chunk)| {
                let mut p = head.to_vec();
                p.extend_from_slice(chunk);
                let seq = seq0.wrapping_add((k * gso) as u32);
                p[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
                if k + 1 < chunks.len() {
                    p[iph + 13] &= !TCP_PSH;
                }
                if v6 {
                    let l = (p.len() - 40) as u16;
                    p[4..6].copy_from_slice(&l.to_be_bytes());
                } else {
                    let l = p.len() as u16;
                    p[2..4].copy_from_slice(&l.to_be_bytes());
                    p[4..6].copy_from_slice(&id0.wrapping_add(k as u16).to_be_bytes());
                    p[10..12].fill(0);
                    let c = checksum(&p[..20]);
                    p[10..12].copy_from_slice(&c.to_be_bytes());
                }
                tcp_checksum(&mut p);
                p
            })
            .collect()
    }

    fn counts(writes: &[(Run, Vec<u8>)]) -> Vec<usize> {
        writes.iter().map(|(r, _)| r.count).collect()
    }

    /// Every packet comes out exactly once, each flow in its order.
    fn round_trip(segs: &[Tcp]) -> Vec<usize> {
        let originals: Vec<Vec<u8>> = segs.iter().map(|t| build(t)[OFF..].to_vec()).collect();
        let mut bufs: Vec<Vec<u8>> = segs.iter().map(build).collect();
        let (w, others) = writes(&mut bufs);
        assert!(others.is_empty());
        let mut got: Vec<Vec<u8>> = w.iter().flat_map(|(_, b)| segment(b)).collect();
        let mut want = originals.clone();
        // Per flow, the order must hold; across flows it may change.
        let flow = |p: &Vec<u8>| (p[0] >> 4, if p[0] >> 4 == 6 { p[23] } else { p[15] });
        got.sort_by_key(flow);
        want.sort_by_key(flow);
        // The kernel numbers the IPv4 IDs of the segments it cuts from the
        // first's (with DF set they mean nothing); compare all else.
        for p in got.iter_mut().chain(want.iter_mut()) {
            if p[0] >> 4 == 4 {
                p[4..6].fill(0);
                p[10..12].fill(0);
            }
        }
        assert_eq!(got, want);
        counts(&w)
    }

    #[test]
    fn a_run_of_segments_becomes_one_write_that_segments_back_exactly() {
        let mss = 1388;
        let mut segs: Vec<Tcp> = (0..10).map(|k| seg(1000 + k * mss as u32, mss)).collect();
        segs[9].flags |= TCP_PSH;
        segs[9].payload.truncate(500);
        assert_eq!(round_trip(&segs), vec![10]);
        // Only the first packet and payloads are handed over.
        let mut bufs: Vec<Vec<u8>> = segs.iter().map(build).collect();
        let (w, _) = writes(&mut bufs);
        assert_eq!(w[0].1.len(), VNET_HDR_LEN + 20 + 32 + 9 * mss + 500);
        assert_eq!(w[0].1[VNET_HDR_LEN + 20 + 13], TCP_ACK | TCP_PSH);
    }

    #[test]
    fn ipv6_segments_coalesce_too() {
        let segs: Vec<Tcp> = (0..5)
            .map(|k| Tcp {
                v6: true,
                ..seg(50 + k * 1200, 1200)
            })
            .collect();
        assert_eq!(round_trip(&segs), vec![5]);
    }

    #[test]
    fn a_single_packet_goes_alone_with_its_own_checksum() {
        let mut bufs = vec![build(&seg(1, 100))];
        let before = bufs[0][OFF..].to_vec();
        let (w, _) = writes(&mut bufs);
        assert_eq!(counts(&w), vec![1]);
        assert_eq!(&w[0].1[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&w[0].1[VNET_HDR_LEN..], &before[..]);
    }

    #[test]
    fn a_gap_or_a_repeat_starts_a_new_run() {
        // 0, 1, (2 lost), 3, 4, then 4 again.
        let s = |k: u32| seg(k * 100, 100);
        assert_eq!(round_trip(&[s(0), s(1), s(3), s(4)]), vec![2, 2]);
        let originals = [s(0), s(1), s(1)];
        let mut bufs: Vec<Vec<u8>> = originals.iter().map(build).collect();
        let (w, _) = writes(&mut bufs);
        assert_eq!(counts(&w), vec![2, 1]);
    }

    #[test]
    fn interleaved_flows_each_get_their_run() {
        let a = |k: u32| seg(k * 100, 100);
        let b = |k: u32| Tcp {
            src: 9,
            ..seg(5000 + k * 100, 100)
        };
        assert_eq!(round_trip(&[a(0), b(0), a(1), b(1), a(2)]), vec![3, 2]);
    }

    #[test]
    fn segments_with_different_headers_do_not_join() {
        let base = |k: u32| seg(k * 100, 100);
        let variants: Vec<(&str, Tcp)> = vec![
            (
                "ack",
                Tcp {
                    ack: 778,
                    ..base(1)
                },
            ),
            (
                "window",
                Tcp {
                    window: 513,
                    ..base(1)
                },
            ),
            ("ttl", Tcp { ttl: 63, ..base(1) }),
            ("tos", Tcp { tos: 3, ..base(1) }),
            (
                "options",
                Tcp {
                    opts: vec![1, 1, 8, 10, 0, 0, 1, 3, 0, 0, 3, 4],
                    ..base(1)
                },
            ),
            (
                "no options",
                Tcp {
                    opts: vec![],
                    ..base(1)
                },
            ),
            (
                "port",
                Tcp {
                    sport: 40001,
                    ..base(1)
                },
            ),
            ("source", Tcp { src: 3, ..base(1) }),
            (
                "FIN",
                Tcp {
                    flags: TCP_ACK | 1,
                    ..base(1)
                },
            ),
            (
                "URG",
                Tcp {
                    flags: TCP_ACK | 0x20,
                    ..base(1)
                },
            ),
            (
                "CWR",
                Tcp {
                    flags: TCP_ACK | 0x80,
                    ..base(1)
                },
            ),
            ("longer", seg(100, 101)),
        ];
        for (what, t) in variants {
            let mut bufs = vec![build(&base(0)), build(&t)];
            let (w, _) = writes(&mut bufs);
            assert_eq!(counts(&w), vec![1, 1], "{what}");
        }
    }

    #[test]
    fn push_or_a_short_segment_ends_the_run() {
        let s = |k: u32| seg(k * 100, 100);
        let psh = Tcp {
            flags: TCP_ACK | TCP_PSH,
            ..s(1)
        };
        assert_eq!(round_trip(&[s(0), psh, s(2), s(3)]), vec![2, 2]);
        let short = seg(100, 40);
        assert_eq!(round_trip(&[s(0), short, seg(140, 100)]), vec![2, 1]);
    }

    #[test]
    fn other_tcp_packets_of_the_flow_end_its_run_and_go_after_it() {
        let s = |k: u32| seg(k * 100, 100);
        let bare_ack = Tcp {
            payload: vec![],
            ..s(2)
        };
        let mut bufs: Vec<Vec<u8>> = [s(0), s(1), bare_ack, s(2)].iter().map(build).collect();
        let (w, _) = writes(&mut bufs);
        assert_eq!(counts(&w), vec![2, 1, 1]);
        assert_eq!(
            w.iter().map(|(r, _)| r.first).collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
        // A SYN alone.
        let syn = Tcp {
            flags: 2,
            payload: vec![],
            opts: vec![],
            ..s(0)
        };
        let mut bufs = vec![build(&syn)];
        let (w, _) = writes(&mut bufs);
        assert_eq!(counts(&w), vec![1]);
    }

    #[test]
    fn runs_stop_at_64_segments_and_at_the_ip_length_limit() {
        let segs: Vec<Tcp> = (0..70).map(|k| seg(k * 10, 10)).collect();
        assert_eq!(round_trip(&segs), vec![64, 6]);
        // 1400-byte segments: 46 fit in 65,535 bytes with 52 of headers.
        let segs: Vec<Tcp> = (0..50).map(|k| seg(k * 1400, 1400)).collect();
        assert_eq!(round_trip(&segs), vec![46, 4]);
    }

    #[test]
    fn packets_that_are_not_tcp_are_left_to_the_caller() {
        let mut udp = build(&seg(0, 30));
        udp[OFF + 9] = 17;
        let mut frag = build(&seg(0, 30));
        frag[OFF + 6] |= 0x20;
        let mut bufs = vec![
            vec![0; OFF],
            vec![0; OFF + 1],
            udp,
            build(&seg(0, 30)),
            vec![0; OFF + 40],
            frag,
        ];
        let mut plan = Plan::new();
        plan.build(&bufs, OFF);
        plan.finish(&mut bufs, OFF);
        assert_eq!(plan.others(), &[0, 1, 2, 4]);
        // The fragment is TCP but goes alone.
        assert_eq!(
            plan.runs().map(|r| (r.first, r.count)).collect::<Vec<_>>(),
            vec![(3, 1), (5, 1)]
        );
    }

    #[test]
    fn any_bytes_are_planned_without_panic_and_each_packet_written_once() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut plan = Plan::new();
        for _ in 0..2000 {
            let n = (rnd() % 12) as usize;
            let mut bufs: Vec<Vec<u8>> = (0..n)
                .map(|k| {
                    // Mostly plausible TCP with damaged bytes, sometimes noise.
                    let mut b = build(&seg((k as u32) * 50, (rnd() % 60) as usize));
                    for _ in 0..(rnd() % 4) {
                        let at = OFF + (rnd() as usize) % (b.len() - OFF);
                        b[at] = rnd() as u8;
                    }
                    if rnd() % 5 == 0 {
                        b.truncate(OFF + (rnd() as usize) % (b.len() - OFF));
                    }
                    b
                })
                .collect();
            plan.build(&bufs, OFF);
            plan.finish(&mut bufs, OFF);
            let mut seen = vec![0; n];
            for &i in plan.others() {
                seen[i] += 1;
            }
            for r in plan.runs().collect::<Vec<_>>() {
                let parts: Vec<&[u8]> = plan.parts(r, &bufs, OFF).collect();
                assert_eq!(parts.len(), r.count);
                seen[r.first] += 1;
            }
            let members: usize = plan.runs().map(|r| r.count - 1).sum();
            assert_eq!(seen.iter().filter(|&&c| c == 1).count() + members, n);
        }
    }
}
