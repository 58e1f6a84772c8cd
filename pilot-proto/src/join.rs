//! The join URL a registry prints: `pilot://<registry key, 64 hex>@<ip:port>`,
//! optionally with a query: `?tcp=<port>` when the registry also accepts
//! nodes over TCP with TLS (for networks that block UDP; same IP), and
//! `token=<32 hex>` (a join token, for a registry that admits new nodes
//! only with one). A node pins the key, so nobody else can pose as the
//! registry, over UDP or TCP. Query keys are `k=v` pairs joined by `&`; an
//! unknown key is refused rather than ignored (it would silently change
//! what a node does).

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
    /// A join token (`?token=`), sent with the node's registration. Not
    /// part of the URL's [`Display`](fmt::Display), which is what a node
    /// keeps and compares; [`JoinUrl::with_query`] has it.
    pub token: Option<JoinToken>,
    /// Its TCP (TLS) port for nodes whose network blocks UDP, on the same
    /// IP (`?tcp=<port>`); none: the node never dials TCP.
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
    /// Address part is not ip:port.
    #[error("the join URL must end in @<ip>:<port>")]
    Addr,
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
    /// The URL with all of its query (the token too), as an operator hands
    /// it out.
    pub fn with_query(&self) -> String {
        match (&self.token, self.tcp) {
            (Some(t), Some(_)) => format!("{self}&token={t}"),
            (Some(t), None) => format!("{self}?token={t}"),
            (None, _) => self.to_string(),
        }
    }

    /// The TCP relay's address, if the URL names one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.map(|p| SocketAddr::new(self.addr.ip(), p))
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
        let (key, addr) = rest.split_once('@').ok_or(JoinUrlError::Addr)?;
        let key = hex::decode_array::<32>(key).ok_or(JoinUrlError::Key)?;
        let addr = addr
            .trim_end_matches('/')
            .parse()
            .map_err(|_| JoinUrlError::Addr)?;
        let (mut token, mut tcp) = (None, None);
        for (k, v) in query(q, &["token", "tcp"])? {
            match k {
                "token" => token = Some(v.parse()?),
                _ => {
                    tcp = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| JoinUrlError::Query(format!("{k}={v}")))?,
                    )
                }
            }
        }
        Ok(JoinUrl {
            key,
            addr,
            token,
            tcp,
        })
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
            token: None,
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
}
