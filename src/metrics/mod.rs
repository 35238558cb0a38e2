//! Counters for everything localdns does, merged at scrape time and rendered in the
//! Prometheus/OpenMetrics text format (with CoreDNS's names beside localdns's own).
//!
//! The counters touched on every query live in per-writer, cache-line aligned blocks
//! ([`stats::Stats`]) so that receive threads on different cores never share a cache line
//! and never use a locked instruction; the rest are plain shared atomics touched only on
//! the miss path or on errors. [`expose`] turns a snapshot of all of it into text, in the
//! format [`format`] picks from the scraper's `Accept` header.

pub mod expose;
pub mod format;
pub mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::health::NodeHealth;
pub use stats::{Origin, Stats, StatsValue};

/// The labels of one listener's statistics: CoreDNS's `server` (`dns://IP:PORT`), `proto`
/// and `family` (1 IPv4, 2 IPv6).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub server: String,
    pub proto: &'static str,
    pub family: &'static str,
}

impl Listener {
    pub fn new(addr: SocketAddr, proto: &'static str) -> Listener {
        Listener {
            server: format!("dns://{addr}"),
            proto,
            family: if addr.is_ipv4() { "1" } else { "2" },
        }
    }
}

/// `coredns_nodecache_setup_errors_total{errortype}`: node-cache's error types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    Iptables = 0,
    IptablesLock = 1,
    InterfaceAdd = 2,
    InterfaceCheck = 3,
    Configmap = 4,
}
pub const SETUP_ERRORS: [&str; 5] = [
    "iptables",
    "iptables_lock",
    "interface_add",
    "interface_check",
    "configmap",
];

/// Per upstream server: CoreDNS `forward` numbers and localdns's own, shared by the
/// miss-path tasks that use the server.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub requests: AtomicU64,
    /// Attempts that got no usable answer (timeout, connection error, bad answer).
    pub failures: AtomicU64,
    /// Answer durations by rcode (the `to, rcode` histogram of CoreDNS `forward`).
    durations: [stats::Histogram<16>; stats::RCODES.len()],
    /// The last failure: when (seconds since the epoch) and why.
    pub last_error: Mutex<Option<(u64, String)>>,
}

impl UpstreamStats {
    /// An answer with `rcode` came back after `nanos`.
    pub fn answered(&self, rcode: u8, nanos: u64) {
        let i = usize::from(rcode).min(stats::RCODES.len() - 1);
        self.durations[i].observe_shared(&stats::TIME_BUCKETS_NS, nanos);
    }

    pub fn failed(&self, why: String) {
        inc(&self.failures);
        *self.last_error.lock() = Some((unix_now(), why));
    }

    /// Answer durations by rcode index.
    pub fn durations(&self) -> Vec<stats::HistogramValue> {
        self.durations.iter().map(|h| h.value()).collect()
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The config the daemon runs on: `localdns_config_*` and `coredns_reload_failed_total`.
#[derive(Debug, Default)]
pub struct ConfigState {
    /// 1 for the config loaded at start, +1 for each reload that changed something.
    pub generation: AtomicU64,
    pub reload_failed: AtomicU64,
    /// The last reload attempt: time (seconds since the epoch; 0 = none yet) and result.
    pub last_reload_time: AtomicU64,
    pub last_reload_ok: AtomicBool,
    /// Serving on the last good config because the one on disk was refused.
    pub last_good: AtomicBool,
    /// The files change start-only settings this process has not applied.
    pub restart_required: AtomicBool,
}

#[derive(Debug)]
pub struct Metrics {
    blocks: Mutex<Vec<(Listener, Arc<Stats>)>>,
    /// When the daemon started (seconds since the epoch).
    pub started: u64,
    pub config: ConfigState,
    pub node: NodeHealth,
    pub setup_errors: [AtomicU64; 5],
    /// A pool had every server marked down (`coredns_forward_healthcheck_broken_total`).
    pub healthcheck_broken: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub coalesce_overflow: AtomicU64,
    pub stale_answers: AtomicU64,
    pub prefetches: AtomicU64,
    pub upstream_queries: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub upstream_tcp_retries: AtomicU64,
    pub upstream_udp_sockets: AtomicU64,
    pub servfail_sent: AtomicU64,
    pub formerr: AtomicU64,
    pub notimp: AtomicU64,
    pub dropped: AtomicU64,
    pub overload: AtomicU64,
    /// Misses answered at once because their client was over its budget.
    pub client_budget: AtomicU64,
    /// Stale answers given by the client response timer / the failure recheck timer.
    pub stale_client_timer: AtomicU64,
    pub stale_recheck: AtomicU64,
    pub truncated: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_refused: AtomicU64,
    /// Client TCP connections closed at accept: `tcp_max_connections_per_client` reached.
    pub tcp_refused_per_client: AtomicU64,
    /// Client TCP connections closed because their queued answers went over the byte bound.
    pub tcp_output_overflow: AtomicU64,
    pub send_errors: AtomicU64,
    /// Node setup drift repaired by the running daemon (see `node::repair`).
    pub repairs_link: AtomicU64,
    pub repairs_addresses: AtomicU64,
    pub repairs_rules: AtomicU64,
    /// localdns's jumps moved back ahead of a foreign rule (see `node::order`).
    pub repairs_order: AtomicU64,
    /// Drift checks of the firewall rules, by what started them (see `node::repair`).
    pub rules_checks_event: AtomicU64,
    pub rules_checks_interval: AtomicU64,
    /// Failed binds of the HTTP endpoint's address (another program holds it).
    pub http_bind_failures: AtomicU64,
    /// HTTP connections closed at accept: every slot they may use held / their client
    /// address at its bound (see `server::http::slots`).
    pub http_refused_full: AtomicU64,
    pub http_refused_per_client: AtomicU64,
    /// HTTP connections closed because no whole request head came within
    /// `metrics.header_timeout`.
    pub http_header_timeouts: AtomicU64,
    /// Answers in the last cache snapshot written, and when (seconds since the epoch).
    pub snapshot_entries: AtomicU64,
    pub snapshot_time: AtomicU64,
    /// Answers taken over from the previous process's snapshot at the start.
    pub snapshot_restored: AtomicU64,
}

/// Add one to a shared counter.
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            blocks: Mutex::default(),
            started: unix_now(),
            config: ConfigState::default(),
            node: NodeHealth::default(),
            setup_errors: Default::default(),
            healthcheck_broken: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            coalesce_overflow: AtomicU64::new(0),
            stale_answers: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            upstream_queries: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            upstream_tcp_retries: AtomicU64::new(0),
            upstream_udp_sockets: AtomicU64::new(0),
            servfail_sent: AtomicU64::new(0),
            formerr: AtomicU64::new(0),
            notimp: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            overload: AtomicU64::new(0),
            client_budget: AtomicU64::new(0),
            stale_client_timer: AtomicU64::new(0),
            stale_recheck: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            tcp_connections: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            tcp_refused_per_client: AtomicU64::new(0),
            tcp_output_overflow: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            repairs_link: AtomicU64::new(0),
            repairs_addresses: AtomicU64::new(0),
            repairs_rules: AtomicU64::new(0),
            repairs_order: AtomicU64::new(0),
            rules_checks_event: AtomicU64::new(0),
            rules_checks_interval: AtomicU64::new(0),
            http_bind_failures: AtomicU64::new(0),
            http_refused_full: AtomicU64::new(0),
            http_refused_per_client: AtomicU64::new(0),
            http_header_timeouts: AtomicU64::new(0),
            snapshot_entries: AtomicU64::new(0),
            snapshot_time: AtomicU64::new(0),
            snapshot_restored: AtomicU64::new(0),
        };
        m.config.generation.store(1, Relaxed);
        m
    }
}

impl Metrics {
    /// A statistics block for one UDP receive loop (written by that thread only).
    pub fn owned_block(&self, listener: Listener) -> Arc<Stats> {
        let block = Arc::new(Stats::owned());
        self.blocks.lock().push((listener, Arc::clone(&block)));
        block
    }

    /// The shared block of `listener` (TCP connections, the miss path), made on first use.
    pub fn shared_block(&self, listener: Listener) -> Arc<Stats> {
        let mut blocks = self.blocks.lock();
        if let Some((_, b)) = blocks.iter().find(|(l, b)| *l == listener && b.is_shared()) {
            return Arc::clone(b);
        }
        let block = Arc::new(Stats::shared());
        blocks.push((listener, Arc::clone(&block)));
        block
    }

    /// Every listener's statistics, the blocks with the same labels summed.
    pub fn listeners(&self) -> Vec<(Listener, StatsValue)> {
        let mut out: Vec<(Listener, StatsValue)> = Vec::new();
        for (l, b) in self.blocks.lock().iter() {
            let v = b.value();
            match out.iter_mut().find(|(o, _)| o == l) {
                Some((_, sum)) => sum.merge(&v),
                None => out.push((l.clone(), v)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn setup_error(&self, e: SetupError) {
        inc(&self.setup_errors[e as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_with_the_same_labels_are_summed() {
        let m = Metrics::default();
        let l = Listener::new("127.0.0.1:53".parse().unwrap(), "udp");
        let (a, b) = (m.owned_block(l.clone()), m.owned_block(l.clone()));
        a.request(1, 40, false);
        b.request(28, 40, false);
        b.hit(false);
        let shared = m.shared_block(l.clone());
        assert!(Arc::ptr_eq(&shared, &m.shared_block(l.clone())));
        shared.miss();
        let tcp = m.shared_block(Listener::new("[::1]:53".parse().unwrap(), "tcp"));
        tcp.request(1, 40, false);
        let all = m.listeners();
        assert_eq!(all.len(), 2);
        let (udp, v) = &all[0];
        assert_eq!(
            (udp.proto, udp.family, udp.server.as_str()),
            ("udp", "1", "dns://127.0.0.1:53")
        );
        assert_eq!((v.total_requests(), v.total_hits(), v.misses), (2, 1, 1));
        assert_eq!(all[1].0.family, "2");
    }
}
