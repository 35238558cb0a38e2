//! The daemon's life cycle across processes: which phase the unit's last process reached,
//! the failed starts and crashes that follow one another, and the brake on restarts that
//! they call for.
//!
//! The unit restarts at once (`RestartSec=0`: a crash must cost milliseconds of DNS, not a
//! restart delay), and `RestartPreventExitStatus=` does not apply to `ExecStartPre=`, so a
//! start that fails every time (a config error with no last good config, a port another
//! program holds) would restart dozens of times a second and run setup and teardown against
//! kube-proxy's xtables lock each time. The record in `$RUNTIME_DIRECTORY/lifecycle` says
//! how far the last process got:
//!
//! | phase | written by | a start that finds it follows |
//! |---|---|---|
//! | `starting` | `setup` (`ExecStartPre=`), first thing | a start that failed before READY |
//! | `serving` | `run`, when READY is sent | a crash (or a kill) while serving |
//! | `stopped` | `run`, after a clean stop | a stop or restart someone asked for |
//!
//! The first failure restarts at once; from the second within [`WINDOW`], each start waits
//! twice as long as the one before ([`brake`]: 2 s, 4 s, 8 s ... at most [`MAX_BRAKE`]).
//! A start after a clean stop, or after the config files changed since the last failure
//! (someone fixed them), is never braked. [`Record`] is the pure state machine; [`begin`],
//! [`serving`] and [`stopped`] read and write it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state::{runtime_dir, write_atomic};

/// Failures older than this are forgotten: a daemon that served for that long and then
/// crashed restarts at once.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The wait before the start that follows two failures in a row; doubled for each more.
pub const FIRST_BRAKE: Duration = Duration::from_secs(2);
pub const MAX_BRAKE: Duration = Duration::from_secs(30);
const FILE: &str = "lifecycle";

/// How far the unit's last process got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Setup began; READY was not sent (yet).
    Starting,
    /// READY was sent; no clean stop since.
    Serving,
    /// The last process stopped cleanly (or there was none).
    Stopped,
}

impl Phase {
    fn word(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Stopped => "stopped",
        }
    }
}

/// The record: the phase and the times (ms since the epoch) of the recent failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    pub failures: Vec<u64>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            phase: Phase::Stopped,
            failures: Vec::new(),
        }
    }
}

/// What a start that begins now is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Wait this long before setting up (zero: go).
    pub wait: Duration,
    /// Failures in a row within [`WINDOW`], this one's predecessor included.
    pub failures: usize,
    /// What the last process did, for the journal (`None` after a clean stop).
    pub after: Option<&'static str>,
    /// The config changed since the last failure, so no brake.
    pub config_changed: bool,
}

/// The wait before a start that follows `failures` failures in a row.
pub fn brake(failures: usize) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => FIRST_BRAKE
            .saturating_mul(1u32 << (n - 2).min(16))
            .min(MAX_BRAKE),
    }
}

impl Record {
    pub fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("phase", "starting")) => r.phase = Phase::Starting,
                Some(("phase", "serving")) => r.phase = Phase::Serving,
                Some(("phase", _)) => r.phase = Phase::Stopped,
                Some(("failure", t)) => r.failures.extend(t.trim().parse::<u64>().ok()),
                _ => {}
            }
        }
        r
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "# localdns's life cycle, for the restart brake (src/lifecycle.rs).\nphase={}\n",
            self.phase.word()
        );
        for t in &self.failures {
            out.push_str(&format!("failure={t}\n"));
        }
        out
    }

    /// A start begins at `now` (ms); `config_mtime` is when the config files last changed.
    /// Counts the last process's failure, if it failed, and decides the brake.
    pub fn begin(&mut self, now: u64, config_mtime: Option<u64>) -> Start {
        let window = WINDOW.as_millis() as u64;
        self.failures.retain(|&t| t <= now && now - t < window);
        let after = match self.phase {
            Phase::Stopped => None,
            Phase::Starting => Some("a start that failed before it was ready"),
            Phase::Serving => Some("a crash while serving"),
        };
        let last_failure = self.failures.last().copied();
        let config_changed = matches!((config_mtime, last_failure), (Some(m), Some(f)) if m > f);
        if after.is_some() {
            self.failures.push(now);
        } else {
            // Asked for: a clean stop ends a run of failures.
            self.failures.clear();
        }
        self.phase = Phase::Starting;
        let failures = self.failures.len();
        Start {
            wait: if config_changed {
                Duration::ZERO
            } else {
                brake(failures)
            },
            failures,
            after,
            config_changed,
        }
    }

    /// READY was sent.
    pub fn serving(&mut self) {
        self.phase = Phase::Serving;
    }

    /// The process stopped cleanly.
    pub fn stopped(&mut self) {
        self.phase = Phase::Stopped;
        self.failures.clear();
    }
}

/// The signals the daemon acts on, caught from the first instruction of `localdns run`:
/// [`hold`] blocks them in `main` before anything else, [`Signals::catch`] installs the
/// handlers once the runtime exists and unblocks them, so that a SIGTERM or a SIGHUP
/// (`systemctl reload` right after READY) that comes during the start waits for its
/// handler instead of killing the process by the default action.
pub mod signals {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    use tokio::signal::unix::{signal, SignalKind};

    const HELD: [Signal; 4] = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ];

    fn set() -> SigSet {
        let mut s = SigSet::empty();
        for sig in HELD {
            s.add(sig);
        }
        s
    }

    /// Block SIGTERM, SIGINT, SIGHUP and SIGUSR2 on this thread (and the threads it starts). Call
    /// first in `main`, before any thread exists. Programs run later start with an empty
    /// mask (the standard library resets it in the child).
    pub fn hold() {
        if let Err(e) = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set()), None)
        {
            tracing::warn!("cannot hold signals during the start: {e}");
        }
    }

    /// The daemon's signal streams.
    pub struct Signals {
        pub term: tokio::signal::unix::Signal,
        pub int: tokio::signal::unix::Signal,
        pub hup: tokio::signal::unix::Signal,
        /// Hand over to a new process (`localdns handover`, [`crate::handover`]).
        pub usr2: tokio::signal::unix::Signal,
    }

    impl Signals {
        /// Install the handlers (inside the runtime), then let held signals in: one that
        /// came meanwhile is delivered to its stream now.
        pub fn catch() -> std::io::Result<Signals> {
            let s = Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
                usr2: signal(SignalKind::user_defined2())?,
            };
            nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set()), None)
                .map_err(std::io::Error::from)?;
            Ok(s)
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn update<T>(dir: &Path, f: impl FnOnce(&mut Record) -> T) -> T {
    let path = dir.join(FILE);
    let mut r = Record::parse(&std::fs::read_to_string(&path).unwrap_or_default());
    let out = f(&mut r);
    if let Err(e) = write_atomic(&path, r.render().as_bytes()) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
    out
}

/// `setup` begins (under systemd only: `$RUNTIME_DIRECTORY`). `config_mtime` (seconds
/// since the epoch, as file times are) is when the config files last changed.
pub fn begin(config_mtime: Option<SystemTime>) -> Option<Start> {
    let dir = runtime_dir()?;
    let mtime = config_mtime
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    Some(update(&dir, |r| r.begin(now_ms(), mtime)))
}

/// `run` sent READY.
pub fn serving() {
    if let Some(dir) = runtime_dir() {
        update(&dir, Record::serving);
    }
}

/// `run` stopped cleanly.
pub fn stopped() {
    if let Some(dir) = runtime_dir() {
        update(&dir, Record::stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    #[test]
    fn the_brake_doubles_from_the_second_failure_and_is_capped() {
        assert_eq!(brake(0), Duration::ZERO);
        assert_eq!(brake(1), Duration::ZERO);
        assert_eq!(brake(2), Duration::from_secs(2));
        assert_eq!(brake(3), Duration::from_secs(4));
        assert_eq!(brake(5), Duration::from_secs(16));
        assert_eq!(brake(6), MAX_BRAKE);
        assert_eq!(brake(10_000), MAX_BRAKE);
    }

    #[test]
    fn a_clean_stop_is_never_braked_and_clears_the_failures() {
        let mut r = Record {
            phase: Phase::Stopped,
            failures: vec![S, 2 * S, 3 * S],
        };
        let s = r.begin(4 * S, None);
        assert_eq!((s.wait, s.failures, s.after), (Duration::ZERO, 0, None));
        assert_eq!(r.phase, Phase::Starting);
    }

    #[test]
    fn one_crash_restarts_at_once_and_a_second_in_a_row_waits() {
        let mut r = Record::default();
        r.begin(0, None);
        r.serving();
        let s = r.begin(10 * S, None);
        assert_eq!((s.wait, s.failures), (Duration::ZERO, 1));
        assert_eq!(s.after, Some("a crash while serving"));
        // It fails again before READY.
        let s = r.begin(10 * S + 50, None);
        assert_eq!((s.wait, s.failures), (Duration::from_secs(2), 2));
        assert_eq!(s.after, Some("a start that failed before it was ready"));
    }

    /// A start failing every time, each attempt taking 50 ms besides its brake: how many
    /// restarts fit in 8 s (issue 17's target: at most 5).
    #[test]
    fn a_start_that_always_fails_restarts_at_most_5_times_in_8_s() {
        let mut r = Record::default();
        let mut now = 0;
        let mut restarts = 0;
        r.begin(now, None);
        loop {
            now += 50; // the attempt fails
            let s = r.begin(now, None);
            now += s.wait.as_millis() as u64;
            if now > 8 * S {
                break;
            }
            restarts += 1;
        }
        assert!(restarts <= 5, "{restarts} restarts in 8 s");
        assert!(
            restarts >= 3,
            "{restarts}: braked too hard for a crash loop"
        );
    }

    #[test]
    fn old_failures_are_forgotten() {
        let window = WINDOW.as_millis() as u64;
        let mut r = Record {
            phase: Phase::Serving,
            failures: vec![0, 1, 2, 3],
        };
        let s = r.begin(window + 10, None);
        assert_eq!((s.wait, s.failures), (Duration::ZERO, 1));
        // Times ahead of now (the clock stepped back) are dropped too.
        let mut r = Record {
            phase: Phase::Starting,
            failures: vec![50 * S, 60 * S],
        };
        assert_eq!(r.begin(10 * S, None).failures, 1);
    }

    #[test]
    fn a_config_fixed_since_the_last_failure_is_not_braked() {
        let mut r = Record {
            phase: Phase::Starting,
            failures: vec![S, 2 * S, 3 * S],
        };
        let s = r.begin(4 * S, Some(3 * S + 500));
        assert!(s.config_changed);
        assert_eq!(s.wait, Duration::ZERO);
        // Not changed since: braked.
        let mut r = Record {
            phase: Phase::Starting,
            failures: vec![S, 2 * S, 3 * S],
        };
        let s = r.begin(4 * S, Some(2 * S));
        assert!(!s.config_changed);
        assert_eq!(s.wait, brake(4));
    }

    #[test]
    fn the_record_reads_back_what_it_wrote() {
        let r = Record {
            phase: Phase::Serving,
            failures: vec![5, 6],
        };
        assert_eq!(Record::parse(&r.render()), r);
        assert_eq!(Record::parse("garbage\nfailure=x\n"), Record::default());
    }
}
