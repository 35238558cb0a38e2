//! The raw serde layer: what one TOML document (or the merged table) may say.
//!
//! Every struct denies unknown keys and every field has a default, so a document may set
//! any subset of keys. Values are parsed and range-checked here, while deserializing, so
//! that a bad value is reported with the file, line and key it came from. Checks that
//! need more than one field (or the host) live in [`super::validate`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use super::types::{Firewall, HttpAddress, IptablesBackend, Protocol, QueryLog};
use super::value;

/// A whole document. Field names are the TOML table names.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Where and how localdns answers clients.
    pub listen: RawListen,
    /// The Kubernetes cluster zones and the kube-dns Service that answers them.
    pub cluster: RawCluster,
    /// The default upstreams, for everything that no other rule routes.
    pub upstream: RawUpstream,
    /// Extra zones forwarded to their own servers (`[[stub]]`), merged across files by zone.
    #[serde(deserialize_with = "unique_stubs")]
    pub stub: Vec<RawStub>,
    /// The answer cache.
    pub cache: RawCache,
    /// The node's link-local interface and the firewall rules that steer traffic to it.
    pub network: RawNetwork,
    /// The HTTP endpoint with /metrics and /health.
    pub metrics: RawMetrics,
    /// What is logged besides events.
    pub log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// `"off"`, `"errors"` (answers other than NOERROR and NXDOMAIN) or `"all"`; rate
    /// limited to 50 lines a second, the rest counted in one line.
    pub queries: QueryLog,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawListen {
    /// Addresses served on UDP and TCP; IPv4 and IPv6 may be mixed. Non-empty, no duplicates.
    #[serde(deserialize_with = "listen_addresses")]
    pub addresses: Vec<Ip>,
    /// Port served on every address.
    #[serde(deserialize_with = "port")]
    pub port: u16,
    /// UDP receive threads per address; 0 means one per CPU, at most 4.
    pub udp_threads: usize,
    /// Receive buffer asked for each UDP socket, bytes (at least 64 KiB).
    #[serde(deserialize_with = "recv_buffer")]
    pub udp_recv_buffer: usize,
    /// An idle client TCP connection is closed after this long.
    #[serde(deserialize_with = "positive")]
    pub tcp_idle_timeout: Dur,
    /// Client TCP connections at most at once.
    #[serde(deserialize_with = "at_least_one_usize")]
    pub tcp_max_connections: usize,
    /// Client TCP connections at most at once from one source address (one pod).
    #[serde(deserialize_with = "at_least_one_usize")]
    pub tcp_max_connections_per_client: usize,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            addresses: vec![Ip(IpAddr::from([169, 254, 20, 10]))],
            port: 53,
            udp_threads: 0,
            udp_recv_buffer: 4 * 1024 * 1024,
            tcp_idle_timeout: Dur(Duration::from_secs(10)),
            tcp_max_connections: 1024,
            tcp_max_connections_per_client: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCluster {
    /// The cluster domain.
    pub domain: Zone,
    /// Reverse zones also sent to the cluster upstream.
    pub reverse_zones: Vec<Zone>,
    /// kube-dns-upstream Service addresses; empty sends cluster zones to the default upstreams.
    pub upstream: Vec<Server>,
    /// Transport towards the cluster upstream.
    pub protocol: Protocol,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            domain: Zone("cluster.local".into()),
            reverse_zones: vec![Zone("in-addr.arpa".into()), Zone("ip6.arpa".into())],
            upstream: Vec::new(),
            protocol: Protocol::Tcp,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUpstream {
    /// Default upstreams; empty means: read the nameservers of `resolv_conf`.
    pub servers: Vec<Server>,
    /// Where to read nameservers from when `servers` is empty.
    pub resolv_conf: ResolvConfSetting,
    /// Transport towards the default upstreams.
    pub protocol: Protocol,
    /// Wait for one attempt before trying the next server.
    #[serde(deserialize_with = "positive")]
    pub timeout: Dur,
    /// Attempts per query across the list (1-10).
    #[serde(deserialize_with = "attempts")]
    pub attempts: usize,
    /// Upstream queries in flight at most, per pool.
    #[serde(deserialize_with = "at_least_one_usize")]
    pub max_in_flight: usize,
    /// Misses one client address may have waiting at most.
    #[serde(deserialize_with = "at_least_one_usize")]
    pub max_in_flight_per_client: usize,
    /// Failures of distinct questions, with no answer in between, that mark a server down.
    #[serde(deserialize_with = "at_least_one_u32")]
    pub down_after_failures: u32,
    /// How long a down server is skipped.
    #[serde(deserialize_with = "positive")]
    pub down_time: Dur,
    /// Queries one upstream UDP socket (one random source port) carries at most.
    #[serde(deserialize_with = "socket_queries")]
    pub udp_socket_queries: u32,
    /// Age after which an upstream UDP socket is closed instead of reused.
    #[serde(deserialize_with = "positive")]
    pub udp_socket_lifetime: Dur,
    /// A server no client has had an answer from for this long is sent a known-good
    /// question, so its health is known without traffic; "0s" = never.
    pub health_check_interval: Dur,
    /// Pipelined TCP connections kept per server (1-16), queries spread round-robin.
    #[serde(deserialize_with = "tcp_connections")]
    pub tcp_connections: usize,
    /// Age after which a TCP connection takes no new queries; "0s" = no limit.
    pub tcp_connection_max_age: Dur,
    /// Queries after which a TCP connection takes no new ones; 0 = no limit.
    pub tcp_connection_max_queries: u32,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            resolv_conf: ResolvConfSetting::Auto,
            protocol: Protocol::Udp,
            timeout: Dur(Duration::from_secs(1)),
            attempts: 3,
            max_in_flight: 1000,
            max_in_flight_per_client: 250,
            down_after_failures: 3,
            down_time: Dur(Duration::from_secs(5)),
            udp_socket_queries: 100,
            udp_socket_lifetime: Dur(Duration::from_secs(1)),
            health_check_interval: Dur(Duration::from_secs(3)),
            tcp_connections: 4,
            tcp_connection_max_age: Dur(Duration::from_secs(3)),
            tcp_connection_max_queries: 1000,
        }
    }
}

/// One `[[stub]]` entry. `zone` and `servers` have no default: a stub needs both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStub {
    /// The zone forwarded to `servers`.
    pub zone: Zone,
    /// Servers for the zone; non-empty.
    #[serde(deserialize_with = "non_empty_servers")]
    pub servers: Vec<Server>,
    /// Transport towards the stub servers (default udp).
    #[serde(default = "udp")]
    pub protocol: Protocol,
}

fn udp() -> Protocol {
    Protocol::Udp
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCache {
    /// Entries at most.
    #[serde(deserialize_with = "at_least_one_usize")]
    pub capacity: usize,
    /// Bytes the entries may take at most (keys, answers, bookkeeping); at least 1 MiB.
    #[serde(deserialize_with = "cache_bytes")]
    pub max_bytes: usize,
    /// Largest answer stored, bytes (512-65535); bigger answers are served, not stored.
    #[serde(deserialize_with = "answer_bytes")]
    pub max_answer_bytes: usize,
    /// Cap on positive answers' TTL.
    #[serde(deserialize_with = "positive")]
    pub max_ttl: Dur,
    /// Floor on positive answers' TTL; at most `max_ttl`.
    pub min_ttl: Dur,
    /// Cap on negative answers' TTL.
    pub negative_max_ttl: Dur,
    /// How long an upstream SERVFAIL is cached.
    pub servfail_ttl: Dur,
    /// How long past expiry an answer may be served when upstreams fail; 0s disables.
    pub serve_stale: Dur,
    /// TTL given to a stale answer.
    pub stale_answer_ttl: Dur,
    /// How long a client waits for the refresh of an expired entry before it is given the
    /// stale answer (RFC 8767 client response timer); 0s = only when the refresh fails.
    pub stale_answer_client_timeout: Dur,
    /// Refresh popular entries before they expire.
    pub prefetch: bool,
    /// Hits an entry needs before it is prefetched.
    pub prefetch_min_hits: u32,
    /// Prefetch when less than this percentage of the TTL remains (1-99).
    #[serde(deserialize_with = "percent")]
    pub prefetch_percent: u8,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            capacity: 20_000,
            max_bytes: 64 * 1024 * 1024,
            max_answer_bytes: 16 * 1024,
            max_ttl: Dur(Duration::from_secs(3600)),
            min_ttl: Dur(Duration::ZERO),
            negative_max_ttl: Dur(Duration::from_secs(5)),
            servfail_ttl: Dur(Duration::from_secs(1)),
            serve_stale: Dur(Duration::from_secs(3600)),
            stale_answer_ttl: Dur(Duration::from_secs(30)),
            stale_answer_client_timeout: Dur(Duration::from_millis(1800)),
            prefetch: true,
            prefetch_min_hits: 2,
            prefetch_percent: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawNetwork {
    /// The dummy interface that holds the listen addresses.
    pub interface: IfName,
    /// Create the interface and add the addresses at start, remove them at stop.
    pub setup_interface: bool,
    /// Install the firewall rules (NOTRACK, ACCEPT) at start, remove them at stop.
    pub setup_rules: bool,
    /// Where the rules go: `auto`, `nftables`, `iptables-nft` or `iptables-legacy`.
    pub firewall: Option<Firewall>,
    /// Deprecated alias of `firewall` (`auto`, `nft`, `legacy`); `firewall` wins when both
    /// are set. Warned about in [`super::document`].
    pub iptables_backend: Option<IptablesBackend>,
    /// How often the running daemon checks its rules and puts back what is missing.
    #[serde(deserialize_with = "positive")]
    pub rules_check_interval: Dur,
    /// Longest wait for the xtables lock per iptables call (then retried, then an error).
    #[serde(deserialize_with = "positive")]
    pub xtables_wait: Dur,
    /// Relay DNS to the link-local listen addresses to the cluster while localdns is not
    /// serving (`localdns fallback`, localdns-fallback.service).
    pub fallback: bool,
    /// The relay's own address (IPv4 link-local), on its own link.
    pub fallback_address: std::net::Ipv4Addr,
}

impl RawNetwork {
    /// `firewall`, else the deprecated `iptables_backend`, else `auto`.
    pub fn firewall(&self) -> Firewall {
        self.firewall
            .or(self.iptables_backend.map(Firewall::from))
            .unwrap_or(Firewall::Auto)
    }
}

impl Default for RawNetwork {
    fn default() -> Self {
        Self {
            interface: IfName("nodelocaldns".into()),
            setup_interface: true,
            setup_rules: true,
            firewall: None,
            iptables_backend: None,
            rules_check_interval: Dur(Duration::from_secs(5)),
            xtables_wait: Dur(Duration::from_secs(5)),
            fallback: true,
            fallback_address: std::net::Ipv4Addr::new(169, 254, 20, 11),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    /// Where the HTTP endpoint listens: one entry or a list of them (`IP:port`,
    /// `INTERFACE:port`, `default-route:port`); `""` or `[]` disables it.
    pub address: MetricsAddress,
    /// A connection that has not sent a whole request head within this is closed.
    #[serde(deserialize_with = "positive")]
    pub header_timeout: Dur,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            address: MetricsAddress(vec![HttpAddress::Socket(SocketAddr::from((
                [127, 0, 0, 1],
                9253,
            )))]),
            header_timeout: Dur(Duration::from_secs(2)),
        }
    }
}

// ---- value newtypes: a string in TOML, parsed by `value` ----

/// Implements `Deserialize` for a newtype over a string parser from [`value`].
macro_rules! from_str {
    ($($name:ident($ty:ty) = $parse:expr;)*) => {$(
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                $parse(&text).map($name).map_err(D::Error::custom)
            }
        }
    )*};
}

/// An IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip(pub IpAddr);
/// A normalised zone name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone(pub String);
/// An upstream server; port 53 when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server(pub SocketAddr);
/// A humantime duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);
/// A valid Linux interface name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfName(pub String);
/// The metrics addresses: a string or a list of strings; empty when disabled with `""`
/// or `[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsAddress(pub Vec<HttpAddress>);

impl<'de> Deserialize<'de> for MetricsAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MetricsAddress;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address string or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<MetricsAddress, E> {
                if text.is_empty() {
                    return Ok(MetricsAddress(Vec::new()));
                }
                value::http_address(text)
                    .map(|a| MetricsAddress(vec![a]))
                    .map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MetricsAddress, A::Error> {
                let mut out: Vec<HttpAddress> = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    let a = value::http_address(&text).map_err(A::Error::custom)?;
                    if out.contains(&a) {
                        return Err(A::Error::custom(format!(
                            "metrics address {text:?} is listed twice"
                        )));
                    }
                    out.push(a);
                }
                Ok(MetricsAddress(out))
            }
        }
        d.deserialize_any(V)
    }
}

from_str! {
    Ip(IpAddr) = value::ip;
    Zone(String) = value::zone;
    Server(SocketAddr) = value::server;
    Dur(Duration) = value::duration;
    IfName(String) = value::interface;
}

/// `upstream.resolv_conf`: `"auto"` or an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvConfSetting {
    /// systemd-resolved's full list if present, else /etc/resolv.conf.
    Auto,
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for ResolvConfSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "auto" {
            Ok(Self::Auto)
        } else if text.starts_with('/') {
            Ok(Self::Path(text.into()))
        } else {
            Err(D::Error::custom(format!(
                "invalid resolv_conf {text:?}: expected \"auto\" or an absolute path"
            )))
        }
    }
}

// ---- field checks that can be made on one value ----

/// Defines `fn name(d) -> Result<T, _>` that deserializes a `T` and checks it lies in a range.
macro_rules! ranged {
    ($($name:ident: $ty:ty, $range:expr, $what:literal;)*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            let v = <$ty>::deserialize(d)?;
            if ($range).contains(&v) {
                Ok(v)
            } else {
                Err(D::Error::custom(format!("{v} is out of range: {}", $what)))
            }
        }
    )*};
}

ranged! {
    port: u16, 1..=u16::MAX, "must be 1-65535";
    recv_buffer: usize, 65_536.., "must be at least 65536 bytes";
    at_least_one_usize: usize, 1.., "must be at least 1";
    at_least_one_u32: u32, 1.., "must be at least 1";
    attempts: usize, 1..=10, "must be 1-10";
    socket_queries: u32, 1..=65_535, "must be 1-65535";
    percent: u8, 1..=99, "must be 1-99";
    cache_bytes: usize, 1_048_576.., "must be at least 1048576 bytes (1 MiB)";
    answer_bytes: usize, 512..=65_535, "must be 512-65535 bytes";
    tcp_connections: usize, 1..=16, "must be 1-16";
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let v = Dur::deserialize(d)?;
    if v.0.is_zero() {
        return Err(D::Error::custom("must be longer than 0s"));
    }
    Ok(v)
}

fn listen_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Ip>, D::Error> {
    let addresses = Vec::<Ip>::deserialize(d)?;
    if addresses.is_empty() {
        return Err(D::Error::custom(
            "must not be empty: localdns needs an address to listen on",
        ));
    }
    for (i, a) in addresses.iter().enumerate() {
        if addresses[..i].contains(a) {
            return Err(D::Error::custom(format!("duplicate address {}", a.0)));
        }
    }
    Ok(addresses)
}

fn non_empty_servers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Server>, D::Error> {
    let servers = Vec::<Server>::deserialize(d)?;
    if servers.is_empty() {
        return Err(D::Error::custom(
            "must not be empty: a stub zone needs at least one server",
        ));
    }
    Ok(servers)
}

fn unique_stubs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RawStub>, D::Error> {
    let stubs = Vec::<RawStub>::deserialize(d)?;
    for (i, s) in stubs.iter().enumerate() {
        if stubs[..i].iter().any(|earlier| earlier.zone == s.zone) {
            return Err(D::Error::custom(format!(
                "zone {:?} has two [[stub]] entries in one file (a later file may replace it)",
                s.zone.0
            )));
        }
    }
    Ok(stubs)
}
