//! The `audit` commands' work: read the audit log straight from the state
//! directory (no daemon needed; `verify` needs only the node's public key,
//! from `identity.key`) and make their documents ([`crate::api`]).

use std::path::Path;

use pilot_audit::read::{self, Failure};
use pilot_proto::audit::Head;

use crate::api::{ApiError, AuditEntry, AuditHead, AuditLine, AuditShow, AuditVerify, ErrorCode};
use crate::state::{StateDir, StateError};

fn io_error(state: &StateDir, e: std::io::Error) -> ApiError {
    let code = match e.kind() {
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Failed,
    };
    ApiError::new(
        code,
        format!(
            "cannot read the audit log in {}: {e}{}",
            state.path.display(),
            if code == ErrorCode::PermissionDenied {
                " (run with sudo)"
            } else {
                ""
            }
        ),
    )
}

/// The log's files, or an error that says none are there.
fn require_log(state: &StateDir) -> Result<(), ApiError> {
    let files = read::files(&state.path, pilot_audit::LOG_FILE).map_err(|e| io_error(state, e))?;
    if files.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Failed,
            format!(
                "no audit log in {}: the daemon starts {} there when it first runs (is --state-dir the node's state directory?)",
                state.path.display(),
                pilot_audit::LOG_FILE
            ),
        ));
    }
    Ok(())
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

/// `audit show [--since]`.
pub fn show(state: &StateDir, since: Option<u64>) -> Result<AuditShow, ApiError> {
    require_log(state)?;
    let (shown, bad) =
        read::entries(&state.path, pilot_audit::LOG_FILE).map_err(|e| io_error(state, e))?;
    Ok(AuditShow {
        entries: shown
            .into_iter()
            .filter(|s| since.is_none_or(|t| s.entry.time >= t))
            .map(|s| AuditEntry {
                seq: s.entry.seq,
                time: s.entry.time,
                utc: pilot_proto::lifetime::utc(s.entry.time),
                kind: s.entry.kind,
                details: s.entry.details,
                file: name(&s.place.file),
                line: s.place.line as u64,
            })
            .collect(),
        unreadable: bad
            .into_iter()
            .map(|(p, problem)| AuditLine {
                file: name(&p.file),
                line: p.line as u64,
                problem,
            })
            .collect(),
    })
}

/// `audit verify [--expect-head]`. A log that does not verify is an
/// answer (`ok: false`), not an error.
pub fn verify(state: &StateDir, expect: Option<Head>) -> Result<AuditVerify, ApiError> {
    require_log(state)?;
    let key = state.load_public_key().map_err(key_error)?;
    let mut keys = lineage_keys(state, &key);
    keys.push(key);
    let out = read::verify(&state.path, pilot_audit::LOG_FILE, &keys, expect)
        .map_err(|e| io_error(state, e))?;
    let (problem, bad_line) = match &out.result {
        Ok(_) => (None, None),
        Err(f @ Failure::HeadRotatedAway { .. }) => (Some(f.to_string()), None),
        Err(f @ Failure::Line { place, problem, .. }) => (
            Some(f.to_string()),
            Some(AuditLine {
                file: name(&place.file),
                line: place.line as u64,
                problem: problem.clone(),
            }),
        ),
    };
    Ok(AuditVerify {
        ok: out.result.is_ok(),
        files: out.files.iter().map(|f| name(f)).collect(),
        key: pilot_proto::hex::encode(&key),
        first_seq: out.first_seq,
        lines: out.lines,
        signed_head: out.signed_head.map(|h| h.to_string()),
        unsigned_after: out.unsigned_after,
        expect_head: expect.map(|h| h.to_string()),
        problem,
        bad_line,
        damaged: out.damaged,
    })
}

/// `audit head`: the signed head of a log that verifies.
pub fn head(state: &StateDir) -> Result<AuditHead, ApiError> {
    let v = verify(state, None)?;
    if !v.ok {
        return Err(ApiError::new(
            ErrorCode::Failed,
            format!(
                "the audit log does not verify, so it has no head to keep: {} (`pilot-tun audit verify` says more)",
                v.problem.unwrap_or_default()
            ),
        ));
    }
    let Some(head) = v.signed_head else {
        return Err(ApiError::new(
            ErrorCode::Failed,
            "the audit log has no signed head yet: the daemon signs one every 100 entries, every 5 minutes while entries wait, and when it stops; try again later",
        ));
    };
    let seq = head.parse::<Head>().map(|h| h.seq).unwrap_or_default();
    Ok(AuditHead {
        head,
        seq,
        unsigned_after: v.unsigned_after,
    })
}

/// The keys this node had before its current one `key`, oldest first,
/// from its identity rotations in `node.json`: only a chain of successions
/// that each verify (signed by both keys), link up and end at `key` counts,
/// so an edited file cannot add a key of its own.
fn lineage_keys(state: &StateDir, key: &[u8; 32]) -> Vec<[u8; 32]> {
    let Ok(node) = state.load_node() else {
        return vec![];
    };
    let chain = &node.lineage;
    let linked = chain.iter().all(|st| st.verify().is_ok())
        && chain
            .windows(2)
            .all(|w| w[0].body.new.ed_public == w[1].body.old.ed_public)
        && chain.last().is_none_or(|st| &st.body.new.ed_public == key);
    if !linked {
        return vec![];
    }
    chain.iter().map(|st| st.body.old.ed_public).collect()
}

fn key_error(e: StateError) -> ApiError {
    let code = match &e {
        StateError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            ErrorCode::PermissionDenied
        }
        _ => ErrorCode::Failed,
    };
    ApiError::new(
        code,
        format!("cannot read the node key that checks the audit log's signatures: {e}"),
    )
}
