//! Whether this process may do what a daemon needs, judged from its
//! effective capabilities (`CapEff` in `/proc/self/status`), not from its
//! uid: root without `CAP_NET_ADMIN` cannot create a TUN device, and a
//! non-root user given the capability (systemd `AmbientCapabilities=`,
//! `setcap`) can.

/// `CAP_NET_ADMIN`: interfaces, addresses, routes, TUN devices.
pub const CAP_NET_ADMIN: u32 = 12;

/// The effective capability set in the text of a `/proc/<pid>/status`.
fn effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// True if this process has capability `cap` in its effective set; None
/// if that cannot be read (no /proc).
pub fn has(cap: u32) -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(effective(&status)? & (1u64 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_is_read_from_status() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective(root), Some(0x1ff_ffff_ffff));
        let user = "CapEff:\t0000000000000000\n";
        assert_eq!(
            effective(user).map(|e| e & (1 << CAP_NET_ADMIN) != 0),
            Some(false)
        );
        let just_net_admin = "CapEff:\t0000000000001000\n";
        assert_eq!(effective(just_net_admin), Some(1 << CAP_NET_ADMIN));
        assert_eq!(effective("Name: x\n"), None);
    }

    #[test]
    fn this_process_can_be_asked() {
        assert!(has(CAP_NET_ADMIN).is_some());
    }
}
