//! Which path a peer's packets take: direct (hole-punched) or through the
//! relay, and when to try direct again. Pure: time and events are arguments.
//!
//! Rules (each with its reason):
//! - Direct is preferred: it is faster and costs the relay nothing.
//! - When both NATs map per destination, punching almost never works: go
//!   through the relay at once instead of making the user wait.
//! - Otherwise probe direct candidates; if no direct answer arrives within
//!   [`DIRECT_TIMEOUT`], fall back to the relay so the application never
//!   notices more than a short pause.
//! - While relayed, probe direct again every [`DIRECT_RETRY`] and at once when
//!   the peer's endpoints change; the first direct answer takes over.
//! - A direct path that goes silent under traffic (the peer's timers say so)
//!   is given up for the relay at once. It was working a moment ago, so it
//!   is likely to come back: every [`PATH_HEARTBEAT`] an echo on the
//!   session in use goes straight to it, and an authenticated answer moves
//!   both sides back (no handshake needed). The burst every
//!   [`DIRECT_RETRY`] goes on as for any relayed peer.
//! - A stray relayed packet never moves a direct path; a new session that
//!   came through the relay does (the caller decides which is which).
//! - A NAT without a stateful firewall (a bare Linux masquerade, as on
//!   container hosts) takes the first probe that reaches it before its own
//!   host sent one as a connection to itself: that unreplied conntrack
//!   entry holds the tuple, and its host's own mapping towards us then
//!   gets a new port, which our NAT does not know. Two defences:
//!   - The first probe of a punch burst leaves with a TTL of
//!     [`OPENER_TTL`]: it opens our own NAT and dies at the router after
//!     it, before it can reach the peer's NAT; the full probes follow
//!     [`OPEN_LEAD`] later, when the peer's opener has opened its side.
//!     With routers between the NATs (the Internet) the pair goes direct
//!     at once. Not when a side is public: it has no NAT to open, and its
//!     NAT-less peer lets anything in.
//!   - When the NATs sit side by side on one segment there is no router to
//!     die at, and the burst fails. Then the pair goes through rounds
//!     ([`REOPEN_QUIET`] plus a burst each): in each, one side (the
//!     keeper) sends nothing that reaches the peer and keeps its own
//!     mapping alive with packets whose TTL ([`KEEP_TTL`]) ends at its own
//!     router, until the peer's NAT forgot the entry our probes left there
//!     (Linux forgets an unreplied UDP entry after 30 s); then the other
//!     side (the sender) probes first, its NAT gives it its usual port,
//!     and the keeper's kept mapping lets it in. Which side's NAT was
//!     poisoned nobody can tell, so the roles swap every round: the first
//!     round is led by the side with the lower node id as keeper.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::messages::NatType;

pub use crate::timers::{DIRECT_RETRY, DIRECT_TIMEOUT, PATH_HEARTBEAT, PROBE_INTERVAL};

/// The TTL of the first probe of a punch burst: past our own NAT (one
/// router away on a container host, VM host or home network), not past the
/// next router.
pub const OPENER_TTL: u8 = 2;
/// How long after the opener the burst's full probes start: longer than
/// the two sides' bursts start apart (both start from the registry's one
/// fan-out; more skew than the path between them is rare).
pub const OPEN_LEAD: Duration = Duration::from_millis(40);
/// The TTL of the keeper's keepalives in a reopening round: they refresh
/// the keeper's own NAT mapping and die there.
pub const KEEP_TTL: u8 = 1;
/// How often the keeper refreshes its mapping: well within the 30 s that
/// Linux keeps an unreplied UDP entry.
pub const KEEP_EVERY: Duration = Duration::from_secs(10);
/// The quiet part of a reopening round: the sender probes after it. Longer
/// than Linux's 30 s for an unreplied UDP entry (`nf_conntrack_udp_timeout`),
/// plus the skew between the two sides' rounds.
pub const REOPEN_QUIET: Duration = Duration::from_secs(35);

/// Where a peer's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight to this UDP endpoint.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(a) => write!(f, "{a}"),
            Path::Relay => f.write_str("relay"),
        }
    }
}

/// Why a peer is relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayReason {
    /// Both NATs map per destination; punching was not attempted.
    BothHardNat,
    /// Direct probes went unanswered.
    NoDirectAnswer,
    /// The registry knows no direct endpoint for the peer.
    NoCandidates,
    /// The peer's handshake came through the relay.
    PeerRelayed,
    /// The direct path in use stopped answering.
    DirectSilent,
}

impl RelayReason {
    /// For the CLI.
    pub fn text(self) -> &'static str {
        match self {
            RelayReason::BothHardNat => "both NATs map per destination",
            RelayReason::NoDirectAnswer => "direct probes unanswered",
            RelayReason::NoCandidates => "no direct endpoint known",
            RelayReason::PeerRelayed => "the peer connected through the relay",
            RelayReason::DirectSilent => "the direct path went silent",
        }
    }
}

/// What the caller should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Nothing.
    Idle,
    /// Send handshake probes straight to these endpoints.
    ProbeDirect(Vec<SocketAddr>),
    /// Start using the relay (handshake through it if there is no session).
    UseRelay(RelayReason),
    /// Send an in-tunnel echo request on the session in use straight to
    /// this endpoint, the direct path that went silent: if it is back, the
    /// authenticated packet moves the peer's side to it and the answer
    /// ours.
    PingDirect(SocketAddr),
    /// Send a packet with a TTL of [`KEEP_TTL`] to each of these endpoints:
    /// it keeps our own NAT's mapping towards them alive and dies there
    /// (the keeper's side of a reopening round). Sealed on the session in
    /// use, so that one that does arrive (a peer on our own link) does no
    /// harm.
    KeepMapping(Vec<SocketAddr>),
}

/// The path state of one peer.
#[derive(Clone, Debug, Default)]
pub struct PathState {
    timing: crate::timers::Timing,
    selected: Option<Path>,
    relay_reason: Option<RelayReason>,
    candidates: Vec<SocketAddr>,
    probing_since: Option<Instant>,
    last_probe: Option<Instant>,
    last_burst: Option<Instant>,
    local_nat: NatType,
    peer_nat: NatType,
    /// The direct endpoint given up for silence, while relayed because of
    /// it, and when it was last pinged.
    silent_direct: Option<(SocketAddr, Instant)>,
    /// This burst already sent traffic to the relay (after
    /// [`Timing::relay_after`]); the probes go on.
    ///
    /// [`Timing::relay_after`]: crate::timers::Timing::relay_after
    relay_asked: bool,
    /// Our node id is the lower of the pair: we keep in the first
    /// reopening round.
    lead: bool,
    /// The reopening round, counted from the failed punch (while relayed
    /// for [`RelayReason::NoDirectAnswer`] or
    /// [`RelayReason::PeerRelayed`]), and when its quiet part began.
    round: Option<(u32, Instant)>,
    /// The keeper's last keepalive in this round.
    last_keep: Option<Instant>,
}

impl PathState {
    /// A path state with these durations.
    pub fn new(timing: crate::timers::Timing) -> Self {
        PathState {
            timing,
            ..Default::default()
        }
    }

    /// The path in use, if any.
    pub fn selected(&self) -> Option<Path> {
        self.selected
    }
    /// Why the peer is relayed, if it is.
    pub fn relay_reason(&self) -> Option<RelayReason> {
        match self.selected {
            // Once both NAT types are known to be hard, that is the reason,
            // whichever side chose the relay first.
            Some(Path::Relay) if self.both_hard() => Some(RelayReason::BothHardNat),
            Some(Path::Relay) => self.relay_reason,
            _ => None,
        }
    }
    /// The direct candidates known.
    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// Records both sides' NAT types.
    pub fn set_nat(&mut self, local: NatType, peer: NatType) {
        self.local_nat = local;
        self.peer_nat = peer;
    }

    /// Records which side of the pair keeps first when punching failed:
    /// `lead` is true on the side with the lower node id.
    pub fn set_lead(&mut self, lead: bool) {
        self.lead = lead;
    }

    /// True when the probe going out now is the first of a punch burst and
    /// should leave with a TTL of [`OPENER_TTL`], the full probes
    /// following [`OPEN_LEAD`] later: both sides are behind a NAT (or not
    /// known to be public), and this is not a reopening round's sender,
    /// which must reach the keeper at once.
    pub fn opens(&self, now: Instant) -> bool {
        self.probing_since == Some(now)
            && self.round.is_none()
            && self.local_nat != NatType::None
            && self.peer_nat != NatType::None
    }

    /// The reopening round we are in and whether we keep in it, if any.
    fn keeping(&self) -> Option<bool> {
        let (n, _) = self.round?;
        Some(self.lead == (n % 2 == 0))
    }

    /// Whether failed punching is retried in reopening rounds (see the
    /// module's rules): relayed because the punch failed, and no side
    /// maps per destination (a fresh port per destination never matches
    /// a kept mapping).
    fn reopens(&self) -> bool {
        self.selected == Some(Path::Relay)
            && matches!(
                self.relay_reason,
                Some(RelayReason::NoDirectAnswer | RelayReason::PeerRelayed)
            )
            && self.local_nat != NatType::PerDestination
            && self.peer_nat != NatType::PerDestination
            && !self.candidates.is_empty()
    }

    /// New direct candidates (from the registry or a punch request). Returns
    /// the action to take: probing at once if they changed while relayed.
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Instant) -> PathAction {
        let changed = candidates != self.candidates;
        self.candidates = candidates;
        if changed && self.selected == Some(Path::Relay) && !self.both_hard() {
            return self.probe(now);
        }
        PathAction::Idle
    }

    fn both_hard(&self) -> bool {
        self.local_nat == NatType::PerDestination && self.peer_nat == NatType::PerDestination
    }

    fn probe(&mut self, now: Instant) -> PathAction {
        if self.candidates.is_empty() {
            return PathAction::Idle;
        }
        if self.probing_since.is_none() {
            self.probing_since = Some(now);
            self.last_burst = Some(now);
            self.relay_asked = false;
        }
        self.last_probe = Some(now);
        PathAction::ProbeDirect(self.candidates.clone())
    }

    /// The peer is probing us right now (the registry relayed its punch
    /// request): probe back in a burst, unless direct already works or both
    /// NATs are hard.
    pub fn punch(&mut self, now: Instant) -> PathAction {
        if matches!(self.selected, Some(Path::Direct(_))) || self.both_hard() {
            return PathAction::Idle;
        }
        self.probe(now)
    }

    /// Within a burst: probe again every [`PROBE_INTERVAL`]; true once the
    /// burst has lasted [`DIRECT_TIMEOUT`].
    fn burst_step(&mut self, now: Instant) -> (bool, PathAction) {
        let Some(since) = self.probing_since else {
            return (false, PathAction::Idle);
        };
        if now.saturating_duration_since(since) >= self.timing.direct_timeout {
            self.probing_since = None;
            return (true, PathAction::Idle);
        }
        let again = self
            .last_probe
            .is_none_or(|t| now.saturating_duration_since(t) >= self.timing.probe_interval);
        if again {
            return (false, self.probe(now));
        }
        (false, PathAction::Idle)
    }

    /// Traffic wants a path and none is selected: decide how to start.
    pub fn start(&mut self, now: Instant) -> PathAction {
        if self.selected.is_some() {
            return PathAction::Idle;
        }
        if self.both_hard() {
            self.relay_reason = Some(RelayReason::BothHardNat);
            return PathAction::UseRelay(RelayReason::BothHardNat);
        }
        if self.candidates.is_empty() {
            self.relay_reason = Some(RelayReason::NoCandidates);
            return PathAction::UseRelay(RelayReason::NoCandidates);
        }
        self.probe(now)
    }

    /// An authenticated answer came straight from `from`: direct wins.
    pub fn on_direct(&mut self, from: SocketAddr) {
        self.selected = Some(Path::Direct(from));
        self.relay_reason = None;
        self.probing_since = None;
        self.silent_direct = None;
        self.round = None;
        self.last_keep = None;
    }

    /// The relay path is in use.
    pub fn on_relay(&mut self, reason: RelayReason) {
        if !matches!(self.selected, Some(Path::Direct(_))) {
            self.selected = Some(Path::Relay);
            self.relay_reason = Some(reason);
        }
    }

    /// Moves to the relay even from a direct path: a new session came up
    /// through the relay, or the direct path went silent. Direct is probed
    /// again after [`DIRECT_RETRY`], not at once (it was just found wanting,
    /// or the peer just chose the relay).
    pub fn switch_to_relay(&mut self, reason: RelayReason, now: Instant) {
        if self.selected != Some(Path::Relay) {
            self.last_burst = Some(now);
        }
        self.selected = Some(Path::Relay);
        self.relay_reason = Some(reason);
        // The relay this burst asked for came up: the burst probes on (a
        // slower punch still takes the path). Otherwise direct waits for
        // the next retry.
        if !self.relay_asked {
            self.probing_since = None;
        }
    }

    /// The direct endpoint `left` went silent under traffic: the relay
    /// carries the pair, and `left` is pinged every [`PATH_HEARTBEAT`]
    /// until it answers or the path is chosen again.
    pub fn direct_went_silent(&mut self, left: SocketAddr, now: Instant) {
        self.switch_to_relay(RelayReason::DirectSilent, now);
        self.silent_direct = Some((left, now));
    }

    /// Adds direct candidates known without the registry (the endpoint in
    /// use, the one that worked before a restart) when it gave none.
    pub fn seed_candidates(&mut self, known: Vec<SocketAddr>) {
        if self.candidates.is_empty() {
            self.candidates = known;
        }
    }

    /// The selected path stopped working (the session was lost): start over.
    pub fn reset(&mut self) {
        self.selected = None;
        self.probing_since = None;
        self.silent_direct = None;
        self.relay_asked = false;
        self.round = None;
        self.last_keep = None;
    }

    /// One step of the reopening rounds (relayed, no burst going): the
    /// keeper's keepalives, the sender's burst after the quiet, the next
    /// round once this one's burst is over.
    fn reopen_step(&mut self, now: Instant) -> PathAction {
        let (_, since) = *self.round.get_or_insert((0, now));
        let burst_at = since + REOPEN_QUIET;
        if now >= burst_at + self.timing.direct_timeout {
            // The sender's burst is over (on the sender's side, the burst's
            // end starts the next round): roles swap.
            self.next_round(now);
            return PathAction::Idle;
        }
        if self.keeping() == Some(true) {
            let due = self.last_keep.map_or(since, |t| t) + KEEP_EVERY;
            if now >= due {
                self.last_keep = Some(now);
                return PathAction::KeepMapping(self.candidates.clone());
            }
            return PathAction::Idle;
        }
        if now >= burst_at {
            return self.probe(now);
        }
        PathAction::Idle
    }

    /// The next reopening round starts now (its quiet part).
    fn next_round(&mut self, now: Instant) {
        let n = self.round.map_or(0, |(n, _)| n + 1);
        self.round = Some((n, now));
        self.last_keep = None;
    }

    /// When [`reopen_step`](Self::reopen_step) has something to do.
    fn reopen_deadline(&self, now: Instant) -> Instant {
        let Some((_, since)) = self.round else {
            return now;
        };
        let end = since + REOPEN_QUIET + self.timing.direct_timeout;
        if self.keeping() == Some(true) {
            let keep = self.last_keep.map_or(since, |t| t) + KEEP_EVERY;
            return keep.min(end);
        }
        since + REOPEN_QUIET
    }

    /// The earliest instant at which [`poll`](Self::poll) may answer
    /// something other than `Idle` (`now` if that is at once).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if let Some(since) = self.probing_since {
            let mut next = self
                .last_probe
                .map_or(since, |t| t + self.timing.probe_interval)
                .min(since + self.timing.direct_timeout);
            if self.selected.is_none() && !self.relay_asked {
                next = next.min(since + self.timing.relay_after);
            }
            return Some(next);
        }
        let ping = self
            .silent_direct
            .filter(|_| self.selected == Some(Path::Relay))
            .map(|(_, t)| t + self.timing.path_heartbeat);
        let retry = match self.selected {
            Some(Path::Relay) if self.reopens() => Some(self.reopen_deadline(now)),
            Some(Path::Relay) if !self.both_hard() && !self.candidates.is_empty() => Some(
                self.last_burst
                    .map_or(now, |t| t + self.timing.direct_retry),
            ),
            _ => None,
        };
        match (ping, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due now.
    pub fn poll(&mut self, now: Instant) -> PathAction {
        match self.selected {
            None => {
                // Unanswered for `relay_after`: traffic goes through the
                // relay now, once, while the burst probes on.
                let waited = self
                    .probing_since
                    .is_some_and(|s| now.saturating_duration_since(s) >= self.timing.relay_after);
                if waited && !self.relay_asked {
                    self.relay_asked = true;
                    self.relay_reason = Some(RelayReason::NoDirectAnswer);
                    return PathAction::UseRelay(RelayReason::NoDirectAnswer);
                }
                match self.burst_step(now) {
                    (true, _) if !self.relay_asked => {
                        self.relay_reason = Some(RelayReason::NoDirectAnswer);
                        PathAction::UseRelay(RelayReason::NoDirectAnswer)
                    }
                    (true, _) => PathAction::Idle,
                    (false, a) => a,
                }
            }
            Some(Path::Relay) => {
                if let Some((addr, t)) = self.silent_direct {
                    if now.saturating_duration_since(t) >= self.timing.path_heartbeat {
                        self.silent_direct = Some((addr, now));
                        return PathAction::PingDirect(addr);
                    }
                }
                if self.both_hard() {
                    return PathAction::Idle;
                }
                if self.probing_since.is_some() {
                    let (ended, a) = self.burst_step(now);
                    if ended && self.reopens() {
                        self.next_round(now);
                    }
                    return a;
                }
                if self.reopens() {
                    return self.reopen_step(now);
                }
                let due = self
                    .last_burst
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.timing.direct_retry);
                if due {
                    return self.probe(now);
                }
                PathAction::Idle
            }
            Some(Path::Direct(_)) => PathAction::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    /// A toy model of NATs: which (from, to) pairs get through. An
    /// endpoint-independent NAT lets a peer in once the inside host sent to
    /// it; a per-destination NAT gives every destination a new port, so the
    /// port the registry saw is never the one a peer must use.
    struct Net {
        open: HashMap<(char, char), bool>,
    }

    impl Net {
        fn new(a: NatType, b: NatType) -> Self {
            let hard = |n| n == NatType::PerDestination;
            let mut open = HashMap::new();
            // Simultaneous probes open both easy NATs; a hard NAT on either
            // side breaks it (the other side's probe goes to a stale port).
            let works = !(hard(a) || hard(b));
            open.insert(('a', 'b'), works);
            open.insert(('b', 'a'), works);
            Net { open }
        }
    }

    fn ep(n: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 7], n))
    }

    /// Drives the path state of `a` towards `b` through the toy network,
    /// stepping a simulated clock every 100 ms.
    fn run(a_nat: NatType, b_nat: NatType, secs: u64) -> (PathState, Vec<(u64, PathAction)>) {
        let net = Net::new(a_nat, b_nat);
        let mut p = PathState::default();
        p.set_nat(a_nat, b_nat);
        let t0 = Instant::now();
        p.set_candidates(vec![ep(1)], t0);
        let apply = |p: &mut PathState, a: &PathAction| match a {
            PathAction::Idle => {}
            PathAction::ProbeDirect(_) => {
                if net.open[&('a', 'b')] {
                    p.on_direct(ep(1));
                }
            }
            PathAction::UseRelay(r) => p.on_relay(*r),
            PathAction::PingDirect(_) => unreachable!("no path here goes silent"),
            PathAction::KeepMapping(_) => {}
        };
        let first = p.start(t0);
        apply(&mut p, &first);
        let mut log = vec![(0, first)];
        let mut now = t0;
        while now < t0 + Duration::from_secs(secs) {
            now += Duration::from_millis(100);
            let a = p.poll(now);
            if a == PathAction::Idle {
                continue;
            }
            apply(&mut p, &a);
            log.push((now.duration_since(t0).as_secs(), a));
        }
        (p, log)
    }

    #[test]
    fn easy_nats_go_direct_at_once() {
        let (p, log) = run(
            NatType::EndpointIndependent,
            NatType::EndpointIndependent,
            10,
        );
        assert_eq!(p.selected(), Some(Path::Direct(ep(1))));
        assert_eq!(log.len(), 1, "one probe round, no fallback: {log:?}");
    }

    #[test]
    fn hard_to_easy_uses_the_relay_within_a_second_probes_on_and_retries_every_minute() {
        let (p, log) = run(NatType::PerDestination, NatType::EndpointIndependent, 130);
        assert_eq!(p.selected(), Some(Path::Relay));
        assert_eq!(p.relay_reason(), Some(RelayReason::NoDirectAnswer));
        // Probes at 0 and 0.5 s, the relay at 0.9 s (RELAY_AFTER), then the
        // burst goes on (1.0 and 1.5 s) until DIRECT_TIMEOUT.
        assert_eq!(
            log[2],
            (0, PathAction::UseRelay(RelayReason::NoDirectAnswer)),
            "{log:?}"
        );
        assert_eq!(
            log.iter()
                .filter(|(s, a)| *s < 2 && matches!(a, PathAction::ProbeDirect(_)))
                .count(),
            4,
            "{log:?}"
        );
        assert_eq!(
            log.iter()
                .filter(|(_, a)| matches!(a, PathAction::UseRelay(_)))
                .count(),
            1,
            "the relay is asked for once: {log:?}"
        );
        let probes: Vec<u64> = log
            .iter()
            .skip(1)
            .filter(|(_, a)| matches!(a, PathAction::ProbeDirect(_)))
            .map(|(s, _)| *s)
            .collect();
        let mut bursts = probes.clone();
        bursts.dedup_by(|b, a| *b - *a < 5);
        assert_eq!(
            bursts,
            vec![0, 60, 120],
            "direct retried in a burst every 60 s: {probes:?}"
        );
    }

    #[test]
    fn a_slower_punch_still_takes_the_path_after_the_relay_started() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = PathState::default();
        p.set_nat(NatType::EndpointIndependent, NatType::EndpointIndependent);
        p.set_candidates(vec![ep(1)], t0);
        assert!(matches!(p.start(t0), PathAction::ProbeDirect(_)));
        assert_eq!(p.next_deadline(t0), Some(ms(500)));
        assert!(matches!(p.poll(ms(500)), PathAction::ProbeDirect(_)));
        assert_eq!(p.next_deadline(ms(500)), Some(ms(900)));
        assert_eq!(p.poll(ms(850)), PathAction::Idle);
        assert_eq!(
            p.poll(ms(900)),
            PathAction::UseRelay(RelayReason::NoDirectAnswer)
        );
        p.on_relay(RelayReason::NoDirectAnswer);
        // The burst goes on through the relay's first traffic...
        assert!(matches!(p.poll(ms(1000)), PathAction::ProbeDirect(_)));
        // ...and a direct answer within it takes the path.
        p.on_direct(ep(1));
        assert_eq!(p.selected(), Some(Path::Direct(ep(1))));
        assert_eq!(p.relay_reason(), None);
    }

    #[test]
    fn both_hard_relays_at_once_and_does_not_probe() {
        let (p, log) = run(NatType::PerDestination, NatType::PerDestination, 130);
        assert_eq!(log[0].1, PathAction::UseRelay(RelayReason::BothHardNat));
        assert_eq!(p.selected(), Some(Path::Relay));
        assert_eq!(log.len(), 1, "{log:?}");
    }

    #[test]
    fn relayed_peer_upgrades_when_endpoints_change() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_nat(NatType::EndpointIndependent, NatType::Unknown);
        p.set_candidates(vec![ep(1)], t0);
        assert!(matches!(p.start(t0), PathAction::ProbeDirect(_)));
        assert!(matches!(
            p.poll(t0 + PROBE_INTERVAL),
            PathAction::ProbeDirect(_)
        ));
        assert_eq!(
            p.poll(t0 + PROBE_INTERVAL + Duration::from_millis(100)),
            PathAction::Idle
        );
        assert_eq!(
            p.poll(t0 + DIRECT_TIMEOUT),
            PathAction::UseRelay(RelayReason::NoDirectAnswer)
        );
        p.on_relay(RelayReason::NoDirectAnswer);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(p.poll(t1), PathAction::Idle);
        // The peer moved: probe at once, and the answer takes over.
        assert_eq!(
            p.set_candidates(vec![ep(2)], t1),
            PathAction::ProbeDirect(vec![ep(2)])
        );
        p.on_direct(ep(2));
        assert_eq!(p.selected(), Some(Path::Direct(ep(2))));
        assert_eq!(p.relay_reason(), None);
    }

    #[test]
    fn punch_request_starts_a_burst_unless_direct_or_both_hard() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_candidates(vec![ep(1)], t0);
        assert!(matches!(p.punch(t0), PathAction::ProbeDirect(_)));
        p.on_direct(ep(1));
        assert_eq!(p.punch(t0), PathAction::Idle);
        let mut q = PathState::default();
        q.set_nat(NatType::PerDestination, NatType::PerDestination);
        q.set_candidates(vec![ep(1)], t0);
        assert_eq!(q.punch(t0), PathAction::Idle);
    }

    #[test]
    fn no_candidates_means_relay() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        assert_eq!(p.start(t0), PathAction::UseRelay(RelayReason::NoCandidates));
    }

    #[test]
    fn a_stray_relay_packet_does_not_downgrade_direct() {
        let mut p = PathState::default();
        p.on_direct(ep(3));
        p.on_relay(RelayReason::NoDirectAnswer);
        assert_eq!(p.selected(), Some(Path::Direct(ep(3))));
    }

    #[test]
    fn a_switch_to_the_relay_leaves_direct_and_retries_it_a_minute_later() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_candidates(vec![ep(1)], t0);
        p.on_direct(ep(1));
        let t1 = t0 + Duration::from_secs(300);
        p.switch_to_relay(RelayReason::DirectSilent, t1);
        assert_eq!(p.selected(), Some(Path::Relay));
        assert_eq!(p.relay_reason(), Some(RelayReason::DirectSilent));
        // Direct was just found wanting: not probed again at once.
        assert_eq!(p.poll(t1), PathAction::Idle);
        assert_eq!(p.next_deadline(t1), Some(t1 + DIRECT_RETRY));
        assert_eq!(
            p.poll(t1 + DIRECT_RETRY),
            PathAction::ProbeDirect(vec![ep(1)])
        );
        p.on_direct(ep(1));
        assert_eq!(p.selected(), Some(Path::Direct(ep(1))));
    }

    #[test]
    fn a_direct_path_given_up_for_silence_is_pinged_until_it_answers() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_candidates(vec![ep(1)], t0);
        p.on_direct(ep(1));
        p.direct_went_silent(ep(1), t0);
        assert_eq!(p.selected(), Some(Path::Relay));
        assert_eq!(p.relay_reason(), Some(RelayReason::DirectSilent));
        let mut pings = vec![];
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            now += Duration::from_millis(100);
            match p.poll(now) {
                PathAction::PingDirect(a) => {
                    assert_eq!(a, ep(1));
                    pings.push(now.duration_since(t0).as_millis());
                }
                PathAction::Idle => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(pings, vec![3000, 6000, 9000]);
        assert_eq!(p.next_deadline(now), Some(t0 + Duration::from_secs(12)));
        // It answered: direct again, no more pings.
        p.on_direct(ep(1));
        assert_eq!(p.next_deadline(now), None);
        assert_eq!(p.poll(now + Duration::from_secs(5)), PathAction::Idle);
        // A relay chosen for other reasons pings nothing.
        p.switch_to_relay(RelayReason::PeerRelayed, now);
        assert!(!matches!(
            p.poll(now + Duration::from_secs(5)),
            PathAction::PingDirect(_)
        ));
    }

    /// Two bare Linux masquerade NATs side by side (no firewall, no router
    /// between them), as conntrack treats them: every probe that leaves a
    /// NAT reaches the other one; one that matches no mapping there leaves
    /// an unreplied entry (forgotten after 30 s without packets), and a
    /// host whose NAT holds such an entry for its usual tuple gets a new
    /// port for its own mapping, which the other NAT's mapping never
    /// matches. A [`PathAction::KeepMapping`] refreshes its sender's own
    /// mapping and goes no further.
    #[derive(Default)]
    struct BareNats {
        /// Per side: its own mapping towards the peer (on its usual port
        /// or not, last packet), and the unreplied entry the peer's probes
        /// left at its NAT (last packet).
        mapping: [Option<(bool, Instant)>; 2],
        poison: [Option<Instant>; 2],
    }

    const CONNTRACK_UNREPLIED: Duration = Duration::from_secs(30);

    impl BareNats {
        fn live(t: Option<Instant>, now: Instant) -> bool {
            t.is_some_and(|t| now.saturating_duration_since(t) < CONNTRACK_UNREPLIED)
        }
        /// Side `x` sends a probe at `now`: true if it gets through to the
        /// peer's host (the answer then returns on the same mappings).
        fn probe(&mut self, x: usize, now: Instant) -> bool {
            let y = 1 - x;
            let usual = match self.mapping[x] {
                Some((usual, t)) if Self::live(Some(t), now) => usual,
                _ => !Self::live(self.poison[x], now),
            };
            self.mapping[x] = Some((usual, now));
            let theirs = self.mapping[y].filter(|(_, t)| Self::live(Some(*t), now));
            if usual && theirs.is_some_and(|(u, _)| u) {
                return true;
            }
            if usual {
                self.poison[y] = Some(now);
            }
            false
        }
        fn keep(&mut self, x: usize, now: Instant) {
            if let Some((u, t)) = self.mapping[x] {
                if Self::live(Some(t), now) {
                    self.mapping[x] = Some((u, now));
                }
            }
        }
    }

    /// What a side did when (s, side, action).
    type Log = Vec<(u64, usize, PathAction)>;

    /// Runs a pair behind [`BareNats`] from a punch in which side `first`
    /// probes 1 ms before the other, with side 0 leading; returns both
    /// path states and when (s) they went direct, if they did.
    fn run_bare(first: usize, secs: u64) -> ([PathState; 2], Option<u64>, Log) {
        let t0 = Instant::now();
        let mut nets = BareNats::default();
        let mut p: [PathState; 2] = Default::default();
        for (i, q) in p.iter_mut().enumerate() {
            q.set_nat(NatType::EndpointIndependent, NatType::EndpointIndependent);
            q.set_lead(i == 0);
            q.set_candidates(vec![ep(i as u16)], t0);
        }
        let mut log = vec![];
        let mut direct_at = None;
        let mut act =
            |p: &mut [PathState; 2], i: usize, a: PathAction, now: Instant, log: &mut Vec<_>| {
                let s = now.duration_since(t0).as_secs();
                match &a {
                    PathAction::Idle => return,
                    PathAction::ProbeDirect(_) => {
                        if nets.probe(i, now) {
                            p[0].on_direct(ep(1));
                            p[1].on_direct(ep(0));
                            direct_at.get_or_insert(s);
                        }
                    }
                    PathAction::UseRelay(r) => p[i].on_relay(*r),
                    PathAction::KeepMapping(_) => nets.keep(i, now),
                    PathAction::PingDirect(_) => unreachable!("no direct path goes silent here"),
                }
                log.push((s, i, a));
            };
        let a = p[first].start(t0);
        act(&mut p, first, a, t0, &mut log);
        let t1 = t0 + Duration::from_millis(1);
        let a = p[1 - first].punch(t1);
        act(&mut p, 1 - first, a, t1, &mut log);
        let mut now = t1;
        while now < t0 + Duration::from_secs(secs) {
            now += Duration::from_millis(100);
            for i in [first, 1 - first] {
                let a = p[i].poll(now);
                act(&mut p, i, a, now, &mut log);
            }
        }
        (p, direct_at, log)
    }

    #[test]
    fn bare_nats_side_by_side_go_direct_within_90_s_whichever_side_was_poisoned() {
        for first in [0, 1] {
            let (p, at, log) = run_bare(first, 90);
            let at = at.unwrap_or_else(|| panic!("side {first} first: still relayed: {log:?}"));
            assert!(at < 90, "direct after {at} s");
            for q in &p {
                assert!(matches!(q.selected(), Some(Path::Direct(_))), "{log:?}");
            }
            // The first burst failed (the pair was relayed meanwhile).
            assert!(
                at >= 30,
                "direct at {at} s, before any mapping could expire: {log:?}"
            );
            // The keeper sent nothing that reaches the peer in its round;
            // the sender probed only once the entry it left had expired.
            assert!(
                log.iter()
                    .any(|(_, _, a)| matches!(a, PathAction::KeepMapping(_))),
                "{log:?}"
            );
        }
    }

    #[test]
    fn bare_nats_rounds_keep_going_and_stay_quiet_between_bursts() {
        // Side 1 first, so side 0 (the first round's keeper) holds the
        // poisoned NAT: the first round fails, the second works.
        let (_, at, log) = run_bare(1, 90);
        let at = at.expect("direct in the second round");
        assert!((60..90).contains(&at), "second round: {at} s; {log:?}");
        // Between the first burst and the first round's burst (35 s of
        // quiet), nothing that reaches the peer: keepalives only.
        let full: Vec<u64> = log
            .iter()
            .filter(|(_, _, a)| matches!(a, PathAction::ProbeDirect(_)))
            .map(|(s, _, _)| *s)
            .collect();
        assert!(full.iter().all(|s| *s < 3 || *s >= 35), "{full:?}");
    }

    #[test]
    fn the_first_probe_of_a_burst_is_an_opener_unless_a_side_is_public() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_nat(NatType::EndpointIndependent, NatType::EndpointIndependent);
        p.set_candidates(vec![ep(1)], t0);
        assert!(matches!(p.start(t0), PathAction::ProbeDirect(_)));
        assert!(p.opens(t0));
        assert!(!p.opens(t0 + PROBE_INTERVAL), "only the first probe");
        for (l, r) in [
            (NatType::None, NatType::EndpointIndependent),
            (NatType::PerDestination, NatType::None),
        ] {
            let mut q = PathState::default();
            q.set_nat(l, r);
            q.set_candidates(vec![ep(1)], t0);
            q.start(t0);
            assert!(!q.opens(t0), "{l:?} {r:?}");
        }
    }

    #[test]
    fn hard_nats_and_silent_direct_paths_do_not_reopen() {
        // A per-destination NAT gets no rounds: the 60 s retry, no keepalives.
        let (_, log) = run(NatType::EndpointIndependent, NatType::PerDestination, 130);
        assert!(
            !log.iter()
                .any(|(_, a)| matches!(a, PathAction::KeepMapping(_))),
            "{log:?}"
        );
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_lead(true);
        p.set_candidates(vec![ep(1)], t0);
        p.on_direct(ep(1));
        p.direct_went_silent(ep(1), t0);
        let mut now = t0;
        while now < t0 + Duration::from_secs(50) {
            now += Duration::from_millis(100);
            assert!(!matches!(p.poll(now), PathAction::KeepMapping(_)));
        }
    }

    #[test]
    fn candidates_known_without_the_registry_are_probed() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.seed_candidates(vec![ep(4)]);
        assert_eq!(p.start(t0), PathAction::ProbeDirect(vec![ep(4)]));
        // The registry's answer replaces them; a seed never replaces it.
        p.set_candidates(vec![ep(5)], t0);
        p.seed_candidates(vec![ep(4)]);
        assert_eq!(p.candidates(), &[ep(5)]);
    }
}
