//! Handshake admission: the one path every responder (a node, the
//! registry) takes a handshake initiation through before it spends state on
//! it.
//!
//! The order is the point, cheapest first:
//! 1. shape: length, type and reserved bytes ([`HandshakeInit::new_checked`]);
//! 2. the MAC keyed by our own static key (one HMAC, no Diffie-Hellman), so
//!    random datagrams and initiations meant for someone else cost nothing;
//! 3. under load (more initiations with a good MAC than
//!    [`LOAD_THRESHOLD`] a second), a cookie: an initiation without a valid
//!    `mac2` for its source is answered with a cookie reply and goes no
//!    further ([`crate::cookie`]); forged source addresses stop here. Only
//!    for responders that turn cookies on ([`Admission::with_cookies`]);
//! 4. the per-source rate limit (default 20/s, burst 5), so one source
//!    cannot buy unlimited Diffie-Hellman work;
//! 5. Noise (the DH work), which authenticates the initiator's static key;
//! 6. (the caller's step) deciding whether that key is welcome: trust for a
//!    node, anyone for the registry;
//! 7. the initiation's timestamp must grow per initiator, so a captured
//!    initiation cannot be replayed; checked and recorded by
//!    [`Screened::accept`], which then answers.
//!
//! ```text
//! let screened = admission.screen(datagram, source_ip, now)?;   // 1-5
//! let last = <the caller's last timestamp for screened.remote_static()>; // 6
//! let (session, response) = screened.accept(last, local_index, now)?;  // 7
//! ```
//! A responder that keeps Diffie-Hellman work off its packet path splits
//! `screen` in two: [`Admission::precheck`] (1-4, cheap) where packets
//! arrive, and [`ResponderKeys::open`] (5) wherever the DH may run.
//! Sans-IO: the caller sends the response and keeps the session.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::cookie::{CookieBinding, CookieMaker};
use crate::handshake::{self, HandshakeError, MacKey, Responder};
use crate::ratelimit::RateLimiter;
use crate::session::{CipherSuite, Session};
use crate::wire::{HandshakeInit, WireError, COOKIE_NONCE_LEN, COOKIE_REPLY_LEN, RESP_LEN};

/// Handshakes one source may start per second (DESIGN: 20/s per source).
pub const HANDSHAKE_RATE: u32 = 20;
/// Handshakes one source may start at once (DESIGN: burst 5).
pub const HANDSHAKE_BURST: u32 = 5;
/// Initiations with a good MAC per second above which a responder with
/// cookies on is under load. A fleet of a thousand peers rekeying every two
/// minutes makes about eight a second; a restart of every peer at once
/// passes it briefly, and costs each of them one round trip more.
pub const LOAD_THRESHOLD: u32 = 100;
/// How long a responder stays under load after the rate last passed
/// [`LOAD_THRESHOLD`].
pub const LOAD_HOLD: Duration = Duration::from_secs(1);

/// Why an initiation was not admitted. Every case means: drop it, answer
/// nothing; the variant only says which counter to bump.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not shaped like an initiation.
    #[error("malformed initiation: {0}")]
    Malformed(#[from] WireError),
    /// The cheap MAC did not match: not for us, or random bytes.
    #[error("bad handshake MAC")]
    Mac,
    /// The source is over its handshake rate.
    #[error("handshake rate limit")]
    RateLimited,
    /// Under load, and the initiation carries no valid cookie for its
    /// source: send this cookie reply back to where it came from, nothing
    /// else.
    #[error("under load: answered with a cookie")]
    Cookie(Box<[u8; COOKIE_REPLY_LEN]>),
    /// Noise refused the message, or its payload is malformed.
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// The timestamp is not newer than the last one admitted from the same
    /// initiator: a replayed initiation.
    #[error("replayed initiation")]
    Replayed,
}

/// The responder's half of admission: its keys and the per-source limiter.
/// A source is an IP address unless the caller keys its buckets finer (a
/// node keys initiations the relay carried by the node that sent them).
pub struct Admission<K = IpAddr> {
    keys: ResponderKeys,
    limiter: RateLimiter<K>,
    /// Cookie replies per source, under load: a legitimate initiator needs
    /// one per attempt; a flood from a source gets a few and then silence,
    /// so answering it costs little more than dropping it.
    replies: RateLimiter<K>,
    cookies: Option<Cookies>,
    static_public: [u8; 32],
}

/// The cookie half of admission: the maker and the load meter.
struct Cookies {
    maker: CookieMaker,
    rng: SystemRandom,
    threshold: u32,
    window: Option<Instant>,
    in_window: u32,
    loaded_until: Option<Instant>,
    /// Reply nonces: a random prefix and a counter (no system call per
    /// reply, never repeated under one secret's seal key).
    nonce_prefix: [u8; 4],
    nonce_count: u64,
}

impl Cookies {
    /// Counts one initiation with a good MAC; true if under load.
    fn note(&mut self, now: Instant) -> bool {
        match self.window {
            Some(w) if now.saturating_duration_since(w) < Duration::from_secs(1) => {
                self.in_window += 1
            }
            _ => {
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.in_window > self.threshold {
            self.loaded_until = Some(now + LOAD_HOLD);
        }
        self.loaded_until.is_some_and(|u| now < u)
    }

    fn next_nonce(&mut self) -> [u8; COOKIE_NONCE_LEN] {
        self.nonce_count = self.nonce_count.wrapping_add(1);
        let mut n = [0u8; COOKIE_NONCE_LEN];
        n[..4].copy_from_slice(&self.nonce_prefix);
        n[4..].copy_from_slice(&self.nonce_count.to_le_bytes());
        n
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        // The system RNG does not fail on Linux; zeros would only weaken
        // cookies, never open the door.
        let _ = self.rng.fill(&mut b);
        b
    }
}

/// What the Diffie-Hellman step needs: the responder's static secret and
/// its MAC key. Cheap to clone, so the DH can run on another thread.
#[derive(Clone)]
pub struct ResponderKeys {
    secret: [u8; 32],
    mac: MacKey,
}

impl<K: Hash + Eq + Clone + CookieBinding> Admission<K> {
    /// Admission for the owner of `secret` (its X25519 static secret), with
    /// the default rate limit.
    pub fn new(secret: [u8; 32], static_public: &[u8; 32]) -> Self {
        Self::with_limit(secret, static_public, HANDSHAKE_RATE, HANDSHAKE_BURST)
    }

    /// Like [`Admission::new`] with another per-source `rate` and `burst`.
    pub fn with_limit(secret: [u8; 32], static_public: &[u8; 32], rate: u32, burst: u32) -> Self {
        Admission {
            keys: ResponderKeys {
                secret,
                mac: MacKey::for_static(static_public),
            },
            limiter: RateLimiter::new(rate, burst),
            replies: RateLimiter::new(rate, burst),
            cookies: None,
            static_public: *static_public,
        }
    }

    /// Turns cookies on: above `threshold` initiations with a good MAC per
    /// second, initiations need a cookie ([`LOAD_THRESHOLD`] is the
    /// default).
    pub fn with_cookies(mut self, threshold: u32) -> Self {
        let rng = SystemRandom::new();
        let mut first = [0u8; 32];
        let _ = rng.fill(&mut first);
        let mut prefix = [0u8; 4];
        let _ = rng.fill(&mut prefix);
        self.cookies = Some(Cookies {
            maker: CookieMaker::new(&self.static_public, first),
            rng,
            threshold,
            window: None,
            in_window: 0,
            loaded_until: None,
            nonce_prefix: prefix,
            nonce_count: 0,
        });
        self
    }

    /// True if initiations need a cookie now.
    pub fn under_load(&self, now: Instant) -> bool {
        self.cookies
            .as_ref()
            .is_some_and(|c| c.loaded_until.is_some_and(|u| now < u))
    }

    /// The MAC key of our own static key (it also checks handshake
    /// responses to our own initiations).
    pub fn own_mac(&self) -> &MacKey {
        &self.keys.mac
    }

    /// The keys for [`ResponderKeys::open`].
    pub fn keys(&self) -> &ResponderKeys {
        &self.keys
    }

    /// Steps 1-5: shape, MAC, cookie under load, the rate limit of `source` (the IP the
    /// datagram came from, or a finer key the caller chose), Noise.
    /// On success the initiator's static key is authenticated; nothing about
    /// it has been recorded yet.
    pub fn screen(
        &mut self,
        datagram: &[u8],
        source: K,
        now: Instant,
    ) -> Result<Screened, Refused> {
        let init = self.precheck(datagram, source, now)?;
        self.keys.open(init)
    }

    /// Steps 1-4 alone (no Diffie-Hellman): shape, MAC, cookie under
    /// load, rate limit. The
    /// initiation that passes goes on to [`ResponderKeys::open`].
    pub fn precheck<'a>(
        &mut self,
        datagram: &'a [u8],
        source: K,
        now: Instant,
    ) -> Result<HandshakeInit<'a>, Refused> {
        let init = HandshakeInit::new_checked(datagram)?;
        if !self.keys.mac.verify(init.mac_covered(), init.mac()) {
            return Err(Refused::Mac);
        }
        if let Some(c) = &mut self.cookies {
            if c.maker.needs_secret(now) {
                let secret = c.random();
                c.maker.rotate_secret(secret, now);
            }
            if c.note(now) && !c.maker.check(&init, &source) {
                if !self.replies.allow(&source, now) {
                    return Err(Refused::RateLimited);
                }
                let nonce = c.next_nonce();
                let reply = c.maker.reply(&init, &source, nonce);
                return Err(Refused::Cookie(Box::new(reply)));
            }
        }
        if !self.limiter.allow(&source, now) {
            return Err(Refused::RateLimited);
        }
        Ok(init)
    }
}

impl Drop for ResponderKeys {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ZeroizeOnDrop for ResponderKeys {}

impl ResponderKeys {
    /// Step 4: Noise (the Diffie-Hellman work) on an initiation that passed
    /// [`Admission::precheck`]. It checks the MAC again (one HMAC), so an
    /// initiation that skipped the precheck is still refused cheaply.
    pub fn open(&self, init: HandshakeInit<'_>) -> Result<Screened, Refused> {
        let responder = handshake::respond(&self.secret, &self.mac, init)?;
        Ok(Screened { responder })
    }
}

/// An initiation that passed [`Admission::screen`]: authenticated, not yet
/// answered.
pub struct Screened {
    responder: Responder,
}

impl Screened {
    /// The initiator's static key, authenticated by Noise: look it up in the
    /// trust store (or whatever decides who is welcome) before accepting.
    pub fn remote_static(&self) -> &[u8; 32] {
        self.responder.remote_static()
    }

    /// The initiator's timestamp.
    pub fn timestamp(&self) -> u64 {
        self.responder.timestamp()
    }

    /// The cipher suite the initiator chose.
    pub fn suite(&self) -> CipherSuite {
        self.responder.suite()
    }

    /// The authenticated initiation, for a caller that keeps the
    /// per-initiator timestamp itself (the node's peer machine does:
    /// [`crate::peer::Peer::handle_init`]).
    pub fn into_responder(self) -> Responder {
        self.responder
    }

    /// Step 6: refuses the initiation unless its timestamp is newer than
    /// `last` (the last one admitted from this initiator, 0 for none), then
    /// records it in `last` and answers. Returns the new session (our index
    /// `local_index`) and the response datagram to send back.
    pub fn accept(
        self,
        last: &mut u64,
        local_index: u32,
        now: Instant,
    ) -> Result<(Session, [u8; RESP_LEN]), Refused> {
        let ts = self.responder.timestamp();
        if ts <= *last {
            return Err(Refused::Replayed);
        }
        let answer = self.responder.accept(local_index, now)?;
        *last = ts;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::wire::{HandshakeResp, INIT_LEN};
    use std::time::Duration;

    fn ids() -> (Identity, Identity) {
        (
            Identity::from_bytes(&[1; 64]),
            Identity::from_bytes(&[2; 64]),
        )
    }

    fn init(from: &Identity, to: &Identity, ts: u64) -> (handshake::Initiator, [u8; INIT_LEN]) {
        handshake::initiate(
            from.static_secret(),
            &to.static_public(),
            3,
            ts,
            CipherSuite::ChaCha20Poly1305,
        )
        .unwrap()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn admission(of: &Identity) -> Admission {
        Admission::new(*of.static_secret(), &of.static_public())
    }

    /// A flood of initiations with good MACs from many (forged) sources:
    /// past the threshold, each gets a cookie reply and no Diffie-Hellman;
    /// the initiator that receives its reply gets through with `mac2`, and
    /// a cookie does not work from another source.
    #[test]
    fn under_load_initiations_need_a_cookie_for_their_source() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b).with_cookies(3);
        let (_, msg) = init(&a, &b, 100);
        for i in 0..3 {
            assert!(
                adm.precheck(&msg, ip(10 + i), now).is_ok(),
                "below the threshold"
            );
        }
        assert!(!adm.under_load(now));
        let reply = match adm.precheck(&msg, ip(1), now) {
            Err(Refused::Cookie(r)) => r,
            other => panic!("expected a cookie reply, got {:?}", other.map(|_| ())),
        };
        assert!(adm.under_load(now));
        // The reply opens with the responder's key and our mac1.
        let cookie = crate::cookie::open_reply(&b.static_public(), &reply[..], &msg).unwrap();
        let with = crate::cookie::with_mac2(&msg, &cookie);
        let s = adm.screen(&with, ip(1), now).expect("mac2 admits it");
        assert_eq!(s.remote_static(), &a.static_public());
        // The same mac2 from another source: another cookie, no Noise.
        assert!(matches!(
            adm.precheck(&with, ip(2), now),
            Err(Refused::Cookie(_))
        ));
        // Load passes: plain initiations are admitted again.
        let later = now + LOAD_HOLD + Duration::from_secs(1);
        assert!(!adm.under_load(later));
        assert!(adm.precheck(&msg, ip(3), later).is_ok());
    }

    /// Under load, one source gets a few cookie replies (the burst) and
    /// then silence: answering a flood costs about what dropping it does.
    /// Another source still gets its reply.
    #[test]
    fn cookie_replies_are_rationed_per_source() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b).with_cookies(0);
        let (_, msg) = init(&a, &b, 100);
        let mut replies = 0;
        let mut silent = 0;
        for _ in 0..100 {
            match adm.precheck(&msg, ip(1), now) {
                Err(Refused::Cookie(_)) => replies += 1,
                Err(Refused::RateLimited) => silent += 1,
                other => panic!("unexpected {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(replies, HANDSHAKE_BURST as usize);
        assert_eq!(silent, 100 - replies);
        assert!(matches!(
            adm.precheck(&msg, ip(2), now),
            Err(Refused::Cookie(_))
        ));
        // Replies carry distinct nonces.
        let r1 = match adm.precheck(&msg, ip(3), now) {
            Err(Refused::Cookie(r)) => r,
            _ => panic!("a cookie"),
        };
        let r2 = match adm.precheck(&msg, ip(4), now) {
            Err(Refused::Cookie(r)) => r,
            _ => panic!("a cookie"),
        };
        assert_ne!(r1[8..20], r2[8..20]);
    }

    #[test]
    fn without_cookies_there_is_no_load() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let (_, msg) = init(&a, &b, 100);
        for i in 0..200u8 {
            assert!(!matches!(
                adm.precheck(&msg, ip(i), now),
                Err(Refused::Cookie(_))
            ));
        }
        assert!(!adm.under_load(now));
    }

    #[test]
    fn admitted_initiation_gives_a_working_session() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let (initiator, msg) = init(&a, &b, 100);
        let s = adm.screen(&msg, ip(1), now).unwrap();
        assert_eq!(s.remote_static(), &a.static_public());
        assert_eq!(s.timestamp(), 100);
        assert_eq!(s.suite(), CipherSuite::ChaCha20Poly1305);
        let mut last = 0;
        let (sb, resp) = s.accept(&mut last, 44, now).unwrap();
        assert_eq!(last, 100, "timestamp recorded");
        assert_eq!(sb.local_index, 44);
        let a_mac = MacKey::for_static(&a.static_public());
        let sa = initiator
            .finish(&a_mac, HandshakeResp::new_checked(&resp).unwrap(), now)
            .unwrap();
        assert_eq!(sa.remote_index, 44);
    }

    #[test]
    fn replayed_initiation_is_refused_and_changes_nothing() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let (_, msg) = init(&a, &b, 100);
        let mut last = 0;
        adm.screen(&msg, ip(1), now)
            .unwrap()
            .accept(&mut last, 1, now)
            .unwrap();
        // The same bytes again (a capture), and an older timestamp.
        let again = adm.screen(&msg, ip(2), now).unwrap();
        assert!(matches!(
            again.accept(&mut last, 2, now),
            Err(Refused::Replayed)
        ));
        let (_, older) = init(&a, &b, 99);
        assert!(matches!(
            adm.screen(&older, ip(2), now)
                .unwrap()
                .accept(&mut last, 2, now),
            Err(Refused::Replayed)
        ));
        assert_eq!(last, 100);
        let (_, newer) = init(&a, &b, 101);
        assert!(adm
            .screen(&newer, ip(2), now)
            .unwrap()
            .accept(&mut last, 3, now)
            .is_ok());
        assert_eq!(last, 101);
    }

    #[test]
    fn bad_mac_is_refused_before_the_rate_limit_and_noise() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let (_, mut msg) = init(&a, &b, 1);
        msg[INIT_LEN - 1] ^= 1;
        for _ in 0..50 {
            assert!(matches!(adm.screen(&msg, ip(1), now), Err(Refused::Mac)));
        }
        // Bad MACs spent none of the source's budget.
        let (_, good) = init(&a, &b, 2);
        assert!(adm.screen(&good, ip(1), now).is_ok());
    }

    #[test]
    fn initiation_for_another_key_is_refused_by_the_mac() {
        let (a, b) = ids();
        let c = Identity::from_bytes(&[3; 64]);
        let mut adm = admission(&c);
        let (_, msg) = init(&a, &b, 1);
        assert!(matches!(
            adm.screen(&msg, ip(1), Instant::now()),
            Err(Refused::Mac)
        ));
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        let (_, b) = ids();
        let mut adm = admission(&b);
        let now = Instant::now();
        assert!(matches!(
            adm.screen(&[], ip(1), now),
            Err(Refused::Malformed(_))
        ));
        assert!(matches!(
            adm.screen(&[0xA1; 100], ip(1), now),
            Err(Refused::Malformed(_))
        ));
        let mut wrong_type = [0u8; INIT_LEN];
        wrong_type[0] = 0xA2;
        assert!(matches!(
            adm.screen(&wrong_type, ip(1), now),
            Err(Refused::Malformed(_))
        ));
    }

    #[test]
    fn tampered_noise_with_a_valid_mac_is_refused_by_noise() {
        let (a, b) = ids();
        let mut adm = admission(&b);
        let (_, mut msg) = init(&a, &b, 1);
        msg[40] ^= 0x10;
        let mac = MacKey::for_static(&b.static_public()).compute(&msg[..INIT_LEN - 16]);
        msg[INIT_LEN - 16..].copy_from_slice(&mac);
        assert!(matches!(
            adm.screen(&msg, ip(1), Instant::now()),
            Err(Refused::Handshake(_))
        ));
    }

    #[test]
    fn precheck_then_open_is_screen_in_two_steps() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let keys = adm.keys().clone();
        let (_, msg) = init(&a, &b, 7);
        let checked = adm.precheck(&msg, ip(1), now).unwrap();
        // The DH half runs elsewhere (another thread) with cloned keys.
        let copy = msg;
        let s = std::thread::spawn(move || {
            let init = HandshakeInit::new_checked(&copy).unwrap();
            keys.open(init).map(|s| *s.remote_static())
        })
        .join()
        .unwrap()
        .unwrap();
        assert_eq!(s, a.static_public());
        assert_eq!(checked.sender_index(), 3);
        // The precheck spends the source's budget like screen does.
        for _ in 1..HANDSHAKE_BURST {
            adm.precheck(&msg, ip(1), now).unwrap();
        }
        assert!(matches!(
            adm.precheck(&msg, ip(1), now),
            Err(Refused::RateLimited)
        ));
        // And open alone still refuses what is not for us.
        let c = Identity::from_bytes(&[3; 64]);
        let (_, other) = init(&a, &c, 1);
        assert!(matches!(
            adm.keys().open(HandshakeInit::new_checked(&other).unwrap()),
            Err(Refused::Handshake(HandshakeError::Mac))
        ));
    }

    #[test]
    fn one_source_is_limited_others_are_not() {
        let (a, b) = ids();
        let now = Instant::now();
        let mut adm = admission(&b);
        let mut ts = 0;
        let mut next = || {
            ts += 1;
            init(&a, &b, ts).1
        };
        let passed = (0..10)
            .filter(|_| adm.screen(&next(), ip(1), now).is_ok())
            .count();
        assert_eq!(passed, HANDSHAKE_BURST as usize, "the burst, then refusals");
        assert!(matches!(
            adm.screen(&next(), ip(1), now),
            Err(Refused::RateLimited)
        ));
        assert!(adm.screen(&next(), ip(2), now).is_ok(), "another source");
        // 20/s: one more every 50 ms.
        let later = now + Duration::from_millis(50);
        assert!(adm.screen(&next(), ip(1), later).is_ok());
        assert!(matches!(
            adm.screen(&next(), ip(1), later),
            Err(Refused::RateLimited)
        ));
    }
}
