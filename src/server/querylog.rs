//! The optional query log (`[log] queries`): one line per answer, or per failed answer,
//! so that an operator sees which names fail without a packet capture. Rate limited
//! ([`LINES_PER_SECOND`]); the lines left out are counted and reported in one line when
//! the next second starts logging again. Off, it costs the hit path one relaxed load.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use crate::config::QueryLog as Mode;
use crate::metrics::stats::{RCODES, SOURCES};
use crate::metrics::Origin;

/// Lines written per second at most.
pub const LINES_PER_SECOND: u64 = 50;

#[derive(Debug, Default)]
pub struct QueryLog {
    mode: AtomicU8,
    /// The second the count below belongs to (seconds since the epoch).
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

/// Does `mode` log an answer with `rcode`? `errors` is everything but NOERROR and
/// NXDOMAIN (a name that does not exist is an answer, not a failure).
pub fn wanted(mode: u8, rcode: u8) -> bool {
    match mode {
        0 => false,
        1 => rcode != 0 && rcode != 3,
        _ => true,
    }
}

/// The rate limit: the `n`th line (1-based) within its second is written when `n` is at
/// most [`LINES_PER_SECOND`].
pub fn within_limit(n: u64) -> bool {
    n <= LINES_PER_SECOND
}

impl QueryLog {
    pub fn set(&self, mode: Mode) {
        self.mode.store(
            match mode {
                Mode::Off => 0,
                Mode::Errors => 1,
                Mode::All => 2,
            },
            Relaxed,
        );
    }

    /// Log one answer if the mode wants it and the rate allows. `msg` is the answer.
    #[inline]
    pub fn answer(
        &self,
        name: impl FnOnce() -> String,
        qtype: u16,
        msg: &[u8],
        origin: Origin,
        proto: &str,
    ) {
        let mode = self.mode.load(Relaxed);
        if mode == 0 {
            return;
        }
        let rcode = msg.get(3).map_or(2, |b| b & 0x0f);
        if wanted(mode, rcode) {
            self.write(name(), qtype, rcode, origin, proto);
        }
    }

    #[cold]
    fn write(&self, name: String, qtype: u16, rcode: u8, origin: Origin, proto: &str) {
        let now = crate::metrics::unix_now();
        let second = self.second.load(Relaxed);
        if second != now
            && self
                .second
                .compare_exchange(second, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.count.store(0, Relaxed);
            let left_out = self.suppressed.swap(0, Relaxed);
            if left_out > 0 {
                tracing::info!(target: "localdns::query", left_out, "query log: {left_out} lines left out (over {LINES_PER_SECOND} a second)");
            }
        }
        if !within_limit(self.count.fetch_add(1, Relaxed) + 1) {
            self.suppressed.fetch_add(1, Relaxed);
            return;
        }
        let rcode = RCODES[usize::from(rcode)];
        let by = match SOURCES[origin as usize] {
            "" => "localdns",
            s => s,
        };
        let qtype = crate::metrics::stats::type_name(crate::metrics::stats::type_index(qtype));
        tracing::info!(target: "localdns::query", name = %name, qtype, rcode, by, proto,
            "query {name} {qtype} ({proto}): {rcode} from {by}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_rate() {
        assert!(!wanted(0, 2));
        assert!(wanted(1, 2) && wanted(1, 5) && !wanted(1, 0) && !wanted(1, 3));
        assert!(wanted(2, 0) && wanted(2, 3));
        assert!(within_limit(1) && within_limit(LINES_PER_SECOND));
        assert!(!within_limit(LINES_PER_SECOND + 1));
        let q = QueryLog::default();
        q.set(Mode::Errors);
        let mut servfail = vec![0u8; 12];
        servfail[3] = 2;
        for _ in 0..200 {
            q.answer(|| "x.example.".into(), 1, &servfail, Origin::Server, "udp");
        }
        let counted = q.count.load(Relaxed) + q.suppressed.load(Relaxed);
        assert!(counted >= 200, "{counted}");
        assert!(q.suppressed.load(Relaxed) >= 200 - 2 * LINES_PER_SECOND);
    }
}
