//! A steady stream of DNS queries from the pod namespace, counting what was answered.
//!
//! Every query goes out on its own socket, as a stub resolver's would: a connected UDP
//! socket (so "nothing listens", ICMP port unreachable, is seen as a refusal) or a fresh TCP
//! connection. Queries are sent on a fixed schedule by tasks that do not wait for each
//! other, so a gap in service cannot slow the stream down.
//!
//! What counts, per query:
//! - answered: a NOERROR answer with records, on the first transmission;
//! - retried: answered only after one retransmission, as a stub resolver retries: a UDP
//!   query unanswered for 1.5 s is sent again on the same socket; a TCP connection that
//!   was accepted and then closed or reset without an answer (a process killed while
//!   holding it) is retried once on a new connection;
//! - refused: nothing was listening (ICMP port unreachable, TCP RST on connect): the
//!   address had no socket, the failure a kept socket exists to prevent; not retried;
//! - lost: no answer after the retry;
//! - bad: an answer, but not NOERROR with records (SERVFAIL, a wrong ID).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::netns::Netns;
use crate::common::client::{encode, query, tcp_frame};

const ATTEMPT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub proto: Proto,
    pub server: SocketAddr,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        };
        write!(f, "{p} {}", self.server)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub sent: u64,
    pub answered: u64,
    pub retried: u64,
    pub refused: u64,
    pub lost: u64,
    pub bad: u64,
    /// The longest time from a query's first transmission to its good answer (retries
    /// included): how long a client waited at worst.
    pub slowest: Duration,
    /// A few examples of what went wrong.
    pub examples: Vec<String>,
}

impl Tally {
    /// Queries the client never got a good answer to.
    pub fn unanswered(&self) -> u64 {
        self.refused + self.lost + self.bad
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {:>4}, answered {:>4}, after a retry {:>2}, refused {:>3}, lost {:>3}, bad {:>3}, slowest {:>4} ms",
            self.sent,
            self.answered,
            self.retried,
            self.refused,
            self.lost,
            self.bad,
            self.slowest.as_millis()
        )?;
        if !self.examples.is_empty() {
            write!(f, " (e.g. {})", self.examples.join("; "))?;
        }
        Ok(())
    }
}

/// The result of a stream: one tally per target.
pub struct Report(pub Vec<(Target, Tally)>);

impl Report {
    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for (_, x) in &self.0 {
            t.sent += x.sent;
            t.answered += x.answered;
            t.retried += x.retried;
            t.refused += x.refused;
            t.lost += x.lost;
            t.bad += x.bad;
            t.slowest = t.slowest.max(x.slowest);
        }
        t
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (target, tally) in &self.0 {
            writeln!(f, "  {target:<22} {tally}")?;
        }
        write!(f, "  {:<22} {}", "total", self.total())
    }
}

enum Outcome {
    Answered,
    Retried,
    Refused,
    Lost(String),
    Bad(String),
}

fn refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
}

fn judge(m: &Message, id: u16, retried: bool) -> Outcome {
    if m.id() != id {
        Outcome::Bad(format!("id {} for {id}", m.id()))
    } else if m.response_code() != ResponseCode::NoError || m.answers().is_empty() {
        Outcome::Bad(format!(
            "{} with {} answers",
            m.response_code(),
            m.answers().len()
        ))
    } else if retried {
        Outcome::Retried
    } else {
        Outcome::Answered
    }
}

async fn udp_once(server: SocketAddr, q: &Message) -> Outcome {
    let sock = match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
        Ok(s) => s,
        Err(e) => return Outcome::Lost(format!("bind: {e}")),
    };
    if let Err(e) = sock.connect(server).await {
        return Outcome::Lost(format!("connect: {e}"));
    }
    let bytes = encode(q);
    let mut buf = vec![0u8; 65535];
    for attempt in 0..2 {
        match sock.send(&bytes).await {
            Err(e) if refused(&e) => return Outcome::Refused,
            Err(e) => return Outcome::Lost(format!("send: {e}")),
            Ok(_) => {}
        }
        match timeout(ATTEMPT, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                return match Message::from_vec(&buf[..n]) {
                    Ok(m) => judge(&m, q.id(), attempt > 0),
                    Err(e) => Outcome::Bad(format!("unparsable: {e}")),
                }
            }
            Ok(Err(e)) if refused(&e) => return Outcome::Refused,
            Ok(Err(e)) => return Outcome::Lost(format!("recv: {e}")),
            Err(_) => continue,
        }
    }
    Outcome::Lost("udp: no answer to two transmissions".into())
}

async fn tcp_exchange(server: SocketAddr, q: &Message) -> Result<Message, (bool, String)> {
    // Err((refused, why)).
    let mut s = match timeout(ATTEMPT, tokio::net::TcpStream::connect(server)).await {
        Err(_) => return Err((false, "connect timed out".into())),
        Ok(Err(e)) => return Err((refused(&e), format!("connect: {e}"))),
        Ok(Ok(s)) => s,
    };
    let exchange = async {
        s.write_all(&tcp_frame(q)).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut body).await?;
        Message::from_vec(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    match timeout(ATTEMPT, exchange).await {
        Err(_) => Err((false, "no answer in time".into())),
        Ok(Err(e)) => Err((false, format!("exchange: {e}"))),
        Ok(Ok(m)) => Ok(m),
    }
}

async fn tcp_once(server: SocketAddr, q: &Message) -> Outcome {
    let mut why = String::new();
    for attempt in 0..2 {
        match tcp_exchange(server, q).await {
            Ok(m) => return judge(&m, q.id(), attempt > 0),
            Err((true, _)) => return Outcome::Refused,
            Err((false, w)) => why = w,
        }
    }
    Outcome::Lost(format!("tcp: {why}"))
}

async fn pace(target: Target, rate: u32, names: Arc<Vec<String>>, stop: Arc<AtomicBool>) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let q = query(&names[i % names.len()], RecordType::A);
        i += 1;
        let tally = Arc::clone(&tally);
        tasks.spawn(async move {
            let began = std::time::Instant::now();
            let outcome = match target.proto {
                Proto::Udp => udp_once(target.server, &q).await,
                Proto::Tcp => tcp_once(target.server, &q).await,
            };
            let took = began.elapsed();
            let mut t = tally.lock().unwrap();
            t.sent += 1;
            if matches!(outcome, Outcome::Answered | Outcome::Retried) {
                t.slowest = t.slowest.max(took);
            }
            let example = match outcome {
                Outcome::Answered => {
                    t.answered += 1;
                    None
                }
                Outcome::Retried => {
                    t.retried += 1;
                    None
                }
                Outcome::Refused => {
                    t.refused += 1;
                    Some("refused".to_string())
                }
                Outcome::Lost(why) => {
                    t.lost += 1;
                    Some(why)
                }
                Outcome::Bad(why) => {
                    t.bad += 1;
                    Some(why)
                }
            };
            if let Some(e) = example {
                if t.examples.len() < 3 && !t.examples.contains(&e) {
                    t.examples.push(e);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let t = tally.lock().unwrap().clone();
    t
}

/// A running stream; [`Stream::finish`] stops it and waits for every query's outcome.
pub struct Stream {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<(Target, Tally)>>,
}

impl Stream {
    /// `rate` queries per second to each target, for names in turn, from namespace `ns`.
    pub fn start(ns: &Netns, targets: Vec<Target>, rate: u32, names: Vec<String>) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let names = Arc::new(names);
        let handle = ns.spawn(move || {
            // One thread, so every socket is created in the namespace this thread entered.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut set = Vec::new();
                for t in &targets {
                    set.push(tokio::spawn(pace(
                        *t,
                        rate,
                        Arc::clone(&names),
                        Arc::clone(&flag),
                    )));
                }
                let mut out = Vec::new();
                for (t, h) in targets.into_iter().zip(set) {
                    out.push((t, h.await.expect("pace task")));
                }
                out
            })
        });
        Stream { stop, handle }
    }

    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        Report(self.handle.join().expect("load thread"))
    }
}

/// One query from namespace `ns` (same rules as the stream, no retry counted apart).
pub fn ask(ns: &Netns, target: Target, name: &str) -> Result<Message, String> {
    let q = query(name, RecordType::A);
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            match target.proto {
                Proto::Udp => {
                    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0")
                        .await
                        .map_err(|e| e.to_string())?;
                    sock.connect(target.server)
                        .await
                        .map_err(|e| e.to_string())?;
                    sock.send(&encode(&q)).await.map_err(|e| e.to_string())?;
                    let mut buf = vec![0u8; 65535];
                    let n = timeout(ATTEMPT, sock.recv(&mut buf))
                        .await
                        .map_err(|_| "timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                    Message::from_vec(&buf[..n]).map_err(|e| e.to_string())
                }
                Proto::Tcp => tcp_exchange(target.server, &q).await.map_err(|(_, w)| w),
            }
        })
    })
}
