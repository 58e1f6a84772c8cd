//! Port mapping at the gateway: asks the gateway to forward an external
//! UDP port to the node's tunnel port, so that a node behind a NAT that
//! gives every destination a new port (a "hard" NAT) still has one stable
//! public endpoint peers can reach. Three protocols, tried in this order at
//! start: PCP (RFC 6887) and NAT-PMP (RFC 6886) on the default gateway's
//! UDP port 5351, then UPnP IGD (SSDP on the LAN, SOAP to the device it
//! finds). A mapping is renewed and removed with the protocol that made it.
//! The keeper that renews the mapping and publishes it lives in
//! [`crate::node`]; this module only talks to the gateway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol as IgdProtocol, SearchOptions};
use pilot_proto::natpmp::{self, Response, ResponseError};
use pilot_proto::pcp::{self, MapRequest};
use tokio::net::UdpSocket;

pub use crate::api::PortMappingProtocol as Protocol;

/// How long a mapping is asked for; it is renewed at half of what the
/// gateway grants.
pub const LIFETIME_SECS: u32 = 7200;
/// The first wait for an answer on UDP 5351; it doubles for every try (RFC
/// 6886 §3.1 starts at 250 ms), over [`TRIES`] tries: about 4 s in all.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const TRIES: u32 = 4;
/// How long SSDP discovery may take: IGDs delay their answer by up to the
/// search's MX (3 s) to spread the load.
const SSDP_WAIT: Duration = Duration::from_secs(4);
/// The description UPnP IGD shows in the gateway's mapping table.
const UPNP_DESCRIPTION: &str = "pilot-tun";

/// A mapping the gateway made.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// The protocol that made it (and renews and removes it).
    pub protocol: Protocol,
    /// The gateway that made it.
    pub gateway: IpAddr,
    /// Where peers reach us through it.
    pub external: SocketAddr,
    /// How long it lasts.
    pub lifetime: Duration,
    /// What renewing and removing it needs.
    lease: Lease,
}

/// What a protocol needs to renew or remove a mapping it made.
#[derive(Clone, Debug)]
enum Lease {
    /// PCP ties a mapping to the nonce of the request that made it.
    Pcp { nonce: [u8; 12] },
    /// NAT-PMP needs only the port.
    NatPmp,
    /// The IGD's control URL and actions, as discovery found them.
    Upnp(Box<Gateway<Tokio>>),
}

/// Why there is no mapping.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// No default IPv4 route through a gateway.
    #[error("no default gateway")]
    NoGateway,
    /// Nothing answered on the gateway's port 5351 (or it said so with ICMP
    /// port unreachable).
    #[error("the gateway {gateway} does not answer {protocol}")]
    NoAnswer {
        /// The protocol asked.
        protocol: Protocol,
        /// The gateway.
        gateway: Ipv4Addr,
    },
    /// The gateway answered PCP with NAT-PMP: it speaks only that.
    #[error("the gateway {0} speaks NAT-PMP, not PCP")]
    PcpUnsupported(Ipv4Addr),
    /// It answered NAT-PMP, and refused.
    #[error("the gateway {gateway} refused a NAT-PMP port mapping: {why}")]
    NatPmpRefused {
        /// The gateway.
        gateway: Ipv4Addr,
        /// Its answer.
        why: ResponseError,
    },
    /// It answered PCP, and refused.
    #[error("the gateway {gateway} refused a PCP port mapping: {why}")]
    PcpRefused {
        /// The gateway.
        gateway: Ipv4Addr,
        /// Its answer.
        why: pcp::ResponseError,
    },
    /// No UPnP IGD answered SSDP discovery, or its description or SOAP
    /// answers were not usable, or it refused.
    #[error("UPnP IGD: {0}")]
    Upnp(#[from] igd_next::Error),
    /// The IGD reports an external address we cannot use (IPv6, or none).
    #[error("UPnP IGD at {0}: no usable external IPv4 address")]
    UpnpNoAddress(IpAddr),
    /// Every protocol failed; each one's reason.
    #[error("no port mapping: {}", list(.0))]
    Nothing(Vec<MapError>),
    /// A local socket error.
    #[error("port mapping: {0}")]
    Io(#[from] std::io::Error),
}

fn list(errors: &[MapError]) -> String {
    let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    all.join("; ")
}

/// The default IPv4 gateway, from /proc/net/route.
pub fn gateway() -> Option<Ipv4Addr> {
    std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_gateway(&t))
}

/// The default IPv4 gateway from the text of /proc/net/route.
pub fn default_gateway(route: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags ...; RTF_GATEWAY = 0x2.
        let (dest, gw, flags) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || flags & 0x2 == 0 {
            return None;
        }
        // The kernel prints the address in host byte order (little-endian
        // here), so the bytes read back to front.
        let raw = u32::from_str_radix(gw, 16).ok()?;
        Some(Ipv4Addr::from(raw.to_le_bytes()))
    })
}

/// A fresh PCP mapping nonce.
pub fn new_nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    // The nonce only needs to be unguessable off the path; if the system
    // RNG failed the gateway would still check our source address.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n);
    n
}

/// Gets a mapping of UDP `port` (ours): renews `held` with the protocol
/// that made it, or, without one or when that fails, tries PCP, NAT-PMP
/// and UPnP IGD in that order; the first that works is used.
pub async fn map(port: u16, held: Option<&Mapping>) -> Result<Mapping, MapError> {
    let gw = gateway();
    let mut errors = Vec::new();
    if let Some(h) = held {
        match renew(h, port).await {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(e),
        }
    }
    if let Some(gw) = gw {
        let at = SocketAddr::from((gw, pcp::PORT));
        let nonce = match held.map(|h| &h.lease) {
            Some(Lease::Pcp { nonce }) => *nonce,
            _ => new_nonce(),
        };
        match pcp_map(at, port, nonce, LIFETIME_SECS, None).await {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(e),
        }
        match natpmp_map(at, port, LIFETIME_SECS).await {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(e),
        }
    } else {
        errors.push(MapError::NoGateway);
    }
    // SSDP goes to the LAN's multicast group: no default gateway needed.
    match upnp_discover().await {
        Ok(g) => match upnp_map(g, port, LIFETIME_SECS, None).await {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(e),
        },
        Err(e) => errors.push(e),
    }
    Err(MapError::Nothing(errors))
}

/// Renews `held` with the protocol that made it, the same external port.
async fn renew(held: &Mapping, port: u16) -> Result<Mapping, MapError> {
    match (&held.lease, held.gateway) {
        (Lease::Pcp { nonce }, IpAddr::V4(gw)) => {
            let want = match held.external {
                SocketAddr::V4(e) => Some(e),
                SocketAddr::V6(_) => None,
            };
            let at = SocketAddr::from((gw, pcp::PORT));
            pcp_map(at, port, *nonce, LIFETIME_SECS, want).await
        }
        (Lease::NatPmp, IpAddr::V4(gw)) => {
            natpmp_map(SocketAddr::from((gw, natpmp::PORT)), port, LIFETIME_SECS).await
        }
        (Lease::Upnp(g), _) => {
            upnp_map(
                (**g).clone(),
                port,
                LIFETIME_SECS,
                Some(held.external.port()),
            )
            .await
        }
        (_, gw) => Err(MapError::UpnpNoAddress(gw)),
    }
}

/// Removes `held` at the gateway (bounded like any request: a gateway that
/// stopped answering does not hold the caller up for more than ~4 s).
pub async fn release(held: &Mapping, port: u16) -> Result<(), MapError> {
    match (&held.lease, held.gateway) {
        (Lease::Pcp { nonce }, IpAddr::V4(gw)) => {
            let want = match held.external {
                SocketAddr::V4(e) => Some(e),
                SocketAddr::V6(_) => None,
            };
            let at = SocketAddr::from((gw, pcp::PORT));
            pcp_map(at, port, *nonce, 0, want).await.map(|_| ())
        }
        (Lease::NatPmp, IpAddr::V4(gw)) => {
            natpmp_map(SocketAddr::from((gw, natpmp::PORT)), port, 0)
                .await
                .map(|_| ())
        }
        (Lease::Upnp(g), _) => Ok(g
            .remove_port(IgdProtocol::UDP, held.external.port())
            .await
            .map_err(igd_next::Error::from)?),
        (_, gw) => Err(MapError::UpnpNoAddress(gw)),
    }
}

/// A UDP socket connected to `at`, and our address towards it.
async fn connected(at: SocketAddr) -> Result<(UdpSocket, Ipv4Addr), MapError> {
    let local = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let socket = UdpSocket::bind(local).await?;
    socket.connect(at).await?;
    let client = match socket.local_addr()? {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    Ok((socket, client))
}

fn v4(at: SocketAddr) -> Ipv4Addr {
    match at.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// PCP MAP of UDP `port` at the server `at`, for `lifetime` seconds (0
/// removes it), tied to `nonce`; `want` is the external endpoint we hold
/// (a renewal asks for it again).
async fn pcp_map(
    at: SocketAddr,
    port: u16,
    nonce: [u8; 12],
    lifetime: u32,
    want: Option<SocketAddrV4>,
) -> Result<Mapping, MapError> {
    let gateway = v4(at);
    let (socket, client) = connected(at).await?;
    let req = MapRequest {
        nonce,
        client,
        internal: port,
        suggested: want.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        lifetime,
    };
    let msg = req.encode();
    let no_answer = MapError::NoAnswer {
        protocol: Protocol::Pcp,
        gateway,
    };
    let mut buf = [0u8; pcp::MAX_RESPONSE + 4];
    let r = exchange(&socket, &msg, &mut buf, |b| match pcp::parse_map(b, &req) {
        Ok(r) => Some(Ok(r)),
        // Someone else's answer, or noise: wait on.
        Err(pcp::ResponseError::Malformed | pcp::ResponseError::NotOurs) => None,
        Err(pcp::ResponseError::NatPmpOnly) => Some(Err(MapError::PcpUnsupported(gateway))),
        Err(why) => Some(Err(MapError::PcpRefused { gateway, why })),
    })
    .await
    .ok_or(no_answer)??;
    Ok(Mapping {
        protocol: Protocol::Pcp,
        gateway: IpAddr::V4(gateway),
        external: SocketAddr::V4(r.external),
        lifetime: Duration::from_secs(u64::from(r.lifetime)),
        lease: Lease::Pcp { nonce },
    })
}

/// NAT-PMP: the external address, then a mapping of UDP `port` for
/// `lifetime` seconds (0 removes it), at the server `at`.
async fn natpmp_map(at: SocketAddr, port: u16, lifetime: u32) -> Result<Mapping, MapError> {
    let gateway = v4(at);
    let (socket, _) = connected(at).await?;
    let external = match natpmp_exchange(&socket, &natpmp::address_request(), gateway).await? {
        Response::Address { external, .. } => external,
        Response::MappedUdp { .. } => {
            return Err(MapError::NoAnswer {
                protocol: Protocol::NatPmp,
                gateway,
            })
        }
    };
    let ask = natpmp::map_udp_request(port, port, lifetime);
    match natpmp_exchange(&socket, &ask, gateway).await? {
        Response::MappedUdp {
            internal,
            external: ext_port,
            lifetime: granted,
            ..
        } if internal == port => Ok(Mapping {
            protocol: Protocol::NatPmp,
            gateway: IpAddr::V4(gateway),
            external: SocketAddr::from((external, ext_port)),
            lifetime: Duration::from_secs(u64::from(granted)),
            lease: Lease::NatPmp,
        }),
        _ => Err(MapError::NoAnswer {
            protocol: Protocol::NatPmp,
            gateway,
        }),
    }
}

/// One NAT-PMP request and its answer (same opcode).
async fn natpmp_exchange(
    socket: &UdpSocket,
    msg: &[u8],
    gateway: Ipv4Addr,
) -> Result<Response, MapError> {
    let mut buf = [0u8; natpmp::MAX_RESPONSE + 1];
    exchange(socket, msg, &mut buf, |b| match natpmp::parse(b) {
        // An answer to the other opcode (a late duplicate) is skipped.
        Ok(r) if answers(msg, &r) => Some(Ok(r)),
        Ok(_) | Err(ResponseError::Malformed) => None,
        Err(why) => Some(Err(MapError::NatPmpRefused { gateway, why })),
    })
    .await
    .ok_or(MapError::NoAnswer {
        protocol: Protocol::NatPmp,
        gateway,
    })?
}

/// Sends `msg` and waits for an answer `read` accepts (`Some`), resending
/// with a doubling wait; None when nothing acceptable came. A refusal by
/// ICMP (nothing listens) ends it at once.
async fn exchange<T>(
    socket: &UdpSocket,
    msg: &[u8],
    buf: &mut [u8],
    mut read: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let mut wait = FIRST_WAIT;
    for _ in 0..TRIES {
        socket.send(msg).await.ok()?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(buf)).await {
                Err(_) => break,
                Ok(Err(_)) => return None,
                Ok(Ok(n)) => {
                    if let Some(got) = buf.get(..n).and_then(&mut read) {
                        return Some(got);
                    }
                }
            }
        }
        wait *= 2;
    }
    None
}

/// True if `r` is the answer to NAT-PMP request `msg` (same opcode).
fn answers(msg: &[u8], r: &Response) -> bool {
    matches!(
        (msg.get(1), r),
        (Some(0), Response::Address { .. }) | (Some(1), Response::MappedUdp { .. })
    )
}

/// Finds a UPnP IGD on the LAN (SSDP M-SEARCH to 239.255.255.250:1900)
/// and reads its description.
async fn upnp_discover() -> Result<Gateway<Tokio>, MapError> {
    let mut opts = SearchOptions::default();
    opts.timeout = Some(SSDP_WAIT);
    opts.single_search_timeout = Some(SSDP_WAIT);
    Ok(igd_next::aio::tokio::search_gateway(opts)
        .await
        .map_err(igd_next::Error::from)?)
}

/// AddPortMapping of UDP `port` on the IGD `g` for `lifetime` seconds: the
/// external port `want` (a renewal), else the same as ours, else any the
/// IGD picks.
async fn upnp_map(
    g: Gateway<Tokio>,
    port: u16,
    lifetime: u32,
    want: Option<u16>,
) -> Result<Mapping, MapError> {
    let gateway = g.addr.ip();
    let external_ip = match g.get_external_ip().await.map_err(igd_next::Error::from)? {
        IpAddr::V4(a) if !a.is_unspecified() => a,
        _ => return Err(MapError::UpnpNoAddress(gateway)),
    };
    // The mapping points at our address on the link to the IGD.
    let (_, ours) = connected(g.addr).await?;
    let internal = SocketAddr::from((ours, port));
    let first = want.unwrap_or(port);
    let ext_port = match g
        .add_port(
            IgdProtocol::UDP,
            first,
            internal,
            lifetime,
            UPNP_DESCRIPTION,
        )
        .await
    {
        Ok(()) => first,
        Err(igd_next::AddPortError::PortInUse) => g
            .add_any_port(IgdProtocol::UDP, internal, lifetime, UPNP_DESCRIPTION)
            .await
            .map_err(igd_next::Error::from)?,
        Err(e) => return Err(igd_next::Error::from(e).into()),
    };
    Ok(Mapping {
        protocol: Protocol::UpnpIgd,
        gateway,
        external: SocketAddr::from((external_ip, ext_port)),
        lifetime: Duration::from_secs(u64::from(lifetime)),
        lease: Lease::Upnp(Box::new(g)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_comes_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(192, 168, 0, 1)));
        let no_gw = "Iface\tDestination\tGateway \tFlags\n\
                     eth0\t0000A8C0\t00000000\t0001\n";
        assert_eq!(default_gateway(no_gw), None);
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
        assert_eq!(default_gateway("garbage\nx y\n\n"), None);
    }

    /// How the loopback gateway below answers.
    #[derive(Clone, Copy)]
    enum Speaks {
        /// NAT-PMP only, with this result code: PCP gets "unsupported
        /// version" in NAT-PMP's format (RFC 6886 §3.5).
        NatPmp(u16),
        /// PCP, with this result code; a wrong nonce first if `forge`.
        Pcp { code: u8, forge: bool },
    }

    /// A gateway on loopback that maps the asked port to `ext_port` at
    /// 203.0.113.10.
    async fn responder(speaks: Speaks, ext_port: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 128];
            for _ in 0..16 {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    return;
                };
                let mut out = Vec::new();
                match (speaks, buf[0], n) {
                    (Speaks::NatPmp(_), 2, _) => {
                        out.extend_from_slice(&[0, 0x81, 0, 1, 0, 0, 0, 42])
                    }
                    (Speaks::NatPmp(code), 0, 2 | 12) => {
                        out.extend_from_slice(&[0, buf[1] | 0x80]);
                        out.extend_from_slice(&code.to_be_bytes());
                        out.extend_from_slice(&42u32.to_be_bytes());
                        if n == 2 {
                            out.extend_from_slice(&[203, 0, 113, 10]);
                        } else {
                            out.extend_from_slice(&buf[4..6]);
                            out.extend_from_slice(&ext_port.to_be_bytes());
                            out.extend_from_slice(&buf[8..12]);
                        }
                    }
                    (Speaks::Pcp { code, forge }, 2, 60) => {
                        out.extend_from_slice(&[2, 0x81, 0, code]);
                        out.extend_from_slice(&buf[4..8]);
                        out.extend_from_slice(&42u32.to_be_bytes());
                        out.extend_from_slice(&[0; 12]);
                        out.extend_from_slice(&buf[24..44]);
                        out[42..44].copy_from_slice(&ext_port.to_be_bytes());
                        out.extend_from_slice(
                            &Ipv4Addr::new(203, 0, 113, 10).to_ipv6_mapped().octets(),
                        );
                        if forge {
                            // A forged success for another nonce first.
                            let mut f = out.clone();
                            f[3] = 0;
                            f[24] ^= 0xff;
                            f[42..44].copy_from_slice(&6666u16.to_be_bytes());
                            let _ = s.send_to(&f, from).await;
                        }
                    }
                    _ => continue,
                }
                let _ = s.send_to(&out, from).await;
            }
        });
        (at, task)
    }

    /// PCP first, NAT-PMP when PCP fails: what `map` does at the gateway,
    /// here against a loopback port.
    async fn map_at(at: SocketAddr, port: u16) -> Result<Mapping, MapError> {
        match pcp_map(at, port, new_nonce(), 60, None).await {
            Ok(m) => Ok(m),
            Err(e) => natpmp_map(at, port, 60)
                .await
                .map_err(|e2| MapError::Nothing(vec![e, e2])),
        }
    }

    #[tokio::test]
    async fn pcp_maps_and_a_forged_answer_is_ignored() {
        let (at, task) = responder(
            Speaks::Pcp {
                code: 0,
                forge: true,
            },
            41000,
        )
        .await;
        let m = map_at(at, 40000).await.unwrap();
        assert_eq!(m.protocol, Protocol::Pcp);
        assert_eq!(m.external, "203.0.113.10:41000".parse().unwrap());
        assert_eq!(m.lifetime, Duration::from_secs(60));
        task.abort();
    }

    #[tokio::test]
    async fn a_nat_pmp_gateway_gets_nat_pmp_after_pcp() {
        let (at, task) = responder(Speaks::NatPmp(0), 41000).await;
        let m = map_at(at, 40000).await.unwrap();
        assert_eq!(m.protocol, Protocol::NatPmp);
        assert_eq!(m.external, "203.0.113.10:41000".parse().unwrap());
        task.abort();
    }

    #[tokio::test]
    async fn refusals_and_silence_are_errors_not_waits_forever() {
        let (at, task) = responder(
            Speaks::Pcp {
                code: 2,
                forge: false,
            },
            0,
        )
        .await;
        let e = pcp_map(at, 40000, new_nonce(), 60, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                MapError::PcpRefused {
                    why: pcp::ResponseError::Refused(2),
                    ..
                }
            ),
            "{e:?}"
        );
        task.abort();
        let (at, task) = responder(Speaks::NatPmp(2), 0).await;
        let e = map_at(at, 40000).await.unwrap_err();
        let MapError::Nothing(all) = &e else {
            panic!("{e:?}")
        };
        assert!(matches!(all[0], MapError::PcpUnsupported(_)), "{e:?}");
        assert!(
            matches!(
                all[1],
                MapError::NatPmpRefused {
                    why: ResponseError::Refused(2),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("not authorized"), "{e}");
        task.abort();
        // Nothing listens: ICMP port unreachable ends it at once.
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = closed.local_addr().unwrap();
        drop(closed);
        let e = map_at(at, 40000).await.unwrap_err();
        let MapError::Nothing(all) = &e else {
            panic!("{e:?}")
        };
        assert!(
            all.iter().all(|e| matches!(e, MapError::NoAnswer { .. })),
            "{e:?}"
        );
    }
}
