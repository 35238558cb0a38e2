//! A persistent, pipelined TCP connection to one upstream (RFC 7766 §6.2.1): many queries
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

use std::collections::HashMap;
use std::net::SocketAddr;
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

/// Handle on the (lazily opened) connection to one server.
#[derive(Debug)]
pub struct Pipeline {
    server: SocketAddr,
    /// Answers overdue by this long make the connection silent (the pool's attempt timeout).
    timeout: Duration,
    conn: Mutex<Option<mpsc::Sender<Request>>>,
}

impl Pipeline {
    pub fn new(server: SocketAddr, timeout: Duration) -> Pipeline {
        Pipeline {
            server,
            timeout,
            conn: Mutex::new(None),
        }
    }

    /// Send one query (complete DNS message, any ID) and wait for its answer, which comes
    /// back with the caller's ID. The caller bounds the wait with its own timeout.
    pub async fn exchange(&self, msg: Vec<u8>) -> Result<Vec<u8>, ExchangeError> {
        // A query handed to a connection that was given up before writing it is sent once
        // more, on a new connection.
        for _ in 0..2 {
            let tx = self.sender();
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
            match answer.await {
                Ok(Reply::Answer(resp)) => return Ok(resp),
                Ok(Reply::Unsent) => continue,
                Err(_) => return Err(ExchangeError::Closed),
            }
        }
        Err(ExchangeError::Closed)
    }

    /// The open connection's queue, or a new connection's.
    fn sender(&self) -> mpsc::Sender<Request> {
        let mut conn = self.conn.lock();
        match conn.as_ref() {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(run(self.server, self.timeout, rx));
                *conn = Some(tx.clone());
                tx
            }
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
/// when the peer is silent, on idle, or when every handle is gone.
async fn run(server: SocketAddr, timeout: Duration, mut rx: mpsc::Receiver<Request>) {
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
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(mut req) = req else { return };
                if silent(pending.len(), progress, timeout, Instant::now()) {
                    let _ = req.reply.send(Reply::Unsent);
                    return give_up(server, rx, pending.len());
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
                if let Some(id) = wire::u16_at(&msg, 0) {
                    if let Some((caller_id, reply)) = pending.remove(&id) {
                        wire::put_u16(&mut msg, 0, caller_id);
                        let _ = reply.send(Reply::Answer(msg));
                    }
                }
                read = Box::pin(next_frame(reader));
            }
            _ = tokio::time::sleep_until(progress + timeout), if !pending.is_empty() => {
                return give_up(server, rx, pending.len());
            }
            _ = tokio::time::sleep(IDLE), if pending.is_empty() => return,
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
}
