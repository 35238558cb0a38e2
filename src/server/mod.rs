//! Serving: bind the listeners, run the hit path on them, hand misses to the resolver,
//! expose metrics, and stop cleanly.
//!
//! Life cycle: [`Server::bind`] turns a validated config into bound sockets and a
//! resolver (fails with the address that could not be bound); [`Server::run`] serves
//! until the shutdown future completes, then stops receiving, answers what is in flight
//! and returns.

pub mod http;
pub mod resolve;
pub mod tcp;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Cache, Hit, PrefetchPolicy};
use crate::config::Config;
use crate::dns::answer::write_error;
use crate::dns::{wire, Key, Query, Reject, Ttl, TtlPolicy};
use crate::metrics::{inc, Metrics};
use crate::upstream::Upstreams;
use resolve::Resolver;

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
pub fn handle(resolver: &Arc<Resolver>, pkt: &[u8], out: &mut Vec<u8>, tcp: bool) -> Action {
    let m = &resolver.metrics;
    let q = match Query::parse(pkt) {
        Ok(q) => q,
        Err(Reject::Drop) => {
            inc(&m.dropped);
            return Action::Drop;
        }
        Err(Reject::FormErr { id, flags }) => {
            inc(&m.formerr);
            write_error(out, id, flags, wire::RCODE_FORMERR, None, 0);
            return Action::Reply;
        }
        Err(Reject::NotImp { id, flags }) => {
            inc(&m.notimp);
            write_error(out, id, flags, wire::RCODE_NOTIMP, None, 0);
            return Action::Reply;
        }
        Err(Reject::BadVers { id, flags }) => {
            inc(&m.formerr);
            // BADVERS is extended RCODE 16: upper bits 1, header bits 0 (RFC 6891 §6.1.3).
            write_error(out, id, flags, wire::RCODE_NOERROR, None, 1);
            return Action::Reply;
        }
    };
    let key = q.key();
    let limit = if tcp {
        u16::MAX as usize
    } else {
        q.udp_limit()
    };
    match resolver.cache.with_fresh(&key, |e, age| {
        e.answer.render(out, &q, Ttl::Age(age), limit)
    }) {
        Hit::Fresh {
            value: truncated,
            prefetch,
        } => {
            if truncated {
                inc(&m.truncated);
            }
            if prefetch {
                resolver.prefetch(key);
            }
            Action::Hit
        }
        Hit::Miss => Action::Miss(key),
    }
}

/// Bound sockets and the shared state, ready to serve.
pub struct Server {
    config: Config,
    resolver: Arc<Resolver>,
    udp: Vec<Arc<std::net::UdpSocket>>,
    tcp: Vec<std::net::TcpListener>,
    http: Option<std::net::TcpListener>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {proto} {addr}: {source}")]
pub struct BindError {
    proto: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

impl Server {
    /// Build the cache, pools and resolver and bind every listener. Must be called inside
    /// the tokio runtime that will run the miss path.
    pub fn bind(config: Config, metrics: Arc<Metrics>) -> Result<Server, BindError> {
        let c = &config.cache;
        let secs = |d: Duration| d.as_secs().min(u32::MAX as u64) as u32;
        let cache = Arc::new(Cache::new(
            c.capacity,
            c.serve_stale.as_secs(),
            PrefetchPolicy {
                enabled: c.prefetch,
                min_hits: c.prefetch_min_hits,
                percent: c.prefetch_percent,
            },
        ));
        let policy = TtlPolicy {
            min_ttl: secs(c.min_ttl),
            max_ttl: secs(c.max_ttl),
            negative_max_ttl: secs(c.negative_max_ttl),
            servfail_ttl: secs(c.servfail_ttl),
        };
        let resolver = Arc::new(Resolver::new(
            cache,
            Upstreams::from_config(&config),
            policy,
            secs(c.stale_answer_ttl),
            config.upstream.max_in_flight,
            metrics,
            tokio::runtime::Handle::current(),
        ));
        let l = &config.listen;
        let threads = match l.udp_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &ip in &l.addresses {
            let addr = SocketAddr::new(ip, l.port);
            for _ in 0..threads {
                let s = udp::bind(addr, l.udp_recv_buffer).map_err(|source| BindError {
                    proto: "udp",
                    addr,
                    source,
                })?;
                udp.push(Arc::new(s));
            }
            tcp.push(tcp::bind(addr).map_err(|source| BindError {
                proto: "tcp",
                addr,
                source,
            })?);
        }
        let http = match config.metrics.address {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|_| s))
                    .map_err(|source| BindError {
                        proto: "http",
                        addr,
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Server {
            config,
            resolver,
            udp,
            tcp,
            http,
        })
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    /// Serve until `shutdown` completes; `ready` is called once everything listens.
    pub async fn run(
        self,
        ready: impl FnOnce(),
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, sock) in self.udp.iter().enumerate() {
            let (sock, resolver, stop) = (
                Arc::clone(sock),
                Arc::clone(&self.resolver),
                Arc::clone(&stop),
            );
            let hot = self.resolver.metrics.udp_worker();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("udp-{i}"))
                    .spawn(move || udp::serve(sock, resolver, hot, stop))?,
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        let l = &self.config.listen;
        for listener in self.tcp {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.spawn(tcp::serve(
                listener,
                Arc::clone(&self.resolver),
                l.tcp_idle_timeout,
                l.tcp_max_connections,
            ));
        }
        if let Some(listener) = self.http {
            tasks.spawn(http::serve(
                tokio::net::TcpListener::from_std(listener)?,
                Arc::clone(&self.resolver),
            ));
        }
        let addrs: Vec<String> = l
            .addresses
            .iter()
            .map(|a| SocketAddr::new(*a, l.port).to_string())
            .collect();
        tracing::info!(
            listen = %addrs.join(","),
            udp_sockets = self.udp.len(),
            upstreams = %self.config.upstream.servers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
            cluster_upstreams = %self.config.cluster.upstream.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
            "serving"
        );
        ready();
        shutdown.await;

        tracing::info!("stopping: no new queries, answering those in flight");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tasks.abort_all();
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        let _ = tokio::time::timeout(Duration::from_secs(3), self.resolver.drained()).await;
        tracing::info!("stopped");
        Ok(())
    }
}
