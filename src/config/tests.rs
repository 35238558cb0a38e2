//! Tests of the whole pipeline: documents in, `Config` or a located error out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// An environment whose /etc/resolv.conf holds `resolv` and whose systemd-resolved file
/// does not exist.
fn env_with(resolv: &str) -> (tempfile::TempDir, Environment) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("resolv.conf");
    std::fs::write(&etc, resolv).unwrap();
    let env = Environment {
        resolved_resolv_conf: dir.path().join("absent"),
        etc_resolv_conf: etc,
    };
    (dir, env)
}

fn docs(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    files
        .iter()
        .map(|(n, t)| (PathBuf::from(n), t.to_string()))
        .collect()
}

fn load_ok(files: &[(&str, &str)]) -> Config {
    let (_dir, env) = env_with("nameserver 10.0.0.2\n");
    load_documents(&docs(files), &env).unwrap_or_else(|e| panic!("{e}"))
}

/// The error for `files`, as (display, file, line, key).
fn load_err(files: &[(&str, &str)]) -> (String, Option<PathBuf>, Option<usize>, Option<String>) {
    let (_dir, env) = env_with("nameserver 10.0.0.2\n");
    match load_documents(&docs(files), &env) {
        Ok(c) => panic!("loaded: {c:?}"),
        Err(e @ ConfigError::Invalid { .. }) => {
            let text = e.to_string();
            let ConfigError::Invalid { at, key, .. } = e else {
                unreachable!()
            };
            (text, at.file, at.line, key)
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---- per-file errors carry file, line and key ----

#[test]
fn syntax_error_names_file_and_line() {
    let (text, file, line, key) =
        load_err(&[("a.toml", ""), ("b.toml", "[listen]\nport = 53\nport =\n")]);
    assert_eq!(
        (file.unwrap().to_str(), line, key),
        (Some("b.toml"), Some(3), None)
    );
    assert!(
        text.starts_with("b.toml:3: ") && !text.contains('\n'),
        "{text}"
    );
}

#[test]
fn unknown_key_is_named() {
    let (text, _, line, key) = load_err(&[("a.toml", "[listen]\nport = 53\n\nbogus = 1\n")]);
    assert_eq!((line, key.as_deref()), (Some(4), Some("listen.bogus")));
    assert!(text.contains("unknown field `bogus`"), "{text}");

    let (_, _, line, key) = load_err(&[(
        "a.toml",
        "[cache]\ncapacity = 1\n[cahce]\nmax_ttl = \"1s\"\n",
    )]);
    assert_eq!((line, key.as_deref()), (Some(3), Some("cahce")));

    let (_, _, line, key) = load_err(&[(
        "a.toml",
        "[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.1\"]\nport = 53\n",
    )]);
    assert_eq!((line, key.as_deref()), (Some(4), Some("stub[0].port")));
}

#[test]
fn bad_ip_in_a_multi_line_list_points_at_its_line() {
    let text = "# drop-in\n[listen]\naddresses = [\n  \"10.96.0.10\",\n  \"10.96.0.1x\",\n]\n";
    let (msg, ..) = load_err(&[("/etc/localdns/conf.d/10-x.toml", text)]);
    assert_eq!(
        msg,
        "/etc/localdns/conf.d/10-x.toml:5: key `listen.addresses[1]`: invalid IP address syntax \"10.96.0.1x\""
    );
}

#[test]
fn bad_duration() {
    let (msg, _, line, key) = load_err(&[("a.toml", "[cache]\n\nmax_ttl = \"1 fortnight\"\n")]);
    assert_eq!((line, key.as_deref()), (Some(3), Some("cache.max_ttl")));
    assert!(msg.contains("invalid duration \"1 fortnight\""), "{msg}");

    let (_, _, line, key) = load_err(&[("a.toml", "[upstream]\ntimeout = \"0s\"\n")]);
    assert_eq!((line, key.as_deref()), (Some(2), Some("upstream.timeout")));
}

#[test]
fn bad_protocol() {
    let stub = "[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.1\"]\nprotocol = \"tls\"\n";
    let (msg, _, line, key) = load_err(&[
        ("a.toml", "[cluster]\nprotocol = \"tcp\"\n"),
        ("b.toml", stub),
    ]);
    assert_eq!((line, key.as_deref()), (Some(4), Some("stub[0].protocol")));
    assert!(msg.starts_with("b.toml:4:") && msg.contains("tls"), "{msg}");

    let (_, _, line, key) = load_err(&[("a.toml", "[upstream]\nprotocol = \"UDP\"\n")]);
    assert_eq!((line, key.as_deref()), (Some(2), Some("upstream.protocol")));
}

#[test]
fn out_of_range_values() {
    for (text, want_key) in [
        ("[upstream]\nattempts = 11\n", "upstream.attempts"),
        ("[upstream]\nattempts = 0\n", "upstream.attempts"),
        (
            "[upstream]\nudp_socket_queries = 0\n",
            "upstream.udp_socket_queries",
        ),
        (
            "[upstream]\nudp_socket_queries = 65536\n",
            "upstream.udp_socket_queries",
        ),
        (
            "[upstream]\nudp_socket_lifetime = \"0s\"\n",
            "upstream.udp_socket_lifetime",
        ),
        (
            "[upstream]\ntcp_connections = 0\n",
            "upstream.tcp_connections",
        ),
        (
            "[upstream]\ntcp_connections = 17\n",
            "upstream.tcp_connections",
        ),
        (
            "[upstream]\ntcp_connection_max_age = \"-1s\"\n",
            "upstream.tcp_connection_max_age",
        ),
        (
            "[upstream]\nhealth_check_interval = \"often\"\n",
            "upstream.health_check_interval",
        ),
        (
            "[cache]\nprefetch_percent = 100\n",
            "cache.prefetch_percent",
        ),
        ("[cache]\ncapacity = 0\n", "cache.capacity"),
        ("[cache]\nmax_bytes = 1000\n", "cache.max_bytes"),
        (
            "[cache]\nmax_answer_bytes = 100\n",
            "cache.max_answer_bytes",
        ),
        (
            "[cache]\nmax_answer_bytes = 65536\n",
            "cache.max_answer_bytes",
        ),
        (
            "[listen]\ntcp_max_connections_per_client = 0\n",
            "listen.tcp_max_connections_per_client",
        ),
        ("[listen]\nport = 0\n", "listen.port"),
        ("[listen]\nport = 65536\n", "listen.port"),
        (
            "[listen]\nudp_recv_buffer = 1024\n",
            "listen.udp_recv_buffer",
        ),
        ("[listen]\nudp_threads = -1\n", "listen.udp_threads"),
        (
            "[network]\ninterface = \"much-too-long-name\"\n",
            "network.interface",
        ),
        (
            "[network]\niptables_backend = \"nftables\"\n",
            "network.iptables_backend",
        ),
        ("[network]\nfirewall = \"nft\"\n", "network.firewall"),
        (
            "[network]\nrules_check_interval = \"0s\"\n",
            "network.rules_check_interval",
        ),
        (
            "[network]\nxtables_wait = \"soon\"\n",
            "network.xtables_wait",
        ),
        ("[cluster]\ndomain = \"cluster..local\"\n", "cluster.domain"),
        ("[metrics]\naddress = \"127.0.0.1\"\n", "metrics.address"),
        (
            "[upstream]\nresolv_conf = \"resolv.conf\"\n",
            "upstream.resolv_conf",
        ),
    ] {
        let (msg, _, line, key) = load_err(&[("a.toml", text)]);
        assert_eq!((line, key.as_deref()), (Some(2), Some(want_key)), "{msg}");
    }
}

#[test]
fn wrong_type_and_inline_tables() {
    let (msg, _, line, key) = load_err(&[("a.toml", "[listen]\nport = \"53\"\n")]);
    assert_eq!(
        (line, key.as_deref()),
        (Some(2), Some("listen.port")),
        "{msg}"
    );

    let (_, _, line, key) = load_err(&[("a.toml", "\nlisten = { port = 53, addresses = [] }\n")]);
    assert_eq!((line, key.as_deref()), (Some(2), Some("listen.addresses")));

    let (_, _, line, key) = load_err(&[("a.toml", "listen = 5\n")]);
    assert_eq!((line, key.as_deref()), (Some(1), Some("listen")));
}

#[test]
fn list_checks() {
    let (msg, _, line, key) = load_err(&[(
        "a.toml",
        "[listen]\naddresses = [\"10.0.0.1\", \"10.0.0.1\"]\n",
    )]);
    assert_eq!((line, key.as_deref()), (Some(2), Some("listen.addresses")));
    assert!(msg.contains("duplicate address 10.0.0.1"), "{msg}");

    let two = "[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.1\"]\n[[stub]]\nzone = \"A.example.\"\nservers = [\"10.0.0.2\"]\n";
    let (msg, _, _, key) = load_err(&[("a.toml", two)]);
    assert_eq!(key.as_deref(), Some("stub"), "{msg}");
}

#[test]
fn empty_stub_servers() {
    let stub = "[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.1\"]\n\n[[stub]]\nzone = \"b.example\"\nservers = []\n";
    let (msg, file, line, key) = load_err(&[("a.toml", ""), ("b.toml", stub)]);
    assert_eq!(
        (file, line, key.as_deref()),
        (Some("b.toml".into()), Some(7), Some("stub[1].servers"))
    );
    assert!(msg.contains("must not be empty"), "{msg}");

    let (msg, _, line, key) = load_err(&[("a.toml", "[[stub]]\nzone = \"a.example\"\n")]);
    assert_eq!((line, key.as_deref()), (Some(1), Some("stub[0]")));
    assert!(msg.contains("missing field `servers`"), "{msg}");
}

// ---- cross-field errors name the file that last set the key ----

#[test]
fn the_largest_answer_must_fit_a_shard_of_the_byte_budget() {
    let (msg, ..) = load_err(&[(
        "a.toml",
        "[cache]\nmax_bytes = 1048576\nmax_answer_bytes = 20000\n",
    )]);
    assert_eq!(
        msg,
        "a.toml:3: key `cache.max_answer_bytes`: 20000 is more than cache.max_bytes / 64 (16384): the budget is split over 64 shards and each must hold the largest answer"
    );
}

#[test]
fn cross_field_error_names_the_last_file_setting_the_key() {
    let (msg, ..) = load_err(&[
        ("a.toml", "[cache]\nmin_ttl = \"10s\"\n"),
        ("b.toml", "[cache]\ncapacity = 5\n\nmin_ttl = \"2h\"\n"),
        ("c.toml", "[cache]\ncapacity = 6\n"),
    ]);
    assert_eq!(
        msg,
        "b.toml:4: key `cache.min_ttl`: 2h is longer than cache.max_ttl (1h)"
    );
}

#[test]
fn self_excluded_stub_error_points_at_the_file_with_that_zone() {
    let first = "[listen]\naddresses = [\"10.0.0.1\"]\n[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.9\"]\n";
    let second = "[[stub]]\nzone = \"b.example\"\nservers = [\"10.0.0.8\"]\n[[stub]]\nzone = \"a.example\"\nservers = [\"10.0.0.1\"]\n";
    let (msg, file, line, key) = load_err(&[("a.toml", first), ("b.toml", second)]);
    // Merged order: a.example (replaced in place), then b.example.
    assert_eq!(
        (file, line, key.as_deref()),
        (Some("b.toml".into()), Some(6), Some("stub[0].servers")),
        "{msg}"
    );
    assert!(msg.contains("own listen addresses"), "{msg}");
}

#[test]
fn cluster_upstream_is_self_excluded() {
    let c = load_ok(&[("a.toml", "[listen]\naddresses = [\"10.96.0.10\"]\n[cluster]\nupstream = [\"10.96.0.10\", \"10.96.0.11\", \"10.96.0.10:5353\"]\n")]);
    assert_eq!(
        c.cluster.upstream,
        [sa("10.96.0.11:53"), sa("10.96.0.10:5353")]
    );

    let (msg, _, line, key) = load_err(&[(
        "a.toml",
        "[listen]\naddresses = [\"10.96.0.10\"]\n[cluster]\nupstream = [\"10.96.0.10\"]\n",
    )]);
    assert_eq!(
        (line, key.as_deref()),
        (Some(4), Some("cluster.upstream")),
        "{msg}"
    );
}

#[test]
fn configured_upstreams_drop_resolved_stub_and_self() {
    let c = load_ok(&[(
        "a.toml",
        "[listen]\naddresses = [\"127.0.0.1\"]\nport = 5353\n[upstream]\nservers = [\"127.0.0.53\", \"127.0.0.1:5353\", \"127.0.0.1\", \"[::1]:5300\"]\n",
    )]);
    assert_eq!(c.upstream.servers, [sa("127.0.0.1:53"), sa("[::1]:5300")]);
    assert_eq!(c.upstream.servers_from, "config");

    let (msg, _, line, key) =
        load_err(&[("a.toml", "[upstream]\nservers = [\"127.0.0.54:53\"]\n")]);
    assert_eq!((line, key.as_deref()), (Some(2), Some("upstream.servers")));
    assert!(msg.contains("systemd-resolved"), "{msg}");
}

// ---- merging ----

#[test]
fn later_files_override_and_stubs_merge_by_zone() {
    let base = "\
[listen]
addresses = [\"169.254.20.10\", \"10.96.0.10\"]
port = 53
[cache]
capacity = 100
[[stub]]
zone = \"a.example\"
servers = [\"10.0.0.1\"]
[[stub]]
zone = \"b.example\"
servers = [\"10.0.0.2\"]
";
    let drop_in = "\
[listen]
addresses = [\"169.254.20.10\"]
[cache]
max_ttl = \"5m\"
[[stub]]
zone = \"B.Example.\"
servers = [\"10.0.0.22:5353\"]
protocol = \"tcp\"
[[stub]]
zone = \"c.example\"
servers = [\"10.0.0.3\"]
";
    let c = load_ok(&[
        ("main.toml", base),
        ("10-drop.toml", drop_in),
        ("20-empty.toml", "  \n\t\n"),
    ]);
    assert_eq!(
        c.listen.addresses,
        ["169.254.20.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(c.listen.port, 53);
    assert_eq!(c.cache.capacity, 100);
    assert_eq!(c.cache.max_ttl, Duration::from_secs(300));
    let stubs: Vec<(&str, Vec<SocketAddr>, Protocol)> = c
        .stubs
        .iter()
        .map(|s| (s.zone.as_str(), s.servers.clone(), s.protocol))
        .collect();
    assert_eq!(
        stubs,
        [
            ("a.example", vec![sa("10.0.0.1:53")], Protocol::Udp),
            ("b.example", vec![sa("10.0.0.22:5353")], Protocol::Tcp),
            ("c.example", vec![sa("10.0.0.3:53")], Protocol::Udp),
        ]
    );
    assert_eq!(
        c.sources,
        [
            PathBuf::from("main.toml"),
            "10-drop.toml".into(),
            "20-empty.toml".into()
        ]
    );
}

// ---- defaults ----

#[test]
fn defaults_are_the_documented_schema() {
    let c = load_ok(&[("empty.toml", "")]);
    let (_dir, env) = env_with("nameserver 10.0.0.2\n");
    let want = Config {
        listen: Listen {
            addresses: vec!["169.254.20.10".parse().unwrap()],
            port: 53,
            udp_threads: 0,
            udp_recv_buffer: 4_194_304,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1024,
            tcp_max_connections_per_client: 64,
        },
        cluster: Cluster {
            domain: "cluster.local".into(),
            reverse_zones: vec!["in-addr.arpa".into(), "ip6.arpa".into()],
            upstream: vec![],
            protocol: Protocol::Tcp,
        },
        upstream: Upstream {
            servers: vec![sa("10.0.0.2:53")],
            protocol: Protocol::Udp,
            servers_from: env.etc_resolv_conf.display().to_string(),
            timeout: Duration::from_secs(1),
            attempts: 3,
            max_in_flight: 1000,
            max_in_flight_per_client: 250,
            down_after_failures: 3,
            down_time: Duration::from_secs(5),
            udp_socket_queries: 100,
            udp_socket_lifetime: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(3),
            tcp_connections: 4,
            tcp_connection_max_age: Duration::from_secs(3),
            tcp_connection_max_queries: 1000,
        },
        stubs: vec![],
        cache: Cache {
            capacity: 20_000,
            max_bytes: 64 * 1024 * 1024,
            max_answer_bytes: 16 * 1024,
            max_ttl: Duration::from_secs(3600),
            min_ttl: Duration::ZERO,
            negative_max_ttl: Duration::from_secs(5),
            servfail_ttl: Duration::from_secs(1),
            serve_stale: Duration::from_secs(3600),
            stale_answer_ttl: Duration::from_secs(30),
            stale_answer_client_timeout: Duration::from_millis(1800),
            prefetch: true,
            prefetch_min_hits: 2,
            prefetch_percent: 10,
        },
        network: Network {
            interface: "nodelocaldns".into(),
            setup_interface: true,
            setup_rules: true,
            firewall: Firewall::Auto,
            rules_check_interval: Duration::from_secs(5),
            xtables_wait: Duration::from_secs(5),
            fallback: true,
            fallback_address: std::net::Ipv4Addr::new(169, 254, 20, 11),
        },
        metrics: Metrics {
            addresses: vec![HttpAddress::Socket(sa("127.0.0.1:9253"))],
            header_timeout: Duration::from_secs(2),
        },
        log: Log {
            queries: QueryLog::Off,
        },
        sources: vec!["empty.toml".into()],
    };
    // servers_from names a temporary file that differs per call.
    let c = Config {
        upstream: Upstream {
            servers_from: want.upstream.servers_from.clone(),
            ..c.upstream
        },
        ..c
    };
    assert_eq!(c, want);
}

#[test]
fn names_are_normalised() {
    let c = load_ok(&[("a.toml", "[cluster]\ndomain = \"Cluster.Local.\"\nreverse_zones = [\"10.IN-ADDR.ARPA.\"]\n[metrics]\naddress = \"\"\n")]);
    assert_eq!(c.cluster.domain, "cluster.local");
    assert_eq!(c.cluster.reverse_zones, ["10.in-addr.arpa"]);
    assert!(c.metrics.addresses.is_empty());
}

#[test]
fn metrics_address_is_one_entry_or_a_list() {
    let c = load_ok(&[(
        "a.toml",
        "[metrics]\naddress = [\"127.0.0.1:9253\", \"default-route:9253\", \"ens5:9300\"]\nheader_timeout = \"500ms\"\n",
    )]);
    assert_eq!(
        c.metrics.addresses,
        [
            HttpAddress::Socket(sa("127.0.0.1:9253")),
            HttpAddress::DefaultRoute { port: 9253 },
            HttpAddress::Interface {
                name: "ens5".into(),
                port: 9300
            },
        ]
    );
    assert_eq!(c.metrics.header_timeout, Duration::from_millis(500));
    let c = load_ok(&[("a.toml", "[metrics]\naddress = []\n")]);
    assert!(c.metrics.addresses.is_empty());
    for (text, why) in [
        (
            "[metrics]\naddress = [\"ens5:9253\", \"ens5:9253\"]\n",
            "listed twice",
        ),
        (
            "[metrics]\naddress = [\"127.0.0.1\"]\n",
            "invalid metrics address \"127.0.0.1\"",
        ),
        (
            "[metrics]\naddress = 9253\n",
            "an address string or a list of them",
        ),
        ("[metrics]\nheader_timeout = \"0s\"\n", ""),
    ] {
        let (msg, _, line, key) = load_err(&[("a.toml", text)]);
        assert!(msg.contains(why), "{text}: {msg}");
        assert!(
            key.as_deref().is_some_and(|k| k.starts_with("metrics.")),
            "{text}: {key:?}"
        );
        assert_eq!(line, Some(2), "{text}");
    }
}

#[test]
fn embedded_default_loads() {
    let (_dir, env) = env_with("nameserver 192.0.2.1\nnameserver 127.0.0.53\n");
    let c = load_embedded(&env).unwrap();
    assert_eq!(
        c.listen.addresses,
        ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(c.listen.port, 5353);
    assert_eq!(c.upstream.servers, [sa("192.0.2.1:53")]);
    assert!(!c.network.setup_interface && !c.network.setup_rules);
    assert_eq!(
        c.metrics.addresses,
        [HttpAddress::Socket(sa("127.0.0.1:9253"))]
    );
    assert!(c.sources.is_empty());
}

#[test]
fn example_config_loads() {
    let text = include_str!("../../config/example.toml");
    let (_dir, env) = env_with("nameserver 10.0.0.2\n");
    let load_ok =
        |text: &str| load_documents(&docs(&[("config/example.toml", text)]), &env).unwrap();
    let c = load_ok(text);
    assert_eq!(c.listen.addresses.len(), 2);
    assert_eq!(c.cluster.upstream, [sa("10.96.0.11:53")]);
    assert!(c.network.setup_interface && c.network.setup_rules);
    // Apart from the node values it is the documented default.
    let mut defaults = load_ok("");
    defaults.listen.addresses = c.listen.addresses.clone();
    defaults.cluster.upstream = c.cluster.upstream.clone();
    assert_eq!(
        Config {
            sources: vec![],
            ..c
        },
        Config {
            sources: vec![],
            ..defaults
        }
    );
}

// ---- resolv.conf ----

#[test]
fn resolv_conf_parsing_drops_stub_and_self() {
    let (_dir, env) = env_with(
        "# comment\nsearch svc.cluster.local\noptions ndots:5 edns0\nnameserver 127.0.0.53\n\
         nameserver 10.96.0.10\nnameserver 2001:db8::1\nnameserver fe80::1%eth0\nnameserver 10.0.0.7 # ok\n",
    );
    let docs = docs(&[(
        "a.toml",
        "[listen]\naddresses = [\"169.254.20.10\", \"10.96.0.10\"]\n",
    )]);
    let c = load_documents(&docs, &env).unwrap();
    assert_eq!(
        c.upstream.servers,
        [sa("[2001:db8::1]:53"), sa("10.0.0.7:53")]
    );
    assert_eq!(
        c.upstream.servers_from,
        env.etc_resolv_conf.display().to_string()
    );
}

/// What `node-resolver enable` leaves in systemd-resolved's resolv.conf: 169.254.20.10
/// first. It is never an upstream, also when localdns does not listen on it (intercept
/// only), and the real resolvers after it are kept.
#[test]
fn node_local_dns_address_is_never_an_upstream() {
    let (dir, mut env) = env_with("nameserver 127.0.0.53\n");
    env.resolved_resolv_conf = dir.path().join("resolved.conf");
    std::fs::write(
        &env.resolved_resolv_conf,
        "nameserver 169.254.20.10\nnameserver 10.0.0.2\n",
    )
    .unwrap();
    for listen in ["[\"169.254.20.10\", \"10.96.0.10\"]", "[\"10.96.0.10\"]"] {
        let text = format!("[listen]\naddresses = {listen}\n");
        let c = load_documents(&docs(&[("a.toml", &text)]), &env).unwrap();
        assert_eq!(c.upstream.servers, [sa("10.0.0.2:53")], "listen {listen}");
    }
    // Only on port 53: another port there is some other server.
    let c = load_ok(&[("a.toml", "[upstream]\nservers = [\"169.254.20.10:5353\"]\n")]);
    assert_eq!(c.upstream.servers, [sa("169.254.20.10:5353")]);
    let (msg, _, line, _) = load_err(&[("a.toml", "[upstream]\nservers = [\"169.254.20.10\"]\n")]);
    assert_eq!(line, Some(2));
    assert!(msg.contains("node-local DNS address"), "{msg}");
}

#[test]
fn auto_prefers_systemd_resolved_file() {
    let (dir, mut env) = env_with("nameserver 127.0.0.53\n");
    env.resolved_resolv_conf = dir.path().join("resolved.conf");
    std::fs::write(&env.resolved_resolv_conf, "nameserver 192.0.2.53\n").unwrap();
    let c = load_documents(&docs(&[("a.toml", "")]), &env).unwrap();
    assert_eq!(c.upstream.servers, [sa("192.0.2.53:53")]);
    assert_eq!(
        c.upstream.servers_from,
        env.resolved_resolv_conf.display().to_string()
    );
}

#[test]
fn explicit_resolv_conf_path() {
    let (dir, env) = env_with("nameserver 127.0.0.53\n");
    let other = dir.path().join("other.conf");
    std::fs::write(&other, "nameserver 192.0.2.9\n").unwrap();
    let text = format!(
        "[upstream]\nresolv_conf = {:?}\n",
        other.display().to_string()
    );
    let c = load_documents(&docs(&[("a.toml", &text)]), &env).unwrap();
    assert_eq!(c.upstream.servers, [sa("192.0.2.9:53")]);
}

#[test]
fn resolv_conf_without_servers_is_tolerated_when_a_cluster_upstream_exists() {
    // A node at early boot: resolved's stub only, and no resolved file yet.
    let (_dir, env) = env_with("nameserver 127.0.0.53\n");
    let node = "[cluster]\nupstream = [\"10.96.0.11\"]\n";
    let c = load_documents(&docs(&[("a.toml", node)]), &env).unwrap();
    assert!(c.upstream.servers.is_empty());
    assert_eq!(
        c.upstream.servers_from,
        env.etc_resolv_conf.display().to_string()
    );
    // Missing file: the same.
    let (dir, env) = env_with("");
    std::fs::remove_file(dir.path().join("resolv.conf")).unwrap();
    let c = load_documents(&docs(&[("a.toml", node)]), &env).unwrap();
    assert!(c.upstream.servers.is_empty());
}

#[test]
fn resolv_conf_without_usable_servers_is_an_error() {
    let (_dir, env) = env_with("nameserver 127.0.0.53\noptions edns0 trust-ad\n");
    let e = load_documents(&docs(&[("a.toml", "[cache]\ncapacity = 10\n")]), &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("(defaults): key `upstream.servers`: empty, and "),
        "{e}"
    );
    assert!(
        e.contains("resolv.conf has no usable nameserver (127.0.0.53:53 dropped: systemd-resolved"),
        "{e}"
    );

    let (_dir, env) = env_with("# nothing\n");
    let e = load_documents(&docs(&[("a.toml", "")]), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no usable nameserver;"), "{e}");

    let (dir, env) = env_with("");
    std::fs::remove_file(dir.path().join("resolv.conf")).unwrap();
    let e = load_documents(
        &docs(&[("a.toml", "[upstream]\nresolv_conf = \"auto\"\n")]),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("a.toml:2: key `upstream.resolv_conf`: upstream.servers is empty and "),
        "{e}"
    );
}

// ---- render ----

fn round_trips(c: &Config, env: &Environment) {
    let text = render(c);
    let back = load_documents(&[("rendered.toml".into(), text.clone())], env)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        Config {
            sources: vec![],
            ..back
        },
        Config {
            sources: vec![],
            ..c.clone()
        },
        "{text}"
    );
}

#[test]
fn render_round_trips() {
    let (_dir, env) = env_with("nameserver 10.0.0.2\nnameserver 2001:db8::2\n");
    let example = include_str!("../../config/example.toml");
    let busy = "\
[listen]
addresses = [\"127.0.0.1\", \"::1\"]
port = 5353
tcp_idle_timeout = \"1m 500ms\"
[cluster]
domain = \"k8s.example\"
upstream = [\"[fd00::11]:5353\", \"10.96.0.11\"]
protocol = \"udp\"
[upstream]
servers = [\"192.0.2.1\", \"[2001:db8::53]:5353\"]
protocol = \"tcp\"
[[stub]]
zone = \"corp.example\"
servers = [\"10.0.0.2:53\"]
[[stub]]
zone = \"_tcp.other.example\"
servers = [\"10.0.0.3\", \"10.0.0.4\"]
protocol = \"tcp\"
[cache]
serve_stale = \"0s\"
prefetch = false
[network]
interface = \"dns0\"
setup_rules = false
[metrics]
address = [\"127.0.0.1:9253\", \"default-route:9253\"]
header_timeout = \"5s\"
[log]
queries = \"errors\"
";
    for text in ["", example, busy, EMBEDDED_DEFAULT] {
        let c = load_documents(&docs(&[("a.toml", text)]), &env).unwrap();
        round_trips(&c, &env);
    }
}

// ---- load() from disk ----

#[test]
fn load_reads_main_file_then_conf_d_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.toml");
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(
        &main,
        "[upstream]\nservers = [\"192.0.2.1\"]\n[listen]\nport = 1053\n",
    )
    .unwrap();
    std::fs::write(conf_d.join("20-b.toml"), "[listen]\nport = 2053\n").unwrap();
    std::fs::write(
        conf_d.join("10-a.toml"),
        "[listen]\nport = 3053\nudp_threads = 2\n",
    )
    .unwrap();
    std::fs::write(conf_d.join("README"), "not toml").unwrap();
    std::fs::write(conf_d.join(".30-c.toml.swp"), "garbage").unwrap();
    std::fs::write(conf_d.join(".#30-c.toml"), "garbage").unwrap();

    let source = Source {
        path: main.clone(),
        explicit: true,
        conf_dir: None,
    };
    let c = load(&source).unwrap();
    assert_eq!((c.listen.port, c.listen.udp_threads), (2053, 2));
    assert_eq!(
        c.sources,
        [
            main.clone(),
            conf_d.join("10-a.toml"),
            conf_d.join("20-b.toml")
        ]
    );

    // conf.d alone is enough when the main file is optional.
    std::fs::remove_file(&main).unwrap();
    std::fs::write(
        conf_d.join("00-up.toml"),
        "[upstream]\nservers = [\"192.0.2.1\"]\n",
    )
    .unwrap();
    let c = load(&Source {
        explicit: false,
        ..source.clone()
    })
    .unwrap();
    assert_eq!(c.sources.len(), 3);

    // An explicit main file must exist.
    let e = load(&source).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Io { path, .. } if *path == main),
        "{e}"
    );

    // Errors in a drop-in name the drop-in.
    std::fs::write(conf_d.join("15-bad.toml"), "[listen]\nport = \"x\"\n").unwrap();
    let e = load(&Source {
        explicit: false,
        ..source
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&format!(
            "{}:2: key `listen.port`: ",
            conf_d.join("15-bad.toml").display()
        )),
        "{e}"
    );
}

#[test]
fn load_without_any_file_uses_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let (_rdir, env) = env_with("nameserver 192.0.2.1\n");
    let source = Source {
        path: dir.path().join("config.toml"),
        explicit: false,
        conf_dir: Some(dir.path().join("elsewhere")),
    };
    let c = load_with(&source, &env).unwrap();
    assert_eq!(c.listen.port, 5353);
    assert!(c.sources.is_empty());
}

#[test]
fn a_deprecated_key_is_dropped_with_a_warning_not_refused() {
    use super::document::{Deprecated, Document};
    let list = [Deprecated {
        key: "network.old_knob",
        since: "0.2.0",
        instead: "use network.interface",
    }];
    let text = "[network]\nold_knob = 1\ninterface = \"ldns0\"\n";
    let doc = Document::parse_with("/etc/localdns/config.toml".into(), text, &list)
        .expect("a deprecated key must not refuse the file");
    let network = doc.table["network"].as_table().unwrap();
    assert!(network.get("old_knob").is_none(), "the key was not dropped");
    assert_eq!(network["interface"].as_str(), Some("ldns0"));
    // Without the entry, the same key is an unknown key, named with its line.
    let err = Document::parse_with("/etc/localdns/config.toml".into(), text, &[])
        .err()
        .expect("unknown key refused")
        .to_string();
    assert!(
        err.contains("config.toml:2") && err.contains("old_knob"),
        "{err}"
    );
    // Other errors in a file with a deprecated key still name their key.
    let bad = "[network]\nold_knob = 1\ninterface = 7\n";
    let err = Document::parse_with("/x.toml".into(), bad, &list)
        .err()
        .expect("bad value refused")
        .to_string();
    assert!(
        err.contains("/x.toml:3") && err.contains("network.interface"),
        "{err}"
    );
}

#[test]
fn firewall_and_its_deprecated_alias() {
    let fw = |files: &[(&str, &str)]| load_ok(files).network.firewall;
    assert_eq!(fw(&[]), Firewall::Auto);
    for (text, want) in [
        ("firewall = \"nftables\"", Firewall::Nftables),
        ("firewall = \"iptables-nft\"", Firewall::IptablesNft),
        ("firewall = \"iptables-legacy\"", Firewall::IptablesLegacy),
        ("firewall = \"auto\"", Firewall::Auto),
        // The old key still works, as its old meaning.
        ("iptables_backend = \"nft\"", Firewall::IptablesNft),
        ("iptables_backend = \"legacy\"", Firewall::IptablesLegacy),
        ("iptables_backend = \"auto\"", Firewall::Auto),
        // The new key wins.
        (
            "iptables_backend = \"legacy\"\nfirewall = \"nftables\"",
            Firewall::Nftables,
        ),
    ] {
        let file = format!("[network]\n{text}\n");
        assert_eq!(fw(&[("/etc/localdns/config.toml", &file)]), want, "{text}");
    }
    // A later file's new key overrides an earlier file's old one.
    assert_eq!(
        fw(&[
            (
                "/etc/localdns/config.toml",
                "[network]\niptables_backend = \"legacy\"\n"
            ),
            (
                "/etc/localdns/conf.d/10.toml",
                "[network]\nfirewall = \"nftables\"\n"
            ),
        ]),
        Firewall::Nftables
    );
    // The rendered config (the last good one) uses the new key only.
    let c = load_ok(&[(
        "/etc/localdns/config.toml",
        "[network]\niptables_backend = \"legacy\"\n",
    )]);
    let text = crate::config::render(&c);
    assert!(text.contains("firewall = \"iptables-legacy\""), "{text}");
    assert!(!text.contains("iptables_backend"), "{text}");
    assert!(super::document::RENAMED
        .iter()
        .any(|r| r.key == "network.iptables_backend"));
}
