//! The Prometheus text exposition format, version 0.0.4: one family per
//! metric name (a `# HELP` and a `# TYPE` line, then its samples), label
//! values escaped, histograms as cumulative `_bucket` lines ending in
//! `le="+Inf"`, then `_sum` and `_count`.
//!
//! ```text
//! # HELP pilot_tun_rx_bytes_total Inner bytes received from peers.
//! # TYPE pilot_tun_rx_bytes_total counter
//! pilot_tun_rx_bytes_total 1048576
//! ```
//!
//! The writer trusts its caller for metric and label *names* (they are
//! constants in the code; a debug build checks them) and escapes every
//! label *value* and help text, which may come from the network.

use std::fmt::Write as _;

use crate::histogram::HistogramSnapshot;

/// The content type of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's type, for its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts); name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted in cumulative buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A document being written. Write each family once: [`Exposition::family`],
/// then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A metric or label name: `[a-zA-Z_:][a-zA-Z0-9_:]*` (label names may not
/// hold `:`, which this check lets pass; the callers use constants).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Appends `v` escaped for a label value: backslash, double quote and line
/// feed become `\\`, `\"` and `\n`.
pub fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends `v` escaped for a `# HELP` line: backslash and line feed.
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as the format writes it (`+Inf`, `-Inf`, `NaN`, or a
/// decimal number).
fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

impl Exposition {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let _ = write!(self.out, "# HELP {name} ");
        escape_help(&mut self.out, help);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.word());
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().chain(extra.as_ref()).enumerate() {
            debug_assert!(valid_name(k) && !k.contains(':'), "label name {k:?}");
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_value(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// One sample of the current family (`name` is the family's name, or
    /// for a histogram one of its `_bucket`/`_sum`/`_count` names).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// One integer sample (counters: exact beyond 2^53, unlike an `f64`).
    pub fn sample_u64(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled integer sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample_u64(name, &[], value);
    }

    /// The samples of one histogram (under [`Exposition::family`] with
    /// [`Kind::Histogram`]): a cumulative `_bucket` line per bound, then
    /// `le="+Inf"`, `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut le = String::new();
        for (bound, cumulative) in h.cumulative() {
            le.clear();
            push_value(&mut le, bound);
            self.out.push_str(&bucket);
            self.labels(labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.out.push_str(&bucket);
        self.labels(labels, Some(("le", "+Inf")));
        let _ = writeln!(self.out, " {}", h.count());
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample_u64(&format!("{name}_count"), labels, h.count());
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;

    #[test]
    fn a_counter_has_help_type_and_sample() {
        let mut e = Exposition::new();
        e.single(
            "pilot_tun_rx_bytes_total",
            Kind::Counter,
            "Inner bytes received.",
            42,
        );
        assert_eq!(
            e.finish(),
            "# HELP pilot_tun_rx_bytes_total Inner bytes received.\n\
             # TYPE pilot_tun_rx_bytes_total counter\n\
             pilot_tun_rx_bytes_total 42\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "help with \\ and\nnewline");
        e.sample_u64("x_total", &[("peer", "a\"b\\c\nd"), ("reason", "plain")], 1);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x_total help with \\\\ and\\nnewline\n\
             # TYPE x_total counter\n\
             x_total{peer=\"a\\\"b\\\\c\\nd\",reason=\"plain\"} 1\n"
        );
        // Every sample stays on one line, whatever the value held.
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn escaping_leaves_other_characters_alone() {
        let mut s = String::new();
        escape_label_value(&mut s, "héllo {x=1} 'q'\t");
        assert_eq!(s, "héllo {x=1} 'q'\t");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        for v in [0.0005, 0.0005, 0.005, 0.05, 5.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.family("rtt_seconds", Kind::Histogram, "RTT.");
        e.histogram("rtt_seconds", &[("peer", "b")], &h.snapshot());
        let text = e.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[2..],
            &[
                "rtt_seconds_bucket{peer=\"b\",le=\"0.001\"} 2",
                "rtt_seconds_bucket{peer=\"b\",le=\"0.01\"} 3",
                "rtt_seconds_bucket{peer=\"b\",le=\"0.1\"} 4",
                "rtt_seconds_bucket{peer=\"b\",le=\"+Inf\"} 5",
                "rtt_seconds_sum{peer=\"b\"} 5.056",
                "rtt_seconds_count{peer=\"b\"} 5",
            ]
        );
    }

    #[test]
    fn an_empty_histogram_is_still_complete() {
        let h = Histogram::new(&[1.0]);
        let mut e = Exposition::new();
        e.family("d_seconds", Kind::Histogram, "D.");
        e.histogram("d_seconds", &[], &h.snapshot());
        assert_eq!(
            e.finish(),
            "# HELP d_seconds D.\n# TYPE d_seconds histogram\n\
             d_seconds_bucket{le=\"1\"} 0\n\
             d_seconds_bucket{le=\"+Inf\"} 0\n\
             d_seconds_sum 0\n\
             d_seconds_count 0\n"
        );
    }

    #[test]
    fn special_values_are_spelled_as_the_format_wants() {
        let mut e = Exposition::new();
        e.family("g", Kind::Gauge, "G.");
        e.sample("g", &[("v", "nan")], f64::NAN);
        e.sample("g", &[("v", "inf")], f64::INFINITY);
        e.sample("g", &[("v", "-inf")], f64::NEG_INFINITY);
        e.sample("g", &[("v", "small")], 0.000_25);
        let text = e.finish();
        assert!(text.contains("g{v=\"nan\"} NaN\n"));
        assert!(text.contains("g{v=\"inf\"} +Inf\n"));
        assert!(text.contains("g{v=\"-inf\"} -Inf\n"));
        assert!(text.contains("g{v=\"small\"} 0.00025\n"));
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("pilot_tun_rx_bytes_total"));
        assert!(valid_name("a:b_c9"));
        assert!(!valid_name("9abc"));
        assert!(!valid_name("a-b"));
        assert!(!valid_name(""));
    }
}
