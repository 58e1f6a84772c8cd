//! A handshake flood for scripts/flood-bench.sh and netns scenario s20: sends
//! initiation-shaped datagrams at a node's UDP port from many source
//! addresses at a paced rate, bounded in count and time, and counts what
//! comes back. Prints one JSON object with the figures.
//!
//! ```text
//! handshake-flood --target IP:PORT --victim-state-dir DIR --mode valid|bad
//!                 --rate N --duration S --sources LIST [--linger-ms MS]
//! ```
//! - `--mode valid`: every datagram has the size and type of an initiation
//!   and a `mac1` that checks against the victim's static key (read from
//!   its `identity.key`; any node that knows a peer's key can do this), with
//!   junk where Noise would be. Past its load threshold the victim answers
//!   each with a cookie reply instead of a Diffie-Hellman.
//! - `--mode bad`: the same datagrams with one bit of `mac1` flipped: they
//!   take the same path into the victim and stop at the MAC check.
//! - `--rate`: datagrams per second, all sources together; `--duration`:
//!   seconds. At most `rate * duration` datagrams leave, and the tool stops
//!   after `duration` (plus `--linger-ms`, default 500, for late replies).
//!   A sender that falls behind does not catch up in a burst: the datagrams
//!   it could not send in time are counted as `behind`.
//! - `--sources`: comma-separated IPv4 addresses, ranges `A-B` and prefixes
//!   `A/NN` (their host addresses); each must be assigned to an interface
//!   here, one UDP socket is bound per address, and they take turns.
//!
//! Network safety: the target and every source must be in a documentation
//! range (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) or loopback; the
//! tool refuses anything else. It is meant to run inside a namespace the
//! calling script built.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use pilot_proto::handshake::MacKey;
use pilot_proto::wire::{self, Kind, COOKIE_REPLY_LEN, INIT_LEN, MAC_LEN, MSG_HANDSHAKE_INIT};

/// Most source sockets the tool binds.
const MAX_SOURCES: usize = 4096;
/// Highest rate accepted (datagrams per second).
const MAX_RATE: u64 = 1_000_000;
/// Longest flood accepted.
const MAX_SECONDS: f64 = 600.0;
/// Distinct datagrams prepared before the flood, sent in turn.
const POOL: usize = 1024;
/// How far behind its schedule the sender may fall before it gives up on
/// the missed datagrams instead of sending them in one burst.
const MAX_LAG: Duration = Duration::from_millis(20);

const USAGE: &str =
    "usage: handshake-flood --target IP:PORT --victim-state-dir DIR --mode valid|bad \
--rate N --duration SECONDS --sources A.B.C.D[/NN|-A.B.C.D][,...] [--linger-ms MS]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `mac1` checks: the victim counts it as load.
    Valid,
    /// `mac1` is wrong: the victim stops at the MAC.
    Bad,
}

struct Opts {
    target: SocketAddr,
    victim: PathBuf,
    mode: Mode,
    rate: u64,
    duration: Duration,
    sources: Vec<Ipv4Addr>,
    linger: Duration,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("handshake-flood: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let opts = parse(std::env::args().skip(1).collect())?;
    let key = victim_static(&opts.victim)?;
    let pool = datagrams(&MacKey::for_static(&key), opts.mode);
    let socks = bind_sources(&opts.sources, opts.target)?;
    let figures = flood(&opts, &pool, socks);
    println!("{figures}");
    Ok(())
}

fn parse(args: Vec<String>) -> anyhow::Result<Opts> {
    let mut it = args.into_iter();
    let (mut target, mut victim, mut mode, mut rate, mut duration, mut sources) =
        (None, None, None, None, None, None);
    let mut linger = Duration::from_millis(500);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--target" => {
                let v = value()?;
                target = Some(v.parse::<SocketAddr>().with_context(|| {
                    format!("--target {v}: expected IP:PORT (the victim's `status` listen)")
                })?)
            }
            "--victim-state-dir" => victim = Some(PathBuf::from(value()?)),
            "--mode" => {
                mode = Some(match value()?.as_str() {
                    "valid" => Mode::Valid,
                    "bad" => Mode::Bad,
                    other => bail!("--mode {other}: expected valid or bad"),
                })
            }
            "--rate" => {
                let v = value()?;
                let r: u64 = v
                    .parse()
                    .with_context(|| format!("--rate {v}: expected datagrams per second"))?;
                if !(1..=MAX_RATE).contains(&r) {
                    bail!("--rate {r}: must be between 1 and {MAX_RATE}");
                }
                rate = Some(r)
            }
            "--duration" => {
                let v = value()?;
                let s: f64 = v
                    .parse()
                    .with_context(|| format!("--duration {v}: expected seconds"))?;
                if !(s > 0.0 && s <= MAX_SECONDS) {
                    bail!("--duration {v}: must be more than 0 and at most {MAX_SECONDS} s");
                }
                duration = Some(Duration::from_secs_f64(s))
            }
            "--sources" => sources = Some(parse_sources(&value()?)?),
            "--linger-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .with_context(|| format!("--linger-ms {v}: expected milliseconds"))?;
                linger = Duration::from_millis(ms.min(10_000))
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let need = |what: &str| anyhow::anyhow!("{what} is required\n{USAGE}");
    let target = target.ok_or_else(|| need("--target"))?;
    if !lab_address(target.ip()) {
        bail!(
            "--target {target}: not a documentation-range (192.0.2.0/24, 198.51.100.0/24, \
             203.0.113.0/24) or loopback address; this tool floods only test namespaces"
        );
    }
    Ok(Opts {
        target,
        victim: victim.ok_or_else(|| need("--victim-state-dir"))?,
        mode: mode.ok_or_else(|| need("--mode"))?,
        rate: rate.ok_or_else(|| need("--rate"))?,
        duration: duration.ok_or_else(|| need("--duration"))?,
        sources: sources.ok_or_else(|| need("--sources"))?,
        linger,
    })
}

/// Loopback or one of the three documentation ranges: the only places a
/// test may send to or from.
fn lab_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || o[..3] == [192, 0, 2]
                || o[..3] == [198, 51, 100]
                || o[..3] == [203, 0, 113]
        }
        IpAddr::V6(a) => a.is_loopback(),
    }
}

/// `A`, `A-B` and `A/NN` items, comma-separated, in order, no duplicates.
fn parse_sources(list: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad =
            || format!("--sources item {item:?}: expected A.B.C.D, A.B.C.D-A.B.C.D or A.B.C.D/NN");
        let (first, last) = if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.parse().with_context(bad)?;
            let b: Ipv4Addr = b.parse().with_context(bad)?;
            (u32::from(a), u32::from(b))
        } else if item.contains('/') {
            let net: ipnet::Ipv4Net = item.parse().with_context(bad)?;
            let hosts: Vec<Ipv4Addr> = net.hosts().collect();
            match (hosts.first(), hosts.last()) {
                (Some(a), Some(b)) => (u32::from(*a), u32::from(*b)),
                _ => bail!("--sources {item}: no host addresses"),
            }
        } else {
            let a: Ipv4Addr = item.parse().with_context(bad)?;
            (u32::from(a), u32::from(a))
        };
        if first > last || (last - first) as usize >= MAX_SOURCES {
            bail!("--sources {item}: an empty range, or more than {MAX_SOURCES} addresses");
        }
        for a in (first..=last).map(Ipv4Addr::from) {
            if !lab_address(IpAddr::V4(a)) {
                bail!("--sources: {a} is not a documentation-range or loopback address");
            }
            if !out.contains(&a) {
                out.push(a);
            }
        }
        if out.len() > MAX_SOURCES {
            bail!("--sources: more than {MAX_SOURCES} addresses");
        }
    }
    if out.is_empty() {
        bail!("--sources: no addresses");
    }
    Ok(out)
}

/// The victim's X25519 static public key, from its state directory (read
/// only: a missing identity is an error, never a new one).
fn victim_static(dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    let state = pilot_tun::state::StateDir::new(dir);
    let file = state.file("identity.key");
    if !file.is_file() {
        bail!(
            "{}: no identity there; --victim-state-dir must be the state directory of a node that has started once",
            file.display()
        );
    }
    let (id, _) = state
        .load_or_create_identity()
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(id.static_public())
}

/// [`POOL`] initiation-shaped datagrams: type and reserved bytes right, a
/// distinct sender index each, junk for the Noise part, and `mac1` for the
/// victim's key (one bit flipped in `Mode::Bad`).
fn datagrams(mac: &MacKey, mode: Mode) -> Vec<[u8; INIT_LEN]> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut next = move || {
        // xorshift64: junk, not secrets.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..POOL)
        .map(|i| {
            let mut d = [0u8; INIT_LEN];
            for chunk in d.chunks_mut(8) {
                let r = next().to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            d[0] = MSG_HANDSHAKE_INIT;
            d[1..4].fill(0);
            d[4..8].copy_from_slice(&(i as u32).to_le_bytes());
            let m = mac.compute(&d[..INIT_LEN - MAC_LEN]);
            d[INIT_LEN - MAC_LEN..].copy_from_slice(&m);
            if mode == Mode::Bad {
                d[INIT_LEN - 1] ^= 0x01;
            }
            d
        })
        .collect()
}

/// One non-blocking UDP socket per source address, connected to the target
/// (no route lookup per datagram, and only the target's answers arrive).
fn bind_sources(sources: &[Ipv4Addr], target: SocketAddr) -> anyhow::Result<Vec<UdpSocket>> {
    sources
        .iter()
        .map(|a| {
            let s = UdpSocket::bind(SocketAddrV4::new(*a, 0)).with_context(|| {
                format!("binding a UDP socket to {a}: is that address assigned to an interface in this namespace?")
            })?;
            s.connect(target)
                .with_context(|| format!("connecting the socket on {a} to {target}"))?;
            s.set_nonblocking(true)
                .with_context(|| format!("making the socket on {a} non-blocking"))?;
            Ok(s)
        })
        .collect()
}

/// What came back to the sources.
#[derive(Default)]
struct Replies {
    cookies: AtomicU64,
    other: AtomicU64,
    first_ms: AtomicU64,
}

/// Sends at the paced rate from every socket in turn while another thread
/// reads what comes back; returns the figures as JSON.
fn flood(opts: &Opts, pool: &[[u8; INIT_LEN]], socks: Vec<UdpSocket>) -> serde_json::Value {
    let socks = Arc::new(socks);
    let replies = Arc::new(Replies {
        first_ms: AtomicU64::new(u64::MAX),
        ..Replies::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let reader = {
        let (socks, replies, stop) = (socks.clone(), replies.clone(), stop.clone());
        std::thread::spawn(move || read_replies(&socks, &replies, &stop, start))
    };
    let total = (opts.rate as f64 * opts.duration.as_secs_f64()).round() as u64;
    let per_lag = (opts.rate as f64 * MAX_LAG.as_secs_f64()).ceil() as u64;
    let tick = Duration::from_secs_f64((1.0 / opts.rate as f64).max(0.0005)).min(MAX_LAG / 4);
    let (mut sent, mut full, mut refused, mut failed, mut behind) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut k = 0usize;
    loop {
        let elapsed = start.elapsed();
        let done = sent + full + refused + failed + behind;
        if elapsed >= opts.duration || done >= total {
            break;
        }
        let due = ((opts.rate as f64 * elapsed.as_secs_f64()) as u64).min(total);
        let mut n = due.saturating_sub(done);
        if n > per_lag {
            // Fell behind (the machine is busy): skip, do not burst.
            behind += n - per_lag;
            n = per_lag;
        }
        for _ in 0..n {
            let sock = &socks[k % socks.len()];
            match sock.send(&pool[k % pool.len()]) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => full += 1,
                Err(e) if e.raw_os_error() == Some(105) => full += 1, // ENOBUFS
                // The victim's port was closed for a moment (a restart).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
            k += 1;
        }
        std::thread::sleep(tick);
    }
    let sending = start.elapsed();
    std::thread::sleep(opts.linger);
    stop.store(true, Ordering::Relaxed);
    // The reader only reads; it cannot panic on what it reads.
    let _ = reader.join();
    let first = replies.first_ms.load(Ordering::Relaxed);
    serde_json::json!({
        "mode": match opts.mode { Mode::Valid => "valid", Mode::Bad => "bad" },
        "target": opts.target.to_string(),
        "sources": socks.len(),
        "rate_asked": opts.rate,
        "seconds": (sending.as_secs_f64() * 1000.0).round() / 1000.0,
        "sent": sent,
        "rate_sent": (sent as f64 / sending.as_secs_f64()).round(),
        "send_buffer_full": full,
        "send_refused": refused,
        "send_failed": failed,
        "first_send_error": first_error,
        "behind": behind,
        "cookie_replies": replies.cookies.load(Ordering::Relaxed),
        "other_replies": replies.other.load(Ordering::Relaxed),
        "first_reply_ms": (first != u64::MAX).then_some(first),
    })
}

/// Reads every socket until `stop`, counting cookie replies and anything
/// else; sleeps between passes (a pass over hundreds of sockets per
/// millisecond would cost more than the flood).
fn read_replies(socks: &[UdpSocket], replies: &Replies, stop: &AtomicBool, start: Instant) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        for s in socks {
            while let Ok(n) = s.recv(&mut buf) {
                let reply = &buf[..n];
                if wire::classify(reply) == Kind::CookieReply && n == COOKIE_REPLY_LEN {
                    replies.cookies.fetch_add(1, Ordering::Relaxed);
                } else {
                    replies.other.fetch_add(1, Ordering::Relaxed);
                }
                replies
                    .first_ms
                    .fetch_min(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_expand_and_stay_in_the_lab() {
        let s = parse_sources("198.51.100.1-198.51.100.3, 203.0.113.8/30,198.51.100.2").unwrap();
        let want: Vec<Ipv4Addr> = [
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.3",
            "203.0.113.9",
            "203.0.113.10",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(s, want);
        assert!(parse_sources("10.0.0.1").is_err(), "not a lab address");
        assert!(parse_sources("198.51.100.9-198.51.100.1").is_err());
        assert!(parse_sources("198.51.100.0/16").is_err(), "leaves the lab");
        assert!(parse_sources("").is_err());
    }

    #[test]
    fn valid_datagrams_pass_mac1_and_bad_ones_do_not() {
        let key = [7u8; 32];
        let mac = MacKey::for_static(&key);
        for (mode, want) in [(Mode::Valid, true), (Mode::Bad, false)] {
            for d in datagrams(&mac, mode).iter().take(8) {
                let init = wire::HandshakeInit::new_checked(d).expect("initiation-shaped");
                assert_eq!(mac.verify(init.mac_covered(), init.mac()), want);
            }
        }
    }

    #[test]
    fn the_target_must_be_in_the_lab() {
        let args = |t: &str| {
            [
                "--target",
                t,
                "--victim-state-dir",
                "/nonexistent",
                "--mode",
                "valid",
                "--rate",
                "10",
                "--duration",
                "1",
                "--sources",
                "127.0.0.1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
        };
        assert!(parse(args("198.51.100.1:5000")).is_ok());
        assert!(parse(args("8.8.8.8:53")).is_err());
        assert!(parse(args("10.1.2.3:5000")).is_err());
    }
}
