//! A real upstream DNS server for the tests: hickory-server on its own thread and runtime,
//! listening on UDP and TCP on 127.0.0.1 at one random port.
//!
//! It answers from a small in-memory zone that each test fills (A, AAAA, TXT, CNAME, PTR),
//! with NXDOMAIN or NODATA (NOERROR, no answers) plus an SOA in the authority section when
//! the name or type is absent. Everything it receives is logged, so a test can assert how many
//! queries localdns sent it per (lower-cased name, type) and over which transport.
//!
//! Knobs a test can turn while it runs: `set_silent` (receive and count, never answer: a black
//! hole), `set_delay` (answer late: for coalescing), `set_name_delay` (answer one name late:
//! an authority that is slow for one name only), `set_rcode` (one name answered with any
//! rcode, extended ones such as BADCOOKIE included), `set_refuse_edns` (an old server that
//! answers FORMERR or NOTIMP to every query with EDNS), and `shutdown` (close both sockets:
//! the port refuses afterwards).
//!
//! Size limits are applied here and not left to hickory: a UDP answer that does not fit the
//! client's limit (512 without EDNS, else the EDNS size) is sent as header + question with TC=1,
//! like real authoritative servers do, so localdns's retry over TCP is exercised for real.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;

/// Transport a query reached the upstream over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One query as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
    pub transport: Transport,
    /// The EDNS UDP size the sender advertised, if it sent an OPT record.
    pub edns_size: Option<u16>,
    /// Source address: TCP queries from one connection share it.
    pub src: SocketAddr,
}

/// SOA sent with negative answers (and answerable as a record).
#[derive(Debug, Clone, Copy)]
pub struct SoaTimes {
    /// TTL of the SOA record itself.
    pub ttl: u32,
    /// The SOA MINIMUM field (RFC 2308 negative TTL).
    pub minimum: u32,
}

#[derive(Default)]
struct Zone {
    /// (lower-case name without trailing dot, type) -> records.
    records: HashMap<(String, RecordType), Vec<Record>>,
    /// Zone apexes (lower case, no trailing dot); the SOA owner of a negative answer is the
    /// longest apex that is a suffix of the name, else the root.
    apexes: Vec<String>,
    soa: Option<SoaTimes>,
}

struct State {
    zone: Mutex<Zone>,
    seen: Mutex<Vec<Seen>>,
    silent: AtomicBool,
    delay: Mutex<Duration>,
    /// Extra delay per name (keyed like `key`), on top of `delay`.
    name_delay: Mutex<HashMap<String, Duration>>,
    /// Names (keyed like `key`) answered with SERVFAIL.
    servfail: Mutex<Vec<String>>,
    /// When set, every question is answered with this RCODE and no records.
    rcode_all: Mutex<Option<ResponseCode>>,
    /// Rate limiting like NSD's RRL with `rrl-slip: 2`: over UDP only one query in this
    /// many is answered; of the others, every second gets an empty TC=1 answer and the
    /// rest are dropped. TCP is always answered. 0 or 1 = off.
    udp_one_in: AtomicUsize,
    udp_seen: AtomicUsize,
    /// Names (keyed like `key`) answered with this rcode and no records; an extended one
    /// (BADCOOKIE) has its upper bits in the OPT record when the query had one.
    rcodes: Mutex<HashMap<String, ResponseCode>>,
    /// An old server: every query with an OPT record is answered with this rcode
    /// (FORMERR or NOTIMP) and no OPT.
    refuse_edns: Mutex<Option<ResponseCode>>,
}

/// Normalise a name the way the upstream keys it: lower case, no trailing dot.
pub fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let n = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_str(&n).unwrap_or_else(|e| panic!("bad test name {name:?}: {e}"))
}

impl Zone {
    fn soa_record(&self, qname: &str) -> Record {
        let apex = self
            .apexes
            .iter()
            .filter(|a| qname == a.as_str() || qname.ends_with(&format!(".{a}")))
            .max_by_key(|a| a.len())
            .cloned()
            .unwrap_or_default();
        let times = self.soa.unwrap_or(SoaTimes {
            ttl: 60,
            minimum: 60,
        });
        let owner = if apex.is_empty() {
            Name::root()
        } else {
            fqdn(&apex)
        };
        let soa = SOA::new(
            fqdn(&format!("ns1.{apex}")),
            fqdn(&format!("hostmaster.{apex}")),
            1,
            3600,
            600,
            86400,
            times.minimum,
        );
        Record::from_rdata(owner, times.ttl, RData::SOA(soa))
    }

    fn name_exists(&self, qname: &str) -> bool {
        self.records.keys().any(|(n, _)| n == qname)
    }

    /// (rcode, answers, authority) for one question.
    fn lookup(&self, qname: &str, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        if qtype == RecordType::SOA && self.apexes.iter().any(|a| a == qname) {
            return (ResponseCode::NoError, vec![self.soa_record(qname)], vec![]);
        }
        if let Some(rrs) = self.records.get(&(qname.to_string(), qtype)) {
            return (ResponseCode::NoError, rrs.clone(), vec![]);
        }
        if let Some(cnames) = self.records.get(&(qname.to_string(), RecordType::CNAME)) {
            let mut answers = cnames.clone();
            if let Some(RData::CNAME(target)) = cnames.first().map(|r| r.data()) {
                let t = key(&target.0.to_string());
                if let Some(rrs) = self.records.get(&(t, qtype)) {
                    answers.extend(rrs.iter().cloned());
                }
            }
            return (ResponseCode::NoError, answers, vec![]);
        }
        let rcode = if self.name_exists(qname) {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        (rcode, vec![], vec![self.soa_record(qname)])
    }
}

struct Handler(Arc<State>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut fail = Header::response_from_request(request.header());
        fail.set_response_code(ResponseCode::ServFail);
        let Some(query) = request.queries().first() else {
            return fail.into();
        };
        let qname = key(&query.name().to_string());
        let qtype = query.query_type();
        let transport = match request.protocol() {
            Protocol::Tcp => Transport::Tcp,
            _ => Transport::Udp,
        };
        let edns_size = request.edns().map(|e| e.max_payload());
        self.0.seen.lock().unwrap().push(Seen {
            name: qname.clone(),
            qtype,
            transport,
            edns_size,
            src: request.src(),
        });

        if self.0.silent.load(Ordering::SeqCst) {
            return fail.into();
        }
        let one_in = self.0.udp_one_in.load(Ordering::SeqCst);
        let mut limited = false;
        if transport == Transport::Udp && one_in > 1 {
            match self.0.udp_seen.fetch_add(1, Ordering::SeqCst) % one_in {
                0 => {}
                k if k % 2 == 1 => limited = true,
                _ => return fail.into(),
            }
        }
        let delay = *self.0.delay.lock().unwrap()
            + self
                .0
                .name_delay
                .lock()
                .unwrap()
                .get(&qname)
                .copied()
                .unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }

        let refuse = *self.0.refuse_edns.lock().unwrap();
        if let (Some(rcode), Some(_)) = (refuse, request.edns()) {
            let mut header = Header::response_from_request(request.header());
            header.set_response_code(rcode);
            let builder = MessageResponseBuilder::from_message_request(request);
            return response
                .send_response(builder.build_no_records(header))
                .await
                .unwrap_or_else(|_| fail.into());
        }
        let forced = self.0.rcodes.lock().unwrap().get(&qname).copied();
        let all = *self.0.rcode_all.lock().unwrap();
        let (rcode, answers, authority) = if let Some(rcode) = all {
            (rcode, Vec::new(), Vec::new())
        } else if self.0.servfail.lock().unwrap().contains(&qname) {
            (ResponseCode::ServFail, Vec::new(), Vec::new())
        } else if let Some(rcode) = forced {
            (rcode, Vec::new(), Vec::new())
        } else {
            self.0.zone.lock().unwrap().lookup(&qname, qtype)
        };
        let mut header = Header::response_from_request(request.header());
        header.set_message_type(MessageType::Response);
        header.set_authoritative(true);
        header.set_recursion_available(true);
        header.set_response_code(rcode);

        // The size the full answer would have on the wire, to decide on truncation ourselves.
        let mut probe = Message::new();
        probe.set_header(header);
        probe.add_queries(request.queries().iter().map(|q| q.original().clone()));
        probe.add_answers(answers.iter().cloned());
        probe.add_name_servers(authority.iter().cloned());
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = request.edns() {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            probe.set_edns(ours.clone());
            builder.edns(ours);
        }
        let size = probe.to_vec().map(|v| v.len()).unwrap_or(usize::MAX);
        let limit = match transport {
            Transport::Udp => usize::from(request.edns().map_or(512, |e| e.max_payload().max(512))),
            Transport::Tcp => usize::from(u16::MAX),
        };
        let sent = if size > limit || limited {
            header.set_truncated(true);
            response
                .send_response(builder.build_no_records(header))
                .await
        } else {
            response
                .send_response(builder.build(header, answers.iter(), authority.iter(), [], []))
                .await
        };
        sent.unwrap_or_else(|_| fail.into())
    }
}

/// A running fake upstream. Dropping it shuts it down.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Bind UDP and TCP on the same free port of 127.0.0.1.
pub fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let addr = udp.local_addr().expect("udp addr");
        if let Ok(tcp) = TcpListener::bind(addr) {
            return (udp, tcp);
        }
    }
    panic!("no free port with both UDP and TCP on 127.0.0.1");
}

/// A port on 127.0.0.1 that was free a moment ago and has nothing listening (UDP and TCP).
pub fn closed_port() -> SocketAddr {
    let (udp, _tcp) = bind_pair();
    udp.local_addr().expect("addr")
}

impl Upstream {
    pub fn start() -> Upstream {
        let (udp, tcp) = bind_pair();
        Upstream::start_with(udp, tcp)
    }

    /// An upstream on UDP and TCP `addr` (which must be free).
    pub fn start_at(addr: SocketAddr) -> Upstream {
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        Upstream::start_with(udp, tcp)
    }

    /// An upstream on port 53 of a loopback address of its own (127.53.x.y), as a
    /// resolv.conf nameserver line needs. Needs root (port 53); None with the reason when
    /// it cannot bind.
    pub fn start_on_port_53() -> Result<Upstream, String> {
        let pid = std::process::id();
        for i in 0..50u32 {
            let n = pid.wrapping_mul(31).wrapping_add(i);
            let ip = std::net::Ipv4Addr::new(127, 53, (n >> 8) as u8, (n as u8).max(1));
            let addr = SocketAddr::from((ip, 53));
            match (UdpSocket::bind(addr), TcpListener::bind(addr)) {
                (Ok(udp), Ok(tcp)) => return Ok(Upstream::start_with(udp, tcp)),
                (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(format!("cannot bind port 53: {e}"))
                }
                _ => continue,
            }
        }
        Err("no free 127.53.x.y:53".into())
    }

    fn start_with(udp: UdpSocket, tcp: TcpListener) -> Upstream {
        let state = Arc::new(State {
            zone: Mutex::new(Zone::default()),
            seen: Mutex::new(Vec::new()),
            silent: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            name_delay: Mutex::new(HashMap::new()),
            servfail: Mutex::new(Vec::new()),
            rcode_all: Mutex::new(None),
            udp_one_in: AtomicUsize::new(0),
            udp_seen: AtomicUsize::new(0),
            rcodes: Mutex::new(HashMap::new()),
            refuse_edns: Mutex::new(None),
        });
        let addr = udp.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let handler = Handler(state.clone());
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{}", addr.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut server = ServerFuture::new(handler);
                    let registered = server
                        .register_socket_std(udp)
                        .and_then(|()| server.register_listener_std(tcp, Duration::from_secs(30)));
                    let _ = ready_tx.send(registered.map_err(|e| e.to_string()));
                    let _ = stop_rx.await;
                    let _ = server.shutdown_gracefully().await;
                });
                // Dropping the runtime drops every connection task and socket.
                drop(rt);
            })
            .expect("spawn upstream thread");
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("upstream thread did not start")
            .expect("upstream could not register its sockets");
        Upstream {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn add(&self, name: &str, ttl: u32, rdata: RData) -> &Self {
        let rtype = rdata.record_type();
        let rec = Record::from_rdata(fqdn(name), ttl, rdata);
        self.state
            .zone
            .lock()
            .unwrap()
            .records
            .entry((key(name), rtype))
            .or_default()
            .push(rec);
        self
    }

    pub fn a(&self, name: &str, ttl: u32, ip: &str) -> &Self {
        match IpAddr::from_str(ip).expect("ip") {
            IpAddr::V4(v4) => self.add(name, ttl, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, ttl, RData::AAAA(AAAA(v6))),
        }
    }

    pub fn txt(&self, name: &str, ttl: u32, text: &str) -> &Self {
        self.add(name, ttl, RData::TXT(TXT::new(vec![text.to_string()])))
    }

    /// `count` TXT records of `len` bytes each under `name`: about `count * (len + 14)` bytes.
    pub fn big_txt(&self, name: &str, ttl: u32, count: usize, len: usize) -> &Self {
        for i in 0..count {
            let s = format!("{i:04}-{}", "x".repeat(len.saturating_sub(5)));
            self.txt(name, ttl, &s);
        }
        self
    }

    pub fn cname(&self, name: &str, ttl: u32, target: &str) -> &Self {
        self.add(name, ttl, RData::CNAME(CNAME(fqdn(target))))
    }

    pub fn ptr(&self, name: &str, ttl: u32, target: &str) -> &Self {
        self.add(name, ttl, RData::PTR(PTR(fqdn(target))))
    }

    /// Declare a zone apex: negative answers below it carry its SOA.
    pub fn zone(&self, apex: &str) -> &Self {
        self.state.zone.lock().unwrap().apexes.push(key(apex));
        self
    }

    pub fn soa_times(&self, ttl: u32, minimum: u32) -> &Self {
        self.state.zone.lock().unwrap().soa = Some(SoaTimes { ttl, minimum });
        self
    }

    /// Receive and count queries but never answer them.
    pub fn set_silent(&self, silent: bool) {
        self.state.silent.store(silent, Ordering::SeqCst);
    }

    /// Answer `name` (any type) with SERVFAIL from now on.
    pub fn set_servfail(&self, name: &str) {
        self.state.servfail.lock().unwrap().push(key(name));
    }

    /// Answer every question with `rcode` (REFUSED, SERVFAIL...) from now on; `None`
    /// answers from the zone again.
    pub fn set_rcode_all(&self, rcode: Option<ResponseCode>) {
        *self.state.rcode_all.lock().unwrap() = rcode;
    }

    /// Rate-limit UDP like a cloud resolver or NSD's RRL: answer one UDP query in
    /// `one_in`, truncate half of the others and drop the rest; TCP is not limited.
    pub fn set_udp_rate_limit(&self, one_in: usize) {
        self.state.udp_one_in.store(one_in, Ordering::SeqCst);
    }

    /// Answer `name` with `rcode` and no records from now on.
    pub fn set_rcode(&self, name: &str, rcode: ResponseCode) {
        self.state.rcodes.lock().unwrap().insert(key(name), rcode);
    }

    /// Answer every query with an OPT record with `rcode` (FORMERR, NOTIMP), no OPT; `None`
    /// speaks EDNS again.
    pub fn set_refuse_edns(&self, rcode: Option<ResponseCode>) {
        *self.state.refuse_edns.lock().unwrap() = rcode;
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Answer `name` (any type) `delay` late from now on; other names are not delayed.
    pub fn set_name_delay(&self, name: &str, delay: Duration) {
        self.state
            .name_delay
            .lock()
            .unwrap()
            .insert(key(name), delay);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Queries received for (name, type), any transport; name compared case-insensitively.
    pub fn count(&self, name: &str, qtype: RecordType) -> usize {
        let k = key(name);
        self.seen()
            .iter()
            .filter(|s| s.name == k && s.qtype == qtype)
            .count()
    }

    /// Queries received for (name, type) over one transport.
    pub fn count_over(&self, name: &str, qtype: RecordType, t: Transport) -> usize {
        let k = key(name);
        self.seen()
            .iter()
            .filter(|s| s.name == k && s.qtype == qtype && s.transport == t)
            .count()
    }

    pub fn count_transport(&self, t: Transport) -> usize {
        self.seen().iter().filter(|s| s.transport == t).count()
    }

    pub fn total(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Stop serving and close both sockets; returns once the port is closed.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A TCP relay in front of an upstream, on its own port of 127.0.0.1. `silence_existing`
/// makes the connections open at that moment go silent the way a peer that died without a
/// RST does: they stay open, but nothing they carry is read or forwarded any more (in
/// either direction). Connections accepted afterwards are relayed as usual, like a Service
/// that kube-proxy moved to a live backend.
pub struct TcpRelay {
    pub addr: SocketAddr,
    state: Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    stop: AtomicBool,
    /// Connections accepted so far; those numbered below `silent_below` are silent.
    accepted: std::sync::atomic::AtomicUsize,
    silent_below: std::sync::atomic::AtomicUsize,
    /// Silent connections are kept here, open, until the relay is dropped.
    held: Mutex<Vec<std::net::TcpStream>>,
}

impl TcpRelay {
    pub fn start(to: SocketAddr) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(RelayState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let n = st.accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                for (from, into) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(into)) = (from, into) else {
                        continue;
                    };
                    let st = st.clone();
                    std::thread::spawn(move || pump(from, into, n, &st));
                }
                st.held.lock().unwrap().extend([client, server]);
            }
        });
        TcpRelay { addr, state }
    }

    /// The connections open now go silent (see the type's doc); later ones are relayed.
    pub fn silence_existing(&self) {
        let n = self.state.accepted.load(Ordering::SeqCst);
        self.state.silent_below.store(n, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

/// Copy `from` into `into` until either closes or connection `n` is silenced; a silenced
/// pump stops reading (so the sender's data piles up unread) and exits, leaving the
/// sockets open in `held`.
fn pump(mut from: std::net::TcpStream, mut into: std::net::TcpStream, n: usize, st: &RelayState) {
    use std::io::{Read, Write};
    let silent = || n < st.silent_below.load(Ordering::SeqCst) || st.stop.load(Ordering::SeqCst);
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 4096];
    while !silent() {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(k) => {
                if silent() || into.write_all(&buf[..k]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.held.lock().unwrap().clear();
    }
}
