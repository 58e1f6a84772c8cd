//! The node's state directory.
//!
//! | file | what | written |
//! |---|---|---|
//! | `identity.key` | Ed25519 + X25519 secret keys (0600) | once, on first start |
//! | `node.json` | registry URL, pinned address, hostname, port, sequence counter, withdrawals not yet delivered | on change |
//! | `trust.json` | the trust store | on every trust change |
//! | `control.sock` | the daemon's control socket | while running |
//! | `pilot-tun.log` | the background daemon's log | while running |
//!
//! Every write goes to a temporary file that is synced and renamed over the
//! old one, so a crash leaves either the old or the new file, never half of
//! one. A damaged file is reported with its path and never overwritten.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pilot_proto::hex;
use pilot_proto::identity::{Identity, IDENTITY_BYTES};
use pilot_proto::messages::{Signed, Statement};
use pilot_proto::trust::TrustStore;
use serde::{Deserialize, Serialize};

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on a state file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A state file exists but does not parse.
    #[error("{path} is damaged: {detail}. It was left untouched; restore it from a backup or move it away to start that part of the state afresh")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// What the node remembers between runs besides keys and trust.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The registry's join URL.
    pub registry: Option<String>,
    /// Our permanent overlay address, as last assigned.
    pub address: Option<Ipv4Addr>,
    /// The overlay prefix length.
    pub prefix_len: Option<u8>,
    /// Our hostname, as granted.
    pub hostname: Option<String>,
    /// The UDP port we used last time (reused so cached endpoints stay right).
    pub port: Option<u16>,
    /// Highest sequence number used in a signed message.
    pub seq: u64,
    /// Withdrawals of trust (deny, revoke) the registry has not
    /// acknowledged yet, newest per peer: sent again until it has.
    #[serde(default)]
    pub outbox: Vec<Signed<Statement>>,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    /// Its path.
    pub path: PathBuf,
}

impl StateDir {
    /// A state directory at `path` (not created yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateDir { path: path.into() }
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700));
        Ok(())
    }

    /// Path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The control socket path.
    pub fn socket(&self) -> PathBuf {
        self.file("control.sock")
    }

    /// Loads the identity, creating one on first start. Returns it and
    /// whether it is new.
    pub fn load_or_create_identity(&self) -> Result<(Identity, bool), StateError> {
        let path = self.file("identity.key");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mut lines = text.lines();
                let header = lines.next().unwrap_or_default();
                let body = lines.next().unwrap_or_default();
                let bytes = (header == "pilot-tun identity v1")
                    .then(|| hex::decode_array::<IDENTITY_BYTES>(body.trim()))
                    .flatten()
                    .ok_or_else(|| StateError::Corrupt {
                        path: path.clone(),
                        detail: "expected 'pilot-tun identity v1' and 128 hex digits".into(),
                    })?;
                Ok((Identity::from_bytes(&bytes), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; IDENTITY_BYTES];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| StateError::Io {
                        path: path.clone(),
                        source: std::io::Error::other("system random generator failed"),
                    })?;
                let text = format!("pilot-tun identity v1\n{}\n", hex::encode(&bytes));
                write_atomic(&path, text.as_bytes(), 0o600)?;
                Ok((Identity::from_bytes(&bytes), true))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn load_json<T: Default + for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<T, StateError> {
        let path = self.file(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn save_json<T: Serialize>(&self, name: &str, v: &T) -> Result<(), StateError> {
        let path = self.file(name);
        let mut bytes = serde_json::to_vec_pretty(v).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes, 0o600)
    }

    /// Loads `node.json` (empty state if absent).
    pub fn load_node(&self) -> Result<NodeState, StateError> {
        self.load_json("node.json")
    }

    /// Saves `node.json`.
    pub fn save_node(&self, s: &NodeState) -> Result<(), StateError> {
        self.save_json("node.json", s)
    }

    /// Loads `trust.json` (empty store if absent).
    pub fn load_trust(&self) -> Result<TrustStore, StateError> {
        self.load_json("trust.json")
    }

    /// Saves `trust.json`.
    pub fn save_trust(&self, t: &TrustStore) -> Result<(), StateError> {
        self.save_json("trust.json", t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let (a, new) = s.load_or_create_identity().unwrap();
        assert!(new);
        let (b, new) = s.load_or_create_identity().unwrap();
        assert!(!new);
        assert_eq!(a.node_id(), b.node_id());
        let mode = fs::metadata(s.file("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_files_are_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        fs::write(s.file("identity.key"), "garbage").unwrap();
        let err = s.load_or_create_identity().err().unwrap();
        assert!(err.to_string().contains("identity.key is damaged"), "{err}");
        assert_eq!(
            fs::read_to_string(s.file("identity.key")).unwrap(),
            "garbage"
        );

        fs::write(s.file("trust.json"), "{not json").unwrap();
        let err = s.load_trust().err().unwrap();
        assert!(err.to_string().contains("trust.json is damaged"), "{err}");
        assert_eq!(
            fs::read_to_string(s.file("trust.json")).unwrap(),
            "{not json"
        );
    }

    #[test]
    fn node_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        assert_eq!(s.load_node().unwrap(), NodeState::default());
        let n = NodeState {
            registry: Some("pilot://x@192.0.2.1:1".into()),
            address: Some(Ipv4Addr::new(10, 77, 1, 2)),
            prefix_len: Some(16),
            hostname: Some("alpha".into()),
            port: Some(5000),
            seq: 42,
            outbox: vec![],
        };
        s.save_node(&n).unwrap();
        assert_eq!(s.load_node().unwrap(), n);
    }
}
