//! One audit log's files, as its writer keeps them: opened (and the chain
//! resumed) at start, appended to, checkpointed, rotated.
//!
//! - **Writes.** Each entry (with the checkpoint that may follow it) goes
//!   out in one `write` of whole lines on a file opened for appending; the
//!   file is `fsync`ed at every checkpoint, so what a signature covers is on
//!   disk. A failed write is cut back off (`ftruncate` to the size before
//!   it), so a full disk never leaves half a line for the next one to
//!   follow.
//! - **Rotation.** When the file reaches [`Limits::rotate_bytes`], it gets a
//!   closing checkpoint and becomes `<name>.1` (older ones move up to
//!   `<name>.<keep>`, the oldest beyond that is deleted), and a new file
//!   continues the chain: its first line links to the last line of the old
//!   one, so the files verify in order as one log.
//! - **Damage.** At start the file being written is verified alone (from
//!   the link its first line names) against the signer's key. If it does
//!   not verify — a line cut short by a crash, a line changed, removed or
//!   moved, a checkpoint not signed by the key — it is neither truncated
//!   nor overwritten: it is kept whole as `<name>.damaged-<unix time>`, and
//!   a new `<name>` is written with the lines before the first bad one,
//!   byte for byte, then a `log-damaged` entry (the kept file, the bad line
//!   and why, how many bytes were left out) and a signed checkpoint. The
//!   chain goes on from the last good line, so `audit verify` passes on the
//!   live files and shows the `log-damaged` entry, while a head kept
//!   elsewhere that lay past the cut no longer matches (`--expect-head`
//!   fails): the damage stays on record, never hidden. (Refusing to start
//!   was the alternative; it would take a node off the network for a crash
//!   at the wrong moment.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pilot_proto::audit::{self, Head, Problem, Verifier, VerifyOptions, Writer};
use pilot_proto::identity::Identity;
use serde_json::{json, Value};

/// The size at which a log file is rotated.
pub const ROTATE_BYTES: u64 = 16 << 20;
/// Rotated files kept (`<name>.1` … `<name>.4`), besides the current one.
pub const KEEP_FILES: usize = 4;
/// The kind of the entry that records a damaged file set aside.
pub const LOG_DAMAGED: &str = "log-damaged";

/// When to checkpoint and rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rotate once the file is this large.
    pub rotate_bytes: u64,
    /// Rotated files to keep.
    pub keep: usize,
    /// Entries between two checkpoints.
    pub checkpoint_every: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rotate_bytes: ROTATE_BYTES,
            keep: KEEP_FILES,
            checkpoint_every: audit::CHECKPOINT_EVERY,
        }
    }
}

/// The log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// I/O on a log file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The entry cannot be made (too large, or a reserved kind).
    #[error("audit entry not written: {0}")]
    Entry(#[from] audit::AppendError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A damaged file found at start, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where the damaged file is kept, whole.
    pub kept_as: PathBuf,
    /// Its first bad line (1-based).
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
    /// Bytes of it not carried into the new file.
    pub dropped_bytes: u64,
}

/// An open log, being appended to.
#[derive(Debug)]
pub struct LogFile {
    dir: PathBuf,
    name: String,
    file: File,
    size: u64,
    writer: Writer,
    limits: Limits,
}

impl LogFile {
    /// Opens the log `name` in `dir` (creating it), resuming its chain; a
    /// damaged file is set aside as the module text says, and reported.
    /// `signer` signs the checkpoints; `now` is the unix time.
    pub fn open(
        dir: &Path,
        name: &str,
        signer: &Identity,
        now: u64,
        limits: Limits,
    ) -> Result<(LogFile, Option<Damage>), FileError> {
        let path = dir.join(name);
        let bytes = read_or_empty(&path)?;
        let keys = [signer.ed_public()];
        let (writer, damage) = match check(&bytes, &keys) {
            Ok(()) if bytes.is_empty() => (continue_after_rotated(dir, name), None),
            Ok(()) => match Writer::resume(&bytes) {
                Ok(r) => (r.writer, None),
                // Verified lines always parse; kept for completeness.
                Err(e) => set_aside(dir, name, &bytes, 0, e.to_string(), signer, now)?,
            },
            Err((good, problem)) => set_aside(dir, name, &bytes, good, problem, signer, now)?,
        };
        let file = open_append(&path)?;
        let size = file.metadata().map_err(io_at(&path))?.len();
        let log = LogFile {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            file,
            size,
            writer: writer.checkpoint_every(limits.checkpoint_every),
            limits,
        };
        Ok((log, damage))
    }

    /// The file being written.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Appends one entry (and the checkpoint that is due after it), then
    /// rotates if the file has grown past the limit.
    pub fn append(
        &mut self,
        signer: &Identity,
        now: u64,
        kind: &str,
        details: &Value,
    ) -> Result<(), FileError> {
        let mut w = self.writer.clone();
        let bytes = w.append(signer, now, kind, details)?;
        let signed = w.signed_head() != self.writer.signed_head();
        self.write(&bytes, signed)?;
        self.writer = w;
        if self.size >= self.limits.rotate_bytes {
            self.rotate(signer, now)?;
        }
        Ok(())
    }

    /// Signs the head now (and syncs the file), unless every entry is
    /// signed already.
    pub fn checkpoint(&mut self, signer: &Identity, now: u64) -> Result<(), FileError> {
        if !self.has_unsigned() {
            return Ok(());
        }
        let mut w = self.writer.clone();
        let bytes = w.checkpoint(signer, now);
        self.write(&bytes, true)?;
        self.writer = w;
        Ok(())
    }

    /// True if entries follow the last checkpoint.
    pub fn has_unsigned(&self) -> bool {
        self.writer.last() != self.writer.signed_head()
    }

    /// The last checkpoint written: what `audit head` prints.
    pub fn signed_head(&self) -> Option<Head> {
        self.writer.signed_head()
    }

    /// The last line written.
    pub fn last(&self) -> Option<Head> {
        self.writer.last()
    }

    fn write(&mut self, bytes: &[u8], sync: bool) -> Result<(), FileError> {
        let written = self.file.write_all(bytes).and_then(|()| match sync {
            true => self.file.sync_data(),
            false => Ok(()),
        });
        if let Err(e) = written {
            // Whatever part of it reached the file goes again, so the next
            // entry starts on a line of its own.
            let _ = self.file.set_len(self.size);
            return Err(io_at(&self.path())(e));
        }
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotated(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{}.{k}", self.name))
    }

    fn rotate(&mut self, signer: &Identity, now: u64) -> Result<(), FileError> {
        self.checkpoint(signer, now)?;
        let keep = self.limits.keep.max(1);
        let oldest = self.rotated(keep);
        match fs::remove_file(&oldest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&oldest)(e)),
            _ => {}
        }
        for k in (1..keep).rev() {
            let from = self.rotated(k);
            match fs::rename(&from, self.rotated(k + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&from)(e)),
                _ => {}
            }
        }
        let path = self.path();
        fs::rename(&path, self.rotated(1)).map_err(io_at(&path))?;
        self.file = open_append(&path)?;
        self.size = 0;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// Checks a file alone, from the link its first line names. On failure:
/// how many lines at its start are good, and what is wrong after them.
fn check(bytes: &[u8], keys: &[[u8; 32]]) -> Result<(), (usize, String)> {
    let mut lines = bytes.split_inclusive(|&b| b == b'\n').peekable();
    let after = lines.peek().and_then(|l| link_before(l));
    let mut v = Verifier::new(
        keys,
        VerifyOptions {
            expect_head: None,
            after,
        },
    );
    for (n, l) in lines.enumerate() {
        let Some(l) = l.strip_suffix(b"\n") else {
            return Err((n, format!("line {}: {}", n + 1, Problem::Incomplete)));
        };
        v.push(l).map_err(|e| (good_before(&e), e.to_string()))?;
    }
    v.finish()
        .map(|_| ())
        .map_err(|e| (good_before(&e), e.to_string()))
}

/// Lines surely good before a bad one: for a line that does not link, the
/// line before it may be the changed one.
fn good_before(e: &audit::BadLine) -> usize {
    match e.problem {
        Problem::Link => e.line.saturating_sub(2),
        _ => e.line.saturating_sub(1),
    }
}

/// The link a log file's first line names (None for the genesis): what a
/// file verified alone must start from.
pub(crate) fn link_before(first: &[u8]) -> Option<Head> {
    let e = audit::parse_line(first.strip_suffix(b"\n").unwrap_or(first)).ok()?;
    Some(Head {
        seq: e.seq.checked_sub(1)?,
        hash: e.prev,
    })
}

/// A writer for a new, empty current file: it continues the newest
/// rotated file, if there is one.
fn continue_after_rotated(dir: &Path, name: &str) -> Writer {
    let Ok(bytes) = fs::read(dir.join(format!("{name}.1"))) else {
        return Writer::new();
    };
    match Writer::resume(&bytes) {
        Ok(r) => r.writer,
        Err(_) => Writer::new(),
    }
}

/// Keeps a damaged file whole and writes its good lines, a `log-damaged`
/// entry and a checkpoint in its place. Returns the writer that continues.
fn set_aside(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    good: usize,
    problem: String,
    signer: &Identity,
    now: u64,
) -> Result<(Writer, Option<Damage>), FileError> {
    let path = dir.join(name);
    let kept_as = free_name(dir, &format!("{name}.damaged-{now}"));
    fs::hard_link(&path, &kept_as).map_err(io_at(&kept_as))?;
    let good_len: usize = bytes
        .split_inclusive(|&b| b == b'\n')
        .take(good)
        .map(<[u8]>::len)
        .sum();
    let prefix = &bytes[..good_len];
    let mut w = match good {
        0 => continue_after_rotated(dir, name),
        _ => Writer::resume(prefix).map_or_else(|_| Writer::new(), |r| r.writer),
    };
    let kept_name = kept_as
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dropped = (bytes.len() - good_len) as u64;
    let mut out = prefix.to_vec();
    out.extend(w.append(
        signer,
        now,
        LOG_DAMAGED,
        &json!({
            "kept_as": kept_name,
            "line": good + 1,
            "problem": problem,
            "dropped_bytes": dropped,
        }),
    )?);
    out.extend(w.checkpoint(signer, now));
    write_atomic(&path, &out)?;
    let damage = Damage {
        kept_as,
        line: good + 1,
        problem,
        dropped_bytes: dropped,
    };
    Ok((w, Some(damage)))
}

/// `base`, or `base-2`, `base-3`, … whichever does not exist yet.
fn free_name(dir: &Path, base: &str) -> PathBuf {
    let mut p = dir.join(base);
    let mut n = 2;
    while p.symlink_metadata().is_ok() {
        p = dir.join(format!("{base}-{n}"));
        n += 1;
    }
    p
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>, FileError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match f {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut f, &mut bytes).map_err(io_at(path))?;
            Ok(bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// The log file, for appending: created 0600 if missing, never opened
/// through a symbolic link.
fn open_append(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_at(path))
}

/// Replaces `path` with `bytes`: a fresh temporary file, synced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&tmp)(e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_at(&tmp))?;
    fs::rename(&tmp, path).map_err(io_at(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes renames in `dir` durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read;

    const T0: u64 = 1_750_000_000;

    fn node() -> Identity {
        Identity::from_bytes(&[3; 64])
    }

    fn small() -> Limits {
        Limits {
            rotate_bytes: 2_000,
            keep: 3,
            checkpoint_every: 5,
        }
    }

    fn verify_dir(dir: &Path, id: &Identity) -> read::Outcome {
        read::verify(dir, "audit.jsonl", &[id.ed_public()], None).unwrap()
    }

    #[test]
    fn entries_are_appended_checkpointed_and_resumed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = node();
        let (mut log, damage) = LogFile::open(dir.path(), "audit.jsonl", &id, T0, small()).unwrap();
        assert!(damage.is_none());
        for i in 0..7 {
            log.append(&id, T0 + i, "approve", &json!({"n": i}))
                .unwrap();
        }
        // A checkpoint came after the fifth entry by itself.
        assert_eq!(log.signed_head().unwrap().seq, 5);
        assert!(log.has_unsigned());
        log.checkpoint(&id, T0 + 8).unwrap();
        assert!(!log.has_unsigned());
        let head = log.signed_head();
        drop(log);
        // A restart continues the same chain.
        let (mut log, damage) =
            LogFile::open(dir.path(), "audit.jsonl", &id, T0 + 9, small()).unwrap();
        assert!(damage.is_none());
        assert_eq!(log.signed_head(), head);
        log.append(&id, T0 + 10, "revoke", &json!({})).unwrap();
        log.checkpoint(&id, T0 + 10).unwrap();
        let out = verify_dir(dir.path(), &id);
        let r = out.result.unwrap();
        assert_eq!((r.lines, r.checkpoints, r.unsigned_trailing), (11, 3, 0));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join("audit.jsonl"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotation_keeps_the_chain_and_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let id = node();
        let (mut log, _) = LogFile::open(dir.path(), "audit.jsonl", &id, T0, small()).unwrap();
        for i in 0..200 {
            log.append(
                &id,
                T0 + i,
                "handshake-refused",
                &json!({"source": "198.51.100.7", "i": i}),
            )
            .unwrap();
        }
        let files = read::files(dir.path(), "audit.jsonl").unwrap();
        assert_eq!(files.len(), 4, "three rotated and the current: {files:?}");
        let out = verify_dir(dir.path(), &id);
        let first = out.first_seq.unwrap();
        assert!(first > 0, "the oldest files were deleted");
        let r = out.result.unwrap();
        assert_eq!(r.last.unwrap().seq + 1 - first, r.lines);
        for f in &files[..3] {
            assert!(fs::metadata(f).unwrap().len() >= 2_000);
            // Each rotated file ends with a signed checkpoint.
            let text = fs::read_to_string(f).unwrap();
            assert!(text
                .lines()
                .last()
                .unwrap()
                .contains("\"kind\":\"checkpoint\""));
        }
        // A restart after rotation continues the current file's chain.
        drop(log);
        let (mut log, d) =
            LogFile::open(dir.path(), "audit.jsonl", &id, T0 + 999, small()).unwrap();
        assert!(d.is_none());
        log.append(&id, T0 + 999, "node-start", &json!({})).unwrap();
        assert!(verify_dir(dir.path(), &id).result.is_ok());
    }

    #[test]
    fn a_restart_right_after_rotation_links_the_new_file_to_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let id = node();
        let (mut log, _) = LogFile::open(dir.path(), "audit.jsonl", &id, T0, small()).unwrap();
        while read::files(dir.path(), "audit.jsonl").unwrap().len() < 2
            || fs::metadata(dir.path().join("audit.jsonl")).unwrap().len() > 0
        {
            log.append(&id, T0, "x", &json!({"pad": "y".repeat(100)}))
                .unwrap();
        }
        drop(log);
        let (mut log, d) = LogFile::open(dir.path(), "audit.jsonl", &id, T0 + 1, small()).unwrap();
        assert!(d.is_none());
        log.append(&id, T0 + 1, "node-start", &json!({})).unwrap();
        log.checkpoint(&id, T0 + 1).unwrap();
        assert!(verify_dir(dir.path(), &id).result.is_ok());
    }

    #[test]
    fn a_cut_or_changed_file_is_kept_aside_and_the_chain_goes_on_from_the_last_good_line() {
        let id = node();
        for (what, edit) in [
            (
                "cut mid-line",
                &(|b: &mut Vec<u8>| b.truncate(b.len() - 7)) as &dyn Fn(&mut Vec<u8>),
            ),
            ("one byte changed", &|b: &mut Vec<u8>| {
                let at = b.windows(5).position(|w| w == b"\"n\":3").unwrap() + 4;
                b[at] = b'9';
            }),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = LogFile::open(dir.path(), "audit.jsonl", &id, T0, small()).unwrap();
            for i in 0..8 {
                log.append(&id, T0 + i, "approve", &json!({"n": i}))
                    .unwrap();
            }
            drop(log);
            let path = dir.path().join("audit.jsonl");
            let mut bytes = fs::read(&path).unwrap();
            edit(&mut bytes);
            fs::write(&path, &bytes).unwrap();
            let (mut log, damage) =
                LogFile::open(dir.path(), "audit.jsonl", &id, T0 + 50, small()).unwrap();
            let damage = damage.unwrap_or_else(|| panic!("{what}: not noticed"));
            // The damaged file is kept, byte for byte.
            assert_eq!(fs::read(&damage.kept_as).unwrap(), bytes, "{what}");
            assert!(damage.dropped_bytes > 0, "{what}");
            log.append(&id, T0 + 51, "node-start", &json!({})).unwrap();
            let out = verify_dir(dir.path(), &id);
            assert!(out.result.is_ok(), "{what}: {:?}", out.result);
            assert_eq!(out.damaged.len(), 1, "{what}: the log says so");
            let (entries, _) = read::entries(dir.path(), "audit.jsonl").unwrap();
            let rec = entries
                .iter()
                .find(|e| e.entry.kind == LOG_DAMAGED)
                .unwrap();
            assert_eq!(rec.entry.details["line"], damage.line, "{what}");
            // The damaged copy is not among the log's files.
            assert_eq!(read::files(dir.path(), "audit.jsonl").unwrap().len(), 1);
        }
    }

    #[test]
    fn a_checkpoint_by_another_key_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (id, other) = (node(), Identity::from_bytes(&[4; 64]));
        let (mut log, _) = LogFile::open(dir.path(), "audit.jsonl", &other, T0, small()).unwrap();
        log.append(&other, T0, "approve", &json!({})).unwrap();
        log.checkpoint(&other, T0).unwrap();
        drop(log);
        let (_, damage) = LogFile::open(dir.path(), "audit.jsonl", &id, T0 + 1, small()).unwrap();
        let d = damage.unwrap();
        assert_eq!(d.line, 2, "{d:?}");
        assert!(d.problem.contains("signature"), "{d:?}");
    }

    #[test]
    fn a_failed_write_leaves_no_half_line() {
        let dir = tempfile::tempdir().unwrap();
        let id = node();
        let (mut log, _) = LogFile::open(dir.path(), "audit.jsonl", &id, T0, small()).unwrap();
        log.append(&id, T0, "approve", &json!({})).unwrap();
        let huge = json!({"blob": "x".repeat(audit::MAX_LINE)});
        assert!(matches!(
            log.append(&id, T0, "approve", &huge),
            Err(FileError::Entry(_))
        ));
        log.append(&id, T0, "deny", &json!({})).unwrap();
        assert!(verify_dir(dir.path(), &id).result.is_ok());
    }
}
