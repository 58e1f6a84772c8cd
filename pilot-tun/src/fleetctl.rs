//! The control task's fleet work: the `cert`, `policy` and `owner revoke`
//! requests, the sync with the registry (publish this node's certificate,
//! fetch the revocations of the owners the rules name, find the nodes whose
//! certificates the rules admit), and the approvals and withdrawals the
//! rules make on the operator's behalf.
//!
//! The rules act like an operator who follows them to the letter:
//! - a peer whose certificate a rule admits gets a `Policy` statement (our
//!   approval, with the rules' grant and our certificate) — once its own
//!   rules admit our certificate it answers in kind, and both ends trust;
//! - when the rules stop admitting it (a rule removed or expired, its
//!   certificate expired, its owner revoked it) the approval is withdrawn
//!   with a `Revoke`; a changed grant is sent again;
//! - an approval or refusal the operator typed is never overridden, except
//!   that an owner revocation withdraws everything.

use std::sync::Arc;

use pilot_proto::cert::{Certificate, Revocation};
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{FromRegistry, StatementKind, ToRegistry};
use pilot_proto::policy::RuleId;
use pilot_proto::trust::Decision as TrustDecision;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{self, ApiError, ErrorCode};
use crate::context::{unix_now, Context};
use crate::controller::{Controller, Handle};
use crate::fleet::Pending;
use crate::tun::Tun;

/// Pages asked for one owner and tag in one sync, at most.
const MAX_PAGES: usize = 64;

/// What to say to a peer on the rules' behalf.
#[derive(Debug)]
pub enum Act {
    /// Approve (or approve again with another grant).
    Approve(StatementKind),
    /// Withdraw the approval.
    Withdraw,
}

impl<T: Tun> Controller<T> {
    /// Saves `fleet.json`, as an API error.
    fn save_fleet(&self) -> Result<(), ApiError> {
        self.ctx.cfg.state.save_fleet(&self.fleet).map_err(|e| {
            ApiError::new(
                ErrorCode::Failed,
                format!("cannot save fleet.json: {e} (check the disk and the state directory)"),
            )
        })
    }

    /// `cert install`: checks the certificate is this node's and valid now,
    /// keeps it, and publishes it.
    pub fn cert_install(&mut self, text: &str) -> Result<api::CertInfo, ApiError> {
        let invalid = |e: String| ApiError::new(ErrorCode::InvalidRequest, e);
        let cert = Certificate::from_armored(text)
            .map_err(|e| invalid(format!("not a certificate: {e}")))?;
        cert.verify(&cert.body.owner, &self.ctx.id, unix_now())
            .map_err(|e| invalid(format!("this certificate cannot be installed here: {e}")))?;
        let digest = pilot_proto::hex::encode(&cert.digest());
        self.fleet.cert = Some(cert);
        self.save_fleet()?;
        let info = self.cert_info().expect("just installed");
        self.record_audit(
            "cert-installed",
            json!({"owner": info.owner, "tags": info.tags, "expires_at": info.expires_at, "cert": digest}),
        );
        self.fleet_sync_soon();
        Ok(info)
    }

    /// `cert show`.
    pub fn cert_info(&self) -> Option<api::CertInfo> {
        let c = self.fleet.cert.as_ref()?;
        Some(api::CertInfo {
            node_id: c.body.node.to_string(),
            owner: c.body.owner.to_string(),
            tags: c.body.tags.iter().map(|t| t.to_string()).collect(),
            issued_at: c.body.issued_at,
            expires_at: c.body.expires_at,
            valid: self
                .fleet
                .own_cert(&self.ctx.id, &self.node_state.ancestry(), unix_now())
                .is_some(),
        })
    }

    /// `policy list`.
    pub fn policy_list(&self) -> Vec<api::PolicyRule> {
        self.fleet.rules.iter().map(api::PolicyRule::from).collect()
    }

    /// `policy allow`.
    pub fn policy_allow(
        &mut self,
        owner: &str,
        tag: &str,
        ports: Option<pilot_proto::ports::Scope>,
        expires_in_secs: Option<u64>,
    ) -> Result<api::PolicyRule, ApiError> {
        let invalid = |e: String| ApiError::new(ErrorCode::InvalidRequest, e);
        let owner: pilot_proto::cert::OwnerPublic = owner.parse().map_err(|e| {
            invalid(format!(
                "{e}: give the owner's public key as `pilot-tun owner new` printed it"
            ))
        })?;
        let tag: pilot_proto::cert::Tag = tag.parse().map_err(|e| invalid(format!("{e}")))?;
        if self.fleet.rules.len() >= crate::fleet::MAX_RULES {
            return Err(invalid(format!(
                "this node already has {} rules: remove some first",
                crate::fleet::MAX_RULES
            )));
        }
        let expires_at = match expires_in_secs {
            Some(0) => return Err(invalid("an expiry must be in the future".into())),
            Some(s) => Some(unix_now().saturating_add(s)),
            None => None,
        };
        let scope = ports.unwrap_or_else(pilot_proto::ports::Scope::all);
        if scope.is_empty() {
            return Err(invalid("a rule that opens nothing admits nobody".into()));
        }
        let id = self.fleet.rules.add(owner, tag, scope, expires_at);
        self.save_fleet()?;
        let rule = api::PolicyRule::from(self.fleet.rules.get(id).expect("just added"));
        self.record_audit(
            "policy-rule-added",
            serde_json::to_value(&rule).unwrap_or_default(),
        );
        self.fleet_sync_soon();
        Ok(rule)
    }

    /// `policy remove`: the rule goes, and so do the approvals that rested
    /// on it alone.
    pub fn policy_remove(&mut self, id: RuleId) -> Result<Vec<api::PolicyRule>, ApiError> {
        let Some(rule) = self.fleet.rules.remove(id) else {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("no rule {id}: `pilot-tun policy list` shows the rules"),
            ));
        };
        self.save_fleet()?;
        self.record_audit(
            "policy-rule-removed",
            serde_json::to_value(api::PolicyRule::from(&rule)).unwrap_or_default(),
        );
        self.fleet_sync_soon();
        Ok(self.policy_list())
    }

    /// A revocation from an owner, verified; kept if a rule names the
    /// owner, and every approval of the revoked node is withdrawn.
    /// Returns whether it was new here and the peers it withdrew.
    pub fn on_revocation(&mut self, r: Revocation) -> (bool, Vec<NodeId>) {
        let node = r.body.node;
        let owner = r.body.owner;
        let bytes = r.to_bytes();
        match self.fleet.add_revocation(r) {
            Ok(true) => {
                // New here: the peers in the same owner's fleet hear it
                // too (gossip), in case the registry cannot tell them.
                let trust = &self.trust;
                let entitled = |id: &NodeId| {
                    *id != node
                        && trust
                            .get(id)
                            .and_then(|r| r.cert.as_deref())
                            .and_then(|c| Certificate::from_bytes(c).ok())
                            .is_some_and(|c| c.body.owner == owner)
                };
                self.gossip.owner_revocation(
                    &self.tunnels,
                    bytes,
                    entitled,
                    std::time::Instant::now(),
                );
                if let Err(e) = self.save_fleet() {
                    warn!("{}", e.error);
                }
                self.record_audit(
                    "owner-revocation",
                    json!({"owner": owner.to_string(), "node": node.to_string()}),
                );
                info!(%node, %owner, "owner revoked a node");
            }
            Ok(false) => {}
            Err(e) => {
                debug!(%node, "revocation not kept: {e}");
                return (false, vec![]);
            }
        }
        let gone: Vec<NodeId> = self
            .trust
            .iter()
            .filter(|(id, r)| {
                self.fleet.is_revoked(id, &self.trust.ancestry(id))
                    && r.ours == TrustDecision::Approved
            })
            .map(|(id, _)| id)
            .collect();
        for id in &gone {
            self.spawn_act(*id, Act::Withdraw);
        }
        (true, gone)
    }

    /// What the rules want said to `peer`, whose certificate is `cert`:
    /// nothing, an approval (new, or with a changed grant), or a
    /// withdrawal. Remembers the certificate and the rules for the record.
    pub fn policy_act(&mut self, peer: NodeId, cert: Option<&[u8]>) -> Option<Act> {
        // One act at a time per peer (the rules' last word is in flight).
        if peer == self.ctx.id || self.pending.by_peer.contains_key(&peer) {
            return None;
        }
        let now = unix_now();
        let rec = self.trust.get(&peer);
        let ours = rec.map_or(TrustDecision::None, |r| r.ours);
        let by_rules = rec.is_some_and(|r| !r.by_rules.is_empty());
        let cert = cert
            .map(<[u8]>::to_vec)
            .or_else(|| rec.and_then(|r| r.cert.clone()));
        let ancestry = self.trust.ancestry(&peer);
        if self.fleet.is_revoked(&peer, &ancestry) {
            return (ours == TrustDecision::Approved).then_some(Act::Withdraw);
        }
        // An operator's own decision stands.
        if !by_rules && ours != TrustDecision::None {
            return None;
        }
        let admitted = cert
            .as_deref()
            .map(|c| self.fleet.admit(c, &peer, &ancestry, now));
        match admitted {
            Some(Ok(adm)) => {
                let own = self
                    .fleet
                    .own_cert(&self.ctx.id, &self.node_state.ancestry(), now)?
                    .to_bytes();
                let same = rec.is_some_and(|r| {
                    r.ours == TrustDecision::Approved && r.granted == adm.grant && by_rules
                });
                if same {
                    return None;
                }
                self.pending
                    .by_peer
                    .insert(peer, Pending::Approve(cert.unwrap_or_default(), adm.rules));
                Some(Act::Approve(StatementKind::Policy {
                    cert: own,
                    allow: adm.grant,
                }))
            }
            _ if by_rules && ours == TrustDecision::Approved => Some(Act::Withdraw),
            _ => None,
        }
        .inspect(|act| {
            if matches!(act, Act::Withdraw) {
                self.pending.by_peer.insert(peer, Pending::Withdraw);
            }
        })
    }

    /// After recording our statement about `peer`: which rules made it, and
    /// the certificate they admitted (cleared for a typed approval).
    pub fn note_policy_record(&mut self, peer: &NodeId, kind: &StatementKind) {
        let pending = self.pending.by_peer.remove(peer);
        match (kind, pending) {
            (StatementKind::Policy { .. }, Some(Pending::Approve(cert, rules))) => {
                self.trust.set_policy(peer, Some(cert), rules);
            }
            // The rules withdrew: they may approve again later.
            (StatementKind::Revoke, Some(Pending::Withdraw)) => {}
            // Only the rules make these.
            (StatementKind::Policy { .. }, _) => {}
            // Typed by the operator: the rules leave this peer alone.
            _ => self.trust.set_policy(peer, None, Vec::new()),
        }
    }

    /// Checks every peer the rules approved (rules expire, certificates
    /// expire): withdraws or re-grants as needed.
    pub fn reevaluate_policy_peers(&mut self) {
        let ids: Vec<NodeId> = self
            .trust
            .iter()
            .filter(|(id, r)| {
                !r.by_rules.is_empty() || self.fleet.is_revoked(id, &self.trust.ancestry(id))
            })
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            if let Some(act) = self.policy_act(id, None) {
                self.spawn_act(id, act);
            }
        }
    }

    /// Says `act` to `peer` in a task of its own (it goes through the
    /// registry).
    pub fn spawn_act(&self, peer: NodeId, act: Act) {
        let (ctx, h) = (self.ctx.clone(), self.handle.clone());
        tokio::spawn(async move {
            let kind = match act {
                Act::Approve(k) => k,
                Act::Withdraw => StatementKind::Revoke,
            };
            let name = kind.name();
            match crate::controller::trust_statement(&ctx, &h, &peer.to_string(), kind).await {
                Ok(_) => info!(%peer, statement = name, "policy rules acted"),
                Err(e) => {
                    warn!(%peer, statement = name, "policy statement not made: {}", e.error);
                    // The next sync tries again.
                    let _ = h.with(move |c| c.pending.by_peer.remove(&peer)).await;
                }
            }
        });
    }

    /// Starts a sync with the registry now.
    pub fn fleet_sync_soon(&self) {
        let (ctx, h) = (self.ctx.clone(), self.handle.clone());
        tokio::spawn(async move { fleet_sync(ctx, h).await });
    }
}

/// Publishes our certificate, fetches the revocations of the owners our
/// rules name, and finds the nodes whose certificates our rules admit.
pub async fn fleet_sync<T: Tun>(ctx: Arc<Context<T>>, h: Handle<T>) {
    let now = unix_now();
    let Ok((own, owners, wanted)) = h
        .with(move |c| {
            // Only a certificate issued to this very id is published: the
            // registry checks it against the node that publishes it, and an
            // inherited one (after an identity rotation) is for the peers
            // that followed the rotation, which have it already.
            let own = c.fleet.own_cert(&c.ctx.id, &[], now).map(|c| c.to_bytes());
            (own, c.fleet.owners(), c.fleet.wanted(now))
        })
        .await
    else {
        return;
    };
    let udp = &ctx.shared.udp;
    if let Some(cert) = own.clone() {
        match ctx
            .link
            .call(udp, |req| ToRegistry::PublishCert {
                req,
                cert: cert.clone(),
            })
            .await
        {
            Ok(FromRegistry::Ok { .. }) => debug!("certificate published"),
            Ok(FromRegistry::Error { message, .. }) => {
                warn!(
                    "the registry did not take this node's certificate: {}",
                    crate::sanitize::printable(&message)
                )
            }
            Ok(_) => {}
            Err(e) => debug!("certificate not published: {e}"),
        }
    }
    for owner in owners {
        let mut after = None;
        for _ in 0..MAX_PAGES {
            let answer = ctx
                .link
                .call(udp, |req| ToRegistry::FindRevocations { req, owner, after })
                .await;
            let Ok(FromRegistry::Revocations {
                revocations, more, ..
            }) = answer
            else {
                break;
            };
            let list: Vec<Revocation> = revocations
                .iter()
                .filter_map(|b| Revocation::from_bytes(b).ok())
                .collect();
            after = list.last().map(|r| r.body.node);
            let _ = h
                .with(move |c| {
                    for r in list {
                        c.on_revocation(r);
                    }
                })
                .await;
            if !more || after.is_none() {
                break;
            }
        }
    }
    let _ = h.with(|c| c.reevaluate_policy_peers()).await;
    if own.is_none() {
        // Without a certificate no peer's rules admit us: approving first
        // would only leave requests waiting.
        return;
    }
    for (owner, tag) in wanted {
        let mut after = None;
        for _ in 0..MAX_PAGES {
            let t = tag.clone();
            let answer = ctx
                .link
                .call(udp, |req| ToRegistry::FindCerts {
                    req,
                    owner,
                    tag: t.clone(),
                    after,
                })
                .await;
            let Ok(FromRegistry::Certs { certs, more, .. }) = answer else {
                break;
            };
            after = certs
                .last()
                .and_then(|b| Certificate::from_bytes(b).ok())
                .map(|c| c.body.node);
            for bytes in certs {
                let Ok(c) = Certificate::from_bytes(&bytes) else {
                    continue;
                };
                let holder = c.body.node;
                let act = h
                    .with(move |c| c.policy_act(holder, Some(&bytes)))
                    .await
                    .ok()
                    .flatten();
                if let Some(act) = act {
                    let _ = h.with(move |c| c.spawn_act(holder, act)).await;
                }
            }
            if !more || after.is_none() {
                break;
            }
        }
    }
}

/// A rule as the API shows it.
impl From<&pilot_proto::policy::Rule> for api::PolicyRule {
    fn from(r: &pilot_proto::policy::Rule) -> Self {
        api::PolicyRule {
            id: r.id,
            owner: r.owner.to_string(),
            tag: r.tag.to_string(),
            ports: r.scope.clone(),
            expires_at: r.expires_at,
        }
    }
}
