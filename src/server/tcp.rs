//! TCP listeners (RFC 7766): several queries per connection, answered as they are ready
//! (out of order allowed), idle timeout, caps on connections (in total and per client).
//!
//! Memory per connection is bounded in bytes, not only in queries: a connection holds at
//! most [`CONNECTION_BYTES`] of queries read but not answered plus answers queued but not
//! written, and all connections together at most [`TOTAL_BYTES`]. A query waits to be
//! read, and a cached answer to be queued, while its connection is full (the reader can
//! wait: a client that never reads is then closed by the idle timeout); an answer from
//! the miss path that would overflow it closes the connection (RFC 7766 §6.2.3 lets a
//! server close; the client retries), since the resolver answering it cannot wait. The kernel's buffers are fixed at
//! [`SOCKET_BUFFER`] so that the socket cannot hold more than its share either.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use socket2::{Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::resolve::{ReplyTo, Resolver, Waiter};
use super::{handle_from, Action};
use crate::metrics::{inc, Metrics, Stats};

/// Queries per connection read but not yet answered; beyond it the reader waits.
const MAX_PENDING: usize = 64;

/// Largest query accepted over TCP, as over UDP (a question and an OPT record with a
/// cookie and padding take a few hundred bytes); a longer message ends the connection.
const MAX_QUERY: usize = 4096;

/// Bytes one connection holds at most: queries waiting for answers and answers waiting to
/// be written. Two of the largest messages (64 KiB) fit, so a client that reads gets any
/// answer; one that pipelines and never reads is closed at this figure.
pub const CONNECTION_BYTES: usize = 128 * 1024;

/// Bytes all client connections hold at most together: 1,024 full connections would be
/// 128 MiB, half the unit's `MemoryMax`; 32 MiB is 256 of them at once.
pub const TOTAL_BYTES: usize = 32 * 1024 * 1024;

/// `SO_SNDBUF` and `SO_RCVBUF` asked for each client connection (the kernel doubles
/// them, to 32 KiB each): enough for a pod's queries and answers on a veth, and a fixed
/// figure where autotuning would allow megabytes per socket (`tcp_wmem`, `tcp_rmem`), all
/// charged to the unit's memory: 1,024 connections hold 64 MiB of kernel buffers at most.
const SOCKET_BUFFER: usize = 16 * 1024;

/// Bind a listening TCP socket (free bind, address reuse).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = super::listen_socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Take over a listening TCP socket kept by systemd across a restart; connections that
/// waited in its backlog are accepted first thing.
pub fn adopt(fd: std::os::fd::OwnedFd, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::from(fd);
    super::check_kept(&sock, Type::STREAM, addr)?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `tcp_max_connections` are open.
    Full,
    /// `tcp_max_connections_per_client` are open from this source address.
    PerClient,
}

/// May one more connection open, with `open` open of `max`, `from_client` of them from
/// its source address, of `max_per_client`?
fn admit_connection(
    open: usize,
    max: usize,
    from_client: usize,
    max_per_client: usize,
) -> Result<(), Refusal> {
    if open >= max {
        Err(Refusal::Full)
    } else if from_client >= max_per_client {
        Err(Refusal::PerClient)
    } else {
        Ok(())
    }
}

/// Does `add` more bytes fit beside `held`, under `limit`?
fn fits(held: usize, add: usize, limit: usize) -> bool {
    held.saturating_add(add) <= limit
}

/// Add `n` to `held` if the result stays under `limit`.
fn charge(held: &AtomicUsize, n: usize, limit: usize) -> bool {
    held.fetch_update(Relaxed, Relaxed, |h| fits(h, n, limit).then_some(h + n))
        .is_ok()
}

/// The client connections of every listener: `tcp_max_connections` is a total for the
/// daemon, not a number per address, and so is [`TOTAL_BYTES`].
pub struct Connections {
    max: usize,
    max_per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// Bytes held by all connections.
    held: AtomicUsize,
}

impl Connections {
    pub fn new(max: usize, max_per_client: usize) -> Connections {
        Connections {
            max,
            max_per_client,
            open: Mutex::new((0, HashMap::new())),
            held: AtomicUsize::new(0),
        }
    }

    /// A slot for a connection from `client`, given back when dropped. A connection that
    /// `queued` in the backlog while no process read it counts against the total only.
    fn open(self: &Arc<Self>, client: IpAddr, queued: bool) -> Result<Slot, Refusal> {
        let mut open = self.open.lock();
        let from_client = open.1.get(&client).copied().unwrap_or(0);
        let per_client = if queued {
            usize::MAX
        } else {
            self.max_per_client
        };
        admit_connection(open.0, self.max, from_client, per_client)?;
        open.0 += 1;
        *open.1.entry(client).or_insert(0) += 1;
        Ok(Slot {
            conns: Arc::clone(self),
            client,
        })
    }

    /// Bytes held by all connections now.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }
}

struct Slot {
    conns: Arc<Connections>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock();
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// One connection's byte account.
struct Held {
    bytes: AtomicUsize,
    conns: Arc<Connections>,
    /// Bytes were given back: a reader waiting for room may go on.
    room: Notify,
    /// An answer did not fit, or the writer ended: the connection is being closed.
    overflowed: AtomicBool,
    closed: Notify,
}

impl Held {
    fn new(conns: Arc<Connections>) -> Held {
        Held {
            bytes: AtomicUsize::new(0),
            conns,
            room: Notify::new(),
            overflowed: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// Charge `n` bytes to the connection and the total, if both have room.
    fn charge(&self, n: usize) -> bool {
        if !charge(&self.bytes, n, CONNECTION_BYTES) {
            return false;
        }
        if !charge(&self.conns.held, n, TOTAL_BYTES) {
            self.bytes.fetch_sub(n, Relaxed);
            return false;
        }
        true
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.bytes.fetch_sub(n, Relaxed);
            self.conns.held.fetch_sub(n, Relaxed);
            self.room.notify_one();
        }
    }

    fn close(&self) {
        self.overflowed.store(true, Relaxed);
        self.closed.notify_one();
    }

    /// Wait until `n` bytes are charged; `false` when the connection is closing or no
    /// room came within `idle`.
    async fn wait_charge(&self, n: usize, idle: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.overflowed.load(Relaxed) {
                return false;
            }
            if self.charge(n) {
                return true;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return false;
            }
        }
    }
}

/// Where a TCP answer goes: the connection's writer, through its byte account. A miss
/// carries the size of its query, given back when the answer is sent or dropped.
pub struct Out {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    held: Arc<Held>,
    metrics: Arc<Metrics>,
    /// Bytes of the query still charged; 0 once its answer is sent.
    query: AtomicUsize,
}

/// The answer did not fit the connection's bytes (or the total): it is being closed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("client connection output over its byte bound")]
    Overflow,
    #[error("client connection closed")]
    Closed,
}

impl Out {
    /// Queue `msg` (without its length prefix) for the writer.
    pub fn send(&self, msg: Vec<u8>) -> Result<(), SendError> {
        if self.held.overflowed.load(Relaxed) {
            return Err(SendError::Closed);
        }
        // The query's bytes make room for its answer first.
        self.held.release(self.query.swap(0, Relaxed));
        if !self.held.charge(msg.len()) {
            inc(&self.metrics.tcp_output_overflow);
            self.held.close();
            return Err(SendError::Overflow);
        }
        self.queue(msg)
    }

    /// Queue `msg`, already charged, for the writer.
    fn queue(&self, msg: Vec<u8>) -> Result<(), SendError> {
        let len = msg.len();
        self.tx.send(msg).map_err(|_| {
            self.held.release(len);
            SendError::Closed
        })
    }

    /// An `Out` for the answer to a query of `query` bytes, already charged.
    fn for_query(&self, query: usize) -> Out {
        Out {
            tx: self.tx.clone(),
            held: Arc::clone(&self.held),
            metrics: Arc::clone(&self.metrics),
            query: AtomicUsize::new(query),
        }
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        self.held.release(*self.query.get_mut());
    }
}

/// A connection waiting in `listener`'s backlog, taken without waiting; `None` when the
/// backlog is empty (or the accept failed: the async accept then reports it).
fn queued(listener: &TcpListener) -> Option<TcpStream> {
    let (sock, _) = socket2::SockRef::from(listener).accept().ok()?;
    sock.set_nonblocking(true).ok()?;
    TcpStream::from_std(sock.into()).ok()
}

/// Accept connections until the task is dropped. `conns` is shared by every listener.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    idle: Duration,
    conns: Arc<Connections>,
    stats: Arc<Stats>,
) {
    // The connections that queued in the backlog while no process read it (a restart, a
    // crash: the socket was kept) are from clients that waited for us. A pod's burst of
    // them is not a storm: until the backlog is first found empty, only the total counts.
    let mut backlog = true;
    loop {
        let queued = if backlog { queued(&listener) } else { None };
        backlog = queued.is_some();
        let stream = match queued {
            Some(stream) => stream,
            None => super::accept(&listener, "TCP").await,
        };
        let client = stream
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let slot = match conns.open(client, backlog) {
            Ok(slot) => slot,
            Err(refusal) => {
                let m = &resolver.metrics;
                inc(match refusal {
                    Refusal::Full => &m.tcp_refused,
                    Refusal::PerClient => &m.tcp_refused_per_client,
                });
                drop(stream);
                continue;
            }
        };
        inc(&resolver.metrics.tcp_connections);
        let (resolver, stats) = (Arc::clone(&resolver), Arc::clone(&stats));
        let held = Arc::new(Held::new(Arc::clone(&conns)));
        tokio::spawn(async move {
            let _ = connection(stream, resolver, idle, stats, held).await;
            drop(slot);
        });
    }
}

async fn connection(
    stream: TcpStream,
    resolver: Arc<Resolver>,
    idle: Duration,
    stats: Arc<Stats>,
    held: Arc<Held>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    // Who asks: its address is whose miss budget its queries count against.
    let client = stream.peer_addr()?;
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let (mut reader, writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let out = Out {
        tx,
        held: Arc::clone(&held),
        metrics: Arc::clone(&resolver.metrics),
        query: AtomicUsize::new(0),
    };
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let answered = Arc::clone(&pending);
    let account = Arc::clone(&held);
    // A client that stops reading stalls the writer, not the daemon: each write gets the
    // idle timeout, and a stalled writer closes `pending`, which wakes a reader waiting for
    // room; the reader's own reads have the same timeout. An overflow stops the writer at
    // once: what is queued is dropped and the connection closed.
    let write = tokio::spawn(async move {
        let mut writer = BufWriter::new(writer);
        let result = async {
            while let Some(msg) = rx.recv().await {
                if account.overflowed.load(Relaxed) {
                    account.release(msg.len());
                    break;
                }
                let sent = async {
                    within(idle, writer.write_all(&(msg.len() as u16).to_be_bytes())).await?;
                    within(idle, writer.write_all(&msg)).await?;
                    if rx.is_empty() {
                        within(idle, writer.flush()).await?;
                    }
                    Ok::<_, io::Error>(())
                }
                .await;
                account.release(msg.len());
                sent?;
                answered.add_permits(1);
            }
            within(idle, writer.shutdown()).await
        }
        .await;
        answered.close();
        // Stop the reader, and give back what is still queued.
        account.close();
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            account.release(msg.len());
        }
        result
    });
    let mut buf = Vec::with_capacity(4096);
    loop {
        let len = tokio::select! {
            biased;
            _ = held.closed.notified() => break,
            read = tokio::time::timeout(idle, reader.read_u16()) => match read {
                Ok(Ok(len)) => len as usize,
                _ => break,
            },
        };
        if len > MAX_QUERY {
            break;
        }
        match pending.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        // The query is charged before it is read: a full connection reads nothing more.
        if !held.wait_charge(len, idle).await {
            break;
        }
        let query = out.for_query(len);
        let mut pkt = vec![0u8; len];
        match tokio::time::timeout(idle, reader.read_exact(&mut pkt)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let received = std::time::Instant::now();
        let now = resolver.cache.now_ms();
        let who = || (Some(client), Some(received));
        match handle_from(&resolver, &pkt, &mut buf, true, now, &stats, who) {
            Action::Hit | Action::Reply => {
                stats.durations(received.elapsed().as_nanos() as u64, 1);
                drop(query);
                // Answered here, so it can wait for room instead of closing.
                if !held.wait_charge(buf.len(), idle).await || out.queue(buf.clone()).is_err() {
                    break;
                }
            }
            Action::Miss(key) => {
                let reply = ReplyTo::Tcp(query);
                match Waiter::new(reply, client, &pkt, Arc::clone(&stats), received) {
                    Some(waiter) => resolver.miss(key, waiter),
                    None => break,
                }
            }
            // RFC 7766 §8: a message that cannot be parsed at all ends the connection.
            Action::Drop => break,
        }
        // Every query read is answered through `out` (the resolver answers misses, even
        // on failure), which gives its permit back.
    }
    drop(out);
    // Answers still being resolved hold their own sender; the writer ends after the last.
    write.await.unwrap_or(Ok(()))
}

/// `io` with a deadline: a peer that stops reading turns into a timed-out error.
async fn within<T>(
    limit: Duration,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, io).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_admission() {
        assert_eq!(admit_connection(0, 2, 0, 1), Ok(()));
        assert_eq!(admit_connection(1, 2, 1, 1), Err(Refusal::PerClient));
        assert_eq!(admit_connection(2, 2, 0, 1), Err(Refusal::Full));
        // The total is checked first: a full daemon refuses for that reason.
        assert_eq!(admit_connection(2, 2, 5, 1), Err(Refusal::Full));
    }

    #[test]
    fn slots_per_client_are_given_back() {
        let conns = Arc::new(Connections::new(3, 2));
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = conns.open(a, false).unwrap();
        let _a2 = conns.open(a, false).unwrap();
        assert_eq!(conns.open(a, false).err(), Some(Refusal::PerClient));
        let _b1 = conns.open(b, false).unwrap();
        assert_eq!(conns.open(b, false).err(), Some(Refusal::Full));
        drop(a1);
        assert!(conns.open(a, false).is_ok());
        assert!(conns.open.lock().1.len() <= 2);
    }

    /// A pod's connections that queued during a restart are all taken, up to the total;
    /// the client's new ones meet its cap again.
    #[test]
    fn queued_connections_count_against_the_total_only() {
        let conns = Arc::new(Connections::new(4, 1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..4).map(|_| conns.open(a, true).unwrap()).collect();
        assert_eq!(conns.open(a, true).err(), Some(Refusal::Full));
        drop(held);
        let _one = conns.open(a, false).unwrap();
        assert_eq!(conns.open(a, false).err(), Some(Refusal::PerClient));
    }

    fn out(conns: &Arc<Connections>) -> (Out, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(Held::new(Arc::clone(conns)));
        let metrics = Arc::new(Metrics::default());
        let out = Out {
            tx,
            held,
            metrics,
            query: AtomicUsize::new(0),
        };
        (out, rx)
    }

    #[test]
    fn output_is_bounded_in_bytes_and_overflow_closes() {
        let conns = Arc::new(Connections::new(10, 10));
        let (out, _rx) = out(&conns);
        // Answers queued and never written (a client that does not read): two 60 KB
        // answers fit, the third closes the connection.
        out.send(vec![0; 60_000]).unwrap();
        out.send(vec![0; 60_000]).unwrap();
        assert!(matches!(
            out.send(vec![0; 60_000]),
            Err(SendError::Overflow)
        ));
        assert_eq!(out.metrics.tcp_output_overflow.load(Relaxed), 1);
        assert!(matches!(out.send(vec![0; 10]), Err(SendError::Closed)));
        assert_eq!(conns.held(), 120_000);
        out.held.release(120_000);
        assert_eq!(conns.held(), 0);
    }

    #[test]
    fn a_query_is_given_back_when_its_answer_is_dropped() {
        let conns = Arc::new(Connections::new(10, 10));
        let (out, _rx) = out(&conns);
        assert!(out.held.charge(100));
        let q = out.for_query(100);
        assert_eq!(conns.held(), 100);
        drop(q);
        assert_eq!((conns.held(), out.held.bytes.load(Relaxed)), (0, 0));
        // Sending the answer gives the query's bytes back before charging the answer's.
        assert!(out.held.charge(CONNECTION_BYTES));
        let q = out.for_query(CONNECTION_BYTES);
        q.send(vec![0; 1000]).unwrap();
        assert_eq!(conns.held(), 1000);
        drop(q);
        assert_eq!(conns.held(), 1000, "given back once");
    }

    #[test]
    fn the_total_bounds_every_connection_together() {
        let conns = Arc::new(Connections::new(10, 10));
        conns.held.store(TOTAL_BYTES - 100, Relaxed);
        let (out, _rx) = out(&conns);
        assert!(!out.held.charge(101));
        assert_eq!(out.held.bytes.load(Relaxed), 0, "undone on the connection");
        assert!(out.held.charge(100));
    }
}
