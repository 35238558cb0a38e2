//! Any bytes as an upstream response: turn them into a stored answer the way the miss
//! path does (`Answer::from_upstream`, for the key of the response's own question), then
//! render it with arbitrary TTL ageing for a client query. Never a panic; the rendered
//! message is always well formed (every byte inside a counted record), and it decodes
//! (hickory) with the client's ID and question whenever its records do.
//!
//! Input: 13 bytes of parameters, then the response.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use localdns::dns::query::question_end;
use localdns::dns::wire::{self, Header, HEADER_LEN};
use localdns::dns::{Answer, Key, Query, Ttl, TtlPolicy};
use localdns_fuzz::{assert_answers, assert_well_formed};

fuzz_target!(|data: &[u8]| {
    let Some((params, resp)) = data.split_first_chunk::<13>() else {
        return;
    };
    let [mode, t0, t1, t2, t3, i0, i1, s0, s1, n0, n1, x0, x1] = *params;
    let (edns, dnssec_ok, cd, tcp) = (mode & 2 != 0, mode & 4 != 0, mode & 8 != 0, mode & 16 != 0);
    let t = u32::from_be_bytes([t0, t1, t2, t3]);
    let ttl = if mode & 1 != 0 {
        Ttl::Fixed(t)
    } else {
        Ttl::Age(t)
    };
    let policy = TtlPolicy {
        min_ttl: u32::from(u16::from_be_bytes([n0, n1])),
        max_ttl: u32::from(u16::from_be_bytes([x0, x1])),
        negative_max_ttl: 5,
        servfail_ttl: 1,
    };

    let (Some(h), Some(qend)) = (Header::read(resp), question_end(resp)) else {
        return;
    };
    let question = &resp[HEADER_LEN..qend];
    let qname = &question[..question.len() - 4];
    let qtype = wire::u16_at(question, question.len() - 4).unwrap();
    let qclass = wire::u16_at(question, question.len() - 2).unwrap();
    let key = Key::new(qname, qtype, qclass, dnssec_ok, cd);
    let Ok(answer) = Answer::from_upstream(resp, h.id, &key, &policy) else {
        return;
    };

    // The client's query for that key, as a stub resolver sends it.
    let mut pkt = vec![i0, i1, 1, if cd { 0x10 } else { 0 }];
    pkt.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    pkt.extend_from_slice(question);
    if edns {
        pkt.extend_from_slice(&[
            0,
            0,
            41,
            s0,
            s1,
            0,
            0,
            if dnssec_ok { 0x80 } else { 0 },
            0,
            0,
            0,
        ]);
    }
    let Ok(q) = Query::parse(&pkt) else {
        return; // zone transfers and the like: NOTIMP before the cache is asked
    };
    let limit = if tcp {
        u16::MAX as usize
    } else {
        q.udp_limit()
    };

    let mut out = Vec::new();
    let truncated = answer.render(&mut out, &q, ttl, limit);
    assert!(out.len() <= limit || truncated);
    assert_well_formed(&out);
    // hickory reads a zero TTL with class ANY differently (an update's delete), so the
    // oracle is: when the stored records decode as localdns shows them, the whole answer
    // decodes too (the echoed question, the client's OPT). Names pointing into the bytes
    // localdns rewrites (header, TTLs) are refused by `from_upstream` (docs/design.md "Fuzzing",
    // finding 1), so they are no exception here.
    let ours = if q.edns.is_some() { 11 } else { 0 };
    let mut stored = out[..out.len() - ours].to_vec();
    let ar = wire::u16_at(&stored, 10).unwrap() - u16::from(ours > 0);
    wire::put_u16(&mut stored, 10, ar);
    if truncated || Message::from_vec(&stored).is_ok() {
        let msg = assert_answers(&out, &q);
        assert_eq!(
            msg.header().truncated(),
            truncated || h.flags & wire::FLAG_TC != 0
        );
    }
});
