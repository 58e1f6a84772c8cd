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
                let rng = ring::rand::SystemRandom::new();
                let mut last: HashMap<[u8; 32], u64> = HashMap::new();
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

fn admit(
    keys: &ResponderKeys,
    last: &mut HashMap<[u8; 32], u64>,
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
    let slot = last.entry(static_public).or_insert(0);
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
