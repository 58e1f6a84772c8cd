//! The control socket's transport: one JSON [`Request`] per line in, one
//! JSON [`Envelope`] per line out, over a Unix socket in the state
//! directory. The server side hands each request to a handler; the CLI is
//! the client. What the lines contain is in [`crate::api`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{ApiError, Envelope, ErrorCode, Request, Response};

/// The longest request line the server reads (a request is a few hundred
/// bytes; this bounds what a confused client can make it buffer).
const MAX_LINE: u64 = 64 * 1024;

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no pilot-tun daemon is running for state directory {} (start one with `sudo pilot-tun up`, or name its directory with --state-dir)", .0.display())]
    NotRunning(PathBuf),
    /// The socket exists but we may not use it.
    #[error("permission denied on the control socket {}: run the command with sudo (the socket is root's, mode 0600)", .0.display())]
    Permission(PathBuf),
    /// I/O error mid-conversation.
    #[error("the control socket {} failed: {source} (is the daemon healthy? see pilot-tun.log in its state directory)", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon's answer did not parse.
    #[error("unexpected answer from the daemon ({0}); is it another version of pilot-tun? restart it: `pilot-tun down`, then `sudo pilot-tun up`")]
    Protocol(String),
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {} s; it may be busy or stuck: see pilot-tun.log in its state directory, or wait longer with --timeout", .0.as_secs())]
    Timeout(Duration),
}

impl ClientError {
    /// The machine-readable reason.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::NotRunning(_) => ErrorCode::NotRunning,
            ClientError::Permission(_) => ErrorCode::PermissionDenied,
            ClientError::Io { .. } => ErrorCode::Failed,
            ClientError::Protocol(_) => ErrorCode::Protocol,
            ClientError::Timeout(_) => ErrorCode::Timeout,
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

/// Sends one request and waits for its response.
pub async fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(socket.parent().unwrap_or(socket).to_path_buf())
                }
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::Permission(socket.to_path_buf())
                }
                _ => ClientError::Io {
                    path: socket.to_path_buf(),
                    source: e,
                },
            })
        }
    };
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let fut = async move {
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        w.write_all(&line).await.map_err(io)?;
        let mut reader = BufReader::new(r);
        let mut answer = String::new();
        reader.read_line(&mut answer).await.map_err(io)?;
        if answer.is_empty() {
            return Err(ClientError::Protocol(
                "it closed the connection without answering".into(),
            ));
        }
        let envelope: Envelope =
            serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
        envelope
            .into_response(req)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// Serves the control socket until the task is dropped: each connection
/// sends one request line, `handle` answers it, the answer goes back as one
/// line.
pub async fn serve<H, F>(listener: UnixListener, handle: H)
where
    H: Fn(Request) -> F + Clone + Send + 'static,
    F: Future<Output = Response> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some connections finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut reader = BufReader::new(r).take(MAX_LINE);
            let mut line = String::new();
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(req).await,
                Err(e) => Err(ApiError::new(
                    ErrorCode::Protocol,
                    format!("bad request on the control socket ({e}); is the client another version of pilot-tun than the daemon?"),
                )),
            };
            let mut out = serde_json::to_vec(&Envelope::of(&resp)).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}
