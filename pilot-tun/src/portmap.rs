//! Port mapping at the gateway: asks the default gateway (NAT-PMP, RFC
//! 6886) to forward an external UDP port to the node's tunnel port, so
//! that a node behind a NAT that gives every destination a new port (a
//! "hard" NAT) still has one stable public endpoint peers can reach. The
//! keeper that renews the mapping and publishes it lives in
//! [`crate::node`]; this module only talks to the gateway.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pilot_proto::natpmp::{self, Response, ResponseError};
use tokio::net::UdpSocket;

/// How long a mapping is asked for; it is renewed at half of what the
/// gateway grants.
pub const LIFETIME_SECS: u32 = 7200;
/// The first wait for an answer; it doubles for every try (RFC 6886 §3.1
/// starts at 250 ms), over [`TRIES`] tries: about 4 s in all.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const TRIES: u32 = 4;

/// A mapping the gateway made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The gateway that made it.
    pub gateway: Ipv4Addr,
    /// Where peers reach us through it.
    pub external: SocketAddr,
    /// How long it lasts.
    pub lifetime: Duration,
}

/// Why there is no mapping.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// No default IPv4 route through a gateway.
    #[error("no default gateway")]
    NoGateway,
    /// Nothing answered on the gateway's NAT-PMP port (or it said so with
    /// ICMP port unreachable).
    #[error("the gateway {0} does not answer NAT-PMP")]
    NoAnswer(Ipv4Addr),
    /// It answered, and refused.
    #[error("the gateway {gateway} refused a port mapping: {why}")]
    Refused {
        /// The gateway.
        gateway: Ipv4Addr,
        /// Its answer.
        why: ResponseError,
    },
    /// A local socket error.
    #[error("port mapping: {0}")]
    Io(#[from] std::io::Error),
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

/// Asks `gateway` to map UDP `port` (ours) for `lifetime` seconds, the
/// same external port if it can; 0 removes the mapping.
pub async fn request(gateway: Ipv4Addr, port: u16, lifetime: u32) -> Result<Mapping, MapError> {
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    socket
        .connect(SocketAddr::from((gateway, natpmp::PORT)))
        .await?;
    let external = match exchange(&socket, &natpmp::address_request(), gateway).await? {
        Response::Address { external, .. } => external,
        Response::MappedUdp { .. } => return Err(MapError::NoAnswer(gateway)),
    };
    let ask = natpmp::map_udp_request(port, port, lifetime);
    match exchange(&socket, &ask, gateway).await? {
        Response::MappedUdp {
            internal,
            external: ext_port,
            lifetime: granted,
            ..
        } if internal == port => Ok(Mapping {
            gateway,
            external: SocketAddr::from((external, ext_port)),
            lifetime: Duration::from_secs(u64::from(granted)),
        }),
        _ => Err(MapError::NoAnswer(gateway)),
    }
}

/// Sends `msg` and waits for the matching answer, resending with a doubling
/// wait. A refusal by ICMP (nothing listens) ends it at once.
async fn exchange(socket: &UdpSocket, msg: &[u8], gateway: Ipv4Addr) -> Result<Response, MapError> {
    let mut wait = FIRST_WAIT;
    let mut buf = [0u8; natpmp::MAX_RESPONSE + 1];
    for _ in 0..TRIES {
        if socket.send(msg).await.is_err() {
            return Err(MapError::NoAnswer(gateway));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) => return Err(MapError::NoAnswer(gateway)),
                Ok(Ok(n)) => match natpmp::parse(&buf[..n]) {
                    // An answer to the other opcode (a late duplicate)
                    // is skipped; see the caller.
                    Ok(r) if answers(msg, &r) => return Ok(r),
                    Ok(_) | Err(ResponseError::Malformed) => {}
                    Err(why) => return Err(MapError::Refused { gateway, why }),
                },
            }
        }
        wait *= 2;
    }
    Err(MapError::NoAnswer(gateway))
}

/// True if `r` is the answer to request `msg` (same opcode).
fn answers(msg: &[u8], r: &Response) -> bool {
    matches!(
        (msg.get(1), r),
        (Some(0), Response::Address { .. }) | (Some(1), Response::MappedUdp { .. })
    )
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

    /// A NAT-PMP responder on loopback that answers as a gateway would:
    /// the address, then a mapping of the asked port to `ext_port`.
    async fn responder(code: u16, ext_port: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..8 {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    return;
                };
                let mut out = vec![0, buf[1] | 0x80];
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(&42u32.to_be_bytes());
                match (n, buf[1]) {
                    (2, 0) => out.extend_from_slice(&[203, 0, 113, 10]),
                    (12, 1) => {
                        out.extend_from_slice(&buf[4..6]);
                        out.extend_from_slice(&ext_port.to_be_bytes());
                        out.extend_from_slice(&buf[8..12]);
                    }
                    _ => continue,
                }
                let _ = s.send_to(&out, from).await;
            }
        });
        (at, task)
    }

    /// `exchange` against a responder on a loopback port (the real
    /// `request` always talks to port 5351 of the gateway).
    async fn map_via(at: SocketAddr, port: u16) -> Result<(Response, Response), MapError> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(at).await?;
        let gw = Ipv4Addr::LOCALHOST;
        let a = exchange(&socket, &natpmp::address_request(), gw).await?;
        let m = exchange(&socket, &natpmp::map_udp_request(port, port, 60), gw).await?;
        Ok((a, m))
    }

    #[tokio::test]
    async fn a_mapping_is_asked_for_and_read_back() {
        let (at, task) = responder(0, 41000).await;
        let (a, m) = map_via(at, 40000).await.unwrap();
        assert_eq!(
            a,
            Response::Address {
                epoch: 42,
                external: Ipv4Addr::new(203, 0, 113, 10)
            }
        );
        assert_eq!(
            m,
            Response::MappedUdp {
                epoch: 42,
                internal: 40000,
                external: 41000,
                lifetime: 60
            }
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_refusal_and_silence_are_errors_not_waits_forever() {
        let (at, task) = responder(2, 0).await;
        let e = map_via(at, 40000).await.unwrap_err();
        assert!(
            matches!(
                e,
                MapError::Refused {
                    why: ResponseError::Refused(2),
                    ..
                }
            ),
            "{e:?}"
        );
        task.abort();
        // Nothing listens: ICMP port unreachable ends it at once.
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = closed.local_addr().unwrap();
        drop(closed);
        assert!(matches!(
            map_via(at, 40000).await,
            Err(MapError::NoAnswer(_))
        ));
    }
}
