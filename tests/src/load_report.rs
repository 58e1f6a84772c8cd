//! The figures `registry-load` prints: one JSON line per phase, read by
//! `scripts/registry-bench.sh` and by the suite's `registry_bench` test.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One phase of the load generator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    /// What the run was labelled (the backend: `sqlite`, `pg-1`, `pg-2`, ...).
    pub label: String,
    /// `register`, `statements`, `lookups`, `burst` or `seeded-lookups`.
    pub phase: String,
    /// Operations asked for.
    pub ops: u64,
    /// Operations answered as asked (registered, `Ok`, `Peer`).
    pub ok: u64,
    /// Operations refused or never answered by the deadline.
    pub failed: u64,
    /// "busy" answers (each retried after a pause).
    pub busy: u64,
    /// Requests sent again after no answer within a second.
    pub resent: u64,
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// `ok / seconds`.
    pub ops_per_s: f64,
    /// Latency of one operation (first send to its answer, retries
    /// included), milliseconds.
    pub p50_ms: f64,
    /// The 99th percentile of the same.
    pub p99_ms: f64,
    /// CPU seconds (user + system) each watched process spent during the
    /// phase: `generator`, `registry` (all instances), `postgres` (the
    /// server and its backends).
    pub cpu_s: BTreeMap<String, f64>,
    /// Resident memory of each registry process at the end, KiB.
    pub registry_rss_kib: Vec<u64>,
    /// Identities registered (and seeded) when the phase ended.
    pub identities: u64,
    /// The STUN prober and the relayed stream, for the burst phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<BurstFigures>,
}

/// What the registry's packet path did while the burst of registrations
/// arrived, next to the same before it (quiet).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BurstFigures {
    /// STUN round trip before the burst, median, ms.
    pub stun_quiet_p50_ms: f64,
    /// ... 99th percentile, ms.
    pub stun_quiet_p99_ms: f64,
    /// STUN round trip during the burst, median, ms.
    pub stun_burst_p50_ms: f64,
    /// ... 99th percentile, ms.
    pub stun_burst_p99_ms: f64,
    /// STUN requests sent during the burst.
    pub stun_samples: u64,
    /// ... of which no answer came within a second.
    pub stun_lost: u64,
    /// Relayed stream offered, Mbit/s (0: no relayed stream).
    pub relay_offered_mbps: f64,
    /// Relayed Mbit/s received before the burst.
    pub relay_quiet_mbps: f64,
    /// Relayed Mbit/s received during the burst.
    pub relay_burst_mbps: f64,
}
