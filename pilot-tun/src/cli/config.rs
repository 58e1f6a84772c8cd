//! `pilot-tun`'s config file (TOML, `/etc/pilot-tun/pilot-tun.toml` unless
//! `--config` names another): one key per flag of `up`, spelled like the
//! flag (`no-offload = true`). A flag given on the command line (or by its
//! environment variable) wins over the file; the file wins over the
//! defaults. Every command reads `state-dir` from it, so `pilot-tun
//! status` finds the daemon the file configured. `dist/pilot-tun.toml` is
//! the annotated example, checked against the flags by the tests below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, ValueEnum};
use pilot_proto::join::JoinUrl;
use pilot_service::config::{self, ConfigError, ConfigFile};
use pilot_service::logging::LogFormat;
use serde::Deserialize;
use toml::Spanned;

use super::{Cipher, Common, UpArgs};
use crate::api::{ApiError, ErrorCode};

/// Where the config file is read from without `--config`.
pub const DEFAULT_PATH: &str = "/etc/pilot-tun/pilot-tun.toml";

/// The file: every key optional, none unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct UpFile {
    state_dir: Option<PathBuf>,
    registry: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    dns_domain: Option<Spanned<String>>,
    no_dns: Option<bool>,
    dev: Option<String>,
    listen: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    cipher: Option<Spanned<String>>,
    no_offload: Option<bool>,
    foreground: Option<bool>,
    log: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    metrics: Option<Spanned<String>>,
    metrics_per_peer: Option<bool>,
    rotate_identity_every: Option<Spanned<String>>,
    no_port_mapping: Option<bool>,
    no_gossip: Option<bool>,
}

/// True if the argument `id` was given on the command line or by its
/// environment variable (so the file must not change it).
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.try_get_raw(id).ok().and(m.value_source(id)),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

fn usage(e: ConfigError) -> ApiError {
    ApiError::new(ErrorCode::Usage, e.to_string())
}

/// Reads the config file (`--config`, else the default if it exists) and
/// fills in what the command line left open: `state-dir` for every
/// command, the rest for `up`. `m` holds the subcommand's matches (where
/// the global flags are too).
pub(super) fn apply(
    common: &mut Common,
    up: Option<&mut UpArgs>,
    m: &ArgMatches,
) -> Result<(), ApiError> {
    let (path, explicit) = match &common.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let Some(file) = config::load::<UpFile>(&path, explicit).map_err(usage)? else {
        return Ok(());
    };
    if let (Some(dir), false) = (&file.values.state_dir, given(m, "state_dir")) {
        common.state_dir = relative_to(&file.path, dir);
    }
    if let Some(up) = up {
        apply_up(&file, up, m).map_err(usage)?;
    }
    Ok(())
}

/// A relative path in the file is relative to the file's directory.
fn relative_to(file: &Path, p: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

fn apply_up(file: &ConfigFile<UpFile>, up: &mut UpArgs, m: &ArgMatches) -> Result<(), ConfigError> {
    let v = &file.values;
    let bad = |key: &str, s: &Spanned<String>, what: &str| file.bad_value(key, s.span(), what);
    if let (Some(r), false) = (&v.registry, given(m, "registry")) {
        r.get_ref().parse::<JoinUrl>().map_err(|e| {
            bad(
                "registry",
                r,
                &format!(
                    "{e}; expected the join URL pilot-registry printed (pilot://<key>@<ip:port>)"
                ),
            )
        })?;
        up.registry = Some(r.get_ref().clone());
    }
    if let (Some(n), false) = (&v.name, given(m, "name")) {
        // Made into a label at `up`, like --name; only a name with
        // nothing usable in it is refused here.
        if crate::hostname::normalize(n.get_ref()).is_none() {
            return Err(bad(
                "name",
                n,
                "expected a hostname: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        up.name = Some(n.get_ref().clone());
    }
    if let (Some(d), false) = (&v.dns_domain, given(m, "dns_domain")) {
        crate::dns::Domain::parse(d.get_ref()).map_err(|e| {
            bad(
                "dns-domain",
                d,
                &format!("{e}; expected a domain like \"pilot\""),
            )
        })?;
        up.dns_domain = d.get_ref().clone();
    }
    if let (Some(b), false) = (v.no_dns, given(m, "no_dns")) {
        up.no_dns = b;
    }
    if let (Some(d), false) = (&v.dev, given(m, "dev")) {
        up.dev = d.clone();
    }
    if let (Some(l), false) = (&v.listen, given(m, "listen")) {
        let a = l.get_ref().parse::<SocketAddr>().map_err(|_| {
            bad(
                "listen",
                l,
                "expected an IP address and a UDP port, like \"0.0.0.0:41641\"",
            )
        })?;
        up.listen = Some(a);
    }
    if let (Some(mtu), false) = (&v.mtu, given(m, "mtu")) {
        let n = u16::try_from(*mtu.get_ref())
            .ok()
            .filter(|n| *n >= 576)
            .ok_or_else(|| {
                file.bad_value(
                    "mtu",
                    mtu.span(),
                    "expected a whole number from 576 to 65535",
                )
            })?;
        up.mtu = Some(n);
    }
    if let (Some(c), false) = (&v.cipher, given(m, "cipher")) {
        up.cipher = Cipher::from_str(c.get_ref(), false).map_err(|_| {
            bad(
                "cipher",
                c,
                "expected \"aes256-gcm\" or \"chacha20-poly1305\"",
            )
        })?;
    }
    if let (Some(b), false) = (v.no_offload, given(m, "no_offload")) {
        up.no_offload = b;
    }
    if let (Some(b), false) = (v.foreground, given(m, "foreground")) {
        up.foreground = b;
    }
    if let (Some(l), false) = (&v.log, given(m, "log")) {
        pilot_service::logging::filter(l.get_ref())
            .map_err(|e| bad("log", l, &e.to_string().replacen("--log ", "", 1)))?;
        up.log = l.get_ref().clone();
    }
    if let (Some(f), false) = (v.log_format, given(m, "log_format")) {
        up.log_format = f;
    }
    if let (Some(a), false) = (&v.metrics, given(m, "metrics")) {
        up.metrics = Some(pilot_metrics::parse_listen(a.get_ref()).map_err(|e| {
            bad(
                "metrics",
                a,
                &format!(
                    "{e}; expected a port (\"9464\") or an address and port (\"127.0.0.1:9464\")"
                ),
            )
        })?);
    }
    if let (Some(b), false) = (v.metrics_per_peer, given(m, "metrics_per_peer")) {
        up.metrics_per_peer = b;
    }
    if let (Some(b), false) = (v.no_port_mapping, given(m, "no_port_mapping")) {
        up.no_port_mapping = b;
    }
    if let (Some(b), false) = (v.no_gossip, given(m, "no_gossip")) {
        up.no_gossip = b;
    }
    if let (Some(a), false) = (&v.rotate_identity_every, given(m, "rotate_identity_every")) {
        up.rotate_identity_every = Some(
            pilot_proto::lifetime::parse(a.get_ref())
                .map_err(|e| bad("rotate-identity-every", a, &e.to_string()))?,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Cli;
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// Flags that are not settings of the daemon: where the file is, and
    /// how this one invocation prints and waits.
    const NOT_IN_THE_FILE: &[&str] = &["config", "json", "timeout", "help", "version"];

    fn example() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dist/pilot-tun.toml"
        ))
        .expect("dist/pilot-tun.toml")
    }

    use pilot_service::config::{keys_of as keys, uncomment_example as uncommented};

    /// Parses `argv` with `file` as the config file.
    fn parse_with(file: &str, args: &[&str]) -> Result<(Common, UpArgs), ApiError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pilot-tun.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv = vec![
            "pilot-tun".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        let matches = Cli::command().try_get_matches_from(&argv).unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        let (_, sub) = matches.subcommand().unwrap();
        let super::super::Command::Up(mut up) = cli.command else {
            panic!("not up")
        };
        apply(&mut cli.common, Some(&mut up), sub)?;
        cli.common.config = None;
        Ok((cli.common, up))
    }

    #[test]
    fn every_flag_of_up_has_a_key_in_the_example() {
        let cmd = Cli::command();
        let up = cmd.find_subcommand("up").unwrap();
        let flags: Vec<String> = cmd
            .get_arguments()
            .chain(up.get_arguments())
            .filter_map(|a| a.get_long())
            .filter(|l| !NOT_IN_THE_FILE.contains(l))
            .map(str::to_string)
            .collect();
        assert!(flags.len() >= 11, "{flags:?}");
        let text = uncommented(&example());
        let keys = keys(&text);
        for f in &flags {
            assert!(
                keys.contains(f),
                "flag --{f} has no key in dist/pilot-tun.toml"
            );
        }
        for k in &keys {
            assert!(
                flags.contains(k),
                "key {k} in dist/pilot-tun.toml is no flag of up"
            );
        }
    }

    #[test]
    fn the_example_parses_commented_and_uncommented() {
        let e = example();
        parse_with(&e, &["up"]).expect("the example as shipped");
        parse_with(&uncommented(&e), &["up"]).expect("every key of the example set");
    }

    #[test]
    fn the_file_sets_what_the_flags_set() {
        let file = r#"
state-dir = "/srv/pilot"
registry = "pilot://0000000000000000000000000000000000000000000000000000000000000000@192.0.2.1:7946"
name = "alpha"
dns-domain = "corp.pilot"
no-dns = true
dev = "pt7"
listen = "192.0.2.5:41641"
mtu = 1380
cipher = "chacha20-poly1305"
no-offload = true
foreground = true
log = "debug"
log-format = "json"
"#;
        let from_file = parse_with(file, &["up"]).unwrap();
        let from_flags = parse_with(
            "",
            &[
                "--state-dir",
                "/srv/pilot",
                "up",
                "--registry",
                "pilot://0000000000000000000000000000000000000000000000000000000000000000@192.0.2.1:7946",
                "--name",
                "alpha",
                "--dns-domain",
                "corp.pilot",
                "--no-dns",
                "--dev",
                "pt7",
                "--listen",
                "192.0.2.5:41641",
                "--mtu",
                "1380",
                "--cipher",
                "chacha20-poly1305",
                "--no-offload",
                "--foreground",
                "--log",
                "debug",
                "--log-format",
                "json",
            ],
        )
        .unwrap();
        assert_eq!(from_file, from_flags);
        let defaults = parse_with("", &["up"]).unwrap();
        assert_ne!(from_file.1, defaults.1);
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = "state-dir = \"/srv/a\"\ndev = \"pt7\"\nmtu = 1380\nlog = \"debug\"\n";
        let (common, up) = parse_with(
            file,
            &[
                "--state-dir",
                "/srv/b",
                "up",
                "--dev",
                "pt9",
                "--log",
                "warn",
            ],
        )
        .unwrap();
        assert_eq!(common.state_dir, PathBuf::from("/srv/b"));
        assert_eq!(
            (up.dev.as_str(), up.mtu, up.log.as_str()),
            ("pt9", Some(1380), "warn")
        );
        // The global flag after the subcommand counts too.
        let (common, _) = parse_with(file, &["up", "--state-dir", "/srv/c"]).unwrap();
        assert_eq!(common.state_dir, PathBuf::from("/srv/c"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_key_line_and_what_is_expected() {
        let cases = [
            (
                "dev = \"x\"\nno_offload = true\n",
                "2: unknown key `no_offload`",
            ),
            (
                "\n\nmtu = 100\n",
                "3: `mtu`: expected a whole number from 576 to 65535",
            ),
            ("mtu = \"big\"\n", "1: `mtu`: "),
            (
                "listen = \"nowhere\"\n",
                "1: `listen`: expected an IP address",
            ),
            (
                "cipher = \"rot13\"\n",
                "1: `cipher`: expected \"aes256-gcm\"",
            ),
            ("registry = \"http://x\"\n", "1: `registry`: "),
            // "-x" would be made into "x"; nothing is left of "_-_".
            ("name = \"_-_\"\n", "1: `name`: expected a hostname"),
            ("dns-domain = \"a..b\"\n", "1: `dns-domain`: "),
            ("log = \"x=loud\"\n", "1: `log`: "),
            ("log-format = \"xml\"\n", "1: `log-format`: "),
            ("foreground = \"yes\"\n", "1: `foreground`: "),
        ];
        for (file, want) in cases {
            let e = parse_with(file, &["up"]).unwrap_err();
            assert_eq!(e.code, ErrorCode::Usage, "{file}");
            assert!(e.error.contains(want), "{file:?}: {}", e.error);
            assert!(
                e.error.contains("pilot-tun.toml:"),
                "names the file: {}",
                e.error
            );
        }
    }

    #[test]
    fn a_missing_chosen_file_is_an_error() {
        let argv = [
            "pilot-tun",
            "--config",
            "/nonexistent/pilot-tun.toml",
            "status",
        ];
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        let e = apply(&mut cli.common, None, matches.subcommand().unwrap().1).unwrap_err();
        assert!(
            e.error.contains("/nonexistent/pilot-tun.toml"),
            "{}",
            e.error
        );
    }
}
