//! The registry's HTTP pages (`--metrics ADDR`): `/metrics` in the
//! Prometheus text format, and at `/` a status page for people — plain
//! HTML that refreshes itself, with no script and nothing loaded from
//! elsewhere. The page shows counts; it lists nodes (hostname, address,
//! online) only when the operator asked for it (`--status-list-nodes`),
//! since who is in the network is not everyone's business. Every string
//! on it is HTML-escaped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pilot_metrics::expo::{self, Exposition, Kind};
use pilot_metrics::http::{Limits, Request, Response};
use tokio::net::TcpListener;

use crate::stats::Stats;
use crate::view::View;

/// Seconds between the status page's reloads.
pub const REFRESH_SECS: u32 = 10;

/// Serves the pages on `listener` until the task ends.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, view: Arc<View>) {
    pilot_metrics::http::serve(listener, Limits::default(), move |req: Request| {
        let (stats, view) = (stats.clone(), view.clone());
        async move { respond(&req, &stats, &view) }
    })
    .await;
}

/// The answer to one request.
pub fn respond(req: &Request, stats: &Stats, view: &View) -> Response {
    match req.path.as_str() {
        "/metrics" => Response::ok(expo::CONTENT_TYPE, metrics(stats, view)),
        "/" => Response::ok("text/html; charset=utf-8", status_page(stats, view)),
        _ => Response::not_found(),
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// `/metrics`.
pub fn metrics(stats: &Stats, view: &View) -> String {
    let p = view.published();
    let mut e = Exposition::new();
    let role = if view.relay_only { "relay" } else { "registry" };
    let network = view.network.to_string();
    e.family(
        "pilot_registry_info",
        Kind::Gauge,
        "Always 1; the labels say what this instance is.",
    );
    e.sample_u64(
        "pilot_registry_info",
        &[
            ("network", &network),
            ("role", role),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1,
    );
    e.single(
        "pilot_registry_uptime_seconds",
        Kind::Gauge,
        "Seconds since this instance started.",
        view.started.elapsed().as_secs(),
    );
    for (name, help, v) in [
        (
            "pilot_registry_registrations_total",
            "Registrations accepted (a node registering again counts again).",
            load(&stats.registrations),
        ),
        (
            "pilot_registry_lookups_total",
            "Peer lookups answered, found or not.",
            load(&stats.lookups),
        ),
        (
            "pilot_registry_statements_total",
            "Trust statements stored for delivery.",
            load(&stats.statements),
        ),
        (
            "pilot_registry_control_messages_total",
            "Control messages handled.",
            load(&stats.messages),
        ),
        (
            "pilot_registry_refused_messages_total",
            "Control messages refused: undecodable, badly signed or replayed.",
            load(&stats.refused),
        ),
        (
            "pilot_registry_busy_answers_total",
            "Requests answered busy because the storage queue was full.",
            load(&stats.busy),
        ),
        (
            "pilot_registry_handshakes_total",
            "Control session handshakes completed.",
            load(&stats.handshakes),
        ),
        (
            "pilot_registry_stun_requests_total",
            "STUN Binding requests answered.",
            load(&stats.stun),
        ),
        (
            "pilot_registry_relayed_datagrams_total",
            "Datagrams relayed between nodes that approved each other.",
            load(&stats.relayed),
        ),
        (
            "pilot_registry_relayed_bytes_total",
            "Bytes of the datagrams relayed.",
            load(&stats.relayed_bytes),
        ),
        (
            "pilot_registry_relay_held_total",
            "Relayed datagrams held while the relay learned whether the pair approved each other.",
            load(&stats.relay_held),
        ),
    ] {
        e.single(name, Kind::Counter, help, v);
    }
    e.family(
        "pilot_registry_relay_refusals_total",
        Kind::Counter,
        "Relayed datagrams refused, by reason: not-allowed (unknown sender, recipient offline, pair not approved) or over-limit (sender's bandwidth).",
    );
    for (reason, v) in [
        ("not-allowed", &stats.relay_refused),
        ("over-limit", &stats.relay_limited),
    ] {
        e.sample_u64(
            "pilot_registry_relay_refusals_total",
            &[("reason", reason)],
            load(v),
        );
    }
    e.family(
        "pilot_registry_drops_total",
        Kind::Counter,
        "Datagrams and work dropped, by reason.",
    );
    for (reason, v) in [
        ("malformed", &stats.dropped_malformed),
        ("bad-handshake", &stats.dropped_handshake),
        ("rate-limited", &stats.dropped_rate),
        ("auth", &stats.dropped_auth),
        ("queue-full", &stats.dropped_busy),
        ("control-rate", &stats.control_limited),
    ] {
        e.sample_u64("pilot_registry_drops_total", &[("reason", reason)], load(v));
    }
    e.single(
        "pilot_registry_sessions",
        Kind::Gauge,
        "Control sessions (handshakes done, registered or not).",
        p.sessions,
    );
    e.single(
        "pilot_registry_nodes_online",
        Kind::Gauge,
        "Nodes registered on a live control session with this instance.",
        p.online,
    );
    if let Some(n) = p.registered {
        e.single(
            "pilot_registry_nodes_registered",
            Kind::Gauge,
            "Nodes registered in the database (online or not).",
            n,
        );
    }
    e.single(
        "pilot_registry_relay_active_pairs",
        Kind::Gauge,
        "Node pairs (sender, recipient) relayed for within the last minute.",
        p.relay_pairs,
    );
    e.family(
        "pilot_registry_storage_duration_seconds",
        Kind::Histogram,
        "Time the storage thread took per job, by kind of job.",
    );
    for (job, h) in stats.storage.each() {
        e.histogram(
            "pilot_registry_storage_duration_seconds",
            &[("job", job)],
            &h.snapshot(),
        );
    }
    e.finish()
}

/// `s` with `& < > " '` escaped for HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "3d 4h 5m 6s", from the largest unit that is not zero.
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

/// Bytes in the largest binary unit that keeps a number >= 1.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.5em}\
table{border-collapse:collapse}td,th{padding:.25em .8em;text-align:left;border-bottom:1px solid #ddd}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.on{color:#176b2c}.off{color:#888}\
footer{margin-top:2em;color:#666;font-size:.9em}";

/// `/`: the status page.
pub fn status_page(stats: &Stats, view: &View) -> String {
    let p = view.published();
    let role = if view.relay_only {
        "relay-only instance"
    } else {
        "registry"
    };
    let listen = view
        .listen
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    let registered = p
        .registered
        .map_or_else(|| "…".to_string(), |n| n.to_string());
    let mut h = String::with_capacity(4096);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>pilot-registry {network}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>pilot-registry: network <span id=\"network\">{network}</span></h1>\n",
        network = html_escape(&view.network.to_string()),
    );
    let row = |h: &mut String, label: &str, id: &str, value: &str| {
        let _ = writeln!(
            h,
            "<tr><th scope=\"row\">{label}</th><td class=\"n\"><span id=\"{id}\">{}</span></td></tr>",
            html_escape(value)
        );
    };
    h.push_str("<h2>Nodes</h2>\n<table>\n");
    row(&mut h, "Registered", "nodes-registered", &registered);
    row(&mut h, "Online", "nodes-online", &p.online.to_string());
    row(
        &mut h,
        "Control sessions",
        "sessions",
        &p.sessions.to_string(),
    );
    row(
        &mut h,
        "Registrations accepted",
        "registrations",
        &load(&stats.registrations).to_string(),
    );
    row(
        &mut h,
        "Lookups answered",
        "lookups",
        &load(&stats.lookups).to_string(),
    );
    row(
        &mut h,
        "Trust statements carried",
        "statements",
        &load(&stats.statements).to_string(),
    );
    h.push_str("</table>\n<h2>Instances and relays</h2>\n<table>\n");
    let _ = writeln!(
        h,
        "<tr><th scope=\"row\">This {role}</th><td><span id=\"instance\">{}</span> (UDP: control, STUN, relay)</td></tr>",
        html_escape(&listen)
    );
    if view.relays.is_empty() {
        h.push_str("<tr><th scope=\"row\">Relay-only instances</th><td>none: this instance relays</td></tr>\n");
    }
    for r in &view.relays {
        let _ = writeln!(
            h,
            "<tr><th scope=\"row\">Relay-only instance</th><td>{}</td></tr>",
            html_escape(&r.to_string())
        );
    }
    row(
        &mut h,
        "Node pairs relayed in the last minute",
        "relay-pairs",
        &p.relay_pairs.to_string(),
    );
    h.push_str("</table>\n<h2>Traffic through this instance</h2>\n<table>\n");
    row(
        &mut h,
        "Relayed",
        "relayed-bytes",
        &bytes(load(&stats.relayed_bytes)),
    );
    row(
        &mut h,
        "Relayed datagrams",
        "relayed-datagrams",
        &load(&stats.relayed).to_string(),
    );
    row(
        &mut h,
        "Relayed datagrams refused",
        "relay-refused",
        &(load(&stats.relay_refused) + load(&stats.relay_limited)).to_string(),
    );
    row(
        &mut h,
        "Uptime",
        "uptime",
        &uptime(view.started.elapsed().as_secs()),
    );
    h.push_str("</table>\n");
    if view.list() > 0 {
        let _ = writeln!(
            h,
            "<h2>Nodes by address</h2>\n<table id=\"nodes\">\n\
             <tr><th>Hostname</th><th>Address</th><th>Node id</th><th>Online</th></tr>"
        );
        for n in &p.nodes {
            let (class, word) = if n.online {
                ("on", "online")
            } else {
                ("off", "offline")
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"{class}\">{word}</td></tr>",
                html_escape(n.hostname.as_deref().unwrap_or("-")),
                html_escape(&n.address.to_string()),
                html_escape(&n.node_id.to_string()),
            );
        }
        h.push_str("</table>\n");
        if p.registered.is_some_and(|r| r > p.nodes.len() as u64) {
            let _ = writeln!(
                h,
                "<p>The first {} of {registered} nodes are listed.</p>",
                p.nodes.len()
            );
        }
    }
    let _ = write!(
        h,
        "<footer>Reloads every {REFRESH_SECS} s. Prometheus metrics: <a href=\"/metrics\">/metrics</a>. pilot-registry {}.</footer>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NodeRow;
    use pilot_proto::identity::Identity;
    use std::net::Ipv4Addr;

    fn view() -> View {
        View::new(
            "10.77.0.0/16".parse().unwrap(),
            vec![],
            false,
            Some("192.0.2.1:7946".parse().unwrap()),
        )
    }

    fn row(n: u8, host: Option<&str>) -> NodeRow {
        NodeRow {
            identity: Identity::from_bytes(&[n; 64]).public(),
            address: Ipv4Addr::new(10, 77, 0, n),
            hostname: host.map(str::to_string),
            endpoints: vec![],
            reg_seq: 1,
            reg_digest: None,
        }
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn the_page_shows_counts_and_lists_nodes_only_when_asked() {
        let stats = Stats::default();
        stats
            .relayed_bytes
            .store(3 * 1024 * 1024, Ordering::Relaxed);
        let v = view();
        let sessions = crate::sessions::Sessions::default();
        v.census(
            Some(2),
            vec![row(1, Some("alpha")), row(2, Some("<b>x</b>"))],
            &sessions,
        );
        let page = status_page(&stats, &v);
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
        assert!(
            page.contains("<span id=\"nodes-registered\">2</span>"),
            "{page}"
        );
        assert!(
            page.contains("<span id=\"nodes-online\">0</span>"),
            "{page}"
        );
        assert!(page.contains("<span id=\"network\">10.77.0.0/16</span>"));
        assert!(page.contains("<span id=\"relayed-bytes\">3.0 MiB</span>"));
        assert!(!page.contains("alpha"), "no list unless configured");
        assert!(!page.contains("<script"), "no script");
        assert!(!page.contains("src="), "nothing loaded from elsewhere");
        v.set_list(100);
        let page = status_page(&stats, &v);
        assert!(page.contains("<td>alpha</td><td>10.77.0.1</td>"), "{page}");
        assert!(page.contains("<td>&lt;b&gt;x&lt;/b&gt;</td>"), "{page}");
        assert!(!page.contains("<b>x</b>"));
    }

    #[test]
    fn metrics_name_every_family_once() {
        let stats = Stats::default();
        stats.registrations.store(2, Ordering::Relaxed);
        stats.relay_limited.store(7, Ordering::Relaxed);
        stats
            .storage
            .observe("register", std::time::Duration::from_micros(300));
        let v = view();
        v.census(Some(2), vec![], &crate::sessions::Sessions::default());
        let text = metrics(&stats, &v);
        assert!(text.contains("\npilot_registry_registrations_total 2\n"));
        assert!(text.contains("\npilot_registry_nodes_registered 2\n"));
        assert!(text.contains("pilot_registry_relay_refusals_total{reason=\"over-limit\"} 7\n"));
        assert!(text.contains(
            "pilot_registry_storage_duration_seconds_bucket{job=\"register\",le=\"0.0005\"} 1\n"
        ));
        assert!(
            text.contains("pilot_registry_storage_duration_seconds_count{job=\"register\"} 1\n")
        );
        assert!(text.contains("pilot_registry_info{network=\"10.77.0.0/16\",role=\"registry\""));
        let mut seen = std::collections::HashSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l.to_string()), "family twice: {l}");
        }
        // Counters end in _total, and every sample has a family.
        for l in text.lines().filter(|l| l.ends_with(" counter")) {
            assert!(l.split(' ').nth(2).unwrap().ends_with("_total"), "{l}");
        }
    }

    #[test]
    fn requests_are_routed() {
        let (s, v) = (Stats::default(), view());
        let req = |p: &str| Request {
            path: p.into(),
            query: None,
        };
        assert_eq!(
            respond(&req("/metrics"), &s, &v).content_type,
            expo::CONTENT_TYPE
        );
        assert!(respond(&req("/"), &s, &v)
            .content_type
            .starts_with("text/html"));
        assert_eq!(respond(&req("/etc/passwd"), &s, &v).status, 404);
    }

    #[test]
    fn small_formats() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(3725), "1h 2m 5s");
        assert_eq!(uptime(90_061), "1d 1h 1m 1s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
