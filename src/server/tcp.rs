//! TCP listeners (RFC 7766): several queries per connection, answered as they are ready
//! (out of order allowed), idle timeout, a cap on connections.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::resolve::{ReplyTo, Resolver, Waiter};
use super::{handle, Action};
use crate::metrics::{inc, Stats};

/// Queries per connection read but not yet answered; beyond it the reader waits, so a
/// client that pipelines without reading cannot grow memory.
const MAX_PENDING: usize = 64;

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

/// Accept connections until the task is dropped. `slots` is shared by every listener:
/// `tcp_max_connections` is a total for the daemon, not a number per address.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    idle: Duration,
    slots: Arc<Semaphore>,
    stats: Arc<Stats>,
) {
    loop {
        let stream = super::accept(&listener, "TCP").await;
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            inc(&resolver.metrics.tcp_refused);
            drop(stream);
            continue;
        };
        inc(&resolver.metrics.tcp_connections);
        let (resolver, stats) = (Arc::clone(&resolver), Arc::clone(&stats));
        tokio::spawn(async move {
            let _ = connection(stream, resolver, idle, stats).await;
            drop(permit);
        });
    }
}

async fn connection(
    stream: TcpStream,
    resolver: Arc<Resolver>,
    idle: Duration,
    stats: Arc<Stats>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    // Whose miss budget its queries count against.
    let client = stream.peer_addr()?.ip();
    let (mut reader, writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let answered = Arc::clone(&pending);
    // A client that stops reading stalls the writer, not the daemon: each write gets the
    // idle timeout, and a stalled writer closes `pending`, which wakes a reader waiting for
    // room; the reader's own reads have the same timeout.
    let write = tokio::spawn(async move {
        let mut writer = BufWriter::new(writer);
        let result = async {
            while let Some(msg) = rx.recv().await {
                within(idle, writer.write_all(&(msg.len() as u16).to_be_bytes())).await?;
                within(idle, writer.write_all(&msg)).await?;
                if rx.is_empty() {
                    within(idle, writer.flush()).await?;
                }
                answered.add_permits(1);
            }
            within(idle, writer.shutdown()).await
        }
        .await;
        answered.close();
        result
    });
    let mut out = Vec::with_capacity(4096);
    loop {
        let len = match tokio::time::timeout(idle, reader.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            _ => break,
        };
        match pending.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        let mut pkt = vec![0u8; len];
        match tokio::time::timeout(idle, reader.read_exact(&mut pkt)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let received = std::time::Instant::now();
        match handle(
            &resolver,
            &pkt,
            &mut out,
            true,
            resolver.cache.now_ms(),
            &stats,
        ) {
            Action::Hit | Action::Reply => {
                stats.durations(received.elapsed().as_nanos() as u64, 1);
                if tx.send(out.clone()).is_err() {
                    break;
                }
            }
            Action::Miss(key) => {
                let reply = ReplyTo::Tcp(tx.clone());
                match Waiter::new(reply, client, &pkt, Arc::clone(&stats), received) {
                    Some(waiter) => resolver.miss(key, waiter),
                    None => break,
                }
            }
            // RFC 7766 §8: a message that cannot be parsed at all ends the connection.
            Action::Drop => break,
        }
        // Every query read is answered through `tx` (the resolver answers misses, even
        // on failure), which gives its permit back.
    }
    drop(tx);
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
