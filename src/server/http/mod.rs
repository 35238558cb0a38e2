//! The HTTP endpoint: `/metrics` (Prometheus), `/health`, `/ready` and `/status` (the JSON
//! report `localdns status` prints), served by hyper.
//!
//! DNS must not notice it, and no client may starve the probes: a connection needs a slot
//! ([`slots`]: a general pool bounded per client address, and a reserve only the node
//! itself may use), a request head must arrive within `metrics.header_timeout`, and a
//! whole connection ends after [`CONNECTION_LIMIT`], so slow or malformed clients only
//! ever hold a few small tasks, for seconds. The work behind a request is reading
//! counters; the one blocking check (the firewall rules, for `/ready`) runs off the async
//! threads and is cached briefly ([`crate::health::RULES_CHECK_CACHE`]).

pub mod listen;
pub mod slots;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpListener;

use super::resolve::Resolver;
use super::{reload::ReloadState, stuck_loops, HEARTBEAT_STALE_MS};
use crate::config::HttpAddress;
use crate::health::{self, ReadyInputs, Report};
use crate::metrics::expose::{self, Scrape, UpstreamValue};
use crate::metrics::format;
use crate::metrics::Stats;

pub const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// What the endpoint reads.
pub struct Context {
    pub resolver: Arc<Resolver>,
    pub reloads: Arc<ReloadState>,
    /// The listen addresses (`IP:PORT`).
    pub listen: Vec<String>,
    /// The UDP receive loops' statistics blocks (their heartbeats).
    pub workers: Vec<Arc<Stats>>,
    pub endpoint: Arc<EndpointState>,
    /// The connection slots of all the endpoint's listeners.
    pub slots: Arc<slots::Slots>,
    /// A connection that has not sent a whole request head within this is closed.
    pub header_timeout: Duration,
}

/// One `metrics.address` entry's listeners at start: bound, or not (why), to be retried.
pub enum Endpoint {
    Bound(Vec<std::net::TcpListener>),
    Retry(HttpAddress, String),
}

/// Whether the endpoint listens, for STATUS= and `/status`.
#[derive(Default)]
pub struct EndpointState {
    /// Why an entry does not listen yet (entry → `ADDR: error`), while its bind is retried.
    not_listening: Mutex<BTreeMap<String, String>>,
    /// How long it went without listening after the start, once it does (seconds).
    pub late_by: Mutex<Option<u64>>,
}

impl EndpointState {
    pub fn failing(&self, entry: &HttpAddress, why: String) {
        self.not_listening.lock().insert(entry.to_string(), why);
    }

    fn listening(&self, entry: &HttpAddress) {
        self.not_listening.lock().remove(&entry.to_string());
    }

    /// Why some entry does not listen yet; `None` when all do.
    pub fn not_listening(&self) -> Option<String> {
        let n = self.not_listening.lock();
        (!n.is_empty()).then(|| n.values().cloned().collect::<Vec<_>>().join("; "))
    }
}

/// The first retry of a failed bind comes after this; each next one after twice as long,
/// at most [`BIND_RETRY_MAX`].
pub const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(30);
/// While the bind keeps failing, the journal hears of it at most this often.
const BIND_LOG_EVERY: Duration = Duration::from_secs(300);

/// A non-blocking listener on `addr`.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Non-blocking listeners on every address `entry` stands for now (all or none); the
/// error says which address failed and why. `handed` gives a listener a hand-over brought
/// for an address, if any.
pub fn bind_entry(
    entry: &HttpAddress,
    mut handed: impl FnMut(SocketAddr) -> Option<std::net::TcpListener>,
) -> Result<Vec<std::net::TcpListener>, String> {
    listen::resolve(entry)?
        .into_iter()
        .map(|a| {
            handed(a)
                .map_or_else(|| bind(a), Ok)
                .map_err(|e| format!("{a}: {e}"))
        })
        .collect()
}

/// Serve on every listener, with one set of slots (see [`slots`]).
pub async fn serve_all(listeners: Vec<TcpListener>, ctx: Arc<Context>) {
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(serve(l, Arc::clone(&ctx)));
    }
    while tasks.join_next().await.is_some() {}
}

fn names(listeners: &[TcpListener]) -> String {
    let names: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    names.join(", ")
}

/// The wait before retry number `n` (0 is the first) of a failed bind.
pub fn bind_retry_after(n: u32) -> Duration {
    BIND_RETRY_FIRST
        .saturating_mul(1 << n.min(16))
        .min(BIND_RETRY_MAX)
}

/// Bind `entry` again and again (backing off, see [`bind_retry_after`]) until it works,
/// then serve. DNS is served meanwhile; STATUS= and, once it listens, `/status` and
/// `localdns_http_bind_failures_total` say what happened.
pub async fn serve_when_bound(entry: HttpAddress, ctx: Arc<Context>) {
    let started = std::time::Instant::now();
    let mut last_log = started;
    let mut n = 0;
    let listeners = loop {
        tokio::time::sleep(bind_retry_after(n)).await;
        n += 1;
        let bound = bind_entry(&entry, |_| None).and_then(|ls| {
            ls.into_iter()
                .map(|l| TcpListener::from_std(l).map_err(|e| format!("{entry}: {e}")))
                .collect::<Result<Vec<_>, String>>()
        });
        match bound {
            Ok(l) => break l,
            Err(e) => {
                crate::metrics::inc(&ctx.resolver.metrics.http_bind_failures);
                ctx.endpoint.failing(&entry, e.clone());
                if last_log.elapsed() >= BIND_LOG_EVERY {
                    last_log = std::time::Instant::now();
                    tracing::warn!(
                        "still cannot listen on {entry} for /metrics, /health and /ready after \
                         {n} attempts in {}s: {e}",
                        started.elapsed().as_secs()
                    );
                }
            }
        }
    };
    let late = started.elapsed().as_secs();
    tracing::info!(
        "listening on {} for /metrics, /health and /ready, {late}s late",
        names(&listeners)
    );
    ctx.endpoint.listening(&entry);
    *ctx.endpoint.late_by.lock() = Some(late);
    serve_all(listeners, ctx).await;
}

pub async fn serve(listener: TcpListener, ctx: Arc<Context>) {
    let m = &ctx.resolver.metrics;
    loop {
        let stream = super::accept(&listener, "HTTP").await;
        let ends = stream
            .peer_addr()
            .and_then(|p| Ok((p, stream.local_addr()?)));
        let Ok((peer, local)) = ends else { continue };
        let slot = match ctx.slots.open(peer.ip(), local.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                crate::metrics::inc(match refusal {
                    slots::Refusal::Full => &m.http_refused_full,
                    slots::Refusal::PerClient => &m.http_refused_per_client,
                });
                drop(stream);
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        // For `/status`, any loopback client is the node too (a pod cannot send from one).
        let node = peer.ip().to_canonical().is_loopback() || slots::is_local(peer.ip(), local.ip());
        tokio::spawn(async move {
            let service = hyper::service::service_fn({
                let ctx = Arc::clone(&ctx);
                move |req| {
                    let ctx = Arc::clone(&ctx);
                    async move { Ok::<_, Infallible>(route(&ctx, req, node).await) }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ctx.header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                if e.is_timeout() {
                    crate::metrics::inc(&ctx.resolver.metrics.http_header_timeouts);
                }
            }
            drop(slot);
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answer one request; `node` says the client is the node itself (see
/// [`slots::is_local`]), which alone sees `/status` whole.
async fn route(ctx: &Arc<Context>, req: Request<Incoming>, node: bool) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let plain = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => {
            let (ready, healthy) = {
                let (reasons, healthy) = check(ctx).await;
                (reasons.is_empty(), healthy)
            };
            let accept = req.headers().get_all(hyper::header::ACCEPT);
            let format = format::negotiate(accept.iter().filter_map(|v| v.to_str().ok()));
            let mut r = text(
                StatusCode::OK,
                format.content_type(),
                expose::render(scrape(ctx, ready, healthy), format),
            );
            r.headers_mut().insert(
                hyper::header::VARY,
                hyper::header::HeaderValue::from_static("accept"),
            );
            r
        }
        "/health" => match stuck(ctx) {
            0 => text(StatusCode::OK, plain, "ok\n".into()),
            n => text(
                StatusCode::SERVICE_UNAVAILABLE,
                plain,
                format!("{n} serving loop(s) stopped going round\n"),
            ),
        },
        "/ready" => {
            let (reasons, _) = check(ctx).await;
            if reasons.is_empty() {
                text(StatusCode::OK, plain, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("not ready: {}\n", reasons.join("; ")),
                )
            }
        }
        "/status" => {
            let r = report(ctx).await;
            let r = if node { r } else { r.for_other_clients() };
            let body = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
            text(StatusCode::OK, "application/json", body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found: /metrics /health /ready /status\n".into(),
        ),
    }
}

fn stuck(ctx: &Context) -> usize {
    stuck_loops(
        &ctx.workers,
        ctx.resolver.cache.now_ms(),
        HEARTBEAT_STALE_MS,
    )
}

/// The cluster pool's (up, total), when there is one.
fn cluster(ctx: &Context) -> Option<(usize, usize)> {
    let settings = ctx.resolver.settings();
    let pool = settings
        .upstreams
        .pools()
        .iter()
        .find(|p| p.name == "cluster")?;
    let h = pool.health();
    Some((h.iter().filter(|(_, up)| *up).count(), h.len()))
}

/// The rules now, checked off the async threads.
async fn rules(ctx: &Arc<Context>) -> Option<Result<(), String>> {
    let c = Arc::clone(ctx);
    tokio::task::spawn_blocking(move || c.resolver.metrics.node.rules_now())
        .await
        .unwrap_or_else(|e| Some(Err(format!("rules check failed: {e}"))))
}

/// (why not ready, healthy).
async fn check(ctx: &Arc<Context>) -> (Vec<String>, bool) {
    let rules = rules(ctx).await;
    let link = ctx.resolver.metrics.node.link.lock().clone();
    let inputs = ReadyInputs {
        stuck_loops: stuck(ctx),
        link,
        rules,
        cluster: cluster(ctx),
    };
    (health::not_ready(&inputs), inputs.stuck_loops == 0)
}

fn upstreams(ctx: &Context) -> Vec<UpstreamValue> {
    let settings = ctx.resolver.settings();
    let mut out = Vec::new();
    for pool in settings.upstreams.pools() {
        for (addr, up, stats) in pool.servers() {
            out.push(UpstreamValue {
                pool: pool.name.clone(),
                server: addr.to_string(),
                up,
                requests: stats.requests.load(Relaxed),
                failures: stats.failures.load(Relaxed),
                durations: stats.durations(),
            });
        }
    }
    out
}

fn scrape(ctx: &Context, ready: bool, healthy: bool) -> Scrape {
    let r = &ctx.resolver;
    Scrape {
        metrics: Arc::clone(&r.metrics),
        listeners: r.metrics.listeners(),
        cache_entries: r.cache.entries_by_kind(),
        cache_evictions: r.cache.evictions(),
        cache_bytes: r.cache.bytes() as u64,
        cache_refused: r.cache.refused(),
        in_flight: r.in_flight() as u64,
        upstreams: upstreams(ctx),
        ready,
        healthy,
        http_held: {
            let (general, reserve) = ctx.slots.held();
            [general as u64, reserve as u64]
        },
        version: env!("LOCALDNS_BUILD_VERSION").into(),
        revision: env!("LOCALDNS_BUILD_COMMIT").into(),
    }
}

async fn report(ctx: &Arc<Context>) -> Report {
    let (reasons, healthy) = check(ctx).await;
    let m = &ctx.resolver.metrics;
    let (mut hits, mut misses) = (0, 0);
    for (_, v) in m.listeners() {
        hits += v.total_hits();
        misses += v.misses;
    }
    let entries = ctx.resolver.cache.entries_by_kind();
    let describe = |state: Option<Result<(), String>>| match state {
        None => "not managed".to_string(),
        Some(Ok(())) => "present".to_string(),
        Some(Err(e)) => e,
    };
    let c = &m.config;
    let rules = describe(rules(ctx).await);
    let link = describe(m.node.link.lock().clone());
    let files: Vec<String> = ctx
        .reloads
        .sources
        .lock()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let refused = ctx.reloads.error.lock().clone();
    Report {
        version: crate::cli::VERSION.into(),
        uptime_secs: crate::metrics::unix_now().saturating_sub(m.started),
        healthy,
        ready: reasons.is_empty(),
        reasons,
        config: health::ConfigReport {
            files,
            generation: c.generation.load(Relaxed),
            last_reload_time: c.last_reload_time.load(Relaxed),
            last_reload_ok: c.last_reload_ok.load(Relaxed),
            refused,
            last_good: c.last_good.load(Relaxed),
            restart_required: ctx.reloads.restart_required.lock().clone(),
        },
        listen: ctx.listen.clone(),
        link,
        rules,
        cache: health::CacheReport {
            entries: entries[0] + entries[1],
            bytes: ctx.resolver.cache.bytes() as u64,
            hits,
            misses,
            hit_ratio: health::hit_ratio(hits, misses),
        },
        upstreams: upstreams(ctx)
            .into_iter()
            .map(|u| {
                let answered: u64 = u.durations.iter().map(|h| h.count).sum();
                let nanos: u64 = u.durations.iter().map(|h| h.sum).sum();
                health::UpstreamReport {
                    last_error: ctx
                        .resolver
                        .settings()
                        .upstreams
                        .pools()
                        .iter()
                        .find(|p| p.name == u.pool)
                        .and_then(|p| {
                            p.servers()
                                .into_iter()
                                .find(|(a, _, _)| a.to_string() == u.server)
                                .and_then(|(_, _, s)| s.last_error.lock().clone())
                        })
                        .map(|(t, e)| {
                            format!(
                                "{e} ({}s ago)",
                                crate::metrics::unix_now().saturating_sub(t)
                            )
                        }),
                    pool: u.pool,
                    server: u.server,
                    up: u.up,
                    requests: u.requests,
                    failures: u.failures,
                    mean_latency_ms: if answered == 0 {
                        0.0
                    } else {
                        nanos as f64 / answered as f64 / 1e6
                    },
                }
            })
            .collect(),
        repairs: m
            .node
            .recent_repairs()
            .into_iter()
            .map(|(time, what)| health::RepairReport { time, what })
            .collect(),
        held_back: ctx
            .resolver
            .noisy
            .recent()
            .into_iter()
            .map(|h| health::HeldBackReport {
                client: h.client.to_string(),
                queries: h.total,
                last_secs_ago: h.last_secs,
            })
            .collect(),
        endpoint: match *ctx.endpoint.late_by.lock() {
            None => "listening".into(),
            Some(late) => format!(
                "listening since {late}s after the start, after {} failed binds (another program held the address)",
                m.http_bind_failures.load(Relaxed)
            ),
        },
    }
}
