//! Counters for everything localdns does, and their Prometheus text rendering.
//!
//! The two counters touched on every cache hit live in per-worker, cache-line aligned
//! blocks so that receive threads on different cores never share a cache line; the rest
//! are plain shared atomics touched only on the miss path or on errors.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// Per-worker hot counters.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct Hot {
    pub queries: AtomicU64,
    pub hits: AtomicU64,
    /// Milliseconds (on the server's clock) when the worker last went round its loop;
    /// the watchdog pings systemd only while every worker keeps this fresh.
    pub heartbeat: AtomicU64,
}

impl Hot {
    #[inline]
    pub fn add(c: &AtomicU64) {
        c.store(c.load(Relaxed) + 1, Relaxed);
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    udp_workers: Mutex<Vec<Arc<Hot>>>,
    /// TCP queries and hits, shared by all connections.
    pub tcp: Hot,
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
    pub truncated: AtomicU64,
    pub tcp_connections: AtomicU64,
    pub tcp_refused: AtomicU64,
    pub send_errors: AtomicU64,
    /// Node setup drift repaired by the running daemon (see `node::repair`).
    pub repairs_link: AtomicU64,
    pub repairs_addresses: AtomicU64,
    pub repairs_rules: AtomicU64,
}

/// Add one to a shared counter.
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Metrics {
    /// A counter block for a new UDP receive worker.
    pub fn udp_worker(&self) -> Arc<Hot> {
        let hot = Arc::new(Hot::default());
        self.udp_workers.lock().push(Arc::clone(&hot));
        hot
    }

    fn udp_sum(&self) -> (u64, u64) {
        let workers = self.udp_workers.lock();
        workers.iter().fold((0, 0), |(q, h), w| {
            (q + w.queries.load(Relaxed), h + w.hits.load(Relaxed))
        })
    }

    /// Prometheus text exposition; `gauges` are extra (name, help, value) lines.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let (udp_q, udp_hits) = self.udp_sum();
        let tcp_q = self.tcp.queries.load(Relaxed);
        let hits = udp_hits + self.tcp.hits.load(Relaxed);
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, help: &str, kind: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let l = |c: &AtomicU64| c.load(Relaxed);
        family(
            "localdns_queries_total",
            "Queries received.",
            "counter",
            &[
                ("{transport=\"udp\"}", udp_q),
                ("{transport=\"tcp\"}", tcp_q),
            ],
        );
        let counters: [(&str, &str, u64); 15] = [
            (
                "localdns_cache_hits_total",
                "Queries answered from a fresh cache entry.",
                hits,
            ),
            (
                "localdns_cache_misses_total",
                "Queries that needed an upstream answer.",
                l(&self.misses),
            ),
            (
                "localdns_coalesced_total",
                "Misses that joined an identical upstream query in flight.",
                l(&self.coalesced),
            ),
            (
                "localdns_coalesce_overflow_total",
                "Misses beyond the bound on clients waiting for one name (answered stale or SERVFAIL).",
                l(&self.coalesce_overflow),
            ),
            (
                "localdns_stale_answers_total",
                "Answers served from expired entries because upstreams failed (RFC 8767).",
                l(&self.stale_answers),
            ),
            (
                "localdns_prefetches_total",
                "Entries refreshed before they expired.",
                l(&self.prefetches),
            ),
            (
                "localdns_upstream_queries_total",
                "Queries sent to upstream servers.",
                l(&self.upstream_queries),
            ),
            (
                "localdns_upstream_failures_total",
                "Upstream attempts that failed (timeout, error, bad answer).",
                l(&self.upstream_failures),
            ),
            (
                "localdns_upstream_tcp_retries_total",
                "Truncated upstream UDP answers retried over TCP.",
                l(&self.upstream_tcp_retries),
            ),
            (
                "localdns_upstream_udp_sockets_total",
                "UDP sockets (each on a new random source port) opened for upstream queries.",
                l(&self.upstream_udp_sockets),
            ),
            (
                "localdns_servfail_total",
                "SERVFAIL answers localdns made itself (no upstream answer, no stale entry).",
                l(&self.servfail_sent),
            ),
            (
                "localdns_overload_total",
                "Misses over max_in_flight upstream queries (answered stale when cached, else SERVFAIL).",
                l(&self.overload),
            ),
            (
                "localdns_truncated_total",
                "UDP answers sent with TC=1 because they did not fit.",
                l(&self.truncated),
            ),
            (
                "localdns_tcp_connections_total",
                "Client TCP connections accepted.",
                l(&self.tcp_connections),
            ),
            (
                "localdns_tcp_refused_total",
                "Client TCP connections closed at once because the cap was reached.",
                l(&self.tcp_refused),
            ),
        ];
        for (name, help, v) in counters {
            family(name, help, "counter", &[("", v)]);
        }
        family(
            "localdns_bad_queries_total",
            "Queries not answered normally, by kind.",
            "counter",
            &[
                ("{kind=\"formerr\"}", l(&self.formerr)),
                ("{kind=\"notimp\"}", l(&self.notimp)),
                ("{kind=\"dropped\"}", l(&self.dropped)),
            ],
        );
        family(
            "localdns_send_errors_total",
            "Answers that could not be sent.",
            "counter",
            &[("", l(&self.send_errors))],
        );
        family(
            "localdns_node_repairs_total",
            "Node setup found changed and put back: the interface, an address, the firewall rules.",
            "counter",
            &[
                ("{what=\"interface\"}", l(&self.repairs_link)),
                ("{what=\"address\"}", l(&self.repairs_addresses)),
                ("{what=\"rules\"}", l(&self.repairs_rules)),
            ],
        );
        for (name, help, v) in gauges {
            family(name, help, "gauge", &[("", *v)]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_workers_and_renders() {
        let m = Metrics::default();
        let a = m.udp_worker();
        let b = m.udp_worker();
        Hot::add(&a.queries);
        Hot::add(&b.queries);
        Hot::add(&b.hits);
        inc(&m.formerr);
        let text = m.render(&[("localdns_cache_entries", "Entries.", 7)]);
        assert!(text.contains("localdns_queries_total{transport=\"udp\"} 2\n"));
        assert!(text.contains("localdns_cache_hits_total 1\n"));
        assert!(text.contains("localdns_bad_queries_total{kind=\"formerr\"} 1\n"));
        assert!(text.contains("# TYPE localdns_cache_entries gauge\nlocaldns_cache_entries 7\n"));
    }
}
