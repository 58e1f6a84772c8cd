//! Data-packet keys for one tunnel session: one key per direction, the
//! nonce is the 64-bit counter carried in the header, and the receiver
//! authenticates before it moves its replay window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::replay::{ReplayWindow, COUNTER_LIMIT};
use crate::wire::{DataHeader, DATA_HEADER_LEN, TAG_LEN};

/// The data AEAD of a session, chosen by the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CipherSuite {
    /// AES-256-GCM: the default; hardware-accelerated on x86-64 and ARMv8.
    #[default]
    Aes256Gcm,
    /// ChaCha20-Poly1305: for CPUs without AES instructions.
    ChaCha20Poly1305,
}

impl CipherSuite {
    /// The byte carried in the handshake payload.
    pub fn to_byte(self) -> u8 {
        match self {
            CipherSuite::Aes256Gcm => 1,
            CipherSuite::ChaCha20Poly1305 => 2,
        }
    }
    /// The suite named by a handshake byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(CipherSuite::Aes256Gcm),
            2 => Some(CipherSuite::ChaCha20Poly1305),
            _ => None,
        }
    }
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            CipherSuite::Aes256Gcm => &aead::AES_256_GCM,
            CipherSuite::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
    fn key(self, raw: &[u8; 32]) -> LessSafeKey {
        // Both algorithms take 32-byte keys, so this cannot fail.
        LessSafeKey::new(UnboundKey::new(self.algorithm(), raw).expect("32-byte AEAD key"))
    }
}

/// After this many packets a session must be replaced (well below the
/// replay limit, so the counter never wraps).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 48;

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Sealing a packet failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The session has sent its last allowed packet; a new handshake is due.
    #[error("session exhausted its packet counter")]
    Exhausted,
    /// The buffer has no room for header, payload and tag.
    #[error("buffer too small")]
    Buffer,
}

/// Opening a packet failed; the packet must be dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Header malformed.
    #[error("malformed data header")]
    Malformed,
    /// Counter already seen or too old.
    #[error("replayed or too old")]
    Replay,
    /// Authentication failed: forged, corrupted, or for another key.
    #[error("authentication failed")]
    Auth,
}

/// The sending half: shared by all sending threads.
pub struct Sender {
    key: LessSafeKey,
    counter: AtomicU64,
    remote_index: u32,
}

impl Sender {
    /// Seals the payload at `buf[16..16 + len]` in place: writes the header
    /// before it and the tag after it. `buf` must have room for the tag.
    /// Returns the datagram length.
    pub fn seal(&self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        let total = DATA_HEADER_LEN + len + TAG_LEN;
        if buf.len() < total {
            return Err(SealError::Buffer);
        }
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        if counter >= REKEY_AFTER_MESSAGES {
            return Err(SealError::Exhausted);
        }
        let (header, rest) = buf.split_at_mut(DATA_HEADER_LEN);
        let header: &mut [u8; DATA_HEADER_LEN] = header.try_into().expect("split at 16");
        DataHeader {
            receiver_index: self.remote_index,
            counter,
        }
        .emit(header);
        let (payload, tail) = rest.split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&header[..]), payload)
            .map_err(|_| SealError::Buffer)?;
        tail[..TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// How many packets this key has sealed.
    pub fn sent(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }
}

/// The receiving half, with its replay window.
pub struct Receiver {
    key: LessSafeKey,
    window: ReplayWindow,
}

impl Receiver {
    /// Authenticates and decrypts a whole data datagram in place. On success
    /// the plaintext is `datagram[16..16 + n]` and `n` is returned. The
    /// replay window moves only after authentication succeeded.
    pub fn open(&mut self, datagram: &mut [u8]) -> Result<usize, OpenError> {
        let header = DataHeader::parse(datagram).map_err(|_| OpenError::Malformed)?;
        if header.counter >= COUNTER_LIMIT || !self.window.check(header.counter) {
            return Err(OpenError::Replay);
        }
        let (aad, body) = datagram.split_at_mut(DATA_HEADER_LEN);
        let plain = self
            .key
            .open_in_place(nonce(header.counter), Aad::from(&aad[..]), body)
            .map_err(|_| OpenError::Auth)?;
        let n = plain.len();
        if !self.window.accept(header.counter) {
            return Err(OpenError::Replay);
        }
        Ok(n)
    }
}

/// One established tunnel session.
pub struct Session {
    /// Our index: data packets for this session carry it.
    pub local_index: u32,
    /// The peer's index: we put it on the packets we send.
    pub remote_index: u32,
    /// The AEAD in use.
    pub suite: CipherSuite,
    /// When the handshake completed.
    pub created: Instant,
    /// True if we sent the handshake initiation.
    pub initiator: bool,
    /// Sending half.
    pub sender: Sender,
    /// Receiving half.
    pub receiver: Mutex<Receiver>,
}

impl Session {
    /// Builds a session from the two raw keys of a finished handshake.
    pub fn new(
        suite: CipherSuite,
        local_index: u32,
        remote_index: u32,
        send_key: &[u8; 32],
        recv_key: &[u8; 32],
        initiator: bool,
        now: Instant,
    ) -> Self {
        Session {
            local_index,
            remote_index,
            suite,
            created: now,
            initiator,
            sender: Sender {
                key: suite.key(send_key),
                counter: AtomicU64::new(0),
                remote_index,
            },
            receiver: Mutex::new(Receiver {
                key: suite.key(recv_key),
                window: ReplayWindow::new(),
            }),
        }
    }

    /// Opens a datagram (see [`Receiver::open`]).
    pub fn open(&self, datagram: &mut [u8]) -> Result<usize, OpenError> {
        // A poisoned lock only means another thread panicked mid-open; the
        // window itself is always consistent, so keep using it.
        let mut r = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
        r.open(datagram)
    }

    /// True once a packet on this session authenticated: the peer holds
    /// its keys, so the handshake that made it really completed.
    pub fn has_received(&self) -> bool {
        let r = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
        r.window.seen_any()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pair(suite: CipherSuite) -> (Session, Session) {
        let now = Instant::now();
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        (
            Session::new(suite, 10, 20, &k1, &k2, true, now),
            Session::new(suite, 20, 10, &k2, &k1, false, now),
        )
    }

    fn packet(s: &Session, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; DATA_HEADER_LEN + payload.len() + TAG_LEN];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = s.sender.seal(&mut buf, payload.len()).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn seal_open_both_suites() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
            let (a, b) = pair(suite);
            let mut p = packet(&a, b"hello over the overlay");
            assert_eq!(p[0], crate::wire::MSG_DATA);
            assert_eq!(&p[4..8], &20u32.to_le_bytes(), "carries the peer's index");
            assert!(
                !p.windows(5).any(|w| w == b"hello"),
                "no plaintext on the wire"
            );
            let n = b.open(&mut p).unwrap();
            assert_eq!(&p[16..16 + n], b"hello over the overlay");
            let mut back = packet(&b, b"reply");
            let n = a.open(&mut back).unwrap();
            assert_eq!(&back[16..16 + n], b"reply");
        }
    }

    #[test]
    fn replayed_packet_is_dropped() {
        let (a, b) = pair(CipherSuite::Aes256Gcm);
        let p = packet(&a, b"once");
        let mut first = p.clone();
        assert!(!b.has_received());
        assert!(b.open(&mut first).is_ok());
        assert!(b.has_received());
        let mut again = p.clone();
        assert_eq!(b.open(&mut again), Err(OpenError::Replay));
    }

    #[test]
    fn forged_packet_does_not_move_the_window() {
        let (a, b) = pair(CipherSuite::Aes256Gcm);
        let good = packet(&a, b"real");
        // Forge a packet claiming a far-ahead counter.
        let mut forged = good.clone();
        forged[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert_eq!(b.open(&mut forged), Err(OpenError::Auth));
        assert!(!b.has_received(), "a forgery confirms nothing");
        // The real packet with counter 0 must still be accepted: the forged
        // counter did not slide the window past it.
        let mut g = good.clone();
        assert!(b.open(&mut g).is_ok());
        // Tampered ciphertext.
        let mut t = packet(&a, b"abcdef");
        t[18] ^= 1;
        assert_eq!(b.open(&mut t), Err(OpenError::Auth));
        // Tampered header (the header is authenticated too).
        let mut h = packet(&a, b"abcdef");
        h[4] ^= 1;
        assert_eq!(b.open(&mut h), Err(OpenError::Auth));
    }

    #[test]
    fn wrong_suite_or_key_fails() {
        let (a, _) = pair(CipherSuite::Aes256Gcm);
        let (_, b2) = pair(CipherSuite::ChaCha20Poly1305);
        let mut p = packet(&a, b"x");
        assert_eq!(b2.open(&mut p), Err(OpenError::Auth));
    }

    #[test]
    fn short_buffers_are_errors() {
        let (a, b) = pair(CipherSuite::Aes256Gcm);
        let mut small = [0u8; 20];
        assert_eq!(a.sender.seal(&mut small, 10), Err(SealError::Buffer));
        let mut tiny = [0xA4u8, 0, 0, 0, 20, 0, 0, 0];
        assert_eq!(b.open(&mut tiny), Err(OpenError::Malformed));
    }
}
