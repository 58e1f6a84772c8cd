//! The `pilot-tun` command line: parses arguments, starts the daemon or
//! sends it one request, and prints the answer as text or as the JSON
//! documents of [`crate::api`].

use std::ffi::OsString;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use pilot_proto::cert::{Certificate, OwnerKey, Revocation};
use pilot_proto::identity::NodeId;
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::PeerRef;
use pilot_proto::ports::Scope;
use pilot_proto::session::CipherSuite;
use pilot_service::logging::{self, LogFormat};
use pilot_service::{caps, notify, rotate};
use serde::Serialize;
use std::os::unix::fs::OpenOptionsExt;

use crate::api::{
    self, exit, ApiError, Endpoint, ErrorCode, ErrorReport, GrantView, Reply, Request, Status,
};
use crate::control;
use crate::node::{Node, NodeConfig, StartError};
use crate::sanitize::printable;
use crate::state::StateDir;
use crate::tun::{KernelTun, TunConfig};

mod config;

/// pilot-tun: a permanent 10.x address for this host on an encrypted overlay
/// network, reachable only by peers that both sides approved.
///
/// Start with `sudo pilot-tun up --registry <join-url> --name <host>`; the
/// join URL is printed by `pilot-registry`. Then ask a peer for trust with
/// `pilot-tun trust request <peer>`; once its operator runs
/// `pilot-tun trust approve <you>`, any program can reach it at its 10.x
/// address (ssh, curl, iperf3, ...).
///
/// Peers are named by hostname, 10.x address or node id.
#[derive(Parser, Debug)]
#[command(
    version = VERSION.as_str(),
    about,
    long_about,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// `--version`: the release, the commit it was built from (see build.rs)
/// and the wire protocol it speaks.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (commit {}, wire protocol {})",
        env!("CARGO_PKG_VERSION"),
        env!("PILOT_GIT_COMMIT"),
        pilot_proto::PROTOCOL_VERSION
    )
});

/// The exit codes, for `--help` (the README has the same table).
const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 the command failed (the message says why; with --json, \
the error's \"code\" field); 2 bad arguments; 3 no daemon runs for the state \
directory; 4 permission denied (run with sudo); 5 timed out or the registry is \
unreachable (try again later). With --json, every error is one JSON line on \
stdout: {\"ok\": false, \"error\": \"...\", \"code\": \"...\"}.";

/// Options every command takes.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
struct Common {
    /// The daemon's state directory (keys, trust store, control socket).
    /// One daemon per state directory; use one per network namespace.
    #[arg(
        long,
        global = true,
        env = "PILOT_STATE_DIR",
        default_value = "/var/lib/pilot-tun"
    )]
    state_dir: PathBuf,
    /// Print machine-readable JSON instead of text (errors too); the README
    /// documents every document ("JSON output").
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the daemon's answer (`ping` adds the time its
    /// echoes take).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 15)]
    timeout: u64,
    /// Config file (TOML; one key per flag of `up`, flags win over it).
    /// Default: /etc/pilot-tun/pilot-tun.toml if it exists.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the daemon: create the interface, register, and return once the
    /// interface is up with its address (stays in the foreground with
    /// --foreground).
    Up(UpArgs),
    /// Stop the daemon; the interface goes away with it.
    Down,
    /// Address, node id, registry reachability, peer count.
    Status,
    /// Every known peer: trust state, endpoint, last handshake, bytes.
    Peers,
    /// Ask for, grant, refuse and withdraw trust.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Read and check the audit log: what this node decided and refused,
    /// in a hash chain the node key signs. Works without the daemon.
    #[command(subcommand, long_about = AUDIT_ABOUT)]
    Audit(AuditCommand),
    /// Fleet owner keys (kept off the nodes): make one, certify nodes with
    /// tags, revoke a node for good. `new` and `sign` need no daemon.
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// This node's owner certificate: install the one `owner sign` wrote,
    /// or show it.
    #[command(subcommand)]
    Cert(CertCommand),
    /// This node's identity: rotate its keys, keeping its address, name,
    /// trust and grants (peers follow a succession signed by both keys).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Policy rules: admit peers whose owner certificate carries a tag,
    /// with no request or approval typed (their rules must admit this
    /// node too).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Whether traffic would pass to and from a peer, and which grant
    /// decided (or why nothing passes).
    Explain {
        /// Hostname, 10.x address or node id.
        peer: String,
        /// The traffic to judge: `tcp/22`, `udp/53` or `icmp`. Without it,
        /// what is open each way.
        traffic: Option<String>,
    },
    /// Measure round trips through the tunnel to a trusted peer, and show the
    /// path (direct endpoint or relay, and why). Exits 1 if no echo came back.
    Ping {
        /// Hostname, 10.x address or node id.
        peer: String,
        /// How many echoes (200 ms apart, at most 100).
        #[arg(short, long, default_value_t = 3)]
        count: u32,
    },
    /// Check the network path to the registry: whether UDP works, the NAT
    /// type and public endpoint, the registry's and a relay's round trips,
    /// and whether the gateway answers NAT-PMP or PCP. Works with or
    /// without a daemon running (from a UDP socket of its own). Exits 0 if
    /// all is well, 5 if UDP to the registry gets no answer, 1 if the
    /// registry answers but the handshake or the pings fail.
    Netcheck {
        /// The registry's join URL. Default: the running daemon's, else
        /// the one saved in the state directory.
        #[arg(long)]
        registry: Option<String>,
        /// A relay-only instance to time as well (ip:port). Default: the
        /// one the running daemon uses, if any.
        #[arg(long)]
        relay: Option<SocketAddr>,
    },
    /// Print a shell completion script, e.g.
    /// `pilot-tun completions bash > /etc/bash_completion.d/pilot-tun`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: crate::shell_docs::Shell,
    },
    /// The overlay's DNS server: `dns print` gives the lines that make
    /// this host's resolver ask it for `*.pilot`.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// Print the man page (roff: `pilot-tun man | man -l -`), or with
    /// --out-dir write it and one page per subcommand there.
    Man {
        /// Write pilot-tun.1, pilot-tun-up.1, ... into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum DnsCommand {
    /// Print the systemd-resolved commands and the /etc/resolv.conf line
    /// for the running daemon's DNS server (with --json: status's `dns`).
    Print,
}

/// What a peer may open on this node: `--allow` and `--expires`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
struct GrantArgs {
    /// What the peer may open on this node: connections it starts, by
    /// protocol and destination port, e.g. `tcp/8080,tcp/9000-9100,udp/53,icmp`
    /// (`all` is everything, the default). Replies to connections this node
    /// opens always pass. Both ends enforce it: this node drops what is
    /// outside, and the peer refuses it locally at once.
    #[arg(long, value_name = "PORTS")]
    allow: Option<Scope>,
    /// How long the grant lasts (`8h`, `30d`, `90m`; at most 365d); it
    /// ends on time even with the registry down. Default: until revoked.
    #[arg(long, value_name = "LIFETIME", value_parser = parse_lifetime)]
    expires: Option<u64>,
}

fn parse_lifetime(s: &str) -> Result<u64, String> {
    pilot_proto::lifetime::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum OwnerCommand {
    /// Make an owner key (Ed25519); prints its public form for
    /// `policy allow --owner`. Keep the file off the nodes.
    New {
        /// Where to write the secret key (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Certify a node: bind its node id to tags, for a bounded time.
    Sign {
        /// The owner key file.
        #[arg(long)]
        key: PathBuf,
        /// The node id to certify (`pilot-tun status` on it shows it).
        #[arg(long)]
        node: String,
        /// Its tags, comma-separated (1-8 of a-z, 0-9, '-').
        #[arg(long)]
        tags: String,
        /// How long it is valid (default 30d, at most 365d; renew by
        /// signing again).
        #[arg(long, value_parser = parse_lifetime, default_value = "30d")]
        expires: u64,
        /// Where to write the certificate (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a node for good (and every successor of it): hands the
    /// signed revocation to this host's daemon, which sends it to the
    /// registry; every node with a rule for this owner drops the node.
    Revoke {
        /// The owner key file.
        #[arg(long)]
        key: PathBuf,
        /// The node id to revoke.
        #[arg(long)]
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Give the daemon its certificate (checked: it must be for this node
    /// and valid); it presents it to peers and to the registry.
    Install {
        /// The file `owner sign` wrote.
        file: PathBuf,
    },
    /// The installed certificate.
    Show,
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Make new keys and a succession statement signed by the old and the
    /// new key. The registry moves this node's address and hostname to the
    /// new node id; every peer that trusted the old id moves its trust and
    /// grants to the new one when it verifies the statement (no action on
    /// their side); the old id is refused from then on, also after a leak
    /// of its key. The daemon restarts under the new identity at once;
    /// sessions handshake again within seconds. A certificate follows the
    /// rotation until it expires, for peers that saw the succession.
    Rotate,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Admit peers whose certificate from OWNER carries TAG, to PORTS.
    Allow {
        /// The owner's public key (`owner new` printed it).
        #[arg(long)]
        owner: String,
        /// The tag a peer's certificate must carry.
        #[arg(long)]
        tag: String,
        /// What such a peer may open here, e.g. `tcp/8080,udp/53,icmp`
        /// (default: all).
        #[arg(long, value_name = "PORTS")]
        ports: Option<Scope>,
        /// How long the rule lasts (`24h`, `30d`); default: until removed.
        #[arg(long, value_name = "LIFETIME", value_parser = parse_lifetime)]
        expires: Option<u64>,
    },
    /// The rules.
    List,
    /// Remove a rule; peers admitted only by it lose their approval.
    Remove {
        /// The rule's id (`policy list`).
        id: u32,
    },
}

#[derive(Subcommand, Debug)]
enum TrustCommand {
    /// Ask a peer for mutual trust (this also approves it on our side).
    Request {
        /// Hostname, 10.x address or node id.
        peer: String,
        /// A note shown to the peer's operator.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        grant: GrantArgs,
        /// What we ask to open on the peer, shown to its operator in
        /// `trust pending` (asking grants nothing: its operator decides).
        #[arg(long, value_name = "PORTS")]
        want: Option<Scope>,
    },
    /// Requests from peers waiting for our answer.
    Pending,
    /// Approve a peer (normally one that asked us). Approving again
    /// replaces the grant: narrow it, widen it or renew its expiry.
    Approve {
        /// Hostname, 10.x address or node id.
        peer: String,
        #[command(flatten)]
        grant: GrantArgs,
    },
    /// Refuse a peer's request.
    Deny {
        /// Hostname, 10.x address or node id.
        peer: String,
    },
    /// Withdraw trust: the session ends at once on both sides.
    Revoke {
        /// Hostname, 10.x address or node id.
        peer: String,
    },
    /// All trust records.
    List,
}

/// `audit --help`.
const AUDIT_ABOUT: &str = "\
Read and check the audit log: what this node decided and refused, in a hash chain the node key signs.

The daemon appends one JSON line per event to <state-dir>/audit.jsonl: trust requests, approvals, denials and revocations (with the SHA-256 of each signed statement, sent or received), pending requests forgotten, handshakes refused (counted per source and minute), start and stop. Each line carries the hash of the line before; a checkpoint line signed by the node key follows every 100 entries, comes every 5 minutes while entries wait, and when the daemon stops. Files rotate at 16 MiB (4 old ones kept) without breaking the chain.

These commands read the files directly, so they work whether or not the daemon runs (they need read access to the state directory: run them as the daemon's user, usually with sudo).

A typical routine: run `pilot-tun audit head` now and then and keep what it prints somewhere the node cannot write (a ticket, another host). Later, `pilot-tun audit verify --expect-head <that head>` proves that nothing up to it was changed, removed or reordered; without a head, verify proves the log is one unbroken signed chain, but not that whole lines were not cut from its end or whole old files removed.";

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// The entries, oldest first (text: one line each; --json: every field).
    Show {
        /// Only entries written since this time: RFC 3339
        /// (2025-07-01T12:00:00Z, 2025-07-01T14:00:00+02:00) or an age
        /// (10m, 2h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Check the whole chain: every hash link and every checkpoint
    /// signature (against the node key in identity.key). Exit 0: intact;
    /// exit 1: the first line that was changed, removed, inserted or moved
    /// is named. Reports the last signed head and how many entries after it
    /// are not signed yet.
    Verify {
        /// A head printed earlier by `audit head` (`<seq>:<hash>`): the
        /// line with that seq must still be there, unchanged, so nothing
        /// up to it was rewritten or cut.
        #[arg(long, value_name = "HEAD")]
        expect_head: Option<String>,
    },
    /// Print the last signed head (`<seq>:<hash>`), to keep elsewhere and
    /// give back to `audit verify --expect-head`. Fails if the log does not
    /// verify.
    Head,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Cipher {
    /// AES-256-GCM (fastest with AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (for CPUs without AES instructions).
    Chacha20Poly1305,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
struct UpArgs {
    /// The registry's join URL (pilot://<key>@<ip:port>). Remembered, so a
    /// later `up` may leave it out. A registry run as several instances is
    /// named by all of them (pilot://<key>@<ip:port>,<ip:port>, up to 8,
    /// IPv6 as [addr]:port): the node uses one and moves to the next within
    /// about 5 s when it stops answering.
    #[arg(long)]
    registry: Option<String>,
    /// Hostname to claim (first come; peers can use it instead of the
    /// address, and it resolves as <name>.pilot). Default: this machine's
    /// hostname. Made into a DNS label (lower case, other characters
    /// become '-', at most 63); a name another node holds becomes
    /// <name>-2, <name>-3, ...
    #[arg(long)]
    name: Option<String>,
    /// The overlay's DNS domain: the daemon answers <name>.<domain> for
    /// itself and the peers it approved, to programs on this host, at its
    /// overlay address, port 53.
    #[arg(long, value_name = "DOMAIN", default_value = crate::dns::DEFAULT_DOMAIN)]
    dns_domain: String,
    /// Serve no DNS.
    #[arg(long)]
    no_dns: bool,
    /// Interface name.
    #[arg(long, default_value = "pilot0")]
    dev: String,
    /// UDP address for tunnels (default: the port used last time, or any).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Upper bound for the interface MTU. Without it the MTU follows the
    /// underlay: the narrowest route to the registry and the peers, minus
    /// the tunnel's overhead (1420 on a 1500 underlay), re-checked every
    /// 10 s; it never goes below 576.
    #[arg(long, value_parser = clap::value_parser!(u16).range(576..))]
    mtu: Option<u16>,
    /// Data cipher for sessions this node starts.
    #[arg(long, value_enum, default_value = "aes256-gcm")]
    cipher: Cipher,
    /// Turn off TUN and UDP offloads (one packet per system call).
    #[arg(long)]
    no_offload: bool,
    /// Stay in the foreground (logs to stderr) instead of detaching.
    #[arg(long)]
    foreground: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    /// A port alone listens on 127.0.0.1.
    #[arg(long, value_name = "ADDR", value_parser = pilot_metrics::parse_listen)]
    metrics: Option<SocketAddr>,
    /// Add per-peer series (node id and hostname labels) to the metrics.
    /// Off by default: they tell whoever can scrape whom this node trusts.
    #[arg(long, requires = "metrics")]
    metrics_per_peer: bool,
    /// Rotate this node's identity when the current one is this old
    /// (`30d`, `12h`; at most 365d), as `pilot-tun identity rotate` does:
    /// new keys, same address, name, trust and grants. Off by default.
    #[arg(long, value_name = "AGE", value_parser = parse_lifetime)]
    rotate_identity_every: Option<u64>,
    /// Do not ask the gateway for a port mapping. By default the node asks
    /// its default gateway (NAT-PMP) to forward a public UDP port to the
    /// tunnel port, renews it while it runs and removes it at `down`; behind
    /// a NAT that gives every destination a new port, that mapping is what
    /// lets peers reach this node directly.
    #[arg(long)]
    no_port_mapping: bool,
    /// Do not gossip with trusted peers. By default the node gives its
    /// signed endpoints to the peers it has a session with, asks them
    /// where a peer is when the registry cannot say, and hands them its
    /// withdrawals of trust to pass on: so the network heals while the
    /// registry is away. Gossip never creates trust.
    #[arg(long)]
    no_gossip: bool,
    /// Log filter, e.g. `info` or `pilot_tun=debug`.
    #[arg(long, env = "PILOT_LOG", default_value = "info")]
    log: String,
    /// Log lines as text or as JSON objects (one a line). Colour only on
    /// a terminal; no timestamps of our own under journald.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// What a command ends with: an exit code, or an error to report.
type Outcome = Result<u8, ApiError>;

fn failed(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// Writes a line to stdout; a closed pipe (`pilot-tun peers | head -1`) is
/// not an error worth a panic.
/// Prints a line for people. Every string in it may come from a peer or the
/// registry, so each line is made printable (no control, escape or bidi
/// characters) on its way out.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), "{}", printable_lines(&format!($($arg)*)));
    }};
}

/// Prints JSON as is: serde escapes control characters, and the data must
/// reach scripts unaltered.
macro_rules! say_json {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `text` with each line made printable; the line breaks stay.
fn printable_lines(text: &str) -> String {
    text.split('\n')
        .map(printable)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let json = wants_json(&argv);
    let cli = match parse(&argv) {
        Ok(cli) => cli,
        Err(Ok(e)) => return ExitCode::from(usage_error(e, json)),
        Err(Err(e)) => return ExitCode::from(report(&e, json)),
    };
    let json = cli.common.json;
    let code = match run(cli, &argv) {
        Ok(code) => code,
        Err(e) => report(&e, json),
    };
    ExitCode::from(code)
}

/// The arguments, with what the config file sets where they left it open:
/// a bad argument (clap's error) or a bad config file.
fn parse(argv: &[OsString]) -> Result<Cli, Result<clap::Error, ApiError>> {
    let matches = Cli::command().try_get_matches_from(argv).map_err(Ok)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(Ok)?;
    let sub = matches.subcommand().map_or(&matches, |(_, m)| m);
    let up = match &mut cli.command {
        Command::Up(a) => Some(a),
        _ => None,
    };
    config::apply(&mut cli.common, up, sub).map_err(Err)?;
    Ok(cli)
}

/// True if `--json` is among the arguments (before a `--`).
fn wants_json(argv: &[OsString]) -> bool {
    argv.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Bad arguments: clap's own message, or under --json the same as one
/// JSON error line. Help and version are not errors.
fn usage_error(e: clap::Error, json: bool) -> u8 {
    use clap::error::ErrorKind;
    let is_info = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    if !json || is_info {
        let _ = e.print();
        return if is_info { exit::OK } else { exit::USAGE };
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("bad arguments");
    let msg = format!(
        "{} (see `pilot-tun --help`)",
        first.trim_start_matches("error: ")
    );
    report(&failed(ErrorCode::Usage, msg), true)
}

/// Prints an error (one JSON line on stdout under --json, a sentence on
/// stderr otherwise) and returns its exit code.
fn report(e: &ApiError, json: bool) -> u8 {
    if json {
        print_compact(&ErrorReport::from(e));
    } else {
        eprintln!("pilot-tun: error: {}", printable(&e.to_string()));
    }
    e.code.exit_code()
}

fn print_compact<T: Serialize>(v: &T) {
    // These types always serialize (plain structs, string keys).
    say_json!("{}", serde_json::to_string(v).unwrap_or_default());
}

fn print_pretty<T: Serialize>(v: &T) {
    say_json!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ApiError> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().map_err(|e| {
        failed(
            ErrorCode::Failed,
            format!("cannot start the async runtime: {e}"),
        )
    })
}

/// Checks that a string can name a peer before bothering the daemon.
fn check_peer(peer: &str) -> Result<(), ApiError> {
    match peer.parse::<PeerRef>() {
        Ok(PeerRef::Name(n)) if !pilot_proto::messages::valid_hostname(&n) => Err(failed(
            ErrorCode::Usage,
            format!("{peer:?} cannot name a peer: give its hostname (1-63 of a-z, 0-9 and '-'), its 10.x address or its node id (32 hex digits)"),
        )),
        _ => Ok(()),
    }
}

fn run(cli: Cli, argv: &[OsString]) -> Outcome {
    let state = StateDir::new(&cli.common.state_dir);
    let req = match cli.command {
        Command::Up(args) if args.foreground => return up_foreground(&cli.common, args),
        Command::Up(args) => return up_background(&cli.common, &args, argv),
        Command::Audit(a) => return audit(&cli.common, &state, a),
        Command::Owner(OwnerCommand::New { out }) => return owner_new(&cli.common, &out),
        Command::Owner(OwnerCommand::Sign {
            key,
            node,
            tags,
            expires,
            out,
        }) => return owner_sign(&cli.common, &key, &node, &tags, expires, out.as_deref()),
        Command::Owner(OwnerCommand::Revoke { key, node }) => Request::OwnerRevoke {
            revocation: owner_revocation(&key, &node)?,
        },
        Command::Cert(CertCommand::Install { file }) => Request::CertInstall {
            cert: read_small_file(&file)?,
        },
        Command::Cert(CertCommand::Show) => Request::CertShow,
        Command::Identity(IdentityCommand::Rotate) => Request::IdentityRotate,
        Command::Policy(PolicyCommand::Allow {
            owner,
            tag,
            ports,
            expires,
        }) => Request::PolicyAllow {
            owner,
            tag,
            ports,
            expires_in_secs: expires,
        },
        Command::Policy(PolicyCommand::List) => Request::PolicyList,
        Command::Policy(PolicyCommand::Remove { id }) => Request::PolicyRemove { id },
        Command::Netcheck { registry, relay } => {
            return netcheck(&cli.common, &state, registry, relay)
        }
        Command::Completions { shell } => return completions(shell),
        Command::Man { out_dir } => return man(out_dir.as_deref()),
        Command::Dns(DnsCommand::Print) => return dns_print(&cli.common, &state),
        Command::Down => Request::Down,
        Command::Status => Request::Status,
        Command::Peers => Request::Peers,
        Command::Ping { peer, count } => Request::Ping { peer, count },
        Command::Explain { peer, traffic } => Request::Explain { peer, traffic },
        Command::Trust(t) => match t {
            TrustCommand::Request {
                peer,
                note,
                grant,
                want,
            } => Request::TrustRequest {
                peer,
                note,
                allow: grant.allow,
                expires_in_secs: grant.expires,
                want,
            },
            TrustCommand::Pending => Request::TrustPending,
            TrustCommand::Approve { peer, grant } => Request::TrustApprove {
                peer,
                allow: grant.allow,
                expires_in_secs: grant.expires,
            },
            TrustCommand::Deny { peer } => Request::TrustDeny { peer },
            TrustCommand::Revoke { peer } => Request::TrustRevoke { peer },
            TrustCommand::List => Request::TrustList,
        },
    };
    let mut timeout = Duration::from_secs(cli.common.timeout);
    match &req {
        Request::TrustRequest { peer, .. }
        | Request::TrustApprove { peer, .. }
        | Request::Explain { peer, .. }
        | Request::TrustDeny { peer }
        | Request::TrustRevoke { peer } => check_peer(peer)?,
        Request::Ping { peer, count } => {
            check_peer(peer)?;
            // The daemon waits up to 5 s for the first echo (a handshake,
            // maybe a relay fallback) and 1.2 s for each further one.
            let n = (*count).clamp(1, api::MAX_PING_COUNT);
            timeout += Duration::from_secs(5) + Duration::from_millis(1200) * n;
        }
        _ => {}
    }
    let rt = runtime(1)?;
    let reply = rt.block_on(control::call(&state.socket(), &req, timeout))??;
    if matches!(reply, Reply::Down(_)) {
        // Wait until the daemon has really let go of the interface.
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.socket().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let code = match &reply {
        Reply::Ping(p) if !p.answered() => exit::FAILED,
        _ => exit::OK,
    };
    if cli.common.json {
        print_pretty(&reply);
    } else {
        print_text(&reply);
    }
    Ok(code)
}

/// `netcheck`: the report, and an exit code for its verdict.
fn netcheck(
    common: &Common,
    state: &StateDir,
    registry: Option<String>,
    relay: Option<SocketAddr>,
) -> Outcome {
    let opts = crate::netcheck::Options {
        registry,
        relay,
        ask_gateway: true,
    };
    let report = runtime(1)?.block_on(crate::netcheck::run(state, &opts))?;
    if common.json {
        print_pretty(&report);
    } else {
        say!("{}", crate::netcheck::text(&report));
    }
    Ok(crate::netcheck::exit_code(&report))
}

/// `completions`: the script on stdout.
fn completions(shell: crate::shell_docs::Shell) -> Outcome {
    use clap::CommandFactory;
    let script = crate::shell_docs::completions(Cli::command(), shell);
    crate::shell_docs::print(&script)
        .map_err(|e| failed(ErrorCode::Failed, format!("cannot write the script: {e}")))?;
    Ok(exit::OK)
}

/// `man`: the page on stdout, or every page into a directory.
fn man(out_dir: Option<&std::path::Path>) -> Outcome {
    use clap::CommandFactory;
    match out_dir {
        None => crate::shell_docs::print(&crate::shell_docs::man_page(Cli::command()))
            .map_err(|e| failed(ErrorCode::Failed, format!("cannot write the man page: {e}")))?,
        Some(dir) => {
            let files = crate::shell_docs::man_pages_to(Cli::command(), dir).map_err(|e| {
                failed(
                    ErrorCode::Failed,
                    format!("cannot write the man pages into {}: {e}", dir.display()),
                )
            })?;
            say!("wrote {} man pages to {}", files.len(), dir.display());
        }
    }
    Ok(exit::OK)
}

/// The `audit` commands: no daemon, just the files.
fn audit(common: &Common, state: &StateDir, cmd: AuditCommand) -> Outcome {
    match cmd {
        AuditCommand::Show { since } => {
            let since = since
                .map(|s| pilot_audit::time::parse_since(&s, crate::context::unix_now()))
                .transpose()
                .map_err(|e| failed(ErrorCode::Usage, format!("--since: {e}")))?;
            let doc = crate::audit_cmd::show(state, since)?;
            if common.json {
                print_pretty(&doc);
            } else {
                print_audit_show(&doc);
            }
            Ok(exit::OK)
        }
        AuditCommand::Verify { expect_head } => {
            let expect = expect_head
                .map(|h| h.parse::<pilot_proto::audit::Head>())
                .transpose()
                .map_err(|e| failed(ErrorCode::Usage, format!("--expect-head: {e}")))?;
            let doc = crate::audit_cmd::verify(state, expect)?;
            if common.json {
                print_pretty(&doc);
            } else {
                print_audit_verify(&doc);
            }
            Ok(if doc.ok { exit::OK } else { exit::FAILED })
        }
        AuditCommand::Head => {
            let doc = crate::audit_cmd::head(state)?;
            if common.json {
                print_pretty(&doc);
            } else {
                say!("{}", doc.head);
            }
            Ok(exit::OK)
        }
    }
}

fn print_audit_show(doc: &api::AuditShow) {
    if doc.entries.is_empty() {
        say!("no entries");
    }
    for e in &doc.entries {
        let details = match &e.details {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(" "),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        say!("{}  {:>6}  {:<24} {}", e.utc, e.seq, e.kind, details);
    }
    for u in &doc.unreadable {
        say!("unreadable: {} line {}: {}", u.file, u.line, u.problem);
    }
    if !doc.unreadable.is_empty() {
        say!("(`pilot-tun audit verify` checks the whole chain)");
    }
}

fn print_audit_verify(doc: &api::AuditVerify) {
    let files = doc.files.len();
    if doc.ok {
        say!(
            "audit log intact: {} lines in {} file{}, from seq {}{}",
            doc.lines,
            files,
            if files == 1 { "" } else { "s" },
            doc.first_seq.unwrap_or(0),
            if doc.first_seq.unwrap_or(0) > 0 {
                " (older files were rotated away)"
            } else {
                ""
            }
        );
    } else {
        say!(
            "audit log NOT intact: {}",
            doc.problem.as_deref().unwrap_or("?")
        );
    }
    match &doc.signed_head {
        Some(h) => say!(
            "signed head: {h}{}",
            match doc.unsigned_after {
                0 => String::new(),
                n => format!(" ({n} entries after it are chained but not signed yet)"),
            }
        ),
        None => say!(
            "no signed head{}",
            match doc.unsigned_after {
                0 => String::new(),
                n => format!(" ({n} entries are chained but not signed yet)"),
            }
        ),
    }
    if let (Some(h), true) = (&doc.expect_head, doc.ok) {
        say!("expected head {h}: present and unchanged");
    }
    if !doc.damaged.is_empty() {
        say!(
            "note: {} log-damaged entr{} (seq {}): the daemon found a damaged file at start and kept it aside; `pilot-tun audit show` has the details",
            doc.damaged.len(),
            if doc.damaged.len() == 1 { "y" } else { "ies" },
            doc.damaged
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

/// A peer as a person calls it: its hostname, else its address.
fn who(hostname: &Option<String>, address: Ipv4Addr) -> String {
    hostname.clone().unwrap_or_else(|| address.to_string())
}

/// A path for people: "192.0.2.1:7", "relay (why)".
fn path_text(e: Option<Endpoint>, reason: &Option<String>) -> String {
    match (e, reason) {
        (Some(Endpoint::Relay), Some(why)) => format!("relay ({why})"),
        (Some(e), _) => e.to_string(),
        (None, _) => "-".into(),
    }
}

fn print_text(reply: &Reply) {
    match reply {
        Reply::Status(d) => print_status(d),
        Reply::Peers(list) => {
            if list.is_empty() {
                say!("no peers yet: `pilot-tun trust request <peer>` asks one");
                return;
            }
            say!(
                "{:<16} {:<15} {:<16} {:<22} {:>8} {:>9} {:>12} {:>12}",
                "NAME",
                "ADDRESS",
                "TRUST",
                "PATH",
                "RTT",
                "HANDSHAKE",
                "RX",
                "TX"
            );
            for p in list {
                let hs = p
                    .last_handshake_secs
                    .map(|x| format!("{x}s ago"))
                    .unwrap_or_else(|| "-".into());
                let rtt = p
                    .rtt_ms
                    .map(|x| format!("{x:.2}ms"))
                    .unwrap_or_else(|| "-".into());
                say!(
                    "{:<16} {:<15} {:<16} {:<22} {:>8} {:>9} {:>12} {:>12}",
                    or_dash(&p.hostname),
                    p.address,
                    p.trust.to_string(),
                    match p.relay_transport.as_deref() {
                        Some("tcp") => "relay over TCP".to_string(),
                        _ => path_text(p.endpoint, &p.relay_reason),
                    },
                    rtt,
                    hs,
                    human_bytes(p.rx_bytes),
                    human_bytes(p.tx_bytes),
                );
                if let Some(a) = p.address6 {
                    say!("    ipv6 {a}");
                }
                if let Some(g) = grants_text(&p.granted, &p.granted_us) {
                    say!("    {g}");
                }
            }
        }
        Reply::Pending(list) => {
            if list.is_empty() {
                say!("no pending requests");
                return;
            }
            for p in list {
                say!(
                    "{}  {}  {}  note: {}",
                    or_dash(&p.hostname),
                    p.address,
                    p.node_id,
                    or_dash(&p.note)
                );
                if let Some(w) = &p.want {
                    say!("    asks to open here: {w}");
                }
                if let Some(o) = &p.offers {
                    say!("    lets us open there: {o}");
                }
            }
            say!("answer with `pilot-tun trust approve <peer>` or `pilot-tun trust deny <peer>`");
        }
        Reply::TrustList(list) => {
            if list.is_empty() {
                say!("no trust records: `pilot-tun trust request <peer>` asks a peer");
            }
            for p in list {
                say!(
                    "{:<16} {:<15} {:<16} {}",
                    or_dash(&p.hostname),
                    p.address,
                    p.state.to_string(),
                    p.node_id
                );
                if let Some(g) = grants_text(&p.granted, &p.granted_us) {
                    say!("    {g}");
                }
            }
        }
        Reply::Trust(t) => {
            say!(
                "{} ({}): {}",
                who(&t.hostname, t.address),
                t.address,
                t.state
            );
            if let Some(e) = &t.delivery_error {
                say!("warning: applied here, but the peer was not told yet: {e}");
            }
        }
        Reply::Ping(p) => {
            let name = printable(&who(&p.hostname, p.address));
            let path = match (p.path, &p.relay_reason) {
                (Some(Endpoint::Direct(a)), _) => format!("direct {a}"),
                (e, why) => path_text(e, why),
            };
            for (i, r) in p.rtt_ms.iter().enumerate() {
                match r {
                    Some(ms) => say!("{name} ({}) seq={i} time={ms:.3} ms via {path}", p.address),
                    None => say!("{name} ({}) seq={i} no answer", p.address),
                }
            }
            if !p.answered() {
                eprintln!(
                    "pilot-tun: no echo came back from {name}: `pilot-tun peers` shows its path and last handshake; is its daemon up?"
                );
            }
        }
        Reply::Explain(e) => {
            say!(
                "{} ({}): {}",
                who(&e.hostname, e.address),
                e.address,
                e.state
            );
            for (label, d) in [
                ("it may open here", &e.inbound),
                ("we may open there", &e.outbound),
            ] {
                let until = d
                    .until
                    .map(|t| format!(" until {}", pilot_proto::lifetime::utc(t)))
                    .unwrap_or_default();
                say!("{label}: {}{until}", d.scope);
                if let (Some(t), Some(passes)) = (&e.traffic, d.passes) {
                    let verdict = if passes { "passes" } else { "refused" };
                    say!("  {t}: {verdict} ({})", d.decided_by);
                }
            }
        }
        Reply::Cert(c) => print_cert(c),
        Reply::Policy(list) => {
            if list.is_empty() {
                say!(
                    "no policy rules: `pilot-tun policy allow --owner <key> --tag <tag>` adds one"
                );
            }
            for r in list {
                print_rule(r);
            }
        }
        Reply::Rule(r) => print_rule(r),
        Reply::Revocation(r) => {
            say!("revoked {} (owner {})", r.node_id, r.owner);
            match &r.delivery_error {
                None => say!("the registry has it and sends it to every node online"),
                Some(e) => say!("warning: the registry did not take it: {e}; try again"),
            }
            if r.kept_here {
                say!("kept here; approvals withdrawn: {}", r.withdrawn.len());
            }
        }
        Reply::Rotated(r) => {
            say!(
                "identity rotated (rotation {}): {} -> {}",
                r.rotation,
                r.old_node_id,
                r.new_node_id
            );
            say!(
                "address {} stays; {} peer(s) told; the daemon restarts under the new identity",
                r.address,
                r.peers_told
            );
        }
        Reply::Down(_) => say!("stopped"),
    }
}

fn print_cert(c: &api::CertInfo) {
    say!("node:    {}", c.node_id);
    say!("owner:   {}", c.owner);
    say!("tags:    {}", c.tags.join(","));
    say!(
        "valid:   {} to {}{}",
        pilot_proto::lifetime::utc(c.issued_at),
        pilot_proto::lifetime::utc(c.expires_at),
        if c.valid { "" } else { "  (NOT valid now)" }
    );
}

fn print_rule(r: &api::PolicyRule) {
    let until = r
        .expires_at
        .map(|t| format!(" until {}", pilot_proto::lifetime::utc(t)))
        .unwrap_or_default();
    say!(
        "{:>3}  owner {}  tag {}  ports {}{until}",
        r.id,
        r.owner,
        r.tag,
        r.ports
    );
}

/// Reads a certificate, key or revocation file (small: at most the armour
/// limit).
fn read_small_file(path: &std::path::Path) -> Result<String, ApiError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| failed(ErrorCode::Usage, format!("{}: {e}", path.display())))?;
    if meta.len() > pilot_proto::armor::MAX_ARMORED_BYTES as u64 {
        return Err(failed(
            ErrorCode::Usage,
            format!("{} is too large to be a key or certificate", path.display()),
        ));
    }
    std::fs::read_to_string(path)
        .map_err(|e| failed(ErrorCode::Usage, format!("{}: {e}", path.display())))
}

fn read_owner_key(path: &std::path::Path) -> Result<OwnerKey, ApiError> {
    let text = zeroize::Zeroizing::new(read_small_file(path)?);
    OwnerKey::from_text(&text)
        .map_err(|e| failed(ErrorCode::Usage, format!("{}: {e}", path.display())))
}

fn parse_node_id(s: &str) -> Result<NodeId, ApiError> {
    s.parse().map_err(|_| {
        failed(
            ErrorCode::Usage,
            format!(
                "{s:?} is not a node id (32 hex digits; `pilot-tun status` on the node shows it)"
            ),
        )
    })
}

/// `owner new`: a fresh key, written 0600 and never over another file.
fn owner_new(common: &Common, out: &std::path::Path) -> Outcome {
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret[..]).map_err(
        |_| {
            failed(
                ErrorCode::Failed,
                "the system's random number source failed",
            )
        },
    )?;
    let key = OwnerKey::from_secret(&secret);
    let text = zeroize::Zeroizing::new(key.to_text());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            failed(
                ErrorCode::Failed,
                format!(
                    "cannot create {}: {e} (an existing key is never overwritten)",
                    out.display()
                ),
            )
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| failed(ErrorCode::Failed, format!("{}: {e}", out.display())))?;
    let doc = api::OwnerKeyInfo {
        owner: key.public().to_string(),
        file: out.display().to_string(),
    };
    if common.json {
        print_pretty(&doc);
    } else {
        say!("owner key written to {} (keep it off the nodes)", doc.file);
        say!("public: {}", doc.owner);
    }
    Ok(exit::OK)
}

/// `owner sign`.
fn owner_sign(
    common: &Common,
    key: &std::path::Path,
    node: &str,
    tags: &str,
    lifetime: u64,
    out: Option<&std::path::Path>,
) -> Outcome {
    let owner = read_owner_key(key)?;
    let node = parse_node_id(node)?;
    let tags = pilot_proto::cert::parse_tags(tags)
        .map_err(|e| failed(ErrorCode::Usage, format!("--tags: {e}")))?;
    let now = crate::context::unix_now();
    let cert = Certificate::issue(&owner, node, tags, now, lifetime)
        .map_err(|e| failed(ErrorCode::Usage, e.to_string()))?;
    let text = cert.to_armored();
    let doc = api::CertInfo {
        node_id: node.to_string(),
        owner: owner.public().to_string(),
        tags: cert.body.tags.iter().map(|t| t.to_string()).collect(),
        issued_at: cert.body.issued_at,
        expires_at: cert.body.expires_at,
        valid: true,
    };
    match out {
        Some(path) => {
            crate::state::write_atomic(path, text.as_bytes(), 0o644)
                .map_err(|e| failed(ErrorCode::Failed, e.to_string()))?;
            if common.json {
                print_pretty(&doc);
            } else {
                print_cert(&doc);
                say!(
                    "written to {}: `pilot-tun cert install {}` on the node",
                    path.display(),
                    path.display()
                );
            }
        }
        None => {
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
    }
    Ok(exit::OK)
}

/// `owner revoke`: the signed revocation, armored, for the daemon.
fn owner_revocation(key: &std::path::Path, node: &str) -> Result<String, ApiError> {
    let owner = read_owner_key(key)?;
    let node = parse_node_id(node)?;
    Ok(Revocation::sign(&owner, node, crate::context::unix_now()).to_armored())
}

/// "may open here: tcp/8080; we may open there: all", or nothing when
/// neither side approved yet.
fn grants_text(granted: &Option<GrantView>, granted_us: &Option<GrantView>) -> Option<String> {
    if granted.is_none() && granted_us.is_none() {
        return None;
    }
    let show = |g: &Option<GrantView>| g.as_ref().map_or("-".to_string(), |g| g.to_string());
    Some(format!(
        "may open here: {}; we may open there: {}",
        show(granted),
        show(granted_us)
    ))
}

fn print_status(d: &Status) {
    say!("address:   {} ({})", d.address, or_dash(&d.network));
    match (&d.address6, &d.network6) {
        (Some(a), n) => say!("address6:  {a} ({})", or_dash(n)),
        (None, _) => say!("address6:  - (IPv6 is off: see the daemon's log)"),
    }
    say!("node id:   {}", d.node_id);
    say!("hostname:  {}", or_dash(&d.hostname));
    say!(
        "listen:    {}",
        d.listen
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let r = &d.registry;
    say!(
        "registry:  {} ({}; seen as {})",
        r.url,
        if r.reachable {
            "reachable"
        } else {
            "UNREACHABLE: check that UDP to it is open"
        },
        r.observed_endpoint
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    // With several instances in the join URL: the one in use.
    if let (Some(e), true) = (r.endpoint, r.url.contains(',')) {
        say!("instance:  {e} (of the join URL's endpoints; the next one takes over if it stops answering)");
    }
    if let Some(t) = &d.tcp_relay {
        say!(
            "transport: relay over TCP (TLS) to {} for {}s: {}",
            t.address,
            t.since_secs,
            printable(&t.why)
        );
    }
    if let Some(g) = &d.gossip {
        say!(
            "gossip:    {} peer records held; {} peers found and {} withdrawals passed on through peers, {} refused",
            g.records,
            g.found,
            g.passed_on,
            g.refused
        );
    }
    let p = &d.peers;
    say!(
        "peers:     {} trusted, {} connected, {} known, {} pending request(s)",
        p.trusted,
        p.connected,
        p.known,
        d.pending_requests
    );
    say!(
        "nat:       {} (public endpoint {})",
        serde_json::to_value(d.nat)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        d.public_endpoint
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    say!(
        "cipher:    {}  udp gso: {}",
        serde_json::to_value(d.cipher)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        d.offload.udp_gso
    );
    let too_big = &d.too_big;
    say!(
        "mtu:       {}{}{}  too big for a peer's path: {} answered with ICMP, {} fragmented, {} in fragmentable datagrams",
        d.mtu,
        d.mtu_cap
            .map(|c| format!(" (capped by --mtu {c})"))
            .unwrap_or_default(),
        if d.underlay_below_mtu_floor {
            " (underlay narrower than the floor: large packets leave fragmented)"
        } else {
            ""
        },
        too_big.icmp_sent,
        too_big.fragmented_inner,
        too_big.fragmented_outer
    );
    match &d.dns {
        Some(dns) => {
            say!(
                "dns:       {} answers *.{} for this host ({} names, {} answered, {} from elsewhere dropped)",
                dns.address,
                printable(&dns.domain),
                dns.names,
                dns.answered,
                dns.dropped_not_local
            );
            if let Some(h) = &dns.hint {
                say!("           host resolver not set up: {}", printable(h));
            }
        }
        None => say!("dns:       off"),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Checks we can create a TUN device, with an error that says how to fix it.
fn preflight_tun() -> Result<(), ApiError> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(failed(
            ErrorCode::NoTun,
            "/dev/net/tun does not exist: load the tun module (`sudo modprobe tun`), or give the container the device (--device /dev/net/tun)",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(failed(
            ErrorCode::PermissionDenied,
            "cannot open /dev/net/tun: creating a TUN interface needs root or CAP_NET_ADMIN; run `sudo pilot-tun up ...`",
        )),
        Err(e) => Err(failed(
            ErrorCode::Failed,
            format!("cannot open /dev/net/tun: {e}"),
        )),
    }
}

fn tun_error(e: std::io::Error, dev: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "creating a TUN interface needs root or CAP_NET_ADMIN; run with sudo".to_string()
        }
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            format!("interface {dev} already exists: another pilot-tun (or another program) uses it; pick another with --dev, or stop the other one")
        }
        _ => format!("cannot create TUN interface {dev}: {e}"),
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> ApiError {
        let code = match &e {
            StartError::NoRegistry | StartError::BadRegistry(_) => ErrorCode::Usage,
            StartError::Registry(_) => ErrorCode::RegistryUnreachable,
            StartError::State(_)
            | StartError::Bind { .. }
            | StartError::Tun(_)
            | StartError::OverlayTaken { .. }
            | StartError::WrongRegistryKey(_) => ErrorCode::StartFailed,
        };
        ApiError::new(code, e.to_string())
    }
}

/// Set by `up` (background) for the daemon it starts: the log file its
/// standard error already is, which the daemon then rotates
/// ([`rotate::Rotating`]).
const LOG_FILE_ENV: &str = "PILOT_LOG_FILE";

/// Where the daemon logs: the rotating file `up` gave it, else stderr.
fn log_output() -> Result<logging::Output, ApiError> {
    let Some(path) = std::env::var_os(LOG_FILE_ENV).map(PathBuf::from) else {
        return Ok(logging::Output::Stderr);
    };
    // Only if standard error really is that file (not a stale variable).
    use std::os::unix::fs::MetadataExt;
    let same = match (
        std::fs::metadata(&path),
        nix::sys::stat::fstat(std::io::stderr()),
    ) {
        (Ok(m), Ok(st)) => m.dev() == st.st_dev && m.ino() == st.st_ino,
        _ => false,
    };
    if !same {
        return Ok(logging::Output::Stderr);
    }
    rotate::Rotating::open(&path, rotate::DEFAULT_MAX_BYTES, rotate::DEFAULT_KEEP)
        .and_then(|r| r.follow_stdio())
        .map(logging::Output::File)
        .map_err(|e| failed(ErrorCode::StartFailed, format!("cannot open the log: {e}")))
}

/// `up` needs CAP_NET_ADMIN (root has it); said before the state
/// directory is touched, which would otherwise fail first, less clearly.
fn preflight_caps() -> Result<(), ApiError> {
    match caps::has(caps::CAP_NET_ADMIN) {
        Some(false) => Err(failed(
            ErrorCode::PermissionDenied,
            "`up` needs root or CAP_NET_ADMIN (it creates the TUN interface and sets its address): run `sudo pilot-tun up ...`; under systemd, the unit in dist/systemd gives the service that capability",
        )),
        _ => Ok(()),
    }
}

fn up_foreground(common: &Common, args: UpArgs) -> Outcome {
    logging::init(&args.log, args.log_format, log_output()?)
        .map_err(|e| failed(ErrorCode::Usage, e.to_string()))?;
    preflight_caps()?;
    preflight_tun()?;
    let state = StateDir::new(&common.state_dir);
    let registry = args
        .registry
        .as_deref()
        .map(|s| {
            s.parse::<JoinUrl>().map_err(|e| {
                failed(
                    ErrorCode::Usage,
                    format!("--registry {s:?}: {e} (copy the join URL pilot-registry printed)"),
                )
            })
        })
        .transpose()?;
    let (name, notice) = node_name(args.name.as_deref())?;
    if let Some(n) = notice {
        tracing::info!("{n}");
    }
    let domain = dns_domain(&args)?;
    if state.socket().exists() {
        refuse_if_running(&runtime(1)?, &state)?;
    }
    let cfg = NodeConfig {
        state: state.clone(),
        registry,
        hostname: name.clone(),
        listen: args.listen,
        suite: match args.cipher {
            Cipher::Aes256Gcm => CipherSuite::Aes256Gcm,
            Cipher::Chacha20Poly1305 => CipherSuite::ChaCha20Poly1305,
        },
        offload: !args.no_offload,
        register_timeout: Duration::from_secs(5),
        mtu: args.mtu,
        rotate_every: args.rotate_identity_every.map(Duration::from_secs),
        port_mapping: !args.no_port_mapping,
        gossip: !args.no_gossip,
    };
    // One worker per core (the TUN and UDP loops run in parallel);
    // PILOT_THREADS overrides it for experiments.
    let threads = std::env::var("PILOT_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2)
        });
    let rt = runtime(threads)?;
    let dev = args.dev.clone();
    let mtu = args.mtu.unwrap_or(pilot_proto::DEFAULT_MTU);
    let offload = !args.no_offload;
    let json = common.json;
    let (metrics, metrics_per_peer) = (args.metrics, args.metrics_per_peer);
    notify::status(&format!(
        "starting: registering at {}",
        args.registry
            .as_deref()
            .unwrap_or("the remembered registry")
    ));
    let restart = rt.block_on(async move {
        // Local resources first: a taken --metrics port fails the start
        // before the node registers or touches the network.
        let metrics_listener = match metrics {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                failed(
                    ErrorCode::StartFailed,
                    format!("cannot listen on {addr} for --metrics: {e} (is the port in use? choose another)"),
                )
            })?),
            None => None,
        };
        let node = Node::start(cfg, |address, network| {
            KernelTun::create(&TunConfig {
                name: dev.clone(),
                address,
                prefix_len: network.prefix_len(),
                mtu,
                offload,
            })
            .map_err(|e| tun_error(e, &dev))
        })
        .await?;
        node.serve_control().map_err(|e| {
            failed(
                ErrorCode::StartFailed,
                format!(
                    "cannot create the control socket {}: {e}",
                    state.socket().display()
                ),
            )
        })?;
        if let Some(listener) = metrics_listener {
            node.serve_metrics(listener, metrics_per_peer);
        }
        if let Some(domain) = domain {
            if let Err(e) = node.serve_dns(domain, &dev).await {
                tracing::warn!("{e}; the overlay works on without DNS for its names");
            }
        }
        let status = node
            .request(Request::Status)
            .await
            .ok()
            .and_then(|r| Status::try_from(r).ok())
            .ok_or_else(|| failed(ErrorCode::Failed, "the daemon could not report its status"))?;
        if json {
            print_compact(&status);
        } else {
            say!("{}", up_line(&dev, &status));
            if let Some(note) = name_note(name.as_deref(), &status) {
                say!("{note}");
            }
        }
        let _ = std::io::stdout().flush();
        // The interface is up with its address and the control socket
        // answers: ready, for systemd (Type=notify).
        notify::ready(&printable(&up_line(&dev, &status)));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| failed(ErrorCode::StartFailed, format!("cannot watch SIGTERM: {e}")))?;
        tokio::select! {
            _ = node.stopped() => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let restart = node.restart_requested();
        if restart {
            tracing::info!("restarting under the rotated identity");
            notify::status("restarting under a rotated identity");
        } else {
            tracing::info!("stopping");
            notify::stopping();
        }
        node.shutdown().await;
        let _ = std::fs::remove_file(state.socket());
        Ok::<_, ApiError>(restart)
    })?;
    drop(rt);
    if restart {
        return Err(restart_self());
    }
    Ok(exit::OK)
}

/// Replaces this process with a fresh start of the same command (same
/// pid, so systemd and the `up` that started us keep following it): after
/// an identity rotation every key-derived piece of state is built anew
/// from the state directory. Every inherited descriptor but stdio is
/// closed on exec, so the TUN device and the UDP port are free for the new
/// start. Returns only if the exec failed.
fn restart_self() -> ApiError {
    use std::os::unix::process::CommandExt;
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: fcntl(F_SETFD) only changes a descriptor flag; on a
            // descriptor that is closed meanwhile it fails with EBADF.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    let exe = std::env::current_exe().unwrap_or_else(|_| argv[0].clone().into());
    let e = std::process::Command::new(exe).args(&argv[1..]).exec();
    failed(
        ErrorCode::Failed,
        format!("the identity was rotated, but the daemon could not restart itself: {e}; start it again (`pilot-tun up`)"),
    )
}

/// "pilot0 up: 10.77.92.132/16  node 140a…  name alpha"
fn up_line(dev: &str, s: &Status) -> String {
    format!(
        "{} up: {}/{}  node {}  name {}",
        dev,
        s.address,
        s.network
            .as_deref()
            .and_then(|n| n.split('/').nth(1))
            .unwrap_or("?"),
        s.node_id,
        or_dash(&s.hostname),
    )
}

/// The node's name from `--name` (or the machine's hostname without it),
/// made into a DNS label, and a notice when that changed it. A `--name`
/// with nothing usable in it is refused.
fn node_name(given: Option<&str>) -> Result<(Option<String>, Option<String>), ApiError> {
    match given {
        Some(raw) => match crate::hostname::normalize(raw) {
            Some(n) if n == raw => Ok((Some(n), None)),
            Some(n) => {
                let notice = format!("--name {raw:?} is not a DNS label; using {n:?}");
                Ok((Some(n), Some(notice)))
            }
            None => Err(failed(
                ErrorCode::Usage,
                format!("--name {raw:?}: nothing of it makes a hostname (1-63 of a-z, 0-9 and '-'; not an address or a node id)"),
            )),
        },
        None => match crate::hostname::from_machine() {
            Some(n) => Ok((Some(n), None)),
            None => Ok((
                None,
                Some("this machine's hostname makes no DNS label; the node has no name (give one with --name)".into()),
            )),
        },
    }
}

/// `--dns-domain`, unless `--no-dns`.
fn dns_domain(args: &UpArgs) -> Result<Option<crate::dns::Domain>, ApiError> {
    if args.no_dns {
        return Ok(None);
    }
    crate::dns::Domain::parse(&args.dns_domain)
        .map(Some)
        .map_err(|e| failed(ErrorCode::Usage, format!("--dns-domain: {e}")))
}

/// A line for `up` when the node did not get the name it asked for.
fn name_note(asked: Option<&str>, s: &Status) -> Option<String> {
    let (asked, got) = (asked?, s.hostname.as_deref()?);
    (asked != got)
        .then(|| format!("the name {asked:?} is taken on this network: this node is {got:?}"))
}

/// `dns print`: the resolver configuration for the running daemon's DNS.
fn dns_print(common: &Common, state: &StateDir) -> Outcome {
    let rt = runtime(1)?;
    let timeout = Duration::from_secs(common.timeout);
    let reply = rt.block_on(control::call(&state.socket(), &Request::Status, timeout))??;
    let status = Status::try_from(reply).map_err(|_| {
        failed(
            ErrorCode::Failed,
            "the daemon did not answer with its status",
        )
    })?;
    let Some(dns) = status.dns else {
        return Err(failed(
            ErrorCode::Failed,
            "the daemon serves no DNS (started with --no-dns, or it could not listen: see its log)",
        ));
    };
    if common.json {
        print_pretty(&dns);
    } else {
        let std::net::IpAddr::V4(ip) = dns.address.ip() else {
            return Err(failed(ErrorCode::Failed, "the DNS address is not IPv4"));
        };
        print!(
            "{}",
            crate::resolved::stanza(&dns.interface, ip, &dns.domain)
        );
    }
    Ok(exit::OK)
}

/// One daemon per state directory: refuse to start a second.
fn refuse_if_running(rt: &tokio::runtime::Runtime, state: &StateDir) -> Result<(), ApiError> {
    let answer = rt.block_on(control::call(
        &state.socket(),
        &Request::Status,
        Duration::from_secs(2),
    ));
    if answer.is_ok() {
        return Err(failed(
            ErrorCode::AlreadyRunning,
            format!(
                "a pilot-tun daemon is already running for {} (stop it with `pilot-tun down`, or start another with its own --state-dir)",
                state.path.display()
            ),
        ));
    }
    Ok(())
}

/// The daemon's arguments: exactly ours, plus `--foreground`.
fn daemon_args(argv: &[OsString]) -> Vec<OsString> {
    let mut args: Vec<OsString> = argv.iter().skip(1).cloned().collect();
    args.push("--foreground".into());
    args
}

fn up_background(common: &Common, args: &UpArgs, argv: &[OsString]) -> Outcome {
    preflight_caps()?;
    preflight_tun()?;
    logging::filter(&args.log).map_err(|e| failed(ErrorCode::Usage, e.to_string()))?;
    let (name, notice) = node_name(args.name.as_deref())?;
    match notice {
        // stdout is for the JSON document only.
        Some(n) if common.json => eprintln!("{}", printable(&n)),
        Some(n) => say!("{n}"),
        None => {}
    }
    dns_domain(args)?;
    let state = StateDir::new(&common.state_dir);
    state
        .create()
        .map_err(|e| failed(ErrorCode::StartFailed, e.to_string()))?;
    let rt = runtime(1)?;
    refuse_if_running(&rt, &state)?;
    let exe = std::env::current_exe().map_err(|e| {
        failed(
            ErrorCode::StartFailed,
            format!("cannot find the pilot-tun executable to start the daemon: {e}"),
        )
    })?;
    let log_path = state.file("pilot-tun.log");
    let log_error = |e: std::io::Error| {
        failed(
            ErrorCode::StartFailed,
            format!(
                "cannot open the log {}: {e} (is the state directory writable?)",
                log_path.display()
            ),
        )
    };
    // Rotated here if it is full already, so the tail read below is of
    // the file the daemon writes; the daemon rotates it from then on.
    let log = rotate::Rotating::open(&log_path, rotate::DEFAULT_MAX_BYTES, rotate::DEFAULT_KEEP)
        .map_err(log_error)?;
    let log_start = log.file().metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(daemon_args(argv))
        .stdin(std::process::Stdio::null())
        .stdout(log.file().try_clone().map_err(log_error)?)
        .stderr(log.file().try_clone().map_err(log_error)?)
        .env(LOG_FILE_ENV, &log_path);
    // A session of its own, so the daemon outlives the shell that started it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| {
        failed(
            ErrorCode::StartFailed,
            format!("cannot start the daemon: {e}"),
        )
    })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = text
                .get(log_start as usize..)
                .unwrap_or("")
                .lines()
                .filter(|l| l.contains("error"))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(failed(
                ErrorCode::StartFailed,
                format!(
                    "the daemon exited ({status}) before the interface came up:\n{}\n(full log: {})",
                    if tail.is_empty() {
                        "(no error in the log)"
                    } else {
                        &tail
                    },
                    log_path.display()
                ),
            ));
        }
        let answer = rt.block_on(control::call(
            &state.socket(),
            &Request::Status,
            Duration::from_secs(2),
        ));
        if let Ok(Ok(reply)) = answer {
            if let Ok(status) = Status::try_from(reply) {
                if common.json {
                    print_compact(&status);
                } else {
                    say!(
                        "{}  (pid {}, log {})",
                        up_line(&args.dev, &status),
                        child.id(),
                        log_path.display()
                    );
                    if let Some(note) = name_note(name.as_deref(), &status) {
                        say!("{note}");
                    }
                }
                return Ok(exit::OK);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(failed(
                ErrorCode::Timeout,
                format!(
                    "the daemon did not come up within 20 s and was stopped; see {}",
                    log_path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("pilot-tun")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn up_args(cli: Cli) -> UpArgs {
        match cli.command {
            Command::Up(a) => a,
            other => panic!("not up: {other:?}"),
        }
    }

    #[test]
    fn the_daemon_gets_every_argument_of_up() {
        let cases: &[&[&str]] = &[
            &["up"],
            &["--state-dir", "/tmp/s", "up", "--name", "alpha"],
            &[
                "--json",
                "--state-dir=/tmp/x y",
                "up",
                "--registry",
                "pilot://00@192.0.2.1:7946",
                "--name",
                "beta",
                "--dev",
                "pt1",
                "--listen",
                "192.0.2.5:41641",
                "--mtu",
                "1380",
                "--cipher",
                "chacha20-poly1305",
                "--no-offload",
                "--log",
                "debug",
            ],
            &[
                "up",
                "--no-offload",
                "--state-dir",
                "rel/dir",
                "--timeout",
                "3",
            ],
        ];
        for args in cases {
            let ours = argv(args);
            let parent = Cli::try_parse_from(&ours).unwrap();
            let mut child_argv = vec![OsString::from("pilot-tun")];
            child_argv.extend(daemon_args(&ours));
            let child = Cli::try_parse_from(&child_argv).unwrap();
            assert_eq!(child.common, parent.common, "{args:?}");
            let (p, c) = (up_args(parent), up_args(child));
            assert!(!p.foreground && c.foreground, "{args:?}");
            assert_eq!(
                UpArgs {
                    foreground: false,
                    ..c
                },
                p,
                "{args:?}"
            );
        }
    }

    #[test]
    fn peer_names_are_checked_before_asking() {
        for good in [
            "beta",
            "Beta",
            "build-1",
            "10.77.0.5",
            "140a67f3f7622d9b6c1aea0abb8702a5",
        ] {
            assert!(check_peer(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "x_y", "10.77.1", "-lead", "ünï", &"a".repeat(64)] {
            let e = check_peer(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::Usage, "{bad}");
            assert!(e.error.contains("hostname"), "{}", e.error);
        }
    }

    #[test]
    fn audit_help_teaches_the_routine() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let audit = cmd.find_subcommand_mut("audit").unwrap();
        let help = audit.render_long_help().to_string();
        for needle in [
            "audit head",
            "--expect-head",
            "whether or not the daemon runs",
            "rotate",
        ] {
            assert!(help.contains(needle), "{needle} missing from audit --help");
        }
        let cli = Cli::try_parse_from(argv(&["audit", "verify", "--expect-head", "3:ab"])).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Verify {
                expect_head: Some(_)
            })
        ));
    }

    #[test]
    fn json_is_seen_before_parsing() {
        assert!(wants_json(&argv(&["--json", "status"])));
        assert!(wants_json(&argv(&["status", "--bogus", "--json"])));
        assert!(!wants_json(&argv(&["status"])));
        assert!(!wants_json(&argv(&["trust", "request", "--", "--json"])));
    }

    #[test]
    fn help_lists_the_exit_codes() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "Exit codes",
            "3 no daemon",
            "4 permission denied",
            "\"code\"",
        ] {
            assert!(help.contains(needle), "{needle} missing from --help");
        }
    }
}
