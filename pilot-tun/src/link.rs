//! The node's control session with the registry: a Noise IK session towards
//! the pinned registry key, request/response with retries, and pushes.
//!
//! A join URL may name several instances of one registry (one key, one
//! database). The link talks to one of them, its *current endpoint*, picked
//! at random at start so that a fleet spreads over the instances;
//! [`RegistryLink::fail_over`] moves it to the next one (round-robin) and
//! forgets the session, which belonged to the old instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pilot_proto::handshake::{Initiator, MacKey};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{self, ErrorCode, FromRegistry, ToRegistry};
use pilot_proto::session::Session;
use pilot_proto::wire::{DATA_HEADER_LEN, TAG_LEN};
use tokio::sync::{oneshot, Notify};

use crate::udp::Udp;

/// How long one request waits for its answer before it is sent again.
const CALL_RETRY: Duration = Duration::from_millis(700);
/// How many times a request is sent.
const CALL_TRIES: u32 = 3;
/// With several endpoints: silence from the current one this long counts
/// as its failure (the handshake there gives up after as long, too).
pub const FAILOVER_SILENCE: Duration = Duration::from_secs(3);
/// With several endpoints: how often the node asks the current one for a
/// sign of life (a ping it does not wait for).
pub const FAILOVER_PING: Duration = Duration::from_secs(1);

/// A registry request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// No session with the registry right now.
    #[error("the registry at {0} is unreachable (no answer); try again when it is up")]
    Unreachable(SocketAddr),
    /// The registry refused.
    #[error("the registry refused: {message}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its words.
        message: String,
    },
    /// An unexpected answer.
    #[error("unexpected answer from the registry")]
    Protocol,
    /// The registry assigned an address this node refuses.
    #[error("refused the registry's address assignment: {0}")]
    Assignment(String),
}

/// The registry session and the requests waiting on it.
pub struct RegistryLink {
    /// The pinned registry key and its endpoints.
    pub join: JoinUrl,
    /// The index in `join.endpoints()` of the endpoint in use.
    current: AtomicUsize,
    session: RwLock<Option<Arc<Session>>>,
    pending_handshake: Mutex<Option<(Initiator, oneshot::Sender<Arc<Session>>)>>,
    calls: Mutex<HashMap<u32, oneshot::Sender<FromRegistry>>>,
    next_req: AtomicU32,
    reachable: AtomicBool,
    last_contact: Mutex<Option<Instant>>,
    observed: Mutex<Option<SocketAddr>>,
    /// Cuts the keeper's pauses short (the transport changed).
    wake: Notify,
}

impl RegistryLink {
    /// A link with no session yet.
    pub fn new(join: JoinUrl) -> Self {
        // Where a fleet starts spreads over the instances.
        let count = join.endpoints().len();
        let start = if count > 1 {
            let mut b = [0u8; 8];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
            (u64::from_le_bytes(b) % count as u64) as usize
        } else {
            0
        };
        RegistryLink {
            join,
            current: AtomicUsize::new(start),
            session: RwLock::new(None),
            pending_handshake: Mutex::new(None),
            calls: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            reachable: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            observed: Mutex::new(None),
            wake: Notify::new(),
        }
    }

    /// The registry endpoint in use: where control datagrams, STUN and
    /// relayed datagrams go, and the one address whose datagrams count as
    /// the registry's.
    pub fn endpoint(&self) -> SocketAddr {
        let list = self.join.endpoints();
        list[self.current.load(Ordering::Relaxed) % list.len()]
    }

    /// True if the join URL names more than one endpoint (the node then
    /// checks the current one every [`FAILOVER_PING`] and moves on after
    /// [`FAILOVER_SILENCE`]).
    pub fn fails_over(&self) -> bool {
        self.join.endpoints().len() > 1
    }

    /// Moves to the next endpoint (round-robin) and forgets the session
    /// and the pending handshake, which belonged to the old one. Returns
    /// the new endpoint.
    pub fn fail_over(&self) -> SocketAddr {
        let count = self.join.endpoints().len();
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                Some((i + 1) % count)
            });
        *self.pending_handshake.lock() = None;
        *self.last_contact.lock() = None;
        self.drop_session();
        self.endpoint()
    }

    /// The current session, if any.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session.read().clone()
    }

    /// Forgets the session (it stopped answering).
    pub fn drop_session(&self) {
        *self.session.write() = None;
        self.reachable.store(false, Ordering::Relaxed);
    }

    /// Sleeps for `d`, or until [`RegistryLink::wake`].
    pub async fn nap(&self, d: std::time::Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
        }
    }

    /// Ends the current (or next) [`RegistryLink::nap`]: the transport to
    /// the registry changed, reconnect now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// True if the last exchange with the registry worked.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// When we last heard from the registry.
    pub fn last_contact(&self) -> Option<Instant> {
        *self.last_contact.lock()
    }

    /// Our endpoint as the registry sees it.
    pub fn observed(&self) -> Option<SocketAddr> {
        *self.observed.lock()
    }

    /// Records our endpoint as seen by the registry.
    pub fn set_observed(&self, a: SocketAddr) {
        *self.observed.lock() = Some(a);
    }

    /// True if a data datagram with this receiver index belongs to the
    /// current session of this link.
    pub fn session_index_is(&self, index: u32) -> bool {
        self.session
            .read()
            .as_ref()
            .is_some_and(|s| s.local_index == index)
    }

    /// True if `index` is our index of the registry session or of the
    /// handshake towards it.
    pub fn owns_index(&self, index: u32) -> bool {
        self.session
            .read()
            .as_ref()
            .is_some_and(|s| s.local_index == index)
            || self
                .pending_handshake
                .lock()
                .as_ref()
                .is_some_and(|(i, _)| i.local_index() == index)
    }

    /// Runs a handshake with the registry. `make_init` builds the initiation
    /// (it needs the node's keys and a fresh index).
    pub async fn handshake(
        &self,
        udp: &Udp,
        make_init: impl Fn() -> Option<(Initiator, [u8; pilot_proto::wire::INIT_LEN])>,
    ) -> Result<Arc<Session>, LinkError> {
        // With several endpoints an instance that does not answer within
        // FAILOVER_SILENCE is given up (the next one may).
        let wait = match self.fails_over() {
            true => FAILOVER_SILENCE / CALL_TRIES,
            false => CALL_RETRY * 2,
        };
        let to = self.endpoint();
        for _ in 0..CALL_TRIES {
            let Some((init, msg)) = make_init() else {
                return Err(LinkError::Protocol);
            };
            let (tx, rx) = oneshot::channel();
            *self.pending_handshake.lock() = Some((init, tx));
            let _ = udp.send_to(&msg, to).await;
            if let Ok(Ok(s)) = tokio::time::timeout(wait, rx).await {
                if self.endpoint() != to {
                    // Moved on meanwhile: the session is the old one's.
                    break;
                }
                *self.session.write() = Some(s.clone());
                self.contact();
                return Ok(s);
            }
        }
        *self.pending_handshake.lock() = None;
        self.reachable.store(false, Ordering::Relaxed);
        Err(LinkError::Unreachable(to))
    }

    /// Completes the handshake with the registry's response, if it is ours.
    pub fn on_handshake_response(
        &self,
        own_mac: &MacKey,
        resp: pilot_proto::wire::HandshakeResp<'_>,
        now: Instant,
    ) -> bool {
        let mut pending = self.pending_handshake.lock();
        let ours = pending
            .as_ref()
            .is_some_and(|(i, _)| i.local_index() == resp.receiver_index());
        if !ours {
            return false;
        }
        let Some((init, tx)) = pending.take() else {
            return false;
        };
        match init.finish(own_mac, resp, now) {
            Ok(s) => {
                let _ = tx.send(Arc::new(s));
            }
            Err(e) => tracing::debug!("registry handshake response refused: {e}"),
        }
        true
    }

    fn contact(&self) {
        self.reachable.store(true, Ordering::Relaxed);
        *self.last_contact.lock() = Some(Instant::now());
    }

    /// Sends a request built by `make` (given its request id) and waits for
    /// the answer, resending a few times.
    pub async fn call(
        &self,
        udp: &Udp,
        make: impl Fn(u32) -> ToRegistry,
    ) -> Result<FromRegistry, LinkError> {
        self.call_counted(udp, make).await.0
    }

    /// [`call`](Self::call), also saying how many copies of the request
    /// were sent: an answer may be to a later copy, after the first was
    /// carried out and its answer lost or late.
    pub async fn call_counted(
        &self,
        udp: &Udp,
        make: impl Fn(u32) -> ToRegistry,
    ) -> (Result<FromRegistry, LinkError>, u32) {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let msg = make(req);
        let Ok(bytes) = messages::encode(&msg) else {
            return (Err(LinkError::Protocol), 0);
        };
        let (tx, mut rx) = oneshot::channel();
        self.calls.lock().insert(req, tx);
        let mut sends = 0;
        let result = async {
            for _ in 0..CALL_TRIES {
                let Some(session) = self.session() else {
                    return Err(LinkError::Unreachable(self.endpoint()));
                };
                sends += 1;
                self.send_sealed(udp, &session, &bytes).await;
                match tokio::time::timeout(CALL_RETRY, &mut rx).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(_)) => return Err(LinkError::Protocol),
                    Err(_) => continue,
                }
            }
            Err(LinkError::Unreachable(self.endpoint()))
        }
        .await;
        self.calls.lock().remove(&req);
        let result = match result {
            Ok(FromRegistry::Error { code, message, .. }) => Err(LinkError::Refused {
                code,
                // Shown and logged: the registry's words are not trusted
                // to be free of escape sequences.
                message: crate::sanitize::printable(&message),
            }),
            other => other,
        };
        (result, sends)
    }

    /// Sends a ping without waiting for the pong: the pong counts as
    /// contact (and brings our observed endpoint) when it comes.
    pub async fn ping_nowait(&self, udp: &Udp) {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        self.send(udp, &ToRegistry::Ping { req }).await;
    }

    /// Sends a message that expects no answer (acknowledgements).
    pub async fn send(&self, udp: &Udp, msg: &ToRegistry) {
        let (Some(session), Ok(bytes)) = (self.session(), messages::encode(msg)) else {
            return;
        };
        self.send_sealed(udp, &session, &bytes).await;
    }

    async fn send_sealed(&self, udp: &Udp, session: &Session, bytes: &[u8]) {
        let mut out = vec![0u8; DATA_HEADER_LEN + bytes.len() + TAG_LEN];
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + bytes.len()].copy_from_slice(bytes);
        if let Ok(n) = session.sender.seal(&mut out, bytes.len()) {
            let _ = udp.send_to(&out[..n], self.endpoint()).await;
        }
    }

    /// Decrypts a datagram on the registry session. Returns the decoded
    /// message if it is not an answer to a waiting request (pushes).
    pub fn on_data(&self, datagram: &mut [u8]) -> Option<FromRegistry> {
        let session = self.session()?;
        let n = session.open(datagram).ok()?;
        self.contact();
        let msg: FromRegistry =
            messages::decode(&datagram[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).ok()?;
        let req = match &msg {
            FromRegistry::Registered { req, .. }
            | FromRegistry::Peer { req, .. }
            | FromRegistry::Ok { req }
            | FromRegistry::Error { req, .. }
            | FromRegistry::Pong { req, .. }
            | FromRegistry::Certs { req, .. }
            | FromRegistry::Revocations { req, .. } => Some(*req),
            FromRegistry::Push { .. }
            | FromRegistry::Punch { .. }
            | FromRegistry::Revoked { .. }
            | FromRegistry::PathCheck { .. } => None,
        };
        match req {
            Some(r) => {
                match self.calls.lock().remove(&r) {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    // The answer to a ping nobody waits for.
                    None => {
                        if let FromRegistry::Pong { observed, .. } = msg {
                            self.set_observed(observed);
                        }
                    }
                }
                None
            }
            None => Some(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Vec<SocketAddr> {
        ["192.0.2.1:7946", "198.51.100.1:7946", "[2001:db8::1]:7946"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    #[test]
    fn failing_over_goes_round_robin_and_forgets_the_session() {
        let eps = endpoints();
        let link = RegistryLink::new(JoinUrl::new([1; 32], &eps).unwrap());
        assert!(link.fails_over());
        let start = eps.iter().position(|e| *e == link.endpoint()).unwrap();
        link.contact();
        for k in 1..=4 {
            let next = link.fail_over();
            assert_eq!(next, eps[(start + k) % 3]);
            assert_eq!(link.endpoint(), next);
            assert!(link.session().is_none() && !link.reachable());
            assert_eq!(link.last_contact(), None, "no word from the new one yet");
        }
    }

    #[test]
    fn one_endpoint_never_fails_over() {
        let only = endpoints()[0];
        let link = RegistryLink::new(JoinUrl::single([1; 32], only));
        assert!(!link.fails_over());
        assert_eq!(link.endpoint(), only);
    }

    #[test]
    fn the_first_endpoint_is_picked_at_random() {
        let eps = &endpoints()[..2];
        let starts: std::collections::HashSet<SocketAddr> = (0..64)
            .map(|_| RegistryLink::new(JoinUrl::new([1; 32], eps).unwrap()).endpoint())
            .collect();
        // Both, but for a chance of 2^-63.
        assert_eq!(starts.len(), 2, "{starts:?}");
    }
}
