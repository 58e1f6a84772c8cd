//! The node's state directory.
//!
//! | file | what | written |
//! |---|---|---|
//! | `identity.key` | Ed25519 + X25519 secret keys (0600) | on first start, and at each identity rotation |
//! | `rotation.pending` | a rotation under way: the new secret keys and the succession statement (0600) | between the steps of `identity rotate`; finished at the next start if a crash cut it short |
//! | `node.json` | registry URL, pinned address, hostname, port, sequence counter, withdrawals not yet delivered | on change |
//! | `trust.json` | the trust store | on every trust change |
//! | `fleet.json` | this node's owner certificate, policy rules and the owner revocations it keeps ([`crate::fleet`]) | on every change |
//! | `control.sock` | the daemon's control socket | while running |
//! | `pilot-tun.log` | the background daemon's log | while running |
//! | `audit.jsonl`, `audit.jsonl.<n>` | the audit log and its rotated files ([`crate::audit`]) | appended by the daemon |
//!
//! Every write goes to a temporary file that is synced and renamed over the
//! old one, so a crash leaves either the old or the new file, never half of
//! one. A damaged file is reported with its path and never overwritten.
//!
//! The directory holds the node's secret key, so before it is used it must
//! be ours and closed to others (0700), and its parent must not let other
//! users replace it. Temporary files are created fresh (`O_EXCL`) and never
//! through a symbolic link (`O_NOFOLLOW`). Secret bytes read or written
//! here are wiped from memory afterwards.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use pilot_proto::hex;
use pilot_proto::identity::{Identity, NodeId, IDENTITY_BYTES};
use pilot_proto::messages::{Signed, Statement};
use pilot_proto::succession::Succession;
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
    /// The state directory, or its parent, is open to other users.
    #[error("{path}: {problem}")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
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
    // A temporary file left by a crash goes first (removing a symbolic
    // link removes the link, not what it points to); then the new one is
    // created fresh, never opened through a link or over another file.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
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

/// The identity in the text of `identity.key`.
fn parse_identity(path: &Path, text: &str) -> Result<Identity, StateError> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let body = lines.next().unwrap_or_default();
    let bytes = (header == "pilot-tun identity v1")
        .then(|| hex::decode_array::<IDENTITY_BYTES>(body.trim()))
        .flatten()
        .map(Zeroizing::new)
        .ok_or_else(|| StateError::Corrupt {
            path: path.to_path_buf(),
            detail: "expected 'pilot-tun identity v1' and 128 hex digits".into(),
        })?;
    Ok(Identity::from_bytes(&bytes))
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
    /// This node's identity rotations, oldest first: each signed by the
    /// identity it retired and the one that continued it.
    #[serde(default)]
    pub lineage: Vec<Succession>,
    /// The registry has the last rotation in `lineage` and the peers' copies
    /// are queued in `outbox` (false between a rotation and the next
    /// registration).
    #[serde(default)]
    pub succession_announced: bool,
    /// Unix time the current identity was made (by a rotation), for
    /// `--rotate-identity-every`; `None` for one older than this field.
    #[serde(default)]
    pub identity_since: Option<u64>,
}

impl NodeState {
    /// The last rotation, while the registry and the peers have not heard
    /// of it yet.
    pub fn unannounced(&self) -> Option<&Succession> {
        self.lineage.last().filter(|_| !self.succession_announced)
    }

    /// The ids this node had before its current one, oldest first.
    pub fn ancestry(&self) -> Vec<NodeId> {
        self.lineage.iter().map(Succession::old_id).collect()
    }
}

const ROTATION_HEADER: &str = "pilot-tun rotation v1";

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

    /// Creates the directory (0700) if needed, and checks that it and its
    /// parent are safe to keep a secret key in (see the module text).
    pub fn create(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        self.check()
    }

    /// The directory must be ours and closed to others (it is closed if
    /// it is not), and its parent must be ours or root's and not writable
    /// by others unless sticky (like /tmp): otherwise another user could
    /// swap the directory or read the key.
    pub fn check(&self) -> Result<(), StateError> {
        let me = nix::unistd::geteuid().as_raw();
        let unsafe_dir = |path: &Path, problem: String| StateError::Unsafe {
            path: path.to_path_buf(),
            problem,
        };
        let meta = fs::metadata(&self.path).map_err(io_err(&self.path))?;
        if !meta.is_dir() {
            return Err(unsafe_dir(&self.path, "not a directory".into()));
        }
        if meta.uid() != me {
            return Err(unsafe_dir(
                &self.path,
                format!(
                    "the state directory belongs to uid {}, not to this user (uid {me}); run as its owner, or choose another with --state-dir",
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
                .map_err(io_err(&self.path))?;
        }
        let parent = fs::canonicalize(&self.path)
            .map_err(io_err(&self.path))?
            .parent()
            .map(Path::to_path_buf);
        if let Some(parent) = parent {
            let pm = fs::metadata(&parent).map_err(io_err(&parent))?;
            if pm.uid() != me && pm.uid() != 0 {
                return Err(unsafe_dir(
                    &parent,
                    format!(
                        "the state directory's parent belongs to uid {}, who could replace the state directory; choose another with --state-dir",
                        pm.uid()
                    ),
                ));
            }
            let sticky = pm.mode() & 0o1000 != 0;
            if pm.mode() & 0o022 != 0 && !sticky {
                return Err(unsafe_dir(
                    &parent,
                    format!(
                        "the state directory's parent is writable by other users (mode {:o}), who could replace the state directory; remove that (chmod go-w) or choose another with --state-dir",
                        pm.mode() & 0o7777
                    ),
                ));
            }
        }
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

    /// The node's Ed25519 public key, from `identity.key` (which is never
    /// created here): what checks the audit log's signatures. The secret
    /// part is read, used to derive it, and wiped.
    pub fn load_public_key(&self) -> Result<[u8; 32], StateError> {
        let path = self.file("identity.key");
        match fs::read_to_string(&path).map(Zeroizing::new) {
            Ok(text) => Ok(parse_identity(&path, &text)?.ed_public()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StateError::Io {
                path,
                source: std::io::Error::new(
                    e.kind(),
                    "no identity here: is this the node's state directory (--state-dir)?",
                ),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Loads the identity, creating one on first start. Returns it and
    /// whether it is new.
    pub fn load_or_create_identity(&self) -> Result<(Identity, bool), StateError> {
        let path = self.file("identity.key");
        match fs::read_to_string(&path).map(Zeroizing::new) {
            Ok(text) => Ok((parse_identity(&path, &text)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = Zeroizing::new([0u8; IDENTITY_BYTES]);
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *bytes)
                    .map_err(|_| StateError::Io {
                        path: path.clone(),
                        source: std::io::Error::other("system random generator failed"),
                    })?;
                let text = Zeroizing::new(format!(
                    "pilot-tun identity v1\n{}\n",
                    Zeroizing::new(hex::encode(&*bytes)).as_str()
                ));
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

    /// Rotates the identity on disk: a new key pair and the succession from
    /// `old`, signed by both. Written in steps that a crash can cut anywhere
    /// ([`StateDir::finish_rotation`] completes them at the next start):
    /// the new keys and the statement go to `rotation.pending` first, then
    /// into `node.json` (the lineage) and `identity.key`, then the pending
    /// file goes. Returns the new identity; `node` is updated and saved.
    pub fn rotate_identity(
        &self,
        old: &Identity,
        node: &mut NodeState,
        now: u64,
    ) -> Result<(Identity, Succession), StateError> {
        let path = self.file("rotation.pending");
        if path.exists() {
            return Err(StateError::Unsafe {
                path,
                problem: "a rotation is already under way; restart the daemon to finish it".into(),
            });
        }
        let mut bytes = Zeroizing::new([0u8; IDENTITY_BYTES]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *bytes).map_err(
            |_| StateError::Io {
                path: path.clone(),
                source: std::io::Error::other("system random generator failed"),
            },
        )?;
        let new = Identity::from_bytes(&bytes);
        let seq = node.lineage.len() as u64 + 1;
        let st = Succession::sign(old, &new, seq, now);
        let text = Zeroizing::new(format!(
            "{ROTATION_HEADER}\n{}\n{}\n",
            Zeroizing::new(hex::encode(&*bytes)).as_str(),
            hex::encode(&st.to_bytes())
        ));
        write_atomic(&path, text.as_bytes(), 0o600)?;
        self.finish_rotation()?;
        *node = self.load_node()?;
        Ok((new, st))
    }

    /// Completes a rotation that `rotation.pending` says is under way (a
    /// crash cut `identity rotate` short): the lineage gets the statement,
    /// `identity.key` the new keys, and the pending file goes. Each step is
    /// idempotent. Returns the new id if there was one to finish.
    pub fn finish_rotation(&self) -> Result<Option<NodeId>, StateError> {
        let path = self.file("rotation.pending");
        let text = match fs::read_to_string(&path).map(Zeroizing::new) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |detail: &str| StateError::Corrupt {
            path: path.clone(),
            detail: detail.into(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(ROTATION_HEADER) {
            return Err(corrupt("expected 'pilot-tun rotation v1'"));
        }
        let secret = lines
            .next()
            .and_then(|l| hex::decode_array::<IDENTITY_BYTES>(l.trim()))
            .map(Zeroizing::new)
            .ok_or_else(|| corrupt("the new keys are not 128 hex digits"))?;
        let st = lines
            .next()
            .and_then(|l| hex::decode(l.trim()))
            .and_then(|b| Succession::from_bytes(&b).ok())
            .ok_or_else(|| corrupt("the succession statement does not decode"))?;
        let new = Identity::from_bytes(&secret);
        if st.new_id() != new.node_id() || st.verify().is_err() {
            return Err(corrupt("the succession does not match the new keys"));
        }
        let mut node = self.load_node()?;
        if node.lineage.last() != Some(&st) {
            let now = st.body.time;
            node.lineage.push(st);
            node.succession_announced = false;
            node.identity_since = Some(now);
            self.save_node(&node)?;
        }
        let key = Zeroizing::new(format!(
            "pilot-tun identity v1\n{}\n",
            Zeroizing::new(hex::encode(&*secret)).as_str()
        ));
        write_atomic(&self.file("identity.key"), key.as_bytes(), 0o600)?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        Ok(Some(new.node_id()))
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

    /// Loads `fleet.json` (empty if absent).
    pub fn load_fleet(&self) -> Result<crate::fleet::FleetState, StateError> {
        self.load_json("fleet.json")
    }

    /// Saves `fleet.json`.
    pub fn save_fleet(&self, f: &crate::fleet::FleetState) -> Result<(), StateError> {
        self.save_json("fleet.json", f)
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
        assert_eq!(s.load_public_key().unwrap(), a.ed_public());
        let mode = fs::metadata(s.file("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_public_key_is_read_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let err = s.load_public_key().unwrap_err();
        assert!(err.to_string().contains("no identity here"), "{err}");
        assert!(!s.file("identity.key").exists());
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
    fn a_temporary_file_planted_as_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        s.create().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, s.file("trust.tmp")).unwrap();
        s.save_trust(&TrustStore::default()).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(s.file("trust.json")).unwrap();
        assert!(meta.is_file(), "trust.json is a file of its own");
        assert_eq!(s.load_trust().unwrap(), TrustStore::default());
        // A stale temporary file from a crash is no obstacle either.
        fs::write(s.file("node.tmp"), "half a file").unwrap();
        s.save_node(&NodeState::default()).unwrap();
        assert_eq!(s.load_node().unwrap(), NodeState::default());
    }

    #[test]
    fn a_parent_others_can_write_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("shared");
        fs::create_dir(&parent).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
        let s = StateDir::new(parent.join("state"));
        let err = s.create().unwrap_err();
        assert!(
            matches!(err, StateError::Unsafe { .. })
                && err.to_string().contains("writable by other users"),
            "{err}"
        );
        // Sticky, like /tmp: others cannot remove or rename our directory.
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
        s.create().unwrap();
    }

    #[test]
    fn a_state_directory_open_to_others_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::new(&path).create().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_state_directory_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can give a directory away");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::create_dir(&path).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&path, Some(nobody), None).unwrap();
        let err = StateDir::new(&path).create().unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
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
            lineage: vec![],
            succession_announced: false,
            identity_since: Some(1_800_000_000),
        };
        s.save_node(&n).unwrap();
        assert_eq!(s.load_node().unwrap(), n);
    }

    #[test]
    fn a_rotation_commits_keys_and_lineage_together() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.create().unwrap();
        let (old, _) = s.load_or_create_identity().unwrap();
        let mut node = s.load_node().unwrap();
        let (new, st) = s.rotate_identity(&old, &mut node, 1_800_000_000).unwrap();
        assert_eq!(
            s.load_or_create_identity().unwrap().0.node_id(),
            new.node_id()
        );
        assert_eq!(node, s.load_node().unwrap());
        assert_eq!(node.lineage, vec![st.clone()]);
        assert_eq!(node.unannounced(), Some(&st));
        assert_eq!(node.ancestry(), vec![old.node_id()]);
        assert_eq!(node.identity_since, Some(1_800_000_000));
        assert!(!s.file("rotation.pending").exists());
        // The next one continues the chain.
        node.succession_announced = true;
        s.save_node(&node).unwrap();
        let (third, st2) = s.rotate_identity(&new, &mut node, 1_800_000_100).unwrap();
        assert_eq!(st2.body.seq, 2);
        assert_eq!(node.ancestry(), vec![old.node_id(), new.node_id()]);
        assert_eq!(
            s.load_or_create_identity().unwrap().0.node_id(),
            third.node_id()
        );
    }

    #[test]
    fn a_rotation_cut_short_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.create().unwrap();
        let (old, _) = s.load_or_create_identity().unwrap();
        let mut node = s.load_node().unwrap();
        let (new, st) = s.rotate_identity(&old, &mut node, 1_800_000_000).unwrap();
        // As if the crash came after the pending file was written and before
        // anything else: the old key and no lineage, but the pending file.
        let text = format!(
            "{ROTATION_HEADER}\n{}\n{}\n",
            hex::encode(&*new.to_bytes()),
            hex::encode(&st.to_bytes())
        );
        write_atomic(&s.file("rotation.pending"), text.as_bytes(), 0o600).unwrap();
        let old_key = format!("pilot-tun identity v1\n{}\n", hex::encode(&*old.to_bytes()));
        write_atomic(&s.file("identity.key"), old_key.as_bytes(), 0o600).unwrap();
        s.save_node(&NodeState::default()).unwrap();
        assert_eq!(s.finish_rotation().unwrap(), Some(new.node_id()));
        assert_eq!(
            s.load_or_create_identity().unwrap().0.node_id(),
            new.node_id()
        );
        assert_eq!(s.load_node().unwrap().lineage, vec![st]);
        assert_eq!(s.finish_rotation().unwrap(), None, "nothing left to finish");
        // A damaged pending file is reported and left alone.
        write_atomic(
            &s.file("rotation.pending"),
            b"pilot-tun rotation v1\nxx\n",
            0o600,
        )
        .unwrap();
        assert!(matches!(
            s.finish_rotation(),
            Err(StateError::Corrupt { .. })
        ));
        assert_eq!(
            s.load_or_create_identity().unwrap().0.node_id(),
            new.node_id()
        );
    }
}
