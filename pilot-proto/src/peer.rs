//! One trusted peer's tunnel as a state machine: it owns the peer's timers,
//! its path (direct or relay), the handshakes in flight, the live sessions
//! and the packets waiting for a session.
//!
//! Sans-IO in the manner of quinn-proto's `Connection`: inputs are
//! `handle_*(now, …)` calls, outputs are read with [`Peer::poll_transmit`],
//! [`Peer::poll_event`] and [`Peer::poll_timeout`]. Session indexes, the
//! handshake timestamp, retry jitter and our keys come from an [`Env`] the
//! caller passes in; the clock is always an argument. No locks, no I/O.
//!
//! The data plane does not go through this machine: the caller installs the
//! sessions it announces ([`Event::Install`]) in its own index table and
//! seals and opens data packets itself. What the data plane decides on its
//! own per packet (roaming, a responder switching to a new session, when it
//! last sent and received) comes back with [`Peer::handle_activity`]. While
//! data flows, [`Peer::poll_timeout`] asks for such a sync at least every
//! [`ACTIVITY_SYNC`], so the timers that data starts (the passive keepalive,
//! the no-reply handshake) fire within that much of their time. While it
//! does not, the machine sleeps until its next timer and the caller wakes it
//! on the first data packet ([`Peer::wants_data_wake`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cookie::{self, COOKIE_USE_FOR};
use crate::handshake::{self, HandshakeError, Initiator, MacKey, Responder};
use crate::identity::NodeId;
use crate::messages::{NatType, MAX_ENDPOINTS};
use crate::path::{Path, PathAction, PathState, RelayReason, KEEP_TTL, OPENER_TTL, OPEN_LEAD};
use crate::session::{CipherSuite, Session};
use crate::timers::{PeerTimers, TimerAction, Timing, KEEPALIVE};
use crate::wire::{self, HandshakeResp, COOKIE_LEN, DATA_HEADER_LEN, INIT_LEN, TAG_LEN};

/// Packets kept per peer while it has no session; the oldest goes first.
pub const QUEUE_LIMIT: usize = 64;
/// Initiations kept in flight (a direct probe and one through the relay
/// may race; the first answer wins).
pub const MAX_INITIATORS: usize = 8;
/// An unanswered initiation is forgotten after this.
pub const INITIATOR_LIFETIME: Duration = Duration::from_secs(30);
/// While data flows, the caller syncs [`Activity`] at least this often.
pub const ACTIVITY_SYNC: Duration = Duration::from_secs(1);
/// Data within this long counts as flowing; after it, the machine stops
/// asking for syncs and the caller wakes it on the next data packet
/// instead ([`Peer::wants_data_wake`]).
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(30);
/// How long after answering an initiation the machine keeps syncing to see
/// the initiator's first packet on the new session (which moves the path).
/// Later, the next sync of any kind still sees it.
pub const CONFIRM_WINDOW: Duration = Duration::from_secs(10);

/// In-tunnel control: an echo request (an 8-byte nonce follows).
pub const CTL_PING: u8 = 0x01;
/// In-tunnel control: an echo reply (the request's nonce follows).
pub const CTL_PONG: u8 = 0x02;
/// The high half of the nonce of a path heartbeat (an echo request the
/// machine sends itself, see [`TimerAction::Heartbeat`]); its answer is no
/// [`Event::Pong`]. A caller's random nonce has this half with odds of
/// 2^-32, and then only its pong is missed.
const HEARTBEAT_NONCE: u64 = 0x6862_6561_0000_0000;

/// What the machine needs from the node around it: keys, and the sources of
/// indexes, timestamps and randomness (passed in, so tests are exact).
pub trait Env {
    /// Our X25519 static secret.
    fn static_secret(&self) -> &[u8; 32];
    /// The data cipher for sessions we initiate.
    fn suite(&self) -> CipherSuite;
    /// A session index unused by any other session of this node.
    fn fresh_index(&mut self) -> u32;
    /// A handshake timestamp greater than every one this node sent before.
    fn next_timestamp(&mut self) -> u64;
    /// Retry jitter, 0..=333 ms.
    fn jitter(&mut self) -> Duration;
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where: straight to an endpoint, or through the relay to this peer.
    pub to: Path,
    /// The tunnel datagram (without any relay header).
    pub bytes: Vec<u8>,
    /// Send it with this IP TTL (hop limit) instead of the socket's: it
    /// dies that many routers out (NAT traversal; see [`crate::path`]).
    pub hop_limit: Option<u8>,
}

/// Something the caller must apply or may report.
#[derive(Clone)]
pub enum Event {
    /// A new session: put it in the data plane's index table; make it the
    /// one to send with if `current`.
    Install {
        /// The session.
        session: Arc<Session>,
        /// Send with it from now on.
        current: bool,
    },
    /// A session past its reject age: remove its index.
    Retire {
        /// Its local index.
        local_index: u32,
    },
    /// No session may be used for sending any more.
    ClearCurrent,
    /// Send to this path from now on, even if another one is in use.
    UsePath(Path),
    /// Send to this path unless a direct endpoint is in use (direct wins
    /// while it works).
    OfferPath(Path),
    /// A session came up.
    Established {
        /// Over which path.
        path: Path,
        /// True if we initiated it.
        initiator: bool,
    },
    /// A direct endpoint answered: worth remembering across restarts.
    DirectWorked(SocketAddr),
    /// Ask the registry where the peer is (answer with
    /// [`Peer::handle_lookup`]).
    NeedLookup,
    /// No direct answer: traffic goes through the relay.
    RelayFallback(RelayReason),
    /// The peer did not answer for the whole handshake give-up time.
    GaveUp,
    /// The echo for one of our pings.
    Pong {
        /// The nonce we sent.
        nonce: u64,
    },
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Install { session, current } => f
                .debug_struct("Install")
                .field("index", &session.local_index)
                .field("initiator", &session.initiator)
                .field("current", current)
                .finish(),
            Event::Retire { local_index } => write!(f, "Retire({local_index})"),
            Event::ClearCurrent => write!(f, "ClearCurrent"),
            Event::UsePath(p) => write!(f, "UsePath({p:?})"),
            Event::OfferPath(p) => write!(f, "OfferPath({p:?})"),
            Event::Established { path, initiator } => {
                write!(f, "Established({path:?}, initiator={initiator})")
            }
            Event::DirectWorked(a) => write!(f, "DirectWorked({a})"),
            Event::NeedLookup => write!(f, "NeedLookup"),
            Event::RelayFallback(r) => write!(f, "RelayFallback({r:?})"),
            Event::GaveUp => write!(f, "GaveUp"),
            Event::Pong { nonce } => write!(f, "Pong({nonce})"),
        }
    }
}

/// What the data plane did on its own since the last sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Last authenticated packet from the peer.
    pub last_rx: Option<Instant>,
    /// Last data packet sent to the peer.
    pub last_tx: Option<Instant>,
    /// Last data (not keepalive) packet from the peer.
    pub last_data_rx: Option<Instant>,
    /// Where the data plane sends now.
    pub endpoint: Option<Path>,
    /// The local index of the session the data plane sends with.
    pub current: Option<u32>,
}

/// Why a handshake message was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The initiation's timestamp is not newer than the last accepted one
    /// (a replay).
    #[error("initiation timestamp not newer than the last accepted one")]
    OldTimestamp,
    /// The response answers none of our initiations in flight.
    #[error("response to no initiation of ours")]
    UnknownIndex,
    /// Noise, MAC or payload failure.
    #[error("handshake failed: {0}")]
    Handshake(HandshakeError),
    /// A cookie reply that does not open for an initiation of ours.
    #[error("cookie reply refused: {0}")]
    Cookie(#[from] crate::cookie::CookieError),
}

/// One of our initiations, waiting for its response.
struct InFlight {
    init: Initiator,
    sent: Instant,
    /// The datagram as sent without `mac2` (a cookie reply opens with its
    /// `mac1`, and the initiation is sent again with the cookie).
    msg: [u8; INIT_LEN],
    /// True once it was sent again with a cookie (once is enough).
    cookied: bool,
}

/// One trusted peer.
pub struct Peer {
    timing: Timing,
    id: NodeId,
    static_public: [u8; 32],
    timers: PeerTimers,
    path: PathState,
    initiators: Vec<InFlight>,
    /// The peer's cookie for our source, when it was under load, and when
    /// it came.
    cookie: Option<([u8; COOKIE_LEN], Instant)>,
    sessions: Vec<Arc<Session>>,
    current: Option<Arc<Session>>,
    endpoint: Option<Path>,
    queue: VecDeque<Vec<u8>>,
    candidates: Vec<SocketAddr>,
    last_init_timestamp: u64,
    /// The newest session we answered, and the path its initiation came
    /// over, until a packet on it authenticates.
    unconfirmed: Option<(Arc<Session>, Path)>,
    rtt: Option<Duration>,
    lookup_in_flight: bool,
    last_handshake: Option<Instant>,
    last_sync: Option<Instant>,
    last_now: Option<Instant>,
    seen: Activity,
    heartbeats: u32,
    transmits: VecDeque<Transmit>,
    /// Full probes that follow a burst's opener (see `crate::path`), and
    /// when they go.
    deferred: Vec<(Instant, Transmit)>,
    events: VecDeque<Event>,
}

impl Peer {
    /// A freshly trusted peer with its X25519 static key, and the direct
    /// endpoint that worked last time, if any.
    pub fn new(id: NodeId, static_public: [u8; 32], last_endpoint: Option<SocketAddr>) -> Self {
        Self::with_timing(id, static_public, last_endpoint, Timing::DEFAULT)
    }

    /// [`new`](Self::new) with other durations (tests that run minutes of
    /// protocol time in seconds).
    pub fn with_timing(
        id: NodeId,
        static_public: [u8; 32],
        last_endpoint: Option<SocketAddr>,
        timing: Timing,
    ) -> Self {
        Peer {
            timing,
            id,
            static_public,
            timers: PeerTimers::new(timing),
            path: PathState::new(timing),
            initiators: vec![],
            cookie: None,
            sessions: vec![],
            current: None,
            endpoint: None,
            queue: VecDeque::new(),
            candidates: last_endpoint.into_iter().collect(),
            last_init_timestamp: 0,
            unconfirmed: None,
            rtt: None,
            lookup_in_flight: false,
            last_handshake: None,
            last_sync: None,
            last_now: None,
            seen: Activity::default(),
            heartbeats: 0,
            transmits: VecDeque::new(),
            deferred: vec![],
            events: VecDeque::new(),
        }
    }

    // ---- what the caller reads ----

    /// The peer's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Its X25519 static key.
    pub fn static_public(&self) -> &[u8; 32] {
        &self.static_public
    }
    /// The path in use, as the data plane last reported it or as we set it.
    pub fn endpoint(&self) -> Option<Path> {
        self.endpoint
    }
    /// Why the peer is relayed, if it is.
    pub fn relay_reason(&self) -> Option<RelayReason> {
        self.path.relay_reason()
    }
    /// The last round-trip time measured (ping or handshake).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }
    /// Records which of the pair keeps first when punching failed: `lead`
    /// is true on the side with the lower node id (see [`crate::path`]).
    pub fn set_lead(&mut self, lead: bool) {
        self.path.set_lead(lead);
    }
    /// Records a round trip measured outside (an in-tunnel ping).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(rtt);
    }
    /// When the last handshake completed.
    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }
    /// True while a session can be sent with.
    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }
    /// True while one of our initiations is unanswered.
    pub fn handshake_in_flight(&self) -> bool {
        self.timers.handshake_in_flight()
    }
    /// True if `index` belongs to one of our initiations in flight.
    pub fn owns_initiation(&self, index: u32) -> bool {
        self.initiators
            .iter()
            .any(|f| f.init.local_index() == index)
    }
    /// Local indexes of every live session.
    pub fn session_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions.iter().map(|s| s.local_index)
    }
    /// The timestamp of the newest initiation accepted from the peer. The
    /// caller keeps it across restarts
    /// ([`restore_last_init_timestamp`](Self::restore_last_init_timestamp)),
    /// so an initiation captured earlier cannot be replayed after one.
    pub fn last_init_timestamp(&self) -> u64 {
        self.last_init_timestamp
    }
    /// Restores the timestamp kept from an earlier run (never lowers it).
    pub fn restore_last_init_timestamp(&mut self, ts: u64) {
        self.last_init_timestamp = self.last_init_timestamp.max(ts);
    }
    /// Packets waiting for a session.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Direct endpoints to probe: the one in use, then the candidates.
    pub fn destinations(&self) -> Vec<SocketAddr> {
        let mut d: Vec<SocketAddr> = match self.endpoint {
            Some(Path::Direct(a)) => vec![a],
            _ => vec![],
        };
        for c in &self.candidates {
            if !d.contains(c) {
                d.push(*c);
            }
        }
        d.truncate(MAX_ENDPOINTS);
        d
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut d = self.timers.next_deadline();
        let mut add = |t: Instant| d = Some(d.map_or(t, |d: Instant| d.min(t)));
        if let Some(t) = self.last_now.and_then(|now| self.path.next_deadline(now)) {
            add(t);
        }
        for s in &self.sessions {
            add(s.created + self.timing.reject_after);
        }
        for f in &self.initiators {
            add(f.sent + INITIATOR_LIFETIME);
        }
        for (t, _) in &self.deferred {
            add(*t);
        }
        if let Some((s, _)) = &self.unconfirmed {
            // Why: the path follows an answered initiation only once the
            // initiator's first packet on it authenticates, which only a
            // sync shows.
            if let Some(since) = self.last_sync.or(self.last_handshake) {
                if since < s.created + CONFIRM_WINDOW {
                    add(since + ACTIVITY_SYNC);
                }
            }
        }
        if self.current.is_some() && self.data_recent() {
            // Why: data the data plane moves starts timers we only learn of
            // at a sync; sync often while it may have moved any.
            if let Some(since) = self.last_sync.or(self.last_handshake) {
                add(since + ACTIVITY_SYNC);
            }
        }
        d
    }

    /// True when the caller should wake the machine (sync its activity) on
    /// the next data packet to or from the peer: a session is up and no
    /// data moved lately, so no sync is scheduled.
    pub fn wants_data_wake(&self) -> bool {
        self.current.is_some() && !self.data_recent()
    }

    fn data_recent(&self) -> bool {
        let Some(now) = self.last_now else {
            return false;
        };
        [self.seen.last_tx, self.seen.last_data_rx]
            .into_iter()
            .flatten()
            .any(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }

    // ---- inputs ----

    /// A packet for the peer found no usable session: keep it and get one.
    pub fn handle_outbound(&mut self, now: Instant, packet: Vec<u8>, env: &mut dyn Env) {
        self.last_now = Some(now);
        self.enqueue(packet);
        if self.current.is_some() {
            // The data plane raced a session install: send at once.
            self.drain_queue(now, false);
            return;
        }
        if self.timers.handshake_in_flight() {
            return;
        }
        if self.destinations().is_empty() && self.path.selected().is_none() {
            // Nothing known yet: ask the registry first (its answer also
            // carries the peer's NAT type); the answer handshakes.
            self.need_lookup();
            return;
        }
        self.connect(now, env);
    }

    /// Sends an in-tunnel echo request with `nonce` (answered by
    /// [`Event::Pong`]), connecting first if needed.
    pub fn send_ping(&mut self, now: Instant, nonce: u64, env: &mut dyn Env) {
        self.last_now = Some(now);
        let mut msg = vec![CTL_PING];
        msg.extend_from_slice(&nonce.to_le_bytes());
        if self.current.is_some() {
            self.send_first(now, msg);
        } else {
            self.enqueue(msg);
            if !self.timers.handshake_in_flight() {
                self.connect(now, env);
            }
        }
    }

    /// An authenticated in-tunnel control message from the peer. Returns
    /// false if it was not one we know.
    pub fn handle_control(&mut self, now: Instant, msg: &[u8]) -> bool {
        self.last_now = Some(now);
        match (msg.first(), msg.len()) {
            (Some(&CTL_PING), 9) => {
                let mut pong = msg.to_vec();
                pong[0] = CTL_PONG;
                if self.current.is_some() {
                    self.send_first(now, pong);
                }
                true
            }
            (Some(&CTL_PONG), 9) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&msg[1..9]);
                let nonce = u64::from_le_bytes(n);
                // A heartbeat's answer did its work by arriving (the data
                // plane saw an authenticated packet).
                if nonce & 0xffff_ffff_0000_0000 != HEARTBEAT_NONCE {
                    self.events.push_back(Event::Pong { nonce });
                }
                true
            }
            _ => false,
        }
    }

    /// The registry's answer to [`Event::NeedLookup`]: the peer's direct
    /// candidates and NAT type, or `None` if it could not answer.
    pub fn handle_lookup(
        &mut self,
        now: Instant,
        answer: Option<(Vec<SocketAddr>, NatType)>,
        local_nat: NatType,
        env: &mut dyn Env,
    ) {
        self.lookup_in_flight = false;
        match answer {
            Some((endpoints, nat)) => {
                self.candidates = endpoints.clone();
                self.path.set_nat(local_nat, nat);
                let probe = self.path.set_candidates(endpoints, now);
                let wants = !self.queue.is_empty() || self.current.is_none();
                if let PathAction::ProbeDirect(c) = probe {
                    self.start_handshake(now, HandshakeVia::Direct(c), env);
                } else if wants && !self.timers.handshake_in_flight() {
                    self.connect(now, env);
                }
            }
            None => {
                if !self.queue.is_empty() && !self.timers.handshake_in_flight() {
                    // No registry answer: a cached direct endpoint may
                    // still work (the relay needs the registry too).
                    self.connect(now, env);
                }
            }
        }
    }

    /// The registry says the peer is probing us right now: probe back in a
    /// burst so both NATs open towards each other.
    pub fn handle_punch(
        &mut self,
        now: Instant,
        endpoints: Vec<SocketAddr>,
        nat: NatType,
        local_nat: NatType,
        env: &mut dyn Env,
    ) {
        self.last_now = Some(now);
        self.path.set_nat(local_nat, nat);
        self.candidates = endpoints.clone();
        let _ = self.path.set_candidates(endpoints, now);
        if let PathAction::ProbeDirect(c) = self.path.punch(now) {
            self.start_handshake(now, HandshakeVia::Direct(c), env);
        }
    }

    /// An initiation from this peer, already checked by the caller: the MAC,
    /// the rate limit, Noise (`resp`), and that its static key is this
    /// peer's. Answers it over `via` with a new session under `local_index`.
    pub fn handle_init(
        &mut self,
        now: Instant,
        resp: Responder,
        via: Path,
        local_index: u32,
    ) -> Result<(), Refused> {
        self.last_now = Some(now);
        if resp.timestamp() <= self.last_init_timestamp {
            return Err(Refused::OldTimestamp);
        }
        self.last_init_timestamp = resp.timestamp();
        let (session, msg) = resp.accept(local_index, now).map_err(Refused::Handshake)?;
        self.install(now, session, via);
        self.transmits.push_back(Transmit {
            to: via,
            bytes: msg.to_vec(),
            hop_limit: None,
        });
        Ok(())
    }

    /// A response to one of our initiations (see
    /// [`owns_initiation`](Self::owns_initiation)), arrived over `via`.
    pub fn handle_resp(
        &mut self,
        now: Instant,
        own_mac: &MacKey,
        resp: HandshakeResp<'_>,
        via: Path,
    ) -> Result<(), Refused> {
        self.last_now = Some(now);
        let pos = self
            .initiators
            .iter()
            .position(|f| f.init.local_index() == resp.receiver_index())
            .ok_or(Refused::UnknownIndex)?;
        let InFlight { init, sent, .. } = self.initiators.remove(pos);
        let session = init
            .finish(own_mac, resp, now)
            .map_err(Refused::Handshake)?;
        self.rtt = Some(now.saturating_duration_since(sent));
        // Other initiations of this round are moot now.
        self.initiators.clear();
        self.install(now, session, via);
        self.timers.on_sent(now);
        // Send what waited, or a keepalive so the responder switches.
        self.drain_queue(now, true);
        Ok(())
    }

    /// A cookie reply to one of our initiations (see
    /// [`owns_initiation`](Self::owns_initiation)), arrived over `via`: the
    /// peer is under load. The cookie is kept for the initiations to come,
    /// and this one is sent again over `via` with it, once, so the
    /// handshake does not wait for the retry timer.
    pub fn handle_cookie(&mut self, now: Instant, reply: &[u8], via: Path) -> Result<(), Refused> {
        self.last_now = Some(now);
        let index = wire::CookieReply::new_checked(reply)
            .map_err(|_| cookie::CookieError::Malformed)?
            .receiver_index();
        let f = self
            .initiators
            .iter_mut()
            .find(|f| f.init.local_index() == index)
            .ok_or(Refused::UnknownIndex)?;
        let c = cookie::open_reply(&self.static_public, reply, &f.msg)?;
        self.cookie = Some((c, now));
        if !f.cookied {
            f.cookied = true;
            let bytes = cookie::with_mac2(&f.msg, &c);
            self.transmits.push_back(Transmit {
                to: via,
                bytes,
                hop_limit: None,
            });
        }
        Ok(())
    }

    /// What the data plane did since the last sync.
    pub fn handle_activity(&mut self, now: Instant, a: Activity) {
        self.last_now = Some(now);
        self.last_sync = Some(now);
        // Only what changed since the last sync: an unchanged old instant
        // must not move a timer back past what we sent ourselves since.
        let seen = std::mem::replace(&mut self.seen, a);
        if let Some(t) = a.last_rx.filter(|_| a.last_rx != seen.last_rx) {
            self.timers.on_received(t);
        }
        if let Some(t) = a.last_tx.filter(|_| a.last_tx != seen.last_tx) {
            // The data plane sends only data.
            self.timers.on_sent(t);
            self.timers.on_data_sent(t);
        }
        if let Some(t) = a
            .last_data_rx
            .filter(|_| a.last_data_rx != seen.last_data_rx)
        {
            self.timers.on_data_received(t);
        }
        if a.endpoint.is_some() {
            self.endpoint = a.endpoint;
        }
        // The data plane moved to a direct endpoint (an authenticated packet
        // came straight from the peer): the path follows.
        if let (Some(Path::Direct(addr)), Some(Path::Relay)) = (a.endpoint, self.path.selected()) {
            self.path.on_direct(addr);
        }
        // A responder session the data plane switched to.
        if let Some(i) = a.current {
            if self.current.as_ref().is_none_or(|c| c.local_index != i) {
                if let Some(s) = self.sessions.iter().find(|s| s.local_index == i) {
                    self.current = Some(s.clone());
                }
            }
        }
        // The initiator of a session we answered sent on it: the handshake
        // completed, and the path it came over is taken now, even a new
        // port or the relay in place of a direct endpoint (a restarted or
        // cut-off peer comes back that way).
        if let Some((session, via)) = self.unconfirmed.take_if(|(s, _)| s.has_received()) {
            // A session we initiated since then chose the path already.
            let newest = self.sessions.iter().all(|o| o.created <= session.created);
            match via {
                // The data plane heard from the peer elsewhere since: the
                // newer authenticated source wins.
                Path::Direct(_) if a.endpoint != Some(via) => {}
                Path::Relay if !newest => {}
                _ => self.take_path(now, via, false),
            }
            if !self.queue.is_empty() {
                self.drain_queue(now, false);
            }
        }
    }

    /// Runs the timers and path rules due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, env: &mut dyn Env) {
        self.last_now = Some(now);
        if !self.deferred.is_empty() {
            let (due, later): (Vec<_>, Vec<_>) =
                self.deferred.drain(..).partition(|(t, _)| *t <= now);
            self.deferred = later;
            self.transmits.extend(due.into_iter().map(|(_, t)| t));
        }
        // Forget sessions past their reject age.
        let (old, live): (Vec<_>, Vec<_>) = self
            .sessions
            .drain(..)
            .partition(|s| now.saturating_duration_since(s.created) >= self.timing.reject_after);
        self.sessions = live;
        if self
            .unconfirmed
            .as_ref()
            .is_some_and(|(u, _)| old.iter().any(|s| Arc::ptr_eq(s, u)))
        {
            self.unconfirmed = None;
        }
        for s in old {
            if self.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &s)) {
                self.current = None;
                self.events.push_back(Event::ClearCurrent);
            }
            self.events.push_back(Event::Retire {
                local_index: s.local_index,
            });
        }
        self.initiators
            .retain(|f| now.saturating_duration_since(f.sent) < INITIATOR_LIFETIME);
        match self.path.poll(now) {
            PathAction::Idle => {}
            PathAction::UseRelay(reason) => {
                self.path.on_relay(reason);
                self.set_endpoint(Path::Relay, true);
                self.events.push_back(Event::RelayFallback(reason));
                self.start_handshake(now, HandshakeVia::Relay, env);
                return;
            }
            PathAction::ProbeDirect(c) => {
                self.start_handshake(now, HandshakeVia::Direct(c), env);
                return;
            }
            PathAction::KeepMapping(c) => {
                // Not counted as sent either: it dies at our own NAT.
                let msg = self.heartbeat_msg();
                for a in c {
                    self.seal_to(Path::Direct(a), &msg, Some(KEEP_TTL));
                }
            }
            PathAction::PingDirect(addr) => {
                // Not counted as sent: it may well be lost, and the relay
                // path still needs its keepalives.
                let msg = self.heartbeat_msg();
                self.seal_to(Path::Direct(addr), &msg, None);
            }
        }
        match self.timers.poll(now) {
            TimerAction::Idle => {}
            TimerAction::Handshake => {
                let unanswered = self.timers.handshake_in_flight();
                let direct = matches!(self.path.selected(), Some(Path::Direct(_)));
                if unanswered
                    && self.path.selected().is_some()
                    && (self.current.is_none() || direct)
                {
                    // The chosen path stopped answering: choose again (a
                    // short direct burst, then the relay). A direct path is
                    // chosen again even while its session is young: retrying
                    // a dead endpoint until the give-up would leave the pair
                    // dark although the relay reaches it. A relayed peer
                    // with a session retries through the relay.
                    self.path.reset();
                }
                if self.destinations().is_empty() && self.path.selected().is_none() {
                    self.need_lookup();
                }
                self.connect(now, env);
            }
            TimerAction::Keepalive => {
                self.timers.on_sent(now);
                if self.current.is_some() {
                    self.drain_queue(now, true);
                }
            }
            TimerAction::ExpireSession => {
                self.current = None;
                self.events.push_back(Event::ClearCurrent);
                self.timers.clear_session();
            }
            TimerAction::Heartbeat => {
                self.timers.on_heartbeat_sent(now);
                if self.current.is_some() {
                    let msg = self.heartbeat_msg();
                    self.send_first(now, msg);
                }
            }
            TimerAction::PathSilent => {
                self.timers.on_path_given_up();
                // A silent relay has no better path to go to; the no-reply
                // handshake follows it.
                if let Some(Path::Direct(left)) = self.endpoint {
                    self.path.direct_went_silent(left, now);
                    // What we send goes through the relay at once, on the
                    // session we have; the peer moves when the new session
                    // through the relay reaches it (see `take_path`).
                    self.set_endpoint(Path::Relay, true);
                    self.events
                        .push_back(Event::RelayFallback(RelayReason::DirectSilent));
                    self.start_handshake(now, HandshakeVia::Relay, env);
                }
            }
            TimerAction::GiveUp => {
                self.timers.cancel_handshake();
                self.initiators.clear();
                self.queue.clear();
                self.path.reset();
                self.events.push_back(Event::GaveUp);
                // Maybe it moved: ask the registry.
                self.lookup_in_flight = false;
                self.need_lookup();
            }
        }
    }

    /// Connect again now (start-up, the registry came back): from the
    /// direct endpoints known, and by asking the registry.
    pub fn reconnect(&mut self, now: Instant, env: &mut dyn Env) {
        self.last_now = Some(now);
        if self.current.is_some() || self.timers.handshake_in_flight() {
            return;
        }
        let dests = self.destinations();
        if !dests.is_empty() {
            self.start_handshake(now, HandshakeVia::Direct(dests), env);
        }
        self.need_lookup();
    }

    /// Trust ended: drop every session and everything queued. The caller
    /// removes the indexes ([`session_indexes`](Self::session_indexes)).
    pub fn close(&mut self) {
        self.current = None;
        self.sessions.clear();
        self.unconfirmed = None;
        self.initiators.clear();
        self.queue.clear();
        self.transmits.clear();
        self.deferred.clear();
        self.timers = PeerTimers::new(self.timing);
    }

    // ---- internals ----

    fn need_lookup(&mut self) {
        if !self.lookup_in_flight {
            self.lookup_in_flight = true;
            self.events.push_back(Event::NeedLookup);
        }
    }

    fn enqueue(&mut self, pkt: Vec<u8>) {
        if self.queue.len() >= QUEUE_LIMIT {
            self.queue.pop_front();
        }
        self.queue.push_back(pkt);
    }

    fn set_endpoint(&mut self, p: Path, force: bool) {
        match (self.endpoint, p, force) {
            (Some(Path::Direct(_)), Path::Relay, false) => {}
            _ => self.endpoint = Some(p),
        }
        self.events.push_back(if force {
            Event::UsePath(p)
        } else {
            Event::OfferPath(p)
        });
    }

    /// Starts a handshake on the path the path state chooses.
    fn connect(&mut self, now: Instant, env: &mut dyn Env) {
        if self.path.selected().is_none() {
            // The path state hears of candidates from the registry; before
            // its first answer (right after a restart) the endpoint in use
            // or the one that worked last time is worth a probe too, not
            // "no direct endpoint known".
            self.path.seed_candidates(self.destinations());
        }
        let via = match self.path.selected() {
            Some(Path::Direct(_)) => HandshakeVia::Direct(self.destinations()),
            Some(Path::Relay) => HandshakeVia::Relay,
            None => match self.path.start(now) {
                PathAction::ProbeDirect(c) => {
                    let mut d = self.destinations();
                    for e in c {
                        if !d.contains(&e) {
                            d.push(e);
                        }
                    }
                    HandshakeVia::Direct(d)
                }
                PathAction::UseRelay(reason) => {
                    self.path.on_relay(reason);
                    self.set_endpoint(Path::Relay, true);
                    HandshakeVia::Relay
                }
                PathAction::Idle | PathAction::PingDirect(_) | PathAction::KeepMapping(_) => return,
            },
        };
        self.start_handshake(now, via, env);
    }

    /// Sends one initiation, straight to some endpoints or via the relay.
    fn start_handshake(&mut self, now: Instant, via: HandshakeVia, env: &mut dyn Env) {
        let dests = match via {
            // No direct endpoint known: the relay always reaches the peer.
            HandshakeVia::Direct(d) => d,
            HandshakeVia::Relay => vec![],
        };
        let index = env.fresh_index();
        let ts = env.next_timestamp();
        let Ok((init, msg)) = handshake::initiate(
            env.static_secret(),
            &self.static_public,
            index,
            ts,
            env.suite(),
        ) else {
            return;
        };
        self.timers.on_handshake_sent(now, env.jitter());
        self.timers.on_sent(now);
        // While the peer's cookie is fresh it was under load lately:
        // initiations carry it, so they are not answered with a cookie again.
        let bytes = match self.cookie {
            Some((c, got)) if now.saturating_duration_since(got) < COOKIE_USE_FOR => {
                cookie::with_mac2(&msg, &c)
            }
            _ => msg.to_vec(),
        };
        if dests.is_empty() {
            self.transmits.push_back(Transmit {
                to: Path::Relay,
                bytes: bytes.clone(),
                hop_limit: None,
            });
        }
        // The first probe of a punch burst opens our own NAT only; the full
        // probes follow a moment later (see `crate::path`).
        let opens = !dests.is_empty() && self.path.opens(now);
        for d in dests {
            let t = Transmit {
                to: Path::Direct(d),
                bytes: bytes.clone(),
                hop_limit: None,
            };
            if opens {
                self.transmits.push_back(Transmit {
                    hop_limit: Some(OPENER_TTL),
                    ..t.clone()
                });
                self.deferred.push((now + OPEN_LEAD, t));
            } else {
                self.transmits.push_back(t);
            }
        }
        if self.initiators.len() >= MAX_INITIATORS {
            self.initiators.remove(0);
        }
        self.initiators.push(InFlight {
            init,
            sent: now,
            msg,
            cookied: false,
        });
    }

    /// A new session, reached over `via`.
    fn install(&mut self, now: Instant, session: Session, via: Path) {
        let session = Arc::new(session);
        let initiator = session.initiator;
        self.sessions.push(session.clone());
        // The initiator knows the responder has the keys; the responder waits
        // for the first packet on the new session before switching to it,
        // unless it has nothing else.
        let current = initiator || self.current.is_none();
        if current {
            self.current = Some(session.clone());
        }
        self.events.push_back(Event::Install {
            session: session.clone(),
            current,
        });
        if initiator {
            self.take_path(now, via, true);
        } else {
            // An initiation proves nothing about where the peer is: anyone
            // who captured one can replay it, or forward it from elsewhere.
            // The path moves when the first packet on the session
            // authenticates (see `handle_activity`).
            self.unconfirmed = Some((session, via));
        }
        self.timers.on_session(now, initiator);
        self.last_handshake = Some(now);
        self.events.push_back(Event::Established {
            path: via,
            initiator,
        });
    }

    /// Takes `via` as the peer's path: a handshake over it completed (we
    /// initiated), or a packet on a session we answered authenticated.
    fn take_path(&mut self, now: Instant, via: Path, initiator: bool) {
        match via {
            Path::Direct(a) => {
                self.path.on_direct(a);
                self.set_endpoint(via, true);
                self.events.push_back(Event::DirectWorked(a));
            }
            // A new session through the relay moves the peer off a direct
            // endpoint: the peer chose the relay because its direct path
            // went silent or it knew no direct endpoint for us (a restart
            // on a new port), and sending on to the old endpoint would
            // leave its side dark.
            //
            // Why this cannot be used to push a working direct pair onto
            // the relay: the move needs a *new* session, i.e. a handshake
            // whose initiation carried a timestamp newer than any accepted
            // before (a replayed initiation is refused), answered by us,
            // and then a data packet that authenticates with that
            // session's keys, which only the peer holds. A relayed packet
            // on an existing session (replayed, or late from an older
            // relayed session) moves nothing: the data plane never lets a
            // relayed packet replace a direct endpoint, and the replay
            // window drops copies. The relay names the node it forwards
            // from by the address of that node's authenticated registry
            // session, so a stranger cannot hand it an initiation as the
            // peer's without spoofing the peer's address on the path; one
            // who can (or the relay itself) could just as well drop the
            // direct path, which moves the pair to the relay by design.
            // Either way the relay reads nothing, and the direct retry
            // moves the pair back once direct answers.
            Path::Relay => {
                let reason = self.path.relay_reason().unwrap_or(if initiator {
                    RelayReason::NoDirectAnswer
                } else {
                    RelayReason::PeerRelayed
                });
                self.path.switch_to_relay(reason, now);
                self.set_endpoint(via, true);
            }
        }
    }

    /// An echo request of our own (a heartbeat): its answer is no
    /// [`Event::Pong`].
    fn heartbeat_msg(&mut self) -> Vec<u8> {
        self.heartbeats = self.heartbeats.wrapping_add(1);
        let nonce = HEARTBEAT_NONCE | u64::from(self.heartbeats);
        let mut msg = vec![CTL_PING];
        msg.extend_from_slice(&nonce.to_le_bytes());
        msg
    }

    /// Seals `msg` with the current session and sends it to `to`, whatever
    /// the endpoint in use, with the IP TTL `hop_limit` if given.
    fn seal_to(&mut self, to: Path, msg: &[u8], hop_limit: Option<u8>) {
        let Some(session) = self.current.clone() else {
            return;
        };
        let mut buf = vec![0u8; DATA_HEADER_LEN + msg.len() + TAG_LEN];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + msg.len()].copy_from_slice(msg);
        if let Ok(n) = session.sender.seal(&mut buf, msg.len()) {
            buf.truncate(n);
            self.transmits.push_back(Transmit {
                to,
                bytes: buf,
                hop_limit,
            });
        }
    }

    /// Puts `msg` before anything queued and sends only it.
    fn send_first(&mut self, now: Instant, msg: Vec<u8>) {
        let rest = std::mem::take(&mut self.queue);
        self.queue.push_back(msg);
        self.drain_queue(now, false);
        self.queue = rest;
    }

    /// Seals the queued packets (or a keepalive) with the current session.
    fn drain_queue(&mut self, now: Instant, keepalive: bool) {
        let (Some(session), Some(to)) = (self.current.clone(), self.endpoint) else {
            return;
        };
        let mut pkts: Vec<Vec<u8>> = self.queue.drain(..).collect();
        if pkts.is_empty() && keepalive {
            pkts.push(vec![]);
        }
        for p in pkts {
            let mut buf = vec![0u8; DATA_HEADER_LEN + p.len() + TAG_LEN];
            buf[DATA_HEADER_LEN..DATA_HEADER_LEN + p.len()].copy_from_slice(&p);
            if let Ok(n) = session.sender.seal(&mut buf, p.len()) {
                buf.truncate(n);
                self.transmits.push_back(Transmit {
                    to,
                    bytes: buf,
                    hop_limit: None,
                });
            }
        }
        self.timers.on_sent(now);
    }
}

/// How an initiation goes out.
enum HandshakeVia {
    Direct(Vec<SocketAddr>),
    Relay,
}

// The activity sync must be much finer than the shortest activity timer.
const _: () = assert!(KEEPALIVE.as_secs() > 10 * ACTIVITY_SYNC.as_secs());
