//! The audit log on disk, for a pilot-tun node and for the registry alike.
//!
//! [`pilot_proto::audit`] makes and checks the bytes of the hash chain; this
//! crate keeps them in files: [`file::LogFile`] appends (one `write` per
//! entry, `fsync` at checkpoints), rotates at a size without breaking the
//! chain, resumes it after a restart and sets a damaged file aside;
//! [`read`] lists the files of a log and verifies or shows them, for the
//! `audit` commands, which work without the daemon. [`time`] reads the
//! `--since` times those commands take.
//!
//! The files of a log named `audit.jsonl`, oldest first:
//!
//! ```text
//! audit.jsonl.4 … audit.jsonl.1   rotated (the higher, the older)
//! audit.jsonl                     being written
//! audit.jsonl.damaged-<unix time> set aside, not part of the chain
//! ```

pub mod file;
pub mod read;
pub mod time;

/// The name of the log file the node and the registry write.
pub const LOG_FILE: &str = "audit.jsonl";
