//! Upstream UDP sockets, each on its own random source port, reused for a bounded number
//! of queries and a bounded time.
//!
//! Opening a socket for every query (socket, connect, registering it with the event loop,
//! then deregistering and closing it) costs about 10 µs of CPU per miss here: half of
//! what a miss costs in all (measured with `bench/run.sh`). So a socket whose query was
//! answered goes back to a free list and carries later queries, one at a time, until it
//! has carried `max_queries` or is `lifetime` old; then it is closed and a new socket
//! gets a new random port. What protects an upstream exchange from spoofed answers stays:
//! the port is random and unknown to anyone off the path; every query has a new random
//! ID; the answer must match the ID and the question; and the socket is connected, so
//! only the server's address is accepted. A reused socket is emptied before its next
//! query, so a datagram planted while it sat idle cannot be taken as the next answer.
//! A socket whose query failed or timed out is never reused. `max_queries = 1` gives
//! every query a fresh port.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Idle sockets kept per server at most (beyond it, returned sockets are closed), so a
/// burst of misses does not leave hundreds of open ports behind.
const MAX_IDLE: usize = 256;

/// How long sockets live and how much they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// Queries one socket carries at most (1 = a fresh port per query).
    pub max_queries: u32,
    /// Age after which a socket is closed instead of reused.
    pub lifetime: Duration,
}

/// One socket taken for one query.
#[derive(Debug)]
pub struct Lease {
    pub socket: UdpSocket,
    born: Instant,
    used: u32,
}

/// The reusable UDP sockets towards one server.
#[derive(Debug)]
pub struct Ports {
    server: SocketAddr,
    reuse: Reuse,
    /// A stack: the most recently returned socket is taken first, so old ones sink to the
    /// bottom, where [`Ports::sweep`] closes them.
    free: Mutex<Vec<Lease>>,
}

impl Ports {
    pub fn new(server: SocketAddr, reuse: Reuse) -> Ports {
        Ports {
            server,
            reuse,
            free: Mutex::new(Vec::new()),
        }
    }

    /// A socket for one query: a kept one that is young enough, emptied, or a new one.
    /// The second value says whether it is new.
    pub fn take(&self) -> io::Result<(Lease, bool)> {
        let now = Instant::now();
        loop {
            let kept = self.free.lock().pop();
            let Some(lease) = kept else { break };
            if now.duration_since(lease.born) < self.reuse.lifetime {
                discard_queued(&lease.socket);
                return Ok((lease, false));
            }
            // Too old: closed here, outside the lock.
        }
        let lease = Lease {
            socket: connected_udp(self.server)?,
            born: now,
            used: 0,
        };
        Ok((lease, true))
    }

    /// Return a socket whose query was answered; it is kept unless it has carried its
    /// share, is too old, or enough sockets are idle already.
    pub fn give_back(&self, mut lease: Lease) {
        lease.used += 1;
        if lease.used >= self.reuse.max_queries || lease.born.elapsed() >= self.reuse.lifetime {
            return;
        }
        let mut free = self.free.lock();
        if free.len() < MAX_IDLE {
            free.push(lease);
        }
    }

    /// Close idle sockets that are too old to be used again. Called now and then, so a
    /// server that gets no more queries does not keep open ports.
    pub fn sweep(&self) {
        let lifetime = self.reuse.lifetime;
        let old: Vec<Lease> = {
            let mut free = self.free.lock();
            let (keep, old) = std::mem::take(&mut *free)
                .into_iter()
                .partition(|l| l.born.elapsed() < lifetime);
            *free = keep;
            old
        };
        drop(old);
    }

    /// Sockets idle in the free list.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.free.lock().len()
    }
}

/// Read and drop whatever arrived on an idle socket. This asks the kernel (one system
/// call when nothing is there) rather than the event loop's readiness, which may not
/// have seen a datagram that arrived a moment ago.
///
/// Then the event loop is told the socket is empty (no system call): otherwise it still
/// holds the previous answer's readiness, and the next `recv` would first ask the kernel
/// once more, before the answer can have come, and get `EAGAIN` (one system call per
/// miss). A datagram that arrives after the drain is not lost: its readiness event is
/// newer than what is cleared, so the event loop still wakes the receive for it.
fn discard_queued(socket: &UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 512];
    while sock.recv_with_flags(&mut buf, dontwait()).is_ok() {}
    let _ = socket.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

fn dontwait() -> i32 {
    nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits()
}

/// A non-blocking UDP socket connected to `server`. It is not bound first: `connect`
/// binds it to a port the kernel picks at random from the ephemeral range.
fn connected_udp(server: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(server),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    sock.connect(&server.into())?;
    UdpSocket::from_std(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reuse(max_queries: u32, lifetime_ms: u64) -> Reuse {
        Reuse {
            max_queries,
            lifetime: Duration::from_millis(lifetime_ms),
        }
    }

    /// A local UDP "server" the sockets can connect to (nothing is sent).
    fn server() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    fn port(l: &Lease) -> u16 {
        l.socket.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_socket_carries_at_most_max_queries() {
        let srv = server();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(3, 60_000));
        let (first, new) = ports.take().unwrap();
        assert!(new);
        let p = port(&first);
        ports.give_back(first);
        for _ in 0..2 {
            let (l, new) = ports.take().unwrap();
            assert!(!new);
            assert_eq!(port(&l), p);
            ports.give_back(l);
        }
        // Three queries carried: closed, not kept.
        assert_eq!(ports.idle(), 0);
        let (l, new) = ports.take().unwrap();
        assert!(new);
        drop(l);
    }

    #[tokio::test]
    async fn one_query_per_socket_means_a_fresh_port_each_time() {
        let srv = server();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(1, 60_000));
        for _ in 0..5 {
            let (l, new) = ports.take().unwrap();
            assert!(new);
            ports.give_back(l);
            assert_eq!(ports.idle(), 0);
        }
    }

    #[tokio::test]
    async fn old_sockets_are_not_reused_and_are_swept() {
        let srv = server();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(100, 30));
        let (a, _) = ports.take().unwrap();
        let (b, _) = ports.take().unwrap();
        ports.give_back(a);
        ports.give_back(b);
        assert_eq!(ports.idle(), 2);
        std::thread::sleep(Duration::from_millis(40));
        ports.sweep();
        assert_eq!(
            ports.idle(),
            0,
            "the sweep left sockets past their lifetime"
        );
        // And one that is found too old when taken is closed, not used.
        let (c, _) = ports.take().unwrap();
        ports.give_back(c);
        std::thread::sleep(Duration::from_millis(40));
        let (l, new) = ports.take().unwrap();
        assert!(new, "a socket past its lifetime was reused");
        assert_eq!(ports.idle(), 0);
        drop(l);
    }

    #[tokio::test]
    async fn datagrams_that_arrive_while_idle_are_discarded() {
        let srv = server();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(100, 60_000));
        let (l, _) = ports.take().unwrap();
        let local = l.socket.local_addr().unwrap();
        ports.give_back(l);
        // A "planted" datagram from the server's own address while the socket is idle.
        srv.send_to(b"planted", local).unwrap();
        let (l, new) = ports.take().unwrap();
        assert!(!new);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        let left = socket2::SockRef::from(&l.socket).recv_with_flags(&mut buf, dontwait());
        assert!(
            matches!(&left, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a datagram was left for the next query: {left:?}"
        );
        assert_eq!(l.socket.local_addr().unwrap(), local);
    }

    #[tokio::test]
    async fn sockets_reach_ipv6_servers_from_a_random_port() {
        let srv = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(100, 60_000));
        let (l, _) = ports.take().unwrap();
        let local = l.socket.local_addr().unwrap();
        assert!(local.is_ipv6() && local.port() != 0, "{local}");
        l.socket.send(b"query").await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = srv.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"query"[..], local));
        srv.send_to(b"answer", from).unwrap();
        let n = l.socket.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"answer");
    }

    #[tokio::test]
    async fn at_most_max_idle_sockets_are_kept() {
        let srv = server();
        let ports = Ports::new(srv.local_addr().unwrap(), reuse(100, 60_000));
        let leases: Vec<Lease> = (0..MAX_IDLE + 10)
            .map(|_| ports.take().unwrap().0)
            .collect();
        for l in leases {
            ports.give_back(l);
        }
        assert_eq!(ports.idle(), MAX_IDLE);
    }
}
