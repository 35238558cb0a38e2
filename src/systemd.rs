//! The daemon's side of the systemd contract: readiness, status, watchdog, reload and stop
//! notifications, and the file-descriptor store that keeps the listening sockets open
//! across restarts and crashes.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is not set, so localdns runs fine without
//! systemd (tests set `NOTIFY_SOCKET` themselves to wait for readiness).
//!
//! Why the fd store: systemd keeps every socket localdns hands it (`FDSTORE=1`) while the
//! service restarts, manually or after a crash with `Restart=always`, and passes them back
//! in `LISTEN_FDS`. Queries that arrive in the gap wait in the kept socket's receive buffer
//! (raised with `SO_RCVBUFFORCE`) and are answered by the next process instead of being
//! dropped; the iptables socket match keeps intercepting because a socket stays open.
//! A `systemctl stop` empties the store, which closes the sockets: then traffic to the
//! Service IP fails open to kube-proxy.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use sd_notify::NotifyState;

/// Sockets handed to us by systemd (`LISTEN_FDS` with `LISTEN_FDNAMES`), by name.
#[derive(Default)]
pub struct Inherited {
    fds: HashMap<String, OwnedFd>,
}

impl Inherited {
    /// Take the descriptors systemd passed, and unset the variables so that nothing started
    /// later sees them. Must run before any thread is started (it changes the environment).
    pub fn receive() -> Inherited {
        let received = match libsystemd::activation::receive_descriptors_with_names(true) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring LISTEN_FDS: {e}");
                return Inherited::default();
            }
        };
        let fds = received
            .into_iter()
            .map(|(fd, name)| (name, adopt(fd.into_raw_fd())))
            .collect();
        Inherited { fds }
    }

    /// Descriptors handed over by the old process ([`crate::handover`]), by name.
    pub fn from_fds(fds: HashMap<String, OwnedFd>) -> Inherited {
        Inherited { fds }
    }

    /// Take the descriptor stored under `name`, if any.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.remove(name)
    }

    /// Ask systemd to forget (and close) every descriptor not taken, then close ours.
    pub fn release_rest(self) {
        for (name, fd) in self.fds {
            tracing::info!(name = %name, "dropping kept socket {name}: the config no longer uses it");
            notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
            drop(fd);
        }
    }
}

/// Own a descriptor received from systemd.
#[allow(unsafe_code)]
fn adopt(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from LISTEN_FDS, validated and marked close-on-exec by libsystemd;
    // systemd opened it for this process and nothing else here owns it: the variables were
    // unset as they were read, so it is adopted exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Ask systemd to close the sockets it keeps under `names` (those not kept are ignored).
pub fn forget<'a>(names: impl IntoIterator<Item = &'a str>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for name in names {
        notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
}

/// Hand a socket to systemd's fd store under `name`, so it survives a restart.
pub fn store(name: &str, fd: BorrowedFd<'_>) {
    if let Err(e) = sd_notify::notify_with_fds(
        false,
        &[NotifyState::FdStore, NotifyState::FdName(name)],
        &[fd],
    ) {
        tracing::warn!(error = %e, name, "cannot hand socket {name} to systemd's fd store: {e}");
    }
}

/// Store every socket in `sockets` under its name.
pub fn store_all<'a>(sockets: impl IntoIterator<Item = (&'a str, BorrowedFd<'a>)>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for (name, fd) in sockets {
        store(name, fd);
    }
}

/// Tell systemd every listener is bound and the node setup is in place.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload has begun (`READY=1` follows when it is over, good or bad).
pub fn reloading() {
    notify(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading configuration"),
    ]);
}

/// Update the one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Make `pid` the unit's main process (the new process of a hand-over).
pub fn main_pid(pid: u32) {
    notify(&[NotifyState::MainPid(pid)]);
}

/// Tell systemd a stop has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Keep-alive for `WatchdogSec=`.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// The watchdog interval systemd expects pings within, if enabled for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed: {e}");
    }
}

/// What a SIGTERM means for the node, as far as systemd's job for the unit tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A real stop (`systemctl stop`, shutdown, package removal): the Service IP goes back
    /// to kube-proxy, so the rules go before the sockets stop being read.
    Final(String),
    /// A restart follows (a restart job, or a SIGTERM sent by hand with `Restart=always`
    /// to bring it back): the link, rules and kept sockets stay for the next process.
    Restart(String),
    /// Not a systemd service (run by hand or by a test): nothing is decided here.
    Unmanaged,
}

/// The unit this process runs in, from its cgroup (`0::/system.slice/localdns.service`),
/// when systemd started it as a service (`INVOCATION_ID` is set).
pub fn own_unit() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .rsplit('/')
        .find(|c| c.ends_with(".service"))
        .map(str::to_owned)
}

/// Ask systemd which job is running for our unit while it stops us, exactly as the
/// `stop-post` hook does for teardown: `restart`-type jobs and no job at all (a SIGTERM
/// sent by hand, `Restart=always` brings the daemon back) keep everything; any other job,
/// or no answer, is a final stop. Bounded to 2 s.
pub fn stop_kind() -> Stop {
    let Some(unit) = own_unit() else {
        return Stop::Unmanaged;
    };
    let listed = crate::process::run_bounded(
        "systemctl",
        &["list-jobs", "--no-legend", "--plain", "--full", &unit],
        None,
        Duration::from_secs(2),
    );
    match listed {
        Ok(Some((0, out, _))) => job_meaning(&unit, &out),
        Ok(Some((code, _, err))) => Stop::Final(format!(
            "cannot ask systemd for the job of {unit} (exit {code}: {})",
            err.trim()
        )),
        Ok(None) => Stop::Final(format!("systemd did not say the job of {unit} within 2s")),
        Err(e) => Stop::Final(format!("cannot run systemctl: {e}")),
    }
}

/// `systemctl list-jobs --no-legend --plain --full UNIT` lines are `ID UNIT TYPE STATE`.
fn job_meaning(unit: &str, listing: &str) -> Stop {
    let job = listing.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, u, t) = (f.next()?, f.next()?, f.next()?);
        (u == unit).then(|| t.to_owned())
    });
    match job.as_deref() {
        None => Stop::Restart("no stop job (a signal sent by hand): a restart follows".into()),
        Some(t @ ("restart" | "try-restart" | "reload-or-restart" | "reload-or-try-restart")) => {
            Stop::Restart(format!("{t} job"))
        }
        Some(t) => Stop::Final(format!("{t} job")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_comes_from_the_cgroup() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/localdns.service\n").as_deref(),
            Some("localdns.service")
        );
        assert_eq!(unit_of_cgroup("0::/user.slice/session-1.scope\n"), None);
        assert_eq!(unit_of_cgroup("1:name=x:/\n"), None);
    }

    #[test]
    fn jobs_tell_a_stop_from_a_restart() {
        let u = "localdns.service";
        let line = |t: &str| format!("1234 localdns.service {t} running\n");
        assert!(matches!(job_meaning(u, &line("stop")), Stop::Final(_)));
        assert!(matches!(job_meaning(u, &line("restart")), Stop::Restart(_)));
        assert!(matches!(
            job_meaning(u, &line("try-restart")),
            Stop::Restart(_)
        ));
        assert!(matches!(job_meaning(u, ""), Stop::Restart(_)));
        // Another unit's stop job is not ours.
        assert!(matches!(
            job_meaning(u, "9 kubelet.service stop running\n"),
            Stop::Restart(_)
        ));
    }
}
