//! `pilot-registry`'s config file (TOML,
//! `/etc/pilot-registry/pilot-registry.toml` unless `--config` names
//! another): one key per flag, spelled like the flag (`relay-mbps = 400`,
//! `relay = ["192.0.2.1:7950"]` for the repeatable `--relay`). A flag given
//! on the command line (or by its environment variable) wins over the file;
//! the file wins over the defaults. `dist/pilot-registry.toml` is the
//! annotated example, checked against the flags by the tests below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::parser::ValueSource;
use clap::ArgMatches;
use ipnet::Ipv4Net;
use pilot_service::config::{self, ConfigError, ConfigFile};
use pilot_service::logging::LogFormat;
use serde::Deserialize;
use toml::Spanned;

use super::Cli;

/// Where the config file is read from without `--config`.
pub const DEFAULT_PATH: &str = "/etc/pilot-registry/pilot-registry.toml";

/// The file: every key optional, none unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RegistryFile {
    listen: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    database: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    relay_mbps: Option<Spanned<i64>>,
    control_rate: Option<Spanned<i64>>,
    relay_total_mbps: Option<Spanned<i64>>,
    require_token: Option<bool>,
    new_nodes_per_minute: Option<Spanned<i64>>,
    expire_unused: Option<Spanned<String>>,
    relay: Option<Vec<Spanned<String>>>,
    relay_only: Option<bool>,
    stun_alt_port: Option<Spanned<i64>>,
    tcp_listen: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    metrics: Option<Spanned<String>>,
    status_list_nodes: Option<bool>,
}

/// True if the argument `id` was given on the command line or by its
/// environment variable (so the file must not change it), before the
/// subcommand or (a global one) after it.
fn given(m: &ArgMatches, id: &str) -> bool {
    // `value_source` panics (in debug builds) on an id the matches do not
    // know, such as a top-level flag in a subcommand's matches.
    let here = |m: &ArgMatches| {
        m.try_get_raw(id).is_ok()
            && matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
    };
    here(m) || m.subcommand().is_some_and(|(_, s)| here(s))
}

/// Reads the config file (`--config`, else the default if it exists) and
/// fills in what the command line left open.
pub fn apply(cli: &mut Cli, m: &ArgMatches) -> Result<(), ConfigError> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let Some(file) = config::load::<RegistryFile>(&path, explicit)? else {
        return Ok(());
    };
    fill(&file, cli, m)
}

fn addr(
    file: &ConfigFile<RegistryFile>,
    key: &str,
    s: &Spanned<String>,
) -> Result<SocketAddr, ConfigError> {
    s.get_ref().parse().map_err(|_| {
        file.bad_value(
            key,
            s.span(),
            "expected an IP address and a UDP port, like \"192.0.2.1:7946\"",
        )
    })
}

/// A whole number, 0 or more, of `what`.
fn count(
    file: &ConfigFile<RegistryFile>,
    key: &str,
    v: &Spanned<i64>,
    what: &str,
) -> Result<u32, ConfigError> {
    u32::try_from(*v.get_ref()).map_err(|_| {
        file.bad_value(
            key,
            v.span(),
            format!("expected a whole number of {what}, 0 or more"),
        )
    })
}

fn fill(file: &ConfigFile<RegistryFile>, cli: &mut Cli, m: &ArgMatches) -> Result<(), ConfigError> {
    let v = &file.values;
    if let (Some(s), false) = (&v.listen, given(m, "listen")) {
        cli.listen = addr(file, "listen", s)?;
    }
    if let (Some(s), false) = (&v.advertise, given(m, "advertise")) {
        cli.advertise = Some(addr(file, "advertise", s)?);
    }
    if let (Some(d), false) = (&v.state_dir, given(m, "state_dir")) {
        cli.state_dir = relative_to(&file.path, d);
    }
    if let (Some(d), false) = (&v.database, given(m, "database")) {
        cli.database = Some(
            pilot_registry::storage_pg::parse_url(d.get_ref())
                .map_err(|e| file.bad_value("database", d.span(), e))?,
        );
    }
    if let (Some(n), false) = (&v.network, given(m, "network")) {
        let net: Ipv4Net = n.get_ref().parse().map_err(|_| {
            file.bad_value(
                "network",
                n.span(),
                "expected an IPv4 network like \"10.77.0.0/16\"",
            )
        })?;
        pilot_registry::pool::check_network(net)
            .map_err(|e| file.bad_value("network", n.span(), e.to_string()))?;
        cli.network = net;
    }
    if let (Some(r), false) = (&v.relay_mbps, given(m, "relay_mbps")) {
        cli.relay_mbps = u32::try_from(*r.get_ref()).map_err(|_| {
            file.bad_value(
                "relay-mbps",
                r.span(),
                "expected a whole number of megabits per second, 0 or more",
            )
        })?;
    }
    if let (Some(r), false) = (&v.relay_total_mbps, given(m, "relay_total_mbps")) {
        cli.relay_total_mbps = count(file, "relay-total-mbps", r, "megabits per second")?;
    }
    if let (Some(b), false) = (v.require_token, given(m, "require_token")) {
        cli.require_token = b;
    }
    if let (Some(r), false) = (&v.new_nodes_per_minute, given(m, "new_nodes_per_minute")) {
        cli.new_nodes_per_minute = count(file, "new-nodes-per-minute", r, "nodes per minute")?;
    }
    if let (Some(a), false) = (&v.expire_unused, given(m, "expire_unused")) {
        cli.expire_unused = pilot_registry::expiry::parse_unused(a.get_ref())
            .map_err(|e| file.bad_value("expire-unused", a.span(), e))?;
    }
    if let (Some(r), false) = (&v.control_rate, given(m, "control_rate")) {
        cli.control_rate = count(file, "control-rate", r, "messages per second")?;
    }
    if let (Some(list), false) = (&v.relay, given(m, "relays")) {
        cli.relays = list
            .iter()
            .map(|s| addr(file, "relay", s))
            .collect::<Result<_, _>>()?;
    }
    if let (Some(b), false) = (v.relay_only, given(m, "relay_only")) {
        cli.relay_only = b;
    }
    if let (Some(p), false) = (&v.stun_alt_port, given(m, "stun_alt_port")) {
        cli.stun_alt_port = Some(u16::try_from(*p.get_ref()).map_err(|_| {
            file.bad_value(
                "stun-alt-port",
                p.span(),
                "expected a UDP port from 0 (off) to 65535",
            )
        })?);
    }
    if let (Some(s), false) = (&v.tcp_listen, given(m, "tcp_listen")) {
        cli.tcp_listen = Some(s.get_ref().parse().map_err(|_| {
            file.bad_value(
                "tcp-listen",
                s.span(),
                "expected an IP address and a TCP port, like \"0.0.0.0:443\"",
            )
        })?);
    }
    if let (Some(l), false) = (&v.log, given(m, "log")) {
        pilot_service::logging::filter(l.get_ref()).map_err(|e| {
            file.bad_value("log", l.span(), e.to_string().replacen("--log ", "", 1))
        })?;
        cli.log = l.get_ref().clone();
    }
    if let (Some(f), false) = (v.log_format, given(m, "log_format")) {
        cli.log_format = f;
    }
    if let (Some(a), false) = (&v.metrics, given(m, "metrics")) {
        cli.metrics = Some(pilot_metrics::parse_listen(a.get_ref()).map_err(|e| {
            file.bad_value(
                "metrics",
                a.span(),
                format!(
                    "{e}; expected a port (\"9100\") or an address and port (\"127.0.0.1:9100\")"
                ),
            )
        })?);
    }
    if let (Some(b), false) = (v.status_list_nodes, given(m, "status_list_nodes")) {
        cli.status_list_nodes = b;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// Flags that are not settings of the server: where the file is.
    const NOT_IN_THE_FILE: &[&str] = &["config", "help", "version"];

    fn example() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dist/pilot-registry.toml"
        ))
        .expect("dist/pilot-registry.toml")
    }

    use pilot_service::config::{keys_of as keys, uncomment_example as uncommented};

    fn parse_with(file: &str, args: &[&str]) -> Result<Cli, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pilot-registry.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv = vec![
            "pilot-registry".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        let m = Cli::command().try_get_matches_from(&argv).unwrap();
        let mut cli = Cli::from_arg_matches(&m).unwrap();
        apply(&mut cli, &m)?;
        cli.config = None;
        Ok(cli)
    }

    #[test]
    fn every_flag_has_a_key_in_the_example() {
        let flags: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !NOT_IN_THE_FILE.contains(l))
            .map(str::to_string)
            .collect();
        assert!(flags.len() >= 10, "{flags:?}");
        let keys = keys(&uncommented(&example()));
        for f in &flags {
            assert!(
                keys.contains(f),
                "flag --{f} has no key in dist/pilot-registry.toml"
            );
        }
        for k in &keys {
            assert!(
                flags.contains(k),
                "key {k} in dist/pilot-registry.toml is no flag"
            );
        }
    }

    #[test]
    fn the_example_parses_commented_and_uncommented() {
        let e = example();
        parse_with(&e, &[]).expect("the example as shipped");
        parse_with(&uncommented(&e), &[]).expect("every key of the example set");
    }

    #[test]
    fn the_file_sets_what_the_flags_set() {
        let file = r#"
listen = "192.0.2.1:7000"
advertise = "198.51.100.1:7000"
state-dir = "/srv/reg"
database = "postgres://pilot:secret@192.0.2.5:5433/reg"
network = "10.99.0.0/16"
relay-mbps = 50
control-rate = 7
require-token = true
new-nodes-per-minute = 5
expire-unused = "30d"
relay-total-mbps = 900
relay = ["192.0.2.1:7010", "192.0.2.1:7011"]
relay-only = true
stun-alt-port = 0
tcp-listen = "192.0.2.1:443"
log = "debug"
log-format = "json"
"#;
        let from_file = parse_with(file, &[]).unwrap();
        let from_flags = parse_with(
            "",
            &[
                "--listen",
                "192.0.2.1:7000",
                "--advertise",
                "198.51.100.1:7000",
                "--state-dir",
                "/srv/reg",
                "--database",
                "postgres://pilot:secret@192.0.2.5:5433/reg",
                "--network",
                "10.99.0.0/16",
                "--relay-mbps",
                "50",
                "--control-rate",
                "7",
                "--require-token",
                "--new-nodes-per-minute",
                "5",
                "--expire-unused",
                "30d",
                "--relay-total-mbps",
                "900",
                "--relay",
                "192.0.2.1:7010",
                "--relay",
                "192.0.2.1:7011",
                "--relay-only",
                "--stun-alt-port",
                "0",
                "--tcp-listen",
                "192.0.2.1:443",
                "--log",
                "debug",
                "--log-format",
                "json",
            ],
        )
        .unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        assert_ne!(
            format!("{from_file:?}"),
            format!("{:?}", parse_with("", &[]).unwrap())
        );
        // Flags win, also a global one given after the subcommand.
        let cli = parse_with(
            file,
            &[
                "--listen",
                "192.0.2.9:1",
                "audit",
                "show",
                "--state-dir",
                "/x",
            ],
        )
        .unwrap();
        assert_eq!(cli.listen, "192.0.2.9:1".parse().unwrap());
        assert_eq!(cli.state_dir, PathBuf::from("/x"));
        assert_eq!(cli.relay_mbps, 50);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_key_line_and_what_is_expected() {
        let cases = [
            (
                "listen = \"192.0.2.1:1\"\nrelay_mbps = 5\n",
                "2: unknown key `relay_mbps`",
            ),
            ("network = \"8.8.0.0/16\"\n", "1: `network`: "),
            (
                "network = \"ten\"\n",
                "1: `network`: expected an IPv4 network",
            ),
            (
                "relay-mbps = -1\n",
                "1: `relay-mbps`: expected a whole number",
            ),
            (
                "relay = [\"192.0.2.1:1\",\n  \"x\"]\n",
                "2: `relay`: expected an IP address",
            ),
            (
                "control-rate = -5\n",
                "1: `control-rate`: expected a whole number of messages per second",
            ),
            (
                "stun-alt-port = 70000\n",
                "1: `stun-alt-port`: expected a UDP port",
            ),
            ("advertise = 5\n", "1: `advertise`: "),
            (
                "tcp-listen = \"443\"\n",
                "1: `tcp-listen`: expected an IP address and a TCP port",
            ),
            ("log-format = \"xml\"\n", "1: `log-format`: "),
            ("expire-unused = \"3 months\"\n", "1: `expire-unused`: "),
            (
                "database = \"/var/lib/pilot-registry/registry.db\"\n",
                "1: `database`: ",
            ),
        ];
        for (file, want) in cases {
            let e = parse_with(file, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{file:?}: {e}");
            assert!(e.contains("pilot-registry.toml:"), "names the file: {e}");
        }
    }
}
