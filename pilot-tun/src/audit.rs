//! The node's audit trail: what the control task records in
//! `<state-dir>/audit.jsonl` (a hash chain with signed checkpoints, see
//! [`pilot_proto::audit`]; the files are kept by [`pilot_audit::file`]),
//! and the per-minute counts of refused handshakes.
//!
//! Only the control task writes it, after the state change it records and
//! never on the packet path. Entries (`kind`, then the `details` fields):
//!
//! | kind | details | when |
//! |---|---|---|
//! | `node-start` | `node_id`, `version`, `pid` | the daemon starts |
//! | `node-stop` | | the daemon stops (a checkpoint follows) |
//! | `request`, `approve`, `deny`, `revoke` | `peer`, `hostname`, `address`, `seq`, `statement`, `delivered`, `state` | this node's statement took effect (`statement`: SHA-256 of the signed message) |
//! | `statement-received` | `peer`, `kind`, `seq`, `statement`, `state` | a peer's statement was applied |
//! | `statement-refused` | `peer`, `kind`, `seq`, `statement`, `reason` | a peer's statement was not applied |
//! | `statement-delivered`, `statement-dropped` | `peer`, `kind`, `seq`, `statement` (`reason`) | a queued withdrawal reached the registry, or was refused by it |
//! | `pending-forgotten` | `peer`, `reason` (`expired`, `over-cap`) | a request waited too long, or too many wait |
//! | `handshake-refused` | `reason`, `source`, `minute` | the first refusal of its kind from a source in a minute |
//! | `handshake-refused-count` | `reason`, `source`, `minute`, `count` | the minute is over: how many there were |
//! | `handshake-refused-dropped` | `minute`, `count` | refusals not counted per source: the table was full |
//! | `grant` | `peer`, `inbound`, `outbound`, `inbound_until`, `outbound_until` | the grants in force with a trusted peer changed (scopes as `trust list` words them) |
//! | `policy-allow`, `policy-deny` | `peer`, `direction` (`in`, `out`), `traffic` (`tcp/22`, `icmp`, ...), `minute` | the first such decision of a peer's filter in a minute (peers with scoped or expiring grants only) |
//! | `policy-count` | `peer`, `direction`, `traffic`, `allowed`, `minute`, `count` | the minute is over: how many there were |
//! | `policy-dropped` | `peer`, `minute`, `count` | decisions not counted per kind: the peer's table was full |
//! | `cert-installed` | `owner`, `tags`, `expires_at`, `cert` (SHA-256) | `cert install` |
//! | `policy-rule-added`, `policy-rule-removed` | `id`, `owner`, `tag`, `ports`, `expires_at` | `policy allow`, `policy remove` |
//! | `owner-revocation` | `owner`, `node` | an owner's revocation this node keeps (a rule names the owner) |
//! | `policy` (in `request`... rows above) | | approvals and withdrawals the rules make are statements like typed ones (kind `policy` or `revoke`) |
//! | `log-damaged` | `kept_as`, `line`, `problem`, `dropped_bytes` | a damaged file was set aside at start |
//!
//! Refusal reasons: `untrusted-key`, `bad-handshake`, `rate-limited`,
//! `cookie-sent`. A checkpoint signed by the node key follows every 100
//! entries, comes every 5 minutes while entries wait unsigned, and at
//! shutdown. A write that fails is logged and skipped; the node keeps
//! running (the chain stays whole: nothing half-written remains).

use pilot_audit::file::{FileError, Limits, LogFile};
use pilot_proto::aggregate::{Aggregator, Flushed, Recorded};
use pilot_proto::filter::Noted;
use pilot_proto::identity::Identity;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, Signed, Statement};
use serde_json::{json, Value};
use tracing::warn;

use crate::state::{StateDir, StateError};
use crate::tunnels::{HandshakeSource, Refusal};

/// Sources × reasons counted per minute; beyond it refusals are counted
/// only in total, so a flood of spoofed sources adds at most this many
/// lines (twice: first sighting and count) a minute.
pub const REFUSAL_TABLE: usize = 128;
/// While entries wait unsigned, a checkpoint comes at least this often.
pub const CHECKPOINT_AFTER_SECS: u64 = 300;

fn source_text(s: &HandshakeSource) -> String {
    match s {
        HandshakeSource::Addr(ip) => ip.to_string(),
        HandshakeSource::Relayed(node) => format!("relay:{node}"),
    }
}

/// SHA-256 (hex) of a signed statement as it travels (its encoding with
/// the signature): the same on both nodes and at the registry.
pub fn statement_hash(st: &Signed<Statement>) -> String {
    // Our own plain structs always encode (and within the message bound:
    // they came through it or were made to fit it).
    let bytes = messages::encode(st).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    pilot_proto::hex::encode(d.as_ref())
}

/// The fields every statement entry has.
pub fn statement_details(st: &Signed<Statement>, peer: &str) -> Value {
    json!({
        "peer": peer,
        "kind": st.body.kind.name(),
        "seq": st.body.seq,
        "statement": statement_hash(st),
    })
}

/// The node's audit log, owned by the control task.
#[derive(Debug)]
pub struct NodeAudit {
    log: LogFile,
    refusals: Aggregator<Refusal>,
    last_signed: u64,
}

impl NodeAudit {
    /// Opens `<state>/audit.jsonl` (resuming its chain; a damaged file is
    /// set aside and recorded, and a warning says where it went).
    pub fn open(state: &StateDir, signer: &Identity, now: u64) -> Result<Self, StateError> {
        Self::open_with(state, signer, now, Limits::default())
    }

    /// [`NodeAudit::open`] with other limits (tests).
    pub fn open_with(
        state: &StateDir,
        signer: &Identity,
        now: u64,
        limits: Limits,
    ) -> Result<Self, StateError> {
        let (log, damage) = LogFile::open(&state.path, pilot_audit::LOG_FILE, signer, now, limits)
            .map_err(state_error)?;
        if let Some(d) = damage {
            warn!(
                "the audit log was damaged at line {} ({}); it is kept as {} and the log goes on from the last good line (recorded as a log-damaged entry)",
                d.line,
                d.problem,
                d.kept_as.display()
            );
        }
        Ok(NodeAudit {
            log,
            refusals: Aggregator::new(REFUSAL_TABLE),
            last_signed: now,
        })
    }

    /// Records one entry.
    pub fn record(&mut self, signer: &Identity, now: u64, kind: &str, details: Value) {
        if let Err(e) = self.log.append(signer, now, kind, &details) {
            warn!("audit entry '{kind}' not written: {e}");
        }
        if !self.log.has_unsigned() {
            self.last_signed = now;
        }
    }

    /// Counts a refused handshake; the first of its kind from its source
    /// in a minute is recorded at once.
    pub fn refused(&mut self, signer: &Identity, now: u64, r: Refusal) {
        if self.refusals.record(r, now) == Recorded::First {
            let minute = now - now % pilot_proto::lifetime::MINUTE;
            self.record(
                signer,
                now,
                "handshake-refused",
                json!({
                    "reason": r.reason.name(),
                    "source": source_text(&r.source),
                    "minute": minute,
                }),
            );
        }
    }

    /// A peer's filter decided something for the first time this minute.
    pub fn decision(&mut self, signer: &Identity, now: u64, peer: &NodeId, n: Noted) {
        let minute = now - now % pilot_proto::lifetime::MINUTE;
        let kind = if n.allowed {
            "policy-allow"
        } else {
            "policy-deny"
        };
        self.record(
            signer,
            now,
            kind,
            json!({
                "peer": peer.to_string(),
                "direction": n.direction.name(),
                "traffic": n.traffic.to_string(),
                "minute": minute,
            }),
        );
    }

    /// A peer's filter counts for the minutes that are over.
    pub fn decision_counts(
        &mut self,
        signer: &Identity,
        now: u64,
        peer: &NodeId,
        f: Flushed<Noted>,
    ) {
        for c in f.counts {
            self.record(
                signer,
                now,
                "policy-count",
                json!({
                    "peer": peer.to_string(),
                    "direction": c.key.direction.name(),
                    "traffic": c.key.traffic.to_string(),
                    "allowed": c.key.allowed,
                    "minute": c.minute,
                    "count": c.count,
                }),
            );
        }
        for (minute, count) in f.dropped {
            self.record(
                signer,
                now,
                "policy-dropped",
                json!({"peer": peer.to_string(), "minute": minute, "count": count}),
            );
        }
    }

    /// Periodic work: the counts of minutes that are over, and a
    /// checkpoint when entries have waited unsigned too long.
    pub fn tick(&mut self, signer: &Identity, now: u64) {
        let flushed = self.refusals.flush(now);
        self.write_counts(signer, now, flushed);
        if self.log.has_unsigned() && now.saturating_sub(self.last_signed) >= CHECKPOINT_AFTER_SECS
        {
            self.checkpoint(signer, now);
        }
    }

    /// At shutdown: every count, `node-stop`, and a checkpoint.
    pub fn close(&mut self, signer: &Identity, now: u64) {
        let flushed = self.refusals.flush_all();
        self.write_counts(signer, now, flushed);
        self.record(signer, now, "node-stop", json!({}));
        self.checkpoint(signer, now);
    }

    /// Signs the head now.
    pub fn checkpoint(&mut self, signer: &Identity, now: u64) {
        match self.log.checkpoint(signer, now) {
            Ok(()) => self.last_signed = now,
            Err(e) => warn!("audit checkpoint not written: {e}"),
        }
    }

    fn write_counts(
        &mut self,
        signer: &Identity,
        now: u64,
        f: pilot_proto::aggregate::Flushed<Refusal>,
    ) {
        for c in f.counts {
            self.record(
                signer,
                now,
                "handshake-refused-count",
                json!({
                    "reason": c.key.reason.name(),
                    "source": source_text(&c.key.source),
                    "minute": c.minute,
                    "count": c.count,
                }),
            );
        }
        for (minute, count) in f.dropped {
            self.record(
                signer,
                now,
                "handshake-refused-dropped",
                json!({"minute": minute, "count": count}),
            );
        }
    }
}

fn state_error(e: FileError) -> StateError {
    match e {
        FileError::Io { path, source } => StateError::Io { path, source },
        FileError::Entry(e) => StateError::Corrupt {
            path: pilot_audit::LOG_FILE.into(),
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnels::RefusalReason;
    use pilot_audit::read;
    use pilot_proto::messages::StatementKind;

    const T0: u64 = 1_750_000_020; // 20 s into a minute

    #[test]
    fn a_flood_of_refusals_is_a_few_lines_whose_counts_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let id = Identity::from_bytes(&[9; 64]);
        let mut a = NodeAudit::open(&state, &id, T0).unwrap();
        let mut total = 0u64;
        // 300 distinct sources, 20 refusals each, over two minutes.
        for round in 0..20u64 {
            for s in 0..300u32 {
                // Addresses as values only: nothing is sent.
                let ip = std::net::Ipv4Addr::from(0xc633_6400 + s);
                let r = Refusal {
                    reason: if s % 2 == 0 {
                        RefusalReason::RateLimited
                    } else {
                        RefusalReason::CookieSent
                    },
                    source: HandshakeSource::Addr(ip.into()),
                };
                a.refused(&id, T0 + round * 5, r);
                total += 1;
            }
            a.tick(&id, T0 + round * 5);
        }
        a.close(&id, T0 + 200);
        let (entries, bad) = read::entries(dir.path(), pilot_audit::LOG_FILE).unwrap();
        assert!(bad.is_empty());
        let count = |k: &str| entries.iter().filter(|e| e.entry.kind == k).count();
        let sum = |k: &str| -> u64 {
            entries
                .iter()
                .filter(|e| e.entry.kind == k)
                .map(|e| e.entry.details["count"].as_u64().unwrap())
                .sum()
        };
        assert_eq!(
            sum("handshake-refused-count") + sum("handshake-refused-dropped"),
            total
        );
        // Two minutes: at most a table's worth of sources each, twice.
        assert!(count("handshake-refused") <= 2 * REFUSAL_TABLE);
        assert!(count("handshake-refused-count") <= 2 * REFUSAL_TABLE);
        assert!(count("handshake-refused-dropped") <= 2);
        let out = read::verify(dir.path(), pilot_audit::LOG_FILE, &[id.ed_public()], None).unwrap();
        assert_eq!(out.result.unwrap().unsigned_trailing, 0, "signed at close");
    }

    #[test]
    fn a_checkpoint_comes_when_entries_wait_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let id = Identity::from_bytes(&[9; 64]);
        let mut a = NodeAudit::open(&state, &id, T0).unwrap();
        a.record(&id, T0, "approve", json!({}));
        a.tick(&id, T0 + 10);
        assert!(a.log.has_unsigned());
        a.tick(&id, T0 + CHECKPOINT_AFTER_SECS);
        assert!(!a.log.has_unsigned());
    }

    #[test]
    fn the_statement_hash_covers_the_signature() {
        let id = Identity::from_bytes(&[9; 64]);
        let body = Statement {
            kind: StatementKind::Approve,
            from: id.public(),
            to: pilot_proto::identity::NodeId([1; 16]),
            seq: 7,
        };
        let st = Signed::sign(body, &id);
        let h = statement_hash(&st);
        assert_eq!(h.len(), 64);
        let mut other = st.clone();
        other.sig[0] ^= 1;
        assert_ne!(statement_hash(&other), h);
        let d = statement_details(&st, "beta");
        assert_eq!(
            (d["kind"].as_str(), d["seq"].as_u64()),
            (Some("approve"), Some(7))
        );
    }
}
