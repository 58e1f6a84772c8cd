//! The host's IPv4 routes, read from `/proc/net/route`, so start-up can warn
//! (naming the route) when the overlay overlaps one the host already has,
//! as cloud VPCs in 10.x often do, and refuse when another TUN device
//! already routes exactly our overlay network (another pilot-tun daemon in
//! this namespace on the same network, or on one with the same range: the
//! two would take each other's traffic). Reading only; nothing here
//! changes a route.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A route of the host: its destination and the interface it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Where it leads.
    pub net: Ipv4Net,
    /// Through which interface.
    pub dev: String,
}

/// Parses the text of `/proc/net/route` (a header line, then one route per
/// line: interface, destination, gateway, flags, refcnt, use, metric, mask,
/// with addresses in host byte order as hex). Lines that do not parse are
/// skipped.
pub fn parse(text: &str) -> Vec<Route> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dev, dest, mask) = (f.first()?, f.get(1)?, f.get(7)?);
            let mask = hex(mask)?;
            // A route mask is a run of ones from the top; anything else
            // is not a prefix.
            if mask.leading_ones() + mask.trailing_zeros() != 32 {
                return None;
            }
            let net = Ipv4Net::new(Ipv4Addr::from(hex(dest)?), mask.leading_ones() as u8).ok()?;
            Some(Route {
                net: net.trunc(),
                dev: dev.to_string(),
            })
        })
        .collect()
}

/// The host's routes (none if the table cannot be read).
pub fn host_routes() -> Vec<Route> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// True if the interface `dev` of this namespace is a TUN or TAP device.
pub fn is_tun(dev: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(dev)
        .join("tun_flags")
        .exists()
}

/// The route for exactly `net` through a TUN device (by `is_tun`), if the
/// host has one: another overlay owns these addresses in this namespace.
pub fn claimed_by_tun(
    net: &Ipv4Net,
    routes: &[Route],
    is_tun: impl Fn(&str) -> bool,
) -> Option<Route> {
    routes
        .iter()
        .find(|r| r.net == net.trunc() && is_tun(&r.dev))
        .cloned()
}

/// The host's routes that overlap `net`, leaving out default routes.
pub fn overlapping(net: &Ipv4Net, routes: &[Route]) -> Vec<Route> {
    let nets: Vec<Ipv4Net> = routes.iter().map(|r| r.net).collect();
    let hits = pilot_proto::overlay::overlapping(net, &nets);
    routes
        .iter()
        .filter(|r| hits.contains(&r.net))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real table: default via eth0, a 10.0.0.0/8 VPC route, a /24 LAN,
    // a docker bridge.
    const TABLE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t000000FF\t0\t0\t0
wlan0\t0001A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
bad\tzz\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

    #[test]
    fn an_overlay_network_routed_through_another_tun_is_claimed() {
        let mut routes = parse(TABLE);
        routes.push(Route {
            net: "10.77.0.0/16".parse().unwrap(),
            dev: "pilot0".into(),
        });
        let tun = |d: &str| d == "pilot0";
        let net: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        assert_eq!(
            claimed_by_tun(&net, &routes, tun).map(|r| r.dev),
            Some("pilot0".into())
        );
        // Another network, or the same prefix through a non-TUN device
        // (a VPC route: only warned about), is not claimed.
        assert_eq!(
            claimed_by_tun(&"10.78.0.0/16".parse().unwrap(), &routes, tun),
            None
        );
        assert_eq!(
            claimed_by_tun(&"10.0.0.0/8".parse().unwrap(), &routes, tun),
            None
        );
        assert_eq!(
            claimed_by_tun(&"10.77.0.0/16".parse().unwrap(), &routes, |_| false),
            None
        );
    }

    #[test]
    fn parses_the_proc_table() {
        let r = parse(TABLE);
        let nets: Vec<String> = r.iter().map(|r| format!("{} {}", r.dev, r.net)).collect();
        assert_eq!(
            nets,
            vec![
                "eth0 0.0.0.0/0",
                "eth0 10.0.0.0/8",
                "wlan0 192.168.1.0/24",
                "docker0 172.17.0.0/16"
            ]
        );
    }

    #[test]
    fn names_the_routes_an_overlay_overlaps() {
        let r = parse(TABLE);
        let hit = overlapping(&"10.77.0.0/16".parse().unwrap(), &r);
        assert_eq!(
            hit,
            vec![Route {
                net: "10.0.0.0/8".parse().unwrap(),
                dev: "eth0".into()
            }]
        );
        assert!(overlapping(&"100.64.0.0/16".parse().unwrap(), &r).is_empty());
    }
}
