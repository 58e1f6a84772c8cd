//! Tunnel datagram formats.
//!
//! Every datagram starts with a type byte chosen far from STUN's (whose first
//! two bits are zero), so one UDP port can carry STUN, handshakes, data and
//! relayed packets and tell them apart from the first bytes.
//!
//! ```text
//! handshake init  (136 B) | A1 | 0 0 0 | sender idx u32le | noise msg1 (112) | mac1 (16) |
//!   with a cookie (152 B) | A1 | ... as above ...                              | mac1 (16) | mac2 (16) |
//! cookie reply    ( 52 B) | A3 | 0 0 0 | receiver idx u32le | nonce (12) | sealed cookie (16) | tag (16) |
//! handshake resp  ( 92 B) | A2 | 0 0 0 | sender idx u32le | receiver idx u32le | noise msg2 (64) | mac1 (16) |
//! data     (32 B + inner) | A4 | 0 0 0 | receiver idx u32le | counter u64le | ciphertext | tag (16) |
//! relay to       (20 B + d) | A5 | 0 0 0 | destination node id (16) | tunnel datagram d |
//! relay from     (20 B + d) | A6 | 0 0 0 | source node id (16)      | tunnel datagram d |
//! instance       (44 B + r) | A7 | 0 0 0 | recipient node id (16) | unix ms u64le | tag (16) | relay-from datagram r |
//! ```
//! The instance frame passes a relayed datagram between two registry
//! instances that share one database (the recipient is attached to the
//! other one); the tag is keyed by the registry's secret, so only an
//! instance can make one. Nodes never see it.
//! A relay forwards the tunnel datagram untouched: it holds no key to it.
//! The cookie reply and `mac2` are how a responder under load makes an
//! initiator prove it receives where it sends from (see [`crate::cookie`]).
//! The whole 16-byte data header is the AEAD's associated data.

use crate::stun;

/// Type byte of a handshake initiation.
pub const MSG_HANDSHAKE_INIT: u8 = 0xA1;
/// Type byte of a handshake response.
pub const MSG_HANDSHAKE_RESP: u8 = 0xA2;
/// Type byte of a cookie reply.
pub const MSG_COOKIE: u8 = 0xA3;
/// Type byte of a data packet.
pub const MSG_DATA: u8 = 0xA4;
/// Type byte of a datagram a node hands the relay for another node.
pub const MSG_RELAY_TO: u8 = 0xA5;
/// Type byte of a datagram the relay delivers from another node.
pub const MSG_RELAY_FROM: u8 = 0xA6;
/// Type byte of a relayed datagram passed between registry instances.
pub const MSG_INSTANCE: u8 = 0xA7;
/// Length of the relay header: type, reserved, the other node's id.
pub const RELAY_HEADER_LEN: usize = 4 + 16;

/// Length of the handshake payload each side encrypts inside Noise.
pub const HANDSHAKE_PAYLOAD_LEN: usize = 16;
/// Noise IK message 1: e (32) + encrypted s (32+16) + encrypted payload.
pub const NOISE_INIT_LEN: usize = 32 + 48 + HANDSHAKE_PAYLOAD_LEN + 16;
/// Noise IK message 2: e (32) + encrypted payload.
pub const NOISE_RESP_LEN: usize = 32 + HANDSHAKE_PAYLOAD_LEN + 16;
/// Length of the cheap MAC that guards handshakes.
pub const MAC_LEN: usize = 16;
/// Total length of a handshake initiation.
pub const INIT_LEN: usize = 8 + NOISE_INIT_LEN + MAC_LEN;
/// Total length of a handshake initiation that carries a cookie MAC.
pub const INIT_COOKIE_LEN: usize = INIT_LEN + MAC_LEN;
/// Length of a cookie.
pub const COOKIE_LEN: usize = 16;
/// Length of a cookie reply's nonce.
pub const COOKIE_NONCE_LEN: usize = 12;
/// Total length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 8 + COOKIE_NONCE_LEN + COOKIE_LEN + TAG_LEN;
/// Total length of a handshake response.
pub const RESP_LEN: usize = 12 + NOISE_RESP_LEN + MAC_LEN;
/// Length of the data header (type, reserved, index, counter).
pub const DATA_HEADER_LEN: usize = 16;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a data packet adds to its inner packet.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// What a datagram claims to be, from its first bytes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An RFC 8489 STUN message.
    Stun,
    /// [`HandshakeInit`].
    HandshakeInit,
    /// [`HandshakeResp`].
    HandshakeResp,
    /// [`CookieReply`].
    CookieReply,
    /// [`DataHeader`].
    Data,
    /// [`RelayHeader`] towards the relay.
    RelayTo,
    /// [`RelayHeader`] from the relay.
    RelayFrom,
    /// A relayed datagram from another registry instance.
    Instance,
    /// Anything else: drop it.
    Unknown,
}

/// Classifies a datagram by its first bytes (and, for STUN, its magic cookie).
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(&MSG_HANDSHAKE_INIT) => Kind::HandshakeInit,
        Some(&MSG_HANDSHAKE_RESP) => Kind::HandshakeResp,
        Some(&MSG_COOKIE) => Kind::CookieReply,
        Some(&MSG_DATA) => Kind::Data,
        Some(&MSG_RELAY_TO) => Kind::RelayTo,
        Some(&MSG_RELAY_FROM) => Kind::RelayFrom,
        Some(&MSG_INSTANCE) => Kind::Instance,
        Some(_) if stun::looks_like_stun(buf) => Kind::Stun,
        _ => Kind::Unknown,
    }
}

/// Why a datagram was refused by a checked constructor.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The datagram is shorter or longer than its type allows.
    #[error("bad length {0}")]
    Length(usize),
    /// The type byte or the reserved bytes are wrong.
    #[error("bad type or reserved bytes")]
    Type,
}

fn check_prefix(buf: &[u8], ty: u8) -> Result<(), WireError> {
    if buf[0] != ty || buf[1..4] != [0, 0, 0] {
        return Err(WireError::Type);
    }
    Ok(())
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// A checked view of a handshake initiation.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeInit<'a>(&'a [u8]);

impl<'a> HandshakeInit<'a> {
    /// Checks length (with or without a cookie MAC), type and reserved
    /// bytes. After this no accessor panics.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() != INIT_LEN && buf.len() != INIT_COOKIE_LEN {
            return Err(WireError::Length(buf.len()));
        }
        check_prefix(buf, MSG_HANDSHAKE_INIT)?;
        Ok(Self(buf))
    }
    /// The initiator's session index.
    pub fn sender_index(&self) -> u32 {
        u32_at(self.0, 4)
    }
    /// The Noise message.
    pub fn noise(&self) -> &'a [u8] {
        &self.0[8..8 + NOISE_INIT_LEN]
    }
    /// The bytes the MAC covers.
    pub fn mac_covered(&self) -> &'a [u8] {
        &self.0[..INIT_LEN - MAC_LEN]
    }
    /// The MAC.
    pub fn mac(&self) -> &'a [u8] {
        &self.0[INIT_LEN - MAC_LEN..INIT_LEN]
    }
    /// The bytes the cookie MAC covers: the initiation up to and with `mac1`.
    pub fn cookie_covered(&self) -> &'a [u8] {
        &self.0[..INIT_LEN]
    }
    /// The cookie MAC, if the initiator had a cookie.
    pub fn cookie_mac(&self) -> Option<&'a [u8]> {
        self.0.get(INIT_LEN..INIT_COOKIE_LEN)
    }
}

/// A checked view of a cookie reply: a responder under load answered an
/// initiation with a cookie instead of a handshake.
#[derive(Clone, Copy, Debug)]
pub struct CookieReply<'a>(&'a [u8]);

impl<'a> CookieReply<'a> {
    /// Checks length, type and reserved bytes. After this no accessor panics.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() != COOKIE_REPLY_LEN {
            return Err(WireError::Length(buf.len()));
        }
        check_prefix(buf, MSG_COOKIE)?;
        Ok(Self(buf))
    }
    /// The initiator's session index, echoed from the initiation.
    pub fn receiver_index(&self) -> u32 {
        u32_at(self.0, 4)
    }
    /// The nonce the cookie is sealed with.
    pub fn nonce(&self) -> &'a [u8] {
        &self.0[8..8 + COOKIE_NONCE_LEN]
    }
    /// The sealed cookie and its tag.
    pub fn sealed(&self) -> &'a [u8] {
        &self.0[8 + COOKIE_NONCE_LEN..]
    }
}

/// A checked view of a handshake response.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeResp<'a>(&'a [u8]);

impl<'a> HandshakeResp<'a> {
    /// Checks length, type and reserved bytes. After this no accessor panics.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        if buf.len() != RESP_LEN {
            return Err(WireError::Length(buf.len()));
        }
        check_prefix(buf, MSG_HANDSHAKE_RESP)?;
        Ok(Self(buf))
    }
    /// The responder's session index.
    pub fn sender_index(&self) -> u32 {
        u32_at(self.0, 4)
    }
    /// The initiator's session index, echoed.
    pub fn receiver_index(&self) -> u32 {
        u32_at(self.0, 8)
    }
    /// The Noise message.
    pub fn noise(&self) -> &'a [u8] {
        &self.0[12..12 + NOISE_RESP_LEN]
    }
    /// The bytes the MAC covers.
    pub fn mac_covered(&self) -> &'a [u8] {
        &self.0[..RESP_LEN - MAC_LEN]
    }
    /// The MAC.
    pub fn mac(&self) -> &'a [u8] {
        &self.0[RESP_LEN - MAC_LEN..]
    }
}

/// The header of a data packet, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// The receiver's session index.
    pub receiver_index: u32,
    /// The sender's packet counter (the AEAD nonce).
    pub counter: u64,
}

impl DataHeader {
    /// Parses the header of a data datagram. A datagram shorter than header
    /// plus tag is refused.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() < DATA_OVERHEAD {
            return Err(WireError::Length(buf.len()));
        }
        check_prefix(buf, MSG_DATA)?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&buf[8..16]);
        Ok(DataHeader {
            receiver_index: u32_at(buf, 4),
            counter: u64::from_le_bytes(c),
        })
    }

    /// Writes the header into the first 16 bytes of `out`.
    pub fn emit(&self, out: &mut [u8; DATA_HEADER_LEN]) {
        out[0] = MSG_DATA;
        out[1..4].fill(0);
        out[4..8].copy_from_slice(&self.receiver_index.to_le_bytes());
        out[8..16].copy_from_slice(&self.counter.to_le_bytes());
    }
}

/// The header of a relayed datagram: who it is for (towards the relay) or
/// from (from the relay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayHeader {
    /// [`MSG_RELAY_TO`] or [`MSG_RELAY_FROM`].
    pub ty: u8,
    /// The other node.
    pub node: crate::identity::NodeId,
}

impl RelayHeader {
    /// Parses the header; the tunnel datagram is `buf[RELAY_HEADER_LEN..]`
    /// and must not be empty.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() <= RELAY_HEADER_LEN {
            return Err(WireError::Length(buf.len()));
        }
        let ty = buf[0];
        if !(ty == MSG_RELAY_TO || ty == MSG_RELAY_FROM) {
            return Err(WireError::Type);
        }
        check_prefix(buf, ty)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&buf[4..RELAY_HEADER_LEN]);
        Ok(RelayHeader {
            ty,
            node: crate::identity::NodeId(id),
        })
    }

    /// Writes the header into the first 20 bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) {
        out[0] = self.ty;
        out[1..4].fill(0);
        out[4..RELAY_HEADER_LEN].copy_from_slice(&self.node.0);
    }
}

/// Writes the fixed part of a handshake initiation; the caller fills the
/// Noise message and the MAC.
pub(crate) fn emit_init_prefix(out: &mut [u8; INIT_LEN], sender_index: u32) {
    out[0] = MSG_HANDSHAKE_INIT;
    out[1..4].fill(0);
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
}

/// Writes the fixed part of a handshake response.
pub(crate) fn emit_resp_prefix(out: &mut [u8; RESP_LEN], sender_index: u32, receiver_index: u32) {
    out[0] = MSG_HANDSHAKE_RESP;
    out[1..4].fill(0);
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
    out[8..12].copy_from_slice(&receiver_index.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_header_fixture() {
        let h = DataHeader {
            receiver_index: 0x0403_0201,
            counter: 0x0c0b_0a09_0807_0605,
        };
        let mut out = [0u8; DATA_HEADER_LEN];
        h.emit(&mut out);
        assert_eq!(
            out,
            [0xA4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            "fixed byte layout"
        );
        let mut pkt = out.to_vec();
        pkt.extend_from_slice(&[0u8; TAG_LEN]);
        assert_eq!(DataHeader::parse(&pkt), Ok(h));
        assert_eq!(
            DataHeader::parse(&pkt[..31]),
            Err(WireError::Length(31)),
            "shorter than header + tag"
        );
        pkt[2] = 1;
        assert_eq!(DataHeader::parse(&pkt), Err(WireError::Type));
    }

    #[test]
    fn handshake_fixtures() {
        let mut init = [0u8; INIT_LEN];
        emit_init_prefix(&mut init, 0xdead_beef);
        assert_eq!(init[..8], [0xA1, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
        let v = HandshakeInit::new_checked(&init).unwrap();
        assert_eq!(v.sender_index(), 0xdead_beef);
        assert_eq!(v.noise().len(), NOISE_INIT_LEN);
        assert_eq!(v.mac().len(), MAC_LEN);
        assert_eq!(INIT_LEN, 136);
        assert!(HandshakeInit::new_checked(&init[..135]).is_err());
        assert_eq!(v.cookie_mac(), None);
        let mut with_cookie = [0u8; INIT_COOKIE_LEN];
        with_cookie[..INIT_LEN].copy_from_slice(&init);
        with_cookie[INIT_LEN..].fill(9);
        let v = HandshakeInit::new_checked(&with_cookie).unwrap();
        assert_eq!(v.mac(), &init[INIT_LEN - MAC_LEN..]);
        assert_eq!(v.cookie_covered(), &init[..]);
        assert_eq!(v.cookie_mac(), Some(&[9u8; MAC_LEN][..]));
        assert!(HandshakeInit::new_checked(&with_cookie[..INIT_LEN + 1]).is_err());

        let mut reply = [0u8; COOKIE_REPLY_LEN];
        reply[0] = MSG_COOKIE;
        reply[4..8].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(classify(&reply), Kind::CookieReply);
        let v = CookieReply::new_checked(&reply).unwrap();
        assert_eq!(v.receiver_index(), 5);
        assert_eq!(v.nonce().len(), COOKIE_NONCE_LEN);
        assert_eq!(v.sealed().len(), COOKIE_LEN + TAG_LEN);
        assert_eq!(COOKIE_REPLY_LEN, 52);
        assert!(CookieReply::new_checked(&reply[..51]).is_err());

        let mut resp = [0u8; RESP_LEN];
        emit_resp_prefix(&mut resp, 7, 9);
        assert_eq!(resp[..12], [0xA2, 0, 0, 0, 7, 0, 0, 0, 9, 0, 0, 0]);
        let v = HandshakeResp::new_checked(&resp).unwrap();
        assert_eq!((v.sender_index(), v.receiver_index()), (7, 9));
        assert_eq!(RESP_LEN, 92);
        assert!(HandshakeResp::new_checked(&init).is_err());
    }

    #[test]
    fn relay_header_fixture() {
        let h = RelayHeader {
            ty: MSG_RELAY_TO,
            node: crate::identity::NodeId([7; 16]),
        };
        let mut out = vec![0u8; RELAY_HEADER_LEN + 1];
        h.emit(&mut out);
        assert_eq!(out[..4], [0xA5, 0, 0, 0]);
        assert_eq!(out[4..20], [7; 16]);
        assert_eq!(RelayHeader::parse(&out), Ok(h));
        assert_eq!(
            RelayHeader::parse(&out[..20]),
            Err(WireError::Length(20)),
            "empty payload"
        );
        out[0] = MSG_DATA;
        assert_eq!(RelayHeader::parse(&out), Err(WireError::Type));
        assert_eq!(classify(&[0xA5]), Kind::RelayTo);
        assert_eq!(classify(&[0xA6]), Kind::RelayFrom);
    }

    #[test]
    fn classify_by_first_bytes() {
        assert_eq!(classify(&[0xA1]), Kind::HandshakeInit);
        assert_eq!(classify(&[0xA2]), Kind::HandshakeResp);
        assert_eq!(classify(&[0xA4]), Kind::Data);
        assert_eq!(classify(&[]), Kind::Unknown);
        assert_eq!(classify(&[0x45, 0, 0]), Kind::Unknown);
        let req = crate::stun::binding_request(&[1; 12]);
        assert_eq!(classify(&req), Kind::Stun);
    }
}
