//! The join URL a registry prints: `pilot://<registry key, 64 hex>@<ip:port>`.
//! A node pins the key, so nobody else can pose as the registry.

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
        let addr = addr
            .trim_end_matches('/')
            .parse()
            .map_err(|_| JoinUrlError::Addr)?;
        Ok(JoinUrl { key, addr })
    }
}

impl fmt::Display for JoinUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pilot://{}@{}", hex::encode(&self.key), self.addr)
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
}
