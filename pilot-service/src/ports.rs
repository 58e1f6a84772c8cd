//! Who holds a UDP port: the sockets bound to it in `/proc/net/udp` and
//! `/proc/net/udp6` (this network namespace's), and the processes with one
//! of those sockets among their file descriptors. For the sentence that
//! explains "address in use".

use std::net::SocketAddr;
use std::path::Path;

/// A process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub name: String,
}

/// Socket inodes bound to local `port` in a `/proc/net/udp`-style table.
fn inodes_in(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            let inode: u64 = cols.get(9)?.parse().ok()?;
            (u16::from_str_radix(p, 16).ok()? == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// The processes holding a UDP socket bound to `port` (any address), as
/// far as this user may look: empty when none could be seen.
pub fn udp_holders(port: u16) -> Vec<Holder> {
    holders_in(Path::new("/proc"), port)
}

fn holders_in(proc: &Path, port: u16) -> Vec<Holder> {
    let mut inodes = vec![];
    for t in ["net/udp", "net/udp6"] {
        if let Ok(text) = std::fs::read_to_string(proc.join(t)) {
            inodes.extend(inodes_in(&text, port));
        }
    }
    if inodes.is_empty() {
        return vec![];
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir(proc) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().map(|s| wanted.iter().any(|w| w == s)))
                .unwrap_or(false)
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            out.push(Holder { pid, name });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

/// What to say when binding UDP `addr` failed with "address in use":
/// who holds the port, if that can be seen.
pub fn udp_in_use(addr: SocketAddr) -> String {
    let port = addr.port();
    let holders = udp_holders(port);
    if holders.is_empty() {
        return format!(
            "UDP port {port} is in use by another program (not visible to this user; `sudo ss -ulpn 'sport = :{port}'` names it)"
        );
    }
    let who = holders
        .iter()
        .map(|h| format!("{} (pid {})", h.name, h.pid))
        .collect::<Vec<_>>()
        .join(", ");
    format!("UDP port {port} is in use by {who}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_read_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:1F0A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0
  2: 0100007F:1F0B 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4343 2 0000000000000000 0
  3: 0100007F:1F0A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0
garbage line
";
        assert_eq!(inodes_in(table, 0x1F0A), vec![4242]);
        assert_eq!(inodes_in(table, 0x1F0B), vec![4343]);
        assert!(inodes_in(table, 1).is_empty());
    }

    #[test]
    fn our_own_socket_is_found_and_named() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let me = std::process::id();
        let holders = udp_holders(addr.port());
        assert!(holders.iter().any(|h| h.pid == me), "{holders:?}");
        let msg = udp_in_use(addr);
        assert!(msg.contains(&format!("pid {me}")), "{msg}");
        drop(sock);
        assert!(udp_holders(addr.port()).iter().all(|h| h.pid != me));
    }
}
