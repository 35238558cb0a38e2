//! Parsing a client's query: only the header, the question and the OPT record, because
//! that is all the cache-hit path needs.

use super::wire::{self, Header, HEADER_LEN, TYPE_OPT};

/// EDNS0 options of a client query (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size (values below 512 are treated as 512).
    pub udp_size: u16,
    pub version: u8,
    /// DNSSEC OK bit.
    pub dnssec_ok: bool,
}

/// A parsed client query, borrowing the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    pub flags: u16,
    /// Question section as sent: name, type, class (letter case preserved).
    pub question: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// Why a packet is not a query we answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not even a header, or a response: drop silently.
    Drop,
    /// Header readable, rest malformed: answer FORMERR with this ID.
    FormErr { id: u16, flags: u16 },
    /// Opcode other than QUERY or a zone-transfer type: answer NOTIMP.
    NotImp { id: u16, flags: u16 },
    /// EDNS version we do not speak: answer BADVERS (RFC 6891 §6.1.3).
    BadVers { id: u16, flags: u16 },
}

const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const TYPE_MAILB: u16 = 253;
const TYPE_MAILA: u16 = 254;

impl<'a> Query<'a> {
    /// Parse a client query. Never panics, whatever the bytes.
    pub fn parse(pkt: &'a [u8]) -> Result<Query<'a>, Reject> {
        let h = Header::read(pkt).ok_or(Reject::Drop)?;
        if h.flags & wire::FLAG_QR != 0 {
            return Err(Reject::Drop);
        }
        let (id, flags) = (h.id, h.flags);
        if h.opcode() != 0 {
            return Err(Reject::NotImp { id, flags });
        }
        let formerr = Reject::FormErr { id, flags };
        if h.qdcount != 1 || h.ancount != 0 {
            return Err(formerr);
        }
        let qend = question_end(pkt).ok_or(formerr)?;
        let qtype = wire::u16_at(pkt, qend - 4).ok_or(formerr)?;
        let qclass = wire::u16_at(pkt, qend - 2).ok_or(formerr)?;
        let mut edns = None;
        let mut at = qend;
        for i in 0..(h.nscount as usize + h.arcount as usize) {
            let r = wire::read_record(pkt, at).ok_or(formerr)?;
            if r.rtype == TYPE_OPT {
                // Only one OPT, in the additional section, owned by the root (RFC 6891 §6.1.1).
                if edns.is_some() || i < h.nscount as usize || pkt[r.start] != 0 {
                    return Err(formerr);
                }
                edns = Some(Edns {
                    udp_size: r.class.max(512),
                    version: (r.ttl >> 16) as u8,
                    dnssec_ok: r.ttl & 0x8000 != 0,
                });
            }
            at = r.end;
        }
        if let Some(e) = edns {
            if e.version != 0 {
                return Err(Reject::BadVers { id, flags });
            }
        }
        if matches!(qtype, TYPE_IXFR | TYPE_AXFR | TYPE_MAILB | TYPE_MAILA) {
            return Err(Reject::NotImp { id, flags });
        }
        Ok(Query {
            id,
            flags,
            question: &pkt[HEADER_LEN..qend],
            qtype,
            qclass,
            edns,
        })
    }

    /// The question name in wire form (without type and class).
    pub fn qname(&self) -> &'a [u8] {
        &self.question[..self.question.len() - 4]
    }

    pub fn checking_disabled(&self) -> bool {
        self.flags & wire::FLAG_CD != 0
    }

    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    /// Largest response the client accepts over UDP: its EDNS size (capped at
    /// [`MAX_UDP_RESPONSE`]), or 512 without EDNS.
    pub fn udp_limit(&self) -> usize {
        self.edns
            .map_or(512, |e| (e.udp_size as usize).min(MAX_UDP_RESPONSE))
    }

    /// The cache key: lower-cased name, type, class and the DO and CD bits.
    pub fn key(&self) -> Key {
        Key::new(
            self.qname(),
            self.qtype,
            self.qclass,
            self.dnssec_ok(),
            self.checking_disabled(),
        )
    }
}

/// What an error answer echoes of a query it refuses: the question and the EDNS options,
/// when they could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Echo<'a> {
    pub question: Option<&'a [u8]>,
    pub edns: Option<Edns>,
}

/// Read what can be read of a query that [`Query::parse`] refused (FORMERR, NOTIMP,
/// BADVERS), whatever its opcode (every opcode has this layout): the single question if
/// it is well formed, and the first OPT record of the additional section, as far as the
/// records before it can be walked. Never panics.
pub fn salvage(pkt: &[u8]) -> Echo<'_> {
    let Some(h) = Header::read(pkt) else {
        return Echo::default();
    };
    let (question, mut at) = match h.qdcount {
        0 => (None, HEADER_LEN),
        1 => match question_end(pkt) {
            Some(end) => (Some(&pkt[HEADER_LEN..end]), end),
            None => return Echo::default(),
        },
        _ => return Echo::default(),
    };
    let before_additional = h.ancount as usize + h.nscount as usize;
    let mut edns = None;
    for i in 0..before_additional + h.arcount as usize {
        let Some(r) = wire::read_record(pkt, at) else {
            break;
        };
        if r.rtype == TYPE_OPT && i >= before_additional && pkt[r.start] == 0 {
            edns = Some(Edns {
                udp_size: r.class.max(512),
                version: (r.ttl >> 16) as u8,
                dnssec_ok: r.ttl & 0x8000 != 0,
            });
            break;
        }
        at = r.end;
    }
    Echo { question, edns }
}

/// Never send a UDP answer larger than this, whatever the client advertises.
pub const MAX_UDP_RESPONSE: usize = 4096;

/// Offset just past the single question of a message (uncompressed name + type + class).
/// Labels are checked: no compression in the question, at most 255 bytes.
pub fn question_end(pkt: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = *pkt.get(at)? as usize;
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
        if at - HEADER_LEN > 255 {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    let end = at + 4;
    (end <= pkt.len()).then_some(end)
}

/// Cache key: the lower-cased wire name followed by type, class and a flags byte.
/// Stored inline so that building it on the hit path allocates nothing.
#[derive(Clone, Copy)]
pub struct Key {
    len: u16,
    bytes: [u8; 262],
}

impl Key {
    pub fn new(qname: &[u8], qtype: u16, qclass: u16, dnssec_ok: bool, cd: bool) -> Key {
        let mut bytes = [0u8; 262];
        let n = qname.len().min(255);
        for (d, s) in bytes[..n].iter_mut().zip(qname) {
            *d = s.to_ascii_lowercase();
        }
        bytes[n..n + 2].copy_from_slice(&qtype.to_be_bytes());
        bytes[n + 2..n + 4].copy_from_slice(&qclass.to_be_bytes());
        bytes[n + 4] = u8::from(dnssec_ok) | (u8::from(cd) << 1);
        Key {
            len: (n + 5) as u16,
            bytes,
        }
    }

    /// Rebuild a key from [`Key::as_bytes`] output.
    pub fn from_bytes(b: &[u8]) -> Option<Key> {
        if b.len() < 6 || b.len() > 262 {
            return None;
        }
        let mut bytes = [0u8; 262];
        bytes[..b.len()].copy_from_slice(b);
        Some(Key {
            len: b.len() as u16,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The lower-cased question name in wire form.
    pub fn qname(&self) -> &[u8] {
        &self.bytes[..self.len as usize - 5]
    }

    pub fn qtype(&self) -> u16 {
        wire::u16_at(self.as_bytes(), self.len as usize - 5).unwrap_or(0)
    }

    pub fn qclass(&self) -> u16 {
        wire::u16_at(self.as_bytes(), self.len as usize - 3).unwrap_or(0)
    }

    pub fn dnssec_ok(&self) -> bool {
        self.bytes[self.len as usize - 1] & 1 != 0
    }

    pub fn checking_disabled(&self) -> bool {
        self.bytes[self.len as usize - 1] & 2 != 0
    }

    /// The question name in presentation form, for logs.
    pub fn name_text(&self) -> String {
        name_to_text(self.qname())
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} type {}", self.name_text(), self.qtype())
    }
}

/// Wire name (uncompressed) to dotted text, lower-cased labels kept as they are.
pub fn name_to_text(wire_name: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while let Some(&len) = wire_name.get(at) {
        if len == 0 {
            break;
        }
        let label = wire_name
            .get(at + 1..at + 1 + len as usize)
            .unwrap_or_default();
        out.push_str(&String::from_utf8_lossy(label));
        out.push('.');
        at += 1 + len as usize;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Dotted zone name ("cluster.local", no trailing dot) to lower-cased wire form.
pub fn text_to_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|c| c.to_ascii_lowercase()));
    }
    out.push(0);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a query: id, name, type, optional EDNS (size, DO).
    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&0x0100u16.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some((size, dnssec_ok)) = edns {
            m.push(0);
            m.extend_from_slice(&TYPE_OPT.to_be_bytes());
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn parses_question_and_edns() {
        let pkt = query(0xbeef, "WwW.Example.COM", 1, Some((1232, true)));
        let q = Query::parse(&pkt).unwrap();
        assert_eq!(q.id, 0xbeef);
        assert_eq!(q.qtype, 1);
        assert_eq!(q.qclass, 1);
        assert_eq!(&q.question[..4], b"\x03WwW");
        assert_eq!(q.udp_limit(), 1232);
        assert!(q.dnssec_ok());
        assert_eq!(name_to_text(q.key().qname()), "www.example.com.");
    }

    #[test]
    fn key_ignores_case_but_not_type_or_do() {
        let a = Query::parse(&query(1, "A.example", 1, None)).unwrap().key();
        let b = Query::parse(&query(2, "a.EXAMPLE", 1, None)).unwrap().key();
        let c = Query::parse(&query(2, "a.example", 28, None))
            .unwrap()
            .key();
        let d = Query::parse(&query(2, "a.example", 1, Some((512, true))))
            .unwrap()
            .key();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(d.dnssec_ok());
        assert_eq!(a.qtype(), 1);
        assert_eq!(c.qtype(), 28);
    }

    #[test]
    fn no_edns_means_512() {
        let plain = query(1, "x", 1, None);
        assert_eq!(Query::parse(&plain).unwrap().udp_limit(), 512);
        let big = query(1, "x", 1, Some((65000, false)));
        assert_eq!(Query::parse(&big).unwrap().udp_limit(), MAX_UDP_RESPONSE);
    }

    #[test]
    fn rejects() {
        assert_eq!(Query::parse(&[1, 2, 3]), Err(Reject::Drop));
        let mut resp = query(7, "x", 1, None);
        resp[2] |= 0x80;
        assert_eq!(Query::parse(&resp), Err(Reject::Drop));
        // header only, claims one question
        let mut hdr = query(9, "x", 1, None);
        hdr.truncate(12);
        assert!(matches!(
            Query::parse(&hdr),
            Err(Reject::FormErr { id: 9, .. })
        ));
        let mut status = query(3, "x", 1, None);
        status[2] |= 2 << 3;
        assert!(matches!(
            Query::parse(&status),
            Err(Reject::NotImp { id: 3, .. })
        ));
        let axfr = query(4, "x", 252, None);
        assert!(matches!(Query::parse(&axfr), Err(Reject::NotImp { .. })));
        let mut v1 = query(5, "x", 1, Some((1232, false)));
        let n = v1.len();
        v1[n - 5] = 1; // EDNS version 1
        assert!(matches!(Query::parse(&v1), Err(Reject::BadVers { .. })));
        // compression pointer in the question
        let mut ptr = query(6, "x", 1, None);
        ptr[12] = 0xc0;
        assert!(matches!(Query::parse(&ptr), Err(Reject::FormErr { .. })));
    }

    #[test]
    fn never_panics_on_prefixes_and_noise() {
        let pkt = query(1, "abc.example.org", 28, Some((4096, true)));
        for n in 0..pkt.len() {
            let _ = Query::parse(&pkt[..n]);
        }
        let mut seed = 0x1234_5678u32;
        for _ in 0..20000 {
            let mut p = pkt.clone();
            for _ in 0..3 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (seed as usize >> 8) % p.len();
                p[i] = (seed >> 16) as u8;
            }
            if let Ok(q) = Query::parse(&p) {
                let _ = q.key();
            }
        }
    }

    #[test]
    fn salvage_reads_question_and_opt_of_refused_queries() {
        let q = query(3, "x.example", 1, Some((1232, true)));
        let mut notify = q.clone();
        notify[2] = 4 << 3; // opcode NOTIFY
        let e = salvage(&notify);
        assert_eq!(e.question, Some(&q[12..q.len() - 11]));
        assert_eq!(
            e.edns,
            Some(Edns {
                udp_size: 1232,
                version: 0,
                dnssec_ok: true
            })
        );
        // No OPT: none echoed; a question that does not parse: neither.
        let plain = query(3, "x.example", 1, None);
        assert_eq!(salvage(&plain).edns, None);
        assert!(salvage(&plain).question.is_some());
        let mut bad = q.clone();
        bad[12] = 0xc0;
        assert_eq!(salvage(&bad), Echo::default());
        // Header only: nothing, and no panic on any prefix.
        for n in 0..q.len() {
            let _ = salvage(&q[..n]);
        }
        assert_eq!(salvage(&q[..12]), Echo::default());
        // An answer record before the OPT (FORMERR in a query) is walked over.
        let mut with_an = plain.clone();
        with_an[7] = 1;
        with_an[11] = 1;
        with_an.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
        with_an.extend_from_slice(&q[q.len() - 11..]);
        assert!(salvage(&with_an).edns.is_some());
        assert!(matches!(
            Query::parse(&with_an),
            Err(Reject::FormErr { .. })
        ));
    }

    #[test]
    fn text_wire_round_trip() {
        assert_eq!(text_to_wire("Cluster.Local"), b"\x07cluster\x05local\x00");
        assert_eq!(text_to_wire(""), b"\x00");
        assert_eq!(name_to_text(b"\x00"), ".");
    }
}
