//! The rendezvous handlers: what the registry answers to each control
//! message (register, look up, hand over a trust statement, acknowledge,
//! ping, publish and find owner certificates and revocations). Handlers
//! return [`Reply`]s and queue storage [`Job`]s; they never
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

use crate::cluster::{Cluster, Event};
use crate::fleet::{CertOutcome, Page, RevocationOutcome};
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
    /// Now, as Unix seconds (certificate expiry).
    pub unix: u64,
    /// This instance, when several share the database.
    pub cluster: Option<&'a Cluster>,
}

impl Cx<'_> {
    /// Tells the other instances `event` (through the storage thread,
    /// after what it queued before: a mail event follows its commit). No
    /// other instances: nothing.
    pub fn tell(&self, event: Event) {
        let Some(payload) = self.cluster.and_then(|c| c.payload(&event)) else {
            return;
        };
        if self.store.submit(Job::Notify { payload }).is_err() {
            bump(&self.stats.dropped_busy);
        }
    }
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

/// The answer carrying a page read from storage.
fn page_answer(
    req: u32,
    page: Result<Page, crate::storage::StorageError>,
    wrap: impl FnOnce(u32, Vec<Vec<u8>>, bool) -> FromRegistry,
) -> FromRegistry {
    match page {
        Ok(Page { items, more }) => wrap(req, items, more),
        Err(e) => {
            warn!("storage: {e}");
            error(req, ErrorCode::Internal, "registry storage failed")
        }
    }
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
        let (msg, token) = match msg {
            ToRegistry::RegisterWithToken { req, reg, token } => {
                (ToRegistry::Register { req, reg }, Some(token))
            }
            msg => (msg, None),
        };
        match (msg, node) {
            (ToRegistry::RegisterWithToken { req, .. }, _) => one(
                index,
                error(req, ErrorCode::Invalid, "registration not understood"),
            ),
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
                    token,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::Succeed { req, succession }, _) => {
                // Checked on the storage thread (signatures are not checked
                // on this loop).
                let ticket = Ticket { index, req };
                let job = Job::Succeed {
                    ticket,
                    succession,
                    session_key: conn.static_public,
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
            (ToRegistry::Lookup { req, .. }, None)
            | (ToRegistry::Statement { req, .. }, None)
            | (ToRegistry::PublishCert { req, .. }, None)
            | (ToRegistry::FindCerts { req, .. }, None)
            | (ToRegistry::PublishRevocation { req, .. }, None)
            | (ToRegistry::FindRevocations { req, .. }, None) => one(
                index,
                error(req, ErrorCode::NotRegistered, "register first"),
            ),
            (ToRegistry::Ack { .. }, None) => vec![],
            // Answered on opening (`Sessions::open`); never gets here.
            (ToRegistry::PathConfirm { .. }, _) => vec![],
            // Everything about certificates and revocations is checked on
            // the storage thread (signatures are not checked on this loop).
            (ToRegistry::PublishCert { req, cert }, Some(me)) => {
                let ticket = Ticket { index, req };
                let job = Job::PublishCert {
                    ticket,
                    me,
                    cert,
                    now: cx.unix,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (
                ToRegistry::FindCerts {
                    req,
                    owner,
                    tag,
                    after,
                },
                Some(_),
            ) => {
                let ticket = Ticket { index, req };
                let job = Job::FindCerts {
                    ticket,
                    owner,
                    tag,
                    after,
                    now: cx.unix,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::PublishRevocation { req, revocation }, Some(me)) => {
                let ticket = Ticket { index, req };
                let job = Job::PublishRevocation {
                    ticket,
                    from: me,
                    revocation,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
            (ToRegistry::FindRevocations { req, owner, after }, Some(_)) => {
                let ticket = Ticket { index, req };
                let job = Job::FindRevocations {
                    ticket,
                    owner,
                    after,
                };
                submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats)
            }
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
            Done::Succeeded { ticket, outcome } => {
                self.pending.remove(&ticket);
                let msg = match outcome {
                    Ok(crate::registrar::SucceedOutcome::Moved { old, node }) => {
                        info!(%old, new = %node.identity.node_id(), address = %node.address, "identity rotated");
                        FromRegistry::Ok { req: ticket.req }
                    }
                    Ok(crate::registrar::SucceedOutcome::Invalid(why)) => {
                        bump(&cx.stats.refused);
                        error(ticket.req, ErrorCode::Invalid, &why)
                    }
                    Ok(crate::registrar::SucceedOutcome::NotFound(old)) => error(
                        ticket.req,
                        ErrorCode::NotFound,
                        &format!("{old} is not registered here"),
                    ),
                    Ok(crate::registrar::SucceedOutcome::Refused(why)) => {
                        bump(&cx.stats.refused);
                        warn!("succession refused: {why}");
                        error(ticket.req, ErrorCode::Retired, &why)
                    }
                    Err(e) => {
                        warn!("storage: {e}");
                        error(ticket.req, ErrorCode::Internal, "registry storage failed")
                    }
                };
                one(ticket.index, msg)
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
                        if cx.sessions.online(&to).is_none() {
                            // Perhaps online at another instance.
                            cx.tell(Event::Mail { to });
                        }
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
            Done::CertPublished {
                ticket,
                from,
                outcome,
            } => {
                self.pending.remove(&ticket);
                let req = ticket.req;
                let msg = match outcome {
                    Ok(CertOutcome::Stored { facts, changed }) => {
                        if changed {
                            let tags: Vec<&str> = facts.tags.iter().map(|t| t.as_str()).collect();
                            info!(holder = %from, owner = %facts.owner, tags = %tags.join(","), expires_at = facts.expires_at, "certificate published");
                        }
                        FromRegistry::Ok { req }
                    }
                    Ok(CertOutcome::Refused(r)) => {
                        bump(&cx.stats.refused);
                        debug!(node = %from, reason = r.reason(), "certificate refused");
                        error(req, ErrorCode::Invalid, &r.message())
                    }
                    Err(e) => {
                        warn!("storage: {e}");
                        error(req, ErrorCode::Internal, "registry storage failed")
                    }
                };
                one(ticket.index, msg)
            }
            Done::CertsFound { ticket, page } => {
                self.pending.remove(&ticket);
                let msg = page_answer(ticket.req, page, |req, certs, more| FromRegistry::Certs {
                    req,
                    certs,
                    more,
                });
                one(ticket.index, msg)
            }
            Done::RevocationPublished {
                ticket,
                from,
                outcome,
            } => {
                self.pending.remove(&ticket);
                let req = ticket.req;
                let msg = match outcome {
                    Ok(RevocationOutcome::Kept(facts)) => {
                        info!(owner = %facts.owner, node = %facts.node, by = %from, "owner revocation kept");
                        // Every node online hears of it once, now; the
                        // others ask when they connect.
                        cx.tell(Event::Revoked {
                            revocation: pilot_proto::hex::encode(&facts.bytes),
                        });
                        let mut online: Vec<u32> = cx.sessions.registered().collect();
                        online.sort_unstable();
                        let mut out = one(ticket.index, FromRegistry::Ok { req });
                        out.extend(online.into_iter().map(|to| Reply {
                            to,
                            msg: FromRegistry::Revoked {
                                revocation: facts.bytes.clone(),
                            },
                        }));
                        return out;
                    }
                    Ok(RevocationOutcome::Known(_)) => FromRegistry::Ok { req },
                    Ok(RevocationOutcome::Refused(r)) => {
                        bump(&cx.stats.refused);
                        debug!(node = %from, reason = r.reason(), "revocation refused");
                        error(req, ErrorCode::Invalid, &r.message())
                    }
                    Err(e) => {
                        warn!("storage: {e}");
                        error(req, ErrorCode::Internal, "registry storage failed")
                    }
                };
                one(ticket.index, msg)
            }
            Done::RevocationsFound { ticket, page } => {
                self.pending.remove(&ticket);
                let msg = page_answer(ticket.req, page, |req, revocations, more| {
                    FromRegistry::Revocations {
                        req,
                        revocations,
                        more,
                    }
                });
                one(ticket.index, msg)
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
            Ok(RegisterOutcome::NotAdmitted(why)) => {
                bump(&cx.stats.refused);
                info!(%id, from = %observed, "new node not admitted: {why}");
                error(req, ErrorCode::Invalid, &why)
            }
            Ok(RegisterOutcome::Retired) => {
                bump(&cx.stats.refused);
                error(
                    req,
                    ErrorCode::Retired,
                    "this identity was retired by an identity rotation; its successor holds its address",
                )
            }
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
        if let (true, Some((my_addr, my_nat))) = (approved, mine) {
            let mut eps = vec![my_addr];
            for e in my_endpoints {
                if !eps.contains(&e) && eps.len() < messages::MAX_ENDPOINTS {
                    eps.push(e);
                }
            }
            match theirs {
                Some((their_index, _, _)) => out.push(Reply {
                    to: their_index,
                    msg: FromRegistry::Punch {
                        peer: me,
                        endpoints: eps,
                        nat: my_nat,
                    },
                }),
                // Perhaps online at another instance: it tells the peer.
                None => cx.tell(Event::Punch {
                    to: their_id,
                    from: me,
                    nat: my_nat,
                    endpoints: eps,
                }),
            }
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
    use pilot_proto::cert::{
        parse_tags, Certificate, OwnerKey, Revocation, Tag, DEFAULT_LIFETIME, MAX_TAGS, MAX_TAG_LEN,
    };
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
        /// The wall clock the handlers see (Unix seconds).
        unix: u64,
    }

    /// The Bench's wall clock.
    const NOW: u64 = 1_750_000_000;

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
                unix: NOW,
            }
        }

        fn cx(&mut self) -> (&mut Rendezvous, Cx<'_>) {
            (
                &mut self.role,
                Cx {
                    cluster: None,
                    sessions: &mut self.sessions,
                    relay: &mut self.relay,
                    mailbox: &mut self.mailbox,
                    store: &self.store,
                    stats: &self.stats,
                    now: Instant::now(),
                    unix: self.unix,
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
        let Some(Done::Approvals { approvals, .. }) = b.done.recv().await else {
            panic!("expected the approvals")
        };
        let sent = b
            .relay
            .learned(approvals, None, Instant::now(), &b.sessions, &b.stats);
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

    fn owner(n: u8) -> OwnerKey {
        OwnerKey::from_secret(&[n; 32])
    }

    fn tag(t: &str) -> Tag {
        t.parse().unwrap()
    }

    /// A certificate for `node` issued at `issued` for 30 days.
    fn cert_for(o: &OwnerKey, node: NodeId, tags: &str, issued: u64) -> Vec<u8> {
        Certificate::issue(o, node, parse_tags(tags).unwrap(), issued, DEFAULT_LIFETIME)
            .unwrap()
            .to_bytes()
    }

    /// The one answer to request `req` on session `to`: an error's code
    /// and message.
    fn refused(r: &[Reply], to: u32, req: u32) -> (ErrorCode, String) {
        match r {
            [Reply {
                to: t,
                msg:
                    FromRegistry::Error {
                        req: q,
                        code,
                        message,
                    },
            }] if *t == to && *q == req => (*code, message.clone()),
            _ => panic!("expected one error for {req} on {to}: {r:?}"),
        }
    }

    impl Bench {
        /// Node `n` sends `msg`, which needs storage; its answers.
        async fn stored(&mut self, n: usize, msg: ToRegistry) -> Vec<Reply> {
            assert!(self.send(n, msg).is_empty(), "answered once stored");
            self.finish().await
        }

        async fn find(
            &mut self,
            n: usize,
            req: u32,
            o: &OwnerKey,
            t: &str,
            after: Option<NodeId>,
        ) -> (Vec<Vec<u8>>, bool) {
            let msg = ToRegistry::FindCerts {
                req,
                owner: o.public(),
                tag: tag(t),
                after,
            };
            let r = self.stored(n, msg).await;
            match &r[..] {
                [Reply {
                    msg:
                        FromRegistry::Certs {
                            req: q,
                            certs,
                            more,
                        },
                    ..
                }] if *q == req => (certs.clone(), *more),
                _ => panic!("{r:?}"),
            }
        }
    }

    #[tokio::test]
    async fn certificate_and_revocation_requests_need_a_registered_session() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 16, 1);
        let o = owner(1);
        let me = b.nodes[0].0.node_id();
        let msgs = [
            ToRegistry::PublishCert {
                req: 1,
                cert: cert_for(&o, me, "build", NOW),
            },
            ToRegistry::FindCerts {
                req: 2,
                owner: o.public(),
                tag: tag("build"),
                after: None,
            },
            ToRegistry::PublishRevocation {
                req: 3,
                revocation: Revocation::sign(&o, me, NOW).to_bytes(),
            },
            ToRegistry::FindRevocations {
                req: 4,
                owner: o.public(),
                after: None,
            },
        ];
        for (i, m) in msgs.into_iter().enumerate() {
            let r = b.send(0, m);
            let (code, _) = refused(&r, 1, i as u32 + 1);
            assert_eq!(code, ErrorCode::NotRegistered);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(100), b.done.recv())
                .await
                .is_err(),
            "nothing went to storage"
        );
    }

    #[tokio::test]
    async fn a_node_publishes_only_its_own_live_genuine_certificate() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 16, 2);
        b.registered(0).await;
        b.registered(1).await;
        let o = owner(1);
        let (a_id, b_id) = (b.nodes[0].0.node_id(), b.nodes[1].0.node_id());
        // b hands in a's certificate: refused.
        let a_cert = cert_for(&o, a_id, "build", NOW);
        let r = b
            .stored(
                1,
                ToRegistry::PublishCert {
                    req: 5,
                    cert: a_cert.clone(),
                },
            )
            .await;
        let (code, message) = refused(&r, 2, 5);
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("only its own certificate"), "{message}");
        // A forged one: b's certificate, tags raised after signing.
        let mut forged = Certificate::from_bytes(&cert_for(&o, b_id, "build", NOW)).unwrap();
        forged.body.tags = parse_tags("admin,build").unwrap();
        let r = b
            .stored(
                1,
                ToRegistry::PublishCert {
                    req: 6,
                    cert: forged.to_bytes(),
                },
            )
            .await;
        let (code, message) = refused(&r, 2, 6);
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("signature is invalid"), "{message}");
        // An expired one, and garbage.
        let old = cert_for(&o, b_id, "build", NOW - DEFAULT_LIFETIME);
        let r = b
            .stored(1, ToRegistry::PublishCert { req: 7, cert: old })
            .await;
        let (code, message) = refused(&r, 2, 7);
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("expired"), "{message}");
        let r = b
            .stored(
                1,
                ToRegistry::PublishCert {
                    req: 8,
                    cert: vec![1; 40],
                },
            )
            .await;
        let (code, message) = refused(&r, 2, 8);
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("not a certificate"), "{message}");
        assert_eq!(
            b.stats.refused.load(std::sync::atomic::Ordering::Relaxed),
            4
        );
        // None of those is found.
        assert_eq!(b.find(0, 9, &o, "build", None).await, (vec![], false));
        assert_eq!(b.find(0, 10, &o, "admin", None).await, (vec![], false));

        // a publishes its own: found by owner and tag, not by another tag
        // or owner, and no longer once it expired.
        let r = b
            .stored(
                0,
                ToRegistry::PublishCert {
                    req: 11,
                    cert: a_cert.clone(),
                },
            )
            .await;
        assert_eq!(r, one(1, FromRegistry::Ok { req: 11 }));
        assert_eq!(
            b.find(1, 12, &o, "build", None).await,
            (vec![a_cert.clone()], false)
        );
        assert_eq!(b.find(1, 13, &o, "cache", None).await, (vec![], false));
        assert_eq!(
            b.find(1, 14, &owner(2), "build", None).await,
            (vec![], false)
        );
        assert_eq!(
            b.find(1, 15, &o, "build", Some(a_id)).await,
            (vec![], false)
        );
        b.unix = NOW + DEFAULT_LIFETIME;
        assert_eq!(b.find(1, 16, &o, "build", None).await, (vec![], false));
        b.unix = NOW;
        // Its new certificate replaces it.
        let newer = cert_for(&o, a_id, "cache", NOW + 1);
        let r = b
            .stored(
                0,
                ToRegistry::PublishCert {
                    req: 17,
                    cert: newer.clone(),
                },
            )
            .await;
        assert_eq!(r, one(1, FromRegistry::Ok { req: 17 }));
        assert_eq!(b.find(1, 18, &o, "build", None).await, (vec![], false));
        assert_eq!(b.find(1, 19, &o, "cache", None).await, (vec![newer], false));
    }

    #[tokio::test]
    async fn twenty_large_certificates_come_in_full_pages_that_fit_a_datagram() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 64, 21);
        let o = owner(1);
        let tags = (0..MAX_TAGS)
            .map(|i| format!("{i}{}", "t".repeat(MAX_TAG_LEN - 1)))
            .collect::<Vec<_>>()
            .join(",");
        let first = tags.split(',').next().unwrap().to_string();
        let mut all = vec![];
        for n in 0..21 {
            b.registered(n).await;
            if n == 20 {
                break; // the asker holds none
            }
            let cert = cert_for(&o, b.nodes[n].0.node_id(), &tags, NOW);
            let r = b
                .stored(
                    n,
                    ToRegistry::PublishCert {
                        req: 2,
                        cert: cert.clone(),
                    },
                )
                .await;
            assert_eq!(r, one(n as u32 + 1, FromRegistry::Ok { req: 2 }));
            all.push((b.nodes[n].0.node_id(), cert));
        }
        all.sort();
        let mut got = vec![];
        let mut after = None;
        for page in 0.. {
            assert!(page < 20, "paging ends");
            let (certs, more) = b.find(20, 100 + page, &o, &first, after).await;
            let answer = FromRegistry::Certs {
                req: u32::MAX,
                certs: certs.clone(),
                more,
            };
            let len = messages::encode(&answer)
                .expect("one control message")
                .len();
            assert!(len <= messages::MAX_MESSAGE, "{len}");
            assert!(!certs.is_empty());
            after = Some(
                Certificate::from_bytes(certs.last().unwrap())
                    .unwrap()
                    .body
                    .node,
            );
            got.extend(certs);
            if !more {
                break;
            }
        }
        let want: Vec<Vec<u8>> = all.into_iter().map(|(_, c)| c).collect();
        assert_eq!(got, want, "every holder once, in id order");
    }

    #[tokio::test]
    async fn a_revocation_reaches_every_online_node_once_and_ends_the_listing() {
        let mut b = Bench::new(SqliteStorage::in_memory().unwrap(), 16, 4);
        for n in 0..3 {
            b.registered(n).await;
        }
        // Session 4 never registers: it is nobody's and hears nothing.
        let o = owner(1);
        let a_id = b.nodes[0].0.node_id();
        let c_id = b.nodes[2].0.node_id();
        for n in [0, 2] {
            let cert = cert_for(&o, b.nodes[n].0.node_id(), "build", NOW);
            b.stored(n, ToRegistry::PublishCert { req: 2, cert }).await;
        }
        assert_eq!(b.find(1, 3, &o, "build", None).await.0.len(), 2);
        // A revocation of a, forged by owner 2 under owner 1's name.
        let mut forged = Revocation::sign(&owner(2), a_id, NOW);
        forged.body.owner = o.public();
        let r = b
            .stored(
                1,
                ToRegistry::PublishRevocation {
                    req: 4,
                    revocation: forged.to_bytes(),
                },
            )
            .await;
        let (code, message) = refused(&r, 2, 4);
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("not its owner's"), "{message}");
        assert_eq!(b.find(1, 5, &o, "build", None).await.0.len(), 2);
        // The genuine one, handed in by b (any node may: the owner signed
        // it): b is answered, and every registered node is told.
        let rev = Revocation::sign(&o, a_id, NOW).to_bytes();
        let r = b
            .stored(
                1,
                ToRegistry::PublishRevocation {
                    req: 6,
                    revocation: rev.clone(),
                },
            )
            .await;
        let revoked = FromRegistry::Revoked {
            revocation: rev.clone(),
        };
        let mut want = one(2, FromRegistry::Ok { req: 6 });
        for to in 1..=3 {
            want.push(Reply {
                to,
                msg: revoked.clone(),
            });
        }
        assert_eq!(r, want);
        // Handed in again: acknowledged, told to nobody again.
        let r = b
            .stored(
                2,
                ToRegistry::PublishRevocation {
                    req: 7,
                    revocation: rev.clone(),
                },
            )
            .await;
        assert_eq!(r, one(3, FromRegistry::Ok { req: 7 }));
        // a is no longer listed, and may not publish it again.
        let (certs, _) = b.find(1, 8, &o, "build", None).await;
        assert_eq!(certs, vec![cert_for(&o, c_id, "build", NOW)]);
        let r = b
            .stored(
                0,
                ToRegistry::PublishCert {
                    req: 9,
                    cert: cert_for(&o, a_id, "build", NOW + 9),
                },
            )
            .await;
        let (_, message) = refused(&r, 1, 9);
        assert!(message.contains("revoked"), "{message}");
        // Found by whoever asks for owner 1's revocations.
        let r = b
            .stored(
                1,
                ToRegistry::FindRevocations {
                    req: 10,
                    owner: o.public(),
                    after: None,
                },
            )
            .await;
        assert_eq!(
            r,
            one(
                2,
                FromRegistry::Revocations {
                    req: 10,
                    revocations: vec![rev],
                    more: false
                }
            )
        );
        let r = b
            .stored(
                1,
                ToRegistry::FindRevocations {
                    req: 11,
                    owner: o.public(),
                    after: Some(a_id),
                },
            )
            .await;
        assert_eq!(
            r,
            one(
                2,
                FromRegistry::Revocations {
                    req: 11,
                    revocations: vec![],
                    more: false
                }
            )
        );
    }
}
