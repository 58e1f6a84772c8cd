//! Readiness and status for systemd (`Type=notify`): the `sd_notify`
//! protocol, one datagram of `KEY=value` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
//! that variable nothing is sent, so the programs call these freely.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where `$NOTIFY_SOCKET` points: `Ok(None)` if it is unset or empty.
fn target() -> io::Result<Option<SocketAddr>> {
    let Some(raw) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(None);
    };
    let raw = raw.into_encoded_bytes();
    match raw.first() {
        None => Ok(None),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&raw[1..]).map(Some)
        }
        Some(b'/') => {
            use std::os::unix::ffi::OsStringExt;
            SocketAddr::from_pathname(std::ffi::OsString::from_vec(raw)).map(Some)
        }
        Some(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither a path nor an @abstract name (vsock is not supported)",
        )),
    }
}

/// Sends `state` (newline-separated `KEY=value` lines) to systemd.
/// Returns false when no `$NOTIFY_SOCKET` is set (not under systemd).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(addr) = target()? else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// `READY=1` with a status line: the service is up. A failure to tell
/// systemd is logged, not fatal (systemd then times the start out, which
/// says more than we could).
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A status line, shown by `systemctl status`.
pub fn status(status: &str) {
    send(&format!("STATUS={}", one_line(status)));
}

/// `STOPPING=1`: the service is shutting down.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping");
}

fn send(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!("cannot notify systemd ({NOTIFY_SOCKET}): {e}");
    }
}

/// A status is one line: newlines would start new `KEY=` assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ENV_LOCK as ENV;

    fn with_socket<R>(value: &str, f: impl FnOnce() -> R) -> R {
        let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
        std::env::set_var(NOTIFY_SOCKET, value);
        let r = f();
        std::env::remove_var(NOTIFY_SOCKET);
        r
    }

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_path_socket_gets_ready_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        with_socket(path.to_str().unwrap(), || {
            ready("pilot0 up: 10.1.2.3/16\nsecond line");
            status("registry unreachable");
        });
        assert_eq!(
            recv(&sock),
            "READY=1\nSTATUS=pilot0 up: 10.1.2.3/16 second line"
        );
        assert_eq!(recv(&sock), "STATUS=registry unreachable");
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("pilot-service-test-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let sent = with_socket(&format!("@{name}"), || notify("READY=1").unwrap());
        assert!(sent);
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
        std::env::remove_var(NOTIFY_SOCKET);
        assert!(!notify("READY=1").unwrap());
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let r = with_socket(path.to_str().unwrap(), || notify("READY=1"));
        assert!(r.is_err());
        let r = with_socket("vsock:2:9", || notify("READY=1"));
        assert!(r.unwrap_err().to_string().contains("vsock"));
    }
}
