//! Metrics for Prometheus, without a web framework: the text exposition
//! format 0.0.4 ([`expo`]), histograms a thread can bump with relaxed
//! atomics ([`histogram`]), and a small HTTP/1.1 listener for `GET`
//! requests ([`http`]) that the daemon and the registry put their
//! `/metrics` (and the registry its status page) on.
//!
//! What to export stays with each program: this crate only writes and
//! serves the text.

pub mod expo;
pub mod histogram;
pub mod http;

pub use expo::{Exposition, Kind};
pub use histogram::{Histogram, HistogramSnapshot};
pub use http::{parse_listen, serve, Limits, Request, Response};
