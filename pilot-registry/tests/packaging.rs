//! What the package ships besides the server, from the built binary:
//! `--version` (release, commit, wire protocol), the shell completions and
//! the man pages generated from the clap definitions.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// The subcommands a script or a reader of the man page must find.
const SUBCOMMANDS: [&str; 3] = ["audit", "completions", "man"];

fn registry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilot-registry"))
        .args(args)
        .output()
        .expect("run pilot-registry")
}

fn ok_stdout(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("UTF-8")
}

/// Runs `tool args` with `input` on stdin, if `tool` exists: (ok, stdout,
/// stderr), or None.
fn pipe(tool: &str, args: &[&str], input: &str) -> Option<(bool, String, String)> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    Some((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

#[test]
fn version_names_the_release_the_commit_and_the_wire_protocol() {
    let want = format!(
        "pilot-registry {} (commit {}, wire protocol {})\n",
        env!("CARGO_PKG_VERSION"),
        env!("PILOT_GIT_COMMIT"),
        pilot_proto::PROTOCOL_VERSION
    );
    assert_eq!(ok_stdout(registry(&["--version"])), want);
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok_stdout(registry(&["completions", shell]));
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no {sub}");
        }
        assert!(
            script.contains("--relay-only"),
            "{shell}: the server's flags"
        );
    }
    let bash = ok_stdout(registry(&["completions", "bash"]));
    if let Some((ok, _, err)) = pipe("bash", &["-n"], &bash) {
        assert!(ok, "bash -n refuses the script: {err}");
    }
    let page = ok_stdout(registry(&["man"]));
    assert!(page.contains(".TH pilot-registry 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("pilot\\-registry\\-{sub}(1)")),
            "{sub}"
        );
    }
    if let Some((ok, text, err)) = pipe("groff", &["-man", "-Tascii", "-P-cbou", "-ww"], &page) {
        assert!(ok && err.is_empty(), "groff: {err}");
        assert!(text.contains("--advertise"), "{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    ok_stdout(registry(&[
        "man",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]));
    for page in ["pilot-registry.1", "pilot-registry-audit-verify.1"] {
        assert!(dir.path().join(page).exists(), "{page}");
    }
}
