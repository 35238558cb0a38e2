//! The validated configuration: what the running daemon uses.
//!
//! Produced only by [`super::load`] (raw TOML → merged → validated), so every value here
//! has already been checked: addresses parsed, zones normalised, upstream lists non-empty
//! where they must be, durations positive.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Transport used towards an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// UDP with retry over TCP when the answer is truncated.
    Udp,
    /// Persistent, pipelined TCP connections (RFC 7766).
    Tcp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub cluster: Cluster,
    pub upstream: Upstream,
    pub stubs: Vec<Stub>,
    pub cache: Cache,
    pub network: Network,
    pub metrics: Metrics,
    pub log: Log,
    /// Files the config was read from, in merge order; empty for the embedded default.
    pub sources: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    /// Addresses served on UDP and TCP; never empty.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    /// UDP receive threads per address; 0 means one per CPU, at most
    /// [`crate::server::udp::AUTO_THREADS_MAX`].
    pub udp_threads: usize,
    /// Receive buffer asked for each UDP socket, bytes.
    pub udp_recv_buffer: usize,
    /// A TCP client connection idle this long is closed (RFC 7766).
    pub tcp_idle_timeout: Duration,
    /// At most this many client TCP connections at once; more are refused.
    pub tcp_max_connections: usize,
    /// At most this many of them from one source address; more are refused, so one pod
    /// cannot take every slot.
    pub tcp_max_connections_per_client: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Cluster domain, lower case, no trailing dot, e.g. "cluster.local".
    pub domain: String,
    /// Zones sent to the cluster upstream besides the domain: lower case, no trailing dot.
    pub reverse_zones: Vec<String>,
    /// kube-dns-upstream Service addresses (port 53 when not given). May be empty:
    /// then the cluster zones go to the default upstreams (a warning is logged).
    pub upstream: Vec<SocketAddr>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Default upstreams, after reading resolv.conf when `servers` was empty and after
    /// dropping 127.0.0.53 and localdns's own listen addresses. Empty only while that
    /// resolv.conf has no usable nameserver and a cluster upstream exists (early boot).
    pub servers: Vec<SocketAddr>,
    pub protocol: Protocol,
    /// Where `servers` came from, for humans: "config" or the resolv.conf path.
    pub servers_from: String,
    /// Time to wait for one attempt before trying the next server.
    pub timeout: Duration,
    /// Attempts per query across the list (servers are cycled when fewer).
    pub attempts: usize,
    /// Upstream queries in flight at most, per pool; over it a query gets a stale answer
    /// or SERVFAIL (counted).
    pub max_in_flight: usize,
    /// Misses one client address may have waiting at most (in flight or joined); over it
    /// its queries get a stale answer or SERVFAIL (counted), so one pod cannot take the
    /// pool's budget from the others.
    pub max_in_flight_per_client: usize,
    /// Consecutive failures that mark a server down.
    pub down_after_failures: u32,
    /// How long a down server is skipped before one query probes it again.
    pub down_time: Duration,
    /// Queries one upstream UDP socket (one random source port) carries at most.
    pub udp_socket_queries: u32,
    /// Age after which an upstream UDP socket is closed instead of reused.
    pub udp_socket_lifetime: Duration,
    /// Idle time after which a server is probed with a known-good question; zero = never.
    pub health_check_interval: Duration,
    /// Pipelined TCP connections per server (1-16).
    pub tcp_connections: usize,
    /// Age after which a TCP connection takes no new queries; zero = no limit.
    pub tcp_connection_max_age: Duration,
    /// Queries after which a TCP connection takes no new ones; 0 = no limit.
    pub tcp_connection_max_queries: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stub {
    /// Zone, lower case, no trailing dot.
    pub zone: String,
    pub servers: Vec<SocketAddr>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    /// Entries at most; the least recently used are evicted beyond it.
    pub capacity: usize,
    /// Bytes the entries take at most (see `cache::entry_cost`); evicted beyond it too.
    pub max_bytes: usize,
    /// Largest answer (wire bytes) stored; a bigger one is served, never stored.
    pub max_answer_bytes: usize,
    /// Cap on positive answers' TTL.
    pub max_ttl: Duration,
    /// Floor on positive answers' TTL.
    pub min_ttl: Duration,
    /// Cap on NXDOMAIN/NODATA TTL (from the SOA, RFC 2308).
    pub negative_max_ttl: Duration,
    /// How long a SERVFAIL from upstream is cached.
    pub servfail_ttl: Duration,
    /// How long past expiry an entry may be served when upstreams fail (RFC 8767); zero disables.
    pub serve_stale: Duration,
    /// TTL given to a stale answer.
    pub stale_answer_ttl: Duration,
    /// A client waiting this long for the refresh of an expired entry gets the stale
    /// answer (RFC 8767 client response timer); zero = only when the refresh fails.
    pub stale_answer_client_timeout: Duration,
    /// Refresh popular entries before they expire.
    pub prefetch: bool,
    /// Hits an entry needs before it is prefetched.
    pub prefetch_min_hits: u32,
    /// Prefetch when less than this percentage of the original TTL remains (1-99).
    pub prefetch_percent: u8,
}

/// Which firewall holds localdns's rules (`network.firewall`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firewall {
    /// nftables when kube-proxy runs in nftables mode (its `kube-proxy` tables exist), or
    /// when no iptables backend holds `KUBE-*` chains and `nft` works; otherwise the
    /// iptables backend kube-proxy uses.
    Auto,
    /// localdns's own `inet localdns` table, written by `nft` in one transaction.
    Nftables,
    /// `iptables-nft` / `ip6tables-nft`.
    IptablesNft,
    /// `iptables-legacy` / `ip6tables-legacy`.
    IptablesLegacy,
}

impl Firewall {
    /// The spelling in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Firewall::Auto => "auto",
            Firewall::Nftables => "nftables",
            Firewall::IptablesNft => "iptables-nft",
            Firewall::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// The deprecated `network.iptables_backend` (an alias of `network.firewall` since 0.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    /// The backend kube-proxy uses on this node: the one holding `KUBE-*` chains, else
    /// the one with more rules, else nft.
    Auto,
    /// `iptables-nft` / `ip6tables-nft`.
    Nft,
    /// `iptables-legacy` / `ip6tables-legacy`.
    Legacy,
}

impl From<IptablesBackend> for Firewall {
    fn from(b: IptablesBackend) -> Firewall {
        match b {
            IptablesBackend::Auto => Firewall::Auto,
            IptablesBackend::Nft => Firewall::IptablesNft,
            IptablesBackend::Legacy => Firewall::IptablesLegacy,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// The link holding the listen addresses (kind dummy, or ifb where the kernel has no dummy).
    pub interface: String,
    /// Create the link and hold the listen addresses on it.
    pub setup_interface: bool,
    /// Install the NOTRACK/ACCEPT rules.
    pub setup_rules: bool,
    /// Where the rules go.
    pub firewall: Firewall,
    /// Interval of the rules drift check in the running daemon.
    pub rules_check_interval: Duration,
    /// Bound on the wait for the xtables lock per iptables call.
    pub xtables_wait: Duration,
    /// Relay DNS to the link-local listen addresses while localdns is not serving
    /// ([`crate::fallback`]).
    pub fallback: bool,
    /// The relay's address: IPv4 link-local, not a listen address.
    pub fallback_address: std::net::Ipv4Addr,
}

/// Which answers the query log writes (`[log] queries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryLog {
    /// None.
    #[default]
    Off,
    /// Answers other than NOERROR and NXDOMAIN (SERVFAIL, REFUSED, FORMERR, NOTIMP...).
    Errors,
    /// Every answer (costs a shared counter per query: for debugging).
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// The query log.
    pub queries: QueryLog,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Where the HTTP endpoint (/metrics, /health, /ready, /status) listens; empty
    /// disables it.
    pub addresses: Vec<HttpAddress>,
    /// A connection that has not sent a whole request head within this is closed.
    pub header_timeout: Duration,
}

/// The name a `metrics.address` entry uses for the default route's interfaces.
pub const DEFAULT_ROUTE: &str = "default-route";

/// One entry of `metrics.address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAddress {
    Socket(SocketAddr),
    /// Every address of the interface (IPv6 link-local ones left out), read when binding.
    Interface {
        name: String,
        port: u16,
    },
    /// The addresses of the interfaces holding the IPv4 and IPv6 default routes.
    DefaultRoute {
        port: u16,
    },
}

impl HttpAddress {
    /// The address when it is one already (not an interface's, read at bind time).
    pub fn socket(&self) -> Option<SocketAddr> {
        match self {
            HttpAddress::Socket(a) => Some(*a),
            _ => None,
        }
    }
}

impl std::fmt::Display for HttpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAddress::Socket(a) => write!(f, "{a}"),
            HttpAddress::Interface { name, port } => write!(f, "{name}:{port}"),
            HttpAddress::DefaultRoute { port } => write!(f, "{DEFAULT_ROUTE}:{port}"),
        }
    }
}
