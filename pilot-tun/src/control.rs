//! The control socket: one JSON request per line, one JSON response per
//! line, over a Unix socket in the state directory. The CLI is its client.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A command for the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Address, id, registry, peers.
    Status,
    /// Every known peer with trust state and tunnel figures.
    Peers,
    /// Ask a peer for mutual trust.
    TrustRequest {
        /// Hostname, address or node id.
        peer: String,
        /// Note for the peer's operator.
        note: String,
    },
    /// Requests waiting for our answer.
    TrustPending,
    /// Approve a peer.
    TrustApprove {
        /// Hostname, address or node id.
        peer: String,
    },
    /// Refuse a peer's request.
    TrustDeny {
        /// Hostname, address or node id.
        peer: String,
    },
    /// Withdraw trust; ends the session at once.
    TrustRevoke {
        /// Hostname, address or node id.
        peer: String,
    },
    /// All trust records.
    TrustList,
    /// Round trips through the tunnel to a trusted peer.
    Ping {
        /// Hostname, address or node id.
        peer: String,
        /// How many echoes.
        count: u32,
    },
    /// Stop the daemon.
    Down,
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// True on success.
    pub ok: bool,
    /// What went wrong, in a sentence that says what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    /// A success.
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    /// A failure.
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no pilot-tun daemon is running for state directory {0} (start one with `sudo pilot-tun up`)")]
    NotRunning(String),
    /// The socket exists but we may not use it.
    #[error("permission denied on {0}: run as root (sudo)")]
    Permission(String),
    /// I/O error mid-conversation.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon's answer did not parse.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends one request and waits for its response.
pub async fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let shown = socket.parent().unwrap_or(socket).display().to_string();
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(shown)
                }
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::Permission(socket.display().to_string())
                }
                _ => ClientError::Io(e),
            })
        }
    };
    let fut = async move {
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        w.write_all(&line).await?;
        let mut reader = BufReader::new(r);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
