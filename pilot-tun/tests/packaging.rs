//! What the package ships besides the daemon, from the built binary:
//! `--version` (release, commit, wire protocol), the shell completions and
//! the man pages generated from the clap definitions.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use clap::CommandFactory;
use pilot_tun::cli::Cli;

fn pilot_tun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pilot-tun"))
        .args(args)
        .output()
        .expect("run pilot-tun")
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

/// True if `tool` runs here (`tool --version` succeeds).
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `tool args` with `input` on stdin; returns (status ok, stdout, stderr).
fn pipe(tool: &str, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn version_names_the_release_the_commit_and_the_wire_protocol() {
    let commit = env!("PILOT_GIT_COMMIT");
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "the build script's commit: {commit:?}"
    );
    let want = format!(
        "pilot-tun {} (commit {commit}, wire protocol {})\n",
        env!("CARGO_PKG_VERSION"),
        pilot_proto::PROTOCOL_VERSION
    );
    assert_eq!(ok_stdout(pilot_tun(&["--version"])), want);
    // Subcommands show the same line.
    assert_eq!(ok_stdout(pilot_tun(&["trust", "--version"])), {
        want.replacen("pilot-tun", "pilot-tun-trust", 1)
    });
}

fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect()
}

#[test]
fn completion_scripts_are_valid_and_know_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok_stdout(pilot_tun(&["completions", shell]));
        for sub in subcommands() {
            assert!(script.contains(&sub), "{shell}: no {sub}");
        }
    }
    let bash = ok_stdout(pilot_tun(&["completions", "bash"]));
    assert!(bash.contains("complete -F"), "{bash}");
    if have("bash") {
        let (ok, _, err) = pipe("bash", &["-n"], &bash);
        assert!(ok, "bash -n refuses the script: {err}");
    }
    let bad = pilot_tun(&["completions", "tcsh"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_man_page_renders_and_lists_every_subcommand() {
    let page = ok_stdout(pilot_tun(&["man"]));
    assert!(page.contains(".TH pilot-tun 1"), "{page}");
    assert!(page.contains(env!("PILOT_GIT_COMMIT")), "the version line");
    for sub in subcommands() {
        assert!(page.contains(&format!("pilot\\-tun\\-{sub}(1)")), "{sub}");
    }
    // Rendered by groff where it is installed: no warnings, and the
    // sections a reader looks for.
    if have("groff") {
        let (ok, text, err) = pipe("groff", &["-man", "-Tascii", "-P-cbou", "-ww"], &page);
        assert!(ok && err.is_empty(), "groff: {err}");
        for needle in ["NAME", "SYNOPSIS", "OPTIONS", "SUBCOMMANDS", "--state-dir"] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}

#[test]
fn man_out_dir_writes_a_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let said = ok_stdout(pilot_tun(&["man", "--out-dir", out.to_str().unwrap()]));
    assert!(said.starts_with("wrote "), "{said}");
    for page in ["pilot-tun.1", "pilot-tun-up.1", "pilot-tun-trust-approve.1"] {
        let text = std::fs::read_to_string(out.join(page)).expect(page);
        let title = page.trim_end_matches(".1");
        assert!(text.contains(&format!(".TH {title} 1")), "{page}");
    }
    // Into a place that cannot be a directory: exit 1 and the reason.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "").unwrap();
    let o = pilot_tun(&["man", "--out-dir", file.join("x").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot write the man pages"));
}
