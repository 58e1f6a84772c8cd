//! DNS answers for the overlay's names, without I/O: a query's bytes in,
//! the answer's bytes out (or nothing), from a table of the names a node
//! may tell ([`Names`]): `<name>.<domain>` → A (and AAAA once the table
//! knows the overlay's IPv6 prefix, [`Names::with_ula`]), the reverse name
//! of an overlay address (`in-addr.arpa` or `ip6.arpa`) → PTR, NXDOMAIN for other names in the domain, REFUSED
//! for everything else (nothing is forwarded). The wire format is
//! hickory-proto's; [`answer`] never panics, whatever the bytes.
//!
//! Which names go in the table ([`Names::from_trust`]): peers we approved
//! (by hand or by a policy rule, once met) that have a name, and our own.
//! A peer that only asked us, or that we denied or revoked, is left out,
//! and so is any other node of the network; a name two such records share
//! is left out too (answering it would pick one of them).
//!
//! The daemon's server (pilot-tun's `dns` module) feeds it, and decides
//! who may ask.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::Ipv4Net;

use crate::ipv6::Ula;
use crate::trust::{Decision, TrustStore};

/// The overlay's domain unless `--dns-domain` says otherwise.
pub const DEFAULT_DOMAIN: &str = "pilot";
/// The longest query read; a longer datagram is dropped. A question for
/// one name fits in far less, EDNS options included.
pub const MAX_QUERY: usize = 512;
/// The largest answer we advertise with EDNS (ours are ~100 bytes).
const EDNS_PAYLOAD: u16 = 1232;
/// Seconds a resolver may keep an answer: short, so a revocation or a
/// new peer shows soon.
pub const TTL: u32 = 5;
/// The longest `--dns-domain`.
const MAX_DOMAIN: usize = 200;

/// The overlay's DNS domain, e.g. `pilot` (lower case, no trailing dot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    labels: Vec<String>,
}

/// `--dns-domain` is not a usable domain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Nothing given.
    #[error("the DNS domain is empty")]
    Empty,
    /// Longer than [`MAX_DOMAIN`].
    #[error("the DNS domain is longer than {MAX_DOMAIN} characters")]
    TooLong,
    /// A label with other characters than a-z, 0-9 and '-'.
    #[error(
        "{0:?} is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
    )]
    BadLabel(String),
    /// The reverse-lookup tree, which is not ours to take.
    #[error("the DNS domain cannot be under arpa")]
    Reserved,
}

impl Domain {
    /// Parses a domain like `pilot` or `corp.pilot` (case is ignored, a
    /// trailing dot allowed).
    pub fn parse(s: &str) -> Result<Domain, DomainError> {
        let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if s.is_empty() {
            return Err(DomainError::Empty);
        }
        if s.len() > MAX_DOMAIN {
            return Err(DomainError::TooLong);
        }
        let labels: Vec<String> = s.split('.').map(str::to_string).collect();
        for l in &labels {
            let ok = !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-');
            if !ok {
                return Err(DomainError::BadLabel(l.clone()));
            }
        }
        if labels.last().map(String::as_str) == Some("arpa") {
            return Err(DomainError::Reserved);
        }
        Ok(Domain { labels })
    }

    /// The domain as written, e.g. `pilot`.
    pub fn as_str(&self) -> String {
        self.labels.join(".")
    }

    /// The labels of `name` before the domain, if `name` is in it.
    fn strip<'a>(&self, name: &'a [Vec<u8>]) -> Option<&'a [Vec<u8>]> {
        let n = self.labels.len();
        let split = name.len().checked_sub(n)?;
        let (host, tail) = name.split_at(split);
        tail.iter()
            .zip(&self.labels)
            .all(|(a, b)| a.as_slice() == b.as_bytes())
            .then_some(host)
    }
}

impl Default for Domain {
    fn default() -> Self {
        Domain {
            labels: vec![DEFAULT_DOMAIN.to_string()],
        }
    }
}

/// The names this node may tell, as the control task last published them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// The overlay network: reverse names of addresses in it are ours.
    network: Option<Ipv4Net>,
    /// The overlay's IPv6 prefix: names get AAAA records, and reverse
    /// names under it are ours.
    ula: Option<Ula>,
    by_name: BTreeMap<String, Ipv4Addr>,
    by_addr: BTreeMap<Ipv4Addr, String>,
}

impl Names {
    /// The table for our own name and address (`own`), the overlay
    /// `network` and the named `peers`. Our name wins over a peer that
    /// claims it; a name two peers claim is left out.
    pub fn build<'a>(
        own: Option<(&'a str, Ipv4Addr)>,
        network: Option<Ipv4Net>,
        peers: impl IntoIterator<Item = (&'a str, Ipv4Addr)>,
    ) -> Names {
        let mut seen: BTreeMap<&str, Option<Ipv4Addr>> = BTreeMap::new();
        for (name, addr) in peers {
            seen.entry(name)
                .and_modify(|a| {
                    if *a != Some(addr) {
                        *a = None;
                    }
                })
                .or_insert(Some(addr));
        }
        let mut t = Names {
            network,
            ..Names::default()
        };
        for (name, addr) in seen {
            if let Some(addr) = addr {
                if own.is_none_or(|(o, _)| o != name) {
                    t.by_name.insert(name.to_string(), addr);
                    t.by_addr.insert(addr, name.to_string());
                }
            }
        }
        if let Some((name, addr)) = own {
            t.by_name.insert(name.to_string(), addr);
            t.by_addr.insert(addr, name.to_string());
        }
        t
    }

    /// The table from the trust store: peers with our approval that have
    /// a name.
    pub fn from_trust(
        trust: &TrustStore,
        own: Option<(&str, Ipv4Addr)>,
        network: Option<Ipv4Net>,
    ) -> Names {
        let peers = trust
            .iter()
            .filter(|(_, r)| r.ours == Decision::Approved)
            .filter_map(|(_, r)| Some((r.hostname.as_deref()?, r.address)));
        Names::build(own, network, peers)
    }

    /// The same table with the overlay's IPv6 prefix (every node's /128
    /// derives from its IPv4 address, see `crate::ipv6`).
    pub fn with_ula(mut self, ula: Option<Ula>) -> Names {
        self.ula = ula;
        self
    }

    /// A digest of what [`Names::from_trust`] and [`Names::with_ula`]
    /// read, so the control task can tell cheaply (no allocation) that the
    /// table has not changed.
    pub fn fingerprint(
        trust: &TrustStore,
        own: Option<(&str, Ipv4Addr)>,
        network: Option<Ipv4Net>,
        ula: Option<Ula>,
    ) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (own, network, ula).hash(&mut h);
        for (_, r) in trust.iter().filter(|(_, r)| r.ours == Decision::Approved) {
            (r.hostname.as_deref(), r.address).hash(&mut h);
        }
        h.finish()
    }

    /// The address of `name`.
    pub fn address_of(&self, name: &str) -> Option<Ipv4Addr> {
        self.by_name.get(name).copied()
    }

    /// The name of `addr`.
    pub fn name_of(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }

    /// How many names there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// No names at all.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The answer to one datagram: the bytes to send back, or `None` to send
/// nothing (too short or too long to be a query, or a response). Never
/// panics, whatever `query` holds.
pub fn answer(query: &[u8], domain: &Domain, names: &Names) -> Option<Vec<u8>> {
    if query.len() < 12 || query.len() > MAX_QUERY {
        return None;
    }
    // The QR bit: a response is never answered (no loops between servers).
    if query[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let Ok(msg) = Message::from_vec(query) else {
        return encode(&Message::error_msg(
            id,
            OpCode::Query,
            ResponseCode::FormErr,
        ));
    };
    let mut reply = Message::new();
    reply
        .set_id(id)
        .set_message_type(MessageType::Response)
        .set_op_code(msg.op_code())
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(false)
        .set_checking_disabled(msg.checking_disabled());
    if msg.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    if msg.op_code() != OpCode::Query {
        reply.set_response_code(ResponseCode::NotImp);
        return encode(&reply);
    }
    let [q] = msg.queries() else {
        reply.set_response_code(ResponseCode::FormErr);
        return encode(&reply);
    };
    reply.add_query(q.clone());
    let (code, record) = lookup(q, domain, names);
    reply
        .set_response_code(code)
        .set_authoritative(code != ResponseCode::Refused);
    if let Some(r) = record {
        reply.add_answer(r);
    }
    encode(&reply)
}

/// The answer's bytes; `None` if hickory cannot encode it (it always can
/// for the messages built here: one question, at most one record).
fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

/// The answer code and record for one question.
fn lookup(q: &Query, domain: &Domain, names: &Names) -> (ResponseCode, Option<Record>) {
    if q.query_class() != DNSClass::IN {
        return (ResponseCode::Refused, None);
    }
    let qtype = q.query_type();
    let labels: Vec<Vec<u8>> = q.name().iter().map(|l| l.to_ascii_lowercase()).collect();
    if let Some(host) = domain.strip(&labels) {
        return match host {
            // The domain itself exists; it holds no records of its own.
            [] => (ResponseCode::NoError, None),
            [label] => {
                let addr = std::str::from_utf8(label)
                    .ok()
                    .and_then(|n| names.address_of(n));
                match addr {
                    None => (ResponseCode::NXDomain, None),
                    Some(a) if matches!(qtype, RecordType::A | RecordType::ANY) => {
                        let r = Record::from_rdata(q.name().clone(), TTL, RData::A(A(a)));
                        (ResponseCode::NoError, Some(r))
                    }
                    Some(a) if qtype == RecordType::AAAA && names.ula.is_some() => {
                        let v6 = names
                            .ula
                            .map(|u| u.address(a))
                            .unwrap_or(Ipv6Addr::UNSPECIFIED);
                        let r = Record::from_rdata(q.name().clone(), TTL, RData::AAAA(AAAA(v6)));
                        (ResponseCode::NoError, Some(r))
                    }
                    // The name exists, without records of this type (AAAA
                    // when the overlay carries no IPv6).
                    Some(_) => (ResponseCode::NoError, None),
                }
            }
            _ => (ResponseCode::NXDomain, None),
        };
    }
    let addr = if let Some(v6) = reverse_v6(&labels) {
        // Under our /48 only; a name there that is no node's address
        // does not exist.
        match names.ula {
            Some(u) if u.contains(&v6) => match u.v4_of(&v6) {
                Some(a) => a,
                None => return (ResponseCode::NXDomain, None),
            },
            _ => return (ResponseCode::Refused, None),
        }
    } else {
        let Some(addr) = reverse_v4(&labels) else {
            return (ResponseCode::Refused, None);
        };
        addr
    };
    if names.network.is_none_or(|n| !n.contains(&addr)) {
        return (ResponseCode::Refused, None);
    }
    let Some(name) = names.name_of(addr) else {
        return (ResponseCode::NXDomain, None);
    };
    if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
        return (ResponseCode::NoError, None);
    }
    let target = Name::from_labels(
        std::iter::once(name.as_bytes()).chain(domain.labels.iter().map(|l| l.as_bytes())),
    );
    match target {
        Ok(mut t) => {
            t.set_fqdn(true);
            let r = Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(t)));
            (ResponseCode::NoError, Some(r))
        }
        Err(_) => (ResponseCode::ServFail, None),
    }
}

/// The address of a name `d.c.b.a.in-addr.arpa` (lower-cased labels).
fn reverse_v4(labels: &[Vec<u8>]) -> Option<Ipv4Addr> {
    let [d, c, b, a, inaddr, arpa] = labels else {
        return None;
    };
    if inaddr.as_slice() != b"in-addr" || arpa.as_slice() != b"arpa" {
        return None;
    }
    let octet = |l: &[u8]| -> Option<u8> {
        // Decimal, without leading zeros (the canonical spelling only).
        if l.is_empty() || l.len() > 3 || (l.len() > 1 && l[0] == b'0') {
            return None;
        }
        std::str::from_utf8(l).ok()?.parse().ok()
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// The address of a name of 32 nibble labels under `ip6.arpa`, lowest
/// nibble first (lower-cased labels).
fn reverse_v6(labels: &[Vec<u8>]) -> Option<Ipv6Addr> {
    let [nibbles @ .., ip6, arpa] = labels else {
        return None;
    };
    if nibbles.len() != 32 || ip6.as_slice() != b"ip6" || arpa.as_slice() != b"arpa" {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, l) in nibbles.iter().rev().enumerate() {
        let [c] = l.as_slice() else { return None };
        let v = char::from(*c).to_digit(16)? as u8;
        b[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
    }
    Some(Ipv6Addr::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::messages::{Signed, Statement, StatementKind};

    const OWN: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const CACHE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    fn net() -> Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    fn table() -> Names {
        Names::build(
            Some(("alpha", OWN)),
            Some(net()),
            [("cache", CACHE), ("build-1", Ipv4Addr::new(10, 77, 3, 4))],
        )
    }

    fn ask_with(name: &str, qtype: RecordType, f: impl FnOnce(&mut Message)) -> Message {
        let mut q = Message::new();
        q.set_id(0x1234).set_recursion_desired(true);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        f(&mut q);
        let bytes = q.to_vec().unwrap();
        let out = answer(&bytes, &Domain::default(), &table()).expect("an answer");
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.message_type(), MessageType::Response);
        assert_eq!(m.queries().len(), 1, "the question is echoed");
        m
    }

    fn ask(name: &str, qtype: RecordType) -> Message {
        ask_with(name, qtype, |_| {})
    }

    fn a_of(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_names_resolve_to_overlay_addresses() {
        let m = ask("cache.pilot.", RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.authoritative());
        assert!(!m.recursion_available());
        assert_eq!(a_of(&m), vec![CACHE]);
        assert_eq!(m.answers()[0].ttl(), TTL);
        // Case does not matter; the answer keeps the question's spelling.
        let m = ask("CaChE.PiLoT.", RecordType::A);
        assert_eq!(a_of(&m), vec![CACHE]);
        assert_eq!(m.answers()[0].name().to_ascii(), "CaChE.PiLoT.");
        // Our own name.
        assert_eq!(a_of(&ask("alpha.pilot.", RecordType::A)), vec![OWN]);
    }

    #[test]
    fn other_types_of_a_known_name_are_empty_not_missing() {
        let m = ask("cache.pilot.", RecordType::AAAA);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
        let m = ask("pilot.", RecordType::SOA);
        assert_eq!(m.response_code(), ResponseCode::NoError);
    }

    #[test]
    fn unknown_names_in_the_domain_do_not_exist() {
        for n in ["nobody.pilot.", "a.cache.pilot.", "xn--caf-dma.pilot."] {
            let m = ask(n, RecordType::A);
            assert_eq!(m.response_code(), ResponseCode::NXDomain, "{n}");
            assert!(m.answers().is_empty());
        }
    }

    #[test]
    fn names_outside_the_domain_are_refused_not_forwarded() {
        for n in ["example.com.", "pilot.com.", "cache.pilotx.", "."] {
            let m = ask(n, RecordType::A);
            assert_eq!(m.response_code(), ResponseCode::Refused, "{n}");
            assert!(!m.authoritative());
            assert!(m.answers().is_empty());
        }
        let mut q = Message::new();
        q.add_query({
            let mut q = Query::query(Name::from_ascii("cache.pilot.").unwrap(), RecordType::A);
            q.set_query_class(DNSClass::CH);
            q
        });
        let out = answer(&q.to_vec().unwrap(), &Domain::default(), &table()).unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.response_code(), ResponseCode::Refused, "class CH");
    }

    /// The answer from [`table`] with the overlay's IPv6 prefix.
    fn ask6(name: &str, qtype: RecordType) -> Message {
        let mut q = Message::new();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let names = table().with_ula(Some(ula()));
        let out = answer(&q.to_vec().unwrap(), &Domain::default(), &names).unwrap();
        Message::from_vec(&out).unwrap()
    }

    fn ula() -> Ula {
        Ula::derive(&[7; 32], net())
    }

    /// The `ip6.arpa` name of `a`.
    fn arpa6(a: Ipv6Addr) -> String {
        let mut n: String = a
            .octets()
            .iter()
            .rev()
            .map(|b| format!("{:x}.{:x}.", b & 15, b >> 4))
            .collect();
        n.push_str("ip6.arpa.");
        n
    }

    #[test]
    fn aaaa_answers_the_peers_overlay_ipv6_address() {
        let m = ask6("cache.pilot.", RecordType::AAAA);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        let got: Vec<Ipv6Addr> = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![ula().address(CACHE)]);
        // A still answers A; unknown names do not exist for AAAA either.
        assert_eq!(a_of(&ask6("cache.pilot.", RecordType::A)), vec![CACHE]);
        let m = ask6("nobody.pilot.", RecordType::AAAA);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn ip6_arpa_names_of_overlay_addresses() {
        let m = ask6(&arpa6(ula().address(CACHE)), RecordType::PTR);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        match m.answers()[0].data() {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "cache.pilot."),
            other => panic!("{other:?}"),
        }
        // Upper-case nibbles are the same name.
        let upper = arpa6(ula().address(CACHE))
            .to_uppercase()
            .replace("IP6.ARPA", "ip6.arpa");
        assert_eq!(ask6(&upper, RecordType::PTR).answers().len(), 1);
        // An overlay address nobody we trust has: no such name.
        let m = ask6(
            &arpa6(ula().address(Ipv4Addr::new(10, 77, 9, 9))),
            RecordType::PTR,
        );
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        // In our /48 but not a node's address: no such name either.
        let mut b = ula().address(CACHE).octets();
        b[8] = 1;
        let m = ask6(&arpa6(Ipv6Addr::from(b)), RecordType::PTR);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        // Outside our /48, or with no IPv6 at all: not ours to answer.
        let other = Ula::derive(&[8; 32], net()).address(CACHE);
        assert_eq!(
            ask6(&arpa6(other), RecordType::PTR).response_code(),
            ResponseCode::Refused
        );
        let m = ask(&arpa6(ula().address(CACHE)), RecordType::PTR);
        assert_eq!(m.response_code(), ResponseCode::Refused);
        // Malformed reverse names: refused, never a panic.
        for n in ["x.ip6.arpa.", "ip6.arpa.", "0.0.ip6.arpa."] {
            assert_eq!(
                ask6(n, RecordType::PTR).response_code(),
                ResponseCode::Refused,
                "{n}"
            );
        }
        let mut long = arpa6(ula().address(CACHE));
        long.replace_range(0..1, "g");
        assert_eq!(
            ask6(&long, RecordType::PTR).response_code(),
            ResponseCode::Refused
        );
    }

    #[test]
    fn reverse_names_of_overlay_addresses() {
        let m = ask("2.0.77.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        let RData::PTR(p) = m.answers()[0].data() else {
            panic!("not a PTR: {m:?}")
        };
        assert_eq!(p.0.to_ascii(), "cache.pilot.");
        let m = ask("1.0.77.10.in-addr.arpa.", RecordType::PTR);
        let RData::PTR(p) = m.answers()[0].data() else {
            panic!("not a PTR")
        };
        assert_eq!(p.0.to_ascii(), "alpha.pilot.", "our own address");
        // In the overlay, nobody we may name.
        let m = ask("9.9.77.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        // Outside the overlay, or not an address: not ours.
        for n in [
            "1.2.0.192.in-addr.arpa.",
            "77.10.in-addr.arpa.",
            "02.0.77.10.in-addr.arpa.",
            "256.0.77.10.in-addr.arpa.",
            "x.0.77.10.in-addr.arpa.",
        ] {
            let m = ask(n, RecordType::PTR);
            assert_eq!(m.response_code(), ResponseCode::Refused, "{n}");
        }
    }

    #[test]
    fn edns_queries_get_edns_answers() {
        let m = ask_with("cache.pilot.", RecordType::A, |q| {
            q.set_edns(Edns::new());
        });
        assert_eq!(
            m.extensions().as_ref().map(|e| e.max_payload()),
            Some(EDNS_PAYLOAD)
        );
        assert!(ask("cache.pilot.", RecordType::A).extensions().is_none());
    }

    #[test]
    fn only_approved_peers_resolve() {
        let me = Identity::from_bytes(&[1; 64]);
        let mut trust = TrustStore::default();
        let peer = |n: u8| Identity::from_bytes(&[n; 64]).public();
        // Approved by us and by them: resolves.
        let p2 = peer(2);
        trust
            .decide(&p2, CACHE, Some("cache".into()), &approve(), 1)
            .unwrap();
        let p5 = peer(5);
        // Requested by us, not answered yet: ours, so it resolves.
        trust
            .decide(
                &p5,
                Ipv4Addr::new(10, 77, 0, 5),
                Some("asked".into()),
                &StatementKind::Request {
                    note: String::new(),
                },
                1,
            )
            .unwrap();
        // It asked us; we did not answer: does not resolve.
        let asker = Identity::from_bytes(&[3; 64]);
        let st = Statement {
            kind: StatementKind::Request { note: "hi".into() },
            from: asker.public(),
            to: me.node_id(),
            seq: 1,
        };
        let signed = Signed::sign(st, &asker);
        trust
            .receive(
                &me.node_id(),
                &signed,
                Ipv4Addr::new(10, 77, 0, 3),
                Some("asker".into()),
                1,
            )
            .unwrap();
        // We denied it: does not resolve.
        trust
            .decide(
                &peer(4),
                Ipv4Addr::new(10, 77, 0, 4),
                Some("denied".into()),
                &StatementKind::Deny,
                1,
            )
            .unwrap();
        let names = Names::from_trust(&trust, Some(("alpha", OWN)), Some(net()));
        let fp = Names::fingerprint(&trust, Some(("alpha", OWN)), Some(net()), None);
        assert_ne!(
            fp,
            Names::fingerprint(&trust, Some(("alpha", OWN)), Some(net()), Some(ula())),
            "the prefix is part of what the table depends on"
        );
        assert_eq!(names.address_of("cache"), Some(CACHE));
        assert_eq!(names.address_of("asker"), None, "untrusted asker");
        assert_eq!(names.address_of("denied"), None);
        assert_eq!(names.name_of(Ipv4Addr::new(10, 77, 0, 3)), None);
        assert_eq!(names.address_of("asked"), Some(Ipv4Addr::new(10, 77, 0, 5)));
        assert_eq!(names.len(), 3);
        let bytes = {
            let mut q = Message::new();
            q.add_query(Query::query(
                Name::from_ascii("asker.pilot.").unwrap(),
                RecordType::A,
            ));
            q.to_vec().unwrap()
        };
        let m = Message::from_vec(&answer(&bytes, &Domain::default(), &names).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
    }

    fn approve() -> StatementKind {
        StatementKind::Approve
    }

    #[test]
    fn a_shared_name_is_not_answered_and_ours_wins() {
        let n = Names::build(
            Some(("alpha", OWN)),
            Some(net()),
            [
                ("twin", Ipv4Addr::new(10, 77, 0, 8)),
                ("twin", Ipv4Addr::new(10, 77, 0, 9)),
                ("alpha", Ipv4Addr::new(10, 77, 0, 7)),
            ],
        );
        assert_eq!(n.address_of("twin"), None);
        assert_eq!(n.address_of("alpha"), Some(OWN));
        assert_eq!(n.name_of(Ipv4Addr::new(10, 77, 0, 7)), None);
    }

    #[test]
    fn malformed_datagrams_never_panic() {
        let d = Domain::default();
        let t = table();
        assert_eq!(answer(&[], &d, &t), None);
        assert_eq!(answer(&[0; 11], &d, &t), None, "shorter than a header");
        assert_eq!(answer(&[0; MAX_QUERY + 1], &d, &t), None, "too long");
        // A response (QR set) gets nothing.
        let mut resp = [0u8; 12];
        resp[2] = 0x80;
        assert_eq!(answer(&resp, &d, &t), None);
        // A header that promises a question that is not there: FORMERR.
        let mut h = [0u8; 12];
        h[0] = 0xab;
        h[5] = 1;
        let m = Message::from_vec(&answer(&h, &d, &t).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert_eq!(m.id(), 0xab00);
        // No question at all: FORMERR too.
        let m = Message::from_vec(&answer(&[0; 12], &d, &t).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // A compression pointer loop.
        let mut lp = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        lp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        let m = Message::from_vec(&answer(&lp, &d, &t).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // Two questions.
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_ascii("a.pilot.").unwrap(),
            RecordType::A,
        ));
        q.add_query(Query::query(
            Name::from_ascii("b.pilot.").unwrap(),
            RecordType::A,
        ));
        let m = Message::from_vec(&answer(&q.to_vec().unwrap(), &d, &t).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // Not a query.
        let mut q = Message::new();
        q.set_op_code(OpCode::Update);
        let m = Message::from_vec(&answer(&q.to_vec().unwrap(), &d, &t).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::NotImp);
        // Random bytes, every length.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..=MAX_QUERY + 1 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = answer(&bytes, &d, &t);
        }
    }

    #[test]
    fn domains() {
        assert_eq!(Domain::parse("pilot").unwrap(), Domain::default());
        assert_eq!(Domain::parse("Corp.Pilot.").unwrap().as_str(), "corp.pilot");
        for bad in [
            "",
            ".",
            "a..b",
            "-x",
            "x_y",
            "in-addr.arpa",
            &"a".repeat(64),
        ] {
            assert!(Domain::parse(bad).is_err(), "{bad:?}");
        }
        let d = Domain::parse("corp.pilot").unwrap();
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_ascii("cache.corp.pilot.").unwrap(),
            RecordType::A,
        ));
        let m = Message::from_vec(&answer(&q.to_vec().unwrap(), &d, &table()).unwrap()).unwrap();
        assert_eq!(a_of(&m), vec![CACHE]);
    }
}
