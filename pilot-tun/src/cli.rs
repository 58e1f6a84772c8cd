//! The `pilot-tun` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pilot_proto::join::JoinUrl;
use pilot_proto::session::CipherSuite;
use serde_json::Value;

use crate::control::{self, ClientError, Request, Response};
use crate::node::{Node, NodeConfig};
use crate::state::StateDir;
use crate::tun::{KernelTun, TunConfig};

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
#[command(version, about, long_about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
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
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
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
    /// Measure round trips through the tunnel to a trusted peer, and show the
    /// path (direct endpoint or relay, and why).
    Ping {
        /// Hostname, 10.x address or node id.
        peer: String,
        /// How many echoes (200 ms apart).
        #[arg(short, long, default_value_t = 3)]
        count: u32,
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
    },
    /// Requests from peers waiting for our answer.
    Pending,
    /// Approve a peer (normally one that asked us).
    Approve {
        /// Hostname, 10.x address or node id.
        peer: String,
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Cipher {
    /// AES-256-GCM (fastest with AES instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (for CPUs without AES instructions).
    Chacha20Poly1305,
}

#[derive(Args, Debug, Clone)]
struct UpArgs {
    /// The registry's join URL (pilot://<key>@<ip:port>). Remembered, so a
    /// later `up` may leave it out.
    #[arg(long)]
    registry: Option<String>,
    /// Hostname to claim (first come; peers can use it instead of the address).
    #[arg(long)]
    name: Option<String>,
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
    /// Log filter, e.g. `info` or `pilot_tun=debug`.
    #[arg(long, env = "PILOT_LOG", default_value = "info")]
    log: String,
}

/// Exit codes a program can rely on.
mod exit {
    /// A request failed (the message says why).
    pub const FAILED: u8 = 1;
    /// No daemon runs for this state directory.
    pub const NOT_RUNNING: u8 = 3;
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pilot-tun: error: {e:#}");
            let not_running = e
                .downcast_ref::<ClientError>()
                .is_some_and(|c| matches!(c, ClientError::NotRunning(_)));
            ExitCode::from(if not_running {
                exit::NOT_RUNNING
            } else {
                exit::FAILED
            })
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    let state = StateDir::new(&cli.common.state_dir);
    let req = match cli.command {
        Command::Up(args) if args.foreground => return up_foreground(&cli.common, args),
        Command::Up(args) => return up_background(&cli.common, args),
        Command::Down => Request::Down,
        Command::Status => Request::Status,
        Command::Peers => Request::Peers,
        Command::Ping { peer, count } => Request::Ping { peer, count },
        Command::Trust(t) => match t {
            TrustCommand::Request { peer, note } => Request::TrustRequest { peer, note },
            TrustCommand::Pending => Request::TrustPending,
            TrustCommand::Approve { peer } => Request::TrustApprove { peer },
            TrustCommand::Deny { peer } => Request::TrustDeny { peer },
            TrustCommand::Revoke { peer } => Request::TrustRevoke { peer },
            TrustCommand::List => Request::TrustList,
        },
    };
    let rt = runtime(1)?;
    let is_down = matches!(req, Request::Down);
    let resp = rt.block_on(control::call(
        &state.socket(),
        &req,
        Duration::from_secs(15),
    ))?;
    if is_down && resp.ok {
        // Wait until the daemon has really let go of the interface.
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.socket().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    print_response(&req, &resp, cli.common.json)
}

fn print_response(req: &Request, resp: &Response, json: bool) -> Result<ExitCode> {
    if !resp.ok {
        let msg = resp.error.clone().unwrap_or_else(|| "failed".into());
        if json {
            println!("{}", serde_json::json!({"ok": false, "error": msg}));
            return Ok(ExitCode::from(exit::FAILED));
        }
        bail!(msg);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&resp.data)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &resp.data;
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    match req {
        Request::Status => {
            println!("address:   {} ({})", s(&d["address"]), s(&d["network"]));
            println!("node id:   {}", s(&d["node_id"]));
            println!("hostname:  {}", s(&d["hostname"]));
            println!("listen:    {}", s(&d["listen"]));
            let r = &d["registry"];
            println!(
                "registry:  {} ({}; seen as {})",
                s(&r["url"]),
                if r["reachable"].as_bool() == Some(true) {
                    "reachable"
                } else {
                    "UNREACHABLE"
                },
                s(&r["observed_endpoint"])
            );
            let p = &d["peers"];
            println!(
                "peers:     {} trusted, {} connected, {} known, {} pending request(s)",
                p["trusted"], p["connected"], p["known"], d["pending_requests"]
            );
            println!(
                "nat:       {} (public endpoint {})",
                s(&d["nat"]),
                s(&d["public_endpoint"])
            );
            println!(
                "cipher:    {}  udp gso: {}",
                s(&d["cipher"]),
                d["offload"]["udp_gso"]
            );
        }
        Request::Peers => {
            let list = d.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no peers yet: `pilot-tun trust request <peer>` asks one");
            } else {
                println!(
                    "{:<16} {:<15} {:<16} {:<22} {:>8} {:>9} {:>12} {:>12}",
                    "NAME", "ADDRESS", "TRUST", "PATH", "RTT", "HANDSHAKE", "RX", "TX"
                );
                for p in list {
                    let hs = p["last_handshake_secs"]
                        .as_u64()
                        .map(|x| format!("{x}s ago"))
                        .unwrap_or_else(|| "-".into());
                    let rtt = p["rtt_ms"]
                        .as_f64()
                        .map(|x| format!("{x:.2}ms"))
                        .unwrap_or_else(|| "-".into());
                    let path = match (p["endpoint"].as_str(), p["relay_reason"].as_str()) {
                        (Some("relay"), Some(why)) => format!("relay ({why})"),
                        (Some(e), _) => e.to_string(),
                        _ => "-".into(),
                    };
                    println!(
                        "{:<16} {:<15} {:<16} {:<22} {:>8} {:>9} {:>12} {:>12}",
                        s(&p["hostname"]),
                        s(&p["address"]),
                        s(&p["trust"]),
                        path,
                        rtt,
                        hs,
                        human_bytes(p["rx_bytes"].as_u64().unwrap_or(0)),
                        human_bytes(p["tx_bytes"].as_u64().unwrap_or(0)),
                    );
                }
            }
        }
        Request::TrustPending => {
            let list = d.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no pending requests");
            }
            for p in list {
                println!(
                    "{}  {}  {}  note: {}",
                    s(&p["hostname"]),
                    s(&p["address"]),
                    s(&p["node_id"]),
                    s(&p["note"])
                );
            }
            if d.as_array().is_some_and(|a| !a.is_empty()) {
                println!(
                    "answer with `pilot-tun trust approve <peer>` or `pilot-tun trust deny <peer>`"
                );
            }
        }
        Request::TrustList => {
            for p in d.as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<16} {:<15} {:<16} {}",
                    s(&p["hostname"]),
                    s(&p["address"]),
                    s(&p["state"]),
                    s(&p["node_id"])
                );
            }
        }
        Request::TrustRequest { .. }
        | Request::TrustApprove { .. }
        | Request::TrustDeny { .. }
        | Request::TrustRevoke { .. } => {
            let who = d["hostname"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(&d["address"]));
            println!("{who} ({}): {}", s(&d["address"]), s(&d["state"]));
            if let Some(e) = d["delivery_error"].as_str() {
                println!("warning: applied here, but the peer was not told yet: {e}");
            }
        }
        Request::Ping { .. } => {
            let who = d["hostname"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(&d["address"]));
            let path = match (d["path"].as_str(), d["relay_reason"].as_str()) {
                (Some("relay"), Some(why)) => format!("relay ({why})"),
                (Some(p), _) => format!("direct {p}"),
                _ => "-".into(),
            };
            let rtts = d["rtt_ms"].as_array().cloned().unwrap_or_default();
            for (i, r) in rtts.iter().enumerate() {
                match r.as_f64() {
                    Some(ms) => println!(
                        "{who} ({}) seq={i} time={ms:.3} ms via {path}",
                        s(&d["address"])
                    ),
                    None => println!("{who} ({}) seq={i} no answer", s(&d["address"])),
                }
            }
            if rtts.iter().all(|r| r.is_null()) {
                return Ok(ExitCode::from(exit::FAILED));
            }
        }
        Request::Down => println!("stopped"),
    }
    Ok(ExitCode::SUCCESS)
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
fn preflight_tun() -> Result<()> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "/dev/net/tun does not exist: load the tun module (`sudo modprobe tun`), or give the container the device (--device /dev/net/tun)"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "cannot open /dev/net/tun: creating a TUN interface needs root or CAP_NET_ADMIN; run `sudo pilot-tun up ...`"
        ),
        Err(e) => Err(anyhow!(e).context("cannot open /dev/net/tun")),
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

fn up_foreground(common: &Common, args: UpArgs) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    preflight_tun()?;
    let state = StateDir::new(&common.state_dir);
    let registry = args
        .registry
        .as_deref()
        .map(|s| {
            s.parse::<JoinUrl>()
                .with_context(|| format!("--registry {s:?}"))
        })
        .transpose()?;
    if let Some(n) = &args.name {
        if !pilot_proto::messages::valid_hostname(n) {
            bail!("--name {n:?}: a hostname is 1-63 of a-z, 0-9 and '-', not starting or ending with '-'");
        }
    }
    if state.socket().exists() {
        refuse_if_running(&runtime(1)?, &state)?;
    }
    let cfg = NodeConfig {
        state: state.clone(),
        registry,
        hostname: args.name.clone(),
        listen: args.listen,
        suite: match args.cipher {
            Cipher::Aes256Gcm => CipherSuite::Aes256Gcm,
            Cipher::Chacha20Poly1305 => CipherSuite::ChaCha20Poly1305,
        },
        offload: !args.no_offload,
        register_timeout: Duration::from_secs(5),
        mtu: args.mtu,
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
    rt.block_on(async move {
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
        node.serve_control().with_context(|| {
            format!(
                "cannot create the control socket {}",
                state.socket().display()
            )
        })?;
        let status = node.request(Request::Status).await.data;
        if json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            println!(
                "{} up: {}/{}  node {}  name {}",
                dev,
                status["address"].as_str().unwrap_or("?"),
                status["network"]
                    .as_str()
                    .and_then(|n| n.split('/').nth(1))
                    .unwrap_or("?"),
                status["node_id"].as_str().unwrap_or("?"),
                status["hostname"].as_str().unwrap_or("-"),
            );
        }
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = node.stopped() => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("stopping");
        node.shutdown().await;
        let _ = std::fs::remove_file(state.socket());
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// One daemon per state directory: refuse to start a second.
fn refuse_if_running(rt: &tokio::runtime::Runtime, state: &StateDir) -> Result<()> {
    let answer = rt.block_on(control::call(
        &state.socket(),
        &Request::Status,
        Duration::from_secs(2),
    ));
    if answer.is_ok() {
        bail!(
            "a pilot-tun daemon is already running for {} (stop it with `pilot-tun down`)",
            state.path.display()
        );
    }
    Ok(())
}

fn up_background(common: &Common, args: UpArgs) -> Result<ExitCode> {
    preflight_tun()?;
    let state = StateDir::new(&common.state_dir);
    state.create()?;
    let rt = runtime(1)?;
    refuse_if_running(&rt, &state)?;
    let exe = std::env::current_exe().context("cannot find the pilot-tun executable")?;
    let log_path = state.file("pilot-tun.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the log {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&common.state_dir)
        .arg("up")
        .arg("--foreground");
    if let Some(r) = &args.registry {
        cmd.arg("--registry").arg(r);
    }
    if let Some(n) = &args.name {
        cmd.arg("--name").arg(n);
    }
    if let Some(l) = &args.listen {
        cmd.arg("--listen").arg(l.to_string());
    }
    cmd.arg("--dev").arg(&args.dev);
    if let Some(m) = args.mtu {
        cmd.arg("--mtu").arg(m.to_string());
    }
    cmd.arg("--log").arg(&args.log);
    cmd.arg("--cipher").arg(match args.cipher {
        Cipher::Aes256Gcm => "aes256-gcm",
        Cipher::Chacha20Poly1305 => "chacha20-poly1305",
    });
    if args.no_offload {
        cmd.arg("--no-offload");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A session of its own, so the daemon outlives the shell that started it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = text
                .get(log_start as usize..)
                .unwrap_or("")
                .lines()
                .filter(|l| l.contains("error"))
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "the daemon exited ({status}) before the interface came up:\n{}\n(full log: {})",
                if tail.is_empty() {
                    "(no error in the log)"
                } else {
                    &tail
                },
                log_path.display()
            );
        }
        if let Ok(resp) = rt.block_on(control::call(
            &state.socket(),
            &Request::Status,
            Duration::from_secs(2),
        )) {
            if resp.ok {
                let d = resp.data;
                if common.json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    println!(
                        "{} up: {}/{}  node {}  name {}  (pid {}, log {})",
                        args.dev,
                        d["address"].as_str().unwrap_or("?"),
                        d["network"]
                            .as_str()
                            .and_then(|n| n.split('/').nth(1))
                            .unwrap_or("?"),
                        d["node_id"].as_str().unwrap_or("?"),
                        d["hostname"].as_str().unwrap_or("-"),
                        child.id(),
                        log_path.display()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the daemon did not come up within 20 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
