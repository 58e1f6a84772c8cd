//! Load for scripts/registry-bench.sh: simulated nodes in one process (real
//! UDP on loopback, real Noise sessions, real signatures) registering,
//! sending trust statements and looking peers up, then a burst of
//! registrations with a STUN prober and a relayed stream beside it. One
//! JSON line per phase ([`pilot_tests::load_report::PhaseReport`]).
//!
//! Loopback only: the nodes sit on many 127.x.y.z source addresses (the
//! registry limits handshakes and new ids per source address), a few dozen
//! nodes per socket.

mod driver;
mod probe;
mod seed;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::PeerRef;
use pilot_tests::load_report::{BurstFigures, PhaseReport};

use driver::{Group, Member, Op, Tally, REGISTRY_KEY};
use probe::Watch;

#[derive(Parser)]
#[command(about = "Load generator for scripts/registry-bench.sh (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register, state, look up, then a burst; a JSON line per phase.
    Run(RunArgs),
    /// Print `nodes` rows to seed a database with (see seed.rs).
    Seed {
        /// Rows.
        #[arg(long)]
        count: u64,
        /// The registry's --network (the addresses come from it).
        #[arg(long, default_value = "10.0.0.0/8")]
        network: Ipv4Net,
        /// sqlite: SQL for sqlite3; pg: CSV for psql's \copy.
        #[arg(long, value_enum)]
        format: seed::Format,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A registry instance's join URL; give several (same key) to spread
    /// the nodes over them.
    #[arg(long, required = true)]
    join: Vec<JoinUrl>,
    /// Label for the reports (the backend).
    #[arg(long, default_value = "registry")]
    label: String,
    /// Nodes registered in the first phase.
    #[arg(long, default_value_t = 1000)]
    identities: usize,
    /// Approve statements sent (spread over the nodes).
    #[arg(long, default_value_t = 1000)]
    statements: usize,
    /// Lookups sent (each node looks up a node that approved it).
    #[arg(long, default_value_t = 5000)]
    lookups: usize,
    /// Fresh registrations in the burst phase (0: no burst phase).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Nodes per socket (and source address): the registry takes 60 new
    /// ids a minute from one address, so keep it under that.
    #[arg(long, default_value_t = 40)]
    per_source: usize,
    /// Requests in flight per registry instance, over all sockets (the
    /// registry queues 256 storage jobs; past that it answers "busy").
    #[arg(long, default_value_t = 160)]
    in_flight: usize,
    /// STUN probe interval during the burst phase, ms.
    #[arg(long, default_value_t = 5)]
    stun_interval_ms: u64,
    /// Relayed stream offered during the burst phase, Mbit/s (0: none).
    #[arg(long, default_value_t = 100.0)]
    relay_mbps: f64,
    /// The database holds this many seeded nodes (`seed`): the lookups
    /// ask for random ones of them instead (phase `seeded-lookups`).
    #[arg(long, default_value_t = 0)]
    seeded: u64,
    /// The registry's --network (as `seed` was given).
    #[arg(long, default_value = "10.0.0.0/8")]
    network: Ipv4Net,
    /// Count this process's CPU time under NAME: NAME=PID[,PID...].
    #[arg(long, value_name = "NAME=PIDS")]
    watch: Vec<String>,
    /// Like --watch, with the children (PostgreSQL's backends).
    #[arg(long, value_name = "NAME=PIDS")]
    watch_tree: Vec<String>,
    /// Pids whose resident memory ends each report (the registries).
    #[arg(long, value_delimiter = ',')]
    rss: Vec<u32>,
    /// Each phase stops after this many seconds, answered or not.
    #[arg(long, default_value_t = 300)]
    phase_deadline_s: u64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Seed {
            count,
            network,
            format,
        } => seed::write(
            &mut std::io::BufWriter::new(std::io::stdout().lock()),
            count,
            network,
            format,
        )
        .map_err(|e| e.to_string()),
        Command::Run(args) => run(args),
    };
    if let Err(e) = result {
        eprintln!("registry-load: {e}");
        std::process::exit(1);
    }
}

fn parse_watch(spec: &str, tree: bool) -> Result<Watch, String> {
    let (name, pids) = spec
        .split_once('=')
        .ok_or_else(|| format!("--watch {spec}: expected NAME=PID[,PID...]"))?;
    let pids = pids
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map_err(|_| format!("--watch {spec}: {p} is not a pid"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Watch {
        name: name.to_string(),
        pids,
        tree,
    })
}

/// The `k`-th source address: 127.1.0.1 onwards, skipping .0 and .255.
fn source(base: u8, k: usize) -> IpAddr {
    let k = k as u32;
    IpAddr::V4(Ipv4Addr::new(
        127,
        base.wrapping_add((k / (254 * 254)) as u8),
        ((k / 254) % 254 + 1) as u8,
        (k % 254 + 1) as u8,
    ))
}

/// Reproducible throwaway identities (real key pairs, cheap seeds).
fn identity(seed: u64, i: u64) -> Identity {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut bytes = [0u8; 64];
    for c in bytes.chunks_mut(8) {
        c.copy_from_slice(&seed::splitmix(&mut x).to_le_bytes());
    }
    Identity::from_bytes(&bytes)
}

struct Run {
    args: RunArgs,
    watches: Vec<Watch>,
    deadline: Duration,
    identities: u64,
}

impl Run {
    fn report(
        &self,
        phase: &str,
        ops: usize,
        t: &Tally,
        seconds: f64,
        cpu0: &HashMap<String, f64>,
    ) -> PhaseReport {
        let cpu1 = probe::cpu_now(&self.watches);
        let mut lat = t.latencies_us.clone();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let k = ((lat.len() as f64 - 1.0) * p).round() as usize;
            round3(lat[k] as f64 / 1e3)
        };
        PhaseReport {
            label: self.args.label.clone(),
            phase: phase.to_string(),
            ops: ops as u64,
            ok: t.ok,
            failed: t.failed,
            busy: t.busy,
            resent: t.resent,
            seconds: round3(seconds),
            ops_per_s: round3(if seconds > 0.0 {
                t.ok as f64 / seconds
            } else {
                0.0
            }),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            cpu_s: cpu1
                .iter()
                .map(|(k, v)| (k.clone(), round3(v - cpu0.get(k).copied().unwrap_or(0.0))))
                .collect(),
            registry_rss_kib: self.args.rss.iter().map(|&p| probe::rss_kib(p)).collect(),
            identities: self.identities,
            burst: None,
        }
    }

    /// Runs one phase over `groups` (ops per group), timing it.
    async fn phase(
        &self,
        groups: Vec<Group>,
        ops: Vec<Vec<(usize, Op)>>,
    ) -> (Vec<Group>, Tally, f64) {
        let window = (self.args.in_flight * self.args.join.len() / groups.len().max(1)).max(1);
        let deadline = Instant::now() + self.deadline;
        let t0 = Instant::now();
        let tasks: Vec<_> = groups
            .into_iter()
            .zip(ops)
            .map(|(mut g, ops)| {
                tokio::spawn(async move {
                    let t = g.run(ops, window, deadline).await;
                    (g, t)
                })
            })
            .collect();
        let mut groups = vec![];
        let mut tally = Tally::default();
        for task in tasks {
            if let Ok((g, t)) = task.await {
                groups.push(g);
                tally.add(t);
            }
        }
        (groups, tally, t0.elapsed().as_secs_f64())
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn emit(r: &PhaseReport) {
    match serde_json::to_string(r) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("registry-load: report: {e}"),
    }
}

/// Binds a socket per `per` members on sources `base`.x.y.z and makes the
/// groups; member `g` talks to instance `g % joins`.
async fn make_groups(
    ids: Vec<Identity>,
    first_global: usize,
    per: usize,
    base: u8,
    joins: &[JoinUrl],
) -> Result<Vec<Group>, String> {
    let mut groups: Vec<Group> = vec![];
    for (i, id) in ids.into_iter().enumerate() {
        let g = first_global + i;
        if i % per == 0 {
            let at = SocketAddr::new(source(base, i / per), 0);
            let sock = tokio::net::UdpSocket::bind(at)
                .await
                .map_err(|e| format!("bind {at}: {e}"))?;
            groups.push(Group {
                sock: Arc::new(sock),
                members: vec![],
            });
        }
        let to = joins[g % joins.len()].first();
        if let Some(last) = groups.last_mut() {
            last.members.push(Member::new(id, g, to));
        }
    }
    Ok(groups)
}

/// Spreads operation `j` (for global member `j % n`) over the groups.
fn spread(
    groups: &[Group],
    n: usize,
    count: usize,
    make: impl Fn(usize, usize) -> Op,
) -> Vec<Vec<(usize, Op)>> {
    let mut out: Vec<Vec<(usize, Op)>> = groups.iter().map(|_| vec![]).collect();
    let per = groups.first().map_or(1, |g| g.members.len().max(1));
    for j in 0..count {
        let g = j % n;
        let (gi, m) = (g / per, g % per);
        if let Some(o) = out.get_mut(gi) {
            o.push((m, make(g, j / n)));
        }
    }
    out
}

fn run(args: RunArgs) -> Result<(), String> {
    let key = args.join[0].key;
    if args.join.iter().any(|j| j.key != key) {
        return Err("every --join must carry the same registry key".into());
    }
    for j in &args.join {
        if !j.endpoints().iter().all(|a| a.ip().is_loopback()) {
            return Err(format!("{j}: loopback only"));
        }
    }
    let _ = REGISTRY_KEY.set(key);
    let mut watches = vec![];
    for w in &args.watch {
        watches.push(parse_watch(w, false)?);
    }
    for w in &args.watch_tree {
        watches.push(parse_watch(w, true)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let run = Run {
        deadline: Duration::from_secs(args.phase_deadline_s.clamp(1, 3600)),
        args,
        watches,
        identities: 0,
    };
    rt.block_on(phases(run))
}

async fn phases(mut run: Run) -> Result<(), String> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let n = run.args.identities.max(2);
    let per = run.args.per_source.clamp(1, 1000);
    let ids: Vec<Identity> = (0..n as u64).map(|i| identity(seed, i)).collect();
    let nodes: Arc<Vec<NodeId>> = Arc::new(ids.iter().map(Identity::node_id).collect());
    let groups = make_groups(ids, 0, per, 1, &run.args.join).await?;

    // Phase 1: every node registers (handshake + Register).
    let cpu0 = probe::cpu_now(&run.watches);
    let ops = spread(&groups, n, n, |_, _| Op::Register);
    let (groups, t, secs) = run.phase(groups, ops).await;
    run.identities = t.ok + run.args.seeded;
    emit(&run.report("register", n, &t, secs, &cpu0));

    // Phase 2: node g approves g+1+r in round r.
    let s = run.args.statements;
    let cpu0 = probe::cpu_now(&run.watches);
    let ns = nodes.clone();
    let ops = spread(&groups, n, s, move |g, r| Op::Approve {
        to: ns[(g + 1 + r) % n],
        seq: r as u64 + 1,
    });
    let (groups, t, secs) = run.phase(groups, ops).await;
    if s > 0 {
        emit(&run.report("statements", s, &t, secs, &cpu0));
    }

    // Phase 3: lookups of a node that approved the asker (or, with a
    // seeded database, of seeded addresses all over it).
    let l = run.args.lookups;
    let rounds = s.div_ceil(n).max(1);
    let seeded = Arc::new(seed::seeded_ids(run.args.seeded, run.args.network));
    let cpu0 = probe::cpu_now(&run.watches);
    let ns = nodes.clone();
    let ops = spread(&groups, n, l, move |g, r| {
        Op::Lookup(if seeded.is_empty() {
            PeerRef::Id(ns[(g + n - 1 - (r % rounds) % n) % n])
        } else {
            let mut x = ((g as u64) << 20) | r as u64;
            PeerRef::Id(seeded[(seed::splitmix(&mut x) % seeded.len() as u64) as usize])
        })
    });
    let (groups, t, secs) = run.phase(groups, ops).await;
    if l > 0 {
        let name = if run.args.seeded > 0 {
            "seeded-lookups"
        } else {
            "lookups"
        };
        emit(&run.report(name, l, &t, secs, &cpu0));
    }

    if run.args.burst > 0 {
        burst(&mut run, seed, n).await?;
    }
    drop(groups);
    Ok(())
}

/// Phase 4: a STUN prober and a relayed stream, quiet for two seconds, then
/// a burst of fresh registrations.
async fn burst(run: &mut Run, seed: u64, n: usize) -> Result<(), String> {
    let joins = run.args.join.clone();
    let registry = joins[0].first();
    // The relayed pair: two nodes with a socket each (the relay knows a
    // node by its control session's address), approving each other.
    let pair_ids = vec![identity(seed, n as u64), identity(seed, n as u64 + 1)];
    let pair_nodes: Vec<NodeId> = pair_ids.iter().map(Identity::node_id).collect();
    let mut std_socks = vec![];
    let mut pair = vec![];
    for (k, id) in pair_ids.into_iter().enumerate() {
        let at = SocketAddr::new(source(3, k), 0);
        let s = std::net::UdpSocket::bind(at).map_err(|e| format!("bind {at}: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let t = tokio::net::UdpSocket::from_std(s.try_clone().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        std_socks.push(s);
        pair.push(Group {
            sock: Arc::new(t),
            members: vec![Member::new(id, n + k, registry)],
        });
    }
    let ops = vec![vec![(0, Op::Register)], vec![(0, Op::Register)]];
    let (pair, _, _) = run.phase(pair, ops).await;
    let ops = vec![
        vec![(
            0,
            Op::Approve {
                to: pair_nodes[1],
                seq: 1,
            },
        )],
        vec![(
            0,
            Op::Approve {
                to: pair_nodes[0],
                seq: 1,
            },
        )],
    ];
    let (pair, t, _) = run.phase(pair, ops).await;
    let relay_ok = t.ok == 2 && run.args.relay_mbps > 0.0;
    // The control sessions of the pair go quiet from here; their sockets
    // carry the relayed stream (blocking, on threads of their own).
    drop(pair);
    let relay = if relay_ok {
        let mut it = std_socks.into_iter();
        let (a, b) = (it.next(), it.next());
        match (a, b) {
            (Some(a), Some(b)) => {
                a.set_nonblocking(false).map_err(|e| e.to_string())?;
                b.set_nonblocking(false).map_err(|e| e.to_string())?;
                Some(
                    probe::RelayStream::start(a, b, pair_nodes[1], registry, run.args.relay_mbps)
                        .map_err(|e| e.to_string())?,
                )
            }
            _ => None,
        }
    } else {
        None
    };

    let fresh: Vec<Identity> = (0..run.args.burst as u64)
        .map(|i| identity(seed, n as u64 + 2 + i))
        .collect();
    let groups = make_groups(fresh, n + 2, run.args.per_source.clamp(1, 1000), 2, &joins).await?;
    let stun = probe::StunProber::start(
        registry,
        Duration::from_millis(run.args.stun_interval_ms.max(1)),
    )
    .map_err(|e| format!("STUN prober: {e}"))?;
    let quiet_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = probe::cpu_now(&run.watches);
    let b = run.args.burst;
    let ops = spread(&groups, b, b, |_, _| Op::Register);
    let burst_from = Instant::now();
    let (_groups, t, secs) = run.phase(groups, ops).await;
    let burst_to = Instant::now();
    run.identities += t.ok;
    let mut report = run.report("burst", b, &t, secs, &cpu0);
    let samples = stun.finish();
    let relay_buckets = relay.map(|r| (r.t0, r.finish()));

    let rtts = |from: Instant, to: Instant| -> (Vec<f64>, u64, u64) {
        let mut v = vec![];
        let (mut sent, mut lost) = (0, 0);
        for (at, rtt) in &samples {
            if *at >= from && *at < to {
                sent += 1;
                match rtt {
                    Some(r) => v.push(r.as_secs_f64() * 1e3),
                    None => lost += 1,
                }
            }
        }
        v.sort_by(f64::total_cmp);
        (v, sent, lost)
    };
    let pct = |v: &[f64], p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        round3(v[((v.len() as f64 - 1.0) * p).round() as usize])
    };
    // The quiet window skips its first half second (the prober warming up).
    let (quiet, _, _) = rtts(quiet_from + Duration::from_millis(500), burst_from);
    let (during, sent, lost) = rtts(burst_from, burst_to);
    let (rq, rb) = match &relay_buckets {
        Some((t0, b)) => {
            let s = |i: Instant| i.saturating_duration_since(*t0).as_secs_f64();
            (
                probe::mbps_between(b, s(quiet_from + Duration::from_millis(500)), s(burst_from)),
                probe::mbps_between(b, s(burst_from), s(burst_to)),
            )
        }
        None => (0.0, 0.0),
    };
    report.burst = Some(BurstFigures {
        stun_quiet_p50_ms: pct(&quiet, 0.5),
        stun_quiet_p99_ms: pct(&quiet, 0.99),
        stun_burst_p50_ms: pct(&during, 0.5),
        stun_burst_p99_ms: pct(&during, 0.99),
        stun_samples: sent,
        stun_lost: lost,
        relay_offered_mbps: if relay_buckets.is_some() {
            run.args.relay_mbps
        } else {
            0.0
        },
        relay_quiet_mbps: round3(rq),
        relay_burst_mbps: round3(rb),
    });
    emit(&report);
    Ok(())
}
