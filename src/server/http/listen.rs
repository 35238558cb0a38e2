//! Where the HTTP endpoint listens: `metrics.address` entries made into socket addresses.
//!
//! One config for a whole fleet cannot name each node's IP, and `0.0.0.0` also listens on
//! the DNS addresses every pod is told about (169.254.20.10, the kube-dns Service IP), on
//! CNI bridges and on the fallback relay's link. So an entry may name an interface
//! (`ens5:9253`: its addresses) or `default-route:9253`: the addresses of the interfaces
//! holding the IPv4 and IPv6 default routes, which is how kubelet picks a node IP when
//! none is given (`ChooseHostInterface`). They are read when the endpoint binds; an
//! interface without an address yet is a failed bind, retried like any other (see
//! [`super::serve_when_bound`]). IPv6 link-local addresses are left out (they need a
//! scope, and Prometheus does not scrape them).
//!
//! The route tables are read from `/proc/net/route` and `/proc/net/ipv6_route`, parsed by
//! pure functions below; the addresses from `getifaddrs(3)`.

use std::net::{IpAddr, SocketAddr};

use crate::config::HttpAddress;

/// Interfaces of `/proc/net/route` text that hold an IPv4 default route.
pub fn default_v4(route: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in route.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" && !out.contains(&f[0]) {
            out.push(f[0]);
        }
    }
    out.into_iter().map(String::from).collect()
}

/// Interfaces of `/proc/net/ipv6_route` text that hold an IPv6 default route (`lo`'s
/// unreachable default left out).
pub fn default_v6(route: &str) -> Vec<String> {
    let zero = "0".repeat(32);
    let mut out = Vec::new();
    for line in route.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest dest_len src src_len next_hop metric refcnt use flags iface
        if f.len() == 10 && f[0] == zero && f[1] == "00" && f[9] != "lo" && !out.contains(&f[9]) {
            out.push(f[9]);
        }
    }
    out.into_iter().map(String::from).collect()
}

/// Whether an interface address is one to listen on (not IPv6 link-local).
fn listenable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The addresses of the interfaces `names`, from `getifaddrs(3)`.
fn interface_addresses(names: &[String]) -> Result<Vec<IpAddr>, String> {
    let all = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list addresses: {e}"))?;
    let mut out = Vec::new();
    for a in all {
        if !names.contains(&a.interface_name) {
            continue;
        }
        let Some(addr) = a.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if listenable(&ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The socket addresses one entry stands for now; an error names the entry and why
/// there are none.
pub fn resolve(entry: &HttpAddress) -> Result<Vec<SocketAddr>, String> {
    let (names, port) = match entry {
        HttpAddress::Socket(a) => return Ok(vec![*a]),
        HttpAddress::Interface { name, port } => (vec![name.clone()], *port),
        HttpAddress::DefaultRoute { port } => {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            let mut names = default_v4(&read("/proc/net/route"));
            for n in default_v6(&read("/proc/net/ipv6_route")) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            if names.is_empty() {
                return Err(format!("{entry}: no default route yet"));
            }
            (names, *port)
        }
    };
    let ips = interface_addresses(&names)?;
    if ips.is_empty() {
        return Err(format!("{entry}: no address on {} yet", names.join(", ")));
    }
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_found_in_the_proc_tables() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  ens5\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  ens5\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
                  cni0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                  ens6\t00000000\t0101000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                  ens5\t00000000\t0100000A\t0003\t0\t0\t300\t00000000\t0\t0\t0\n";
        assert_eq!(default_v4(v4), ["ens5", "ens6"]);
        assert!(default_v4("Iface\tDestination\n").is_empty());
        assert!(default_v4("").is_empty());
        let z = "0".repeat(32);
        let v6 = format!(
            "{z} 00 {z} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     ens5\n\
             fd000000000000000000000000000000 40 {z} 00 {z} 00000100 00000001 00000000 00000001     ens5\n\
             {z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo\n"
        );
        assert_eq!(default_v6(&v6), ["ens5"]);
    }

    #[test]
    fn link_local_ipv6_is_left_out() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(listenable(&ip("10.0.0.5")));
        assert!(listenable(&ip("fd00::5")));
        assert!(!listenable(&ip("fe80::1")));
    }

    #[test]
    fn loopback_resolves_and_a_missing_interface_is_named() {
        let lo = resolve(&HttpAddress::Interface {
            name: "lo".into(),
            port: 9253,
        })
        .unwrap();
        assert!(lo.contains(&"127.0.0.1:9253".parse().unwrap()), "{lo:?}");
        let e = resolve(&HttpAddress::Interface {
            name: "nosuch0".into(),
            port: 9253,
        })
        .unwrap_err();
        assert_eq!(e, "nosuch0:9253: no address on nosuch0 yet");
    }
}
