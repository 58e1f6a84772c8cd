//! Writes the seed corpus in `fuzz/seeds/<target>/`: a few valid messages of
//! every format, so each fuzz target starts past its length and type checks
//! instead of having to discover a 136-byte handshake or a signed postcard
//! message from nothing.
//!
//! ```text
//! cd fuzz && cargo run --example seeds    # then commit fuzz/seeds/
//! ```
//! Handshake seeds carry fresh ephemeral keys, so they differ on every run;
//! everything else is deterministic.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use pilot_proto::audit;
use pilot_proto::cert::{parse_tags, Certificate, OwnerKey, Revocation};
use pilot_proto::cookie;
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::Identity;
use pilot_proto::identity::NodeId;
use pilot_proto::messages::{
    encode, ErrorCode, FromRegistry, NatType, PeerInfo, PeerRef, PushItem, Registration, Signed,
    Statement, StatementKind, ToRegistry,
};
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::stun;
use pilot_proto::succession::Succession;
use pilot_proto::wire::{
    HandshakeInit, RelayHeader, DATA_HEADER_LEN, MSG_RELAY_FROM, MSG_RELAY_TO, RELAY_HEADER_LEN,
    TAG_LEN,
};

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex literal"))
        .collect()
}

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// A sealed data packet under the fixed keys the `handshake` target uses.
fn data_packet(suite: CipherSuite, payload: &[u8]) -> Vec<u8> {
    let s = Session::new(suite, 10, 20, &[1; 32], &[2; 32], true, Instant::now());
    let mut buf = vec![0u8; DATA_HEADER_LEN + payload.len() + TAG_LEN];
    buf[DATA_HEADER_LEN..DATA_HEADER_LEN + payload.len()].copy_from_slice(payload);
    let n = s.sender.seal(&mut buf, payload.len()).expect("room");
    buf.truncate(n);
    buf
}

/// RFC 5769 section 2.1 sample request and 2.2 sample IPv4 response.
const RFC5769_REQUEST: &str = "0001 0058 2112a442 b7e7a701 bc34d686 fa87dfae
    8022 0010 5354554e 20746573 7420636c 69656e74  0024 0004 6e0001ff
    8029 0008 932ff9b1 51263b36  0006 0009 6576746a 3a683659 59202020
    0008 0014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2  8028 0004 e57a3bcf";
const RFC5769_RESPONSE: &str = "0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
    8022 000b 74657374 20766563 746f7220  0020 0008 0001 a147 e112a643
    0008 0014 2b91f599 fd9e9011 46384a09 2a55e6a0 95a4c5cb  8028 0004 c07d4c96";

fn ipv4(proto: u8, flags_frag: u16, ihl: u8, l4: &[u8]) -> Vec<u8> {
    let hl = usize::from(ihl) * 4;
    let mut p = vec![0u8; hl];
    p[0] = 0x40 | ihl;
    p[2..4].copy_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
    p[6..8].copy_from_slice(&flags_frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[10, 77, 0, 1]);
    p[16..20].copy_from_slice(&[10, 77, 0, 2]);
    let c = pilot_proto::packet::checksum(&p[..hl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    let out = Out(dir);

    // The identities the `handshake` target uses.
    let responder = Identity::from_bytes(&[7; 64]);
    let initiator = Identity::from_bytes(&[8; 64]);
    let mut wire = Vec::new();
    for (suite, name) in [
        (CipherSuite::Aes256Gcm, "aes"),
        (CipherSuite::ChaCha20Poly1305, "chacha"),
    ] {
        let (_, init) = handshake::initiate(
            initiator.static_secret(),
            &responder.static_public(),
            0x1111_1111,
            1,
            suite,
        )
        .expect("initiate");
        let r = handshake::respond(
            responder.static_secret(),
            &MacKey::for_static(&responder.static_public()),
            HandshakeInit::new_checked(&init).expect("own init"),
        )
        .expect("respond to own init");
        let (_, resp) = r.accept(42, Instant::now()).expect("accept");
        let data = data_packet(suite, b"E\0\0\x1c payload of a data packet");
        let empty = data_packet(suite, b"");
        for (kind, bytes) in [
            ("init", &init[..]),
            ("resp", &resp[..]),
            ("data", &data[..]),
            ("data-empty", &empty[..]),
        ] {
            out.put("handshake", &format!("{kind}-{name}"), bytes);
            wire.push((format!("{kind}-{name}"), bytes.to_vec()));
        }
    }
    let tid = [0x5a; 12];
    wire.push(("stun-request".into(), stun::binding_request(&tid).to_vec()));
    // Relayed: a data packet towards the relay, and an initiation from it.
    for (ty, name, inner) in [
        (MSG_RELAY_TO, "relay-to-data", wire[2].1.clone()),
        (MSG_RELAY_FROM, "relay-from-init", wire[0].1.clone()),
    ] {
        let mut bytes = vec![0u8; RELAY_HEADER_LEN];
        RelayHeader {
            ty,
            node: initiator.node_id(),
        }
        .emit(&mut bytes);
        bytes.extend_from_slice(&inner);
        wire.push((name.into(), bytes));
    }
    for (name, bytes) in &wire {
        out.put("wire", name, bytes);
    }

    let v4: SocketAddr = "192.0.2.1:32853".parse().expect("literal");
    let v6: SocketAddr = "[2001:db8::1]:3478".parse().expect("literal");
    out.put("stun", "request", &stun::binding_request(&tid));
    out.put("stun", "response-v4", &stun::binding_response(&tid, v4));
    out.put("stun", "response-v6", &stun::binding_response(&tid, v6));
    // The TCP relay's stream: a read size (byte 0), then two frames, a
    // STUN request and a tunnel-sized one.
    let mut stream = vec![3u8];
    pilot_proto::streamframe::encode(&stun::binding_request(&tid), &mut stream).expect("fits");
    pilot_proto::streamframe::encode(&[0x42; 1400], &mut stream).expect("fits");
    out.put("streamframe", "two-frames", &stream);
    // Port mapping: miniupnpd 2.3.1's PCP answer to a MAP of UDP 40000
    // (netns s27), alone and after its nonce and port (the target's first
    // layout), and its NAT-PMP address and mapping answers.
    let pcp = unhex(
        "0281000000001c20000000060000000000000000000000004136e24ddd432f6b
         55f04b7e110000009c409c4000000000000000000000ffffcb007117",
    );
    out.put("portmap", "pcp-map", &pcp);
    let mut tagged = pcp[24..36].to_vec();
    tagged.extend_from_slice(&pcp[40..42]);
    tagged.extend_from_slice(&pcp);
    out.put("portmap", "nonce-port-then-pcp-map", &tagged);
    out.put(
        "portmap",
        "natpmp-address",
        &unhex("0080000000000008cb00710a"),
    );
    out.put(
        "portmap",
        "natpmp-map",
        &unhex("00810000000000089c409c4000000e10"),
    );
    out.put("stun", "rfc5769-request", &unhex(RFC5769_REQUEST));
    out.put("stun", "rfc5769-response", &unhex(RFC5769_RESPONSE));
    // Tid first, then the message: the layout of the third check in `stun`.
    let mut tagged = tid.to_vec();
    tagged.extend_from_slice(&stun::binding_response(&tid, v4));
    out.put("stun", "tid-then-response-v4", &tagged);

    let a = Identity::from_bytes(&[1; 64]);
    let b = Identity::from_bytes(&[2; 64]);
    let statement = |kind, seq| {
        Signed::sign(
            Statement {
                kind,
                from: a.public(),
                to: b.node_id(),
                seq,
            },
            &a,
        )
    };
    let reg = Signed::sign(
        Registration {
            identity: a.public(),
            hostname: Some("alpha".into()),
            seq: 1,
            local_endpoints: vec![v4, v6],
            nat: NatType::EndpointIndependent,
        },
        &a,
    );
    let to = [
        (
            "register-token",
            ToRegistry::RegisterWithToken {
                req: 1,
                reg: reg.clone(),
                token: [9; 16],
            },
        ),
        ("register", ToRegistry::Register { req: 1, reg }),
        (
            "lookup-id",
            ToRegistry::Lookup {
                req: 2,
                peer: PeerRef::Id(b.node_id()),
            },
        ),
        (
            "lookup-addr",
            ToRegistry::Lookup {
                req: 3,
                peer: PeerRef::Addr(Ipv4Addr::new(10, 77, 0, 2)),
            },
        ),
        (
            "lookup-name",
            ToRegistry::Lookup {
                req: 4,
                peer: PeerRef::Name("beta".into()),
            },
        ),
        (
            "statement-request",
            ToRegistry::Statement {
                req: 5,
                statement: statement(
                    StatementKind::Request {
                        note: "build agent".into(),
                    },
                    7,
                ),
            },
        ),
        (
            "statement-revoke",
            ToRegistry::Statement {
                req: 6,
                statement: statement(StatementKind::Revoke, 8),
            },
        ),
        ("ack", ToRegistry::Ack { push: 300 }),
        ("ping", ToRegistry::Ping { req: 70000 }),
        ("path-confirm", ToRegistry::PathConfirm { token: 300 }),
    ];
    for (name, m) in to {
        out.put(
            "control",
            &format!("to-{name}"),
            &encode(&m).expect("encode"),
        );
    }
    let from = [
        (
            "registered",
            FromRegistry::Registered {
                req: 1,
                address: Ipv4Addr::new(10, 77, 0, 1),
                prefix_len: 16,
                hostname: Some("alpha".into()),
                hostname_refused: None,
                observed: v4,
                relays: vec![v4],
            },
        ),
        (
            "peer",
            FromRegistry::Peer {
                req: 2,
                info: PeerInfo {
                    identity: b.public(),
                    address: Ipv4Addr::new(10, 77, 0, 2),
                    hostname: Some("beta".into()),
                    endpoints: vec![v4, v6],
                    nat: NatType::PerDestination,
                },
            },
        ),
        ("ok", FromRegistry::Ok { req: 3 }),
        (
            "error",
            FromRegistry::Error {
                req: 4,
                code: ErrorCode::Replayed,
                message: "sequence number not newer".into(),
            },
        ),
        (
            "push",
            FromRegistry::Push {
                id: 9,
                item: PushItem::Statement {
                    statement: statement(StatementKind::Approve, 9),
                    address: Ipv4Addr::new(10, 77, 0, 1),
                    hostname: None,
                },
            },
        ),
        (
            "punch",
            FromRegistry::Punch {
                peer: a.node_id(),
                endpoints: vec![v4, v6],
                nat: NatType::None,
            },
        ),
        (
            "pong",
            FromRegistry::Pong {
                req: 5,
                observed: v6,
            },
        ),
        ("path-check", FromRegistry::PathCheck { token: 300 }),
    ];
    for (name, m) in from {
        out.put(
            "control",
            &format!("from-{name}"),
            &encode(&m).expect("encode"),
        );
    }

    let tcp_syn = [
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    out.put("packet", "tcp-syn", &ipv4(6, 0x4000, 5, &tcp_syn));
    out.put(
        "packet",
        "udp",
        &ipv4(17, 0, 5, &[0x30, 0x39, 0, 53, 0, 9, 0, 0, 0x42]),
    );
    out.put(
        "packet",
        "icmp-echo",
        &ipv4(1, 0, 5, &[8, 0, 0, 0, 0, 1, 0, 1]),
    );
    out.put(
        "packet",
        "icmp-error",
        &ipv4(1, 0, 5, &[3, 1, 0, 0, 0, 0, 0, 0]),
    );
    out.put("packet", "fragment", &ipv4(17, 0x2001, 5, &[0; 8]));
    out.put("packet", "options-ihl15", &ipv4(6, 0, 15, &tcp_syn));
    out.put("packet", "header-only", &ipv4(6, 0, 5, &[]));
    // A batch for the TUN write's coalescing: three consecutive segments
    // of one stream (PSH on the last), each behind its two-byte length.
    let mut run = Vec::new();
    for k in 0..3u32 {
        let mut tcp = vec![0u8; 20];
        tcp[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        tcp[4..8].copy_from_slice(&(1000 + k * 40).to_be_bytes());
        tcp[8..12].copy_from_slice(&777u32.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = if k == 2 { 0x18 } else { 0x10 };
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        tcp.extend((0..40u8).map(|i| i.wrapping_add(k as u8 * 40)));
        let p = ipv4(6, 0x4000, 5, &tcp);
        run.extend_from_slice(&(p.len() as u16).to_be_bytes());
        run.extend_from_slice(&p);
    }
    out.put("packet", "tcp-run", &run);

    // Fleet trust: a certificate, a revocation and a succession (binary and
    // armored), scopes and lifetimes, a TCP packet for the grant's
    // inspection, a short audit log, and a cookie reply.
    let owner = OwnerKey::from_secret(&[7; 32]);
    let tags = parse_tags("build,ci").expect("literal tags");
    let cert = Certificate::issue(&owner, NodeId([9; 16]), tags, 1_800_000_000, 30 * 86_400)
        .expect("issue");
    out.put("fleet", "cert", &cert.to_bytes());
    out.put("fleet", "cert-armored", cert.to_armored().as_bytes());
    let rev = Revocation::sign(&owner, NodeId([9; 16]), 1_800_000_100);
    out.put("fleet", "revocation", &rev.to_bytes());
    out.put("fleet", "revocation-armored", rev.to_armored().as_bytes());
    let succ = Succession::sign(&a, &b, 1, 1_800_000_200);
    out.put("fleet", "succession", &succ.to_bytes());
    out.put("fleet", "succession-armored", succ.to_armored().as_bytes());
    out.put("fleet", "scope", b"tcp/8080,tcp/9000-9100,udp/53,icmp");
    out.put("fleet", "lifetime", b"30d");
    let mut syn = vec![0u8; 40];
    syn[0] = 0x45;
    syn[3] = 40;
    syn[9] = 6;
    syn[12..16].copy_from_slice(&[10, 77, 0, 1]);
    syn[16..20].copy_from_slice(&[10, 77, 0, 2]);
    syn[20..22].copy_from_slice(&40000u16.to_be_bytes());
    syn[22..24].copy_from_slice(&8080u16.to_be_bytes());
    syn[32] = 0x50;
    syn[33] = 0x02;
    out.put("fleet", "tcp-syn", &syn);
    let mut log = Vec::new();
    let mut writer = audit::Writer::new();
    log.extend(
        writer
            .append(
                &a,
                1_800_000_000,
                "approve",
                &serde_json::json!({"peer": "beta"}),
            )
            .expect("append"),
    );
    log.extend(writer.checkpoint(&a, 1_800_000_001));
    out.put("fleet", "audit", &log);
    let maker = cookie::CookieMaker::new(&responder.static_public(), [3; 32]);
    let init = &wire[0].1;
    let reply = maker.reply(
        &HandshakeInit::new_checked(init).expect("own init"),
        &std::net::IpAddr::from([192, 0, 2, 1]),
        [4; 12],
    );
    out.put("fleet", "cookie-reply", &reply);
    out.put("wire", "cookie-reply", &reply);
    out.put(
        "wire",
        "init-with-cookie",
        &cookie::with_mac2(init, &[6; 16]),
    );

    // Gossip from alpha to beta: its endpoints, a "where is" with an
    // approval, a revocation of beta to apply.
    let record = Signed::sign(
        pilot_proto::gossip::EndpointRecord {
            node: a.public(),
            endpoints: vec![v4, v6],
            nat: NatType::EndpointIndependent,
            seq: 1_796_127_225_905,
        },
        &a,
    );
    for (name, g) in [
        ("endpoints", pilot_proto::gossip::Gossip::Endpoints(record)),
        (
            "where",
            pilot_proto::gossip::Gossip::Where {
                proof: statement(StatementKind::Approve, 8),
            },
        ),
        (
            "pass-revoke",
            pilot_proto::gossip::Gossip::Pass(statement(StatementKind::Revoke, 9)),
        ),
        (
            "owner-revoked",
            pilot_proto::gossip::Gossip::OwnerRevoked(
                Revocation::sign(&OwnerKey::from_secret(&[7; 32]), b.node_id(), 1_796_000_000)
                    .to_bytes(),
            ),
        ),
    ] {
        out.put("gossip", name, &g.to_control().expect("fits"));
    }

    // DNS questions for the `dns` target's table (alpha, cache in pilot).
    for (name, qname, qtype, edns) in [
        ("a-cache", "cache.pilot", 1, false),
        ("a-cache-edns", "cache.pilot", 1, true),
        ("aaaa-alpha", "alpha.pilot", 28, false),
        ("a-nobody", "nobody.pilot", 1, false),
        ("ptr-cache", "2.0.77.10.in-addr.arpa", 12, false),
        ("ptr-outside", "1.2.0.192.in-addr.arpa", 12, true),
        ("a-outside", "example.com", 1, false),
    ] {
        out.put("dns", name, &dns_query(qname, qtype, edns));
    }
}

/// A DNS query for `qname` (dotted, no trailing dot) of type `qtype`, class
/// IN, recursion desired, with an EDNS OPT record if `edns`.
fn dns_query(qname: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = vec![0x4a, 0x17, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
    for label in qname.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    if edns {
        // Root name, type OPT, 1232-byte payload, no extended flags, no data.
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    q
}
