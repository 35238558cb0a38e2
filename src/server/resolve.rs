//! The miss path: coalescing identical misses, asking the upstream pool, filling the
//! cache, serving stale on failure, prefetching, and answering every waiting client.
//!
//! Listeners call [`Resolver::miss`] from any thread; it never blocks. The first miss for a
//! key starts one task; identical misses that arrive while it runs join its waiter list
//! and are answered from the same upstream response, each with its own ID, letter case
//! and EDNS. The number of keys being resolved at once is capped, and so is the number of
//! clients waiting on one key ([`MAX_WAITERS`]): a query over either cap is answered at
//! once (counted), from an expired entry still in the serve-stale window when there is one
//! (overload is exactly when a stale answer helps), else with SERVFAIL. So a dead upstream
//! cannot grow memory without bound.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};

use super::querylog::{Asked, By};
use crate::cache::{Cache, Entry};
use crate::config::Config;
use crate::dns::answer::write_error;
use crate::dns::{wire, Answer, Key, Kind, Query, Ttl, TtlPolicy};
use crate::metrics::{inc, Metrics, Origin, Stats};
use crate::upstream::Upstreams;

/// Where an answer goes.
pub enum ReplyTo {
    Udp {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
    },
    /// A TCP connection's writer; messages are sent without the length prefix.
    Tcp(mpsc::UnboundedSender<Vec<u8>>),
}

/// A client waiting for an answer: where to send it and its original query packet.
pub struct Waiter {
    pub reply: ReplyTo,
    pub packet: Vec<u8>,
    /// Where its answer is counted (the listener's shared block), and when it arrived.
    pub stats: Arc<Stats>,
    pub received: std::time::Instant,
}

/// Clients waiting on one key at most; more are answered at once (stale or SERVFAIL).
pub const MAX_WAITERS: usize = 1024;

/// What to do with a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Join the resolution of the same key in flight.
    Join,
    /// Start resolving the key.
    Start,
    /// Answer at once: too many clients wait on this key.
    TooManyWaiters,
    /// Answer at once: too many keys are being resolved.
    Overload,
}

/// The miss-path admission policy: `waiters` on the key when it is being resolved,
/// `in_flight` keys being resolved of at most `max_in_flight`.
fn admit(waiters: Option<usize>, in_flight: usize, max_in_flight: usize) -> Admit {
    match waiters {
        Some(n) if n >= MAX_WAITERS => Admit::TooManyWaiters,
        Some(_) => Admit::Join,
        None if in_flight >= max_in_flight => Admit::Overload,
        None => Admit::Start,
    }
}

/// What the upstream exchange produced for a key.
enum Outcome {
    Cached(Arc<Entry>),
    Uncached(Answer),
    Stale(Arc<Entry>),
    Fail,
}

/// What a reload may change on the miss path, swapped as a whole.
pub struct Settings {
    pub upstreams: Upstreams,
    pub policy: TtlPolicy,
    pub stale_answer_ttl: u32,
    pub max_in_flight: usize,
}

impl Settings {
    /// Settings for `cfg`, reusing the pools of `previous` that did not change (so their
    /// health and connections survive a reload).
    pub fn from_config(cfg: &Config, previous: Option<&Settings>) -> Settings {
        let c = &cfg.cache;
        Settings {
            upstreams: Upstreams::from_config(cfg, previous.map(|p| &p.upstreams)),
            policy: TtlPolicy {
                min_ttl: secs(c.min_ttl),
                max_ttl: secs(c.max_ttl),
                negative_max_ttl: secs(c.negative_max_ttl),
                servfail_ttl: secs(c.servfail_ttl),
            },
            stale_answer_ttl: secs(c.stale_answer_ttl),
            max_in_flight: cfg.upstream.max_in_flight,
        }
    }
}

fn secs(d: std::time::Duration) -> u32 {
    d.as_secs().min(u32::MAX as u64) as u32
}

pub struct Resolver {
    pub cache: Arc<Cache>,
    settings: ArcSwap<Settings>,
    pub metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    idle: Notify,
    waiting: Mutex<HashMap<Key, Vec<Waiter>>>,
    runtime: Handle,
    /// `[log] queries`.
    pub query_log: super::querylog::QueryLog,
}

impl Resolver {
    pub fn new(
        cache: Arc<Cache>,
        settings: Settings,
        metrics: Arc<Metrics>,
        runtime: Handle,
    ) -> Resolver {
        Resolver {
            cache,
            settings: ArcSwap::from_pointee(settings),
            metrics,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            waiting: Mutex::new(HashMap::new()),
            runtime,
            query_log: Default::default(),
        }
    }

    /// A client query missed the cache: resolve it and answer the client. Never blocks.
    pub fn miss(self: &Arc<Self>, key: Key, waiter: Waiter) {
        inc(&self.metrics.misses);
        let mut waiting = self.waiting.lock();
        let admit = admit(
            waiting.get(&key).map(Vec::len),
            self.in_flight.load(Relaxed),
            self.settings.load().max_in_flight,
        );
        match admit {
            Admit::Join => {
                if let Some(list) = waiting.get_mut(&key) {
                    list.push(waiter);
                }
                inc(&self.metrics.coalesced);
            }
            Admit::Start => {
                waiting.insert(key, vec![waiter]);
                drop(waiting);
                self.start(key, false);
            }
            Admit::TooManyWaiters | Admit::Overload => {
                drop(waiting);
                inc(if admit == Admit::Overload {
                    &self.metrics.overload
                } else {
                    &self.metrics.coalesce_overflow
                });
                let outcome = self.stale(&key).map_or(Outcome::Fail, Outcome::Stale);
                self.respond(waiter, &outcome);
            }
        }
    }

    /// Refresh `key` before it expires, unless it is already being resolved.
    pub fn prefetch(self: &Arc<Self>, key: Key) {
        let mut waiting = self.waiting.lock();
        if waiting.contains_key(&key)
            || self.in_flight.load(Relaxed) >= self.settings.load().max_in_flight
        {
            drop(waiting);
            self.cache.prefetch_failed(&key);
            return;
        }
        waiting.insert(key, Vec::new());
        drop(waiting);
        inc(&self.metrics.prefetches);
        self.start(key, true);
    }

    fn start(self: &Arc<Self>, key: Key, prefetch: bool) {
        self.in_flight.fetch_add(1, Relaxed);
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            let outcome = this.fetch(&key).await;
            if prefetch && !matches!(outcome, Outcome::Cached(_)) {
                this.cache.prefetch_failed(&key);
            }
            let waiters = this.waiting.lock().remove(&key).unwrap_or_default();
            for w in waiters {
                this.respond(w, &outcome);
            }
            if this.in_flight.fetch_sub(1, Relaxed) == 1 {
                this.idle.notify_waiters();
            }
        });
    }

    async fn fetch(&self, key: &Key) -> Outcome {
        let settings = self.settings.load_full();
        let pool = Arc::clone(settings.upstreams.route(key.qname()));
        match pool.query(key, &settings.policy, &self.metrics).await {
            Ok(answer) if answer.kind == Kind::ServFail => match self.stale(key) {
                Some(entry) => Outcome::Stale(entry),
                None => self.store(key, answer),
            },
            Ok(answer) => self.store(key, answer),
            Err(e) => {
                tracing::debug!(name = %key.name_text(), pool = %pool.name, error = %e, "no upstream answer");
                match self.stale(key) {
                    Some(entry) => Outcome::Stale(entry),
                    None => Outcome::Fail,
                }
            }
        }
    }

    fn store(&self, key: &Key, answer: Answer) -> Outcome {
        if answer.ttl == 0 || answer.kind == Kind::Uncacheable {
            return Outcome::Uncached(answer);
        }
        match self.cache.insert(key, answer.clone()) {
            Some(entry) => Outcome::Cached(entry),
            None => Outcome::Uncached(answer),
        }
    }

    fn stale(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache
            .get(key)
            .filter(|e| e.answer.kind != Kind::ServFail)
    }

    fn respond(&self, w: Waiter, outcome: &Outcome) {
        let Ok(q) = Query::parse(&w.packet) else {
            return;
        };
        let limit = match w.reply {
            ReplyTo::Udp { .. } => q.udp_limit(),
            ReplyTo::Tcp(_) => u16::MAX as usize,
        };
        let mut out = Vec::with_capacity(512);
        let stale_ttl = self.settings.load().stale_answer_ttl;
        let origin = match outcome {
            Outcome::Cached(_) | Outcome::Uncached(_) => Origin::Forward,
            Outcome::Stale(_) => Origin::Cache,
            Outcome::Fail => Origin::Server,
        };
        let truncated = match outcome {
            Outcome::Cached(e) => {
                let age = e.age_secs(self.cache.now_ms());
                e.answer.render(&mut out, &q, Ttl::Age(age), limit)
            }
            Outcome::Uncached(a) => a.render(&mut out, &q, Ttl::Age(0), limit),
            Outcome::Stale(e) => {
                inc(&self.metrics.stale_answers);
                e.answer.render(&mut out, &q, Ttl::Fixed(stale_ttl), limit)
            }
            Outcome::Fail => {
                inc(&self.metrics.servfail_sent);
                write_error(&mut out, q.id, q.flags, wire::RCODE_SERVFAIL, Some(&q), 0);
                false
            }
        };
        if truncated {
            inc(&self.metrics.truncated);
        }
        w.stats.response(&out, 0, origin);
        // Which server answered is not known here yet (`Pool::query` returns the answer
        // only): `By::Upstream(None)` until it does.
        let by = match outcome {
            Outcome::Cached(_) | Outcome::Uncached(_) => By::Upstream(None),
            Outcome::Stale(_) => By::Stale,
            Outcome::Fail => By::Localdns,
        };
        self.query_log.answer(
            || q.key().name_text(),
            q.qtype,
            &out,
            by,
            || Asked {
                proto: match w.reply {
                    ReplyTo::Udp { .. } => "udp",
                    ReplyTo::Tcp(_) => "tcp",
                },
                client: match &w.reply {
                    ReplyTo::Udp { peer, .. } => Some(*peer),
                    ReplyTo::Tcp(_) => None,
                },
                received: Some(w.received),
            },
        );
        w.stats.durations(w.received.elapsed().as_nanos() as u64, 1);
        send(&self.metrics, w.reply, out);
    }

    /// Wait until no upstream query is in flight (for a graceful stop).
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Swap in the settings of a new config. Cached answers stay, except those whose
    /// name is now routed to different servers: they are dropped so that no answer from
    /// the old routing is served after a reload.
    pub fn apply(&self, cfg: &Config) {
        let old = self.settings.load_full();
        let new = Settings::from_config(cfg, Some(&old));
        let dropped = self.cache.retain(|key| {
            old.upstreams
                .route(key.qname())
                .same_servers(new.upstreams.route(key.qname()))
        });
        self.cache.set_limits(&cfg.cache);
        self.query_log.set(cfg.log.queries);
        self.settings.store(Arc::new(new));
        if dropped > 0 {
            tracing::info!(
                dropped,
                "routing changed: dropped the cached answers it affects"
            );
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

/// Send an answer; errors are counted, never fatal. The UDP socket is the listener's,
/// blocking for its receive loop: the send here runs on a runtime worker and must not
/// wait for room in a full send buffer (every miss answer behind it would wait too), so
/// it is sent with `MSG_DONTWAIT` and a full buffer is a send error (the client retries,
/// as for any lost datagram).
pub fn send(metrics: &Metrics, to: ReplyTo, msg: Vec<u8>) {
    let ok = match to {
        ReplyTo::Udp { socket, peer } => socket2::SockRef::from(&*socket)
            .send_to_with_flags(&msg, &peer.into(), nix::libc::MSG_DONTWAIT)
            .is_ok(),
        ReplyTo::Tcp(tx) => tx.send(msg).is_ok(),
    };
    if !ok {
        inc(&metrics.send_errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission() {
        assert_eq!(admit(None, 0, 10), Admit::Start);
        assert_eq!(admit(None, 9, 10), Admit::Start);
        assert_eq!(admit(None, 10, 10), Admit::Overload);
        // Joining costs no upstream query: allowed over max_in_flight, up to the bound.
        assert_eq!(admit(Some(1), 10, 10), Admit::Join);
        assert_eq!(admit(Some(MAX_WAITERS - 1), 0, 10), Admit::Join);
        assert_eq!(admit(Some(MAX_WAITERS), 0, 10), Admit::TooManyWaiters);
    }
}
