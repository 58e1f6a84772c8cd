//! Outgoing tunnel frames, written into the caller's buffer: a sealed data
//! or control datagram, sent straight or behind a relay header, and a raw
//! datagram (a handshake) wrapped for the relay.
//!
//! ```text
//! direct   | data header (16) | ciphertext | tag (16) |
//! relayed  | relay header (20, MSG_RELAY_TO, peer id) | data header | ciphertext | tag |
//! ```
//! Every sender (the data plane, the control side, the registry link and the
//! registry itself) builds its datagrams here, so the layout is written once.

use crate::identity::NodeId;
use crate::session::{SealError, Sender};
use crate::wire::{RelayHeader, DATA_HEADER_LEN, DATA_OVERHEAD, MSG_RELAY_TO, RELAY_HEADER_LEN};

/// Bytes a frame carrying `payload_len` bytes takes on the wire.
pub fn sealed_len(relay_to: Option<NodeId>, payload_len: usize) -> usize {
    relay_prefix(relay_to) + DATA_OVERHEAD + payload_len
}

fn relay_prefix(relay_to: Option<NodeId>) -> usize {
    if relay_to.is_some() {
        RELAY_HEADER_LEN
    } else {
        0
    }
}

/// Seals `payload` with `sender` into `out`, behind a relay header naming
/// `relay_to` when the frame goes through the relay. Returns the frame's
/// length (`out[..len]` is the datagram). `out` must hold
/// [`sealed_len`] bytes; nothing is written when it does not.
pub fn seal_into(
    out: &mut [u8],
    sender: &Sender,
    relay_to: Option<NodeId>,
    payload: &[u8],
) -> Result<usize, SealError> {
    let pre = relay_prefix(relay_to);
    if out.len() < sealed_len(relay_to, payload.len()) {
        return Err(SealError::Buffer);
    }
    if let Some(node) = relay_to {
        RelayHeader {
            ty: MSG_RELAY_TO,
            node,
        }
        .emit(out);
    }
    let body = &mut out[pre..];
    body[DATA_HEADER_LEN..DATA_HEADER_LEN + payload.len()].copy_from_slice(payload);
    Ok(pre + sender.seal(body, payload.len())?)
}

/// Like [`seal_into`], appending the frame to `out` (a batch buffer).
/// Returns the frame's length; on an error `out` is left as it was.
pub fn push_sealed(
    out: &mut Vec<u8>,
    sender: &Sender,
    relay_to: Option<NodeId>,
    payload: &[u8],
) -> Result<usize, SealError> {
    let start = out.len();
    out.resize(start + sealed_len(relay_to, payload.len()), 0);
    match seal_into(&mut out[start..], sender, relay_to, payload) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(n)
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Writes a datagram that needs no sealing (a handshake message) behind a
/// relay header for `to`. Returns the frame's length.
pub fn wrap_for_relay(out: &mut [u8], to: NodeId, datagram: &[u8]) -> Result<usize, SealError> {
    let total = RELAY_HEADER_LEN + datagram.len();
    if out.len() < total {
        return Err(SealError::Buffer);
    }
    RelayHeader {
        ty: MSG_RELAY_TO,
        node: to,
    }
    .emit(out);
    out[RELAY_HEADER_LEN..total].copy_from_slice(datagram);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{CipherSuite, Session};
    use crate::wire::{DataHeader, TAG_LEN};
    use std::time::Instant;

    fn pair() -> (Session, Session) {
        let now = Instant::now();
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let a = Session::new(CipherSuite::Aes256Gcm, 7, 9, &k1, &k2, true, now);
        let b = Session::new(CipherSuite::Aes256Gcm, 9, 7, &k2, &k1, false, now);
        (a, b)
    }

    #[test]
    fn direct_frame_opens_on_the_other_side() {
        let (a, b) = pair();
        let mut out = [0u8; 64];
        let n = seal_into(&mut out, &a.sender, None, b"hello").unwrap();
        assert_eq!(n, sealed_len(None, 5));
        assert_eq!(n, DATA_HEADER_LEN + 5 + TAG_LEN);
        let h = DataHeader::parse(&out[..n]).unwrap();
        assert_eq!((h.receiver_index, h.counter), (9, 0));
        let m = b.open(&mut out[..n]).unwrap();
        assert_eq!(&out[DATA_HEADER_LEN..DATA_HEADER_LEN + m], b"hello");
    }

    #[test]
    fn relayed_frame_carries_the_peer_then_the_sealed_datagram() {
        let (a, b) = pair();
        let peer = NodeId([5; 16]);
        let mut out = vec![0xffu8; 3];
        let n = push_sealed(&mut out, &a.sender, Some(peer), b"xy").unwrap();
        assert_eq!(n, RELAY_HEADER_LEN + DATA_OVERHEAD + 2);
        assert_eq!(out.len(), 3 + n, "appended after what was there");
        assert_eq!(out[..3], [0xff; 3]);
        let frame = &mut out[3..];
        assert_eq!(
            RelayHeader::parse(frame).unwrap(),
            RelayHeader {
                ty: MSG_RELAY_TO,
                node: peer
            }
        );
        let m = b.open(&mut frame[RELAY_HEADER_LEN..]).unwrap();
        assert_eq!(m, 2);
    }

    #[test]
    fn empty_payload_is_a_keepalive() {
        let (a, b) = pair();
        let mut out = vec![];
        let n = push_sealed(&mut out, &a.sender, None, &[]).unwrap();
        assert_eq!(n, DATA_OVERHEAD);
        assert_eq!(b.open(&mut out).unwrap(), 0);
    }

    #[test]
    fn short_buffer_is_refused_and_untouched() {
        let (a, _) = pair();
        let mut out = [0u8; 20];
        assert_eq!(
            seal_into(&mut out, &a.sender, None, b"abcd"),
            Err(SealError::Buffer)
        );
        assert_eq!(out, [0u8; 20]);
        assert_eq!(a.sender.sent(), 0, "no counter spent on a refused frame");
        assert_eq!(
            wrap_for_relay(&mut out, NodeId([1; 16]), b"x"),
            Err(SealError::Buffer)
        );
    }

    #[test]
    fn handshake_wrapped_for_the_relay() {
        let mut out = [0u8; 32];
        let n = wrap_for_relay(&mut out, NodeId([3; 16]), &[0xA1, 0, 0, 0, 9]).unwrap();
        assert_eq!(n, RELAY_HEADER_LEN + 5);
        assert_eq!(out[..4], [0xA5, 0, 0, 0]);
        assert_eq!(out[4..20], [3; 16]);
        assert_eq!(out[20..25], [0xA1, 0, 0, 0, 9]);
    }
}
