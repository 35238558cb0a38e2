//! Property tests: the invariants of the fuzz targets (`fuzz/`, docs/design.md "Fuzzing") on every
//! `cargo test`, over the library API. hickory-proto's decoder is the oracle: whatever
//! localdns sends must decode, keep the client's ID and echo its question.
//!
//! The regression tests at the end are the fuzzers' findings, one test each.

use std::path::PathBuf;

use hickory_proto::op::Message;
use localdns::config::{load_documents, ConfigError, Environment};
use localdns::dns::answer::{write_error, write_refusal};
use localdns::dns::query::question_end;
use localdns::dns::wire::{self, Header, HEADER_LEN};
use localdns::dns::{Answer, AnswerError, Key, Query, Reject, Ttl, TtlPolicy};
use proptest::prelude::*;

/// The config defaults.
const POLICY: TtlPolicy = TtlPolicy {
    min_ttl: 0,
    max_ttl: 3600,
    negative_max_ttl: 5,
    servfail_ttl: 1,
};

/// A wire name from labels.
fn wire_name(labels: &[String]) -> Vec<u8> {
    let mut n = Vec::new();
    for l in labels {
        n.push(l.len() as u8);
        n.extend_from_slice(l.as_bytes());
    }
    n.push(0);
    n
}

/// A client query: header, question, and an OPT record when `edns` is `(size, DO)`.
fn client_query(id: u16, qname: &[u8], qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    p.extend_from_slice(qname);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if let Some((size, dnssec_ok)) = edns {
        p.extend_from_slice(&[0, 0, 41]);
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    p
}

/// An upstream response with ID `id` to `qname`/`qtype`: A records with these TTLs.
fn upstream_answer(id: u16, qname: &[u8], qtype: u16, ttls: &[u32]) -> Vec<u8> {
    let mut r = id.to_be_bytes().to_vec();
    r.extend_from_slice(&[0x81, 0x80, 0, 1]);
    r.extend_from_slice(&(ttls.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(qname);
    r.extend_from_slice(&qtype.to_be_bytes());
    r.extend_from_slice(&[0, 1]);
    for (i, ttl) in ttls.iter().enumerate() {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4, 192, 0, 2, i as u8]);
    }
    r
}

/// `out` decodes, keeps the client's ID and echoes its question byte for byte.
fn assert_answers(out: &[u8], q: &Query<'_>) -> Message {
    let msg = Message::from_vec(out).expect("the answer decodes");
    assert_eq!(msg.id(), q.id);
    assert_eq!(msg.queries().len(), 1);
    assert_eq!(u16::from(msg.queries()[0].query_type()), q.qtype);
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + q.question.len()], q.question);
    msg
}

/// The answer localdns writes for a packet that is not a query it serves (as
/// `server::handle` does); `None` when it drops the packet.
fn error_answer(pkt: &[u8]) -> Option<(Vec<u8>, u16)> {
    let mut out = Vec::new();
    let (id, flags, rcode, ext) = match Query::parse(pkt) {
        Ok(_) | Err(Reject::Drop) => return None,
        Err(Reject::FormErr { id, flags }) => (id, flags, wire::RCODE_FORMERR, 0),
        Err(Reject::NotImp { id, flags }) => (id, flags, wire::RCODE_NOTIMP, 0),
        Err(Reject::BadVers { id, flags }) => (id, flags, wire::RCODE_NOERROR, 1),
    };
    write_refusal(&mut out, pkt, id, flags, rcode, ext);
    Some((out, id))
}

/// The key of a response's own question, as the miss path asked it.
fn key_of(resp: &[u8]) -> Option<(u16, Key)> {
    let h = Header::read(resp)?;
    let qend = question_end(resp)?;
    let q = &resp[HEADER_LEN..qend];
    let (qtype, qclass) = (wire::u16_at(q, q.len() - 4)?, wire::u16_at(q, q.len() - 2)?);
    Some((
        h.id,
        Key::new(&q[..q.len() - 4], qtype, qclass, false, false),
    ))
}

fn labels() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-zA-Z0-9_-]{1,20}", 0..5)
}

fn edns() -> impl Strategy<Value = Option<(u16, bool)>> {
    prop::option::of((any::<u16>(), any::<bool>()))
}

fn environment(dir: &std::path::Path) -> Environment {
    let etc = dir.join("resolv.conf");
    std::fs::write(&etc, "nameserver 192.0.2.53\n").unwrap();
    Environment {
        resolved_resolv_conf: dir.join("absent"),
        etc_resolv_conf: etc,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes: the query parser never panics, and every error answer decodes and
    /// keeps the ID.
    #[test]
    fn query_parser_never_panics(pkt in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Some((out, id)) = error_answer(&pkt) {
            let msg = Message::from_vec(&out).expect("the error answer decodes");
            prop_assert_eq!(msg.id(), id);
        }
    }

    /// Arbitrary bytes after a query's header: parsed or answered with an error, never a
    /// panic, and an error answer keeps the ID.
    #[test]
    fn mangled_queries(id in any::<u16>(), tail in prop::collection::vec(any::<u8>(), 0..80)) {
        let mut pkt = client_query(id, b"\x07example\x03com\x00", 1, Some((1232, true)));
        pkt.truncate(HEADER_LEN);
        pkt.extend_from_slice(&tail);
        if let Some((out, got)) = error_answer(&pkt) {
            prop_assert_eq!(got, id);
            prop_assert_eq!(Message::from_vec(&out).expect("decodes").id(), id);
        }
    }

    /// A well-formed query on the hit path: the rendered answer decodes with the client's
    /// ID and question, TTLs aged, truncated (TC, no records) only beyond the client's
    /// limit, and the client's EDNS answered with EDNS.
    #[test]
    fn rendered_answers_decode(
        id in any::<u16>(),
        labels in labels(),
        ttls in prop::collection::vec(0u32..100_000, 1..40),
        edns in edns(),
        age in any::<u32>(),
    ) {
        let qname = wire_name(&labels);
        let pkt = client_query(id, &qname, 1, edns);
        let q = Query::parse(&pkt).expect("a well-formed query parses");
        let key = q.key();
        let resp = upstream_answer(7, key.qname(), 1, &ttls);
        let answer = Answer::from_upstream(&resp, 7, &key, &POLICY).expect("accepted");
        let mut out = Vec::new();
        let truncated = answer.render(&mut out, &q, Ttl::Age(age), q.udp_limit());
        prop_assert!(out.len() <= q.udp_limit());
        let msg = assert_answers(&out, &q);
        prop_assert_eq!(msg.header().truncated(), truncated);
        prop_assert_eq!(msg.extensions().is_some(), edns.is_some());
        if !truncated {
            let shown: Vec<u32> = msg.answers().iter().map(|r| r.ttl()).collect();
            let want: Vec<u32> = ttls.iter().map(|t| t.min(&3600).saturating_sub(age)).collect();
            prop_assert_eq!(shown, want);
        }
        write_error(&mut out, q.id, q.flags, wire::RCODE_SERVFAIL, Some(&q), 0);
        assert_answers(&out, &q);
    }

    /// A well-formed upstream answer with bytes flipped: never a panic.
    #[test]
    fn mangled_upstream_answers(
        ttls in prop::collection::vec(any::<u32>(), 0..8),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut resp = upstream_answer(7, b"\x01a\x00", 1, &ttls);
        for (at, byte) in flips {
            let at = at.index(resp.len());
            resp[at] = byte;
        }
        if let Some((id, key)) = key_of(&resp) {
            let _ = Answer::from_upstream(&resp, id, &key, &POLICY);
        }
    }

    /// Arbitrary text as a config file: a config or an error that names a file or a key,
    /// with a reason.
    #[test]
    fn config_loader_never_panics(text in "[a-z_.=\\[\\]\"0-9 \n{},:]{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let docs = [(PathBuf::from("/etc/localdns/config.toml"), text)];
        match load_documents(&docs, &environment(dir.path())) {
            Ok(_) => {}
            Err(ConfigError::Invalid { at, key, reason }) => {
                prop_assert!(!reason.is_empty());
                prop_assert!(at.file.is_some() || key.is_some());
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

// ---- The upstream parser on structured answers.

/// Record types of the structured answers: A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV.
const TYPES: [u16; 9] = [1, 2, 5, 6, 12, 15, 16, 28, 33];

/// One record of a structured answer: section (0 answer, 1 authority, 2 additional),
/// index into [`TYPES`], TTL, and bytes for RDATA (used as they are for types without
/// names, as the label of the name for the others).
type Rec = (u8, usize, u32, Vec<u8>);

/// What the structured generator draws: ID, question name and type index, rcode, TC,
/// records, the OPT's extended rcode byte (when there is an OPT) and a few byte flips.
type Drawn = (
    u16,
    Vec<String>,
    usize,
    u8,
    bool,
    Vec<Rec>,
    Option<u8>,
    Vec<(prop::sample::Index, u8)>,
);

fn drawn() -> impl Strategy<Value = Drawn> {
    let rec = (
        0u8..3,
        0..TYPES.len(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..24),
    );
    let flips = prop_oneof![
        4 => Just(Vec::new()),
        1 => prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..3),
    ];
    (
        any::<u16>(),
        labels(),
        0..TYPES.len(),
        prop_oneof![6 => Just(0u8), 2 => Just(3u8), 1 => 0u8..16],
        prop::bool::weighted(0.05),
        prop::collection::vec(rec, 0..8),
        prop_oneof![2 => Just(None), 2 => Just(Some(0u8)), 1 => any::<u8>().prop_map(Some)],
        flips,
    )
}

/// RDATA for a record of type `rtype` from `bytes`: a name (one label from the bytes, then
/// a pointer to the question name) where the type holds one, fixed sizes where it has them.
fn rdata(rtype: u16, bytes: &[u8]) -> Vec<u8> {
    let label: Vec<u8> = bytes.iter().take(10).map(|b| b'a' + b % 26).collect();
    let mut name = Vec::new();
    if !label.is_empty() {
        name.push(label.len() as u8);
        name.extend_from_slice(&label);
    }
    name.extend_from_slice(&[0xc0, 12]);
    let padded = |n: usize| {
        (0..n)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect::<Vec<u8>>()
    };
    match rtype {
        2 | 5 | 12 => name,
        6 => [name.clone(), vec![0xc0, 12], padded(20)].concat(),
        15 => [padded(2), name].concat(),
        33 => [padded(6), name].concat(),
        1 => padded(4),
        28 => padded(16),
        16 => [vec![bytes.len() as u8], bytes.to_vec()].concat(),
        _ => bytes.to_vec(),
    }
}

/// The wire form of a drawn answer.
fn structured(d: &Drawn) -> Vec<u8> {
    let (id, labels, qtype, rcode, tc, recs, opt, flips) = d;
    let mut r = id.to_be_bytes().to_vec();
    r.extend_from_slice(&[
        0x81 | if *tc { 0x02 } else { 0 },
        0x80 | (rcode & 0xf),
        0,
        1,
    ]);
    let count = |s: u8| recs.iter().filter(|r| r.0 == s).count() as u16;
    r.extend_from_slice(&count(0).to_be_bytes());
    r.extend_from_slice(&count(1).to_be_bytes());
    r.extend_from_slice(&(count(2) + u16::from(opt.is_some())).to_be_bytes());
    r.extend_from_slice(&wire_name(labels));
    r.extend_from_slice(&TYPES[*qtype].to_be_bytes());
    r.extend_from_slice(&[0, 1]);
    for section in 0..3 {
        for (_, t, ttl, bytes) in recs.iter().filter(|r| r.0 == section) {
            let rtype = TYPES[*t];
            let data = rdata(rtype, bytes);
            r.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&rtype.to_be_bytes());
            r.extend_from_slice(&[0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(&data);
        }
    }
    if let Some(ext) = opt {
        r.extend_from_slice(&[0, 0, 41, 4, 0xd0, *ext, 0, 0, 0, 0, 0]);
    }
    for (at, byte) in flips {
        let at = at.index(r.len());
        r[at] = *byte;
    }
    r
}

/// Upstream answers, structured (a valid header, the question of the key, records of the
/// usual types, an OPT) and sometimes mangled: never a panic; when accepted, the rendered
/// answer has every byte inside a counted record (RDATA localdns does not read, such as a
/// mangled TXT, is passed on as it came). Most cases must reach that
/// check (arbitrary bytes reached it in 1.5% of cases), so the share is counted and has a
/// floor.
#[test]
fn upstream_parser_never_panics() {
    use proptest::test_runner::{Config, TestRunner};
    const CASES: u32 = 3000;
    let (cases, rendered) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    let strategy = (drawn(), any::<u32>(), edns());
    runner
        .run(&strategy, |(d, age, edns)| {
            cases.set(cases.get() + 1);
            let resp = structured(&d);
            let Some((id, key)) = key_of(&resp) else {
                return Ok(());
            };
            let Ok(answer) = Answer::from_upstream(&resp, id, &key, &POLICY) else {
                return Ok(());
            };
            let pkt = client_query(1, key.qname(), key.qtype(), edns);
            let Ok(q) = Query::parse(&pkt) else {
                return Ok(());
            };
            rendered.set(rendered.get() + 1);
            let mut out = Vec::new();
            answer.render(&mut out, &q, Ttl::Age(age), u16::MAX as usize);
            let h = Header::read(&out).expect("a header");
            let end = wire::walk_records(&out, question_end(&out).unwrap(), &h, |_, _| {});
            prop_assert_eq!(end, Some(out.len()));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (cases, rendered) = (cases.get(), rendered.get());
    eprintln!("upstream_parser_never_panics: {rendered} of {cases} cases reached the render check");
    assert!(
        rendered * 2 > cases,
        "only {rendered} of {cases} cases reached the render check"
    );
}

// ---- The fuzzers' findings (docs/design.md "Fuzzing").

/// fuzz/upstream_answer: an upstream response with two OPT records kept one beside the
/// client's, and the answer did not decode (two OPTs). Now refused as malformed.
#[test]
fn two_opt_records_are_refused() {
    let mut resp = upstream_answer(7, b"\x01a\x00", 1, &[60]);
    resp[11] = 2;
    for _ in 0..2 {
        resp.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    let (id, key) = key_of(&resp).unwrap();
    assert_eq!(
        Answer::from_upstream(&resp, id, &key, &POLICY),
        Err(AnswerError::Malformed)
    );
}

/// fuzz/config_load: a file ending in `key =` gave an error with an empty reason
/// ("config.toml:3: "). Now it says what is wrong.
#[test]
fn a_key_without_value_at_the_end_names_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = "# the listeners\n[listen]\naddresses = ".to_owned();
    let docs = [(PathBuf::from("/etc/localdns/config.toml"), text)];
    let err = load_documents(&docs, &environment(dir.path())).unwrap_err();
    let ConfigError::Invalid { at, reason, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(at.line, Some(3), "{err}");
    assert!(!reason.is_empty(), "{err}");
}

/// fuzz/upstream_answer: a compression pointer into the upstream's header (its ID here)
/// was stored as is, and once the hit path wrote the client's ID there the name read other
/// bytes and the answer did not decode. Such names are refused, owners and those inside
/// RDATA (NS, CNAME, SOA, MX, SRV, ...) alike, as are names read from a TTL field.
#[test]
fn a_pointer_into_the_header_is_refused() {
    // ID 0x0009: byte 0 reads as a root label through the pointer c000.
    let mut resp = upstream_answer(0x0009, b"\x01a\x00", 1, &[60]);
    resp[HEADER_LEN + 7..HEADER_LEN + 9].copy_from_slice(&[0xc0, 0x00]);
    let (id, key) = key_of(&resp).unwrap();
    assert!(
        Message::from_vec(&resp).is_ok(),
        "the upstream's message decodes"
    );
    assert_eq!(
        Answer::from_upstream(&resp, id, &key, &POLICY),
        Err(AnswerError::Malformed)
    );
}

#[test]
fn a_name_in_rdata_pointing_into_the_header_or_a_ttl_is_refused() {
    for (rtype, prefix) in [
        (5u16, &[][..]),
        (2, &[]),
        (12, &[]),
        (15, &[0, 10]),
        (33, &[0, 1, 0, 1, 0, 53]),
    ] {
        for target in [0x00u8, 0x19] {
            // One record of `rtype` whose RDATA name is a pointer to `target`: the ID
            // (0x0000 reads as the root name), or the record's own TTL (offset 0x19).
            let mut resp = upstream_answer(0x0000, b"\x01a\x00", 1, &[0]);
            let rec = resp.len() - 16;
            resp[rec + 2..rec + 4].copy_from_slice(&rtype.to_be_bytes());
            resp.truncate(rec + 10);
            let rdata = [prefix, &[0xc0, target][..]].concat();
            resp.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            resp.extend_from_slice(&rdata);
            assert_eq!(rec + 6, 0x19, "the TTL's offset");
            let (id, key) = key_of(&resp).unwrap();
            assert_eq!(
                Answer::from_upstream(&resp, id, &key, &POLICY),
                Err(AnswerError::Malformed),
                "type {rtype}, pointer to {target:#x}"
            );
            // The same record pointing at the question name is kept.
            let n = resp.len();
            resp[n - 1] = 0x0c;
            assert!(Answer::from_upstream(&resp, id, &key, &POLICY).is_ok());
        }
    }
}
