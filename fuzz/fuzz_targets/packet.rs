//! Inner IPv4 packets as read from the TUN device (or decrypted from a peer):
//! the address parser, the ICMP "administratively prohibited" and
//! "fragmentation needed" answers, IPv4 fragmentation, the MTU verdict, and
//! the path MTU probe messages. Every ICMP answer must be a well-formed
//! IPv4 + ICMP packet with valid checksums, addressed back to the sender,
//! quoting the original; fragments must fit the MTU and reassemble to the
//! original payload. The same for inner IPv6 packets: the extension-header
//! walk, and ICMPv6 "administratively prohibited" and "packet too big"
//! answers, which must verify (pseudo-header checksum), stay within 1280
//! bytes, go back to the sender and quote the original. And the TUN
//! write's TCP coalescing over a batch cut from the input: every packet
//! is written once, and a super-packet's lengths add up.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::packet::{self, ICMP_ADMIN_PROHIBITED};
use pilot_proto::gro::{Plan, VNET_HDR_LEN};
use pilot_proto::{ipv6, mtu, pmtu};

/// The batch: the input cut at two-byte big-endian lengths (the rest is
/// the last packet), each behind the room the TUN write keeps.
fn checks_gro(data: &[u8]) {
    const OFF: usize = 16;
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && bufs.len() < 64 {
        let (len, body) = match rest.split_first_chunk::<2>() {
            Some((l, body)) => (usize::from(u16::from_be_bytes(*l)).min(body.len()), body),
            None => (rest.len(), rest),
        };
        let mut b = vec![0u8; OFF];
        b.extend_from_slice(&body[..len]);
        bufs.push(b);
        rest = &body[len..];
    }
    let mut plan = Plan::new();
    plan.build(&bufs, OFF);
    plan.finish(&mut bufs, OFF);
    let runs: Vec<_> = plan.runs().collect();
    let written: usize = runs.iter().map(|r| r.count).sum::<usize>() + plan.others().len();
    assert_eq!(written, bufs.len(), "every packet written once");
    for r in runs {
        let parts: Vec<&[u8]> = plan.parts(r, &bufs, OFF).collect();
        assert_eq!(parts.len(), r.count);
        let hdr = &parts[0][..VNET_HDR_LEN];
        let pkt = &parts[0][VNET_HDR_LEN..];
        if r.count == 1 {
            assert_eq!(hdr, &[0; VNET_HDR_LEN]);
            continue;
        }
        let total = pkt.len() + parts[1..].iter().map(|p| p.len()).sum::<usize>();
        let gso = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
        assert!(gso > 0 && parts[1..].iter().all(|p| p.len() <= gso));
        if pkt[0] >> 4 == 4 {
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), total);
            assert_eq!(packet::checksum(&pkt[..20]), 0);
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([pkt[4], pkt[5]])), total - 40);
        }
    }
}

/// The IPv6 readers and ICMPv6 answers, on `data` as an IPv6 packet.
fn checks_v6(data: &[u8]) {
    if let Some(u) = ipv6::upper(data) {
        assert!(u.offset >= ipv6::HEADER_LEN && u.offset <= data.len());
    }
    let mut out = [0u8; 1400];
    if let Some(n) = ipv6::icmp_admin_prohibited(data, &mut out) {
        icmpv6_answer(data, &out[..n], 1);
        // One byte less room must be refused, not written past.
        assert_eq!(ipv6::icmp_admin_prohibited(data, &mut out[..n - 1]), None);
    }
    let mtu = data
        .get(4..6)
        .map_or(1280, |b| u16::from_le_bytes([b[0], b[1]]));
    if let Some(n) = ipv6::icmp_packet_too_big(data, mtu, &mut out) {
        assert!(mtu >= ipv6::MIN_MTU);
        icmpv6_answer(data, &out[..n], 2);
    }
}

/// `r` is a well-formed ICMPv6 error of type `ty` answering `data`.
fn icmpv6_answer(data: &[u8], r: &[u8], ty: u8) {
    let n = r.len();
    let (src, dst) = ipv6::addrs(data).expect("an ICMPv6 answer to something that is not IPv6");
    assert!(
        !ipv6::is_icmp_error(data),
        "an error answered with an error"
    );
    assert!((48..=usize::from(ipv6::MIN_MTU)).contains(&n), "length {n}");
    assert_eq!(ipv6::addrs(r), Some((dst, src)), "from the destination");
    assert_eq!(ipv6::icmp_checksum(r), 0, "ICMPv6 checksum: {r:02x?}");
    assert_eq!(usize::from(u16::from_be_bytes([r[4], r[5]])), n - 40);
    assert_eq!(r[40], ty);
    assert_eq!(r[48..], data[..n - 48], "quotes the start of the original");
}

/// The MTU for the fragmentation and verdict checks: the first two bytes.
fn checks_with_mtu(data: &[u8]) {
    let Some((m, pkt)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mtu16 = u16::from_le_bytes(*m);
    let _ = mtu::fit(pkt, mtu16);
    let mut out = [0u8; 128];
    if let Some(n) = packet::icmp_frag_needed(pkt, mtu16, &mut out) {
        assert!(mtu16 >= packet::IPV4_MIN_MTU);
        assert_eq!(packet::checksum(&out[..20]), 0);
        assert_eq!(packet::checksum(&out[20..n]), 0);
        assert_eq!((out[20], out[21]), (3, packet::ICMP_FRAG_NEEDED));
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), mtu16);
    }
    let mtu = usize::from(mtu16 % 2048);
    let Ok(mut frags) = packet::Fragments::new(pkt, mtu) else {
        return;
    };
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let mut payload = vec![];
    let mut buf = vec![0u8; pkt.len().max(2048)];
    let mut count = 0;
    while let Some(len) = frags.next_len() {
        assert!(len <= mtu, "fragment of {len} bytes for MTU {mtu}");
        assert_eq!(
            frags.write_next(&mut buf[..len - 1]),
            None,
            "refuses a short buffer"
        );
        assert_eq!(frags.write_next(&mut buf), Some(len));
        let f = &buf[..len];
        if pkt.len() <= mtu {
            assert_eq!(f, pkt, "a packet that fits is its own only fragment");
        }
        let hl = usize::from(f[0] & 0x0f) * 4;
        if pkt.len() > mtu {
            assert_eq!(packet::checksum(&f[..hl]), 0, "fragment header checksum");
        }
        assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), len);
        payload.extend_from_slice(&f[hl..]);
        count += 1;
        assert!(count <= 65_536 / 8);
    }
    assert_eq!(payload, pkt[ihl..], "fragments carry the payload in order");
}

fuzz_target!(|data: &[u8]| {
    // In-tunnel probe messages: answered and parsed without panicking.
    if let Some(ack) = pmtu::ack_for(data) {
        assert_eq!(pmtu::parse_ack(&ack), Some(data.len() as u16));
    }
    let _ = pmtu::parse_ack(data);
    checks_with_mtu(data);
    checks_v6(data);
    checks_gro(data);

    let addrs = packet::ipv4_addrs(data);
    assert_eq!(packet::ipv4_dst(data), addrs.map(|(_, d)| d));

    let mut out = [0u8; 128];
    let Some(n) = packet::icmp_admin_prohibited(data, &mut out) else {
        return;
    };
    let (src, dst) = addrs.expect("an ICMP answer to something that is not IPv4");
    assert!((28..=out.len()).contains(&n), "length {n}");
    let icmp = &out[..n];
    assert_eq!(
        packet::checksum(&icmp[..20]),
        0,
        "IP header checksum: {icmp:02x?}"
    );
    assert_eq!(
        packet::checksum(&icmp[20..]),
        0,
        "ICMP checksum: {icmp:02x?}"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([icmp[2], icmp[3]])),
        n,
        "total length"
    );
    assert_eq!(
        packet::ipv4_addrs(icmp),
        Some((dst, src)),
        "from the refused destination"
    );
    assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, ICMP_ADMIN_PROHIBITED));
    assert_eq!(
        icmp[28..],
        data[..n - 28],
        "quotes the start of the original"
    );

    // One byte less room must be refused, not written past.
    let mut short = [0u8; 128];
    assert_eq!(
        packet::icmp_admin_prohibited(data, &mut short[..n - 1]),
        None
    );
});
