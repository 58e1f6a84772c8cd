//! `pilot-registry`: the rendezvous server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use pilot_proto::join::JoinUrl;
use pilot_registry::{pool, server, state, Config, Registry, SqliteStorage};

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
#[command(version, about, long_about)]
struct Cli {
    /// UDP address to serve on (STUN, control, relay all share it).
    #[arg(long, default_value = "0.0.0.0:7946")]
    listen: SocketAddr,
    /// Address nodes should use, for the join URL. Needed when --listen is
    /// 0.0.0.0 (the registry cannot guess which of its addresses is public).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where the key and the database live.
    #[arg(long, default_value = "/var/lib/pilot-registry")]
    state_dir: PathBuf,
    /// The overlay network addresses are handed out from: part of a private
    /// range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10),
    /// with a prefix between /8 and /28.
    #[arg(long, default_value = pilot_proto::DEFAULT_NETWORK)]
    network: Ipv4Net,
    /// Relay bandwidth per node, in megabits per second (relayed traffic is
    /// opaque ciphertext between two nodes that approved each other).
    #[arg(long, default_value_t = 400)]
    relay_mbps: u32,
    /// A relay-only instance next to this registry, to tell every node about
    /// (repeatable). Start it with --relay-only on the same --state-dir.
    #[arg(long = "relay")]
    relays: Vec<SocketAddr>,
    /// Only relay: share the registry's --state-dir (its key and database)
    /// and forward tunnel datagrams between nodes that approved each other.
    /// Nodes learn about it from the registry (--relay on the registry).
    #[arg(long)]
    relay_only: bool,
    /// Second UDP port that answers STUN only, so nodes can tell whether
    /// their NAT maps per destination (default: --listen's port + 1; 0: off).
    #[arg(long)]
    stun_alt_port: Option<u16>,
    /// Log filter (tracing syntax), e.g. `info` or `pilot_registry=debug`.
    #[arg(long, env = "PILOT_LOG", default_value = "info")]
    log: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pilot-registry: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
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
    let db = cli.state_dir.join("registry.db");
    let storage = SqliteStorage::open(&db)
        .with_context(|| format!("cannot open the registry database {}", db.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let socket = tokio::net::UdpSocket::bind(cli.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot bind UDP {} (is another registry running there, or is the address not on this host?)",
                    cli.listen
                )
            })?;
        let join = JoinUrl {
            key: server::public_key(&secret),
            addr: advertise,
        };
        if cli.relay_only {
            println!("relay: {} (key {})", advertise, pilot_proto::hex::encode(&join.key));
        } else {
            state::write_private(&cli.state_dir.join("join-url"), format!("{join}\n").as_bytes())?;
            println!("join: {join}");
        }
        println!("network: {}  state: {}", cli.network, cli.state_dir.display());
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
        );
        let alt_port = cli
            .stun_alt_port
            .unwrap_or_else(|| cli.listen.port().wrapping_add(1));
        if alt_port != 0 && !cli.relay_only {
            let alt = SocketAddr::new(cli.listen.ip(), alt_port);
            let s = tokio::net::UdpSocket::bind(alt)
                .await
                .with_context(|| format!("cannot bind the second STUN port {alt} (choose one with --stun-alt-port, or 0 for none)"))?;
            registry = registry.with_alt_stun(s);
        }
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        registry.run(shutdown).await?;
        Ok(())
    })
}
