//! What pilot-tun and pilot-registry need to run as system services, and
//! nothing else: their config files ([`config`]), readiness for systemd
//! ([`notify`]), logs fit for a terminal, journald or a size-bounded file
//! ([`logging`], [`rotate`]), and the sentences that explain a conflict with
//! the host (a busy UDP port in [`ports`], a missing capability in
//! [`caps`]).

pub mod caps;
pub mod config;
pub mod logging;
pub mod notify;
pub mod ports;
pub mod rotate;

/// The tests that change the process environment (`NOTIFY_SOCKET`,
/// `JOURNAL_STREAM`) run one at a time: `setenv` while another thread
/// reads the environment is not safe.
#[cfg(test)]
pub(crate) static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
