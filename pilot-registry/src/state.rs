//! The registry's state directory: its key file and the join URL.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use pilot_proto::hex;

/// Loads `<dir>/registry.key`, creating it (mode 0600) on first start.
/// A damaged key file is an error, never silently replaced: the key is what
/// every node has pinned.
pub fn load_or_create_key(dir: &Path) -> Result<[u8; 32]> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let path = dir.join("registry.key");
    match fs::read_to_string(&path) {
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
            write_private(&path, format!("{}\n", hex::encode(&key)).as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes a file readable only by its owner, atomically (temp file, fsync,
/// rename), so a crash never leaves half a key.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
