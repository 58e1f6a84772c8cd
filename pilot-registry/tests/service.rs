//! The `pilot-registry` binary as systemd runs it: readiness over
//! `$NOTIFY_SOCKET` only once it serves, and start-up errors that say the
//! fix (a busy port names who holds it; a bad config file names the line).

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn registry(state: &std::path::Path, listen: &str) -> Command {
    // An empty config file of its own, so that no file of the host's counts.
    std::fs::write(state.join("none.toml"), "").unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pilot-registry"));
    c.args(["--listen", listen, "--stun-alt-port", "0", "--state-dir"])
        .arg(state)
        .arg("--config")
        .arg(state.join("none.toml"))
        .env_remove("PILOT_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Kills the child when the test ends, however it ends.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The registry answers a STUN binding request within `wait`.
fn answers_stun(port: u16, wait: Duration) -> bool {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let tid = [7u8; 12];
    s.send_to(
        &pilot_proto::stun::binding_request(&tid),
        ("127.0.0.1", port),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    match s.recv(&mut buf) {
        Ok(n) => pilot_proto::stun::parse_binding_response(&buf[..n], &tid).is_some(),
        Err(_) => false,
    }
}

#[test]
fn ready_is_sent_once_the_registry_serves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = free_port();
    let child = registry(&dir.path().join("state"), &format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn()
        .unwrap();
    let _reap = Reap(child);
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // At once, with the first datagram: it must be served.
    assert!(
        answers_stun(port, Duration::from_millis(500)),
        "READY=1 came before the registry served STUN ({msg:?} after {:?})",
        t0.elapsed()
    );
    assert!(
        msg.starts_with("READY=1\nSTATUS=serving 127.0.0.1:"),
        "{msg:?}"
    );
    assert!(msg.contains("network 10.77.0.0/16"), "{msg:?}");
}

#[test]
fn a_busy_port_names_its_holder_and_no_ready_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let out = registry(&dir.path().join("state"), &addr.to_string())
        .env("NOTIFY_SOCKET", &notify_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let me = std::process::id();
    assert!(
        err.contains(&format!("UDP port {} is in use by", addr.port()))
            && err.contains(&format!("(pid {me})"))
            && err.contains("--listen"),
        "{err}"
    );
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        notify.recv(&mut buf).is_err(),
        "no READY=1 from a registry that failed"
    );
}

#[test]
fn a_bad_config_file_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pilot-registry.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\nrelay-mbps = \"lots\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pilot-registry.toml:2: `relay-mbps`"), "{err}");
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal_and_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let port = free_port();
    for format in ["text", "json"] {
        // A state directory open to others: closed, and an info line says so.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("state"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let child = registry(&dir.path().join("state"), &format!("127.0.0.1:{port}"))
            .args(["--log-format", format, "--log", "debug"])
            .spawn()
            .unwrap();
        let mut reap = Reap(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_stun(port, Duration::from_millis(200)) {
            assert!(Instant::now() < deadline, "the registry did not come up");
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(reap.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(reap.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!stderr.is_empty(), "some log lines");
        assert!(
            !stderr.contains('\x1b'),
            "{format}: colour codes in {stderr:?}"
        );
        if format == "json" {
            for line in stderr.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string(),
                    "{line}"
                );
            }
        }
    }
}
