//! Low-level DNS wire helpers over byte slices: header fields, name skipping,
//! resource-record walking. No allocation, no panics on any input.

/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Record type of the EDNS0 pseudo-record.
pub const TYPE_OPT: u16 = 41;
/// Record type SOA.
pub const TYPE_SOA: u16 = 6;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// Header flag bits (second 16-bit word).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_AD: u16 = 0x0020;
pub const FLAG_CD: u16 = 0x0010;

#[inline]
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

#[inline]
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Header of a message, read without validation beyond length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn read(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            id: u16_at(b, 0)?,
            flags: u16_at(b, 2)?,
            qdcount: u16_at(b, 4)?,
            ancount: u16_at(b, 6)?,
            nscount: u16_at(b, 8)?,
            arcount: u16_at(b, 10)?,
        })
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// Skip a possibly compressed name starting at `at`; returns the offset just past it.
/// Pointers are followed only to check them (forward-only loops are impossible because
/// a pointer ends the name in place).
pub fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *b.get(at)? as usize;
        match len & 0xc0 {
            0x00 => {
                at += 1;
                if len == 0 {
                    return Some(at);
                }
                total += len + 1;
                if total > 255 || at + len > b.len() {
                    return None;
                }
                at += len;
            }
            0xc0 => {
                // The pointer target must lie before the pointer (RFC 1035 §4.1.4) and
                // past the header: no name starts inside it, and the hit path rewrites
                // the header (ID, counts), so a name read from there would change.
                let target = (u16_at(b, at)? & 0x3fff) as usize;
                if target >= at || target < 12 {
                    return None;
                }
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Read the name at `at` the way a client will, following every compression pointer, and
/// check that each byte it is read from lies in `HEADER_LEN..limit` and outside the
/// 4-byte fields at `rewritten` (sorted offsets): localdns rewrites the header and TTLs
/// when it serves, and cuts the message at `limit`, so a name read from there would
/// change or dangle. Pointers must go backwards. Returns the offset just past the name
/// in place.
pub fn check_name(b: &[u8], at: usize, limit: usize, rewritten: &[usize]) -> Option<usize> {
    let limit = limit.min(b.len());
    let clean = |from: usize, len: usize| {
        let first = rewritten.partition_point(|&o| o + 4 <= from);
        from >= HEADER_LEN
            && from + len <= limit
            && rewritten.get(first).map_or(true, |&o| o >= from + len)
    };
    let (mut pos, mut end, mut total) = (at, None, 0usize);
    // Each loop adds a label (bounded by the 255 octets of a name) or follows a pointer
    // strictly backwards (a chain of those ends), so this terminates; the bound is a belt.
    for _ in 0..256 {
        let len = usize::from(*b.get(pos)?);
        match len & 0xc0 {
            0x00 => {
                if !clean(pos, 1 + len) {
                    return None;
                }
                if len == 0 {
                    return Some(end.unwrap_or(pos + 1));
                }
                total += len + 1;
                if total > 255 {
                    return None;
                }
                pos += 1 + len;
            }
            0xc0 => {
                let target = usize::from(u16_at(b, pos)? & 0x3fff);
                if !clean(pos, 2) || target >= pos {
                    return None;
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return None,
        }
    }
    None
}

/// Call `f` (which returns the offset past the name) for each domain name in the RDATA of `r`, for the types whose names may be
/// compressed (RFC 1035 §3.3, RFC 3597 §4) and those decoders read compressed anyway
/// (SRV, SVCB, HTTPS, DNAME): these are read back by clients after localdns serves them.
/// A name that does not end inside the RDATA yields None.
pub fn rdata_names(r: &Record, mut f: impl FnMut(usize) -> Option<usize>) -> Option<()> {
    let (first, count) = match r.rtype {
        // NS, MD, MF, CNAME, MB, MG, MR, PTR, DNAME
        2..=5 | 7..=9 | 12 | 39 => (0, 1),
        // SOA: MNAME RNAME; MINFO: RMAILBX EMAILBX; RP: mbox txt
        6 | 14 | 17 => (0, 2),
        // MX, AFSDB, RT, KX: a 16-bit preference first; SVCB, HTTPS: the priority.
        15 | 18 | 21 | 36 | 64 | 65 => (2, 1),
        // SRV: priority, weight, port.
        33 => (6, 1),
        _ => return Some(()),
    };
    let mut at = r.rdata + first;
    for _ in 0..count {
        if at >= r.end {
            return None;
        }
        at = f(at)?;
        if at > r.end {
            return None;
        }
    }
    Some(())
}

/// One resource record located in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Offset of the owner name.
    pub start: usize,
    /// Offset of the TYPE field.
    pub fixed: usize,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    /// Offset of RDATA.
    pub rdata: usize,
    pub rdlen: usize,
    /// Offset just past the record.
    pub end: usize,
}

impl Record {
    pub fn ttl_offset(&self) -> usize {
        self.fixed + 4
    }
}

/// Read the record at `at`.
pub fn read_record(b: &[u8], at: usize) -> Option<Record> {
    let fixed = skip_name(b, at)?;
    let rtype = u16_at(b, fixed)?;
    let class = u16_at(b, fixed + 2)?;
    let ttl = u32_at(b, fixed + 4)?;
    let rdlen = u16_at(b, fixed + 8)? as usize;
    let rdata = fixed + 10;
    let end = rdata.checked_add(rdlen)?;
    if end > b.len() {
        return None;
    }
    Some(Record {
        start: at,
        fixed,
        rtype,
        class,
        ttl,
        rdata,
        rdlen,
        end,
    })
}

/// Section a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// Walk all records after the question section, calling `f` for each; returns the offset
/// past the last record, or None when the message is malformed.
pub fn walk_records(
    b: &[u8],
    question_end: usize,
    h: &Header,
    mut f: impl FnMut(Section, &Record),
) -> Option<usize> {
    let mut at = question_end;
    let sections = [
        (Section::Answer, h.ancount),
        (Section::Authority, h.nscount),
        (Section::Additional, h.arcount),
    ];
    for (section, count) in sections {
        for _ in 0..count {
            let r = read_record(b, at)?;
            f(section, &r);
            at = r.end;
        }
    }
    Some(at)
}

/// Compare two uncompressed wire names case-insensitively.
pub fn names_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_plain_and_compressed_names() {
        // header(12) + "a.b." + pointer to 12
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[1, b'a', 1, b'b', 0]);
        m.extend_from_slice(&[0xc0, 12]);
        assert_eq!(skip_name(&m, 12), Some(17));
        assert_eq!(skip_name(&m, 17), Some(19));
    }

    #[test]
    fn rejects_forward_pointers_and_overlong_names() {
        let m = [0xc0u8, 0];
        assert_eq!(skip_name(&m, 0), None);
        let mut long = Vec::new();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'x'; 63]);
        }
        long.push(0);
        assert_eq!(skip_name(&long, 0), None);
        assert_eq!(skip_name(&[3, b'a'], 0), None);
        assert_eq!(skip_name(&[0x40], 0), None);
    }

    #[test]
    fn check_name_follows_pointers_and_refuses_rewritten_or_cut_bytes() {
        // header(12) + "a.b." at 12 + pointer to "b." at 19 + label "x" then pointer to 12.
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[1, b'a', 1, b'b', 0]);
        m.extend_from_slice(&[0xc0, 14]);
        m.extend_from_slice(&[1, b'x', 0xc0, 12]);
        assert_eq!(check_name(&m, 12, m.len(), &[]), Some(17));
        assert_eq!(check_name(&m, 17, m.len(), &[]), Some(19));
        assert_eq!(check_name(&m, 19, m.len(), &[]), Some(23));
        // The pointed-to "b." sits in a rewritten field, or past the cut.
        assert_eq!(check_name(&m, 17, m.len(), &[11]), None);
        assert_eq!(check_name(&m, 17, m.len(), &[15]), None);
        assert_eq!(check_name(&m, 17, m.len(), &[16]), None);
        assert_eq!(check_name(&m, 17, m.len(), &[8]), Some(19));
        assert_eq!(check_name(&m, 19, 22, &[]), None);
        // A label read from the header, a pointer to itself, a loop through a label.
        let mut h = vec![0u8; 12];
        h.extend_from_slice(&[0xc0, 4]);
        assert_eq!(check_name(&h, 12, h.len(), &[]), None);
        let mut l = vec![0u8; 12];
        l.extend_from_slice(&[1, b'a', 0xc0, 12]);
        assert_eq!(check_name(&l, 14, l.len(), &[]), None);
        assert_eq!(check_name(&l, 12, l.len(), &[]), None);
    }

    #[test]
    fn record_bounds_are_checked() {
        // root name, type A, class IN, ttl 5, rdlen 4 but only 2 bytes
        let r = [0u8, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2];
        assert_eq!(read_record(&r, 0), None);
        let ok = [0u8, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4];
        let rec = read_record(&ok, 0).unwrap();
        assert_eq!(
            (rec.rtype, rec.ttl, rec.end, rec.ttl_offset()),
            (1, 5, 15, 5)
        );
    }
}
