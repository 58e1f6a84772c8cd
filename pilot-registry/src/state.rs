//! The registry's state directory: its key file and the join URL.
//!
//! The directory holds the key every node has pinned, so it is made safe
//! before anything is read from or written to it ([`prepare_dir`]): it is
//! created 0700, it must belong to this user (or root) and be writable by
//! nobody else, and its parent must not let other users replace it. The
//! key file must be a plain file of ours that only we can read. Files are
//! written through a fresh temporary file (`O_CREAT|O_EXCL|O_NOFOLLOW`,
//! 0600), so a link planted there is never written through.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pilot_proto::hex;
use tracing::info;

/// `O_NOFOLLOW` on Linux (0x8000 on ARM, AArch64, PowerPC and m68k,
/// 0x20000 elsewhere); spelled out here rather than linking libc for one
/// constant. A unit test checks it against the kernel.
#[cfg(any(
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "m68k"
))]
const O_NOFOLLOW: i32 = 0x8000;
#[cfg(not(any(
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "m68k"
)))]
const O_NOFOLLOW: i32 = 0x20000;

/// The user this process acts as (its effective uid), from
/// `/proc/self/status` (the standard library has no `geteuid`).
pub fn effective_uid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to learn which user this registry runs as")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .context("/proc/self/status has no effective uid")
}

/// Loads `<dir>/registry.key`, creating it (mode 0600) on first start,
/// once [`prepare_dir`] made sure the directory is safe to keep it in.
/// A damaged key file is an error, never silently replaced: the key is what
/// every node has pinned.
pub fn load_or_create_key(dir: &Path) -> Result<[u8; 32]> {
    prepare_dir(dir)?;
    let path = dir.join("registry.key");
    match read_private(&path) {
        Ok(text) => {
            let Some(key) = hex::decode_array::<32>(text.trim()) else {
                bail!(
                    "{} is damaged (expected 64 hex digits). Restore it from a backup: \
                     nodes have pinned this registry's key, so a new one would lock them out. \
                     To start a new network instead, move the file away.",
                    path.display()
                );
            };
            Ok(key)
        }
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
            write_private(&path, format!("{}\n", hex::encode(&key)).as_bytes())?;
            Ok(key)
        }
        Err(ReadError::Io(e)) if e.raw_os_error() == Some(ELOOP) => bail!(
            "{} is a symbolic link; the registry key must be a plain file in the state directory: replace the link with the file it points to",
            path.display()
        ),
        Err(ReadError::Io(e)) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        Err(ReadError::Unsafe(why)) => bail!("{}: {why}", path.display()),
    }
}

/// `ELOOP`, what opening a link with `O_NOFOLLOW` fails with (40 on Linux,
/// but 90 on MIPS).
#[cfg(any(target_arch = "mips", target_arch = "mips64"))]
const ELOOP: i32 = 90;
#[cfg(not(any(target_arch = "mips", target_arch = "mips64")))]
const ELOOP: i32 = 40;

enum ReadError {
    Io(std::io::Error),
    Unsafe(String),
}

/// Reads a secret file: never through a link, and only if it is ours (or
/// root's) and closed to everyone else.
fn read_private(path: &Path) -> Result<String, ReadError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    let me = effective_uid().map_err(|e| ReadError::Unsafe(format!("{e:#}")))?;
    if !meta.is_file() {
        return Err(ReadError::Unsafe("not a plain file".into()));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(ReadError::Unsafe(format!(
            "belongs to uid {}, another user (this registry runs as uid {me}), who could have replaced the key; run the registry as that user, or `chown` the state directory and its files to this one",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(ReadError::Unsafe(format!(
            "is open to other users (mode {:o}), who may have read or replaced the key; run `chmod 600` on it, and if others could read it, consider the key leaked",
            meta.mode() & 0o7777
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(ReadError::Io)?;
    Ok(text)
}

/// Creates the state directory (0700, and its missing parents) if needed,
/// and checks that a secret key may be kept there: the directory must be
/// ours (or root's) and writable by nobody else; one of ours that others
/// may read (as registries before this check created them) is closed to
/// 0700. Its parent must be ours or root's, and not writable by others
/// unless sticky (like /tmp): otherwise another user could swap the
/// directory for one of their own.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let me = effective_uid()?;
    let real =
        fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let meta = fs::metadata(&real).with_context(|| format!("cannot read {}", real.display()))?;
    if !meta.is_dir() {
        bail!("the state directory {} is not a directory", real.display());
    }
    let owner = meta.uid();
    if owner != me && owner != 0 {
        bail!(
            "the state directory {} belongs to uid {owner}, another user (this registry runs as uid {me}), who could read or replace its key; run the registry as that user, or choose another --state-dir",
            real.display()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "the state directory {} is writable by other users (mode {mode:o}), who could have replaced its key or database; check its contents, then run `chmod 700 {}`, or choose another --state-dir",
            real.display(),
            real.display()
        );
    }
    if mode & 0o077 != 0 && owner == me {
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot close {} to other users", real.display()))?;
        info!(dir = %real.display(), "state directory closed to other users (mode 700)");
    }
    if let Some(parent) = real.parent() {
        let pm =
            fs::metadata(parent).with_context(|| format!("cannot read {}", parent.display()))?;
        if pm.uid() != me && pm.uid() != 0 {
            bail!(
                "{}, the parent of the state directory, belongs to uid {}, another user, who could replace the state directory; choose another --state-dir",
                parent.display(),
                pm.uid()
            );
        }
        let sticky = pm.mode() & 0o1000 != 0;
        if pm.mode() & 0o022 != 0 && !sticky {
            bail!(
                "{}, the parent of the state directory, is writable by other users (mode {:o}), who could replace the state directory; run `chmod go-w {}`, or choose another --state-dir",
                parent.display(),
                pm.mode() & 0o7777,
                parent.display()
            );
        }
    }
    Ok(())
}

/// Writes a file readable only by its owner, atomically (temp file, fsync,
/// rename), so a crash never leaves half a key. A temporary file left
/// behind (by a crash, or planted) is removed first: removing a link
/// removes the link, not what it points to. The new one is created fresh
/// and never through a link.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_key_is_kept_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let key = load_or_create_key(&state).unwrap();
        assert_eq!(load_or_create_key(&state).unwrap(), key);
        assert_eq!(mode(&state.join("registry.key")), 0o600);
    }

    /// Issue 10, finding 11: the directory that holds the registry key is
    /// created closed to other users.
    #[test]
    fn the_state_directory_is_created_0700() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("new").join("state");
        load_or_create_key(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
    }

    /// Issue 10, finding 11: a state directory others may write to is
    /// refused (they could have replaced the key or the database), with the
    /// path and the fix, and nothing is written into it.
    #[test]
    fn a_group_writable_state_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o770)).unwrap();
        let e = format!("{:#}", load_or_create_key(&state).unwrap_err());
        assert!(e.contains(&state.display().to_string()), "{e}");
        assert!(e.contains("writable") && e.contains("chmod 700"), "{e}");
        assert!(!state.join("registry.key").exists());
        assert_eq!(mode(&state), 0o770, "left as it was");
    }

    /// A directory of ours that others may only read (what registries
    /// before this check created) is closed, not refused.
    #[test]
    fn a_readable_state_directory_of_ours_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create_key(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
    }

    /// Others who may write to the parent could swap the state directory;
    /// a sticky parent (like /tmp) does not let them.
    #[test]
    fn a_parent_others_may_write_to_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent");
        fs::create_dir(&parent).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
        let state = parent.join("state");
        let e = format!("{:#}", load_or_create_key(&state).unwrap_err());
        assert!(e.contains(&parent.display().to_string()), "{e}");
        assert!(e.contains("chmod go-w"), "{e}");
        assert!(!state.join("registry.key").exists());
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
        load_or_create_key(&state).unwrap();
    }

    /// Only root can hand a directory to another user; skipped otherwise.
    #[test]
    fn another_users_state_directory_is_refused() {
        if effective_uid().unwrap() != 0 {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
        let e = format!("{:#}", load_or_create_key(&state).unwrap_err());
        assert!(e.contains("uid 65534"), "{e}");
        assert!(!state.join("registry.key").exists());
    }

    /// Issue 10, finding 11: a link planted where the temporary file goes
    /// is not written through; the key lands in a fresh file of its own.
    #[test]
    fn a_link_planted_as_the_temporary_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::DirBuilder::new().mode(0o700).create(&state).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("registry.tmp")).unwrap();
        let key = load_or_create_key(&state).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(state.join("registry.key")).unwrap();
        assert!(meta.file_type().is_file(), "the key is a file, not a link");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(load_or_create_key(&state).unwrap(), key);
        // The same for the join URL.
        std::os::unix::fs::symlink(&victim, state.join("join-url.tmp")).unwrap();
        write_private(&state.join("join-url"), b"pilot://x\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            fs::read_to_string(state.join("join-url")).unwrap(),
            "pilot://x\n"
        );
    }

    /// The key file itself is read only if it is a plain file of ours
    /// that nobody else may read or write.
    #[test]
    fn a_key_file_that_is_a_link_or_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        load_or_create_key(&state).unwrap();
        let key = state.join("registry.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", load_or_create_key(&state).unwrap_err());
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let elsewhere = dir.path().join("elsewhere.key");
        fs::rename(&key, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        let e = format!("{:#}", load_or_create_key(&state).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");
    }

    /// The `O_NOFOLLOW` and `ELOOP` values this crate spells out are the
    /// kernel's.
    #[test]
    fn o_nofollow_refuses_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        fs::write(&target, "x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NOFOLLOW)
            .open(&link)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ELOOP), "{e}");
        fs::OpenOptions::new().read(true).open(&link).unwrap();
    }
}
