//! Text armour for signed binary objects (owner certificates, revocations,
//! succession statements): the bytes as hex lines between BEGIN and END
//! markers, so a file survives copy and paste, e-mail and `cat`.
//!
//! ```text
//! # node 5d1c…  tags build,ci  expires 2025-07-01   <- comments, never trusted
//! -----BEGIN PILOT-TUN CERTIFICATE-----
//! 01a3f0…                                            <- 64 hex digits a line
//! -----END PILOT-TUN CERTIFICATE-----
//! ```
//!
//! Lines outside the markers are ignored when reading: only the armoured
//! bytes count, and the object inside carries its own signature.

use std::fmt::Write;

use crate::hex;

/// Hex digits per armoured line.
const LINE: usize = 64;

/// Largest object the armour decodes, so a hostile file cannot make the
/// reader allocate without bound. Every object here is far smaller.
pub const MAX_ARMORED_BYTES: usize = 16 * 1024;

/// Armoured text could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArmorError {
    /// No `-----BEGIN PILOT-TUN <label>-----` line.
    #[error("no '-----BEGIN PILOT-TUN {0}-----' line: not a {0} file")]
    NoBegin(&'static str),
    /// A BEGIN line without its END line.
    #[error("the {0} block has no END line (truncated file?)")]
    NoEnd(&'static str),
    /// Two blocks in one text.
    #[error("more than one {0} block in one file")]
    Several(&'static str),
    /// A line inside the block is not hex.
    #[error("line {0} of the {1} block is not hexadecimal")]
    NotHex(usize, &'static str),
    /// More bytes than [`MAX_ARMORED_BYTES`].
    #[error("the {0} block is too large")]
    TooLarge(&'static str),
}

fn begin(label: &str) -> String {
    format!("-----BEGIN PILOT-TUN {label}-----")
}

fn end(label: &str) -> String {
    format!("-----END PILOT-TUN {label}-----")
}

/// Armours `bytes` under `label` (upper case, e.g. `CERTIFICATE`), with
/// `comments` as `# ` lines above the block for the human reader.
pub fn encode(label: &str, comments: &[String], bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in comments {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# {c}");
    }
    out.push_str(&begin(label));
    out.push('\n');
    let text = hex::encode(bytes);
    // Hex is ASCII, so every chunk boundary is a char boundary.
    for chunk in text.as_bytes().chunks(LINE) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&end(label));
    out.push('\n');
    out
}

/// The bytes armoured under `label` in `text`; surrounding lines are ignored.
pub fn decode(label: &'static str, text: &str) -> Result<Vec<u8>, ArmorError> {
    let (b, e) = (begin(label), end(label));
    let mut lines = text.lines().map(str::trim);
    if !lines.by_ref().any(|l| l == b) {
        return Err(ArmorError::NoBegin(label));
    }
    let mut out = Vec::new();
    let mut closed = false;
    for (n, line) in lines.by_ref().enumerate() {
        if line == e {
            closed = true;
            break;
        }
        let bytes = decode_hex(line).ok_or(ArmorError::NotHex(n + 1, label))?;
        if out.len() + bytes.len() > MAX_ARMORED_BYTES {
            return Err(ArmorError::TooLarge(label));
        }
        out.extend_from_slice(&bytes);
    }
    if !closed {
        return Err(ArmorError::NoEnd(label));
    }
    if lines.any(|l| l == b) {
        return Err(ArmorError::Several(label));
    }
    Ok(out)
}

/// Decodes hex of any even length (either case); `None` on anything else.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks_exact(2)
        .map(|pair| {
            // A pair of ASCII hex digits is valid UTF-8; anything else fails
            // the decode below.
            let text = std::str::from_utf8(pair).ok()?;
            hex::decode_array::<1>(text).map(|[b]| b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_comments_and_long_payload() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let text = encode("THING", &["made for a test".into()], &bytes);
        assert!(text.starts_with("# made for a test\n-----BEGIN PILOT-TUN THING-----\n"));
        assert!(text.lines().all(|l| l.len() <= LINE || l.starts_with('-')));
        assert_eq!(decode("THING", &text).unwrap(), bytes);
        // Surrounding noise and CRLF line ends are fine.
        let noisy = format!(
            "hello\r\n{}\r\ntrailing words\r\n",
            text.replace('\n', "\r\n")
        );
        assert_eq!(decode("THING", &noisy).unwrap(), bytes);
    }

    #[test]
    fn every_malformed_block_is_refused() {
        let good = encode("THING", &[], &[1, 2, 3]);
        assert_eq!(decode("OTHER", &good), Err(ArmorError::NoBegin("OTHER")));
        let no_end = good.replace("-----END PILOT-TUN THING-----\n", "");
        assert_eq!(decode("THING", &no_end), Err(ArmorError::NoEnd("THING")));
        let odd = good.replace("010203", "01020");
        assert_eq!(decode("THING", &odd), Err(ArmorError::NotHex(1, "THING")));
        let junk = good.replace("010203", "01zz03");
        assert_eq!(decode("THING", &junk), Err(ArmorError::NotHex(1, "THING")));
        let twice = format!("{good}{good}");
        assert_eq!(decode("THING", &twice), Err(ArmorError::Several("THING")));
        let huge = encode("THING", &[], &vec![0; MAX_ARMORED_BYTES + 1]);
        assert_eq!(decode("THING", &huge), Err(ArmorError::TooLarge("THING")));
        // Non-ASCII never panics.
        let utf = good.replace("010203", "0é0203");
        assert!(decode("THING", &utf).is_err());
    }

    #[test]
    fn hex_of_any_length() {
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("00Ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("+1"), None);
        assert_eq!(decode_hex("éé"), None);
    }
}
