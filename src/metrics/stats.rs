//! Per-thread request statistics: the CoreDNS `dns` and `cache` numbers (requests by
//! type, responses by rcode, size and duration histograms, hits by kind) for one listener
//! and transport, kept in one cache-line aligned block per writer.
//!
//! The hit path must not pay for being counted: a UDP receive loop owns its block alone, so
//! it adds with a plain load and store (no locked instruction, no cache line shared with
//! another core), and nothing is allocated. Blocks written by many threads (TCP
//! connections, the miss path on the tokio runtime) are marked shared and add with
//! `fetch_add`. A scrape sums the blocks with the same labels ([`super::Metrics`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Query types CoreDNS counts by name (`plugin/metrics/vars/monitor.go`); any other type
/// is counted as `other`.
pub const TYPES: [(u16, &str); 19] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (48, "DNSKEY"),
    (43, "DS"),
    (15, "MX"),
    (50, "NSEC3"),
    (47, "NSEC"),
    (2, "NS"),
    (12, "PTR"),
    (46, "RRSIG"),
    (6, "SOA"),
    (33, "SRV"),
    (16, "TXT"),
    (65, "HTTPS"),
    (64, "SVCB"),
    (251, "IXFR"),
    (252, "AXFR"),
    (255, "ANY"),
];
/// Index of `other` in the per-type counters.
const OTHER_TYPE: usize = TYPES.len();

/// The `type` label for a type index.
pub fn type_name(i: usize) -> &'static str {
    TYPES.get(i).map_or("other", |t| t.1)
}

/// Index of `qtype` in the per-type counters.
#[inline]
pub fn type_index(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        28 => 1,
        _ => TYPES
            .iter()
            .position(|&(t, _)| t == qtype)
            .unwrap_or(OTHER_TYPE),
    }
}

/// RCODE names as CoreDNS writes them (miekg/dns `RcodeToString`; 16 is BADSIG there,
/// the same number as BADVERS); 11 to 15 have no name and are written as numbers.
pub const RCODES: [&str; 17] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "11", "12", "13", "14", "15", "BADSIG",
];
/// The extended RCODE BADVERS (RFC 6891), answered to EDNS versions other than 0.
pub const RCODE_BADVERS: u8 = 16;

/// Who made an answer: the `plugin` label of `coredns_dns_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// localdns itself: FORMERR, NOTIMP, BADVERS, and SERVFAIL when no upstream answered.
    Server = 0,
    /// A cached answer, fresh or stale.
    Cache = 1,
    /// An upstream answer passed on.
    Forward = 2,
}
pub const SOURCES: [&str; 3] = ["", "cache", "forward"];

/// `coredns_dns_request_size_bytes` and `response_size_bytes` buckets (bytes).
pub const SIZE_BUCKETS: [u64; 14] = [
    0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000, 48000, 64000,
];
/// `plugin.TimeBuckets`: 0.25 ms doubling to 8.192 s, in nanoseconds.
pub const TIME_BUCKETS_NS: [u64; 16] = {
    let mut b = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        b[i] = 250_000 << i;
        i += 1;
    }
    b
};

/// A histogram over integer observations with bucket bounds `bounds` (upper, inclusive).
/// Counts per bucket are not cumulative here; [`Histogram::cumulative`] makes them so.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    /// One per bound, plus +Inf.
    counts: [AtomicU64; N],
    inf: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            inf: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

/// A snapshot of a histogram: cumulative counts per bound, total count, sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramValue {
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: u64,
}

impl HistogramValue {
    pub fn empty(n: usize) -> Self {
        HistogramValue {
            cumulative: vec![0; n],
            count: 0,
            sum: 0,
        }
    }

    pub fn merge(&mut self, other: &HistogramValue) {
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

impl<const N: usize> Histogram<N> {
    #[inline]
    fn observe(&self, shared: bool, bounds: &[u64; N], v: u64, n: u64) {
        let slot = bounds
            .iter()
            .position(|&b| v <= b)
            .map_or(&self.inf, |i| &self.counts[i]);
        add(shared, slot, n);
        add(shared, &self.sum, v * n);
    }

    /// One observation from any thread.
    pub fn observe_shared(&self, bounds: &[u64; N], v: u64) {
        self.observe(true, bounds, v, 1);
    }

    pub fn value(&self) -> HistogramValue {
        let mut running = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Relaxed);
                running
            })
            .collect();
        HistogramValue {
            cumulative,
            count: running + self.inf.load(Relaxed),
            sum: self.sum.load(Relaxed),
        }
    }
}

#[inline]
fn add(shared: bool, c: &AtomicU64, n: u64) {
    if shared {
        c.fetch_add(n, Relaxed);
    } else {
        // Only this block's owner writes it: no read-modify-write instruction needed.
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

/// The statistics of one writer (a UDP receive loop) or of one shared group (a TCP
/// listener's connections, the miss path of one listener).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Stats {
    shared: bool,
    requests: [AtomicU64; TYPES.len() + 1],
    do_requests: AtomicU64,
    responses: [[AtomicU64; RCODES.len()]; SOURCES.len()],
    /// Cache hits: success, denial.
    hits: [AtomicU64; 2],
    misses: AtomicU64,
    request_size: Histogram<14>,
    response_size: Histogram<14>,
    duration: Histogram<16>,
    /// Milliseconds (on the cache's clock) when a receive loop last went round; the
    /// watchdog and `/health` see a loop alive only while it keeps this fresh.
    pub heartbeat: AtomicU64,
}

/// What a scrape reads from one block (or the sum of several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsValue {
    pub requests: Vec<u64>,
    pub do_requests: u64,
    pub responses: Vec<Vec<u64>>,
    pub hits: [u64; 2],
    pub misses: u64,
    pub request_size: HistogramValue,
    pub response_size: HistogramValue,
    pub duration: HistogramValue,
}

impl Default for StatsValue {
    fn default() -> Self {
        StatsValue {
            requests: vec![0; TYPES.len() + 1],
            do_requests: 0,
            responses: vec![vec![0; RCODES.len()]; SOURCES.len()],
            hits: [0; 2],
            misses: 0,
            request_size: HistogramValue::empty(SIZE_BUCKETS.len()),
            response_size: HistogramValue::empty(SIZE_BUCKETS.len()),
            duration: HistogramValue::empty(TIME_BUCKETS_NS.len()),
        }
    }
}

impl StatsValue {
    pub fn merge(&mut self, o: &StatsValue) {
        for (a, b) in self.requests.iter_mut().zip(&o.requests) {
            *a += b;
        }
        self.do_requests += o.do_requests;
        for (ra, rb) in self.responses.iter_mut().zip(&o.responses) {
            for (a, b) in ra.iter_mut().zip(rb) {
                *a += b;
            }
        }
        self.hits[0] += o.hits[0];
        self.hits[1] += o.hits[1];
        self.misses += o.misses;
        self.request_size.merge(&o.request_size);
        self.response_size.merge(&o.response_size);
        self.duration.merge(&o.duration);
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    pub fn total_hits(&self) -> u64 {
        self.hits[0] + self.hits[1]
    }
}

impl Stats {
    /// A block for one writer thread.
    pub fn owned() -> Stats {
        Stats::default()
    }

    /// A block written by many threads.
    pub fn shared() -> Stats {
        Stats {
            shared: true,
            ..Stats::default()
        }
    }

    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// A query was received: its type, size in bytes and DO bit.
    #[inline]
    pub fn request(&self, qtype: u16, len: usize, dnssec_ok: bool) {
        add(self.shared, &self.requests[type_index(qtype)], 1);
        if dnssec_ok {
            add(self.shared, &self.do_requests, 1);
        }
        self.request_size
            .observe(self.shared, &SIZE_BUCKETS, len as u64, 1);
    }

    /// A query that could not be parsed far enough to know its type.
    #[inline]
    pub fn unparsed_request(&self, len: usize) {
        add(self.shared, &self.requests[OTHER_TYPE], 1);
        self.request_size
            .observe(self.shared, &SIZE_BUCKETS, len as u64, 1);
    }

    /// An answer was sent: `msg` is its wire form (the rcode is read from the header),
    /// `extended` the upper rcode bits when an OPT record carries them.
    #[inline]
    pub fn response(&self, msg: &[u8], extended: u8, origin: Origin) {
        let rcode = match extended {
            0 => msg.get(3).map_or(2, |b| b & 0x0f) as usize,
            _ => RCODE_BADVERS as usize,
        };
        add(
            self.shared,
            &self.responses[origin as usize][rcode.min(RCODES.len() - 1)],
            1,
        );
        self.response_size
            .observe(self.shared, &SIZE_BUCKETS, msg.len() as u64, 1);
    }

    #[inline]
    pub fn hit(&self, denial: bool) {
        add(self.shared, &self.hits[usize::from(denial)], 1);
    }

    #[inline]
    pub fn miss(&self) {
        add(self.shared, &self.misses, 1);
    }

    /// `n` queries took `nanos` each, from receipt to the answer being sent.
    #[inline]
    pub fn durations(&self, nanos: u64, n: u64) {
        self.duration
            .observe(self.shared, &TIME_BUCKETS_NS, nanos, n);
    }

    pub fn value(&self) -> StatsValue {
        let l = |c: &AtomicU64| c.load(Relaxed);
        StatsValue {
            requests: self.requests.iter().map(l).collect(),
            do_requests: l(&self.do_requests),
            responses: self
                .responses
                .iter()
                .map(|r| r.iter().map(l).collect())
                .collect(),
            hits: [l(&self.hits[0]), l(&self.hits[1])],
            misses: l(&self.misses),
            request_size: self.request_size.value(),
            response_size: self.response_size.value(),
            duration: self.duration.value(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map_to_coredns_names_and_other() {
        assert_eq!(type_name(type_index(1)), "A");
        assert_eq!(type_name(type_index(28)), "AAAA");
        assert_eq!(type_name(type_index(33)), "SRV");
        assert_eq!(type_name(type_index(99)), "other");
    }

    #[test]
    fn histograms_are_cumulative_with_le_bounds() {
        let s = Stats::owned();
        s.request(1, 100, false); // le 100
        s.request(1, 101, true); // le 200
        s.request(1, 70000, false); // +Inf only
        let v = s.value();
        assert_eq!(v.request_size.cumulative[0], 0);
        assert_eq!(v.request_size.cumulative[1], 1);
        assert_eq!(v.request_size.cumulative[2], 2);
        assert_eq!(*v.request_size.cumulative.last().unwrap(), 2);
        assert_eq!(v.request_size.count, 3);
        assert_eq!(v.request_size.sum, 70201);
        assert_eq!(v.do_requests, 1);
        assert_eq!(v.requests[0], 3);
        assert_eq!(TIME_BUCKETS_NS[0], 250_000);
        assert_eq!(TIME_BUCKETS_NS[15], 8_192_000_000);
    }

    #[test]
    fn responses_by_source_and_rcode_and_merge() {
        let (a, b) = (Stats::owned(), Stats::shared());
        let mut nx = vec![0u8; 12];
        nx[3] = 3;
        a.response(&nx, 0, Origin::Cache);
        b.response(&nx, 0, Origin::Forward);
        b.response(&nx, 1, Origin::Server);
        a.hit(true);
        b.durations(300_000, 4);
        let mut sum = a.value();
        sum.merge(&b.value());
        assert_eq!(sum.responses[Origin::Cache as usize][3], 1);
        assert_eq!(sum.responses[Origin::Forward as usize][3], 1);
        assert_eq!(sum.responses[Origin::Server as usize][16], 1);
        assert_eq!(sum.hits, [0, 1]);
        assert_eq!(sum.duration.count, 4);
        assert_eq!(sum.duration.cumulative[0], 0);
        assert_eq!(sum.duration.cumulative[1], 4);
        assert_eq!(sum.response_size.count, 3);
    }
}
