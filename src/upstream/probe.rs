//! Health known without traffic: when is an idle server sent a known-good question, and
//! what does its answer say. Pure decisions over a clock in milliseconds; the pool sends
//! the probes (through the server's own transport) and feeds [`super::health`].
//!
//! Health is otherwise learnt from client misses only, so on a quiet node a dead cluster
//! upstream stayed "up" (and `/ready` 200) until the first pod asked. A server that no
//! client has had an answer from for `health_check_interval` (jittered ±25%, so that
//! servers and nodes do not probe in step) gets one question:
//! - the cluster pool and stub zones: the SOA of their zone. kube-dns answers it from its
//!   `kubernetes` plugin itself, so it tests kube-dns and nothing behind it (`. NS` would
//!   be forwarded by CoreDNS to *its* upstreams, and their bad day would mark kube-dns
//!   down on every node at once);
//! - the default pool: `. NS`, the question CoreDNS `forward` health-checks with; every
//!   recursive resolver has it cached.
//!
//! NOERROR or NXDOMAIN means alive (an SOA question answered either way is an answer from a
//! working server); a timeout, a connection error, SERVFAIL, REFUSED or any other RCODE is
//! a failed question. Each probe counts as its own question, so a dead server is marked down
//! after `down_after_failures` probes, like after as many distinct client questions; a
//! failed probe on a server still up is repeated at once (the timeout spaces them), so one
//! lost datagram is cleared by the next answer and a dead server is marked down within one
//! interval plus `down_after_failures` timeouts. A down server is probed every interval,
//! and its first good answer marks it up.
//!
//! A server whose clients are getting answers is never probed: a busy node sends no extra
//! queries.

use crate::dns::query::text_to_wire;
use crate::dns::Key;

/// How often the pools look for servers due a probe.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

const TYPE_NS: u16 = 2;
const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;

/// Probe questions count against a server's health as distinct questions: their hashes
/// come from this range, one per probe, apart from client questions' hashes.
const QUESTIONS: u64 = 0x5052_4f42_0000_0000; // "PROB"

/// One server's probe schedule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Good client answers counted at the last look; `None` before the first.
    answered: Option<u64>,
    /// No probe before this (ms).
    next: u64,
    /// A probe (or a run of them after failures) is being sent.
    in_flight: bool,
    /// Probes sent so far.
    sent: u64,
}

impl Schedule {
    /// Looked at every tick: is a probe due at `now`? `answered` counts the server's good
    /// answers to clients so far; while it grows the server is in use and is not probed,
    /// and the next probe waits a full interval after the last answer. `jitter` in [0, 1).
    /// Returns true at most once until [`Schedule::done`].
    pub fn due(&mut self, now: u64, answered: u64, interval_ms: u64, jitter: f64) -> bool {
        if interval_ms == 0 {
            return false;
        }
        if self.answered != Some(answered) {
            self.answered = Some(answered);
            self.next = now.saturating_add(jittered(interval_ms, jitter));
            return false;
        }
        if self.in_flight || now < self.next {
            return false;
        }
        self.in_flight = true;
        true
    }

    /// The question hash for the next probe sent: a new one each time.
    pub fn question(&mut self) -> u64 {
        self.sent += 1;
        QUESTIONS | (self.sent & 0xffff_ffff)
    }

    /// The probe (run) ended at `now`: the next one an interval later.
    pub fn done(&mut self, now: u64, interval_ms: u64, jitter: f64) {
        self.in_flight = false;
        self.next = now.saturating_add(jittered(interval_ms, jitter));
    }
}

/// `interval_ms` spread over ±25% by `jitter` in [0, 1).
pub fn jittered(interval_ms: u64, jitter: f64) -> u64 {
    let factor = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
    (interval_ms as f64 * factor) as u64
}

/// Does an answer with this RCODE say the server works? NOERROR and NXDOMAIN only.
pub fn alive(rcode: u8) -> bool {
    rcode == 0 || rcode == 3
}

/// After the `tries`-th probe of a run: send another at once? Only after a failure while
/// the server is still up, so that failures reach `down_after` without waiting intervals
/// (and a lone lost datagram is cleared by the next answer).
pub fn again(alive: bool, still_up: bool, tries: u32, down_after: u32) -> bool {
    !alive && still_up && tries < down_after.max(1)
}

/// The probe question for a pool serving `zone` (dotted, no trailing dot); `None` for the
/// default pool, which gets `. NS`.
pub fn question(zone: Option<&str>) -> Key {
    match zone {
        Some(z) if !z.is_empty() && z != "." => {
            Key::new(&text_to_wire(z), TYPE_SOA, CLASS_IN, false, false)
        }
        _ => Key::new(&[0], TYPE_NS, CLASS_IN, false, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: u64 = 3000;

    /// Drives `due` with a fixed answer count until it fires; the time it fired.
    fn first_due(s: &mut Schedule, from: u64, answered: u64) -> Option<u64> {
        (from..from + 10 * I)
            .step_by(100)
            .find(|&t| s.due(t, answered, I, 0.5))
    }

    #[test]
    fn an_idle_server_is_probed_one_interval_after_the_first_look() {
        let mut s = Schedule::default();
        assert!(
            !s.due(1000, 0, I, 0.5),
            "the first look only starts the clock"
        );
        assert_eq!(first_due(&mut s, 1000, 0), Some(1000 + I));
        // In flight: not again until done.
        assert!(!s.due(1000 + 5 * I, 0, I, 0.5));
        s.done(4500, I, 0.5);
        assert!(!s.due(4500 + I - 1, 0, I, 0.5));
        assert!(s.due(4500 + I, 0, I, 0.5));
    }

    #[test]
    fn a_server_answering_clients_is_never_probed() {
        let mut s = Schedule::default();
        for (n, t) in (0..20 * I).step_by(500).enumerate() {
            assert!(!s.due(t, n as u64, I, 0.5), "probed at {t} while answering");
        }
        // Answers stop at the last look (t = 59.5 s): probed one interval later.
        let last = 20 * I - 500;
        assert_eq!(first_due(&mut s, 20 * I, 119), Some(last + I));
    }

    #[test]
    fn failing_clients_do_not_count_as_use() {
        // Queries that all fail leave the good-answer count unchanged: probes go on.
        let mut s = Schedule::default();
        s.due(0, 7, I, 0.5);
        assert!(s.due(I, 7, I, 0.5));
    }

    #[test]
    fn zero_interval_never_probes() {
        let mut s = Schedule::default();
        for t in (0..100_000).step_by(1000) {
            assert!(!s.due(t, 0, 0, 0.5));
        }
    }

    #[test]
    fn the_interval_is_jittered_by_a_quarter() {
        assert_eq!(jittered(I, 0.0), 2250);
        assert_eq!(jittered(I, 0.5), 3000);
        assert!(jittered(I, 0.999_999) <= 3750);
        assert_eq!(jittered(I, 9.0), 3750);
        let mut a = Schedule::default();
        a.due(0, 0, I, 0.0);
        assert!(a.due(2250, 0, I, 0.0));
    }

    #[test]
    fn every_probe_is_a_distinct_question() {
        let mut s = Schedule::default();
        let (a, b, c) = (s.question(), s.question(), s.question());
        assert!(a != b && b != c && a != c);
        assert_eq!(a & !0xffff_ffff, QUESTIONS);
    }

    #[test]
    fn only_noerror_and_nxdomain_are_alive() {
        assert!(alive(0));
        assert!(alive(3));
        for rcode in [1, 2, 4, 5, 9, 15] {
            assert!(!alive(rcode), "rcode {rcode}");
        }
    }

    #[test]
    fn failures_are_repeated_until_marked_down() {
        // down_after 3: a dead server is probed 3 times in a row, then left for an interval.
        assert!(again(false, true, 1, 3));
        assert!(again(false, true, 2, 3));
        assert!(!again(false, true, 3, 3));
        // Marked down, or alive: stop.
        assert!(!again(false, false, 1, 3));
        assert!(!again(true, true, 1, 3));
        assert!(!again(false, true, 1, 0));
    }

    #[test]
    fn probe_questions_by_pool() {
        let soa = question(Some("cluster.local"));
        assert_eq!(soa.qname(), &text_to_wire("cluster.local")[..]);
        assert_eq!((soa.qtype(), soa.qclass()), (TYPE_SOA, CLASS_IN));
        for default in [None, Some("."), Some("")] {
            let ns = question(default);
            assert_eq!(ns.qname(), &[0u8][..]);
            assert_eq!(ns.qtype(), TYPE_NS);
        }
    }
}
