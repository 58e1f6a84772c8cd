//! Reading a log back, for the `audit` commands (no daemon needed): which
//! files make it up, whether they verify as one chain, and their entries.
//!
//! What verification proves, and what it cannot: every line up to the last
//! checkpoint is exactly what the key's holder wrote, in order, with
//! nothing removed between the first line read and that checkpoint.
//! Entries after the last checkpoint are chained but unsigned (reported as
//! such). Whole lines cut from the end, and whole files rotated away (or
//! deleted) at the start, leave a shorter log that verifies; only a head
//! kept elsewhere (`--expect-head`) shows them, which is why a head older
//! than the oldest file kept is reported as not provable instead of passed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use pilot_proto::audit::{self, Entry, Head, Problem, Report, Verifier, VerifyOptions, CHECKPOINT};

use crate::file::{link_before, LOG_DAMAGED};

/// A line of one file of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The file.
    pub file: PathBuf,
    /// The line in it, from 1.
    pub line: usize,
}

/// The files of the log `name` in `dir`, oldest first: `<name>.<k>` from
/// the highest k down to 1, then `<name>` itself. Damaged files set aside
/// are not among them.
pub fn files(dir: &Path, name: &str) -> io::Result<Vec<PathBuf>> {
    let prefix = format!("{name}.");
    let mut rotated: Vec<(u64, PathBuf)> = vec![];
    for e in fs::read_dir(dir)? {
        let e = e?;
        let file_name = e.file_name();
        let Some(k) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|k| k.parse().ok())
        else {
            continue;
        };
        rotated.push((k, e.path()));
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(name);
    if current.exists() {
        out.push(current);
    }
    Ok(out)
}

/// Why a log did not verify.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// A line does not verify.
    Line {
        /// Where it is (for a problem past the end, the line after the
        /// last one).
        place: Place,
        /// Its number over all files, from 1.
        overall: usize,
        /// What is wrong.
        problem: String,
    },
    /// The expected head is older than the oldest line kept, so it cannot
    /// be checked.
    HeadRotatedAway {
        /// The head given.
        expected: Head,
        /// The oldest seq in the files.
        first_seq: u64,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Line { place, problem, .. } => {
                write!(f, "{} line {}: {problem}", place.file.display(), place.line)
            }
            Failure::HeadRotatedAway { expected, first_seq } => write!(
                f,
                "the expected head (seq {}) is older than the oldest entry kept (seq {first_seq}): its file was rotated away or removed, so it cannot be checked",
                expected.seq
            ),
        }
    }
}

/// What verifying a log found.
#[derive(Debug)]
pub struct Outcome {
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    /// The seq of the first line (0 unless older files were rotated away).
    pub first_seq: Option<u64>,
    /// The verdict: on success, the chain's figures.
    pub result: Result<Report, Failure>,
    /// The last checkpoint that verified before the first bad line (on
    /// success, the report's signed head), and the entries after it that
    /// verified but are not signed.
    pub signed_head: Option<Head>,
    /// Entries after [`Outcome::signed_head`] before the end or the first
    /// bad line: chained, but not signed.
    pub unsigned_after: u64,
    /// Lines that verified (all of them, or those before the first bad
    /// one).
    pub lines: u64,
    /// Seqs of `log-damaged` entries: files the writer found damaged at a
    /// start and set aside.
    pub damaged: Vec<u64>,
}

/// Verifies the files of the log `name` in `dir` in order, as one chain,
/// against the signer keys `keys` (oldest first). The oldest file starts
/// from the link its first line names (older files may have been rotated
/// away). `expect_head`: a head kept elsewhere, which must be in the log.
pub fn verify(
    dir: &Path,
    name: &str,
    keys: &[[u8; 32]],
    expect_head: Option<Head>,
) -> io::Result<Outcome> {
    let files = files(dir, name)?;
    let mut out = Outcome {
        files: files.clone(),
        first_seq: None,
        result: Ok(empty_report()),
        signed_head: None,
        unsigned_after: 0,
        lines: 0,
        damaged: vec![],
    };
    // A head older than the oldest line kept cannot be checked; the rest
    // of the log still is.
    let mut rotated_away = None;
    let mut v: Option<Verifier<'_>> = None;
    // (overall line, head) of every checkpoint that passed, and where each
    // file starts.
    let mut checkpoints: Vec<(usize, Head)> = vec![];
    let mut starts: Vec<(usize, &PathBuf)> = vec![];
    let mut overall = 0usize;
    let mut failure = None;
    'files: for f in &files {
        let bytes = fs::read(f)?;
        starts.push((overall + 1, f));
        for l in bytes.split_inclusive(|&b| b == b'\n') {
            overall += 1;
            let v = v.get_or_insert_with(|| {
                let after = link_before(l);
                let first = after.map_or(0, |h| h.seq + 1);
                out.first_seq = Some(first);
                let expect_head = expect_head.filter(|h| {
                    if h.seq < first {
                        rotated_away = Some(*h);
                    }
                    h.seq >= first
                });
                Verifier::new(keys, VerifyOptions { expect_head, after })
            });
            let Some(line) = l.strip_suffix(b"\n") else {
                failure = Some((overall, Problem::Incomplete.to_string()));
                break 'files;
            };
            if let Err(e) = v.push(line) {
                failure = Some((e.line, e.problem.to_string()));
                break 'files;
            }
            if let Ok(e) = audit::parse_line(line) {
                match e.kind.as_str() {
                    CHECKPOINT => checkpoints.push((overall, head_of(&e, line))),
                    LOG_DAMAGED => out.damaged.push(e.seq),
                    _ => {}
                }
            }
        }
    }
    if failure.is_none() {
        match v.map(Verifier::finish) {
            Some(Ok(r)) => {
                out.signed_head = r.signed_head;
                out.unsigned_after = r.unsigned_trailing;
                out.lines = r.lines;
                out.result = match (rotated_away, out.first_seq) {
                    (Some(expected), Some(first_seq)) => Err(Failure::HeadRotatedAway {
                        expected,
                        first_seq,
                    }),
                    _ => Ok(r),
                };
                return Ok(out);
            }
            Some(Err(e)) => failure = Some((e.line, e.problem.to_string())),
            None => {
                // An empty log: only an expected head can be missing.
                if let Some(h) = expect_head {
                    failure = Some((1, Problem::HeadMissing(h.seq).to_string()));
                }
            }
        }
    }
    if let Some((bad, problem)) = failure {
        // Checkpoints at or after the bad line do not count.
        let good = checkpoints.iter().rev().find(|(l, _)| *l < bad);
        out.signed_head = good.map(|(_, h)| *h);
        out.unsigned_after = (bad - 1 - good.map_or(0, |(l, _)| *l)) as u64;
        out.lines = (bad - 1) as u64;
        let (start, file) = starts
            .iter()
            .rev()
            .find(|(s, _)| *s <= bad)
            .map(|(s, f)| (*s, (*f).clone()))
            .unwrap_or((1, dir.join(name)));
        out.result = Err(Failure::Line {
            place: Place {
                file,
                line: bad + 1 - start,
            },
            overall: bad,
            problem,
        });
    }
    Ok(out)
}

fn head_of(e: &Entry, line: &[u8]) -> Head {
    Head {
        seq: e.seq,
        hash: audit::line_hash(line),
    }
}

fn empty_report() -> Report {
    Report {
        lines: 0,
        checkpoints: 0,
        last: None,
        signed_head: None,
        signed_by: None,
        unsigned_trailing: 0,
    }
}

/// A line that is not an entry, and why.
pub type Unreadable = (Place, String);

/// One entry as read, with where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Shown {
    /// Where it is.
    pub place: Place,
    /// The entry.
    pub entry: Entry,
}

/// Every entry of the log `name` in `dir`, oldest first (not verified:
/// `verify` does that), and the lines that are not entries, with why.
pub fn entries(dir: &Path, name: &str) -> io::Result<(Vec<Shown>, Vec<Unreadable>)> {
    let mut shown = vec![];
    let mut unreadable = vec![];
    for f in files(dir, name)? {
        let bytes = fs::read(&f)?;
        for (i, l) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            let place = Place {
                file: f.clone(),
                line: i + 1,
            };
            let Some(line) = l.strip_suffix(b"\n") else {
                unreadable.push((place, Problem::Incomplete.to_string()));
                continue;
            };
            match audit::parse_line(line) {
                Ok(entry) => shown.push(Shown { place, entry }),
                Err(e) => unreadable.push((place, e.to_string())),
            }
        }
    }
    Ok((shown, unreadable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{Limits, LogFile};
    use pilot_proto::identity::Identity;
    use serde_json::json;

    const T0: u64 = 1_750_000_000;

    /// A log of 3 files: rotated at 1500 bytes, a checkpoint every 4.
    fn sample(dir: &Path, id: &Identity) -> Head {
        let limits = Limits {
            rotate_bytes: 1_500,
            keep: 5,
            checkpoint_every: 4,
        };
        let (mut log, _) = LogFile::open(dir, "audit.jsonl", id, T0, limits).unwrap();
        for i in 0..20 {
            log.append(id, T0 + i, "approve", &json!({"peer": format!("p{i}")}))
                .unwrap();
        }
        log.append(id, T0 + 30, "deny", &json!({})).unwrap();
        log.signed_head().unwrap()
    }

    fn keys(id: &Identity) -> [[u8; 32]; 1] {
        [id.ed_public()]
    }

    #[test]
    fn an_intact_log_reports_its_signed_head_and_unsigned_tail() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_bytes(&[5; 64]);
        let head = sample(dir.path(), &id);
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), Some(head)).unwrap();
        assert!(out.files.len() >= 3, "{:?}", out.files);
        let r = out.result.unwrap();
        assert_eq!(out.first_seq, Some(0));
        assert_eq!(out.signed_head, Some(head));
        assert_eq!(out.unsigned_after, 1);
        assert_eq!(r.unsigned_trailing, 1);
        let (shown, bad) = entries(dir.path(), "audit.jsonl").unwrap();
        assert!(bad.is_empty());
        assert_eq!(shown.len() as u64, r.lines);
        assert_eq!(shown[0].entry.details["peer"], "p0");
    }

    #[test]
    fn a_changed_byte_is_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_bytes(&[5; 64]);
        let head = sample(dir.path(), &id);
        let all = files(dir.path(), "audit.jsonl").unwrap();
        let middle = &all[1];
        let mut bytes = fs::read(middle).unwrap();
        let first_len = fs::read(&all[0]).unwrap().split(|&b| b == b'\n').count() - 1;
        // The middle file's second entry line: "p" of a peer name becomes "q".
        let starts: Vec<usize> = std::iter::once(0)
            .chain(
                bytes
                    .iter()
                    .enumerate()
                    .filter(|(_, &b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        let k = (1..starts.len())
            .find(|&k| {
                bytes[starts[k]..].starts_with(b"{") && {
                    let end = starts.get(k + 1).copied().unwrap_or(bytes.len());
                    bytes[starts[k]..end].windows(7).any(|w| w == b"\"peer\":")
                }
            })
            .unwrap();
        let at = starts[k]
            + bytes[starts[k]..]
                .windows(9)
                .position(|w| w == b"\"peer\":\"p")
                .unwrap()
            + 8;
        bytes[at] = b'q';
        fs::write(middle, &bytes).unwrap();
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), None).unwrap();
        let Err(Failure::Line {
            place,
            overall,
            problem,
        }) = out.result
        else {
            panic!("{:?}", out.result)
        };
        assert_eq!((&place.file, place.line), (middle, k + 1), "{problem}");
        assert_eq!(overall, first_len + k + 1);
        // The signed head before it is reported, and what followed it.
        assert!(out.signed_head.unwrap().seq < head.seq);
    }

    #[test]
    fn a_head_of_a_file_rotated_away_cannot_be_proven() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_bytes(&[5; 64]);
        sample(dir.path(), &id);
        let all = files(dir.path(), "audit.jsonl").unwrap();
        let early = verify(dir.path(), "audit.jsonl", &keys(&id), None)
            .unwrap()
            .result
            .unwrap();
        assert!(early.checkpoints > 1);
        // The oldest file's first checkpoint, kept by an operator.
        let first = fs::read_to_string(&all[0]).unwrap();
        let cp = first
            .lines()
            .find(|l| l.contains("\"checkpoint\""))
            .unwrap();
        let e = audit::parse_line(cp.as_bytes()).unwrap();
        let kept = head_of(&e, cp.as_bytes());
        assert!(verify(dir.path(), "audit.jsonl", &keys(&id), Some(kept))
            .unwrap()
            .result
            .is_ok());
        fs::remove_file(&all[0]).unwrap();
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), None).unwrap();
        assert!(out.result.is_ok(), "without a head, a shorter log verifies");
        assert!(out.first_seq.unwrap() > 0);
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), Some(kept)).unwrap();
        assert!(matches!(out.result, Err(Failure::HeadRotatedAway { .. })));
    }

    #[test]
    fn an_empty_directory_is_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_bytes(&[5; 64]);
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), None).unwrap();
        assert!(out.files.is_empty());
        assert_eq!(out.result.unwrap().lines, 0);
        let h = Head {
            seq: 3,
            hash: [1; 32],
        };
        let out = verify(dir.path(), "audit.jsonl", &keys(&id), Some(h)).unwrap();
        assert!(out.result.is_err());
    }
}
