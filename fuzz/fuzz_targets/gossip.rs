//! Gossip from a trusted peer (in-tunnel control messages, `CTL_GOSSIP`):
//! decoding, and every rule of the book that takes them.
//!
//! The whole input is read as one message from a peer, then handed to a
//! book that trusts every node: whatever it takes must be well signed, a
//! record it holds must be one it was given, and an answer to "where is"
//! must carry a proof that names the asker.

#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pilot_proto::gossip::{Book, Gossip, PassAction};
use pilot_proto::identity::Identity;

fuzz_target!(|input: &[u8]| {
    // The seeds' two nodes (fuzz/examples/seeds.rs): alpha sends to beta.
    let peer = Identity::from_bytes(&[1; 64]).node_id();
    let me = Identity::from_bytes(&[2; 64]).node_id();
    let mut book = Book::new(me);
    let Ok(msg) = book.read(&peer, input, Instant::now()) else {
        return;
    };
    // What decodes encodes to a message that decodes to the same thing
    // (postcard reads a varint with redundant bytes, so the bytes may
    // differ; signatures are checked over the re-encoding, so such a
    // message verifies exactly when its canonical form does).
    let again = msg.to_control().expect("a message that decoded fits again");
    assert_eq!(Gossip::from_control(&again).as_ref(), Ok(&msg));
    match msg {
        Gossip::Endpoints(rec) => {
            if let Ok(node) = book.accept(rec.clone(), |_| true) {
                assert!(rec.verify());
                assert_ne!(node, me);
                assert_eq!(book.record(&node), Some(&rec));
            }
        }
        Gossip::Where { proof } => {
            if let Ok(rec) = book.answer(&peer, &proof) {
                // The book is empty: nothing can be answered.
                panic!("answered {rec:?} from an empty book");
            }
        }
        Gossip::Pass(st) => match book.pass(&peer, &st, |_| true) {
            Ok(PassAction::Apply) => {
                assert!(st.verify());
                assert_eq!(st.body.to, me);
                assert!(!st.body.kind.approves());
            }
            Ok(PassAction::Forward(to)) => {
                assert!(st.verify());
                assert_eq!(st.body.from.node_id(), peer);
                assert_eq!(to, st.body.to);
                assert!(!st.body.kind.approves());
            }
            Err(_) => {}
        },
        // Checked by the node against its rules (the fleet target reads
        // revocations).
        Gossip::OwnerRevoked(bytes) => {
            let _ = pilot_proto::cert::Revocation::from_bytes(&bytes);
        }
    }
});
