//! A log file bounded in size: when it would grow past its limit it is
//! renamed to `<name>.1` (the older ones move up to `.2`, `.3`, ... and the
//! oldest beyond `keep` is removed) and a fresh file is started.
//!
//! The background daemon writes its log here. Its standard output and
//! error can follow the file across rotations ([`Rotating::follow_stdio`]),
//! so the lines it prints and a panic message land in the current file
//! too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The background daemon's log: 10 MiB per file.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// ... and three old files besides the current one.
pub const DEFAULT_KEEP: usize = 3;

/// An append-only file that rotates by size.
#[derive(Debug)]
pub struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    stdio: bool,
}

/// `<path>.<n>`.
pub fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(path)
}

/// `O_NOFOLLOW`: a log file planted as a symbolic link is not followed.
fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

impl Rotating {
    /// Opens `path` for appending (0600, created if missing), rotating it
    /// first if it is already at its limit. `keep` old files are kept.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let file = open_append(path).map_err(|e| with_path(path, e))?;
        let mut r = Rotating {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            stdio: false,
        };
        if r.len() >= r.max_bytes {
            r.rotate()?;
        }
        Ok(r)
    }

    /// From now on (and after every rotation) standard output and standard
    /// error are this file too.
    pub fn follow_stdio(mut self) -> io::Result<Self> {
        self.stdio = true;
        self.redirect()?;
        Ok(self)
    }

    /// The current file (to hand to a child process).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn redirect(&self) -> io::Result<()> {
        if self.stdio {
            let fd = self.file.as_fd();
            nix::unistd::dup2_stdout(fd).map_err(io::Error::from)?;
            nix::unistd::dup2_stderr(fd).map_err(io::Error::from)?;
        }
        Ok(())
    }

    /// Moves the files up by one and starts a fresh one.
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            fs::remove_file(numbered(&self.path, self.keep)).or_else(ignore_missing)?;
            for n in (1..self.keep).rev() {
                fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1))
                    .or_else(ignore_missing)?;
            }
            fs::rename(&self.path, numbered(&self.path, 1)).or_else(ignore_missing)?;
        }
        self.file = open_append(&self.path).map_err(|e| with_path(&self.path, e))?;
        self.redirect()
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Write for Rotating {
    /// Writes whole (a log line is not split across files); rotates first
    /// when the line would take the file past its limit. The size is read
    /// from the file, so lines others wrote into it (stdio) count too.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = self.len();
        if len > 0 && len + buf.len() as u64 > self.max_bytes {
            // A failed rotation must not lose the line: keep writing to
            // the old file, and try again next time.
            let _ = self.rotate();
        }
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> Option<u64> {
        fs::metadata(p).ok().map(|m| m.len())
    }

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pilot-tun.log");
        let mut log = Rotating::open(&path, 1000, 3).unwrap();
        let line = [b'x'; 99];
        let mut l = line.to_vec();
        l.push(b'\n');
        for _ in 0..200 {
            log.write_all(&l).unwrap();
        }
        // 200 lines of 100 bytes: 20 000 bytes written, at most 4 000 kept.
        for p in [
            path.clone(),
            numbered(&path, 1),
            numbered(&path, 2),
            numbered(&path, 3),
        ] {
            let s = size(&p).unwrap_or_else(|| panic!("{} exists", p.display()));
            assert!(s > 0 && s <= 1000, "{}: {s} bytes", p.display());
        }
        assert!(size(&numbered(&path, 4)).is_none(), "no fourth old file");
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 4000, "{total} bytes on disk");
        // The newest lines are in the current file, whole.
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.len() == 99), "whole lines only");
    }

    #[test]
    fn a_file_already_over_its_limit_is_rotated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        fs::write(&path, vec![b'a'; 5000]).unwrap();
        let mut log = Rotating::open(&path, 1000, 2).unwrap();
        assert_eq!(size(&numbered(&path, 1)), Some(5000));
        log.write_all(b"fresh\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "fresh\n");
    }

    #[test]
    fn a_line_longer_than_the_limit_still_gets_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut log = Rotating::open(&path, 10, 1).unwrap();
        log.write_all(b"0123456789abcdef\n").unwrap();
        log.write_all(b"next\n").unwrap();
        assert_eq!(
            fs::read_to_string(numbered(&path, 1)).unwrap(),
            "0123456789abcdef\n"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "next\n");
    }

    #[test]
    fn a_link_in_place_of_the_log_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("x.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(Rotating::open(&path, 1000, 1).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }
}
