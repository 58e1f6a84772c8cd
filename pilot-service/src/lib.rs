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
