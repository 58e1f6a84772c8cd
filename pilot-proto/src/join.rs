//! The join URL a registry prints: `pilot://<registry key, 64 hex>@<ip:port>`,
//! optionally followed by `?tcp=<port>` when the registry also accepts
//! nodes over TCP with TLS (for networks that block UDP; same IP). A node
//! pins the key, so nobody else can pose as the registry, over UDP or TCP.
//! Query keys are `k=v` pairs joined by `&`; an unknown key is refused
//! rather than ignored (it would silently change what a node does).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::hex;

/// A parsed join URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinUrl {
    /// The registry's X25519 static public key.
    pub key: [u8; 32],
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Its TCP (TLS) port for nodes whose network blocks UDP, on the same
    /// IP (`?tcp=<port>`); none: the node never dials TCP.
    pub tcp: Option<u16>,
}

impl JoinUrl {
    /// The TCP relay's address, if the URL names one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.map(|p| SocketAddr::new(self.addr.ip(), p))
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
    /// Address part is not ip:port.
    #[error("the join URL must end in @<ip>:<port>")]
    Addr,
    /// A query key this version does not know, or a bad value.
    #[error("the join URL's query part is not understood: {0:?} (known: tcp=<port>)")]
    Query(String),
}

impl FromStr for JoinUrl {
    type Err = JoinUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix("pilot://")
            .ok_or(JoinUrlError::Scheme)?;
        let (key, addr) = rest.split_once('@').ok_or(JoinUrlError::Addr)?;
        let key = hex::decode_array::<32>(key).ok_or(JoinUrlError::Key)?;
        let (addr, query) = addr.split_once('?').unwrap_or((addr, ""));
        let addr = addr
            .trim_end_matches('/')
            .parse()
            .map_err(|_| JoinUrlError::Addr)?;
        let mut tcp = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("tcp", v)) if tcp.is_none() => {
                    tcp = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| JoinUrlError::Query(pair.into()))?,
                    );
                }
                _ => return Err(JoinUrlError::Query(pair.into())),
            }
        }
        Ok(JoinUrl { key, addr, tcp })
    }
}

impl fmt::Display for JoinUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pilot://{}@{}", hex::encode(&self.key), self.addr)?;
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
        let u = JoinUrl {
            key: [0xab; 32],
            addr: "192.0.2.1:7000".parse().unwrap(),
            tcp: None,
        };
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
            Err(JoinUrlError::Addr)
        );
    }

    #[test]
    fn the_tcp_port_rides_in_the_query() {
        let key = "ab".repeat(32);
        let u: JoinUrl = format!("pilot://{key}@192.0.2.1:7000?tcp=443")
            .parse()
            .unwrap();
        assert_eq!(u.tcp, Some(443));
        assert_eq!(u.tcp_addr(), Some("192.0.2.1:443".parse().unwrap()));
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
}
