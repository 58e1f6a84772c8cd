//! Registry storage: one trait, and the embedded SQLite implementation.
//!
//! Every method that changes state commits before it returns, so whatever
//! the server acknowledges to a node survives a crash (WAL, synchronous=FULL).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use ipnet::Ipv4Net;
use pilot_proto::identity::{NodeId, PublicIdentity};
use pilot_proto::messages::{self, Registration, Signed, Statement};
use rusqlite::{params, Connection, OptionalExtension};

/// Storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database refused.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored row does not decode (corrupt database).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The database was written by a newer registry.
    #[error("database schema version {0} is newer than this registry understands ({SCHEMA_VERSION}); upgrade pilot-registry")]
    TooNew(i64),
}

/// A stored node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    /// Its keys.
    pub identity: PublicIdentity,
    /// Its permanent address.
    pub address: Ipv4Addr,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Last known endpoints (observed first).
    pub endpoints: Vec<SocketAddr>,
    /// Last accepted registration sequence number.
    pub reg_seq: u64,
}

/// The result of a registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Registered; the hostname may have been refused.
    Ok {
        /// The node as stored.
        node: NodeRow,
        /// Why the requested hostname was not granted.
        hostname_refused: Option<String>,
    },
    /// Sequence number not newer than the stored one.
    Replayed,
    /// No free address left.
    PoolExhausted,
}

/// The result of storing a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementOutcome {
    /// Stored; queued for the recipient under this push id.
    Stored(u64),
    /// Sequence number not newer than the stored statement's.
    Replayed,
}

/// What the registry keeps. One implementation per database.
pub trait Storage: Send {
    /// Registers (or re-registers) a node, allocating its permanent address
    /// in `network` on first sight.
    fn register(
        &mut self,
        reg: &Registration,
        network: Ipv4Net,
        observed: SocketAddr,
    ) -> Result<RegisterOutcome, StorageError>;
    /// Records where a node was last seen.
    fn set_observed(&mut self, id: &NodeId, observed: SocketAddr) -> Result<(), StorageError>;
    /// A node by id.
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError>;
    /// A node by overlay address.
    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError>;
    /// A node by hostname.
    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError>;
    /// Stores a signed statement (newest per pair) and queues it for the
    /// recipient, atomically.
    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<StatementOutcome, StorageError>;
    /// True if `from`'s latest statement about `to` approves it.
    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError>;
    /// Pushes waiting for a node, oldest first.
    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError>;
    /// Forgets an acknowledged push.
    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError>;
    /// Number of registered nodes.
    fn node_count(&self) -> Result<u64, StorageError>;
}

/// Current schema version.
pub const SCHEMA_VERSION: i64 = 1;

/// Versioned migrations; entry `i` moves the schema from version `i` to `i+1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE nodes (
    node_id    TEXT PRIMARY KEY,
    ed_public  BLOB NOT NULL,
    static_pub BLOB NOT NULL,
    binding    BLOB NOT NULL,
    address    INTEGER NOT NULL UNIQUE,
    hostname   TEXT UNIQUE,
    reg_seq    INTEGER NOT NULL,
    endpoints  TEXT NOT NULL DEFAULT '',
    created    INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE statements (
    from_id TEXT NOT NULL,
    to_id   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    approves INTEGER NOT NULL,
    body    BLOB NOT NULL,
    PRIMARY KEY (from_id, to_id)
);
CREATE TABLE inbox (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    to_id TEXT NOT NULL,
    body  BLOB NOT NULL
);
CREATE INDEX inbox_to ON inbox (to_id, id);
"#];

/// The embedded default: SQLite in WAL mode.
pub struct SqliteStorage {
    conn: Connection,
}

impl SqliteStorage {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StorageError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StorageError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StorageError::TooNew(version));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(SqliteStorage { conn })
    }

    fn row_to_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawNode> {
        Ok(RawNode {
            ed: r.get(0)?,
            st: r.get(1)?,
            binding: r.get(2)?,
            address: r.get(3)?,
            hostname: r.get(4)?,
            reg_seq: r.get(5)?,
            endpoints: r.get(6)?,
        })
    }

    fn query_node(
        &self,
        where_: &str,
        p: &dyn rusqlite::ToSql,
    ) -> Result<Option<NodeRow>, StorageError> {
        let sql = format!(
            "SELECT ed_public, static_pub, binding, address, hostname, reg_seq, endpoints FROM nodes WHERE {where_}"
        );
        let raw = self
            .conn
            .query_row(&sql, [p], Self::row_to_node)
            .optional()?;
        raw.map(RawNode::decode).transpose()
    }
}

struct RawNode {
    ed: Vec<u8>,
    st: Vec<u8>,
    binding: Vec<u8>,
    address: u32,
    hostname: Option<String>,
    reg_seq: i64,
    endpoints: String,
}

impl RawNode {
    fn decode(self) -> Result<NodeRow, StorageError> {
        let corrupt = |d: &str| StorageError::Corrupt {
            table: "nodes",
            detail: d.to_string(),
        };
        Ok(NodeRow {
            identity: PublicIdentity {
                ed_public: self.ed.try_into().map_err(|_| corrupt("ed_public"))?,
                static_public: self.st.try_into().map_err(|_| corrupt("static_pub"))?,
                binding: self.binding,
            },
            address: Ipv4Addr::from(self.address),
            hostname: self.hostname,
            endpoints: self
                .endpoints
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().map_err(|_| corrupt("endpoints")))
                .collect::<Result<_, _>>()?,
            reg_seq: self.reg_seq as u64,
        })
    }
}

fn join_endpoints(observed: SocketAddr, locals: &[SocketAddr]) -> String {
    let mut all = vec![observed];
    for l in locals {
        if !all.contains(l) && all.len() < messages::MAX_ENDPOINTS {
            all.push(*l);
        }
    }
    all.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Candidate address for a node: a spot derived from its id, then the next
/// free one. Skips the network and broadcast addresses.
fn pick_address(
    tx: &rusqlite::Transaction<'_>,
    id: &NodeId,
    network: Ipv4Net,
) -> Result<Option<Ipv4Addr>, StorageError> {
    let base = u32::from(network.network());
    let size: u64 = 1u64 << (32 - network.prefix_len() as u32);
    if size < 4 {
        return Ok(None);
    }
    let usable = size - 2;
    let start = u64::from_be_bytes(id.0[..8].try_into().expect("16-byte id")) % usable;
    let mut stmt = tx.prepare_cached("SELECT 1 FROM nodes WHERE address = ?1")?;
    for i in 0..usable {
        let candidate = base + 1 + ((start + i) % usable) as u32;
        // Addresses ending in .0 or .255 are valid inside a /16 but confuse
        // people and some tools; skip them while the pool is large enough.
        let last = candidate & 0xff;
        if size > 256 && (last == 0 || last == 255) {
            continue;
        }
        if !stmt.exists([candidate])? {
            return Ok(Some(Ipv4Addr::from(candidate)));
        }
    }
    Ok(None)
}

impl Storage for SqliteStorage {
    fn register(
        &mut self,
        reg: &Registration,
        network: Ipv4Net,
        observed: SocketAddr,
    ) -> Result<RegisterOutcome, StorageError> {
        let id = reg.identity.node_id();
        let key = id.to_string();
        let tx = self.conn.transaction()?;
        let existing: Option<(i64, u32, Option<String>)> = tx
            .query_row(
                "SELECT reg_seq, address, hostname FROM nodes WHERE node_id = ?1",
                [&key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let endpoints = join_endpoints(observed, &reg.local_endpoints);
        let (address, mut hostname) = match existing {
            Some((seq, _, _)) if reg.seq <= seq as u64 => return Ok(RegisterOutcome::Replayed),
            Some((_, addr, host)) => {
                tx.execute(
                    "UPDATE nodes SET static_pub = ?2, binding = ?3, reg_seq = ?4, endpoints = ?5 WHERE node_id = ?1",
                    params![key, &reg.identity.static_public[..], reg.identity.binding, reg.seq as i64, endpoints],
                )?;
                (Ipv4Addr::from(addr), host)
            }
            None => {
                let Some(addr) = pick_address(&tx, &id, network)? else {
                    return Ok(RegisterOutcome::PoolExhausted);
                };
                tx.execute(
                    "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, reg_seq, endpoints) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![key, &reg.identity.ed_public[..], &reg.identity.static_public[..], reg.identity.binding, u32::from(addr), reg.seq as i64, endpoints],
                )?;
                (addr, None)
            }
        };
        let mut hostname_refused = None;
        if let Some(want) = &reg.hostname {
            if hostname.as_deref() != Some(want.as_str()) {
                if !messages::valid_hostname(want) {
                    hostname_refused = Some(format!(
                        "{want:?} is not a valid hostname (a-z, 0-9, '-', at most 63)"
                    ));
                } else {
                    let owner: Option<String> = tx
                        .query_row(
                            "SELECT node_id FROM nodes WHERE hostname = ?1",
                            [want],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if owner.is_some() {
                        hostname_refused =
                            Some(format!("hostname {want:?} is taken by another node"));
                    } else {
                        tx.execute(
                            "UPDATE nodes SET hostname = ?2 WHERE node_id = ?1",
                            params![key, want],
                        )?;
                        hostname = Some(want.clone());
                    }
                }
            }
        }
        tx.commit()?;
        let node = self.node(&id)?.ok_or_else(|| StorageError::Corrupt {
            table: "nodes",
            detail: "registered row vanished".into(),
        })?;
        debug_assert_eq!(node.address, address);
        debug_assert_eq!(node.hostname, hostname);
        Ok(RegisterOutcome::Ok {
            node,
            hostname_refused,
        })
    }

    fn set_observed(&mut self, id: &NodeId, observed: SocketAddr) -> Result<(), StorageError> {
        let Some(node) = self.node(id)? else {
            return Ok(());
        };
        if node.endpoints.first() == Some(&observed) {
            return Ok(());
        }
        let locals: Vec<SocketAddr> = node.endpoints.iter().skip(1).copied().collect();
        self.conn.execute(
            "UPDATE nodes SET endpoints = ?2 WHERE node_id = ?1",
            params![id.to_string(), join_endpoints(observed, &locals)],
        )?;
        Ok(())
    }

    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("node_id = ?1", &id.to_string())
    }

    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("address = ?1", &u32::from(a))
    }

    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("hostname = ?1", &name)
    }

    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<StatementOutcome, StorageError> {
        let from = st.body.from.node_id().to_string();
        let to = st.body.to.to_string();
        let body = messages::encode(st).map_err(|e| StorageError::Corrupt {
            table: "statements",
            detail: e.to_string(),
        })?;
        let tx = self.conn.transaction()?;
        let seq: Option<i64> = tx
            .query_row(
                "SELECT seq FROM statements WHERE from_id = ?1 AND to_id = ?2",
                [&from, &to],
                |r| r.get(0),
            )
            .optional()?;
        if seq.is_some_and(|s| st.body.seq <= s as u64) {
            return Ok(StatementOutcome::Replayed);
        }
        tx.execute(
            "INSERT INTO statements (from_id, to_id, seq, approves, body) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (from_id, to_id) DO UPDATE SET seq = ?3, approves = ?4, body = ?5",
            params![from, to, st.body.seq as i64, st.body.kind.approves(), body],
        )?;
        tx.execute(
            "INSERT INTO inbox (to_id, body) VALUES (?1, ?2)",
            params![to, body],
        )?;
        let id = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(StatementOutcome::Stored(id))
    }

    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError> {
        Ok(self
            .conn
            .query_row(
                "SELECT approves FROM statements WHERE from_id = ?1 AND to_id = ?2",
                [from.to_string(), to.to_string()],
                |r| r.get::<_, bool>(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, body FROM inbox WHERE to_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([to.to_string()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, body) = row?;
            let st = messages::decode(&body).map_err(|e| StorageError::Corrupt {
                table: "inbox",
                detail: e.to_string(),
            })?;
            out.push((id as u64, st));
        }
        Ok(out)
    }

    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
        self.conn.execute(
            "DELETE FROM inbox WHERE id = ?1 AND to_id = ?2",
            params![push as i64, to.to_string()],
        )?;
        Ok(())
    }

    fn node_count(&self) -> Result<u64, StorageError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM nodes", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilot_proto::identity::Identity;
    use pilot_proto::messages::StatementKind;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    fn reg(i: &Identity, seq: u64, host: Option<&str>) -> Registration {
        Registration {
            identity: i.public(),
            hostname: host.map(str::to_string),
            seq,
            local_endpoints: vec!["192.0.2.10:4000".parse().unwrap()],
            nat: Default::default(),
        }
    }

    fn net() -> Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    fn obs() -> SocketAddr {
        "203.0.113.9:5555".parse().unwrap()
    }

    fn ok(o: RegisterOutcome) -> (NodeRow, Option<String>) {
        match o {
            RegisterOutcome::Ok {
                node,
                hostname_refused,
            } => (node, hostname_refused),
            other => panic!("expected Ok, got {other:?}"),
        }
    }

    #[test]
    fn addresses_are_permanent_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (a_addr, b_addr);
        {
            let mut s = SqliteStorage::open(&path).unwrap();
            a_addr = ok(s
                .register(&reg(&id(1), 1, Some("alpha")), net(), obs())
                .unwrap())
            .0
            .address;
            b_addr = ok(s.register(&reg(&id(2), 1, None), net(), obs()).unwrap())
                .0
                .address;
            assert_ne!(a_addr, b_addr);
            assert!(net().contains(&a_addr));
        }
        // Reopen: same addresses, same hostname.
        let mut s = SqliteStorage::open(&path).unwrap();
        let (n, _) = ok(s.register(&reg(&id(1), 2, None), net(), obs()).unwrap());
        assert_eq!(n.address, a_addr);
        assert_eq!(n.hostname.as_deref(), Some("alpha"));
        assert_eq!(s.node_by_name("alpha").unwrap().unwrap().address, a_addr);
        assert_eq!(
            s.node_by_address(b_addr).unwrap().unwrap().identity,
            id(2).public()
        );
        assert_eq!(n.endpoints, vec![obs(), "192.0.2.10:4000".parse().unwrap()]);
    }

    #[test]
    fn replayed_registration_and_taken_hostname() {
        let mut s = SqliteStorage::in_memory().unwrap();
        ok(s.register(&reg(&id(1), 5, Some("alpha")), net(), obs())
            .unwrap());
        assert_eq!(
            s.register(&reg(&id(1), 5, None), net(), obs()).unwrap(),
            RegisterOutcome::Replayed
        );
        assert_eq!(
            s.register(&reg(&id(1), 4, None), net(), obs()).unwrap(),
            RegisterOutcome::Replayed
        );
        let (n, refused) = ok(s
            .register(&reg(&id(2), 1, Some("alpha")), net(), obs())
            .unwrap());
        assert_eq!(n.hostname, None);
        assert!(refused.unwrap().contains("taken"));
    }

    #[test]
    fn tiny_pool_exhausts() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let tiny: Ipv4Net = "10.9.0.0/30".parse().unwrap(); // two usable
        ok(s.register(&reg(&id(1), 1, None), tiny, obs()).unwrap());
        ok(s.register(&reg(&id(2), 1, None), tiny, obs()).unwrap());
        assert_eq!(
            s.register(&reg(&id(3), 1, None), tiny, obs()).unwrap(),
            RegisterOutcome::PoolExhausted
        );
    }

    #[test]
    fn statements_are_newest_wins_and_queued() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b) = (id(1), id(2));
        let st = |kind, seq| {
            Signed::sign(
                Statement {
                    kind,
                    from: a.public(),
                    to: b.node_id(),
                    seq,
                },
                &a,
            )
        };
        assert!(!s.approves(&a.node_id(), &b.node_id()).unwrap());
        let StatementOutcome::Stored(p1) = s.put_statement(&st(StatementKind::Approve, 3)).unwrap()
        else {
            panic!()
        };
        assert!(s.approves(&a.node_id(), &b.node_id()).unwrap());
        assert_eq!(
            s.put_statement(&st(StatementKind::Approve, 3)).unwrap(),
            StatementOutcome::Replayed
        );
        s.put_statement(&st(StatementKind::Revoke, 4)).unwrap();
        assert!(!s.approves(&a.node_id(), &b.node_id()).unwrap());
        let inbox = s.inbox(&b.node_id()).unwrap();
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox[0].0, p1);
        s.ack(&b.node_id(), p1).unwrap();
        assert_eq!(s.inbox(&b.node_id()).unwrap().len(), 1);
        // Someone else cannot ack b's mail.
        s.ack(&a.node_id(), inbox[1].0).unwrap();
        assert_eq!(s.inbox(&b.node_id()).unwrap().len(), 1);
    }
}
