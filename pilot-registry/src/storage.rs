//! Registry storage: one trait that only persists, and the embedded SQLite
//! implementation.
//!
//! The rules (which address a node gets, which hostname it may claim, which
//! sequence numbers are new) live above this trait, in `registrar`, `pool`
//! and `names`, so another backend implements persistence and nothing else.
//! Every method that changes state commits before it returns, so whatever
//! the registry acknowledges to a node survives a crash (WAL,
//! synchronous=FULL).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use pilot_proto::identity::{NodeId, PublicIdentity};
use pilot_proto::messages::{self, Signed, Statement};
use rusqlite::{params, Connection, ErrorCode as SqlErrorCode, OptionalExtension};

/// Storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database refused.
    #[error("database: {0}")]
    Db(rusqlite::Error),
    /// A write collided with a row another writer stored meanwhile (an
    /// address or hostname that must be unique). Re-read and decide again.
    #[error("conflicting write: {0}")]
    Conflict(String),
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

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(SqlErrorCode::ConstraintViolation) => StorageError::Conflict(e.to_string()),
            _ => StorageError::Db(e),
        }
    }
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
    /// SHA-256 of the last accepted registration as signed, so an exact
    /// resend (its answer was lost) is told from a replay; `None` for a
    /// row stored before the registry kept it.
    pub reg_digest: Option<[u8; 32]>,
}

/// What the registry keeps. One implementation per database; persistence
/// only, no rules.
pub trait Storage: Send {
    /// A node by id.
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError>;
    /// A node by overlay address.
    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError>;
    /// A node by hostname.
    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError>;
    /// True if some node holds the address.
    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError>;
    /// Stores a new node. [`StorageError::Conflict`] if its id, address or
    /// hostname is already stored.
    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError>;
    /// Replaces a stored node's keys, hostname, sequence number and
    /// endpoints (its address never changes). [`StorageError::Conflict`] if
    /// the hostname is held by another node.
    fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError>;
    /// Replaces a node's endpoints.
    fn set_endpoints(&mut self, id: &NodeId, endpoints: &[SocketAddr]) -> Result<(), StorageError>;
    /// The sequence number of the stored statement of `from` about `to`.
    fn statement_seq(&self, from: &NodeId, to: &NodeId) -> Result<Option<u64>, StorageError>;
    /// The stored statement of `from` about `to`, exactly as signed, so an
    /// exact resend (its answer was lost) is told from a replay. The
    /// default keeps none: a backend without it answers every resend
    /// "replayed", as registries did before. A wrapper should pass it on.
    fn statement(
        &self,
        _from: &NodeId,
        _to: &NodeId,
    ) -> Result<Option<Signed<Statement>>, StorageError> {
        Ok(None)
    }
    /// Stores a statement as the newest of its pair and queues it for the
    /// recipient, atomically. Returns the push id.
    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError>;
    /// True if `from`'s stored statement about `to` approves it.
    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError>;
    /// Pushes waiting for a node, oldest first.
    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError>;
    /// Forgets an acknowledged push.
    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError>;
    /// Number of registered nodes.
    fn node_count(&self) -> Result<u64, StorageError>;
    /// Up to `limit` registered nodes, by address (for the status page's
    /// list). The default lists none; a wrapper should pass it on.
    fn nodes(&self, _limit: usize) -> Result<Vec<NodeRow>, StorageError> {
        Ok(vec![])
    }
}

/// Current schema version.
pub const SCHEMA_VERSION: i64 = 2;

/// Versioned migrations; entry `i` moves the schema from version `i` to `i+1`.
const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    r#"
ALTER TABLE nodes ADD COLUMN reg_digest BLOB;
"#,
];

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
            reg_digest: r.get(7)?,
        })
    }

    fn query_node(
        &self,
        where_: &str,
        p: &dyn rusqlite::ToSql,
    ) -> Result<Option<NodeRow>, StorageError> {
        let sql = format!(
            "SELECT ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest FROM nodes WHERE {where_}"
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
    reg_digest: Option<Vec<u8>>,
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
            reg_digest: self
                .reg_digest
                .map(|d| d.try_into().map_err(|_| corrupt("reg_digest")))
                .transpose()?,
        })
    }
}

fn join_endpoints(endpoints: &[SocketAddr]) -> String {
    endpoints
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Storage for SqliteStorage {
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("node_id = ?1", &id.to_string())
    }

    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("address = ?1", &u32::from(a))
    }

    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
        self.query_node("hostname = ?1", &name)
    }

    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM nodes WHERE address = ?1")?;
        Ok(stmt.exists([u32::from(a)])?)
    }

    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        let id = row.identity.node_id().to_string();
        self.conn.execute(
            "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                &row.identity.ed_public[..],
                &row.identity.static_public[..],
                row.identity.binding,
                u32::from(row.address),
                row.hostname,
                row.reg_seq as i64,
                join_endpoints(&row.endpoints),
                row.reg_digest.as_ref().map(|d| &d[..])
            ],
        )?;
        Ok(())
    }

    fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        let id = row.identity.node_id().to_string();
        let n = self.conn.execute(
            "UPDATE nodes SET static_pub = ?2, binding = ?3, hostname = ?4, reg_seq = ?5, endpoints = ?6, reg_digest = ?7 WHERE node_id = ?1",
            params![
                id,
                &row.identity.static_public[..],
                row.identity.binding,
                row.hostname,
                row.reg_seq as i64,
                join_endpoints(&row.endpoints),
                row.reg_digest.as_ref().map(|d| &d[..])
            ],
        )?;
        if n == 0 {
            return Err(StorageError::Conflict(format!("node {id} is not stored")));
        }
        Ok(())
    }

    fn set_endpoints(&mut self, id: &NodeId, endpoints: &[SocketAddr]) -> Result<(), StorageError> {
        self.conn.execute(
            "UPDATE nodes SET endpoints = ?2 WHERE node_id = ?1",
            params![id.to_string(), join_endpoints(endpoints)],
        )?;
        Ok(())
    }

    fn statement_seq(&self, from: &NodeId, to: &NodeId) -> Result<Option<u64>, StorageError> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq FROM statements WHERE from_id = ?1 AND to_id = ?2",
                [from.to_string(), to.to_string()],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|s| s as u64))
    }

    fn statement(
        &self,
        from: &NodeId,
        to: &NodeId,
    ) -> Result<Option<Signed<Statement>>, StorageError> {
        let body = self
            .conn
            .query_row(
                "SELECT body FROM statements WHERE from_id = ?1 AND to_id = ?2",
                [from.to_string(), to.to_string()],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?;
        body.map(|b| {
            messages::decode(&b).map_err(|e| StorageError::Corrupt {
                table: "statements",
                detail: e.to_string(),
            })
        })
        .transpose()
    }

    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError> {
        let from = st.body.from.node_id().to_string();
        let to = st.body.to.to_string();
        let body = messages::encode(st).map_err(|e| StorageError::Corrupt {
            table: "statements",
            detail: e.to_string(),
        })?;
        let tx = self.conn.transaction()?;
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
        Ok(id)
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

    fn nodes(&self, limit: usize) -> Result<Vec<NodeRow>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest FROM nodes ORDER BY address LIMIT ?1",
        )?;
        let raw = stmt
            .query_map(
                [i64::try_from(limit).unwrap_or(i64::MAX)],
                Self::row_to_node,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(RawNode::decode).collect()
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

    fn row(n: u8, last: u8, host: Option<&str>) -> NodeRow {
        NodeRow {
            identity: id(n).public(),
            address: Ipv4Addr::new(10, 77, 0, last),
            hostname: host.map(str::to_string),
            endpoints: vec![
                "203.0.113.9:5555".parse().unwrap(),
                "192.0.2.10:4000".parse().unwrap(),
            ],
            reg_seq: 1,
            reg_digest: Some([n; 32]),
        }
    }

    #[test]
    fn nodes_survive_a_reopen_and_are_found_three_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let mut s = SqliteStorage::open(&path).unwrap();
            s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
            s.insert_node(&row(2, 6, None)).unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        let a = id(1).node_id();
        assert_eq!(s.node(&a).unwrap(), Some(row(1, 5, Some("alpha"))));
        assert_eq!(
            s.node_by_name("alpha").unwrap().unwrap().identity,
            id(1).public()
        );
        assert_eq!(
            s.node_by_address(Ipv4Addr::new(10, 77, 0, 6))
                .unwrap()
                .unwrap()
                .identity,
            id(2).public()
        );
        assert!(s.address_taken(Ipv4Addr::new(10, 77, 0, 5)).unwrap());
        assert!(!s.address_taken(Ipv4Addr::new(10, 77, 0, 7)).unwrap());
        assert_eq!(s.node_count().unwrap(), 2);
        assert_eq!(s.node(&id(3).node_id()).unwrap(), None);
    }

    #[test]
    fn nodes_are_listed_by_address_up_to_the_limit() {
        let mut s = SqliteStorage::in_memory().unwrap();
        s.insert_node(&row(1, 9, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 3, None)).unwrap();
        s.insert_node(&row(3, 6, Some("gamma"))).unwrap();
        let all = s.nodes(10).unwrap();
        assert_eq!(
            all.iter()
                .map(|r| r.address.octets()[3])
                .collect::<Vec<_>>(),
            vec![3, 6, 9]
        );
        assert_eq!(all[2], row(1, 9, Some("alpha")));
        assert_eq!(s.nodes(2).unwrap().len(), 2);
        assert!(s.nodes(0).unwrap().is_empty());
    }

    #[test]
    fn unique_address_and_hostname_are_conflicts() {
        let mut s = SqliteStorage::in_memory().unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        assert!(matches!(
            s.insert_node(&row(2, 5, None)),
            Err(StorageError::Conflict(_))
        ));
        assert!(matches!(
            s.insert_node(&row(2, 6, Some("alpha"))),
            Err(StorageError::Conflict(_))
        ));
        s.insert_node(&row(2, 6, None)).unwrap();
        assert!(matches!(
            s.update_node(&row(2, 6, Some("alpha"))),
            Err(StorageError::Conflict(_))
        ));
        assert!(
            matches!(
                s.update_node(&row(3, 7, None)),
                Err(StorageError::Conflict(_))
            ),
            "updating a node that is not stored"
        );
    }

    #[test]
    fn update_keeps_the_address_and_replaces_the_rest() {
        let mut s = SqliteStorage::in_memory().unwrap();
        s.insert_node(&row(1, 5, None)).unwrap();
        let mut r = row(1, 9, Some("alpha"));
        r.reg_seq = 7;
        r.endpoints = vec!["198.51.100.1:1".parse().unwrap()];
        r.reg_digest = Some([9; 32]);
        s.update_node(&r).unwrap();
        let got = s.node(&id(1).node_id()).unwrap().unwrap();
        assert_eq!(
            got.address,
            Ipv4Addr::new(10, 77, 0, 5),
            "address is permanent"
        );
        assert_eq!((got.hostname.as_deref(), got.reg_seq), (Some("alpha"), 7));
        assert_eq!(got.endpoints, r.endpoints);
        assert_eq!(got.reg_digest, Some([9; 32]));
        s.set_endpoints(&id(1).node_id(), &[]).unwrap();
        assert!(s
            .node(&id(1).node_id())
            .unwrap()
            .unwrap()
            .endpoints
            .is_empty());
    }

    #[test]
    fn statements_are_stored_per_pair_and_queued() {
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
        let (an, bn) = (a.node_id(), b.node_id());
        assert_eq!(s.statement_seq(&an, &bn).unwrap(), None);
        assert_eq!(s.statement(&an, &bn).unwrap(), None);
        assert!(!s.approves(&an, &bn).unwrap());
        let p1 = s.put_statement(&st(StatementKind::Approve, 3)).unwrap();
        assert!(s.approves(&an, &bn).unwrap());
        assert_eq!(s.statement_seq(&an, &bn).unwrap(), Some(3));
        s.put_statement(&st(StatementKind::Revoke, 4)).unwrap();
        assert!(!s.approves(&an, &bn).unwrap());
        assert_eq!(s.statement_seq(&an, &bn).unwrap(), Some(4));
        assert_eq!(
            s.statement(&an, &bn).unwrap(),
            Some(st(StatementKind::Revoke, 4)),
            "the newest, exactly as signed"
        );
        assert_eq!(s.statement(&bn, &an).unwrap(), None);
        let inbox = s.inbox(&bn).unwrap();
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox[0].0, p1);
        assert_eq!(inbox[1].1, st(StatementKind::Revoke, 4));
        s.ack(&bn, p1).unwrap();
        assert_eq!(s.inbox(&bn).unwrap().len(), 1);
        // Someone else cannot ack b's mail.
        s.ack(&an, inbox[1].0).unwrap();
        assert_eq!(s.inbox(&bn).unwrap().len(), 1);
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            let r = row(1, 5, Some("alpha"));
            conn.execute(
                "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    r.identity.node_id().to_string(),
                    &r.identity.ed_public[..],
                    &r.identity.static_public[..],
                    r.identity.binding,
                    u32::from(r.address),
                    r.hostname,
                    1i64,
                    join_endpoints(&r.endpoints)
                ],
            )
            .unwrap();
        }
        let s = SqliteStorage::open(&path).unwrap();
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let got = s.node(&id(1).node_id()).unwrap().unwrap();
        assert_eq!(
            got,
            NodeRow {
                reg_digest: None,
                ..row(1, 5, Some("alpha"))
            }
        );
    }
}
