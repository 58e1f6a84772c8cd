//! Load for scripts/registry-burst.sh: a STUN prober and a burst of real
//! registrations, each bounded in count and time, printing JSON.
//!
//! `registry-burst stun <ip:port> <seconds> <interval-ms>`
//!   sends a STUN Binding request every interval for the given time and
//!   prints `{"samples": [[sent_unix_s, rtt_ms | null], ...]}` (null: no
//!   answer within 1 s).
//!
//! `registry-burst register <join-url> <count> <sources> <in-flight> <deadline-s>`
//!   registers `count` fresh identities, each from one of `sources` loopback
//!   addresses (127.1.x.y; one source may start 20 handshakes/s, so a burst
//!   needs many), `in-flight` at a time: a Noise IK handshake with the
//!   registry, then a signed `Register`, as a node does. An answer "busy"
//!   is retried after a pause. Prints counts, the time span and latencies.
//!   Only loopback or a namespace the caller built: the script runs it in
//!   the registry's own namespace against 127.0.0.1.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::Identity;
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{
    self, ErrorCode, FromRegistry, NatType, Registration, Signed, ToRegistry,
};
use pilot_proto::session::{CipherSuite, Session};
use pilot_proto::wire::{self, DATA_HEADER_LEN};
use pilot_proto::{frame, stun};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn usage() -> ! {
    eprintln!(
        "usage: registry-burst stun <ip:port> <seconds> <interval-ms>\n       registry-burst register <join-url> <count> <sources> <in-flight> <deadline-s>"
    );
    std::process::exit(2);
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("stun") => stun_probe(
            arg(&args, 2),
            Duration::from_secs(arg::<u64>(&args, 3).min(600)),
            Duration::from_millis(arg::<u64>(&args, 4).max(1)),
        ),
        Some("register") => {
            let join: JoinUrl = arg(&args, 2);
            let count: usize = arg::<usize>(&args, 3).min(100_000);
            let sources: u32 = arg::<u32>(&args, 4).clamp(1, 60_000);
            let in_flight: usize = arg::<usize>(&args, 5).clamp(1, 4096);
            let deadline = Duration::from_secs(arg::<u64>(&args, 6).min(600));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(burst(join, count, sources, in_flight, deadline));
        }
        _ => usage(),
    }
}

type Sent = HashMap<[u8; 12], (f64, Instant)>;

/// One Binding request every `interval` for `duration`; RTT per request.
fn stun_probe(to: SocketAddr, duration: Duration, interval: Duration) {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).expect("bind UDP");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("set timeout");
    // Transaction id -> (sent, unix seconds; sent, monotonic).
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let rtts: Arc<Mutex<HashMap<[u8; 12], f64>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rx = {
        let (sock, sent, rtts, done) = (
            sock.try_clone().expect("clone socket"),
            sent.clone(),
            rtts.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !done.load(Ordering::Relaxed) {
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
                if let Some(&(_, at)) = sent.lock().unwrap().get(&tid) {
                    rtts.lock()
                        .unwrap()
                        .insert(tid, now.duration_since(at).as_secs_f64() * 1e3);
                }
            }
        })
    };
    let start = Instant::now();
    let mut order = vec![];
    let mut next = start;
    let mut i: u64 = 0;
    while next.duration_since(start) < duration {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&i.to_le_bytes());
        tid[8..].copy_from_slice(&std::process::id().to_le_bytes());
        sent.lock()
            .unwrap()
            .insert(tid, (unix_now(), Instant::now()));
        let _ = sock.send_to(&stun::binding_request(&tid), to);
        order.push(tid);
        i += 1;
        next += interval;
    }
    // Late answers still count (up to 1 s), then stop the reader.
    std::thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    let _ = rx.join();
    let sent = sent.lock().unwrap();
    let rtts = rtts.lock().unwrap();
    let samples: Vec<String> = order
        .iter()
        .map(|tid| {
            let t = sent[tid].0;
            match rtts.get(tid) {
                Some(r) if *r <= 1000.0 => format!("[{t:.6},{r:.4}]"),
                _ => format!("[{t:.6},null]"),
            }
        })
        .collect();
    println!("{{\"samples\":[{}]}}", samples.join(","));
}

/// Cheap, non-cryptographic key material for throwaway benchmark nodes.
fn bench_identity(seed: u64, i: u64) -> Identity {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut bytes = [0u8; 64];
    for chunk in bytes.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    Identity::from_bytes(&bytes)
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    busy_answers: AtomicUsize,
    refused: AtomicUsize,
    timed_out: AtomicUsize,
    handshake_failed: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
}

enum Outcome {
    Registered,
    Busy,
    Refused,
    NoAnswer,
}

async fn burst(join: JoinUrl, count: usize, sources: u32, in_flight: usize, deadline: Duration) {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let clock = Arc::new(AtomicU64::new(0));
    let started = unix_now();
    let t0 = Instant::now();
    let end = t0 + deadline;
    let mut workers = vec![];
    for _ in 0..in_flight.min(count) {
        let (tally, next, clock) = (tally.clone(), next.clone(), clock.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= end {
                    return;
                }
                let src =
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + (i as u32 % sources));
                let began = Instant::now();
                let id = bench_identity(seed, i as u64);
                if register_one(&join, &id, IpAddr::V4(src), &clock, &tally, end)
                    .await
                    .is_some()
                {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally
                        .latencies_us
                        .lock()
                        .unwrap()
                        .push(began.elapsed().as_micros() as u64);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let finished = unix_now();
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let k = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[k] as f64 / 1e3
    };
    println!(
        "{{\"start\":{started:.6},\"end\":{finished:.6},\"count\":{count},\"ok\":{},\"busy_answers\":{},\"refused\":{},\"timed_out\":{},\"handshake_failed\":{},\"latency_ms_p50\":{:.2},\"latency_ms_p99\":{:.2}}}",
        tally.ok.load(Ordering::Relaxed),
        tally.busy_answers.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.timed_out.load(Ordering::Relaxed),
        tally.handshake_failed.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
    );
}

/// Handshake, then register; retries "busy" (after a pause) and lost
/// datagrams, until `end`. `None` if it did not get registered.
async fn register_one(
    join: &JoinUrl,
    id: &Identity,
    src: IpAddr,
    clock: &AtomicU64,
    tally: &Tally,
    end: Instant,
) -> Option<()> {
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(src, 0))
        .await
        .ok()?;
    let to = join.first();
    let own_mac = MacKey::for_static(&id.static_public());
    let mut buf = vec![0u8; 2048];
    // Timestamps must grow per identity; one shared counter keeps them so.
    let mut session = None;
    for _ in 0..3 {
        if Instant::now() >= end {
            break;
        }
        let ts = clock.fetch_add(1, Ordering::Relaxed) + unix_nanos();
        let (init, msg) = handshake::initiate(
            id.static_secret(),
            &join.key,
            rand_index(ts),
            ts,
            CipherSuite::Aes256Gcm,
        )
        .ok()?;
        sock.send_to(&msg, to).await.ok()?;
        let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(1000), sock.recv_from(&mut buf)).await
        else {
            continue;
        };
        let Ok(resp) = wire::HandshakeResp::new_checked(&buf[..n]) else {
            continue;
        };
        if let Ok(s) = init.finish(&own_mac, resp, Instant::now()) {
            session = Some(s);
            break;
        }
    }
    let Some(session) = session else {
        tally.handshake_failed.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let mut seq = 1;
    let mut req = 1;
    while Instant::now() < end {
        match call_register(&sock, to, &session, id, seq, req, &mut buf).await {
            Outcome::Registered => return Some(()),
            Outcome::Busy => {
                tally.busy_answers.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200 + u64::from(req % 7) * 50)).await;
            }
            Outcome::Refused => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Outcome::NoAnswer => {}
        }
        seq += 1;
        req += 1;
    }
    tally.timed_out.fetch_add(1, Ordering::Relaxed);
    None
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn rand_index(x: u64) -> u32 {
    (x ^ (x >> 29)).wrapping_mul(0x9E37_79B9) as u32
}

async fn call_register(
    sock: &tokio::net::UdpSocket,
    to: SocketAddr,
    session: &Session,
    id: &Identity,
    seq: u64,
    req: u32,
    buf: &mut [u8],
) -> Outcome {
    let reg = Signed::sign(
        Registration {
            identity: id.public(),
            hostname: None,
            seq,
            local_endpoints: vec![],
            nat: NatType::Unknown,
        },
        id,
    );
    let Ok(bytes) = messages::encode(&ToRegistry::Register { req, reg }) else {
        return Outcome::Refused;
    };
    let mut out = vec![];
    if frame::push_sealed(&mut out, &session.sender, None, &bytes).is_err() {
        return Outcome::Refused;
    }
    if sock.send_to(&out, to).await.is_err() {
        return Outcome::NoAnswer;
    }
    let wait_until = tokio::time::Instant::now() + Duration::from_millis(2000);
    loop {
        let Ok(Ok((n, _))) = tokio::time::timeout_at(wait_until, sock.recv_from(buf)).await else {
            return Outcome::NoAnswer;
        };
        let Ok(m) = session.open(&mut buf[..n]) else {
            continue;
        };
        let Ok(msg) = messages::decode::<FromRegistry>(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + m])
        else {
            continue;
        };
        match msg {
            FromRegistry::Registered { req: r, .. } if r == req => return Outcome::Registered,
            FromRegistry::Error {
                req: r,
                code: ErrorCode::Busy,
                ..
            } if r == req => return Outcome::Busy,
            FromRegistry::Error { req: r, .. } if r == req => return Outcome::Refused,
            // An answer to an earlier try, or a push: keep waiting.
            _ => continue,
        }
    }
}
