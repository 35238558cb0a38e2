//! Forwarding misses: routing by zone, upstream pools with failover and health, UDP and
//! TCP exchanges, persistent pipelined TCP.
//!
//! A pool tries its servers in order (first healthy first, like resolv.conf). Attempts
//! overlap on the schedule of [`attempts`]: the next starts after the server's measured
//! retransmission timeout (or at once after an error, SERVFAIL or REFUSED), earlier ones
//! stay open, the first usable answer wins, and the whole query is bounded by `timeout ×
//! attempts`. SERVFAIL and REFUSED move on to the next server and never mark one healthy.
//! When a server is down is decided in [`health`]: failures of `down_after_failures`
//! distinct questions with no usable answer in between, and none for a whole timeout (one
//! slow name never takes a server down, nor does a server that answers part of its
//! questions: a rate-limiting resolver is still used for the rest). A down server is skipped for `down_time`; then the question
//! of one query is sent to it on the side (that client is still answered by a healthy
//! server, so no client waits on a server that may still be dead; the mark is renewed when
//! the probe is sent), and a success brings it back. When every server is down, one of
//! them (the one due first) is still tried, once: a pool never fails every query at once
//! just because of its marks.
//!
//! Idle servers are probed with a known-good question ([`probe`]), so health is known on a
//! quiet node too; pipelined TCP keeps several connections per server and replaces them by
//! age and query count ([`pipeline`]), so kube-proxy spreads the load over kube-dns replicas.

pub mod attempts;
pub mod exchange;
pub mod health;
pub mod pipeline;
pub mod ports;
pub mod probe;
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
    /// The reusable random-port sockets, and a pipelined TCP connection (opened when
    /// first needed) for truncated answers and for the TCP round of retries.
    Udp {
        ports: ports::Ports,
        tcp: pipeline::Pipeline,
    },
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
    /// Round-trip estimate: when to start the next attempt.
    rtt: Mutex<attempts::Rtt>,
    /// The up/down log's window (start, lines written) and the changes not logged since.
    logged: Mutex<(Option<(Instant, u32)>, u32)>,
    /// When this server is next probed if no client gets an answer from it.
    schedule: Mutex<probe::Schedule>,
    /// Whether it is asked without EDNS for now ([`exchange::EdnsMemory`]).
    edns: exchange::EdnsMemory,
}

/// Up/down lines of one server: at most [`CHANGE_LOG_BURST`] per [`CHANGE_LOG_WINDOW`]; the
/// changes beyond are counted in the next line written (a flapping server writes a handful
/// of lines a minute, not one per change, and a real outage and recovery are always seen).
const CHANGE_LOG_WINDOW: Duration = Duration::from_secs(60);
const CHANGE_LOG_BURST: u32 = 6;

/// May a change be logged at `now`, given the window's start and the lines written in it?
/// Returns the new (start, lines) when it may.
fn change_log_due(window: Option<(Instant, u32)>, now: Instant) -> Option<(Instant, u32)> {
    match window {
        Some((start, n)) if now.saturating_duration_since(start) < CHANGE_LOG_WINDOW => {
            (n < CHANGE_LOG_BURST).then_some((start, n + 1))
        }
        _ => Some((now, 1)),
    }
}

impl Server {
    /// Log a change of state through `log`, within the rate of [`change_log_due`].
    fn log_change(&self, log: impl FnOnce()) {
        let mut logged = self.logged.lock();
        let Some(window) = change_log_due(logged.0, Instant::now()) else {
            logged.1 += 1;
            return;
        };
        if logged.1 > 0 {
            tracing::info!(upstream = %self.addr, changes = logged.1,
                "upstream {}: {} more up/down changes were not logged (at most {} lines a minute)",
                self.addr, logged.1, CHANGE_LOG_BURST);
        }
        *logged = (Some(window), 0);
        log();
    }
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
    /// TCP connections per server and their rotation.
    spread: pipeline::Spread,
    /// Idle probes: how often (zero = never) and the question.
    probe_interval: Duration,
    probe_question: Key,
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
        let spread = pipeline::Spread {
            connections: up.tcp_connections,
            max_age: up.tcp_connection_max_age,
            max_queries: up.tcp_connection_max_queries,
        };
        Pool {
            name,
            servers: servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    health: Mutex::new(health::Health::default()),
                    stats: Arc::default(),
                    rtt: Mutex::default(),
                    logged: Mutex::default(),
                    schedule: Mutex::default(),
                    edns: exchange::EdnsMemory::new(addr),
                    transport: match protocol {
                        Protocol::Udp => Transport::Udp {
                            ports: ports::Ports::new(addr, reuse),
                            tcp: pipeline::Pipeline::new(addr, up.timeout, spread),
                        },
                        Protocol::Tcp => {
                            Transport::Tcp(pipeline::Pipeline::new(addr, up.timeout, spread))
                        }
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
            spread,
            probe_interval: up.health_check_interval,
            probe_question: probe::question(None),
        }
    }

    /// Probe idle servers with the SOA of `zone` (the pool's first zone) instead of `. NS`.
    fn probing(mut self, zone: Option<&str>) -> Pool {
        self.probe_question = probe::question(zone);
        self
    }

    /// Send the probe question to every server that is due one (idle, or no good answer
    /// to a client for an interval); called every [`probe::TICK`].
    pub fn probe_idle(self: &Arc<Self>, policy: &TtlPolicy, metrics: &Arc<Metrics>) {
        let interval = self.probe_interval.as_millis() as u64;
        if interval == 0 {
            return;
        }
        let now = self.now_ms();
        for (i, s) in self.servers.iter().enumerate() {
            // Good answers to clients: NOERROR and NXDOMAIN (the rcode index).
            let d = s.stats.durations();
            let answered = d[0].count + d[3].count;
            if s.schedule
                .lock()
                .due(now, answered, interval, rand::random())
            {
                let (pool, policy, metrics) = (Arc::clone(self), *policy, Arc::clone(metrics));
                tokio::spawn(async move { pool.probe(i, &policy, &metrics).await });
            }
        }
    }

    /// Probe server `i`: again at once after a failure while it is still up, so a dead
    /// server is marked down without waiting `down_after` intervals.
    async fn probe(&self, i: usize, policy: &TtlPolicy, metrics: &Metrics) {
        let s = &self.servers[i];
        let key = self.probe_question;
        for tries in 1.. {
            let attempt = self.attempt(s, &key, policy, metrics, self.first_via());
            let result = tokio::time::timeout(self.timeout, attempt)
                .await
                .unwrap_or(Err(ExchangeError::Timeout));
            let why = match result {
                Ok(answer) if probe::alive(answer.rcode()) => None,
                Ok(answer) => Some(format!(
                    "health probe answered with RCODE {}",
                    answer.rcode()
                )),
                // Our own socket failing says nothing of the server: try at the next tick.
                Err(e) if !e.counts_against_server() => break,
                Err(e) => Some(format!("health probe: {e}")),
            };
            match &why {
                None => self.succeeded(s),
                Some(why) => self.probe_failed(s, why),
            }
            if !probe::again(
                why.is_none(),
                s.health.lock().is_up(),
                tries,
                self.down_after,
            ) {
                break;
            }
        }
        let interval = self.probe_interval.as_millis() as u64;
        s.schedule
            .lock()
            .done(self.now_ms(), interval, rand::random());
    }

    /// A probe got no good answer: one more distinct failed question (logged when that
    /// marks the server down, never per probe).
    fn probe_failed(&self, s: &Server, why: &str) {
        tracing::debug!(upstream = %s.addr, pool = %self.name, "upstream {} ({}): {why}", s.addr, self.name);
        s.stats.failed(why.to_string());
        let question = s.schedule.lock().question();
        self.failed_question(s, question, &why);
    }

    /// How a pool's first attempt goes: its own protocol.
    fn first_via(&self) -> attempts::Via {
        match self.protocol {
            Protocol::Tcp => attempts::Via::Tcp,
            Protocol::Udp => attempts::Via::Udp,
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
        if s.health.lock().succeeded(self.now_ms()) {
            s.log_change(|| {
                tracing::info!(upstream = %s.addr, pool = %self.name, "upstream {} ({} pool) answers again, marked up", s.addr, self.name)
            });
        }
    }

    /// `key` got no usable answer from `s` (no answer, an error, SERVFAIL or REFUSED).
    fn failed(&self, s: &Server, key: &Key, why: &dyn std::fmt::Display) {
        let question = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(key.as_bytes());
        self.failed_question(s, question, why);
    }

    /// `question` (a hash) got no usable answer from `s`; logged when that marks it down.
    fn failed_question(&self, s: &Server, question: u64, why: &dyn std::fmt::Display) {
        let marked = s
            .health
            .lock()
            .failed(question, self.now_ms(), &self.policy);
        if let Some(n) = marked {
            s.log_change(|| {
                tracing::warn!(upstream = %s.addr, pool = %self.name, error = %why, questions = n,
                    "upstream {} ({} pool) marked down: {n} distinct questions failed and no usable answer for {} ms, the last with: {why}",
                    s.addr, self.name, self.policy.quiet_ms)
            });
        }
    }

    /// Resolve `key` through this pool with failover: attempts overlap on the schedule of
    /// [`attempts`] (the next one starts after the server's retransmission timeout, or at
    /// once after an error, SERVFAIL or REFUSED), and the first usable answer wins, until
    /// `timeout × attempts`. A SERVFAIL or REFUSED is returned only when no server did
    /// better.
    pub async fn query(
        self: &Arc<Self>,
        key: &Key,
        policy: &TtlPolicy,
        metrics: &Arc<Metrics>,
    ) -> Result<(Answer, SocketAddr), UpstreamError> {
        let (up, probe) = self.candidates();
        if up.is_empty() && !self.servers.is_empty() {
            inc(&metrics.healthcheck_broken);
        }
        let (order, attempts): (Vec<usize>, usize) = match (up.is_empty(), probe) {
            // Only a pool without servers has neither.
            (true, None) => return Err(UpstreamError::NoServers),
            // Nothing else to ask: the probe is this query's only attempt.
            (true, Some(p)) => (vec![p], 1),
            // Probe on the side with the same question, so that no client waits on a
            // server that may still be dead; a success marks it up again.
            (false, probe) => {
                if let Some(p) = probe {
                    self.spawn_probe(p, *key, *policy, Arc::clone(metrics));
                }
                (up, self.attempts)
            }
        };
        let started = Instant::now();
        let deadline = started + self.timeout * attempts as u32;
        let tcp_pool = self.protocol == Protocol::Tcp;
        let attempt = |n: usize, i: usize, via| {
            let server = &self.servers[order[i]];
            Box::pin(async move {
                let at = Instant::now();
                let result = self
                    .counted_attempt(server, key, policy, metrics, via)
                    .await;
                (n, i, at, result)
            })
        };
        let mut running = futures_util::stream::FuturesUnordered::new();
        // Per server of `order`: asked, gave an answer, already judged for its health.
        let mut asked = vec![false; order.len()];
        let mut answered = vec![false; order.len()];
        let mut judged = vec![false; order.len()];
        // Servers that answered SERVFAIL/REFUSED: not asked this question again.
        let mut refused = vec![false; order.len()];
        let mut fallback: Option<(Answer, SocketAddr)> = None;
        let mut last_err: Option<(SocketAddr, ExchangeError)> = None;
        let (mut sent, mut last_sent, mut next_now) = (0, started, true);
        // In a TCP pool, an attempt that fails after others were started behind it (they
        // all went to connections that were then given up together: a dead replica behind
        // the Service) is given back, up to `attempts` times: overlapping must not spend
        // every attempt on one broken path. (UDP attempts have sockets of their own: a
        // slow name there never costs more than `attempts` queries.)
        let (mut allowed, mut given_back) = (attempts, 0);
        // When attempt `sent` is due if attempt `sent - 1`, started at `last_sent`, is still
        // unanswered: after the RTO of that attempt's server, backed off.
        let retry_due = |sent: usize, last_sent: Instant| {
            let (i, _) = attempts::plan(sent - 1, order.len(), tcp_pool);
            let rto = self.servers[order[i]].rtt.lock().rto(self.timeout);
            last_sent + attempts::next_after(sent, rto, self.timeout)
        };
        // One timer for the whole query, moved to the next retry or the deadline (a timer
        // made per turn of the loop, two of them, was a timer-wheel insert and removal
        // each, on every miss).
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        loop {
            // Start the next attempt when due: the first at once, then on an error or a
            // bad RCODE, or when the last one has gone unanswered for its server's RTO.
            let due = next_now || sent < allowed && Instant::now() >= retry_due(sent, last_sent);
            if due {
                while sent < allowed {
                    let (i, via) = attempts::plan(sent, order.len(), tcp_pool);
                    sent += 1;
                    if !refused[i] {
                        asked[i] = true;
                        (last_sent, next_now) = (Instant::now(), false);
                        running.push(attempt(sent - 1, i, via));
                        break;
                    }
                }
            }
            if running.is_empty() {
                break;
            }
            let wake = match sent < allowed {
                true => retry_due(sent, last_sent).min(deadline),
                false => deadline,
            };
            if timer.deadline() != wake.into() {
                timer.as_mut().reset(wake.into());
            }
            use futures_util::StreamExt;
            tokio::select! {
                Some((n, i, at, result)) = running.next() => {
                    let server = &self.servers[order[i]];
                    match result {
                        Ok(answer) => {
                            answered[i] = true;
                            server.rtt.lock().sample(at.elapsed());
                            if attempts::verdict(answer.rcode()) == attempts::Verdict::Final {
                                // The servers asked before it that did not answer in their
                                // time: one failed question each.
                                for j in (0..order.len()).filter(|&j| j != i) {
                                    if asked[j] && !answered[j] && !judged[j] {
                                        self.failed(&self.servers[order[j]], key, &ExchangeError::Timeout);
                                    }
                                }
                                self.succeeded(server);
                                return Ok((answer, server.addr));
                            }
                            let why = format!("answered RCODE {}", answer.rcode());
                            self.failed(server, key, &why);
                            (refused[i], judged[i]) = (true, true);
                            fallback = Some((answer, server.addr));
                        }
                        Err(e) => {
                            tracing::debug!(upstream = %server.addr, pool = %self.name, error = %e, "upstream {} ({}) attempt failed: {e}", server.addr, self.name);
                            if e.counts_against_server() && !judged[i] {
                                self.failed(server, key, &e);
                            }
                            judged[i] = true;
                            last_err = Some((server.addr, e));
                            if tcp_pool && n + 1 < sent && given_back < attempts {
                                (allowed, given_back) = (allowed + 1, given_back + 1);
                            }
                        }
                    }
                    // Whatever ended, the next attempt (if any) starts now.
                    next_now = true;
                }
                // A retry is due (the loop starts it), or the query's time is up.
                _ = &mut timer => if wake >= deadline { break },
            }
        }
        let overdue = !running.is_empty();
        drop(running);
        // Servers asked that never answered this question in time: one failed question
        // each (counted here, once, rather than per attempt).
        for i in 0..order.len() {
            if asked[i] && !answered[i] && !judged[i] {
                let server = &self.servers[order[i]];
                if overdue {
                    inc(&metrics.upstream_failures);
                    server.stats.failed(ExchangeError::Timeout.to_string());
                }
                self.failed(server, key, &ExchangeError::Timeout);
            }
        }
        if let Some(answer) = fallback {
            return Ok(answer);
        }
        let (server, source) = last_err
            .filter(|_| !overdue)
            .unwrap_or((self.servers[order[0]].addr, ExchangeError::Timeout));
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
            let attempt = pool.counted_attempt(server, &key, &policy, &metrics, pool.first_via());
            match tokio::time::timeout(pool.timeout, attempt).await {
                Ok(Ok(a)) if attempts::verdict(a.rcode()) == attempts::Verdict::Final => {
                    pool.succeeded(server)
                }
                Ok(Ok(a)) => {
                    pool.failed(server, &key, &format_args!("answered RCODE {}", a.rcode()))
                }
                Ok(Err(e)) => {
                    tracing::debug!(upstream = %server.addr, pool = %pool.name, error = %e, "probe of down upstream {} ({}) failed: {e}", server.addr, pool.name);
                    if e.counts_against_server() {
                        pool.failed(server, &key, &e);
                    }
                }
                Err(_) => {
                    inc(&metrics.upstream_failures);
                    server.stats.failed(ExchangeError::Timeout.to_string());
                    pool.failed(server, &key, &ExchangeError::Timeout)
                }
            }
        });
    }

    /// One attempt, counted (globally and per server) and timed when it ends; the caller
    /// bounds it (an attempt still running at the query's deadline is counted there).
    async fn counted_attempt(
        &self,
        server: &Server,
        key: &Key,
        policy: &TtlPolicy,
        metrics: &Metrics,
        via: attempts::Via,
    ) -> Result<Answer, ExchangeError> {
        inc(&metrics.upstream_queries);
        inc(&server.stats.requests);
        let started = Instant::now();
        let result = self.attempt(server, key, policy, metrics, via).await;
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
        via: attempts::Via,
    ) -> Result<Answer, ExchangeError> {
        let (ports, tcp) = match (&s.transport, via) {
            (Transport::Tcp(pipeline), _) => {
                return exchange::pipelined(pipeline, key, policy, &s.edns).await
            }
            (Transport::Udp { tcp, .. }, attempts::Via::Tcp) => {
                inc(&metrics.upstream_tcp_retries);
                return exchange::pipelined(tcp, key, policy, &s.edns).await;
            }
            (Transport::Udp { ports, tcp }, attempts::Via::Udp) => (ports, tcp),
        };
        let (lease, new) = ports.take()?;
        if new {
            inc(&metrics.upstream_udp_sockets);
        }
        // When this future is dropped (overtaken, or at the deadline) the socket goes with
        // it: it is never reused.
        match exchange::udp(&lease.socket, key, policy, &s.edns).await {
            Ok(answer) => {
                ports.give_back(lease);
                Ok(answer)
            }
            Err(ExchangeError::Answer(AnswerError::Truncated)) => {
                ports.give_back(lease);
                inc(&metrics.upstream_tcp_retries);
                exchange::pipelined(tcp, key, policy, &s.edns).await
            }
            Err(e) => Err(e),
        }
    }

    /// Same servers, transport and timing: a reload may keep this pool as it is.
    fn same_settings(&self, other: &Pool) -> bool {
        self.name == other.name
            && self.same_servers(other)
            && self.reuse == other.reuse
            && self.spread == other.spread
            && (self.probe_interval, self.probe_question)
                == (other.probe_interval, other.probe_question)
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
            if let Transport::Udp { ports, .. } = &s.transport {
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
        let make = |name: String, servers: &[SocketAddr], protocol, zone: Option<&str>| {
            let fresh = Pool::new(name, servers, protocol, up).probing(zone);
            previous
                .and_then(|p| p.pools.iter().find(|old| old.same_settings(&fresh)))
                .map_or_else(|| Arc::new(fresh), Arc::clone)
        };
        let mut pools = vec![make("default".into(), &up.servers, up.protocol, None)];
        let mut zones: Vec<(&str, usize)> = Vec::new();
        if !cfg.cluster.upstream.is_empty() {
            pools.push(make(
                "cluster".into(),
                &cfg.cluster.upstream,
                cfg.cluster.protocol,
                Some(&cfg.cluster.domain),
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
                Some(&stub.zone),
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

    /// Probe the idle servers of every pool (called every [`probe::TICK`]).
    pub fn probe_idle(&self, policy: &TtlPolicy, metrics: &Arc<Metrics>) {
        for p in &self.pools {
            p.probe_idle(policy, metrics);
        }
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_logged_in_bursts_of_a_few_a_minute() {
        let t = Instant::now();
        let mut w = None;
        for i in 0..CHANGE_LOG_BURST {
            w = change_log_due(w, t + Duration::from_secs(u64::from(i)));
            assert!(w.is_some(), "change {i} of the burst");
        }
        assert_eq!(change_log_due(w, t + Duration::from_secs(10)), None);
        assert_eq!(change_log_due(w, t + Duration::from_secs(59)), None);
        let next = t + CHANGE_LOG_WINDOW;
        assert_eq!(change_log_due(w, next), Some((next, 1)), "a new window");
    }
}
