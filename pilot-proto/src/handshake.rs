//! The tunnel handshake: Noise IK through `snow`.
//!
//! The initiator knows the responder's static X25519 key (from the registry,
//! bound to the responder's identity by a signature). One round trip gives
//! both sides two fresh keys, one per direction, derived with fresh ephemeral
//! keys that are dropped afterwards (forward secrecy). The raw keys are handed
//! to the data AEAD in [`crate::session`].
//!
//! Before any Diffie-Hellman a receiver checks a cheap MAC keyed by its own
//! static public key ([`MacKey`]): a flood of random datagrams costs one HMAC
//! each, never a DH. The initiation carries a timestamp that must grow for
//! each peer, so a captured initiation cannot be replayed.

use std::time::Instant;

use ring::hmac;
use snow::params::NoiseParams;
use zeroize::Zeroizing;

use crate::session::{CipherSuite, Session};
use crate::wire::{
    self, HandshakeInit, HandshakeResp, HANDSHAKE_PAYLOAD_LEN, INIT_LEN, MAC_LEN, NOISE_INIT_LEN,
    NOISE_RESP_LEN, RESP_LEN,
};

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake so nothing else's Noise messages are accepted.
const PROLOGUE: &[u8] = b"pilot-tun/v1";
const MAC_DOMAIN: &[u8] = b"pilot-tun/v1/mac1";

/// Why a handshake message was refused. All of them mean: drop it silently.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The cheap MAC did not match: not meant for us, or random bytes.
    #[error("bad handshake MAC")]
    Mac,
    /// Noise refused the message (wrong keys, tampering).
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// The decrypted payload is malformed or names an unknown cipher.
    #[error("bad handshake payload")]
    Payload,
    /// A response for a different initiation.
    #[error("response does not match our initiation")]
    Index,
}

fn params() -> NoiseParams {
    // The pattern string is a constant that snow supports.
    NOISE_PATTERN.parse().expect("valid noise pattern")
}

/// The cheap pre-DH MAC key of one static public key.
#[derive(Clone)]
pub struct MacKey(hmac::Key);

impl MacKey {
    /// The MAC key for messages sent *to* the owner of `static_public`.
    pub fn for_static(static_public: &[u8; 32]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(MAC_DOMAIN);
        ctx.update(static_public);
        MacKey(hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref()))
    }

    /// The MAC over `data`.
    pub fn compute(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let tag = hmac::sign(&self.0, data);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }

    /// Constant-time check of a MAC.
    pub fn verify(&self, data: &[u8], mac: &[u8]) -> bool {
        let want = self.compute(data);
        mac.len() == MAC_LEN && want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// An initiation in flight, waiting for its response.
pub struct Initiator {
    hs: snow::HandshakeState,
    local_index: u32,
    suite: CipherSuite,
    remote_static: [u8; 32],
}

/// Starts a handshake towards `remote_static`. `timestamp` must grow with
/// every initiation this node sends (nanoseconds since the epoch work).
pub fn initiate(
    local_secret: &[u8; 32],
    remote_static: &[u8; 32],
    local_index: u32,
    timestamp: u64,
    suite: CipherSuite,
) -> Result<(Initiator, [u8; INIT_LEN]), HandshakeError> {
    let mut hs = snow::Builder::new(params())
        .local_private_key(local_secret)?
        .remote_public_key(remote_static)?
        .prologue(PROLOGUE)?
        .build_initiator()?;
    let mut payload = [0u8; HANDSHAKE_PAYLOAD_LEN];
    payload[..8].copy_from_slice(&timestamp.to_be_bytes());
    payload[8] = suite.to_byte();
    let mut out = [0u8; INIT_LEN];
    wire::emit_init_prefix(&mut out, local_index);
    let n = hs.write_message(&payload, &mut out[8..8 + NOISE_INIT_LEN])?;
    debug_assert_eq!(n, NOISE_INIT_LEN);
    let mac = MacKey::for_static(remote_static).compute(&out[..INIT_LEN - MAC_LEN]);
    out[INIT_LEN - MAC_LEN..].copy_from_slice(&mac);
    Ok((
        Initiator {
            hs,
            local_index,
            suite,
            remote_static: *remote_static,
        },
        out,
    ))
}

impl Initiator {
    /// Our index for the session being set up.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// The responder's static key.
    pub fn remote_static(&self) -> &[u8; 32] {
        &self.remote_static
    }

    /// Completes the handshake with the response. `own_mac` is the MAC key of
    /// our own static key.
    pub fn finish(
        mut self,
        own_mac: &MacKey,
        resp: HandshakeResp<'_>,
        now: Instant,
    ) -> Result<Session, HandshakeError> {
        if resp.receiver_index() != self.local_index {
            return Err(HandshakeError::Index);
        }
        if !own_mac.verify(resp.mac_covered(), resp.mac()) {
            return Err(HandshakeError::Mac);
        }
        let mut payload = [0u8; NOISE_RESP_LEN];
        let n = self.hs.read_message(resp.noise(), &mut payload)?;
        if n != HANDSHAKE_PAYLOAD_LEN {
            return Err(HandshakeError::Payload);
        }
        if CipherSuite::from_byte(payload[0]) != Some(self.suite) {
            return Err(HandshakeError::Payload);
        }
        let (send, recv) = self.hs.dangerously_get_raw_split();
        let (send, recv) = (Zeroizing::new(send), Zeroizing::new(recv));
        Ok(Session::new(
            self.suite,
            self.local_index,
            resp.sender_index(),
            &send,
            &recv,
            true,
            now,
        ))
    }
}

/// A decrypted initiation: the caller checks who it is from (trust) and
/// whether its timestamp is new before answering with [`Responder::accept`].
pub struct Responder {
    hs: snow::HandshakeState,
    remote_index: u32,
    remote_static: [u8; 32],
    timestamp: u64,
    suite: CipherSuite,
}

/// Reads an initiation addressed to us. Checks the MAC before any DH.
pub fn respond(
    local_secret: &[u8; 32],
    own_mac: &MacKey,
    init: HandshakeInit<'_>,
) -> Result<Responder, HandshakeError> {
    if !own_mac.verify(init.mac_covered(), init.mac()) {
        return Err(HandshakeError::Mac);
    }
    let mut hs = snow::Builder::new(params())
        .local_private_key(local_secret)?
        .prologue(PROLOGUE)?
        .build_responder()?;
    let mut payload = [0u8; NOISE_INIT_LEN];
    let n = hs.read_message(init.noise(), &mut payload)?;
    if n != HANDSHAKE_PAYLOAD_LEN {
        return Err(HandshakeError::Payload);
    }
    let suite = CipherSuite::from_byte(payload[8]).ok_or(HandshakeError::Payload)?;
    let remote_static: [u8; 32] = hs
        .get_remote_static()
        .and_then(|s| s.try_into().ok())
        .ok_or(HandshakeError::Payload)?;
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&payload[..8]);
    Ok(Responder {
        hs,
        remote_index: init.sender_index(),
        remote_static,
        timestamp: u64::from_be_bytes(ts),
        suite,
    })
}

impl Responder {
    /// The initiator's static key, authenticated by Noise.
    pub fn remote_static(&self) -> &[u8; 32] {
        &self.remote_static
    }
    /// The initiator's timestamp (must be newer than the last one accepted
    /// from the same peer).
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }
    /// The cipher suite the initiator chose.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Answers the initiation and returns the new session and the response.
    pub fn accept(
        mut self,
        local_index: u32,
        now: Instant,
    ) -> Result<(Session, [u8; RESP_LEN]), HandshakeError> {
        let mut payload = [0u8; HANDSHAKE_PAYLOAD_LEN];
        payload[0] = self.suite.to_byte();
        let mut out = [0u8; RESP_LEN];
        wire::emit_resp_prefix(&mut out, local_index, self.remote_index);
        let n = self
            .hs
            .write_message(&payload, &mut out[12..12 + NOISE_RESP_LEN])?;
        debug_assert_eq!(n, NOISE_RESP_LEN);
        let mac = MacKey::for_static(&self.remote_static).compute(&out[..RESP_LEN - MAC_LEN]);
        out[RESP_LEN - MAC_LEN..].copy_from_slice(&mac);
        let (recv, send) = self.hs.dangerously_get_raw_split();
        let (recv, send) = (Zeroizing::new(recv), Zeroizing::new(send));
        let session = Session::new(
            self.suite,
            local_index,
            self.remote_index,
            &send,
            &recv,
            false,
            now,
        );
        Ok((session, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::wire::{DATA_HEADER_LEN, TAG_LEN};

    fn ids() -> (Identity, Identity) {
        (
            Identity::from_bytes(&[1; 64]),
            Identity::from_bytes(&[2; 64]),
        )
    }

    #[test]
    fn the_prologue_carries_the_protocol_version() {
        // A bump of PROTOCOL_VERSION must reach the handshake, so that
        // programs of different versions fail at the first message instead
        // of misreading each other later.
        let want = format!("pilot-tun/v{}", crate::PROTOCOL_VERSION);
        assert_eq!(PROLOGUE, want.as_bytes());
        assert!(MAC_DOMAIN.starts_with(want.as_bytes()));
    }

    fn handshake(suite: CipherSuite) -> (Session, Session) {
        let (a, b) = ids();
        let now = Instant::now();
        let (init_state, init) =
            initiate(a.static_secret(), &b.static_public(), 11, 1000, suite).unwrap();
        let b_mac = MacKey::for_static(&b.static_public());
        let r = respond(
            b.static_secret(),
            &b_mac,
            HandshakeInit::new_checked(&init).unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.remote_static(),
            &a.static_public(),
            "responder learns who"
        );
        assert_eq!(r.timestamp(), 1000);
        let (sb, resp) = r.accept(22, now).unwrap();
        let a_mac = MacKey::for_static(&a.static_public());
        let sa = init_state
            .finish(&a_mac, HandshakeResp::new_checked(&resp).unwrap(), now)
            .unwrap();
        (sa, sb)
    }

    #[test]
    fn full_handshake_gives_matching_keys() {
        for suite in [CipherSuite::Aes256Gcm, CipherSuite::ChaCha20Poly1305] {
            let (sa, sb) = handshake(suite);
            assert_eq!((sa.local_index, sa.remote_index), (11, 22));
            assert_eq!((sb.local_index, sb.remote_index), (22, 11));
            assert_eq!(sb.suite, suite);
            let mut buf = vec![0u8; DATA_HEADER_LEN + 3 + TAG_LEN];
            buf[16..19].copy_from_slice(b"abc");
            sa.sender.seal(&mut buf, 3).unwrap();
            assert_eq!(sb.open(&mut buf).unwrap(), 3);
            assert_eq!(&buf[16..19], b"abc");
        }
    }

    #[test]
    fn fresh_keys_every_session() {
        let (a1, _) = handshake(CipherSuite::Aes256Gcm);
        let (_, b2) = handshake(CipherSuite::Aes256Gcm);
        let mut buf = vec![0u8; DATA_HEADER_LEN + 1 + TAG_LEN];
        a1.sender.seal(&mut buf, 1).unwrap();
        assert!(
            b2.open(&mut buf).is_err(),
            "ephemeral keys differ per session"
        );
    }

    #[test]
    fn wrong_mac_is_refused_before_dh() {
        let (a, b) = ids();
        let (_, mut init) = initiate(
            a.static_secret(),
            &b.static_public(),
            1,
            1,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        init[INIT_LEN - 1] ^= 1;
        let b_mac = MacKey::for_static(&b.static_public());
        assert!(matches!(
            respond(
                b.static_secret(),
                &b_mac,
                HandshakeInit::new_checked(&init).unwrap()
            ),
            Err(HandshakeError::Mac)
        ));
    }

    #[test]
    fn initiation_for_someone_else_is_refused() {
        let (a, b) = ids();
        let c = Identity::from_bytes(&[3; 64]);
        // Sent to b's key, delivered to c.
        let (_, init) = initiate(
            a.static_secret(),
            &b.static_public(),
            1,
            1,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        let c_mac = MacKey::for_static(&c.static_public());
        assert!(respond(
            c.static_secret(),
            &c_mac,
            HandshakeInit::new_checked(&init).unwrap()
        )
        .is_err());
    }

    #[test]
    fn tampered_noise_is_refused_even_with_valid_mac() {
        let (a, b) = ids();
        let (_, mut init) = initiate(
            a.static_secret(),
            &b.static_public(),
            1,
            1,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        init[50] ^= 0x80;
        let b_mac = MacKey::for_static(&b.static_public());
        let mac = b_mac.compute(&init[..INIT_LEN - MAC_LEN]);
        init[INIT_LEN - MAC_LEN..].copy_from_slice(&mac);
        assert!(matches!(
            respond(
                b.static_secret(),
                &b_mac,
                HandshakeInit::new_checked(&init).unwrap()
            ),
            Err(HandshakeError::Noise(_))
        ));
    }

    #[test]
    fn response_to_other_index_is_refused() {
        let (a, b) = ids();
        let now = Instant::now();
        let (st, init) = initiate(
            a.static_secret(),
            &b.static_public(),
            5,
            1,
            CipherSuite::Aes256Gcm,
        )
        .unwrap();
        let b_mac = MacKey::for_static(&b.static_public());
        let r = respond(
            b.static_secret(),
            &b_mac,
            HandshakeInit::new_checked(&init).unwrap(),
        )
        .unwrap();
        let (_, mut resp) = r.accept(6, now).unwrap();
        resp[8] = 99; // receiver index no longer ours
        let a_mac = MacKey::for_static(&a.static_public());
        assert!(matches!(
            st.finish(&a_mac, HandshakeResp::new_checked(&resp).unwrap(), now),
            Err(HandshakeError::Index)
        ));
    }
}
