//! Serving: bind the listeners, run the hit path on them, hand misses to the resolver,
//! expose metrics, and stop cleanly.
//!
//! Life cycle: [`Server::bind`] turns a validated config into bound sockets and a
//! resolver (fails with the address that could not be bound); [`Server::run`] serves
//! until the shutdown future completes, then stops receiving, answers what is in flight
//! and returns.

pub mod http;
pub mod noisy;
pub mod querylog;
pub mod reload;
pub mod resolve;
pub mod start_only;
pub mod tcp;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{Cache, Hit};
use crate::config::{Config, Source};
use crate::dns::answer::write_refusal;
use crate::dns::{wire, Key, Kind, Query, Reject, Ttl};
use crate::metrics::{inc, Listener, Metrics, Origin, Stats};
use crate::systemd::{self, Inherited};
use querylog::{Asked, By};
use resolve::{Resolver, Settings};

/// What to do with a received packet after the hit path looked at it.
// Returned by value once per packet and never stored: boxing the key would only add an
// allocation on the miss path.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// `out` holds a cached answer.
    Hit,
    /// `out` holds an error answer (FORMERR, NOTIMP, BADVERS).
    Reply,
    /// Not cached: resolve upstream.
    Miss(Key),
    /// Not answerable: drop silently (counted).
    Drop,
}

/// The hit path, shared by UDP and TCP: parse the question, look it up, render the cached
/// answer into `out`. Nothing here allocates, logs, or blocks beyond a shard read lock.
/// `now_ms` is the cache clock ([`Cache::now_ms`](crate::cache::Cache::now_ms)), read by
/// the caller once per batch of datagrams.
pub fn handle(
    resolver: &Arc<Resolver>,
    pkt: &[u8],
    out: &mut Vec<u8>,
    tcp: bool,
    now_ms: u64,
    stats: &Stats,
) -> Action {
    handle_from(resolver, pkt, out, tcp, now_ms, stats, || (None, None))
}

/// [`handle`] for a caller that knows the client and when its query arrived, for the
/// query log: `who` is called only when a line is written, so the hit path pays nothing
/// for it with the log off.
pub fn handle_from(
    resolver: &Arc<Resolver>,
    pkt: &[u8],
    out: &mut Vec<u8>,
    tcp: bool,
    now_ms: u64,
    stats: &Stats,
    who: impl FnOnce() -> (Option<SocketAddr>, Option<Instant>),
) -> Action {
    let m = &resolver.metrics;
    let reply = |out: &mut Vec<u8>, extended: u8| {
        stats.unparsed_request(pkt.len());
        stats.response(out, extended, Origin::Server);
        Action::Reply
    };
    let q = match Query::parse(pkt) {
        Ok(q) => q,
        Err(Reject::Drop) => {
            inc(&m.dropped);
            stats.unparsed_request(pkt.len());
            return Action::Drop;
        }
        Err(Reject::FormErr { id, flags }) => {
            inc(&m.formerr);
            write_refusal(out, pkt, id, flags, wire::RCODE_FORMERR, 0);
            return reply(out, 0);
        }
        Err(Reject::NotImp { id, flags }) => {
            inc(&m.notimp);
            write_refusal(out, pkt, id, flags, wire::RCODE_NOTIMP, 0);
            return reply(out, 0);
        }
        Err(Reject::BadVers { id, flags }) => {
            inc(&m.formerr);
            // BADVERS is extended RCODE 16: upper bits 1, header bits 0 (RFC 6891 §6.1.3).
            write_refusal(out, pkt, id, flags, wire::RCODE_NOERROR, 1);
            return reply(out, 1);
        }
    };
    stats.request(q.qtype, pkt.len(), q.dnssec_ok());
    let key = q.key();
    let limit = if tcp {
        u16::MAX as usize
    } else {
        q.udp_limit()
    };
    match resolver.cache.with_fresh(&key, now_ms, |e, age| {
        (
            e.answer.render(out, &q, Ttl::Age(age), limit),
            e.answer.kind != Kind::Positive,
        )
    }) {
        Hit::Fresh {
            value: (truncated, denial),
            prefetch,
        } => {
            if truncated {
                inc(&m.truncated);
            }
            stats.hit(denial);
            stats.response(out, 0, Origin::Cache);
            resolver.query_log.answer(
                || key.name_text(),
                q.qtype,
                out,
                By::Cache,
                || {
                    let (client, received) = who();
                    Asked {
                        proto: if tcp { "tcp" } else { "udp" },
                        client,
                        received,
                    }
                },
            );
            if prefetch {
                resolver.prefetch(key);
            }
            Action::Hit
        }
        Hit::Miss => {
            stats.miss();
            Action::Miss(key)
        }
    }
}

/// Bound sockets and the shared state, ready to serve.
pub struct Server {
    config: Config,
    resolver: Arc<Resolver>,
    udp: Vec<(String, Arc<std::net::UdpSocket>)>,
    tcp: Vec<(String, std::net::TcpListener)>,
    /// One per `metrics.address` entry.
    http: Vec<http::Endpoint>,
    /// The cache snapshot kept across restarts (under systemd only).
    snapshot: Option<Arc<crate::snapshot::Keeper>>,
    /// The refusal of the config on disk when this one is the last good config instead.
    refused_at_start: Option<String>,
    /// This process takes over from an old one ([`crate::handover`]): say so before READY.
    taking_over: Option<crate::handover::Incoming>,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A stop (or a restart): the next process, if any, starts from systemd's fd store.
    Stop,
    /// A new process reads the sockets and is the main process now; this one only answers
    /// what it has in flight, and leaves the snapshot and the fd store to it.
    HandedOver,
}

/// What a hand-over gives the new process: the listeners (duplicates of the same sockets),
/// and the cache, written to the snapshot memfd first.
pub struct HandoverKit {
    fds: Vec<(String, OwnedFd)>,
    snapshot: Option<(Arc<crate::snapshot::Keeper>, Arc<Resolver>)>,
}

impl HandoverKit {
    /// Write the cache snapshot now, so that the new process starts warm.
    pub async fn save_snapshot(&self) {
        if let Some((keeper, resolver)) = &self.snapshot {
            save_snapshot(keeper, resolver).await;
        }
    }

    /// The descriptors, by name.
    pub fn fds(&self) -> Vec<(String, std::os::fd::BorrowedFd<'_>)> {
        self.fds
            .iter()
            .map(|(n, fd)| (n.clone(), fd.as_fd()))
            .collect()
    }
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {proto} {addr}: {source}")]
pub struct BindError {
    proto: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// The name a socket is kept under in systemd's fd store (no ':' allowed there).
/// After a failed accept (out of file descriptors, buffers...), the pause before the next:
/// the error usually persists while the connection waits in the backlog, so accepting again
/// at once would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection on `listener`; an error is logged and followed by [`ACCEPT_BACKOFF`].
async fn accept(listener: &tokio::net::TcpListener, what: &str) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => return stream,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

fn socket_name(proto: &str, addr: SocketAddr, index: Option<usize>) -> String {
    let ip = addr.ip().to_string().replace(':', "_");
    match index {
        Some(i) => format!("{proto}-{ip}-{}-{i}", addr.port()),
        None => format!("{proto}-{ip}-{}", addr.port()),
    }
}

/// The names of every listening socket `config` asks for, as kept in systemd's fd store.
pub fn socket_names(config: &Config) -> Vec<String> {
    let l = &config.listen;
    let threads = udp_threads(config);
    let mut names = Vec::new();
    for &ip in &l.addresses {
        let addr = SocketAddr::new(ip, l.port);
        names.extend((0..threads).map(|i| socket_name("udp", addr, Some(i))));
        names.push(socket_name("tcp", addr, None));
    }
    names
}

/// UDP sockets (and receive loops) per listen address on this machine.
fn udp_threads(config: &Config) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    udp::thread_count(config.listen.udp_threads, cpus)
}

/// A socket for serving on `addr`: v6-only for IPv6 (each family is bound on its own),
/// and free bind, so that binding does not depend on the address being on the link yet.
fn listen_socket(
    addr: SocketAddr,
    kind: socket2::Type,
    proto: socket2::Protocol,
) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), kind, Some(proto))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
        sock.set_freebind_v6(true)?;
    } else {
        sock.set_freebind_v4(true)?;
    }
    Ok(sock)
}

/// Check that a socket handed back by systemd is of `kind` and bound to `addr`.
fn check_kept(
    sock: &socket2::Socket,
    kind: socket2::Type,
    addr: SocketAddr,
) -> std::io::Result<()> {
    let local = sock.local_addr()?.as_socket();
    if sock.r#type()? != kind || local != Some(addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("kept socket is bound to {local:?}, not {addr}"),
        ));
    }
    Ok(())
}

impl Server {
    /// Build the cache, pools and resolver and bind every listener, taking sockets kept by
    /// systemd across a restart where there are some, and handing new ones to its fd
    /// store. Must be called inside the tokio runtime that will run the miss path.
    pub fn bind(
        config: Config,
        metrics: Arc<Metrics>,
        kept: &mut Inherited,
    ) -> Result<Server, BindError> {
        let c = &config.cache;
        let cache = Arc::new(Cache::from_config(c));
        let resolver = Arc::new(Resolver::new(
            cache,
            Settings::from_config(&config, None),
            metrics,
            tokio::runtime::Handle::current(),
        ));
        resolver.query_log.set(config.log.queries);
        // Warm before the first query is read: those queued in the kept sockets during the
        // restart are the names pods were asking.
        let restore = |bytes: &[u8]| {
            let policy = resolver.settings().policy;
            let n = crate::snapshot::Keeper::restore(bytes, &resolver.cache, &policy);
            let restored = &resolver.metrics.snapshot_restored;
            restored.store(n as u64, Ordering::Relaxed);
        };
        let snapshot = if crate::bridge::is_bridge() {
            // The snapshot is the unit's: read, never written, by a bridge.
            if let Some(bytes) = crate::snapshot::Keeper::read_kept(kept) {
                restore(&bytes);
            }
            None
        } else {
            crate::snapshot::Keeper::open(kept).map(|(keeper, bytes)| {
                if let Some(bytes) = bytes {
                    restore(&bytes);
                }
                Arc::new(keeper)
            })
        };
        let l = &config.listen;
        let threads = udp_threads(&config);
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut reused = 0;
        for &ip in &l.addresses {
            let addr = SocketAddr::new(ip, l.port);
            for i in 0..threads {
                let name = socket_name("udp", addr, Some(i));
                let fresh = || udp::bind(addr, l.udp_recv_buffer);
                let sock = match kept.take(&name).map(|fd| udp::adopt(fd, addr, l.udp_recv_buffer)) {
                    Some(Ok(s)) => {
                        reused += 1;
                        Ok(s)
                    }
                    Some(Err(e)) => {
                        tracing::warn!(name = %name, error = %e, "kept socket {name} unusable ({e}), binding a new one");
                        fresh()
                    }
                    None => fresh(),
                }
                .map_err(|source| BindError { proto: "udp", addr, source })?;
                udp.push((name, Arc::new(sock)));
            }
            let name = socket_name("tcp", addr, None);
            let listener = match kept.take(&name).map(|fd| tcp::adopt(fd, addr)) {
                Some(Ok(s)) => {
                    reused += 1;
                    Ok(s)
                }
                _ => tcp::bind(addr),
            }
            .map_err(|source| BindError {
                proto: "tcp",
                addr,
                source,
            })?;
            tcp.push((name, listener));
        }
        if reused > 0 {
            tracing::info!(
                reused,
                "took back the sockets kept by systemd across the restart"
            );
        }
        systemd::store_all(
            udp.iter()
                .map(|(n, s)| (n.as_str(), s.as_fd()))
                .chain(tcp.iter().map(|(n, s)| (n.as_str(), s.as_fd()))),
        );
        // The HTTP endpoint is not DNS: a port held by another program (node-local-dns
        // uses 9253 too, during every migration from it) must not stop the node's DNS. The
        // bind is retried while serving (see `http::serve_when_bound`).
        // After a hand-over, the old process's listeners (the same sockets) are taken.
        let mut handed_http = |a: SocketAddr| {
            kept.take(&socket_name("http", a, None))
                .map(std::net::TcpListener::from)
                .filter(|l| l.local_addr().ok() == Some(a))
        };
        let http = config
            .metrics
            .addresses
            .iter()
            .map(|entry| match http::bind_entry(entry, &mut handed_http) {
                Ok(l) => http::Endpoint::Bound(l),
                Err(e) => {
                    tracing::error!(
                        "cannot listen on {entry} for /metrics, /health and /ready: {e}; \
                         serving DNS without them and trying again"
                    );
                    inc(&resolver.metrics.http_bind_failures);
                    http::Endpoint::Retry(entry.clone(), e)
                }
            })
            .collect();
        Ok(Server {
            config,
            resolver,
            udp,
            tcp,
            http,
            snapshot,
            refused_at_start: None,
            taking_over: None,
        })
    }

    /// Say, in STATUS and until a good config is loaded, that the config on disk was
    /// refused at start and the last good one serves.
    pub fn refused_at_start(mut self, refusal: Option<String>) -> Server {
        self.refused_at_start = refusal;
        self
    }

    /// This server takes over from an old process: it tells it when it reads the sockets,
    /// and waits to be made the main process before READY.
    pub fn taking_over(mut self, incoming: Option<crate::handover::Incoming>) -> Server {
        self.taking_over = incoming;
        self
    }

    /// What a hand-over to a new process needs from this one.
    pub fn handover_kit(&self) -> std::io::Result<HandoverKit> {
        let mut fds = Vec::new();
        for (name, s) in &self.udp {
            fds.push((name.clone(), s.as_fd().try_clone_to_owned()?));
        }
        for (name, l) in &self.tcp {
            fds.push((name.clone(), l.as_fd().try_clone_to_owned()?));
        }
        for endpoint in &self.http {
            if let http::Endpoint::Bound(listeners) = endpoint {
                for l in listeners {
                    let name = socket_name("http", l.local_addr()?, None);
                    fds.push((name, l.as_fd().try_clone_to_owned()?));
                }
            }
        }
        if let Some(keeper) = &self.snapshot {
            let name = crate::snapshot::FD_NAME.to_string();
            fds.push((name, keeper.fd().try_clone_to_owned()?));
        }
        Ok(HandoverKit {
            fds,
            snapshot: self
                .snapshot
                .as_ref()
                .map(|k| (Arc::clone(k), Arc::clone(&self.resolver))),
        })
    }

    /// Serve until `shutdown` completes, reloading from the source (when given) on its
    /// SIGHUP stream and on config file changes. Tells systemd READY once everything listens.
    pub async fn run(
        mut self,
        reload: Option<(Source, tokio::signal::unix::Signal)>,
        shutdown: impl Future<Output = Ending>,
    ) -> std::io::Result<Ending> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        let metrics = &self.resolver.metrics;
        for (i, (_, sock)) in self.udp.iter().enumerate() {
            let addr = sock.local_addr()?;
            let (sock, resolver, stop) = (
                Arc::clone(sock),
                Arc::clone(&self.resolver),
                Arc::clone(&stop),
            );
            let stats = metrics.owned_block(Listener::new(addr, "udp"));
            let miss_stats = metrics.shared_block(Listener::new(addr, "udp"));
            stats
                .heartbeat
                .store(self.resolver.cache.now_ms(), Ordering::Relaxed);
            workers.push(Arc::clone(&stats));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("udp-{i}"))
                    .spawn(move || udp::serve(sock, resolver, stats, miss_stats, stop))?,
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        let l = &self.config.listen;
        // One total for all listeners, as documented.
        let tcp_conns = Arc::new(tcp::Connections::new(
            l.tcp_max_connections,
            l.tcp_max_connections_per_client,
        ));
        for (_, listener) in self.tcp {
            let stats = metrics.shared_block(Listener::new(listener.local_addr()?, "tcp"));
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.spawn(tcp::serve(
                listener,
                Arc::clone(&self.resolver),
                l.tcp_idle_timeout,
                Arc::clone(&tcp_conns),
                stats,
            ));
        }
        let addrs: Vec<String> = l
            .addresses
            .iter()
            .map(|a| SocketAddr::new(*a, l.port).to_string())
            .collect();
        let reloads = Arc::new(reload::ReloadState::default());
        *reloads.error.lock() = self.refused_at_start.clone();
        metrics
            .config
            .last_good
            .store(self.refused_at_start.is_some(), Ordering::Relaxed);
        *reloads.sources.lock() = self.config.sources.clone();
        let endpoint = Arc::new(http::EndpointState::default());
        if !self.http.is_empty() {
            let ctx = Arc::new(http::Context {
                resolver: Arc::clone(&self.resolver),
                reloads: Arc::clone(&reloads),
                listen: addrs.clone(),
                workers: workers.clone(),
                endpoint: Arc::clone(&endpoint),
                slots: http::slots::Slots::new(http::slots::LIMITS),
                header_timeout: self.config.metrics.header_timeout,
            });
            for http in self.http {
                match http {
                    http::Endpoint::Bound(listeners) => {
                        let listeners = listeners
                            .into_iter()
                            .map(tokio::net::TcpListener::from_std)
                            .collect::<std::io::Result<Vec<_>>>()?;
                        tasks.spawn(http::serve_all(listeners, Arc::clone(&ctx)));
                    }
                    http::Endpoint::Retry(entry, error) => {
                        endpoint.failing(&entry, error);
                        tasks.spawn(http::serve_when_bound(entry, Arc::clone(&ctx)));
                    }
                }
            }
        }
        let status = {
            let (resolver, reloads, addrs, endpoint) = (
                Arc::clone(&self.resolver),
                Arc::clone(&reloads),
                addrs.join(", "),
                Arc::clone(&endpoint),
            );
            move || status_line(&addrs, &resolver, &reloads, &endpoint)
        };
        if let Some(interval) = systemd::watchdog_interval() {
            tasks.spawn(watchdog(interval, workers, Arc::clone(&self.resolver)));
        }
        if let Some(keeper) = &self.snapshot {
            let (keeper, resolver) = (Arc::clone(keeper), Arc::clone(&self.resolver));
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(crate::snapshot::EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    save_snapshot(&keeper, &resolver).await;
                }
            });
        }
        if let Some((source, hup)) = reload {
            tasks.spawn(reload::watch(
                source,
                hup,
                Arc::clone(&self.resolver),
                self.config.clone(),
                Arc::clone(&reloads),
                status.clone(),
            ));
        }
        {
            let (status, resolver) = (status.clone(), Arc::clone(&self.resolver));
            tasks.spawn(async move {
                loop {
                    tokio::time::sleep(STATUS_EVERY).await;
                    systemd::status(&status());
                    resolver.settings().upstreams.sweep();
                }
            });
        }
        {
            // Idle health probes: a quiet node knows its upstreams' health too.
            let resolver = Arc::clone(&self.resolver);
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(crate::upstream::probe::TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let settings = resolver.settings();
                    settings
                        .upstreams
                        .probe_idle(&settings.policy, &resolver.metrics);
                }
            });
        }
        let up = &self.config.upstream;
        tracing::info!(
            listen = %addrs.join(","),
            udp_sockets = self.udp.len(),
            upstreams = %up.servers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
            upstreams_from = %up.servers_from,
            cluster_upstreams = %self.config.cluster.upstream.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
            stub_zones = %self.config.stubs.iter().map(|s| s.zone.as_str()).collect::<Vec<_>>().join(","),
            "serving"
        );
        if let Some(incoming) = self.taking_over.take() {
            match tokio::task::spawn_blocking(move || incoming.ready()).await {
                Ok(Ok(())) if crate::bridge::is_bridge() => tracing::info!(
                    "serving across the restart until the new main process reads the sockets"
                ),
                Ok(Ok(())) => tracing::info!(
                    "took over from the old process: this one is the main process now"
                ),
                // The old process was not told or did not confirm: it goes on serving and
                // still owns everything; this one leaves without touching any of it.
                Ok(Err(e)) => {
                    tracing::error!("hand-over not confirmed by the old process ({e}); exiting");
                    std::process::exit(1);
                }
                Err(e) => {
                    tracing::error!("hand-over not confirmed by the old process ({e}); exiting");
                    std::process::exit(1);
                }
            }
        }
        systemd::ready(&status());
        if !crate::bridge::is_bridge() {
            crate::lifecycle::serving();
            crate::bridge::dismiss();
        }
        let ending = shutdown.await;

        let handed = ending == Ending::HandedOver;
        if handed {
            tracing::info!("handed over: no new queries here, answering those in flight");
        } else {
            systemd::stopping();
            tracing::info!("stopping: no new queries, answering those in flight");
        }
        stop.store(true, Ordering::Relaxed);
        tasks.abort_all();
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        let _ = tokio::time::timeout(Duration::from_secs(3), self.resolver.drained()).await;
        // After the last answer: the next process starts with everything this one knew.
        // After a hand-over the snapshot is the new process's to write.
        if let Some(keeper) = self.snapshot.as_ref().filter(|_| !handed) {
            save_snapshot(keeper, &self.resolver).await;
        }
        tracing::info!("stopped");
        Ok(ending)
    }
}

/// Write the cache snapshot off the async threads; a failure is logged.
async fn save_snapshot(keeper: &Arc<crate::snapshot::Keeper>, resolver: &Arc<Resolver>) {
    let (keeper, cache) = (Arc::clone(keeper), Arc::clone(&resolver.cache));
    match tokio::task::spawn_blocking(move || keeper.save(&cache)).await {
        Ok(Ok(n)) => {
            let m = &resolver.metrics;
            m.snapshot_entries.store(u64::from(n), Ordering::Relaxed);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            m.snapshot_time
                .store(now.map_or(0, |d| d.as_secs()), Ordering::Relaxed);
        }
        Ok(Err(e)) => tracing::warn!("cannot write the cache snapshot: {e}"),
        Err(e) => tracing::warn!("cannot write the cache snapshot: {e}"),
    }
}

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The line `systemctl status localdns` shows.
fn status_line(
    addrs: &str,
    resolver: &Resolver,
    reloads: &reload::ReloadState,
    endpoint: &http::EndpointState,
) -> String {
    let settings = resolver.settings();
    let (mut up, mut total) = (0, 0);
    for pool in settings.upstreams.pools() {
        for (_, healthy) in pool.health() {
            total += 1;
            up += usize::from(healthy);
        }
    }
    let mut line = format!(
        "serving {addrs}; {} cached; upstreams {up}/{total} up",
        resolver.cache.len()
    );
    if settings.upstreams.pools()[0].health().is_empty() {
        line.push_str("; NO DEFAULT UPSTREAMS (resolv.conf lists none yet)");
    }
    if let Some(err) = reloads.error.lock().as_deref() {
        line.push_str(&format!(
            "; CONFIG REFUSED (previous config serving): {err}"
        ));
    }
    let pending = reloads.restart_required.lock();
    if !pending.is_empty() {
        line.push_str(&format!("; RESTART REQUIRED for {}", pending.join("; ")));
    }
    drop(pending);
    if let Some(err) = endpoint.not_listening() {
        line.push_str(&format!("; NO METRICS/HEALTH ENDPOINT (retrying) {err}"));
    }
    line
}

/// A receive loop wakes at least every 200 ms; one whose heartbeat is older than this is
/// stuck.
pub const HEARTBEAT_STALE_MS: u64 = 2000;

/// How many of `workers` have not gone round their loop within `stale_after` ms of `now`.
pub fn stuck_loops(workers: &[Arc<Stats>], now: u64, stale_after: u64) -> usize {
    workers
        .iter()
        .filter(|w| now.saturating_sub(w.heartbeat.load(Ordering::Relaxed)) > stale_after)
        .count()
}

/// Ping systemd's watchdog at half its interval, but only while every UDP worker goes
/// round its loop (they wake at least every 200 ms) and this runtime runs tasks: a wedged
/// server stops pinging and systemd restarts it.
async fn watchdog(interval: Duration, workers: Vec<Arc<Stats>>, resolver: Arc<Resolver>) {
    let every = interval / 2;
    let stale_after = (every.as_millis() as u64).max(HEARTBEAT_STALE_MS);
    loop {
        let stuck = stuck_loops(&workers, resolver.cache.now_ms(), stale_after);
        if stuck == 0 {
            systemd::watchdog();
        } else {
            tracing::error!(
                stuck,
                "UDP workers stopped going round their loop; not pinging the watchdog"
            );
        }
        tokio::time::sleep(every).await;
    }
}
