//! The exposition: a snapshot of every counter, rendered with `prometheus-client` in the
//! OpenMetrics text format that Prometheus scrapes (or its text 0.0.4 form, see
//! [`super::format`]). Beside localdns's own `localdns_*`
//! families it writes the CoreDNS names and label sets that node-local-dns dashboards and
//! alerts query (checked against CoreDNS's `plugin/metrics/vars`, `plugin/cache`,
//! `plugin/forward` as of 1.10/1.11, `plugin/reload`, and node-cache's
//! `coredns_nodecache_setup_errors_total`). localdns is one server block for every zone, so
//! `zone` (and the cache's `zones`) is always `.`. The `view` label of CoreDNS 1.11 is
//! empty there, which Prometheus treats as absent, so it is left out.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::format::{self, Format};
use super::stats::{self, HistogramValue, RCODES, SIZE_BUCKETS, SOURCES, TIME_BUCKETS_NS};
use super::{Listener, Metrics, StatsValue, SETUP_ERRORS};

/// One upstream server as a scrape sees it.
#[derive(Debug, Clone)]
pub struct UpstreamValue {
    /// "default", "cluster", "stub:<zone>".
    pub pool: String,
    /// `IP:PORT`, CoreDNS `forward`'s `to`.
    pub server: String,
    pub up: bool,
    pub requests: u64,
    pub failures: u64,
    /// Answer durations by rcode index ([`stats::RCODES`]).
    pub durations: Vec<HistogramValue>,
}

/// Everything a scrape renders, read at the moment of the scrape.
#[derive(Debug)]
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub listeners: Vec<(Listener, StatsValue)>,
    /// Cache entries (success, denial).
    pub cache_entries: [u64; 2],
    pub cache_evictions: [u64; 2],
    /// Bytes the cache's entries take ([`crate::cache::Cache::bytes`]).
    pub cache_bytes: u64,
    /// Answers the cache refused as bigger than `max_answer_bytes` (served uncached).
    pub cache_refused: u64,
    pub in_flight: u64,
    pub upstreams: Vec<UpstreamValue>,
    pub ready: bool,
    pub healthy: bool,
    /// HTTP connections held now: general pool, reserve.
    pub http_held: [u64; 2],
    pub version: String,
    pub revision: String,
}

type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|&(k, v)| (k, v.to_string())).collect()
}

/// Writes families: each name once, with all its series.
struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    /// A counter family (`name` without `_total`; the encoder appends it).
    fn counter(&mut self, name: &str, help: &str, rows: &[(Labels, u64)]) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, v) in rows {
            if l.is_empty() {
                m.encode_counter::<NoLabelSet, u64, u64>(v, None)?;
            } else {
                m.encode_family(l)?
                    .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
            }
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, rows: &[(Labels, f64)]) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (l, v) in rows {
            if l.is_empty() {
                m.encode_gauge(v)?;
            } else {
                m.encode_family(l)?.encode_gauge(v)?;
            }
        }
        Ok(())
    }

    /// A histogram family; `scale` turns the integer bounds and sums into the unit shown
    /// (1e-9 for nanoseconds to seconds).
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[u64],
        scale: f64,
        rows: &[(Labels, &HistogramValue)],
    ) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (l, h) in rows {
            let mut buckets = Vec::with_capacity(bounds.len() + 1);
            let mut below = 0;
            for (b, c) in bounds.iter().zip(&h.cumulative) {
                buckets.push((*b as f64 * scale, c - below));
                below = *c;
            }
            buckets.push((f64::MAX, h.count - below));
            m.encode_family(l)?.encode_histogram::<NoLabelSet>(
                h.sum as f64 * scale,
                h.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut o = Out(&mut encoder);
        self.coredns_dns(&mut o)?;
        self.coredns_cache(&mut o)?;
        self.coredns_forward(&mut o)?;
        self.coredns_other(&mut o)?;
        self.localdns(&mut o)
    }
}

const ZONE: &str = ".";

impl Scrape {
    /// Listeners' statistics summed per `server` (over transports and families).
    fn per_server(&self) -> Vec<(String, StatsValue)> {
        let mut out: Vec<(String, StatsValue)> = Vec::new();
        for (l, v) in &self.listeners {
            match out.iter_mut().find(|(s, _)| *s == l.server) {
                Some((_, sum)) => sum.merge(v),
                None => out.push((l.server.clone(), v.clone())),
            }
        }
        out
    }

    fn coredns_dns(&self, o: &mut Out) -> std::fmt::Result {
        let mut requests = Vec::new();
        let (mut req_size, mut resp_size) = (Vec::new(), Vec::new());
        for (l, v) in &self.listeners {
            for (i, &n) in v.requests.iter().enumerate() {
                if n > 0 {
                    let t = stats::type_name(i);
                    requests.push((
                        labels(&[
                            ("server", &l.server),
                            ("zone", ZONE),
                            ("proto", l.proto),
                            ("family", l.family),
                            ("type", t),
                        ]),
                        n,
                    ));
                }
            }
            let key = labels(&[("server", &l.server), ("zone", ZONE), ("proto", l.proto)]);
            req_size.push((key.clone(), &v.request_size));
            resp_size.push((key, &v.response_size));
        }
        o.counter(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            &requests,
        )?;
        let servers = self.per_server();
        let mut responses = Vec::new();
        let mut durations = Vec::new();
        let mut dos = Vec::new();
        for (server, v) in &servers {
            for (s, row) in v.responses.iter().enumerate() {
                for (r, &n) in row.iter().enumerate() {
                    if n > 0 {
                        responses.push((
                            labels(&[
                                ("server", server),
                                ("zone", ZONE),
                                ("rcode", RCODES[r]),
                                ("plugin", SOURCES[s]),
                            ]),
                            n,
                        ));
                    }
                }
            }
            durations.push((labels(&[("server", server), ("zone", ZONE)]), &v.duration));
            dos.push((labels(&[("server", server), ("zone", ZONE)]), v.do_requests));
        }
        o.counter(
            "coredns_dns_do_requests",
            "Counter of DNS requests with DO bit set per zone.",
            &dos,
        )?;
        o.counter(
            "coredns_dns_responses",
            "Counter of response status codes.",
            &responses,
        )?;
        o.histogram(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone.",
            &TIME_BUCKETS_NS,
            1e-9,
            &durations,
        )?;
        o.histogram(
            "coredns_dns_request_size_bytes",
            "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.",
            &SIZE_BUCKETS,
            1.0,
            &req_size,
        )?;
        o.histogram(
            "coredns_dns_response_size_bytes",
            "Size of the returned response in bytes.",
            &SIZE_BUCKETS,
            1.0,
            &resp_size,
        )
    }

    fn coredns_cache(&self, o: &mut Out) -> std::fmt::Result {
        let servers = self.per_server();
        let first = servers.first().map_or("", |(s, _)| s.as_str());
        let kinds = ["success", "denial"];
        let by_kind = |v: [u64; 2]| -> Vec<(Labels, f64)> {
            (0..2)
                .map(|i| {
                    (
                        labels(&[("server", first), ("type", kinds[i]), ("zones", ZONE)]),
                        v[i] as f64,
                    )
                })
                .collect()
        };
        o.gauge(
            "coredns_cache_entries",
            "The number of elements in the cache.",
            &by_kind(self.cache_entries),
        )?;
        let evictions: Vec<(Labels, u64)> = (0..2)
            .map(|i| {
                (
                    labels(&[("server", first), ("type", kinds[i]), ("zones", ZONE)]),
                    self.cache_evictions[i],
                )
            })
            .collect();
        o.counter(
            "coredns_cache_evictions",
            "The count of cache evictions.",
            &evictions,
        )?;
        let mut hits = Vec::new();
        let (mut misses, mut requests) = (Vec::new(), Vec::new());
        for (server, v) in &servers {
            for (kind, n) in kinds.iter().zip(v.hits) {
                hits.push((
                    labels(&[("server", server), ("type", kind), ("zones", ZONE)]),
                    n,
                ));
            }
            let l = labels(&[("server", server), ("zones", ZONE)]);
            misses.push((l.clone(), v.misses));
            requests.push((l, v.total_hits() + v.misses));
        }
        o.counter("coredns_cache_hits", "The count of cache hits.", &hits)?;
        o.counter(
            "coredns_cache_misses",
            "The count of cache misses.",
            &misses,
        )?;
        o.counter(
            "coredns_cache_requests",
            "The count of cache requests.",
            &requests,
        )?;
        let m = &self.metrics;
        let one = |v: u64| vec![(labels(&[("server", first), ("zones", ZONE)]), v)];
        o.counter(
            "coredns_cache_prefetch",
            "The number of times the cache has prefetched a cached item.",
            &one(m.prefetches.load(Relaxed)),
        )?;
        o.counter(
            "coredns_cache_served_stale",
            "The number of requests served from stale cache entries.",
            &one(m.stale_answers.load(Relaxed)),
        )
    }

    fn coredns_forward(&self, o: &mut Out) -> std::fmt::Result {
        let mut requests = Vec::new();
        let mut responses = Vec::new();
        let mut durations = Vec::new();
        // A server in two pools (cluster and default) is one `to`: one series each.
        let mut by_to: Vec<UpstreamValue> = Vec::new();
        for u in &self.upstreams {
            match by_to.iter_mut().find(|t| t.server == u.server) {
                Some(t) => {
                    t.requests += u.requests;
                    for (a, b) in t.durations.iter_mut().zip(&u.durations) {
                        a.merge(b);
                    }
                }
                None => by_to.push(u.clone()),
            }
        }
        for u in &by_to {
            requests.push((labels(&[("to", &u.server)]), u.requests));
            for (r, h) in u.durations.iter().enumerate() {
                if h.count > 0 {
                    responses.push((labels(&[("rcode", RCODES[r]), ("to", &u.server)]), h.count));
                    durations.push((labels(&[("to", &u.server), ("rcode", RCODES[r])]), h));
                }
            }
        }
        o.counter(
            "coredns_forward_requests",
            "Counter of requests made per upstream.",
            &requests,
        )?;
        o.counter(
            "coredns_forward_responses",
            "Counter of responses received per upstream.",
            &responses,
        )?;
        o.histogram(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took.",
            &TIME_BUCKETS_NS,
            1e-9,
            &durations,
        )?;
        let m = &self.metrics;
        o.counter(
            "coredns_forward_healthcheck_broken",
            "Counter of the number of complete failures of the healthchecks.",
            &[(vec![], m.healthcheck_broken.load(Relaxed))],
        )?;
        o.counter(
            "coredns_forward_max_concurrent_rejects",
            "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            &[(vec![], m.overload.load(Relaxed))],
        )
    }

    fn coredns_other(&self, o: &mut Out) -> std::fmt::Result {
        let m = &self.metrics;
        o.counter(
            "coredns_reload_failed",
            "Counter of the number of failed reload attempts.",
            &[(vec![], m.config.reload_failed.load(Relaxed))],
        )?;
        let errors: Vec<(Labels, u64)> = SETUP_ERRORS
            .iter()
            .zip(&m.setup_errors)
            .map(|(t, c)| (labels(&[("errortype", t)]), c.load(Relaxed)))
            .collect();
        o.counter(
            "coredns_nodecache_setup_errors",
            "The number of errors during periodic network setup for node-cache.",
            &errors,
        )?;
        o.gauge(
            "coredns_build_info",
            "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
            &[(
                labels(&[("version", &self.version), ("revision", &self.revision), ("goversion", "none (localdns, Rust)")]),
                1.0,
            )],
        )
    }

    fn localdns(&self, o: &mut Out) -> std::fmt::Result {
        let m = &self.metrics;
        let mut queries = [0u64; 2];
        let mut hits = 0;
        let mut answers = [0u64; RCODES.len()];
        for (l, v) in &self.listeners {
            queries[usize::from(l.proto == "tcp")] += v.total_requests();
            hits += v.total_hits();
            for row in &v.responses {
                for (a, n) in answers.iter_mut().zip(row) {
                    *a += n;
                }
            }
        }
        o.counter(
            "localdns_queries",
            "Queries received.",
            &[
                (labels(&[("transport", "udp")]), queries[0]),
                (labels(&[("transport", "tcp")]), queries[1]),
            ],
        )?;
        let rcodes: Vec<(Labels, u64)> = answers
            .iter()
            .enumerate()
            .filter(|(i, &n)| n > 0 || *i == 0 || *i == 2 || *i == 3)
            .map(|(i, &n)| (labels(&[("rcode", RCODES[i])]), n))
            .collect();
        o.counter("localdns_answers", "Answers sent, by rcode.", &rcodes)?;
        let l = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
        let plain: &[(&str, &str, u64)] = &[
            ("localdns_cache_hits", "Queries answered from a fresh cache entry.", hits),
            ("localdns_cache_misses", "Queries that needed an upstream answer.", l(&m.misses)),
            ("localdns_coalesced", "Misses that joined an identical upstream query in flight.", l(&m.coalesced)),
            ("localdns_coalesce_overflow", "Misses beyond the bound on clients waiting for one name (answered stale or SERVFAIL).", l(&m.coalesce_overflow)),
            ("localdns_stale_answers", "Answers served from expired entries because upstreams failed (RFC 8767).", l(&m.stale_answers)),
            ("localdns_prefetches", "Entries refreshed before they expired.", l(&m.prefetches)),
            ("localdns_upstream_queries", "Queries sent to upstream servers.", l(&m.upstream_queries)),
            ("localdns_upstream_failures", "Upstream attempts that failed (timeout, error, bad answer).", l(&m.upstream_failures)),
            ("localdns_upstream_tcp_retries", "Truncated upstream UDP answers retried over TCP.", l(&m.upstream_tcp_retries)),
            ("localdns_upstream_udp_sockets", "UDP sockets (each on a new random source port) opened for upstream queries.", l(&m.upstream_udp_sockets)),
            ("localdns_servfail", "SERVFAIL answers localdns made itself (no upstream answer, no stale entry).", l(&m.servfail_sent)),
            ("localdns_overload", "Misses over their pool's max_in_flight upstream queries (answered stale when cached, else SERVFAIL).", l(&m.overload)),
            ("localdns_client_budget_rejects", "Misses of a client over max_in_flight_per_client (answered stale when cached, else SERVFAIL).", l(&m.client_budget)),
            ("localdns_truncated", "UDP answers sent with TC=1 because they did not fit.", l(&m.truncated)),
            ("localdns_tcp_connections", "Client TCP connections accepted.", l(&m.tcp_connections)),
            ("localdns_tcp_output_overflow", "Client TCP connections closed because their queued answers went over the byte bound (a client that does not read).", l(&m.tcp_output_overflow)),
            ("localdns_cache_refused", "Answers bigger than cache.max_answer_bytes: served to the client that asked, not stored.", self.cache_refused),
            ("localdns_send_errors", "Answers that could not be sent.", l(&m.send_errors)),
            ("localdns_http_bind_failures", "Failed binds of this endpoint's address since the start (another program held it; DNS was served meanwhile).", l(&m.http_bind_failures)),
            ("localdns_http_header_timeouts", "HTTP connections closed because no whole request head came within metrics.header_timeout.", l(&m.http_header_timeouts)),
        ];
        for &(name, help, v) in plain {
            o.counter(name, help, &[(vec![], v)])?;
        }
        o.counter(
            "localdns_stale_timer_answers",
            "Stale answers given by RFC 8767's timers: the client response timer, or at once after a failed refresh.",
            &[
                (labels(&[("timer", "client")]), l(&m.stale_client_timer)),
                (labels(&[("timer", "recheck")]), l(&m.stale_recheck)),
            ],
        )?;
        o.counter(
            "localdns_tcp_refused",
            "Client TCP connections closed at once, by the cap reached: tcp_max_connections or tcp_max_connections_per_client.",
            &[
                (labels(&[("reason", "max_connections")]), l(&m.tcp_refused)),
                (labels(&[("reason", "per_client")]), l(&m.tcp_refused_per_client)),
            ],
        )?;
        o.counter(
            "localdns_http_refused",
            "HTTP connections closed at accept: every slot they may use was held (full), or their client address held its 8 (per_client).",
            &[
                (labels(&[("reason", "full")]), l(&m.http_refused_full)),
                (labels(&[("reason", "per_client")]), l(&m.http_refused_per_client)),
            ],
        )?;
        o.gauge(
            "localdns_http_connections",
            "HTTP connections held now, by pool: general (any client), reserve (the node itself, once general is full).",
            &[
                (labels(&[("pool", "general")]), self.http_held[0] as f64),
                (labels(&[("pool", "reserve")]), self.http_held[1] as f64),
            ],
        )?;
        o.counter(
            "localdns_bad_queries",
            "Queries not answered normally, by kind.",
            &[
                (labels(&[("kind", "formerr")]), l(&m.formerr)),
                (labels(&[("kind", "notimp")]), l(&m.notimp)),
                (labels(&[("kind", "dropped")]), l(&m.dropped)),
            ],
        )?;
        o.counter(
            "localdns_node_repairs",
            "Node setup found changed and put back: the interface, an address, the firewall rules, the order (localdns's jump moved back ahead of a foreign rule).",
            &[
                (labels(&[("what", "interface")]), l(&m.repairs_link)),
                (labels(&[("what", "address")]), l(&m.repairs_addresses)),
                (labels(&[("what", "rules")]), l(&m.repairs_rules)),
                (labels(&[("what", "order")]), l(&m.repairs_order)),
            ],
        )?;
        o.counter(
            "localdns_rules_checks",
            "Drift checks of the firewall rules, by trigger: a burst of nftables change notifications (event), the rules check interval (interval).",
            &[
                (labels(&[("trigger", "event")]), l(&m.rules_checks_event)),
                (labels(&[("trigger", "interval")]), l(&m.rules_checks_interval)),
            ],
        )?;
        let mut up = Vec::new();
        let mut errors = Vec::new();
        let mut latency = Vec::new();
        let mut summed = Vec::new();
        for u in &self.upstreams {
            let key = labels(&[("pool", &u.pool), ("server", &u.server)]);
            up.push((key.clone(), f64::from(u8::from(u.up))));
            errors.push((key.clone(), u.failures));
            let mut all = HistogramValue::empty(TIME_BUCKETS_NS.len());
            for h in &u.durations {
                all.merge(h);
            }
            summed.push((key, all));
        }
        for (k, h) in &summed {
            latency.push((k.clone(), h));
        }
        o.gauge(
            "localdns_upstream_up",
            "1 while the upstream server is considered up (not marked down).",
            &up,
        )?;
        o.counter(
            "localdns_upstream_errors",
            "Attempts to an upstream server that got no usable answer (timeout, error, bad answer).",
            &errors,
        )?;
        o.histogram(
            "localdns_upstream_request_duration_seconds",
            "Time an upstream server took to answer, per server.",
            &TIME_BUCKETS_NS,
            1e-9,
            &latency,
        )?;
        let c = &m.config;
        let gauges: [(&str, &str, f64); 13] = [
            ("localdns_cache_snapshot_entries", "Answers in the last cache snapshot (kept in systemd's fd store for the next process).", l(&m.snapshot_entries) as f64),
            ("localdns_cache_snapshot_timestamp_seconds", "When the last cache snapshot was written (0: none yet).", l(&m.snapshot_time) as f64),
            ("localdns_cache_restored_entries", "Answers taken over from the previous process's snapshot at the start.", l(&m.snapshot_restored) as f64),
            ("localdns_cache_entries", "Entries in the cache, fresh and stale.", (self.cache_entries[0] + self.cache_entries[1]) as f64),
            ("localdns_cache_bytes", "Bytes the cache's entries take (keys, answers, bookkeeping), against cache.max_bytes.", self.cache_bytes as f64),
            ("localdns_upstream_in_flight", "Keys being resolved upstream now.", self.in_flight as f64),
            ("localdns_config_generation", "The config in use: 1 at start, one more per reload that changed it.", l(&c.generation) as f64),
            ("localdns_config_last_reload_successful", "1 when the last reload attempt (SIGHUP or a file change) was accepted.", f64::from(u8::from(c.last_reload_ok.load(Relaxed) || l(&c.last_reload_time) == 0))),
            ("localdns_config_last_reload_timestamp_seconds", "When the last reload attempt happened (0: none since the start).", l(&c.last_reload_time) as f64),
            ("localdns_config_last_good", "1 while serving on the last good config because the one on disk was refused at start.", f64::from(u8::from(c.last_good.load(Relaxed)))),
            ("localdns_config_restart_required", "1 when the config files change [listen], [network] or [metrics] settings that apply only at the next start (see /status).", f64::from(u8::from(c.restart_required.load(Relaxed)))),
            ("localdns_ready", "1 when /ready answers 200: listeners, link, rules and a cluster upstream in place.", f64::from(u8::from(self.ready))),
            ("localdns_healthy", "1 when /health answers 200: every serving loop goes round.", f64::from(u8::from(self.healthy))),
        ];
        for (name, help, v) in gauges {
            o.gauge(name, help, &[(vec![], v)])?;
        }
        o.gauge(
            "localdns_start_time_seconds",
            "When the daemon started, in seconds since the epoch.",
            &[(vec![], m.started as f64)],
        )
    }
}

/// The text of a scrape, in `format`.
pub fn render(scrape: Scrape, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(32 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    match format {
        Format::OpenMetrics => out,
        Format::Text => format::to_text(&out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(format: Format) -> String {
        let m = Arc::new(Metrics::default());
        let l = Listener::new("169.254.20.10:53".parse().unwrap(), "udp");
        let b = m.owned_block(l);
        b.request(1, 40, false);
        b.hit(false);
        let mut nx = vec![0u8; 40];
        nx[3] = 3;
        b.response(&nx, 0, stats::Origin::Cache);
        b.durations(1_000_000, 1);
        let up = crate::metrics::UpstreamStats::default();
        up.answered(0, 2_000_000);
        render(
            Scrape {
                metrics: Arc::clone(&m),
                listeners: m.listeners(),
                cache_entries: [3, 1],
                cache_evictions: [0, 0],
                cache_bytes: 4096,
                cache_refused: 0,
                in_flight: 0,
                upstreams: vec![UpstreamValue {
                    pool: "cluster".into(),
                    server: "10.96.0.11:53".into(),
                    up: true,
                    requests: 1,
                    failures: 0,
                    durations: up.durations(),
                }],
                ready: true,
                healthy: true,
                http_held: [3, 1],
                version: "0.1.0".into(),
                revision: "abc".into(),
            },
            format,
        )
    }

    #[test]
    fn renders_coredns_and_localdns_families() {
        let text = sample(Format::OpenMetrics);
        for want in [
            "coredns_dns_requests_total{server=\"dns://169.254.20.10:53\",zone=\".\",proto=\"udp\",family=\"1\",type=\"A\"} 1\n",
            "coredns_dns_responses_total{server=\"dns://169.254.20.10:53\",zone=\".\",rcode=\"NXDOMAIN\",plugin=\"cache\"} 1\n",
            "coredns_dns_request_duration_seconds_bucket{le=\"0.001\",server=\"dns://169.254.20.10:53\",zone=\".\"} 1\n",
            "coredns_cache_entries{server=\"dns://169.254.20.10:53\",type=\"denial\",zones=\".\"} 1",
            "coredns_cache_hits_total{server=\"dns://169.254.20.10:53\",type=\"success\",zones=\".\"} 1\n",
            "coredns_forward_responses_total{rcode=\"NOERROR\",to=\"10.96.0.11:53\"} 1\n",
            "localdns_upstream_up{pool=\"cluster\",server=\"10.96.0.11:53\"} 1",
            "coredns_nodecache_setup_errors_total{errortype=\"iptables\"} 0\n",
            "localdns_answers_total{rcode=\"NXDOMAIN\"} 1\n",
            "localdns_cache_bytes 4096.0\n",
            "localdns_tcp_refused_total{reason=\"per_client\"} 0\n",
            "localdns_http_refused_total{reason=\"full\"} 0\n",
            "localdns_http_connections{pool=\"reserve\"} 1.0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn the_text_form_names_counters_with_total_and_has_no_eof() {
        let text = sample(Format::Text);
        for want in [
            "# HELP coredns_dns_requests_total Counter of DNS requests made per zone, protocol and family.\n",
            "# TYPE coredns_dns_requests_total counter\n",
            "coredns_dns_requests_total{server=\"dns://169.254.20.10:53\",zone=\".\",proto=\"udp\",family=\"1\",type=\"A\"} 1\n",
            "# TYPE localdns_cache_bytes gauge\nlocaldns_cache_bytes 4096.0\n",
            "# TYPE coredns_dns_request_duration_seconds histogram\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        for never in [
            "# EOF",
            "_created",
            "# UNIT",
            "# TYPE coredns_dns_requests counter",
        ] {
            assert!(!text.contains(never), "{never:?} in\n{text}");
        }
        // Every sample of the OpenMetrics form is there, in the same order.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(samples(&text), samples(&sample(Format::OpenMetrics)));
    }
}
