//! Micro-benchmarks of the per-packet and per-handshake costs on one core:
//! `cargo bench -p pilot-proto --bench crypto`.
//!
//! - seal / open of one data packet at several inner sizes, both suites;
//! - a whole Noise IK handshake (both sides), and the responder's share alone;
//! - the replay window on an in-order stream.

use std::time::Instant;

use divan::{black_box, Bencher};
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::Identity;
use pilot_proto::replay::ReplayWindow;
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::wire::{HandshakeInit, HandshakeResp, DATA_HEADER_LEN, TAG_LEN};

fn main() {
    divan::main();
}

const SIZES: [usize; 4] = [64, 512, 1420, 8192];

fn pair(suite: CipherSuite) -> (Session, Session) {
    let now = Instant::now();
    (
        Session::new(suite, 1, 2, &[7; 32], &[9; 32], true, now),
        Session::new(suite, 2, 1, &[9; 32], &[7; 32], false, now),
    )
}

fn suite_of(aes: bool) -> CipherSuite {
    if aes {
        CipherSuite::Aes256Gcm
    } else {
        CipherSuite::ChaCha20Poly1305
    }
}

/// Sealing one packet in place (`aes` false: ChaCha20-Poly1305).
#[divan::bench(args = SIZES, consts = [true, false])]
fn seal<const AES: bool>(bencher: Bencher<'_, '_>, size: usize) {
    let (a, _) = pair(suite_of(AES));
    let mut buf = vec![0u8; DATA_HEADER_LEN + size + TAG_LEN];
    bencher
        .counter(divan::counter::BytesCount::new(size))
        .bench_local(|| black_box(a.sender.seal(black_box(&mut buf), size).unwrap()));
}

/// Authenticating, decrypting and replay-checking one packet.
#[divan::bench(args = SIZES, consts = [true, false])]
fn open<const AES: bool>(bencher: Bencher<'_, '_>, size: usize) {
    let (a, b) = pair(suite_of(AES));
    // Pre-seal enough distinct packets that the replay window accepts each.
    let mut packets: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let mut buf = vec![0u8; DATA_HEADER_LEN + size + TAG_LEN];
            a.sender.seal(&mut buf, size).unwrap();
            buf
        })
        .collect();
    let mut i = 0;
    let mut scratch = vec![0u8; DATA_HEADER_LEN + size + TAG_LEN];
    bencher
        .counter(divan::counter::BytesCount::new(size))
        .bench_local(|| {
            // Cycle through the packets; once all are used they are replays,
            // which costs the same up to the final window check.
            scratch.copy_from_slice(&packets[i % packets.len()]);
            i += 1;
            black_box(b.open(&mut scratch).ok())
        });
    packets.clear();
}

/// A complete handshake: initiation, response, both sessions derived.
#[divan::bench]
fn handshake_full(bencher: Bencher<'_, '_>) {
    let a = Identity::from_bytes(&[1; 64]);
    let b = Identity::from_bytes(&[2; 64]);
    let a_mac = MacKey::for_static(&a.static_public());
    let b_mac = MacKey::for_static(&b.static_public());
    let mut ts = 0u64;
    bencher.bench_local(|| {
        ts += 1;
        let now = Instant::now();
        let (st, init) = handshake::initiate(
            a.static_secret(),
            &b.static_public(),
            1,
            ts,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        let r = handshake::respond(
            b.static_secret(),
            &b_mac,
            HandshakeInit::new_checked(&init).unwrap(),
        )
        .unwrap();
        let (_sb, resp) = r.accept(2, now).unwrap();
        black_box(
            st.finish(&a_mac, HandshakeResp::new_checked(&resp).unwrap(), now)
                .unwrap(),
        )
    });
}

/// The responder's share: what a node spends per initiation it answers.
#[divan::bench]
fn handshake_responder(bencher: Bencher<'_, '_>) {
    let a = Identity::from_bytes(&[1; 64]);
    let b = Identity::from_bytes(&[2; 64]);
    let b_mac = MacKey::for_static(&b.static_public());
    let inits: Vec<_> = (0..64)
        .map(|i| {
            handshake::initiate(
                a.static_secret(),
                &b.static_public(),
                1,
                i,
                CipherSuite::Aes256Gcm,
            )
            .unwrap()
            .1
        })
        .collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i += 1;
        let init = &inits[i % inits.len()];
        let r = handshake::respond(
            b.static_secret(),
            &b_mac,
            HandshakeInit::new_checked(init).unwrap(),
        )
        .unwrap();
        black_box(r.accept(2, Instant::now()).unwrap())
    });
}

/// Rejecting a flood initiation with a bad MAC (no Diffie-Hellman).
#[divan::bench]
fn handshake_bad_mac(bencher: Bencher<'_, '_>) {
    let b = Identity::from_bytes(&[2; 64]);
    let b_mac = MacKey::for_static(&b.static_public());
    let mut junk = [0x5au8; pilot_proto::wire::INIT_LEN];
    junk[..4].copy_from_slice(&[0xA1, 0, 0, 0]);
    bencher.bench_local(|| {
        black_box(
            handshake::respond(
                b.static_secret(),
                &b_mac,
                HandshakeInit::new_checked(black_box(&junk)).unwrap(),
            )
            .is_err(),
        )
    });
}

/// The replay window on an in-order stream.
#[divan::bench]
fn replay_in_order(bencher: Bencher<'_, '_>) {
    let mut w = ReplayWindow::new();
    let mut c = 0u64;
    bencher.bench_local(|| {
        c += 1;
        black_box(w.accept(c))
    });
}
