//! When is a server down? A pure decision over one server's recent failures and a clock in
//! milliseconds; the pool keeps one [`Health`] per server behind a lock on the miss path.
//!
//! A timed-out attempt says "this question got no answer from this server in time", which
//! is as often about the name (an authority slow for that one name) as about the server.
//! So a failure counts against the server only as one more *distinct* question that failed:
//! the server is marked down when `down_after` different questions failed within a window,
//! with no answer from it in between (any answer clears the record). One slow name asked
//! again and again stays one failed question, and never takes a pool down; a dead server
//! fails every question and is marked down as soon as `down_after` different ones failed.
//! (CoreDNS `forward` likewise marks a server down only after failed health checks, never
//! for one client's question.)
//!
//! A server that still answers some questions is not down, however many others it drops:
//! a resolver that rate-limits (it answers 200 queries a second and drops or truncates the
//! rest) or loses a share of its packets is still the best place for the rest. So a server
//! is marked down only when, besides those failed questions, it has given no usable answer
//! for a whole `quiet` period (the attempt timeout). Marking such a server down would turn
//! a partial loss into a total one, and make it flap down and up with every answer.
//!
//! A SERVFAIL or REFUSED is not a usable answer: it counts as a failed question and never
//! clears the record, so a server that keeps refusing is marked down like a silent one.
//!
//! A down server is skipped for `down_time`; then one query is sent to it as a probe (the
//! mark is renewed when the probe is taken, so concurrent queries do not all probe it), and
//! an answer marks it up again.

/// The pool's settings for health, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Distinct failed questions that mark a server down (at least 1).
    pub down_after: u32,
    pub down_time_ms: u64,
    /// Failures older than this are forgotten.
    pub window_ms: u64,
    /// A server that gave a usable answer within this long is not marked down.
    pub quiet_ms: u64,
}

impl Policy {
    /// The window is the time `down_after` queries take to exhaust their attempts one
    /// after the other (a lone client asking distinct names of a dead server).
    pub fn new(down_after: u32, down_time_ms: u64, timeout_ms: u64, attempts: u32) -> Policy {
        let down_after = down_after.max(1);
        Policy {
            down_after,
            down_time_ms,
            window_ms: timeout_ms
                .saturating_mul(u64::from(attempts.max(1)))
                .saturating_mul(u64::from(down_after)),
            quiet_ms: timeout_ms,
        }
    }
}

/// What a query may do with a server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    /// Marked down, skipped.
    Down,
    /// Marked down and its `down_time` is over: one query may probe it.
    ProbeDue,
}

/// One server's health.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Health {
    /// (question, when) of the distinct questions that failed since the last answer, in
    /// the window; at most `down_after` entries.
    failed: Vec<(u64, u64)>,
    /// Until when (ms) the server is skipped; 0 = up.
    down_until: u64,
    /// When (ms) it last gave a usable answer; 0 = never.
    answered_at: u64,
}

impl Health {
    pub fn state(&self, now: u64) -> State {
        match self.down_until {
            0 => State::Up,
            until if until <= now => State::ProbeDue,
            _ => State::Down,
        }
    }

    pub fn is_up(&self) -> bool {
        self.down_until == 0
    }

    /// A probe is being sent: skip the server for another `down_time` unless it answers.
    pub fn probe_taken(&mut self, now: u64, p: &Policy) {
        if self.down_until != 0 {
            self.down_until = now.saturating_add(p.down_time_ms).max(1);
        }
    }

    /// The server gave a usable answer at `now`. Returns true when that marks it up again.
    pub fn succeeded(&mut self, now: u64) -> bool {
        self.failed.clear();
        self.answered_at = now.max(1);
        std::mem::replace(&mut self.down_until, 0) != 0
    }

    /// `question` (a hash of name, type and class) got no usable answer from the server at
    /// `now`. Returns the number of distinct failed questions when that marks it down.
    pub fn failed(&mut self, question: u64, now: u64, p: &Policy) -> Option<u32> {
        self.failed
            .retain(|&(q, at)| q != question && now.saturating_sub(at) < p.window_ms);
        self.failed.push((question, now));
        let cap = p.down_after.max(1) as usize;
        if self.failed.len() > cap {
            self.failed.remove(0);
        }
        let answered_lately =
            self.answered_at != 0 && now.saturating_sub(self.answered_at) < p.quiet_ms;
        if self.down_until == 0 && self.failed.len() >= cap && !answered_lately {
            self.down_until = now.saturating_add(p.down_time_ms).max(1);
            return Some(self.failed.len() as u32);
        }
        None
    }

    /// Until when (ms) the server is skipped; 0 = up. Orders down servers by who is due
    /// first.
    pub fn down_until(&self) -> u64 {
        self.down_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults: down after 3, for 5 s; 1 s timeout, 3 attempts (window 9 s).
    fn policy() -> Policy {
        Policy::new(3, 5000, 1000, 3)
    }

    #[test]
    fn one_question_failing_again_and_again_never_marks_down() {
        let p = policy();
        let mut h = Health::default();
        for i in 0..30 {
            assert_eq!(h.failed(7, 1000 + i * 300, &p), None);
        }
        assert_eq!(h.state(10_000), State::Up);
    }

    #[test]
    fn distinct_questions_failing_mark_down_then_probe_then_up() {
        let p = policy();
        let mut h = Health::default();
        assert_eq!(h.failed(1, 1000, &p), None);
        assert_eq!(h.failed(1, 2000, &p), None);
        assert_eq!(h.failed(2, 3000, &p), None);
        assert_eq!(h.failed(3, 4000, &p), Some(3));
        assert!(!h.is_up());
        assert_eq!(h.state(4001), State::Down);
        assert_eq!(h.state(9000), State::ProbeDue);
        h.probe_taken(9000, &p);
        assert_eq!(h.state(9001), State::Down);
        // The probe fails: still down, the mark is not renewed by the failure itself.
        assert_eq!(h.failed(4, 9500, &p), None);
        assert_eq!(h.state(14_000), State::ProbeDue);
        assert!(h.succeeded(14_000));
        assert_eq!(h.state(14_000), State::Up);
        assert!(!h.succeeded(14_000));
    }

    #[test]
    fn an_answer_in_between_clears_the_failures() {
        let p = policy();
        let mut h = Health::default();
        h.failed(1, 1000, &p);
        h.failed(2, 1100, &p);
        h.succeeded(1150);
        assert_eq!(h.failed(3, 1200, &p), None);
        assert_eq!(h.failed(4, 1300, &p), None);
        assert_eq!(h.state(1400), State::Up);
        // Three distinct failures since, but it answered 250 ms ago: not down yet.
        assert_eq!(h.failed(5, 1400, &p), None);
        // A whole quiet period (the 1 s timeout) with no answer: down.
        assert_eq!(h.failed(6, 2150, &p), Some(3));
    }

    /// A rate-limiting upstream: of every four questions one is answered, three are
    /// dropped (time out). It is never marked down, since it keeps answering.
    #[test]
    fn a_server_that_answers_part_of_its_questions_is_never_marked_down() {
        let p = policy();
        let mut h = Health::default();
        h.succeeded(990);
        let mut q = 0;
        for ms in (1000..60_000).step_by(10) {
            q += 1;
            if q % 4 == 0 {
                assert!(!h.succeeded(ms), "never was down");
            } else {
                assert_eq!(h.failed(q, ms, &p), None, "at {ms} ms");
            }
        }
        assert!(h.is_up());
        // When it stops answering altogether, it is marked down within the quiet period.
        let marked = (60_000..62_000)
            .step_by(10)
            .find(|&ms| {
                q += 1;
                h.failed(q, ms, &p).is_some()
            })
            .expect("marked down");
        assert!(marked <= 61_000, "marked at {marked}");
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let p = policy();
        assert_eq!(p.window_ms, 9000);
        let mut h = Health::default();
        h.failed(1, 0, &p);
        h.failed(2, 5000, &p);
        assert_eq!(
            h.failed(3, 9500, &p),
            None,
            "the first fell out of the window"
        );
        assert_eq!(h.failed(4, 10_000, &p), Some(3));
    }

    #[test]
    fn down_after_one_marks_down_on_the_first_failure() {
        let p = Policy::new(1, 1000, 500, 2);
        let mut h = Health::default();
        assert_eq!(h.failed(9, 10, &p), Some(1));
        assert_eq!(h.state(11), State::Down);
        assert_eq!(h.down_until(), 1010);
    }

    #[test]
    fn zero_down_after_is_treated_as_one() {
        let p = Policy::new(0, 1000, 500, 0);
        assert_eq!(p.down_after, 1);
        assert_eq!(p.window_ms, 500);
        let mut h = Health::default();
        assert_eq!(h.failed(9, 0, &p), Some(1));
        assert_eq!(h.state(0), State::Down);
    }
}
