//! The registry's audit log: registrations, the trust statements it
//! carried (their SHA-256 only, the same hash the nodes log), and relay
//! admissions and refusals counted per pair and minute, in
//! `<state-dir>/audit.jsonl` (a relay-only instance: `audit-relay.jsonl`),
//! the same hash chain with signed checkpoints as a node's.
//!
//! A writer thread of its own owns the file ([`pilot_audit::file`]); the
//! socket loop hands it entries through a bounded queue without ever
//! waiting (a full queue loses the entry and counts it; the loss is logged
//! as `audit-entries-lost`). Checkpoints are signed with an Ed25519 key
//! derived from the registry's secret key (`SHA-256(domain ‖ secret)` as
//! the seed), so nothing new needs keeping and `audit verify` needs only
//! the state directory. Entries:
//!
//! | kind | details |
//! |---|---|
//! | `registry-start`, `registry-stop` | `key` (the audit public key) |
//! | `registration` | `node`, `address`, `hostname`: a node's first registration seen by this process, or one that changed its address or hostname |
//! | `statement-carried` | `from`, `to`, `kind`, `statement` (SHA-256 of the signed statement) |
//! | `relay` | `verdict` (`admitted`, `held`, `refused`), `from` (node, or address if unknown), `to`, `minute`: first of its kind in a minute |
//! | `relay-count`, `relay-dropped` | the same with `count` once the minute is over; events beyond the table |
//! | `registration-refused` | `node`, `reason`, `minute` (then a `-count` line) |
//! | `cert-published` | `holder`, `owner`, `tags`, `expires_at`, `cert` (SHA-256 of the certificate as kept): a certificate new to the registry |
//! | `revocation-kept` | `owner`, `node`, `by` (the node that handed it in), `revocation` (SHA-256): a revocation new to the registry |
//! | `cert-refused`, `revocation-refused` | `from` (the sending node), `reason`, `minute` (then a `-count` line) |

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pilot_audit::file::{Limits, LogFile};
use pilot_proto::aggregate::{Aggregator, Flushed, Recorded};
use pilot_proto::identity::{Identity, NodeId};
use serde_json::{json, Value};
use tracing::warn;
use zeroize::Zeroizing;

/// The log of a registry.
pub const REGISTRY_LOG: &str = pilot_audit::LOG_FILE;
/// The log of a relay-only instance sharing the registry's directory.
pub const RELAY_LOG: &str = "audit-relay.jsonl";
/// Entries that may wait for the writer.
const QUEUE: usize = 4096;
/// (verdict, from, to) counted per minute; beyond it, only in total.
const TABLE: usize = 256;
/// While entries wait unsigned, a checkpoint at least this often.
const CHECKPOINT_AFTER_SECS: u64 = 300;
const KEY_DOMAIN: &[u8] = b"pilot-registry/v1/audit-key";

/// The Ed25519 identity that signs the registry's checkpoints, derived
/// from its secret key.
pub fn signing_identity(secret: &[u8; 32]) -> Identity {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(KEY_DOMAIN);
    ctx.update(secret);
    let seed = ctx.finish();
    let mut bytes = Zeroizing::new([0u8; 64]);
    bytes[..32].copy_from_slice(seed.as_ref());
    bytes[32..].copy_from_slice(secret);
    Identity::from_bytes(&bytes)
}

/// The public key that checks the registry's checkpoints.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    signing_identity(secret).ed_public()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 (hex) of a signed statement as it travels.
pub fn statement_hash(
    st: &pilot_proto::messages::Signed<pilot_proto::messages::Statement>,
) -> String {
    let bytes = pilot_proto::messages::encode(st).unwrap_or_default();
    pilot_proto::hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

struct Item {
    time: u64,
    kind: &'static str,
    details: Value,
}

/// The loop's end of the writer: entries go in without waiting.
#[derive(Clone, Default)]
pub struct Sink {
    tx: Option<SyncSender<Item>>,
    lost: Arc<AtomicU64>,
}

impl Sink {
    /// A sink that writes nothing (no state directory given).
    pub fn off() -> Self {
        Sink::default()
    }

    /// Queues an entry; if the writer is behind, it is lost and counted.
    pub fn record(&self, kind: &'static str, details: Value) {
        let Some(tx) = &self.tx else { return };
        let item = Item {
            time: unix_now(),
            kind,
            details,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(item) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the writer of `dir/name`, signing with the key derived from
    /// `secret`. The thread ends (with `registry-stop` and a checkpoint)
    /// once every sink is dropped.
    pub fn spawn(
        dir: &Path,
        name: &str,
        secret: &[u8; 32],
    ) -> std::io::Result<(Sink, JoinHandle<()>)> {
        let signer = signing_identity(secret);
        let now = unix_now();
        let (mut log, damage) = LogFile::open(dir, name, &signer, now, Limits::default())
            .map_err(std::io::Error::other)?;
        if let Some(d) = damage {
            warn!(
                "the audit log was damaged at line {} ({}); it is kept as {} and the log goes on from the last good line",
                d.line,
                d.problem,
                d.kept_as.display()
            );
        }
        let key = pilot_proto::hex::encode(&signer.ed_public());
        let (tx, rx) = mpsc::sync_channel::<Item>(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let lost2 = lost.clone();
        let thread = std::thread::Builder::new()
            .name("registry-audit".into())
            .spawn(move || {
                crate::priority::background("audit");
                let write = |log: &mut LogFile, t: u64, kind: &str, d: &Value| {
                    if let Err(e) = log.append(&signer, t, kind, d) {
                        warn!("audit entry '{kind}' not written: {e}");
                    }
                };
                write(&mut log, now, "registry-start", &json!({"key": key}));
                let mut last_signed = now;
                loop {
                    let item = rx.recv_timeout(Duration::from_secs(15));
                    let n = lost2.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        write(
                            &mut log,
                            unix_now(),
                            "audit-entries-lost",
                            &json!({"count": n}),
                        );
                    }
                    match item {
                        Ok(i) => write(&mut log, i.time, i.kind, &i.details),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    let t = unix_now();
                    if !log.has_unsigned() {
                        last_signed = t;
                    } else if t.saturating_sub(last_signed) >= CHECKPOINT_AFTER_SECS {
                        let _ = log.checkpoint(&signer, t);
                        last_signed = t;
                    }
                }
                let t = unix_now();
                write(&mut log, t, "registry-stop", &json!({"key": key}));
                if let Err(e) = log.checkpoint(&signer, t) {
                    warn!("audit checkpoint not written: {e}");
                }
            })?;
        Ok((Sink { tx: Some(tx), lost }, thread))
    }
}

/// Who sent a relayed datagram: a node with a control session, or only an
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum From {
    /// A node.
    Node(NodeId),
    /// An address without a session.
    Addr(IpAddr),
}

/// What is counted per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// The entry kind (`relay`, `registration-refused`).
    pub kind: &'static str,
    /// The verdict or reason.
    pub what: &'static str,
    /// The sender.
    pub from: From,
    /// The recipient, if any.
    pub to: Option<NodeId>,
}

/// The loop's side of the audit: counts per minute, registrations seen.
pub struct Audit {
    sink: Sink,
    counts: Aggregator<Key>,
    seen: HashMap<NodeId, (Ipv4Addr, Option<String>)>,
}

fn details(k: &Key, minute: u64) -> Value {
    let from = match k.from {
        From::Node(n) => n.to_string(),
        From::Addr(a) => a.to_string(),
    };
    let mut d = json!({ "from": from, "minute": minute });
    match k.kind {
        "relay" => d["verdict"] = k.what.into(),
        _ => d["reason"] = k.what.into(),
    }
    if let Some(to) = k.to {
        d["to"] = to.to_string().into();
    }
    d
}

impl Audit {
    /// The loop's audit, writing through `sink`.
    pub fn new(sink: Sink) -> Self {
        Audit {
            sink,
            counts: Aggregator::new(TABLE),
            seen: HashMap::new(),
        }
    }

    /// Counts one event; the first of its key in a minute goes out now.
    pub fn count(&mut self, key: Key) {
        if self.sink.tx.is_none() {
            return;
        }
        let now = unix_now();
        if self.counts.record(key, now) == Recorded::First {
            self.sink.record(key.kind, details(&key, now - now % 60));
        }
    }

    /// A registration the storage committed: logged if new or changed.
    pub fn registered(&mut self, node: NodeId, address: Ipv4Addr, hostname: Option<String>) {
        if self.sink.tx.is_none() {
            return;
        }
        let now = (address, hostname);
        if self.seen.get(&node) == Some(&now) {
            return;
        }
        self.sink.record(
            "registration",
            json!({"node": node.to_string(), "address": now.0.to_string(), "hostname": now.1}),
        );
        self.seen.insert(node, now);
    }

    /// An identity rotation the storage committed: the old id's address and
    /// hostname moved to its successor.
    pub fn succeeded(&mut self, old: NodeId, node: &crate::storage::NodeRow) {
        let new = node.identity.node_id();
        self.sink.record(
            "succession",
            json!({
                "old": old.to_string(),
                "new": new.to_string(),
                "address": node.address.to_string(),
                "hostname": node.hostname,
            }),
        );
        self.seen.remove(&old);
    }

    /// A statement the storage committed for delivery.
    pub fn carried(&self, from: NodeId, to: NodeId, kind: &str, statement: &str) {
        self.sink.record(
            "statement-carried",
            json!({"from": from.to_string(), "to": to.to_string(), "kind": kind, "statement": statement}),
        );
    }

    /// A certificate the storage kept (new or changed).
    pub fn cert_published(&self, c: &crate::fleet::CertFacts) {
        let tags: Vec<&str> = c.tags.iter().map(|t| t.as_str()).collect();
        self.sink.record(
            "cert-published",
            json!({
                "holder": c.holder.to_string(),
                "owner": c.owner.to_string(),
                "tags": tags,
                "expires_at": c.expires_at,
                "cert": pilot_proto::hex::encode(&c.hash),
            }),
        );
    }

    /// A revocation the storage kept (new).
    pub fn revocation_kept(&self, r: &crate::fleet::RevocationFacts, by: NodeId) {
        self.sink.record(
            "revocation-kept",
            json!({
                "owner": r.owner.to_string(),
                "node": r.node.to_string(),
                "by": by.to_string(),
                "revocation": pilot_proto::hex::encode(&r.hash),
            }),
        );
    }

    /// Writes out the counts of the minutes that are over.
    pub fn tick(&mut self) {
        let f = self.counts.flush(unix_now());
        self.write_counts(f);
    }

    fn write_counts(&mut self, f: Flushed<Key>) {
        for c in f.counts {
            let mut d = details(&c.key, c.minute);
            d["count"] = c.count.into();
            let kind = match c.key.kind {
                "relay" => "relay-count",
                "cert-refused" => "cert-refused-count",
                "revocation-refused" => "revocation-refused-count",
                _ => "registration-refused-count",
            };
            self.sink.record(kind, d);
        }
        for (minute, count) in f.dropped {
            self.sink
                .record("relay-dropped", json!({"minute": minute, "count": count}));
        }
    }
}

impl Drop for Audit {
    /// The counts of the current minute too, before the writer stops.
    fn drop(&mut self) {
        let f = self.counts.flush_all();
        self.write_counts(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_reach_the_file_and_verify_with_the_derived_key() {
        let dir = tempfile::tempdir().unwrap();
        let secret = [7u8; 32];
        let (sink, thread) = Sink::spawn(dir.path(), REGISTRY_LOG, &secret).unwrap();
        let mut audit = Audit::new(sink.clone());
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        audit.registered(a, Ipv4Addr::new(10, 77, 0, 1), None);
        audit.registered(a, Ipv4Addr::new(10, 77, 0, 1), None); // unchanged: not again
        for _ in 0..1000 {
            audit.count(Key {
                kind: "relay",
                what: "refused",
                from: From::Node(a),
                to: Some(b),
            });
        }
        drop(audit);
        drop(sink);
        thread.join().unwrap();
        let out = pilot_audit::read::verify(dir.path(), REGISTRY_LOG, &[public_key(&secret)], None)
            .unwrap();
        let r = out.result.unwrap();
        assert_eq!(r.unsigned_trailing, 0);
        let (entries, _) = pilot_audit::read::entries(dir.path(), REGISTRY_LOG).unwrap();
        let kinds: Vec<&str> = entries.iter().map(|e| e.entry.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "registry-start",
                "registration",
                "relay",
                "relay-count",
                "registry-stop",
                "checkpoint"
            ]
        );
        assert_eq!(entries[3].entry.details["count"], 1000);
        // Another key does not verify it.
        let other =
            pilot_audit::read::verify(dir.path(), REGISTRY_LOG, &[public_key(&[8; 32])], None)
                .unwrap();
        assert!(other.result.is_err());
    }
}
