//! `pilot-tun netcheck`: measures what the network between this host and
//! its registry allows — UDP at all, the NAT type and public endpoint
//! (STUN to the registry's two ports), the registry's and a relay's round
//! trips (a Noise handshake with a throwaway key, then control pings), and
//! whether a port mapping protocol answers on the default gateway — from a
//! UDP socket of its own, so it works with or without a daemon running.
//!
//! Every wait is bounded: a few tries of a few hundred milliseconds each;
//! with nothing answering, the whole check takes about 6 s.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::{Identity, IDENTITY_BYTES};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{self, FromRegistry, ToRegistry};
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::stun;
use pilot_proto::wire::{self, Kind, DATA_HEADER_LEN, TAG_LEN};
use tokio::net::UdpSocket;

use crate::api::{
    exit, ApiError, DaemonNet, ErrorCode, Nat, Netcheck, PortMapping, RelayCheck, Request, Status,
};
use crate::context::{local_endpoints, nat_type};
use crate::control;
use crate::state::StateDir;

/// How long one STUN request or handshake waits before it is sent again.
const TRY_WAIT: Duration = Duration::from_millis(400);
/// How many times a STUN request or a handshake is sent.
const TRIES: u32 = 3;
/// Control pings per instance.
const PINGS: u32 = 3;
/// How long a ping waits for its pong.
const PING_WAIT: Duration = Duration::from_millis(800);
/// How long the gateway has to answer NAT-PMP or PCP.
const MAPPING_WAIT: Duration = Duration::from_millis(1000);
/// The NAT-PMP and PCP server port (RFC 6886, RFC 6887).
const PORT_MAPPING_PORT: u16 = pilot_proto::natpmp::PORT;

/// What `netcheck` was told on the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--registry`: the join URL (else the daemon's, else the saved one).
    pub registry: Option<String>,
    /// `--relay`: a relay-only instance to time (else the daemon's, if it
    /// uses one).
    pub relay: Option<SocketAddr>,
    /// Ask the default gateway for NAT-PMP and PCP (the command line
    /// always does; in-process tests must not: nothing of theirs may
    /// leave loopback).
    pub ask_gateway: bool,
}

/// Runs every check and returns the report.
pub async fn run(state: &StateDir, opts: &Options) -> Result<Netcheck, ApiError> {
    let daemon = daemon_status(state).await;
    let join = registry_url(state, opts, daemon.as_ref())?;
    // The instance the daemon talks to, if it is one of the URL's; else
    // the URL's first.
    let target = daemon
        .as_ref()
        .and_then(|s| s.registry.endpoint)
        .filter(|e| join.has_endpoint(*e))
        .unwrap_or_else(|| join.first());
    let relay = opts
        .relay
        .or_else(|| daemon.as_ref().map(|s| s.relay).filter(|r| *r != target));
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Failed, format!("cannot open a UDP socket: {e}")))?;
    let mut probe = Probe {
        socket,
        buf: vec![0u8; 2048],
    };

    let alt = SocketAddr::new(target.ip(), target.port().wrapping_add(1));
    let public = probe.stun(target).await;
    let public_alt = probe.stun(alt).await;
    let port = probe.socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let nat = nat_type(&local_endpoints(port, false), public, public_alt);

    let registry = probe.instance(&join.key, target).await;
    let relay_check = match relay {
        Some(addr) => Some(RelayCheck {
            addr,
            rtt_ms: probe.instance(&join.key, addr).await.rtt_ms,
        }),
        None => None,
    };
    let port_mapping = if opts.ask_gateway {
        port_mapping().await
    } else {
        PortMapping::default()
    };

    let udp = public.is_some() || public_alt.is_some() || registry.answered;
    let registry_key_ok = if registry.session {
        Some(true)
    } else if udp {
        Some(false)
    } else {
        None
    };
    let problem = if !udp {
        Some(format!(
            "UDP to the registry does not work: {} answered neither STUN nor a handshake within {:.1} s. Is pilot-registry running there, and does a firewall on the way drop UDP to port {}?",
            target,
            (TRY_WAIT * TRIES * 3).as_secs_f64(),
            target.port()
        ))
    } else if !registry.session {
        Some(format!(
            "{} answers STUN but not the handshake: the key in the join URL is not this registry's (copy the URL again from its join-url file), or it is overloaded",
            target
        ))
    } else if registry.rtt_ms.iter().all(Option::is_none) {
        Some(format!(
            "the registry at {} completed the handshake but answered no ping",
            target
        ))
    } else {
        None
    };
    Ok(Netcheck {
        registry: target,
        udp,
        registry_key_ok,
        nat: Nat::from(nat),
        public_endpoint: public,
        public_endpoint_alt: public_alt,
        registry_rtt_ms: registry.rtt_ms,
        relay: relay_check,
        port_mapping,
        daemon: daemon.map(|s| DaemonNet {
            nat: s.nat,
            public_endpoint: s.public_endpoint,
            registry_reachable: s.registry.reachable,
        }),
        problem,
    })
}

/// The exit code of a report: 0 when the registry answered as it should,
/// 5 (try again) when UDP got nothing, 1 for a wrong key or no pongs.
pub fn exit_code(r: &Netcheck) -> u8 {
    match (r.udp, r.problem.is_some()) {
        (false, _) => exit::TRY_AGAIN,
        (true, true) => exit::FAILED,
        (true, false) => exit::OK,
    }
}

/// The status of the daemon of `state`, if one runs and lets us ask.
async fn daemon_status(state: &StateDir) -> Option<Status> {
    if !state.socket().exists() {
        return None;
    }
    let reply = control::call(&state.socket(), &Request::Status, Duration::from_secs(2))
        .await
        .ok()?
        .ok()?;
    Status::try_from(reply).ok()
}

/// The join URL: `--registry`, else the running daemon's, else the one
/// saved in the state directory.
fn registry_url(
    state: &StateDir,
    opts: &Options,
    daemon: Option<&Status>,
) -> Result<JoinUrl, ApiError> {
    let (text, from) = if let Some(r) = &opts.registry {
        (r.clone(), "--registry".to_string())
    } else if let Some(s) = daemon {
        (s.registry.url.clone(), "the running daemon".to_string())
    } else {
        let saved = state.load_node().map_err(|e| {
            ApiError::new(
                ErrorCode::Usage,
                format!("no daemon answered and the saved registry URL cannot be read ({e}): give --registry <join-url>, or run as the daemon's user (sudo)"),
            )
        })?;
        let url = saved.registry.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Usage,
                format!(
                    "no registry to check: give --registry <join-url> ({} holds none, and no daemon answered for it)",
                    state.path.display()
                ),
            )
        })?;
        (url, format!("{}", state.file("node.json").display()))
    };
    text.parse::<JoinUrl>().map_err(|e| {
        ApiError::new(
            ErrorCode::Usage,
            format!("the join URL from {from} ({text:?}): {e}"),
        )
    })
}

/// One registry or relay instance, as the control channel saw it.
struct InstanceCheck {
    /// Anything at all came back (a handshake response or a cookie).
    answered: bool,
    /// The handshake completed: it holds the key.
    session: bool,
    /// Ping round trips.
    rtt_ms: Vec<Option<f64>>,
}

/// The probe's socket and receive buffer.
struct Probe {
    socket: UdpSocket,
    buf: Vec<u8>,
}

impl Probe {
    /// Waits until `until` for a datagram from `from` that `pick` accepts.
    async fn recv_from<T>(
        &mut self,
        from: SocketAddr,
        until: Instant,
        mut pick: impl FnMut(&mut [u8]) -> Option<T>,
    ) -> Option<T> {
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let (n, src) = tokio::time::timeout(left, self.socket.recv_from(&mut self.buf))
                .await
                .ok()?
                .ok()?;
            if src != from {
                continue;
            }
            if let Some(v) = pick(&mut self.buf[..n]) {
                return Some(v);
            }
        }
    }

    /// Our endpoint as the STUN server at `to` sees it.
    async fn stun(&mut self, to: SocketAddr) -> Option<SocketAddr> {
        for _ in 0..TRIES {
            let tid = random_tid();
            let _ = self.socket.send_to(&stun::binding_request(&tid), to).await;
            let until = Instant::now() + TRY_WAIT;
            let got = self
                .recv_from(to, until, |b| stun::parse_binding_response(b, &tid))
                .await;
            if got.is_some() {
                return got;
            }
        }
        None
    }

    /// A handshake with the instance at `addr` (key `key`) under a
    /// throwaway identity, then control pings, each timed.
    async fn instance(&mut self, key: &[u8; 32], addr: SocketAddr) -> InstanceCheck {
        let mut out = InstanceCheck {
            answered: false,
            session: false,
            rtt_ms: vec![None; PINGS as usize],
        };
        let Some(session) = self.handshake(key, addr, &mut out.answered).await else {
            return out;
        };
        out.session = true;
        for (req, slot) in (1..=PINGS).zip(out.rtt_ms.iter_mut()) {
            let Ok(msg) = messages::encode(&ToRegistry::Ping { req }) else {
                continue;
            };
            let mut datagram = vec![0u8; DATA_HEADER_LEN + msg.len() + TAG_LEN];
            datagram[DATA_HEADER_LEN..DATA_HEADER_LEN + msg.len()].copy_from_slice(&msg);
            let Ok(n) = session.sender.seal(&mut datagram, msg.len()) else {
                continue;
            };
            let sent = Instant::now();
            let _ = self.socket.send_to(&datagram[..n], addr).await;
            let pong = self
                .recv_from(addr, sent + PING_WAIT, |b| {
                    if wire::classify(b) != Kind::Data {
                        return None;
                    }
                    let n = session.open(b).ok()?;
                    match messages::decode(&b[DATA_HEADER_LEN..DATA_HEADER_LEN + n]).ok()? {
                        FromRegistry::Pong { req: r, .. } if r == req => Some(()),
                        _ => None,
                    }
                })
                .await;
            if pong.is_some() {
                *slot = Some(round_ms(sent.elapsed()));
            }
        }
        out
    }

    /// The Noise handshake; sets `answered` if anything of ours came back.
    async fn handshake(
        &mut self,
        key: &[u8; 32],
        addr: SocketAddr,
        answered: &mut bool,
    ) -> Option<Session> {
        // A fresh identity: the registry gives an unregistered session
        // pings and nothing else, and no address is taken from its pool.
        let mut secret = [0u8; IDENTITY_BYTES];
        fill_random(&mut secret);
        let me = Identity::from_bytes(&secret);
        let own_mac = MacKey::for_static(&me.static_public());
        for _ in 0..TRIES {
            let index = rand_u32();
            let (init, msg) = handshake::initiate(
                me.static_secret(),
                key,
                index,
                unix_nanos(),
                CipherSuite::Aes256Gcm,
            )
            .ok()?;
            let _ = self.socket.send_to(&msg, addr).await;
            let until = Instant::now() + TRY_WAIT;
            let mut init = Some(init);
            let got = self
                .recv_from(addr, until, |b| match wire::classify(b) {
                    Kind::HandshakeResp => {
                        let resp = wire::HandshakeResp::new_checked(b).ok()?;
                        if resp.receiver_index() != index {
                            return None;
                        }
                        let init = init.take()?;
                        Some(init.finish(&own_mac, resp, Instant::now()).ok())
                    }
                    // Under load the registry answers with a cookie first;
                    // it is there, but this check does not go on.
                    Kind::CookieReply => {
                        let c = wire::CookieReply::new_checked(b).ok()?;
                        (c.receiver_index() == index).then_some(None)
                    }
                    _ => None,
                })
                .await;
            if let Some(result) = got {
                *answered = true;
                return result;
            }
        }
        None
    }
}

/// Probes NAT-PMP and PCP on the default gateway at once.
async fn port_mapping() -> PortMapping {
    let mut out = PortMapping::default();
    let Some(gw) = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| crate::portmap::default_gateway(&t))
    else {
        return out;
    };
    out.gateway = Some(gw);
    let to = SocketAddr::from((gw, PORT_MAPPING_PORT));
    let Ok(socket) = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await else {
        return out;
    };
    if socket.connect(to).await.is_err() {
        return out;
    }
    let client = match socket.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let _ = socket.send(&pilot_proto::natpmp::address_request()).await;
    let _ = socket.send(&pcp_announce(client)).await;
    let until = Instant::now() + MAPPING_WAIT;
    let mut buf = [0u8; 1100];
    while !(out.nat_pmp && out.pcp) {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        // A refusal (ICMP port unreachable) ends the wait: nothing listens.
        let Ok(Ok(n)) = tokio::time::timeout(left, socket.recv(&mut buf)).await else {
            break;
        };
        match parse_mapping_reply(&buf[..n]) {
            Some(MappingReply::NatPmp { external }) => {
                out.nat_pmp = true;
                out.external_address = out.external_address.or(external);
            }
            Some(MappingReply::Pcp) => out.pcp = true,
            None => {}
        }
    }
    out
}

/// A PCP ANNOUNCE request (RFC 6887 §14.1): version 2, opcode 0, lifetime
/// 0, our address as an IPv4-mapped IPv6 address.
fn pcp_announce(client: Ipv4Addr) -> [u8; 24] {
    let mut m = [0u8; 24];
    m[0] = 2;
    m[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    m
}

/// What a gateway answered on the port mapping port.
#[derive(Debug, PartialEq, Eq)]
enum MappingReply {
    /// A NAT-PMP response (a PCP server answering our NAT-PMP request
    /// counts too); the external address if it reported one.
    NatPmp { external: Option<Ipv4Addr> },
    /// A PCP response.
    Pcp,
}

/// Reads a NAT-PMP or PCP response; anything else is None.
fn parse_mapping_reply(b: &[u8]) -> Option<MappingReply> {
    match b {
        // NAT-PMP: version 0, opcode 128 + request opcode, result code;
        // the address response is 12 bytes with result 0.
        [0, op, rest @ ..] if *op >= 128 && rest.len() >= 2 => {
            let external = (*op == 128 && b.len() >= 12 && b[2..4] == [0, 0])
                .then(|| Ipv4Addr::new(b[8], b[9], b[10], b[11]));
            Some(MappingReply::NatPmp { external })
        }
        // PCP: version 2, the R bit set, at least the 24-byte header.
        [2, op, ..] if op & 0x80 != 0 && b.len() >= 24 => Some(MappingReply::Pcp),
        _ => None,
    }
}

/// Milliseconds, to the microsecond.
fn round_ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

fn fill_random(b: &mut [u8]) {
    // The system generator does not fail on Linux.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), b);
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    fill_random(&mut b);
    u32::from_le_bytes(b)
}

fn random_tid() -> stun::TransactionId {
    let mut t = [0u8; 12];
    fill_random(&mut t);
    t
}

fn unix_nanos() -> u64 {
    crate::context::unix_micros().saturating_mul(1000)
}

/// The report for people, one fact a line.
pub fn text(r: &Netcheck) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let rtt = |v: &[Option<f64>]| {
        let got: Vec<f64> = v.iter().flatten().copied().collect();
        if got.is_empty() {
            "no answer".to_string()
        } else {
            let min = got.iter().copied().fold(f64::INFINITY, f64::min);
            let avg = got.iter().sum::<f64>() / got.len() as f64;
            format!(
                "{min:.2} ms min, {avg:.2} ms avg ({} of {} pings answered)",
                got.len(),
                v.len()
            )
        }
    };
    let ep = |e: Option<SocketAddr>| e.map_or("unknown".to_string(), |e| e.to_string());
    let mut lines = vec![
        format!("registry {}", r.registry),
        format!("  UDP: {}", if r.udp { "works" } else { "NOT working" }),
        format!(
            "  registry key: {}",
            match r.registry_key_ok {
                Some(true) => "ok (handshake completed)",
                Some(false) =>
                    "WRONG or registry overloaded (STUN answers, the handshake does not)",
                None => "unknown (no answer)",
            }
        ),
        format!("  registry RTT: {}", rtt(&r.registry_rtt_ms)),
        format!("  NAT: {}", nat_words(r.nat)),
        format!(
            "  public endpoint: {}{}",
            ep(r.public_endpoint),
            match (r.public_endpoint, r.public_endpoint_alt) {
                (Some(a), Some(b)) if a != b => format!(" (the second STUN port saw {b})"),
                (Some(_), None) => " (the second STUN port did not answer)".to_string(),
                _ => String::new(),
            }
        ),
    ];
    match &r.relay {
        Some(relay) => lines.push(format!("  relay {}: {}", relay.addr, rtt(&relay.rtt_ms))),
        None => lines.push("  relay: none configured besides the registry".to_string()),
    }
    let pm = &r.port_mapping;
    lines.push(match pm.gateway {
        None => "  port mapping: no default gateway".to_string(),
        Some(gw) => format!(
            "  port mapping on {gw}: NAT-PMP {}, PCP {}{}",
            yes(pm.nat_pmp),
            yes(pm.pcp),
            pm.external_address
                .map(|a| format!(" (external address {a})"))
                .unwrap_or_default()
        ),
    });
    if let Some(d) = &r.daemon {
        lines.push(format!(
            "  daemon: NAT {}, public endpoint {}, registry {}",
            nat_words(d.nat),
            ep(d.public_endpoint),
            if d.registry_reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            }
        ));
    }
    if let Some(p) = &r.problem {
        lines.push(format!("problem: {p}"));
    }
    lines.join("\n")
}

fn nat_words(n: Nat) -> &'static str {
    match n {
        Nat::Unknown => "unknown",
        Nat::None => "none (a public address)",
        Nat::EndpointIndependent => "endpoint-independent (easy: direct paths work)",
        Nat::PerDestination => "per-destination (hard: peers behind one may need the relay)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_replies_are_told_apart() {
        let mut pmp = [0u8; 12];
        pmp[1] = 128;
        pmp[8..12].copy_from_slice(&[198, 51, 100, 7]);
        assert_eq!(
            parse_mapping_reply(&pmp),
            Some(MappingReply::NatPmp {
                external: Some(Ipv4Addr::new(198, 51, 100, 7))
            })
        );
        // An error result carries no address.
        let mut refused = pmp;
        refused[3] = 2;
        assert_eq!(
            parse_mapping_reply(&refused),
            Some(MappingReply::NatPmp { external: None })
        );
        // "Unsupported version", a NAT-PMP server's answer to PCP.
        assert_eq!(
            parse_mapping_reply(&[0, 128, 0, 1, 0, 0, 0, 0]),
            Some(MappingReply::NatPmp { external: None })
        );
        let mut pcp = [0u8; 24];
        pcp[0] = 2;
        pcp[1] = 0x80;
        assert_eq!(parse_mapping_reply(&pcp), Some(MappingReply::Pcp));
        // Our own requests, truncated replies, and noise are not answers.
        assert_eq!(
            parse_mapping_reply(&pilot_proto::natpmp::address_request()),
            None
        );
        assert_eq!(
            parse_mapping_reply(&pcp_announce(Ipv4Addr::LOCALHOST)),
            None
        );
        assert_eq!(parse_mapping_reply(&pcp[..10]), None);
        assert_eq!(parse_mapping_reply(&[0, 128]), None);
        assert_eq!(parse_mapping_reply(&[]), None);
        assert_eq!(parse_mapping_reply(&[7; 40]), None);
    }

    #[test]
    fn the_pcp_request_names_the_client() {
        let m = pcp_announce(Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(m[..8], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(m[8..20], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(m[20..], [192, 0, 2, 10]);
    }

    #[test]
    fn nat_types_from_two_observations() {
        use pilot_proto::messages::NatType;
        let own: SocketAddr = "192.0.2.10:4000".parse().unwrap();
        let public: SocketAddr = "203.0.113.21:4000".parse().unwrap();
        let other: SocketAddr = "203.0.113.21:5123".parse().unwrap();
        assert_eq!(nat_type(&[own], Some(own), Some(own)), NatType::None);
        assert_eq!(nat_type(&[own], Some(own), None), NatType::None);
        assert_eq!(
            nat_type(&[own], Some(public), Some(public)),
            NatType::EndpointIndependent
        );
        assert_eq!(
            nat_type(&[own], Some(public), Some(other)),
            NatType::PerDestination
        );
        assert_eq!(nat_type(&[own], Some(public), None), NatType::Unknown);
        assert_eq!(nat_type(&[own], None, Some(public)), NatType::Unknown);
        // Through the list of this host's own endpoints, as `run` does.
        if let Some(mine) = local_endpoints(1, false).first().copied() {
            assert_eq!(
                nat_type(&local_endpoints(1, false), Some(mine), None),
                NatType::None
            );
        }
    }

    #[test]
    fn exit_codes_follow_the_verdict() {
        let mut r = Netcheck {
            registry: "192.0.2.1:7946".parse().unwrap(),
            udp: true,
            registry_key_ok: Some(true),
            nat: Nat::None,
            public_endpoint: None,
            public_endpoint_alt: None,
            registry_rtt_ms: vec![Some(0.2)],
            relay: None,
            port_mapping: PortMapping::default(),
            daemon: None,
            problem: None,
        };
        assert_eq!(exit_code(&r), exit::OK);
        r.problem = Some("wrong key".into());
        assert_eq!(exit_code(&r), exit::FAILED);
        r.udp = false;
        assert_eq!(exit_code(&r), exit::TRY_AGAIN);
        assert!(text(&r).contains("UDP: NOT working"));
        assert!(text(&r).contains("problem: wrong key"));
    }
}
