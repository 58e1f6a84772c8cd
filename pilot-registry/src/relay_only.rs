//! The relay-only role: an instance next to the registry, sharing its key
//! and database, that only relays. It learns which node is behind which
//! session from a signed registration of a node the registry already knows
//! (it never stores one), answers pings, and refuses everything that
//! belongs to the registry.

use std::collections::HashSet;
use std::net::SocketAddr;

use pilot_proto::messages::{ErrorCode, FromRegistry, ToRegistry};
use tracing::{info, warn};

use crate::rendezvous::{error, submit_or_busy, Cx};
use crate::sessions::Reply;
use crate::stats::bump;
use crate::store::{Done, Job, Ticket};

/// The relay-only role's own state.
pub struct RelayOnly {
    prefix_len: u8,
    pending: HashSet<Ticket>,
}

impl RelayOnly {
    /// A relay for an overlay network with this prefix length.
    pub fn new(prefix_len: u8) -> Self {
        RelayOnly {
            prefix_len,
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
        let msg = match msg {
            ToRegistry::Register { req, reg } | ToRegistry::RegisterWithToken { req, reg, .. } => {
                if conn.static_public != reg.body.identity.static_public {
                    bump(&cx.stats.refused);
                    error(
                        req,
                        ErrorCode::Invalid,
                        "registration signature or key binding invalid",
                    )
                } else {
                    let ticket = Ticket { index, req };
                    let job = Job::Attach { ticket, reg };
                    return submit_or_busy(cx.store, &mut self.pending, ticket, job, cx.stats);
                }
            }
            ToRegistry::Ping { req } => FromRegistry::Pong {
                req,
                observed: from,
            },
            ToRegistry::Lookup { req, .. }
            | ToRegistry::Statement { req, .. }
            | ToRegistry::PublishCert { req, .. }
            | ToRegistry::FindCerts { req, .. }
            | ToRegistry::PublishRevocation { req, .. }
            | ToRegistry::FindRevocations { req, .. }
            | ToRegistry::Succeed { req, .. } => error(
                req,
                ErrorCode::Invalid,
                "this instance only relays; ask the registry",
            ),
            ToRegistry::Ack { .. } | ToRegistry::PathConfirm { .. } => return vec![],
        };
        vec![Reply { to: index, msg }]
    }

    /// A storage job came back.
    pub fn on_done(&mut self, done: Done, cx: &mut Cx<'_>) -> Vec<Reply> {
        let Done::Attached {
            ticket,
            id,
            nat,
            row,
        } = done
        else {
            return vec![];
        };
        self.pending.remove(&ticket);
        let req = ticket.req;
        let msg = match row {
            Ok(None) => {
                bump(&cx.stats.refused);
                error(
                    req,
                    ErrorCode::Invalid,
                    "registration signature or key binding invalid",
                )
            }
            Ok(Some(None)) => error(
                req,
                ErrorCode::NotRegistered,
                "unknown node: register with the registry first",
            ),
            Ok(Some(Some(row))) => {
                let Some(conn) = cx.sessions.get(ticket.index) else {
                    return vec![];
                };
                let observed = conn.addr;
                cx.sessions.attach(ticket.index, id, nat);
                info!(%id, from = %observed, "node attached to this relay");
                FromRegistry::Registered {
                    req,
                    address: row.address,
                    prefix_len: self.prefix_len,
                    hostname: row.hostname,
                    hostname_refused: None,
                    observed,
                    relays: vec![],
                }
            }
            Err(e) => {
                warn!("storage: {e}");
                error(req, ErrorCode::Internal, "relay storage failed")
            }
        };
        vec![Reply {
            to: ticket.index,
            msg,
        }]
    }
}
