//! Forwarding misses: routing by zone, upstream pools with failover and health, UDP and
//! TCP exchanges, persistent pipelined TCP.
//!
//! A pool tries its servers in order (first healthy first, like resolv.conf), each attempt
//! bounded by the pool's timeout. When a server is down is decided in [`health`]: failures
//! of `down_after_failures` distinct questions with no answer in between (one slow name
//! never takes a server down). A down server is skipped for `down_time`; then the question
//! of one query is sent to it on the side (that client is still answered by a healthy
//! server, so no client waits on a server that may still be dead; the mark is renewed when
//! the probe is sent), and a success brings it back. When every server is down, one of
//! them (the one due first) is still tried, once: a pool never fails every query at once
//! just because of its marks.

pub mod exchange;
pub mod health;
pub mod pipeline;
pub mod ports;
pub mod route;

use std::hash::{BuildHasher, BuildHasherDefault};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{self, Protocol};
use crate::dns::{Answer, AnswerError, Key, TtlPolicy};
use crate::metrics::{inc, Metrics, UpstreamStats};
use exchange::ExchangeError;
pub use route::Router;

/// Why a pool gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream servers (resolv.conf lists none yet)")]
    NoServers,
    #[error("upstream {server}: {source}")]
    Failed {
        server: SocketAddr,
        source: ExchangeError,
    },
}

/// How queries reach one server: one of the two, by the pool's protocol.
#[derive(Debug)]
enum Transport {
    /// The reusable random-port sockets (TCP only to retry a truncated answer).
    Udp(ports::Ports),
    /// The persistent, pipelined connection.
    Tcp(pipeline::Pipeline),
}

/// Health of one server and how it is reached.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    /// Health on the pool's clock (touched on the miss path only).
    health: Mutex<health::Health>,
    transport: Transport,
    /// Requests, answers by rcode and time, failures (CoreDNS `forward` metrics).
    stats: Arc<UpstreamStats>,
    /// Whether it is asked without EDNS for now ([`exchange::EdnsMemory`]).
    edns: exchange::EdnsMemory,
}

/// A list of equivalent servers for a set of zones.
#[derive(Debug)]
pub struct Pool {
    /// "cluster", "default" or "stub:<zone>", for logs.
    pub name: String,
    servers: Vec<Server>,
    protocol: Protocol,
    timeout: Duration,
    attempts: usize,
    down_after: u32,
    down_time: Duration,
    policy: health::Policy,
    reuse: ports::Reuse,
    epoch: Instant,
}

impl Pool {
    pub fn new(
        name: String,
        servers: &[SocketAddr],
        protocol: Protocol,
        up: &config::Upstream,
    ) -> Pool {
        let reuse = ports::Reuse {
            max_queries: up.udp_socket_queries,
            lifetime: up.udp_socket_lifetime,
        };
        Pool {
            name,
            servers: servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    health: Mutex::new(health::Health::default()),
                    stats: Arc::default(),
                    edns: exchange::EdnsMemory::new(addr),
                    transport: match protocol {
                        Protocol::Udp => Transport::Udp(ports::Ports::new(addr, reuse)),
                        Protocol::Tcp => Transport::Tcp(pipeline::Pipeline::new(addr, up.timeout)),
                    },
                })
                .collect(),
            protocol,
            timeout: up.timeout,
            attempts: up.attempts.max(1),
            down_after: up.down_after_failures.max(1),
            down_time: up.down_time,
            policy: health::Policy::new(
                up.down_after_failures,
                up.down_time.as_millis() as u64,
                up.timeout.as_millis() as u64,
                up.attempts as u32,
            ),
            reuse,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Servers to try, in order, and at most one down server due for a probe (marked so
    /// that concurrent queries do not all probe it). When every server is down and none is
    /// due, the one due first is returned as the probe anyway.
    fn candidates(&self) -> (Vec<usize>, Option<usize>) {
        let now = self.now_ms();
        let mut up = Vec::with_capacity(self.servers.len());
        let mut probe = None;
        let mut first_due: Option<(u64, usize)> = None;
        for (i, s) in self.servers.iter().enumerate() {
            let mut h = s.health.lock();
            match h.state(now) {
                health::State::Up => up.push(i),
                health::State::ProbeDue if probe.is_none() => {
                    h.probe_taken(now, &self.policy);
                    probe = Some(i);
                }
                health::State::ProbeDue | health::State::Down => {
                    if first_due.map_or(true, |(until, _)| h.down_until() < until) {
                        first_due = Some((h.down_until(), i));
                    }
                }
            }
        }
        if up.is_empty() && probe.is_none() {
            probe = first_due.map(|(_, i)| i);
        }
        (up, probe)
    }

    fn succeeded(&self, s: &Server) {
        if s.health.lock().succeeded() {
            tracing::info!(upstream = %s.addr, pool = %self.name, "upstream {} ({} pool) answers again, marked up", s.addr, self.name);
        }
    }

    fn failed(&self, s: &Server, key: &Key, err: &ExchangeError) {
        let question = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(key.as_bytes());
        let marked = s
            .health
            .lock()
            .failed(question, self.now_ms(), &self.policy);
        if let Some(n) = marked {
            tracing::warn!(upstream = %s.addr, pool = %self.name, error = %err, questions = n,
                "upstream {} ({} pool) marked down: {n} distinct questions failed with no answer in between, the last with: {err}",
                s.addr, self.name);
        }
    }

    /// Resolve `key` through this pool with failover.
    pub async fn query(
        self: &Arc<Self>,
        key: &Key,
        policy: &TtlPolicy,
        metrics: &Arc<Metrics>,
    ) -> Result<Answer, UpstreamError> {
        let (up, probe) = self.candidates();
        if up.is_empty() && !self.servers.is_empty() {
            inc(&metrics.healthcheck_broken);
        }
        let (order, attempts): (Vec<&Server>, usize) = match (up.is_empty(), probe) {
            // Only a pool without servers has neither.
            (true, None) => return Err(UpstreamError::NoServers),
            // Nothing else to ask: the probe is this query's only attempt.
            (true, Some(p)) => (vec![&self.servers[p]], 1),
            // Probe on the side with the same question, so that no client waits on a
            // server that may still be dead; a success marks it up again.
            (false, probe) => {
                if let Some(p) = probe {
                    self.spawn_probe(p, *key, *policy, Arc::clone(metrics));
                }
                (
                    up.iter().map(|&i| &self.servers[i]).collect(),
                    self.attempts,
                )
            }
        };
        let mut last = None;
        for attempt in 0..attempts {
            let server = order[attempt % order.len()];
            match self.timed_attempt(server, key, policy, metrics).await {
                Ok(answer) => {
                    self.succeeded(server);
                    return Ok(answer);
                }
                Err(e) => {
                    tracing::debug!(upstream = %server.addr, pool = %self.name, error = %e, "upstream {} ({}) attempt failed: {e}", server.addr, self.name);
                    if e.counts_against_server() {
                        self.failed(server, key, &e);
                    }
                    last = Some((server.addr, e));
                }
            }
        }
        let (server, source) = last.expect("at least one attempt");
        Err(UpstreamError::Failed { server, source })
    }

    fn spawn_probe(
        self: &Arc<Self>,
        index: usize,
        key: Key,
        policy: TtlPolicy,
        metrics: Arc<Metrics>,
    ) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let server = &pool.servers[index];
            match pool.timed_attempt(server, &key, &policy, &metrics).await {
                Ok(_) => pool.succeeded(server),
                Err(e) => {
                    tracing::debug!(upstream = %server.addr, pool = %pool.name, error = %e, "probe of down upstream {} ({}) failed: {e}", server.addr, pool.name);
                    pool.failed(server, &key, &e);
                }
            }
        });
    }

    /// One attempt bounded by the timeout, counted (globally and per server) and timed.
    async fn timed_attempt(
        &self,
        server: &Server,
        key: &Key,
        policy: &TtlPolicy,
        metrics: &Metrics,
    ) -> Result<Answer, ExchangeError> {
        inc(&metrics.upstream_queries);
        inc(&server.stats.requests);
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.attempt(server, key, policy, metrics))
            .await
            .unwrap_or(Err(ExchangeError::Timeout));
        match &result {
            Ok(answer) => server
                .stats
                .answered(answer.rcode(), started.elapsed().as_nanos() as u64),
            Err(e) => {
                inc(&metrics.upstream_failures);
                server.stats.failed(e.to_string());
            }
        }
        result
    }

    async fn attempt(
        &self,
        s: &Server,
        key: &Key,
        policy: &TtlPolicy,
        metrics: &Metrics,
    ) -> Result<Answer, ExchangeError> {
        let ports = match &s.transport {
            Transport::Udp(ports) => ports,
            Transport::Tcp(pipeline) => {
                return exchange::pipelined(pipeline, key, policy, &s.edns).await
            }
        };
        let (lease, new) = ports.take()?;
        if new {
            inc(&metrics.upstream_udp_sockets);
        }
        // On a timeout this future is dropped with the socket: it is never reused.
        match exchange::udp(&lease.socket, key, policy, &s.edns).await {
            Ok(answer) => {
                ports.give_back(lease);
                Ok(answer)
            }
            Err(ExchangeError::Answer(AnswerError::Truncated)) => {
                inc(&metrics.upstream_tcp_retries);
                exchange::tcp(s.addr, key, policy, &s.edns).await
            }
            Err(e) => Err(e),
        }
    }

    /// Same servers, transport and timing: a reload may keep this pool as it is.
    fn same_settings(&self, other: &Pool) -> bool {
        self.name == other.name
            && self.same_servers(other)
            && self.reuse == other.reuse
            && (self.timeout, self.attempts, self.down_after, self.down_time)
                == (
                    other.timeout,
                    other.attempts,
                    other.down_after,
                    other.down_time,
                )
    }

    /// Same servers and transport: answers from one are as good as from the other.
    pub fn same_servers(&self, other: &Pool) -> bool {
        self.protocol == other.protocol
            && self
                .servers
                .iter()
                .map(|s| s.addr)
                .eq(other.servers.iter().map(|s| s.addr))
    }

    /// Close idle upstream sockets past their lifetime.
    fn sweep(&self) {
        for s in &self.servers {
            if let Transport::Udp(ports) = &s.transport {
                ports.sweep();
            }
        }
    }

    /// (server, up?, its statistics) for metrics and status reports.
    pub fn servers(&self) -> Vec<(SocketAddr, bool, Arc<UpstreamStats>)> {
        self.servers
            .iter()
            .map(|s| (s.addr, s.health.lock().is_up(), Arc::clone(&s.stats)))
            .collect()
    }

    /// (server, up?) for status reports.
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        self.servers
            .iter()
            .map(|s| (s.addr, s.health.lock().is_up()))
            .collect()
    }
}

/// Every pool and the router that picks one per name.
pub struct Upstreams {
    router: Router,
    pools: Vec<Arc<Pool>>,
}

impl Upstreams {
    /// Pools from the config: 0 = default, 1 = cluster (when it has servers), then stubs.
    /// Pools of `previous` with the same settings are kept, with their health and
    /// connections.
    pub fn from_config(cfg: &config::Config, previous: Option<&Upstreams>) -> Upstreams {
        let up = &cfg.upstream;
        let make = |name: String, servers: &[SocketAddr], protocol| {
            let fresh = Pool::new(name, servers, protocol, up);
            previous
                .and_then(|p| p.pools.iter().find(|old| old.same_settings(&fresh)))
                .map_or_else(|| Arc::new(fresh), Arc::clone)
        };
        let mut pools = vec![make("default".into(), &up.servers, up.protocol)];
        let mut zones: Vec<(&str, usize)> = Vec::new();
        if !cfg.cluster.upstream.is_empty() {
            pools.push(make(
                "cluster".into(),
                &cfg.cluster.upstream,
                cfg.cluster.protocol,
            ));
            let i = pools.len() - 1;
            zones.push((&cfg.cluster.domain, i));
            zones.extend(cfg.cluster.reverse_zones.iter().map(|z| (z.as_str(), i)));
        }
        for stub in &cfg.stubs {
            pools.push(make(
                format!("stub:{}", stub.zone),
                &stub.servers,
                stub.protocol,
            ));
            zones.push((&stub.zone, pools.len() - 1));
        }
        Upstreams {
            router: Router::new(zones, 0),
            pools,
        }
    }

    /// The pool for a lower-cased wire name.
    pub fn route(&self, qname: &[u8]) -> &Arc<Pool> {
        &self.pools[self.router.route(qname)]
    }

    /// Close idle upstream sockets past their lifetime (called every few seconds).
    pub fn sweep(&self) {
        for p in &self.pools {
            p.sweep();
        }
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }
}
