//! Cookies: how a responder under load makes an initiator show that it
//! receives at the address it sends from, before the responder spends a
//! Diffie-Hellman on it.
//!
//! The cheap MAC (`mac1`) on an initiation is keyed by the responder's
//! public key, so every node that knows that key can make initiations that
//! pass it, from as many spoofed source addresses as it likes. While the
//! responder is under load it answers such an initiation with a cookie
//! reply instead of doing Noise:
//!
//! ```text
//! cookie  = HMAC(responder secret, changed every 2 min, source)[..16]
//! reply   = seal(key = H(domain, responder static public),
//!                nonce = random, aad = mac1 of the initiation, cookie)
//! mac2    = HMAC(cookie, initiation up to and with mac1)[..16]
//! ```
//! The source is what the responder's rate limit keys on: the sender's IP
//! address, or for an initiation the relay carried, the relay's address and
//! the node id the relay names. An attacker who forges source addresses
//! never sees the cookies for them, so its initiations stop at the MAC
//! checks; an initiator that does receive sends its initiation again with
//! `mac2`, which the responder checks with one HMAC and then admits.
//!
//! The seal key comes from the responder's public key, so only someone who
//! knows whom it was talking to can open the reply, and the `mac1` as
//! associated data ties the reply to one initiation: an off-path attacker
//! cannot feed an initiator cookies for initiations it never saw.
//!
//! Sans-IO: randomness comes from the caller ([`CookieMaker::rotate_secret`]
//! and the nonce argument) so tests are deterministic.

use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hmac;

use crate::wire::{
    CookieReply, HandshakeInit, COOKIE_LEN, COOKIE_NONCE_LEN, COOKIE_REPLY_LEN, INIT_LEN, MAC_LEN,
    MSG_COOKIE,
};

/// How long a responder's cookie secret lives, and so how long a cookie is
/// good for.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// An initiator stops using a cookie a little before the responder stops
/// taking it.
pub const COOKIE_USE_FOR: Duration = Duration::from_secs(110);
/// The longest source binding: a relay's IPv6 address and a node id.
pub const MAX_BINDING: usize = 16 + 16 + 1;

const SEAL_DOMAIN: &[u8] = b"pilot-tun cookie seal v1";

/// What a cookie is bound to: the bytes of the initiation's source.
pub trait CookieBinding {
    /// Writes the binding into `out` and returns its length
    /// (at most [`MAX_BINDING`]).
    fn binding(&self, out: &mut [u8; MAX_BINDING]) -> usize;
}

impl CookieBinding for std::net::IpAddr {
    fn binding(&self, out: &mut [u8; MAX_BINDING]) -> usize {
        match self {
            std::net::IpAddr::V4(a) => {
                out[0] = 4;
                out[1..5].copy_from_slice(&a.octets());
                5
            }
            std::net::IpAddr::V6(a) => {
                out[0] = 6;
                out[1..17].copy_from_slice(&a.octets());
                17
            }
        }
    }
}

/// The seal key for cookie replies from the owner of `static_public`.
fn seal_key(static_public: &[u8; 32]) -> LessSafeKey {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(SEAL_DOMAIN);
    ctx.update(static_public);
    let digest = ctx.finish();
    // A 32-byte key always fits ChaCha20-Poly1305.
    let key = UnboundKey::new(&CHACHA20_POLY1305, digest.as_ref()).expect("32-byte key");
    LessSafeKey::new(key)
}

/// The responder's side: makes cookies and replies, checks `mac2`.
pub struct CookieMaker {
    secret: hmac::Key,
    made: Option<Instant>,
    seal: LessSafeKey,
}

impl CookieMaker {
    /// For the owner of `static_public`, with a first secret.
    pub fn new(static_public: &[u8; 32], secret: [u8; 32]) -> Self {
        CookieMaker {
            secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            made: None,
            seal: seal_key(static_public),
        }
    }

    /// True if the secret is older than [`COOKIE_LIFETIME`] (or was never
    /// used): the caller should [`rotate_secret`](Self::rotate_secret).
    pub fn needs_secret(&self, now: Instant) -> bool {
        self.made
            .is_none_or(|m| now.saturating_duration_since(m) >= COOKIE_LIFETIME)
    }

    /// A new secret, from now on. Cookies made with the old one stop
    /// working.
    pub fn rotate_secret(&mut self, secret: [u8; 32], now: Instant) {
        self.secret = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        self.made = Some(now);
    }

    /// The cookie for `source`.
    fn cookie(&self, source: &dyn CookieBinding) -> [u8; COOKIE_LEN] {
        let mut b = [0u8; MAX_BINDING];
        let n = source.binding(&mut b);
        let tag = hmac::sign(&self.secret, &b[..n]);
        let mut out = [0u8; COOKIE_LEN];
        out.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
        out
    }

    /// True if `init` carries a `mac2` made with the current cookie for
    /// `source`.
    pub fn check(&self, init: &HandshakeInit<'_>, source: &dyn CookieBinding) -> bool {
        let Some(mac2) = init.cookie_mac() else {
            return false;
        };
        let want = mac2_with(&self.cookie(source), init.cookie_covered());
        want.iter().zip(mac2).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// The reply that gives `source` its cookie, for the initiation `init`
    /// (whose `mac1` was checked). `nonce` must be fresh random bytes.
    pub fn reply(
        &self,
        init: &HandshakeInit<'_>,
        source: &dyn CookieBinding,
        nonce: [u8; COOKIE_NONCE_LEN],
    ) -> [u8; COOKIE_REPLY_LEN] {
        let mut out = [0u8; COOKIE_REPLY_LEN];
        out[0] = MSG_COOKIE;
        out[4..8].copy_from_slice(&init.sender_index().to_le_bytes());
        out[8..8 + COOKIE_NONCE_LEN].copy_from_slice(&nonce);
        let body = &mut out[8 + COOKIE_NONCE_LEN..];
        body[..COOKIE_LEN].copy_from_slice(&self.cookie(source));
        let (plain, tag_out) = body.split_at_mut(COOKIE_LEN);
        let tag = self
            .seal
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(init.mac()),
                plain,
            )
            .expect("a 16-byte message always seals");
        tag_out.copy_from_slice(tag.as_ref());
        out
    }
}

/// `mac2` over `covered` (an initiation up to and with `mac1`).
fn mac2_with(cookie: &[u8; COOKIE_LEN], covered: &[u8]) -> [u8; MAC_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, cookie);
    let tag = hmac::sign(&key, covered);
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    out
}

/// Why a cookie reply was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// Not shaped like a cookie reply.
    #[error("malformed cookie reply")]
    Malformed,
    /// It does not open with the responder's key and our initiation's
    /// `mac1`: forged, or for another initiation.
    #[error("cookie reply does not authenticate")]
    Forged,
}

/// Opens a cookie reply from the owner of `remote_static` to our initiation
/// `sent` (the bytes we sent, at least up to `mac1`).
pub fn open_reply(
    remote_static: &[u8; 32],
    reply: &[u8],
    sent: &[u8],
) -> Result<[u8; COOKIE_LEN], CookieError> {
    let reply = CookieReply::new_checked(reply).map_err(|_| CookieError::Malformed)?;
    let sent = HandshakeInit::new_checked(sent).map_err(|_| CookieError::Malformed)?;
    if reply.receiver_index() != sent.sender_index() {
        return Err(CookieError::Forged);
    }
    let nonce: [u8; COOKIE_NONCE_LEN] = reply.nonce().try_into().expect("checked length");
    let mut body = [0u8; COOKIE_LEN + crate::wire::TAG_LEN];
    body.copy_from_slice(reply.sealed());
    let plain = seal_key(remote_static)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(sent.mac()),
            &mut body,
        )
        .map_err(|_| CookieError::Forged)?;
    let mut cookie = [0u8; COOKIE_LEN];
    cookie.copy_from_slice(plain);
    Ok(cookie)
}

/// `init` (an initiation of [`INIT_LEN`] bytes) with `mac2` for `cookie`
/// appended.
pub fn with_mac2(init: &[u8], cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
    let covered = &init[..INIT_LEN.min(init.len())];
    let mut out = Vec::with_capacity(INIT_LEN + MAC_LEN);
    out.extend_from_slice(covered);
    out.extend_from_slice(&mac2_with(cookie, covered));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake;
    use crate::identity::Identity;
    use crate::session::CipherSuite;
    use std::net::IpAddr;

    fn pair() -> (Identity, Identity) {
        (
            Identity::from_bytes(&[1; 64]),
            Identity::from_bytes(&[2; 64]),
        )
    }

    fn init_from(a: &Identity, b: &Identity, index: u32) -> [u8; INIT_LEN] {
        handshake::initiate(
            a.static_secret(),
            &b.static_public(),
            index,
            1,
            CipherSuite::Aes256Gcm,
        )
        .unwrap()
        .1
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_received_cookie_admits_the_resent_initiation() {
        let (a, b) = pair();
        let now = Instant::now();
        let mut maker = CookieMaker::new(&b.static_public(), [7; 32]);
        assert!(maker.needs_secret(now));
        maker.rotate_secret([8; 32], now);
        assert!(!maker.needs_secret(now + Duration::from_secs(60)));
        let sent = init_from(&a, &b, 42);
        let view = HandshakeInit::new_checked(&sent).unwrap();
        let src = ip("198.51.100.7");
        assert!(!maker.check(&view, &src), "no mac2 yet");
        let reply = maker.reply(&view, &src, [3; COOKIE_NONCE_LEN]);
        let cookie = open_reply(&b.static_public(), &reply, &sent).unwrap();
        let again = with_mac2(&sent, &cookie);
        let view = HandshakeInit::new_checked(&again).unwrap();
        assert!(maker.check(&view, &src));
        // mac1 still checks on the longer initiation.
        let mac1 = handshake::MacKey::for_static(&b.static_public());
        assert!(mac1.verify(view.mac_covered(), view.mac()));
    }

    #[test]
    fn a_cookie_is_bound_to_its_source_and_its_secret() {
        let (a, b) = pair();
        let now = Instant::now();
        let mut maker = CookieMaker::new(&b.static_public(), [7; 32]);
        maker.rotate_secret([8; 32], now);
        let sent = init_from(&a, &b, 1);
        let view = HandshakeInit::new_checked(&sent).unwrap();
        let reply = maker.reply(&view, &ip("198.51.100.7"), [0; 12]);
        let cookie = open_reply(&b.static_public(), &reply, &sent).unwrap();
        let again = with_mac2(&sent, &cookie);
        let view = HandshakeInit::new_checked(&again).unwrap();
        assert!(
            !maker.check(&view, &ip("198.51.100.8")),
            "another source's cookie"
        );
        maker.rotate_secret([9; 32], now + COOKIE_LIFETIME);
        assert!(
            !maker.check(&view, &ip("198.51.100.7")),
            "a cookie from the previous secret"
        );
        // A tampered mac2 is refused.
        let mut bad = again.clone();
        *bad.last_mut().unwrap() ^= 1;
        maker.rotate_secret([8; 32], now);
        assert!(maker.check(
            &HandshakeInit::new_checked(&again).unwrap(),
            &ip("198.51.100.7")
        ));
        assert!(!maker.check(
            &HandshakeInit::new_checked(&bad).unwrap(),
            &ip("198.51.100.7")
        ));
    }

    #[test]
    fn forged_or_misdirected_replies_are_refused() {
        let (a, b) = pair();
        let maker = CookieMaker::new(&b.static_public(), [7; 32]);
        let sent = init_from(&a, &b, 5);
        let view = HandshakeInit::new_checked(&sent).unwrap();
        let reply = maker.reply(&view, &ip("192.0.2.1"), [1; 12]);
        // Opened as if it came from someone else.
        assert_eq!(
            open_reply(&a.static_public(), &reply, &sent),
            Err(CookieError::Forged)
        );
        // For another initiation of ours (same index, other mac1).
        let other = init_from(&a, &b, 5);
        assert_ne!(other[..], sent[..]);
        assert_eq!(
            open_reply(&b.static_public(), &reply, &other),
            Err(CookieError::Forged)
        );
        // Another index.
        let mut wrong = reply;
        wrong[4] ^= 1;
        assert_eq!(
            open_reply(&b.static_public(), &wrong, &sent),
            Err(CookieError::Forged)
        );
        // A flipped bit in the sealed cookie.
        let mut flipped = reply;
        flipped[30] ^= 1;
        assert_eq!(
            open_reply(&b.static_public(), &flipped, &sent),
            Err(CookieError::Forged)
        );
        // Junk never panics.
        for n in 0..80 {
            let junk = vec![MSG_COOKIE; n];
            assert!(open_reply(&b.static_public(), &junk, &sent).is_err());
        }
    }

    #[test]
    fn ipv4_and_ipv6_bindings_differ() {
        let mut x = [0u8; MAX_BINDING];
        let mut y = [0u8; MAX_BINDING];
        let n = ip("192.0.2.1").binding(&mut x);
        let m = ip("::ffff:192.0.2.1").binding(&mut y);
        assert_ne!(x[..n], y[..m]);
    }
}
