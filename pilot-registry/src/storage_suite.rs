//! The storage test suite: every method of the [`Storage`] trait, the
//! migrations from older schemas and the refusal of a newer one, run
//! against every backend, so they give the same answers.
//!
//! SQLite runs always (a file in a temporary directory). PostgreSQL runs
//! when `PILOT_TEST_PG` holds a connection URL (`scripts/test.sh` starts a
//! throwaway cluster with `scripts/pg.sh` and sets it); each test gets a
//! schema of its own, dropped at the end. Without it the PostgreSQL half
//! says on the terminal that it was skipped, and passes.
//!
//! Each test is a function of a [`Backend`]; `suite!` makes a `#[test]` of
//! it per backend. The storages under test are `Box<dyn Storage>`, as
//! `main` holds them, so the box's forwarding is tested too.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use pilot_proto::cert::{OwnerPublic, Tag};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::messages::{PeerRef, Signed, Statement, StatementKind};

use crate::registrar::{self, RegisterOutcome};
use crate::storage::{
    CertRow, Found, NodeRow, RevocationRow, SqliteStorage, Storage, StorageError, TokenRow,
    TokenUse, SCHEMA_VERSION,
};
use crate::storage_pg::PgStorage;

/// A database under test.
trait Backend {
    /// Opens it (again: the same database every time), migrated to
    /// `version` at most.
    fn open_at(&self, version: i64) -> Result<Box<dyn Storage>, StorageError>;
    /// Opens it, migrated to the current version.
    fn open(&self) -> Box<dyn Storage> {
        self.open_at(SCHEMA_VERSION).expect("open the database")
    }
    /// Its schema version, read from the database.
    fn schema_version(&self) -> i64;
    /// Sets the stored schema version (as a newer registry would leave it).
    fn force_version(&self, v: i64);
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("registry.db")
    }
}

impl Backend for Sqlite {
    fn open_at(&self, version: i64) -> Result<Box<dyn Storage>, StorageError> {
        Ok(Box::new(SqliteStorage::open_at(&self.path(), version)?))
    }
    fn schema_version(&self) -> i64 {
        SqliteStorage::open_at(&self.path(), 0)
            .unwrap()
            .schema_version()
            .unwrap()
    }
    fn force_version(&self, v: i64) {
        let conn = rusqlite::Connection::open(self.path()).unwrap();
        conn.pragma_update(None, "user_version", v).unwrap();
    }
}

/// A schema of its own in the `PILOT_TEST_PG` database.
struct Pg {
    admin: std::cell::RefCell<postgres::Client>,
    config: postgres::Config,
    schema: String,
}

static SKIPPED: Once = Once::new();

impl Pg {
    /// `None` (after saying so once) when `PILOT_TEST_PG` is not set. A
    /// URL that is set but does not connect fails the test.
    fn new() -> Option<Self> {
        let Ok(url) = std::env::var("PILOT_TEST_PG") else {
            SKIPPED.call_once(|| {
                // Straight to the terminal: the test harness would hide a
                // passing test's eprintln!.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nSKIPPED: the PostgreSQL half of the storage suite (PILOT_TEST_PG is not set; \
                     scripts/test.sh sets it, or run `scripts/pg.sh cargo test -p pilot-registry`)\n"
                );
            });
            return None;
        };
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let schema = format!(
            "pilot_test_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut config = crate::storage_pg::parse_url(&url).expect("PILOT_TEST_PG");
        let mut admin = config
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("PILOT_TEST_PG is set but does not connect: {e:?}"));
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        config.options(&format!("-c search_path={schema}"));
        config.application_name(&schema);
        Some(Pg {
            admin: admin.into(),
            config,
            schema,
        })
    }

    fn admin(&self, sql: &str) {
        self.admin.borrow_mut().batch_execute(sql).unwrap();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .admin
            .get_mut()
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
    }
}

impl Backend for Pg {
    fn open_at(&self, version: i64) -> Result<Box<dyn Storage>, StorageError> {
        Ok(Box::new(PgStorage::open_at(self.config.clone(), version)?))
    }
    fn schema_version(&self) -> i64 {
        PgStorage::open_at(self.config.clone(), 0)
            .unwrap()
            .schema_version()
            .unwrap()
    }
    fn force_version(&self, v: i64) {
        self.admin(&format!(
            "UPDATE {}.schema_version SET version = {v}",
            self.schema
        ));
    }
}

/// One `#[test]` per backend for each test function named.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $name() { super::$name(&super::Sqlite::new()) } )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(b) = super::Pg::new() {
                        super::$name(&b)
                    }
                }
            )*
        }
    };
}

suite!(
    nodes_survive_a_reopen_and_are_found_three_ways,
    nodes_are_listed_by_address_up_to_the_limit,
    a_lookup_answers_in_one_read_what_three_questions_would,
    unique_id_address_and_hostname_are_conflicts,
    update_keeps_the_address_and_replaces_the_rest,
    statements_are_stored_per_pair_and_queued,
    pushes_wait_across_a_reopen_until_acknowledged,
    certificates_are_found_by_owner_and_tag_in_pages_while_live,
    revocations_are_kept_once_paged_and_withdraw_certificates,
    an_empty_database_is_created_at_the_current_version,
    a_succession_moves_the_row_and_drops_the_old_ids_state,
    successions_move_a_node_and_retire_its_id,
    a_version_2_database_is_migrated_and_keeps_its_rows,
    a_version_3_database_is_migrated_and_keeps_its_rows,
    a_version_4_database_is_migrated_and_keeps_its_rows,
    a_version_5_database_is_migrated_and_keeps_its_rows,
    the_previous_version_is_migrated_and_keeps_its_rows,
    attachments_are_kept_per_node_and_replaced,
    unused_nodes_expire_after_the_time_unless_a_trusted_peer_names_them,
    tombstones_are_reused_oldest_first_and_never_while_named,
    a_full_pool_hands_out_the_oldest_tombstone_nobody_names,
    join_tokens_are_used_up_once_each_and_expire,
    a_removed_node_frees_its_name_and_leaves_its_address_taken,
    a_newer_schema_is_refused,
);

// PostgreSQL only: what SQLite's single file cannot meet.
#[test]
fn postgres_two_instances_migrating_at_once_both_open() {
    let Some(b) = Pg::new() else { return };
    std::thread::scope(|s| {
        let opens: Vec<_> = (0..2)
            .map(|_| {
                let config = b.config.clone();
                s.spawn(move || PgStorage::open(config).map(|_| ()))
            })
            .collect();
        for o in opens {
            o.join().unwrap().expect("each instance opens");
        }
    });
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    let mut s = b.open();
    s.insert_node(&row(1, 5, None)).unwrap();
    assert_eq!(s.node_count().unwrap(), 1, "the tables were made once");
}

#[test]
fn postgres_a_lost_connection_is_made_again() {
    let Some(b) = Pg::new() else { return };
    let mut s = b.open();
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    // The server ends the registry's session (a restart, a failover).
    b.admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}' AND pid <> pg_backend_pid()",
        b.schema
    ));
    // The call that meets the dead connection may fail; the next connects
    // again.
    let mut answers = vec![];
    for _ in 0..3 {
        let got = s.node(&id(1).node_id());
        let ok = got.is_ok();
        answers.push(got.map(|r| r.is_some()));
        if ok {
            break;
        }
    }
    assert!(
        matches!(answers.last(), Some(Ok(true))),
        "answers after the connection was ended: {answers:?}"
    );
    assert!(answers.len() <= 2, "one failure at most: {answers:?}");
    s.set_endpoints(&id(1).node_id(), &[]).unwrap();
}

#[test]
fn postgres_an_unreachable_server_is_an_error_that_says_so() {
    // A port nothing listens on: loopback, closed at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = PgStorage::connect(&format!("postgres://pilot@127.0.0.1:{port}/pilot"))
        .err()
        .expect("nothing listens there");
    let text = e.to_string();
    assert!(matches!(e, StorageError::Pg(_)), "{text}");
    assert!(
        text.contains("PostgreSQL:") && text.contains("onnection refused"),
        "{text}"
    );
    let e = PgStorage::connect("not a url").err().unwrap();
    assert!(matches!(e, StorageError::Url(_)), "{e}");
}

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

fn statement(from: &Identity, to: &Identity, kind: StatementKind, seq: u64) -> Signed<Statement> {
    Signed::sign(
        Statement {
            kind,
            from: from.public(),
            to: to.node_id(),
            seq,
        },
        from,
    )
}

fn owner(n: u8) -> OwnerPublic {
    OwnerPublic([n; 32])
}

fn tags(list: &str) -> Vec<Tag> {
    pilot_proto::cert::parse_tags(list).unwrap()
}

fn nid(n: u8) -> NodeId {
    NodeId([n; 16])
}

fn cert(holder: u8, o: u8, list: &str, expires_at: u64) -> CertRow {
    CertRow {
        holder: nid(holder),
        owner: owner(o),
        tags: tags(list),
        expires_at,
        bytes: vec![holder, o, list.len() as u8],
    }
}

fn holders(found: &[(NodeId, Vec<u8>)]) -> Vec<NodeId> {
    found.iter().map(|(n, _)| *n).collect()
}

fn nodes_survive_a_reopen_and_are_found_three_ways(b: &dyn Backend) {
    {
        let mut s = b.open();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 6, None)).unwrap();
    }
    let s = b.open();
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
    assert_eq!(s.node_by_name("beta").unwrap(), None);
    assert_eq!(
        s.node_by_address(Ipv4Addr::new(10, 77, 0, 7)).unwrap(),
        None
    );
}

/// What [`Storage::lookup`] must answer: the peer's row, its approval of
/// the asker, the asker's endpoints, asked one at a time.
fn three_questions(s: &dyn Storage, peer: &PeerRef, me: &NodeId) -> Option<Found> {
    let row = match peer {
        PeerRef::Id(id) => s.node(id).unwrap(),
        PeerRef::Addr(a) => s.node_by_address(*a).unwrap(),
        PeerRef::Name(n) => s.node_by_name(n).unwrap(),
    }?;
    Some(Found {
        approves_me: s.approves(&row.identity.node_id(), me).unwrap(),
        my_endpoints: s.node(me).unwrap().map(|r| r.endpoints).unwrap_or_default(),
        row,
    })
}

fn a_lookup_answers_in_one_read_what_three_questions_would(b: &dyn Backend) {
    let mut s = b.open();
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    let mut quiet = row(2, 6, None);
    quiet.endpoints = vec!["198.51.100.7:7000".parse().unwrap()];
    s.insert_node(&quiet).unwrap();
    let mut none = row(4, 8, Some("delta"));
    none.endpoints.clear();
    s.insert_node(&none).unwrap();
    let (one, two) = (id(1).node_id(), id(2).node_id());
    let alpha = [
        PeerRef::Id(one),
        PeerRef::Addr(Ipv4Addr::new(10, 77, 0, 5)),
        PeerRef::Name("alpha".into()),
    ];
    let check = |s: &dyn Storage, peer: &PeerRef, me: &NodeId| {
        let got = s.lookup(peer, me).unwrap();
        assert_eq!(got, three_questions(s, peer, me), "{peer:?} asked by {me}");
        got
    };
    // No statement yet: found, not approved; the asker's endpoints come along.
    for p in &alpha {
        let f = check(&*s, p, &two).expect("alpha is stored");
        assert_eq!(f.row, row(1, 5, Some("alpha")));
        assert!(!f.approves_me);
        assert_eq!(f.my_endpoints, quiet.endpoints);
    }
    s.put_statement(&statement(&id(1), &id(2), StatementKind::Approve, 3))
        .unwrap();
    for p in &alpha {
        assert!(check(&*s, p, &two).unwrap().approves_me, "{p:?}");
        // The approval is of node 2 only, and one way.
        assert!(!check(&*s, p, &id(4).node_id()).unwrap().approves_me);
    }
    assert!(!check(&*s, &PeerRef::Id(two), &one).unwrap().approves_me);
    // An asker with no endpoints, and one not stored at all.
    assert_eq!(
        check(&*s, &alpha[0], &id(4).node_id())
            .unwrap()
            .my_endpoints,
        vec![]
    );
    assert_eq!(
        check(&*s, &alpha[2], &id(9).node_id())
            .unwrap()
            .my_endpoints,
        vec![]
    );
    s.put_statement(&statement(&id(1), &id(2), StatementKind::Revoke, 4))
        .unwrap();
    assert!(!check(&*s, &alpha[1], &two).unwrap().approves_me);
    // Nobody there.
    for p in [
        PeerRef::Id(id(9).node_id()),
        PeerRef::Addr(Ipv4Addr::new(10, 77, 0, 9)),
        PeerRef::Name("nobody".into()),
    ] {
        assert_eq!(check(&*s, &p, &two), None);
    }
}

fn nodes_are_listed_by_address_up_to_the_limit(b: &dyn Backend) {
    let mut s = b.open();
    s.insert_node(&row(1, 9, Some("alpha"))).unwrap();
    s.insert_node(&row(2, 3, None)).unwrap();
    s.insert_node(&row(3, 6, Some("gamma"))).unwrap();
    // An address above 127.x: ordered as an unsigned number, not signed.
    let mut high = row(4, 1, None);
    high.address = Ipv4Addr::new(250, 0, 0, 1);
    s.insert_node(&high).unwrap();
    let all = s.nodes(10).unwrap();
    assert_eq!(
        all.iter().map(|r| r.address).collect::<Vec<_>>(),
        vec![
            Ipv4Addr::new(10, 77, 0, 3),
            Ipv4Addr::new(10, 77, 0, 6),
            Ipv4Addr::new(10, 77, 0, 9),
            Ipv4Addr::new(250, 0, 0, 1)
        ]
    );
    assert_eq!(all[2], row(1, 9, Some("alpha")));
    assert_eq!(all[3], high);
    assert_eq!(s.nodes(2).unwrap().len(), 2);
    assert!(s.nodes(0).unwrap().is_empty());
    assert_eq!(s.nodes(usize::MAX).unwrap().len(), 4);
}

fn unique_id_address_and_hostname_are_conflicts(b: &dyn Backend) {
    let mut s = b.open();
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    assert!(
        matches!(
            s.insert_node(&row(1, 8, None)),
            Err(StorageError::Conflict(_))
        ),
        "the same node id twice"
    );
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
    // A conflict changed nothing, and the storage goes on working.
    assert_eq!(s.node_count().unwrap(), 2);
    assert_eq!(s.node(&id(2).node_id()).unwrap(), Some(row(2, 6, None)));
}

fn update_keeps_the_address_and_replaces_the_rest(b: &dyn Backend) {
    let mut s = b.open();
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
    // A sequence number past i64 reads back as it was stored.
    r.reg_seq = u64::MAX - 1;
    r.reg_digest = None;
    s.update_node(&r).unwrap();
    let got = s.node(&id(1).node_id()).unwrap().unwrap();
    assert_eq!((got.reg_seq, got.reg_digest), (u64::MAX - 1, None));
    let v6: std::net::SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
    s.set_endpoints(&id(1).node_id(), &[v6]).unwrap();
    assert_eq!(s.node(&id(1).node_id()).unwrap().unwrap().endpoints, [v6]);
    s.set_endpoints(&id(1).node_id(), &[]).unwrap();
    assert!(s
        .node(&id(1).node_id())
        .unwrap()
        .unwrap()
        .endpoints
        .is_empty());
    // Endpoints of a node that is not stored: nothing to change.
    s.set_endpoints(&id(2).node_id(), &[v6]).unwrap();
    assert_eq!(s.node(&id(2).node_id()).unwrap(), None);
}

fn statements_are_stored_per_pair_and_queued(b: &dyn Backend) {
    let mut s = b.open();
    let (a, bb) = (id(1), id(2));
    let st = |kind, seq| statement(&a, &bb, kind, seq);
    let (an, bn) = (a.node_id(), bb.node_id());
    assert_eq!(s.statement_seq(&an, &bn).unwrap(), None);
    assert_eq!(s.statement(&an, &bn).unwrap(), None);
    assert!(!s.approves(&an, &bn).unwrap());
    assert!(s.inbox(&bn).unwrap().is_empty());
    let p1 = s.put_statement(&st(StatementKind::Approve, 3)).unwrap();
    assert!(s.approves(&an, &bn).unwrap());
    assert!(!s.approves(&bn, &an).unwrap(), "approval is one way");
    assert_eq!(s.statement_seq(&an, &bn).unwrap(), Some(3));
    let p2 = s.put_statement(&st(StatementKind::Revoke, 4)).unwrap();
    assert!(p2 > p1, "push ids grow: {p1} then {p2}");
    assert!(!s.approves(&an, &bn).unwrap());
    assert_eq!(s.statement_seq(&an, &bn).unwrap(), Some(4));
    assert_eq!(
        s.statement(&an, &bn).unwrap(),
        Some(st(StatementKind::Revoke, 4)),
        "the newest, exactly as signed"
    );
    assert_eq!(s.statement(&bn, &an).unwrap(), None);
    assert_eq!(s.statement_seq(&bn, &an).unwrap(), None);
    let inbox = s.inbox(&bn).unwrap();
    assert_eq!(inbox.len(), 2);
    assert_eq!(inbox[0].0, p1);
    assert_eq!(inbox[0].1, st(StatementKind::Approve, 3));
    assert_eq!(inbox[1].1, st(StatementKind::Revoke, 4));
    assert!(s.inbox(&an).unwrap().is_empty(), "nothing for the sender");
    s.ack(&bn, p1).unwrap();
    assert_eq!(s.inbox(&bn).unwrap().len(), 1);
    // Someone else cannot ack b's mail.
    s.ack(&an, inbox[1].0).unwrap();
    assert_eq!(s.inbox(&bn).unwrap().len(), 1);
    // Acks of what is gone or never was change nothing.
    s.ack(&bn, p1).unwrap();
    s.ack(&bn, u64::MAX).unwrap();
    assert_eq!(s.inbox(&bn).unwrap(), vec![inbox[1].clone()]);
    s.ack(&bn, p2).unwrap();
    assert!(s.inbox(&bn).unwrap().is_empty());
    // The statement itself stays after its push is acknowledged.
    assert_eq!(s.statement_seq(&an, &bn).unwrap(), Some(4));
}

fn pushes_wait_across_a_reopen_until_acknowledged(b: &dyn Backend) {
    let (a, bb, c) = (id(1), id(2), id(3));
    let pushes: Vec<u64> = {
        let mut s = b.open();
        vec![
            s.put_statement(&statement(&a, &bb, StatementKind::Approve, 1))
                .unwrap(),
            s.put_statement(&statement(&c, &bb, StatementKind::Approve, 1))
                .unwrap(),
            s.put_statement(&statement(&a, &c, StatementKind::Approve, 1))
                .unwrap(),
        ]
    };
    let mut s = b.open();
    let waiting = s.inbox(&bb.node_id()).unwrap();
    assert_eq!(
        waiting.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        pushes[..2],
        "b's mail, oldest first"
    );
    assert_eq!(waiting[1].1.body.from, c.public());
    s.ack(&bb.node_id(), pushes[0]).unwrap();
    drop(s);
    let mut s = b.open();
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    assert_eq!(s.inbox(&c.node_id()).unwrap().len(), 1);
    // A push stored after the reopen is newer than every one before.
    let later = s
        .put_statement(&statement(&c, &a, StatementKind::Approve, 2))
        .unwrap();
    assert!(pushes.iter().all(|p| *p < later), "{pushes:?} then {later}");
}

fn certificates_are_found_by_owner_and_tag_in_pages_while_live(b: &dyn Backend) {
    let mut s = b.open();
    let build: Tag = "build".parse().unwrap();
    for h in 1..=5 {
        assert!(s.put_cert(&cert(h, 1, "build,ci", 1000)).unwrap());
    }
    s.put_cert(&cert(6, 1, "cache", 1000)).unwrap();
    s.put_cert(&cert(7, 2, "build", 1000)).unwrap();
    s.put_cert(&cert(8, 1, "build", 500)).unwrap();
    let find = |s: &dyn Storage, after: Option<NodeId>, now, limit| {
        s.find_certs(&owner(1), &build, after.as_ref(), now, limit)
            .unwrap()
    };
    // Owner 1's `build` holders, in id order; not 6 (another tag), not
    // 7 (another owner).
    let all = find(&s, None, 100, 100);
    assert_eq!(
        holders(&all),
        [1, 2, 3, 4, 5, 8].map(nid),
        "every live match, ordered"
    );
    assert_eq!(all[0].1, cert(1, 1, "build,ci", 1000).bytes);
    // Pages of two.
    let p1 = find(&s, None, 100, 2);
    assert_eq!(holders(&p1), [nid(1), nid(2)]);
    let p2 = find(&s, Some(nid(2)), 100, 2);
    assert_eq!(holders(&p2), [nid(3), nid(4)]);
    let p3 = find(&s, Some(nid(4)), 100, 2);
    assert_eq!(holders(&p3), [nid(5), nid(8)]);
    assert!(find(&s, Some(nid(8)), 100, 2).is_empty());
    assert!(find(&s, None, 100, 0).is_empty());
    // Expiry: 8 is gone at 500, everything at 1000.
    assert_eq!(holders(&find(&s, None, 499, 100)).len(), 6);
    assert_eq!(holders(&find(&s, None, 500, 100)), [1, 2, 3, 4, 5].map(nid));
    assert!(find(&s, None, 1000, 100).is_empty());
    assert!(find(&s, None, u64::MAX, 100).is_empty());
    // A holder's new certificate replaces the old one with its tags.
    assert!(!s.put_cert(&cert(3, 1, "build,ci", 1000)).unwrap(), "same");
    assert!(s.put_cert(&cert(3, 2, "cache", 2000)).unwrap());
    assert_eq!(holders(&find(&s, None, 100, 100)), [1, 2, 4, 5, 8].map(nid));
    assert!(s
        .find_certs(&owner(1), &"ci".parse().unwrap(), None, 100, 10)
        .unwrap()
        .iter()
        .all(|(h, _)| *h != nid(3)));
    let by2 = s
        .find_certs(&owner(2), &"cache".parse().unwrap(), None, 100, 10)
        .unwrap();
    assert_eq!(by2, vec![(nid(3), cert(3, 2, "cache", 2000).bytes)]);
    // An expiry past i64 is kept as the largest one the databases hold.
    s.put_cert(&cert(9, 1, "build", u64::MAX)).unwrap();
    let late = i64::MAX as u64 - 1;
    assert_eq!(holders(&find(&s, Some(nid(8)), late, 100)), [nid(9)]);
    // Ids whose hex starts with a letter sort after the digits, bytewise.
    s.put_cert(&cert(0xab, 1, "build", 1000)).unwrap();
    s.put_cert(&cert(0x0c, 1, "build", 1000)).unwrap();
    assert_eq!(
        holders(&find(&s, Some(nid(9)), 100, 100)),
        [nid(0x0c), nid(0xab)]
    );
}

fn revocations_are_kept_once_paged_and_withdraw_certificates(b: &dyn Backend) {
    let mut s = b.open();
    let build: Tag = "build".parse().unwrap();
    for h in 1..=3 {
        s.put_cert(&cert(h, 1, "build", 1000)).unwrap();
    }
    s.put_cert(&cert(4, 2, "build", 1000)).unwrap();
    let rev = |o: u8, n: u8, b: u8| RevocationRow {
        owner: owner(o),
        node: nid(n),
        bytes: vec![o, n, b],
    };
    assert!(!s.revoked(&owner(1), &nid(2)).unwrap());
    assert_eq!(s.revocation_counts(&owner(1)).unwrap(), (0, 0));
    assert!(s.put_revocation(&rev(1, 2, 0)).unwrap(), "new");
    assert!(!s.put_revocation(&rev(1, 2, 0)).unwrap(), "a resend");
    assert!(
        !s.put_revocation(&rev(1, 2, 9)).unwrap(),
        "another revocation of the same node changes nothing"
    );
    assert!(s.revoked(&owner(1), &nid(2)).unwrap());
    assert!(!s.revoked(&owner(2), &nid(2)).unwrap());
    // The revoked node's certificate from that owner is gone.
    let found = s.find_certs(&owner(1), &build, None, 0, 10).unwrap();
    assert_eq!(holders(&found), [nid(1), nid(3)]);
    // Owner 2 revoking node 1 does not touch owner 1's certificate of it.
    assert!(s.put_revocation(&rev(2, 1, 0)).unwrap());
    let found = s.find_certs(&owner(1), &build, None, 0, 10).unwrap();
    assert_eq!(holders(&found), [nid(1), nid(3)]);
    // Published after its revocation (the rules refuse that; storage
    // still never lists it).
    s.put_cert(&cert(2, 1, "build", 1000)).unwrap();
    let found = s.find_certs(&owner(1), &build, None, 0, 10).unwrap();
    assert_eq!(holders(&found), [nid(1), nid(3)]);
    // Paging, in node order, with the first bytes kept.
    for n in [9, 5, 7] {
        assert!(s.put_revocation(&rev(1, n, 0)).unwrap());
    }
    assert_eq!(s.revocation_counts(&owner(1)).unwrap(), (4, 5));
    assert_eq!(s.revocation_counts(&owner(3)).unwrap(), (0, 5));
    let p1 = s.find_revocations(&owner(1), None, 3).unwrap();
    assert_eq!(holders(&p1), [2, 5, 7].map(nid));
    assert_eq!(p1[0].1, vec![1, 2, 0]);
    let p2 = s.find_revocations(&owner(1), Some(&nid(7)), 3).unwrap();
    assert_eq!(holders(&p2), [nid(9)]);
    assert_eq!(
        holders(&s.find_revocations(&owner(2), None, 3).unwrap()),
        [nid(1)]
    );
    assert!(s.find_revocations(&owner(3), None, 3).unwrap().is_empty());
    // Kept across a reopen.
    drop(s);
    let s = b.open();
    assert!(s.revoked(&owner(1), &nid(9)).unwrap());
    assert_eq!(s.revocation_counts(&owner(1)).unwrap(), (4, 5));
}

fn an_empty_database_is_created_at_the_current_version(b: &dyn Backend) {
    let s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(s.node_count().unwrap(), 0);
    assert!(s.nodes(10).unwrap().is_empty());
    drop(s);
    // Opening again migrates nothing and loses nothing.
    let mut s = b.open();
    s.insert_node(&row(1, 5, None)).unwrap();
    drop(s);
    assert_eq!(b.open().node_count().unwrap(), 1);
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
}

fn a_version_2_database_is_migrated_and_keeps_its_rows(b: &dyn Backend) {
    let previous = 2;
    let (a, bb) = (id(1), id(2));
    let st = statement(&a, &bb, StatementKind::Approve, 3);
    {
        // A registry of schema version 2, with a node, a statement and a
        // push waiting; it has no certificate tables yet.
        let mut s = b.open_at(previous).unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.put_statement(&st).unwrap();
        assert!(s.put_cert(&cert(1, 1, "build", 1000)).is_err());
    }
    assert_eq!(b.schema_version(), previous);
    let mut s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(
        s.node(&a.node_id()).unwrap(),
        Some(row(1, 5, Some("alpha")))
    );
    assert_eq!(s.statement(&a.node_id(), &bb.node_id()).unwrap(), Some(st));
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    // The new tables work, and survive a reopen.
    s.put_cert(&cert(1, 1, "build", 1000)).unwrap();
    s.put_revocation(&RevocationRow {
        owner: owner(1),
        node: nid(2),
        bytes: vec![1],
    })
    .unwrap();
    drop(s);
    let s = b.open();
    let found = s
        .find_certs(&owner(1), &"build".parse().unwrap(), None, 0, 10)
        .unwrap();
    assert_eq!(holders(&found), [nid(1)]);
    assert!(s.revoked(&owner(1), &nid(2)).unwrap());
}

fn a_version_3_database_is_migrated_and_keeps_its_rows(b: &dyn Backend) {
    let previous = 3;
    let (a, bb) = (id(1), id(2));
    let st = statement(&a, &bb, StatementKind::Approve, 3);
    {
        // A registry of schema version 3 (no successions yet) with
        // nodes, a statement, a push waiting and a certificate.
        let mut s = b.open_at(previous).unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 6, None)).unwrap();
        s.put_statement(&st).unwrap();
        s.put_cert(&cert(1, 1, "build", 1000)).unwrap();
        assert!(s
            .succeed(&a.node_id(), &row(7, 5, Some("alpha")), b"s")
            .is_err());
        // The failed succession was rolled back whole.
        assert_eq!(
            s.node(&a.node_id()).unwrap(),
            Some(row(1, 5, Some("alpha")))
        );
        assert_eq!(s.node(&id(7).node_id()).unwrap(), None);
    }
    assert_eq!(b.schema_version(), previous);
    let mut s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(s.node_count().unwrap(), 2);
    assert_eq!(s.statement(&a.node_id(), &bb.node_id()).unwrap(), Some(st));
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    let found = s
        .find_certs(&owner(1), &"build".parse().unwrap(), None, 0, 10)
        .unwrap();
    assert_eq!(holders(&found), [nid(1)]);
    // The new table works.
    s.succeed(&a.node_id(), &row(7, 5, Some("alpha")), b"s")
        .unwrap();
    assert_eq!(
        s.successor(&a.node_id()).unwrap(),
        Some((id(7).node_id(), b"s".to_vec()))
    );
}

fn token(n: u8, uses: Option<u64>, expires_at: Option<u64>) -> TokenRow {
    TokenRow {
        id: format!("t{n}"),
        hash: [n; 32],
        uses,
        used: 0,
        expires_at,
        created: 100 + u64::from(n),
        revoked: false,
    }
}

fn a_version_4_database_is_migrated_and_keeps_its_rows(b: &dyn Backend) {
    let previous = 4;
    let (a, bb) = (id(1), id(2));
    let st = statement(&a, &bb, StatementKind::Approve, 3);
    {
        // A registry of the previous schema (4: no join tokens yet) with
        // nodes, a statement, a push waiting and a succession.
        let mut s = b.open_at(previous).unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 6, None)).unwrap();
        s.insert_node(&row(4, 7, None)).unwrap();
        s.put_statement(&st).unwrap();
        s.succeed(&id(4).node_id(), &row(3, 7, None), b"s").unwrap();
        assert!(s.put_token(&token(1, Some(2), None)).is_err());
    }
    assert_eq!(b.schema_version(), previous);
    let mut s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(s.node_count().unwrap(), 3);
    assert_eq!(s.statement(&a.node_id(), &bb.node_id()).unwrap(), Some(st));
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    assert_eq!(
        s.successor(&id(4).node_id()).unwrap(),
        Some((id(3).node_id(), b"s".to_vec()))
    );
    // The new table works.
    s.put_token(&token(1, Some(2), None)).unwrap();
    assert_eq!(s.use_token(&[1; 32], 0).unwrap(), TokenUse::Used);
    assert_eq!(s.tokens().unwrap()[0].used, 1);
}

fn join_tokens_are_used_up_once_each_and_expire(b: &dyn Backend) {
    let mut s = b.open();
    assert!(s.tokens().unwrap().is_empty());
    s.put_token(&token(1, Some(2), None)).unwrap();
    s.put_token(&token(2, None, Some(1000))).unwrap();
    assert!(matches!(
        s.put_token(&token(1, None, None)),
        Err(StorageError::Conflict(_))
    ));
    assert_eq!(s.use_token(&[1; 32], 500).unwrap(), TokenUse::Used);
    assert_eq!(s.use_token(&[1; 32], 500).unwrap(), TokenUse::Used);
    assert_eq!(s.use_token(&[1; 32], 500).unwrap(), TokenUse::UsedUp);
    assert_eq!(s.use_token(&[9; 32], 500).unwrap(), TokenUse::Unknown);
    assert_eq!(s.use_token(&[2; 32], 999).unwrap(), TokenUse::Used);
    assert_eq!(s.use_token(&[2; 32], 1000).unwrap(), TokenUse::Expired);
    assert!(s.revoke_token("t2").unwrap());
    assert!(!s.revoke_token("t7").unwrap());
    assert_eq!(s.use_token(&[2; 32], 10).unwrap(), TokenUse::Revoked);
    drop(s);
    // Kept across a reopen, with their counts, oldest first.
    let s = b.open();
    let all = s.tokens().unwrap();
    assert_eq!(
        all,
        vec![
            TokenRow {
                used: 2,
                ..token(1, Some(2), None)
            },
            TokenRow {
                used: 1,
                revoked: true,
                ..token(2, None, Some(1000))
            },
        ]
    );
}

fn a_removed_node_frees_its_name_and_leaves_its_address_taken(b: &dyn Backend) {
    let mut s = b.open();
    let (a, bb) = (id(1), id(2));
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    s.insert_node(&row(2, 6, None)).unwrap();
    s.put_statement(&statement(&a, &bb, StatementKind::Approve, 1))
        .unwrap();
    s.put_statement(&statement(&bb, &a, StatementKind::Approve, 1))
        .unwrap();
    s.put_cert(&CertRow {
        holder: a.node_id(),
        ..cert(1, 1, "build", 1000)
    })
    .unwrap();
    s.put_cert(&CertRow {
        holder: bb.node_id(),
        ..cert(2, 1, "build", 1000)
    })
    .unwrap();
    assert!(s.remove_node(&a.node_id(), 77).unwrap());
    assert!(!s.remove_node(&a.node_id(), 78).unwrap(), "gone already");
    assert_eq!(s.node(&a.node_id()).unwrap(), None);
    assert_eq!(s.node_by_name("alpha").unwrap(), None, "the name is free");
    assert!(
        s.address_taken(Ipv4Addr::new(10, 77, 0, 5)).unwrap(),
        "a tombstone"
    );
    assert!(!s.approves(&bb.node_id(), &a.node_id()).unwrap());
    assert!(!s.approves(&a.node_id(), &bb.node_id()).unwrap());
    assert!(s.inbox(&a.node_id()).unwrap().is_empty());
    let left = s
        .find_certs(&owner(1), &"build".parse().unwrap(), None, 0, 10)
        .unwrap();
    assert_eq!(holders(&left), [bb.node_id()], "its certificate went");
    // The name goes to a new node; the address does not.
    s.insert_node(&row(3, 9, Some("alpha"))).unwrap();
    assert_eq!(s.node_count().unwrap(), 2);
    drop(s);
    assert!(b.open().address_taken(Ipv4Addr::new(10, 77, 0, 5)).unwrap());
}

fn a_succession_moves_the_row_and_drops_the_old_ids_state(b: &dyn Backend) {
    let mut s = b.open();
    let a = row(1, 10, Some("cache"));
    let old = a.identity.node_id();
    s.insert_node(&a).unwrap();
    s.insert_node(&row(3, 11, Some("peer"))).unwrap();
    let st = |from: u8, to: u8| {
        Signed::sign(
            Statement {
                kind: StatementKind::Approve,
                from: id(from).public(),
                to: id(to).node_id(),
                seq: 1,
            },
            &id(from),
        )
    };
    s.put_statement(&st(3, 1)).unwrap();
    s.put_statement(&st(1, 3)).unwrap();
    s.put_cert(&CertRow {
        holder: old,
        ..cert(0, 1, "build", 1000)
    })
    .unwrap();
    let next = NodeRow {
        identity: id(2).public(),
        reg_seq: 0,
        reg_digest: None,
        ..a.clone()
    };
    s.succeed(&old, &next, b"the succession").unwrap();
    assert_eq!(s.node(&old).unwrap(), None);
    assert_eq!(s.node_by_address(a.address).unwrap(), Some(next.clone()));
    assert_eq!(s.node_by_name("cache").unwrap(), Some(next.clone()));
    assert_eq!(
        s.successor(&old).unwrap(),
        Some((next.identity.node_id(), b"the succession".to_vec()))
    );
    assert_eq!(s.successor(&next.identity.node_id()).unwrap(), None);
    assert_eq!(s.statement_seq(&id(3).node_id(), &old).unwrap(), None);
    assert_eq!(s.statement_seq(&old, &id(3).node_id()).unwrap(), None);
    assert!(s.inbox(&old).unwrap().is_empty());
    let build = "build".parse().unwrap();
    assert!(s
        .find_certs(&owner(1), &build, None, 0, 10)
        .unwrap()
        .is_empty());
    // One successor per id, and only of a stored node.
    assert!(matches!(
        s.succeed(&old, &row(4, 12, None), b"again"),
        Err(StorageError::Conflict(_))
    ));
    assert_eq!(s.node(&id(4).node_id()).unwrap(), None);
}

fn successions_move_a_node_and_retire_its_id(b: &dyn Backend) {
    let (a, bb, c, a2) = (id(1), id(2), id(3), id(7));
    let (an, bn, a2n) = (a.node_id(), bb.node_id(), a2.node_id());
    let mut s = b.open();
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    s.insert_node(&row(2, 6, None)).unwrap();
    s.put_statement(&statement(&a, &bb, StatementKind::Approve, 1))
        .unwrap();
    s.put_statement(&statement(&bb, &a, StatementKind::Approve, 1))
        .unwrap();
    s.put_statement(&statement(
        &c,
        &a,
        StatementKind::Request {
            note: "hello".into(),
        },
        1,
    ))
    .unwrap();
    assert_eq!(s.successor(&an).unwrap(), None);
    // alpha's successor takes its address and name.
    let next = row(7, 5, Some("alpha"));
    s.succeed(&an, &next, b"succession").unwrap();
    assert_eq!(s.node(&an).unwrap(), None, "the old id is gone");
    assert_eq!(s.node(&a2n).unwrap(), Some(next.clone()));
    assert_eq!(s.node_by_name("alpha").unwrap(), Some(next.clone()));
    assert_eq!(
        s.node_by_address(Ipv4Addr::new(10, 77, 0, 5)).unwrap(),
        Some(next.clone())
    );
    assert_eq!(s.node_count().unwrap(), 2);
    // The old id's statements and its undelivered pushes went with it.
    assert_eq!(s.statement_seq(&an, &bn).unwrap(), None);
    assert_eq!(s.statement_seq(&bn, &an).unwrap(), None);
    assert!(!s.approves(&bn, &an).unwrap());
    assert_eq!(s.statement_seq(&c.node_id(), &an).unwrap(), None);
    assert!(s.inbox(&an).unwrap().is_empty());
    assert_eq!(
        s.successor(&an).unwrap(),
        Some((a2n, b"succession".to_vec()))
    );
    assert_eq!(s.successor(&a2n).unwrap(), None);
    assert_eq!(s.successor(&bn).unwrap(), None);
    // The old id again: it is not stored any more.
    assert!(matches!(
        s.succeed(&an, &row(8, 5, Some("alpha")), b"again"),
        Err(StorageError::Conflict(_))
    ));
    // beta to an id that already succeeded someone: refused, and beta
    // stays as it was (one transaction).
    assert!(matches!(
        s.succeed(&bn, &row(7, 6, None), b"x"),
        Err(StorageError::Conflict(_))
    ));
    assert_eq!(s.node(&bn).unwrap(), Some(row(2, 6, None)));
    assert_eq!(s.successor(&bn).unwrap(), None);
    drop(s);
    let s = b.open();
    assert_eq!(
        s.successor(&an).unwrap(),
        Some((a2n, b"succession".to_vec())),
        "kept across a reopen"
    );
    assert_eq!(s.node(&a2n).unwrap(), Some(next));
}

fn a_newer_schema_is_refused(b: &dyn Backend) {
    b.open().insert_node(&row(1, 5, None)).unwrap();
    b.force_version(SCHEMA_VERSION + 1);
    let e = b.open_at(SCHEMA_VERSION).err().expect("refused");
    assert!(
        matches!(e, StorageError::TooNew(v) if v == SCHEMA_VERSION + 1),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade pilot-registry"), "{e}");
    // Refusing touched no row: back at its own version, it opens whole.
    b.force_version(SCHEMA_VERSION);
    assert_eq!(b.open().node_count().unwrap(), 1);
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ids(mut v: Vec<NodeId>) -> Vec<NodeId> {
    v.sort();
    v
}

fn a_version_5_database_is_migrated_and_keeps_its_rows(b: &dyn Backend) {
    let previous = 5;
    let (a, bb) = (id(1), id(2));
    let st = statement(&a, &bb, StatementKind::Approve, 3);
    {
        // A registry of the previous schema (5: nothing kept of when a
        // node was last seen) with nodes, a statement, a push waiting and a
        // token.
        let mut s = b.open_at(previous).unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 6, None)).unwrap();
        s.put_statement(&st).unwrap();
        s.put_token(&token(1, Some(2), None)).unwrap();
        assert!(
            s.expire_unused(u64::MAX, 0, 10).is_err(),
            "no last_seen yet"
        );
    }
    assert_eq!(b.schema_version(), previous);
    let before = unix_now();
    let mut s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(s.node_count().unwrap(), 2);
    assert_eq!(s.statement(&a.node_id(), &bb.node_id()).unwrap(), Some(st));
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    assert_eq!(s.tokens().unwrap().len(), 1);
    // The rows count as seen at the migration: an upgrade expires nobody.
    assert!(s
        .expire_unused(before.saturating_sub(60), before, 10)
        .unwrap()
        .is_empty());
    // Later they do, but the approved one stays.
    let now = unix_now() + 10;
    assert_eq!(s.expire_unused(now, now, 10).unwrap(), [a.node_id()]);
    assert!(s.node(&bb.node_id()).unwrap().is_some());
    assert_eq!(
        s.reusable_tombstone(Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 254))
            .unwrap(),
        Some(Ipv4Addr::new(10, 77, 0, 5))
    );
}

fn unused_nodes_expire_after_the_time_unless_a_trusted_peer_names_them(b: &dyn Backend) {
    let mut s = b.open();
    let (a, bb, c) = (id(1), id(2), id(3));
    let start = unix_now();
    s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
    s.insert_node(&row(2, 6, Some("beta"))).unwrap();
    s.insert_node(&row(3, 7, None)).unwrap();
    // a approves b (b is named by a trusted peer); c turned a down, which
    // names nobody.
    s.put_statement(&statement(&a, &bb, StatementKind::Approve, 1))
        .unwrap();
    s.put_statement(&statement(&c, &a, StatementKind::Deny, 1))
        .unwrap();
    // Seen (inserted) just now: nothing is older than an hour.
    assert!(s
        .expire_unused(start.saturating_sub(3600), start, 10)
        .unwrap()
        .is_empty());
    assert_eq!(s.node_count().unwrap(), 3);
    // Past the time: a and c go, b stays while a names it.
    let later = unix_now() + 10;
    assert_eq!(
        ids(s.expire_unused(later, later, 10).unwrap()),
        ids(vec![a.node_id(), c.node_id()])
    );
    assert_eq!(s.node(&a.node_id()).unwrap(), None);
    assert_eq!(s.node(&c.node_id()).unwrap(), None);
    assert!(s.node(&bb.node_id()).unwrap().is_some(), "named: kept");
    // The name is free at once; the address is a tombstone.
    assert_eq!(s.node_by_name("alpha").unwrap(), None);
    assert!(s.address_taken(Ipv4Addr::new(10, 77, 0, 5)).unwrap());
    assert!(s.address_taken(Ipv4Addr::new(10, 77, 0, 7)).unwrap());
    assert!(s.inbox(&a.node_id()).unwrap().is_empty());
    // a's approval went with a: b is named by nobody now, and goes next.
    assert_eq!(s.expire_unused(later, later, 10).unwrap(), [bb.node_id()]);
    s.insert_node(&row(4, 9, Some("alpha"))).unwrap();
    s.insert_node(&row(5, 10, Some("beta"))).unwrap();
    s.insert_node(&row(6, 11, None)).unwrap();
    s.insert_node(&row(7, 12, None)).unwrap();
    // A second later, 4 registers again and 6 is seen at a new endpoint:
    // both count as seen; 5 and 7 were not, and go (at most `limit` a
    // call).
    let inserted = unix_now();
    while unix_now() <= inserted {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mid = unix_now();
    s.update_node(&row(4, 9, Some("alpha"))).unwrap();
    s.set_endpoints(&id(6).node_id(), &["192.0.2.77:1".parse().unwrap()])
        .unwrap();
    assert_eq!(s.expire_unused(mid, mid, 1).unwrap().len(), 1);
    assert_eq!(s.expire_unused(mid, mid, 10).unwrap().len(), 1);
    assert!(s.expire_unused(mid, mid, 10).unwrap().is_empty());
    assert!(s.node(&id(5).node_id()).unwrap().is_none());
    assert!(s.node(&id(7).node_id()).unwrap().is_none());
    drop(s);
    let s = b.open();
    assert_eq!(s.node_count().unwrap(), 2);
    assert!(
        s.address_taken(Ipv4Addr::new(10, 77, 0, 6)).unwrap(),
        "tombstones are kept"
    );
}

fn tombstones_are_reused_oldest_first_and_never_while_named(b: &dyn Backend) {
    let mut s = b.open();
    let (lo, hi) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 254));
    assert_eq!(s.reusable_tombstone(lo, hi).unwrap(), None);
    for (n, last) in [(1, 5), (2, 6), (3, 7), (4, 8)] {
        s.insert_node(&row(n, last, None)).unwrap();
    }
    // 4 approves 2; 2 approves 4 (what a removed node approved holds
    // nothing: it is no node any more).
    s.put_statement(&statement(&id(4), &id(2), StatementKind::Approve, 1))
        .unwrap();
    s.put_statement(&statement(&id(2), &id(4), StatementKind::Approve, 1))
        .unwrap();
    assert!(s.remove_node(&id(2).node_id(), 50).unwrap());
    assert!(s.remove_node(&id(1).node_id(), 100).unwrap());
    assert!(s.remove_node(&id(3).node_id(), 200).unwrap());
    // .6 is the oldest, but 4 approved its old id.
    assert_eq!(
        s.reusable_tombstone(lo, hi).unwrap(),
        Some(Ipv4Addr::new(10, 77, 0, 5))
    );
    assert!(!s.insert_on_tombstone(&row(9, 6, None)).unwrap(), "named");
    assert_eq!(s.node(&id(9).node_id()).unwrap(), None);
    assert!(
        !s.insert_on_tombstone(&row(9, 77, None)).unwrap(),
        "no tombstone"
    );
    assert!(s.insert_on_tombstone(&row(9, 5, Some("new"))).unwrap());
    assert_eq!(
        s.node_by_address(Ipv4Addr::new(10, 77, 0, 5)).unwrap(),
        Some(row(9, 5, Some("new")))
    );
    assert_eq!(
        s.reusable_tombstone(lo, hi).unwrap(),
        Some(Ipv4Addr::new(10, 77, 0, 7))
    );
    // Only inside the range asked for.
    assert_eq!(
        s.reusable_tombstone(Ipv4Addr::new(10, 77, 0, 8), hi)
            .unwrap(),
        None
    );
    // 4 goes: nobody names 2's old id any more, the oldest.
    assert!(s.remove_node(&id(4).node_id(), 300).unwrap());
    drop(s);
    let mut s = b.open();
    assert_eq!(
        s.reusable_tombstone(lo, hi).unwrap(),
        Some(Ipv4Addr::new(10, 77, 0, 6))
    );
    assert!(s.insert_on_tombstone(&row(10, 6, None)).unwrap());
    assert!(
        matches!(
            s.insert_on_tombstone(&row(10, 7, None)),
            Err(StorageError::Conflict(_))
        ),
        "the id is stored already"
    );
    assert_eq!(
        s.reusable_tombstone(lo, hi).unwrap(),
        Some(Ipv4Addr::new(10, 77, 0, 7)),
        "a refused insert keeps the tombstone"
    );
}

fn a_full_pool_hands_out_the_oldest_tombstone_nobody_names(b: &dyn Backend) {
    let mut s = b.open();
    // Six usable addresses: .9 to .14.
    let net: ipnet::Ipv4Net = "10.9.0.8/29".parse().unwrap();
    let obs: std::net::SocketAddr = "203.0.113.9:5555".parse().unwrap();
    let reg = |n: u8| {
        let i = id(n);
        Signed::sign(
            pilot_proto::messages::Registration {
                identity: i.public(),
                hostname: None,
                seq: 1,
                local_endpoints: vec![],
                nat: Default::default(),
            },
            &i,
        )
    };
    let mut addr = std::collections::HashMap::new();
    for n in 1..=6 {
        match registrar::register(&mut *s, &reg(n), net, obs).unwrap() {
            RegisterOutcome::Ok { node, .. } => addr.insert(n, node.address),
            other => panic!("{n}: {other:?}"),
        };
    }
    assert_eq!(
        registrar::register(&mut *s, &reg(7), net, obs).unwrap(),
        RegisterOutcome::PoolExhausted
    );
    // 1 approves 2; then 2, 3 and 4 are removed, in that order.
    s.put_statement(&statement(&id(1), &id(2), StatementKind::Approve, 1))
        .unwrap();
    for (n, at) in [(2, 10), (3, 20), (4, 30)] {
        assert!(s.remove_node(&id(n).node_id(), at).unwrap());
    }
    let got =
        |s: &mut Box<dyn Storage>, n: u8| match registrar::register(&mut **s, &reg(n), net, obs)
            .unwrap()
        {
            RegisterOutcome::Ok { node, .. } => Some(node.address),
            RegisterOutcome::PoolExhausted => None,
            other => panic!("{n}: {other:?}"),
        };
    // 2's is the oldest, but 1 may hold a rule for it: 3's, then 4's.
    assert_eq!(got(&mut s, 7), Some(addr[&3]));
    assert_eq!(got(&mut s, 8), Some(addr[&4]));
    assert_eq!(got(&mut s, 9), None, "only a named tombstone is left");
    assert!(s.address_taken(addr[&2]).unwrap());
    // 1 goes too: 2's old address is nobody's concern now, and older
    // than 1's.
    assert!(s.remove_node(&id(1).node_id(), 40).unwrap());
    assert_eq!(got(&mut s, 9), Some(addr[&2]));
    assert_eq!(got(&mut s, 10), Some(addr[&1]));
    assert_eq!(got(&mut s, 11), None);
    assert_eq!(s.node_count().unwrap(), 6);
}

fn the_previous_version_is_migrated_and_keeps_its_rows(b: &dyn Backend) {
    let previous = SCHEMA_VERSION - 1;
    let (a, bb) = (id(1), id(2));
    let st = statement(&a, &bb, StatementKind::Approve, 3);
    let instance: SocketAddr = "192.0.2.1:7946".parse().unwrap();
    {
        // Schema 6: nowhere to keep which instance a node is attached to.
        let mut s = b.open_at(previous).unwrap();
        s.insert_node(&row(1, 5, Some("alpha"))).unwrap();
        s.insert_node(&row(2, 6, None)).unwrap();
        s.put_statement(&st).unwrap();
        assert!(
            s.attach(&a.node_id(), instance).is_err(),
            "no attached table yet"
        );
    }
    let mut s = b.open();
    assert_eq!(b.schema_version(), SCHEMA_VERSION);
    assert_eq!(s.node_count().unwrap(), 2);
    assert_eq!(s.statement(&a.node_id(), &bb.node_id()).unwrap(), Some(st));
    assert_eq!(s.inbox(&bb.node_id()).unwrap().len(), 1);
    assert_eq!(s.attached(&a.node_id()).unwrap(), None);
    s.attach(&a.node_id(), instance).unwrap();
    assert_eq!(s.attached(&a.node_id()).unwrap(), Some(instance));
}

fn attachments_are_kept_per_node_and_replaced(b: &dyn Backend) {
    let (one, two): (SocketAddr, SocketAddr) = (
        "192.0.2.1:7946".parse().unwrap(),
        "[2001:db8::2]:7946".parse().unwrap(),
    );
    let mut s = b.open();
    s.insert_node(&row(1, 5, None)).unwrap();
    s.insert_node(&row(2, 6, None)).unwrap();
    assert_eq!(s.attached(&id(1).node_id()).unwrap(), None);
    s.attach(&id(1).node_id(), one).unwrap();
    s.attach(&id(2).node_id(), one).unwrap();
    // The node moved to the other instance: only the newest is kept.
    s.attach(&id(1).node_id(), two).unwrap();
    drop(s);
    let s = b.open();
    assert_eq!(s.attached(&id(1).node_id()).unwrap(), Some(two));
    assert_eq!(s.attached(&id(2).node_id()).unwrap(), Some(one));
    assert_eq!(s.attached(&id(3).node_id()).unwrap(), None);
}

// PostgreSQL only: the other instances hear what one says, on the
// channel they listen on.
#[test]
fn postgres_a_notification_reaches_a_listening_connection() {
    let Some(b) = Pg::new() else { return };
    let mut listener = b.config.connect(postgres::NoTls).unwrap();
    listener
        .batch_execute(&format!("LISTEN {}", crate::cluster::CHANNEL))
        .unwrap();
    let mut s = b.open();
    let payload = format!("hello from {}", b.schema);
    s.notify(&payload).unwrap();
    use postgres::fallible_iterator::FallibleIterator;
    let mut heard = vec![];
    let mut n = listener.notifications();
    let mut it = n.timeout_iter(std::time::Duration::from_secs(5));
    while let Some(note) = it.next().unwrap() {
        heard.push(note.payload().to_string());
        if heard.contains(&payload) {
            break;
        }
    }
    assert!(heard.contains(&payload), "heard {heard:?}");
}
