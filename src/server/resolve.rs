//! The miss path: coalescing identical misses, asking the upstream pool, filling the
//! cache, serving stale on failure, prefetching, and answering every waiting client.
//!
//! Listeners call [`Resolver::miss`] from any thread; it never blocks. The first miss for a
//! key starts one task; identical misses that arrive while it runs join its waiter list
//! and are answered from the same upstream response, each with its own ID, letter case
//! and EDNS. A waiter keeps only what its answer needs (ID, flags, question, EDNS), not
//! the client's packet.
//!
//! Budgets, decided by [`admit`] (pure, unit-tested) before anything is queued:
//! - each upstream pool has its own cap on keys being resolved (`max_in_flight`), so
//!   misses to other zones never starve the cluster domain;
//! - each client address has a cap on misses waiting (`max_in_flight_per_client`), so one
//!   pod's storm is held back by its own budget while every other pod's queries go
//!   through;
//! - each key has a cap on the clients waiting for it ([`MAX_WAITERS`]).
//!
//! A query over a budget is answered at once (counted by reason), from an expired entry
//! still in the serve-stale window when there is one (overload is exactly when a stale
//! answer helps), else with SERVFAIL. So a dead upstream or a noisy pod cannot grow memory
//! without bound, and the noisy pod is named in one rate-limited log line and in
//! `/status`, never in a line per query.
//!
//! Serve-stale follows RFC 8767's two timers: a client waiting
//! `stale_answer_client_timeout` for the refresh of an expired entry gets the stale answer
//! while the refresh goes on; and after a refresh failed, the stale answer is given at once
//! for [`STALE_RECHECK`] instead of costing every client the full upstream timeout again.

// aHash, not SipHash: these maps are keyed by what the node's own pods send and touched a few
// times per miss; per-process random keys still keep their layout unpredictable.
use ahash::AHashMap as HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::querylog::{Asked, By};
use crate::cache::{Cache, Entry};
use crate::config::Config;
use crate::dns::answer::write_error;
use crate::dns::query::Edns;
use crate::dns::{wire, Answer, Key, Kind, Query, Ttl, TtlPolicy};
use crate::metrics::{inc, Metrics, Origin, Stats};
use crate::upstream::{attempts, Pool, Upstreams};

/// Where an answer goes.
pub enum ReplyTo {
    Udp {
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
    },
    /// A TCP connection's writer (bounded in bytes); messages are sent without the length prefix.
    Tcp(super::tcp::Out),
}

/// What an answer needs of the client's query: a few dozen bytes, whatever the client
/// sent (a 4 KB query padded with records costs a waiter no more than a plain one).
struct Question {
    id: u16,
    flags: u16,
    /// The question as sent (letter case preserved).
    question: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    edns: Option<Edns>,
}

impl Question {
    fn new(q: &Query<'_>) -> Question {
        Question {
            id: q.id,
            flags: q.flags,
            question: q.question.into(),
            qtype: q.qtype,
            qclass: q.qclass,
            edns: q.edns,
        }
    }

    fn query(&self) -> Query<'_> {
        Query {
            id: self.id,
            flags: self.flags,
            question: &self.question,
            qtype: self.qtype,
            qclass: self.qclass,
            edns: self.edns,
        }
    }
}

/// A client waiting for an answer.
pub struct Waiter {
    reply: ReplyTo,
    /// Who asked (its address is whose budget it counts against).
    peer: SocketAddr,
    asked: Question,
    /// Where its answer is counted (the listener's shared block), and when it arrived.
    stats: Arc<Stats>,
    received: Instant,
}

impl Waiter {
    /// A waiter for the query in `packet` (which the hit path already parsed), or `None`
    /// if it does not parse.
    pub fn new(
        reply: ReplyTo,
        peer: SocketAddr,
        packet: &[u8],
        stats: Arc<Stats>,
        received: Instant,
    ) -> Option<Waiter> {
        let q = Query::parse(packet).ok()?;
        Some(Waiter {
            reply,
            peer,
            asked: Question::new(&q),
            stats,
            received,
        })
    }
}

/// Clients waiting on one key at most; more are answered at once (stale or SERVFAIL).
pub const MAX_WAITERS: usize = 1024;

/// After a refresh failed, its stale answer is given at once for this long (RFC 8767 §5's
/// failure recheck timer, 30 s as the RFC suggests).
pub const STALE_RECHECK: Duration = Duration::from_secs(30);

/// Keys remembered as recently failed at most; beyond it the oldest are forgotten.
const RECHECK_KEYS: usize = 10_000;

/// What to do with a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Join the resolution of the same key in flight.
    Join,
    /// Start resolving the key.
    Start,
    /// Answer at once: too many clients wait on this key.
    TooManyWaiters,
    /// Answer at once: too many keys of this pool are being resolved.
    Overload,
    /// Answer at once: this client has too many misses waiting.
    ClientBudget,
}

/// The load a miss is admitted against.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Clients waiting on the key when it is being resolved.
    waiters: Option<usize>,
    /// Keys of the key's pool being resolved.
    pool_in_flight: usize,
    /// Misses of the asking client waiting (started or joined).
    client: usize,
}

/// The caps of [`Load`].
#[derive(Debug, Clone, Copy)]
struct Budget {
    pool: usize,
    client: usize,
}

/// The miss-path admission policy. The client's own budget comes first: a client over it
/// is held back even for a key already in flight (each waiter costs memory), while a
/// client within it may join a key in flight whatever the pool's load (joining costs no
/// upstream query).
fn admit(load: Load, budget: Budget) -> Admit {
    if load.client >= budget.client {
        return Admit::ClientBudget;
    }
    match load.waiters {
        Some(n) if n >= MAX_WAITERS => Admit::TooManyWaiters,
        Some(_) => Admit::Join,
        None if load.pool_in_flight >= budget.pool => Admit::Overload,
        None => Admit::Start,
    }
}

/// What the upstream exchange produced for a key.
enum Outcome {
    /// An upstream answer, stored or not, and the server that gave it.
    Cached(Arc<Entry>, SocketAddr),
    Uncached(Answer, SocketAddr),
    Stale(Arc<Entry>),
    Fail,
}

/// What a reload may change on the miss path, swapped as a whole.
pub struct Settings {
    pub upstreams: Upstreams,
    pub policy: TtlPolicy,
    pub stale_answer_ttl: u32,
    pub stale_client_timeout: Duration,
    pub max_in_flight: usize,
    pub max_per_client: usize,
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
            stale_client_timeout: c.stale_answer_client_timeout,
            max_in_flight: cfg.upstream.max_in_flight,
            max_per_client: cfg.upstream.max_in_flight_per_client,
        }
    }
}

fn secs(d: std::time::Duration) -> u32 {
    d.as_secs().min(u32::MAX as u64) as u32
}

/// One key being resolved.
struct Flight {
    waiters: Vec<Waiter>,
    /// The client timer fired and the stale answer was given: later joiners get it at once.
    stale_given: bool,
}

/// Everything the miss path counts, behind one lock.
#[derive(Default)]
struct Table {
    flights: HashMap<Key, Flight>,
    /// Misses waiting per client address (entries at zero are removed).
    clients: HashMap<IpAddr, usize>,
    /// Keys being resolved per pool, by the pool's address (entries at zero removed).
    pools: HashMap<usize, usize>,
}

impl Table {
    fn add_client(&mut self, client: IpAddr) {
        *self.clients.entry(client).or_default() += 1;
    }

    fn remove_client(&mut self, client: IpAddr) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.clients.entry(client) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn pool_in_flight(&self, pool: &Arc<Pool>) -> usize {
        self.pools.get(&pool_id(pool)).copied().unwrap_or(0)
    }

    fn end_flight(&mut self, pool: &Arc<Pool>) {
        let id = pool_id(pool);
        if let Some(n) = self.pools.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pools.remove(&id);
            }
        }
    }
}

fn pool_id(pool: &Arc<Pool>) -> usize {
    Arc::as_ptr(pool) as usize
}

pub struct Resolver {
    pub cache: Arc<Cache>,
    settings: ArcSwap<Settings>,
    pub metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    idle: Notify,
    table: Mutex<Table>,
    /// Keys whose refresh failed, and when: their stale answer is given at once until
    /// [`STALE_RECHECK`] has passed.
    recheck: Mutex<HashMap<Key, Instant>>,
    /// Whether `recheck` may hold anything: the miss path skips its lock while it is empty
    /// (no refresh has failed lately, the usual case).
    recheck_used: AtomicBool,
    /// Clients held back by their budget: counted, logged once per interval, reported.
    pub noisy: super::noisy::Noisy,
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
            table: Mutex::new(Table::default()),
            recheck: Mutex::new(HashMap::new()),
            recheck_used: AtomicBool::new(false),
            noisy: Default::default(),
            runtime,
            query_log: Default::default(),
        }
    }

    /// A client query missed the cache: resolve it and answer the client. Never blocks.
    pub fn miss(self: &Arc<Self>, key: Key, waiter: Waiter) {
        inc(&self.metrics.misses);
        let settings = self.settings.load();
        let pool = settings.upstreams.route(key.qname());
        if self.recently_failed(&key) {
            if let Some(entry) = self.stale(&key) {
                inc(&self.metrics.stale_recheck);
                return self.respond(waiter, &Outcome::Stale(entry));
            }
        }
        let mut table = self.table.lock();
        if table.flights.get(&key).is_some_and(|f| f.stale_given) {
            drop(table);
            if let Some(entry) = self.stale(&key) {
                inc(&self.metrics.stale_client_timer);
                return self.respond(waiter, &Outcome::Stale(entry));
            }
            table = self.table.lock();
        }
        let load = Load {
            waiters: table.flights.get(&key).map(|f| f.waiters.len()),
            pool_in_flight: table.pool_in_flight(pool),
            client: table.clients.get(&waiter.peer.ip()).copied().unwrap_or(0),
        };
        let budget = Budget {
            pool: settings.max_in_flight,
            client: settings.max_per_client,
        };
        match admit(load, budget) {
            Admit::Join => {
                table.add_client(waiter.peer.ip());
                if let Some(f) = table.flights.get_mut(&key) {
                    f.waiters.push(waiter);
                }
                inc(&self.metrics.coalesced);
            }
            Admit::Start => {
                table.add_client(waiter.peer.ip());
                *table.pools.entry(pool_id(pool)).or_default() += 1;
                table.flights.insert(
                    key,
                    Flight {
                        waiters: vec![waiter],
                        stale_given: false,
                    },
                );
                drop(table);
                self.start(key, Arc::clone(pool), false);
            }
            refused => {
                drop(table);
                inc(match refused {
                    Admit::Overload => &self.metrics.overload,
                    Admit::TooManyWaiters => &self.metrics.coalesce_overflow,
                    _ => {
                        self.noisy
                            .held_back(waiter.peer.ip(), settings.max_per_client);
                        &self.metrics.client_budget
                    }
                });
                let outcome = self.stale(&key).map_or(Outcome::Fail, Outcome::Stale);
                self.respond(waiter, &outcome);
            }
        }
    }

    /// Refresh `key` before it expires, unless it is already being resolved or its pool is
    /// at its budget.
    pub fn prefetch(self: &Arc<Self>, key: Key) {
        let settings = self.settings.load();
        let pool = settings.upstreams.route(key.qname());
        let mut table = self.table.lock();
        if table.flights.contains_key(&key) || table.pool_in_flight(pool) >= settings.max_in_flight
        {
            drop(table);
            self.cache.prefetch_failed(&key);
            return;
        }
        *table.pools.entry(pool_id(pool)).or_default() += 1;
        table.flights.insert(
            key,
            Flight {
                waiters: Vec::new(),
                stale_given: false,
            },
        );
        drop(table);
        inc(&self.metrics.prefetches);
        self.start(key, Arc::clone(pool), true);
    }

    fn start(self: &Arc<Self>, key: Key, pool: Arc<Pool>, prefetch: bool) {
        self.in_flight.fetch_add(1, Relaxed);
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            let fetch = this.fetch(&key, &pool);
            tokio::pin!(fetch);
            // RFC 8767's client response timer: only for client misses of a key that has
            // a stale entry to give.
            let timer = this.settings.load().stale_client_timeout;
            let outcome = if prefetch || timer.is_zero() || this.stale(&key).is_none() {
                fetch.await
            } else {
                tokio::select! {
                    outcome = &mut fetch => outcome,
                    _ = tokio::time::sleep(timer) => {
                        this.give_stale(&key);
                        fetch.await
                    }
                }
            };
            if prefetch && !matches!(outcome, Outcome::Cached(..)) {
                this.cache.prefetch_failed(&key);
            }
            let waiters = {
                let mut table = this.table.lock();
                let flight = table.flights.remove(&key);
                table.end_flight(&pool);
                let waiters = flight.map(|f| f.waiters).unwrap_or_default();
                for w in &waiters {
                    table.remove_client(w.peer.ip());
                }
                waiters
            };
            for w in waiters {
                this.respond(w, &outcome);
            }
            if this.in_flight.fetch_sub(1, Relaxed) == 1 {
                this.idle.notify_waiters();
            }
        });
    }

    /// The client timer of `key` fired: answer its waiters from the stale entry now, and
    /// the clients that join later at once; the refresh goes on.
    fn give_stale(&self, key: &Key) {
        let Some(entry) = self.stale(key) else { return };
        let waiters = {
            let mut table = self.table.lock();
            let Some(flight) = table.flights.get_mut(key) else {
                return;
            };
            flight.stale_given = true;
            let waiters = std::mem::take(&mut flight.waiters);
            for w in &waiters {
                table.remove_client(w.peer.ip());
            }
            waiters
        };
        let outcome = Outcome::Stale(entry);
        for w in waiters {
            inc(&self.metrics.stale_client_timer);
            self.respond(w, &outcome);
        }
    }

    async fn fetch(&self, key: &Key, pool: &Arc<Pool>) -> Outcome {
        let settings = self.settings.load_full();
        let result = pool.query(key, &settings.policy, &self.metrics).await;
        // SERVFAIL or REFUSED from every server is a failure too: a stale answer beats it.
        let answer = match result {
            Ok((answer, from)) if attempts::verdict(answer.rcode()) == attempts::Verdict::Final => {
                if self.recheck_used.load(Relaxed) {
                    self.recheck.lock().remove(key);
                }
                return self.store(key, answer, from);
            }
            Ok(answer) => Some(answer),
            Err(e) => {
                tracing::debug!(name = %key.name_text(), pool = %pool.name, error = %e, "no upstream answer");
                None
            }
        };
        match (self.stale(key), answer) {
            (Some(entry), _) => {
                self.failed_refresh(key);
                Outcome::Stale(entry)
            }
            (None, Some((answer, from))) => self.store(key, answer, from),
            (None, None) => Outcome::Fail,
        }
    }

    /// The refresh of `key` failed and its stale answer was given: give it at once for
    /// [`STALE_RECHECK`].
    fn failed_refresh(&self, key: &Key) {
        let mut recheck = self.recheck.lock();
        if recheck.len() >= RECHECK_KEYS {
            let now = Instant::now();
            recheck.retain(|_, at| now.duration_since(*at) < STALE_RECHECK);
            if recheck.len() >= RECHECK_KEYS {
                recheck.clear();
            }
        }
        recheck.insert(*key, Instant::now());
        self.recheck_used.store(true, Relaxed);
    }

    fn recently_failed(&self, key: &Key) -> bool {
        if !self.recheck_used.load(Relaxed) {
            return false;
        }
        let mut recheck = self.recheck.lock();
        if recheck.is_empty() {
            self.recheck_used.store(false, Relaxed);
            return false;
        }
        match recheck.get(key) {
            None => false,
            Some(at) if at.elapsed() < STALE_RECHECK => true,
            Some(_) => {
                recheck.remove(key);
                false
            }
        }
    }

    fn store(&self, key: &Key, answer: Answer, from: SocketAddr) -> Outcome {
        if answer.ttl == 0 || answer.kind == Kind::Uncacheable {
            return Outcome::Uncached(answer, from);
        }
        match self.cache.insert(key, answer) {
            Ok(entry) => Outcome::Cached(entry, from),
            Err(answer) => Outcome::Uncached(answer, from),
        }
    }

    fn stale(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache
            .get(key)
            .filter(|e| e.answer.kind != Kind::ServFail)
    }

    fn respond(&self, w: Waiter, outcome: &Outcome) {
        let q = w.asked.query();
        let limit = match w.reply {
            ReplyTo::Udp { .. } => q.udp_limit(),
            ReplyTo::Tcp(_) => u16::MAX as usize,
        };
        let mut out = Vec::with_capacity(512);
        let stale_ttl = self.settings.load().stale_answer_ttl;
        let origin = match outcome {
            Outcome::Cached(..) | Outcome::Uncached(..) => Origin::Forward,
            Outcome::Stale(_) => Origin::Cache,
            Outcome::Fail => Origin::Server,
        };
        let truncated = match outcome {
            Outcome::Cached(e, _) => {
                let age = e.age_secs(self.cache.now_ms());
                e.answer.render(&mut out, &q, Ttl::Age(age), limit)
            }
            Outcome::Uncached(a, _) => a.render(&mut out, &q, Ttl::Age(0), limit),
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
        let by = match outcome {
            Outcome::Cached(_, from) | Outcome::Uncached(_, from) => By::Upstream(Some(*from)),
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
                client: Some(w.peer),
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

    fn admit3(waiters: Option<usize>, pool: usize, client: usize) -> Admit {
        admit(
            Load {
                waiters,
                pool_in_flight: pool,
                client,
            },
            Budget {
                pool: 10,
                client: 4,
            },
        )
    }

    #[test]
    fn admission() {
        assert_eq!(admit3(None, 0, 0), Admit::Start);
        assert_eq!(admit3(None, 9, 0), Admit::Start);
        assert_eq!(admit3(None, 10, 0), Admit::Overload);
        // Joining costs no upstream query: allowed over the pool's budget, up to the bound.
        assert_eq!(admit3(Some(1), 10, 0), Admit::Join);
        assert_eq!(admit3(Some(MAX_WAITERS - 1), 0, 0), Admit::Join);
        assert_eq!(admit3(Some(MAX_WAITERS), 0, 0), Admit::TooManyWaiters);
    }

    #[test]
    fn a_client_over_its_budget_is_held_back_whatever_else_is_free() {
        assert_eq!(admit3(None, 0, 3), Admit::Start);
        assert_eq!(admit3(None, 0, 4), Admit::ClientBudget);
        assert_eq!(
            admit3(Some(1), 0, 4),
            Admit::ClientBudget,
            "joining costs memory too"
        );
        // Another client, same pool and key: goes through.
        assert_eq!(admit3(Some(1), 9, 0), Admit::Join);
        assert_eq!(admit3(None, 9, 0), Admit::Start);
    }

    /// The table's budgets: a storm from one client stops at its budget while another
    /// client still starts; ending flights gives everything back.
    #[test]
    fn the_table_counts_clients_and_pools_and_gives_back() {
        let mut t = Table::default();
        let a: IpAddr = "10.244.0.2".parse().unwrap();
        let b: IpAddr = "10.244.0.3".parse().unwrap();
        for _ in 0..4 {
            t.add_client(a);
        }
        t.add_client(b);
        assert_eq!(t.clients.get(&a), Some(&4));
        for _ in 0..4 {
            t.remove_client(a);
        }
        assert_eq!(t.clients.get(&a), None, "entries at zero are removed");
        t.remove_client(a);
        assert_eq!(t.clients.get(&a), None, "never below zero");
        assert_eq!(t.clients.get(&b), Some(&1));
    }
}
