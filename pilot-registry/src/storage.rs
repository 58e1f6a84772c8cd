//! Registry storage: one trait that only persists, and the embedded SQLite
//! implementation (PostgreSQL is [`crate::storage_pg`]).
//!
//! The rules (which address a node gets, which hostname it may claim, which
//! sequence numbers are new) live above this trait, in `registrar`, `pool`
//! and `names`, so another backend implements persistence and nothing else.
//! Every method that changes state commits before it returns, so whatever
//! the registry acknowledges to a node survives a crash (WAL,
//! synchronous=FULL).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use pilot_proto::cert::{OwnerPublic, Tag};
use pilot_proto::identity::{NodeId, PublicIdentity};
use pilot_proto::messages::{self, PeerRef, Signed, Statement};
use rusqlite::{params, Connection, ErrorCode as SqlErrorCode, OptionalExtension};

/// Storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database refused.
    #[error("database: {0}")]
    Db(rusqlite::Error),
    /// The PostgreSQL server refused, or could not be reached.
    #[error("PostgreSQL: {}", pg_detail(.0))]
    Pg(postgres::Error),
    /// The `--database` URL does not parse.
    #[error("--database: {0}")]
    Url(String),
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
    /// This backend does not keep what was asked to store.
    #[error("this storage backend keeps no {0}")]
    Unsupported(&'static str),
}

/// A PostgreSQL error with what the server or the socket said, not only
/// its kind ("db error").
pub(crate) fn pg_detail(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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

/// A node's published owner certificate, with what matching needs read
/// out of it (by the rules above the trait, which verified it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRow {
    /// The node it certifies (and that published it).
    pub holder: NodeId,
    /// The owner that signed it.
    pub owner: OwnerPublic,
    /// Its tags.
    pub tags: Vec<Tag>,
    /// Unix time from which it is no longer valid.
    pub expires_at: u64,
    /// The certificate ([`pilot_proto::cert::Certificate::to_bytes`]).
    pub bytes: Vec<u8>,
}

/// An owner's revocation of a node id, as kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationRow {
    /// The owner that signed it.
    pub owner: OwnerPublic,
    /// The node it withdraws.
    pub node: NodeId,
    /// The revocation ([`pilot_proto::cert::Revocation::to_bytes`]).
    pub bytes: Vec<u8>,
}

/// A join token as kept: its SHA-256, never the token itself, so reading
/// the database does not hand out tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    /// A short name for it (hex of the first 6 bytes of the hash), for
    /// `token list` and `token revoke`.
    pub id: String,
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Registrations it allows in all (`None`: no limit).
    pub uses: Option<u64>,
    /// Registrations it allowed so far.
    pub used: u64,
    /// Unix time from which it is no longer valid (`None`: never).
    pub expires_at: Option<u64>,
    /// Unix time it was made.
    pub created: u64,
    /// Revoked by the operator.
    pub revoked: bool,
}

/// What using a join token came to ([`Storage::use_token`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenUse {
    /// Valid: one use counted.
    Used,
    /// No such token.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Every use taken.
    UsedUp,
    /// Revoked by the operator.
    Revoked,
}

/// A peer found by a lookup ([`Storage::lookup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The peer as stored.
    pub row: NodeRow,
    /// The peer approves the asker (so the asker may learn its endpoints).
    pub approves_me: bool,
    /// The asker's own stored endpoints (for the peer's punch request).
    pub my_endpoints: Vec<SocketAddr>,
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
    /// A lookup: the peer's row, whether it approves `me`, and `me`'s own
    /// endpoints. The default asks three questions; a backend answers in
    /// one read (on PostgreSQL each question is a round trip).
    fn lookup(&self, peer: &PeerRef, me: &NodeId) -> Result<Option<Found>, StorageError> {
        let row = match peer {
            PeerRef::Id(id) => self.node(id)?,
            PeerRef::Addr(a) => self.node_by_address(*a)?,
            PeerRef::Name(n) => self.node_by_name(n)?,
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let approves_me = self.approves(&row.identity.node_id(), me)?;
        let my_endpoints = self.node(me)?.map(|r| r.endpoints).unwrap_or_default();
        Ok(Some(Found {
            row,
            approves_me,
            my_endpoints,
        }))
    }
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
    /// Stores `cert` as its holder's only certificate, replacing the one
    /// stored before (with its tags). False if exactly these bytes were
    /// stored already (nothing changed). The default keeps none and says
    /// so; a wrapper should pass it on, like every certificate method.
    fn put_cert(&mut self, _cert: &CertRow) -> Result<bool, StorageError> {
        Err(StorageError::Unsupported("certificates"))
    }
    /// The certificates from `owner` carrying `tag` that expire after
    /// `now`, whose holder `owner` has not revoked, as (holder, bytes) in
    /// holder id order, holders above `after` only, at most `limit`.
    fn find_certs(
        &self,
        _owner: &OwnerPublic,
        _tag: &Tag,
        _after: Option<&NodeId>,
        _now: u64,
        _limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        Ok(vec![])
    }
    /// Keeps a revocation unless one of its owner for its node is kept
    /// already (then nothing changes: a revocation is permanent, the first
    /// is enough); in the same commit, forgets the revoked node's
    /// certificate if `owner` signed it. True if it was new.
    fn put_revocation(&mut self, _r: &RevocationRow) -> Result<bool, StorageError> {
        Err(StorageError::Unsupported("revocations"))
    }
    /// True if `owner` revoked `node`.
    fn revoked(&self, _owner: &OwnerPublic, _node: &NodeId) -> Result<bool, StorageError> {
        Ok(false)
    }
    /// Revocations kept: (of `owner`, of all owners).
    fn revocation_counts(&self, _owner: &OwnerPublic) -> Result<(u64, u64), StorageError> {
        Ok((0, 0))
    }
    /// The revocations of `owner`, as (revoked node, bytes) in node id
    /// order, nodes above `after` only, at most `limit`.
    fn find_revocations(
        &self,
        _owner: &OwnerPublic,
        _after: Option<&NodeId>,
        _limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        Ok(vec![])
    }
    /// Up to `limit` registered nodes, by address (for the status page's
    /// list). The default lists none; a wrapper should pass it on.
    fn nodes(&self, _limit: usize) -> Result<Vec<NodeRow>, StorageError> {
        Ok(vec![])
    }
    /// Moves node `old` to its successor `new` in one transaction: `new`
    /// (carrying `old`'s address and hostname) replaces `old`, whose
    /// statements, undelivered pushes and certificate go, and the succession statement
    /// is kept under `old` so `old` is refused from then on. The default
    /// keeps no successions.
    fn succeed(
        &mut self,
        _old: &NodeId,
        _new: &NodeRow,
        _succession: &[u8],
    ) -> Result<(), StorageError> {
        Err(StorageError::Unsupported("successions"))
    }
    /// The successor of `old` and the succession statement, if `old` was
    /// succeeded here.
    fn successor(&self, _old: &NodeId) -> Result<Option<(NodeId, Vec<u8>)>, StorageError> {
        Ok(None)
    }
    /// Keeps a new join token. [`StorageError::Conflict`] if its id or
    /// hash is kept already. The default keeps none; a wrapper should pass
    /// it on, like every token method.
    fn put_token(&mut self, _t: &TokenRow) -> Result<(), StorageError> {
        Err(StorageError::Unsupported("join tokens"))
    }
    /// Every join token kept, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
        Ok(vec![])
    }
    /// Counts one use of the token with SHA-256 `hash` if it is valid at
    /// `now` (not revoked, not expired, a use left), atomically: two
    /// registries sharing a database never both take its last use.
    fn use_token(&mut self, _hash: &[u8; 32], _now: u64) -> Result<TokenUse, StorageError> {
        Err(StorageError::Unsupported("join tokens"))
    }
    /// Revokes the token `id`; false if there is none.
    fn revoke_token(&mut self, _id: &str) -> Result<bool, StorageError> {
        Err(StorageError::Unsupported("join tokens"))
    }
    /// Removes a node in one transaction (the operator's `nodes remove`):
    /// its row (so its hostname is free at once), its statements, its
    /// pushes and its certificate go; its address stays taken, as a
    /// tombstone ([`Storage::address_taken`] counts it), because other
    /// nodes' rules may still name it. False if it is not stored.
    fn remove_node(&mut self, _id: &NodeId, _now: u64) -> Result<bool, StorageError> {
        Err(StorageError::Unsupported("node removal"))
    }
    /// Expires up to `limit` nodes last seen (registered, or seen at a new
    /// endpoint) before Unix time `seen_before`, least recently seen
    /// first, except those some node's stored statement approves (a
    /// trusted peer still names them). Each goes as in
    /// [`Storage::remove_node`], tombstoned at `now`, one transaction
    /// for all, and only if it still qualifies when it is deleted (a node
    /// that registers meanwhile stays). Returns the expired ids. The
    /// default expires nothing; a wrapper should pass it on, like every
    /// tombstone method.
    fn expire_unused(
        &mut self,
        _seen_before: u64,
        _now: u64,
        _limit: usize,
    ) -> Result<Vec<NodeId>, StorageError> {
        Ok(vec![])
    }
    /// The oldest tombstoned address between `first` and `last`
    /// (inclusive) that no registered node may still hold a rule for:
    /// none approved the id that had it when it was removed (or the
    /// approvers were removed since). `None` if there is none. The
    /// default reuses nothing.
    fn reusable_tombstone(
        &self,
        _first: Ipv4Addr,
        _last: Ipv4Addr,
    ) -> Result<Option<Ipv4Addr>, StorageError> {
        Ok(None)
    }
    /// Stores a new node on a tombstoned address, in one transaction with
    /// forgetting the tombstone, if it is still reusable (see
    /// [`Storage::reusable_tombstone`]); false (nothing stored) if it is
    /// not, or no longer a tombstone. [`StorageError::Conflict`] as
    /// [`Storage::insert_node`].
    fn insert_on_tombstone(&mut self, _row: &NodeRow) -> Result<bool, StorageError> {
        Err(StorageError::Unsupported("tombstone reuse"))
    }
    /// Records that node `id` is attached to the registry instance at
    /// `instance` (several instances on one database: the relay of another
    /// instance sends this node's datagrams there), replacing where it was
    /// attached before. The default keeps nothing; a wrapper should pass
    /// it on, like [`Storage::attached`] and [`Storage::notify`].
    fn attach(&mut self, _id: &NodeId, _instance: SocketAddr) -> Result<(), StorageError> {
        Ok(())
    }
    /// The instance node `id` last attached to, if any.
    fn attached(&self, _id: &NodeId) -> Result<Option<SocketAddr>, StorageError> {
        Ok(None)
    }
    /// Tells every registry instance listening on this database `payload`
    /// (PostgreSQL's NOTIFY on [`crate::cluster::CHANNEL`]). The default,
    /// for a database only one instance uses, tells nobody.
    fn notify(&mut self, _payload: &str) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Why a token was not used, from its row: `use_token`'s answer when its
/// atomic update changed nothing.
pub(crate) fn token_refusal(row: Option<&TokenRow>, now: u64) -> TokenUse {
    match row {
        None => TokenUse::Unknown,
        Some(t) if t.revoked => TokenUse::Revoked,
        Some(t) if t.expires_at.is_some_and(|e| e <= now) => TokenUse::Expired,
        Some(_) => TokenUse::UsedUp,
    }
}

/// A boxed backend is a backend: `main` picks SQLite or PostgreSQL at run
/// time. Every method is passed on, the defaulted ones too (a method
/// added to the trait must be added here, or the box answers with the
/// default instead of the backend).
impl<T: Storage + ?Sized> Storage for Box<T> {
    fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
        (**self).node(id)
    }
    fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
        (**self).node_by_address(a)
    }
    fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
        (**self).node_by_name(name)
    }
    fn lookup(&self, peer: &PeerRef, me: &NodeId) -> Result<Option<Found>, StorageError> {
        (**self).lookup(peer, me)
    }
    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
        (**self).address_taken(a)
    }
    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        (**self).insert_node(row)
    }
    fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        (**self).update_node(row)
    }
    fn set_endpoints(&mut self, id: &NodeId, endpoints: &[SocketAddr]) -> Result<(), StorageError> {
        (**self).set_endpoints(id, endpoints)
    }
    fn statement_seq(&self, from: &NodeId, to: &NodeId) -> Result<Option<u64>, StorageError> {
        (**self).statement_seq(from, to)
    }
    fn statement(
        &self,
        from: &NodeId,
        to: &NodeId,
    ) -> Result<Option<Signed<Statement>>, StorageError> {
        (**self).statement(from, to)
    }
    fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError> {
        (**self).put_statement(st)
    }
    fn approves(&self, from: &NodeId, to: &NodeId) -> Result<bool, StorageError> {
        (**self).approves(from, to)
    }
    fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError> {
        (**self).inbox(to)
    }
    fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
        (**self).ack(to, push)
    }
    fn node_count(&self) -> Result<u64, StorageError> {
        (**self).node_count()
    }
    fn put_cert(&mut self, cert: &CertRow) -> Result<bool, StorageError> {
        (**self).put_cert(cert)
    }
    fn find_certs(
        &self,
        owner: &OwnerPublic,
        tag: &Tag,
        after: Option<&NodeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        (**self).find_certs(owner, tag, after, now, limit)
    }
    fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
        (**self).put_revocation(r)
    }
    fn revoked(&self, owner: &OwnerPublic, node: &NodeId) -> Result<bool, StorageError> {
        (**self).revoked(owner, node)
    }
    fn revocation_counts(&self, owner: &OwnerPublic) -> Result<(u64, u64), StorageError> {
        (**self).revocation_counts(owner)
    }
    fn find_revocations(
        &self,
        owner: &OwnerPublic,
        after: Option<&NodeId>,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        (**self).find_revocations(owner, after, limit)
    }
    fn nodes(&self, limit: usize) -> Result<Vec<NodeRow>, StorageError> {
        (**self).nodes(limit)
    }
    fn succeed(
        &mut self,
        old: &NodeId,
        new: &NodeRow,
        succession: &[u8],
    ) -> Result<(), StorageError> {
        (**self).succeed(old, new, succession)
    }
    fn successor(&self, old: &NodeId) -> Result<Option<(NodeId, Vec<u8>)>, StorageError> {
        (**self).successor(old)
    }
    fn put_token(&mut self, t: &TokenRow) -> Result<(), StorageError> {
        (**self).put_token(t)
    }
    fn tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
        (**self).tokens()
    }
    fn use_token(&mut self, hash: &[u8; 32], now: u64) -> Result<TokenUse, StorageError> {
        (**self).use_token(hash, now)
    }
    fn revoke_token(&mut self, id: &str) -> Result<bool, StorageError> {
        (**self).revoke_token(id)
    }
    fn remove_node(&mut self, id: &NodeId, now: u64) -> Result<bool, StorageError> {
        (**self).remove_node(id, now)
    }
    fn expire_unused(
        &mut self,
        seen_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<NodeId>, StorageError> {
        (**self).expire_unused(seen_before, now, limit)
    }
    fn reusable_tombstone(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
    ) -> Result<Option<Ipv4Addr>, StorageError> {
        (**self).reusable_tombstone(first, last)
    }
    fn insert_on_tombstone(&mut self, row: &NodeRow) -> Result<bool, StorageError> {
        (**self).insert_on_tombstone(row)
    }
    fn attach(&mut self, id: &NodeId, instance: SocketAddr) -> Result<(), StorageError> {
        (**self).attach(id, instance)
    }
    fn attached(&self, id: &NodeId) -> Result<Option<SocketAddr>, StorageError> {
        (**self).attached(id)
    }
    fn notify(&mut self, payload: &str) -> Result<(), StorageError> {
        (**self).notify(payload)
    }
}

/// Current schema version (of both backends: their migrations go in step).
pub const SCHEMA_VERSION: i64 = 7;

/// Versioned migrations; entry `i` moves the schema from version `i` to
/// `i+1`. A new one goes into [`crate::storage_pg::MIGRATIONS`] too.
pub(crate) const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
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
    // Owner certificates (one per holder) with their tags apart, indexed
    // for "owner O, tag T, holders after H"; owner revocations.
    r#"
CREATE TABLE certs (
    holder     TEXT PRIMARY KEY,
    owner      BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    bytes      BLOB NOT NULL
);
CREATE TABLE cert_tags (
    owner  BLOB NOT NULL,
    tag    TEXT NOT NULL,
    holder TEXT NOT NULL,
    PRIMARY KEY (owner, tag, holder)
) WITHOUT ROWID;
CREATE INDEX cert_tags_holder ON cert_tags (holder);
CREATE TABLE revocations (
    owner BLOB NOT NULL,
    node  TEXT NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (owner, node)
) WITHOUT ROWID;
"#,
    // Identity successions: each retired id with its successor.
    r#"
CREATE TABLE successions (
    old_id TEXT PRIMARY KEY,
    new_id TEXT NOT NULL UNIQUE,
    bytes  BLOB NOT NULL
);
"#,
    // Join tokens, by their hash.
    r#"
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    hash       BLOB NOT NULL UNIQUE,
    uses       INTEGER,
    used       INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    created    INTEGER NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tombstones (
    address INTEGER PRIMARY KEY,
    node_id TEXT NOT NULL,
    removed INTEGER NOT NULL
);
"#,
    // Expiry and address reuse: when each node was last seen (stamped by
    // triggers on every registration and endpoint change, so the writes
    // of older versions stay as they were; rows already there count as
    // seen now), and for each tombstone the nodes that approved its old
    // id when it went (they may hold rules for the address).
    r#"
ALTER TABLE nodes ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
UPDATE nodes SET last_seen = unixepoch();
CREATE INDEX nodes_last_seen ON nodes (last_seen);
CREATE TRIGGER nodes_seen_on_insert AFTER INSERT ON nodes BEGIN
    UPDATE nodes SET last_seen = unixepoch() WHERE node_id = NEW.node_id;
END;
CREATE TRIGGER nodes_seen_on_update AFTER UPDATE OF reg_seq, endpoints ON nodes BEGIN
    UPDATE nodes SET last_seen = unixepoch() WHERE node_id = NEW.node_id;
END;
CREATE INDEX statements_to ON statements (to_id);
CREATE INDEX tombstones_removed ON tombstones (removed, address);
CREATE TABLE tombstone_refs (
    address INTEGER NOT NULL,
    from_id TEXT NOT NULL,
    PRIMARY KEY (address, from_id)
) WITHOUT ROWID;
CREATE INDEX tombstone_refs_from ON tombstone_refs (from_id);
"#,
    // Several instances on one database (PostgreSQL): which instance each
    // node is attached to. SQLite keeps it too, so both schemas stay one.
    r#"
CREATE TABLE attached (
    node_id  TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    since    INTEGER NOT NULL
) WITHOUT ROWID;
"#,
];

/// A Unix time or count as SQLite's signed integer (times past year
/// 292 billion are as good as never).
pub(crate) fn sql_u64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The lower bound for "ids after `after`": every hex id is above "".
pub(crate) fn after_key(after: Option<&NodeId>) -> String {
    after.map(NodeId::to_string).unwrap_or_default()
}

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

    /// Opens and migrates up to `version` only (tests start from an older
    /// schema with it).
    #[cfg(test)]
    pub(crate) fn open_at(path: &Path, version: i64) -> Result<Self, StorageError> {
        Self::init_to(Connection::open(path)?, version)
    }

    fn init(conn: Connection) -> Result<Self, StorageError> {
        Self::init_to(conn, SCHEMA_VERSION)
    }

    fn init_to(mut conn: Connection, target: i64) -> Result<Self, StorageError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StorageError::TooNew(version));
        }
        for (i, m) in MIGRATIONS
            .iter()
            .enumerate()
            .take(target.max(0) as usize)
            .skip(version as usize)
        {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(SqliteStorage { conn })
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StorageError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
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
        // Cached: the text is the same for each `where_`, and preparing
        // costs more than the read itself.
        let raw = self
            .conn
            .prepare_cached(&sql)?
            .query_row([p], Self::row_to_node)
            .optional()?;
        raw.map(RawNode::decode).transpose()
    }

    /// [`Storage::lookup`] in one statement, the peer picked by `where_`
    /// (on `n`, parameter 1; the asker is parameter 2).
    fn lookup_where(
        &self,
        where_: &str,
        p: &dyn rusqlite::ToSql,
        me: &NodeId,
    ) -> Result<Option<Found>, StorageError> {
        let sql = format!(
            "SELECT n.ed_public, n.static_pub, n.binding, n.address, n.hostname, n.reg_seq, n.endpoints, n.reg_digest, \
             COALESCE((SELECT s.approves FROM statements s WHERE s.from_id = n.node_id AND s.to_id = ?2), 0), \
             (SELECT m.endpoints FROM nodes m WHERE m.node_id = ?2) \
             FROM nodes n WHERE {where_}"
        );
        let me = me.to_string();
        let found = self
            .conn
            .prepare_cached(&sql)?
            .query_row(rusqlite::params![p, me], |r| {
                Ok((
                    Self::row_to_node(r)?,
                    r.get::<_, bool>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ))
            })
            .optional()?;
        found
            .map(|(raw, approves_me, mine)| {
                Ok(Found {
                    row: raw.decode()?,
                    approves_me,
                    my_endpoints: split_endpoints(mine.as_deref().unwrap_or(""))?,
                })
            })
            .transpose()
    }
}

/// A node's columns as stored, before they are checked.
pub(crate) struct RawNode {
    pub(crate) ed: Vec<u8>,
    pub(crate) st: Vec<u8>,
    pub(crate) binding: Vec<u8>,
    pub(crate) address: u32,
    pub(crate) hostname: Option<String>,
    pub(crate) reg_seq: i64,
    pub(crate) endpoints: String,
    pub(crate) reg_digest: Option<Vec<u8>>,
}

impl RawNode {
    pub(crate) fn decode(self) -> Result<NodeRow, StorageError> {
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
            endpoints: split_endpoints(&self.endpoints)?,
            reg_seq: self.reg_seq as u64,
            reg_digest: self
                .reg_digest
                .map(|d| d.try_into().map_err(|_| corrupt("reg_digest")))
                .transpose()?,
        })
    }
}

/// Stores a new node row (alone, or inside a transaction: a
/// `Transaction` is a `Connection`).
fn insert_row(conn: &Connection, row: &NodeRow) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO nodes (node_id, ed_public, static_pub, binding, address, hostname, reg_seq, endpoints, reg_digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            row.identity.node_id().to_string(),
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

/// A stored endpoint list (`join_endpoints`) read back.
pub(crate) fn split_endpoints(s: &str) -> Result<Vec<SocketAddr>, StorageError> {
    s.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| StorageError::Corrupt {
                table: "nodes",
                detail: "endpoints".to_string(),
            })
        })
        .collect()
}

pub(crate) fn join_endpoints(endpoints: &[SocketAddr]) -> String {
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

    fn lookup(&self, peer: &PeerRef, me: &NodeId) -> Result<Option<Found>, StorageError> {
        match peer {
            PeerRef::Id(id) => self.lookup_where("n.node_id = ?1", &id.to_string(), me),
            PeerRef::Addr(a) => self.lookup_where("n.address = ?1", &u32::from(*a), me),
            PeerRef::Name(n) => self.lookup_where("n.hostname = ?1", n, me),
        }
    }

    fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT 1 FROM nodes WHERE address = ?1 UNION ALL SELECT 1 FROM tombstones WHERE address = ?1",
        )?;
        Ok(stmt.exists([u32::from(a)])?)
    }

    fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
        insert_row(&self.conn, row)
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

    fn put_cert(&mut self, cert: &CertRow) -> Result<bool, StorageError> {
        let holder = cert.holder.to_string();
        let owner = &cert.owner.0[..];
        let tx = self.conn.transaction()?;
        let same = tx
            .prepare_cached("SELECT 1 FROM certs WHERE holder = ?1 AND bytes = ?2")?
            .exists(params![holder, cert.bytes])?;
        if same {
            return Ok(false);
        }
        tx.execute("DELETE FROM cert_tags WHERE holder = ?1", [&holder])?;
        tx.execute(
            "INSERT INTO certs (holder, owner, expires_at, bytes) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (holder) DO UPDATE SET owner = ?2, expires_at = ?3, bytes = ?4",
            params![holder, owner, sql_u64(cert.expires_at), cert.bytes],
        )?;
        for tag in &cert.tags {
            tx.execute(
                "INSERT OR IGNORE INTO cert_tags (owner, tag, holder) VALUES (?1, ?2, ?3)",
                params![owner, tag.as_str(), holder],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn find_certs(
        &self,
        owner: &OwnerPublic,
        tag: &Tag,
        after: Option<&NodeId>,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.holder, c.bytes FROM cert_tags t JOIN certs c ON c.holder = t.holder
             WHERE t.owner = ?1 AND t.tag = ?2 AND t.holder > ?3
               AND c.owner = ?1 AND c.expires_at > ?4
               AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.owner = ?1 AND r.node = t.holder)
             ORDER BY t.holder LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                &owner.0[..],
                tag.as_str(),
                after_key(after),
                sql_u64(now),
                sql_u64(limit as u64)
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )?;
        collect_by_node(rows, "certs")
    }

    fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
        let node = r.node.to_string();
        let owner = &r.owner.0[..];
        let tx = self.conn.transaction()?;
        let new = tx.execute(
            "INSERT OR IGNORE INTO revocations (owner, node, bytes) VALUES (?1, ?2, ?3)",
            params![owner, node, r.bytes],
        )? == 1;
        let gone = tx.execute(
            "DELETE FROM certs WHERE holder = ?1 AND owner = ?2",
            params![node, owner],
        )?;
        if gone > 0 {
            tx.execute("DELETE FROM cert_tags WHERE holder = ?1", [&node])?;
        }
        tx.commit()?;
        Ok(new)
    }

    fn revoked(&self, owner: &OwnerPublic, node: &NodeId) -> Result<bool, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM revocations WHERE owner = ?1 AND node = ?2")?;
        Ok(stmt.exists(params![&owner.0[..], node.to_string()])?)
    }

    fn revocation_counts(&self, owner: &OwnerPublic) -> Result<(u64, u64), StorageError> {
        let mine = self.conn.query_row(
            "SELECT count(*) FROM revocations WHERE owner = ?1",
            [&owner.0[..]],
            |r| r.get::<_, i64>(0),
        )?;
        let all = self
            .conn
            .query_row("SELECT count(*) FROM revocations", [], |r| {
                r.get::<_, i64>(0)
            })?;
        Ok((mine as u64, all as u64))
    }

    fn find_revocations(
        &self,
        owner: &OwnerPublic,
        after: Option<&NodeId>,
        limit: usize,
    ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, bytes FROM revocations WHERE owner = ?1 AND node > ?2
             ORDER BY node LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![&owner.0[..], after_key(after), sql_u64(limit as u64)],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
        )?;
        collect_by_node(rows, "revocations")
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

    fn succeed(
        &mut self,
        old: &NodeId,
        new: &NodeRow,
        succession: &[u8],
    ) -> Result<(), StorageError> {
        let old = old.to_string();
        let tx = self.conn.transaction()?;
        let gone = tx.execute("DELETE FROM nodes WHERE node_id = ?1", [&old])?;
        if gone == 0 {
            return Err(StorageError::Conflict(format!("node {old} is not stored")));
        }
        tx.execute(
            "DELETE FROM statements WHERE from_id = ?1 OR to_id = ?1",
            [&old],
        )?;
        tx.execute("DELETE FROM inbox WHERE to_id = ?1", [&old])?;
        // Its certificate would point nodes searching by tag at a retired
        // id; the successor publishes one issued to it, if it has one.
        tx.execute("DELETE FROM cert_tags WHERE holder = ?1", [&old])?;
        tx.execute("DELETE FROM certs WHERE holder = ?1", [&old])?;
        tx.execute(
            "INSERT INTO successions (old_id, new_id, bytes) VALUES (?1, ?2, ?3)",
            params![old, new.identity.node_id().to_string(), succession],
        )?;
        insert_row(&tx, new)?;
        tx.commit()?;
        Ok(())
    }

    fn successor(&self, old: &NodeId) -> Result<Option<(NodeId, Vec<u8>)>, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT new_id, bytes FROM successions WHERE old_id = ?1")?;
        let row: Option<(String, Vec<u8>)> = stmt
            .query_row([old.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(id, bytes)| {
            id.parse::<NodeId>()
                .map(|id| (id, bytes))
                .map_err(|_| StorageError::Corrupt {
                    table: "successions",
                    detail: format!("bad node id {id:?}"),
                })
        })
        .transpose()
    }

    fn put_token(&mut self, t: &TokenRow) -> Result<(), StorageError> {
        self.conn.execute(
            "INSERT INTO tokens (id, hash, uses, used, expires_at, created, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.id,
                &t.hash[..],
                t.uses.map(sql_u64),
                sql_u64(t.used),
                t.expires_at.map(sql_u64),
                sql_u64(t.created),
                t.revoked
            ],
        )?;
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, hash, uses, used, expires_at, created, revoked FROM tokens ORDER BY created, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, bool>(6)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, hash, uses, used, expires_at, created, revoked) = row?;
            out.push(token_row(
                id, hash, uses, used, expires_at, created, revoked,
            )?);
        }
        Ok(out)
    }

    fn use_token(&mut self, hash: &[u8; 32], now: u64) -> Result<TokenUse, StorageError> {
        let n = self.conn.execute(
            "UPDATE tokens SET used = used + 1 WHERE hash = ?1 AND NOT revoked
             AND (expires_at IS NULL OR expires_at > ?2) AND (uses IS NULL OR used < uses)",
            params![&hash[..], sql_u64(now)],
        )?;
        if n == 1 {
            return Ok(TokenUse::Used);
        }
        let all = self.tokens()?;
        Ok(token_refusal(all.iter().find(|t| &t.hash == hash), now))
    }

    fn revoke_token(&mut self, id: &str) -> Result<bool, StorageError> {
        Ok(self
            .conn
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])?
            == 1)
    }

    fn remove_node(&mut self, id: &NodeId, now: u64) -> Result<bool, StorageError> {
        let id = id.to_string();
        let tx = self.conn.transaction()?;
        let address: Option<u32> = tx
            .query_row("SELECT address FROM nodes WHERE node_id = ?1", [&id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(address) = address else {
            return Ok(false);
        };
        bury(&tx, &id, address, now)?;
        tx.commit()?;
        Ok(true)
    }

    fn expire_unused(
        &mut self,
        seen_before: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<NodeId>, StorageError> {
        let tx = self.conn.transaction()?;
        let found: Vec<(String, u32)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT node_id, address FROM nodes n WHERE last_seen < ?1
                 AND NOT EXISTS (SELECT 1 FROM statements s WHERE s.to_id = n.node_id AND s.approves)
                 ORDER BY last_seen, node_id LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![sql_u64(seen_before), sql_u64(limit as u64)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = vec![];
        for (id, address) in found {
            let node = id.parse().map_err(|_| StorageError::Corrupt {
                table: "nodes",
                detail: format!("node id '{id}'"),
            })?;
            bury(&tx, &id, address, now)?;
            out.push(node);
        }
        tx.commit()?;
        Ok(out)
    }

    fn reusable_tombstone(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
    ) -> Result<Option<Ipv4Addr>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT address FROM tombstones t WHERE address BETWEEN ?1 AND ?2
             AND NOT EXISTS (SELECT 1 FROM tombstone_refs r WHERE r.address = t.address)
             ORDER BY removed, address LIMIT 1",
        )?;
        let a: Option<u32> = stmt
            .query_row(params![u32::from(first), u32::from(last)], |r| r.get(0))
            .optional()?;
        Ok(a.map(Ipv4Addr::from))
    }

    fn insert_on_tombstone(&mut self, row: &NodeRow) -> Result<bool, StorageError> {
        let tx = self.conn.transaction()?;
        let freed = tx.execute(
            "DELETE FROM tombstones WHERE address = ?1
             AND NOT EXISTS (SELECT 1 FROM tombstone_refs r WHERE r.address = ?1)",
            [u32::from(row.address)],
        )?;
        if freed == 0 {
            return Ok(false);
        }
        insert_row(&tx, row)?;
        tx.commit()?;
        Ok(true)
    }

    fn attach(&mut self, id: &NodeId, instance: SocketAddr) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO attached (node_id, instance, since) VALUES (?1, ?2, unixepoch())
                 ON CONFLICT (node_id) DO UPDATE SET instance = excluded.instance, since = excluded.since",
            )?
            .execute(params![id.to_string(), instance.to_string()])?;
        Ok(())
    }

    fn attached(&self, id: &NodeId) -> Result<Option<SocketAddr>, StorageError> {
        let at: Option<String> = self
            .conn
            .prepare_cached("SELECT instance FROM attached WHERE node_id = ?1")?
            .query_row([id.to_string()], |r| r.get(0))
            .optional()?;
        at.map(|a| {
            a.parse().map_err(|_| StorageError::Corrupt {
                table: "attached",
                detail: format!("instance {a:?}"),
            })
        })
        .transpose()
    }
}

/// Removes node `id` (holding `address`) inside `tx`: its row, its
/// statements, its pushes and its certificate go; its address becomes a
/// tombstone at `now`, remembering which nodes approve it (they may hold
/// rules for the address). Whatever it approved itself no longer holds
/// a tombstone: it is no node any more.
fn bury(tx: &Connection, id: &str, address: u32, now: u64) -> Result<(), StorageError> {
    tx.execute("DELETE FROM tombstone_refs WHERE from_id = ?1", [id])?;
    tx.execute(
        "INSERT OR IGNORE INTO tombstone_refs (address, from_id)
         SELECT ?1, from_id FROM statements WHERE to_id = ?2 AND approves AND from_id <> ?2",
        params![address, id],
    )?;
    tx.execute("DELETE FROM nodes WHERE node_id = ?1", [id])?;
    tx.execute(
        "DELETE FROM statements WHERE from_id = ?1 OR to_id = ?1",
        [id],
    )?;
    tx.execute("DELETE FROM inbox WHERE to_id = ?1", [id])?;
    tx.execute("DELETE FROM cert_tags WHERE holder = ?1", [id])?;
    tx.execute("DELETE FROM certs WHERE holder = ?1", [id])?;
    tx.execute(
        "INSERT OR REPLACE INTO tombstones (address, node_id, removed) VALUES (?1, ?2, ?3)",
        params![address, id, sql_u64(now)],
    )?;
    Ok(())
}

/// A token's columns, checked.
pub(crate) fn token_row(
    id: String,
    hash: Vec<u8>,
    uses: Option<i64>,
    used: i64,
    expires_at: Option<i64>,
    created: i64,
    revoked: bool,
) -> Result<TokenRow, StorageError> {
    Ok(TokenRow {
        id,
        hash: hash.try_into().map_err(|_| StorageError::Corrupt {
            table: "tokens",
            detail: "hash".into(),
        })?,
        uses: uses.map(|u| u.max(0) as u64),
        used: used.max(0) as u64,
        expires_at: expires_at.map(|e| e.max(0) as u64),
        created: created.max(0) as u64,
        revoked,
    })
}

/// Reads (node id text, bytes) rows.
fn collect_by_node(
    rows: impl Iterator<Item = rusqlite::Result<(String, Vec<u8>)>>,
    table: &'static str,
) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
    let mut out = vec![];
    for row in rows {
        let (id, bytes) = row?;
        let id = id.parse().map_err(|_| StorageError::Corrupt {
            table,
            detail: format!("node id '{id}'"),
        })?;
        out.push((id, bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! What only SQLite has; the rest is in `storage_suite`, run against
    //! every backend.
    use super::*;
    use pilot_proto::identity::Identity;

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
