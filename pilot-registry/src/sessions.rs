//! Control sessions: one per node that completed a handshake with this
//! instance. Which session is which node, which node is online where, and
//! the two ends of every control message: opening what a node sent, sealing
//! what the roles answer ([`Reply`]). Each session has a budget of control
//! messages (a joined host flooding statements or lookups is slowed to it),
//! and there are at most [`MAX_SESSIONS`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pilot_proto::frame;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{self, FromRegistry, NatType, ToRegistry};
use pilot_proto::session::Session;
use pilot_proto::timers::REJECT_AFTER;
use pilot_proto::wire::{DataHeader, DATA_HEADER_LEN};
use tracing::{debug, warn};

use crate::stats::{bump, Stats};

/// Control messages a session may send per second by default, sustained
/// (twice as many in a burst): a node's own traffic is a registration,
/// a lookup per peer it starts, a statement per decision and pings.
pub const DEFAULT_CONTROL_RATE: u32 = 50;

/// Control sessions kept at most. A session costs a few hundred bytes; the
/// per-source handshake limit makes each one cost its maker a handshake,
/// and sessions expire after [`REJECT_AFTER`] without traffic. At the cap
/// a new handshake goes unanswered (its node retries) until one expires.
pub const MAX_SESSIONS: usize = 1 << 18;

/// How long a path check waits for its answer before a newer datagram
/// from the same address sends it again (it or its answer was lost).
pub const CHECK_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// A return-routability check on its way: the node moves to `addr` once
/// it answers `token` from there.
#[derive(Clone, Copy, Debug)]
struct PathCheck {
    addr: SocketAddr,
    token: u64,
    sent: Instant,
}

/// A control message for the node on session `to`: what every role hands
/// the socket loop instead of sending it itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The session index.
    pub to: u32,
    /// The message.
    pub msg: FromRegistry,
}

/// One control session.
pub struct Conn {
    /// The tunnel keys.
    pub session: Session,
    /// The node's static key, authenticated by the handshake.
    pub static_public: [u8; 32],
    /// The node, once it registered (or attached, on a relay).
    pub node: Option<NodeId>,
    /// Where it was last heard from.
    pub addr: SocketAddr,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// Its NAT type, as it reported it.
    pub nat: NatType,
    /// Control messages it may still send now, and when that was counted.
    budget: (f64, Instant),
    /// The highest packet counter authenticated on it: only a datagram
    /// above it may move the session to a new address.
    newest: Option<u64>,
    /// The node answered a path check on this session: it moves only to
    /// an address it showed it receives at. A node that predates the
    /// checks never answers one and moves with its newest datagram.
    pub checks_paths: bool,
    /// The check waiting for its answer (the first is sent with the
    /// session's first datagram, to learn whether the node answers).
    check: Option<PathCheck>,
}

/// An authenticated datagram on a session.
#[derive(Debug)]
pub struct Opened {
    /// The session index.
    pub index: u32,
    /// The control message; `None` for a keepalive or a message that did
    /// not decode (counted as refused).
    pub msg: Option<ToRegistry>,
    /// The node, if the session belongs to one and it moved to a new
    /// endpoint with this datagram (roaming).
    pub roamed: Option<NodeId>,
    /// A path check to send, sealed on this session
    /// ([`Sessions::seal_check`]): to this address, with this token.
    pub check: Option<(SocketAddr, u64)>,
}

/// Every control session, by index, node and address.
pub struct Sessions {
    conns: HashMap<u32, Conn>,
    online: HashMap<NodeId, u32>,
    by_addr: HashMap<SocketAddr, NodeId>,
    /// The one address `by_addr` holds for each node, so moving a node
    /// costs a lookup, not a pass over every node online.
    addr_of: HashMap<NodeId, SocketAddr>,
    /// Control messages per second per session (0: no limit).
    rate: u32,
    max: usize,
    /// The next path check's token (sealed: nobody else reads it).
    tokens: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(DEFAULT_CONTROL_RATE, MAX_SESSIONS)
    }
}

impl Sessions {
    /// No sessions yet; each may send `rate` control messages a second
    /// (0: no limit), and at most `max` are kept.
    pub fn new(rate: u32, max: usize) -> Self {
        Sessions {
            conns: HashMap::new(),
            online: HashMap::new(),
            by_addr: HashMap::new(),
            addr_of: HashMap::new(),
            rate,
            max,
            tokens: 1,
        }
    }

    /// Takes one control message from session `index`'s budget; false if
    /// it has none left (the message is refused) or there is no session.
    pub fn allow(&mut self, index: u32, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let Some(c) = self.conns.get_mut(&index) else {
            return false;
        };
        let rate = f64::from(self.rate);
        let (tokens, at) = &mut c.budget;
        let elapsed = now.saturating_duration_since(*at).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(2.0 * rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Installs a fresh session; false if its index is already in use or
    /// [`MAX_SESSIONS`] are kept (the node's handshake then goes unanswered
    /// and it retries).
    pub fn install(
        &mut self,
        session: Session,
        static_public: [u8; 32],
        addr: SocketAddr,
        now: Instant,
    ) -> bool {
        let index = session.local_index;
        if self.conns.contains_key(&index) || self.conns.len() >= self.max {
            return false;
        }
        self.conns.insert(
            index,
            Conn {
                session,
                static_public,
                node: None,
                addr,
                last_seen: now,
                nat: NatType::Unknown,
                budget: (2.0 * f64::from(self.rate), now),
                newest: None,
                checks_paths: false,
                check: None,
            },
        );
        true
    }

    /// Control sessions, registered or not.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True if there is no control session.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Nodes online (registered on a session).
    pub fn online_count(&self) -> usize {
        self.online.len()
    }

    /// A session.
    pub fn get(&self, index: u32) -> Option<&Conn> {
        self.conns.get(&index)
    }

    /// The session of an online node.
    pub fn online(&self, id: &NodeId) -> Option<(u32, &Conn)> {
        let index = *self.online.get(id)?;
        Some((index, self.conns.get(&index)?))
    }

    /// The session of every node online here, each once (its newest).
    pub fn registered(&self) -> impl Iterator<Item = u32> + '_ {
        self.online
            .values()
            .copied()
            .filter(|i| self.conns.contains_key(i))
    }

    /// The node whose control session is at `addr` (relayed datagrams are
    /// accepted only from there).
    pub fn node_at(&self, addr: &SocketAddr) -> Option<NodeId> {
        self.by_addr.get(addr).copied()
    }

    /// Session `index` is node `id` (it registered): the node is online
    /// there, at the session's current address.
    pub fn attach(&mut self, index: u32, id: NodeId, nat: NatType) {
        let Some(c) = self.conns.get_mut(&index) else {
            return;
        };
        c.node = Some(id);
        c.nat = nat;
        let addr = c.addr;
        self.point(id, addr);
        if let Some(old) = self.online.insert(id, index) {
            if old != index {
                debug!(%id, "node reconnected");
            }
        }
    }

    /// Node `id` is at `addr` now (and nowhere else).
    fn point(&mut self, id: NodeId, addr: SocketAddr) {
        if let Some(old) = self.addr_of.insert(id, addr) {
            if self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
        }
        if let Some(other) = self.by_addr.insert(addr, id) {
            // Another node was last seen at this address: it is not there
            // any more.
            if other != id && self.addr_of.get(&other) == Some(&addr) {
                self.addr_of.remove(&other);
            }
        }
    }

    /// Node `id` attached to another instance: its session here (if any)
    /// is forgotten, so nothing goes to it from here any more. True if
    /// there was one.
    pub fn detach(&mut self, id: &NodeId) -> bool {
        let Some(index) = self.online.remove(id) else {
            return false;
        };
        self.conns.remove(&index);
        if let Some(addr) = self.addr_of.remove(id) {
            if self.by_addr.get(&addr) == Some(id) {
                self.by_addr.remove(&addr);
            }
        }
        true
    }

    /// Authenticates and decodes a control datagram (a data packet on a
    /// session). Any authenticated datagram, a keepalive too, updates where
    /// the session (and its node) was last heard from.
    pub fn open(
        &mut self,
        buf: &mut [u8],
        from: SocketAddr,
        now: Instant,
        stats: &Stats,
    ) -> Option<Opened> {
        let Ok(h) = DataHeader::parse(buf) else {
            bump(&stats.dropped_malformed);
            return None;
        };
        let Some(conn) = self.conns.get_mut(&h.receiver_index) else {
            bump(&stats.dropped_auth);
            return None;
        };
        let Ok(n) = conn.session.open(buf) else {
            bump(&stats.dropped_auth);
            return None;
        };
        conn.last_seen = now;
        // Only the node's newest datagram moves it: one that is older than
        // a datagram already authenticated (held back and sent from
        // elsewhere, or replayed before its original arrived) is read but
        // moves nothing, so whoever captures a datagram cannot redirect
        // the node's pushes and relayed traffic with it.
        let newest = conn.newest.is_none_or(|n| h.counter > n);
        if newest {
            conn.newest = Some(h.counter);
        }
        let mut msg = if n == 0 {
            None // keepalive
        } else {
            match messages::decode(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + n]) {
                Ok(msg) => {
                    bump(&stats.messages);
                    Some(msg)
                }
                Err(e) => {
                    debug!(%from, "undecodable control message: {e}");
                    bump(&stats.refused);
                    None
                }
            }
        };
        // And a node that answers path checks moves only once it answered
        // one from the new address: someone who rewrites the source of
        // one of its datagrams (on the path) cannot point its traffic at
        // a third host that never asked for it.
        let mut moved = false;
        let mut check = None;
        if let Some(ToRegistry::PathConfirm { token }) = msg {
            msg = None; // answered here
            match conn.check {
                Some(c) if c.token == token && c.addr == from => {
                    conn.check = None;
                    conn.checks_paths = true;
                    moved = conn.addr != from;
                }
                _ => bump(&stats.refused),
            }
        } else if newest && conn.addr != from {
            if conn.checks_paths {
                let token = match conn.check {
                    // Asked already: again only if the answer is late.
                    Some(c) if c.addr == from => (now.saturating_duration_since(c.sent)
                        >= CHECK_AGAIN_AFTER)
                        .then_some(c.token),
                    _ => {
                        self.tokens += 1;
                        Some(self.tokens)
                    }
                };
                if let Some(token) = token {
                    conn.check = Some(PathCheck {
                        addr: from,
                        token,
                        sent: now,
                    });
                    check = Some((from, token));
                }
            } else {
                moved = true;
            }
        }
        if moved {
            conn.addr = from;
        }
        // The first datagram of a session asks whether the node answers
        // path checks (at the address the handshake came from).
        if !conn.checks_paths && conn.check.is_none() {
            self.tokens += 1;
            conn.check = Some(PathCheck {
                addr: conn.addr,
                token: self.tokens,
                sent: now,
            });
            check = Some((conn.addr, self.tokens));
        }
        let node = conn.node;
        let roamed = node.filter(|_| moved);
        if let Some(id) = roamed {
            self.point(id, from);
        }
        Some(Opened {
            index: h.receiver_index,
            msg,
            roamed,
            check,
        })
    }

    /// Seals a path check (`Opened::check`) on session `index` into `out`
    /// (cleared first); false if the session is gone.
    pub fn seal_check(&self, index: u32, token: u64, out: &mut Vec<u8>) -> bool {
        let Some(conn) = self.conns.get(&index) else {
            return false;
        };
        let Ok(bytes) = messages::encode(&FromRegistry::PathCheck { token }) else {
            return false;
        };
        out.clear();
        frame::push_sealed(out, &conn.session.sender, None, &bytes).is_ok()
    }

    /// Seals a reply into `out` (cleared first) and says where it goes;
    /// `None` if its session is gone.
    pub fn seal(&self, reply: &Reply, out: &mut Vec<u8>) -> Option<SocketAddr> {
        let conn = self.conns.get(&reply.to)?;
        let bytes = match messages::encode(&reply.msg) {
            Ok(b) => b,
            Err(e) => {
                warn!("cannot encode reply: {e}");
                return None;
            }
        };
        out.clear();
        frame::push_sealed(out, &conn.session.sender, None, &bytes).ok()?;
        Some(conn.addr)
    }

    /// Forgets sessions past their reject age, or silent as long (the node
    /// rekeys well before either), and what pointed at them.
    pub fn expire(&mut self, now: Instant) {
        self.conns.retain(|_, c| {
            now.saturating_duration_since(c.session.created) < REJECT_AFTER
                && now.saturating_duration_since(c.last_seen) < REJECT_AFTER
        });
        let conns = &self.conns;
        self.online.retain(|_, i| conns.contains_key(i));
        let online = &self.online;
        self.by_addr.retain(|_, n| online.contains_key(n));
        self.addr_of.retain(|n, _| online.contains_key(n));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pilot_proto::session::CipherSuite;
    use std::time::Duration;

    /// A session pair as if a handshake had run: (the registry's, the node's).
    pub(crate) fn pair(index: u32, now: Instant) -> (Session, Session) {
        let (k1, k2) = ([index as u8; 32], [!(index as u8); 32]);
        let reg = Session::new(
            CipherSuite::Aes256Gcm,
            index,
            1000 + index,
            &k1,
            &k2,
            false,
            now,
        );
        let node = Session::new(
            CipherSuite::Aes256Gcm,
            1000 + index,
            index,
            &k2,
            &k1,
            true,
            now,
        );
        (reg, node)
    }

    /// A control datagram the node sends on its session.
    pub(crate) fn sealed(node: &Session, msg: &ToRegistry) -> Vec<u8> {
        let mut out = vec![];
        frame::push_sealed(
            &mut out,
            &node.sender,
            None,
            &messages::encode(msg).unwrap(),
        )
        .unwrap();
        out
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], port))
    }

    /// What the node reads of a path check the registry sealed for it.
    fn check_token(s: &Sessions, index: u32, token: u64, node: &Session) -> u64 {
        let mut out = vec![];
        assert!(s.seal_check(index, token, &mut out));
        let n = node.open(&mut out).expect("the node opens the check");
        match messages::decode(&out[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap() {
            FromRegistry::PathCheck { token } => token,
            other => panic!("not a path check: {other:?}"),
        }
    }

    #[test]
    fn a_node_that_answers_path_checks_moves_only_once_it_answered_from_there() {
        let now = Instant::now();
        let stats = Stats::default();
        let mut s = Sessions::default();
        let (reg, node) = pair(6, now);
        assert!(s.install(reg, [1; 32], addr(1), now));
        // The session's first datagram asks whether the node answers checks.
        let o = s
            .open(
                &mut sealed(&node, &ToRegistry::Ping { req: 1 }),
                addr(1),
                now,
                &stats,
            )
            .unwrap();
        let (to, t1) = o.check.expect("a check with the first datagram");
        assert_eq!(to, addr(1));
        assert!(!s.get(6).unwrap().checks_paths);
        let t1 = check_token(&s, 6, t1, &node);
        let confirm = |t| sealed(&node, &ToRegistry::PathConfirm { token: t });
        let o = s.open(&mut confirm(t1), addr(1), now, &stats).unwrap();
        assert_eq!(
            (o.msg, o.roamed, o.check),
            (None, None, None),
            "answered here"
        );
        assert!(s.get(6).unwrap().checks_paths);
        let id = NodeId([8; 16]);
        s.attach(6, id, NatType::None);

        // Its newest datagram from elsewhere (a new NAT mapping, or a
        // source rewritten on the path): a check goes there, nothing moves.
        let o = s
            .open(
                &mut sealed(&node, &ToRegistry::Ping { req: 2 }),
                addr(9),
                now,
                &stats,
            )
            .unwrap();
        assert_eq!(o.msg, Some(ToRegistry::Ping { req: 2 }), "still read");
        assert_eq!(o.roamed, None);
        let (to, t2) = o.check.expect("a check to the new address");
        assert_eq!(to, addr(9));
        assert_ne!(t2, t1);
        assert_eq!(s.node_at(&addr(1)), Some(id));
        assert_eq!(
            s.node_at(&addr(9)),
            None,
            "relayed datagrams from there are refused"
        );
        let mut out = vec![];
        let reply = Reply {
            to: 6,
            msg: FromRegistry::Ok { req: 2 },
        };
        assert_eq!(
            s.seal(&reply, &mut out),
            Some(addr(1)),
            "answers go where it was"
        );
        // More from there: asked once, again only when the answer is late.
        let o = s.open(&mut confirm(99), addr(9), now, &stats).unwrap();
        assert_eq!(
            (o.roamed, o.check),
            (None, None),
            "a wrong token moves nothing"
        );
        let mut k = vec![];
        frame::push_sealed(&mut k, &node.sender, None, &[]).unwrap();
        assert_eq!(s.open(&mut k, addr(9), now, &stats).unwrap().check, None);
        let later = now + CHECK_AGAIN_AFTER;
        let mut k = vec![];
        frame::push_sealed(&mut k, &node.sender, None, &[]).unwrap();
        assert_eq!(
            s.open(&mut k, addr(9), later, &stats).unwrap().check,
            Some((addr(9), t2))
        );
        // The right token from another address moves nothing either.
        let o = s.open(&mut confirm(t2), addr(3), later, &stats).unwrap();
        assert_eq!(o.roamed, None);
        assert_eq!(s.node_at(&addr(1)), Some(id));

        // The node at addr(2) for real: checked, answered from there, moved.
        let o = s
            .open(
                &mut sealed(&node, &ToRegistry::Ping { req: 3 }),
                addr(2),
                later,
                &stats,
            )
            .unwrap();
        let (to, t3) = o.check.unwrap();
        assert_eq!(to, addr(2));
        let t3 = check_token(&s, 6, t3, &node);
        let mut answer = confirm(t3);
        let copy = answer.clone();
        let o = s.open(&mut answer, addr(2), later, &stats).unwrap();
        assert_eq!((o.msg, o.roamed), (None, Some(id)));
        assert_eq!(s.node_at(&addr(2)), Some(id));
        assert_eq!(s.node_at(&addr(1)), None);
        assert_eq!(s.seal(&reply, &mut out), Some(addr(2)));
        // A captured answer replayed from elsewhere is refused by the
        // session's replay window.
        assert!(s.open(&mut copy.clone(), addr(4), later, &stats).is_none());
        assert_eq!(s.node_at(&addr(2)), Some(id));
    }

    #[test]
    fn messages_open_replies_seal_and_roaming_moves_the_node() {
        let now = Instant::now();
        let stats = Stats::default();
        let mut s = Sessions::default();
        let (reg, node) = pair(5, now);
        assert!(s.install(reg, [1; 32], addr(1), now));
        let (dup, _) = pair(5, now);
        assert!(!s.install(dup, [2; 32], addr(2), now), "index in use");

        let mut d = sealed(&node, &ToRegistry::Ping { req: 3 });
        let o = s.open(&mut d, addr(1), now, &stats).unwrap();
        assert_eq!(
            (o.index, o.msg, o.roamed),
            (5, Some(ToRegistry::Ping { req: 3 }), None)
        );

        let id = NodeId([7; 16]);
        s.attach(5, id, NatType::None);
        assert_eq!(s.node_at(&addr(1)), Some(id));
        assert_eq!(s.online(&id).map(|(i, _)| i), Some(5));

        // The node moves: a keepalive from elsewhere is enough.
        let mut keepalive = vec![];
        frame::push_sealed(&mut keepalive, &node.sender, None, &[]).unwrap();
        let o = s.open(&mut keepalive, addr(2), now, &stats).unwrap();
        assert_eq!((o.msg, o.roamed), (None, Some(id)));
        assert_eq!(s.node_at(&addr(2)), Some(id));
        assert_eq!(s.node_at(&addr(1)), None);
        let mut d = sealed(&node, &ToRegistry::Ping { req: 4 });
        assert_eq!(
            s.open(&mut d, addr(2), now, &stats).unwrap().roamed,
            None,
            "moved once"
        );

        // A reply is sealed for the node, to where it is now.
        let mut out = vec![];
        let to = s
            .seal(
                &Reply {
                    to: 5,
                    msg: FromRegistry::Ok { req: 4 },
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(to, addr(2));
        let n = node.open(&mut out).unwrap();
        let back: FromRegistry =
            messages::decode(&out[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).unwrap();
        assert_eq!(back, FromRegistry::Ok { req: 4 });
        assert!(s
            .seal(
                &Reply {
                    to: 6,
                    msg: FromRegistry::Ok { req: 1 }
                },
                &mut out
            )
            .is_none());
    }

    #[test]
    fn forged_replayed_and_junk_datagrams_are_dropped_and_counted() {
        let now = Instant::now();
        let stats = Stats::default();
        let mut s = Sessions::default();
        let (reg, node) = pair(5, now);
        s.install(reg, [1; 32], addr(1), now);
        let good = sealed(&node, &ToRegistry::Ping { req: 1 });
        let mut d = good.clone();
        assert!(s.open(&mut d, addr(1), now, &stats).is_some());
        let mut replay = good.clone();
        assert!(s.open(&mut replay, addr(9), now, &stats).is_none());
        let mut flipped = sealed(&node, &ToRegistry::Ping { req: 2 });
        flipped[20] ^= 1;
        assert!(s.open(&mut flipped, addr(1), now, &stats).is_none());
        let mut short = vec![0xA4, 0, 0, 0];
        assert!(s.open(&mut short, addr(1), now, &stats).is_none());
        let (_, stranger) = pair(6, now);
        let mut d = sealed(&stranger, &ToRegistry::Ping { req: 1 });
        assert!(
            s.open(&mut d, addr(1), now, &stats).is_none(),
            "no such session"
        );
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(stats.dropped_auth.load(Relaxed), 3);
        assert_eq!(stats.dropped_malformed.load(Relaxed), 1);
        assert_eq!(
            s.get(5).unwrap().addr,
            addr(1),
            "a replay from elsewhere moves nothing"
        );
        // Not a control message: refused, nothing to hand on.
        let mut junk = vec![];
        frame::push_sealed(&mut junk, &node.sender, None, &[0xff, 0xff]).unwrap();
        assert!(s
            .open(&mut junk, addr(1), now, &stats)
            .unwrap()
            .msg
            .is_none());
        assert_eq!(stats.refused.load(Relaxed), 1);
    }

    /// Who is at which address, through reconnects, an address that
    /// passes to another node, and a node leaving for another instance.
    #[test]
    fn each_node_is_at_one_address_and_each_address_names_one_node() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        for (index, port) in [(1, 1), (2, 2), (3, 3)] {
            let (reg, _) = pair(index, now);
            assert!(s.install(reg, [index as u8; 32], addr(port), now));
        }
        s.attach(1, a, NatType::None);
        s.attach(2, b, NatType::None);
        assert_eq!(
            (s.node_at(&addr(1)), s.node_at(&addr(2))),
            (Some(a), Some(b))
        );
        // a reconnects on a new session at port 3: port 1 is nobody's.
        s.attach(3, a, NatType::None);
        assert_eq!(s.node_at(&addr(1)), None);
        assert_eq!(s.node_at(&addr(3)), Some(a));
        assert_eq!(s.online(&a).map(|(i, _)| i), Some(3));
        // b's port is taken over by a new session of a (a NAT reused it):
        // the address names a only, and b is at no address any more.
        let (reg, _) = pair(4, now);
        assert!(s.install(reg, [4; 32], addr(2), now));
        s.attach(4, a, NatType::None);
        assert_eq!(s.node_at(&addr(2)), Some(a));
        assert_eq!(s.node_at(&addr(3)), None);
        // b comes back at port 5; a leaves for another instance.
        let (reg, _) = pair(5, now);
        assert!(s.install(reg, [5; 32], addr(5), now));
        s.attach(5, b, NatType::None);
        assert_eq!(s.node_at(&addr(5)), Some(b));
        assert!(s.detach(&a));
        assert!(!s.detach(&a), "once");
        assert_eq!(s.node_at(&addr(2)), None);
        assert!(s.online(&a).is_none());
        assert_eq!(s.node_at(&addr(5)), Some(b), "b untouched");
    }

    /// A datagram held back by someone on the path and sent from another
    /// source after the node's newer ones arrived is authentic and not a
    /// replay, so it is read; but it does not move the node there, and a
    /// relayed datagram from that source is nobody's.
    #[test]
    fn an_older_datagram_from_elsewhere_does_not_move_the_node() {
        let now = Instant::now();
        let stats = Stats::default();
        let mut s = Sessions::default();
        let (reg, node) = pair(5, now);
        s.install(reg, [1; 32], addr(1), now);
        let id = NodeId([7; 16]);
        s.attach(5, id, NatType::None);
        let held = sealed(&node, &ToRegistry::Ping { req: 1 });
        let mut newer = sealed(&node, &ToRegistry::Ping { req: 2 });
        assert!(s.open(&mut newer, addr(1), now, &stats).is_some());
        let mut d = held.clone();
        let o = s.open(&mut d, addr(66), now, &stats).unwrap();
        assert_eq!((o.msg, o.roamed), (Some(ToRegistry::Ping { req: 1 }), None));
        assert_eq!(s.get(5).unwrap().addr, addr(1), "not moved");
        assert_eq!(s.node_at(&addr(66)), None, "the spoofed source is nobody");
        assert_eq!(s.node_at(&addr(1)), Some(id));
        // Its newest datagram from a new address does move it.
        let mut d = sealed(&node, &ToRegistry::Ping { req: 3 });
        let o = s.open(&mut d, addr(2), now, &stats).unwrap();
        assert_eq!(o.roamed, Some(id));
        assert_eq!(s.node_at(&addr(2)), Some(id));
    }

    #[test]
    fn a_session_sends_its_budget_of_messages_and_no_more() {
        let now = Instant::now();
        let mut s = Sessions::new(10, 8);
        let (reg, _) = pair(5, now);
        assert!(s.install(reg, [1; 32], addr(1), now));
        let (other, _) = pair(6, now);
        assert!(s.install(other, [2; 32], addr(2), now));
        let burst = (0..100).filter(|_| s.allow(5, now)).count();
        assert_eq!(burst, 20, "a burst of twice the rate");
        assert!(!s.allow(5, now));
        assert!(s.allow(6, now), "another session has its own budget");
        // Then the rate: one every 100 ms.
        assert!(s.allow(5, now + Duration::from_millis(100)));
        assert!(!s.allow(5, now + Duration::from_millis(150)));
        let later = now + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| s.allow(5, later)).count(), 20);
        assert!(!s.allow(7, now), "no such session");
        let mut free = Sessions::new(0, 8);
        let (reg, _) = pair(5, now);
        free.install(reg, [1; 32], addr(1), now);
        assert!((0..10_000).all(|_| free.allow(5, now)), "0: no limit");
    }

    #[test]
    fn sessions_are_bounded() {
        let now = Instant::now();
        let mut s = Sessions::new(10, 3);
        for i in 0..3 {
            let (reg, _) = pair(i, now);
            assert!(s.install(reg, [i as u8; 32], addr(i as u16), now));
        }
        let (reg, _) = pair(9, now);
        assert!(!s.install(reg, [9; 32], addr(9), now), "full");
        assert_eq!(s.len(), 3);
        // Once the old ones expire there is room again.
        s.expire(now + REJECT_AFTER);
        let (reg, _) = pair(9, now + REJECT_AFTER);
        assert!(s.install(reg, [9; 32], addr(9), now + REJECT_AFTER));
    }

    #[test]
    fn silent_or_old_sessions_expire_with_their_node() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let (reg, _) = pair(5, now);
        s.install(reg, [1; 32], addr(1), now);
        let id = NodeId([7; 16]);
        s.attach(5, id, NatType::None);
        s.expire(now + Duration::from_secs(10));
        assert!(s.online(&id).is_some());
        s.expire(now + REJECT_AFTER);
        assert!(s.get(5).is_none());
        assert!(s.online(&id).is_none());
        assert_eq!(s.node_at(&addr(1)), None);
    }
}
