//! One query, one answer: over UDP on a given socket, and over TCP on a fresh connection.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::dns::answer::write_upstream_query;
use crate::dns::{Answer, AnswerError, Key, TtlPolicy};

/// What went wrong with one attempt.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("bad answer: {0}")]
    Answer(#[from] AnswerError),
    #[error("connection closed")]
    Closed,
    /// Our own socket failed (out of file descriptors, of buffers...): says nothing of
    /// the server.
    #[error("local socket: {0}")]
    Local(io::Error),
}

impl ExchangeError {
    /// Does this failure say something about the server (and so count against its
    /// health)? Not when our own socket could not be had.
    pub fn counts_against_server(&self) -> bool {
        !matches!(self, ExchangeError::Local(_))
    }
}

const UDP_BUFFER: usize = 4096;

/// Send the query for `key` over `sock`, a UDP socket connected to the server on a random
/// port (see [`super::ports`]), under a new random ID. Datagrams that do not match the ID
/// and question are ignored (spoofing or late answers). A truncated answer is reported as
/// `AnswerError::Truncated` for the caller to retry over TCP.
pub async fn udp(sock: &UdpSocket, key: &Key, policy: &TtlPolicy) -> Result<Answer, ExchangeError> {
    let id: u16 = rand::random();
    let mut msg = Vec::with_capacity(64);
    write_upstream_query(&mut msg, id, key);
    sock.send(&msg).await?;
    // We advertise 1232 bytes, so a well-behaved server never sends more; a datagram that
    // fills the buffer was cut by the kernel and is treated as truncated (retry over TCP).
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n == buf.len() {
            return Err(AnswerError::Truncated.into());
        }
        match Answer::from_upstream(&buf[..n], id, key, policy) {
            Err(AnswerError::Mismatch) | Err(AnswerError::Malformed) => continue,
            other => return Ok(other?),
        }
    }
}

/// Send the query over a new TCP connection (used after a truncated UDP answer).
pub async fn tcp(
    server: SocketAddr,
    key: &Key,
    policy: &TtlPolicy,
) -> Result<Answer, ExchangeError> {
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let id: u16 = rand::random();
    let mut msg = vec![0, 0];
    let mut q = Vec::with_capacity(64);
    write_upstream_query(&mut q, id, key);
    msg[..2].copy_from_slice(&(q.len() as u16).to_be_bytes());
    msg.extend_from_slice(&q);
    stream.write_all(&msg).await?;
    let resp = read_frame(&mut stream).await?;
    Ok(Answer::from_upstream(&resp, id, key, policy)?)
}

/// Read one length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = r.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}
