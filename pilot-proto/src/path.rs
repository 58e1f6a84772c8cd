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

use std::net::SocketAddr;
use std::time::Instant;

use crate::messages::NatType;

pub use crate::timers::{DIRECT_RETRY, DIRECT_TIMEOUT, PATH_HEARTBEAT, PROBE_INTERVAL};

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
                    return self.burst_step(now).1;
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
