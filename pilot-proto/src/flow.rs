//! Which packets answer something already let through: a bounded table of
//! open flows, so that replies to a connection pass whatever the grants say
//! (a grant only limits what a side may *open*), ICMP errors about an open
//! flow pass, and later fragments follow their first fragment. Also the
//! facts of an IPv4 or IPv6 packet those checks need, read straight from
//! the bytes (IPv6 behind its extension headers, ICMPv6 like ICMP).
//!
//! How the data plane uses it, per direction, for a decrypted inbound packet
//! or an outbound packet from the TUN:
//! 1. [`inspect`] the packet;
//! 2. a [`Kind::Opener`] passes if [`FlowTable::is_reply`], else if the
//!    grant allows its [`Traffic`] (then [`FlowTable::note_opened`]); a
//!    first fragment's verdict goes to [`FragmentTable::note`];
//! 3. a [`Kind::QueryReply`] passes only if [`FlowTable::is_reply`];
//! 4. a [`Kind::Error`] passes if [`FlowTable::relates_to`] its quoted flow;
//! 5. a [`Kind::LaterFragment`] passes if [`FragmentTable::passed`].
//!
//! Both tables are bounded and never allocate after creation: each keeps two
//! generations of a fixed size; when the newer one fills, the older one is
//! dropped (counting the live flows lost) and the newer takes its place, and
//! a hit in the older one moves the entry forward. Flows in use therefore
//! survive a flood of new ones up to one generation's size. Time is an
//! argument, on the monotonic clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::ipv6;
use crate::ports::Traffic;

/// How long an idle TCP flow stays open: RFC 5382 asks NATs for at least
/// 2 h 4 min, so an idle ssh session with default keepalives survives.
pub const TCP_IDLE: Duration = Duration::from_secs(7440);
/// How long an idle UDP flow stays open (RFC 4787 asks for at least 2 min;
/// conntrack's stream timeout).
pub const UDP_IDLE: Duration = Duration::from_secs(180);
/// How long an idle flow of any other protocol (ICMP queries) stays open.
pub const OTHER_IDLE: Duration = Duration::from_secs(60);
/// How long a first fragment's verdict waits for the later ones (the
/// kernel's reassembly timeout).
pub const FRAGMENT_IDLE: Duration = Duration::from_secs(30);

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A flow as one packet shows it: protocol, addresses and ports (for ICMP
/// queries, the identifier stands in as the requester's port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

impl Flow {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    fn idle(&self) -> Duration {
        match self.proto {
            IPPROTO_TCP => TCP_IDLE,
            IPPROTO_UDP => UDP_IDLE,
            _ => OTHER_IDLE,
        }
    }
}

/// Names the fragments of one IPv4 or IPv6 datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (IPv6: the next header after the fragment
    /// header).
    pub proto: u8,
    /// Identification (16 bits in IPv4, 32 in IPv6's fragment header).
    pub id: u32,
}

/// What a packet is, for the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// May open a flow: passes as a reply, or if the grant allows this.
    Opener(Traffic),
    /// An ICMP query reply (echo reply and the like): passes only as a reply.
    QueryReply,
    /// An ICMP error about the quoted packet, whose flow (as that packet was
    /// sent) is given: passes if that flow is open.
    Error(Flow),
    /// A fragment after the first: no ports; passes if the first did.
    LaterFragment,
}

/// The facts of one IPv4 or IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspected {
    /// Its flow (ports zero for a later fragment).
    pub flow: Flow,
    /// What it is.
    pub kind: Kind,
    /// Set if the packet is a fragment (first or later).
    pub fragment: Option<FragmentKey>,
}

/// A packet the policy cannot read: it is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Neither an IPv4 nor an IPv6 packet.
    #[error("not an IP packet")]
    NotIp,
    /// Too short for the headers it claims (a first fragment too small to
    /// hold its ports, among others).
    #[error("packet too short for its headers")]
    Truncated,
    /// An ICMP error quoting another ICMP error, which no host sends.
    #[error("ICMP error about an ICMP error")]
    ErrorAboutError,
}

/// A checked IPv4 header: `ihl` bytes long, within `bytes`.
struct Ipv4<'a> {
    bytes: &'a [u8],
    ihl: usize,
}

impl<'a> Ipv4<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, InspectError> {
        let first = *bytes.first().ok_or(InspectError::NotIp)?;
        if first >> 4 != 4 {
            return Err(InspectError::NotIp);
        }
        let ihl = usize::from(first & 0x0f) * 4;
        if ihl < 20 || bytes.len() < ihl {
            return Err(InspectError::Truncated);
        }
        Ok(Ipv4 { bytes, ihl })
    }
    fn proto(&self) -> u8 {
        self.bytes[9]
    }
    fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[12],
            self.bytes[13],
            self.bytes[14],
            self.bytes[15],
        )
    }
    fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[16],
            self.bytes[17],
            self.bytes[18],
            self.bytes[19],
        )
    }
    fn id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[4], self.bytes[5]])
    }
    fn more_fragments(&self) -> bool {
        self.bytes[6] & 0x20 != 0
    }
    fn offset(&self) -> u16 {
        u16::from_be_bytes([self.bytes[6], self.bytes[7]]) & 0x1fff
    }
    fn payload(&self) -> &'a [u8] {
        &self.bytes[self.ihl..]
    }
    fn flow(&self, src_port: u16, dst_port: u16) -> Flow {
        Flow {
            proto: self.proto(),
            src: IpAddr::V4(self.src()),
            dst: IpAddr::V4(self.dst()),
            src_port,
            dst_port,
        }
    }
}

fn be16(b: &[u8], at: usize) -> Result<u16, InspectError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(InspectError::Truncated)
}

/// ICMP query requests: echo, timestamp, information, address mask.
fn icmp_request(t: u8) -> bool {
    matches!(t, 8 | 13 | 15 | 17)
}

/// Their replies.
fn icmp_reply(t: u8) -> bool {
    matches!(t, 0 | 14 | 16 | 18)
}

/// The flow of a packet's first (or only) fragment, and what it is.
/// `quoted` is set for the packet inside an ICMP error, which may not be an
/// error itself (RFC 1122 3.2.2: errors are never sent about errors), so the
/// recursion stops at one level.
fn transport(ip: &Ipv4<'_>, quoted: bool) -> Result<(Flow, Kind), InspectError> {
    let l4 = ip.payload();
    match ip.proto() {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (sp, dp) = (be16(l4, 0)?, be16(l4, 2)?);
            Ok((
                ip.flow(sp, dp),
                Kind::Opener(Traffic::from_ip(ip.proto(), dp)),
            ))
        }
        IPPROTO_ICMP => {
            let t = *l4.first().ok_or(InspectError::Truncated)?;
            if icmp_request(t) {
                Ok((ip.flow(be16(l4, 4)?, 0), Kind::Opener(Traffic::Icmp)))
            } else if icmp_reply(t) {
                Ok((ip.flow(0, be16(l4, 4)?), Kind::QueryReply))
            } else if matches!(t, 9 | 10) {
                // Router advertisement and solicitation: queries without
                // an identifier.
                Ok((ip.flow(0, 0), Kind::Opener(Traffic::Icmp)))
            } else if quoted {
                Err(InspectError::ErrorAboutError)
            } else {
                // An error: the quoted header starts after 8 bytes.
                let inner = Ipv4::new(l4.get(8..).ok_or(InspectError::Truncated)?)?;
                let (about, _) = transport(&inner, true)?;
                Ok((ip.flow(0, 0), Kind::Error(about)))
            }
        }
        p => Ok((ip.flow(0, 0), Kind::Opener(Traffic::Other(p)))),
    }
}

/// A checked IPv6 packet: its addresses and what follows the extension
/// headers.
struct Ipv6<'a> {
    bytes: &'a [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    upper: ipv6::Upper,
}

impl<'a> Ipv6<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, InspectError> {
        let (src, dst) = ipv6::addrs(bytes).ok_or(InspectError::Truncated)?;
        let upper = ipv6::upper(bytes).ok_or(InspectError::Truncated)?;
        Ok(Ipv6 {
            bytes,
            src,
            dst,
            upper,
        })
    }
    fn flow(&self, src_port: u16, dst_port: u16) -> Flow {
        Flow {
            proto: self.upper.proto,
            src: IpAddr::V6(self.src),
            dst: IpAddr::V6(self.dst),
            src_port,
            dst_port,
        }
    }
}

/// [`transport`] for IPv6: TCP and UDP alike; ICMPv6 echo request (128)
/// opens, echo reply (129) answers, the other informational types (130
/// and up: neighbour discovery, multicast listeners) open without an
/// identifier, and an error (below 128) is about its quoted packet.
fn transport6(ip: &Ipv6<'_>, quoted: bool) -> Result<(Flow, Kind), InspectError> {
    let l4 = ip.bytes.get(ip.upper.offset..).unwrap_or_default();
    match ip.upper.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (sp, dp) = (be16(l4, 0)?, be16(l4, 2)?);
            Ok((
                ip.flow(sp, dp),
                Kind::Opener(Traffic::from_ip(ip.upper.proto, dp)),
            ))
        }
        ipv6::IPPROTO_ICMPV6 => {
            let t = *l4.first().ok_or(InspectError::Truncated)?;
            match t {
                128 => Ok((ip.flow(be16(l4, 4)?, 0), Kind::Opener(Traffic::Icmp))),
                129 => Ok((ip.flow(0, be16(l4, 4)?), Kind::QueryReply)),
                130.. => Ok((ip.flow(0, 0), Kind::Opener(Traffic::Icmp))),
                _ if quoted => Err(InspectError::ErrorAboutError),
                _ => {
                    let inner = Ipv6::new(l4.get(8..).ok_or(InspectError::Truncated)?)?;
                    let (about, _) = transport6(&inner, true)?;
                    Ok((ip.flow(0, 0), Kind::Error(about)))
                }
            }
        }
        p => Ok((ip.flow(0, 0), Kind::Opener(Traffic::Other(p)))),
    }
}

/// Reads what the policy needs from an IPv6 packet.
fn inspect6(pkt: &[u8]) -> Result<Inspected, InspectError> {
    let ip = Ipv6::new(pkt)?;
    let fragment = ip.upper.fragment.map(|f| FragmentKey {
        src: IpAddr::V6(ip.src),
        dst: IpAddr::V6(ip.dst),
        proto: ip.upper.proto,
        id: f.id,
    });
    if ip.upper.fragment.is_some_and(|f| f.offset != 0) {
        return Ok(Inspected {
            flow: ip.flow(0, 0),
            kind: Kind::LaterFragment,
            fragment,
        });
    }
    let (flow, kind) = transport6(&ip, false)?;
    Ok(Inspected {
        flow,
        kind,
        fragment,
    })
}

/// Reads what the policy needs from an IPv4 or IPv6 packet. Never panics.
pub fn inspect(pkt: &[u8]) -> Result<Inspected, InspectError> {
    if pkt.first().is_some_and(|b| b >> 4 == 6) {
        return inspect6(pkt);
    }
    let ip = Ipv4::new(pkt)?;
    let fragment = (ip.more_fragments() || ip.offset() != 0).then(|| FragmentKey {
        src: IpAddr::V4(ip.src()),
        dst: IpAddr::V4(ip.dst()),
        proto: ip.proto(),
        id: u32::from(ip.id()),
    });
    if ip.offset() != 0 {
        return Ok(Inspected {
            flow: ip.flow(0, 0),
            kind: Kind::LaterFragment,
            fragment,
        });
    }
    let (flow, kind) = transport(&ip, false)?;
    Ok(Inspected {
        flow,
        kind,
        fragment,
    })
}

/// A bounded map with two generations (see the module comment), whose
/// entries end at a deadline.
#[derive(Debug)]
struct Recent<K, V> {
    active: HashMap<K, (Instant, V)>,
    previous: HashMap<K, (Instant, V)>,
    per_generation: usize,
    dropped: u64,
}

impl<K: Hash + Eq + Copy, V: Copy> Recent<K, V> {
    fn new(capacity: usize) -> Self {
        let per_generation = (capacity / 2).max(1);
        Recent {
            active: HashMap::with_capacity(per_generation),
            previous: HashMap::with_capacity(per_generation),
            per_generation,
            dropped: 0,
        }
    }

    fn insert(&mut self, key: K, value: V, deadline: Instant, now: Instant) {
        if let Some(e) = self.active.get_mut(&key) {
            *e = (deadline, value);
            return;
        }
        self.previous.remove(&key);
        if self.active.len() >= self.per_generation {
            self.dropped += self.previous.values().filter(|(d, _)| *d > now).count() as u64;
            std::mem::swap(&mut self.active, &mut self.previous);
            self.active.clear();
        }
        self.active.insert(key, (deadline, value));
    }

    /// The live value of `key`, with its deadline moved to `refresh` if
    /// given; a dead entry is removed.
    fn get(&mut self, key: &K, now: Instant, refresh: Option<Instant>) -> Option<V> {
        if let Some(e) = self.active.get_mut(key) {
            if e.0 <= now {
                self.active.remove(key);
                return None;
            }
            if let Some(d) = refresh {
                e.0 = d;
            }
            return Some(e.1);
        }
        let (deadline, value) = self.previous.remove(key)?;
        if deadline <= now {
            return None;
        }
        self.insert(*key, value, refresh.unwrap_or(deadline), now);
        Some(value)
    }

    fn len(&self) -> usize {
        self.active.len() + self.previous.len()
    }
}

/// The open flows of this node: bounded, allocation-free after creation.
#[derive(Debug)]
pub struct FlowTable {
    flows: Recent<Flow, ()>,
}

impl FlowTable {
    /// A table holding at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            flows: Recent::new(capacity),
        }
    }

    /// Records that a packet of `flow` was let through as an opener (or
    /// refreshes it): replies to it pass from now on.
    pub fn note_opened(&mut self, flow: Flow, now: Instant) {
        self.flows.insert(flow, (), now + flow.idle(), now);
    }

    /// True if `flow` answers an open flow (its reverse was noted and has
    /// not been idle too long); the open flow is kept alive.
    pub fn is_reply(&mut self, flow: &Flow, now: Instant) -> bool {
        let open = flow.reversed();
        self.flows
            .get(&open, now, Some(now + open.idle()))
            .is_some()
    }

    /// True if `quoted` (the packet an ICMP error is about, as it was sent)
    /// belongs to an open flow in either direction.
    pub fn relates_to(&mut self, quoted: &Flow, now: Instant) -> bool {
        self.flows.get(quoted, now, None).is_some()
            || self.flows.get(&quoted.reversed(), now, None).is_some()
    }

    /// Flows held now (live or not yet swept).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live flows dropped to make room, since creation.
    pub fn dropped(&self) -> u64 {
        self.flows.dropped
    }
}

/// The verdicts of first fragments, so the later ones follow them.
#[derive(Debug)]
pub struct FragmentTable {
    verdicts: Recent<FragmentKey, bool>,
}

impl FragmentTable {
    /// A table holding at most `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        FragmentTable {
            verdicts: Recent::new(capacity),
        }
    }

    /// Records whether a first fragment passed.
    pub fn note(&mut self, key: FragmentKey, passed: bool, now: Instant) {
        self.verdicts.insert(key, passed, now + FRAGMENT_IDLE, now);
    }

    /// True if the first fragment of `key` passed (a later fragment whose
    /// first was not seen is dropped).
    pub fn passed(&mut self, key: &FragmentKey, now: Instant) -> bool {
        self.verdicts.get(key, now, None).unwrap_or(false)
    }

    /// Live verdicts dropped to make room, since creation.
    pub fn dropped(&self) -> u64 {
        self.verdicts.dropped
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    /// An IPv4 packet; `frag` is (more fragments, offset in 8-byte units).
    /// (The filter's tests build theirs with it too.)
    pub(crate) fn ipv4(
        proto: u8,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        l4: &[u8],
        frag: (bool, u16),
    ) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        let f = (u16::from(frag.0) << 13) | frag.1;
        p[6..8].copy_from_slice(&f.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn ports(sp: u16, dp: u16) -> Vec<u8> {
        let mut l4 = sp.to_be_bytes().to_vec();
        l4.extend(dp.to_be_bytes());
        l4.extend([0u8; 16]);
        l4
    }

    fn icmp(t: u8, id: u16, quoted: &[u8]) -> Vec<u8> {
        let mut l4 = vec![t, 0, 0, 0];
        l4.extend(id.to_be_bytes());
        l4.extend([0, 1]);
        l4.extend_from_slice(quoted);
        l4
    }

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16) -> Flow {
        Flow {
            proto: 6,
            src: src.into(),
            dst: dst.into(),
            src_port: sp,
            dst_port: dp,
        }
    }

    #[test]
    fn inspects_openers_replies_errors_and_fragments() {
        let syn = ipv4(6, A, B, &ports(40000, 8080), (false, 0));
        let i = inspect(&syn).unwrap();
        assert_eq!(i.flow, tcp(A, B, 40000, 8080));
        assert_eq!(i.kind, Kind::Opener(Traffic::Tcp(8080)));
        assert_eq!(i.fragment, None);

        let dns = inspect(&ipv4(17, A, B, &ports(5353, 53), (false, 0))).unwrap();
        assert_eq!(dns.kind, Kind::Opener(Traffic::Udp(53)));

        let ping = inspect(&ipv4(1, A, B, &icmp(8, 77, &[]), (false, 0))).unwrap();
        assert_eq!(ping.kind, Kind::Opener(Traffic::Icmp));
        let pong = inspect(&ipv4(1, B, A, &icmp(0, 77, &[]), (false, 0))).unwrap();
        assert_eq!(pong.kind, Kind::QueryReply);
        assert_eq!(pong.flow.reversed(), ping.flow);

        let gre = inspect(&ipv4(47, A, B, &[0; 4], (false, 0))).unwrap();
        assert_eq!(gre.kind, Kind::Opener(Traffic::Other(47)));

        // Port unreachable from B about A's UDP packet.
        let quoted = ipv4(17, A, B, &ports(5353, 53), (false, 0));
        let err = ipv4(1, B, A, &icmp(3, 0, &quoted[..28]), (false, 0));
        let e = inspect(&err).unwrap();
        assert_eq!(e.kind, Kind::Error(dns.flow));

        let first = inspect(&ipv4(6, A, B, &ports(1, 22), (true, 0))).unwrap();
        assert_eq!(first.kind, Kind::Opener(Traffic::Tcp(22)));
        let key = first.fragment.unwrap();
        let later = inspect(&ipv4(6, A, B, &[9; 8], (false, 185))).unwrap();
        assert_eq!(later.kind, Kind::LaterFragment);
        assert_eq!(later.fragment, Some(key));
    }

    #[test]
    fn inspects_ipv6_like_ipv4() {
        use crate::ipv6::tests::ipv6;
        let (a, b): (Ipv6Addr, Ipv6Addr) = (
            "fd00::a4d:1".parse().unwrap(),
            "fd00::a4d:2".parse().unwrap(),
        );
        let syn = inspect(&ipv6(6, a, b, &ports(40000, 8080))).unwrap();
        assert_eq!(syn.kind, Kind::Opener(Traffic::Tcp(8080)));
        assert_eq!(
            (syn.flow.src, syn.flow.dst, syn.flow.src_port),
            (a.into(), b.into(), 40000)
        );
        assert_eq!(syn.fragment, None);
        let dns = inspect(&ipv6(17, a, b, &ports(5353, 53))).unwrap();
        assert_eq!(dns.kind, Kind::Opener(Traffic::Udp(53)));
        // ICMPv6 echo request and reply pair up like ICMP's.
        let ping = inspect(&ipv6(58, a, b, &icmp(128, 77, &[]))).unwrap();
        assert_eq!(ping.kind, Kind::Opener(Traffic::Icmp));
        let pong = inspect(&ipv6(58, b, a, &icmp(129, 77, &[]))).unwrap();
        assert_eq!(pong.kind, Kind::QueryReply);
        assert_eq!(pong.flow.reversed(), ping.flow);
        // An ICMPv6 error about A's UDP packet; an error about that error.
        let quoted = ipv6(17, a, b, &ports(5353, 53));
        let err = ipv6(58, b, a, &icmp(1, 0, &quoted[..48]));
        assert_eq!(inspect(&err).unwrap().kind, Kind::Error(dns.flow));
        let nested = ipv6(58, a, b, &icmp(1, 0, &err));
        assert_eq!(inspect(&nested), Err(InspectError::ErrorAboutError));
        // Behind a hop-by-hop header; a first and a later fragment.
        let mut l = vec![6, 0, 0, 0, 0, 0, 0, 0];
        l.extend(ports(1, 22));
        assert_eq!(
            inspect(&ipv6(0, a, b, &l)).unwrap().kind,
            Kind::Opener(Traffic::Tcp(22))
        );
        let mut l = vec![6, 0, 0, 1, 0, 0, 0, 5];
        l.extend(ports(1, 22));
        let first = inspect(&ipv6(44, a, b, &l)).unwrap();
        assert_eq!(first.kind, Kind::Opener(Traffic::Tcp(22)));
        let later = inspect(&ipv6(44, a, b, &[6, 0, 0, 0x10, 0, 0, 0, 5, 9, 9])).unwrap();
        assert_eq!(later.kind, Kind::LaterFragment);
        assert_eq!(later.fragment, first.fragment);
        assert!(first.fragment.is_some());
        // An IPv4 and an IPv6 flow on the same ports are different flows.
        let v4 = inspect(&ipv4(17, A, B, &ports(5353, 53), (false, 0))).unwrap();
        assert_ne!(v4.flow, dns.flow);
    }

    #[test]
    fn unreadable_packets_are_errors_not_panics() {
        assert_eq!(inspect(&[]), Err(InspectError::NotIp));
        // Neither version 4 nor 6; an IPv6 header cut short.
        assert_eq!(inspect(&[0x50; 40]), Err(InspectError::NotIp));
        assert_eq!(inspect(&[0x60; 39]), Err(InspectError::Truncated));
        assert_eq!(inspect(&[0x45; 19]), Err(InspectError::Truncated));
        let mut p = ipv4(6, A, B, &ports(1, 2), (false, 0));
        p[0] = 0x44; // IHL 16 bytes
        assert_eq!(inspect(&p), Err(InspectError::Truncated));
        // A first fragment too small to hold the ports.
        assert_eq!(
            inspect(&ipv4(6, A, B, &[0, 1, 2], (true, 0))),
            Err(InspectError::Truncated)
        );
        // An ICMP error quoting too little.
        assert_eq!(
            inspect(&ipv4(1, B, A, &icmp(3, 0, &[0x45; 10]), (false, 0))),
            Err(InspectError::Truncated)
        );
        assert_eq!(
            inspect(&ipv4(1, B, A, &[8, 0, 0], (false, 0))),
            Err(InspectError::Truncated)
        );
        // An error about an error.
        let quoted = ipv4(17, A, B, &ports(5353, 53), (false, 0));
        let err = ipv4(1, B, A, &icmp(3, 0, &quoted[..28]), (false, 0));
        let nested = ipv4(1, A, B, &icmp(11, 0, &err), (false, 0));
        assert_eq!(inspect(&nested), Err(InspectError::ErrorAboutError));
    }

    #[test]
    fn replies_pass_only_for_open_flows() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(64);
        let out = tcp(A, B, 40000, 22);
        assert!(!t.is_reply(&out.reversed(), t0));
        t.note_opened(out, t0);
        assert!(t.is_reply(&out.reversed(), t0));
        // The opener's own direction is not a "reply".
        assert!(!t.is_reply(&out, t0));
        // Another port of the same peer is not a reply.
        assert!(!t.is_reply(&tcp(B, A, 22, 40001), t0));
        assert!(!t.is_reply(&tcp(B, A, 23, 40000), t0));
        // A UDP flow on the same ports is another flow.
        assert!(!t.is_reply(
            &Flow {
                proto: 17,
                ..out.reversed()
            },
            t0
        ));
    }

    #[test]
    fn idle_flows_close_and_traffic_keeps_them_open() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(64);
        let udp = Flow {
            proto: 17,
            src: A.into(),
            dst: B.into(),
            src_port: 5353,
            dst_port: 53,
        };
        t.note_opened(udp, t0);
        // Replies keep it alive past the first timeout...
        let t1 = t0 + UDP_IDLE - Duration::from_secs(1);
        assert!(t.is_reply(&udp.reversed(), t1));
        let t2 = t1 + UDP_IDLE - Duration::from_secs(1);
        assert!(t.is_reply(&udp.reversed(), t2));
        // ...silence closes it.
        assert!(!t.is_reply(&udp.reversed(), t2 + UDP_IDLE));
        let tcp_flow = tcp(A, B, 1, 2);
        t.note_opened(tcp_flow, t0);
        assert!(t.is_reply(&tcp_flow.reversed(), t0 + Duration::from_secs(7000)));
        assert!(!t.is_reply(
            &tcp_flow.reversed(),
            t0 + Duration::from_secs(7000) + TCP_IDLE
        ));
    }

    #[test]
    fn icmp_errors_pass_for_open_flows_in_either_direction() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(64);
        let ours = tcp(A, B, 40000, 80);
        assert!(!t.relates_to(&ours, t0));
        t.note_opened(ours, t0);
        // An error about our packet, or about our peer's reply to it.
        assert!(t.relates_to(&ours, t0));
        assert!(t.relates_to(&ours.reversed(), t0));
        assert!(!t.relates_to(&tcp(A, B, 40000, 81), t0));
        assert!(!t.relates_to(&ours, t0 + TCP_IDLE));
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_it_drops() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(8);
        let flow = |i: u16| tcp(A, B, 1000 + i, 80);
        let busy = flow(0);
        t.note_opened(busy, t0);
        for i in 1..100 {
            t.note_opened(flow(i), t0);
            // A flow in use survives the flood.
            assert!(t.is_reply(&busy.reversed(), t0), "after {i}");
            assert!(t.len() <= 8);
        }
        assert!(t.dropped() > 0);
        assert!(
            !t.is_reply(&flow(1).reversed(), t0),
            "an idle old flow was evicted"
        );
        // Dead entries are not counted as dropped.
        let mut t = FlowTable::new(4);
        for i in 0..4 {
            t.note_opened(flow(i), t0);
        }
        for i in 4..8 {
            t.note_opened(flow(i), t0 + TCP_IDLE);
        }
        assert_eq!(t.dropped(), 0);
    }

    #[test]
    fn later_fragments_follow_the_first() {
        let t0 = Instant::now();
        let mut f = FragmentTable::new(16);
        let key = FragmentKey {
            src: A.into(),
            dst: B.into(),
            proto: 6,
            id: 7,
        };
        assert!(!f.passed(&key, t0), "unknown datagram: dropped");
        f.note(key, true, t0);
        assert!(f.passed(&key, t0));
        assert!(!f.passed(&key, t0 + FRAGMENT_IDLE));
        let denied = FragmentKey { id: 8, ..key };
        f.note(denied, false, t0);
        assert!(!f.passed(&denied, t0));
        assert_eq!(f.dropped(), 0);
    }

    proptest::proptest! {
        #[test]
        fn inspecting_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = inspect(&bytes);
            let mut v4 = bytes.clone();
            if let Some(b) = v4.first_mut() {
                *b = 0x45;
            }
            let _ = inspect(&v4);
            let mut v6 = bytes;
            if let Some(b) = v6.first_mut() {
                *b = 0x60;
            }
            let _ = inspect(&v6);
        }

        /// Against an exact model of every flow noted: a reply never passes
        /// for a flow that was not opened or went idle (soundness), and
        /// while fewer flows than one generation exist, every live one
        /// passes (completeness).
        #[test]
        fn table_agrees_with_a_model(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u16..12, 0u64..200), 1..80),
            capacity in 2usize..40,
        ) {
            let t0 = Instant::now();
            let mut t = FlowTable::new(capacity);
            let mut model: HashMap<Flow, Instant> = HashMap::new();
            let mut now = t0;
            for (open, port, step) in ops {
                now += Duration::from_secs(step);
                let f = Flow { proto: 17, src: A.into(), dst: B.into(), src_port: port, dst_port: 53 };
                if open {
                    t.note_opened(f, now);
                    model.insert(f, now + UDP_IDLE);
                } else {
                    let live = model.get(&f).is_some_and(|d| *d > now);
                    let got = t.is_reply(&f.reversed(), now);
                    proptest::prop_assert!(!got || live, "reply passed for a closed flow");
                    if 12 <= capacity / 2 {
                        proptest::prop_assert_eq!(got, live);
                    }
                    if got {
                        model.insert(f, now + UDP_IDLE);
                    }
                }
                proptest::prop_assert!(t.len() <= capacity.max(2));
            }
        }
    }
}
