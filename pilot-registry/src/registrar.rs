//! The registry's record-keeping rules, over any [`Storage`]: what a signed
//! registration or trust statement may change, what a node's pushes are,
//! where a node was last seen. Runs on the storage thread; the address and
//! hostname rules it applies are in [`crate::pool`] and [`crate::names`].

use std::net::SocketAddr;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, PushItem, Registration, Signed, Statement, StatementKind};
use pilot_proto::succession::Succession;
use tracing::debug;

use crate::names::{self, NameDecision};
use crate::operator::token_hash;
use crate::pool;
use crate::storage::{NodeRow, Storage, StorageError, TokenUse};

/// Most pushes sent to a node at once; the rest follow once it acknowledged.
pub const PUSH_BATCH: usize = 16;

/// Most pushes kept for one node ([`over_the_cap`]): a flood of
/// statements to a node that is offline costs the disk this much, not
/// what the senders would like. Beyond it, superseded pushes go first,
/// then the oldest trust requests; a revocation is never dropped.
pub const MAX_INBOX: usize = 256;

/// The result of a registration.
// One per request, moved straight into its answer: boxing the row would
// cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Registered; the hostname may have been refused.
    Ok {
        /// The node as stored.
        node: NodeRow,
        /// Why the requested hostname was not granted.
        hostname_refused: Option<String>,
    },
    /// Not signed by the identity it names, or its key binding is invalid.
    BadSignature,
    /// Sequence number not newer than the stored one (and not an exact
    /// resend of the stored registration, which is answered `Ok` again).
    Replayed,
    /// No free address left.
    PoolExhausted,
    /// The identity was succeeded (identity rotation): refused for good.
    Retired,
    /// A new identity was not admitted ([`Joining`]): no valid join token,
    /// or too many new identities from its source address. Why, for the
    /// node's operator.
    NotAdmitted(String),
}

/// The rules for identities the registry does not know yet (a node it
/// knows registers again without either): a join token, and a rate of new
/// identities per source address.
#[derive(Debug)]
pub struct Joining {
    /// A new identity needs a valid join token (`--require-token`).
    pub require_token: bool,
    /// New identities per source address and minute (a burst of as many;
    /// 0: no limit).
    pub per_minute: u32,
    /// Per source address: new identities it may still register, and when
    /// that was counted (bounded like the handshake limiter's table).
    budget: std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>,
}

/// Source addresses whose budget of new identities is kept at most.
const MAX_SOURCES: usize = 65_536;

impl Joining {
    /// Rules: tokens required or not, `per_minute` new identities per
    /// source (0: no limit).
    pub fn new(require_token: bool, per_minute: u32) -> Self {
        Joining {
            require_token,
            per_minute,
            budget: std::collections::HashMap::new(),
        }
    }

    /// Takes one new identity from `source`'s budget; false if it has none
    /// left. Past [`MAX_SOURCES`] sources the full ones are forgotten; if
    /// none is, a new source is refused until some refill.
    fn allow(&mut self, source: std::net::IpAddr, now: std::time::Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let burst = f64::from(self.per_minute);
        let full = |(t, at): &(f64, std::time::Instant)| {
            t + now.saturating_duration_since(*at).as_secs_f64() * rate >= burst
        };
        if self.budget.len() >= MAX_SOURCES && !self.budget.contains_key(&source) {
            self.budget.retain(|_, b| !full(b));
            if self.budget.len() >= MAX_SOURCES {
                return false;
            }
        }
        let (tokens, at) = self.budget.entry(source).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources whose budget is kept.
    pub fn sources(&self) -> usize {
        self.budget.len()
    }
}

impl Default for Joining {
    /// No token needed, no rate: every new identity is admitted.
    fn default() -> Self {
        Joining::new(false, 0)
    }
}

/// Whether a new identity from `observed` with `token` is admitted: its
/// source's budget first (a refused one costs no token use), then one use
/// of a valid token if tokens are required (counted atomically in storage).
fn admit_new(
    s: &mut dyn Storage,
    joining: &mut Joining,
    token: Option<&[u8; 16]>,
    observed: SocketAddr,
    unix: u64,
) -> Result<Option<String>, StorageError> {
    if !joining.allow(observed.ip(), std::time::Instant::now()) {
        return Ok(Some(format!(
            "too many new nodes from {} (at most {} a minute); try again later",
            observed.ip(),
            joining.per_minute
        )));
    }
    if !joining.require_token {
        return Ok(None);
    }
    let Some(token) = token else {
        return Ok(Some(
            "this registry admits new nodes only with a join token: ask its operator for a join URL that ends in ?token=... (pilot-registry token create)".into(),
        ));
    };
    Ok(match s.use_token(&token_hash(token), unix)? {
        TokenUse::Used => None,
        TokenUse::Unknown => Some("the join token is not one this registry issued".into()),
        TokenUse::Expired => Some("the join token has expired; ask for a new one".into()),
        TokenUse::UsedUp => Some("the join token has been used up; ask for a new one".into()),
        TokenUse::Revoked => Some("the join token was revoked; ask for a new one".into()),
    })
}

/// The result of a succession handed in by a rotated node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SucceedOutcome {
    /// The old id's address and hostname now belong to the new id (also
    /// the answer to an exact resend).
    Moved {
        /// The retired id.
        old: NodeId,
        /// Its successor, as stored.
        node: NodeRow,
    },
    /// Malformed, not signed by both keys, or not for the session's key.
    Invalid(String),
    /// The old id is not registered here.
    NotFound(NodeId),
    /// The old id already has another successor (a leaked key), or the new
    /// id is already registered.
    Refused(String),
}

/// The result of handing over a trust statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementOutcome {
    /// Stored; queued for the recipient under this push id.
    Stored(u64),
    /// Not signed by the node it claims to be from.
    BadSignature,
    /// The recipient is not registered.
    NoSuchNode,
    /// Sequence number not newer than the stored statement's, and not
    /// exactly the stored statement.
    Replayed,
    /// The sender is registered with another tunnel key than the one the
    /// statement names as its own.
    KeyMismatch,
    /// Exactly the statement already stored (a resend whose first answer
    /// was lost): acknowledged, nothing stored or queued again.
    Resent,
}

/// The endpoints stored for a node: the observed one first, then its own
/// local ones, without repeats, at most [`messages::MAX_ENDPOINTS`].
pub fn endpoint_list(observed: SocketAddr, locals: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut all = vec![observed];
    for l in locals {
        if !all.contains(l) && all.len() < messages::MAX_ENDPOINTS {
            all.push(*l);
        }
    }
    all
}

/// Registers (or re-registers) a node seen at `observed`, allocating its
/// permanent address in `network` on first sight. An exact resend of the
/// registration last accepted is answered as it was, changing nothing. A
/// write that collides with another writer's (a shared database) is
/// decided once more on fresh rows.
pub fn register(
    s: &mut dyn Storage,
    reg: &Signed<Registration>,
    network: Ipv4Net,
    observed: SocketAddr,
) -> Result<RegisterOutcome, StorageError> {
    register_new(s, reg, network, observed, None, &mut Joining::default())
}

/// [`register`], admitting an identity not registered yet only under the
/// `joining` rules (with `token`, if it came with one). A known node, or a
/// retired one, is decided as before; its token is not used.
pub fn register_new(
    s: &mut dyn Storage,
    reg: &Signed<Registration>,
    network: Ipv4Net,
    observed: SocketAddr,
    token: Option<&[u8; 16]>,
    joining: &mut Joining,
) -> Result<RegisterOutcome, StorageError> {
    if !reg.verify() {
        return Ok(RegisterOutcome::BadSignature);
    }
    let id = reg.body.identity.node_id();
    if s.node(&id)?.is_none() && s.successor(&id)?.is_none() {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(why) = admit_new(s, joining, token, observed, unix)? {
            return Ok(RegisterOutcome::NotAdmitted(why));
        }
    }
    let digest = digest(reg);
    match register_once(s, &reg.body, digest, network, observed) {
        Err(StorageError::Conflict(_)) => register_once(s, &reg.body, digest, network, observed),
        other => other,
    }
}

/// SHA-256 of a signed message's encoding: what tells an exact resend
/// from another message under the same sequence number. `None` if it does
/// not encode (then nothing is ever taken for a resend of it).
fn digest(reg: &Signed<Registration>) -> Option<[u8; 32]> {
    let bytes = messages::encode(reg).ok()?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    d.as_ref().try_into().ok()
}

fn register_once(
    s: &mut dyn Storage,
    reg: &Registration,
    digest: Option<[u8; 32]>,
    network: Ipv4Net,
    observed: SocketAddr,
) -> Result<RegisterOutcome, StorageError> {
    let id = reg.identity.node_id();
    if s.successor(&id)?.is_some() {
        return Ok(RegisterOutcome::Retired);
    }
    let existing = s.node(&id)?;
    if let Some(row) = existing.as_ref() {
        // The node resends a registration it got no answer to (the answer
        // was lost or late): answer it again as stored, write nothing.
        if reg.seq == row.reg_seq && digest.is_some() && row.reg_digest == digest {
            return resent(s, reg, row.clone());
        }
        if reg.seq <= row.reg_seq {
            return Ok(RegisterOutcome::Replayed);
        }
    }
    let current = existing.as_ref().and_then(|r| r.hostname.clone());
    let decision = names::decide(&id, reg.hostname.as_deref(), current.as_deref(), |n| {
        Ok::<_, StorageError>(s.node_by_name(n)?.map(|r| r.identity.node_id()))
    })?;
    let (hostname, hostname_refused) = match decision {
        NameDecision::Keep => (current, None),
        NameDecision::Grant(name) => (Some(name), None),
        NameDecision::Refuse(why) => (current, Some(why)),
    };
    let mut row = NodeRow {
        identity: reg.identity.clone(),
        address: std::net::Ipv4Addr::UNSPECIFIED,
        hostname,
        endpoints: endpoint_list(observed, &reg.local_endpoints),
        reg_seq: reg.seq,
        reg_digest: digest,
    };
    match existing {
        Some(old) => {
            row.address = old.address;
            s.update_node(&row)?;
        }
        None => match pool::pick(&id, network, |a| s.address_taken(a))? {
            Some(address) => {
                row.address = address;
                s.insert_node(&row)?;
            }
            // Full: the oldest tombstone nobody may still hold a rule for.
            None => {
                let Some((first, last)) = pool::bounds(network) else {
                    return Ok(RegisterOutcome::PoolExhausted);
                };
                let Some(address) = s.reusable_tombstone(first, last)? else {
                    return Ok(RegisterOutcome::PoolExhausted);
                };
                row.address = address;
                if !s.insert_on_tombstone(&row)? {
                    // Another writer took it (or a node named it) meanwhile:
                    // decided once more by the caller.
                    return Err(StorageError::Conflict(format!(
                        "the tombstone at {address} was taken meanwhile"
                    )));
                }
                debug!(%id, %address, "pool full: an old tombstone's address handed out again");
            }
        },
    }
    Ok(RegisterOutcome::Ok {
        node: row,
        hostname_refused,
    })
}

/// The answer to an exact resend of the registration `row` was stored
/// from: the row, and the hostname refusal the first copy got (the name it
/// asked for and did not get; its reason is decided again).
fn resent(
    s: &mut dyn Storage,
    reg: &Registration,
    row: NodeRow,
) -> Result<RegisterOutcome, StorageError> {
    let id = row.identity.node_id();
    let decision = names::decide(&id, reg.hostname.as_deref(), row.hostname.as_deref(), |n| {
        Ok::<_, StorageError>(s.node_by_name(n)?.map(|r| r.identity.node_id()))
    })?;
    let hostname_refused = match decision {
        NameDecision::Keep => None,
        NameDecision::Refuse(why) => Some(why),
        // Free now, but it was not when the first copy was decided (or the
        // node would hold it): the first answer was a refusal.
        NameDecision::Grant(name) => Some(format!(
            "hostname {name:?} was not free when this registration was decided; register again to claim it"
        )),
    };
    Ok(RegisterOutcome::Ok {
        node: row,
        hostname_refused,
    })
}

/// Moves a registered node to its successor: `bytes` must be a succession
/// signed by both keys whose new tunnel key is `session_key` (the key the
/// control session proved). The successor takes the old id's address,
/// hostname and endpoints; the old id is refused from then on. One
/// successor per id: a second, different one (only a leaked old key can
/// sign it) is refused. An exact resend is answered as the first copy.
pub fn succeed(
    s: &mut dyn Storage,
    bytes: &[u8],
    session_key: &[u8; 32],
) -> Result<SucceedOutcome, StorageError> {
    let st = match Succession::from_bytes(bytes) {
        Ok(st) => st,
        Err(e) => return Ok(SucceedOutcome::Invalid(e.to_string())),
    };
    if let Err(e) = st.verify() {
        return Ok(SucceedOutcome::Invalid(e.to_string()));
    }
    if &st.body.new.static_public != session_key {
        return Ok(SucceedOutcome::Invalid(
            "the succession's new tunnel key is not the one this control session proved".into(),
        ));
    }
    let (old, new) = (st.old_id(), st.new_id());
    if let Some((known, stored)) = s.successor(&old)? {
        if known == new && stored == bytes {
            if let Some(node) = s.node(&new)? {
                return Ok(SucceedOutcome::Moved { old, node });
            }
        }
        return Ok(SucceedOutcome::Refused(format!(
            "{old} was already succeeded by {known}"
        )));
    }
    if s.node(&new)?.is_some() || s.successor(&new)?.is_some() {
        return Ok(SucceedOutcome::Refused(format!(
            "{new} is already registered; a successor must be a new identity"
        )));
    }
    let Some(row) = s.node(&old)? else {
        return Ok(SucceedOutcome::NotFound(old));
    };
    let node = NodeRow {
        identity: st.body.new.clone(),
        address: row.address,
        hostname: row.hostname,
        endpoints: row.endpoints,
        reg_seq: 0,
        reg_digest: None,
    };
    s.succeed(&old, &node, bytes)?;
    Ok(SucceedOutcome::Moved { old, node })
}

/// Stores a signed trust statement for delivery: it must be signed by its
/// sender, name a registered recipient, carry the tunnel key its sender
/// registered (if it is registered), and be newer than the last statement
/// of the same pair, or exactly that statement again (a resend, answered
/// [`StatementOutcome::Resent`]).
pub fn store_statement(
    s: &mut dyn Storage,
    st: &Signed<Statement>,
) -> Result<StatementOutcome, StorageError> {
    if !st.verify() {
        return Ok(StatementOutcome::BadSignature);
    }
    if s.node(&st.body.to)?.is_none() {
        return Ok(StatementOutcome::NoSuchNode);
    }
    let from = st.body.from.node_id();
    // Its tunnel key must be the one the sender registered (and proved by
    // its handshake): the binding alone would let it name anyone's key.
    if s.node(&from)?
        .is_some_and(|row| row.identity.static_public != st.body.from.static_public)
    {
        return Ok(StatementOutcome::KeyMismatch);
    }
    match s.statement_seq(&from, &st.body.to)? {
        // The node resends a statement it got no answer to: exactly the
        // stored one is acknowledged again (and not queued twice).
        Some(seq) if st.body.seq == seq => {
            return Ok(if s.statement(&from, &st.body.to)?.as_ref() == Some(st) {
                StatementOutcome::Resent
            } else {
                StatementOutcome::Replayed
            });
        }
        Some(seq) if st.body.seq < seq => return Ok(StatementOutcome::Replayed),
        _ => {}
    }
    let push = s.put_statement(st)?;
    let inbox = s.inbox(&st.body.to)?;
    let drop = over_the_cap(&inbox, MAX_INBOX);
    for id in &drop {
        s.ack(&st.body.to, *id)?;
    }
    if !drop.is_empty() {
        debug!(to = %st.body.to, dropped = drop.len(), "inbox full: superseded pushes and the oldest requests dropped");
    }
    Ok(StatementOutcome::Stored(push))
}

/// Which pushes of an inbox (oldest first) go when more than `keep` wait:
/// first each push a newer one of the same sender supersedes (statements
/// are newest-wins, so the recipient loses nothing), then the oldest
/// trust requests (the asker can ask again), until `keep` remain. A
/// revocation, approval or denial that is its sender's newest is never
/// dropped; there is at most one per sender, so a flood from one node (or
/// a few) cannot grow an inbox past `keep` and many senders can only
/// displace requests.
pub fn over_the_cap(inbox: &[(u64, Signed<Statement>)], keep: usize) -> Vec<u64> {
    if inbox.len() <= keep {
        return vec![];
    }
    let mut newest = std::collections::HashMap::new();
    for (i, (_, st)) in inbox.iter().enumerate() {
        newest.insert(st.body.from.node_id(), i);
    }
    let superseded = |i: usize, st: &Signed<Statement>| newest[&st.body.from.node_id()] != i;
    let mut drop: Vec<u64> = inbox
        .iter()
        .enumerate()
        .filter(|(i, (_, st))| superseded(*i, st))
        .map(|(_, (id, _))| *id)
        .collect();
    let over = (inbox.len() - drop.len()).saturating_sub(keep);
    drop.extend(
        inbox
            .iter()
            .enumerate()
            .filter(|(i, (_, st))| !superseded(*i, st) && is_request(st))
            .map(|(_, (id, _))| *id)
            .take(over),
    );
    drop
}

/// A trust request (plain or scoped): the only kind a full inbox drops.
fn is_request(st: &Signed<Statement>) -> bool {
    matches!(
        st.body.kind,
        StatementKind::Request { .. } | StatementKind::RequestScoped { .. }
    )
}

/// Most nodes one sweep expires ([`expire_unused`]) in one transaction.
pub const EXPIRE_BATCH: usize = 256;

/// Most batches of one sweep: a sweep is bounded; what is left waits for
/// the next one.
pub const EXPIRE_BATCHES: usize = 64;

/// Expires the registrations not seen for `unused` seconds before `now`
/// (Unix time): each one's hostname is free at once and its address a
/// tombstone, except for nodes a trusted peer still names (some node's
/// stored statement approves them). Such an id registers again only as a
/// new node (with a join token under `--require-token`). Runs in batches
/// of [`EXPIRE_BATCH`], at most [`EXPIRE_BATCHES`] of them; returns the
/// expired ids.
pub fn expire_unused(
    s: &mut dyn Storage,
    unused: u64,
    now: u64,
) -> Result<Vec<NodeId>, StorageError> {
    let seen_before = now.saturating_sub(unused);
    let mut all = vec![];
    for _ in 0..EXPIRE_BATCHES {
        let gone = s.expire_unused(seen_before, now, EXPIRE_BATCH)?;
        let last = gone.len() < EXPIRE_BATCH;
        all.extend(gone);
        if last {
            break;
        }
    }
    Ok(all)
}

/// Records that a node now shows up at `observed` (it roamed): the observed
/// endpoint goes first, its local ones stay.
pub fn observed_at(
    s: &mut dyn Storage,
    id: &NodeId,
    observed: SocketAddr,
) -> Result<(), StorageError> {
    let Some(node) = s.node(id)? else {
        return Ok(());
    };
    if node.endpoints.first() == Some(&observed) {
        return Ok(());
    }
    let locals: Vec<SocketAddr> = node.endpoints.iter().skip(1).copied().collect();
    s.set_endpoints(id, &endpoint_list(observed, &locals))
}

/// What waits for `to`: up to [`PUSH_BATCH`] pushes, oldest first, each
/// with the address and hostname the registry knows its sender by. A push
/// whose sender is no longer stored is dropped (nothing sensible to show).
pub fn mail(s: &mut dyn Storage, to: &NodeId) -> Result<Vec<(u64, PushItem)>, StorageError> {
    let mut out = vec![];
    for (id, statement) in s.inbox(to)?.into_iter().take(PUSH_BATCH) {
        let Some(sender) = s.node(&statement.body.from.node_id())? else {
            s.ack(to, id)?;
            continue;
        };
        out.push((
            id,
            PushItem::Statement {
                statement,
                address: sender.address,
                hostname: sender.hostname,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SqliteStorage;
    use pilot_proto::identity::Identity;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    fn reg(i: &Identity, seq: u64, host: Option<&str>) -> Signed<Registration> {
        Signed::sign(
            Registration {
                identity: i.public(),
                hostname: host.map(str::to_string),
                seq,
                local_endpoints: vec!["192.0.2.10:4000".parse().unwrap()],
                nat: Default::default(),
            },
            i,
        )
    }

    fn net() -> Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    fn obs() -> SocketAddr {
        "203.0.113.9:5555".parse().unwrap()
    }

    fn ok(o: RegisterOutcome) -> (NodeRow, Option<String>) {
        match o {
            RegisterOutcome::Ok {
                node,
                hostname_refused,
            } => (node, hostname_refused),
            other => panic!("expected Ok, got {other:?}"),
        }
    }

    fn statement(
        from: &Identity,
        to: &Identity,
        kind: StatementKind,
        seq: u64,
    ) -> Signed<Statement> {
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

    #[test]
    fn addresses_are_permanent_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (a_addr, b_addr);
        {
            let mut s = SqliteStorage::open(&path).unwrap();
            a_addr = ok(register(&mut s, &reg(&id(1), 1, Some("alpha")), net(), obs()).unwrap())
                .0
                .address;
            b_addr = ok(register(&mut s, &reg(&id(2), 1, None), net(), obs()).unwrap())
                .0
                .address;
            assert_ne!(a_addr, b_addr);
            assert!(net().contains(&a_addr));
        }
        // Reopen: same addresses, same hostname.
        let mut s = SqliteStorage::open(&path).unwrap();
        let (n, _) = ok(register(&mut s, &reg(&id(1), 2, None), net(), obs()).unwrap());
        assert_eq!(n.address, a_addr);
        assert_eq!(n.hostname.as_deref(), Some("alpha"));
        assert_eq!(s.node_by_name("alpha").unwrap().unwrap().address, a_addr);
        assert_eq!(
            s.node_by_address(b_addr).unwrap().unwrap().identity,
            id(2).public()
        );
        assert_eq!(n.endpoints, vec![obs(), "192.0.2.10:4000".parse().unwrap()]);
        assert_eq!(
            s.node(&id(1).node_id()).unwrap().unwrap(),
            n,
            "what is returned is what is stored"
        );
    }

    #[test]
    fn replayed_registration_and_taken_hostname() {
        let mut s = SqliteStorage::in_memory().unwrap();
        ok(register(&mut s, &reg(&id(1), 5, Some("alpha")), net(), obs()).unwrap());
        assert_eq!(
            register(&mut s, &reg(&id(1), 5, None), net(), obs()).unwrap(),
            RegisterOutcome::Replayed
        );
        assert_eq!(
            register(&mut s, &reg(&id(1), 4, None), net(), obs()).unwrap(),
            RegisterOutcome::Replayed
        );
        let (n, refused) =
            ok(register(&mut s, &reg(&id(2), 1, Some("alpha")), net(), obs()).unwrap());
        assert_eq!(n.hostname, None);
        assert!(refused.unwrap().contains("taken"));
    }

    #[test]
    fn tiny_pool_exhausts() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let tiny: Ipv4Net = "10.9.0.0/30".parse().unwrap(); // two usable
        ok(register(&mut s, &reg(&id(1), 1, None), tiny, obs()).unwrap());
        ok(register(&mut s, &reg(&id(2), 1, None), tiny, obs()).unwrap());
        assert_eq!(
            register(&mut s, &reg(&id(3), 1, None), tiny, obs()).unwrap(),
            RegisterOutcome::PoolExhausted
        );
        assert_eq!(
            s.node_count().unwrap(),
            2,
            "nothing stored for the refused node"
        );
    }

    #[test]
    fn forged_registration_changes_nothing() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let mut forged = reg(&id(1), 1, Some("alpha"));
        forged.body.hostname = Some("mallory".into());
        assert_eq!(
            register(&mut s, &forged, net(), obs()).unwrap(),
            RegisterOutcome::BadSignature
        );
        // Signed by someone else than the identity it names.
        let mut other = reg(&id(1), 1, None);
        other.sig = reg(&id(2), 1, None).sig;
        assert_eq!(
            register(&mut s, &other, net(), obs()).unwrap(),
            RegisterOutcome::BadSignature
        );
        assert_eq!(s.node_count().unwrap(), 0);
    }

    #[test]
    fn renaming_and_refused_names_keep_the_old_name() {
        let mut s = SqliteStorage::in_memory().unwrap();
        ok(register(&mut s, &reg(&id(1), 1, Some("alpha")), net(), obs()).unwrap());
        let (n, refused) =
            ok(register(&mut s, &reg(&id(1), 2, Some("Bad Name")), net(), obs()).unwrap());
        assert_eq!(n.hostname.as_deref(), Some("alpha"));
        assert!(refused.unwrap().contains("not a valid hostname"));
        let (n, refused) =
            ok(register(&mut s, &reg(&id(1), 3, Some("alpha-2")), net(), obs()).unwrap());
        assert_eq!((n.hostname.as_deref(), refused), (Some("alpha-2"), None));
        // The old name is free again.
        let (n, _) = ok(register(&mut s, &reg(&id(2), 1, Some("alpha")), net(), obs()).unwrap());
        assert_eq!(n.hostname.as_deref(), Some("alpha"));
    }

    /// An identity for each of more than 256 senders.
    fn many(n: u16) -> Identity {
        let mut b = [7u8; 64];
        b[..2].copy_from_slice(&n.to_le_bytes());
        Identity::from_bytes(&b)
    }

    /// A node is offline while a flood comes in: one sender resending
    /// requests, and more senders than the cap each asking once, between
    /// a revocation and an approval that came first. The inbox holds the
    /// cap, the revocation and the approval survive, the one sender
    /// counts once, and the newest requests are the ones kept.
    #[test]
    fn a_flood_to_an_offline_node_is_capped_and_keeps_its_revocation() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let target = id(9);
        register(&mut s, &reg(&target, 1, None), net(), obs()).unwrap();
        let request = |n: u16, seq| StatementKind::Request {
            note: format!("{n}/{seq}"),
        };
        let stored = |s: &mut SqliteStorage, st| {
            assert!(matches!(
                store_statement(s, &st).unwrap(),
                StatementOutcome::Stored(_)
            ))
        };
        let (revoker, approver, loud) = (many(1), many(2), many(3));
        stored(
            &mut s,
            statement(&revoker, &target, StatementKind::Revoke, 1),
        );
        stored(
            &mut s,
            statement(&approver, &target, StatementKind::Approve, 1),
        );
        for seq in 1..=40 {
            stored(&mut s, statement(&loud, &target, request(3, seq), seq));
        }
        let senders = MAX_INBOX as u16 + 100;
        for n in 0..senders {
            let from = many(1000 + n);
            stored(&mut s, statement(&from, &target, request(n, 1), 1));
            assert!(s.inbox(&target.node_id()).unwrap().len() <= MAX_INBOX);
        }
        let inbox = s.inbox(&target.node_id()).unwrap();
        assert_eq!(inbox.len(), MAX_INBOX, "the cap holds");
        let from = |i: &Identity| {
            inbox
                .iter()
                .filter(|(_, st)| st.body.from.node_id() == i.node_id())
                .map(|(_, st)| st.body.kind.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(from(&revoker), [StatementKind::Revoke], "kept");
        assert_eq!(from(&approver), [StatementKind::Approve], "kept");
        assert!(
            from(&loud).is_empty(),
            "its newest request was among the oldest"
        );
        // The newest requests are the ones waiting, oldest first.
        let kept: Vec<u16> = (senders - (MAX_INBOX as u16 - 2)..senders).collect();
        let got: Vec<StatementKind> = inbox[2..]
            .iter()
            .map(|(_, st)| st.body.kind.clone())
            .collect();
        let want: Vec<StatementKind> = kept.iter().map(|n| request(*n, 1)).collect();
        assert_eq!(got, want);
        // Nothing else was touched: statements stay newest-wins.
        assert_eq!(
            s.statement_seq(&loud.node_id(), &target.node_id()).unwrap(),
            Some(40)
        );
    }

    fn not_admitted(o: RegisterOutcome) -> String {
        match o {
            RegisterOutcome::NotAdmitted(why) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Under --require-token: a new node id without a token, or with a
    /// wrong, used-up, expired or revoked one, is refused with why; a
    /// valid one admits it and counts once; a known node registers again
    /// without one, and its token is not used again.
    #[test]
    fn a_new_node_needs_a_valid_token_and_a_known_one_does_not() {
        use crate::operator::create_token;
        use crate::storage::Storage;
        let mut s = SqliteStorage::in_memory().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut j = Joining::new(true, 0);
        let once = create_token(&mut s, Some(1), None, now).unwrap().token.0;
        let mut go = |s: &mut SqliteStorage, n: u8, seq, token: Option<[u8; 16]>| {
            register_new(
                s,
                &reg(&id(n), seq, None),
                net(),
                obs(),
                token.as_ref(),
                &mut j,
            )
            .unwrap()
        };
        let why = not_admitted(go(&mut s, 1, 1, None));
        assert!(why.contains("only with a join token"), "{why}");
        assert!(why.contains("token create"), "{why}");
        let why = not_admitted(go(&mut s, 1, 1, Some([0; 16])));
        assert!(why.contains("not one this registry issued"), "{why}");
        assert_eq!(s.node_count().unwrap(), 0);
        ok(go(&mut s, 1, 1, Some(once)));
        let why = not_admitted(go(&mut s, 2, 1, Some(once)));
        assert!(why.contains("used up"), "{why}");
        // Known now: no token needed, and the used one is not counted.
        ok(go(&mut s, 1, 2, None));
        ok(go(&mut s, 1, 3, Some(once)));
        assert_eq!(s.tokens().unwrap()[0].used, 1);
        let old = create_token(&mut s, None, Some(now - 1), now - 100).unwrap();
        let why = not_admitted(go(&mut s, 3, 1, Some(old.token.0)));
        assert!(why.contains("expired"), "{why}");
        let many = create_token(&mut s, None, None, now).unwrap();
        ok(go(&mut s, 4, 1, Some(many.token.0)));
        assert!(s.revoke_token(&many.row.id).unwrap());
        let why = not_admitted(go(&mut s, 5, 1, Some(many.token.0)));
        assert!(why.contains("revoked"), "{why}");
        assert_eq!(s.node_count().unwrap(), 2);
    }

    /// A flood of new node ids from one source address is throttled while
    /// another source registers normally, and known nodes are not counted.
    #[test]
    fn new_node_ids_are_limited_per_source_address() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let mut j = Joining::new(false, 5);
        let (flood, other): (SocketAddr, SocketAddr) = (
            "203.0.113.7:4000".parse().unwrap(),
            "198.51.100.8:4000".parse().unwrap(),
        );
        let mut refused = 0;
        for n in 0..20u16 {
            match register_new(&mut s, &reg(&many(n), 1, None), net(), flood, None, &mut j).unwrap()
            {
                RegisterOutcome::Ok { .. } => {}
                RegisterOutcome::NotAdmitted(why) => {
                    assert!(why.contains("too many new nodes from 203.0.113.7"), "{why}");
                    refused += 1;
                }
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(refused, 15, "a burst of 5");
        ok(register_new(
            &mut s,
            &reg(&many(100), 1, None),
            net(),
            other,
            None,
            &mut j,
        )
        .unwrap());
        // The five admitted register again as often as they like.
        for seq in 2..10 {
            ok(register_new(
                &mut s,
                &reg(&many(0), seq, None),
                net(),
                flood,
                None,
                &mut j,
            )
            .unwrap());
        }
        assert_eq!(j.sources(), 2);
    }

    #[test]
    fn the_source_table_is_bounded() {
        let mut j = Joining::new(false, 60);
        let now = std::time::Instant::now();
        for n in 0..(MAX_SOURCES as u32 + 100) {
            let ip = std::net::IpAddr::from(std::net::Ipv6Addr::from(u128::from(n)));
            let _ = j.allow(ip, now);
            assert!(j.sources() <= MAX_SOURCES);
        }
        // A minute later every budget is full again: room for new sources.
        let later = now + std::time::Duration::from_secs(61);
        assert!(j.allow("192.0.2.1".parse().unwrap(), later));
        assert!(j.sources() <= MAX_SOURCES);
    }

    #[test]
    fn the_cap_drops_superseded_pushes_first_then_the_oldest_requests() {
        let (t, a, r, c) = (id(9), id(1), id(2), id(3));
        let request = StatementKind::Request { note: "hi".into() };
        let inbox: Vec<(u64, Signed<Statement>)> = [
            statement(&a, &t, request.clone(), 1),
            statement(&r, &t, StatementKind::Revoke, 1),
            statement(&a, &t, request.clone(), 2),
            statement(&c, &t, request.clone(), 1),
            statement(&r, &t, StatementKind::Revoke, 2),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, st)| (i as u64 + 10, st))
        .collect();
        assert_eq!(over_the_cap(&inbox, 5), Vec::<u64>::new(), "not over");
        assert_eq!(over_the_cap(&inbox, 4), [10, 11], "superseded, all of them");
        assert_eq!(over_the_cap(&inbox, 2), [10, 11, 12]);
        assert_eq!(
            over_the_cap(&inbox, 0),
            [10, 11, 12, 13],
            "the revocation stays"
        );
    }

    #[test]
    fn statements_are_newest_wins_and_queued() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b) = (id(1), id(2));
        let st = |kind, seq| statement(&a, &b, kind, seq);
        assert_eq!(
            store_statement(&mut s, &st(StatementKind::Approve, 3)).unwrap(),
            StatementOutcome::NoSuchNode,
            "recipient not registered"
        );
        ok(register(&mut s, &reg(&b, 1, None), net(), obs()).unwrap());
        assert!(!s.approves(&a.node_id(), &b.node_id()).unwrap());
        let StatementOutcome::Stored(p1) =
            store_statement(&mut s, &st(StatementKind::Approve, 3)).unwrap()
        else {
            panic!()
        };
        assert!(s.approves(&a.node_id(), &b.node_id()).unwrap());
        // Another statement under the same sequence number is a replay (an
        // exact resend is not: issue 10, finding 10).
        assert_eq!(
            store_statement(&mut s, &st(StatementKind::Deny, 3)).unwrap(),
            StatementOutcome::Replayed
        );
        assert_eq!(
            store_statement(&mut s, &st(StatementKind::Approve, 3)).unwrap(),
            StatementOutcome::Resent
        );
        store_statement(&mut s, &st(StatementKind::Revoke, 4)).unwrap();
        assert!(!s.approves(&a.node_id(), &b.node_id()).unwrap());
        let inbox = s.inbox(&b.node_id()).unwrap();
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox[0].0, p1);
        s.ack(&b.node_id(), p1).unwrap();
        assert_eq!(s.inbox(&b.node_id()).unwrap().len(), 1);
        // Someone else cannot ack b's mail.
        s.ack(&a.node_id(), inbox[1].0).unwrap();
        assert_eq!(s.inbox(&b.node_id()).unwrap().len(), 1);
        // A statement that does not verify is refused before anything else.
        let mut forged = st(StatementKind::Approve, 9);
        forged.body.kind = StatementKind::Revoke;
        assert_eq!(
            store_statement(&mut s, &forged).unwrap(),
            StatementOutcome::BadSignature
        );
        assert_eq!(
            s.statement_seq(&a.node_id(), &b.node_id()).unwrap(),
            Some(4)
        );
    }

    /// Issue 10, finding 2, below the session check: a statement whose
    /// sender is registered with another tunnel key is not stored.
    #[test]
    fn a_statement_naming_a_key_its_sender_did_not_register_is_refused() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b, m) = (id(1), id(2), id(3));
        for n in [&a, &b, &m] {
            ok(register(&mut s, &reg(n, 1, None), net(), obs()).unwrap());
        }
        // m's Ed25519 key with b's X25519 key: a valid signature and binding.
        let mut bytes = [3u8; 64];
        bytes[32..].copy_from_slice(&[2u8; 32]);
        let forged = Identity::from_bytes(&bytes);
        let claim = statement(&forged, &a, StatementKind::Approve, 5);
        assert!(claim.verify());
        assert_eq!(
            store_statement(&mut s, &claim).unwrap(),
            StatementOutcome::KeyMismatch
        );
        assert_eq!(s.statement_seq(&m.node_id(), &a.node_id()).unwrap(), None);
        assert!(s.inbox(&a.node_id()).unwrap().is_empty());
        // m's own key is fine.
        assert!(matches!(
            store_statement(&mut s, &statement(&m, &a, StatementKind::Approve, 5)).unwrap(),
            StatementOutcome::Stored(_)
        ));
    }

    /// Issue 10, finding 10: a node resends a request it got no answer to
    /// (after 700 ms) with the same sequence number. An exact resend of
    /// what was accepted is answered as the first copy was and changes
    /// nothing; anything else under a sequence number already used is
    /// still a replay.
    #[test]
    fn an_exact_resend_is_answered_as_the_first_copy_and_changes_nothing() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b) = (id(1), id(2));
        // Registrations, a granted hostname and a refused one.
        let first = reg(&a, 5, Some("alpha"));
        let answer = ok(register(&mut s, &first, net(), obs()).unwrap());
        assert_eq!(
            ok(register(&mut s, &first, net(), obs()).unwrap()),
            answer,
            "an exact resend gets the first answer"
        );
        assert_eq!(s.node(&a.node_id()).unwrap().unwrap(), answer.0);
        let b_first = reg(&b, 1, Some("alpha"));
        let b_answer = ok(register(&mut s, &b_first, net(), obs()).unwrap());
        assert!(b_answer.1.as_deref().unwrap().contains("taken"));
        assert_eq!(
            ok(register(&mut s, &b_first, net(), obs()).unwrap()),
            b_answer,
            "the refusal is answered again"
        );
        for other in [
            reg(&a, 5, Some("other")),
            reg(&a, 5, None),
            reg(&a, 4, None),
        ] {
            assert_eq!(
                register(&mut s, &other, net(), obs()).unwrap(),
                RegisterOutcome::Replayed,
                "another registration under a used sequence number"
            );
        }
        assert_eq!(s.node(&a.node_id()).unwrap().unwrap(), answer.0);

        // Statements.
        let st = statement(&a, &b, StatementKind::Approve, 7);
        assert!(matches!(
            store_statement(&mut s, &st).unwrap(),
            StatementOutcome::Stored(_)
        ));
        assert_eq!(
            store_statement(&mut s, &st).unwrap(),
            StatementOutcome::Resent,
            "an exact resend is acknowledged"
        );
        assert_eq!(
            s.inbox(&b.node_id()).unwrap().len(),
            1,
            "and not queued a second time"
        );
        for other in [
            statement(&a, &b, StatementKind::Revoke, 7),
            statement(&a, &b, StatementKind::Approve, 6),
        ] {
            assert_eq!(
                store_statement(&mut s, &other).unwrap(),
                StatementOutcome::Replayed
            );
        }
        assert!(s.approves(&a.node_id(), &b.node_id()).unwrap());
        // Once a newer statement is stored, the old one is a replay.
        store_statement(&mut s, &statement(&a, &b, StatementKind::Revoke, 8)).unwrap();
        assert_eq!(
            store_statement(&mut s, &st).unwrap(),
            StatementOutcome::Replayed
        );
        assert!(!s.approves(&a.node_id(), &b.node_id()).unwrap());
    }

    #[test]
    fn mail_carries_the_sender_and_skips_vanished_ones() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b, c) = (id(1), id(2), id(3));
        let (a_row, _) = ok(register(&mut s, &reg(&a, 1, Some("alpha")), net(), obs()).unwrap());
        ok(register(&mut s, &reg(&b, 1, None), net(), obs()).unwrap());
        // c sends, but c itself is not registered (a sender that vanished).
        s.put_statement(&statement(&c, &b, StatementKind::Approve, 1))
            .unwrap();
        store_statement(&mut s, &statement(&a, &b, StatementKind::Approve, 1)).unwrap();
        let items = mail(&mut s, &b.node_id()).unwrap();
        assert_eq!(items.len(), 1);
        let PushItem::Statement {
            statement: pushed,
            address,
            hostname,
        } = &items[0].1;
        assert_eq!(pushed.body.from, a.public());
        assert_eq!(
            (*address, hostname.as_deref()),
            (a_row.address, Some("alpha"))
        );
        assert_eq!(
            s.inbox(&b.node_id()).unwrap().len(),
            1,
            "the orphan was dropped"
        );
        assert!(mail(&mut s, &a.node_id()).unwrap().is_empty());
        for n in 0..20 {
            store_statement(&mut s, &statement(&a, &b, StatementKind::Approve, 2 + n)).unwrap();
        }
        assert_eq!(mail(&mut s, &b.node_id()).unwrap().len(), PUSH_BATCH);
    }

    #[test]
    fn roaming_puts_the_observed_endpoint_first() {
        let mut s = SqliteStorage::in_memory().unwrap();
        ok(register(&mut s, &reg(&id(1), 1, None), net(), obs()).unwrap());
        let moved: SocketAddr = "198.51.100.7:1234".parse().unwrap();
        observed_at(&mut s, &id(1).node_id(), moved).unwrap();
        assert_eq!(
            s.node(&id(1).node_id()).unwrap().unwrap().endpoints,
            vec![moved, "192.0.2.10:4000".parse().unwrap()]
        );
        // Unknown nodes are ignored.
        observed_at(&mut s, &id(9).node_id(), moved).unwrap();
    }

    #[test]
    fn endpoint_list_is_observed_first_unique_and_bounded() {
        let o: SocketAddr = "203.0.113.1:1".parse().unwrap();
        let locals: Vec<SocketAddr> = (1..20)
            .map(|p| SocketAddr::from(([192, 0, 2, 1], p)))
            .chain([o])
            .collect();
        let l = endpoint_list(o, &locals);
        assert_eq!(l[0], o);
        assert_eq!(l.len(), messages::MAX_ENDPOINTS);
        assert_eq!(l[1], SocketAddr::from(([192, 0, 2, 1], 1)));
    }

    #[test]
    fn a_succession_moves_address_and_name_and_retires_the_old_id() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b, peer) = (id(1), id(2), id(3));
        let (row_a, _) = ok(register(&mut s, &reg(&a, 1, Some("cache")), net(), obs()).unwrap());
        register(&mut s, &reg(&peer, 1, Some("build")), net(), obs()).unwrap();
        store_statement(&mut s, &statement(&peer, &a, StatementKind::Approve, 1)).unwrap();
        let st = Succession::sign(&a, &b, 1, 100).to_bytes();
        let out = succeed(&mut s, &st, &b.static_public()).unwrap();
        let SucceedOutcome::Moved { old, node } = out else {
            panic!("expected Moved, got {out:?}")
        };
        assert_eq!(old, a.node_id());
        assert_eq!(
            (node.address, node.hostname.as_deref()),
            (row_a.address, Some("cache"))
        );
        assert!(s.node(&a.node_id()).unwrap().is_none());
        // An exact resend is answered as the first copy.
        assert!(matches!(
            succeed(&mut s, &st, &b.static_public()).unwrap(),
            SucceedOutcome::Moved { .. }
        ));
        // The successor registers and keeps the address and the name.
        let (row_b, refused) =
            ok(register(&mut s, &reg(&b, 1, Some("cache")), net(), obs()).unwrap());
        assert_eq!((row_b.address, refused), (row_a.address, None));
        assert_eq!(row_b.hostname.as_deref(), Some("cache"));
        // The old key is refused for good.
        assert_eq!(
            register(&mut s, &reg(&a, 9, Some("cache")), net(), obs()).unwrap(),
            RegisterOutcome::Retired
        );
        // Statements about the old id went with it.
        assert_eq!(
            s.statement_seq(&peer.node_id(), &a.node_id()).unwrap(),
            None
        );
    }

    #[test]
    fn forged_foreign_and_second_successions_are_refused() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let (a, b, c, x) = (id(1), id(2), id(3), id(4));
        ok(register(&mut s, &reg(&a, 1, Some("cache")), net(), obs()).unwrap());
        // Not signed by the old key.
        let mut forged = Succession::sign(&x, &b, 1, 100);
        forged.body.old = a.public();
        assert!(matches!(
            succeed(&mut s, &forged.to_bytes(), &b.static_public()).unwrap(),
            SucceedOutcome::Invalid(_)
        ));
        // Garbage.
        assert!(matches!(
            succeed(&mut s, &[1, 2, 3], &b.static_public()).unwrap(),
            SucceedOutcome::Invalid(_)
        ));
        // Valid, but handed in on another key's session.
        let st = Succession::sign(&a, &b, 1, 100).to_bytes();
        assert!(matches!(
            succeed(&mut s, &st, &c.static_public()).unwrap(),
            SucceedOutcome::Invalid(_)
        ));
        // Of an id the registry does not know.
        assert!(matches!(
            succeed(
                &mut s,
                &Succession::sign(&x, &c, 1, 100).to_bytes(),
                &c.static_public()
            )
            .unwrap(),
            SucceedOutcome::NotFound(_)
        ));
        assert!(s.node(&a.node_id()).unwrap().is_some(), "nothing moved");
        succeed(&mut s, &st, &b.static_public()).unwrap();
        // A second successor (the leaked old key) is refused.
        assert!(matches!(
            succeed(
                &mut s,
                &Succession::sign(&a, &c, 1, 101).to_bytes(),
                &c.static_public()
            )
            .unwrap(),
            SucceedOutcome::Refused(_)
        ));
        assert!(s.node(&c.node_id()).unwrap().is_none());
    }
}
