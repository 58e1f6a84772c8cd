//! The daemon's Prometheus metrics (`pilot-tun up --metrics ADDR`): what
//! `/metrics` exports, gathered from the answers `status` and `peers` give
//! and from the node-wide totals in [`crate::peers::Totals`], and the
//! listener that serves it.
//!
//! Per-peer series (labelled with node id and hostname) are written only
//! with `--metrics-per-peer`: they tell whoever can scrape the endpoint
//! whom this node trusts and talks to. Hostnames come from the registry
//! (a peer chose its own), so they are made printable and cut to 63
//! characters before they become label values (which the writer escapes).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pilot_metrics::expo::{self, Exposition, Kind};
use pilot_metrics::http::{Limits, Request as HttpRequest, Response as HttpResponse};
use pilot_metrics::HistogramSnapshot;
use tokio::net::TcpListener;

use crate::api::{DropCounts, Peer, Request, Status, TooBigCounts, TrustState};
use crate::context::Context;
use crate::controller::{self, Handle};
use crate::peers::Totals;
use crate::sanitize::printable;
use crate::tun::Tun;

/// Everything one scrape writes, read before writing.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The drop counters, as `status` shows them.
    pub drops: DropCounts,
    /// What became of packets too big for their path.
    pub too_big: TooBigCounts,
    /// Trusted peers with a current session.
    pub sessions: u64,
    /// Every known node, with its trust state and tunnel figures.
    pub peers: Vec<PeerLine>,
    /// The node-wide totals.
    pub totals: TotalsNow,
}

/// One known node, for the per-peer series and the trust-state counts.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerLine {
    /// Its node id (hex).
    pub node_id: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// The trust state between us.
    pub trust: TrustState,
    /// True while a session is current.
    pub session: bool,
    /// Inner bytes and packets received and sent (trusted peers, since
    /// the daemon started or the peer was added).
    pub rx_bytes: u64,
    /// See `rx_bytes`.
    pub tx_bytes: u64,
    /// See `rx_bytes`.
    pub rx_packets: u64,
    /// See `rx_bytes`.
    pub tx_packets: u64,
    /// Last measured round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// [`Totals`] read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TotalsNow {
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Inner bytes received through a relay.
    pub rx_relayed_bytes: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Inner bytes sent through a relay.
    pub tx_relayed_bytes: u64,
    /// Handshake initiations sent.
    pub handshakes_started: u64,
    /// Sessions we initiated that came up.
    pub completed_initiator: u64,
    /// Sessions a peer initiated that came up.
    pub completed_responder: u64,
    /// Path changes.
    pub path_changes: u64,
    /// Round trips.
    pub rtt: Option<HistogramSnapshot>,
}

impl TotalsNow {
    /// Reads `t`.
    pub fn of(t: &Totals) -> Self {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        TotalsNow {
            rx_bytes: l(&t.rx_bytes),
            rx_packets: l(&t.rx_packets),
            rx_relayed_bytes: l(&t.rx_relayed_bytes),
            tx_bytes: l(&t.tx_bytes),
            tx_packets: l(&t.tx_packets),
            tx_relayed_bytes: l(&t.tx_relayed_bytes),
            handshakes_started: l(&t.handshakes_started),
            completed_initiator: l(&t.handshakes_completed_initiator),
            completed_responder: l(&t.handshakes_completed_responder),
            path_changes: l(&t.path_changes),
            rtt: Some(t.rtt.0.snapshot()),
        }
    }
}

/// Every trust state, with its label value.
const TRUST_STATES: [(TrustState, &str); 8] = [
    (TrustState::Trusted, "trusted"),
    (TrustState::Pending, "pending"),
    (TrustState::Requested, "requested"),
    (TrustState::DeniedByPeer, "denied-by-peer"),
    (TrustState::RevokedByPeer, "revoked-by-peer"),
    (TrustState::Denied, "denied"),
    (TrustState::Revoked, "revoked"),
    (TrustState::None, "none"),
];

/// A hostname as a label value: printable, at most 63 characters.
pub fn hostname_label(h: Option<&str>) -> String {
    printable(h.unwrap_or("")).chars().take(63).collect()
}

/// The exposition of one scrape.
pub fn render(s: &Scrape, per_peer: bool) -> String {
    let t = &s.totals;
    let mut e = Exposition::new();
    e.single(
        "pilot_tun_uptime_seconds",
        Kind::Gauge,
        "Seconds since the daemon started.",
        s.uptime_secs,
    );
    for (name, help, v) in [
        (
            "pilot_tun_rx_bytes_total",
            "Inner (IP packet) bytes received from peers and written to the TUN.",
            t.rx_bytes,
        ),
        (
            "pilot_tun_tx_bytes_total",
            "Inner (IP packet) bytes read from the TUN and sent to peers.",
            t.tx_bytes,
        ),
        (
            "pilot_tun_rx_packets_total",
            "Inner packets received from peers.",
            t.rx_packets,
        ),
        (
            "pilot_tun_tx_packets_total",
            "Inner packets sent to peers.",
            t.tx_packets,
        ),
        (
            "pilot_tun_handshakes_started_total",
            "Handshake initiations sent to peers (each retry counts).",
            t.handshakes_started,
        ),
        (
            "pilot_tun_path_changes_total",
            "Times a peer's packets moved to another path (roaming, relay to direct and back).",
            t.path_changes,
        ),
    ] {
        e.single(name, Kind::Counter, help, v);
    }
    e.family(
        "pilot_tun_relayed_bytes_total",
        Kind::Counter,
        "Inner bytes that went through a relay, by direction.",
    );
    for (dir, v) in [("rx", t.rx_relayed_bytes), ("tx", t.tx_relayed_bytes)] {
        e.sample_u64("pilot_tun_relayed_bytes_total", &[("direction", dir)], v);
    }
    e.family(
        "pilot_tun_handshakes_completed_total",
        Kind::Counter,
        "Sessions that came up, by who initiated the handshake.",
    );
    for (role, v) in [
        ("initiator", t.completed_initiator),
        ("responder", t.completed_responder),
    ] {
        e.sample_u64("pilot_tun_handshakes_completed_total", &[("role", role)], v);
    }
    let d = &s.drops;
    e.family(
        "pilot_tun_handshakes_refused_total",
        Kind::Counter,
        "Handshake initiations refused, by reason (cookie-sent: answered with a cookie under load).",
    );
    for (reason, v) in [
        ("untrusted-key", d.untrusted_handshake),
        ("bad-handshake", d.bad_handshake),
        ("rate-limited", d.rate_limited),
        ("cookie-sent", d.cookie_sent),
    ] {
        e.sample_u64(
            "pilot_tun_handshakes_refused_total",
            &[("reason", reason)],
            v,
        );
    }
    e.family(
        "pilot_tun_drops_total",
        Kind::Counter,
        "Packets and datagrams dropped, by reason (the drops in `pilot-tun status`).",
    );
    for (reason, v) in [
        ("auth", d.auth),
        ("replay", d.replay),
        ("inner-address", d.inner_address),
        ("refused-local", d.refused_local),
        ("malformed", d.malformed),
        ("queue-full", d.queue_full),
        ("policy-in", d.policy_in),
        ("policy-out", d.policy_out),
        ("too-big-send-failed", s.too_big.send_failed),
    ] {
        e.sample_u64("pilot_tun_drops_total", &[("reason", reason)], v);
    }
    e.single(
        "pilot_tun_sessions",
        Kind::Gauge,
        "Trusted peers with a current session.",
        s.sessions,
    );
    e.family(
        "pilot_tun_peers",
        Kind::Gauge,
        "Known nodes by trust state.",
    );
    for (state, label) in TRUST_STATES {
        let n = s.peers.iter().filter(|p| p.trust == state).count() as u64;
        e.sample_u64("pilot_tun_peers", &[("trust", label)], n);
    }
    e.family(
        "pilot_tun_rtt_seconds",
        Kind::Histogram,
        "Round trips to peers, measured by the handshakes this node initiated.",
    );
    let empty = pilot_metrics::Histogram::new(pilot_metrics::histogram::LATENCY_SECONDS);
    let rtt = t.rtt.clone().unwrap_or_else(|| empty.snapshot());
    e.histogram("pilot_tun_rtt_seconds", &[], &rtt);
    if per_peer {
        per_peer_series(&mut e, &s.peers);
    }
    e.finish()
}

fn per_peer_series(e: &mut Exposition, peers: &[PeerLine]) {
    let trusted: Vec<(&PeerLine, String)> = peers
        .iter()
        .filter(|p| p.trust == TrustState::Trusted)
        .map(|p| (p, hostname_label(p.hostname.as_deref())))
        .collect();
    type Field = fn(&PeerLine) -> u64;
    let families: [(&str, &str, Field); 4] = [
        (
            "pilot_tun_peer_rx_bytes_total",
            "Inner bytes received from a trusted peer.",
            |p| p.rx_bytes,
        ),
        (
            "pilot_tun_peer_tx_bytes_total",
            "Inner bytes sent to a trusted peer.",
            |p| p.tx_bytes,
        ),
        (
            "pilot_tun_peer_rx_packets_total",
            "Inner packets received from a trusted peer.",
            |p| p.rx_packets,
        ),
        (
            "pilot_tun_peer_tx_packets_total",
            "Inner packets sent to a trusted peer.",
            |p| p.tx_packets,
        ),
    ];
    for (name, help, field) in families {
        e.family(name, Kind::Counter, help);
        for (p, host) in &trusted {
            e.sample_u64(
                name,
                &[("node_id", &p.node_id), ("hostname", host)],
                field(p),
            );
        }
    }
    e.family(
        "pilot_tun_peer_session",
        Kind::Gauge,
        "1 while a trusted peer has a current session.",
    );
    for (p, host) in &trusted {
        e.sample_u64(
            "pilot_tun_peer_session",
            &[("node_id", &p.node_id), ("hostname", host)],
            u64::from(p.session),
        );
    }
    e.family(
        "pilot_tun_peer_rtt_seconds",
        Kind::Gauge,
        "Last measured round trip to a trusted peer.",
    );
    for (p, host) in &trusted {
        if let Some(ms) = p.rtt_ms {
            e.sample(
                "pilot_tun_peer_rtt_seconds",
                &[("node_id", &p.node_id), ("hostname", host)],
                ms / 1000.0,
            );
        }
    }
}

/// The per-peer lines from `peers`, with the packet counts from the data
/// plane's table (`packets`: by overlay address, received and sent).
pub fn peer_lines(peers: Vec<Peer>, packets: &HashMap<Ipv4Addr, (u64, u64)>) -> Vec<PeerLine> {
    peers
        .into_iter()
        .map(|p| {
            let (rx_packets, tx_packets) = packets.get(&p.address).copied().unwrap_or_default();
            PeerLine {
                node_id: p.node_id,
                hostname: p.hostname,
                trust: p.trust,
                session: p.session,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_packets,
                tx_packets,
                rtt_ms: p.rtt_ms,
            }
        })
        .collect()
}

/// Reads everything for one scrape from a running node.
async fn scrape<T: Tun>(ctx: &Arc<Context<T>>, handle: &Handle<T>) -> Option<Scrape> {
    let status: Status = controller::request(ctx, handle, Request::Status)
        .await
        .ok()?
        .try_into()
        .ok()?;
    let peers: Vec<Peer> = controller::request(ctx, handle, Request::Peers)
        .await
        .ok()?
        .try_into()
        .ok()?;
    let packets: HashMap<Ipv4Addr, (u64, u64)> = ctx
        .shared
        .table
        .read()
        .by_addr
        .iter()
        .map(|(a, p)| {
            let l = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            (*a, (l(&p.rx_packets), l(&p.tx_packets)))
        })
        .collect();
    Some(Scrape {
        uptime_secs: status.uptime_secs,
        drops: status.drops,
        too_big: status.too_big,
        sessions: status.peers.connected,
        peers: peer_lines(peers, &packets),
        totals: TotalsNow::of(&ctx.shared.totals),
    })
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve<T: Tun>(
    listener: TcpListener,
    ctx: Arc<Context<T>>,
    handle: Handle<T>,
    per_peer: bool,
) {
    pilot_metrics::http::serve(listener, Limits::default(), move |req: HttpRequest| {
        let (ctx, handle) = (ctx.clone(), handle.clone());
        async move {
            match req.path.as_str() {
                "/metrics" => match scrape(&ctx, &handle).await {
                    Some(s) => HttpResponse::ok(expo::CONTENT_TYPE, render(&s, per_peer)),
                    None => HttpResponse::text(503, "the daemon could not report its state"),
                },
                _ => HttpResponse::not_found(),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, host: Option<&str>, trust: TrustState) -> PeerLine {
        PeerLine {
            node_id: id.into(),
            hostname: host.map(str::to_string),
            trust,
            session: trust == TrustState::Trusted,
            rx_bytes: 100,
            tx_bytes: 200,
            rx_packets: 3,
            tx_packets: 4,
            rtt_ms: Some(1.5),
        }
    }

    fn scrape() -> Scrape {
        let h = pilot_metrics::Histogram::new(pilot_metrics::histogram::LATENCY_SECONDS);
        h.observe(0.0004);
        Scrape {
            uptime_secs: 60,
            drops: DropCounts {
                untrusted_handshake: 5,
                replay: 2,
                ..DropCounts::default()
            },
            sessions: 1,
            peers: vec![
                line("aa", Some("beta"), TrustState::Trusted),
                line("bb", Some("evil\"}\n\u{1b}[2Jx"), TrustState::Trusted),
                line("cc", None, TrustState::Pending),
            ],
            totals: TotalsNow {
                rx_bytes: 1000,
                tx_packets: 7,
                completed_initiator: 1,
                rtt: Some(h.snapshot()),
                ..TotalsNow::default()
            },
            ..Scrape::default()
        }
    }

    #[test]
    fn totals_and_reasons_are_exported() {
        let text = render(&scrape(), false);
        for want in [
            "\npilot_tun_rx_bytes_total 1000\n",
            "\npilot_tun_tx_packets_total 7\n",
            "pilot_tun_handshakes_completed_total{role=\"initiator\"} 1\n",
            "pilot_tun_handshakes_refused_total{reason=\"untrusted-key\"} 5\n",
            "pilot_tun_drops_total{reason=\"replay\"} 2\n",
            "\npilot_tun_sessions 1\n",
            "pilot_tun_peers{trust=\"trusted\"} 2\n",
            "pilot_tun_peers{trust=\"pending\"} 1\n",
            "pilot_tun_peers{trust=\"revoked\"} 0\n",
            "pilot_tun_rtt_seconds_bucket{le=\"0.0005\"} 1\n",
            "pilot_tun_rtt_seconds_bucket{le=\"+Inf\"} 1\n",
            "pilot_tun_rtt_seconds_count 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn per_peer_series_only_when_asked() {
        let off = render(&scrape(), false);
        assert!(!off.contains("node_id"), "no peer labels by default");
        assert!(!off.contains("beta"));
        let on = render(&scrape(), true);
        assert!(
            on.contains("pilot_tun_peer_rx_bytes_total{node_id=\"aa\",hostname=\"beta\"} 100\n")
        );
        assert!(
            on.contains("pilot_tun_peer_tx_packets_total{node_id=\"aa\",hostname=\"beta\"} 4\n")
        );
        assert!(
            on.contains("pilot_tun_peer_rtt_seconds{node_id=\"aa\",hostname=\"beta\"} 0.0015\n")
        );
        // Only trusted peers get series.
        assert!(!on.contains("node_id=\"cc\""));
        // A hostile hostname cannot break out of its label: quotes are
        // escaped, control characters gone.
        assert!(
            on.contains("{node_id=\"bb\",hostname=\"evil\\\"}[2Jx\"}"),
            "{on}"
        );
        assert!(!on.contains('\u{1b}'));
        for l in on.lines() {
            assert!(l.starts_with('#') || l.starts_with("pilot_tun_"), "{l:?}");
        }
    }

    #[test]
    fn hostnames_are_cut() {
        assert_eq!(hostname_label(Some(&"a".repeat(100))).len(), 63);
        assert_eq!(hostname_label(None), "");
        assert_eq!(hostname_label(Some("a\u{202E}b")), "ab");
    }
}
