//! Path MTU discovery for one peer: which datagram size gets through to it,
//! found with padded, authenticated probes (packetization-layer PMTU
//! discovery in the manner of RFC 8899), so it works where routers drop
//! ICMP; ICMP "fragmentation needed", where it arrives, only speeds it up.
//!
//! Sizes are outer IP datagram sizes on the underlay (a probe of size `S`
//! is a tunnel datagram whose IP packet is `S` bytes; see
//! [`crate::mtu::overhead`] for the conversion).
//!
//! The search: after a new path (or at start) the size in use is the local
//! route's MTU (the ceiling), optimistically; a burst of probes at the
//! common MTUs below it (and the ceiling itself) goes out at once, the
//! largest acknowledged one is kept, and a bisection narrows the gap to the
//! smallest lost one. A probe counts as lost after [`Config::attempts`]
//! sends without an answer. Then the size in use is confirmed every
//! [`Config::confirm_every`] (a path that narrowed silently) and the whole
//! search runs again every [`Config::search_every`] (a path that widened).
//!
//! Driving it (no clock, no I/O inside):
//! 1. feed inputs as they happen: [`Prober::on_probe_acked`],
//!    [`Prober::on_icmp_too_big`], [`Prober::on_roamed`],
//!    [`Prober::set_ceiling`];
//! 2. then call [`Prober::next_probe`] until it returns `None`, sending a
//!    probe of each size it returns;
//! 3. read [`Prober::mtu`] for the size to use, and wake again at
//!    [`Prober::poll_timeout`] (go to 2).
//!
//! The probe and its acknowledgement travel inside the tunnel as control
//! messages (an inner "packet" whose first byte is not an IP version):
//! ```text
//! probe  | 03 | zeros, up to the probed size                |
//! ack    | 04 | probe's plaintext length, u16 little-endian |
//! ```

use std::time::{Duration, Instant};

/// In-tunnel control type of a probe (pilot-tun's control messages use
/// 0x01 and 0x02 for echo request and reply).
pub const CTL_PROBE: u8 = 0x03;
/// In-tunnel control type of a probe's acknowledgement.
pub const CTL_PROBE_ACK: u8 = 0x04;
/// Length of an acknowledgement.
pub const ACK_LEN: usize = 3;

/// Fills `msg` as a probe: the type byte, then zeros. Its length is the
/// probe's plaintext length. Does nothing to an empty slice.
pub fn write_probe(msg: &mut [u8]) {
    if let Some((first, rest)) = msg.split_first_mut() {
        *first = CTL_PROBE;
        rest.fill(0);
    }
}

/// The acknowledgement for a received in-tunnel message, if it is a probe.
pub fn ack_for(msg: &[u8]) -> Option<[u8; ACK_LEN]> {
    if msg.first() != Some(&CTL_PROBE) {
        return None;
    }
    let len = u16::try_from(msg.len()).ok()?;
    let l = len.to_le_bytes();
    Some([CTL_PROBE_ACK, l[0], l[1]])
}

/// The probe length an acknowledgement names, if `msg` is one.
pub fn parse_ack(msg: &[u8]) -> Option<u16> {
    match msg {
        [CTL_PROBE_ACK, a, b] => Some(u16::from_le_bytes([*a, *b])),
        _ => None,
    }
}

/// Common link and tunnel MTUs: the first burst probes those below the
/// ceiling, so most paths are found exactly in one round trip.
pub const LADDER: [u16; 14] = [
    9000, 1500, 1492, 1480, 1460, 1450, 1440, 1420, 1400, 1380, 1360, 1280, 1200, 1000,
];

/// The rules of a [`Prober`].
#[derive(Clone, Debug)]
pub struct Config {
    /// The size assumed to get through when nothing else does; the search
    /// never goes below it (576 for IPv4 underlays, 1280 for IPv6).
    pub floor: u16,
    /// A probe's first timeout, before any round trip was measured.
    pub initial_timeout: Duration,
    /// Bounds of the timeout, which is otherwise three smoothed round trips.
    pub min_timeout: Duration,
    /// See [`Config::min_timeout`].
    pub max_timeout: Duration,
    /// Sends of one size without an answer before it counts as too big
    /// (one loss is more likely congestion than MTU).
    pub attempts: u8,
    /// The bisection stops when the largest size that passed and the
    /// smallest that failed are at most this far apart.
    pub granularity: u16,
    /// How often the size in use is confirmed with one probe: a path that
    /// narrowed without any ICMP (a black hole) is noticed this late.
    pub confirm_every: Duration,
    /// How often the whole search runs again: a path that widened is
    /// noticed this late (RFC 8899's PMTU_RAISE_TIMER is 600 s).
    pub search_every: Duration,
}

impl Config {
    /// The defaults for an IPv4 underlay.
    pub fn ipv4() -> Self {
        Config {
            floor: 576,
            initial_timeout: Duration::from_millis(1000),
            min_timeout: Duration::from_millis(200),
            max_timeout: Duration::from_secs(3),
            attempts: 2,
            granularity: 8,
            confirm_every: Duration::from_secs(30),
            search_every: Duration::from_secs(600),
        }
    }

    /// The defaults for an IPv6 underlay: the floor is IPv6's minimum MTU.
    pub fn ipv6() -> Self {
        Config {
            floor: crate::mtu::IPV6_MIN_MTU,
            ..Config::ipv4()
        }
    }
}

/// Where a [`Prober`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Probes are under way; [`Prober::mtu`] is the best guess so far.
    Searching,
    /// The size in use got through (an acknowledged probe).
    Confirmed,
    /// No probe was ever answered (a peer that does not answer probes, or
    /// a dead path): the size in use is the ceiling, unconfirmed, as
    /// without probing.
    Unconfirmed,
}

#[derive(Clone, Copy, Debug)]
struct Probe {
    size: u16,
    sent: Instant,
    attempt: u8,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// A round: the burst (once), then bisection.
    Round { burst_sent: bool },
    /// Between rounds.
    Idle {
        confirm_at: Option<Instant>,
        search_at: Instant,
    },
}

/// The path MTU search for one peer's path. See the module documentation
/// for the rules and the order to drive it in.
#[derive(Clone, Debug)]
pub struct Prober {
    cfg: Config,
    /// Largest size the local route allows.
    ceiling: u16,
    /// The size in use.
    mtu: u16,
    /// Largest size acknowledged this round (0: none).
    lo: u16,
    /// Smallest size lost this round (ceiling + 1: none).
    hi: u32,
    phase: Phase,
    state: State,
    in_flight: Vec<Probe>,
    /// Sizes to send now, with their attempt number.
    queue: Vec<(u16, u8)>,
    srtt: Option<Duration>,
}

impl Prober {
    /// A prober for a new path whose local route allows `ceiling`; it
    /// starts searching at once.
    pub fn new(cfg: Config, ceiling: u16) -> Self {
        let ceiling = ceiling.max(cfg.floor);
        Prober {
            cfg,
            ceiling,
            mtu: ceiling,
            lo: 0,
            hi: u32::from(ceiling) + 1,
            phase: Phase::Round { burst_sent: false },
            state: State::Searching,
            in_flight: Vec::new(),
            queue: Vec::new(),
            srtt: None,
        }
    }

    /// The datagram size to use on this path now.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The local route's MTU, the largest size probed.
    pub fn ceiling(&self) -> u16 {
        self.ceiling
    }

    /// Where the search stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// The path changed (roaming, relay to direct or back, a new session
    /// after silence): forget everything and search again from `ceiling`,
    /// the new local route's MTU.
    pub fn on_roamed(&mut self, ceiling: u16) {
        *self = Prober::new(self.cfg.clone(), ceiling);
    }

    /// The local route's MTU changed. Lower: nothing larger is used or
    /// probed any more. Higher: a new round looks for the larger size.
    pub fn set_ceiling(&mut self, ceiling: u16) {
        let ceiling = ceiling.max(self.cfg.floor);
        if ceiling < self.ceiling {
            self.ceiling = ceiling;
            self.mtu = self.mtu.min(ceiling);
            self.lo = self.lo.min(ceiling);
            self.hi = self.hi.min(u32::from(ceiling) + 1);
            self.in_flight.retain(|p| p.size <= ceiling);
            self.queue.retain(|&(s, _)| s <= ceiling);
        } else if ceiling > self.ceiling {
            self.ceiling = ceiling;
            self.start_round(false);
        }
    }

    /// A router said datagrams larger than `mtu` do not fit (ICMP
    /// "fragmentation needed", or the kernel's path MTU learned from one).
    /// Used at once if it is lower than the size in use; a probe confirms
    /// it. Values below the floor or not below the size in use are ignored
    /// (they cannot help, and a forged one must not shrink the path).
    pub fn on_icmp_too_big(&mut self, mtu: u16) {
        if mtu < self.cfg.floor || mtu >= self.mtu {
            return;
        }
        self.mtu = mtu;
        self.lo = self.lo.min(mtu);
        self.hi = self.hi.min(u32::from(mtu) + 1);
        self.in_flight.retain(|p| p.size <= mtu);
        self.queue.retain(|&(s, _)| s <= mtu);
        match self.phase {
            Phase::Idle { .. } => self.start_round(true),
            Phase::Round { .. } => {
                if !self.outstanding(mtu) && self.lo < mtu {
                    self.queue.push((mtu, 1));
                }
                self.state = State::Searching;
            }
        }
    }

    /// The peer acknowledged a probe of `size`. Acknowledgements of sizes
    /// not in flight (stale, from an earlier path) are ignored.
    pub fn on_probe_acked(&mut self, now: Instant, size: u16) {
        let found = self.in_flight.iter().position(|p| p.size == size);
        let queued = self.queue.iter().position(|&(s, _)| s == size);
        if found.is_none() && queued.is_none() {
            return;
        }
        if let Some(i) = found {
            let p = self.in_flight.swap_remove(i);
            if p.attempt == 1 {
                // Only first sends give an unambiguous round trip.
                let sample = now.saturating_duration_since(p.sent);
                self.srtt = Some(match self.srtt {
                    None => sample,
                    Some(s) => (s * 7 + sample) / 8,
                });
            }
        }
        if let Some(i) = queued {
            self.queue.swap_remove(i);
        }
        self.lo = self.lo.max(size);
        if self.hi <= u32::from(size) {
            // An answer outweighs an earlier loss (which may have been
            // congestion): sizes above are open again.
            self.hi = u32::from(self.ceiling) + 1;
        }
        let lo = self.lo;
        self.in_flight.retain(|p| p.size > lo);
        self.queue.retain(|&(s, _)| s > lo);
        if let Phase::Idle { .. } = self.phase {
            // The confirmation probe: the size in use still gets through.
            self.state = State::Confirmed;
        }
        self.recompute();
    }

    /// The next probe size to send now, if any; call until `None` after
    /// every input and at every [`Prober::poll_timeout`].
    pub fn next_probe(&mut self, now: Instant) -> Option<u16> {
        self.expire(now);
        loop {
            if let Some((size, attempt)) = self.queue.pop() {
                self.in_flight.push(Probe {
                    size,
                    sent: now,
                    attempt,
                });
                return Some(size);
            }
            match self.phase {
                Phase::Round { burst_sent: false } => {
                    self.queue_burst();
                    self.phase = Phase::Round { burst_sent: true };
                }
                Phase::Round { burst_sent: true } => {
                    if !self.in_flight.is_empty() {
                        return None;
                    }
                    match self.bisect() {
                        Some(mid) => self.queue.push((mid, 1)),
                        None => {
                            self.finish(now);
                            return None;
                        }
                    }
                }
                Phase::Idle {
                    confirm_at,
                    search_at,
                } => {
                    if now >= search_at {
                        self.start_round(false);
                        continue;
                    }
                    match confirm_at {
                        Some(t) if now >= t && self.in_flight.is_empty() => {
                            self.queue.push((self.mtu, 1));
                            self.phase = Phase::Idle {
                                confirm_at: Some(now + self.cfg.confirm_every),
                                search_at,
                            };
                        }
                        _ => return None,
                    }
                }
            }
        }
    }

    /// When [`Prober::next_probe`] has something to do next (a probe's
    /// timeout, a confirmation, a new round), if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.timeout();
        let probes = self.in_flight.iter().map(|p| p.sent + timeout).min();
        let idle = match self.phase {
            Phase::Idle {
                confirm_at,
                search_at,
            } => Some(confirm_at.map_or(search_at, |c| c.min(search_at))),
            Phase::Round { .. } => None,
        };
        match (probes, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How long a probe is given: three smoothed round trips, bounded.
    fn timeout(&self) -> Duration {
        match self.srtt {
            None => self.cfg.initial_timeout,
            Some(s) => (s * 3).clamp(self.cfg.min_timeout, self.cfg.max_timeout),
        }
    }

    /// True if a probe between the largest passed size and `below` (not
    /// included) is still waiting for an answer or to be sent.
    fn outstanding(&self, below: u16) -> bool {
        self.in_flight
            .iter()
            .map(|p| p.size)
            .chain(self.queue.iter().map(|&(s, _)| s))
            .any(|s| s > self.lo && s < below)
            || matches!(self.phase, Phase::Round { burst_sent: false })
    }

    /// Probes past their timeout are sent again or, after the last
    /// attempt, count as lost.
    fn expire(&mut self, now: Instant) {
        let timeout = self.timeout();
        let mut lost = false;
        let mut i = 0;
        while i < self.in_flight.len() {
            let p = self.in_flight[i];
            if now < p.sent + timeout {
                i += 1;
                continue;
            }
            self.in_flight.swap_remove(i);
            if p.attempt < self.cfg.attempts {
                self.queue.push((p.size, p.attempt + 1));
            } else {
                self.hi = self.hi.min(u32::from(p.size));
                lost = true;
            }
        }
        if lost {
            let hi = self.hi;
            self.in_flight.retain(|p| u32::from(p.size) < hi);
            self.queue.retain(|&(s, _)| u32::from(s) < hi);
            if let Phase::Idle { .. } = self.phase {
                // The confirmation failed: the path narrowed. Search below
                // it, keeping the size in use until answers come back.
                self.start_round(true);
            }
            self.recompute();
        }
        // Retries go out largest first, like the burst.
        self.queue.sort_unstable();
    }

    /// The size in use after an answer or a loss: raised to any size that
    /// passed; lowered to the largest size that passed (or the floor) once
    /// the size in use failed and nothing that could still pass is pending.
    fn recompute(&mut self) {
        if self.hi <= u32::from(self.mtu) {
            if !self.outstanding(self.mtu) {
                self.mtu = self.lo.max(self.cfg.floor);
            }
        } else if self.lo > self.mtu {
            self.mtu = self.lo;
        }
        self.mtu = self.mtu.min(self.ceiling);
    }

    fn start_round(&mut self, keep_hi: bool) {
        self.lo = 0;
        if !keep_hi {
            self.hi = u32::from(self.ceiling) + 1;
        }
        self.in_flight.clear();
        self.queue.clear();
        self.phase = Phase::Round { burst_sent: false };
        self.state = State::Searching;
    }

    /// The first probes of a round: the ceiling, the size in use, the
    /// common MTUs and the floor, each below the smallest known failure.
    fn queue_burst(&mut self) {
        let hi = self.hi;
        let ceiling = self.ceiling;
        let floor = self.cfg.floor;
        let mut sizes: Vec<u16> = LADDER
            .iter()
            .copied()
            .chain([ceiling, self.mtu, floor])
            .filter(|&s| s >= floor && s <= ceiling && u32::from(s) < hi)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        // `queue` is popped from the end: the largest goes first.
        self.queue.extend(sizes.into_iter().map(|s| (s, 1)));
    }

    /// The next bisection probe, or `None` when the search is done.
    fn bisect(&self) -> Option<u16> {
        let lo = u32::from(self.lo);
        if lo == 0
            || lo >= u32::from(self.ceiling)
            || self.hi - lo <= u32::from(self.cfg.granularity)
        {
            return None;
        }
        u16::try_from(lo + (self.hi - lo) / 2).ok()
    }

    fn finish(&mut self, now: Instant) {
        if self.lo == 0 {
            // Not even the floor was answered: the peer does not answer
            // probes, or the path is dead. Behave as without probing.
            self.mtu = self.ceiling;
            self.state = State::Unconfirmed;
            self.phase = Phase::Idle {
                confirm_at: None,
                search_at: now + self.cfg.search_every,
            };
            return;
        }
        self.mtu = self.lo;
        self.state = State::Confirmed;
        self.phase = Phase::Idle {
            confirm_at: Some(now + self.cfg.confirm_every),
            search_at: now + self.cfg.search_every,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-way path for probes: datagrams above `mtu` vanish (no ICMP),
    /// others are lost with probability `loss` (seeded), answers come back
    /// after `rtt`.
    struct Link {
        mtu: u16,
        rtt: Duration,
        loss: u32, // per mille
        seed: u64,
    }

    impl Link {
        fn new(mtu: u16) -> Self {
            Link {
                mtu,
                rtt: Duration::from_millis(20),
                loss: 0,
                seed: 0x9e37_79b9_7f4a_7c15,
            }
        }
        fn passes(&mut self, size: u16) -> bool {
            // xorshift64: deterministic "randomness" for the loss.
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            size <= self.mtu && (self.seed % 1000) as u32 >= self.loss
        }
    }

    /// Drives `p` over `link` from `*now` for `secs` seconds with a clock
    /// that jumps to the next event; returns how many probes were sent.
    fn run(p: &mut Prober, link: &mut Link, now: &mut Instant, dur: Duration) -> usize {
        let end = *now + dur;
        let mut acks: Vec<(Instant, u16)> = vec![];
        let mut sent = 0;
        loop {
            acks.sort_by_key(|a| std::cmp::Reverse(a.0));
            while acks.last().is_some_and(|a| a.0 <= *now) {
                let (t, size) = acks.pop().unwrap();
                p.on_probe_acked(t, size);
            }
            while let Some(size) = p.next_probe(*now) {
                assert!(size <= p.ceiling(), "probed {size} above the ceiling");
                sent += 1;
                if link.passes(size) {
                    acks.push((*now + link.rtt, size));
                }
            }
            let next = [p.poll_timeout(), acks.iter().map(|a| a.0).min()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => *now = t.max(*now),
                _ => {
                    *now = end;
                    return sent;
                }
            }
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn message_fixtures() {
        let mut probe = [0xffu8; 6];
        write_probe(&mut probe);
        assert_eq!(probe, [0x03, 0, 0, 0, 0, 0]);
        assert_eq!(ack_for(&probe), Some([0x04, 6, 0]));
        assert_eq!(ack_for(&[0x04, 6, 0]), None, "only probes are answered");
        assert_eq!(ack_for(&[]), None);
        let big = vec![CTL_PROBE; 1400];
        assert_eq!(ack_for(&big), Some([0x04, 0x78, 0x05]));
        assert_eq!(parse_ack(&[0x04, 0x78, 0x05]), Some(1400));
        assert_eq!(parse_ack(&[0x04, 0x78]), None);
        assert_eq!(parse_ack(&[0x04, 0x78, 0x05, 0]), None);
        assert_eq!(parse_ack(&[0x03, 0x78, 0x05]), None);
        write_probe(&mut []);
    }

    #[test]
    fn finds_a_narrower_path_without_icmp() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        assert_eq!(
            (p.mtu(), p.state()),
            (1500, State::Searching),
            "optimistic at first"
        );
        let mut link = Link::new(1400);
        let sent = run(&mut p, &mut link, &mut now, secs(5));
        assert_eq!((p.mtu(), p.state()), (1400, State::Confirmed));
        assert!(sent < 40, "{sent} probes");
    }

    #[test]
    fn the_size_in_use_drops_within_a_second() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(1400);
        // Two sends of 200 ms each for the sizes that vanish.
        run(&mut p, &mut link, &mut now, Duration::from_millis(700));
        assert_eq!(p.mtu(), 1400);
    }

    #[test]
    fn a_wide_path_is_confirmed_at_the_ceiling() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        run(&mut p, &mut Link::new(1500), &mut now, secs(2));
        assert_eq!((p.mtu(), p.state()), (1500, State::Confirmed));
        let mut p = Prober::new(Config::ipv4(), 65_535);
        run(&mut p, &mut Link::new(65_535), &mut now, secs(2));
        assert_eq!((p.mtu(), p.state()), (65_535, State::Confirmed), "loopback");
    }

    #[test]
    fn an_odd_path_is_found_by_bisection() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        run(&mut p, &mut Link::new(1337), &mut now, secs(10));
        assert_eq!(p.state(), State::Confirmed);
        assert!((1337 - 8..=1337).contains(&p.mtu()), "{}", p.mtu());
    }

    #[test]
    fn icmp_lowers_at_once_and_a_probe_confirms() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(1500);
        run(&mut p, &mut link, &mut now, secs(2));
        assert_eq!(p.mtu(), 1500);
        // The path narrows; a router says so.
        link.mtu = 1400;
        p.on_icmp_too_big(1400);
        assert_eq!((p.mtu(), p.state()), (1400, State::Searching));
        run(&mut p, &mut link, &mut now, secs(5));
        assert_eq!((p.mtu(), p.state()), (1400, State::Confirmed));
        // Ignored: below the floor, or not below the size in use.
        p.on_icmp_too_big(500);
        p.on_icmp_too_big(1450);
        assert_eq!((p.mtu(), p.state()), (1400, State::Confirmed));
    }

    #[test]
    fn a_lying_icmp_is_corrected_by_probes() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(1500);
        run(&mut p, &mut link, &mut now, secs(2));
        p.on_icmp_too_big(1280);
        assert_eq!(p.mtu(), 1280);
        // The next full search (at the latest) finds the path is wide.
        run(&mut p, &mut link, &mut now, secs(601));
        assert_eq!(p.mtu(), 1500);
    }

    #[test]
    fn a_silent_narrowing_is_noticed_by_the_confirmation() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(1500);
        run(&mut p, &mut link, &mut now, secs(2));
        assert_eq!(p.mtu(), 1500);
        link.mtu = 1300; // no ICMP at all
        run(&mut p, &mut link, &mut now, secs(27));
        assert_eq!(p.mtu(), 1500, "not noticed before the confirmation");
        run(&mut p, &mut link, &mut now, secs(5));
        assert_eq!(p.state(), State::Confirmed);
        assert!((1292..=1300).contains(&p.mtu()), "{}", p.mtu());
    }

    #[test]
    fn a_wider_path_is_found_by_the_next_search() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(1400);
        run(&mut p, &mut link, &mut now, secs(5));
        assert_eq!(p.mtu(), 1400);
        link.mtu = 1500;
        run(&mut p, &mut link, &mut now, secs(500));
        assert_eq!(p.mtu(), 1400, "not before the search interval");
        run(&mut p, &mut link, &mut now, secs(110));
        assert_eq!(p.mtu(), 1500);
    }

    #[test]
    fn roaming_starts_over() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        run(&mut p, &mut Link::new(1400), &mut now, secs(5));
        assert_eq!(p.mtu(), 1400);
        p.on_roamed(1460);
        assert_eq!((p.mtu(), p.state()), (1460, State::Searching));
        run(&mut p, &mut Link::new(1460), &mut now, secs(5));
        assert_eq!((p.mtu(), p.state()), (1460, State::Confirmed));
    }

    #[test]
    fn the_ceiling_follows_the_local_route() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(9000);
        run(&mut p, &mut link, &mut now, secs(2));
        assert_eq!(p.mtu(), 1500);
        p.set_ceiling(1450);
        assert_eq!(p.mtu(), 1450, "lowered at once");
        p.set_ceiling(9000);
        run(&mut p, &mut link, &mut now, secs(5));
        assert_eq!(
            (p.mtu(), p.ceiling()),
            (9000, 9000),
            "raised by a new round"
        );
    }

    #[test]
    fn a_peer_that_never_answers_leaves_the_ceiling() {
        let mut now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        let mut link = Link::new(0); // everything vanishes
        let sent = run(&mut p, &mut link, &mut now, secs(10));
        assert_eq!((p.mtu(), p.state()), (1500, State::Unconfirmed));
        // No confirmations; the next search only after the interval.
        let more = run(&mut p, &mut link, &mut now, secs(60));
        assert_eq!(more, 0);
        assert!(sent <= 2 * (LADDER.len() + 2), "{sent}");
    }

    #[test]
    fn stale_acks_are_ignored() {
        let now = Instant::now();
        let mut p = Prober::new(Config::ipv4(), 1500);
        p.on_probe_acked(now, 1500);
        assert_eq!(p.state(), State::Searching);
        while p.next_probe(now).is_some() {}
        p.on_roamed(1460);
        p.on_probe_acked(now, 1500);
        assert_eq!((p.mtu(), p.state()), (1460, State::Searching));
    }

    #[test]
    fn five_percent_loss_never_overshoots() {
        for seed in 1..40u64 {
            let mut now = Instant::now();
            let mut p = Prober::new(Config::ipv4(), 1500);
            let mut link = Link::new(1400);
            link.loss = 50;
            link.seed = seed;
            run(&mut p, &mut link, &mut now, secs(10));
            assert_eq!(p.state(), State::Confirmed, "seed {seed}");
            assert!(p.mtu() <= 1400, "seed {seed}: {}", p.mtu());
            // A loss may cost a step for a while, never more than that.
            assert!(p.mtu() >= 1380, "seed {seed}: {}", p.mtu());
        }
    }

    proptest::proptest! {
        #[test]
        fn converges_below_the_path(path in 576u16..=1500, ceiling in 1280u16..=9000) {
            let mut now = Instant::now();
            let mut p = Prober::new(Config::ipv4(), ceiling);
            run(&mut p, &mut Link::new(path), &mut now, secs(30));
            let want = path.min(ceiling);
            proptest::prop_assert_eq!(p.state(), State::Confirmed);
            proptest::prop_assert!(p.mtu() <= want, "mtu {} path {}", p.mtu(), want);
            proptest::prop_assert!(p.mtu() + 8 >= want, "mtu {} path {}", p.mtu(), want);
        }
    }
}
