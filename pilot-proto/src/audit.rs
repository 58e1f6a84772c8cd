//! The audit log: an append-only file of JSON lines in which every line
//! carries the SHA-256 of the line before it, and checkpoint lines carry the
//! node key's signature, so any change, deletion or reordering of what was
//! written shows, and names its line.
//!
//! ```text
//! {"seq":0,"time":1750000000,"kind":"rule-add","details":{...},"prev":"00…00"}
//! {"seq":1,"time":1750000003,"kind":"approve","details":{...},"prev":"<sha256 of line 0>"}
//! {"seq":2,"time":1750000009,"kind":"checkpoint","details":{},"prev":"<sha256 of line 1>","sig":"<ed25519>"}
//! ```
//!
//! - The hash covers the exact bytes of the previous line (without its
//!   newline), so nothing is re-serialised to check it.
//! - A checkpoint's signature covers its own exact bytes up to the `sig`
//!   field (with a closing brace), and through `prev` the whole chain before
//!   it. The [`Writer`] adds one every [`CHECKPOINT_EVERY`] entries, and the
//!   daemon asks for one at shutdown.
//! - What a signature cannot protect is the unsigned tail after the last
//!   checkpoint, and a cut of whole lines at the end; [`verify`] reports the
//!   first as "unsigned" and catches the second when given a head the
//!   operator kept elsewhere ([`VerifyOptions::expect_head`]).
//! - Rotation: a new file simply continues the chain (its first line links
//!   to the previous file's last line), so the files verify in order as one
//!   log, and a later file verifies alone from a known link
//!   ([`VerifyOptions::after`]).
//!
//! This module only makes and checks bytes; writing them is the caller's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hex;
use crate::identity::{self, Identity};

/// Entries between two checkpoints the writer makes by itself.
pub const CHECKPOINT_EVERY: u64 = 100;
/// The kind of checkpoint lines (reserved: no other entry may use it).
pub const CHECKPOINT: &str = "checkpoint";
/// Longest line, in bytes (without the newline).
pub const MAX_LINE: usize = 64 * 1024;

const DOMAIN: &[u8] = b"pilot-tun/v1/audit-checkpoint";
/// `,"sig":"` + 128 hex digits + `"}`.
const SIG_SUFFIX_LEN: usize = 8 + 128 + 2;

/// SHA-256 of a line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, line);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A point in the chain: a line's sequence number and hash. The head of a
/// checkpoint line is what `audit head` prints and `--expect-head` takes,
/// as `<seq>:<64 hex digits>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Head {
    /// The line's sequence number.
    pub seq: u64,
    /// SHA-256 of the line.
    pub hash: [u8; 32],
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(&self.hash))
    }
}

/// A string is not a head.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an audit head (expected <seq>:<64 hex digits>, as 'audit head' prints)")]
pub struct BadHead;

impl FromStr for Head {
    type Err = BadHead;
    fn from_str(s: &str) -> Result<Self, BadHead> {
        let (seq, hash) = s.trim().split_once(':').ok_or(BadHead)?;
        Ok(Head {
            seq: seq.parse().map_err(|_| BadHead)?,
            hash: hex::decode_array(hash).ok_or(BadHead)?,
        })
    }
}

/// One line as written.
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    time: u64,
    kind: &'a str,
    details: &'a serde_json::Value,
    prev: &'a str,
}

/// One line as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    seq: u64,
    time: u64,
    kind: String,
    details: serde_json::Value,
    prev: String,
    #[serde(default)]
    sig: Option<String>,
}

/// One entry of the log, for `audit show`.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Its position in the chain, from 0.
    pub seq: u64,
    /// Unix time it was written.
    pub time: u64,
    /// What happened (`approve`, `policy-decision`, …, or `checkpoint`).
    pub kind: String,
    /// The facts, as the writer gave them.
    pub details: serde_json::Value,
    /// SHA-256 of the line before.
    pub prev: [u8; 32],
    /// The checkpoint signature, if it is one (not yet checked).
    pub sig: Option<Vec<u8>>,
}

/// Why one line is not a well-formed entry.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not a JSON object with exactly the entry's fields.
    #[error("not a log entry: {0}")]
    Json(#[from] serde_json::Error),
    /// `prev` or `sig` is not hex of the right length.
    #[error("'{0}' is not a hex hash or signature")]
    Hex(&'static str),
}

/// Parses one line (without its newline); checks its form, not its place.
pub fn parse_line(line: &[u8]) -> Result<Entry, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    let l: LineIn = serde_json::from_slice(line)?;
    let prev = lower_hex::<32>(&l.prev).ok_or(LineError::Hex("prev"))?;
    let sig = match l.sig {
        Some(s) => Some(lower_hex::<64>(&s).ok_or(LineError::Hex("sig"))?),
        None => None,
    };
    Ok(Entry {
        seq: l.seq,
        time: l.time,
        kind: l.kind,
        details: l.details,
        prev,
        sig: sig.map(|s| s.to_vec()),
    })
}

/// Hex as the writer writes it: lower case only, so that a hash or a
/// signature has exactly one spelling and no byte of a line can change
/// without changing what it says.
fn lower_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    hex::decode_array(s)
}

/// The bytes a checkpoint's signature covers: the line without its `sig`
/// field, closed again. `None` if the line does not end in a `sig` field of
/// the expected size.
fn signed_part(line: &[u8]) -> Option<Vec<u8>> {
    let cut = line.len().checked_sub(SIG_SUFFIX_LEN)?;
    if !line[cut..].starts_with(br#","sig":""#) || !line.ends_with(br#""}"#) {
        return None;
    }
    let mut msg = line[..cut].to_vec();
    msg.push(b'}');
    Some(msg)
}

/// An entry could not be appended.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// [`CHECKPOINT`] is the writer's own kind.
    #[error("'checkpoint' entries are made by the writer itself")]
    ReservedKind,
    /// The line would exceed [`MAX_LINE`].
    #[error("entry too large for one log line ({0} bytes)")]
    TooLong(usize),
}

/// Makes the bytes to append: lines chained to the last one, and the
/// checkpoints. Pure: the caller writes what it returns, in order.
#[derive(Clone, Debug)]
pub struct Writer {
    next_seq: u64,
    prev: [u8; 32],
    since_checkpoint: u64,
    every: u64,
    signed: Option<Head>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

/// The last line of an existing log could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// A complete line does not parse.
    #[error("line {line} of the existing log is not an entry: {source}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: LineError,
    },
}

/// A writer picked up from an existing log.
#[derive(Debug)]
pub struct Resumed {
    /// Continues the chain.
    pub writer: Writer,
    /// Bytes of the log up to its last complete line. Anything after it
    /// (a line cut by a crash) must be truncated before appending, and the
    /// loss recorded.
    pub complete_len: usize,
}

impl Writer {
    /// A writer for a new log (its first line is seq 0, linked to zeros).
    pub fn new() -> Self {
        Writer {
            next_seq: 0,
            prev: [0; 32],
            since_checkpoint: 0,
            every: CHECKPOINT_EVERY,
            signed: None,
        }
    }

    /// Checkpoints every `n` entries instead of [`CHECKPOINT_EVERY`].
    pub fn checkpoint_every(mut self, n: u64) -> Self {
        self.every = n.max(1);
        self
    }

    /// Continues the log whose bytes (the newest file; earlier files are
    /// not needed) are `log`. Reads from the end back to the last
    /// checkpoint; the lines are not verified here ([`verify`] does that).
    pub fn resume(log: &[u8]) -> Result<Resumed, ResumeError> {
        let complete_len = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let lines: Vec<&[u8]> = log[..complete_len]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let mut w = Writer::new();
        let Some(last) = lines.last() else {
            return Ok(Resumed {
                writer: w,
                complete_len,
            });
        };
        let parse = |i: usize| {
            parse_line(lines[i]).map_err(|source| ResumeError::Line {
                line: i + 1,
                source,
            })
        };
        let e = parse(lines.len() - 1)?;
        // A log at u64::MAX cannot continue: the next line repeats the
        // number and fails verification rather than wrapping to 0.
        w.next_seq = e.seq.saturating_add(1);
        w.prev = line_hash(last);
        for i in (0..lines.len()).rev() {
            let e = parse(i)?;
            if e.kind == CHECKPOINT {
                w.signed = Some(Head {
                    seq: e.seq,
                    hash: line_hash(lines[i]),
                });
                break;
            }
            w.since_checkpoint += 1;
        }
        Ok(Resumed {
            writer: w,
            complete_len,
        })
    }

    fn line(&mut self, time: u64, kind: &str, details: &serde_json::Value) -> Vec<u8> {
        let prev = hex::encode(&self.prev);
        let out = LineOut {
            seq: self.next_seq,
            time,
            kind,
            details,
            prev: &prev,
        };
        // Serialising a struct of plain fields and a JSON value into a Vec
        // cannot fail.
        serde_json::to_vec(&out).expect("serialise audit line")
    }

    fn push(&mut self, line: &[u8], out: &mut Vec<u8>) {
        self.prev = line_hash(line);
        self.next_seq = self.next_seq.saturating_add(1);
        out.extend_from_slice(line);
        out.push(b'\n');
    }

    /// The line(s) recording one event at `time`: the entry, and a
    /// checkpoint signed by `signer` when one is due.
    pub fn append(
        &mut self,
        signer: &Identity,
        time: u64,
        kind: &str,
        details: &serde_json::Value,
    ) -> Result<Vec<u8>, AppendError> {
        if kind == CHECKPOINT {
            return Err(AppendError::ReservedKind);
        }
        let line = self.line(time, kind, details);
        if line.len() > MAX_LINE {
            return Err(AppendError::TooLong(line.len()));
        }
        let mut out = Vec::with_capacity(line.len() + 400);
        self.push(&line, &mut out);
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.every {
            out.extend(self.checkpoint(signer, time));
        }
        Ok(out)
    }

    /// A checkpoint line signed by `signer` (at shutdown, or on demand).
    pub fn checkpoint(&mut self, signer: &Identity, time: u64) -> Vec<u8> {
        let unsigned = self.line(time, CHECKPOINT, &serde_json::json!({}));
        let sig = signer.sign(DOMAIN, &unsigned);
        let mut line = unsigned;
        line.pop(); // the closing brace, put back after the signature
        line.extend_from_slice(br#","sig":""#);
        line.extend_from_slice(hex::encode(&sig).as_bytes());
        line.extend_from_slice(br#""}"#);
        let mut out = Vec::with_capacity(line.len() + 1);
        self.push(&line, &mut out);
        self.since_checkpoint = 0;
        self.signed = self.last();
        out
    }

    /// The last line written (seq and hash); `None` for an empty log.
    pub fn last(&self) -> Option<Head> {
        self.next_seq.checked_sub(1).map(|seq| Head {
            seq,
            hash: self.prev,
        })
    }

    /// The last checkpoint written: what `audit head` prints.
    pub fn signed_head(&self) -> Option<Head> {
        self.signed
    }
}

/// What to check beyond the chain itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions {
    /// A head kept elsewhere: the line with its seq must be there, with its
    /// hash, so nothing up to it was removed or rewritten.
    pub expect_head: Option<Head>,
    /// Verify a later file alone: its first line must link to this (the
    /// last line of the file before). Without it, the log must start at its
    /// genesis (seq 0, linked to zeros).
    pub after: Option<Head>,
}

/// A log that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Lines read (entries and checkpoints).
    pub lines: u64,
    /// Of which checkpoints.
    pub checkpoints: u64,
    /// The last line.
    pub last: Option<Head>,
    /// The last checkpoint: everything up to it is signed.
    pub signed_head: Option<Head>,
    /// Index (in the keys given) of the key that signed it.
    pub signed_by: Option<usize>,
    /// Entries after the last checkpoint: chained, but not signed; an
    /// intruder could have rewritten these consistently.
    pub unsigned_trailing: u64,
}

/// The first line that does not verify, and why.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct BadLine {
    /// 1-based line number (over all input given, files in order).
    pub line: usize,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a line.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Not a well-formed entry.
    #[error(transparent)]
    Malformed(#[from] LineError),
    /// An empty line.
    #[error("empty line")]
    Empty,
    /// The input does not end with a newline: a line was cut.
    #[error("incomplete last line (cut short, or still being written)")]
    Incomplete,
    /// The first line is not the genesis (or does not follow `after`).
    #[error("the log does not start at seq {expected} linked to {link} (earlier lines removed?)")]
    Start {
        /// The seq expected first.
        expected: u64,
        /// The expected link, in hex.
        link: String,
    },
    /// A seq out of order.
    #[error("seq {found} where {expected} was due: a line was removed, inserted or moved")]
    Sequence {
        /// The seq due.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// `prev` is not the previous line's hash, and no line after it tells
    /// which of the two was changed (its own `prev`, or the line before).
    #[error("does not link to the line before: this line or the one before it was changed")]
    Link,
    /// Changed after it was written: the line after it, intact, recorded
    /// another hash for it.
    #[error("changed after it was written (the next line recorded another hash for it)")]
    Changed,
    /// A checkpoint without a valid signature by the keys given.
    #[error("checkpoint signature is not valid for the node key")]
    BadSignature,
    /// A checkpoint signed by a key older than one that signed before.
    #[error("checkpoint signed by a retired key after a newer key signed")]
    RetiredKey,
    /// A `sig` field on a line that is not a checkpoint.
    #[error("signature on a line that is not a checkpoint")]
    StraySignature,
    /// The expected head's line has another hash.
    #[error("seq {0} is not the expected head: the log was rewritten up to it")]
    HeadMismatch(u64),
    /// The log ends before the expected head.
    #[error("the log ends before the expected head (seq {0}): lines were removed")]
    HeadMissing(u64),
}

/// Checks a log line by line; feed it every line of every file in order.
#[derive(Debug)]
pub struct Verifier<'k> {
    keys: &'k [[u8; 32]],
    opts: VerifyOptions,
    line_no: usize,
    last: Option<Head>,
    report: Report,
    key_floor: usize,
    head_seen: bool,
    unlinked: Option<Unlinked>,
}

/// A line that did not link to the one before; the next line decides which
/// of the two was changed.
#[derive(Debug)]
struct Unlinked {
    line: usize,
    hash: [u8; 32],
}

impl<'k> Verifier<'k> {
    /// A verifier trusting checkpoints signed by `keys`: the node's Ed25519
    /// public keys, oldest first (more than one after identity rotations;
    /// once a key has signed, older ones may no longer).
    pub fn new(keys: &'k [[u8; 32]], opts: VerifyOptions) -> Self {
        Verifier {
            keys,
            opts,
            line_no: 0,
            last: opts.after,
            report: Report {
                lines: 0,
                checkpoints: 0,
                last: None,
                signed_head: None,
                signed_by: None,
                unsigned_trailing: 0,
            },
            key_floor: 0,
            head_seen: false,
            unlinked: None,
        }
    }

    /// Checks the next line (without its newline).
    pub fn push(&mut self, line: &[u8]) -> Result<(), BadLine> {
        self.line_no += 1;
        if let Some(p) = self.unlinked.take() {
            // Line `p.line` did not link to the line before it. If this line
            // links to it, it is intact, and the line before it was changed.
            let intact = parse_line(line).is_ok_and(|e| e.prev == p.hash);
            return Err(if intact {
                BadLine {
                    line: p.line.saturating_sub(1),
                    problem: Problem::Changed,
                }
            } else {
                BadLine {
                    line: p.line,
                    problem: Problem::Link,
                }
            });
        }
        match self.check(line) {
            Ok(()) => Ok(()),
            Err((back, problem)) => Err(BadLine {
                line: self.line_no.saturating_sub(back),
                problem,
            }),
        }
    }

    /// Checks one line; an error names the line `back` lines before this one.
    fn check(&mut self, line: &[u8]) -> Result<(), (usize, Problem)> {
        let here = |p: Problem| (0, p);
        if line.is_empty() {
            return Err(here(Problem::Empty));
        }
        let e = parse_line(line).map_err(|e| here(e.into()))?;
        self.check_place(&e).map_err(here)?;
        let linked = self.last.is_none_or(|h| e.prev == h.hash);
        let head = Head {
            seq: e.seq,
            hash: line_hash(line),
        };
        self.check_signature(line, &e, head).map_err(here)?;
        if !linked {
            // A checkpoint's valid signature covers its `prev`, so the line
            // before it was changed; otherwise the next line tells.
            if e.kind == CHECKPOINT {
                return Err((1, Problem::Changed));
            }
            self.unlinked = Some(Unlinked {
                line: self.line_no,
                hash: head.hash,
            });
            return Ok(());
        }
        if let Some(want) = self.opts.expect_head.filter(|w| w.seq == e.seq) {
            if want.hash != head.hash {
                return Err(here(Problem::HeadMismatch(want.seq)));
            }
            self.head_seen = true;
        }
        self.last = Some(head);
        self.report.last = Some(head);
        self.report.lines += 1;
        Ok(())
    }

    /// The line's seq (and, for the first line, its link) in the chain.
    fn check_place(&self, e: &Entry) -> Result<(), Problem> {
        // Sequence numbers never wrap: nothing follows u64::MAX.
        let follows = |h: Head| h.seq.checked_add(1) == Some(e.seq);
        match self.last {
            None if e.seq != 0 || e.prev != [0; 32] => {
                return Err(Problem::Start {
                    expected: 0,
                    link: hex::encode(&[0; 32]),
                })
            }
            Some(h) if self.report.lines == 0 && (!follows(h) || e.prev != h.hash) => {
                return Err(Problem::Start {
                    expected: h.seq.saturating_add(1),
                    link: hex::encode(&h.hash),
                })
            }
            Some(h) if !follows(h) => {
                return Err(Problem::Sequence {
                    expected: h.seq.saturating_add(1),
                    found: e.seq,
                })
            }
            _ => {}
        }
        Ok(())
    }

    /// A checkpoint's signature (and the report's count of what it signs);
    /// no signature anywhere else.
    fn check_signature(&mut self, line: &[u8], e: &Entry, head: Head) -> Result<(), Problem> {
        if e.kind == CHECKPOINT {
            let msg = signed_part(line).ok_or(Problem::BadSignature)?;
            let sig = e.sig.as_deref().ok_or(Problem::BadSignature)?;
            // The signature cannot cover itself: its field must be spelled
            // exactly as the writer spells it, at the very end.
            let raw = &line[line.len() - SIG_SUFFIX_LEN + 8..line.len() - 2];
            if raw != hex::encode(sig).as_bytes() {
                return Err(Problem::BadSignature);
            }
            let signer = self
                .keys
                .iter()
                .position(|k| identity::verify(k, DOMAIN, &msg, sig))
                .ok_or(Problem::BadSignature)?;
            if signer < self.key_floor {
                return Err(Problem::RetiredKey);
            }
            self.key_floor = signer;
            self.report.checkpoints += 1;
            self.report.signed_head = Some(head);
            self.report.signed_by = Some(signer);
            self.report.unsigned_trailing = 0;
        } else if e.sig.is_some() {
            return Err(Problem::StraySignature);
        } else {
            self.report.unsigned_trailing += 1;
        }
        Ok(())
    }

    /// The verdict once every line was fed.
    pub fn finish(self) -> Result<Report, BadLine> {
        if let Some(p) = self.unlinked {
            return Err(BadLine {
                line: p.line,
                problem: Problem::Link,
            });
        }
        match self.opts.expect_head {
            Some(h) if !self.head_seen => Err(BadLine {
                line: self.line_no + 1,
                problem: Problem::HeadMissing(h.seq),
            }),
            _ => Ok(self.report),
        }
    }
}

/// Verifies a whole log (the files concatenated in order) against the node
/// keys (oldest first). Every line must end with a newline.
pub fn verify(log: &[u8], keys: &[[u8; 32]], opts: VerifyOptions) -> Result<Report, BadLine> {
    let mut v = Verifier::new(keys, opts);
    let mut rest = log;
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            v.line_no += 1;
            return Err(BadLine {
                line: v.line_no,
                problem: Problem::Incomplete,
            });
        };
        v.push(&rest[..end])?;
        rest = &rest[end + 1..];
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: u64 = 1_750_000_000;

    fn node(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    /// 10 entries, a checkpoint every 4, and one at shutdown: 13 lines.
    fn sample(id: &Identity) -> Vec<u8> {
        let mut w = Writer::new().checkpoint_every(4);
        let mut log = Vec::new();
        for i in 0..10u64 {
            let details =
                json!({"peer": format!("p{i}"), "port": 8000 + i, "note": "a \"quoted\"\nline"});
            log.extend(w.append(id, T0 + i, "policy-decision", &details).unwrap());
        }
        log.extend(w.checkpoint(id, T0 + 10));
        log
    }

    fn lines(log: &[u8]) -> Vec<&[u8]> {
        log.split_inclusive(|&b| b == b'\n').collect()
    }

    fn keys(id: &Identity) -> [[u8; 32]; 1] {
        [id.ed_public()]
    }

    #[test]
    fn a_written_log_verifies_and_reports_its_head() {
        let id = node(1);
        let log = sample(&id);
        assert_eq!(lines(&log).len(), 13);
        let r = verify(&log, &keys(&id), VerifyOptions::default()).unwrap();
        assert_eq!(r.lines, 13);
        assert_eq!(r.checkpoints, 3);
        assert_eq!(r.unsigned_trailing, 0);
        assert_eq!(r.signed_head, r.last);
        assert_eq!(r.signed_by, Some(0));
        assert_eq!(r.last.unwrap().seq, 12);
        // Each line is one JSON object with the documented fields.
        let first = parse_line(lines(&log)[0].strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(
            (first.seq, first.time, first.kind.as_str()),
            (0, T0, "policy-decision")
        );
        assert_eq!(first.details["port"], 8000);
        assert_eq!(first.prev, [0; 32]);
        let cp = parse_line(lines(&log)[4].strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(cp.kind, CHECKPOINT);
        assert!(cp.sig.is_some());
    }

    #[test]
    fn changing_any_byte_anywhere_is_caught_and_its_line_named() {
        let id = node(1);
        let log = sample(&id);
        let starts: Vec<usize> = std::iter::once(0)
            .chain(
                log.iter()
                    .enumerate()
                    .filter(|(_, &b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        for pos in 0..log.len() {
            let line = starts.iter().rposition(|&s| s <= pos).unwrap() + 1;
            for flip in [0x01, 0x20] {
                let mut bad = log.clone();
                bad[pos] ^= flip;
                let err = verify(&bad, &keys(&id), VerifyOptions::default())
                    .expect_err(&format!("byte {pos} ^ {flip:#x} not caught"));
                assert_eq!(err.line, line, "byte {pos} ^ {flip:#x}: {err}");
            }
        }
    }

    #[test]
    fn a_change_in_the_unsigned_tail_is_named_as_precisely_as_it_can_be() {
        let id = node(1);
        let mut w = Writer::new();
        let mut log = Vec::new();
        for i in 0..3 {
            log.extend(w.append(&id, T0 + i, "deny", &json!({"n": i})).unwrap());
        }
        let ls: Vec<Vec<u8>> = lines(&log).iter().map(|l| l.to_vec()).collect();
        let verify_edited = |k: usize, edit: &dyn Fn(&mut Vec<u8>)| -> BadLine {
            let mut v = ls.clone();
            edit(&mut v[k]);
            verify(&v.concat(), &keys(&id), VerifyOptions::default()).unwrap_err()
        };
        let set_n = |to: u8| {
            move |l: &mut Vec<u8>| {
                let at = l.windows(4).position(|w| w == br#""n":"#).unwrap() + 4;
                l[at] = to;
            }
        };
        // Line 1 changed: line 2 does not link, line 3 vouches for line 2,
        // so line 1 is named.
        let e = verify_edited(0, &set_n(b'7'));
        assert_eq!(e.line, 1);
        assert!(matches!(e.problem, Problem::Changed), "{e}");
        // Line 2 changed: line 3 does not link and nothing after it tells
        // whether line 2 or line 3's record of it changed.
        let e = verify_edited(1, &set_n(b'7'));
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("this line or the one before"), "{e}");
        // Line 3's record of line 2 changed: the same answer.
        let e = verify_edited(2, &|l: &mut Vec<u8>| {
            let at = l.windows(8).position(|w| w == br#""prev":""#).unwrap() + 8;
            l[at] = if l[at] == b'0' { b'1' } else { b'0' };
        });
        assert_eq!(e.line, 3);
        assert!(matches!(e.problem, Problem::Link), "{e}");
    }

    #[test]
    fn deleting_any_line_is_caught() {
        let id = node(1);
        let log = sample(&id);
        let ls = lines(&log);
        let head = verify(&log, &keys(&id), VerifyOptions::default())
            .unwrap()
            .signed_head;
        for i in 0..ls.len() {
            let bad: Vec<u8> = ls
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, l)| l.to_vec())
                .collect();
            let plain = verify(&bad, &keys(&id), VerifyOptions::default());
            if i + 1 < ls.len() {
                assert_eq!(plain.unwrap_err().line, i + 1, "deleting line {}", i + 1);
            } else {
                // Cutting the very last line leaves a shorter, valid log:
                // only a head kept elsewhere shows it.
                let r = plain.unwrap();
                assert_eq!(r.unsigned_trailing, 2);
                let opts = VerifyOptions {
                    expect_head: head,
                    after: None,
                };
                let err = verify(&bad, &keys(&id), opts).unwrap_err();
                assert!(matches!(err.problem, Problem::HeadMissing(12)), "{err}");
                assert_eq!(err.line, ls.len());
            }
        }
    }

    #[test]
    fn swapping_or_duplicating_lines_is_caught() {
        let id = node(1);
        let log = sample(&id);
        let ls = lines(&log);
        for i in 0..ls.len() {
            for j in i + 1..ls.len() {
                let mut v = ls.clone();
                v.swap(i, j);
                let err = verify(&v.concat(), &keys(&id), VerifyOptions::default()).unwrap_err();
                assert_eq!(err.line, i + 1, "swap {} and {}", i + 1, j + 1);
            }
            let mut v = ls.clone();
            v.insert(i, ls[i]);
            let err = verify(&v.concat(), &keys(&id), VerifyOptions::default()).unwrap_err();
            assert_eq!(err.line, i + 2, "duplicate of line {}", i + 1);
        }
    }

    #[test]
    fn truncation_is_caught_mid_line_and_with_an_expected_head() {
        let id = node(1);
        let log = sample(&id);
        let head = verify(&log, &keys(&id), VerifyOptions::default())
            .unwrap()
            .signed_head;
        let with_head = VerifyOptions {
            expect_head: head,
            after: None,
        };
        for cut in 0..log.len() {
            let short = &log[..cut];
            let plain = verify(short, &keys(&id), VerifyOptions::default());
            if cut > 0 && log[cut - 1] != b'\n' {
                assert!(
                    matches!(plain.unwrap_err().problem, Problem::Incomplete),
                    "cut at {cut}"
                );
            } else {
                assert!(plain.is_ok(), "a cut at a line end is a shorter log");
            }
            assert!(
                verify(short, &keys(&id), with_head).is_err(),
                "cut at {cut}"
            );
        }
        // An expected head that is not in the log is refused even if the
        // log is longer.
        let wrong = Head {
            seq: 4,
            hash: [7; 32],
        };
        let opts = VerifyOptions {
            expect_head: Some(wrong),
            after: None,
        };
        let err = verify(&log, &keys(&id), opts).unwrap_err();
        assert!(matches!(err.problem, Problem::HeadMismatch(4)));
        assert_eq!(err.line, 5);
    }

    #[test]
    fn a_rewritten_log_needs_the_node_key() {
        let (id, intruder) = (node(1), node(2));
        let forged = sample(&intruder);
        let err = verify(&forged, &keys(&id), VerifyOptions::default()).unwrap_err();
        assert!(matches!(err.problem, Problem::BadSignature));
        assert_eq!(err.line, 5, "the first checkpoint");
        // A line claiming a signature where none belongs.
        let mut w = Writer::new();
        let mut log = w.append(&id, T0, "approve", &json!({})).unwrap();
        log.truncate(log.len() - 2);
        log.extend_from_slice(format!(r#","sig":"{}"}}"#, "00".repeat(64)).as_bytes());
        log.push(b'\n');
        let err = verify(&log, &keys(&id), VerifyOptions::default()).unwrap_err();
        assert!(matches!(err.problem, Problem::StraySignature), "{err}");
        // Unsigned tails are reported, not hidden.
        let mut log = sample(&id);
        log.extend(
            w_after(&log)
                .append(&id, T0 + 20, "deny", &json!({}))
                .unwrap(),
        );
        let r = verify(&log, &keys(&id), VerifyOptions::default()).unwrap();
        assert_eq!((r.unsigned_trailing, r.last.unwrap().seq), (1, 13));
        assert_eq!(r.signed_head.unwrap().seq, 12);
    }

    fn w_after(log: &[u8]) -> Writer {
        Writer::resume(log).unwrap().writer
    }

    #[test]
    fn rotated_files_verify_in_order_or_alone_from_a_known_link() {
        let id = node(1);
        let log = sample(&id);
        let ls = lines(&log);
        for split in 1..ls.len() {
            let (a, b) = (ls[..split].concat(), ls[split..].concat());
            // Fed file by file, as `audit verify` reads them.
            let k = keys(&id);
            let mut v = Verifier::new(&k, VerifyOptions::default());
            for file in [&a, &b] {
                for l in lines(file) {
                    v.push(l.strip_suffix(b"\n").unwrap()).unwrap();
                }
            }
            assert_eq!(v.finish().unwrap().lines, 13);
            // The later file alone does not start at the genesis...
            let err = verify(&b, &k, VerifyOptions::default()).unwrap_err();
            assert!(matches!(err.problem, Problem::Start { .. }));
            // ...but verifies from the earlier file's last line.
            let link = verify(&a, &k, VerifyOptions::default()).unwrap().last;
            let r = verify(
                &b,
                &k,
                VerifyOptions {
                    expect_head: None,
                    after: link,
                },
            )
            .unwrap();
            assert_eq!(r.lines as usize, ls.len() - split);
            // And not from another link.
            let other = Head {
                seq: link.unwrap().seq,
                hash: [1; 32],
            };
            assert!(verify(
                &b,
                &k,
                VerifyOptions {
                    expect_head: None,
                    after: Some(other)
                }
            )
            .is_err());
        }
    }

    #[test]
    fn resuming_continues_the_chain() {
        let id = node(1);
        let log = sample(&id);
        for cut in lines(&log).iter().scan(0, |n, l| {
            *n += l.len();
            Some(*n)
        }) {
            let Resumed {
                mut writer,
                complete_len,
            } = Writer::resume(&log[..cut]).unwrap();
            assert_eq!(complete_len, cut);
            let mut more = log[..cut].to_vec();
            more.extend(
                writer
                    .append(&id, T0 + 99, "rule-add", &json!({"id": 1}))
                    .unwrap(),
            );
            more.extend(writer.checkpoint(&id, T0 + 99));
            let r = verify(&more, &keys(&id), VerifyOptions::default()).unwrap();
            assert_eq!(r.signed_head, writer.signed_head());
        }
        // A line cut by a crash is left out of what the writer continues.
        let Resumed {
            complete_len,
            writer,
        } = Writer::resume(&log[..log.len() - 5]).unwrap();
        assert_eq!(complete_len, log.len() - lines(&log)[12].len());
        assert_eq!(writer.last().unwrap().seq, 11);
        // An empty log starts at the genesis.
        assert_eq!(Writer::resume(b"").unwrap().writer.last(), None);
        assert!(Writer::resume(b"not json\n").is_err());
    }

    #[test]
    fn checkpoints_come_by_themselves_and_the_kind_is_reserved() {
        let id = node(1);
        let mut w = Writer::new();
        let mut log = Vec::new();
        for i in 0..(2 * CHECKPOINT_EVERY + 5) {
            log.extend(
                w.append(&id, T0 + i, "handshake-refused", &json!({"count": i}))
                    .unwrap(),
            );
        }
        let r = verify(&log, &keys(&id), VerifyOptions::default()).unwrap();
        assert_eq!(r.checkpoints, 2);
        assert_eq!(r.unsigned_trailing, 5);
        assert_eq!(
            w.append(&id, T0, CHECKPOINT, &json!({})),
            Err(AppendError::ReservedKind)
        );
        let huge = json!({"blob": "x".repeat(MAX_LINE)});
        assert!(matches!(
            w.append(&id, T0, "x", &huge),
            Err(AppendError::TooLong(_))
        ));
    }

    #[test]
    fn key_rotation_moves_forward_only() {
        let (old, new) = (node(1), node(2));
        let both = [old.ed_public(), new.ed_public()];
        let mut w = Writer::new();
        let mut log = w.append(&old, T0, "approve", &json!({})).unwrap();
        log.extend(w.checkpoint(&old, T0));
        log.extend(
            w.append(&new, T0 + 1, "identity-rotate", &json!({}))
                .unwrap(),
        );
        log.extend(w.checkpoint(&new, T0 + 1));
        let r = verify(&log, &both, VerifyOptions::default()).unwrap();
        assert_eq!(r.signed_by, Some(1));
        // Only the new key known: the old checkpoint does not verify.
        assert!(verify(&log, &[new.ed_public()], VerifyOptions::default()).is_err());
        // A retired key signing after the new one is refused.
        log.extend(w.checkpoint(&old, T0 + 2));
        let err = verify(&log, &both, VerifyOptions::default()).unwrap_err();
        assert!(matches!(err.problem, Problem::RetiredKey));
    }

    #[test]
    fn extreme_sequence_numbers_are_errors_not_overflows() {
        let id = node(1);
        let log = sample(&id);
        let end = Head {
            seq: u64::MAX,
            hash: [0; 32],
        };
        let opts = VerifyOptions {
            expect_head: None,
            after: Some(end),
        };
        let err = verify(&log, &keys(&id), opts).unwrap_err();
        assert!(matches!(err.problem, Problem::Start { .. }), "{err}");
        let last = format!(
            r#"{{"seq":{},"time":1,"kind":"x","details":null,"prev":"{}"}}"#,
            u64::MAX,
            "00".repeat(32)
        );
        let mut w = Writer::resume(format!("{last}\n").as_bytes())
            .unwrap()
            .writer;
        assert!(w.append(&id, T0, "y", &json!({})).is_ok());
    }

    #[test]
    fn head_text_form() {
        let h = Head {
            seq: 42,
            hash: [0xab; 32],
        };
        let text = h.to_string();
        assert_eq!(text, format!("42:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<Head>(), Ok(h));
        for bad in ["", "42", "x:ab", &format!("42:{}", "ab".repeat(31))] {
            assert_eq!(bad.parse::<Head>(), Err(BadHead));
        }
    }

    proptest::proptest! {
        #[test]
        fn verifying_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let k = [node(1).ed_public()];
            let _ = verify(&bytes, &k, VerifyOptions::default());
            let _ = Writer::resume(&bytes);
        }

        #[test]
        fn verifying_arbitrary_json_lines_never_panics(
            seq in 0u64..3, kind in "(checkpoint|x)", sig in proptest::option::of("[0-9a-f]{0,140}"),
        ) {
            let mut line = format!(r#"{{"seq":{seq},"time":1,"kind":"{kind}","details":null,"prev":"{}""#, "00".repeat(32));
            if let Some(s) = sig {
                line.push_str(&format!(r#","sig":"{s}""#));
            }
            line.push_str("}\n");
            let k = [node(1).ed_public()];
            let _ = verify(line.as_bytes(), &k, VerifyOptions::default());
        }
    }
}
