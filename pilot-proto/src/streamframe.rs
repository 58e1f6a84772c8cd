//! Datagrams over a byte stream, for the TCP relay: each datagram travels
//! as a 2-byte big-endian length and then that many bytes. The datagrams
//! are the ones that would have gone over UDP (sealed tunnel packets,
//! handshakes, sealed control messages, STUN), so the stream adds no
//! meaning of its own. Nothing read from the stream can make this panic: a
//! frame that is empty or longer than [`MAX_FRAME`] is an error, after
//! which the stream is out of step and must be closed.

/// The largest datagram carried in one frame. Tunnel datagrams are sized
/// for a path MTU (at most a jumbo frame), control messages are smaller;
/// a larger length can only be garbage or an attack.
pub const MAX_FRAME: usize = 9216;
/// Bytes of the length prefix.
pub const PREFIX: usize = 2;

/// A frame could not be made or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame of length zero (no datagram is empty).
    #[error("an empty frame on the TCP relay stream")]
    Empty,
    /// Longer than [`MAX_FRAME`].
    #[error("a frame of {0} bytes on the TCP relay stream (at most {MAX_FRAME})")]
    TooLarge(usize),
}

/// Appends `datagram` as one frame to `out`.
pub fn encode(datagram: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    match datagram.len() {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME => Err(FrameError::TooLarge(n)),
        n => {
            // n <= MAX_FRAME < 65536: fits the prefix.
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(datagram);
            Ok(())
        }
    }
}

/// Reassembles frames from stream reads of any size: read into
/// [`Deframer::spare`], say how much with [`Deframer::filled`], then take
/// frames with [`Deframer::next_frame`] until it returns `None`. The buffer
/// holds one whole frame at most and never grows.
pub struct Deframer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// An empty deframer.
    pub fn new() -> Self {
        Deframer {
            buf: vec![0u8; 2 * (PREFIX + MAX_FRAME)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Where the next read goes (never empty: a frame is always either
    /// complete or has room to become so).
    pub fn spare(&mut self) -> &mut [u8] {
        // Move the unread bytes to the front once the tail may be too short
        // for a whole frame.
        if self.start > 0 && self.buf.len() - self.start < PREFIX + MAX_FRAME {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Deframer::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole frame's datagram, if one is in; an error if the
    /// stream carries something that is not a frame.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let have = &self.buf[self.start..self.end];
        let Some(prefix) = have.first_chunk::<PREFIX>() else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes(*prefix));
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if have.len() < PREFIX + len {
            return Ok(None);
        }
        let at = self.start + PREFIX;
        self.start = at + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // The frame's bytes stay in place until the next `spare`.
        }
        Ok(Some(&self.buf[at..at + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in reads of `step` bytes; returns the frames, or the
    /// first error.
    fn feed(stream: &[u8], step: usize) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut d = Deframer::new();
        let mut out = vec![];
        for chunk in stream.chunks(step) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let spare = d.spare();
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                d.filled(n);
                rest = &rest[n..];
                while let Some(f) = d.next_frame()? {
                    out.push(f.to_vec());
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let datagrams: Vec<Vec<u8>> = (1..40usize)
            .map(|i| (0..i * 97 % MAX_FRAME + 1).map(|b| (b * i) as u8).collect())
            .chain([vec![7u8; MAX_FRAME], vec![1]])
            .collect();
        let mut stream = vec![];
        for d in &datagrams {
            encode(d, &mut stream).unwrap();
        }
        assert_eq!(&stream[..2], &[0, 98], "big-endian length");
        for step in [1, 2, 3, 7, 1000, 9218, stream.len()] {
            assert_eq!(feed(&stream, step).unwrap(), datagrams, "reads of {step}");
        }
    }

    #[test]
    fn a_partial_frame_waits_for_the_rest() {
        let mut stream = vec![];
        encode(b"hello", &mut stream).unwrap();
        let mut d = Deframer::new();
        d.spare()[..4].copy_from_slice(&stream[..4]);
        d.filled(4);
        assert_eq!(d.next_frame(), Ok(None));
        d.spare()[..3].copy_from_slice(&stream[4..]);
        d.filled(3);
        assert_eq!(d.next_frame(), Ok(Some(&b"hello"[..])));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn oversize_empty_and_garbage_are_errors_not_panics() {
        let mut out = vec![];
        assert_eq!(
            encode(&vec![0; MAX_FRAME + 1], &mut out),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        assert_eq!(encode(&[], &mut out), Err(FrameError::Empty));
        assert!(out.is_empty());
        assert_eq!(
            feed(&[0xff, 0xff, 1, 2], 4),
            Err(FrameError::TooLarge(65535))
        );
        assert_eq!(feed(&[0, 0, 1], 3), Err(FrameError::Empty));
        // A TLS record or an HTTP request is not a frame stream.
        assert!(feed(b"GET / HTTP/1.1\r\n\r\n", 5).is_err());
        // Every two-byte prefix is handled.
        for p in 0..=u16::MAX {
            let _ = feed(&p.to_be_bytes(), 2);
        }
    }
}
