//! Hooks the overlay's DNS server into the host's resolver: where
//! systemd-resolved runs, the interface gets a per-link DNS server (our
//! overlay address) and the routing domain `~<domain>` through
//! `resolvectl`, so only the overlay's names go to us; `down` reverts the
//! link. Where it does not, [`stanza`] says what to add by hand
//! (`pilot-tun dns print`, and `status`'s hint).
//!
//! Best effort: a resolver that cannot be set up is logged and reported in
//! `status`, never a reason to stop the node.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The varlink socket systemd-resolved serves while it runs.
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";
/// How long one `resolvectl` call may take (it waits on D-Bus).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the host's resolver was set up, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    /// systemd-resolved sends the domain's questions to us.
    Resolved,
    /// Not set up; the text says why and what to add.
    Manual(String),
}

/// True if this process shares the network namespace of PID 1. A
/// daemon in another namespace must not touch resolved: it knows links by
/// index in its own namespace, and the index of our interface there names
/// some other interface of the host.
fn in_host_netns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn have_resolvectl() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("resolvectl").is_file()))
}

/// Runs `resolvectl ARGS`, bounded in time; the error says what failed.
fn resolvectl(args: &[&str]) -> Result<(), String> {
    let mut child = Command::new("resolvectl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run resolvectl: {e}"))?;
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!(
                    "`resolvectl {}` failed ({st}): {}",
                    args.join(" "),
                    err.trim()
                ));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`resolvectl {}` did not finish within {} s",
                    args.join(" "),
                    CALL_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("resolvectl: {e}")),
        }
    }
}

/// Points systemd-resolved at our server for `domain` on interface
/// `dev`, if resolved runs here; otherwise says what to add by hand.
pub fn hook(dev: &str, addr: Ipv4Addr, domain: &str) -> Hook {
    let manual = |why: &str| Hook::Manual(format!("{why}: {}", hint(addr)));
    if !in_host_netns() {
        return manual("not in the host's network namespace, systemd-resolved left alone");
    }
    if !have_resolvectl() || !Path::new(RESOLVED_SOCKET).exists() {
        return manual("systemd-resolved is not running");
    }
    let ip = addr.to_string();
    let routing = format!("~{domain}");
    let set = resolvectl(&["dns", dev, &ip])
        .and_then(|()| resolvectl(&["domain", dev, &routing]))
        // Not the default route for other names: only the domain is ours.
        .and_then(|()| resolvectl(&["default-route", dev, "false"]));
    match set {
        Ok(()) => Hook::Resolved,
        Err(e) => {
            let _ = resolvectl(&["revert", dev]);
            manual(&format!("systemd-resolved could not be set up ({e})"))
        }
    }
}

/// Undoes [`hook`] (the interface is going away anyway; this leaves no
/// stale server behind if it lingers).
pub fn unhook(dev: &str) {
    if let Err(e) = resolvectl(&["revert", dev]) {
        tracing::warn!("{e}");
    }
}

/// One line for `status`: what makes programs ask our server.
pub fn hint(addr: Ipv4Addr) -> String {
    format!("add `nameserver {addr}` as the first line of /etc/resolv.conf (or run `pilot-tun dns print`)")
}

/// `pilot-tun dns print`: the configuration for systemd-resolved and for
/// a plain /etc/resolv.conf.
pub fn stanza(dev: &str, addr: Ipv4Addr, domain: &str) -> String {
    format!(
        "\
# pilot-tun answers DNS for *.{domain} at {addr} (port 53), to this host only.
#
# With systemd-resolved (pilot-tun does this itself at `up` when resolved runs):
#   resolvectl dns {dev} {addr}
#   resolvectl domain {dev} '~{domain}'
#   resolvectl default-route {dev} false
# or for good, /etc/systemd/resolved.conf.d/pilot.conf:
#   [Resolve]
#   DNS={addr}
#   Domains=~{domain}
#
# Without it, as the first line of /etc/resolv.conf (it refuses every other
# name at once, so the resolver goes on to the next nameserver):
nameserver {addr}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stanza_names_the_address_and_the_domain() {
        let s = stanza("pilot0", Ipv4Addr::new(10, 77, 0, 1), "pilot");
        assert!(s.contains("resolvectl dns pilot0 10.77.0.1"));
        assert!(s.contains("Domains=~pilot"));
        assert!(s.lines().any(|l| l == "nameserver 10.77.0.1"));
        // Only the nameserver line is not a comment: the output can be
        // appended to resolv.conf as it is.
        let live: Vec<&str> = s
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(live, ["nameserver 10.77.0.1"]);
    }
}
