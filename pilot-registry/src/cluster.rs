//! Several active registry instances on one PostgreSQL database.
//!
//! Every instance shares the registry key (a copy of `registry.key`) and
//! the database; a node is attached to one instance at a time (the one it
//! registered with last, recorded in the `attached` table). What one
//! instance learns that concerns a node attached to another, it says on
//! PostgreSQL's LISTEN/NOTIFY channel [`CHANNEL`]:
//!
//! - [`Event::Mail`]: a statement was stored for a node that is not online
//!   here; the instance that has it online reads its mail at once.
//! - [`Event::Punch`]: a node looked up a peer attached elsewhere; that
//!   instance tells the peer to probe back now (hole punching).
//! - [`Event::Revoked`]: an owner revocation was kept; every instance
//!   tells the nodes online on it.
//! - [`Event::Attached`]: a node registered here; another instance that
//!   still held a session for it lets it go, and relays learn where it is.
//!
//! Events are tagged with a key derived from the registry's secret and
//! carry their send time (refused outside [`EVENT_WINDOW`]): the database
//! carries them, but a database user who is not a registry cannot make
//! one. After its listening connection is lost and found again an
//! instance hears [`Heard::Resync`] and reads every online node's mail.
//!
//! Relaying between two nodes attached to different instances: the
//! sender's instance checks the pair's approvals and the sender's budget
//! as for any relayed datagram, then passes it, in an instance frame
//! ([`Cluster::frame`], `MSG_INSTANCE` in `pilot_proto::wire`), to the
//! recipient's instance, which checks the frame's tag and time and hands
//! it to the recipient over its own session. The recipient therefore only
//! ever hears its own instance, which is the only registry address its
//! NAT lets in and the only one it accepts relayed datagrams from.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pilot_proto::identity::NodeId;
use pilot_proto::messages::NatType;
use pilot_proto::wire::MSG_INSTANCE;
use postgres::fallible_iterator::FallibleIterator;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The LISTEN/NOTIFY channel the instances share.
pub const CHANNEL: &str = "pilot_registry";
/// Events and frames older or newer than this (by their send time) are
/// refused.
pub const EVENT_WINDOW: Duration = Duration::from_secs(30);
/// Length of an instance frame's header: type, reserved, recipient, time,
/// tag.
pub const FRAME_HEADER_LEN: usize = 4 + 16 + 8 + TAG_LEN;
/// Bytes of the HMAC-SHA256 kept as a tag.
const TAG_LEN: usize = 16;
/// Events waiting for the socket loop; more are dropped (with a log line):
/// a mail event lost is read at the node's next registration, a punch
/// lost is retried by the node's next lookup.
pub const HEARD_QUEUE: usize = 4096;
/// NOTIFY payloads are at most 8000 bytes.
const MAX_PAYLOAD: usize = 7900;

/// What one instance tells the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// A statement waits for `to`.
    Mail {
        /// The recipient.
        to: NodeId,
    },
    /// `from` looked `to` up: `to` should probe `from` now.
    Punch {
        /// The node to tell.
        to: NodeId,
        /// The node that looked it up.
        from: NodeId,
        /// `from`'s NAT type.
        nat: NatType,
        /// `from`'s endpoints, its live session's first.
        endpoints: Vec<SocketAddr>,
    },
    /// An owner revocation was kept (its bytes, hex).
    Revoked {
        /// The signed revocation, hex.
        revocation: String,
    },
    /// `node` registered with the instance at `instance`.
    Attached {
        /// The node.
        node: NodeId,
        /// The instance it is attached to.
        instance: SocketAddr,
    },
}

/// What the listening thread hands the socket loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// An event from another instance, verified.
    Event(Event),
    /// The listening connection was lost and is back: events may have been
    /// missed.
    Resync,
}

/// An event as sent: who, when, what.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The sending instance (random per process).
    i: u64,
    /// Unix milliseconds.
    t: u64,
    /// The event.
    e: Event,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Equal tags, compared in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn fresh(t: u64, now: u64) -> bool {
    t.abs_diff(now) <= EVENT_WINDOW.as_millis() as u64
}

/// This instance in the cluster: its address, its id, the shared key.
#[derive(Clone)]
pub struct Cluster {
    /// Where the other instances reach this one (its advertised address).
    pub me: SocketAddr,
    id: u64,
    key: hmac::Key,
}

impl Cluster {
    /// This instance, at `me`, for the registry whose secret key is
    /// `secret`.
    pub fn new(secret: &[u8; 32], me: SocketAddr) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, b"pilot-registry instances v1");
        let k = hmac::sign(&derive, secret);
        let mut id = [0u8; 8];
        // An id only tells our own events apart: any value works, and the
        // clock's nanoseconds do if the system's randomness fails.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).is_err() {
            id = (unix_ms() ^ u64::from(std::process::id())).to_le_bytes();
        }
        Cluster {
            me,
            id: u64::from_le_bytes(id),
            key: hmac::Key::new(hmac::HMAC_SHA256, k.as_ref()),
        }
    }

    fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(p);
        }
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&ctx.sign().as_ref()[..TAG_LEN]);
        t
    }

    /// `event` as a NOTIFY payload (`<tag hex>.<json>`); `None` if it would
    /// not fit one.
    pub fn payload(&self, event: &Event) -> Option<String> {
        let json = serde_json::to_string(&Envelope {
            i: self.id,
            t: unix_ms(),
            e: event.clone(),
        })
        .ok()?;
        let p = format!(
            "{}.{json}",
            pilot_proto::hex::encode(&self.tag(&[json.as_bytes()]))
        );
        (p.len() <= MAX_PAYLOAD).then_some(p)
    }

    /// A payload another instance sent: `None` if its tag is wrong, it is
    /// stale, it does not parse, or it is our own.
    pub fn open(&self, payload: &str, now_ms: u64) -> Option<Event> {
        let (tag, json) = payload.split_once('.')?;
        let tag = pilot_proto::hex::decode_array::<TAG_LEN>(tag)?;
        let want = self.tag(&[json.as_bytes()]);
        same(&tag, &want).then_some(())?;
        let env: Envelope = serde_json::from_str(json).ok()?;
        (env.i != self.id && fresh(env.t, now_ms)).then_some(env.e)
    }

    /// An instance frame carrying `datagram` (a relay-from datagram) to
    /// node `to`, attached to another instance.
    pub fn frame(&self, to: &NodeId, datagram: &[u8]) -> Vec<u8> {
        self.frame_at(to, datagram, unix_ms())
    }

    fn frame_at(&self, to: &NodeId, datagram: &[u8], t: u64) -> Vec<u8> {
        let mut f = Vec::with_capacity(FRAME_HEADER_LEN + datagram.len());
        f.extend_from_slice(&[MSG_INSTANCE, 0, 0, 0]);
        f.extend_from_slice(&to.0);
        f.extend_from_slice(&t.to_le_bytes());
        let tag = self.tag(&[&f, datagram]);
        f.extend_from_slice(&tag);
        f.extend_from_slice(datagram);
        f
    }

    /// The recipient of an instance frame, if its tag is right and it is
    /// fresh; the datagram is `buf[FRAME_HEADER_LEN..]`.
    pub fn open_frame(&self, buf: &[u8], now_ms: u64) -> Option<NodeId> {
        if buf.len() <= FRAME_HEADER_LEN || buf[..4] != [MSG_INSTANCE, 0, 0, 0] {
            return None;
        }
        let head = &buf[..FRAME_HEADER_LEN - TAG_LEN];
        let want = self.tag(&[head, &buf[FRAME_HEADER_LEN..]]);
        same(&buf[FRAME_HEADER_LEN - TAG_LEN..FRAME_HEADER_LEN], &want).then_some(())?;
        let mut t = [0u8; 8];
        t.copy_from_slice(&buf[20..28]);
        if !fresh(u64::from_le_bytes(t), now_ms) {
            return None;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&buf[4..20]);
        Some(NodeId(id))
    }

    /// Now, as the frames and events count time.
    pub fn now_ms() -> u64 {
        unix_ms()
    }
}

/// The thread [`listen`] started.
pub struct Listening {
    /// The thread.
    pub thread: std::thread::JoinHandle<()>,
    /// Completes once the first LISTEN is in place (events sent from then
    /// on are heard); dropped unanswered if the thread ends first.
    pub ready: tokio::sync::oneshot::Receiver<()>,
}

/// Starts the thread that listens on [`CHANNEL`] with its own connection
/// to `database` and hands verified events to `tx` until `tx`'s receiver
/// is gone. A lost connection is opened again every second; once it is
/// back the loop hears [`Heard::Resync`].
pub fn listen(
    database: postgres::Config,
    cluster: Cluster,
    tx: mpsc::Sender<Heard>,
) -> std::io::Result<Listening> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("cluster-listen".into())
        .spawn(move || {
            let mut ready = Some(ready_tx);
            while !tx.is_closed() {
                match listen_once(&database, &cluster, &tx, &mut ready) {
                    Ok(()) => return,
                    Err(e) => warn!("instance events: {e}; listening again in 1 s"),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(Listening { thread, ready })
}

/// One listening connection, until it fails (an error) or the loop is
/// gone (`Ok`).
fn listen_once(
    database: &postgres::Config,
    cluster: &Cluster,
    tx: &mpsc::Sender<Heard>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), postgres::Error> {
    let mut client = database.connect(postgres::NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    if let Some(r) = ready.take() {
        info!("listening for the other instances' events on {CHANNEL}");
        let _ = r.send(());
    } else {
        info!("listening for the other instances' events again");
        if tx.try_send(Heard::Resync).is_err() && tx.is_closed() {
            return Ok(());
        }
    }
    let mut checked = std::time::Instant::now();
    loop {
        {
            let mut n = client.notifications();
            let mut it = n.timeout_iter(Duration::from_millis(500));
            while let Some(note) = it.next()? {
                match cluster.open(note.payload(), unix_ms()) {
                    Some(ev) => {
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            tx.try_send(Heard::Event(ev))
                        {
                            warn!(
                                "instance events: the socket loop is behind; an event was dropped"
                            );
                        }
                    }
                    None => {
                        debug!("instance events: a payload was refused (bad tag, stale or ours)")
                    }
                }
            }
        }
        if tx.is_closed() {
            return Ok(());
        }
        // A server that went away without closing the connection shows up
        // only when asked.
        if checked.elapsed() >= Duration::from_secs(5) {
            client.is_valid(Duration::from_secs(3))?;
            checked = std::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId([b; 16])
    }

    fn pair() -> (Cluster, Cluster) {
        let secret = [7u8; 32];
        (
            Cluster::new(&secret, "192.0.2.1:7946".parse().unwrap()),
            Cluster::new(&secret, "192.0.2.2:7946".parse().unwrap()),
        )
    }

    #[test]
    fn an_event_reaches_the_other_instance_and_not_its_sender() {
        let (a, b) = pair();
        let ev = Event::Punch {
            to: node(1),
            from: node(2),
            nat: NatType::EndpointIndependent,
            endpoints: vec!["198.51.100.7:4000".parse().unwrap()],
        };
        let p = a.payload(&ev).unwrap();
        assert_eq!(b.open(&p, unix_ms()), Some(ev.clone()));
        assert_eq!(a.open(&p, unix_ms()), None, "an instance ignores its own");
    }

    #[test]
    fn forged_altered_and_stale_events_are_refused() {
        let (a, b) = pair();
        let ev = Event::Mail { to: node(3) };
        let p = a.payload(&ev).unwrap();
        // Another registry's instance (another secret).
        let other = Cluster::new(&[8u8; 32], a.me);
        assert_eq!(b.open(&other.payload(&ev).unwrap(), unix_ms()), None);
        // The body changed under the tag.
        let altered = p.replace(&node(3).to_string(), &node(4).to_string());
        assert_ne!(altered, p);
        assert_eq!(b.open(&altered, unix_ms()), None);
        // Replayed after the window.
        let late = unix_ms() + EVENT_WINDOW.as_millis() as u64 + 1000;
        assert_eq!(b.open(&p, late), None);
        // Garbage.
        for junk in ["", ".", "zz.{}", "00.{}", &p[..p.len() / 2]] {
            assert_eq!(b.open(junk, unix_ms()), None);
        }
    }

    #[test]
    fn frames_carry_the_datagram_and_refuse_tampering() {
        let (a, b) = pair();
        let d = b"\xA6\0\0\0relayed tunnel datagram";
        let f = a.frame(&node(9), d);
        assert_eq!(f.len(), FRAME_HEADER_LEN + d.len());
        assert_eq!(b.open_frame(&f, unix_ms()), Some(node(9)));
        assert_eq!(&f[FRAME_HEADER_LEN..], d);
        // Each byte flipped is refused.
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 1;
            assert_eq!(b.open_frame(&g, unix_ms()), None, "byte {i}");
        }
        // Stale, truncated, empty.
        let old = a.frame_at(&node(9), d, unix_ms() - 60_000);
        assert_eq!(b.open_frame(&old, unix_ms()), None);
        assert_eq!(b.open_frame(&f[..FRAME_HEADER_LEN], unix_ms()), None);
        assert_eq!(b.open_frame(&[], unix_ms()), None);
        // Another registry's frames.
        let other = Cluster::new(&[8u8; 32], a.me);
        assert_eq!(b.open_frame(&other.frame(&node(9), d), unix_ms()), None);
    }

    #[test]
    fn an_event_too_large_for_notify_is_not_made() {
        let (a, _) = pair();
        let big = Event::Revoked {
            revocation: "ab".repeat(5000),
        };
        assert_eq!(a.payload(&big), None);
    }
}
