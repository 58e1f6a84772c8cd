//! The tunnel datagram views: classification by first bytes, the checked
//! handshake views and the data header. After a checked constructor accepts
//! a buffer, no accessor may panic, and every view must agree with
//! `classify` and with the fixed lengths of the format.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::stun;
use pilot_proto::wire::{
    self, DataHeader, HandshakeInit, HandshakeResp, Kind, DATA_HEADER_LEN, DATA_OVERHEAD, INIT_LEN,
    MAC_LEN, NOISE_INIT_LEN, NOISE_RESP_LEN, RESP_LEN,
};

fuzz_target!(|data: &[u8]| {
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
        assert_eq!(init.mac(), &data[INIT_LEN - MAC_LEN..]);
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
});
