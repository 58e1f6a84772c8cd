//! `pilot-registry --network` is bounded at startup (issue 10, finding 1):
//! nodes install the network as a route, so a registry must not hand out a
//! public range or a huge prefix. The real binary, on loopback; every
//! process it starts is killed by its handle, also when a check fails.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A registry process, killed when dropped.
struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(network: &str, state: &Path) -> Registry {
    let child = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--stun-alt-port",
            "0",
            "--log",
            "warn",
        ])
        .arg("--state-dir")
        .arg(state)
        .args(["--network", network])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pilot-registry");
    Registry(child)
}

/// How a start ended within a few seconds: refused (its error text), or
/// serving (the line naming its network).
#[derive(Debug)]
enum Start {
    Refused(String),
    Serving(String),
}

fn outcome(network: &str, state: &Path) -> Start {
    let mut r = start(network, state);
    let stdout = r.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("network:") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) => Start::Serving(line),
        Err(_) => {
            // It printed no network line: it must have exited, refusing.
            let status = r.0.wait().expect("wait for pilot-registry");
            let mut err = String::new();
            r.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert_eq!(status.code(), Some(1), "{err}");
            Start::Refused(err)
        }
    }
}

#[test]
fn a_public_range_or_a_huge_or_tiny_prefix_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    for (network, says) in [
        ("10.0.0.0/4", "between /8 and /28"),
        ("0.0.0.0/1", "between /8 and /28"),
        ("10.9.0.0/29", "between /8 and /28"),
        ("172.0.0.0/8", "not a private range"),
        ("8.8.0.0/16", "not a private range"),
        ("10.77.1.5/16", "10.77.0.0/16"),
    ] {
        let state = dir.path().join("refused");
        match outcome(network, &state) {
            Start::Refused(err) => {
                assert!(err.contains("--network"), "{network}: {err}");
                assert!(err.contains(says), "{network}: {err}");
                assert!(
                    !state.exists(),
                    "{network}: refused before any state is made"
                );
            }
            Start::Serving(line) => panic!("{network} was accepted: {line}"),
        }
    }
}

#[test]
fn a_private_range_within_bounds_is_served() {
    let dir = tempfile::tempdir().unwrap();
    for network in ["100.64.0.0/10", "192.168.7.0/28"] {
        match outcome(network, &dir.path().join("state")) {
            Start::Serving(line) => assert!(line.contains(network), "{line}"),
            Start::Refused(err) => panic!("{network} was refused: {err}"),
        }
    }
}
