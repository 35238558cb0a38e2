//! Persistent, pipelined TCP connections to one upstream (RFC 7766 §6.2.1): many queries
//! in flight on one connection, answers matched by ID, reconnected on demand.
//!
//! A connection whose peer stops answering is given up, not waited on: when the peer
//! vanishes without a RST (a kube-dns pod dead with its node, its packets dropped), the
//! kernel would keep retransmitting for about 15 minutes, and every query written on the
//! connection would time out meanwhile. So the connection task watches for answers that
//! are overdue: when queries are pending and nothing has been read for the attempt timeout
//! (counted from the later of the last answer read and the moment the oldest pending query
//! was written), the connection is closed and the next query dials a new one, which
//! kube-proxy sends to a live backend. Queries whose callers already timed out stay
//! pending and still count, so a silent peer is seen even when every caller gave up. One
//! slow name among answered ones does not close the connection: answers keep arriving.
//! Writes are bounded by the same timeout, so a peer that stops reading cannot stall the
//! task (and with it the reading of answers) for longer than that.
//!
//! Several connections per server, each with a maximum age and query count: kube-proxy
//! (iptables, IPVS or an eBPF replacement) picks a kube-dns replica per *connection*, so
//! one pinned connection would send this node's whole cluster load to one replica for good
//! and CoreDNS scale-out would never get it. Queries go round-robin over
//! `tcp_connections` slots; a slot whose connection is past its age (jittered, so the
//! slots do not all redial at once) or its query count gets a fresh connection (a fresh
//! DNAT decision) for the next query, while the old one drains: it writes what was queued
//! to it, reads every answer still pending and closes when none is left (or when the peer
//! is silent, as above). A pipelined answer is never dropped for a rotation.
//!
//! When one connection is found silent, its siblings that have read nothing since that
//! connection's silence began are replaced too, before they are used again: they have not
//! shown they are alive, they are likely to lead to the same dead replica, and trying them
//! one by one would cost a query one timeout per connection (with 4 connections and 3
//! attempts, a SERVFAIL where one connection cost one timeout). The silence is noted by
//! whichever sees it first: the connection task's timer, or the caller whose attempt timed
//! out with nothing read on its connection since its query was sent (its retry comes
//! right after, and must already see the siblings as stale).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::exchange::{read_frame, ExchangeError};
use crate::dns::wire;

/// Close the connection after this long with nothing in flight.
const IDLE: Duration = Duration::from_secs(30);
/// Queries waiting for the connection's writer at most.
const QUEUE: usize = 4096;

/// What the connection task sends back for one query.
enum Reply {
    Answer(Vec<u8>),
    /// The connection was given up before this query was written: send it on a new one.
    Unsent,
}

struct Request {
    msg: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

/// How many connections a server gets and when one is replaced (the `upstream.tcp_*`
/// settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// Connections per server, at least 1.
    pub connections: usize,
    /// Age after which a connection takes no new queries; zero = no limit.
    pub max_age: Duration,
    /// Queries after which a connection takes no new ones; 0 = no limit.
    pub max_queries: u32,
}

impl Default for Spread {
    fn default() -> Self {
        Spread {
            connections: 1,
            max_age: Duration::ZERO,
            max_queries: 0,
        }
    }
}

/// Does a connection opened `age` ago, that was handed `queries` queries and was given
/// `max_age` (the jittered limit), take no more? Then the next query opens a new one.
fn expired(age: Duration, queries: u32, max_age: Duration, max_queries: u32) -> bool {
    (!max_age.is_zero() && age >= max_age) || (max_queries > 0 && queries >= max_queries)
}

/// This connection's own age limit: between 80% and 100% of the setting (`jitter` in
/// [0, 1)), so that connections opened together are not all replaced together.
fn jittered_age(max_age: Duration, jitter: f64) -> Duration {
    max_age.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
}

/// Is a connection whose last read (or opening) was at `last_read` (µs on the pipeline's
/// clock) presumed dead, a sibling having been found silent since `silent_since`? The same
/// rule tells whether a connection is itself silent since a query was sent at
/// `silent_since`.
fn stale(last_read: u64, silent_since: u64) -> bool {
    last_read < silent_since
}

/// One slot's connection: its queue and what decides its replacement.
#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Request>,
    opened: Instant,
    max_age: Duration,
    queries: u32,
    /// When it last read an answer (or opened), µs on the pipeline's clock.
    last_read: Arc<AtomicU64>,
}

/// What the connection tasks of one server share with their pipeline.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    /// The latest start of a silence that made a connection give up (µs on this clock):
    /// connections that read nothing since are replaced before their next query.
    silent_since: AtomicU64,
}

impl Shared {
    /// Microseconds since the epoch, plus one (0 = never): fine enough that a read and a
    /// write a moment apart are ordered.
    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }
}

/// Handle on the (lazily opened) connections to one server.
#[derive(Debug)]
pub struct Pipeline {
    server: SocketAddr,
    /// Answers overdue by this long make the connection silent (the pool's attempt timeout).
    timeout: Duration,
    spread: Spread,
    /// `spread.connections` slots, each empty until a query needs it.
    conns: Mutex<Vec<Option<Conn>>>,
    /// Round-robin over the slots.
    next: AtomicUsize,
    shared: Arc<Shared>,
}

impl Pipeline {
    pub fn new(server: SocketAddr, timeout: Duration, spread: Spread) -> Pipeline {
        let n = spread.connections.max(1);
        Pipeline {
            server,
            timeout,
            spread,
            conns: Mutex::new((0..n).map(|_| None).collect()),
            next: AtomicUsize::new(0),
            shared: Arc::new(Shared {
                epoch: Instant::now(),
                silent_since: AtomicU64::new(0),
            }),
        }
    }

    /// Send one query (complete DNS message, any ID) and wait for its answer, which comes
    /// back with the caller's ID. The caller bounds the wait with its own timeout.
    pub async fn exchange(&self, msg: Vec<u8>) -> Result<Vec<u8>, ExchangeError> {
        // A query handed to a connection that was given up before writing it is sent once
        // more, on a new connection.
        for _ in 0..2 {
            let (tx, last_read) = self.sender();
            let (reply, answer) = oneshot::channel();
            let request = Request {
                msg: msg.clone(),
                reply,
            };
            match tx.try_send(request) {
                Ok(()) => {}
                // Given up between taking its queue and sending: take the new one.
                Err(mpsc::error::TrySendError::Closed(_)) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => return Err(ExchangeError::Closed),
            }
            // Only the slot keeps a rotated-out connection's queue open: let it drain.
            drop(tx);
            let mut waiting = Waiting {
                shared: &self.shared,
                last_read,
                sent: Instant::now(),
                timeout: self.timeout,
                answered: false,
            };
            let reply = answer.await;
            waiting.answered = true;
            match reply {
                Ok(Reply::Answer(resp)) => return Ok(resp),
                Ok(Reply::Unsent) => continue,
                Err(_) => return Err(ExchangeError::Closed),
            }
        }
        Err(ExchangeError::Closed)
    }

    /// The next slot's queue: its open connection's, or a new connection's when it has
    /// none, it closed, it is past its age or query count, or it is stale after a sibling
    /// was found silent (the old one then drains: dropping its last sender ends its queue
    /// after what was already queued).
    fn sender(&self) -> (mpsc::Sender<Request>, Arc<AtomicU64>) {
        let now = Instant::now();
        let mut conns = self.conns.lock();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len();
        let slot = &mut conns[i];
        let silent_since = self.shared.silent_since.load(Ordering::Relaxed);
        let fresh = match slot {
            Some(c) => {
                c.tx.is_closed()
                    || expired(
                        now.saturating_duration_since(c.opened),
                        c.queries,
                        c.max_age,
                        self.spread.max_queries,
                    )
                    || stale(c.last_read.load(Ordering::Relaxed), silent_since)
            }
            None => true,
        };
        if fresh {
            let (tx, rx) = mpsc::channel(QUEUE);
            let last_read = Arc::new(AtomicU64::new(self.shared.us(now)));
            let task = Task {
                server: self.server,
                timeout: self.timeout,
                shared: Arc::clone(&self.shared),
                last_read: Arc::clone(&last_read),
            };
            tokio::spawn(run(task, rx));
            *slot = Some(Conn {
                tx,
                opened: now,
                max_age: jittered_age(self.spread.max_age, rand::random()),
                queries: 0,
                last_read,
            });
        }
        let c = slot.as_mut().expect("the slot was just filled");
        c.queries = c.queries.saturating_add(1);
        (c.tx.clone(), Arc::clone(&c.last_read))
    }
}

/// A caller waiting for its answer. Dropped unanswered (its attempt timed out) on a
/// connection that read nothing since the query was sent, it marks the connection's
/// silence at once: the caller's timeout can fire before the connection task's own timer,
/// and its retry must not pick a sibling that the silence makes stale.
struct Waiting<'a> {
    shared: &'a Shared,
    last_read: Arc<AtomicU64>,
    sent: Instant,
    timeout: Duration,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // A caller dropped much earlier (shutdown, not a timeout) says nothing of the peer.
        if self.answered || self.sent.elapsed() < self.timeout / 2 {
            return;
        }
        let sent = self.shared.us(self.sent);
        if stale(self.last_read.load(Ordering::Relaxed), sent) {
            self.shared.silent_since.fetch_max(sent, Ordering::Relaxed);
        }
    }
}

/// Is the connection silent at `now`? Queries are pending and nothing was read for
/// `timeout` since `progress` (the later of the last answer read and the write of the
/// oldest query still pending).
fn silent(pending: usize, progress: Instant, timeout: Duration, now: Instant) -> bool {
    pending > 0 && now.saturating_duration_since(progress) >= timeout
}

/// The connection task: writes queries under fresh unique IDs, reads answers, hands each
/// back with the caller's original ID. Ends (failing everything pending) on any error,
/// when the peer is silent, or on idle. When its queue is closed (the slot moved on to a
/// new connection, or the pool is gone) it drains: it reads the answers still pending and
/// ends when none is left.
/// What a connection task is given.
struct Task {
    server: SocketAddr,
    timeout: Duration,
    shared: Arc<Shared>,
    last_read: Arc<AtomicU64>,
}

impl Task {
    /// Close a silent connection (see [`give_up`]) and mark its siblings that read nothing
    /// since `progress` stale.
    fn give_up(&self, rx: mpsc::Receiver<Request>, pending: usize, progress: Instant) {
        let since = self.shared.us(progress);
        self.shared.silent_since.fetch_max(since, Ordering::Relaxed);
        give_up(self.server, rx, pending);
    }
}

async fn run(task: Task, mut rx: mpsc::Receiver<Request>) {
    let (server, timeout) = (task.server, task.timeout);
    let connect = Duration::from_secs(2).min(timeout.max(Duration::from_millis(100)));
    let stream = match tokio::time::timeout(connect, TcpStream::connect(server)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(upstream = %server, error = %e, "TCP connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(upstream = %server, "TCP connect timed out");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut writer = BufWriter::new(writer);
    // wire ID -> (caller's ID, reply)
    let mut pending: HashMap<u16, (u16, oneshot::Sender<Reply>)> = HashMap::new();
    let mut progress = Instant::now();
    let mut read = Box::pin(next_frame(reader));
    let mut draining = false;
    loop {
        if draining && pending.is_empty() {
            return;
        }
        tokio::select! {
            req = rx.recv(), if !draining => {
                let Some(mut req) = req else {
                    draining = true;
                    continue;
                };
                if silent(pending.len(), progress, timeout, Instant::now()) {
                    let _ = req.reply.send(Reply::Unsent);
                    return task.give_up(rx, pending.len(), progress);
                }
                if pending.len() >= u16::MAX as usize / 2 {
                    pending.retain(|_, (_, tx)| !tx.is_closed());
                    if pending.len() >= u16::MAX as usize / 2 { continue; }
                }
                let caller_id = wire::u16_at(&req.msg, 0).unwrap_or(0);
                let id = loop {
                    let id: u16 = rand::random();
                    if !pending.contains_key(&id) { break id; }
                };
                wire::put_u16(&mut req.msg, 0, id);
                // Flush only when no other query is queued right behind this one.
                let flush = rx.is_empty();
                let written = tokio::time::timeout(timeout, write(&mut writer, &req.msg, flush)).await;
                if !matches!(written, Ok(Ok(()))) {
                    tracing::debug!(upstream = %server, "TCP write failed or timed out: connection closed");
                    return;
                }
                if pending.is_empty() {
                    progress = Instant::now();
                }
                pending.insert(id, (caller_id, req.reply));
            }
            (res, reader) = &mut read => {
                let Ok(mut msg) = res else { return };
                progress = Instant::now();
                task.last_read.store(task.shared.us(progress), Ordering::Relaxed);
                if let Some(id) = wire::u16_at(&msg, 0) {
                    if let Some((caller_id, reply)) = pending.remove(&id) {
                        wire::put_u16(&mut msg, 0, caller_id);
                        let _ = reply.send(Reply::Answer(msg));
                    }
                }
                read = Box::pin(next_frame(reader));
            }
            _ = tokio::time::sleep_until(progress + timeout), if !pending.is_empty() => {
                return task.give_up(rx, pending.len(), progress);
            }
            _ = tokio::time::sleep(IDLE), if pending.is_empty() && !draining => return,
        }
    }
}

/// Close a silent connection: queries queued but not written yet go back to their callers
/// to be sent on a new connection; pending ones fail when `pending` is dropped.
fn give_up(server: SocketAddr, mut rx: mpsc::Receiver<Request>, pending: usize) {
    tracing::warn!(upstream = %server, pending,
        "upstream {server}: TCP connection silent ({pending} answers overdue): closed, a new one is dialled");
    rx.close();
    while let Ok(req) = rx.try_recv() {
        let _ = req.reply.send(Reply::Unsent);
    }
}

async fn write(w: &mut BufWriter<OwnedWriteHalf>, msg: &[u8], flush: bool) -> std::io::Result<()> {
    w.write_all(&(msg.len() as u16).to_be_bytes()).await?;
    w.write_all(msg).await?;
    if flush {
        w.flush().await?;
    }
    Ok(())
}

async fn next_frame(mut reader: OwnedReadHalf) -> (std::io::Result<Vec<u8>>, OwnedReadHalf) {
    let r = read_frame(&mut reader).await;
    (r, reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_only_with_pending_queries_overdue() {
        let t = Duration::from_secs(1);
        let p = Instant::now();
        assert!(
            !silent(0, p, t, p + Duration::from_secs(60)),
            "idle is not silent"
        );
        assert!(!silent(3, p, t, p + Duration::from_millis(999)));
        assert!(silent(1, p, t, p + t));
        // A clock that went backwards (progress in the future) is not silent.
        assert!(!silent(1, p + t, t, p));
    }

    #[test]
    fn a_connection_expires_at_its_age_or_its_query_count() {
        let s = Duration::from_secs;
        // No limits: never.
        assert!(!expired(s(3600), u32::MAX, Duration::ZERO, 0));
        // Age only.
        assert!(!expired(Duration::from_millis(2999), 10_000, s(3), 0));
        assert!(expired(s(3), 0, s(3), 0));
        // Count only: the query that reaches the count is the last one it takes.
        assert!(!expired(s(3600), 999, Duration::ZERO, 1000));
        assert!(expired(Duration::ZERO, 1000, Duration::ZERO, 1000));
        // Both: whichever comes first.
        assert!(expired(s(1), 1000, s(3), 1000));
        assert!(expired(s(3), 1, s(3), 1000));
        assert!(!expired(s(1), 1, s(3), 1000));
    }

    #[test]
    fn siblings_silent_since_a_silence_began_are_stale() {
        // A sibling gave up on a silence that began at 5000 ms.
        assert!(stale(4999, 5000), "read nothing since: presumed dead too");
        assert!(!stale(5000, 5000));
        assert!(!stale(7000, 5000), "answered since: alive");
        // No silence seen yet.
        assert!(!stale(1, 0));
    }

    #[test]
    fn age_limits_are_spread_over_the_last_fifth() {
        let age = Duration::from_secs(10);
        assert_eq!(jittered_age(age, 0.0), age);
        assert_eq!(jittered_age(age, 0.5), Duration::from_secs(9));
        assert!(jittered_age(age, 0.999_999) > Duration::from_secs(8));
        // Out-of-range jitter is clamped; no limit stays no limit.
        assert_eq!(jittered_age(age, 7.0), Duration::from_secs(8));
        assert_eq!(jittered_age(Duration::ZERO, 0.3), Duration::ZERO);
    }
}
