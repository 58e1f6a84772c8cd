//! `pilot-registry`: the rendezvous server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ipnet::Ipv4Net;
use pilot_proto::join::JoinUrl;
use pilot_registry::{
    pool, server, state, Config, Limits, PgStorage, Registry, SqliteStorage, Storage,
};
use pilot_service::logging::{self, LogFormat};
use pilot_service::{notify, ports};

mod cli_config;

// Completions and man pages from the clap definitions: the same code as
// `pilot-tun completions` and `pilot-tun man` (that crate's module; this
// crate does not depend on pilot-tun).
#[path = "../../pilot-tun/src/shell_docs.rs"]
mod shell_docs;

/// `--version`: the release, the commit it was built from (the build
/// script is pilot-tun/build.rs) and the wire protocol it speaks.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (commit {}, wire protocol {})",
        env!("CARGO_PKG_VERSION"),
        env!("PILOT_GIT_COMMIT"),
        pilot_proto::PROTOCOL_VERSION
    )
});

/// The rendezvous server of a pilot-tun network.
///
/// It gives every node a permanent overlay address, answers STUN on its UDP
/// port, carries trust requests and decisions between nodes (keeping them on
/// disk for nodes that are offline), and tells a node where a peer is only if
/// that peer approved it. It holds no key that could read tunnel traffic.
///
/// On start it prints `join: pilot://<key>@<ip:port>`; give that URL to
/// `pilot-tun up --registry`. The same URL is written to <state-dir>/join-url.
#[derive(Parser, Debug)]
#[command(version = VERSION.as_str(), about, long_about)]
struct Cli {
    /// Without a command: serve. `audit` reads the audit log instead.
    #[command(subcommand)]
    command: Option<RegistryCommand>,
    /// UDP address to serve on (STUN, control, relay all share it).
    #[arg(long, default_value = "0.0.0.0:7946")]
    listen: SocketAddr,
    /// Address nodes should use, for the join URL. Needed when --listen is
    /// 0.0.0.0 (the registry cannot guess which of its addresses is public).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where the key, the database and the audit log live.
    #[arg(long, global = true, default_value = "/var/lib/pilot-registry")]
    state_dir: PathBuf,
    /// Keep nodes, trust statements and certificates in PostgreSQL instead
    /// of the SQLite file in --state-dir: a URL like
    /// postgres://user:password@host:5432/dbname. Its tables are made and
    /// migrated on start. (The key stays a file in --state-dir.) Several
    /// instances may share one database: give each the same --database and
    /// --network, a copy of registry.key in its own --state-dir, and its
    /// own --advertise; they tell each other what concerns their nodes
    /// (LISTEN/NOTIFY) and relay across, and nodes given all their
    /// endpoints in the join URL fail over between them.
    #[arg(long, env = "PILOT_REGISTRY_DATABASE", value_name = "URL", value_parser = pilot_registry::storage_pg::parse_url, hide_env_values = true)]
    database: Option<postgres::Config>,
    /// The overlay network addresses are handed out from: part of a private
    /// range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10),
    /// with a prefix between /8 and /28.
    #[arg(long, default_value = pilot_proto::DEFAULT_NETWORK)]
    network: Ipv4Net,
    /// Relay bandwidth per node, in megabits per second (relayed traffic is
    /// opaque ciphertext between two nodes that approved each other).
    /// 0: no relaying.
    #[arg(long, default_value_t = 400)]
    relay_mbps: u32,
    /// Relay bandwidth for all nodes together, in megabits per second.
    /// 0: no relaying.
    #[arg(long, default_value_t = server::DEFAULT_RELAY_TOTAL_MBPS)]
    relay_total_mbps: u32,
    /// Control messages each node's session may send per second (twice as
    /// many in a burst); more are answered "busy". Pings do not count.
    /// 0: no limit.
    #[arg(long, default_value_t = pilot_registry::sessions::DEFAULT_CONTROL_RATE)]
    control_rate: u32,
    /// Register a node id this registry does not know only with a valid
    /// join token (`pilot-registry token create`; the join URL carries it
    /// as ?token=). Nodes already registered need none.
    #[arg(long)]
    require_token: bool,
    /// New node ids registered per source address and minute (a burst of
    /// as many); more are refused until the budget refills. 0: no limit.
    #[arg(long, default_value_t = server::DEFAULT_NEW_NODES_PER_MINUTE)]
    new_nodes_per_minute: u32,
    /// Expire registrations not seen (no registration, no new endpoint)
    /// for this long: 90d, 12h, ...; 0 or never: keep them for good. An
    /// expired node's hostname is free at once; its address stays taken
    /// (a tombstone) until the pool is otherwise full. A node some peer
    /// still approves never expires. An expired id registers again as a
    /// new node (with a token under --require-token).
    #[arg(long, value_name = "AGE", default_value = "90d", value_parser = pilot_registry::expiry::parse_unused)]
    expire_unused: u64,
    /// A relay-only instance next to this registry, to tell every node about
    /// (repeatable). Start it with --relay-only on the same --state-dir.
    #[arg(long = "relay")]
    relays: Vec<SocketAddr>,
    /// Only relay: share the registry's --state-dir (its key and database;
    /// give the same --database too, if it has one) and forward tunnel
    /// datagrams between nodes that approved each other.
    /// Nodes learn about it from the registry (--relay on the registry).
    #[arg(long)]
    relay_only: bool,
    /// Second UDP port that answers STUN only, so nodes can tell whether
    /// their NAT maps per destination (default: --listen's port + 1; 0: off).
    #[arg(long)]
    stun_alt_port: Option<u16>,
    /// Also accept nodes over TCP with TLS on this address, for networks
    /// that block UDP (443 passes most firewalls): the join URL then ends
    /// in ?tcp=<port> (same IP as --advertise). The certificate is made
    /// from the registry key, which the join URL pins. Off by default.
    #[arg(long, value_name = "ADDR")]
    tcp_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics and a status page
    /// at http://ADDR/ (off by default). A port alone listens on 127.0.0.1.
    #[arg(long, value_name = "ADDR", value_parser = pilot_metrics::parse_listen)]
    metrics: Option<SocketAddr>,
    /// List the nodes (hostname, address, online) on the status page; by
    /// default it shows counts only.
    #[arg(long, requires = "metrics")]
    status_list_nodes: bool,
    /// Log filter (tracing syntax), e.g. `info` or `pilot_registry=debug`.
    #[arg(long, env = "PILOT_LOG", default_value = "info")]
    log: String,
    /// Log lines as text or as JSON objects (one a line). Colour only on
    /// a terminal; no timestamps of our own under journald.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Config file (TOML; one key per flag, flags win over it). Default:
    /// /etc/pilot-registry/pilot-registry.toml if it exists.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum RegistryCommand {
    /// Read and check the audit log in --state-dir (audit.jsonl): the
    /// registrations, the trust statements carried (their SHA-256 only) and
    /// the relay's admissions and refusals per pair and minute, in a hash
    /// chain with checkpoints signed by a key derived from registry.key.
    /// Works whether or not the registry runs.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Join tokens, for a registry started with --require-token: a node id
    /// it does not know registers only with one (the join URL carries it
    /// as ?token=). Works on the database whether or not the registry runs.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The registered nodes, read from the database (whether or not the
    /// registry runs).
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Print a shell completion script, e.g.
    /// `pilot-registry completions bash > /etc/bash_completion.d/pilot-registry`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: shell_docs::Shell,
    },
    /// Print the man page (roff: `pilot-registry man | man -l -`), or with
    /// --out-dir write it and one page per subcommand there.
    Man {
        /// Write pilot-registry.1, pilot-registry-audit.1, ... into this
        /// directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a token; prints it and the join URL carrying it (from
    /// <state-dir>/join-url, which the registry writes on start). Only its
    /// SHA-256 is kept: it cannot be shown again.
    Create {
        /// Registrations it allows (default: no limit).
        #[arg(long, value_name = "N")]
        uses: Option<u64>,
        /// How long it is valid: 30m, 12h, 7d, ... (default: no expiry).
        #[arg(long, value_name = "AGE")]
        expires: Option<String>,
    },
    /// The tokens kept: id, uses, state.
    List,
    /// Revoke a token by its id (from `token list`): it admits nobody
    /// from then on (nodes it admitted stay).
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodesCommand {
    /// Every registered node: id, address, hostname, endpoints.
    List {
        /// One JSON document (schema in the README).
        #[arg(long)]
        json: bool,
    },
    /// Remove a node: its hostname is free at once, its statements,
    /// pending pushes and certificate go; its address stays taken (a
    /// tombstone: other nodes' rules may name it). A running registry
    /// forgets it with the node's control session; the node can join
    /// again only as a new node (with a token under --require-token).
    Remove {
        /// Its node id or hostname.
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// The entries, oldest first.
    Show {
        /// Only entries since this time: RFC 3339 or an age (10m, 2h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// The log of a relay-only instance (audit-relay.jsonl).
        #[arg(long)]
        relay: bool,
    },
    /// Check every hash link and checkpoint signature. Exit 0: intact;
    /// exit 1: the first bad line is named. Reports the last signed head
    /// (keep it elsewhere and give it back with --expect-head to prove
    /// nothing up to it was cut or rewritten).
    Verify {
        /// A head printed by an earlier verify (`<seq>:<hash>`).
        #[arg(long, value_name = "HEAD")]
        expect_head: Option<String>,
        /// The log of a relay-only instance (audit-relay.jsonl).
        #[arg(long)]
        relay: bool,
    },
}

/// `pilot-registry audit …`: the files, no server. Returns the exit code.
fn audit(dir: &std::path::Path, cmd: AuditCommand) -> Result<i32> {
    use pilot_audit::read::{self, Failure};
    use pilot_registry::audit::{REGISTRY_LOG, RELAY_LOG};
    let name = |relay: bool| if relay { RELAY_LOG } else { REGISTRY_LOG };
    match cmd {
        AuditCommand::Show { since, relay } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let since = since
                .map(|s| pilot_audit::time::parse_since(&s, now))
                .transpose()
                .context("--since")?;
            let (entries, bad) = read::entries(dir, name(relay))
                .with_context(|| format!("cannot read the audit log in {}", dir.display()))?;
            for e in entries
                .iter()
                .filter(|e| since.is_none_or(|t| e.entry.time >= t))
            {
                println!(
                    "{}  {:>6}  {:<22} {}",
                    pilot_proto::lifetime::utc(e.entry.time),
                    e.entry.seq,
                    e.entry.kind,
                    e.entry.details
                );
            }
            for (p, why) in bad {
                println!("unreadable: {} line {}: {why}", p.file.display(), p.line);
            }
            Ok(0)
        }
        AuditCommand::Verify { expect_head, relay } => {
            let expect = expect_head
                .map(|h| h.parse::<pilot_proto::audit::Head>())
                .transpose()
                .context("--expect-head")?;
            if !dir.join("registry.key").exists() {
                bail!(
                    "{} has no registry.key: the key that checks the audit log's signatures is derived from it (is --state-dir the registry's?)",
                    dir.display()
                );
            }
            let secret = state::load_or_create_key(dir)?;
            let key = pilot_registry::audit::public_key(&secret);
            let out = read::verify(dir, name(relay), &[key], expect)
                .with_context(|| format!("cannot read the audit log in {}", dir.display()))?;
            if out.files.is_empty() {
                bail!("no audit log in {}", dir.display());
            }
            let signed = match out.signed_head {
                Some(h) => format!(
                    "signed head: {h} ({} entries after it not signed yet)",
                    out.unsigned_after
                ),
                None => format!(
                    "no signed head ({} entries not signed yet)",
                    out.unsigned_after
                ),
            };
            match &out.result {
                Ok(r) => {
                    println!(
                        "audit log intact: {} lines in {} files, from seq {}",
                        r.lines,
                        out.files.len(),
                        out.first_seq.unwrap_or(0)
                    );
                    println!("{signed}");
                    Ok(0)
                }
                Err(f) => {
                    println!("audit log NOT intact: {f}");
                    if let Failure::Line { .. } = f {
                        println!("before it, {signed}");
                    }
                    Ok(1)
                }
            }
        }
    }
}

/// The database the registry keeps (SQLite in the state directory, or
/// --database), and a name for it in messages.
fn open_storage(cli: &mut Cli) -> Result<(Box<dyn Storage>, String)> {
    Ok(match cli.database.take() {
        Some(url) => {
            let at = database_name(&url);
            let s = PgStorage::open(url).with_context(|| {
                format!("cannot open the registry database {at} (is PostgreSQL running there, and do the user, password and database name in --database match?)")
            })?;
            (Box::new(s), at)
        }
        None => {
            let db = cli.state_dir.join("registry.db");
            let s = SqliteStorage::open(&db)
                .with_context(|| format!("cannot open the registry database {}", db.display()))?;
            (Box::new(s), db.display().to_string())
        }
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `pilot-registry token …`.
fn token(cli: &mut Cli, cmd: TokenCommand) -> Result<()> {
    use pilot_registry::operator;
    if let TokenCommand::Create {
        expires: Some(e), ..
    } = &cmd
    {
        pilot_proto::lifetime::parse(e).with_context(|| format!("--expires {e}"))?;
    }
    let (mut s, at) = open_storage(cli)?;
    let now = unix_now();
    match cmd {
        TokenCommand::Create { uses, expires } => {
            let expires_at = expires
                .map(|e| pilot_proto::lifetime::parse(&e).map(|age| now.saturating_add(age)))
                .transpose()?;
            let t = operator::create_token(&mut *s, uses, expires_at, now)
                .with_context(|| format!("cannot keep the token in {at}"))?;
            println!("token: {}", t.token);
            println!("{}", operator::token_line(&t.row, now));
            let file = cli.state_dir.join("join-url");
            match std::fs::read_to_string(&file).ok().and_then(|u| u.trim().parse::<JoinUrl>().ok()) {
                Some(mut join) => {
                    join.token = Some(t.token);
                    println!("join: {}", join.with_query());
                }
                None => println!(
                    "join: <the registry's join URL>?token={} ({} is not there yet: the registry writes it on start)",
                    t.token,
                    file.display()
                ),
            }
        }
        TokenCommand::List => {
            let all = s
                .tokens()
                .with_context(|| format!("cannot read the tokens in {at}"))?;
            if all.is_empty() {
                println!("no join tokens (make one with `pilot-registry token create`)");
            }
            for t in &all {
                println!("{}", operator::token_line(t, now));
            }
        }
        TokenCommand::Revoke { id } => {
            if !s
                .revoke_token(&id)
                .with_context(|| format!("cannot revoke in {at}"))?
            {
                bail!("no token with id {id} (see `pilot-registry token list`)");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// `pilot-registry nodes …`.
fn nodes(cli: &mut Cli, cmd: NodesCommand) -> Result<()> {
    let (mut s, at) = open_storage(cli)?;
    match cmd {
        NodesCommand::Remove { node } => {
            match pilot_registry::operator::remove_node(&mut *s, &node, unix_now())
                .with_context(|| format!("cannot remove {node} from {at}"))?
            {
                Some(n) => println!(
                    "removed {} ({}, {}); its address stays taken",
                    n.id,
                    n.hostname.as_deref().unwrap_or("no hostname"),
                    n.address
                ),
                None => {
                    bail!("no node with id or hostname {node} (see `pilot-registry nodes list`)")
                }
            }
        }
        NodesCommand::List { json } => {
            let list = pilot_registry::operator::list_nodes(&*s)
                .with_context(|| format!("cannot read the nodes in {at}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            for n in &list.nodes {
                println!(
                    "{}  {:<15} {:<24} {}",
                    n.id,
                    n.address,
                    n.hostname.as_deref().unwrap_or("-"),
                    n.endpoints
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
        }
    }
    Ok(())
}

/// A bind failure, with the fix: who holds a busy port, or which flag
/// chooses another address.
fn bind_error(addr: SocketAddr, e: std::io::Error, flag: &str) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot bind UDP {addr}: {}; stop it, or choose another with {flag}",
            ports::udp_in_use(addr)
        ),
        std::io::ErrorKind::AddrNotAvailable => anyhow::anyhow!(
            "cannot bind UDP {addr}: the address is not on this host; choose one of its own with {flag}"
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot bind UDP {addr}: ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a higher one with {flag}"
        ),
        _ => anyhow::anyhow!("cannot bind UDP {addr}: {e}"),
    }
}

/// Where a `--database` points, for messages: user, host, port and
/// database name, never the password.
fn database_name(c: &postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        c.get_user().unwrap_or(""),
        c.get_dbname().unwrap_or("")
    )
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pilot-registry: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli_config::apply(&mut cli, &matches)?;
    match cli.command.take() {
        Some(RegistryCommand::Audit(cmd)) => {
            let code = audit(&cli.state_dir, cmd)?;
            std::process::exit(code);
        }
        Some(RegistryCommand::Token(cmd)) => return token(&mut cli, cmd),
        Some(RegistryCommand::Nodes(cmd)) => return nodes(&mut cli, cmd),
        Some(RegistryCommand::Completions { shell }) => {
            use clap::CommandFactory;
            return Ok(shell_docs::print(&shell_docs::completions(
                Cli::command(),
                shell,
            ))?);
        }
        Some(RegistryCommand::Man { out_dir: None }) => {
            use clap::CommandFactory;
            return Ok(shell_docs::print(&shell_docs::man_page(Cli::command()))?);
        }
        Some(RegistryCommand::Man { out_dir: Some(dir) }) => {
            use clap::CommandFactory;
            let files = shell_docs::man_pages_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            println!("wrote {} man pages to {}", files.len(), dir.display());
            return Ok(());
        }
        None => {}
    }
    logging::init(&cli.log, cli.log_format, logging::Output::Stderr)?;
    pool::check_network(cli.network).context("--network")?;
    let advertise = match (cli.advertise, cli.listen.ip().is_unspecified()) {
        (Some(a), _) => a,
        (None, false) => cli.listen,
        (None, true) => bail!(
            "--listen {} does not say which address nodes should use; add --advertise <public-ip>:{}",
            cli.listen,
            cli.listen.port()
        ),
    };
    if cli.relay_only && !cli.state_dir.join("registry.key").exists() {
        bail!(
            "--relay-only shares the registry's key and database: point --state-dir at the registry's state directory ({} has no registry.key)",
            cli.state_dir.display()
        );
    }
    let secret = state::load_or_create_key(&cli.state_dir)?;
    let sweeper_db = (cli.database.clone(), cli.state_dir.join("registry.db"));
    // On PostgreSQL, several instances may share the database: each
    // listens for the others' events with a connection of its own.
    let cluster = match (&cli.database, cli.relay_only) {
        (Some(url), false) => Some((
            url.clone(),
            pilot_registry::cluster::Cluster::new(&secret, advertise),
        )),
        _ => None,
    };
    let (storage, database) = open_storage(&mut cli)?;
    // Dropped (stopped) when the registry returns.
    let _sweeper = if cli.expire_unused > 0 && !cli.relay_only {
        let open: pilot_registry::expiry::Opener = Box::new(move || {
            Ok(match &sweeper_db {
                (Some(url), _) => Box::new(PgStorage::open(url.clone())?) as Box<dyn Storage>,
                (None, path) => Box::new(SqliteStorage::open(path)?),
            })
        });
        let every = pilot_registry::expiry::interval(cli.expire_unused);
        Some(
            pilot_registry::expiry::spawn(open, cli.expire_unused, every)
                .context("cannot start the expiry thread")?,
        )
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let socket = tokio::net::UdpSocket::bind(cli.listen)
            .await
            .map_err(|e| bind_error(cli.listen, e, "--listen"))?;
        let mut join = JoinUrl::single(server::public_key(&secret), advertise);
        join.tcp = cli.tcp_listen.map(|a| a.port());
        if cli.relay_only {
            println!(
                "relay: {} (key {})",
                advertise,
                pilot_proto::hex::encode(&join.key)
            );
        } else {
            state::write_private(
                &cli.state_dir.join("join-url"),
                format!("{join}\n").as_bytes(),
            )?;
            println!("join: {join}");
        }
        println!(
            "network: {}  state: {}  database: {database}",
            cli.network,
            cli.state_dir.display()
        );
        let mut registry = Registry::new(
            socket,
            Config {
                secret,
                network: cli.network,
                relay_rate: cli.relay_mbps.saturating_mul(125_000),
                relays: cli.relays.clone(),
                relay_only: cli.relay_only,
            },
            storage,
        )
        .with_audit(&cli.state_dir);
        if let Some((url, c)) = cluster {
            let (tx, rx) = tokio::sync::mpsc::channel(pilot_registry::cluster::HEARD_QUEUE);
            // The thread ends once the registry (the receiver) is gone; it
            // logs when it listens, and keeps trying if it cannot.
            let _listening = pilot_registry::cluster::listen(url, c.clone(), tx)
                .context("cannot start the thread that listens for the other instances")?;
            registry = registry.with_cluster(c, rx);
        }
        registry = registry
        .with_limits(Limits {
            control_rate: cli.control_rate,
            relay_total_rate: cli.relay_total_mbps.saturating_mul(125_000),
            require_token: cli.require_token,
            new_nodes_per_minute: cli.new_nodes_per_minute,
        });
        if let Some(addr) = cli.metrics {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for --metrics (is the port in use, or the address not on this host?)")
            })?;
            let view = registry.view();
            view.set_list(if cli.status_list_nodes { pilot_registry::view::MAX_LISTED } else { 0 });
            tokio::spawn(pilot_registry::web::serve(listener, registry.stats(), view));
            println!("metrics: http://{addr}/metrics  status page: http://{addr}/");
        }
        if let Some(addr) = cli.tcp_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on TCP {addr} for --tcp-listen (is the port in use? a port below 1024 needs CAP_NET_BIND_SERVICE)")
            })?;
            registry = registry.with_tcp(listener, pilot_registry::tcp::Limits::default());
        }
        let alt_port = cli
            .stun_alt_port
            .unwrap_or_else(|| cli.listen.port().wrapping_add(1));
        if alt_port != 0 && !cli.relay_only {
            let alt = SocketAddr::new(cli.listen.ip(), alt_port);
            let s = tokio::net::UdpSocket::bind(alt)
                .await
                .map_err(|e| bind_error(alt, e, "--stun-alt-port (0 for none)"))?;
            registry = registry.with_alt_stun(s);
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            notify::stopping();
        };
        // Every socket is bound: datagrams from now on are served.
        notify::ready(&format!(
            "{} {advertise}, network {}",
            if cli.relay_only {
                "relaying on"
            } else {
                "serving"
            },
            cli.network
        ));
        registry.run(shutdown).await?;
        Ok(())
    })
}
