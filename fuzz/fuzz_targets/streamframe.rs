//! The TCP relay's frame stream (`pilot_proto::streamframe`): whatever the
//! stream carries, read in whatever pieces, the deframer never panics, never
//! yields a frame that is empty or over `MAX_FRAME`, and what it yields is
//! exactly the stream's own frames, in order, up to the first error.
//!
//! Input layout: byte 0 picks the read size (1..=256), the rest is the
//! stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pilot_proto::streamframe::{self, Deframer, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let mut d = Deframer::new();
    let mut frames: Vec<Vec<u8>> = vec![];
    let mut failed = false;
    'feed: for chunk in stream.chunks(step) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let spare = d.spare();
            assert!(!spare.is_empty(), "no room after the frames were taken");
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            d.filled(n);
            rest = &rest[n..];
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        assert!(!f.is_empty() && f.len() <= MAX_FRAME);
                        frames.push(f.to_vec());
                    }
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break 'feed;
                    }
                }
            }
        }
    }
    // Encoding the frames again gives the start of the stream.
    let mut again = vec![];
    for f in &frames {
        streamframe::encode(f, &mut again).expect("a frame the deframer yielded");
    }
    assert_eq!(&stream[..again.len()], &again[..]);
    if !failed {
        assert!(stream.len() - again.len() < streamframe::PREFIX + MAX_FRAME);
    }
});
