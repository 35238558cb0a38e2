//! A blocking DNS client for the tests: hickory-proto messages over std sockets with timeouts,
//! plus raw-bytes sends for malformed packets. Nothing here retries: a test sees exactly what
//! the server sent.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A recursive query for (name, type) with a random ID and no EDNS. `name` keeps its case.
pub fn query(name: &str, qtype: RecordType) -> Message {
    let n = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    let mut m = Message::new();
    m.set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(&n).expect("name"), qtype));
    m
}

/// The same query advertising an EDNS0 UDP size.
pub fn with_edns(mut m: Message, size: u16) -> Message {
    let mut e = Edns::new();
    e.set_max_payload(size);
    m.set_edns(e);
    m
}

pub fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().expect("encode query")
}

fn udp_socket(server: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(server)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// Send raw bytes over UDP; the first datagram back, or None when nothing came within `timeout`.
pub fn udp_raw(server: SocketAddr, bytes: &[u8], timeout: Duration) -> io::Result<Option<Vec<u8>>> {
    let s = udp_socket(server, timeout)?;
    s.send(bytes)?;
    let mut buf = vec![0u8; 65535];
    match s.recv(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One query over UDP; waits for the answer carrying the same ID (others are ignored).
pub fn udp(server: SocketAddr, m: &Message) -> io::Result<Message> {
    udp_timeout(server, m, TIMEOUT)
}

pub fn udp_timeout(server: SocketAddr, m: &Message, timeout: Duration) -> io::Result<Message> {
    let s = udp_socket(server, timeout)?;
    s.send(&encode(m))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf)?;
        let r = Message::from_vec(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if r.id() == m.id() {
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
}

/// The first raw answer bytes to a message over UDP (for byte-level checks).
pub fn udp_bytes(server: SocketAddr, m: &Message) -> io::Result<Vec<u8>> {
    udp_raw(server, &encode(m), TIMEOUT)?.ok_or_else(|| io::ErrorKind::TimedOut.into())
}

pub fn tcp_connect(server: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&server, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Frame a message for TCP (two-byte length prefix).
pub fn tcp_frame(m: &Message) -> Vec<u8> {
    let body = encode(m);
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn tcp_read(s: &mut TcpStream) -> io::Result<Message> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body)?;
    Message::from_vec(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One query on a fresh TCP connection.
pub fn tcp(server: SocketAddr, m: &Message) -> io::Result<Message> {
    let mut s = tcp_connect(server)?;
    s.write_all(&tcp_frame(m))?;
    tcp_read(&mut s)
}

/// Write all queries at once on one connection, then read as many answers (any order).
pub fn tcp_pipelined(server: SocketAddr, ms: &[Message]) -> io::Result<Vec<Message>> {
    let mut s = tcp_connect(server)?;
    let mut all = Vec::new();
    for m in ms {
        all.extend(tcp_frame(m));
    }
    s.write_all(&all)?;
    (0..ms.len()).map(|_| tcp_read(&mut s)).collect()
}

/// The A/AAAA addresses of an answer, as text.
pub fn addrs(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// TTLs of the answer section.
pub fn ttls(m: &Message) -> Vec<u32> {
    m.answers().iter().map(|r| r.ttl()).collect()
}

/// Whether the authority section carries an SOA.
pub fn has_soa(m: &Message) -> bool {
    m.name_servers()
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

/// The question section of a wire message, as raw bytes (from offset 12 to the end of the
/// first question), for exact letter-case comparisons.
pub fn question_bytes(wire: &[u8]) -> Option<&[u8]> {
    let mut i = 12;
    loop {
        let l = usize::from(*wire.get(i)?);
        if l == 0 {
            break;
        }
        if l & 0xC0 != 0 {
            return None;
        }
        i += 1 + l;
    }
    wire.get(12..i + 1 + 4)
}
