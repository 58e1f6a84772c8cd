//! What runs beside the load: a STUN prober, a relayed stream between two
//! nodes, and the CPU and memory of the processes watched (from /proc).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pilot_proto::identity::NodeId;
use pilot_proto::stun;
use pilot_proto::wire::{RelayHeader, MSG_RELAY_FROM, MSG_RELAY_TO, RELAY_HEADER_LEN};

/// A thread sending a STUN Binding request every `interval` until stopped;
/// each sample is (sent, round trip or `None`: no answer within a second).
pub struct StunProber {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sent: Arc<Mutex<HashMap<[u8; 12], Instant>>>,
    rtts: Arc<Mutex<HashMap<[u8; 12], Duration>>>,
}

impl StunProber {
    pub fn start(to: SocketAddr, interval: Duration) -> std::io::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<HashMap<[u8; 12], Instant>>> = Arc::default();
        let rtts: Arc<Mutex<HashMap<[u8; 12], Duration>>> = Arc::default();
        let rx = {
            let (sock, stop, sent, rtts) =
                (sock.try_clone()?, stop.clone(), sent.clone(), rtts.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let now = Instant::now();
                    if n < 20 {
                        continue;
                    }
                    let mut tid = [0u8; 12];
                    tid.copy_from_slice(&buf[8..20]);
                    if stun::parse_binding_response(&buf[..n], &tid).is_none() {
                        continue;
                    }
                    let at = sent.lock().ok().and_then(|s| s.get(&tid).copied());
                    if let (Some(at), Ok(mut r)) = (at, rtts.lock()) {
                        r.insert(tid, now.duration_since(at));
                    }
                }
            })
        };
        let tx = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut i: u64 = 0;
                // Bounded: ten minutes of probes at most.
                while !stop.load(Ordering::Relaxed) && i < 600_000 {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    let mut tid = [0u8; 12];
                    tid[..8].copy_from_slice(&i.to_le_bytes());
                    tid[8..].copy_from_slice(&std::process::id().to_le_bytes());
                    if let Ok(mut s) = sent.lock() {
                        s.insert(tid, Instant::now());
                    }
                    let _ = sock.send_to(&stun::binding_request(&tid), to);
                    i += 1;
                    next += interval;
                }
            })
        };
        Ok(StunProber {
            stop,
            threads: vec![rx, tx],
            sent,
            rtts,
        })
    }

    /// Stops (after a second for late answers); the samples.
    pub fn finish(self) -> Vec<(Instant, Option<Duration>)> {
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let sent = self.sent.lock().map(|s| s.clone()).unwrap_or_default();
        let rtts = self.rtts.lock().map(|r| r.clone()).unwrap_or_default();
        let mut out: Vec<(Instant, Option<Duration>)> = sent
            .into_iter()
            .map(|(tid, at)| {
                let rtt = rtts
                    .get(&tid)
                    .copied()
                    .filter(|r| *r <= Duration::from_secs(1));
                (at, rtt)
            })
            .collect();
        out.sort_by_key(|s| s.0);
        out
    }
}

/// A relayed stream: `from` sends datagrams for `to` through the registry
/// at `mbps`, `to` counts what arrives, per 10 ms.
pub struct RelayStream {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Bytes received per 10 ms since `t0`.
    buckets: Arc<Mutex<Vec<u64>>>,
    pub t0: Instant,
}

const RELAY_DATAGRAM: usize = 1200;
const BUCKET: Duration = Duration::from_millis(10);

impl RelayStream {
    pub fn start(
        from: UdpSocket,
        to: UdpSocket,
        dst: NodeId,
        registry: SocketAddr,
        mbps: f64,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let buckets: Arc<Mutex<Vec<u64>>> = Arc::default();
        let t0 = Instant::now();
        to.set_read_timeout(Some(Duration::from_millis(50)))?;
        let rx = {
            let (stop, buckets) = (stop.clone(), buckets.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = to.recv_from(&mut buf) else {
                        continue;
                    };
                    if RelayHeader::parse(&buf[..n]).is_ok_and(|h| h.ty == MSG_RELAY_FROM) {
                        let k = (t0.elapsed().as_nanos() / BUCKET.as_nanos()) as usize;
                        if let Ok(mut b) = buckets.lock() {
                            if b.len() <= k {
                                b.resize(k + 1, 0);
                            }
                            b[k] += n as u64;
                        }
                    }
                }
            })
        };
        let tx = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut dgram = vec![0u8; RELAY_DATAGRAM];
                RelayHeader {
                    ty: MSG_RELAY_TO,
                    node: dst,
                }
                .emit(&mut dgram);
                // Not a real tunnel datagram: the relay forwards opaque bytes.
                dgram[RELAY_HEADER_LEN] = pilot_proto::wire::MSG_DATA;
                // Datagrams per millisecond for the offered rate.
                let per_ms = mbps * 1e6 / 8.0 / RELAY_DATAGRAM as f64 / 1000.0;
                let start = Instant::now();
                let mut sent = 0f64;
                // Bounded: ten minutes at most.
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(600) {
                    let due = start.elapsed().as_secs_f64() * 1000.0 * per_ms;
                    while sent < due {
                        let _ = from.send_to(&dgram, registry);
                        sent += 1.0;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Ok(RelayStream {
            stop,
            threads: vec![rx, tx],
            buckets,
            t0,
        })
    }

    /// Stops; the bytes received per 10 ms since `t0`.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.buckets.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// Mbit/s received in [from, to) (seconds since `t0`) from 10 ms buckets.
pub fn mbps_between(buckets: &[u64], from: f64, to: f64) -> f64 {
    let (a, b) = ((from * 100.0) as usize, (to * 100.0) as usize);
    if b <= a {
        return 0.0;
    }
    let bytes: u64 = (a..b).map(|k| buckets.get(k).copied().unwrap_or(0)).sum();
    bytes as f64 * 8.0 / 1e6 / ((b - a) as f64 / 100.0)
}

/// The processes whose CPU time is counted per phase.
#[derive(Clone, Debug)]
pub struct Watch {
    pub name: String,
    pub pids: Vec<u32>,
    /// Count the children too (PostgreSQL's backends under the postmaster).
    pub tree: bool,
}

/// /proc reports CPU times in USER_HZ ticks, which Linux fixes at 100 for
/// user space whatever the kernel's own tick.
const TICKS_PER_S: f64 = 100.0;

/// utime + stime (+ the reaped children's with `children`) of `pid`, in
/// clock ticks; 0 if it is gone.
fn ticks(pid: u32, children: bool) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command name (which may hold spaces).
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15,
    // cutime 16, cstime 17.
    let get = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15) + if children { get(16) + get(17) } else { 0 }
}

/// The live children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// CPU seconds of every watched process (and this one, `generator`), now.
pub fn cpu_now(watches: &[Watch]) -> HashMap<String, f64> {
    let hz = TICKS_PER_S;
    let mut out = HashMap::new();
    out.insert(
        "generator".to_string(),
        ticks(std::process::id(), false) as f64 / hz,
    );
    for w in watches {
        let mut t = 0;
        for &p in &w.pids {
            t += ticks(p, w.tree);
            if w.tree {
                t += children_of(p)
                    .into_iter()
                    .map(|c| ticks(c, true))
                    .sum::<u64>();
            }
        }
        *out.entry(w.name.clone()).or_insert(0.0) += t as f64 / hz;
    }
    out
}

/// VmRSS of `pid`, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
