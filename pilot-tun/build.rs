//! Build script of pilot-tun and pilot-registry (the registry's Cargo.toml
//! names this file): sets `PILOT_GIT_COMMIT`, the short commit hash the
//! `--version` line shows.
//!
//! The hash comes from `PILOT_GIT_COMMIT` in the environment if set (for
//! builds from a source tarball that know their commit), else from
//! `git rev-parse --short HEAD`, else it is "unknown": a build without git
//! or outside a checkout never fails because of it.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PILOT_GIT_COMMIT");
    let commit = std::env::var("PILOT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PILOT_GIT_COMMIT={commit}");

    // Run again when HEAD moves: a commit, a checkout, a fetch that
    // repacks the refs. Only these files (those that exist: a missing one
    // would rerun it every time), so an edit of the sources does not.
    let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watch.into_iter().flatten() {
        if PathBuf::from(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
