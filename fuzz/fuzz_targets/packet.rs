//! Inner IPv4 packets as read from the TUN device (or decrypted from a peer):
//! the address parser and the ICMP "administratively prohibited" answer.
//! Every answer must be a well-formed IPv4 + ICMP packet with valid
//! checksums, addressed back to the sender, quoting the original.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::packet::{self, ICMP_ADMIN_PROHIBITED};

fuzz_target!(|data: &[u8]| {
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
