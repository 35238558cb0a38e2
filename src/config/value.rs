//! Parsers for the scalar values the config is made of: zone names, interface names,
//! upstream server addresses, durations.
//!
//! They are pure functions over strings so the raw serde layer ([`super::raw`]) can call
//! them while deserializing, which is what lets a bad value be reported with its file,
//! line and key.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::types::{HttpAddress, DEFAULT_ROUTE};

/// The port used when a server address does not name one.
pub const DNS_PORT: u16 = 53;

/// Parses a zone or domain name and normalises it: lower case, trailing dot removed.
///
/// Labels are letters, digits, `-` and `_` (service labels such as `_tcp` are real),
/// 1-63 bytes each, without a leading or trailing `-`; the whole name at most 253 bytes.
/// The root zone is refused: the default upstreams already answer for it.
pub fn zone(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err(format!(
            "invalid zone name {text:?}: empty (the root zone is served by the default upstreams)"
        ));
    }
    if name.len() > 253 {
        return Err(format!("invalid zone name {text:?}: longer than 253 bytes"));
    }
    for label in name.split('.') {
        let why = if label.is_empty() {
            Some("empty label")
        } else if label.len() > 63 {
            Some("label longer than 63 bytes")
        } else if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some("labels may hold only letters, digits, '-' and '_'")
        } else if label.starts_with('-') || label.ends_with('-') {
            Some("a label may not start or end with '-'")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(format!("invalid zone name {text:?}: {why}"));
        }
    }
    Ok(name)
}

/// Checks a Linux network interface name the way the kernel does (`dev_valid_name`):
/// 1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn interface(text: &str) -> Result<String, String> {
    let why = if text.is_empty() {
        Some("empty")
    } else if text.len() > 15 {
        Some("longer than 15 bytes")
    } else if text == "." || text == ".." {
        Some("reserved name")
    } else if text
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("may not contain '/', ':' or whitespace")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!("invalid interface name {text:?}: {why}")),
        None => Ok(text.to_owned()),
    }
}

/// Parses an IP address, naming the text when it is not one.
pub fn ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid IP address syntax {text:?}"))
}

/// Parses an upstream server: `10.96.0.11`, `10.96.0.11:53`, `fd00::11` or `[fd00::11]:53`.
/// The port defaults to 53 and may not be 0.
pub fn server(text: &str) -> Result<SocketAddr, String> {
    let addr = if let Ok(ip) = text.parse::<IpAddr>() {
        SocketAddr::new(ip, DNS_PORT)
    } else if let Ok(addr) = text.parse::<SocketAddr>() {
        addr
    } else if let Some(bare) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        // "[fd00::11]" without a port.
        let ip = bare
            .parse::<IpAddr>()
            .map_err(|_| format!("invalid server address {text:?}"))?;
        SocketAddr::new(ip, DNS_PORT)
    } else {
        return Err(format!(
            "invalid server address {text:?}: expected \"IP\", \"IPv4:port\" or \"[IPv6]:port\""
        ));
    };
    if addr.port() == 0 {
        return Err(format!("invalid server address {text:?}: port 0"));
    }
    Ok(addr)
}

/// Parses one entry of `metrics.address`: `IP:port`, `[IPv6]:port`, `INTERFACE:port`
/// (every address that interface has when the endpoint binds) or `default-route:port`
/// (the addresses of the interfaces that hold the default routes: the node's primary
/// interface, the one kubelet takes its node IP from).
pub fn http_address(text: &str) -> Result<HttpAddress, String> {
    let expected =
        "expected \"IP:port\", \"[IPv6]:port\", \"INTERFACE:port\" or \"default-route:port\"";
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("invalid metrics address {text:?}: port 0"));
        }
        return Ok(HttpAddress::Socket(addr));
    }
    let Some((name, port)) = text.rsplit_once(':') else {
        return Err(format!("invalid metrics address {text:?}: {expected}"));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(format!(
                "invalid metrics address {text:?}: bad port {port:?}; {expected}"
            ))
        }
    };
    if name.parse::<IpAddr>().is_ok() || name.starts_with('[') || name.contains(':') {
        return Err(format!("invalid metrics address {text:?}: {expected}"));
    }
    if name == DEFAULT_ROUTE {
        return Ok(HttpAddress::DefaultRoute { port });
    }
    let name = interface(name).map_err(|e| format!("invalid metrics address {text:?}: {e}"))?;
    Ok(HttpAddress::Interface { name, port })
}

/// Parses a humantime duration such as `500ms`, `5s` or `1h`.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_are_normalised() {
        assert_eq!(zone("Cluster.Local.").unwrap(), "cluster.local");
        assert_eq!(zone("_tcp.corp-1.example").unwrap(), "_tcp.corp-1.example");
        assert_eq!(zone("10.in-addr.arpa").unwrap(), "10.in-addr.arpa");
    }

    #[test]
    fn bad_zones_are_refused() {
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(zone(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn interface_names() {
        assert!(interface("nodelocaldns").is_ok());
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a:1", ".", ".."] {
            assert!(interface(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn server_addresses() {
        assert_eq!(
            server("10.96.0.11").unwrap(),
            "10.96.0.11:53".parse().unwrap()
        );
        assert_eq!(
            server("10.96.0.11:5353").unwrap(),
            "10.96.0.11:5353".parse().unwrap()
        );
        assert_eq!(
            server("fd00::11").unwrap(),
            "[fd00::11]:53".parse().unwrap()
        );
        assert_eq!(
            server("[fd00::11]").unwrap(),
            "[fd00::11]:53".parse().unwrap()
        );
        assert_eq!(
            server("[fd00::11]:54").unwrap(),
            "[fd00::11]:54".parse().unwrap()
        );
        for bad in [
            "",
            "10.96.0.1x",
            "10.96.0.11:0",
            "10.96.0.11:99999",
            "host:53",
        ] {
            assert!(server(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn metrics_addresses() {
        let sock = |s: &str| HttpAddress::Socket(s.parse().unwrap());
        assert_eq!(
            http_address("127.0.0.1:9253").unwrap(),
            sock("127.0.0.1:9253")
        );
        assert_eq!(
            http_address("[fd00::1]:9253").unwrap(),
            sock("[fd00::1]:9253")
        );
        assert_eq!(
            http_address("ens5:9253").unwrap(),
            HttpAddress::Interface {
                name: "ens5".into(),
                port: 9253
            }
        );
        assert_eq!(
            http_address("default-route:9253").unwrap(),
            HttpAddress::DefaultRoute { port: 9253 }
        );
        for (bad, why) in [
            ("127.0.0.1", "expected"),
            ("127.0.0.1:0", "port 0"),
            ("ens5:0", "bad port"),
            ("ens5", "expected"),
            ("fd00::1:9253", "expected"),
            ("a/b:9253", "may not contain"),
            ("sixteen-chars-xx:9253", "longer than 15"),
            (":9253", "empty"),
        ] {
            let e = http_address(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad:?}: {e}");
        }
        for a in [
            "127.0.0.1:9253",
            "[fd00::1]:9253",
            "ens5:9253",
            "default-route:9253",
        ] {
            assert_eq!(http_address(a).unwrap().to_string(), a);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(duration("5 parsecs").is_err());
    }
}
