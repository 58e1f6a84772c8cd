//! `pilot-registry audit verify|show` as an operator runs them: on the
//! state directory, without the server.

use std::process::Command;

use pilot_registry::audit::{Audit, Sink, REGISTRY_LOG};
use pilot_registry::state;

fn registry(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn verify_passes_then_names_the_changed_line() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let secret = state::load_or_create_key(&state_dir).unwrap();
    let (sink, thread) = Sink::spawn(&state_dir, REGISTRY_LOG, &secret).unwrap();
    let mut audit = Audit::new(sink);
    for n in 0..5u8 {
        audit.registered(
            pilot_proto::identity::NodeId([n; 16]),
            std::net::Ipv4Addr::new(10, 77, 0, n + 1),
            Some(format!("node{n}")),
        );
    }
    drop(audit);
    thread.join().unwrap();

    let (code, out) = registry(&state_dir, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit log intact: 8 lines"), "{out}");
    let head = out
        .split("signed head: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let (code, out) = registry(&state_dir, &["audit", "verify", "--expect-head", &head]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = registry(&state_dir, &["audit", "show"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("registration") && out.contains("node3"),
        "{out}"
    );

    // "node3" becomes "node7" on line 5.
    let path = state_dir.join(REGISTRY_LOG);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("node3", "node7")).unwrap();
    let (code, out) = registry(&state_dir, &["audit", "verify"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("NOT intact") && out.contains("line 5"),
        "{out}"
    );
}
