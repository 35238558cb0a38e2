//! Any packet as a client query, through the hit path: parse it; when it parses, store a
//! synthetic upstream answer for its key and render that for the query; when it does not,
//! write the error answer `server::handle` writes. Whatever localdns sends must decode
//! (hickory-proto), keep the ID and echo the question.
#![no_main]

use libfuzzer_sys::fuzz_target;
use localdns::dns::answer::{write_error, write_refusal};
use localdns::dns::wire::{self, FLAG_TC, HEADER_LEN};
use localdns::dns::{Answer, Key, Query, Reject, Ttl, TtlPolicy};
use localdns_fuzz::{assert_answers, assert_error_answer, assert_well_formed};

/// The config defaults.
const POLICY: TtlPolicy = TtlPolicy {
    min_ttl: 0,
    max_ttl: 3600,
    negative_max_ttl: 5,
    servfail_ttl: 1,
};

/// What an upstream answers for `key` with ID 7: a CNAME to the name itself, which every
/// query type and class may carry.
fn synthetic_upstream(key: &Key) -> Vec<u8> {
    let mut r = vec![0, 7, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    r.extend_from_slice(key.qname());
    r.extend_from_slice(&key.qtype().to_be_bytes());
    r.extend_from_slice(&key.qclass().to_be_bytes());
    r.extend_from_slice(&[0xc0, 0x0c, 0, 5]);
    r.extend_from_slice(&key.qclass().to_be_bytes());
    r.extend_from_slice(&[0, 0, 1, 44, 0, 2, 0xc0, 0x0c]);
    r
}

fuzz_target!(|pkt: &[u8]| {
    let mut out = Vec::new();
    let q = match Query::parse(pkt) {
        Ok(q) => q,
        Err(Reject::Drop) => return,
        Err(Reject::FormErr { id, flags }) => {
            write_refusal(&mut out, pkt, id, flags, wire::RCODE_FORMERR, 0);
            return assert_error_answer(&out, id);
        }
        Err(Reject::NotImp { id, flags }) => {
            write_refusal(&mut out, pkt, id, flags, wire::RCODE_NOTIMP, 0);
            return assert_error_answer(&out, id);
        }
        Err(Reject::BadVers { id, flags }) => {
            write_refusal(&mut out, pkt, id, flags, wire::RCODE_NOERROR, 1);
            return assert_error_answer(&out, id);
        }
    };
    assert_eq!(&pkt[HEADER_LEN..HEADER_LEN + q.question.len()], q.question);

    let key = q.key();
    let answer = Answer::from_upstream(&synthetic_upstream(&key), 7, &key, &POLICY)
        .expect("the synthetic answer is accepted");
    let age = u32::from(q.id) * 1000;
    for (ttl, limit) in [
        (Ttl::Age(age), q.udp_limit()),
        (Ttl::Fixed(30), q.udp_limit()),
        (Ttl::Age(age), u16::MAX as usize),
    ] {
        let truncated = answer.render(&mut out, &q, ttl, limit);
        assert!(out.len() <= limit || truncated);
        assert_well_formed(&out);
        let msg = assert_answers(&out, &q);
        assert_eq!(truncated, msg.header().truncated());
        assert_eq!(msg.answers().len(), usize::from(!truncated));
        assert_eq!(msg.extensions().is_some(), q.edns.is_some());
        assert_eq!(wire::u16_at(&out, 2).unwrap() & FLAG_TC != 0, truncated);
    }

    // The miss path's SERVFAIL (resolve.rs): with the question.
    write_error(&mut out, q.id, q.flags, wire::RCODE_SERVFAIL, Some(&q), 0);
    assert_well_formed(&out);
    assert_answers(&out, &q);
});
