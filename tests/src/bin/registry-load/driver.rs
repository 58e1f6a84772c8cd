//! Many simulated nodes over one UDP socket: each has its own Noise session
//! with the registry (as a node's `RegistryLink` does), and the socket keeps
//! a window of requests in flight across them. Answers are told apart by
//! the session index in each datagram's header, then by request id.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pilot_proto::frame;
use pilot_proto::handshake::{self, Initiator, MacKey};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::messages::{
    self, ErrorCode, FromRegistry, NatType, PeerRef, Registration, Signed, Statement,
    StatementKind, ToRegistry,
};
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::wire::{self, DataHeader, Kind, DATA_HEADER_LEN};
use tokio::net::UdpSocket;

/// An answer later than this: the request is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(1000);
/// A "busy" answer: the request is sent again after this.
const BUSY_PAUSE: Duration = Duration::from_millis(100);
/// Handshakes one source starts at once, and per second after: under the
/// registry's per-source limit (5 at once, 20/s), so none is dropped.
const HANDSHAKE_BURST: f64 = 4.0;
const HANDSHAKE_RATE: f64 = 18.0;

/// One simulated node.
pub struct Member {
    pub id: Identity,
    /// Its index among all nodes of the run (its session index is this + 1).
    pub global: usize,
    /// The registry instance it talks to.
    pub to: SocketAddr,
    pub session: Option<Session>,
    next_req: u32,
    reg_seq: u64,
}

impl Member {
    pub fn new(id: Identity, global: usize, to: SocketAddr) -> Self {
        Member {
            id,
            global,
            to,
            session: None,
            next_req: 1,
            reg_seq: 0,
        }
    }
}

/// What one operation asks.
#[derive(Clone, Debug)]
pub enum Op {
    /// Handshake, then `Register`.
    Register,
    /// An `Approve` statement about `to`, the signer's `seq`-th.
    Approve { to: NodeId, seq: u64 },
    /// A lookup.
    Lookup(PeerRef),
}

/// A socket and the nodes on it.
pub struct Group {
    pub sock: Arc<UdpSocket>,
    pub members: Vec<Member>,
}

/// What one group's share of a phase came to.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub busy: u64,
    pub resent: u64,
    pub latencies_us: Vec<u64>,
}

impl Tally {
    pub fn add(&mut self, o: Tally) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.busy += o.busy;
        self.resent += o.resent;
        self.latencies_us.extend(o.latencies_us);
    }
}

enum Step {
    Handshake(Box<Initiator>),
    Request,
}

struct InFlight {
    member: usize,
    op: Op,
    step: Step,
    began: Instant,
    sent: Instant,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Handshake timestamps must grow per initiator; one counter keeps them so
/// across all the nodes of the process.
static CLOCK: AtomicU64 = AtomicU64::new(0);

impl Group {
    /// Runs `ops` (member index within the group, operation), `window` at a
    /// time, until all are answered or `deadline`.
    pub async fn run(&mut self, ops: Vec<(usize, Op)>, window: usize, deadline: Instant) -> Tally {
        let mut t = Tally::default();
        let mut queue: VecDeque<(usize, Op, Option<Instant>)> =
            ops.into_iter().map(|(m, op)| (m, op, None)).collect();
        // Busy answers wait here until their pause is over: (when, member, op, began).
        let mut later: VecDeque<(Instant, usize, Op, Instant)> = VecDeque::new();
        let mut flying: HashMap<(usize, u32), InFlight> = HashMap::new();
        let mut shaking: HashMap<usize, InFlight> = HashMap::new();
        let by_index: HashMap<u32, usize> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.global as u32 + 1, i))
            .collect();
        let mut tokens = HANDSHAKE_BURST;
        let mut refilled = Instant::now();
        let mut buf = vec![0u8; 65536];
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokens = (tokens + now.duration_since(refilled).as_secs_f64() * HANDSHAKE_RATE)
                .min(HANDSHAKE_BURST);
            refilled = now;
            while later.front().is_some_and(|l| l.0 <= now) {
                let (_, m, op, began) = later.pop_front().expect("checked above");
                queue.push_front((m, op, Some(began)));
            }
            // Fill the window.
            // Requests waiting out a "busy" count against the window too: sending
            // others meanwhile would only meet the same full queue.
            while flying.len() + shaking.len() + later.len() < window {
                let Some((m, op, began)) = queue.pop_front() else {
                    break;
                };
                let began = began.unwrap_or(now);
                if self.members[m].session.is_none() {
                    if shaking.contains_key(&m) || tokens < 1.0 {
                        queue.push_front((m, op, Some(began)));
                        break;
                    }
                    tokens -= 1.0;
                    match self.initiate(m).await {
                        Some(init) => {
                            shaking.insert(
                                m,
                                InFlight {
                                    member: m,
                                    op,
                                    step: Step::Handshake(Box::new(init)),
                                    began,
                                    sent: now,
                                },
                            );
                        }
                        None => t.failed += 1,
                    }
                } else {
                    let req = self.send_op(m, &op).await;
                    flying.insert(
                        (m, req),
                        InFlight {
                            member: m,
                            op,
                            step: Step::Request,
                            began,
                            sent: now,
                        },
                    );
                }
            }
            if queue.is_empty() && later.is_empty() && flying.is_empty() && shaking.is_empty() {
                break;
            }
            // Resend what got no answer.
            let stale: Vec<(usize, u32)> = flying
                .iter()
                .filter(|(_, f)| now.duration_since(f.sent) >= RESEND_AFTER)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some(f) = flying.remove(&k) {
                    t.resent += 1;
                    queue.push_front((f.member, f.op, Some(f.began)));
                }
            }
            let stale: Vec<usize> = shaking
                .iter()
                .filter(|(_, f)| now.duration_since(f.sent) >= RESEND_AFTER)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some(f) = shaking.remove(&k) {
                    t.resent += 1;
                    queue.push_front((f.member, f.op, Some(f.began)));
                }
            }
            // Wait for answers (briefly, so the timers above run).
            let wait = if tokens < 1.0 && !queue.is_empty() {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(50)
            };
            let Ok(Ok((n, _))) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await
            else {
                continue;
            };
            let mut pending = Some(n);
            while let Some(n) = pending.take() {
                let got = Instant::now();
                self.on_datagram(
                    &mut buf[..n],
                    &by_index,
                    &mut flying,
                    &mut shaking,
                    &mut later,
                    &mut t,
                    got,
                )
                .await;
                // Drain what else is already there without waiting.
                if let Ok((n, _)) = self.sock.try_recv_from(&mut buf) {
                    pending = Some(n);
                }
            }
        }
        t.failed += (queue.len() + later.len() + flying.len() + shaking.len()) as u64;
        t
    }

    async fn initiate(&mut self, m: usize) -> Option<Initiator> {
        let member = &self.members[m];
        let ts = CLOCK.fetch_add(1, Ordering::Relaxed) + unix_nanos();
        let (init, msg) = handshake::initiate(
            member.id.static_secret(),
            &REGISTRY_KEY.get().copied()?,
            member.global as u32 + 1,
            ts,
            CipherSuite::Aes256Gcm,
        )
        .ok()?;
        let _ = self.sock.send_to(&msg, member.to).await;
        Some(init)
    }

    /// Seals and sends `op`'s request on member `m`'s session; its request id.
    async fn send_op(&mut self, m: usize, op: &Op) -> u32 {
        let member = &mut self.members[m];
        let req = member.next_req;
        member.next_req = member.next_req.wrapping_add(1).max(1);
        let msg = match op {
            Op::Register => {
                member.reg_seq += 1;
                ToRegistry::Register {
                    req,
                    reg: Signed::sign(
                        Registration {
                            identity: member.id.public(),
                            hostname: None,
                            seq: member.reg_seq,
                            local_endpoints: vec![],
                            nat: NatType::Unknown,
                        },
                        &member.id,
                    ),
                }
            }
            Op::Approve { to, seq } => ToRegistry::Statement {
                req,
                statement: Signed::sign(
                    Statement {
                        kind: StatementKind::Approve,
                        from: member.id.public(),
                        to: *to,
                        seq: *seq,
                    },
                    &member.id,
                ),
            },
            Op::Lookup(peer) => ToRegistry::Lookup {
                req,
                peer: peer.clone(),
            },
        };
        self.send_msg(m, &msg).await;
        req
    }

    async fn send_msg(&self, m: usize, msg: &ToRegistry) {
        let member = &self.members[m];
        let Some(session) = &member.session else {
            return;
        };
        let Ok(bytes) = messages::encode(msg) else {
            return;
        };
        let mut out = Vec::with_capacity(bytes.len() + 64);
        if frame::push_sealed(&mut out, &session.sender, None, &bytes).is_ok() {
            let _ = self.sock.send_to(&out, member.to).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_datagram(
        &mut self,
        buf: &mut [u8],
        by_index: &HashMap<u32, usize>,
        flying: &mut HashMap<(usize, u32), InFlight>,
        shaking: &mut HashMap<usize, InFlight>,
        later: &mut VecDeque<(Instant, usize, Op, Instant)>,
        t: &mut Tally,
        now: Instant,
    ) {
        match wire::classify(buf) {
            Kind::HandshakeResp => {
                let Ok(resp) = wire::HandshakeResp::new_checked(buf) else {
                    return;
                };
                let Some(&m) = by_index.get(&resp.receiver_index()) else {
                    return;
                };
                let Some(f) = shaking.remove(&m) else {
                    return;
                };
                let Step::Handshake(init) = f.step else {
                    return;
                };
                let own_mac = MacKey::for_static(&self.members[m].id.static_public());
                match init.finish(&own_mac, resp, now) {
                    Ok(s) => {
                        self.members[m].session = Some(s);
                        let req = self.send_op(m, &f.op).await;
                        flying.insert(
                            (m, req),
                            InFlight {
                                step: Step::Request,
                                sent: now,
                                ..f
                            },
                        );
                    }
                    Err(_) => t.failed += 1,
                }
            }
            Kind::Data => {
                let Ok(h) = DataHeader::parse(buf) else {
                    return;
                };
                let Some(&m) = by_index.get(&h.receiver_index) else {
                    return;
                };
                let Some(session) = &self.members[m].session else {
                    return;
                };
                let Ok(n) = session.open(buf) else {
                    return;
                };
                let Ok(msg) =
                    messages::decode::<FromRegistry>(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + n])
                else {
                    return;
                };
                let (req, outcome) = match msg {
                    FromRegistry::Push { id, .. } => {
                        // Acknowledged as a node does, so the registry's
                        // mailbox does not fill.
                        self.send_msg(m, &ToRegistry::Ack { push: id }).await;
                        return;
                    }
                    FromRegistry::Registered { req, .. }
                    | FromRegistry::Ok { req }
                    | FromRegistry::Peer { req, .. } => (req, Ok(())),
                    FromRegistry::Error { req, code, .. } => (req, Err(code)),
                    _ => return,
                };
                let Some(f) = flying.remove(&(m, req)) else {
                    return;
                };
                match outcome {
                    Ok(()) => {
                        t.ok += 1;
                        t.latencies_us
                            .push(now.duration_since(f.began).as_micros() as u64);
                    }
                    Err(ErrorCode::Busy) => {
                        t.busy += 1;
                        later.push_back((now + BUSY_PAUSE, m, f.op, f.began));
                    }
                    Err(_) => t.failed += 1,
                }
            }
            _ => {}
        }
    }
}

/// The registry's static key, from the join URL (one for every instance).
pub static REGISTRY_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
