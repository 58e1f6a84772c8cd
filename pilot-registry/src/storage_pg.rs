//! PostgreSQL behind the [`Storage`] trait: the same tables, migrations and
//! answers as the embedded SQLite, on a database server
//! (`pilot-registry --database postgres://…`).
//!
//! Why the synchronous `postgres` crate (the blocking face of
//! `tokio-postgres`): the trait is synchronous and runs on the storage
//! thread ([`crate::store`]), never on the packet task. `postgres` drives
//! `tokio-postgres` on a small current-thread runtime of its own, inside
//! that thread, so a slow database stalls the storage queue (whose callers
//! answer "busy") and never the socket loop; and the registry's own runtime
//! never blocks on a query. The one rule that follows: open and use a
//! [`PgStorage`] outside any async context (main opens it before the
//! registry's runtime starts; the storage thread is a plain thread).
//!
//! Every method that changes state commits before it returns (PostgreSQL's
//! default `synchronous_commit = on`), as the trait asks. A lost connection
//! fails the call in progress; the next call connects again. Statements are
//! prepared once per connection. Identifiers are compared bytewise
//! (`COLLATE "C"`), as SQLite does, so paging "ids after X" is the same on
//! both whatever the database's locale. Connections are plain TCP or a Unix
//! socket without TLS: put the database on the registry's host or a
//! private network.

use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pilot_proto::cert::{OwnerPublic, Tag};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, PeerRef, Signed, Statement};
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, Row, Statement as Prepared};
use tracing::warn;

use crate::storage::{
    after_key, join_endpoints, pg_detail, split_endpoints, sql_u64, token_refusal, token_row,
    CertRow, Found, NodeRow, RawNode, RevocationRow, Storage, StorageError, TokenRow, TokenUse,
    SCHEMA_VERSION,
};

/// Versioned migrations, as [`crate::storage`]'s for SQLite: entry `i`
/// moves the schema from version `i` to `i+1`, and both backends share the
/// version numbers (the array length makes a migration added to one list
/// and not the other a compile error).
pub(crate) const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE TABLE nodes (
    node_id    TEXT COLLATE "C" PRIMARY KEY,
    ed_public  BYTEA NOT NULL,
    static_pub BYTEA NOT NULL,
    binding    BYTEA NOT NULL,
    address    BIGINT NOT NULL UNIQUE,
    hostname   TEXT UNIQUE,
    reg_seq    BIGINT NOT NULL,
    endpoints  TEXT NOT NULL DEFAULT '',
    created    BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::bigint)
);
CREATE TABLE statements (
    from_id  TEXT COLLATE "C" NOT NULL,
    to_id    TEXT COLLATE "C" NOT NULL,
    seq      BIGINT NOT NULL,
    approves BOOLEAN NOT NULL,
    body     BYTEA NOT NULL,
    PRIMARY KEY (from_id, to_id)
);
CREATE TABLE inbox (
    id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    to_id TEXT COLLATE "C" NOT NULL,
    body  BYTEA NOT NULL
);
CREATE INDEX inbox_to ON inbox (to_id, id);
"#,
    r#"
ALTER TABLE nodes ADD COLUMN reg_digest BYTEA;
"#,
    r#"
CREATE TABLE certs (
    holder     TEXT COLLATE "C" PRIMARY KEY,
    owner      BYTEA NOT NULL,
    expires_at BIGINT NOT NULL,
    bytes      BYTEA NOT NULL
);
CREATE TABLE cert_tags (
    owner  BYTEA NOT NULL,
    tag    TEXT COLLATE "C" NOT NULL,
    holder TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (owner, tag, holder)
);
CREATE INDEX cert_tags_holder ON cert_tags (holder);
CREATE TABLE revocations (
    owner BYTEA NOT NULL,
    node  TEXT COLLATE "C" NOT NULL,
    bytes BYTEA NOT NULL,
    PRIMARY KEY (owner, node)
);
"#,
    r#"
CREATE TABLE successions (
    old_id TEXT COLLATE "C" PRIMARY KEY,
    new_id TEXT COLLATE "C" NOT NULL UNIQUE,
    bytes  BYTEA NOT NULL
);
"#,
    r#"
CREATE TABLE tokens (
    id         TEXT COLLATE "C" PRIMARY KEY,
    hash       BYTEA NOT NULL UNIQUE,
    uses       BIGINT,
    used       BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT,
    created    BIGINT NOT NULL,
    revoked    BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE tombstones (
    address BIGINT PRIMARY KEY,
    node_id TEXT COLLATE "C" NOT NULL,
    removed BIGINT NOT NULL
);
"#,
    // As SQLite's: last seen (the column's default stamps an insert, a
    // trigger every registration and endpoint change), and what approved
    // each tombstone's old id.
    r#"
ALTER TABLE nodes ADD COLUMN last_seen BIGINT NOT NULL DEFAULT (floor(extract(epoch FROM now()))::bigint);
CREATE INDEX nodes_last_seen ON nodes (last_seen);
CREATE FUNCTION nodes_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_seen := floor(extract(epoch FROM now()))::bigint;
    RETURN NEW;
END
$$;
CREATE TRIGGER nodes_seen_on_update BEFORE UPDATE OF reg_seq, endpoints ON nodes
    FOR EACH ROW EXECUTE FUNCTION nodes_seen();
CREATE INDEX statements_to ON statements (to_id);
CREATE INDEX tombstones_removed ON tombstones (removed, address);
CREATE TABLE tombstone_refs (
    address BIGINT NOT NULL,
    from_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (address, from_id)
);
CREATE INDEX tombstone_refs_from ON tombstone_refs (from_id);
"#,
    // As SQLite's: the instance each node is attached to.
    r#"
CREATE TABLE attached (
    node_id  TEXT COLLATE "C" PRIMARY KEY,
    instance TEXT NOT NULL,
    since    BIGINT NOT NULL
);
"#,
];

/// The advisory lock two instances starting at once take around their
/// migrations, so one migrates and the other then finds it done.
const MIGRATION_LOCK: i64 = 0x7069_6c6f_7472_6567; // "pilotreg"

/// How long opening a connection may take when the URL does not say
/// (`connect_timeout=`): a registry that cannot reach its database says so
/// instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--database` value: a PostgreSQL URL (`postgres://user:password@
/// host:port/dbname?options`) or `key=value` connection string.
pub fn parse_url(s: &str) -> Result<Config, String> {
    let config: Config = s.parse().map_err(|e| {
        format!(
            "{}; expected a PostgreSQL URL like postgres://user:password@127.0.0.1:5432/pilot",
            pg_detail(&e)
        )
    })?;
    if config.get_hosts().is_empty() {
        return Err(
            "the URL names no host; expected one like postgres://user:password@127.0.0.1:5432/pilot"
                .into(),
        );
    }
    Ok(config)
}

impl From<postgres::Error> for StorageError {
    fn from(e: postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => StorageError::Conflict(pg_detail(&e)),
            _ => StorageError::Pg(e),
        }
    }
}

/// True if `e` means the connection is gone (the server ended the session,
/// or the socket failed): the next call must connect again.
fn connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        return matches!(db.severity(), "FATAL" | "PANIC");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Prepared>,
    /// A call failed because the connection is gone.
    lost: bool,
}

type Params<'a> = &'a [&'a (dyn postgres::types::ToSql + Sync)];

impl Conn {
    fn open(config: &Config) -> Result<Self, StorageError> {
        Ok(Conn {
            client: config.connect(NoTls)?,
            prepared: HashMap::new(),
            lost: false,
        })
    }

    /// `r` as the trait's result, noting a lost connection on the way.
    fn check<T>(&mut self, r: Result<T, postgres::Error>) -> Result<T, StorageError> {
        r.map_err(|e| {
            self.lost |= connection_lost(&e);
            e.into()
        })
    }

    /// `sql` prepared on this connection (once).
    fn stmt(&mut self, sql: &'static str) -> Result<Prepared, StorageError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let r = self.client.prepare(sql);
        let s = self.check(r)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        let s = self.stmt(sql)?;
        let r = self.client.query(&s, params);
        self.check(r)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StorageError> {
        let s = self.stmt(sql)?;
        let r = self.client.query_opt(&s, params);
        self.check(r)
    }

    fn execute(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StorageError> {
        let s = self.stmt(sql)?;
        let r = self.client.execute(&s, params);
        self.check(r)
    }

    /// Runs `f` in a transaction and commits it (rolled back if `f` fails).
    fn transact<R>(
        &mut self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<R, postgres::Error>,
    ) -> Result<R, StorageError> {
        let r = (|| {
            let mut tx = self.client.transaction()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })();
        self.check(r)
    }
}

/// Registry storage on a PostgreSQL server.
pub struct PgStorage {
    config: Config,
    // The trait reads through `&self` but a client queries through
    // `&mut`; the storage thread is the only user (the trait is `Send`,
    // not `Sync`), so a borrow never meets another.
    conn: RefCell<Conn>,
}

impl PgStorage {
    /// Connects to the database at `url` and migrates it to
    /// [`SCHEMA_VERSION`] (creating the tables in an empty database).
    pub fn connect(url: &str) -> Result<Self, StorageError> {
        let config = parse_url(url).map_err(StorageError::Url)?;
        Self::open(config)
    }

    /// [`PgStorage::connect`] with a parsed configuration.
    pub fn open(config: Config) -> Result<Self, StorageError> {
        Self::open_at(config, SCHEMA_VERSION)
    }

    /// Opens and migrates up to `version` only (tests start from an older
    /// schema with it).
    pub(crate) fn open_at(mut config: Config, version: i64) -> Result<Self, StorageError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("pilot-registry");
        }
        let mut conn = Conn::open(&config)?;
        migrate(&mut conn.client, version)?;
        Ok(PgStorage {
            config,
            conn: RefCell::new(conn),
        })
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StorageError> {
        let mut c = self.conn()?;
        let row = c.query_opt("SELECT version FROM schema_version", &[])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }

    /// The connection, opened again if the last one was lost.
    fn conn(&self) -> Result<RefMut<'_, Conn>, StorageError> {
        let mut c = self.conn.borrow_mut();
        if c.lost || c.client.is_closed() {
            warn!("the PostgreSQL connection was lost; connecting again");
            *c = Conn::open(&self.config)?;
        }
        Ok(c)
    }

    fn query_node(
        &self,
        sql: &'static str,
        p: &(dyn postgres::types::ToSql + Sync),
    ) -> Result<Option<NodeRow>, StorageError> {
        let row = self.conn()?.query_opt(sql, &[p])?;
        row.map(|r| raw_node(&r)?.decode()).transpose()
    }
}

/// Brings the schema to `target`, in one transaction under the migration
/// lock.
fn migrate(client: &mut Client, target: i64) -> Result<(), StorageError> {
    let target = target.clamp(0, SCHEMA_VERSION);
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    // Quiet: no "already exists, skipping" notice in the log on every start.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)",
    )?;
    let version: i64 = match tx.query_opt("SELECT version FROM schema_version", &[])? {
        Some(r) => r.try_get(0)?,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(StorageError::TooNew(version));
    }
    if version >= target {
        return Ok(());
    }
    for m in &MIGRATIONS[version as usize..target as usize] {
        tx.batch_execute(m)?;
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&target])?;
    tx.commit()?;
    Ok(())
}

fn raw_node(r: &Row) -> Result<RawNode, StorageError> {
    let address: i64 = r.try_get(3)?;
    Ok(RawNode {
        ed: r.try_get(0)?,
        st: r.try_get(1)?,
        binding: r.try_get(2)?,
        address: u32::try_from(address).map_err(|_| StorageError::Corrupt {
            table: "nodes",
            detail: format!("address {address}"),
        })?,
        hostname: r.try_get(4)?,
        reg_seq: r.try_get(5)?,
        endpoints: r.try_get(6)?,
        reg_digest: r.try_get(7)?,
    })
}

/// Decodes a stored statement.
fn statement_of(body: &[u8], table: &'static str) -> Result<Signed<Statement>, StorageError> {
    messages::decode(body).map_err(|e| StorageError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// Reads (node id text, bytes) rows.
fn by_node(rows: Vec<Row>, table: &'static str) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
    rows.iter()
        .map(|r| {
            let id: String = r.try_get(0)?;
            let id = id.parse().map_err(|_| StorageError::Corrupt {
                table,
                detail: format!("node id '{id}'"),
            })?;
            Ok((id, r.try_get(1)?))
        })
        .collect()
}

// The SQL lives in constants so each is prepared once per connection (the
// cache is keyed by the text).
macro_rules! select_node {
    ($where:literal) => {
        concat!(
            "SELECT ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest FROM nodes WHERE ",
            $where
        )
    };
}

/// A lookup in one round trip: the peer (picked by `$where`, parameter 1),
/// whether it approves the asker (parameter 2), the asker's endpoints.
macro_rules! lookup_node {
    ($where:literal) => {
        concat!(
            "SELECT n.ed_public, n.static_pub, n.binding, n.address, n.hostname, n.reg_seq, n.endpoints, n.reg_digest, ",
            "COALESCE((SELECT s.approves FROM statements s WHERE s.from_id = n.node_id AND s.to_id = $2), false), ",
            "(SELECT m.endpoints FROM nodes m WHERE m.node_id = $2) ",
            "FROM nodes n WHERE ",
            $where
        )
    };
}

impl PgStorage {
    fn query_lookup(
        &self,
        sql: &'static str,
        p: &(dyn postgres::types::ToSql + Sync),
        me: &NodeId,
    ) -> Result<Option<Found>, StorageError> {
        let row = self.conn()?.query_opt(sql, &[p, &me.to_string()])?;
        row.map(|r| {
            let mine: Option<String> = r.try_get(9)?;
            Ok(Found {
                row: raw_node(&r)?.decode()?,
                approves_me: r.try_get(8)?,
                my_endpoints: split_endpoints(mine.as_deref().unwrap_or(""))?,
            })
        })
        .transpose()
    }
}

impl Storage for PgStorage {
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
        self.query_node(select_node!("node_id = $1"), &id.to_string())
    }

    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
        self.query_node(select_node!("address = $1"), &i64::from(u32::from(a)))
    }

    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
        self.query_node(select_node!("hostname = $1"), &name)
    }

    fn lookup(&self, peer: &PeerRef, me: &NodeId) -> Result<Option<Found>, StorageError> {
        match peer {
            PeerRef::Id(id) => {
                self.query_lookup(lookup_node!("n.node_id = $1"), &id.to_string(), me)
            }
            PeerRef::Addr(a) => self.query_lookup(
                lookup_node!("n.address = $1"),
                &i64::from(u32::from(*a)),
                me,
            ),
            PeerRef::Name(n) => self.query_lookup(lookup_node!("n.hostname = $1"), n, me),
        }
    }

    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT 1 FROM nodes WHERE address = $1 UNION ALL SELECT 1 FROM tombstones WHERE address = $1 LIMIT 1",
                &[&i64::from(u32::from(a))],
            )?
            .is_some())
    }

    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        self.conn()?.execute(
            "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &row.identity.node_id().to_string(),
                &&row.identity.ed_public[..],
                &&row.identity.static_public[..],
                &row.identity.binding,
                &i64::from(u32::from(row.address)),
                &row.hostname,
                &(row.reg_seq as i64),
                &join_endpoints(&row.endpoints),
                &row.reg_digest.as_ref().map(|d| &d[..]),
            ],
        )?;
        Ok(())
    }

    fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        let id = row.identity.node_id().to_string();
        let n = self.conn()?.execute(
            "UPDATE nodes SET static_pub = $2, binding = $3, hostname = $4, reg_seq = $5, endpoints = $6, reg_digest = $7 WHERE node_id = $1",
            &[
                &id,
                &&row.identity.static_public[..],
                &row.identity.binding,
                &row.hostname,
                &(row.reg_seq as i64),
                &join_endpoints(&row.endpoints),
                &row.reg_digest.as_ref().map(|d| &d[..]),
            ],
        )?;
        if n == 0 {
            return Err(StorageError::Conflict(format!("node {id} is not stored")));
        }
        Ok(())
    }

    fn set_endpoints(&mut self, id: &NodeId, endpoints: &[SocketAddr]) -> Result<(), StorageError> {
        self.conn()?.execute(
            "UPDATE nodes SET endpoints = $2 WHERE node_id = $1",
            &[&id.to_string(), &join_endpoints(endpoints)],
        )?;
        Ok(())
    }

    fn statement_seq(&self, from: &NodeId, to: &NodeId) -> Result<Option<u64>, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT seq FROM statements WHERE from_id = $1 AND to_id = $2",
            &[&from.to_string(), &to.to_string()],
        )?;
        Ok(row
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?
            .map(|s| s as u64))
    }

    fn statement(
        &self,
        from: &NodeId,
        to: &NodeId,
    ) -> Result<Option<Signed<Statement>>, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT body FROM statements WHERE from_id = $1 AND to_id = $2",
            &[&from.to_string(), &to.to_string()],
        )?;
        row.map(|r| statement_of(r.try_get(0)?, "statements"))
            .transpose()
    }

    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError> {
        let from = st.body.from.node_id().to_string();
        let to = st.body.to.to_string();
        let body = messages::encode(st).map_err(|e| StorageError::Corrupt {
            table: "statements",
            detail: e.to_string(),
        })?;
        let mut c = self.conn()?;
        let upsert = c.stmt(
            "INSERT INTO statements (from_id, to_id, seq, approves, body) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (from_id, to_id) DO UPDATE SET seq = $3, approves = $4, body = $5",
        )?;
        let queue = c.stmt("INSERT INTO inbox (to_id, body) VALUES ($1, $2) RETURNING id")?;
        let id: i64 = c.transact(|tx| {
            tx.execute(
                &upsert,
                &[
                    &from,
                    &to,
                    &(st.body.seq as i64),
                    &st.body.kind.approves(),
                    &body,
                ],
            )?;
            tx.query_one(&queue, &[&to, &body])?.try_get(0)
        })?;
        Ok(id as u64)
    }

    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT approves FROM statements WHERE from_id = $1 AND to_id = $2",
            &[&from.to_string(), &to.to_string()],
        )?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(false))
    }

    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError> {
        let rows = self.conn()?.query(
            "SELECT id, body FROM inbox WHERE to_id = $1 ORDER BY id",
            &[&to.to_string()],
        )?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get(0)?;
                Ok((id as u64, statement_of(r.try_get(1)?, "inbox")?))
            })
            .collect()
    }

    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
        self.conn()?.execute(
            "DELETE FROM inbox WHERE id = $1 AND to_id = $2",
            &[&sql_u64(push), &to.to_string()],
        )?;
        Ok(())
    }

    fn node_count(&self) -> Result<u64, StorageError> {
        let rows = self.conn()?.query("SELECT count(*) FROM nodes", &[])?;
        let n: i64 = match rows.first() {
            Some(r) => r.try_get(0)?,
            None => 0,
        };
        Ok(n as u64)
    }

    fn put_cert(&mut self, cert: &CertRow) -> Result<bool, StorageError> {
        let holder = cert.holder.to_string();
        let owner = &cert.owner.0[..];
        let mut c = self.conn()?;
        let same = c.stmt("SELECT 1 FROM certs WHERE holder = $1 AND bytes = $2")?;
        let untag = c.stmt("DELETE FROM cert_tags WHERE holder = $1")?;
        let upsert = c.stmt(
            "INSERT INTO certs (holder, owner, expires_at, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (holder) DO UPDATE SET owner = $2, expires_at = $3, bytes = $4",
        )?;
        let tag = c.stmt(
            "INSERT INTO cert_tags (owner, tag, holder) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )?;
        c.transact(|tx| {
            if tx.query_opt(&same, &[&holder, &cert.bytes])?.is_some() {
                return Ok(false);
            }
            tx.execute(&untag, &[&holder])?;
            tx.execute(
                &upsert,
                &[&holder, &owner, &sql_u64(cert.expires_at), &cert.bytes],
            )?;
            for t in &cert.tags {
                tx.execute(&tag, &[&owner, &t.as_str(), &holder])?;
            }
            Ok(true)
        })
    }

    fn find_certs(
        &self,
        owner: &OwnerPublic,
        tag: &Tag,
        after: Option<&NodeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        let rows = self.conn()?.query(
            "SELECT c.holder, c.bytes FROM cert_tags t JOIN certs c ON c.holder = t.holder
             WHERE t.owner = $1 AND t.tag = $2 AND t.holder > $3
               AND c.owner = $1 AND c.expires_at > $4
               AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.owner = $1 AND r.node = t.holder)
             ORDER BY t.holder LIMIT $5",
            &[
                &&owner.0[..],
                &tag.as_str(),
                &after_key(after),
                &sql_u64(now),
                &sql_u64(limit as u64),
            ],
        )?;
        by_node(rows, "certs")
    }

    fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
        let node = r.node.to_string();
        let owner = &r.owner.0[..];
        let mut c = self.conn()?;
        let keep = c.stmt(
            "INSERT INTO revocations (owner, node, bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )?;
        let withdraw = c.stmt("DELETE FROM certs WHERE holder = $1 AND owner = $2")?;
        let untag = c.stmt("DELETE FROM cert_tags WHERE holder = $1")?;
        c.transact(|tx| {
            let new = tx.execute(&keep, &[&owner, &node, &r.bytes])? == 1;
            if tx.execute(&withdraw, &[&node, &owner])? > 0 {
                tx.execute(&untag, &[&node])?;
            }
            Ok(new)
        })
    }

    fn revoked(&self, owner: &OwnerPublic, node: &NodeId) -> Result<bool, StorageError> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT 1 FROM revocations WHERE owner = $1 AND node = $2",
                &[&&owner.0[..], &node.to_string()],
            )?
            .is_some())
    }

    fn revocation_counts(&self, owner: &OwnerPublic) -> Result<(u64, u64), StorageError> {
        let rows = self.conn()?.query(
            "SELECT count(*) FILTER (WHERE owner = $1), count(*) FROM revocations",
            &[&&owner.0[..]],
        )?;
        let (mine, all): (i64, i64) = match rows.first() {
            Some(r) => (r.try_get(0)?, r.try_get(1)?),
            None => (0, 0),
        };
        Ok((mine as u64, all as u64))
    }

    fn find_revocations(
        &self,
        owner: &OwnerPublic,
        after: Option<&NodeId>,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        let rows = self.conn()?.query(
            "SELECT node, bytes FROM revocations WHERE owner = $1 AND node > $2
             ORDER BY node LIMIT $3",
            &[&&owner.0[..], &after_key(after), &sql_u64(limit as u64)],
        )?;
        by_node(rows, "revocations")
    }

    fn nodes(&self, limit: usize) -> Result<Vec<NodeRow>, StorageError> {
        let rows = self.conn()?.query(
            select_node!("TRUE ORDER BY address LIMIT $1"),
            &[&sql_u64(limit as u64)],
        )?;
        rows.iter().map(|r| raw_node(r)?.decode()).collect()
    }

    fn succeed(
        &mut self,
        old: &NodeId,
        new: &NodeRow,
        succession: &[u8],
    ) -> Result<(), StorageError> {
        let old = old.to_string();
        let new_id = new.identity.node_id().to_string();
        let mut c = self.conn()?;
        let retire = c.stmt("DELETE FROM nodes WHERE node_id = $1")?;
        let forget = c.stmt("DELETE FROM statements WHERE from_id = $1 OR to_id = $1")?;
        let unqueue = c.stmt("DELETE FROM inbox WHERE to_id = $1")?;
        let untag = c.stmt("DELETE FROM cert_tags WHERE holder = $1")?;
        let uncert = c.stmt("DELETE FROM certs WHERE holder = $1")?;
        let keep = c.stmt("INSERT INTO successions (old_id, new_id, bytes) VALUES ($1, $2, $3)")?;
        let insert = c.stmt(
            "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )?;
        // `None` when `old` is not stored (then nothing is committed).
        let done = c.transact(|tx| {
            if tx.execute(&retire, &[&old])? == 0 {
                return Ok(None);
            }
            tx.execute(&forget, &[&old])?;
            tx.execute(&unqueue, &[&old])?;
            // Its certificate would point nodes searching by tag at a
            // retired id; the successor publishes one issued to it.
            tx.execute(&untag, &[&old])?;
            tx.execute(&uncert, &[&old])?;
            tx.execute(&keep, &[&old, &new_id, &succession])?;
            tx.execute(
                &insert,
                &[
                    &new_id,
                    &&new.identity.ed_public[..],
                    &&new.identity.static_public[..],
                    &new.identity.binding,
                    &i64::from(u32::from(new.address)),
                    &new.hostname,
                    &(new.reg_seq as i64),
                    &join_endpoints(&new.endpoints),
                    &new.reg_digest.as_ref().map(|d| &d[..]),
                ],
            )?;
            Ok(Some(()))
        })?;
        done.ok_or_else(|| StorageError::Conflict(format!("node {old} is not stored")))
    }

    fn successor(&self, old: &NodeId) -> Result<Option<(NodeId, Vec<u8>)>, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT new_id, bytes FROM successions WHERE old_id = $1",
            &[&old.to_string()],
        )?;
        let Some(row) = row else { return Ok(None) };
        Ok(by_node(vec![row], "successions")?.pop())
    }

    fn put_token(&mut self, t: &TokenRow) -> Result<(), StorageError> {
        self.conn()?.execute(
            "INSERT INTO tokens (id, hash, uses, used, expires_at, created, revoked) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &t.id,
                &&t.hash[..],
                &t.uses.map(sql_u64),
                &sql_u64(t.used),
                &t.expires_at.map(sql_u64),
                &sql_u64(t.created),
                &t.revoked,
            ],
        )?;
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
        let rows = self.conn()?.query(
            "SELECT id, hash, uses, used, expires_at, created, revoked FROM tokens ORDER BY created, id",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                token_row(
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                )
            })
            .collect()
    }

    fn use_token(&mut self, hash: &[u8; 32], now: u64) -> Result<TokenUse, StorageError> {
        let n = self.conn()?.execute(
            "UPDATE tokens SET used = used + 1 WHERE hash = $1 AND NOT revoked
             AND (expires_at IS NULL OR expires_at > $2) AND (uses IS NULL OR used < uses)",
            &[&&hash[..], &sql_u64(now)],
        )?;
        if n == 1 {
            return Ok(TokenUse::Used);
        }
        let all = self.tokens()?;
        Ok(token_refusal(all.iter().find(|t| &t.hash == hash), now))
    }

    fn revoke_token(&mut self, id: &str) -> Result<bool, StorageError> {
        Ok(self
            .conn()?
            .execute("UPDATE tokens SET revoked = TRUE WHERE id = $1", &[&id])?
            == 1)
    }

    fn remove_node(&mut self, id: &NodeId, now: u64) -> Result<bool, StorageError> {
        let id = id.to_string();
        let mut c = self.conn()?;
        let find = c.stmt("SELECT address FROM nodes WHERE node_id = $1 FOR UPDATE")?;
        let b = Burial::prepare(&mut c)?;
        c.transact(|tx| {
            let Some(row) = tx.query_opt(&find, &[&id])? else {
                return Ok(false);
            };
            b.bury(tx, &id, row.try_get(0)?, sql_u64(now))?;
            Ok(true)
        })
    }

    fn expire_unused(
        &mut self,
        seen_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<NodeId>, StorageError> {
        let mut c = self.conn()?;
        // Locked as they are found; a row a registration changed meanwhile
        // is checked again against the condition (and skipped).
        let find = c.stmt(
            "SELECT node_id, address FROM nodes n WHERE last_seen < $1
             AND NOT EXISTS (SELECT 1 FROM statements s WHERE s.to_id = n.node_id AND s.approves)
             ORDER BY last_seen, node_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )?;
        let b = Burial::prepare(&mut c)?;
        let gone: Vec<String> = c.transact(|tx| {
            let rows = tx.query(&find, &[&sql_u64(seen_before), &sql_u64(limit as u64)])?;
            let mut gone = vec![];
            for r in rows {
                let id: String = r.try_get(0)?;
                b.bury(tx, &id, r.try_get(1)?, sql_u64(now))?;
                gone.push(id);
            }
            Ok(gone)
        })?;
        gone.into_iter()
            .map(|id| {
                id.parse().map_err(|_| StorageError::Corrupt {
                    table: "nodes",
                    detail: format!("node id '{id}'"),
                })
            })
            .collect()
    }

    fn reusable_tombstone(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
    ) -> Result<Option<Ipv4Addr>, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT address FROM tombstones t WHERE address BETWEEN $1 AND $2
             AND NOT EXISTS (SELECT 1 FROM tombstone_refs r WHERE r.address = t.address)
             ORDER BY removed, address LIMIT 1",
            &[&i64::from(u32::from(first)), &i64::from(u32::from(last))],
        )?;
        let Some(row) = row else { return Ok(None) };
        let a: i64 = row.try_get(0)?;
        u32::try_from(a)
            .map(|a| Some(Ipv4Addr::from(a)))
            .map_err(|_| StorageError::Corrupt {
                table: "tombstones",
                detail: format!("address {a}"),
            })
    }

    fn insert_on_tombstone(&mut self, row: &NodeRow) -> Result<bool, StorageError> {
        let mut c = self.conn()?;
        let free = c.stmt(
            "DELETE FROM tombstones WHERE address = $1
             AND NOT EXISTS (SELECT 1 FROM tombstone_refs r WHERE r.address = $1)",
        )?;
        let insert = c.stmt(INSERT_NODE)?;
        let address = i64::from(u32::from(row.address));
        c.transact(|tx| {
            if tx.execute(&free, &[&address])? == 0 {
                return Ok(false);
            }
            tx.execute(
                &insert,
                &[
                    &row.identity.node_id().to_string(),
                    &&row.identity.ed_public[..],
                    &&row.identity.static_public[..],
                    &row.identity.binding,
                    &address,
                    &row.hostname,
                    &(row.reg_seq as i64),
                    &join_endpoints(&row.endpoints),
                    &row.reg_digest.as_ref().map(|d| &d[..]),
                ],
            )?;
            Ok(true)
        })
    }

    fn attach(&mut self, id: &NodeId, instance: SocketAddr) -> Result<(), StorageError> {
        let mut c = self.conn()?;
        let upsert = c.stmt(
            "INSERT INTO attached (node_id, instance, since)
             VALUES ($1, $2, floor(extract(epoch FROM now()))::bigint)
             ON CONFLICT (node_id) DO UPDATE SET instance = excluded.instance, since = excluded.since",
        )?;
        let (id, instance) = (id.to_string(), instance.to_string());
        // Where a node is attached is rewritten at its next registration:
        // losing the last one in a database crash costs nothing, so it
        // does not wait for the disk.
        c.transact(|tx| {
            tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            tx.execute(&upsert, &[&id, &instance])?;
            Ok(())
        })
    }

    fn attached(&self, id: &NodeId) -> Result<Option<SocketAddr>, StorageError> {
        let row = self.conn()?.query_opt(
            "SELECT instance FROM attached WHERE node_id = $1",
            &[&id.to_string()],
        )?;
        let Some(row) = row else { return Ok(None) };
        let a: String = row.try_get(0)?;
        a.parse().map(Some).map_err(|_| StorageError::Corrupt {
            table: "attached",
            detail: format!("instance {a:?}"),
        })
    }

    fn notify(&mut self, payload: &str) -> Result<(), StorageError> {
        self.conn()?.execute(
            "SELECT pg_notify($1, $2)",
            &[&crate::cluster::CHANNEL, &payload],
        )?;
        Ok(())
    }
}

const INSERT_NODE: &str = "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// The statements that remove a node and leave its tombstone, prepared on
/// one connection (as SQLite's `bury`).
struct Burial {
    unref: Prepared,
    refs: Prepared,
    gone: Prepared,
    forget: Prepared,
    unqueue: Prepared,
    untag: Prepared,
    uncert: Prepared,
    tomb: Prepared,
}

impl Burial {
    fn prepare(c: &mut Conn) -> Result<Self, StorageError> {
        Ok(Burial {
            unref: c.stmt("DELETE FROM tombstone_refs WHERE from_id = $1")?,
            refs: c.stmt(
                "INSERT INTO tombstone_refs (address, from_id)
                 SELECT $1, from_id FROM statements WHERE to_id = $2 AND approves AND from_id <> $2
                 ON CONFLICT DO NOTHING",
            )?,
            gone: c.stmt("DELETE FROM nodes WHERE node_id = $1")?,
            forget: c.stmt("DELETE FROM statements WHERE from_id = $1 OR to_id = $1")?,
            unqueue: c.stmt("DELETE FROM inbox WHERE to_id = $1")?,
            untag: c.stmt("DELETE FROM cert_tags WHERE holder = $1")?,
            uncert: c.stmt("DELETE FROM certs WHERE holder = $1")?,
            tomb: c.stmt(
                "INSERT INTO tombstones (address, node_id, removed) VALUES ($1, $2, $3)
                 ON CONFLICT (address) DO UPDATE SET node_id = $2, removed = $3",
            )?,
        })
    }

    /// Removes node `id` at `address` inside `tx`, tombstoned at `now`.
    fn bury(
        &self,
        tx: &mut postgres::Transaction<'_>,
        id: &str,
        address: i64,
        now: i64,
    ) -> Result<(), postgres::Error> {
        tx.execute(&self.unref, &[&id])?;
        tx.execute(&self.refs, &[&address, &id])?;
        tx.execute(&self.gone, &[&id])?;
        tx.execute(&self.forget, &[&id])?;
        tx.execute(&self.unqueue, &[&id])?;
        tx.execute(&self.untag, &[&id])?;
        tx.execute(&self.uncert, &[&id])?;
        tx.execute(&self.tomb, &[&address, &id, &now])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_anything_connects() {
        let c = parse_url("postgres://pilot:secret@127.0.0.1:5433/reg").unwrap();
        assert_eq!(c.get_ports(), [5433]);
        assert_eq!(c.get_dbname(), Some("reg"));
        assert!(
            !format!("{c:?}").contains("secret"),
            "the password is not printed"
        );
        for bad in ["/var/lib/pilot-registry/registry.db", "postgres://"] {
            let e = parse_url(bad).unwrap_err();
            assert!(e.contains("postgres://user:password@"), "{bad}: {e}");
        }
        let e = parse_url("mysql://x@127.0.0.1/y").unwrap_err();
        assert!(e.contains("expected a PostgreSQL URL"), "{e}");
    }
}
