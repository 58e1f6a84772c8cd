//! Counters of what the registry saw, did and dropped, shared by its
//! threads (plain atomics: any role bumps them, anyone reads a snapshot),
//! and the storage thread's job durations.

use std::sync::atomic::{AtomicU64, Ordering};

use pilot_metrics::histogram::{Histogram, STORAGE_SECONDS};

/// Counters of what the registry saw and dropped.
#[derive(Debug, Default)]
pub struct Stats {
    /// Registrations accepted (a node registering again counts again).
    pub registrations: AtomicU64,
    /// Lookups answered (found or not).
    pub lookups: AtomicU64,
    /// Trust statements stored for delivery.
    pub statements: AtomicU64,
    /// Bytes of the datagrams relayed (relay headers included).
    pub relayed_bytes: AtomicU64,
    /// STUN Binding requests answered.
    pub stun: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Control messages handled.
    pub messages: AtomicU64,
    /// Datagrams that were not any known kind, or malformed.
    pub dropped_malformed: AtomicU64,
    /// Handshakes with a bad MAC, a failed Noise read, or a replayed timestamp.
    pub dropped_handshake: AtomicU64,
    /// Handshakes over the per-source rate limit.
    pub dropped_rate: AtomicU64,
    /// Data packets for no session, failing authentication, or replayed.
    pub dropped_auth: AtomicU64,
    /// Control messages that did not decode, or were badly signed, or replays.
    pub refused: AtomicU64,
    /// Datagrams relayed.
    pub relayed: AtomicU64,
    /// Relay requests refused: unknown sender, offline or unapproved pair.
    pub relay_refused: AtomicU64,
    /// Relay requests over the sender's bandwidth limit.
    pub relay_limited: AtomicU64,
    /// Relayed datagrams held until the relay learned whether the pair
    /// approved each other (first datagrams of a pair).
    pub relay_held: AtomicU64,
    /// Requests answered "busy": the storage queue was full.
    pub busy: AtomicU64,
    /// Work dropped because its queue was full: handshakes waiting for the
    /// admission thread, acknowledgements and endpoint updates for storage.
    pub dropped_busy: AtomicU64,
    /// Control messages refused because their session spent its budget
    /// ([`crate::sessions::DEFAULT_CONTROL_RATE`]).
    pub control_limited: AtomicU64,
    /// How long the storage thread took per job, by kind.
    pub storage: StorageTimes,
}

/// The storage thread's job durations, one histogram per kind of job
/// (the names [`StorageTimes::KINDS`] lists).
#[derive(Debug)]
pub struct StorageTimes {
    by_kind: [Histogram; StorageTimes::KINDS.len()],
}

impl Default for StorageTimes {
    fn default() -> Self {
        StorageTimes {
            by_kind: std::array::from_fn(|_| Histogram::new(STORAGE_SECONDS)),
        }
    }
}

impl StorageTimes {
    /// The kinds of storage job, as the `job` label names them.
    pub const KINDS: [&'static str; 12] = [
        "register",
        "attach",
        "lookup",
        "statement",
        "mail",
        "ack",
        "observed",
        "approvals",
        "census",
        "certificate",
        "revocation",
        "cluster",
    ];

    /// Records a job of kind `kind` (one of [`Self::KINDS`]) that took `d`.
    pub fn observe(&self, kind: &str, d: std::time::Duration) {
        if let Some(i) = Self::KINDS.iter().position(|k| *k == kind) {
            self.by_kind[i].observe_duration(d);
        }
    }

    /// Each kind with its histogram.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        Self::KINDS.iter().copied().zip(self.by_kind.iter())
    }
}

impl Stats {
    /// A snapshot as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("registrations", l(&self.registrations)),
            ("lookups", l(&self.lookups)),
            ("statements", l(&self.statements)),
            ("relayed_bytes", l(&self.relayed_bytes)),
            ("stun", l(&self.stun)),
            ("handshakes", l(&self.handshakes)),
            ("messages", l(&self.messages)),
            ("dropped_malformed", l(&self.dropped_malformed)),
            ("dropped_handshake", l(&self.dropped_handshake)),
            ("dropped_rate", l(&self.dropped_rate)),
            ("dropped_auth", l(&self.dropped_auth)),
            ("refused", l(&self.refused)),
            ("relayed", l(&self.relayed)),
            ("relay_refused", l(&self.relay_refused)),
            ("relay_limited", l(&self.relay_limited)),
            ("relay_held", l(&self.relay_held)),
            ("busy", l(&self.busy)),
            ("dropped_busy", l(&self.dropped_busy)),
            ("control_limited", l(&self.control_limited)),
        ]
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
