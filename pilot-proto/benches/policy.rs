//! Micro-benchmarks of the per-packet policy cost on one core:
//! `cargo bench -p pilot-proto --bench policy`.
//!
//! - `decide` with 1 and 100 matching rules (each opening its own TCP and UDP
//!   ports), on a mix of allowed and denied packets, on the fast path and on
//!   the scan it falls back to after a contribution ends;
//! - the flow-table lookup a reply costs;
//! - reading the packet facts (`inspect`) of a TCP segment;
//! - a scoped peer's whole filter check on a TCP stream, both directions.

use std::net::Ipv4Addr;
use std::time::Instant;

use divan::{black_box, Bencher};
use pilot_proto::cert::{Certificate, OwnerKey, VerifiedCert};
use pilot_proto::flow::{self, Flow, FlowTable};
use pilot_proto::identity::NodeId;
use pilot_proto::lifetime::{DAY, HOUR};
use pilot_proto::policy::{evaluate, EffectiveGrant, PeerFacts, Rules};
use pilot_proto::ports::{Scope, Traffic};

fn main() {
    divan::main();
}

const NOW: u64 = 1_750_000_000;
const PEER: NodeId = NodeId([9; 16]);

/// `n` rules that all match the peer's certificate; the first rule ends
/// after an hour when `expiring`.
fn setup(n: u16, expiring: bool) -> (Rules, VerifiedCert) {
    let owner = OwnerKey::from_secret(&[1; 32]);
    let mut rules = Rules::default();
    for i in 0..n {
        let base = 8000 + i * 10;
        let scope: Scope = format!("tcp/{base}-{},udp/{}", base + 4, 5000 + i)
            .parse()
            .expect("bench scope");
        let expires = (expiring && i == 0).then_some(NOW + HOUR);
        rules.add(
            owner.public(),
            "build".parse().expect("tag"),
            scope,
            expires,
        );
    }
    let cert = Certificate::issue(
        &owner,
        PEER,
        vec!["build".parse().expect("tag")],
        NOW,
        30 * DAY,
    )
    .expect("issue")
    .verify(&owner.public(), &PEER, NOW)
    .expect("verify");
    (rules, cert)
}

fn facts(cert: &VerifiedCert) -> PeerFacts<'_> {
    PeerFacts {
        cert: Some(cert),
        ..Default::default()
    }
}

/// The effective grant of a peer matched by `n` rules.
fn grant(n: u16, expiring: bool) -> EffectiveGrant {
    let (rules, cert) = setup(n, expiring);
    evaluate(&rules, &facts(&cert), NOW)
}

/// 1024 packets, about half of them allowed: ports spread over the rules'
/// ranges and the gaps between them, plus some UDP and ICMP.
fn packets() -> Vec<Traffic> {
    let mut x = 0x9e37_79b9_u32;
    (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x % 8 {
                0 => Traffic::Udp(5000 + (x >> 8) as u16 % 120),
                1 => Traffic::Icmp,
                _ => Traffic::Tcp(8000 + (x >> 8) as u16 % 1000),
            }
        })
        .collect()
}

/// One decision on the fast path (before any contribution ends).
#[divan::bench(args = [1, 100])]
fn decide(bencher: Bencher<'_, '_>, rules: u16) {
    let g = grant(rules, false);
    let pkts = packets();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % pkts.len();
        black_box(g.decide(black_box(pkts[i]), NOW))
    });
}

/// One decision after the first rule ended, before the grant is rebuilt
/// (the scan over the contributions).
#[divan::bench(args = [1, 100])]
fn decide_after_an_expiry(bencher: Bencher<'_, '_>, rules: u16) {
    let g = grant(rules, true);
    let pkts = packets();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % pkts.len();
        black_box(g.decide(black_box(pkts[i]), NOW + HOUR))
    });
}

/// Rebuilding the effective grant (what a rule change or an expiry costs).
#[divan::bench(args = [1, 100])]
fn evaluate_grant(bencher: Bencher<'_, '_>, rules: u16) {
    let (rules, cert) = setup(rules, false);
    let facts = facts(&cert);
    bencher.bench_local(|| black_box(evaluate(black_box(&rules), &facts, NOW)));
}

/// A reply's lookup in a table holding 10 000 flows.
#[divan::bench]
fn flow_is_reply(bencher: Bencher<'_, '_>) {
    let now = Instant::now();
    let mut table = FlowTable::new(65_536);
    let flows: Vec<Flow> = (0..10_000u16)
        .map(|i| Flow {
            proto: 6,
            src: Ipv4Addr::new(10, 77, 0, 1).into(),
            dst: Ipv4Addr::new(10, 77, (i >> 8) as u8, i as u8).into(),
            src_port: 30_000 + i,
            dst_port: 443,
        })
        .collect();
    for f in &flows {
        table.note_opened(*f, now);
    }
    let replies: Vec<Flow> = flows.iter().map(Flow::reversed).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 7) % replies.len();
        black_box(table.is_reply(black_box(&replies[i]), now))
    });
}

/// Reading protocol, ports and fragment facts from a TCP segment.
#[divan::bench]
fn inspect_tcp(bencher: Bencher<'_, '_>) {
    let mut pkt = vec![0u8; 60];
    pkt[0] = 0x45;
    pkt[9] = 6;
    pkt[12..16].copy_from_slice(&[10, 77, 0, 1]);
    pkt[16..20].copy_from_slice(&[10, 77, 0, 2]);
    pkt[20..24].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
    bencher.bench_local(|| black_box(flow::inspect(black_box(&pkt))));
}

/// A scoped peer's whole per-packet check, as the data plane runs it on a
/// TCP stream it opened (grants of 1 and 100 rules): read the packet, find
/// its flow open (a reply) or decide it and note the flow. The outbound
/// segments to the granted port and the inbound replies alternate.
#[divan::bench(args = [1, 100])]
fn filter_tcp_stream(bencher: Bencher<'_, '_>, rules: u16) {
    use pilot_proto::filter::{Direction, Filter};
    let mut f = Filter::new(grant(rules, false), grant(rules, false));
    let seg = |src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16| {
        let mut pkt = vec![0u8; 1400];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&1400u16.to_be_bytes());
        pkt[9] = 6;
        pkt[12..16].copy_from_slice(&src);
        pkt[16..20].copy_from_slice(&dst);
        pkt[20..22].copy_from_slice(&sp.to_be_bytes());
        pkt[22..24].copy_from_slice(&dp.to_be_bytes());
        pkt
    };
    let (me, peer) = ([10, 77, 0, 1], [10, 77, 0, 2]);
    let out = seg(me, peer, 40_000, 8001);
    let back = seg(peer, me, 8001, 40_000);
    let now = Instant::now();
    let mut i = 0u32;
    bencher.bench_local(|| {
        i += 1;
        if i % 2 == 0 {
            black_box(f.check(black_box(&out), Direction::Outbound, now, NOW))
        } else {
            black_box(f.check(black_box(&back), Direction::Inbound, now, NOW))
        }
    });
}
