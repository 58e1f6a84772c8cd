//! Identity rotation with continuity, both ends of it: this node rotating
//! its own keys, and this node following a peer that rotated.
//!
//! Rotating (`identity rotate`, or `--rotate-identity-every`):
//! 1. [`StateDir::rotate_identity`] makes the new keys and the succession
//!    statement (signed by the old and the new key) and commits them to
//!    disk in steps a crash cannot tear; the daemon then restarts under the
//!    new identity.
//! 2. Before its first registration, the new identity hands the succession
//!    to the registry (`ToRegistry::Succeed`), which moves the address and
//!    hostname to the new id and refuses the old one from then on.
//! 3. Then every peer the old identity approved gets a `Succeed` statement
//!    from the new one (through the outbox, so it survives restarts and
//!    registry outages): the succession as proof, and the same grant.
//!
//! Following (a peer's `Succeed` statement): the succession must verify and
//! name the statement's signer as the new identity; the record of the old
//! id moves to the new one with its address, name, decisions and grants;
//! the sessions of the old key end and the new key is dialled; our own
//! approval goes back to the new id (so the registry discloses endpoints
//! again). The old id is refused from then on. Two successors of one id
//! (a leaked key) end trust in the whole lineage.
//!
//! A certificate follows its node: one issued to an earlier id of the
//! lineage counts for the current id, until it expires, wherever the
//! succession chain is known (here, for our own; at each peer, for the
//! peers it followed).
//!
//! [`StateDir::rotate_identity`]: crate::state::StateDir::rotate_identity

use std::time::{Duration, Instant};

use pilot_proto::identity::NodeId;
use pilot_proto::messages::{Signed, Statement, StatementKind};
use pilot_proto::succession::Succession;
use pilot_proto::trust::{Decision, SuccessionOutcome};
use tracing::{info, warn};

use crate::api::{self, ApiError, ErrorCode};
use crate::context::unix_now;
use crate::controller::Controller;
use crate::state::StateError;
use crate::tun::Tun;
use crate::tunnels::Effects;

/// How long the daemon waits after answering `identity rotate` before it
/// stops to restart, so the answer reaches the CLI first.
const RESTART_DELAY: Duration = Duration::from_millis(300);

impl<T: Tun> Controller<T> {
    /// `identity rotate`: new keys, committed to disk, then a restart
    /// under them. Refused while the previous rotation is not yet known to
    /// the registry (a second one would strand it).
    pub fn rotate_identity(&mut self) -> Result<api::IdentityRotated, ApiError> {
        if self.node_state.unannounced().is_some() {
            return Err(ApiError::new(
                ErrorCode::Failed,
                "the previous rotation has not reached the registry yet: wait until the node is registered (`pilot-tun status`), then rotate again",
            ));
        }
        let old = self.ctx.id;
        let (new, st) = self
            .ctx
            .cfg
            .state
            .rotate_identity(&self.ctx.identity, &mut self.node_state, unix_now())
            .map_err(|e| ApiError::new(ErrorCode::Failed, format!("rotation failed: {e}")))?;
        let peers_told = self
            .trust
            .iter()
            .filter(|(_, r)| r.ours == Decision::Approved)
            .count();
        self.record_audit(
            "identity-rotated",
            serde_json::json!({
                "old": old.to_string(),
                "new": new.node_id().to_string(),
                "rotation": st.body.seq,
                "succession": pilot_proto::hex::encode(&sha256(&st.to_bytes())),
            }),
        );
        info!(%old, new = %new.node_id(), "identity rotated; restarting under the new identity");
        self.ctx
            .restart
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_DELAY).await;
            ctx.stop.notify_one();
        });
        Ok(api::IdentityRotated {
            old_node_id: old.to_string(),
            new_node_id: new.node_id().to_string(),
            rotation: st.body.seq,
            address: self.ctx.address().to_string(),
            peers_told,
        })
    }

    /// The succession to hand the registry before registering, while the
    /// last rotation is not announced.
    pub fn unannounced_succession(&self) -> Option<Vec<u8>> {
        self.node_state.unannounced().map(Succession::to_bytes)
    }

    /// The registry took our last rotation (or refused it for good): queue
    /// a `Succeed` statement for every peer the old identity approved, and
    /// mark the rotation announced (both in one write of `node.json`).
    /// Returns how many were queued.
    pub fn announce_succession(&mut self) -> Result<usize, StateError> {
        let Some(st) = self.node_state.unannounced().cloned() else {
            return Ok(0);
        };
        let now = unix_now();
        let bytes = st.to_bytes();
        let own_cert = self
            .fleet
            .own_cert(&self.ctx.id, &self.node_state.ancestry(), now)
            .map(|c| c.to_bytes());
        let peers: Vec<_> = self
            .trust
            .iter()
            .filter(|(_, r)| r.ours == Decision::Approved)
            .map(|(id, r)| {
                let cert = (!r.by_rules.is_empty()).then(|| own_cert.clone()).flatten();
                (id, r.granted.clone(), cert)
            })
            .collect();
        let count = peers.len();
        for (to, allow, cert) in peers {
            let seq = (self.node_state.seq + 1).max(crate::context::unix_micros());
            self.node_state.seq = seq;
            let statement = Signed::sign(
                Statement {
                    kind: StatementKind::Succeed {
                        succession: bytes.clone(),
                        allow,
                        cert,
                    },
                    from: self.ctx.identity.public(),
                    to,
                    seq,
                },
                &self.ctx.identity,
            );
            self.node_state.outbox.retain(|o| o.body.to != to);
            self.node_state.outbox.push(statement);
        }
        self.node_state.succession_announced = true;
        self.ctx.cfg.state.save_node(&self.node_state)?;
        info!(peers = count, "identity rotation announced; peers are told");
        Ok(count)
    }

    /// A peer's `Succeed` statement, before it is applied as an approval:
    /// follows the succession it carries. `Ok` with the I/O to do when the
    /// statement may then be applied (the record is the signer's now, or
    /// already was); `Err` with the reason when it must not be.
    pub fn follow_succession(
        &mut self,
        statement: &Signed<Statement>,
        bytes: &[u8],
    ) -> Result<Effects, String> {
        if !statement.verify() {
            return Err("statement signature is invalid".into());
        }
        let st = Succession::from_bytes(bytes).map_err(|e| e.to_string())?;
        if st.body.new != statement.body.from {
            return Err("the succession names another identity than the statement's signer".into());
        }
        let ctx = self.ctx.clone();
        match self.trust.succeed(&st, unix_now()) {
            Ok(SuccessionOutcome::Known) => Ok(Effects::default()),
            Ok(SuccessionOutcome::Moved { old, new, trusted }) => {
                self.save_trust_or_warn();
                self.record_audit(
                    "succession",
                    serde_json::json!({
                        "old": old.to_string(),
                        "new": new.to_string(),
                        "rotation": st.body.seq,
                        "trusted": trusted,
                    }),
                );
                info!(%old, %new, "peer rotated its identity; its trust moved to the new id");
                let mut fx = Effects::default();
                if trusted {
                    self.tunnels.remove_peer(&ctx, &old);
                    if let Some(r) = self.trust.get(&new) {
                        self.tunnels.add_peer(&ctx, new, r);
                    }
                    self.refresh_grants(&new, false);
                    fx = self.tunnels.reconnect(&ctx, Some(&new), Instant::now());
                }
                self.approve_successor(new);
                Ok(fx)
            }
            Ok(SuccessionOutcome::Forked { removed }) => {
                for (id, was_trusted) in &removed {
                    if *was_trusted {
                        self.tunnels.remove_peer(&ctx, id);
                    }
                }
                self.save_trust_or_warn();
                let ids: Vec<String> = removed.iter().map(|(id, _)| id.to_string()).collect();
                warn!(old = %st.old_id(), "two successors of one identity (a leaked key): the whole lineage is refused");
                self.record_audit(
                    "succession-fork",
                    serde_json::json!({
                        "old": st.old_id().to_string(),
                        "second": st.new_id().to_string(),
                        "removed": ids,
                    }),
                );
                Err(format!("{} has two successors: both refused", st.old_id()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends our approval of a peer's new identity as we gave it to the old
    /// one (by hand with its grant, or by our rules with our certificate),
    /// through the outbox.
    fn approve_successor(&mut self, new: NodeId) {
        let Some(r) = self.trust.get(&new) else {
            return;
        };
        if r.ours != Decision::Approved {
            return;
        }
        let kind = if r.by_rules.is_empty() {
            StatementKind::approve(r.granted.clone())
        } else {
            let now = unix_now();
            match self
                .fleet
                .own_cert(&self.ctx.id, &self.node_state.ancestry(), now)
            {
                Some(c) => StatementKind::Policy {
                    cert: c.to_bytes(),
                    allow: r.granted.clone(),
                },
                None => return,
            }
        };
        let seq = match self.next_seq() {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot save node state: {e}");
                return;
            }
        };
        let statement = Signed::sign(
            Statement {
                kind,
                from: self.ctx.identity.public(),
                to: new,
                seq,
            },
            &self.ctx.identity,
        );
        if let Err(e) = self.queue_withdrawal(statement) {
            warn!("cannot queue the approval of {new}: {e}");
            return;
        }
        let (ctx, h) = (self.ctx.clone(), self.handle.clone());
        tokio::spawn(async move { crate::controller::flush_outbox(&ctx, &h).await });
    }

    fn save_trust_or_warn(&self) {
        if let Err(e) = self.ctx.cfg.state.save_trust(&self.trust) {
            warn!("cannot save trust store: {e}");
        }
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}
