//! A small HTTP/1.1 server for `GET` and `HEAD`: one request per
//! connection (answered with `Connection: close`), a request head of at
//! most [`Limits::max_request_bytes`] read within [`Limits::read_timeout`],
//! at most [`Limits::max_connections`] connections at once (more are
//! closed on accept), and the answer written within
//! [`Limits::write_timeout`]. Enough for a Prometheus scraper and a
//! browser; nothing here trusts the bytes it reads.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

/// The server's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// The longest request head (request line and headers).
    pub max_request_bytes: usize,
    /// Time for the whole request head to arrive.
    pub read_timeout: Duration,
    /// Time for the answer to be written.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        // A scraper and a few browser tabs; a head of 8 KiB holds any real
        // browser's headers.
        Limits {
            max_connections: 16,
            max_request_bytes: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A request that passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The path, without the query string.
    pub path: String,
    /// The query string, if any (without the `?`).
    pub query: Option<String>,
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// 200 with this body.
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            content_type,
            body,
        }
    }

    /// A plain-text answer with this status.
    pub fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    /// 404.
    pub fn not_found() -> Self {
        Response::text(404, "not found")
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// `--metrics`: a port alone (`9464`, listening on 127.0.0.1) or an address
/// and port (`127.0.0.1:9464`, `[::1]:9464`, `0.0.0.0:9464`).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let port = s.strip_prefix(':').unwrap_or(s);
    if let Ok(p) = port.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, p)));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not a port (9464) or an address and port (127.0.0.1:9464, [::1]:9464)")
    })
}

/// Why a request was not handed to the handler.
#[derive(Debug, PartialEq, Eq)]
enum Bad {
    /// The head grew past the bound.
    TooLarge,
    /// Not an HTTP/1.x request line.
    Malformed,
    /// Not GET or HEAD.
    Method,
}

/// The request line of a complete head: the request, and whether it is a
/// HEAD (no body in the answer).
fn parse_head(head: &[u8]) -> Result<(Request, bool), Bad> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(Bad::Malformed)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| Bad::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Bad::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Bad::Malformed);
    }
    let is_head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Bad::Method),
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    Ok((
        Request {
            path: path.to_string(),
            query,
        },
        is_head,
    ))
}

/// Reads until the blank line that ends the head. `Ok(None)`: the peer
/// closed first.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Option<Vec<u8>>, Bad> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => n,
        };
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() >= max {
            return Err(Bad::TooLarge);
        }
    }
}

async fn write_response(stream: &mut TcpStream, r: &Response, with_body: bool) {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if r.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(r.body.as_bytes());
    }
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

async fn connection<H, F>(mut stream: TcpStream, limits: Limits, handler: H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let head = tokio::time::timeout(
        limits.read_timeout,
        read_head(&mut stream, limits.max_request_bytes),
    )
    .await;
    let (response, with_body) = match head {
        Err(_) => (Response::text(408, "request timeout"), true),
        Ok(Ok(None)) => return,
        Ok(Err(_)) => (Response::text(431, "request head too large"), true),
        Ok(Ok(Some(h))) => match parse_head(&h) {
            Ok((req, is_head)) => (handler(req).await, !is_head),
            Err(Bad::Method) => (Response::text(405, "only GET and HEAD"), true),
            Err(_) => (Response::text(400, "bad request"), true),
        },
    };
    let _ = tokio::time::timeout(
        limits.write_timeout,
        write_response(&mut stream, &response, with_body),
    )
    .await;
}

/// Serves `listener` until the task is dropped or aborted: each connection
/// on a task of its own, at most `limits.max_connections` at once.
pub async fn serve<H, F>(listener: TcpListener, limits: Limits, handler: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: pause, do not spin.
                debug!("metrics listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%from, "metrics listener: too many connections; closing this one");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            connection(stream, limits, handler).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9464"), Ok("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(parse_listen(":9464"), Ok("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            parse_listen("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:9464"),
            Ok("[::1]:9464".parse().unwrap())
        );
        assert!(parse_listen("localhost:9464").is_err());
        assert!(parse_listen("70000").is_err());
        assert!(parse_listen("").is_err());
    }

    #[test]
    fn request_lines() {
        let ok = |s: &str| parse_head(s.as_bytes());
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((
                Request {
                    path: "/metrics".into(),
                    query: None
                },
                false
            ))
        );
        assert_eq!(
            ok("HEAD /?a=1 HTTP/1.0\r\n\r\n"),
            Ok((
                Request {
                    path: "/".into(),
                    query: Some("a=1".into())
                },
                true
            ))
        );
        assert_eq!(ok("POST / HTTP/1.1\r\n\r\n"), Err(Bad::Method));
        assert_eq!(ok("GET / SPDY/3\r\n\r\n"), Err(Bad::Malformed));
        assert_eq!(ok("GET http://x/ HTTP/1.1\r\n\r\n"), Err(Bad::Malformed));
        assert_eq!(ok("GET  / HTTP/1.1\r\n\r\n"), Err(Bad::Malformed));
        assert_eq!(ok("\u{0}\u{1}\r\n\r\n"), Err(Bad::Malformed));
        assert_eq!(
            parse_head(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(Bad::Malformed)
        );
    }

    async fn server(limits: Limits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, limits, |req: Request| async move {
            match req.path.as_str() {
                "/metrics" => Response::ok(crate::expo::CONTENT_TYPE, "up 1\n".into()),
                _ => Response::not_found(),
            }
        }));
        addr
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        // A connection closed unanswered may read as a reset: no answer.
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server answers or closes");
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn answers_get_head_and_refusals() {
        let addr = server(Limits::default()).await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("Content-Length: 5\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nup 1\n"), "{r}");
        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD"),
            "{r}"
        );
        let r = exchange(addr, b"garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    }

    #[tokio::test]
    async fn a_head_over_the_bound_is_refused() {
        let addr = server(Limits {
            max_request_bytes: 2048,
            ..Limits::default()
        })
        .await;
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 4096));
        let r = exchange(addr, &req).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off() {
        let addr = server(Limits {
            read_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        // Half a request line, then nothing.
        let r = exchange(addr, b"GET /met").await;
        assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
    }

    #[tokio::test]
    async fn connections_over_the_bound_are_closed() {
        let addr = server(Limits {
            max_connections: 2,
            read_timeout: Duration::from_secs(30),
            ..Limits::default()
        })
        .await;
        // Two idle connections take both slots...
        let mut idle = vec![];
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET").await.unwrap();
            idle.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...so a third is closed without an answer.
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(r, "", "over the bound: closed unanswered");
        // Once one goes, a new connection is served again.
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    }
}
