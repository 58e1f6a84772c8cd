//! The host's IPv4 routes, read from `/proc/net/route`, so start-up can warn
//! (naming the route) when the overlay overlaps one the host already has,
//! as cloud VPCs in 10.x often do. Reading only; nothing here changes a
//! route.

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
