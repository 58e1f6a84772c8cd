//! The timing rules of a tunnel, as pure functions of `now`.
//!
//! One [`PeerTimers`] per peer records the few instants the rules need; the
//! event loop asks [`PeerTimers::poll`] what to do and
//! [`PeerTimers::next_deadline`] when to ask again.

use std::time::{Duration, Instant};

/// Start a new handshake once the current session is this old.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// The responder of a session waits a little longer before rekeying itself,
/// so the two sides do not both start a handshake at the same moment.
pub const RESPONDER_REKEY_AFTER: Duration = Duration::from_secs(130);
/// Never use a session key after this age.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Resend an unanswered initiation after this (plus jitter).
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(5);
/// Stop trying to reach a peer after this long without an answer.
pub const HANDSHAKE_GIVE_UP: Duration = Duration::from_secs(90);
/// Send something at least this often, so NAT mappings stay open.
pub const KEEPALIVE: Duration = Duration::from_secs(25);
/// A session that heard nothing for this long is not worth rekeying.
pub const PEER_SILENT: Duration = Duration::from_secs(60);
/// Answer data with a keepalive if we have sent nothing for this long, so
/// the peer knows the session still works.
pub const PASSIVE_KEEPALIVE: Duration = Duration::from_secs(10);
/// Data sent and nothing heard back for this long: the peer probably lost
/// the session (it restarted): start a new handshake.
pub const NO_REPLY: Duration = Duration::from_secs(15);

/// Data sent and nothing heard for this long: ask the peer for a sign of
/// life (an in-tunnel echo it answers at once), so a dead path shows in
/// seconds rather than at the no-reply handshake.
pub const PATH_HEARTBEAT: Duration = Duration::from_secs(3);
/// While a heartbeat goes unanswered, it is sent again this often (one
/// lost echo or answer must not condemn a working path).
pub const HEARTBEAT_REPEAT: Duration = Duration::from_secs(1);
/// Data sent and nothing heard for this long, heartbeats included: the path
/// is silent; give it up for the relay.
pub const PATH_GIVE_UP: Duration = Duration::from_millis(6500);

/// How long a burst of direct probes lasts: a direct answer within it
/// takes the path, also after traffic went to the relay.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long traffic waits for a direct answer before it starts through the
/// relay (the burst goes on to [`DIRECT_TIMEOUT`] meanwhile, so a slower
/// hole punch still wins the path).
pub const RELAY_AFTER: Duration = Duration::from_millis(900);
/// How often a relayed peer is probed directly again.
pub const DIRECT_RETRY: Duration = Duration::from_secs(60);
/// Probes repeat this often within a probing burst: the first probes of a
/// hole punch are often dropped by a NAT that has not yet seen our side's.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Every duration the tunnel rules use. [`Timing::DEFAULT`] in production;
/// tests that model minutes of protocol time in seconds divide it with
/// [`Timing::scaled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// [`REKEY_AFTER`].
    pub rekey_after: Duration,
    /// [`RESPONDER_REKEY_AFTER`].
    pub responder_rekey_after: Duration,
    /// [`REJECT_AFTER`].
    pub reject_after: Duration,
    /// [`HANDSHAKE_RETRY`].
    pub handshake_retry: Duration,
    /// [`HANDSHAKE_GIVE_UP`].
    pub handshake_give_up: Duration,
    /// [`KEEPALIVE`].
    pub keepalive: Duration,
    /// [`PEER_SILENT`].
    pub peer_silent: Duration,
    /// [`PASSIVE_KEEPALIVE`].
    pub passive_keepalive: Duration,
    /// [`NO_REPLY`].
    pub no_reply: Duration,
    /// [`PATH_HEARTBEAT`].
    pub path_heartbeat: Duration,
    /// [`HEARTBEAT_REPEAT`].
    pub heartbeat_repeat: Duration,
    /// [`PATH_GIVE_UP`].
    pub path_give_up: Duration,
    /// [`DIRECT_TIMEOUT`].
    pub direct_timeout: Duration,
    /// [`RELAY_AFTER`].
    pub relay_after: Duration,
    /// [`DIRECT_RETRY`].
    pub direct_retry: Duration,
    /// [`PROBE_INTERVAL`].
    pub probe_interval: Duration,
}

impl Timing {
    /// The production values.
    pub const DEFAULT: Timing = Timing {
        rekey_after: REKEY_AFTER,
        responder_rekey_after: RESPONDER_REKEY_AFTER,
        reject_after: REJECT_AFTER,
        handshake_retry: HANDSHAKE_RETRY,
        handshake_give_up: HANDSHAKE_GIVE_UP,
        keepalive: KEEPALIVE,
        peer_silent: PEER_SILENT,
        passive_keepalive: PASSIVE_KEEPALIVE,
        no_reply: NO_REPLY,
        path_heartbeat: PATH_HEARTBEAT,
        heartbeat_repeat: HEARTBEAT_REPEAT,
        path_give_up: PATH_GIVE_UP,
        direct_timeout: DIRECT_TIMEOUT,
        relay_after: RELAY_AFTER,
        direct_retry: DIRECT_RETRY,
        probe_interval: PROBE_INTERVAL,
    };

    /// Every duration divided by `factor` (1 to 1000; anything else is
    /// clamped into that range), keeping their order.
    pub fn scaled(factor: u32) -> Timing {
        let f = factor.clamp(1, 1000);
        let d = Timing::DEFAULT;
        Timing {
            rekey_after: d.rekey_after / f,
            responder_rekey_after: d.responder_rekey_after / f,
            reject_after: d.reject_after / f,
            handshake_retry: d.handshake_retry / f,
            handshake_give_up: d.handshake_give_up / f,
            keepalive: d.keepalive / f,
            peer_silent: d.peer_silent / f,
            passive_keepalive: d.passive_keepalive / f,
            no_reply: d.no_reply / f,
            path_heartbeat: d.path_heartbeat / f,
            heartbeat_repeat: d.heartbeat_repeat / f,
            path_give_up: d.path_give_up / f,
            direct_timeout: d.direct_timeout / f,
            relay_after: d.relay_after / f,
            direct_retry: d.direct_retry / f,
            probe_interval: d.probe_interval / f,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::DEFAULT
    }
}

/// What a peer's timers ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAction {
    /// Nothing is due.
    Idle,
    /// Send a (new) handshake initiation.
    Handshake,
    /// Send an empty data packet.
    Keepalive,
    /// The current session is too old to use: drop its keys.
    ExpireSession,
    /// The handshake went unanswered too long: stop, drop queued packets.
    GiveUp,
    /// Data went unanswered for [`PATH_HEARTBEAT`]: send the peer an
    /// in-tunnel echo request (and call
    /// [`PeerTimers::on_heartbeat_sent`]).
    Heartbeat,
    /// Data and heartbeats went unanswered for [`PATH_GIVE_UP`]: the path
    /// in use is silent (call [`PeerTimers::on_path_given_up`]).
    PathSilent,
}

/// The instants the rules depend on.
#[derive(Clone, Debug, Default)]
pub struct PeerTimers {
    timing: Timing,
    session_started: Option<Instant>,
    session_initiator: bool,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    handshake_started: Option<Instant>,
    handshake_sent: Option<Instant>,
    retry_jitter: Duration,
    /// The first data sent since the peer was last heard from: the no-reply
    /// rule counts from here, so steady traffic cannot postpone it forever.
    unanswered_since: Option<Instant>,
    /// The first data received since we last sent anything: the passive
    /// keepalive counts from here, so a steady one-way stream is answered.
    unreplied_since: Option<Instant>,
    /// The last heartbeat sent in the current unanswered spell.
    heartbeat_sent: Option<Instant>,
    /// The current unanswered spell already gave its path up.
    path_given_up: bool,
}

impl PeerTimers {
    /// Timers with these durations.
    pub fn new(timing: Timing) -> Self {
        PeerTimers {
            timing,
            ..Default::default()
        }
    }

    /// A new session was established.
    pub fn on_session(&mut self, now: Instant, initiator: bool) {
        self.session_started = Some(now);
        self.session_initiator = initiator;
        self.handshake_started = None;
        self.handshake_sent = None;
        self.last_received = Some(now);
        self.end_unanswered();
    }
    /// The session was dropped (revocation, expiry).
    pub fn clear_session(&mut self) {
        self.session_started = None;
    }
    /// Anything was sent to the peer.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        if self.unreplied_since.is_some_and(|q| now >= q) {
            self.unreplied_since = None;
        }
    }
    /// An authenticated packet came from the peer.
    pub fn on_received(&mut self, now: Instant) {
        self.last_received = Some(now);
        if self.unanswered_since.is_some_and(|u| now >= u) {
            self.end_unanswered();
        }
    }
    /// The peer answered (or the spell is moot): forget the spell's
    /// heartbeats and verdict with it.
    fn end_unanswered(&mut self) {
        self.unanswered_since = None;
        self.heartbeat_sent = None;
        self.path_given_up = false;
    }
    /// A heartbeat (echo request) went out.
    pub fn on_heartbeat_sent(&mut self, now: Instant) {
        self.heartbeat_sent = Some(now);
        self.last_sent = Some(now);
    }
    /// The silent path was given up; the spell asks for nothing more until
    /// the peer is heard from (the no-reply handshake still follows).
    pub fn on_path_given_up(&mut self) {
        self.path_given_up = true;
    }
    /// A data packet (not a keepalive) was sent.
    pub fn on_data_sent(&mut self, now: Instant) {
        let unanswered = self.last_received.is_none_or(|r| r < now);
        if unanswered && self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }
    /// A data packet (not a keepalive) was received.
    pub fn on_data_received(&mut self, now: Instant) {
        self.on_received(now);
        let unreplied = self.last_sent.is_none_or(|s| s < now);
        if unreplied && self.unreplied_since.is_none() {
            self.unreplied_since = Some(now);
        }
    }
    /// An initiation was sent; `jitter` (0..=333 ms, the caller's randomness)
    /// spreads retries.
    pub fn on_handshake_sent(&mut self, now: Instant, jitter: Duration) {
        if self.handshake_started.is_none() {
            self.handshake_started = Some(now);
        }
        self.handshake_sent = Some(now);
        self.retry_jitter = jitter;
    }
    /// Stop any handshake in progress.
    pub fn cancel_handshake(&mut self) {
        self.handshake_started = None;
        self.handshake_sent = None;
        // Given up: unanswered data does not start the next round by itself.
        self.end_unanswered();
    }
    /// True while an initiation is unanswered.
    pub fn handshake_in_flight(&self) -> bool {
        self.handshake_started.is_some()
    }
    /// Age of the current session.
    pub fn session_age(&self, now: Instant) -> Option<Duration> {
        self.session_started
            .map(|s| now.saturating_duration_since(s))
    }

    fn rekey_after(&self) -> Duration {
        if self.session_initiator {
            self.timing.rekey_after
        } else {
            self.timing.responder_rekey_after
        }
    }

    /// What is due now. Call again after acting on the answer.
    pub fn poll(&self, now: Instant) -> TimerAction {
        if let Some(started) = self.handshake_started {
            // Why: a peer that never answers must not be retried forever.
            if now.saturating_duration_since(started) >= self.timing.handshake_give_up {
                return TimerAction::GiveUp;
            }
        }
        if let Some(age) = self.session_age(now) {
            // Why: a key is never used past its reject age (forward secrecy
            // bound, and the peer refuses it anyway).
            if age >= self.timing.reject_after {
                return TimerAction::ExpireSession;
            }
        }
        if let Some(sent) = self.handshake_sent {
            // Why: initiations and responses can be lost; retry with jitter.
            if now.saturating_duration_since(sent)
                >= self.timing.handshake_retry + self.retry_jitter
            {
                return TimerAction::Handshake;
            }
            return self.keepalive_due(now);
        }
        if self.session_started.is_some() {
            if let Some(sent) = self.unanswered_since {
                let quiet = now.saturating_duration_since(sent);
                // Why: data went out and nothing came back for 15 s although
                // the peer answers data within 10 s (below): it lost the
                // session.
                if quiet >= self.timing.no_reply {
                    return TimerAction::Handshake;
                }
                if !self.path_given_up {
                    // Why: not even a heartbeat was answered for 6.5 s: the
                    // path is dead (a cut, a NAT that forgot us); another
                    // path must carry the pair long before the no-reply
                    // handshake.
                    if quiet >= self.timing.path_give_up {
                        return TimerAction::PathSilent;
                    }
                    // Why: a peer that only receives answers data no sooner
                    // than its passive keepalive; an echo request is answered
                    // at once, so silence after it means the path.
                    let repeat = self.heartbeat_sent.is_none_or(|h| {
                        now.saturating_duration_since(h) >= self.timing.heartbeat_repeat
                    });
                    if quiet >= self.timing.path_heartbeat && repeat {
                        return TimerAction::Heartbeat;
                    }
                }
            }
            // Why: the peer sent data and we said nothing for 10 s; tell it
            // the session works (keepalives themselves are not answered).
            if let Some(r) = self.unreplied_since {
                if now.saturating_duration_since(r) >= self.timing.passive_keepalive {
                    return TimerAction::Keepalive;
                }
            }
        }
        if let Some(age) = self.session_age(now) {
            // Why: fresh keys every two minutes bound what one key protects;
            // only for a peer that is still talking at that moment.
            if age >= self.rekey_after() && self.alive_at_rekey() {
                return TimerAction::Handshake;
            }
        }
        self.keepalive_due(now)
    }

    /// The peer was heard within [`PEER_SILENT`] before the session's rekey
    /// moment (judged at that moment, so a late poll decides the same).
    fn alive_at_rekey(&self) -> bool {
        match (self.session_started, self.last_received) {
            (Some(s), Some(r)) => r + self.timing.peer_silent > s + self.rekey_after(),
            _ => false,
        }
    }

    fn keepalive_due(&self, now: Instant) -> TimerAction {
        if self.session_started.is_none() {
            return TimerAction::Idle;
        }
        // Why: NAT mappings close after ~30 s of silence.
        match self.last_sent {
            Some(s) if now.saturating_duration_since(s) < self.timing.keepalive => {
                TimerAction::Idle
            }
            _ => TimerAction::Keepalive,
        }
    }

    /// The earliest instant at which [`poll`](Self::poll) may answer
    /// something other than `Idle`.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Mirrors `poll`: every instant returned here makes `poll` act (or
        // the state change that moved it), so a caller never spins.
        let mut d: Option<Instant> = None;
        let mut add = |t: Instant| d = Some(d.map_or(t, |d: Instant| d.min(t)));
        if let Some(s) = self.handshake_started {
            add(s + self.timing.handshake_give_up);
        }
        if let Some(s) = self.session_started {
            add(s + self.timing.reject_after);
        }
        if let Some(sent) = self.handshake_sent {
            add(sent + self.timing.handshake_retry + self.retry_jitter);
        } else if let Some(s) = self.session_started {
            if let Some(u) = self.unanswered_since {
                add(u + self.timing.no_reply);
                if !self.path_given_up {
                    add(u + self.timing.path_give_up);
                    add(self
                        .heartbeat_sent
                        .map_or(u + self.timing.path_heartbeat, |h| {
                            h + self.timing.heartbeat_repeat
                        }));
                }
            }
            if let Some(r) = self.unreplied_since {
                add(r + self.timing.passive_keepalive);
            }
            if self.alive_at_rekey() {
                add(s + self.rekey_after());
            }
        }
        if let Some(s) = self.session_started {
            add(self.last_sent.map_or(s, |l| l + self.timing.keepalive));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated clock that jumps from deadline to deadline, acting as the
    /// event loop would (a handshake "completes" when `answer` says so).
    fn run(
        t: &mut PeerTimers,
        start: Instant,
        until: Duration,
        answer: impl Fn(Instant) -> bool,
    ) -> Vec<(u64, TimerAction)> {
        let mut now = start;
        let mut log = vec![];
        for _ in 0..10_000 {
            let Some(next) = t.next_deadline() else { break };
            now = next.max(now);
            if now > start + until {
                break;
            }
            let action = t.poll(now);
            let secs = now.duration_since(start).as_secs();
            match action {
                TimerAction::Idle => {
                    // A deadline whose condition is not met (a silent
                    // peer is not rekeyed): step on by the clock tick.
                    now += Duration::from_secs(1);
                    continue;
                }
                TimerAction::Handshake => {
                    t.on_handshake_sent(now, Duration::ZERO);
                    t.on_sent(now);
                    if answer(now) {
                        t.on_session(now, true);
                    }
                }
                TimerAction::Keepalive => t.on_sent(now),
                TimerAction::ExpireSession => t.clear_session(),
                TimerAction::GiveUp => t.cancel_handshake(),
                TimerAction::Heartbeat => t.on_heartbeat_sent(now),
                TimerAction::PathSilent => t.on_path_given_up(),
            }
            log.push((secs, action));
        }
        log
    }

    #[test]
    fn rekeys_every_120s_while_peer_talks() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        t.on_sent(start);
        // The peer keeps talking: receive something every time we look.
        let mut now = start;
        let mut rekeys = vec![];
        while now < start + Duration::from_secs(400) {
            now += Duration::from_secs(1);
            t.on_received(now);
            match t.poll(now) {
                TimerAction::Handshake => {
                    rekeys.push(now.duration_since(start).as_secs());
                    t.on_session(now, true);
                }
                TimerAction::Keepalive => t.on_sent(now),
                TimerAction::Idle => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rekeys, vec![120, 240, 360]);
    }

    #[test]
    fn responder_rekeys_later_than_initiator() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, false);
        t.on_sent(start);
        t.on_received(start + Duration::from_secs(125));
        assert_eq!(
            t.poll(start + Duration::from_secs(125)),
            TimerAction::Keepalive
        );
        t.on_sent(start + Duration::from_secs(125));
        assert_eq!(t.poll(start + Duration::from_secs(126)), TimerAction::Idle);
        assert_eq!(
            t.poll(start + Duration::from_secs(130)),
            TimerAction::Handshake
        );
    }

    #[test]
    fn silent_session_expires_at_180s_and_is_not_rekeyed() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        let log = run(&mut t, start, Duration::from_secs(200), |_| false);
        assert!(
            !log.iter().any(|(_, a)| *a == TimerAction::Handshake),
            "no rekey for a silent peer: {log:?}"
        );
        assert!(log.contains(&(180, TimerAction::ExpireSession)), "{log:?}");
        // keepalives every 25 s until expiry
        let ka: Vec<u64> = log
            .iter()
            .filter(|(_, a)| *a == TimerAction::Keepalive)
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(ka, vec![0, 25, 50, 75, 100, 125, 150, 175]);
    }

    #[test]
    fn unanswered_handshake_retries_every_5s_then_gives_up_at_90s() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_handshake_sent(start, Duration::ZERO);
        let log = run(&mut t, start, Duration::from_secs(120), |_| false);
        let retries: Vec<u64> = log
            .iter()
            .filter(|(_, a)| *a == TimerAction::Handshake)
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(retries.first(), Some(&5));
        assert_eq!(retries.last(), Some(&85));
        assert_eq!(retries.len(), 17);
        assert!(log.contains(&(90, TimerAction::GiveUp)));
        assert!(!t.handshake_in_flight());
    }

    #[test]
    fn data_without_reply_starts_a_new_handshake_after_15s() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        t.on_sent(start);
        let s = start + Duration::from_secs(30);
        t.on_received(s - Duration::from_secs(1));
        t.on_sent(s);
        t.on_data_sent(s);
        // First the path rules (heartbeats, then the silent path given up;
        // see `a_silent_path_is_heartbeaten_then_given_up`).
        for _ in 0..10 {
            match t.poll(s + Duration::from_secs(14)) {
                TimerAction::Heartbeat => t.on_heartbeat_sent(s + Duration::from_secs(5)),
                TimerAction::PathSilent => t.on_path_given_up(),
                _ => break,
            }
        }
        assert_eq!(t.poll(s + Duration::from_secs(14)), TimerAction::Idle);
        assert_eq!(t.next_deadline(), Some(s + NO_REPLY));
        assert_eq!(t.poll(s + NO_REPLY), TimerAction::Handshake);
        // An answer in time means nothing is wrong.
        t.on_received(s + Duration::from_secs(3));
        assert_eq!(t.poll(s + NO_REPLY), TimerAction::Idle);
    }

    #[test]
    fn received_data_is_answered_within_10s() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, false);
        t.on_sent(start);
        let r = start + Duration::from_secs(5);
        t.on_data_received(r);
        assert_eq!(t.poll(r + Duration::from_secs(9)), TimerAction::Idle);
        assert_eq!(t.poll(r + PASSIVE_KEEPALIVE), TimerAction::Keepalive);
        t.on_sent(r + PASSIVE_KEEPALIVE);
        assert_eq!(t.poll(r + Duration::from_secs(11)), TimerAction::Idle);
        // A keepalive received (on_received only) is not answered.
        let k = r + Duration::from_secs(12);
        t.on_received(k);
        assert_eq!(t.poll(k + Duration::from_secs(11)), TimerAction::Idle);
    }

    #[test]
    fn jitter_delays_retry() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_handshake_sent(start, Duration::from_millis(300));
        assert_eq!(t.poll(start + Duration::from_secs(5)), TimerAction::Idle);
        assert_eq!(
            t.poll(start + Duration::from_millis(5300)),
            TimerAction::Handshake
        );
    }

    #[test]
    fn steady_traffic_does_not_postpone_the_no_reply_handshake() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        // Data every 100 ms, nothing ever comes back (the peer restarted).
        let mut now = start;
        let mut fired = None;
        while now < start + Duration::from_secs(40) && fired.is_none() {
            now += Duration::from_millis(100);
            t.on_sent(now);
            t.on_data_sent(now);
            if t.poll(now) == TimerAction::Handshake {
                fired = Some(now.duration_since(start));
            }
        }
        let fired = fired.expect("a handshake while data goes unanswered");
        assert!(fired <= Duration::from_millis(15_200), "{fired:?}");
    }

    #[test]
    fn a_steady_one_way_stream_is_answered_every_10s() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, false);
        t.on_sent(start);
        let mut now = start;
        let mut answers = vec![];
        while now < start + Duration::from_secs(35) {
            now += Duration::from_millis(100);
            t.on_data_received(now);
            if t.poll(now) == TimerAction::Keepalive {
                answers.push(now.duration_since(start).as_millis() / 100);
                t.on_sent(now);
            }
        }
        assert_eq!(answers, vec![101, 202, 303]);
    }

    /// Drives a session whose data stops being answered at `s`: the actions
    /// due, by the millisecond, acting on each as the machine does.
    fn silent_spell(t: &mut PeerTimers, s: Instant, until: Duration) -> Vec<(u128, TimerAction)> {
        let mut log = vec![];
        let mut now = s;
        for _ in 0..100 {
            let Some(next) = t.next_deadline() else { break };
            now = next.max(now);
            if now > s + until {
                break;
            }
            let a = t.poll(now);
            match a {
                TimerAction::Heartbeat => t.on_heartbeat_sent(now),
                TimerAction::PathSilent => t.on_path_given_up(),
                TimerAction::Keepalive => t.on_sent(now),
                TimerAction::Handshake => t.on_handshake_sent(now, Duration::ZERO),
                TimerAction::Idle => now += Duration::from_millis(1),
                _ => {}
            }
            if a != TimerAction::Idle {
                log.push((now.duration_since(s).as_millis(), a));
            }
        }
        log
    }

    #[test]
    fn a_silent_path_is_heartbeaten_then_given_up() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        t.on_sent(start);
        let s = start + Duration::from_secs(20);
        t.on_received(s - Duration::from_millis(100));
        t.on_sent(s);
        t.on_data_sent(s);
        let log = silent_spell(&mut t, s, Duration::from_secs(16));
        assert_eq!(
            log,
            vec![
                (3000, TimerAction::Heartbeat),
                (4000, TimerAction::Heartbeat),
                (5000, TimerAction::Heartbeat),
                (6000, TimerAction::Heartbeat),
                (6500, TimerAction::PathSilent),
                (15000, TimerAction::Handshake),
            ],
            "heartbeats every second from 3 s, the path given up at 6.5 s, the no-reply handshake at 15 s"
        );
    }

    #[test]
    fn an_answered_heartbeat_keeps_the_path() {
        let start = Instant::now();
        let mut t = PeerTimers::default();
        t.on_session(start, true);
        let s = start + Duration::from_secs(1);
        t.on_sent(s);
        t.on_data_sent(s);
        assert_eq!(t.poll(s + PATH_HEARTBEAT), TimerAction::Heartbeat);
        t.on_heartbeat_sent(s + PATH_HEARTBEAT);
        // The echo's answer: the spell is over, nothing is due.
        t.on_received(s + PATH_HEARTBEAT + Duration::from_millis(20));
        assert_eq!(t.poll(s + PATH_GIVE_UP), TimerAction::Idle);
        assert_eq!(t.poll(s + NO_REPLY), TimerAction::Idle);
        // The next spell starts its own heartbeats.
        let s2 = s + Duration::from_secs(30);
        t.on_sent(s2);
        t.on_data_sent(s2);
        assert_eq!(t.next_deadline(), Some(s2 + PATH_HEARTBEAT));
        assert_eq!(t.poll(s2 + PATH_HEARTBEAT), TimerAction::Heartbeat);
    }

    #[test]
    fn a_scaled_timing_keeps_the_path_rules_in_order() {
        let t = Timing::scaled(10);
        assert!(t.path_heartbeat < t.path_give_up && t.path_give_up < t.no_reply);
        assert!(t.heartbeat_repeat < t.path_give_up - t.path_heartbeat);
        assert_eq!(t.path_give_up, Duration::from_millis(650));
    }
}
