//! Where the logs go and how they look: text or JSON lines; colour only on
//! a terminal; no timestamp of our own under journald (it stamps every
//! line itself); to standard error, or to a size-bounded file
//! ([`crate::rotate`]) for the background daemon.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::rotate::Rotating;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Where the log lines go.
pub enum Output {
    /// Standard error (a terminal, journald, or whatever it was given).
    Stderr,
    /// A rotating file.
    File(Rotating),
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `--log` is not a filter.
    #[error("--log {spec:?} is not a log filter ({problem}); use a level (error, warn, info, debug, trace) or target=level pairs like `info,pilot_tun=debug`")]
    Filter {
        /// What was given.
        spec: String,
        /// The parser's words.
        problem: String,
    },
    /// A logger was set up already in this process.
    #[error("logging was set up twice")]
    Twice,
}

/// Checks a `--log` filter (so a typo is refused before anything starts).
pub fn filter(spec: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(spec).map_err(|e| LogError::Filter {
        spec: spec.to_string(),
        problem: e.to_string(),
    })
}

/// True if standard error is journald's stream for this service
/// (`$JOURNAL_STREAM` is `<device>:<inode>` of it).
pub fn under_journald() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// How lines look, decided from where they go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// Colour codes.
    pub ansi: bool,
    /// Our own timestamp.
    pub time: bool,
}

impl Style {
    /// Colour only on a terminal; no timestamp when journald adds one.
    pub fn for_output(out: &Output) -> Style {
        match out {
            Output::Stderr => Style {
                ansi: std::io::stderr().is_terminal(),
                time: !under_journald(),
            },
            Output::File(_) => Style {
                ansi: false,
                time: true,
            },
        }
    }
}

/// Sets up the process's logger.
pub fn init(spec: &str, format: LogFormat, out: Output) -> Result<(), LogError> {
    let filter = filter(spec)?;
    let style = Style::for_output(&out);
    let writer = match out {
        Output::Stderr => BoxMakeWriter::new(std::io::stderr),
        Output::File(f) => BoxMakeWriter::new(Mutex::new(f)),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(style.ansi)
        .with_writer(writer);
    let layer = match (format, style.time) {
        (LogFormat::Text, true) => layer.boxed(),
        (LogFormat::Text, false) => layer.without_time().boxed(),
        (LogFormat::Json, true) => layer.json().boxed(),
        (LogFormat::Json, false) => layer.json().without_time().boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .map_err(|_| LogError::Twice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_says_what_a_good_one_looks_like() {
        assert!(filter("info,pilot_tun=debug").is_ok());
        let e = filter("pilot_tun=loud").unwrap_err().to_string();
        assert!(
            e.contains("pilot_tun=loud") && e.contains("info,pilot_tun=debug"),
            "{e}"
        );
    }

    #[test]
    fn journald_is_recognised_by_its_stream_only() {
        let _g = crate::ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let st = nix::sys::stat::fstat(std::io::stderr()).unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        assert!(under_journald());
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino + 1));
        assert!(!under_journald(), "another stream: stderr was redirected");
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!under_journald());
    }

    #[test]
    fn a_file_gets_no_colour_and_keeps_its_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let f = Rotating::open(&dir.path().join("x.log"), 1000, 1).unwrap();
        assert_eq!(
            Style::for_output(&Output::File(f)),
            Style {
                ansi: false,
                time: true
            }
        );
    }

    #[test]
    fn the_format_parses_from_flags_and_files() {
        use clap::ValueEnum;
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
        #[derive(serde::Deserialize)]
        struct F {
            f: LogFormat,
        }
        let f: F = toml::from_str("f = \"text\"").unwrap();
        assert_eq!(f.f, LogFormat::Text);
    }
}
