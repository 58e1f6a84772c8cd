//! One peer's packet filter: the two effective grants (what the peer may
//! open on this node, what this node may open on the peer) and the flow
//! tables, giving one verdict per packet in either direction.
//!
//! The rules, for a decrypted inbound packet or an outbound one from the TUN
//! (see `crate::flow` for how packets are read):
//! - an opener passes as a reply to an open flow, or if the grant of its
//!   direction opens its protocol and port; it then opens its flow;
//! - an ICMP query reply passes only as a reply;
//! - an ICMP error passes only if it is about an open flow;
//! - a later fragment follows its first fragment (dropped if that was not
//!   seen);
//! - a packet the filter cannot read is dropped.
//!
//! A refused opener is [`Verdict::Deny`] (the caller answers it with ICMP
//! "administratively prohibited", so nothing hangs); everything else that is
//! refused is [`Verdict::Drop`]. A peer whose grants both open everything,
//! for good, needs no filter at all ([`Filter::open`]): the data plane skips
//! it, which keeps plain mutual trust at its old cost.
//!
//! Each verdict on an opener is also counted per direction, traffic and
//! outcome in a bounded per-minute table, so the audit log can record the
//! first allow and deny of each kind per minute, with counts.

use std::time::Instant;

use crate::aggregate::{Aggregator, Flushed, Recorded};
use crate::flow::{inspect, FlowTable, FragmentTable, Kind};
use crate::policy::{Decision, Denial, EffectiveGrant};
use crate::ports::{Scope, Traffic};

/// Which way a packet goes, seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the peer, after decryption, before the TUN.
    Inbound,
    /// From the TUN, to the peer, before encryption.
    Outbound,
}

impl Direction {
    /// `in` or `out`, for logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        }
    }
}

/// The verdict on one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Pass,
    /// A refused opener: answer it (ICMP administratively prohibited).
    Deny(Traffic, Denial),
    /// Refused without an answer: a reply, error or fragment that belongs to
    /// no open flow, or a packet the filter cannot read.
    Drop,
}

/// A decision worth an audit entry: the first of its kind this minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Noted {
    /// Which way.
    pub direction: Direction,
    /// What was opened or refused.
    pub traffic: Traffic,
    /// Allowed (true) or denied.
    pub allowed: bool,
}

/// Flows a peer's filter remembers (both directions).
pub const FLOWS_PER_PEER: usize = 4096;
/// First-fragment verdicts a peer's filter remembers.
pub const FRAGMENTS_PER_PEER: usize = 256;
/// Distinct decisions per minute a peer's filter counts for the audit log.
pub const NOTED_PER_PEER: usize = 128;

/// One peer's filter.
#[derive(Debug)]
pub struct Filter {
    inbound: EffectiveGrant,
    outbound: EffectiveGrant,
    flows: FlowTable,
    fragments: FragmentTable,
    noted: Aggregator<Noted>,
}

/// True if `grant` opens everything at `unix` and never ends: no packet
/// needs reading.
fn opens_everything(grant: &EffectiveGrant, unix: u64) -> bool {
    !grant.is_revoked() && grant.valid_until().is_none() && grant.scope(unix).is_all()
}

impl Filter {
    /// A filter with `inbound` (what the peer may open on us) and
    /// `outbound` (what we may open on the peer).
    pub fn new(inbound: EffectiveGrant, outbound: EffectiveGrant) -> Self {
        Filter {
            inbound,
            outbound,
            flows: FlowTable::new(FLOWS_PER_PEER),
            fragments: FragmentTable::new(FRAGMENTS_PER_PEER),
            noted: Aggregator::new(NOTED_PER_PEER),
        }
    }

    /// True if both grants open everything for good at `unix`: the data
    /// plane may skip the filter.
    pub fn open(inbound: &EffectiveGrant, outbound: &EffectiveGrant, unix: u64) -> bool {
        opens_everything(inbound, unix) && opens_everything(outbound, unix)
    }

    /// Replaces the grants (a change of trust, rules or certificates). Open
    /// flows stay open: replies to what either side opened keep passing.
    pub fn set_grants(&mut self, inbound: EffectiveGrant, outbound: EffectiveGrant) {
        self.inbound = inbound;
        self.outbound = outbound;
    }

    /// The grant of one direction.
    pub fn grant(&self, direction: Direction) -> &EffectiveGrant {
        match direction {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    /// The verdict on `pkt` going `direction`, at `now` (monotonic, for the
    /// flow tables) and `unix` (for expiries). The second value is set when
    /// this decision is the first of its kind this minute (for the audit
    /// log). Never panics, whatever the bytes.
    pub fn check(
        &mut self,
        pkt: &[u8],
        direction: Direction,
        now: Instant,
        unix: u64,
    ) -> (Verdict, Option<Noted>) {
        let Ok(p) = inspect(pkt) else {
            return (Verdict::Drop, None);
        };
        let verdict = match p.kind {
            Kind::Opener(traffic) => {
                let verdict = if self.flows.is_reply(&p.flow, now) {
                    Verdict::Pass
                } else {
                    match self.grant(direction).decide(traffic, unix) {
                        Decision::Allow(_) => {
                            self.flows.note_opened(p.flow, now);
                            Verdict::Pass
                        }
                        Decision::Deny(why) => Verdict::Deny(traffic, why),
                    }
                };
                if let Some(key) = p.fragment {
                    self.fragments.note(key, verdict == Verdict::Pass, now);
                }
                let noted = Noted {
                    direction,
                    traffic,
                    allowed: verdict == Verdict::Pass,
                };
                let first = self.noted.record(noted, unix) == Recorded::First;
                return (verdict, first.then_some(noted));
            }
            Kind::QueryReply => self.flows.is_reply(&p.flow, now),
            Kind::Error(quoted) => self.flows.relates_to(&quoted, now),
            Kind::LaterFragment => p
                .fragment
                .is_some_and(|key| self.fragments.passed(&key, now)),
        };
        (
            if verdict {
                Verdict::Pass
            } else {
                Verdict::Drop
            },
            None,
        )
    }

    /// The per-minute counts of the minutes that are over (all of them with
    /// `all`), for the audit log.
    pub fn flush_noted(&mut self, unix: u64, all: bool) -> Flushed<Noted> {
        if all {
            self.noted.flush_all()
        } else {
            self.noted.flush(unix)
        }
    }

    /// What each direction opens at `unix`, for `peers` and `trust list`.
    pub fn scopes(&self, unix: u64) -> (Scope, Scope) {
        (self.inbound.scope(unix), self.outbound.scope(unix))
    }

    /// Flows and fragment verdicts dropped to make room, since creation.
    pub fn evicted(&self) -> u64 {
        self.flows.dropped() + self.fragments.dropped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tests::ipv4;
    use crate::policy::{Contribution, Source};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const ME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const T0: u64 = 1_800_000_000;

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16) -> Vec<u8> {
        let mut l4 = sp.to_be_bytes().to_vec();
        l4.extend(dp.to_be_bytes());
        l4.extend([0u8; 16]);
        ipv4(6, src, dst, &l4, (false, 0))
    }

    fn grant(scope: &str, until: Option<u64>) -> EffectiveGrant {
        EffectiveGrant::build(
            vec![Contribution {
                source: Source::Manual,
                scope: scope.parse().unwrap(),
                until,
            }],
            T0,
        )
    }

    fn filter(inbound: &str, outbound: &str) -> Filter {
        Filter::new(grant(inbound, None), grant(outbound, None))
    }

    #[test]
    fn a_grant_opens_its_ports_and_replies_follow() {
        // The peer may open tcp/8080 on us; we may open tcp/5432 on it.
        let mut f = filter("tcp/8080", "tcp/5432");
        let now = Instant::now();
        let (v, noted) = f.check(&tcp(PEER, ME, 40000, 8080), Direction::Inbound, now, T0);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            noted,
            Some(Noted {
                direction: Direction::Inbound,
                traffic: Traffic::Tcp(8080),
                allowed: true
            })
        );
        // Our answer passes although we may not open port 40000 on it.
        let (v, _) = f.check(&tcp(ME, PEER, 8080, 40000), Direction::Outbound, now, T0);
        assert_eq!(v, Verdict::Pass);
        // ssh is refused both ways, and answered.
        let (v, _) = f.check(&tcp(PEER, ME, 40001, 22), Direction::Inbound, now, T0);
        assert_eq!(v, Verdict::Deny(Traffic::Tcp(22), Denial::NotGranted));
        let (v, _) = f.check(&tcp(ME, PEER, 40002, 22), Direction::Outbound, now, T0);
        assert_eq!(v, Verdict::Deny(Traffic::Tcp(22), Denial::NotGranted));
        // Our own connection out, and its reply in.
        let (v, _) = f.check(&tcp(ME, PEER, 50000, 5432), Direction::Outbound, now, T0);
        assert_eq!(v, Verdict::Pass);
        let (v, _) = f.check(&tcp(PEER, ME, 5432, 50000), Direction::Inbound, now, T0);
        assert_eq!(v, Verdict::Pass);
        // A "reply" to a connection nobody opened is an opener to port
        // 50001, which the peer may not open.
        let (v, _) = f.check(&tcp(PEER, ME, 5432, 50001), Direction::Inbound, now, T0);
        assert!(matches!(v, Verdict::Deny(Traffic::Tcp(50001), _)));
    }

    #[test]
    fn expiry_closes_new_flows_without_a_rebuild() {
        let mut f = Filter::new(grant("tcp/8080", Some(T0 + 60)), grant("all", None));
        let now = Instant::now();
        let pkt = tcp(PEER, ME, 40000, 8080);
        assert_eq!(
            f.check(&pkt, Direction::Inbound, now, T0 + 59).0,
            Verdict::Pass
        );
        let late = tcp(PEER, ME, 40001, 8080);
        assert!(matches!(
            f.check(&late, Direction::Inbound, now, T0 + 60).0,
            Verdict::Deny(_, Denial::NotGranted)
        ));
    }

    #[test]
    fn revoked_refuses_everything_new() {
        let mut f = Filter::new(EffectiveGrant::revoked(), grant("all", None));
        let (v, _) = f.check(
            &tcp(PEER, ME, 1, 80),
            Direction::Inbound,
            Instant::now(),
            T0,
        );
        assert_eq!(v, Verdict::Deny(Traffic::Tcp(80), Denial::Revoked));
    }

    #[test]
    fn icmp_replies_errors_and_fragments_follow_their_flows() {
        let mut f = filter("udp/53", "icmp");
        let now = Instant::now();
        let echo = |t: u8, src, dst| ipv4(1, src, dst, &[t, 0, 0, 0, 0, 9, 0, 1], (false, 0));
        // An unsolicited echo reply is dropped (not answered).
        assert_eq!(
            f.check(&echo(0, PEER, ME), Direction::Inbound, now, T0).0,
            Verdict::Drop
        );
        // Our ping out (icmp granted to us), its reply in.
        assert_eq!(
            f.check(&echo(8, ME, PEER), Direction::Outbound, now, T0).0,
            Verdict::Pass
        );
        assert_eq!(
            f.check(&echo(0, PEER, ME), Direction::Inbound, now, T0).0,
            Verdict::Pass
        );
        // The peer may not ping us.
        assert!(matches!(
            f.check(&echo(8, PEER, ME), Direction::Inbound, now, T0).0,
            Verdict::Deny(Traffic::Icmp, _)
        ));
        // A DNS query in, a port-unreachable about it out: passes; an error
        // about a flow never opened: dropped.
        let mut udp = 5353u16.to_be_bytes().to_vec();
        udp.extend(53u16.to_be_bytes());
        udp.extend([0u8; 4]);
        let query = ipv4(17, PEER, ME, &udp, (false, 0));
        assert_eq!(
            f.check(&query, Direction::Inbound, now, T0).0,
            Verdict::Pass
        );
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&query[..28]);
        let unreach = ipv4(1, ME, PEER, &err, (false, 0));
        assert_eq!(
            f.check(&unreach, Direction::Outbound, now, T0).0,
            Verdict::Pass
        );
        let stray = tcp(PEER, ME, 1, 2);
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&stray[..28]);
        assert_eq!(
            f.check(
                &ipv4(1, ME, PEER, &err, (false, 0)),
                Direction::Outbound,
                now,
                T0
            )
            .0,
            Verdict::Drop
        );
        // Fragments: the first of a denied datagram is answered, the later
        // ones dropped; the later ones of a passed datagram pass.
        let mut l4 = 1u16.to_be_bytes().to_vec();
        l4.extend(22u16.to_be_bytes());
        l4.extend([0u8; 12]);
        let first = ipv4(6, PEER, ME, &l4, (true, 0));
        assert!(matches!(
            f.check(&first, Direction::Inbound, now, T0).0,
            Verdict::Deny(..)
        ));
        let later = ipv4(6, PEER, ME, &[0; 8], (false, 2));
        assert_eq!(
            f.check(&later, Direction::Inbound, now, T0).0,
            Verdict::Drop
        );
        let mut l4 = 1u16.to_be_bytes().to_vec();
        l4.extend(53u16.to_be_bytes());
        l4.extend([0u8; 12]);
        let first = ipv4(17, PEER, ME, &l4, (true, 0));
        assert_eq!(
            f.check(&first, Direction::Inbound, now, T0).0,
            Verdict::Pass
        );
        assert_eq!(
            f.check(&later, Direction::Outbound, now, T0).0,
            Verdict::Drop
        );
        let later = ipv4(17, PEER, ME, &[0; 8], (false, 2));
        assert_eq!(
            f.check(&later, Direction::Inbound, now, T0).0,
            Verdict::Pass
        );
    }

    #[test]
    fn grants_apply_to_ipv6_as_to_ipv4() {
        use crate::ipv6::tests::ipv6;
        let (me, peer): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "fd00::a4d:1".parse().unwrap(),
            "fd00::a4d:2".parse().unwrap(),
        );
        let tcp6 = |src, dst, sp: u16, dp: u16| {
            let mut l4 = sp.to_be_bytes().to_vec();
            l4.extend(dp.to_be_bytes());
            l4.extend([0u8; 16]);
            ipv6(6, src, dst, &l4)
        };
        // The peer may open tcp/8080 on us, and nothing else.
        let mut f = filter("tcp/8080", "icmp");
        let now = Instant::now();
        let (v, _) = f.check(&tcp6(peer, me, 40000, 8080), Direction::Inbound, now, T0);
        assert_eq!(v, Verdict::Pass);
        let (v, _) = f.check(&tcp6(me, peer, 8080, 40000), Direction::Outbound, now, T0);
        assert_eq!(v, Verdict::Pass, "the reply follows its flow");
        let (v, _) = f.check(&tcp6(peer, me, 40001, 22), Direction::Inbound, now, T0);
        assert_eq!(v, Verdict::Deny(Traffic::Tcp(22), Denial::NotGranted));
        // An IPv4 "reply" does not ride on the IPv6 flow.
        let (v, _) = f.check(&tcp(ME, PEER, 8080, 40000), Direction::Outbound, now, T0);
        assert!(matches!(v, Verdict::Deny(..)));
        // icmp covers ICMPv6: our ping out, its reply in; theirs refused.
        let echo = |t: u8, s, d| ipv6(58, s, d, &[t, 0, 0, 0, 0, 9, 0, 1]);
        assert_eq!(
            f.check(&echo(129, peer, me), Direction::Inbound, now, T0).0,
            Verdict::Drop
        );
        assert_eq!(
            f.check(&echo(128, me, peer), Direction::Outbound, now, T0)
                .0,
            Verdict::Pass
        );
        assert_eq!(
            f.check(&echo(129, peer, me), Direction::Inbound, now, T0).0,
            Verdict::Pass
        );
        assert!(matches!(
            f.check(&echo(128, peer, me), Direction::Inbound, now, T0).0,
            Verdict::Deny(Traffic::Icmp, _)
        ));
    }

    #[test]
    fn unreadable_packets_are_dropped() {
        let mut f = filter("all", "all");
        let now = Instant::now();
        for bad in [&[][..], &[0x45; 10], &[0x60; 39], &[0x50; 40]] {
            assert_eq!(f.check(bad, Direction::Inbound, now, T0).0, Verdict::Drop);
        }
    }

    #[test]
    fn only_everything_for_good_skips_the_filter() {
        let all = grant("all", None);
        assert!(Filter::open(&all, &all, T0));
        assert!(!Filter::open(
            &all,
            &grant("tcp/1-65535,udp/1-65535,icmp", None),
            T0
        ));
        assert!(!Filter::open(&all, &grant("all", Some(T0 + 1)), T0));
        assert!(!Filter::open(&EffectiveGrant::revoked(), &all, T0));
        assert!(!Filter::open(&EffectiveGrant::none(), &all, T0));
    }

    #[test]
    fn decisions_are_noted_once_a_minute_with_counts() {
        let mut f = filter("tcp/8080", "all");
        let now = Instant::now();
        let mut firsts = 0;
        for i in 0..50u16 {
            let (_, n) = f.check(&tcp(PEER, ME, 1000 + i, 22), Direction::Inbound, now, T0);
            firsts += usize::from(n.is_some());
        }
        assert_eq!(firsts, 1);
        let later = now + Duration::from_secs(61);
        let (_, n) = f.check(&tcp(PEER, ME, 999, 22), Direction::Inbound, later, T0 + 61);
        assert!(n.is_some(), "a new minute logs again");
        let flushed = f.flush_noted(T0 + 61, false);
        assert_eq!(flushed.counts.len(), 1);
        assert_eq!(flushed.counts[0].count, 50);
    }
}
