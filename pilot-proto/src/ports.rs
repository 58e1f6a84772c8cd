//! Port scopes: which protocols and destination ports a grant opens, written
//! the way operators type them (`tcp/8080,tcp/9000-9100,udp/53,icmp`, `all`).
//!
//! A [`Scope`] is kept normalised (ranges sorted, merged, distinct), so two
//! scopes that open the same ports compare and print the same. Its text form
//! is also its serialised form, in state files and on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most items in one written scope, so a scope always fits in a handshake
/// payload with room to spare.
pub const MAX_ITEMS: usize = 64;

/// IP protocol numbers the scopes name.
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What one packet that opens something asks for: a protocol and, for TCP
/// and UDP, a destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Traffic {
    /// TCP to this destination port.
    Tcp(u16),
    /// UDP to this destination port.
    Udp(u16),
    /// An ICMP query (echo request and the like).
    Icmp,
    /// Any other IP protocol, by number: only `all` opens it.
    Other(u8),
}

impl Traffic {
    /// The traffic of a packet with IP protocol `proto` and destination port
    /// `dst_port` (ignored for protocols without ports).
    pub fn from_ip(proto: u8, dst_port: u16) -> Self {
        match proto {
            IPPROTO_TCP => Traffic::Tcp(dst_port),
            IPPROTO_UDP => Traffic::Udp(dst_port),
            IPPROTO_ICMP => Traffic::Icmp,
            p => Traffic::Other(p),
        }
    }
}

/// Parses `tcp/22`, `udp/53`, `icmp` (and `tcp` for every TCP port); the
/// syntax of `pilot-tun explain <peer> [tcp/22]`.
impl FromStr for Traffic {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, ScopeError> {
        match parse_item(s)? {
            Item::Tcp(r) if r.lo == r.hi => Ok(Traffic::Tcp(r.lo)),
            Item::Udp(r) if r.lo == r.hi => Ok(Traffic::Udp(r.lo)),
            Item::Icmp => Ok(Traffic::Icmp),
            _ => Err(ScopeError::NotOnePort(s.trim().to_string())),
        }
    }
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Traffic::Tcp(p) => write!(f, "tcp/{p}"),
            Traffic::Udp(p) => write!(f, "udp/{p}"),
            Traffic::Icmp => f.write_str("icmp"),
            Traffic::Other(p) => write!(f, "ip-proto/{p}"),
        }
    }
}

/// An inclusive range of ports, `lo <= hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };

    /// True if `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// A set of protocols and ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope {
    all: bool,
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
    icmp: bool,
}

/// A written scope is malformed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Nothing written.
    #[error("empty port list (write e.g. tcp/8080,udp/53,icmp or all)")]
    Empty,
    /// An empty item (`tcp/22,,udp/53`).
    #[error("empty item in the port list")]
    EmptyItem,
    /// A protocol other than tcp, udp, icmp.
    #[error("'{0}': unknown protocol (use tcp, udp, icmp or all)")]
    Protocol(String),
    /// A port that is not a number from 0 to 65535.
    #[error("'{0}': a port is a number from 0 to 65535")]
    Port(String),
    /// `hi` below `lo`.
    #[error("'{0}': the range ends before it starts")]
    Reversed(String),
    /// A port given to a protocol without ports.
    #[error("'{0}': {1} has no ports")]
    NoPorts(String, &'static str),
    /// More than [`MAX_ITEMS`] items.
    #[error("{0} items; a port list holds at most {MAX_ITEMS}")]
    TooMany(usize),
    /// Where one port was expected, a range or a whole protocol.
    #[error("'{0}': name one port (e.g. tcp/22) or icmp")]
    NotOnePort(String),
}

enum Item {
    All,
    Tcp(PortRange),
    Udp(PortRange),
    Icmp,
}

fn parse_item(text: &str) -> Result<Item, ScopeError> {
    let item = text.trim().to_ascii_lowercase();
    if item.is_empty() {
        return Err(ScopeError::EmptyItem);
    }
    let (proto, ports) = match item.split_once('/') {
        Some((p, ports)) => (p, Some(ports)),
        None => (item.as_str(), None),
    };
    match (proto, ports) {
        ("all", None) => Ok(Item::All),
        ("icmp", None) => Ok(Item::Icmp),
        ("all" | "icmp", Some(_)) => Err(ScopeError::NoPorts(item.clone(), "icmp or all")),
        ("tcp", None) => Ok(Item::Tcp(PortRange::ALL)),
        ("udp", None) => Ok(Item::Udp(PortRange::ALL)),
        ("tcp", Some(p)) => parse_range(&item, p).map(Item::Tcp),
        ("udp", Some(p)) => parse_range(&item, p).map(Item::Udp),
        _ => Err(ScopeError::Protocol(item.clone())),
    }
}

fn parse_range(item: &str, ports: &str) -> Result<PortRange, ScopeError> {
    let port = |s: &str| {
        // u16::from_str accepts a leading '+'; a port list should not.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ScopeError::Port(item.to_string()));
        }
        s.parse::<u16>()
            .map_err(|_| ScopeError::Port(item.to_string()))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(ScopeError::Reversed(item.to_string()));
    }
    Ok(PortRange { lo, hi })
}

/// Sorts and merges overlapping or touching ranges.
fn normalise(ranges: &mut Vec<PortRange>) {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match out.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                last.hi = last.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    *ranges = out;
}

/// True if sorted, disjoint `ranges` contain `port`.
fn ranges_contain(ranges: &[PortRange], port: u16) -> bool {
    // The first range that ends at or after `port` is the only candidate.
    let i = ranges.partition_point(|r| r.hi < port);
    ranges.get(i).is_some_and(|r| r.lo <= port)
}

impl Scope {
    /// Everything: every protocol, every port.
    pub fn all() -> Self {
        Scope {
            all: true,
            ..Scope::default()
        }
    }

    /// Nothing.
    pub fn none() -> Self {
        Scope::default()
    }

    /// A scope of TCP and UDP ranges and ICMP (normalised here).
    pub fn new(mut tcp: Vec<PortRange>, mut udp: Vec<PortRange>, icmp: bool) -> Self {
        tcp.retain(|r| r.lo <= r.hi);
        udp.retain(|r| r.lo <= r.hi);
        normalise(&mut tcp);
        normalise(&mut udp);
        Scope {
            all: false,
            tcp,
            udp,
            icmp,
        }
    }

    /// True if it opens everything.
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// True if it opens nothing.
    pub fn is_empty(&self) -> bool {
        !self.all && !self.icmp && self.tcp.is_empty() && self.udp.is_empty()
    }

    /// Its TCP ranges (sorted, disjoint; every port if it is `all`).
    pub fn tcp(&self) -> &[PortRange] {
        if self.all {
            &[PortRange::ALL]
        } else {
            &self.tcp
        }
    }

    /// Its UDP ranges (sorted, disjoint; every port if it is `all`).
    pub fn udp(&self) -> &[PortRange] {
        if self.all {
            &[PortRange::ALL]
        } else {
            &self.udp
        }
    }

    /// True if it opens ICMP queries.
    pub fn icmp(&self) -> bool {
        self.all || self.icmp
    }

    /// True if `traffic` is inside it.
    pub fn covers(&self, traffic: Traffic) -> bool {
        match traffic {
            _ if self.all => true,
            Traffic::Tcp(p) => ranges_contain(&self.tcp, p),
            Traffic::Udp(p) => ranges_contain(&self.udp, p),
            Traffic::Icmp => self.icmp,
            Traffic::Other(_) => false,
        }
    }

    /// Everything either scope opens.
    pub fn union(&self, other: &Scope) -> Scope {
        if self.all || other.all {
            return Scope::all();
        }
        let tcp = self.tcp.iter().chain(&other.tcp).copied().collect();
        let udp = self.udp.iter().chain(&other.udp).copied().collect();
        Scope::new(tcp, udp, self.icmp || other.icmp)
    }
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, ScopeError> {
        if s.trim().is_empty() {
            return Err(ScopeError::Empty);
        }
        let items: Vec<&str> = s.split(',').collect();
        if items.len() > MAX_ITEMS {
            return Err(ScopeError::TooMany(items.len()));
        }
        let (mut tcp, mut udp, mut icmp) = (Vec::new(), Vec::new(), false);
        for item in items {
            match parse_item(item)? {
                Item::All => return items_after_all(s),
                Item::Tcp(r) => tcp.push(r),
                Item::Udp(r) => udp.push(r),
                Item::Icmp => icmp = true,
            }
        }
        Ok(Scope::new(tcp, udp, icmp))
    }
}

/// `all` anywhere makes the scope everything, but the other items must
/// still be well formed: a typo next to `all` is still a typo.
fn items_after_all(s: &str) -> Result<Scope, ScopeError> {
    for item in s.split(',') {
        parse_item(item)?;
    }
    Ok(Scope::all())
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("all");
        }
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            if !std::mem::take(&mut first) {
                f.write_str(",")?;
            }
            Ok(())
        };
        for (name, ranges) in [("tcp", &self.tcp), ("udp", &self.udp)] {
            for r in ranges {
                sep(f)?;
                if *r == PortRange::ALL {
                    f.write_str(name)?;
                } else if r.lo == r.hi {
                    write!(f, "{name}/{}", r.lo)?;
                } else {
                    write!(f, "{name}/{}-{}", r.lo, r.hi)?;
                }
            }
        }
        if self.icmp {
            sep(f)?;
            f.write_str("icmp")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Scope {
    type Error = ScopeError;
    fn try_from(s: String) -> Result<Self, ScopeError> {
        if s == "none" {
            return Ok(Scope::none());
        }
        s.parse()
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_the_documented_examples() {
        let s = scope("tcp/8080,tcp/9000-9100,udp/53,icmp");
        assert_eq!(s.to_string(), "tcp/8080,tcp/9000-9100,udp/53,icmp");
        assert!(s.covers(Traffic::Tcp(8080)));
        assert!(s.covers(Traffic::Tcp(9000)) && s.covers(Traffic::Tcp(9100)));
        assert!(!s.covers(Traffic::Tcp(8999)) && !s.covers(Traffic::Tcp(9101)));
        assert!(!s.covers(Traffic::Tcp(22)) && !s.covers(Traffic::Tcp(53)));
        assert!(s.covers(Traffic::Udp(53)) && !s.covers(Traffic::Udp(8080)));
        assert!(s.covers(Traffic::Icmp) && !s.covers(Traffic::Other(47)));
        let all = scope("all");
        assert!(all.is_all() && all.covers(Traffic::Other(47)));
        assert_eq!(all.to_string(), "all");
        assert_eq!(scope("tcp/22,all").to_string(), "all");
    }

    #[test]
    fn normalises_so_equal_scopes_print_equal() {
        assert_eq!(
            scope(" UDP/53 , tcp/10-20,tcp/15-30,tcp/31, tcp/5 ").to_string(),
            "tcp/5,tcp/10-31,udp/53"
        );
        assert_eq!(scope("tcp/1-5,tcp/6-9"), scope("tcp/1-9"));
        assert_eq!(scope("tcp/0-65535").to_string(), "tcp");
        assert_eq!(scope("udp,tcp/80").to_string(), "tcp/80,udp");
        assert_eq!(scope("icmp,icmp").to_string(), "icmp");
        assert_eq!(Scope::none().to_string(), "none");
        assert_eq!(Scope::try_from("none".to_string()), Ok(Scope::none()));
        assert_eq!(
            scope("tcp/65535").tcp(),
            &[PortRange {
                lo: 65535,
                hi: 65535
            }]
        );
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let err = |s: &str| s.parse::<Scope>().unwrap_err();
        assert_eq!(err(""), ScopeError::Empty);
        assert_eq!(err("tcp/22,,udp/53"), ScopeError::EmptyItem);
        assert_eq!(err("sctp/22"), ScopeError::Protocol("sctp/22".into()));
        assert_eq!(err("tcp/65536"), ScopeError::Port("tcp/65536".into()));
        assert_eq!(err("tcp/"), ScopeError::Port("tcp/".into()));
        assert_eq!(err("tcp/+22"), ScopeError::Port("tcp/+22".into()));
        assert_eq!(err("tcp/ssh"), ScopeError::Port("tcp/ssh".into()));
        assert_eq!(err("tcp/1-2-3"), ScopeError::Port("tcp/1-2-3".into()));
        assert_eq!(err("tcp/-5"), ScopeError::Port("tcp/-5".into()));
        assert_eq!(err("tcp/100-10"), ScopeError::Reversed("tcp/100-10".into()));
        assert_eq!(
            err("icmp/8"),
            ScopeError::NoPorts("icmp/8".into(), "icmp or all")
        );
        assert_eq!(err("all,tcp/x"), ScopeError::Port("tcp/x".into()));
        let many = vec!["tcp/1"; MAX_ITEMS + 1].join(",");
        assert_eq!(err(&many), ScopeError::TooMany(MAX_ITEMS + 1));
        // Every message names the offending item.
        assert!(err("tcp/100-10").to_string().contains("tcp/100-10"));
    }

    #[test]
    fn union_and_serde_round_trip() {
        let a = scope("tcp/80,udp/53");
        let b = scope("tcp/81-90,icmp");
        assert_eq!(a.union(&b).to_string(), "tcp/80-90,udp/53,icmp");
        assert!(a.union(&Scope::all()).is_all());
        let bytes = postcard::to_allocvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<Scope>(&bytes).unwrap(), a);
        let bad = postcard::to_allocvec("tcp/99999").unwrap();
        assert!(postcard::from_bytes::<Scope>(&bad).is_err());
    }

    #[test]
    fn traffic_text() {
        assert_eq!("tcp/22".parse::<Traffic>(), Ok(Traffic::Tcp(22)));
        assert_eq!("udp/53".parse::<Traffic>(), Ok(Traffic::Udp(53)));
        assert_eq!("icmp".parse::<Traffic>(), Ok(Traffic::Icmp));
        assert!("tcp/1-2".parse::<Traffic>().is_err());
        assert!("all".parse::<Traffic>().is_err());
        assert_eq!(Traffic::from_ip(6, 22), Traffic::Tcp(22));
        assert_eq!(Traffic::from_ip(17, 53), Traffic::Udp(53));
        assert_eq!(Traffic::from_ip(1, 9), Traffic::Icmp);
        assert_eq!(Traffic::from_ip(47, 0), Traffic::Other(47));
        assert_eq!(Traffic::Tcp(22).to_string(), "tcp/22");
    }

    proptest::proptest! {
        /// `covers` agrees with a linear scan over the written ranges, and
        /// printing then parsing gives the same scope.
        #[test]
        fn covers_matches_the_ranges_written(
            ranges in proptest::collection::vec((0u16..200, 0u16..20, proptest::bool::ANY), 0..12),
            icmp in proptest::bool::ANY,
            probe in 0u16..230,
        ) {
            let tcp: Vec<PortRange> = ranges.iter().filter(|r| r.2).map(|&(lo, len, _)| PortRange { lo, hi: lo + len }).collect();
            let udp: Vec<PortRange> = ranges.iter().filter(|r| !r.2).map(|&(lo, len, _)| PortRange { lo, hi: lo + len }).collect();
            let s = Scope::new(tcp.clone(), udp.clone(), icmp);
            proptest::prop_assert_eq!(s.covers(Traffic::Tcp(probe)), tcp.iter().any(|r| r.contains(probe)));
            proptest::prop_assert_eq!(s.covers(Traffic::Udp(probe)), udp.iter().any(|r| r.contains(probe)));
            if !s.is_empty() {
                proptest::prop_assert_eq!(s.to_string().parse::<Scope>().unwrap(), s);
            }
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in "\\PC{0,40}") {
            let _ = text.parse::<Scope>();
            let _ = text.parse::<Traffic>();
        }
    }
}
