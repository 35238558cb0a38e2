//! A persistent, pipelined TCP connection to one upstream (RFC 7766 §6.2.1): many queries
//! in flight on one connection, answers matched by ID, reconnected on demand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::exchange::{read_frame, ExchangeError};
use crate::dns::wire;

/// Close the connection after this long with nothing in flight.
const IDLE: Duration = Duration::from_secs(30);
/// Queries waiting for the connection's writer at most.
const QUEUE: usize = 4096;

struct Request {
    msg: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
}

/// Handle on the (lazily opened) connection to one server.
#[derive(Debug)]
pub struct Pipeline {
    server: SocketAddr,
    conn: Mutex<Option<mpsc::Sender<Request>>>,
}

impl Pipeline {
    pub fn new(server: SocketAddr) -> Pipeline {
        Pipeline {
            server,
            conn: Mutex::new(None),
        }
    }

    /// Send one query (complete DNS message, any ID) and wait for its answer, which comes
    /// back with the caller's ID. The caller bounds the wait with its own timeout.
    pub async fn exchange(&self, msg: Vec<u8>) -> Result<Vec<u8>, ExchangeError> {
        let tx = {
            let mut conn = self.conn.lock();
            match conn.as_ref() {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(run(self.server, rx));
                    *conn = Some(tx.clone());
                    tx
                }
            }
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(Request { msg, reply })
            .map_err(|_| ExchangeError::Closed)?;
        answer.await.map_err(|_| ExchangeError::Closed)
    }
}

/// The connection task: writes queries under fresh unique IDs, reads answers, hands each
/// back with the caller's original ID. Ends (failing everything pending) on any error,
/// on idle, or when every handle is gone.
async fn run(server: SocketAddr, mut rx: mpsc::Receiver<Request>) {
    let stream =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(server)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(upstream = %server, error = %e, "TCP connect failed");
                return;
            }
            Err(_) => return,
        };
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut writer = BufWriter::new(writer);
    // wire ID -> (caller's ID, reply)
    let mut pending: HashMap<u16, (u16, oneshot::Sender<Vec<u8>>)> = HashMap::new();
    let mut read = Box::pin(next_frame(reader));
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(mut req) = req else { return };
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
                let len = (req.msg.len() as u16).to_be_bytes();
                let mut ok = writer.write_all(&len).await.is_ok() && writer.write_all(&req.msg).await.is_ok();
                // Flush only when no other query is queued right behind this one.
                if ok && rx.is_empty() {
                    ok = writer.flush().await.is_ok();
                }
                if !ok { return; }
                pending.insert(id, (caller_id, req.reply));
            }
            (res, reader) = &mut read => {
                let Ok(mut msg) = res else { return };
                if let Some(id) = wire::u16_at(&msg, 0) {
                    if let Some((caller_id, reply)) = pending.remove(&id) {
                        wire::put_u16(&mut msg, 0, caller_id);
                        let _ = reply.send(msg);
                    }
                }
                read = Box::pin(next_frame(reader));
            }
            _ = tokio::time::sleep(IDLE), if pending.is_empty() => return,
        }
    }
}

async fn next_frame(mut reader: OwnedReadHalf) -> (std::io::Result<Vec<u8>>, OwnedReadHalf) {
    let r = read_frame(&mut reader).await;
    (r, reader)
}
