//! Stored answers: an upstream response turned into something the hit path can replay.
//!
//! An [`Answer`] is immutable once built. It keeps the response as wire bytes without the
//! upstream's OPT record (EDNS is hop-by-hop: each client gets its own), with every record's
//! TTL already capped by policy and the offsets of those TTL fields recorded at insert, so
//! serving is a copy plus a few 4-byte patches.

use super::query::{salvage, Echo, Key, Query};
use super::wire::{self, Header, Section, HEADER_LEN, TYPE_OPT, TYPE_SOA};

/// The UDP payload size localdns advertises in its own OPT records, to clients and
/// upstreams (DNS flag day 2020).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// How an answer may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NOERROR with records in the answer section.
    Positive,
    /// NXDOMAIN or NODATA (RFC 2308).
    Negative,
    /// SERVFAIL from the upstream.
    ServFail,
    /// Anything else (REFUSED, NOTIMP, …): passed through, never cached.
    Uncacheable,
}

/// TTL rules applied when an answer is stored, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub negative_max_ttl: u32,
    pub servfail_ttl: u32,
}

/// Why an upstream response was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("malformed response")]
    Malformed,
    #[error("response does not match the query")]
    Mismatch,
    #[error("response truncated")]
    Truncated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Header (ID zero) + question + records, OPT removed, TTLs capped.
    wire: Box<[u8]>,
    question_end: u16,
    /// The upper 8 bits of a 12-bit extended RCODE (the OPT TTL's top byte, RFC 6891
    /// §6.1.3), replayed in the client's OPT record: BADCOOKIE (23) is 1 here, 7 in the
    /// header.
    ext_rcode: u8,
    ttl_offsets: Box<[u16]>,
    /// Seconds this answer is fresh after it was stored.
    pub ttl: u32,
    pub kind: Kind,
}

impl Answer {
    /// What the answer holds in memory: its stored message bytes and TTL fields (for
    /// the cache's byte budget).
    pub fn stored_size(&self) -> (usize, usize) {
        (self.wire.len(), self.ttl_offsets.len())
    }

    /// The stored message (ID zero, TTLs as stored) and the offsets of its TTL fields: what
    /// a cache snapshot keeps ([`crate::snapshot`]).
    pub fn parts(&self) -> (&[u8], &[u16]) {
        (&self.wire, &self.ttl_offsets)
    }

    /// Positive or negative: an answer about the name, which outlives the exchange.
    pub fn is_cacheable_kind(&self) -> bool {
        matches!(self.kind, Kind::Positive | Kind::Negative)
    }

    /// The upstream's RCODE (header bits).
    pub fn rcode(&self) -> u8 {
        self.wire.get(3).map_or(0, |b| b & 0x0f)
    }

    /// The upstream's whole RCODE: the header's 4 bits and the OPT record's upper 8.
    pub fn full_rcode(&self) -> u16 {
        u16::from(self.ext_rcode) << 4 | u16::from(self.rcode())
    }

    /// Validate an upstream response to the query `id`/`key` and turn it into an answer.
    pub fn from_upstream(
        resp: &[u8],
        id: u16,
        key: &Key,
        policy: &TtlPolicy,
    ) -> Result<Answer, AnswerError> {
        let h = Header::read(resp).ok_or(AnswerError::Malformed)?;
        if h.id != id || h.flags & wire::FLAG_QR == 0 || h.qdcount != 1 {
            return Err(AnswerError::Mismatch);
        }
        let qend = super::query::question_end(resp).ok_or(AnswerError::Malformed)?;
        let question = &resp[HEADER_LEN..qend];
        let (qname, qtail) = question.split_at(question.len() - 4);
        if !wire::names_eq(qname, key.qname())
            || wire::u16_at(qtail, 0) != Some(key.qtype())
            || wire::u16_at(qtail, 2) != Some(key.qclass())
        {
            return Err(AnswerError::Mismatch);
        }
        if h.flags & wire::FLAG_TC != 0 {
            return Err(AnswerError::Truncated);
        }

        let mut records =
            Vec::with_capacity(h.ancount as usize + h.nscount as usize + h.arcount as usize);
        let mut opt = None;
        let mut opts = 0;
        let end = wire::walk_records(resp, qend, &h, |section, r| {
            if r.rtype == TYPE_OPT && section == Section::Additional {
                opt = Some(*r);
                opts += 1;
            } else {
                // RFC 2181 §8: a TTL with the top bit set is read as 0.
                let ttl = if r.ttl > i32::MAX as u32 { 0 } else { r.ttl };
                records.push((section, wire::Record { ttl, ..*r }));
            }
        })
        .ok_or(AnswerError::Malformed)?;
        // At most one OPT (RFC 6891 §6.1.1): one left in would sit beside the client's.
        if opts > 1 {
            return Err(AnswerError::Malformed);
        }
        // RFC 6891 allows the OPT anywhere in the additional section. The copy ends where
        // it starts (so no compression pointer moves); additional records after it are
        // left out, which RFC 2181 §9 allows for the additional section.
        if let Some(o) = opt {
            records.retain(|(_, r)| r.start < o.start);
        }

        let rcode = h.rcode();
        let kind = match rcode {
            wire::RCODE_NOERROR if h.ancount > 0 => Kind::Positive,
            wire::RCODE_NOERROR | wire::RCODE_NXDOMAIN => Kind::Negative,
            wire::RCODE_SERVFAIL => Kind::ServFail,
            _ => Kind::Uncacheable,
        };
        // An extended RCODE (upper bits in OPT) is passed on, never cached: it says
        // something about that exchange (a cookie, a key), not about the name.
        let ext_rcode = opt.map_or(0, |o| (o.ttl >> 24) as u8);
        let kind = if ext_rcode != 0 {
            Kind::Uncacheable
        } else {
            kind
        };

        let ttl = match kind {
            Kind::Positive => records
                .iter()
                .map(|(_, r)| {
                    r.ttl
                        .clamp(policy.min_ttl, policy.max_ttl.max(policy.min_ttl))
                })
                .min()
                .unwrap_or(0),
            Kind::Negative => records
                .iter()
                .filter(|(s, r)| *s == Section::Authority && r.rtype == TYPE_SOA)
                .filter_map(|(_, r)| {
                    let minimum = wire::u32_at(resp, r.rdata + r.rdlen - 4)?;
                    (r.rdlen >= 22).then_some(r.ttl.min(minimum))
                })
                .min()
                .map_or(0, |t| t.min(policy.negative_max_ttl)),
            Kind::ServFail => policy.servfail_ttl,
            Kind::Uncacheable => 0,
        };

        // Copy up to the OPT record (see above). Not authoritative: a replay says so.
        let body_end = opt.map_or(end, |o| o.start);
        // Every name a client will read back, owners and those in RDATA, must read the
        // same from what is served: nothing in the header or a TTL (both rewritten), nothing
        // past the cut (fuzz finding 1, docs/design.md "Fuzzing").
        let rewritten: Vec<usize> = records.iter().map(|(_, r)| r.ttl_offset()).collect();
        let readable = |at| wire::check_name(resp, at, body_end, &rewritten);
        for (_, r) in &records {
            if readable(r.start) != Some(r.fixed) {
                return Err(AnswerError::Malformed);
            }
            wire::rdata_names(r, readable).ok_or(AnswerError::Malformed)?;
        }
        let mut wire = resp[..body_end].to_vec().into_boxed_slice();
        wire::put_u16(&mut wire, 0, 0);
        let flags = h.flags & !wire::FLAG_AA;
        wire::put_u16(&mut wire, 2, flags);
        let arcount = records
            .iter()
            .filter(|(s, _)| *s == Section::Additional)
            .count() as u16;
        wire::put_u16(&mut wire, 10, arcount);

        let mut ttl_offsets = Vec::with_capacity(records.len());
        for ((_, r), &off) in records.iter().zip(&rewritten) {
            let stored = match kind {
                Kind::Positive => r
                    .ttl
                    .clamp(policy.min_ttl, policy.max_ttl.max(policy.min_ttl)),
                _ => r.ttl.min(ttl),
            };
            wire::put_u32(&mut wire, off, stored);
            ttl_offsets.push(off as u16);
        }
        Ok(Answer {
            wire,
            question_end: qend as u16,
            ext_rcode,
            ttl_offsets: ttl_offsets.into_boxed_slice(),
            ttl,
            kind,
        })
    }

    /// Write the answer for client query `q` into `out`.
    ///
    /// `ttl` says how TTLs are shown: `Ttl::Age(s)` counts every stored TTL down by `s`
    /// seconds; `Ttl::Fixed(t)` shows `t` everywhere (serve-stale). The client's ID,
    /// question (letter case included), RD and CD bits are echoed. When the result is
    /// longer than `limit` a truncated answer (TC=1, question only) is written instead;
    /// returns whether that happened. An extended RCODE goes in the client's OPT record;
    /// a client without EDNS cannot be told it (RFC 6891 §7: no OPT in the answer) and
    /// gets SERVFAIL instead of a header code that would mean something else (BADCOOKIE's
    /// low bits read YXRRSET).
    pub fn render(&self, out: &mut Vec<u8>, q: &Query<'_>, ttl: Ttl, limit: usize) -> bool {
        out.clear();
        out.extend_from_slice(&self.wire[..HEADER_LEN]);
        out.extend_from_slice(q.question);
        out.extend_from_slice(&self.wire[self.question_end as usize..]);
        wire::put_u16(out, 0, q.id);
        let flags = wire::u16_at(out, 2).unwrap_or(0);
        let echo = wire::FLAG_RD | wire::FLAG_CD;
        wire::put_u16(out, 2, (flags & !echo) | (q.flags & echo) | wire::FLAG_RA);
        for &off in self.ttl_offsets.iter() {
            let off = off as usize;
            let shown = match ttl {
                Ttl::Age(age) => wire::u32_at(out, off).unwrap_or(0).saturating_sub(age),
                Ttl::Fixed(t) => t,
            };
            wire::put_u32(out, off, shown);
        }
        if self.ext_rcode != 0 && q.edns.is_none() {
            out[3] = (out[3] & 0xf0) | wire::RCODE_SERVFAIL;
        }
        finish(out, q, limit, self.ext_rcode)
    }
}

/// How TTLs are shown when an answer is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    Age(u32),
    Fixed(u32),
}

/// Append the client's OPT record (with these upper RCODE bits) if it sent one, then
/// truncate to `limit` if needed.
fn finish(out: &mut Vec<u8>, q: &Query<'_>, limit: usize, ext_rcode: u8) -> bool {
    let truncated = out.len() + if q.edns.is_some() { 11 } else { 0 } > limit;
    if truncated {
        out.truncate(HEADER_LEN + q.question.len());
        let flags = wire::u16_at(out, 2).unwrap_or(0);
        wire::put_u16(out, 2, flags | wire::FLAG_TC);
        out[6..12].fill(0);
    }
    if let Some(e) = q.edns {
        push_opt(out, ext_rcode, e.dnssec_ok);
        let ar = wire::u16_at(out, 10).unwrap_or(0);
        wire::put_u16(out, 10, ar + 1);
    }
    truncated
}

/// Append an OPT record: our UDP size, the given extended RCODE bits, version 0, DO.
fn push_opt(out: &mut Vec<u8>, ext_rcode: u8, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
}

/// The flags of an error answer to a query with `query_flags`: QR, the opcode and RD
/// echoed (RFC 1035 §4.1.1), never AA, TC or AD. For QUERY, CD is echoed (RFC 4035
/// §3.2.2) and RA set, as in every answer localdns gives. For an opcode localdns does not
/// implement (NOTIMP), nothing else: the other bits mean what that opcode defines, and
/// recursion was not offered for it. (unbound 1.17 and NSD 4.6 echo CD there too, unbound
/// leaves RA clear; RFC 6891 and the issue ask for no RA, AD or CD.)
pub fn error_flags(query_flags: u16, rcode: u8) -> u16 {
    let opcode = query_flags & 0x7800;
    let flags = wire::FLAG_QR | opcode | (query_flags & wire::FLAG_RD) | u16::from(rcode & 0xf);
    if opcode == 0 {
        flags | (query_flags & wire::FLAG_CD) | wire::FLAG_RA
    } else {
        flags
    }
}

/// Write a response with no records: `rcode` for the query with this ID and flags.
/// The question is included when known. `ext_rcode` is the upper RCODE bits (BADVERS = 1),
/// sent in an OPT record when the client used EDNS or the code needs it.
pub fn write_error(
    out: &mut Vec<u8>,
    id: u16,
    query_flags: u16,
    rcode: u8,
    q: Option<&Query<'_>>,
    ext_rcode: u8,
) {
    let echo = Echo {
        question: q.map(|q| q.question),
        edns: q.and_then(|q| q.edns),
    };
    write_echo(out, id, query_flags, rcode, &echo, ext_rcode);
}

/// Write the answer to a query refused at parse time (FORMERR, NOTIMP, BADVERS), echoing
/// what could be read of it ([`salvage`]): its question, and an OPT record when it had
/// one (RFC 6891 §7: a responder that speaks EDNS answers an OPT with an OPT).
pub fn write_refusal(
    out: &mut Vec<u8>,
    pkt: &[u8],
    id: u16,
    query_flags: u16,
    rcode: u8,
    ext_rcode: u8,
) {
    write_echo(out, id, query_flags, rcode, &salvage(pkt), ext_rcode);
}

fn write_echo(
    out: &mut Vec<u8>,
    id: u16,
    query_flags: u16,
    rcode: u8,
    echo: &Echo<'_>,
    ext_rcode: u8,
) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&error_flags(query_flags, rcode).to_be_bytes());
    out.extend_from_slice(&[0, u8::from(echo.question.is_some()), 0, 0, 0, 0, 0, 0]);
    if let Some(question) = echo.question {
        out.extend_from_slice(question);
    }
    if echo.edns.is_some() || ext_rcode != 0 {
        push_opt(out, ext_rcode, echo.edns.is_some_and(|e| e.dnssec_ok));
        out[11] = 1;
    }
}

/// Write the query localdns sends upstream for `key` with this ID: RD set, CD as the
/// client asked, and with `edns` an OPT record with our UDP size and the client's DO bit
/// (without, for a server that refuses EDNS: see `upstream::exchange`).
pub fn write_upstream_query(out: &mut Vec<u8>, id: u16, key: &Key, edns: bool) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let mut flags = wire::FLAG_RD;
    if key.checking_disabled() {
        flags |= wire::FLAG_CD;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    out.extend_from_slice(key.qname());
    out.extend_from_slice(&key.qtype().to_be_bytes());
    out.extend_from_slice(&key.qclass().to_be_bytes());
    if edns {
        push_opt(out, 0, key.dnssec_ok());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::query::tests::query;
    use super::*;

    /// The TTL policy of the unit tests: the config defaults.
    pub(crate) const POLICY: TtlPolicy = TtlPolicy {
        min_ttl: 0,
        max_ttl: 3600,
        negative_max_ttl: 5,
        servfail_ttl: 1,
    };

    /// A response to `q` (as from an upstream) with the given rcode and records
    /// (section, type, ttl, rdata) whose owner is a pointer to the question name.
    fn response(q: &[u8], rcode: u8, recs: &[(Section, u16, u32, Vec<u8>)], opt: bool) -> Vec<u8> {
        let qend = super::super::query::question_end(q).unwrap();
        let mut m = q[..qend].to_vec();
        m[2] = 0x81;
        m[3] = 0x80 | rcode;
        let count = |s| recs.iter().filter(|r| r.0 == s).count() as u16;
        wire::put_u16(&mut m, 6, count(Section::Answer));
        wire::put_u16(&mut m, 8, count(Section::Authority));
        wire::put_u16(&mut m, 10, count(Section::Additional) + u16::from(opt));
        for (_, t, ttl, rdata) in recs {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        if opt {
            push_opt(&mut m, 0, false);
        }
        m
    }

    /// A response with one A record of `ttl` for `name`, ID 0, and its key.
    pub(crate) fn a_response(name: &str, ttl: u32) -> (Key, Vec<u8>) {
        let q = query(0, name, 1, None);
        let key = Query::parse(&q).unwrap().key();
        let r = response(
            &q,
            0,
            &[(Section::Answer, 1, ttl, vec![192, 0, 2, 1])],
            false,
        );
        (key, r)
    }

    fn soa(ttl_min: u32) -> Vec<u8> {
        let mut r = vec![0, 0]; // mname ".", rname "."
        for v in [1u32, 2, 3, 4, ttl_min] {
            r.extend_from_slice(&v.to_be_bytes());
        }
        r
    }

    fn parse(pkt: &[u8]) -> Query<'_> {
        Query::parse(pkt).unwrap()
    }

    #[test]
    fn positive_ttl_is_smallest_and_capped() {
        let q = query(10, "a.example", 1, Some((1232, false)));
        let key = parse(&q).key();
        let r = response(
            &q,
            0,
            &[
                (Section::Answer, 1, 300, vec![1, 2, 3, 4]),
                (Section::Answer, 1, 60, vec![1, 2, 3, 5]),
            ],
            true,
        );
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        assert_eq!((a.kind, a.ttl), (Kind::Positive, 60));
        let capped = TtlPolicy {
            max_ttl: 30,
            ..POLICY
        };
        assert_eq!(
            Answer::from_upstream(&r, 10, &key, &capped).unwrap().ttl,
            30
        );
        let floored = TtlPolicy {
            min_ttl: 100,
            ..POLICY
        };
        assert_eq!(
            Answer::from_upstream(&r, 10, &key, &floored).unwrap().ttl,
            100
        );
    }

    /// A CNAME answer whose RDATA is `target` (as wire bytes, pointers allowed).
    fn cname(target: &[u8]) -> (Vec<u8>, Key) {
        let q = query(10, "a.example", 1, None);
        let key = parse(&q).key();
        (
            response(&q, 0, &[(Section::Answer, 5, 300, target.to_vec())], false),
            key,
        )
    }

    #[test]
    fn names_in_rdata_must_read_the_same_when_served() {
        // Compressed to the question name (offset 12), and to its label "example": kept.
        for ok in [&[0xc0, 12][..], &[1, b'b', 0xc0, 14]] {
            let (r, key) = cname(ok);
            let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
            assert_eq!(a.kind, Kind::Positive);
        }
        // Into the header (rewritten with the client's ID and counts), into the record's
        // own TTL (rewritten as it ages), forwards, and a name running past its RDATA.
        let ttl_at = 12 + 15 + 2 + 4; // header, question, owner pointer, type and class
        for bad in [
            &[0xc0, 2][..],
            &[0xc0, ttl_at as u8],
            &[0xc0, 60],
            &[3, b'a', b'b'],
        ] {
            let (r, key) = cname(bad);
            assert_eq!(
                Answer::from_upstream(&r, 10, &key, &POLICY),
                Err(AnswerError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn opt_before_other_additional_records_is_accepted() {
        let q = query(10, "a.example", 1, None);
        let key = parse(&q).key();
        let mut r = response(&q, 0, &[(Section::Answer, 1, 300, vec![1, 2, 3, 4])], true);
        // An A record after the OPT in the additional section (RFC 6891 allows it).
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 5, 6, 7, 8]);
        wire::put_u16(&mut r, 10, 2);
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        assert_eq!((a.kind, a.ttl), (Kind::Positive, 300));
        let mut out = Vec::new();
        a.render(&mut out, &parse(&q), Ttl::Age(0), 512);
        let h = Header::read(&out).unwrap();
        assert_eq!((h.ancount, h.nscount, h.arcount), (1, 0, 0));
        let rec = wire::read_record(&out, q.len()).unwrap();
        assert_eq!(
            (rec.end, &out[rec.rdata..rec.end]),
            (out.len(), &[1, 2, 3, 4][..])
        );
    }

    #[test]
    fn ttls_with_the_top_bit_set_are_read_as_zero() {
        let q = query(10, "a.example", 1, None);
        let key = parse(&q).key();
        for big in [1u32 << 31, u32::MAX] {
            let r = response(
                &q,
                0,
                &[
                    (Section::Answer, 1, big, vec![1, 2, 3, 4]),
                    (Section::Answer, 1, 300, vec![1, 2, 3, 5]),
                ],
                false,
            );
            let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
            assert_eq!((a.kind, a.ttl), (Kind::Positive, 0), "ttl {big}");
            let mut out = Vec::new();
            a.render(&mut out, &parse(&q), Ttl::Age(0), 512);
            assert_eq!(wire::read_record(&out, q.len()).unwrap().ttl, 0);
        }
        let r = response(
            &q,
            0,
            &[(Section::Answer, 1, (1 << 31) - 1, vec![1, 2, 3, 4])],
            false,
        );
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        assert_eq!(a.ttl, POLICY.max_ttl);
    }

    #[test]
    fn the_upstreams_aa_bit_is_not_replayed() {
        let q = query(10, "a.example", 1, None);
        let key = parse(&q).key();
        let mut r = response(&q, 0, &[(Section::Answer, 1, 300, vec![1, 2, 3, 4])], false);
        let flags = wire::u16_at(&r, 2).unwrap();
        wire::put_u16(&mut r, 2, flags | wire::FLAG_AA);
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        let mut out = Vec::new();
        a.render(&mut out, &parse(&q), Ttl::Age(0), 512);
        let h = Header::read(&out).unwrap();
        assert_eq!(h.flags & wire::FLAG_AA, 0);
        assert_eq!(h.flags & wire::FLAG_QR, wire::FLAG_QR);
    }

    #[test]
    fn render_echoes_id_case_and_counts_ttl_down() {
        let q = query(10, "a.example", 1, None);
        let key = parse(&q).key();
        let r = response(&q, 0, &[(Section::Answer, 1, 300, vec![1, 2, 3, 4])], true);
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        let client = query(0x4242, "A.ExAmPlE", 1, Some((4096, true)));
        let cq = parse(&client);
        let mut out = Vec::new();
        assert!(!a.render(&mut out, &cq, Ttl::Age(7), cq.udp_limit()));
        assert_eq!(&out[..2], &[0x42, 0x42]);
        assert_eq!(&out[12..12 + cq.question.len()], cq.question);
        let rec = wire::read_record(&out, 12 + cq.question.len()).unwrap();
        assert_eq!(rec.ttl, 293);
        // OPT appended with DO echoed, ARCOUNT 1
        let h = Header::read(&out).unwrap();
        assert_eq!((h.ancount, h.arcount), (1, 1));
        let opt = wire::read_record(&out, rec.end).unwrap();
        assert_eq!(opt.rtype, TYPE_OPT);
        assert_eq!(opt.ttl & 0x8000, 0x8000);
        a.render(&mut out, &cq, Ttl::Fixed(30), 4096);
        assert_eq!(
            wire::read_record(&out, 12 + cq.question.len()).unwrap().ttl,
            30
        );
        a.render(&mut out, &cq, Ttl::Age(400), 4096);
        assert_eq!(
            wire::read_record(&out, 12 + cq.question.len()).unwrap().ttl,
            0
        );
    }

    #[test]
    fn negative_ttl_from_soa_capped() {
        let q = query(1, "nope.example", 1, None);
        let key = parse(&q).key();
        for (rcode, min, expect) in [(3u8, 2u32, 2u32), (3, 3600, 5), (0, 1, 1)] {
            let r = response(
                &q,
                rcode,
                &[(Section::Authority, TYPE_SOA, 900, soa(min))],
                false,
            );
            let a = Answer::from_upstream(&r, 1, &key, &POLICY).unwrap();
            assert_eq!((a.kind, a.ttl), (Kind::Negative, expect));
            let mut out = Vec::new();
            a.render(&mut out, &parse(&q), Ttl::Age(0), 512);
            // the SOA shows the negative TTL
            assert_eq!(wire::read_record(&out, q.len()).unwrap().ttl, expect);
        }
        let no_soa = response(&q, 3, &[], false);
        assert_eq!(
            Answer::from_upstream(&no_soa, 1, &key, &POLICY)
                .unwrap()
                .ttl,
            0
        );
    }

    #[test]
    fn servfail_and_refused() {
        let q = query(1, "x.example", 1, None);
        let key = parse(&q).key();
        let sf = Answer::from_upstream(&response(&q, 2, &[], false), 1, &key, &POLICY).unwrap();
        assert_eq!((sf.kind, sf.ttl), (Kind::ServFail, 1));
        let rf = Answer::from_upstream(&response(&q, 5, &[], false), 1, &key, &POLICY).unwrap();
        assert_eq!((rf.kind, rf.ttl), (Kind::Uncacheable, 0));
    }

    #[test]
    fn mismatches_are_refused() {
        let q = query(1, "x.example", 1, None);
        let key = parse(&q).key();
        let r = response(&q, 0, &[(Section::Answer, 1, 5, vec![1, 2, 3, 4])], false);
        assert_eq!(
            Answer::from_upstream(&r, 2, &key, &POLICY),
            Err(AnswerError::Mismatch)
        );
        let other = parse(&query(1, "y.example", 1, None)).key();
        assert_eq!(
            Answer::from_upstream(&r, 1, &other, &POLICY),
            Err(AnswerError::Mismatch)
        );
        let mut tc = r.clone();
        tc[2] |= 0x02;
        assert_eq!(
            Answer::from_upstream(&tc, 1, &key, &POLICY),
            Err(AnswerError::Truncated)
        );
        for n in 0..r.len() {
            assert!(Answer::from_upstream(&r[..n], 1, &key, &POLICY).is_err());
        }
    }

    #[test]
    fn never_panics_on_corrupted_responses() {
        let q = query(9, "noise.example", 1, Some((1232, true)));
        let key = parse(&q).key();
        let r = response(
            &q,
            0,
            &[
                (Section::Answer, 1, 60, vec![1, 2, 3, 4]),
                (Section::Authority, TYPE_SOA, 60, soa(5)),
            ],
            true,
        );
        let client = parse(&q);
        let mut out = Vec::new();
        let mut seed = 0x9e37_79b9u32;
        for _ in 0..20000 {
            let mut p = r.clone();
            for _ in 0..4 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (seed as usize >> 8) % p.len();
                p[i] = (seed >> 16) as u8;
            }
            if let Ok(a) = Answer::from_upstream(&p, 9, &key, &POLICY) {
                a.render(&mut out, &client, Ttl::Age(1), 512);
                assert!(out.len() <= 512);
            }
        }
    }

    #[test]
    fn truncates_to_client_limit() {
        let q = query(1, "big.example", 16, None);
        let key = parse(&q).key();
        let recs: Vec<_> = (0..10)
            .map(|i| (Section::Answer, 16u16, 60u32, vec![99; 60 + i]))
            .collect();
        let a = Answer::from_upstream(&response(&q, 0, &recs, false), 1, &key, &POLICY).unwrap();
        let mut out = Vec::new();
        assert!(a.render(&mut out, &parse(&q), Ttl::Age(0), 512));
        let h = Header::read(&out).unwrap();
        assert_eq!(h.flags & wire::FLAG_TC, wire::FLAG_TC);
        assert_eq!((h.ancount, h.arcount), (0, 0));
        assert_eq!(out.len(), q.len());
        let eq = query(1, "big.example", 16, Some((1232, false)));
        assert!(!a.render(&mut out, &parse(&eq), Ttl::Age(0), 1232));
        assert_eq!(Header::read(&out).unwrap().ancount, 10);
    }

    #[test]
    fn error_responses() {
        let q = query(77, "x.example", 1, Some((1232, false)));
        let pq = parse(&q);
        let mut out = Vec::new();
        write_error(&mut out, 77, pq.flags, wire::RCODE_SERVFAIL, Some(&pq), 0);
        let h = Header::read(&out).unwrap();
        assert_eq!((h.id, h.rcode(), h.qdcount, h.arcount), (77, 2, 1, 1));
        write_error(&mut out, 5, 0x0100, wire::RCODE_FORMERR, None, 0);
        assert_eq!(out.len(), 12);
        assert_eq!(Header::read(&out).unwrap().rcode(), 1);
    }

    #[test]
    fn notimp_to_an_unknown_opcode_echoes_only_id_opcode_rd_and_the_opt() {
        let mut q = query(77, "x.example", 1, Some((1232, true)));
        // STATUS, with RD, AD and CD set by the client.
        let flags = (2 << 11) | wire::FLAG_RD | wire::FLAG_AD | wire::FLAG_CD;
        wire::put_u16(&mut q, 2, flags);
        let mut out = Vec::new();
        write_refusal(&mut out, &q, 77, flags, wire::RCODE_NOTIMP, 0);
        let h = Header::read(&out).unwrap();
        assert_eq!(
            h.flags,
            wire::FLAG_QR | (2 << 11) | wire::FLAG_RD | u16::from(wire::RCODE_NOTIMP)
        );
        assert_eq!((h.id, h.qdcount, h.ancount, h.arcount), (77, 1, 0, 1));
        let qend = super::super::query::question_end(&out).unwrap();
        assert_eq!(&out[12..qend], &q[12..qend]);
        let opt = wire::read_record(&out, qend).unwrap();
        assert_eq!((opt.rtype, opt.ttl, opt.end), (TYPE_OPT, 0x8000, out.len()));
        // Without an OPT in the query, none in the answer.
        let mut plain = query(78, "x.example", 1, None);
        wire::put_u16(&mut plain, 2, flags);
        write_refusal(&mut out, &plain, 78, flags, wire::RCODE_NOTIMP, 0);
        assert_eq!(Header::read(&out).unwrap().arcount, 0);
        assert_eq!(out.len(), plain.len());
    }

    #[test]
    fn errors_to_queries_keep_rd_and_cd_set_ra_never_ad() {
        let all = wire::FLAG_RD | wire::FLAG_AD | wire::FLAG_CD | wire::FLAG_AA | wire::FLAG_TC;
        let f = error_flags(all, wire::RCODE_FORMERR);
        assert_eq!(
            f,
            wire::FLAG_QR | wire::FLAG_RD | wire::FLAG_CD | wire::FLAG_RA | 1
        );
        assert_eq!(
            error_flags(0, wire::RCODE_SERVFAIL),
            wire::FLAG_QR | wire::FLAG_RA | 2
        );
        // UPDATE (5): no RA, CD or AD whatever the query said.
        assert_eq!(
            error_flags((5 << 11) | all, wire::RCODE_NOTIMP),
            wire::FLAG_QR | (5 << 11) | wire::FLAG_RD | 4
        );
        // A FORMERR whose question parsed echoes it, and the OPT.
        let mut q = query(9, "x.example", 1, Some((1232, false)));
        q[7] = 1; // an answer record claimed and missing
        let mut out = Vec::new();
        write_refusal(&mut out, &q, 9, 0x0100, wire::RCODE_FORMERR, 0);
        let h = Header::read(&out).unwrap();
        assert_eq!((h.rcode(), h.qdcount, h.arcount), (1, 1, 0));
    }

    #[test]
    fn extended_rcodes_reach_the_client_in_its_opt() {
        let q = query(10, "a.example", 1, Some((1232, false)));
        let key = parse(&q).key();
        // BADCOOKIE (23): 7 in the header, 1 in the top byte of the OPT TTL.
        let mut r = response(&q, 23 & 0xf, &[], false);
        r.extend_from_slice(&[0, 0, 41, 4, 0xd0, 1, 0, 0, 0, 0, 0]);
        wire::put_u16(&mut r, 10, 1);
        let a = Answer::from_upstream(&r, 10, &key, &POLICY).unwrap();
        assert_eq!((a.kind, a.full_rcode()), (Kind::Uncacheable, 23));
        let mut out = Vec::new();
        a.render(&mut out, &parse(&q), Ttl::Age(0), 1232);
        let h = Header::read(&out).unwrap();
        assert_eq!((h.rcode(), h.arcount), (7, 1));
        let opt = wire::read_record(&out, q.len() - 11).unwrap();
        assert_eq!((opt.rtype, opt.ttl >> 24), (TYPE_OPT, 1));
        // A client without EDNS cannot be told BADCOOKIE: SERVFAIL, no OPT.
        let plain = query(10, "a.example", 1, None);
        a.render(&mut out, &parse(&plain), Ttl::Age(0), 512);
        let h = Header::read(&out).unwrap();
        assert_eq!((h.rcode(), h.arcount), (wire::RCODE_SERVFAIL, 0));
        // Truncated, the code is still there.
        a.render(&mut out, &parse(&q), Ttl::Age(0), 12);
        let opt = wire::read_record(&out, q.len() - 11).unwrap();
        assert_eq!(opt.ttl >> 24, 1);
    }

    #[test]
    fn upstream_query_without_edns_has_no_opt() {
        let key = parse(&query(1, "a.example", 1, Some((4096, true)))).key();
        let mut out = Vec::new();
        write_upstream_query(&mut out, 5, &key, false);
        let q = parse(&out);
        assert_eq!((q.edns, q.key().qname()), (None, key.qname()));
        assert_eq!(Header::read(&out).unwrap().arcount, 0);
    }

    #[test]
    fn upstream_query_round_trips_through_parse() {
        let client = query(1, "Mixed.Case", 28, Some((4096, true)));
        let key = parse(&client).key();
        let mut out = Vec::new();
        write_upstream_query(&mut out, 999, &key, true);
        let q = parse(&out);
        assert_eq!(q.id, 999);
        assert_eq!(q.key(), key);
        assert_eq!(q.edns.unwrap().udp_size, EDNS_UDP_SIZE);
    }
}
