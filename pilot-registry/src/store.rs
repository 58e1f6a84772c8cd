//! The storage thread: the only place the registry touches its database.
//!
//! The socket loop hands it [`Job`]s through a bounded queue and never
//! waits: when the queue is full, [`Store::submit`] gives the job back and
//! the caller answers "busy". The thread runs each job to its commit (with
//! the rules of [`crate::registrar`]) and only then sends a [`Done`] back,
//! so nothing is acknowledged to a node before it is on disk, and relaying
//! and STUN never wait for a disk write.

use std::net::SocketAddr;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ipnet::Ipv4Net;
use pilot_proto::cert::{OwnerPublic, Tag};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{NatType, PeerRef, PushItem, Registration, Signed, Statement};
use tracing::warn;

use crate::fleet::{self, CertOutcome, Page, RevocationOutcome};
use crate::registrar::{self, Joining, RegisterOutcome, StatementOutcome};
use crate::stats::Stats;
use crate::storage::{NodeRow, Storage, StorageError};

/// Jobs that may wait in the queue. At about a millisecond of disk each,
/// a full queue is a quarter of a second of work: a node asked to retry
/// later loses less than one waiting that long.
pub const DEFAULT_QUEUE_DEPTH: usize = 256;

/// Whom to answer when a job is done: a control session and its request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The control session's index.
    pub index: u32,
    /// The request id.
    pub req: u32,
}

/// Work for the storage thread.
#[derive(Debug)]
pub enum Job {
    /// Check and store a registration (the registry).
    Register {
        /// Whom to answer.
        ticket: Ticket,
        /// The signed registration.
        reg: Signed<Registration>,
        /// Where the node was seen.
        observed: SocketAddr,
        /// The join token it came with, if any.
        token: Option<[u8; 16]>,
    },
    /// Check a registration and look its node up (a relay-only instance,
    /// which learns nodes from the registry's database, never stores them).
    Attach {
        /// Whom to answer.
        ticket: Ticket,
        /// The signed registration.
        reg: Signed<Registration>,
    },
    /// Find a peer for `me`, with what `me` may learn about it.
    Lookup {
        /// Whom to answer.
        ticket: Ticket,
        /// The peer asked for.
        peer: PeerRef,
        /// The asking node.
        me: NodeId,
    },
    /// Check and store a trust statement for delivery.
    Statement {
        /// Whom to answer.
        ticket: Ticket,
        /// The statement.
        statement: Signed<Statement>,
    },
    /// Read what waits for a node.
    Mail {
        /// The node.
        to: NodeId,
    },
    /// Forget a push the node acknowledged.
    Ack {
        /// The node.
        to: NodeId,
        /// The push id.
        push: u64,
    },
    /// A node shows up at a new endpoint.
    Observed {
        /// The node.
        id: NodeId,
        /// Its endpoint now.
        at: SocketAddr,
    },
    /// Read approvals, for the relay.
    Approvals {
        /// (from, to) pairs: does `from` approve `to`?
        pairs: Vec<(NodeId, NodeId)>,
        /// Also read which instance this node is attached to (the
        /// recipient is not online here; several instances).
        locate: Option<NodeId>,
    },
    /// Record that a node is attached to the instance at `instance`
    /// (several instances on one database).
    Present {
        /// The node.
        id: NodeId,
        /// This instance.
        instance: SocketAddr,
    },
    /// Tell the other instances (NOTIFY) this payload.
    Notify {
        /// A payload made by [`crate::cluster::Cluster::payload`].
        payload: String,
    },
    /// Check and keep a node's owner certificate ([`fleet::publish_cert`]).
    PublishCert {
        /// Whom to answer.
        ticket: Ticket,
        /// The sending node, which the certificate must name.
        me: NodeId,
        /// The certificate, as sent.
        cert: Vec<u8>,
        /// Now, Unix seconds.
        now: u64,
    },
    /// A page of live certificates from an owner with a tag.
    FindCerts {
        /// Whom to answer.
        ticket: Ticket,
        /// The owner.
        owner: OwnerPublic,
        /// The tag.
        tag: Tag,
        /// Holders after this one only.
        after: Option<NodeId>,
        /// Now, Unix seconds.
        now: u64,
    },
    /// Check and keep an owner's revocation ([`fleet::publish_revocation`]).
    PublishRevocation {
        /// Whom to answer.
        ticket: Ticket,
        /// The node that handed it in (for the audit).
        from: NodeId,
        /// The revocation, as sent.
        revocation: Vec<u8>,
    },
    /// A page of an owner's revocations.
    FindRevocations {
        /// Whom to answer.
        ticket: Ticket,
        /// The owner.
        owner: OwnerPublic,
        /// Revoked nodes after this one only.
        after: Option<NodeId>,
    },
    /// Move a registered node to its successor ([`registrar::succeed`]).
    Succeed {
        /// Whom to answer.
        ticket: Ticket,
        /// The succession statement, as sent.
        succession: Vec<u8>,
        /// The tunnel key the control session proved.
        session_key: [u8; 32],
    },
    /// Count the registered nodes, and list up to `list` of them (for the
    /// metrics and the status page).
    Census {
        /// How many nodes to list (0: count only).
        list: usize,
    },
}

impl Job {
    /// The kind of job, as the storage latency histogram labels it (one of
    /// [`crate::stats::StorageTimes::KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Register { .. } | Job::Succeed { .. } => "register",
            Job::Attach { .. } => "attach",
            Job::Lookup { .. } => "lookup",
            Job::Statement { .. } => "statement",
            Job::Mail { .. } => "mail",
            Job::Ack { .. } => "ack",
            Job::Observed { .. } => "observed",
            Job::Approvals { .. } => "approvals",
            Job::Present { .. } | Job::Notify { .. } => "cluster",
            Job::Census { .. } => "census",
            Job::PublishCert { .. } | Job::FindCerts { .. } => "certificate",
            Job::PublishRevocation { .. } | Job::FindRevocations { .. } => "revocation",
        }
    }
}

pub use crate::storage::Found;

/// A finished job, committed.
#[derive(Debug)]
pub enum Done {
    /// A registration was decided.
    Registered {
        /// Whom to answer.
        ticket: Ticket,
        /// The node.
        id: NodeId,
        /// Its NAT type, as it reported it.
        nat: NatType,
        /// Where it was seen.
        observed: SocketAddr,
        /// The decision.
        outcome: Result<RegisterOutcome, StorageError>,
        /// What waits for it (when registered).
        mail: Vec<(u64, PushItem)>,
    },
    /// A node asked to attach to this relay-only instance.
    Attached {
        /// Whom to answer.
        ticket: Ticket,
        /// The node.
        id: NodeId,
        /// Its NAT type.
        nat: NatType,
        /// `None`: a bad signature; `Some(None)`: unknown to the registry.
        row: Result<Option<Option<NodeRow>>, StorageError>,
    },
    /// A lookup was answered.
    Looked {
        /// Whom to answer.
        ticket: Ticket,
        /// The asking node.
        me: NodeId,
        /// The peer, if there is one.
        found: Result<Option<Found>, StorageError>,
        /// The name asked for (for the error message).
        peer: PeerRef,
    },
    /// A statement was decided.
    Stated {
        /// Whom to answer.
        ticket: Ticket,
        /// Sender.
        from: NodeId,
        /// Recipient.
        to: NodeId,
        /// Whether it approves.
        approves: bool,
        /// What it says (for the log).
        kind: &'static str,
        /// SHA-256 (hex) of the signed statement, for the audit log.
        statement: String,
        /// The decision.
        outcome: Result<StatementOutcome, StorageError>,
        /// What now waits for the recipient (when stored).
        mail: Vec<(u64, PushItem)>,
    },
    /// What waits for a node.
    Mail {
        /// The node.
        to: NodeId,
        /// Its pushes.
        items: Result<Vec<(u64, PushItem)>, StorageError>,
    },
    /// Approvals read.
    Approvals {
        /// ((from, to), approves) for every pair that could be read.
        approvals: Vec<((NodeId, NodeId), bool)>,
        /// The node asked to locate, and the instance it is attached to
        /// (`None` inside: attached nowhere; not set if it could not be
        /// read).
        located: Option<(NodeId, Option<SocketAddr>)>,
    },
    /// A published certificate was decided.
    CertPublished {
        /// Whom to answer.
        ticket: Ticket,
        /// The node that sent it.
        from: NodeId,
        /// The decision.
        outcome: Result<CertOutcome, StorageError>,
    },
    /// A page of certificates was read.
    CertsFound {
        /// Whom to answer.
        ticket: Ticket,
        /// The page.
        page: Result<Page, StorageError>,
    },
    /// A revocation handed in was decided.
    RevocationPublished {
        /// Whom to answer.
        ticket: Ticket,
        /// The node that handed it in.
        from: NodeId,
        /// The decision.
        outcome: Result<RevocationOutcome, StorageError>,
    },
    /// A page of revocations was read.
    RevocationsFound {
        /// Whom to answer.
        ticket: Ticket,
        /// The page.
        page: Result<Page, StorageError>,
    },
    /// A succession was decided.
    Succeeded {
        /// Whom to answer.
        ticket: Ticket,
        /// The decision.
        outcome: Result<registrar::SucceedOutcome, StorageError>,
    },
    /// The registered nodes counted (and some listed).
    Census {
        /// How many are registered.
        count: Result<u64, StorageError>,
        /// Those listed, by address (empty unless asked for).
        nodes: Vec<NodeRow>,
    },
}

fn mail_or_log(s: &mut dyn Storage, to: &NodeId) -> Vec<(u64, PushItem)> {
    registrar::mail(s, to).unwrap_or_else(|e| {
        warn!("storage: {e}");
        vec![]
    })
}

/// Runs one job against `s` to its commit. Jobs nobody waits for (acks,
/// endpoint updates) return `None`; their errors are logged.
pub fn run(s: &mut dyn Storage, network: Ipv4Net, job: Job) -> Option<Done> {
    run_with(s, network, &mut Joining::default(), job)
}

/// [`run`], admitting new identities under `joining`.
pub fn run_with(
    s: &mut dyn Storage,
    network: Ipv4Net,
    joining: &mut Joining,
    job: Job,
) -> Option<Done> {
    Some(match job {
        Job::Register {
            ticket,
            reg,
            observed,
            token,
        } => {
            let outcome =
                registrar::register_new(s, &reg, network, observed, token.as_ref(), joining);
            let id = reg.body.identity.node_id();
            let mail = match outcome {
                Ok(RegisterOutcome::Ok { .. }) => mail_or_log(s, &id),
                _ => vec![],
            };
            Done::Registered {
                ticket,
                id,
                nat: reg.body.nat,
                observed,
                outcome,
                mail,
            }
        }
        Job::Attach { ticket, reg } => Done::Attached {
            ticket,
            id: reg.body.identity.node_id(),
            nat: reg.body.nat,
            row: if reg.verify() {
                s.node(&reg.body.identity.node_id()).map(Some)
            } else {
                Ok(None)
            },
        },
        Job::Lookup { ticket, peer, me } => {
            let found = s.lookup(&peer, &me);
            Done::Looked {
                ticket,
                me,
                found,
                peer,
            }
        }
        Job::Statement { ticket, statement } => {
            let outcome = registrar::store_statement(s, &statement);
            let to = statement.body.to;
            let mail = match outcome {
                Ok(StatementOutcome::Stored(_)) => mail_or_log(s, &to),
                _ => vec![],
            };
            Done::Stated {
                ticket,
                from: statement.body.from.node_id(),
                to,
                approves: statement.body.kind.approves(),
                kind: statement.body.kind.name(),
                statement: crate::audit::statement_hash(&statement),
                outcome,
                mail,
            }
        }
        Job::Mail { to } => Done::Mail {
            to,
            items: registrar::mail(s, &to),
        },
        Job::Ack { to, push } => {
            if let Err(e) = s.ack(&to, push) {
                warn!("storage: {e}");
            }
            return None;
        }
        Job::Observed { id, at } => {
            if let Err(e) = registrar::observed_at(s, &id, at) {
                warn!("storage: {e}");
            }
            return None;
        }
        Job::PublishCert {
            ticket,
            me,
            cert,
            now,
        } => Done::CertPublished {
            ticket,
            from: me,
            outcome: fleet::publish_cert(s, &me, &cert, now),
        },
        Job::FindCerts {
            ticket,
            owner,
            tag,
            after,
            now,
        } => Done::CertsFound {
            ticket,
            page: fleet::find_certs(s, &owner, &tag, after.as_ref(), now),
        },
        Job::PublishRevocation {
            ticket,
            from,
            revocation,
        } => Done::RevocationPublished {
            ticket,
            from,
            outcome: fleet::publish_revocation(s, &revocation),
        },
        Job::FindRevocations {
            ticket,
            owner,
            after,
        } => Done::RevocationsFound {
            ticket,
            page: fleet::find_revocations(s, &owner, after.as_ref()),
        },
        Job::Succeed {
            ticket,
            succession,
            session_key,
        } => Done::Succeeded {
            ticket,
            outcome: registrar::succeed(s, &succession, &session_key),
        },
        Job::Census { list } => Done::Census {
            count: s.node_count(),
            nodes: match list {
                0 => vec![],
                n => s.nodes(n).unwrap_or_else(|e| {
                    warn!("storage: {e}");
                    vec![]
                }),
            },
        },
        Job::Present { id, instance } => {
            if let Err(e) = s.attach(&id, instance) {
                warn!("storage: {e}");
            }
            return None;
        }
        Job::Notify { payload } => {
            if let Err(e) = s.notify(&payload) {
                warn!("storage: cannot tell the other instances: {e}");
            }
            return None;
        }
        Job::Approvals { pairs, locate } => Done::Approvals {
            located: locate.and_then(|n| match s.attached(&n) {
                Ok(at) => Some((n, at)),
                Err(e) => {
                    warn!("storage: {e}");
                    None
                }
            }),
            approvals: pairs
                .into_iter()
                .filter_map(|(from, to)| match s.approves(&from, &to) {
                    Ok(a) => Some(((from, to), a)),
                    Err(e) => {
                        warn!("storage: {e}");
                        None
                    }
                })
                .collect(),
        },
    })
}

/// The storage queue is full: nothing was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the storage queue is full")]
pub struct Full;

/// The socket loop's handle on the storage thread.
#[derive(Clone)]
pub struct Store {
    jobs: SyncSender<Job>,
}

impl Store {
    /// Starts the storage thread with a queue of `depth` jobs. Finished jobs
    /// arrive on the returned receiver. The thread ends, after finishing the
    /// jobs already queued, once every `Store` handle is dropped.
    pub fn spawn<S: Storage + 'static>(
        storage: S,
        network: Ipv4Net,
        depth: usize,
    ) -> std::io::Result<(Store, tokio::sync::mpsc::Receiver<Done>, JoinHandle<()>)> {
        Self::spawn_timed(storage, network, depth, Arc::new(Stats::default()))
    }

    /// [`Store::spawn`], recording each job's duration in `stats.storage`.
    pub fn spawn_timed<S: Storage + 'static>(
        storage: S,
        network: Ipv4Net,
        depth: usize,
        stats: Arc<Stats>,
    ) -> std::io::Result<(Store, tokio::sync::mpsc::Receiver<Done>, JoinHandle<()>)> {
        Self::spawn_joining(storage, network, depth, stats, Joining::default())
    }

    /// [`Store::spawn_timed`], admitting new identities under `joining`.
    pub fn spawn_joining<S: Storage + 'static>(
        mut storage: S,
        network: Ipv4Net,
        depth: usize,
        stats: Arc<Stats>,
        mut joining: Joining,
    ) -> std::io::Result<(Store, tokio::sync::mpsc::Receiver<Done>, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(depth);
        // Done jobs are bounded too: if the socket loop fell behind, the
        // storage thread waits for it rather than piling up answers.
        let (done_tx, done_rx) = tokio::sync::mpsc::channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("registry-storage".into())
            .spawn(move || {
                crate::priority::background("storage");
                while let Ok(job) = queue.recv() {
                    let (kind, started) = (job.kind(), Instant::now());
                    let done = run_with(&mut storage, network, &mut joining, job);
                    stats.storage.observe(kind, started.elapsed());
                    if let Some(done) = done {
                        if done_tx.blocking_send(done).is_err() {
                            // The socket loop is gone (shutting down): finish
                            // the queued writes, answer nobody.
                            continue;
                        }
                    }
                }
            })?;
        Ok((Store { jobs }, done_rx, thread))
    }

    /// Queues a job, or refuses it at once when the queue is full (or the
    /// thread is gone): the caller answers "busy".
    pub fn submit(&self, job: Job) -> Result<(), Full> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) | TrySendError::Disconnected(_) => Full,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::{CertRow, RevocationRow, SqliteStorage};
    use pilot_proto::cert::{OwnerPublic, Tag};
    use pilot_proto::identity::Identity;
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// A storage whose writes wait until the test opens the gate: a stuck
    /// disk, injected by a wrapper around the real backend.
    pub(crate) struct Gated<S> {
        pub inner: S,
        pub gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl<S> Gated<S> {
        fn wait(&self) {
            let (open, cv) = &*self.gate;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
        }
    }

    pub(crate) fn open_gate(gate: &Arc<(Mutex<bool>, Condvar)>) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// Writes block again from now on.
    pub(crate) fn close_gate(gate: &Arc<(Mutex<bool>, Condvar)>) {
        *gate.0.lock().unwrap() = false;
    }

    impl<S: Storage> Storage for Gated<S> {
        fn node(&self, id: &NodeId) -> Result<Option<NodeRow>, StorageError> {
            self.inner.node(id)
        }
        fn node_by_address(&self, a: Ipv4Addr) -> Result<Option<NodeRow>, StorageError> {
            self.inner.node_by_address(a)
        }
        fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>, StorageError> {
            self.inner.node_by_name(name)
        }
        fn address_taken(&self, a: Ipv4Addr) -> Result<bool, StorageError> {
            self.inner.address_taken(a)
        }
        fn insert_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
            self.wait();
            self.inner.insert_node(row)
        }
        fn update_node(&mut self, row: &NodeRow) -> Result<(), StorageError> {
            self.wait();
            self.inner.update_node(row)
        }
        fn set_endpoints(&mut self, id: &NodeId, e: &[SocketAddr]) -> Result<(), StorageError> {
            self.wait();
            self.inner.set_endpoints(id, e)
        }
        fn statement_seq(&self, f: &NodeId, t: &NodeId) -> Result<Option<u64>, StorageError> {
            self.inner.statement_seq(f, t)
        }
        fn nodes(&self, limit: usize) -> Result<Vec<NodeRow>, StorageError> {
            self.inner.nodes(limit)
        }
        fn statement(
            &self,
            f: &NodeId,
            t: &NodeId,
        ) -> Result<Option<Signed<Statement>>, StorageError> {
            self.inner.statement(f, t)
        }
        fn put_statement(&mut self, st: &Signed<Statement>) -> Result<u64, StorageError> {
            self.wait();
            self.inner.put_statement(st)
        }
        fn approves(&self, f: &NodeId, t: &NodeId) -> Result<bool, StorageError> {
            self.inner.approves(f, t)
        }
        fn inbox(&self, to: &NodeId) -> Result<Vec<(u64, Signed<Statement>)>, StorageError> {
            self.inner.inbox(to)
        }
        fn ack(&mut self, to: &NodeId, push: u64) -> Result<(), StorageError> {
            self.wait();
            self.inner.ack(to, push)
        }
        fn put_token(&mut self, t: &crate::storage::TokenRow) -> Result<(), StorageError> {
            self.wait();
            self.inner.put_token(t)
        }
        fn tokens(&self) -> Result<Vec<crate::storage::TokenRow>, StorageError> {
            self.inner.tokens()
        }
        fn use_token(
            &mut self,
            hash: &[u8; 32],
            now: u64,
        ) -> Result<crate::storage::TokenUse, StorageError> {
            self.wait();
            self.inner.use_token(hash, now)
        }
        fn revoke_token(&mut self, id: &str) -> Result<bool, StorageError> {
            self.wait();
            self.inner.revoke_token(id)
        }
        fn remove_node(&mut self, id: &NodeId, now: u64) -> Result<bool, StorageError> {
            self.wait();
            self.inner.remove_node(id, now)
        }
        fn node_count(&self) -> Result<u64, StorageError> {
            self.inner.node_count()
        }
        fn put_cert(&mut self, c: &CertRow) -> Result<bool, StorageError> {
            self.wait();
            self.inner.put_cert(c)
        }
        fn find_certs(
            &self,
            o: &OwnerPublic,
            t: &Tag,
            a: Option<&NodeId>,
            now: u64,
            limit: usize,
        ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
            self.inner.find_certs(o, t, a, now, limit)
        }
        fn put_revocation(&mut self, r: &RevocationRow) -> Result<bool, StorageError> {
            self.wait();
            self.inner.put_revocation(r)
        }
        fn revoked(&self, o: &OwnerPublic, n: &NodeId) -> Result<bool, StorageError> {
            self.inner.revoked(o, n)
        }
        fn revocation_counts(&self, o: &OwnerPublic) -> Result<(u64, u64), StorageError> {
            self.inner.revocation_counts(o)
        }
        fn find_revocations(
            &self,
            o: &OwnerPublic,
            a: Option<&NodeId>,
            limit: usize,
        ) -> Result<Vec<(NodeId, Vec<u8>)>, StorageError> {
            self.inner.find_revocations(o, a, limit)
        }
    }

    pub(crate) fn gated() -> (Gated<SqliteStorage>, Arc<(Mutex<bool>, Condvar)>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        (
            Gated {
                inner: SqliteStorage::in_memory().unwrap(),
                gate: gate.clone(),
            },
            gate,
        )
    }

    fn register_job(n: u8, req: u32) -> Job {
        let i = Identity::from_bytes(&[n; 64]);
        Job::Register {
            ticket: Ticket { index: 1, req },
            reg: Signed::sign(
                Registration {
                    identity: i.public(),
                    hostname: None,
                    seq: 1,
                    local_endpoints: vec![],
                    nat: NatType::None,
                },
                &i,
            ),
            observed: "203.0.113.5:1".parse().unwrap(),
            token: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_nothing_is_answered_before_commit() {
        let (storage, gate) = gated();
        let (store, mut done, thread) =
            Store::spawn(storage, "10.77.0.0/16".parse().unwrap(), 2).unwrap();
        // The thread takes the first job and blocks in its write; two more
        // fill the queue; the fourth is refused.
        store.submit(register_job(1, 1)).unwrap();
        let mut queued = 1;
        for n in 2..10 {
            if store.submit(register_job(n, u32::from(n))) == Err(Full) {
                break;
            }
            queued += 1;
            // Let the thread pick up the first job before filling the queue.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(queued, 3, "one in the thread, two in the queue, then full");
        // Nothing comes back while the write is stuck.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), done.recv())
                .await
                .is_err(),
            "answered before the commit"
        );
        open_gate(&gate);
        for req in 1..=3 {
            let Some(Done::Registered {
                ticket, outcome, ..
            }) = done.recv().await
            else {
                panic!("expected a registration")
            };
            assert_eq!(ticket.req, req, "answers in queue order");
            assert!(matches!(outcome, Ok(RegisterOutcome::Ok { .. })));
        }
        drop(store);
        thread.join().unwrap();
    }

    #[test]
    fn jobs_run_to_their_answers() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let net: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let (a, b) = (
            Identity::from_bytes(&[1; 64]),
            Identity::from_bytes(&[2; 64]),
        );
        for (i, who) in [&a, &b].into_iter().enumerate() {
            let Some(Done::Registered { outcome, .. }) =
                run(&mut s, net, register_job(i as u8 + 1, 1))
            else {
                panic!()
            };
            assert!(
                matches!(outcome, Ok(RegisterOutcome::Ok { .. })),
                "{}",
                who.node_id()
            );
        }
        // a approves b; b looks a up and learns a's endpoints are shareable.
        let st = Signed::sign(
            Statement {
                kind: pilot_proto::messages::StatementKind::Approve,
                from: a.public(),
                to: b.node_id(),
                seq: 1,
            },
            &a,
        );
        let ticket = Ticket { index: 7, req: 9 };
        let Some(Done::Stated {
            outcome,
            mail,
            approves,
            ..
        }) = run(
            &mut s,
            net,
            Job::Statement {
                ticket,
                statement: st,
            },
        )
        else {
            panic!()
        };
        assert!(matches!(outcome, Ok(StatementOutcome::Stored(_))));
        assert!(approves);
        assert_eq!(mail.len(), 1, "the recipient's mail comes with the answer");
        let Some(Done::Looked { found, .. }) = run(
            &mut s,
            net,
            Job::Lookup {
                ticket,
                peer: PeerRef::Id(a.node_id()),
                me: b.node_id(),
            },
        ) else {
            panic!()
        };
        let found = found.unwrap().unwrap();
        assert!(found.approves_me);
        assert_eq!(found.my_endpoints, vec!["203.0.113.5:1".parse().unwrap()]);
        let Some(Done::Approvals { approvals, .. }) = run(
            &mut s,
            net,
            Job::Approvals {
                pairs: vec![(a.node_id(), b.node_id()), (b.node_id(), a.node_id())],
                locate: None,
            },
        ) else {
            panic!()
        };
        assert_eq!(
            approvals,
            vec![
                ((a.node_id(), b.node_id()), true),
                ((b.node_id(), a.node_id()), false)
            ]
        );
        assert!(run(
            &mut s,
            net,
            Job::Ack {
                to: b.node_id(),
                push: 1
            }
        )
        .is_none());
    }
}
