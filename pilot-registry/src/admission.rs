//! The admission thread: the Diffie-Hellman half of every handshake, off the
//! packet path.
//!
//! The socket loop does the cheap steps of [`pilot_proto::admission`] (shape,
//! MAC, per-source rate limit) and hands the initiations that pass to this
//! thread through a bounded queue (full: dropped and counted; the node
//! retries). The thread does Noise, checks and records the growing
//! timestamp per initiator, and sends back the new session and the response
//! for the socket loop to install and send. A burst of handshakes costs the
//! packet path one copy each, never a DH.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use pilot_proto::admission::{Refused, ResponderKeys};
use pilot_proto::session::Session;
use pilot_proto::timers::REJECT_AFTER;
use pilot_proto::wire::{HandshakeInit, INIT_LEN, RESP_LEN};
use tracing::debug;

use crate::stats::{bump, Stats};

/// Initiations that may wait for the thread (one DH each, well under a
/// millisecond: a full queue is a few tens of milliseconds of work).
pub const DEFAULT_QUEUE_DEPTH: usize = 256;

/// A handshake the thread answered.
pub struct Admitted {
    /// The new session, under `session.local_index`.
    pub session: Session,
    /// The initiator's static key, authenticated.
    pub static_public: [u8; 32],
    /// Where the initiation came from (the response goes there).
    pub from: SocketAddr,
    /// The response datagram.
    pub response: [u8; RESP_LEN],
}

struct Waiting {
    init: [u8; INIT_LEN],
    from: SocketAddr,
    at: Instant,
}

/// The socket loop's handle on the admission thread.
pub struct Gate {
    queue: SyncSender<Waiting>,
}

impl Gate {
    /// Starts the thread. `keys` are the registry's; `index` draws a fresh
    /// session index (the socket loop refuses one already in use).
    pub fn spawn(
        keys: ResponderKeys,
        stats: Arc<Stats>,
        depth: usize,
    ) -> std::io::Result<(Gate, tokio::sync::mpsc::Receiver<Admitted>, JoinHandle<()>)> {
        let (queue, waiting) = mpsc::sync_channel::<Waiting>(depth);
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("registry-admission".into())
            .spawn(move || {
                crate::priority::background("admission");
                let rng = ring::rand::SystemRandom::new();
                let mut last = Timestamps::new(MAX_TIMESTAMPS);
                while let Ok(w) = waiting.recv() {
                    let Some(a) = admit(&keys, &mut last, &rng, &w, &stats) else {
                        continue;
                    };
                    if tx.blocking_send(a).is_err() {
                        return;
                    }
                }
            })?;
        Ok((Gate { queue }, rx, thread))
    }

    /// Queues an initiation (a datagram that passed the precheck); false
    /// (dropped and counted) when the queue is full.
    pub fn submit(&self, datagram: &[u8], from: SocketAddr, at: Instant, stats: &Stats) -> bool {
        let Ok(copy) = <[u8; INIT_LEN]>::try_from(datagram) else {
            bump(&stats.dropped_malformed);
            return false;
        };
        if self
            .queue
            .try_send(Waiting {
                init: copy,
                from,
                at,
            })
            .is_err()
        {
            bump(&stats.dropped_busy);
            return false;
        }
        true
    }
}

/// Initiators whose last timestamp is kept. Anyone holding the join URL
/// can make initiators (a fresh key each), so the table is bounded: when
/// it is full, initiators not heard from for [`REJECT_AFTER`] go, and if
/// that is not enough, the least recently heard half. Forgetting one only
/// lets a captured initiation of it be replayed, which buys the replayer a
/// session it holds no keys for (it expires unused) and a response sent to
/// the initiation's source.
pub const MAX_TIMESTAMPS: usize = 1 << 20;

/// The last timestamp admitted per initiator, bounded.
pub struct Timestamps {
    last: HashMap<[u8; 32], (u64, Instant)>,
    max: usize,
}

impl Timestamps {
    /// An empty table of at most `max` initiators.
    pub fn new(max: usize) -> Self {
        Timestamps {
            last: HashMap::new(),
            max: max.max(2),
        }
    }

    /// The last timestamp of `key` (0 for none), to check and update.
    pub fn slot(&mut self, key: [u8; 32], now: Instant) -> &mut u64 {
        if self.last.len() >= self.max && !self.last.contains_key(&key) {
            self.last
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < REJECT_AFTER);
            if self.last.len() >= self.max {
                let mut ages: Vec<Instant> = self.last.values().map(|(_, at)| *at).collect();
                let half = ages.len() / 2;
                let (_, cut, _) = ages.select_nth_unstable(half);
                let cut = *cut;
                self.last.retain(|_, (_, at)| *at > cut);
            }
        }
        let e = self.last.entry(key).or_insert((0, now));
        e.1 = now;
        &mut e.0
    }

    /// Initiators kept.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True if none is kept.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

fn admit(
    keys: &ResponderKeys,
    last: &mut Timestamps,
    rng: &ring::rand::SystemRandom,
    w: &Waiting,
    stats: &Stats,
) -> Option<Admitted> {
    let refused = |e: Refused| {
        debug!(from = %w.from, "handshake refused: {e}");
        bump(&stats.dropped_handshake);
    };
    // The socket loop checked the shape; checking again costs nothing.
    let init = HandshakeInit::new_checked(&w.init).ok()?;
    let screened = keys.open(init).map_err(refused).ok()?;
    let static_public = *screened.remote_static();
    let slot = last.slot(static_public, w.at);
    let (session, response) = screened
        .accept(slot, random_index(rng), w.at)
        .map_err(refused)
        .ok()?;
    bump(&stats.handshakes);
    Some(Admitted {
        session,
        static_public,
        from: w.from,
        response,
    })
}

fn random_index(rng: &ring::rand::SystemRandom) -> u32 {
    let mut b = [0u8; 4];
    // The system generator does not fail once it has started; if it did,
    // index 0 merely collides and the socket loop refuses the session.
    let _ = ring::rand::SecureRandom::fill(rng, &mut b);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilot_proto::admission::Admission;
    use pilot_proto::handshake;
    use pilot_proto::identity::Identity;
    use pilot_proto::session::CipherSuite;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_timestamp_table_is_bounded_and_keeps_the_recent() {
        let now = Instant::now();
        let mut t = Timestamps::new(100);
        let key = |n: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_le_bytes());
            k
        };
        *t.slot(key(0), now) = 7;
        for n in 1..1000u32 {
            let at = now + std::time::Duration::from_millis(u64::from(n));
            *t.slot(key(n), at) = 1;
            // The first initiator is heard from now and then.
            if n % 20 == 0 {
                assert_eq!(*t.slot(key(0), at), 7, "kept at {n}");
            }
            assert!(t.len() <= 100, "{} at {n}", t.len());
        }
        assert!(t.len() >= 50);
        let late = now + std::time::Duration::from_millis(999);
        assert_eq!(*t.slot(key(999), late), 1, "the newest is kept");
        // Initiators silent for REJECT_AFTER go first when it is full.
        let mut t = Timestamps::new(3);
        for n in 0..3 {
            *t.slot(key(n), now) = 1;
        }
        *t.slot(key(2), now + REJECT_AFTER) = 2;
        *t.slot(key(9), now + REJECT_AFTER) = 1;
        assert_eq!(t.len(), 2);
        assert_eq!(*t.slot(key(2), now + REJECT_AFTER), 2);
    }

    #[tokio::test]
    async fn the_thread_answers_once_per_timestamp() {
        let (registry, node) = (
            Identity::from_bytes(&[9; 64]),
            Identity::from_bytes(&[1; 64]),
        );
        let mut adm = Admission::new(*registry.static_secret(), &registry.static_public());
        let stats = Arc::new(Stats::default());
        let (gate, mut admitted, thread) =
            Gate::spawn(adm.keys().clone(), stats.clone(), 4).unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let now = Instant::now();
        let (_, msg) = handshake::initiate(
            node.static_secret(),
            &registry.static_public(),
            1,
            50,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        adm.precheck(&msg, from.ip(), now).unwrap();
        assert!(gate.submit(&msg, from, now, &stats));
        let a = admitted.recv().await.unwrap();
        assert_eq!(a.static_public, node.static_public());
        assert_eq!(a.from, from);
        // The same initiation again (a replay) is refused by its timestamp.
        adm.precheck(&msg, from.ip(), now).unwrap();
        assert!(gate.submit(&msg, from, now, &stats));
        drop(gate);
        assert!(admitted.recv().await.is_none(), "no second session");
        thread.join().unwrap();
        assert_eq!(stats.handshakes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped_handshake.load(Ordering::Relaxed), 1);
    }
}
