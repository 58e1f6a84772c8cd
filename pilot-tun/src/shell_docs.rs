//! Shell completion scripts and man pages, generated from the clap
//! definitions of a command line (`pilot-tun completions`, `pilot-tun man`;
//! `pilot-registry completions`, `pilot-registry man`: its binary includes
//! this file), so they never drift from `--help`. `scripts/package.sh` puts
//! their output in the Debian package.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The completion script of `cmd` for `shell`. (Into memory: the
/// generator panics on a failed write, e.g. into a closed pipe.)
pub fn completions(mut cmd: clap::Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = vec![];
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// The man page of `cmd` (section 1, roff).
pub fn man_page(cmd: clap::Command) -> Vec<u8> {
    let mut out = vec![];
    // Writing into a Vec does not fail.
    let _ = clap_mangen::Man::new(cmd).render(&mut out);
    out
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is not
/// an error.
pub fn print(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes `<name>.1` and one page per subcommand (`<name>-<sub>.1`,
/// nested ones too) into `dir`, creating it. Returns the files written.
pub fn man_pages_to(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = vec![];
    write_pages(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    // The page of a subcommand is titled by its full name
    // (`pilot-tun-trust-approve`), as `man pilot-tun-trust-approve` finds it.
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, man_page(page))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// A stand-in command line with a nested subcommand.
    #[derive(Parser)]
    #[command(name = "demo", version = "9.9", about = "A demo")]
    struct Demo {
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Subcommand)]
    enum Sub {
        /// First.
        First,
        /// Nested.
        #[command(subcommand)]
        Group(Inner),
    }

    #[derive(Subcommand)]
    enum Inner {
        /// Leaf.
        Leaf,
    }

    #[test]
    fn every_subcommand_gets_its_own_page() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        let files = man_pages_to(Demo::command(), dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "demo.1",
                "demo-first.1",
                "demo-group.1",
                "demo-group-leaf.1"
            ]
        );
        let leaf = std::fs::read_to_string(dir.path().join("demo-group-leaf.1")).unwrap();
        assert!(leaf.contains(".TH demo-group-leaf 1"), "{leaf}");
    }
}
