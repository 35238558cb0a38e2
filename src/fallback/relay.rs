//! The relay itself: DNS over UDP and TCP on the relay's address, passed to the servers
//! as it came and the answer passed back. No cache and no parsing beyond the message ID:
//! it only has to be there while localdns is not, and be small enough to always be there.
//!
//! UDP: each query is sent from a fresh connected socket (its own random port), to the
//! servers in turn, one `timeout` each, and the first answer with the query's ID goes
//! back. TCP: each client connection is joined to one upstream connection, bytes both
//! ways, until either side closes or it has been idle for [`TCP_IDLE`]. Both are
//! bounded ([`MAX_UDP_IN_FLIGHT`], [`MAX_TCP_CONNECTIONS`]): beyond, a query is dropped
//! (the client retries) and counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// UDP queries relayed at once at most.
pub const MAX_UDP_IN_FLIGHT: usize = 2000;
/// TCP client connections at once at most.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A relayed TCP connection with no byte either way for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Where queries go and how long each attempt may take.
#[derive(Debug, Clone)]
pub struct Target {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

impl Target {
    /// The servers to try for one query: each once, at least twice in all.
    fn attempts(&self) -> impl Iterator<Item = &SocketAddr> {
        let n = self.servers.len().max(2);
        self.servers.iter().cycle().take(n)
    }
}

/// What the relay has done, for the log and `STATUS=`.
#[derive(Debug, Default)]
pub struct Counts {
    /// Queries answered (UDP answers and TCP connections joined).
    pub relayed: AtomicU64,
    /// Queries that got no answer from any server.
    pub failed: AtomicU64,
    /// Queries dropped over the bounds.
    pub dropped: AtomicU64,
}

/// The counts at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Queries that reached the relay (answered, unanswered or dropped).
    pub taken: u64,
    /// Of those, not answered: no server answered, or over the bounds.
    pub failed: u64,
}

impl Counts {
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    pub fn tally(&self) -> Tally {
        let relayed = self.relayed();
        let failed = self.failed.load(Ordering::Relaxed) + self.dropped.load(Ordering::Relaxed);
        Tally {
            taken: relayed + failed,
            failed,
        }
    }
}

/// Serve UDP on `sock` forever.
pub async fn udp(sock: UdpSocket, target: Arc<Target>, counts: Arc<Counts>) {
    let sock = Arc::new(sock);
    let limit = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(got) => got,
            // ICMP errors of an earlier answer's client and the like: nothing to do.
            Err(_) => continue,
        };
        if n < 12 {
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, target, counts) = (sock.clone(), target.clone(), counts.clone());
        tokio::spawn(async move {
            match exchange_udp(&query, &target).await {
                Some(answer) => {
                    counts.relayed.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.send_to(&answer, client).await;
                }
                None => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
}

async fn exchange_udp(query: &[u8], target: &Target) -> Option<Vec<u8>> {
    for server in target.attempts() {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = UdpSocket::bind(local).await else {
            continue;
        };
        if sock.connect(server).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let wait = async {
            let mut buf = vec![0u8; 65535];
            loop {
                // A refused port (ICMP) fails at once and the next server is tried.
                let n = sock.recv(&mut buf).await.ok()?;
                if n >= 12 && buf[..2] == query[..2] {
                    buf.truncate(n);
                    return Some(buf);
                }
            }
        };
        if let Ok(Some(answer)) = tokio::time::timeout(target.timeout, wait).await {
            return Some(answer);
        }
    }
    None
}

/// Serve TCP on `listener` forever.
pub async fn tcp(listener: TcpListener, target: Arc<Target>, counts: Arc<Counts>) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // EMFILE and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (target, counts) = (target.clone(), counts.clone());
        tokio::spawn(async move {
            match connect(&target).await {
                Some(upstream) => {
                    counts.relayed.fetch_add(1, Ordering::Relaxed);
                    join(client, upstream).await;
                }
                None => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
}

async fn connect(target: &Target) -> Option<TcpStream> {
    for server in target.attempts() {
        if let Ok(Ok(s)) = tokio::time::timeout(target.timeout, TcpStream::connect(server)).await {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

/// Bytes both ways until one side closes, or neither sends for [`TCP_IDLE`].
async fn join(mut a: TcpStream, mut b: TcpStream) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut up = [0u8; 4096];
    let mut down = vec![0u8; 65536];
    loop {
        let step = tokio::time::timeout(TCP_IDLE, async {
            tokio::select! {
                r = ar.read(&mut up) => match r {
                    Ok(0) | Err(_) => false,
                    Ok(n) => bw.write_all(&up[..n]).await.is_ok(),
                },
                r = br.read(&mut down) => match r {
                    Ok(0) | Err(_) => false,
                    Ok(n) => aw.write_all(&down[..n]).await.is_ok(),
                },
            }
        })
        .await;
        if !matches!(step, Ok(true)) {
            break;
        }
    }
    // Half-closes are not relayed: a DNS client that shuts down its side is done asking,
    // and the answers it waits for were written before it read EOF here.
    let _ = aw.shutdown().await;
    let _ = bw.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(servers: &[&str]) -> Target {
        Target {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            timeout: Duration::from_millis(300),
        }
    }

    #[test]
    fn one_server_is_tried_twice_and_several_once_each() {
        let one = target(&["10.0.0.1:53"]);
        assert_eq!(one.attempts().count(), 2);
        let three = target(&["10.0.0.1:53", "10.0.0.2:53", "10.0.0.3:53"]);
        let tried: Vec<_> = three.attempts().map(|s| s.to_string()).collect();
        assert_eq!(tried, ["10.0.0.1:53", "10.0.0.2:53", "10.0.0.3:53"]);
    }

    /// A real UDP round trip on loopback: a server that answers with the query's bytes
    /// behind a refused port, which is skipped at once.
    #[tokio::test]
    async fn a_udp_query_is_relayed_past_a_refused_server() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let t = Target {
            servers: vec![closed_addr, echo_addr],
            timeout: Duration::from_secs(2),
        };
        let query = *b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00";
        let started = std::time::Instant::now();
        let answer = exchange_udp(&query, &t).await.expect("an answer");
        assert_eq!(answer, query);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the refused port was waited on"
        );
    }

    #[tokio::test]
    async fn a_tcp_connection_is_joined_to_the_server() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
        });
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        tokio::spawn(tcp(
            relay,
            Arc::new(Target {
                servers: vec![server_addr],
                timeout: Duration::from_secs(2),
            }),
            counts.clone(),
        ));
        let mut c = TcpStream::connect(relay_addr).await.unwrap();
        c.write_all(b"\x00\x02ab").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x00\x02ab");
        assert_eq!(counts.relayed(), 1);
    }
}
