//! The checks the fuzz targets share: what every message localdns writes must satisfy,
//! judged by hickory-proto's decoder (an implementation that shares no code with ours).

use hickory_proto::op::Message;
use localdns::dns::wire::{self, Header, HEADER_LEN};
use localdns::dns::Query;

/// `out` is a complete DNS message: localdns's own walker reads every record and ends
/// exactly at the end (nothing written outside the counted sections).
pub fn assert_well_formed(out: &[u8]) {
    let h = Header::read(out).expect("rendered message has a header");
    let qend = localdns::dns::query::question_end(out).filter(|_| h.qdcount == 1);
    let at = qend.unwrap_or(HEADER_LEN);
    let end = wire::walk_records(out, at, &h, |_, _| {}).expect("rendered records walk");
    assert_eq!(end, out.len(), "bytes after the last counted record");
}

/// `out` decodes, answers with the client's ID and echoes its question.
pub fn assert_answers(out: &[u8], q: &Query<'_>) -> Message {
    let msg = Message::from_vec(out)
        .unwrap_or_else(|e| panic!("answer does not decode: {e}\n{out:02x?}"));
    assert_eq!(msg.id(), q.id, "ID not kept");
    assert!(msg.header().message_type() == hickory_proto::op::MessageType::Response);
    assert_eq!(msg.queries().len(), 1, "question not echoed");
    let echoed = &msg.queries()[0];
    assert_eq!(u16::from(echoed.query_type()), q.qtype);
    assert_eq!(u16::from(echoed.query_class()), q.qclass);
    let labels: Vec<&[u8]> = echoed.name().iter().collect();
    assert_eq!(labels, wire_labels(q.qname()), "question name changed");
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + q.question.len()], q.question);
    msg
}

/// An error answer (`write_refusal`, as `server::handle` writes it) decodes and keeps the ID.
pub fn assert_error_answer(out: &[u8], id: u16) {
    let msg = Message::from_vec(out)
        .unwrap_or_else(|e| panic!("error answer does not decode: {e}\n{out:02x?}"));
    assert_eq!(msg.id(), id, "ID not kept");
    assert_well_formed(out);
}

/// The labels of an uncompressed wire name.
pub fn wire_labels(mut name: &[u8]) -> Vec<&[u8]> {
    let mut labels = Vec::new();
    while let Some((&len, rest)) = name.split_first() {
        if len == 0 {
            break;
        }
        labels.push(&rest[..len as usize]);
        name = &rest[len as usize..];
    }
    labels
}
