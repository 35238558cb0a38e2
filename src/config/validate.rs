//! From the merged raw document to the validated [`Config`]: the checks that need more
//! than one field, or the host (resolv.conf).
//!
//! Errors here are about the merged result, so they name the file that last set the key
//! ([`Provenance`]), or "(defaults)" when no file did.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use super::document::{Document, KeyPath};
use super::error::{ConfigError, Location};
use super::raw::{RawConfig, RawUpstream, ResolvConfSetting, Server};
use super::types::*;
use super::value::DNS_PORT;
use super::{resolv, Environment};

/// Which document last set a key of the merged config.
pub struct Provenance<'a> {
    docs: &'a [Document],
    /// Zones of the merged `[[stub]]` list, in order.
    stub_zones: Vec<String>,
}

impl<'a> Provenance<'a> {
    pub fn new(docs: &'a [Document], raw: &RawConfig) -> Self {
        let stub_zones = raw.stub.iter().map(|s| s.zone.0.clone()).collect();
        Self { docs, stub_zones }
    }

    pub fn locate(&self, key: &KeyPath) -> Location {
        let found = match key.stub_index() {
            // Stub entries merge by zone: find the last document with this zone.
            Some(i) => self.stub_zones.get(i).and_then(|zone| {
                self.docs.iter().rev().find_map(|doc| {
                    let j = doc.stub_zones.iter().position(|z| z == zone)?;
                    Some(doc.location(&key.with_stub_index(j)))
                })
            }),
            None => self
                .docs
                .iter()
                .rev()
                .find(|doc| doc.sets(key))
                .map(|doc| doc.location(key)),
        };
        found.unwrap_or_else(Location::defaults)
    }

    fn invalid(&self, key: &str, reason: String) -> ConfigError {
        let key = KeyPath::of(key);
        ConfigError::Invalid {
            at: self.locate(&key),
            key: Some(key.to_string()),
            reason,
        }
    }
}

/// Checks the merged document and builds the config (with `sources` left empty).
pub fn validate(
    raw: RawConfig,
    env: &Environment,
    prov: &Provenance,
) -> Result<Config, ConfigError> {
    let listen = Listen {
        addresses: raw.listen.addresses.iter().map(|a| a.0).collect(),
        port: raw.listen.port,
        udp_threads: raw.listen.udp_threads,
        udp_recv_buffer: raw.listen.udp_recv_buffer,
        tcp_idle_timeout: raw.listen.tcp_idle_timeout.0,
        tcp_max_connections: raw.listen.tcp_max_connections,
        tcp_max_connections_per_client: raw.listen.tcp_max_connections_per_client,
    };

    let cluster_upstream = usable("cluster.upstream", sockets(&raw.cluster.upstream), &listen);
    if cluster_upstream.kept.is_empty() && !raw.cluster.upstream.is_empty() {
        return Err(prov.invalid("cluster.upstream", cluster_upstream.nothing_left()));
    }
    let cluster = Cluster {
        domain: raw.cluster.domain.0,
        reverse_zones: raw.cluster.reverse_zones.into_iter().map(|z| z.0).collect(),
        upstream: cluster_upstream.kept,
        protocol: raw.cluster.protocol,
    };
    if cluster.upstream.is_empty() {
        tracing::warn!(
            "cluster.upstream is empty: queries for {} and the reverse zones go to the default upstreams",
            cluster.domain
        );
    }

    let (servers, servers_from) = default_upstreams(
        &raw.upstream,
        &listen,
        env,
        prov,
        !cluster.upstream.is_empty(),
    )?;
    let upstream = Upstream {
        servers,
        protocol: raw.upstream.protocol,
        servers_from,
        timeout: raw.upstream.timeout.0,
        attempts: raw.upstream.attempts,
        max_in_flight: raw.upstream.max_in_flight,
        max_in_flight_per_client: raw.upstream.max_in_flight_per_client,
        down_after_failures: raw.upstream.down_after_failures,
        down_time: raw.upstream.down_time.0,
        udp_socket_queries: raw.upstream.udp_socket_queries,
        udp_socket_lifetime: raw.upstream.udp_socket_lifetime.0,
        health_check_interval: raw.upstream.health_check_interval.0,
        tcp_connections: raw.upstream.tcp_connections,
        tcp_connection_max_age: raw.upstream.tcp_connection_max_age.0,
        tcp_connection_max_queries: raw.upstream.tcp_connection_max_queries,
    };

    let mut stubs = Vec::with_capacity(raw.stub.len());
    for (i, stub) in raw.stub.into_iter().enumerate() {
        let key = format!("stub[{i}].servers");
        let servers = usable(&key, sockets(&stub.servers), &listen);
        if servers.kept.is_empty() {
            return Err(prov.invalid(&key, servers.nothing_left()));
        }
        stubs.push(Stub {
            zone: stub.zone.0,
            servers: servers.kept,
            protocol: stub.protocol,
        });
    }

    let relay = raw.network.fallback_address;
    if raw.network.fallback && !relay.is_link_local() {
        return Err(prov.invalid(
            "network.fallback_address",
            format!("{relay} is not an IPv4 link-local address (169.254.0.0/16)"),
        ));
    }
    if raw.network.fallback && listen.addresses.contains(&IpAddr::V4(relay)) {
        return Err(prov.invalid(
            "network.fallback_address",
            format!("{relay} is also a listen address: the relay needs an address of its own"),
        ));
    }

    let c = raw.cache;
    if c.min_ttl > c.max_ttl {
        return Err(prov.invalid(
            "cache.min_ttl",
            format!(
                "{} is longer than cache.max_ttl ({})",
                humantime::format_duration(c.min_ttl.0),
                humantime::format_duration(c.max_ttl.0)
            ),
        ));
    }
    // The byte budget is split over the cache's shards; an answer bigger than a shard's
    // share could never be stored.
    if c.max_answer_bytes > c.max_bytes / crate::cache::SHARDS {
        return Err(prov.invalid(
            "cache.max_answer_bytes",
            format!(
                "{} is more than cache.max_bytes / {} ({}): the budget is split over {} shards and each must hold the largest answer",
                c.max_answer_bytes,
                crate::cache::SHARDS,
                c.max_bytes / crate::cache::SHARDS,
                crate::cache::SHARDS
            ),
        ));
    }
    let cache = Cache {
        capacity: c.capacity,
        max_bytes: c.max_bytes,
        max_answer_bytes: c.max_answer_bytes,
        max_ttl: c.max_ttl.0,
        min_ttl: c.min_ttl.0,
        negative_max_ttl: c.negative_max_ttl.0,
        servfail_ttl: c.servfail_ttl.0,
        serve_stale: c.serve_stale.0,
        stale_answer_ttl: c.stale_answer_ttl.0,
        stale_answer_client_timeout: c.stale_answer_client_timeout.0,
        prefetch: c.prefetch,
        prefetch_min_hits: c.prefetch_min_hits,
        prefetch_percent: c.prefetch_percent,
    };

    Ok(Config {
        listen,
        cluster,
        upstream,
        stubs,
        cache,
        network: Network {
            firewall: raw.network.firewall(),
            interface: raw.network.interface.0,
            setup_interface: raw.network.setup_interface,
            setup_rules: raw.network.setup_rules,
            rules_check_interval: raw.network.rules_check_interval.0,
            xtables_wait: raw.network.xtables_wait.0,
            fallback: raw.network.fallback,
            fallback_address: raw.network.fallback_address,
        },
        metrics: Metrics {
            addresses: raw.metrics.address.0,
            header_timeout: raw.metrics.header_timeout.0,
        },
        log: Log {
            queries: raw.log.queries,
        },
        sources: Vec::new(),
    })
}

/// `upstream.servers` if set, else the nameservers of resolv.conf.
///
/// Empty only in one case: read from a resolv.conf that has no usable nameserver (or is
/// missing) while a cluster upstream is configured. That is a node at early boot, before
/// DHCP or systemd-resolved wrote the resolvers: the cluster zones can be served already,
/// other names get SERVFAIL until the file changes (it is watched, and re-read while the
/// list is empty). Without a cluster upstream there would be nothing to forward to: error.
fn default_upstreams(
    raw: &RawUpstream,
    listen: &Listen,
    env: &Environment,
    prov: &Provenance,
    has_cluster_upstream: bool,
) -> Result<(Vec<SocketAddr>, String), ConfigError> {
    if !raw.servers.is_empty() {
        let servers = usable("upstream.servers", sockets(&raw.servers), listen);
        if servers.kept.is_empty() {
            return Err(prov.invalid("upstream.servers", servers.nothing_left()));
        }
        return Ok((servers.kept, "config".to_owned()));
    }

    let path: &Path = match &raw.resolv_conf {
        ResolvConfSetting::Path(path) => path,
        ResolvConfSetting::Auto if env.resolved_resolv_conf.exists() => &env.resolved_resolv_conf,
        ResolvConfSetting::Auto => &env.etc_resolv_conf,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if has_cluster_upstream => {
            tracing::warn!(
                "{} cannot be read ({e}): no default upstreams yet; only the cluster and stub zones are answered until it can",
                path.display()
            );
            return Ok((Vec::new(), path.display().to_string()));
        }
        Err(e) => {
            return Err(prov.invalid(
                "upstream.resolv_conf",
                format!(
                    "upstream.servers is empty and {} cannot be read: {e}",
                    path.display()
                ),
            ))
        }
    };
    let found = resolv::parse(&text);
    for (value, why) in &found.skipped {
        tracing::warn!("{}: skipping nameserver {value:?}: {why}", path.display());
    }
    let what = format!("nameserver in {}", path.display());
    let servers = usable(
        &what,
        found
            .servers
            .iter()
            .map(|&ip| SocketAddr::new(ip, DNS_PORT))
            .collect(),
        listen,
    );
    if servers.kept.is_empty() {
        let dropped = if servers.dropped.is_empty() {
            String::new()
        } else {
            format!(" ({})", servers.dropped_list())
        };
        if has_cluster_upstream {
            tracing::warn!(
                "{} has no usable nameserver{dropped}: no default upstreams yet; only the cluster and stub zones are answered until it has",
                path.display()
            );
            return Ok((Vec::new(), path.display().to_string()));
        }
        return Err(prov.invalid(
            "upstream.servers",
            format!(
                "empty, and {} has no usable nameserver{dropped}; set upstream.servers, or upstream.resolv_conf to a file that lists the real resolvers",
                path.display()
            ),
        ));
    }
    Ok((servers.kept, path.display().to_string()))
}

fn sockets(servers: &[Server]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.0).collect()
}

/// A server list after dropping the servers localdns must never forward to.
struct Usable {
    kept: Vec<SocketAddr>,
    dropped: Vec<(SocketAddr, &'static str)>,
}

impl Usable {
    fn dropped_list(&self) -> String {
        let items: Vec<String> = self
            .dropped
            .iter()
            .map(|(a, why)| format!("{a} dropped: {why}"))
            .collect();
        items.join("; ")
    }

    fn nothing_left(&self) -> String {
        format!("no usable server left ({})", self.dropped_list())
    }
}

/// Drops, with a warning, the systemd-resolved stub and localdns's own listen sockets.
fn usable(what: &str, servers: Vec<SocketAddr>, listen: &Listen) -> Usable {
    let mut out = Usable {
        kept: Vec::new(),
        dropped: Vec::new(),
    };
    for addr in servers {
        match never_forward_to(addr, listen) {
            Some(why) => {
                tracing::warn!("{what}: not forwarding to {addr}: {why}");
                out.dropped.push((addr, why));
            }
            None => out.kept.push(addr),
        }
    }
    out
}

/// The node-local DNS address by convention (localdns's default, NodeLocal DNSCache's):
/// on a node, whatever answers there is a node cache, which forwards to the node's
/// resolvers, which may list it (`node-resolver enable` puts it first).
const NODE_LOCAL_DNS: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);

fn never_forward_to(addr: SocketAddr, listen: &Listen) -> Option<&'static str> {
    let ip = addr.ip().to_canonical();
    let resolved_stubs = [Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::new(127, 0, 0, 54)];
    if matches!(ip, IpAddr::V4(v4) if resolved_stubs.contains(&v4)) {
        return Some("systemd-resolved's stub listener, which may forward back to localdns");
    }
    if ip == IpAddr::V4(NODE_LOCAL_DNS) && addr.port() == DNS_PORT {
        return Some("the node-local DNS address, a node cache that may forward back to localdns");
    }
    let own = listen.addresses.iter().any(|a| a.to_canonical() == ip) && addr.port() == listen.port;
    own.then_some("one of localdns's own listen addresses (a forwarding loop)")
}
