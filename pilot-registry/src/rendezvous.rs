//! The rendezvous handlers: what the registry answers to each control
//! message (register, look up, hand over a trust statement, acknowledge,
//! ping). Handlers return [`Reply`]s and queue storage [`Job`]s; they never
//! send and never wait. A request that needs storage is answered when its
//! job comes back committed ([`Rendezvous::on_done`]), or at once with
//! "busy" when the storage queue is full.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, ErrorCode, FromRegistry, NatType, PeerInfo, ToRegistry};
use tracing::{debug, info, warn};

use crate::mailbox::Mailbox;
use crate::registrar::{RegisterOutcome, StatementOutcome};
use crate::relay::Relay;
use crate::sessions::{Reply, Sessions};
use crate::stats::{bump, Stats};
use crate::store::{Done, Found, Job, Store, Ticket};

/// The state the handlers share with the other roles, borrowed per call.
pub struct Cx<'a> {
    /// Control sessions.
    pub sessions: &'a mut Sessions,
    /// The relay's approval view (kept current by stored statements).
    pub relay: &'a mut Relay,
    /// Who has mail.
    pub mailbox: &'a mut Mailbox,
    /// The storage thread.
    pub store: &'a Store,
    /// Counters.
    pub stats: &'a Stats,
    /// Now.
    pub now: Instant,
}

/// The registry role's own state.
pub struct Rendezvous {
    network: Ipv4Net,
    relays: Vec<SocketAddr>,
    /// Requests waiting for storage, so a node's resend of the same request
    /// (its answer is late) is not queued twice.
    pending: HashSet<Ticket>,
}

/// An error answer.
pub fn error(req: u32, code: ErrorCode, message: &str) -> FromRegistry {
    FromRegistry::Error {
        req,
        code,
        message: message.to_string(),
    }
}

/// Queues a job that answers a request, or answers "busy" now.
pub fn submit_or_busy(
    store: &Store,
    pending: &mut HashSet<Ticket>,
    ticket: Ticket,
    job: Job,
    stats: &Stats,
) -> Vec<Reply> {
    if pending.contains(&ticket) {
        return vec![];
    }
    match store.submit(job) {
        Ok(()) => {
            pending.insert(ticket);
            vec![]
        }
        Err(_) => {
            bump(&stats.busy);
            vec![Reply {
                to: ticket.index,
                msg: error(
                    ticket.req,
                    ErrorCode::Busy,
                    "the registry is busy; try again in a moment",
                ),
            }]
        }
    }
}

fn one(to: u32, msg: FromRegistry) -> Vec<Reply> {
    vec![Reply { to, msg }]
}

impl Rendezvous {
    /// The handlers of a registry handing out addresses in `network` and
    /// telling nodes about `relays`.
    pub fn new(network: Ipv4Net, relays: Vec<SocketAddr>) -> Self {
        Rendezvous {
            network,
            relays,
            pending: HashSet::new(),
        }
    }

    /// A control message from session `index`, seen from `from`.
    pub fn on_message(
        &mut self,
        index: u32,
        msg: ToRegistry,
        from: SocketAddr,
        cx: &mut Cx<'_>,
    ) -> Vec<Reply> {
        let Some(conn) = cx.sessions.get(index) else {
            return vec![];
        };
        let node = conn.node;
        match (msg, node) {
            (ToRegistry::Register { req, reg }, _) => {
                if conn.static_public != reg.body.identity.static_public {
                    bump(&cx.stats.refused);
                    return one(
                        index,
                        error(
                            req,
                            ErrorCode::Invalid,
                            "registration signature or key binding invalid",
                        ),
                    );
                }
                let ticket = Ticket { index, req };
                let job = Job::Register {
                    ticket,
                    reg,
                    observed: from,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::Ping { req }, _) => one(
                index,
                FromRegistry::Pong {
                    req,
                    observed: from,
                },
            ),
            (ToRegistry::Lookup { req, .. }, None) | (ToRegistry::Statement { req, .. }, None) => {
                one(
                    index,
                    error(req, ErrorCode::NotRegistered, "register first"),
                )
            }
            (ToRegistry::Ack { .. }, None) => vec![],
            (ToRegistry::Lookup { req, peer }, Some(me)) => {
                let ticket = Ticket { index, req };
                let job = Job::Lookup { ticket, peer, me };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::Statement { req, statement }, Some(me)) => {
                if statement.body.from.node_id() != me {
                    bump(&cx.stats.refused);
                    return one(
                        index,
                        error(req, ErrorCode::Invalid, "statement not signed by this node"),
                    );
                }
                // The binding signature signs whatever 32 bytes its node
                // names, so only this session's handshake proves which
                // tunnel key is the node's own: a statement naming another
                // would let its recipient attribute someone else's sessions
                // to this node.
                if statement.body.from.static_public != conn.static_public {
                    bump(&cx.stats.refused);
                    warn!(node = %me, "statement names a tunnel key its session did not prove");
                    return one(
                        index,
                        error(
                            req,
                            ErrorCode::Invalid,
                            "the statement names a tunnel key other than the one this control session proved; sign statements with this node's own key",
                        ),
                    );
                }
                let ticket = Ticket { index, req };
                let job = Job::Statement { ticket, statement };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::Ack { push }, Some(me)) => {
                // Lost when the queue is full: the push comes again and is
                // acknowledged again.
                if cx.store.submit(Job::Ack { to: me, push }).is_err() {
                    bump(&cx.stats.dropped_busy);
                }
                vec![]
            }
        }
    }

    /// A storage job came back, committed: the answers it allows.
    pub fn on_done(&mut self, done: Done, cx: &mut Cx<'_>) -> Vec<Reply> {
        match done {
            Done::Registered {
                ticket,
                id,
                nat,
                observed,
                outcome,
                mail,
            } => {
                self.pending.remove(&ticket);
                self.registered(ticket, id, nat, observed, outcome, mail, cx)
            }
            Done::Looked {
                ticket,
                me,
                found,
                peer,
            } => {
                self.pending.remove(&ticket);
                bump(&cx.stats.lookups);
                let msg = match found {
                    Ok(Some(found)) => return self.looked(ticket, me, found, cx),
                    Ok(None) => error(
                        ticket.req,
                        ErrorCode::NotFound,
                        &format!("no node named {peer}"),
                    ),
                    Err(e) => {
                        warn!("storage: {e}");
                        error(ticket.req, ErrorCode::Internal, "registry storage failed")
                    }
                };
                one(ticket.index, msg)
            }
            Done::Stated {
                ticket,
                from,
                to,
                approves,
                kind,
                outcome,
                mail,
                ..
            } => {
                self.pending.remove(&ticket);
                let req = ticket.req;
                let msg = match outcome {
                    Ok(StatementOutcome::Stored(_)) => {
                        bump(&cx.stats.statements);
                        cx.relay.set(from, to, approves, cx.now);
                        info!(%from, %to, kind, "trust statement");
                        cx.mailbox.note(to);
                        let mut out = cx.mailbox.deliver(&to, mail, cx.sessions);
                        out.push(Reply {
                            to: ticket.index,
                            msg: FromRegistry::Ok { req },
                        });
                        return out;
                    }
                    Ok(StatementOutcome::BadSignature) => {
                        bump(&cx.stats.refused);
                        error(req, ErrorCode::Invalid, "statement not signed by this node")
                    }
                    // Stored and queued by an earlier copy whose answer
                    // the node did not get: the same answer, nothing else.
                    Ok(StatementOutcome::Resent) => {
                        debug!(%from, %to, kind, "trust statement resent");
                        FromRegistry::Ok { req }
                    }
                    Ok(StatementOutcome::KeyMismatch) => {
                        bump(&cx.stats.refused);
                        error(
                            req,
                            ErrorCode::Invalid,
                            "the statement names a tunnel key other than the one this node registered",
                        )
                    }
                    Ok(StatementOutcome::NoSuchNode) => {
                        error(req, ErrorCode::NotFound, "no such node")
                    }
                    Ok(StatementOutcome::Replayed) => {
                        bump(&cx.stats.refused);
                        error(
                            req,
                            ErrorCode::Replayed,
                            "statement sequence number is not newer",
                        )
                    }
                    Err(e) => {
                        warn!("storage: {e}");
                        error(req, ErrorCode::Internal, "registry storage failed")
                    }
                };
                one(ticket.index, msg)
            }
            Done::Mail { to, items } => match items {
                Ok(items) => cx.mailbox.deliver(&to, items, cx.sessions),
                Err(e) => {
                    warn!("storage: {e}");
                    cx.mailbox.failed(&to);
                    vec![]
                }
            },
            Done::Attached { ticket, .. } => {
                // Only a relay-only instance asks for these.
                self.pending.remove(&ticket);
                vec![]
            }
            Done::Approvals { .. } | Done::Census { .. } => vec![],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn registered(
        &mut self,
        ticket: Ticket,
        id: NodeId,
        nat: NatType,
        observed: SocketAddr,
        outcome: Result<RegisterOutcome, crate::storage::StorageError>,
        mail: Vec<(u64, messages::PushItem)>,
        cx: &mut Cx<'_>,
    ) -> Vec<Reply> {
        let req = ticket.req;
        let msg = match outcome {
            Ok(RegisterOutcome::Ok {
                node,
                hostname_refused,
            }) => {
                if cx.sessions.get(ticket.index).is_none() {
                    return vec![]; // the session expired meanwhile
                }
                cx.sessions.attach(ticket.index, id, nat);
                bump(&cx.stats.registrations);
                cx.mailbox.note(id);
                info!(%id, address = %node.address, hostname = ?node.hostname, from = %observed, "registered");
                let mut out = one(
                    ticket.index,
                    FromRegistry::Registered {
                        req,
                        address: node.address,
                        prefix_len: self.network.prefix_len(),
                        hostname: node.hostname,
                        hostname_refused,
                        observed,
                        relays: self.relays.clone(),
                    },
                );
                out.extend(cx.mailbox.deliver(&id, mail, cx.sessions));
                return out;
            }
            Ok(RegisterOutcome::BadSignature) => {
                bump(&cx.stats.refused);
                error(
                    req,
                    ErrorCode::Invalid,
                    "registration signature or key binding invalid",
                )
            }
            Ok(RegisterOutcome::Replayed) => {
                bump(&cx.stats.refused);
                error(
                    req,
                    ErrorCode::Replayed,
                    "registration sequence number is not newer",
                )
            }
            Ok(RegisterOutcome::PoolExhausted) => error(
                req,
                ErrorCode::PoolExhausted,
                "no free address in the overlay network",
            ),
            Err(e) => {
                warn!("storage: {e}");
                error(req, ErrorCode::Internal, "registry storage failed")
            }
        };
        one(ticket.index, msg)
    }

    /// Answers a lookup. When the peer approved the asker and both are
    /// online, the peer is also told to probe the asker now, so both sides
    /// send at the same time (hole punching).
    fn looked(&mut self, ticket: Ticket, me: NodeId, found: Found, cx: &mut Cx<'_>) -> Vec<Reply> {
        let Found {
            row,
            approves_me: approved,
            my_endpoints,
        } = found;
        let their_id = row.identity.node_id();
        cx.relay.set(their_id, me, approved, cx.now);
        // Endpoints are revealed only to nodes the peer approved.
        let mut endpoints = if approved { row.endpoints } else { vec![] };
        let theirs = cx
            .sessions
            .online(&their_id)
            .map(|(i, c)| (i, c.addr, c.nat));
        // The live session's address beats the stored one.
        if let (true, Some((_, addr, _))) = (approved, theirs) {
            endpoints.retain(|e| *e != addr);
            endpoints.insert(0, addr);
            endpoints.truncate(messages::MAX_ENDPOINTS);
        }
        let nat = theirs.map_or(NatType::Unknown, |(_, _, nat)| nat);
        let mut out = one(
            ticket.index,
            FromRegistry::Peer {
                req: ticket.req,
                info: PeerInfo {
                    identity: row.identity,
                    address: row.address,
                    hostname: row.hostname,
                    endpoints,
                    nat,
                },
            },
        );
        let mine = cx.sessions.online(&me).map(|(_, c)| (c.addr, c.nat));
        if let (true, Some((their_index, _, _)), Some((my_addr, my_nat))) = (approved, theirs, mine)
        {
            let mut eps = vec![my_addr];
            for e in my_endpoints {
                if !eps.contains(&e) && eps.len() < messages::MAX_ENDPOINTS {
                    eps.push(e);
                }
            }
            out.push(Reply {
                to: their_index,
                msg: FromRegistry::Punch {
                    peer: me,
                    endpoints: eps,
                    nat: my_nat,
                },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Verdict;
    use crate::sessions::tests::pair;
    use crate::storage::{SqliteStorage, Storage};
    use crate::store::tests::{gated, open_gate};
    use pilot_proto::identity::Identity;
    use pilot_proto::messages::{
        PeerRef, PushItem, Registration, Signed, Statement, StatementKind,
    };
    use pilot_proto::session::Session;
    use pilot_proto::wire::{RelayHeader, MSG_RELAY_TO, RELAY_HEADER_LEN};
    use std::time::Duration;
    use tokio::sync::mpsc::Receiver;

    /// The registry role with real sessions, relay and mailbox, and a
    /// storage thread, driven by hand.
    struct Bench {
        sessions: Sessions,
        relay: Relay,
        mailbox: Mailbox,
        store: Store,
        done: Receiver<Done>,
        stats: Stats,
        role: Rendezvous,
        nodes: Vec<(Identity, Session)>,
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], 4000 + i as u16))
    }

    impl Bench {
        fn new<S: crate::storage::Storage + 'static>(storage: S, depth: usize, nodes: u8) -> Self {
            let (store, done, _thread) =
                Store::spawn(storage, "10.77.0.0/16".parse().unwrap(), depth).unwrap();
            let now = Instant::now();
            let mut sessions = Sessions::default();
            let mut ids = vec![];
            for n in 0..nodes {
                let id = Identity::from_bytes(&[n + 1; 64]);
                let (reg, node) = pair(u32::from(n) + 1, now);
                assert!(sessions.install(reg, id.static_public(), addr(n.into()), now));
                ids.push((id, node));
            }
            Bench {
                sessions,
                relay: Relay::new(1 << 30),
                mailbox: Mailbox::default(),
                store,
                done,
                stats: Stats::default(),
                role: Rendezvous::new("10.77.0.0/16".parse().unwrap(), vec![]),
                nodes: ids,
            }
        }

        fn cx(&mut self) -> (&mut Rendezvous, Cx<'_>) {
            (
                &mut self.role,
                Cx {
                    sessions: &mut self.sessions,
                    relay: &mut self.relay,
                    mailbox: &mut self.mailbox,
                    store: &self.store,
                    stats: &self.stats,
                    now: Instant::now(),
                },
            )
        }

        /// Node `n` (session n + 1) sends `msg`.
        fn send(&mut self, n: usize, msg: ToRegistry) -> Vec<Reply> {
            let (role, mut cx) = self.cx();
            role.on_message(n as u32 + 1, msg, addr(n), &mut cx)
        }

        fn register(&self, n: usize, seq: u64, req: u32) -> ToRegistry {
            let id = &self.nodes[n].0;
            ToRegistry::Register {
                req,
                reg: Signed::sign(
                    Registration {
                        identity: id.public(),
                        hostname: Some(format!("node-{n}")),
                        seq,
                        local_endpoints: vec![],
                        nat: NatType::EndpointIndependent,
                    },
                    id,
                ),
            }
        }

        /// Waits for the next storage answer and hands it to the role.
        async fn finish(&mut self) -> Vec<Reply> {
            let d = tokio::time::timeout(Duration::from_secs(5), self.done.recv())
                .await
                .expect("a storage answer")
                .expect("storage thread alive");
            let (role, mut cx) = self.cx();
            role.on_done(d, &mut cx)
        }

        async fn registered(&mut self, n: usize) {
            let msg = self.register(n, 1, 1);
            assert!(self.send(n, msg).is_empty(), "answered only once stored");
            let r = self.finish().await;
            assert!(matches!(r[0].msg, FromRegistry::Registered { .. }), "{r:?}");
        }
    }

    fn is_busy(r: &[Reply], to: u32, req: u32) -> bool {
        matches!(r, [Reply { to: t, msg: FromRegistry::Error { req: q, code: ErrorCode::Busy, .. } }] if *t == to && *q == req)
    }

    #[tokio::test]
    async fn a_full_storage_queue_answers_busy_and_nothing_before_the_commit() {
        let (storage, gate) = gated();
        let mut b = Bench::new(storage, 1, 3);
        // Node 0's registration: taken by the storage thread, stuck in its write.
        let m = b.register(0, 1, 1);
        assert!(b.send(0, m).is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Node 1's fills the queue (depth 1); its resend is not queued twice.
        let m = b.register(1, 1, 1);
        assert!(b.send(1, m.clone()).is_empty());
        assert!(b.send(1, m).is_empty(), "a resend while pending is ignored");
        // Node 2 is told the registry is busy, at once.
        let m = b.register(2, 1, 7);
        let r = b.send(2, m);
        assert!(is_busy(&r, 3, 7), "{r:?}");
        assert_eq!(b.stats.busy.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A ping needs no storage: answered while storage is stuck.
        let r = b.send(2, ToRegistry::Ping { req: 8 });
        assert!(matches!(r[0].msg, FromRegistry::Pong { req: 8, .. }));
        // Nothing was acknowledged while the write is stuck.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), b.done.recv())
                .await
                .is_err()
        );
        assert!(
            b.sessions.get(1).unwrap().node.is_none(),
            "not registered before the commit"
        );
        open_gate(&gate);
        for n in 0..2 {
            let r = b.finish().await;
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].to, n + 1);
            assert!(
                matches!(r[0].msg, FromRegistry::Registered { req: 1, .. }),
                "{r:?}"
            );
        }
        assert!(b.sessions.get(1).unwrap().node.is_some());
        // Busy meant nothing was stored: node 2 registers with the same seq.
        let m = b.register(2, 1, 9);
        assert!(b.send(2, m).is_empty());
        let r = b.finish().await;
        assert!(
            matches!(r[0].msg, FromRegistry::Registered { req: 9, .. }),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn statements_reach_their_recipient_and_open_the_relay_and_lookups() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 16, 2);
        b.registered(0).await;
        b.registered(1).await;
        let (a_id, b_id) = (b.nodes[0].0.node_id(), b.nodes[1].0.node_id());
        let statement = |from: &Identity, to: NodeId, seq| {
            Signed::sign(
                Statement {
                    kind: StatementKind::Approve,
                    from: from.public(),
                    to,
                    seq,
                },
                from,
            )
        };
        // Before any approval, lookups reveal no endpoints and the relay
        // refuses (after asking storage).
        assert!(b
            .send(
                1,
                ToRegistry::Lookup {
                    req: 2,
                    peer: PeerRef::Id(a_id)
                }
            )
            .is_empty());
        let r = b.finish().await;
        let FromRegistry::Peer { info, .. } = &r[0].msg else {
            panic!("{r:?}")
        };
        assert!(info.endpoints.is_empty());
        assert_eq!(r.len(), 1, "no punch without approval");
        let mut d = vec![0u8; RELAY_HEADER_LEN + 4];
        RelayHeader {
            ty: MSG_RELAY_TO,
            node: b_id,
        }
        .emit(&mut d);
        let v = b.relay.on_datagram(
            &mut d,
            addr(0),
            Instant::now(),
            &b.sessions,
            &b.store,
            &b.stats,
        );
        assert_eq!(v, Verdict::Drop, "b does not approve a yet");

        // A statement signed by someone else than the session's node.
        let forged = statement(&b.nodes[1].0, b_id, 1);
        let r = b.send(
            0,
            ToRegistry::Statement {
                req: 3,
                statement: forged,
            },
        );
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::Invalid,
                ..
            }
        ));

        // a approves b: a is answered Ok, b gets the push at once.
        let st = statement(&b.nodes[0].0, b_id, 1);
        assert!(b
            .send(
                0,
                ToRegistry::Statement {
                    req: 4,
                    statement: st.clone()
                }
            )
            .is_empty());
        let r = b.finish().await;
        assert_eq!(r.len(), 2, "{r:?}");
        let FromRegistry::Push {
            id: push,
            item: PushItem::Statement { statement: got, .. },
        } = &r[0].msg
        else {
            panic!("{r:?}")
        };
        assert_eq!((r[0].to, got), (2, &st));
        assert_eq!((r[1].to, &r[1].msg), (1, &FromRegistry::Ok { req: 4 }));
        // Another statement under the same sequence number is a replay.
        let mut other = st.clone();
        other.body.kind = StatementKind::Revoke;
        let other = Signed::sign(other.body, &b.nodes[0].0);
        assert!(b
            .send(
                0,
                ToRegistry::Statement {
                    req: 5,
                    statement: other
                }
            )
            .is_empty());
        let r = b.finish().await;
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::Replayed,
                ..
            }
        ));
        // The same statement again (a resend whose answer was lost) is
        // acknowledged, and not pushed again (issue 10, finding 10).
        assert!(b
            .send(
                0,
                ToRegistry::Statement {
                    req: 4,
                    statement: st
                }
            )
            .is_empty());
        let r = b.finish().await;
        assert_eq!(
            r,
            vec![Reply {
                to: 1,
                msg: FromRegistry::Ok { req: 4 }
            }]
        );
        // b acknowledges; the mailbox then finds nothing more.
        assert!(b.send(1, ToRegistry::Ack { push: *push }).is_empty());

        // b looks a up: a approved b, so b learns where a is, and a is told
        // to punch towards b.
        assert!(b
            .send(
                1,
                ToRegistry::Lookup {
                    req: 6,
                    peer: PeerRef::Name("node-0".into())
                }
            )
            .is_empty());
        let r = b.finish().await;
        let FromRegistry::Peer { info, .. } = &r[0].msg else {
            panic!("{r:?}")
        };
        assert_eq!(info.endpoints.first(), Some(&addr(0)));
        assert_eq!(info.nat, NatType::EndpointIndependent);
        assert!(
            matches!(&r[1], Reply { to: 1, msg: FromRegistry::Punch { peer, .. } } if *peer == b_id)
        );

        // Relay: one approval is not enough; both are.
        let now = Instant::now();
        let v = b.relay.on_datagram(
            &mut d.clone(),
            addr(0),
            now,
            &b.sessions,
            &b.store,
            &b.stats,
        );
        assert_eq!(
            v,
            Verdict::Held,
            "the relay asks storage whether b approves a"
        );
        let Some(Done::Approvals { approvals }) = b.done.recv().await else {
            panic!("expected the approvals")
        };
        let sent = b
            .relay
            .learned(approvals, Instant::now(), &b.sessions, &b.stats);
        assert!(
            sent.is_empty(),
            "b has not approved a: the held datagram is dropped"
        );
        let st = statement(&b.nodes[1].0, a_id, 1);
        assert!(b
            .send(
                1,
                ToRegistry::Statement {
                    req: 7,
                    statement: st
                }
            )
            .is_empty());
        b.finish().await;
        let v = b.relay.on_datagram(
            &mut d,
            addr(0),
            Instant::now(),
            &b.sessions,
            &b.store,
            &b.stats,
        );
        assert_eq!(v, Verdict::Forward(addr(1)));
        assert_eq!(
            RelayHeader::parse(&d).unwrap(),
            RelayHeader {
                ty: pilot_proto::wire::MSG_RELAY_FROM,
                node: a_id
            }
        );
        // From an address that is not a's control session: refused.
        let mut d2 = vec![0u8; RELAY_HEADER_LEN + 4];
        RelayHeader {
            ty: MSG_RELAY_TO,
            node: b_id,
        }
        .emit(&mut d2);
        let v = b.relay.on_datagram(
            &mut d2,
            addr(9),
            Instant::now(),
            &b.sessions,
            &b.store,
            &b.stats,
        );
        assert_eq!(v, Verdict::Drop);
    }

    #[tokio::test]
    async fn requests_before_registering_and_unknown_peers() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 16, 2);
        let r = b.send(
            0,
            ToRegistry::Lookup {
                req: 1,
                peer: PeerRef::Name("x".into()),
            },
        );
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::NotRegistered,
                ..
            }
        ));
        assert!(b.send(0, ToRegistry::Ack { push: 1 }).is_empty());
        // A registration whose key is not the session's.
        let mut m = b.register(0, 1, 2);
        if let ToRegistry::Register { reg, .. } = &mut m {
            reg.body.identity.static_public = [9; 32];
        }
        let r = b.send(0, m);
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::Invalid,
                ..
            }
        ));
        b.registered(0).await;
        assert!(b
            .send(
                0,
                ToRegistry::Lookup {
                    req: 3,
                    peer: PeerRef::Name("nobody".into())
                }
            )
            .is_empty());
        let r = b.finish().await;
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ));
        // A replayed registration: another one under the same sequence
        // number (the same one again is a resend, answered as the first;
        // issue 10, finding 10).
        let mut m = b.register(0, 1, 4);
        if let ToRegistry::Register { reg, .. } = &mut m {
            reg.body.hostname = Some("another-name".into());
            *reg = Signed::sign(reg.body.clone(), &b.nodes[0].0);
        }
        assert!(b.send(0, m).is_empty());
        let r = b.finish().await;
        assert!(matches!(
            r[0].msg,
            FromRegistry::Error {
                code: ErrorCode::Replayed,
                ..
            }
        ));
        let m = b.register(0, 1, 5);
        assert!(b.send(0, m).is_empty());
        let r = b.finish().await;
        assert!(
            matches!(r[0].msg, FromRegistry::Registered { req: 5, .. }),
            "{r:?}"
        );
    }

    /// Issue 10, finding 2: a node's statement carries its public identity,
    /// and the binding signature signs any 32 bytes, so node M can sign a
    /// statement that names B's tunnel key as its own. The registry takes
    /// only the key M's own control session proved.
    #[tokio::test]
    async fn a_statement_naming_another_nodes_tunnel_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("r.db");
        let mut b = Bench::new(SqliteStorage::open(&db).unwrap(), 16, 3);
        for n in 0..3 {
            b.registered(n).await;
        }
        let a_id = b.nodes[0].0.node_id();
        let m_id = b.nodes[2].0.node_id();
        // M's Ed25519 key with B's X25519 key, bound by M's own signature
        // (as M could make without B's secret).
        let mut forged_bytes = [3u8; 64];
        forged_bytes[32..].copy_from_slice(&[2u8; 32]);
        let forged = Identity::from_bytes(&forged_bytes);
        assert_eq!(forged.node_id(), m_id);
        assert_eq!(forged.static_public(), b.nodes[1].0.static_public());
        let claim = Signed::sign(
            Statement {
                kind: StatementKind::Request {
                    note: "it is me, B".into(),
                },
                from: forged.public(),
                to: a_id,
                seq: 7,
            },
            &forged,
        );
        assert!(claim.verify(), "the signature and binding are valid");
        let r = b.send(
            2,
            ToRegistry::Statement {
                req: 9,
                statement: claim,
            },
        );
        let [Reply {
            to: 3,
            msg:
                FromRegistry::Error {
                    req: 9,
                    code: ErrorCode::Invalid,
                    message,
                },
        }] = &r[..]
        else {
            panic!("expected a refusal at once: {r:?}")
        };
        assert!(message.contains("tunnel key"), "{message}");
        assert_eq!(
            b.stats.refused.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Nothing went to storage, so nothing is stored or delivered.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), b.done.recv())
                .await
                .is_err(),
            "no storage job for a refused statement"
        );
        let s = SqliteStorage::open(&db).unwrap();
        assert_eq!(s.statement_seq(&m_id, &a_id).unwrap(), None);
        assert!(s.inbox(&a_id).unwrap().is_empty());
        assert!(!s.approves(&m_id, &a_id).unwrap());
    }
}
