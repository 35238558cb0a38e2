//! The effective config as TOML, for `localdns check-config`.
//!
//! Written by hand rather than serialized so the sections come in the documented order
//! with a few comments. Loading the output gives the same [`Config`] back (apart from
//! `sources`): servers read from resolv.conf are rendered as `resolv_conf = "<path>"` so
//! that `servers_from` survives, with the servers found listed in a comment.

use std::fmt::{Display, Write as _};
use std::time::Duration;

use super::types::*;

pub fn render(c: &Config) -> String {
    let mut out = String::from("# localdns effective configuration\n");
    if c.sources.is_empty() {
        out.push_str("# from: the embedded default\n");
    }
    for source in &c.sources {
        let _ = writeln!(out, "# from: {}", source.display());
    }

    let l = &c.listen;
    section(&mut out, "listen");
    line(&mut out, "addresses", list(&l.addresses));
    line(&mut out, "port", l.port);
    line(&mut out, "udp_threads", l.udp_threads);
    line(&mut out, "udp_recv_buffer", l.udp_recv_buffer);
    line(&mut out, "tcp_idle_timeout", duration(l.tcp_idle_timeout));
    line(&mut out, "tcp_max_connections", l.tcp_max_connections);
    line(
        &mut out,
        "tcp_max_connections_per_client",
        l.tcp_max_connections_per_client,
    );

    let k = &c.cluster;
    section(&mut out, "cluster");
    line(&mut out, "domain", string(&k.domain));
    line(&mut out, "reverse_zones", list(&k.reverse_zones));
    line(&mut out, "upstream", list(&k.upstream));
    line(&mut out, "protocol", protocol(k.protocol));

    let u = &c.upstream;
    section(&mut out, "upstream");
    if u.servers_from == "config" {
        line(&mut out, "servers", list(&u.servers));
        line(&mut out, "resolv_conf", string("auto"));
    } else {
        let found: Vec<String> = u.servers.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "# read from {}: {}", u.servers_from, found.join(", "));
        line(&mut out, "servers", "[]");
        line(&mut out, "resolv_conf", string(&u.servers_from));
    }
    line(&mut out, "protocol", protocol(u.protocol));
    line(&mut out, "timeout", duration(u.timeout));
    line(&mut out, "attempts", u.attempts);
    line(&mut out, "max_in_flight", u.max_in_flight);
    line(
        &mut out,
        "max_in_flight_per_client",
        u.max_in_flight_per_client,
    );
    line(&mut out, "down_after_failures", u.down_after_failures);
    line(&mut out, "down_time", duration(u.down_time));
    line(&mut out, "udp_socket_queries", u.udp_socket_queries);
    line(
        &mut out,
        "udp_socket_lifetime",
        duration(u.udp_socket_lifetime),
    );
    line(
        &mut out,
        "health_check_interval",
        duration(u.health_check_interval),
    );
    line(&mut out, "tcp_connections", u.tcp_connections);
    line(
        &mut out,
        "tcp_connection_max_age",
        duration(u.tcp_connection_max_age),
    );
    line(
        &mut out,
        "tcp_connection_max_queries",
        u.tcp_connection_max_queries,
    );

    for stub in &c.stubs {
        out.push_str("\n[[stub]]\n");
        line(&mut out, "zone", string(&stub.zone));
        line(&mut out, "servers", list(&stub.servers));
        line(&mut out, "protocol", protocol(stub.protocol));
    }

    let ca = &c.cache;
    section(&mut out, "cache");
    line(&mut out, "capacity", ca.capacity);
    line(&mut out, "max_bytes", ca.max_bytes);
    line(&mut out, "max_answer_bytes", ca.max_answer_bytes);
    line(&mut out, "max_ttl", duration(ca.max_ttl));
    line(&mut out, "min_ttl", duration(ca.min_ttl));
    line(&mut out, "negative_max_ttl", duration(ca.negative_max_ttl));
    line(&mut out, "servfail_ttl", duration(ca.servfail_ttl));
    line(&mut out, "serve_stale", duration(ca.serve_stale));
    line(&mut out, "stale_answer_ttl", duration(ca.stale_answer_ttl));
    line(
        &mut out,
        "stale_answer_client_timeout",
        duration(ca.stale_answer_client_timeout),
    );
    line(&mut out, "prefetch", ca.prefetch);
    line(&mut out, "prefetch_min_hits", ca.prefetch_min_hits);
    line(&mut out, "prefetch_percent", ca.prefetch_percent);

    let n = &c.network;
    section(&mut out, "network");
    line(&mut out, "interface", string(&n.interface));
    line(&mut out, "setup_interface", n.setup_interface);
    line(&mut out, "setup_rules", n.setup_rules);
    line(&mut out, "firewall", string(n.firewall.name()));
    line(
        &mut out,
        "rules_check_interval",
        duration(n.rules_check_interval),
    );
    line(&mut out, "xtables_wait", duration(n.xtables_wait));
    line(&mut out, "fallback", n.fallback);
    line(
        &mut out,
        "fallback_address",
        string(&n.fallback_address.to_string()),
    );

    section(&mut out, "metrics");
    // One entry (or none) as a string, the form every earlier version wrote and read.
    let metrics: Vec<String> = c.metrics.addresses.iter().map(|a| a.to_string()).collect();
    match metrics.as_slice() {
        [] => line(&mut out, "address", string("")),
        [one] => line(&mut out, "address", string(one)),
        many => line(&mut out, "address", list(many)),
    }
    line(
        &mut out,
        "header_timeout",
        duration(c.metrics.header_timeout),
    );

    section(&mut out, "log");
    let queries = match c.log.queries {
        QueryLog::Off => "off",
        QueryLog::Errors => "errors",
        QueryLog::All => "all",
    };
    line(&mut out, "queries", string(queries));
    out
}

fn section(out: &mut String, name: &str) {
    let _ = write!(out, "\n[{name}]\n");
}

fn line(out: &mut String, key: &str, value: impl Display) {
    let _ = writeln!(out, "{key} = {value}");
}

/// A TOML string literal, escaped by the toml crate.
fn string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list<T: Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| string(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

fn duration(d: Duration) -> String {
    string(&humantime::format_duration(d).to_string())
}

fn protocol(p: Protocol) -> String {
    string(match p {
        Protocol::Udp => "udp",
        Protocol::Tcp => "tcp",
    })
}
