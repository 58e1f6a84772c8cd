//! The handshake and the data AEAD, fed hostile datagrams. Nothing here may
//! panic, whatever the bytes.
//!
//! - The input as a handshake initiation to a fixed responder: as it is
//!   (stopped by the cheap MAC), and — when it has the shape of an
//!   initiation — again with the MAC made valid, so the fuzzer reaches the
//!   Noise parser and the Diffie-Hellman behind it.
//! - The input as a handshake response to a fresh initiation of a fixed
//!   initiator, with the MAC and receiver index made valid.
//! - The input as a data datagram to a session of each cipher suite.
//! - The input as the payload of a sealed datagram: it must open to the same
//!   bytes, once; the second time it is a replay.

#![no_main]

use std::sync::LazyLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::Identity;
use pilot_proto::session::{CipherSuite, OpenError, Session};
use pilot_proto::wire::{
    HandshakeInit, HandshakeResp, DATA_HEADER_LEN, INIT_LEN, MAC_LEN, RESP_LEN, TAG_LEN,
};

struct Fixture {
    responder: Identity,
    responder_mac: MacKey,
    initiator: Identity,
    initiator_mac: MacKey,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let responder = Identity::from_bytes(&[7; 64]);
    let initiator = Identity::from_bytes(&[8; 64]);
    Fixture {
        responder_mac: MacKey::for_static(&responder.static_public()),
        initiator_mac: MacKey::for_static(&initiator.static_public()),
        responder,
        initiator,
    }
});

/// The initiator's index in every initiation the harness sends.
const INITIATOR_INDEX: u32 = 0x1111_1111;

/// Fresh sessions each run, so one input never depends on the ones before.
fn session_pair(suite: CipherSuite, now: Instant) -> (Session, Session) {
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    (
        Session::new(suite, 10, 20, &k1, &k2, true, now),
        Session::new(suite, 20, 10, &k2, &k1, false, now),
    )
}

fn respond(f: &Fixture, buf: &[u8], now: Instant) {
    let Ok(init) = HandshakeInit::new_checked(buf) else {
        return;
    };
    let Ok(r) = handshake::respond(f.responder.static_secret(), &f.responder_mac, init) else {
        return;
    };
    // Only a real initiation gets this far; answering it must work.
    let _ = (r.remote_static(), r.timestamp(), r.suite());
    let (session, resp) = r.accept(42, now).expect("accept a verified initiation");
    assert_eq!(session.remote_index, init.sender_index());
    assert!(HandshakeResp::new_checked(&resp).is_ok());
}

fn finish(f: &Fixture, data: &[u8], now: Instant) {
    let suite = if data[RESP_LEN - 1] & 1 == 0 {
        CipherSuite::Aes256Gcm
    } else {
        CipherSuite::ChaCha20Poly1305
    };
    let (initiator, _) = handshake::initiate(
        f.initiator.static_secret(),
        &f.responder.static_public(),
        INITIATOR_INDEX,
        1,
        suite,
    )
    .expect("initiate with valid keys");
    let mut buf = [0u8; RESP_LEN];
    buf.copy_from_slice(data);
    buf[8..12].copy_from_slice(&INITIATOR_INDEX.to_le_bytes());
    let mac = f.initiator_mac.compute(&buf[..RESP_LEN - MAC_LEN]);
    buf[RESP_LEN - MAC_LEN..].copy_from_slice(&mac);
    let resp = HandshakeResp::new_checked(&buf).expect("shape checked by the caller");
    let _ = initiator.finish(&f.initiator_mac, resp, now);
}

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let now = Instant::now();

    // As received: a forged MAC stops it before any DH.
    respond(f, data, now);
    if HandshakeInit::new_checked(data).is_ok() {
        // With or without a cookie MAC after it (152 or 136 bytes).
        let mut buf = data.to_vec();
        let mac = f.responder_mac.compute(&buf[..INIT_LEN - MAC_LEN]);
        buf[INIT_LEN - MAC_LEN..INIT_LEN].copy_from_slice(&mac);
        respond(f, &buf, now);
    }
    if HandshakeResp::new_checked(data).is_ok() {
        finish(f, data, now);
    }

    for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
        // The input as a datagram (only a packet really sealed with these
        // keys can open, and then to its length less the overhead).
        let (_, rx) = session_pair(suite, now);
        let mut copy = data.to_vec();
        if let Ok(n) = rx.open(&mut copy) {
            assert_eq!(n + DATA_HEADER_LEN + TAG_LEN, data.len());
            let mut again = data.to_vec();
            assert_eq!(rx.open(&mut again), Err(OpenError::Replay));
        }

        // The input as a payload, on a pair whose window is still empty:
        // seal, open, replay.
        let (a, b) = session_pair(suite, now);
        let mut buf = vec![0u8; DATA_HEADER_LEN + data.len() + TAG_LEN];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + data.len()].copy_from_slice(data);
        let len = a
            .sender
            .seal(&mut buf, data.len())
            .expect("room for header and tag");
        assert_eq!(len, buf.len());
        let sealed = buf.clone();
        assert_eq!(b.open(&mut buf), Ok(data.len()));
        assert_eq!(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + data.len()], data);
        let mut again = sealed;
        assert_eq!(b.open(&mut again), Err(OpenError::Replay));
    }
});
