//! One query, one answer: over UDP on a given socket, over TCP on a fresh connection, or on
//! a pool's pipelined connection.
//!
//! Two things here keep a server's bad habits and our own trouble apart from its health:
//! - **EDNS fallback.** Old servers and middleboxes answer a query with an OPT record with
//!   FORMERR or NOTIMP. Such an answer is retried once without EDNS; when that one is
//!   answered, the server is asked without EDNS for [`NO_EDNS_FOR`] ([`EdnsMemory`]), then
//!   EDNS is tried again (unbound keeps the same mark for its `infra-host-ttl`, 15 min).
//! - **Local failures.** A socket we cannot open or a buffer we cannot get (EMFILE,
//!   ENOBUFS, EADDRNOTAVAIL...) says nothing about the server: [`ExchangeError::Local`],
//!   which [`ExchangeError::counts_against_server`] leaves out of its health.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::dns::answer::write_upstream_query;
use crate::dns::{wire, Answer, AnswerError, Key, TtlPolicy};

/// What went wrong with one attempt.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The network or the server: refused, reset, unreachable.
    #[error("{0}")]
    Io(io::Error),
    /// Our own side: no socket, no buffer, no local port ([`is_local`]).
    #[error("local socket: {0}")]
    Local(io::Error),
    #[error("timed out")]
    Timeout,
    #[error("bad answer: {0}")]
    Answer(#[from] AnswerError),
    #[error("connection closed")]
    Closed,
}

impl From<io::Error> for ExchangeError {
    /// Every I/O error of an exchange is sorted here, so that `?` keeps ours apart.
    fn from(e: io::Error) -> ExchangeError {
        if is_local(&e) {
            ExchangeError::Local(e)
        } else {
            ExchangeError::Io(e)
        }
    }
}

impl ExchangeError {
    /// Whether this failure says something about the server, so that it counts toward
    /// marking it down. Our own failures do not: with no file descriptor left every
    /// server would be marked down, and none of them is at fault.
    pub fn counts_against_server(&self) -> bool {
        !matches!(self, ExchangeError::Local(_))
    }
}

/// Whether an I/O error comes from this host's own resources rather than from the server
/// or the path to it: out of descriptors or memory, no buffer space, no local address or
/// port. (No route or no such address family is about the path to that server, which
/// other servers of the pool may not share: that counts against it.)
pub fn is_local(e: &io::Error) -> bool {
    use nix::errno::Errno;
    let Some(errno) = e.raw_os_error().map(Errno::from_raw) else {
        return false;
    };
    matches!(
        errno,
        Errno::EMFILE
            | Errno::ENFILE
            | Errno::ENOBUFS
            | Errno::ENOMEM
            | Errno::EADDRNOTAVAIL
            | Errno::EADDRINUSE
    )
}

/// How long a server that answered FORMERR or NOTIMP to EDNS, and then answered without
/// it, is asked without EDNS.
pub const NO_EDNS_FOR: Duration = Duration::from_secs(15 * 60);

/// Whether an answer with `rcode` to a query sent with EDNS (`sent_edns`) is a server
/// refusing EDNS, to be asked again without it.
pub fn retry_without_edns(sent_edns: bool, rcode: u8) -> bool {
    sent_edns && matches!(rcode, wire::RCODE_FORMERR | wire::RCODE_NOTIMP)
}

/// Per server: whether it is to be asked without EDNS, and until when.
#[derive(Debug)]
pub struct EdnsMemory {
    server: SocketAddr,
    no_edns_until: Mutex<Option<Instant>>,
}

impl EdnsMemory {
    pub fn new(server: SocketAddr) -> EdnsMemory {
        EdnsMemory {
            server,
            no_edns_until: Mutex::new(None),
        }
    }

    /// Whether a query sent at `now` carries an OPT record.
    pub fn use_edns(&self, now: Instant) -> bool {
        self.no_edns_until.lock().map_or(true, |until| now >= until)
    }

    /// The server answered without EDNS what it refused with it: ask it without EDNS
    /// until `now` + [`NO_EDNS_FOR`]. Returns whether that is news (for one log line).
    pub fn refuses_edns(&self, now: Instant) -> bool {
        let mut until = self.no_edns_until.lock();
        let news = until.map_or(true, |u| now >= u);
        *until = Some(now + NO_EDNS_FOR);
        news
    }
}

/// One exchange, `once(edns)`, with the EDNS fallback: FORMERR or NOTIMP to a query with
/// EDNS is asked once more without; when that is answered (or truncated: answered, too
/// big), the server is remembered as one that refuses EDNS.
async fn with_fallback<F, Fut>(memory: &EdnsMemory, mut once: F) -> Result<Answer, ExchangeError>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Result<Answer, ExchangeError>>,
{
    let now = Instant::now();
    let edns = memory.use_edns(now);
    let first = once(edns).await?;
    if !retry_without_edns(edns, first.rcode()) {
        return Ok(first);
    }
    let second = once(false).await;
    let answered = match &second {
        Ok(a) => !retry_without_edns(true, a.rcode()),
        Err(e) => matches!(e, ExchangeError::Answer(AnswerError::Truncated)),
    };
    if answered && memory.refuses_edns(now) {
        tracing::info!(upstream = %memory.server, rcode = first.rcode(),
            "upstream {} refuses EDNS (rcode {}) and answers without it: asking it without EDNS for {} s",
            memory.server, first.rcode(), NO_EDNS_FOR.as_secs());
    }
    second
}

const UDP_BUFFER: usize = 4096;

/// Send the query for `key` over `sock`, a UDP socket connected to the server on a random
/// port (see [`super::ports`]), under a new random ID, with the EDNS fallback. Datagrams
/// that do not match the ID and question are ignored (spoofing or late answers). A
/// truncated answer is reported as `AnswerError::Truncated` for the caller to retry over
/// TCP.
pub async fn udp(
    sock: &UdpSocket,
    key: &Key,
    policy: &TtlPolicy,
    memory: &EdnsMemory,
) -> Result<Answer, ExchangeError> {
    with_fallback(memory, |edns| udp_once(sock, key, policy, edns)).await
}

async fn udp_once(
    sock: &UdpSocket,
    key: &Key,
    policy: &TtlPolicy,
    edns: bool,
) -> Result<Answer, ExchangeError> {
    let id: u16 = rand::random();
    let mut msg = Vec::with_capacity(64);
    write_upstream_query(&mut msg, id, key, edns);
    sock.send(&msg).await?;
    // We advertise 1232 bytes, so a well-behaved server never sends more; a datagram that
    // fills the buffer was cut by the kernel and is treated as truncated (retry over TCP).
    // The datagram is read into a buffer inside this future (allocated once with the miss's
    // task), not a 4 KiB heap buffer per attempt: freed between the cache's long-lived
    // entries, those fragmented the allocator's arenas (RSS grew twice as fast as the live
    // heap). `recv` also returns the ICMP port unreachable (ECONNREFUSED) at once.
    let mut buf = [0u8; UDP_BUFFER];
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

/// Send the query over a new TCP connection (used after a truncated UDP answer), with the
/// EDNS fallback.
pub async fn tcp(
    server: SocketAddr,
    key: &Key,
    policy: &TtlPolicy,
    memory: &EdnsMemory,
) -> Result<Answer, ExchangeError> {
    with_fallback(memory, |edns| tcp_once(server, key, policy, edns)).await
}

async fn tcp_once(
    server: SocketAddr,
    key: &Key,
    policy: &TtlPolicy,
    edns: bool,
) -> Result<Answer, ExchangeError> {
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let id: u16 = rand::random();
    let mut msg = vec![0, 0];
    let mut q = Vec::with_capacity(64);
    write_upstream_query(&mut q, id, key, edns);
    msg[..2].copy_from_slice(&(q.len() as u16).to_be_bytes());
    msg.extend_from_slice(&q);
    stream.write_all(&msg).await?;
    let resp = read_frame(&mut stream).await?;
    Ok(Answer::from_upstream(&resp, id, key, policy)?)
}

/// Send the query on the pool's persistent connection, with the EDNS fallback.
pub async fn pipelined(
    pipeline: &super::pipeline::Pipeline,
    key: &Key,
    policy: &TtlPolicy,
    memory: &EdnsMemory,
) -> Result<Answer, ExchangeError> {
    with_fallback(memory, |edns| async move {
        let id: u16 = rand::random();
        let mut msg = Vec::with_capacity(64);
        write_upstream_query(&mut msg, id, key, edns);
        let resp = pipeline.exchange(msg).await?;
        Ok(Answer::from_upstream(&resp, id, key, policy)?)
    })
    .await
}

/// Read one length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = r.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn our_own_socket_trouble_does_not_count_against_the_server() {
        for local in [
            nix::libc::EMFILE,
            nix::libc::ENFILE,
            nix::libc::ENOBUFS,
            nix::libc::EADDRNOTAVAIL,
        ] {
            let e = ExchangeError::from(io::Error::from_raw_os_error(local));
            assert!(matches!(e, ExchangeError::Local(_)), "{e}");
            assert!(!e.counts_against_server(), "{e}");
        }
        for remote in [
            nix::libc::ECONNREFUSED,
            nix::libc::ECONNRESET,
            nix::libc::EHOSTUNREACH,
            nix::libc::ENETUNREACH,
            nix::libc::EAFNOSUPPORT,
        ] {
            let e = ExchangeError::from(io::Error::from_raw_os_error(remote));
            assert!(matches!(e, ExchangeError::Io(_)), "{e}");
            assert!(e.counts_against_server(), "{e}");
        }
        let eof = ExchangeError::from(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(eof.counts_against_server());
        assert!(ExchangeError::Timeout.counts_against_server());
        assert!(ExchangeError::Closed.counts_against_server());
    }

    #[test]
    fn formerr_and_notimp_to_edns_are_retried_without() {
        assert!(retry_without_edns(true, wire::RCODE_FORMERR));
        assert!(retry_without_edns(true, wire::RCODE_NOTIMP));
        assert!(!retry_without_edns(false, wire::RCODE_FORMERR));
        for other in [0, 2, 3, 5] {
            assert!(!retry_without_edns(true, other), "{other}");
        }
    }

    #[test]
    fn a_server_that_refuses_edns_is_asked_without_it_for_a_while() {
        let m = EdnsMemory::new(([192, 0, 2, 1], 53).into());
        let t0 = Instant::now();
        assert!(m.use_edns(t0));
        assert!(m.refuses_edns(t0));
        assert!(!m.refuses_edns(t0 + Duration::from_secs(1)), "not news");
        assert!(!m.use_edns(t0 + NO_EDNS_FOR));
        assert!(m.use_edns(t0 + Duration::from_secs(1) + NO_EDNS_FOR));
    }

    /// An answer to `key` with `rcode`, as an upstream would send it to ID 1.
    fn answer(key: &Key, rcode: u8) -> Answer {
        let mut r = vec![0, 1, 0x81, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 0];
        r.extend_from_slice(key.qname());
        r.extend_from_slice(&[0, 1, 0, 1]);
        let policy = TtlPolicy {
            min_ttl: 0,
            max_ttl: 60,
            negative_max_ttl: 5,
            servfail_ttl: 1,
        };
        Answer::from_upstream(&r, 1, key, &policy).unwrap()
    }

    /// Run `with_fallback` against a server that answers `rcodes[i]` to query `i`
    /// ([`Err`] for a truncated one); returns (rcode or None, EDNS flags sent).
    fn exchange(memory: &EdnsMemory, rcodes: &[Option<u8>]) -> (Option<u8>, Vec<bool>) {
        let key = Key::new(b"\x01a\x00", 1, 1, false, false);
        let sent = RefCell::new(Vec::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(with_fallback(memory, |edns| {
            let i = sent.borrow().len();
            sent.borrow_mut().push(edns);
            let reply = match rcodes[i] {
                Some(rcode) => Ok(answer(&key, rcode)),
                None => Err(AnswerError::Truncated.into()),
            };
            async move { reply }
        }));
        (got.ok().map(|a| a.rcode()), sent.into_inner())
    }

    #[test]
    fn the_fallback_asks_once_more_and_remembers_only_what_worked() {
        let server = ([192, 0, 2, 1], 53).into();
        let m = EdnsMemory::new(server);
        // A good server: one query, with EDNS.
        assert_eq!(exchange(&m, &[Some(0)]), (Some(0), vec![true]));
        // FORMERR for EDNS, NOERROR without: remembered, the next query has no OPT.
        assert_eq!(
            exchange(&m, &[Some(1), Some(0)]),
            (Some(0), vec![true, false])
        );
        assert_eq!(exchange(&m, &[Some(0)]), (Some(0), vec![false]));
        // FORMERR with and without EDNS: the FORMERR is not about EDNS; not remembered.
        let m = EdnsMemory::new(server);
        assert_eq!(
            exchange(&m, &[Some(1), Some(1)]),
            (Some(1), vec![true, false])
        );
        assert!(m.use_edns(Instant::now()));
        // NOTIMP, then truncated without EDNS: it does answer without, remembered.
        assert_eq!(exchange(&m, &[Some(4), None]), (None, vec![true, false]));
        assert!(!m.use_edns(Instant::now()));
    }
}
