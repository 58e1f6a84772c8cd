//! The join URL a registry prints: `pilot://<registry key, 64 hex>@<ip:port>`,
//! optionally with a query: `?tcp=<port>` when the registry also accepts
//! nodes over TCP with TLS (for networks that block UDP; same IP), and
//! `token=<32 hex>` (a join token, for a registry that admits new nodes
//! only with one). A node pins the key, so nobody else can pose as the
//! registry, over UDP or TCP. Query keys are `k=v` pairs joined by `&`; an
//! unknown key is refused rather than ignored (it would silently change
//! what a node does).
//!
//! A registry that runs as several instances (one database, one key) is
//! named by all of them, comma-separated, at most [`MAX_ENDPOINTS`]:
//! `pilot://<key>@192.0.2.1:7946,[2001:db8::1]:7946`. Every instance holds
//! the same key, so the pin covers them all; the node talks to one at a
//! time and moves to the next when it stops answering. `?tcp=` names the
//! TCP port on each endpoint's IP.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::hex;

/// The most endpoints a join URL names.
pub const MAX_ENDPOINTS: usize = 8;

/// What fills the unused endpoint slots (never an endpoint: port 0).
const UNUSED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// A parsed join URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinUrl {
    /// The registry's X25519 static public key.
    pub key: [u8; 32],
    /// Its instances' UDP addresses: the first `count` slots, the rest
    /// [`UNUSED`] (so that the derived equality compares the list).
    endpoints: [SocketAddr; MAX_ENDPOINTS],
    count: u8,
    /// A join token (`?token=`), sent with the node's registration. Not
    /// part of the URL's [`Display`](fmt::Display), which is what a node
    /// keeps and compares; [`JoinUrl::with_query`] has it.
    pub token: Option<JoinToken>,
    /// Its TCP (TLS) port for nodes whose network blocks UDP, on the same
    /// IP as each endpoint (`?tcp=<port>`); none: the node never dials TCP.
    pub tcp: Option<u16>,
}

/// A join token: 16 random bytes, written as 32 hex digits. The registry
/// keeps only its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinToken(pub [u8; 16]);

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

// Debug output (logs, panics) does not show the secret.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(..)")
    }
}

impl FromStr for JoinToken {
    type Err = JoinUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode_array::<16>(s)
            .map(JoinToken)
            .ok_or(JoinUrlError::Token)
    }
}

/// A join URL did not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinUrlError {
    /// Missing `pilot://` prefix.
    #[error(
        "a join URL starts with pilot:// (copy it from the registry's output or its join-url file)"
    )]
    Scheme,
    /// Key part is not 64 hex digits.
    #[error("the registry key in the join URL must be 64 hex digits")]
    Key,
    /// No `@` before the endpoints.
    #[error("the join URL must end in @<ip>:<port> (several instances: @<ip>:<port>,<ip>:<port>)")]
    Addr,
    /// An endpoint is not an IP address and a port.
    #[error("`{0}` in the join URL is not <ip>:<port> (an IPv6 address goes in brackets: [2001:db8::1]:7946)")]
    Endpoint(String),
    /// No endpoint, or more than [`MAX_ENDPOINTS`].
    #[error("the join URL names {0} registry endpoints; it needs 1 to {MAX_ENDPOINTS}")]
    EndpointCount(usize),
    /// The same endpoint twice.
    #[error("the join URL names the endpoint {0} twice")]
    DuplicateEndpoint(SocketAddr),
    /// The query names a key the URL does not have, or one twice.
    #[error("the join URL has an unknown or repeated query key `{0}` or a bad value (known: tcp=<port>, token=<32 hex digits>)")]
    Query(String),
    /// The token is not 32 hex digits.
    #[error("the token in the join URL (?token=) must be 32 hex digits, as `pilot-registry token create` prints it")]
    Token,
}

/// Splits a query (`k=v&k=v`, after the `?`) into pairs, each key once and
/// one of `known`.
fn query<'a>(q: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, JoinUrlError> {
    let mut out: Vec<(&str, &str)> = vec![];
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !known.contains(&k) || out.iter().any(|(seen, _)| *seen == k) {
            return Err(JoinUrlError::Query(k.to_string()));
        }
        out.push((k, v));
    }
    Ok(out)
}

impl JoinUrl {
    /// A URL for registry key `key` at `endpoints` (1 to [`MAX_ENDPOINTS`],
    /// no two alike), without a token or a TCP port.
    pub fn new(key: [u8; 32], endpoints: &[SocketAddr]) -> Result<Self, JoinUrlError> {
        if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS {
            return Err(JoinUrlError::EndpointCount(endpoints.len()));
        }
        let mut list = [UNUSED; MAX_ENDPOINTS];
        for (i, &e) in endpoints.iter().enumerate() {
            if e.port() == 0 || e.ip().is_unspecified() {
                return Err(JoinUrlError::Endpoint(e.to_string()));
            }
            if endpoints[..i].contains(&e) {
                return Err(JoinUrlError::DuplicateEndpoint(e));
            }
            list[i] = e;
        }
        Ok(JoinUrl {
            key,
            endpoints: list,
            count: endpoints.len() as u8,
            token: None,
            tcp: None,
        })
    }

    /// A URL for registry key `key` at the one endpoint `addr`.
    pub fn single(key: [u8; 32], addr: SocketAddr) -> Self {
        let mut endpoints = [UNUSED; MAX_ENDPOINTS];
        endpoints[0] = addr;
        JoinUrl {
            key,
            endpoints,
            count: 1,
            token: None,
            tcp: None,
        }
    }

    /// The registry's endpoints, in the URL's order (at least one).
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints[..usize::from(self.count).max(1)]
    }

    /// The first endpoint.
    pub fn first(&self) -> SocketAddr {
        self.endpoints[0]
    }

    /// True if `addr` is one of the endpoints.
    pub fn has_endpoint(&self, addr: SocketAddr) -> bool {
        self.endpoints().contains(&addr)
    }

    /// True if `other` names the same registry: the same key, whatever
    /// its endpoints (an instance added or moved is the same network).
    pub fn same_registry(&self, other: &JoinUrl) -> bool {
        self.key == other.key
    }

    /// The URL with all of its query (the token too), as an operator hands
    /// it out.
    pub fn with_query(&self) -> String {
        match (&self.token, self.tcp) {
            (Some(t), Some(_)) => format!("{self}&token={t}"),
            (Some(t), None) => format!("{self}?token={t}"),
            (None, _) => self.to_string(),
        }
    }

    /// The TCP relay's address at `endpoint`'s IP, if the URL names a TCP
    /// port.
    pub fn tcp_addr(&self, endpoint: SocketAddr) -> Option<SocketAddr> {
        self.tcp.map(|p| SocketAddr::new(endpoint.ip(), p))
    }
}

impl FromStr for JoinUrl {
    type Err = JoinUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix("pilot://")
            .ok_or(JoinUrlError::Scheme)?;
        let (rest, q) = rest.split_once('?').unwrap_or((rest, ""));
        let (key, addrs) = rest.split_once('@').ok_or(JoinUrlError::Addr)?;
        let key = hex::decode_array::<32>(key).ok_or(JoinUrlError::Key)?;
        let addrs = addrs.trim_end_matches('/');
        if addrs.is_empty() {
            return Err(JoinUrlError::Addr);
        }
        let parts: Vec<&str> = addrs.split(',').collect();
        if parts.len() > MAX_ENDPOINTS {
            return Err(JoinUrlError::EndpointCount(parts.len()));
        }
        let endpoints = parts
            .iter()
            .map(|p| {
                p.parse::<SocketAddr>()
                    .map_err(|_| JoinUrlError::Endpoint(p.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut url = JoinUrl::new(key, &endpoints)?;
        for (k, v) in query(q, &["token", "tcp"])? {
            match k {
                "token" => url.token = Some(v.parse()?),
                _ => {
                    url.tcp = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| JoinUrlError::Query(format!("{k}={v}")))?,
                    )
                }
            }
        }
        Ok(url)
    }
}

impl fmt::Display for JoinUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pilot://{}@", hex::encode(&self.key))?;
        for (i, e) in self.endpoints().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        match self.tcp {
            Some(p) => write!(f, "?tcp={p}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let u = JoinUrl::single([0xab; 32], "192.0.2.1:7000".parse().unwrap());
        let s = u.to_string();
        assert_eq!(s, format!("pilot://{}@192.0.2.1:7000", "ab".repeat(32)));
        assert_eq!(s.parse::<JoinUrl>(), Ok(u));
        assert_eq!("http://x".parse::<JoinUrl>(), Err(JoinUrlError::Scheme));
        assert_eq!(
            "pilot://abcd@192.0.2.1:1".parse::<JoinUrl>(),
            Err(JoinUrlError::Key)
        );
        assert_eq!(
            format!("pilot://{}@nowhere", "ab".repeat(32)).parse::<JoinUrl>(),
            Err(JoinUrlError::Endpoint("nowhere".into()))
        );
    }

    #[test]
    fn a_token_rides_in_the_query() {
        let base = format!("pilot://{}@192.0.2.1:7000", "ab".repeat(32));
        let t = "0123456789abcdef0123456789abcdef";
        let u: JoinUrl = format!("{base}?token={t}").parse().unwrap();
        assert_eq!(
            u.token,
            Some(JoinToken([
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]))
        );
        assert_eq!(u.to_string(), base, "shown and kept without it");
        assert_eq!(u.with_query(), format!("{base}?token={t}"));
        assert_eq!(u.with_query().parse::<JoinUrl>(), Ok(u));
        assert_eq!(format!("{:?}", u.token.unwrap()), "JoinToken(..)");
        let bad = |q: &str| format!("{base}?{q}").parse::<JoinUrl>().unwrap_err();
        assert_eq!(bad("token=abc"), JoinUrlError::Token);
        assert_eq!(bad("token="), JoinUrlError::Token);
        assert_eq!(
            bad(&format!("token={t}&token={t}")),
            JoinUrlError::Query("token".into())
        );
        let e = bad(&format!("token={t}&color=red"));
        assert_eq!(e, JoinUrlError::Query("color".into()));
        assert!(
            e.to_string()
                .contains("unknown or repeated query key `color`"),
            "{e}"
        );
        // An empty query is no query.
        assert_eq!(format!("{base}?").parse::<JoinUrl>().unwrap().token, None);
    }

    #[test]
    fn the_tcp_port_rides_in_the_query() {
        let key = "ab".repeat(32);
        let u: JoinUrl = format!("pilot://{key}@192.0.2.1:7000?tcp=443")
            .parse()
            .unwrap();
        assert_eq!(u.tcp, Some(443));
        assert_eq!(
            u.tcp_addr(u.first()),
            Some("192.0.2.1:443".parse().unwrap())
        );
        assert_eq!(
            u.to_string(),
            format!("pilot://{key}@192.0.2.1:7000?tcp=443")
        );
        assert_eq!(u.to_string().parse::<JoinUrl>(), Ok(u));
        for bad in ["tcp=0", "tcp=x", "tcp=70000", "tcp", "tcp=1&tcp=2", "udp=1"] {
            assert!(
                matches!(
                    format!("pilot://{key}@192.0.2.1:7000?{bad}").parse::<JoinUrl>(),
                    Err(JoinUrlError::Query(_))
                ),
                "{bad}"
            );
        }
        let none: JoinUrl = format!("pilot://{key}@192.0.2.1:7000?").parse().unwrap();
        assert_eq!(none.tcp, None);
    }

    #[test]
    fn token_and_tcp_together() {
        let key = "ab".repeat(32);
        let t = "0123456789abcdef0123456789abcdef";
        let u: JoinUrl = format!("pilot://{key}@192.0.2.1:7000?tcp=443&token={t}")
            .parse()
            .unwrap();
        assert_eq!(u.tcp, Some(443));
        assert!(u.token.is_some());
        // The kept form has the port but never the token.
        assert_eq!(
            u.to_string(),
            format!("pilot://{key}@192.0.2.1:7000?tcp=443")
        );
        assert_eq!(u.with_query().parse::<JoinUrl>(), Ok(u));
        let v: JoinUrl = format!("pilot://{key}@192.0.2.1:7000?token={t}&tcp=443")
            .parse()
            .unwrap();
        assert_eq!(v, u);
    }

    fn key() -> String {
        "ab".repeat(32)
    }

    #[test]
    fn several_endpoints_parse_in_order() {
        let k = key();
        let u: JoinUrl = format!("pilot://{k}@192.0.2.1:7946,198.51.100.2:7946,203.0.113.3:8000")
            .parse()
            .unwrap();
        let want: Vec<SocketAddr> = ["192.0.2.1:7946", "198.51.100.2:7946", "203.0.113.3:8000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(u.endpoints(), &want[..]);
        assert_eq!(u.first(), want[0]);
        assert!(u.has_endpoint(want[2]));
        assert!(!u.has_endpoint("192.0.2.9:7946".parse().unwrap()));
        // Display round-trips, with the query after the list.
        let t = "0123456789abcdef0123456789abcdef";
        let v: JoinUrl = format!("pilot://{k}@192.0.2.1:7946,198.51.100.2:7946?tcp=443&token={t}")
            .parse()
            .unwrap();
        assert_eq!(
            v.to_string(),
            format!("pilot://{k}@192.0.2.1:7946,198.51.100.2:7946?tcp=443")
        );
        assert_eq!(v.with_query().parse::<JoinUrl>(), Ok(v));
        assert_eq!(u.to_string().parse::<JoinUrl>(), Ok(u));
        // The TCP port is at each endpoint's own IP.
        assert_eq!(
            v.tcp_addr(v.endpoints()[1]),
            Some("198.51.100.2:443".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_endpoints_go_in_brackets() {
        let k = key();
        let s = format!("pilot://{k}@[2001:db8::1]:7946,192.0.2.1:7946");
        let u: JoinUrl = s.parse().unwrap();
        assert_eq!(u.first(), "[2001:db8::1]:7946".parse().unwrap());
        assert_eq!(u.to_string(), s, "shown with the brackets again");
        assert_eq!(
            format!("pilot://{k}@2001:db8::1:7946").parse::<JoinUrl>(),
            Err(JoinUrlError::Endpoint("2001:db8::1:7946".into()))
        );
    }

    #[test]
    fn at_most_eight_distinct_endpoints() {
        let k = key();
        let list = |n: usize| {
            (1..=n)
                .map(|i| format!("192.0.2.{i}:7946"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let eight: JoinUrl = format!("pilot://{k}@{}", list(8)).parse().unwrap();
        assert_eq!(eight.endpoints().len(), 8);
        assert_eq!(eight.to_string().parse::<JoinUrl>(), Ok(eight));
        let e = format!("pilot://{k}@{}", list(9))
            .parse::<JoinUrl>()
            .unwrap_err();
        assert_eq!(e, JoinUrlError::EndpointCount(9));
        assert!(e.to_string().contains("1 to 8"), "{e}");
        let e = format!("pilot://{k}@192.0.2.1:7946,192.0.2.2:7946,192.0.2.1:7946")
            .parse::<JoinUrl>()
            .unwrap_err();
        assert_eq!(
            e,
            JoinUrlError::DuplicateEndpoint("192.0.2.1:7946".parse().unwrap())
        );
        assert!(e.to_string().contains("192.0.2.1:7946 twice"), "{e}");
        // Empty entries, none at all, port 0 and no '@'.
        for (bad, want) in [
            ("192.0.2.1:7946,", JoinUrlError::Endpoint(String::new())),
            (",192.0.2.1:7946", JoinUrlError::Endpoint(String::new())),
            ("", JoinUrlError::Addr),
            ("192.0.2.1:0", JoinUrlError::Endpoint("192.0.2.1:0".into())),
        ] {
            assert_eq!(
                format!("pilot://{k}@{bad}").parse::<JoinUrl>(),
                Err(want),
                "{bad}"
            );
        }
        assert_eq!(
            JoinUrl::new([1; 32], &[]),
            Err(JoinUrlError::EndpointCount(0))
        );
    }

    #[test]
    fn same_registry_is_the_same_key() {
        let k = key();
        let one: JoinUrl = format!("pilot://{k}@192.0.2.1:7946").parse().unwrap();
        let two: JoinUrl = format!("pilot://{k}@192.0.2.1:7946,192.0.2.2:7946")
            .parse()
            .unwrap();
        assert_ne!(one, two);
        assert!(one.same_registry(&two) && two.same_registry(&one));
        let other = JoinUrl::single([0xcd; 32], one.first());
        assert!(!one.same_registry(&other));
    }
}
