//! The relay: forwards tunnel datagrams between two online nodes that
//! approved each other, unread (it holds no key to them), within each
//! sender's bandwidth budget and the relay's budget in all (a rate of 0
//! for either means no relaying).
//!
//! Whether a pair approved each other comes from an in-memory view that the
//! relay keeps warm, never from a disk read on the packet path: entries are
//! set when this registry stores a statement, read in the background by the
//! storage thread for pairs not seen yet, and refreshed while a pair is in
//! use (a relay-only instance sees the registry's statements only through
//! the shared database). The first datagrams of a pair not seen yet wait,
//! a few at most, until the storage thread answered; a pair known to
//! approve keeps flowing while its entry is refreshed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pilot_proto::identity::NodeId;
use pilot_proto::ratelimit::RateLimiter;
use pilot_proto::wire::{RelayHeader, MSG_RELAY_FROM};

use crate::cluster::Cluster;
use crate::sessions::Sessions;
use crate::stats::{bump, Stats};
use crate::store::{Job, Store};

/// How long an approval read from storage is trusted as is (a relay-only
/// instance sees the registry's changes only through the shared database).
pub const APPROVAL_TTL: Duration = Duration::from_secs(2);
/// An approval not used for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// A question to the storage thread unanswered for this long is asked again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// Datagrams held per pair, and in all, while the relay learns a pair.
const HELD_PER_PAIR: usize = 8;
const HELD_TOTAL: usize = 256;
/// Approvals kept in the view: each stored statement adds one, so the view
/// is bounded by more than the minute an unused one lives. When it is full,
/// unused entries go; if all are in use, a new one is not kept (the pair
/// is read from storage when it is used).
const MAX_APPROVALS: usize = 1 << 16;
/// Questions to the storage thread at once: a node that sprays datagrams at
/// many peers cannot fill the storage queue that registrations need.
const MAX_ASKED: usize = 64;
/// How long where a node is attached (another instance) is trusted as read
/// from storage; an [`crate::cluster::Event::Attached`] updates it sooner.
const LOCATION_TTL: Duration = Duration::from_secs(10);
/// Locations kept (several instances); when full, the stale ones go, and
/// if none is stale a new one is not kept.
const MAX_LOCATED: usize = 1 << 16;

/// What to do with a relayed datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) datagram there.
    Forward(SocketAddr),
    /// Kept until the relay knows whether the pair approved each other.
    Held,
    /// Send these bytes (an instance frame) to the instance there: the
    /// recipient is attached to another instance.
    ToInstance(SocketAddr, Vec<u8>),
    /// Dropped (counted).
    Drop,
}

struct Approval {
    approves: bool,
    fetched: Instant,
    used: bool,
}

/// Sender and recipient of a relayed datagram.
type Pair = (NodeId, NodeId);

/// The relay's state.
pub struct Relay {
    approvals: HashMap<Pair, Approval>,
    asked: HashMap<Pair, Instant>,
    held: HashMap<Pair, Vec<Vec<u8>>>,
    held_total: usize,
    limiter: RateLimiter<NodeId>,
    /// The budget of all senders together ([`Relay::with_total`]).
    total: Option<RateLimiter<()>>,
    /// A rate of 0 was given: nothing is relayed.
    off: bool,
    /// When each pair last had a datagram forwarded (for the gauge of pairs
    /// in use; forgotten after [`ACTIVE_FOR`]).
    active: HashMap<Pair, Instant>,
    /// Several instances: this one, and where nodes not online here are
    /// attached (`None`: nowhere), as read when.
    cluster: Option<Cluster>,
    located: HashMap<NodeId, (Option<SocketAddr>, Instant)>,
}

/// A pair counts as relayed through for this long after its last datagram.
pub const ACTIVE_FOR: Duration = Duration::from_secs(60);

enum Known {
    Yes,
    No,
    Unknown,
}

impl Relay {
    /// A relay allowing each node `rate` bytes per second (0: none).
    pub fn new(rate: u32) -> Self {
        Relay {
            approvals: HashMap::new(),
            asked: HashMap::new(),
            held: HashMap::new(),
            held_total: 0,
            // A limiter's buckets must refill (it divides by the rate):
            // with rate 0 it is never asked.
            limiter: RateLimiter::new(rate.max(1), rate.max(1 << 20) / 4),
            total: None,
            off: rate == 0,
            active: HashMap::new(),
            cluster: None,
            located: HashMap::new(),
        }
    }

    /// Relays to nodes attached to the other instances of `cluster` too.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Where `node` is attached, as an event or storage said (`None`:
    /// nowhere). Our own address means "here": nothing to remember.
    pub fn locate(&mut self, node: NodeId, at: Option<SocketAddr>, now: Instant) {
        let Some(me) = self.cluster.as_ref().map(|c| c.me) else {
            return;
        };
        if at == Some(me) {
            self.located.remove(&node);
            return;
        }
        if self.located.len() >= MAX_LOCATED && !self.located.contains_key(&node) {
            self.located
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < LOCATION_TTL);
            if self.located.len() >= MAX_LOCATED {
                return;
            }
        }
        self.located.insert(node, (at, now));
    }

    /// Forgets every location (events may have been missed).
    pub fn forget_locations(&mut self) {
        self.located.clear();
    }

    /// Where a node not online here is, if that is known and fresh:
    /// `Some(None)` for "attached nowhere, or here".
    fn location(&self, node: &NodeId, now: Instant) -> Option<Option<SocketAddr>> {
        let (at, t) = self.located.get(node)?;
        (now.saturating_duration_since(*t) < LOCATION_TTL).then_some(*at)
    }

    /// Also caps the bytes per second relayed for all nodes together
    /// (0: none).
    pub fn with_total(mut self, rate: u32) -> Self {
        self.total = Some(RateLimiter::new(rate.max(1), rate.max(1 << 20) / 4));
        self.off |= rate == 0;
        self
    }

    /// Pairs (sender, recipient) forwarded for within the last
    /// [`ACTIVE_FOR`] (as of the last tick).
    pub fn active_pairs(&self) -> usize {
        self.active.len()
    }

    /// Records what storage now says (a statement was stored, or read).
    pub fn set(&mut self, from: NodeId, to: NodeId, approves: bool, now: Instant) {
        if self.approvals.len() >= MAX_APPROVALS && !self.approvals.contains_key(&(from, to)) {
            self.approvals.retain(|_, e| e.used);
            if self.approvals.len() >= MAX_APPROVALS {
                return;
            }
        }
        let used = self.approvals.get(&(from, to)).is_some_and(|a| a.used);
        self.approvals.insert(
            (from, to),
            Approval {
                approves,
                fetched: now,
                used,
            },
        );
    }

    /// Both directions of a pair, as far as the view knows: `Yes` only if
    /// both approve, `No` if a fresh entry refuses, `Unknown` if an entry is
    /// missing or a stale one refuses (it may have changed: ask storage).
    fn mutual(&mut self, a: NodeId, b: NodeId, now: Instant) -> (Known, bool) {
        let mut stale = false;
        let mut known = Known::Yes;
        for pair in [(a, b), (b, a)] {
            match self.approvals.get_mut(&pair) {
                None => known = Known::Unknown,
                Some(e) => {
                    e.used = true;
                    let old = now.saturating_duration_since(e.fetched) >= APPROVAL_TTL;
                    stale |= old;
                    match (e.approves, old) {
                        (true, _) => {}
                        (false, false) => return (Known::No, false),
                        (false, true) => known = Known::Unknown,
                    }
                }
            }
        }
        (known, stale)
    }

    fn ask(
        &mut self,
        a: NodeId,
        b: NodeId,
        locate: bool,
        now: Instant,
        store: &Store,
        stats: &Stats,
    ) -> bool {
        if self
            .asked
            .get(&(a, b))
            .is_some_and(|t| now.saturating_duration_since(*t) < ASK_AGAIN_AFTER)
        {
            return true;
        }
        if self.asked.len() >= MAX_ASKED {
            bump(&stats.dropped_busy);
            return false;
        }
        if store
            .submit(Job::Approvals {
                pairs: vec![(a, b), (b, a)],
                locate: locate.then_some(b),
            })
            .is_err()
        {
            bump(&stats.dropped_busy);
            return false;
        }
        self.asked.insert((a, b), now);
        true
    }

    /// A datagram a node handed the relay (`buf` starts with the relay
    /// header). The sender is known by the address of its control session:
    /// a datagram from anywhere else is dropped. On [`Verdict::Forward`],
    /// `buf` has been rewritten to name the sender for the recipient.
    pub fn on_datagram(
        &mut self,
        buf: &mut [u8],
        from: SocketAddr,
        now: Instant,
        sessions: &Sessions,
        store: &Store,
        stats: &Stats,
    ) -> Verdict {
        let Ok(h) = RelayHeader::parse(buf) else {
            bump(&stats.dropped_malformed);
            return Verdict::Drop;
        };
        if self.off {
            bump(&stats.relay_limited);
            return Verdict::Drop;
        }
        let Some(src) = sessions.node_at(&from) else {
            bump(&stats.relay_refused);
            return Verdict::Drop;
        };
        let dst = h.node;
        // Not online here: perhaps attached to another instance.
        let mut locate = false;
        if sessions.online(&dst).is_none() {
            if self.cluster.is_none() {
                bump(&stats.relay_refused);
                return Verdict::Drop;
            }
            match self.location(&dst, now) {
                Some(None) => {
                    bump(&stats.relay_refused);
                    return Verdict::Drop;
                }
                Some(Some(_)) => {}
                None => locate = true,
            }
        }
        let (mut known, stale) = self.mutual(src, dst, now);
        if locate && matches!(known, Known::Yes) {
            known = Known::Unknown;
        }
        match known {
            Known::No => {
                bump(&stats.relay_refused);
                return Verdict::Drop;
            }
            Known::Unknown => {
                let waiting = self.held.get(&(src, dst)).map_or(0, Vec::len);
                if waiting >= HELD_PER_PAIR || self.held_total >= HELD_TOTAL {
                    bump(&stats.relay_refused);
                    return Verdict::Drop;
                }
                if !self.ask(src, dst, locate, now, store, stats) {
                    return Verdict::Drop;
                }
                self.held.entry((src, dst)).or_default().push(buf.to_vec());
                self.held_total += 1;
                bump(&stats.relay_held);
                return Verdict::Held;
            }
            Known::Yes if stale => {
                // Keep flowing; refresh in the background (best effort).
                let _ = self.ask(src, dst, false, now, store, stats);
            }
            Known::Yes => {}
        }
        self.forward(buf, src, dst, now, sessions, stats)
    }

    fn forward(
        &mut self,
        buf: &mut [u8],
        src: NodeId,
        dst: NodeId,
        now: Instant,
        sessions: &Sessions,
        stats: &Stats,
    ) -> Verdict {
        // Online here: its session's address; attached to another
        // instance: that instance, in a frame.
        // (The location map is read only for a recipient not online here:
        // nothing more per datagram on one instance.)
        let to = match sessions.online(&dst) {
            Some((_, c)) => Ok(c.addr),
            None => match self.location(&dst, now) {
                Some(Some(instance)) if self.cluster.is_some() => Err(instance),
                _ => {
                    bump(&stats.relay_refused);
                    return Verdict::Drop;
                }
            },
        };
        let len = buf.len() as u32;
        if !self.limiter.allow_n(&src, len, now)
            || !self.total.as_mut().is_none_or(|t| t.allow_n(&(), len, now))
        {
            bump(&stats.relay_limited);
            return Verdict::Drop;
        }
        RelayHeader {
            ty: MSG_RELAY_FROM,
            node: src,
        }
        .emit(buf);
        bump(&stats.relayed);
        stats
            .relayed_bytes
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.active.insert((src, dst), now);
        match (to, &self.cluster) {
            (Ok(to), _) => Verdict::Forward(to),
            (Err(instance), Some(c)) => Verdict::ToInstance(instance, c.frame(&dst, buf)),
            (Err(_), None) => Verdict::Drop,
        }
    }

    /// The storage thread read these approvals: record them and decide on
    /// the datagrams that waited for them. Returns the ones to send.
    pub fn learned(
        &mut self,
        approvals: Vec<(Pair, bool)>,
        located: Option<(NodeId, Option<SocketAddr>)>,
        now: Instant,
        sessions: &Sessions,
        stats: &Stats,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        if let Some((node, at)) = located {
            self.locate(node, at, now);
        }
        for ((from, to), approves) in approvals {
            self.set(from, to, approves, now);
            self.asked.remove(&(from, to));
        }
        let ready: Vec<Pair> = self
            .held
            .keys()
            .filter(|(a, b)| !matches!(self.peek(*a, *b, now), Known::Unknown))
            .copied()
            .collect();
        let mut out = vec![];
        for (src, dst) in ready {
            let datagrams = self.held.remove(&(src, dst)).unwrap_or_default();
            self.held_total -= datagrams.len();
            let yes = matches!(self.peek(src, dst, now), Known::Yes);
            for mut d in datagrams {
                if !yes {
                    bump(&stats.relay_refused);
                    continue;
                }
                match self.forward(&mut d, src, dst, now, sessions, stats) {
                    Verdict::Forward(to) => out.push((to, d)),
                    Verdict::ToInstance(to, frame) => out.push((to, frame)),
                    Verdict::Held | Verdict::Drop => {}
                }
            }
        }
        out
    }

    /// Like `mutual`, without marking anything used.
    fn peek(&self, a: NodeId, b: NodeId, now: Instant) -> Known {
        let mut known = Known::Yes;
        for pair in [(a, b), (b, a)] {
            match self.approvals.get(&pair) {
                None => known = Known::Unknown,
                Some(e) if e.approves => {}
                Some(e) if now.saturating_duration_since(e.fetched) < APPROVAL_TTL => {
                    return Known::No
                }
                Some(_) => known = Known::Unknown,
            }
        }
        known
    }

    /// Every half second: refresh the approvals of pairs in use before they
    /// go stale, forget idle ones, and give up on datagrams whose question
    /// went unanswered (asked again by the next datagram).
    pub fn on_tick(&mut self, now: Instant, store: &Store, stats: &Stats) {
        self.active
            .retain(|_, t| now.saturating_duration_since(*t) < ACTIVE_FOR);
        self.approvals
            .retain(|_, e| e.used || now.saturating_duration_since(e.fetched) < FORGET_AFTER);
        let due: Vec<Pair> = self
            .approvals
            .iter()
            .filter(|(_, e)| e.used && now.saturating_duration_since(e.fetched) >= APPROVAL_TTL / 2)
            .map(|(p, _)| *p)
            .filter(|p| !self.asked.contains_key(p))
            .collect();
        if !due.is_empty() {
            for p in &due {
                if let Some(e) = self.approvals.get_mut(p) {
                    e.used = false;
                }
            }
            if store
                .submit(Job::Approvals {
                    pairs: due.clone(),
                    locate: None,
                })
                .is_ok()
            {
                for p in due {
                    self.asked.insert(p, now);
                }
            }
        }
        let expired: Vec<Pair> = self
            .asked
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= ASK_AGAIN_AFTER)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.asked.remove(&p);
            if let Some(d) = self.held.remove(&p) {
                self.held_total -= d.len();
                for _ in d {
                    bump(&stats.relay_refused);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::tests::pair;
    use crate::storage::{SqliteStorage, Storage};
    use crate::store::Done;
    use pilot_proto::identity::Identity;
    use pilot_proto::messages::{NatType, Signed, Statement, StatementKind};
    use pilot_proto::wire::{MSG_RELAY_TO, RELAY_HEADER_LEN};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::sync::mpsc::Receiver;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 7], 5000 + i))
    }

    fn say(s: &mut SqliteStorage, from: &Identity, to: &Identity, kind: StatementKind, seq: u64) {
        s.put_statement(&Signed::sign(
            Statement {
                kind,
                from: from.public(),
                to: to.node_id(),
                seq,
            },
            from,
        ))
        .unwrap();
    }

    struct Lab {
        relay: Relay,
        sessions: Sessions,
        store: Store,
        done: Receiver<Done>,
        stats: Stats,
        a: NodeId,
        b: NodeId,
    }

    /// Two online nodes a (at addr(1)) and b (at addr(2)); `approve` says
    /// which statements storage holds.
    fn lab(approve: &[(u8, u8)], rate: u32) -> Lab {
        let ids = [
            Identity::from_bytes(&[1; 64]),
            Identity::from_bytes(&[2; 64]),
        ];
        let mut s = SqliteStorage::in_memory().unwrap();
        for (from, to) in approve {
            say(
                &mut s,
                &ids[usize::from(*from)],
                &ids[usize::from(*to)],
                StatementKind::Approve,
                1,
            );
        }
        let (store, done, _) = Store::spawn(s, "10.77.0.0/16".parse().unwrap(), 256).unwrap();
        let mut sessions = Sessions::default();
        let now = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let index = i as u32 + 1;
            let (session, _) = pair(index, now);
            sessions.install(session, id.static_public(), addr(index as u16), now);
            sessions.attach(index, id.node_id(), NatType::None);
        }
        Lab {
            relay: Relay::new(rate),
            sessions,
            store,
            done,
            stats: Stats::default(),
            a: ids[0].node_id(),
            b: ids[1].node_id(),
        }
    }

    fn datagram(to: NodeId, len: usize) -> Vec<u8> {
        let mut d = vec![0x55u8; RELAY_HEADER_LEN + len];
        RelayHeader {
            ty: MSG_RELAY_TO,
            node: to,
        }
        .emit(&mut d);
        d
    }

    impl Lab {
        fn send(&mut self, d: &mut [u8], from: u16, now: Instant) -> Verdict {
            self.relay
                .on_datagram(d, addr(from), now, &self.sessions, &self.store, &self.stats)
        }

        async fn learn(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
            let Some(Done::Approvals { approvals, .. }) = self.done.recv().await else {
                panic!("expected approvals")
            };
            self.relay
                .learned(approvals, None, now, &self.sessions, &self.stats)
        }
    }

    #[tokio::test]
    async fn first_datagrams_wait_for_storage_then_flow_without_it() {
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
        let now = Instant::now();
        let (a, b) = (l.a, l.b);
        for _ in 0..3 {
            assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Held);
        }
        let sent = l.learn(now).await;
        assert_eq!(
            sent.len(),
            3,
            "the held datagrams go out once storage answered"
        );
        for (to, d) in &sent {
            assert_eq!(*to, addr(2));
            assert_eq!(
                RelayHeader::parse(d).unwrap(),
                RelayHeader {
                    ty: MSG_RELAY_FROM,
                    node: a
                }
            );
        }
        // Known now: forwarded at once, both ways, no storage involved.
        let mut d = datagram(b, 10);
        assert_eq!(l.send(&mut d, 1, now), Verdict::Forward(addr(2)));
        assert_eq!(
            RelayHeader::parse(&d).unwrap().node,
            a,
            "rewritten to name the sender"
        );
        assert_eq!(
            l.send(&mut datagram(a, 10), 2, now),
            Verdict::Forward(addr(1))
        );
        assert!(
            l.done.try_recv().is_err(),
            "no storage question for a known pair"
        );
        assert_eq!(l.stats.relayed.load(Relaxed), 5);
        assert_eq!(l.stats.relay_held.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn a_pair_in_use_keeps_flowing_while_its_approval_is_refreshed() {
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
        let t0 = Instant::now();
        let b = l.b;
        l.send(&mut datagram(b, 10), 1, t0);
        l.learn(t0).await;
        // Past half the TTL, the tick asks storage again for pairs in use.
        let t1 = t0 + APPROVAL_TTL / 2 + Duration::from_millis(1);
        assert_eq!(
            l.send(&mut datagram(b, 10), 1, t1),
            Verdict::Forward(addr(2))
        );
        l.relay.on_tick(t1, &l.store, &l.stats);
        let Some(Done::Approvals { approvals, .. }) = l.done.recv().await else {
            panic!()
        };
        assert!(!approvals.is_empty());
        // Even stale (storage slow or busy), an approved pair keeps flowing.
        let t2 = t0 + APPROVAL_TTL * 3;
        assert_eq!(
            l.send(&mut datagram(b, 10), 1, t2),
            Verdict::Forward(addr(2))
        );
    }

    #[tokio::test]
    async fn unapproved_pairs_are_refused_and_a_revocation_is_learned() {
        // Only a approves b.
        let mut l = lab(&[(0, 1)], 1 << 30);
        let now = Instant::now();
        let b = l.b;
        assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Held);
        assert!(l.learn(now).await.is_empty());
        assert_eq!(l.stats.relay_refused.load(Relaxed), 1);
        // Known refusal: dropped without asking again.
        assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Drop);
        assert!(l.done.try_recv().is_err());
        // A statement stored by this registry changes the view at once.
        l.relay.set(l.b, l.a, true, now);
        assert_eq!(
            l.send(&mut datagram(b, 10), 1, now),
            Verdict::Forward(addr(2))
        );
        l.relay.set(l.b, l.a, false, now);
        assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Drop);
        // Unknown senders and offline recipients are refused outright.
        assert_eq!(l.send(&mut datagram(b, 10), 9, now), Verdict::Drop);
        assert_eq!(
            l.send(&mut datagram(NodeId([9; 16]), 10), 1, now),
            Verdict::Drop
        );
        assert_eq!(l.send(&mut [0xA5, 0, 0, 0], 1, now), Verdict::Drop);
        assert_eq!(l.stats.dropped_malformed.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn held_datagrams_are_bounded() {
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
        let now = Instant::now();
        let b = l.b;
        for _ in 0..HELD_PER_PAIR {
            assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Held);
        }
        assert_eq!(l.send(&mut datagram(b, 10), 1, now), Verdict::Drop);
        assert_eq!(l.learn(now).await.len(), HELD_PER_PAIR);
    }

    #[tokio::test]
    async fn questions_to_storage_are_bounded() {
        let mut l = lab(&[], 1 << 30);
        let now = Instant::now();
        // A node spraying datagrams at many peers the relay has not seen:
        // the questions they raise are capped (asked directly here, as only
        // two nodes are online in this lab).
        let asked = (0..(MAX_ASKED as u8 + 10))
            .filter(|n| {
                l.relay
                    .ask(l.a, NodeId([*n; 16]), false, now, &l.store, &l.stats)
            })
            .count();
        assert_eq!(asked, MAX_ASKED);
        assert_eq!(l.stats.dropped_busy.load(Relaxed), 10);
    }

    #[tokio::test]
    async fn each_sender_has_a_bandwidth_budget() {
        // 1 MB/s allows a burst of a quarter MB.
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 20);
        let now = Instant::now();
        let b = l.b;
        l.send(&mut datagram(b, 10), 1, now);
        l.learn(now).await;
        let sent = (0..400)
            .filter(|_| l.send(&mut datagram(b, 1000), 1, now) != Verdict::Drop)
            .count();
        assert!((250..300).contains(&sent), "{sent} datagrams of 1 kB");
        assert!(l.stats.relay_limited.load(Relaxed) > 100);
    }

    #[tokio::test]
    async fn all_senders_share_the_total_budget() {
        // Each sender may send 1 GB/s, all together 1 MB/s (a burst of a
        // quarter MB): a and b together get what one would alone.
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
        l.relay = Relay::new(1 << 30).with_total(1 << 20);
        let now = Instant::now();
        let (a, b) = (l.a, l.b);
        l.send(&mut datagram(b, 10), 1, now);
        l.learn(now).await;
        let sent = (0..200)
            .filter(|_| l.send(&mut datagram(b, 1000), 1, now) != Verdict::Drop)
            .count()
            + (0..200)
                .filter(|_| l.send(&mut datagram(a, 1000), 2, now) != Verdict::Drop)
                .count();
        assert!((250..300).contains(&sent), "{sent} datagrams of 1 kB");
    }

    #[tokio::test]
    async fn a_rate_of_zero_relays_nothing() {
        for relay in [Relay::new(0), Relay::new(1 << 30).with_total(0)] {
            let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
            l.relay = relay;
            let now = Instant::now();
            let b = l.b;
            for i in 0..100u64 {
                let t = now + Duration::from_secs(i);
                assert_eq!(l.send(&mut datagram(b, 1000), 1, t), Verdict::Drop);
            }
            assert_eq!(l.stats.relay_limited.load(Relaxed), 100);
            assert_eq!(l.stats.relayed.load(Relaxed), 0);
            assert!(l.done.try_recv().is_err(), "storage is not even asked");
        }
    }

    #[tokio::test]
    async fn the_approval_view_is_bounded() {
        let mut l = lab(&[(0, 1), (1, 0)], 1 << 30);
        let now = Instant::now();
        let (a, b) = (l.a, l.b);
        l.relay.set(a, b, true, now);
        l.relay.set(b, a, true, now);
        // The pair is in use.
        assert_eq!(
            l.send(&mut datagram(b, 10), 1, now),
            Verdict::Forward(addr(2))
        );
        // A flood of stored statements between other nodes.
        for n in 0..(MAX_APPROVALS as u32 + 1000) {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&n.to_le_bytes());
            l.relay.set(NodeId(x), b, true, now);
            assert!(l.relay.approvals.len() <= MAX_APPROVALS);
        }
        // The pair in use was kept.
        assert_eq!(
            l.send(&mut datagram(b, 10), 1, now),
            Verdict::Forward(addr(2))
        );
    }
}
