//! The status file: what the last sync did, read by the readiness probe
//! (`localdns config-sync --probe`). Kubernetes shows the probe's output in the pod's
//! events, so a refused ConfigMap is explained by `kubectl describe pod` with the file,
//! line and reason.
//!
//! Format (one item a line): the state, the message, `syncs N` (a counter tests wait on).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, nothing synced yet.
    Starting,
    /// The node has what the ConfigMap says (or a newer config-sync looks after it).
    Ready,
    /// The node is outside the ConfigMap's rollout stage: `conf.d` keeps the version it
    /// has (ready: this is where the operator wants it).
    Waiting,
    /// What the ConfigMap says was refused: nothing was written.
    Refused,
    /// The ConfigMap or the host's files could not be read or written.
    Error,
    /// Stopped; its files were removed.
    Stopped,
}

impl State {
    const ALL: [State; 6] = [
        State::Starting,
        State::Ready,
        State::Waiting,
        State::Refused,
        State::Error,
        State::Stopped,
    ];

    /// Whether the readiness probe passes.
    pub fn ready(self) -> bool {
        matches!(self, State::Ready | State::Waiting)
    }

    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Waiting => "waiting",
            State::Refused => "refused",
            State::Error => "error",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub message: String,
    pub syncs: u64,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line for the message, whatever it holds.
        let message = self.message.replace('\n', " ");
        writeln!(f, "{}\n{message}\nsyncs {}", self.state.name(), self.syncs)
    }
}

impl Status {
    pub fn parse(text: &str) -> Option<Status> {
        let mut lines = text.lines();
        let state = lines.next()?;
        let state = *State::ALL.iter().find(|s| s.name() == state)?;
        let message = lines.next()?.to_owned();
        let syncs = lines.next()?.strip_prefix("syncs ")?.parse().ok()?;
        Some(Status {
            state,
            message,
            syncs,
        })
    }

    /// The probe's verdict: ready or not, and what to print.
    pub fn probe(text: Option<&str>) -> Result<String, String> {
        match text.map(Status::parse) {
            None => Err("no status file yet: config-sync has not started".into()),
            Some(None) => Err("the status file is not config-sync's".into()),
            Some(Some(s)) if s.state.ready() => Ok(s.message),
            Some(Some(s)) => Err(format!("{}: {}", s.state.name(), s.message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_the_probe_passes_only_when_ready() {
        for state in State::ALL {
            let s = Status {
                state,
                message: "a\nb".into(),
                syncs: 3,
            };
            let back = Status::parse(&s.to_string()).unwrap();
            assert_eq!(back.message, "a b");
            assert_eq!((back.state, back.syncs), (state, 3));
            let verdict = Status::probe(Some(&s.to_string()));
            assert_eq!(
                verdict.is_ok(),
                matches!(state, State::Ready | State::Waiting),
                "{verdict:?}"
            );
        }
        let refused = "refused\n/cm/x.toml:2: key `cache.max_ttl`: bad\nsyncs 1\n";
        assert_eq!(
            Status::probe(Some(refused)),
            Err("refused: /cm/x.toml:2: key `cache.max_ttl`: bad".into())
        );
        assert!(Status::probe(None).is_err());
        assert!(Status::probe(Some("ready\n")).is_err());
    }
}
