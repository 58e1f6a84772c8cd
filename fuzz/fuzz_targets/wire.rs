//! The tunnel datagram views: classification by first bytes, the checked
//! handshake views, the data header and the relay header. After a checked
//! constructor accepts a buffer, no accessor may panic, and every view must
//! agree with `classify`, with the fixed lengths of the format and (where
//! there is an emitter) with its own re-emitted bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::stun;
use pilot_proto::wire::{
    self, CookieReply, DataHeader, HandshakeInit, HandshakeResp, Kind, RelayHeader,
    DATA_HEADER_LEN, DATA_OVERHEAD, INIT_LEN, MAC_LEN, MSG_RELAY_FROM, MSG_RELAY_TO,
    NOISE_INIT_LEN, NOISE_RESP_LEN, RELAY_HEADER_LEN, RESP_LEN,
};

fuzz_target!(|data: &[u8]| check(data, 0));

/// Every view of `data`. The datagram inside a relayed one is checked the
/// same way, a few levels deep (a relay never nests them, but the parser
/// must not care).
fn check(data: &[u8], depth: usize) {
    let kind = wire::classify(data);
    if kind == Kind::Stun {
        assert!(
            stun::looks_like_stun(data),
            "classified as STUN without a STUN header"
        );
    }

    if let Ok(init) = HandshakeInit::new_checked(data) {
        assert_eq!(kind, Kind::HandshakeInit);
        assert_eq!(init.sender_index().to_le_bytes(), data[4..8]);
        assert_eq!(init.noise(), &data[8..8 + NOISE_INIT_LEN]);
        assert_eq!(init.mac_covered(), &data[..INIT_LEN - MAC_LEN]);
        assert_eq!(init.mac(), &data[INIT_LEN - MAC_LEN..INIT_LEN]);
        assert_eq!(
            init.cookie_mac(),
            data.get(INIT_LEN..).filter(|m| !m.is_empty())
        );
    }

    if let Ok(reply) = CookieReply::new_checked(data) {
        assert_eq!(kind, Kind::CookieReply);
        assert_eq!(reply.receiver_index().to_le_bytes(), data[4..8]);
        assert_eq!(reply.nonce().len() + reply.sealed().len() + 8, data.len());
    }

    if let Ok(resp) = HandshakeResp::new_checked(data) {
        assert_eq!(kind, Kind::HandshakeResp);
        assert_eq!(resp.sender_index().to_le_bytes(), data[4..8]);
        assert_eq!(resp.receiver_index().to_le_bytes(), data[8..12]);
        assert_eq!(resp.noise(), &data[12..12 + NOISE_RESP_LEN]);
        assert_eq!(resp.mac_covered(), &data[..RESP_LEN - MAC_LEN]);
        assert_eq!(resp.mac(), &data[RESP_LEN - MAC_LEN..]);
    }

    if let Ok(header) = DataHeader::parse(data) {
        assert_eq!(kind, Kind::Data);
        assert!(data.len() >= DATA_OVERHEAD);
        // Parse and emit are inverses on the 16 header bytes.
        let mut out = [0u8; DATA_HEADER_LEN];
        header.emit(&mut out);
        assert_eq!(out[..], data[..DATA_HEADER_LEN]);
    }

    if let Ok(relay) = RelayHeader::parse(data) {
        let want = match relay.ty {
            MSG_RELAY_TO => Kind::RelayTo,
            MSG_RELAY_FROM => Kind::RelayFrom,
            other => panic!("relay header with type {other:#04x}"),
        };
        assert_eq!(kind, want);
        assert!(data.len() > RELAY_HEADER_LEN, "empty relayed datagram");
        let mut out = [0u8; RELAY_HEADER_LEN];
        relay.emit(&mut out);
        assert_eq!(out[..], data[..RELAY_HEADER_LEN]);
        if depth < 4 {
            check(&data[RELAY_HEADER_LEN..], depth + 1);
        }
    }
}
