//! When a burst of netfilter change events has ended, so that one check covers it.
//!
//! kube-proxy rewrites its chains up to once a second, and one `iptables-restore` or an
//! agent's few `iptables -I` calls arrive as several notification batches a few
//! milliseconds apart. Checking on each would read the same tables several times per
//! sync. So a check waits until the events have been quiet for [`QUIET`], but never
//! longer than [`MAX_DELAY`] after the first event of the burst: an agent that changes
//! something every few milliseconds cannot hold the check off, and a rule removed in the
//! middle of a storm is put back within [`MAX_DELAY`] plus one check. Both are capped at
//! the rules check interval, so a short interval is never made slower by the debounce.
//!
//! Pure: the caller passes the clock in and sleeps until [`Debounce::due`].

use std::time::{Duration, Instant};

/// How long the events must be quiet before the check runs.
pub const QUIET: Duration = Duration::from_millis(50);
/// The longest a check waits after the first event of a burst.
pub const MAX_DELAY: Duration = Duration::from_millis(300);

/// The events of the burst under way, and what they named.
#[derive(Debug, Clone)]
pub struct Debounce<T> {
    quiet: Duration,
    max_delay: Duration,
    /// First and last event of the burst under way (`None`: no burst).
    burst: Option<(Instant, Instant)>,
    /// What the events of the burst named, each once, in order of arrival.
    named: Vec<T>,
}

impl<T: PartialEq> Debounce<T> {
    /// `interval`: the rules check interval, which caps both delays.
    pub fn new(interval: Duration) -> Debounce<T> {
        Debounce {
            quiet: QUIET.min(interval),
            max_delay: MAX_DELAY.min(interval),
            burst: None,
            named: Vec::new(),
        }
    }

    /// An event at `now` that named `what`.
    pub fn event(&mut self, now: Instant, what: impl IntoIterator<Item = T>) {
        let first = self.burst.map_or(now, |(first, _)| first);
        self.burst = Some((first, now));
        for w in what {
            if !self.named.contains(&w) {
                self.named.push(w);
            }
        }
    }

    /// When the check for the burst under way is due; `None` without one.
    pub fn due(&self) -> Option<Instant> {
        self.burst
            .map(|(first, last)| (last + self.quiet).min(first + self.max_delay))
    }

    /// At `now`, when the check is due: what the burst named (the burst is over).
    pub fn take(&mut self, now: Instant) -> Option<Vec<T>> {
        if self.due()? > now {
            return None;
        }
        self.burst = None;
        Some(std::mem::take(&mut self.named))
    }

    /// A check of everything ran (the periodic one): it covered the burst so far.
    pub fn covered(&mut self) {
        self.burst = None;
        self.named.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_is_due_without_events() {
        let mut d = Debounce::<&str>::new(SECOND);
        assert_eq!(d.due(), None);
        assert_eq!(d.take(Instant::now()), None);
    }

    #[test]
    fn one_event_is_checked_after_the_quiet_window() {
        let t0 = Instant::now();
        let mut d = Debounce::new(SECOND);
        d.event(t0, ["filter"]);
        assert_eq!(d.due(), Some(t0 + QUIET));
        assert_eq!(d.take(t0 + QUIET - MS), None);
        assert_eq!(d.take(t0 + QUIET), Some(vec!["filter"]));
        // The burst is over.
        assert_eq!(d.due(), None);
        assert_eq!(d.take(t0 + SECOND), None);
    }

    #[test]
    fn each_event_moves_the_check_later_within_the_max_delay() {
        let t0 = Instant::now();
        let mut d = Debounce::new(SECOND);
        d.event(t0, ["filter"]);
        d.event(t0 + 30 * MS, ["raw"]);
        assert_eq!(d.due(), Some(t0 + 80 * MS));
        d.event(t0 + 70 * MS, ["filter"]);
        assert_eq!(d.due(), Some(t0 + 120 * MS));
        assert_eq!(d.take(t0 + 119 * MS), None);
        // Each table once, in order of arrival.
        assert_eq!(d.take(t0 + 120 * MS), Some(vec!["filter", "raw"]));
    }

    #[test]
    fn a_storm_cannot_hold_the_check_off_past_the_max_delay() {
        let t0 = Instant::now();
        let mut d = Debounce::new(SECOND);
        // An event every 10 ms for a second: the check is due MAX_DELAY after the first.
        let mut checks = Vec::new();
        for i in 0..100u32 {
            let now = t0 + 10 * i * MS;
            if let Some(named) = d.take(now) {
                checks.push((now - t0, named));
            }
            d.event(now, [i % 2]);
            assert!(d.due().unwrap() <= now + QUIET);
        }
        assert_eq!(checks.len(), 3, "{checks:?}");
        assert_eq!(checks[0], (MAX_DELAY, vec![0, 1]));
        // The event at the check starts the next burst.
        assert_eq!(checks[1].0, 2 * MAX_DELAY);
    }

    #[test]
    fn both_delays_are_capped_at_the_check_interval() {
        let t0 = Instant::now();
        let mut d = Debounce::new(20 * MS);
        d.event(t0, ["raw"]);
        assert_eq!(d.due(), Some(t0 + 20 * MS));
        d.event(t0 + 15 * MS, ["raw"]);
        assert_eq!(d.due(), Some(t0 + 20 * MS), "max delay capped too");
        let mut d = Debounce::new(200 * MS);
        d.event(t0, ["raw"]);
        d.event(t0 + 190 * MS, ["raw"]);
        assert_eq!(d.due(), Some(t0 + 200 * MS));
    }

    #[test]
    fn a_periodic_check_covers_the_burst_under_way() {
        let t0 = Instant::now();
        let mut d = Debounce::new(SECOND);
        d.event(t0, ["filter"]);
        d.covered();
        assert_eq!(d.due(), None);
        assert_eq!(d.take(t0 + SECOND), None);
        d.event(t0 + 2 * SECOND, ["raw"]);
        assert_eq!(d.take(t0 + 3 * SECOND), Some(vec!["raw"]));
    }
}
