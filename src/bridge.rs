//! The bridge across `systemctl restart`: a process outside the unit that serves while the
//! unit stops and starts again.
//!
//! A restart is a stop and then a start: systemd waits for the old process to exit, runs
//! `ExecStopPost=`, `ExecStartPre=` and `ExecStart=`, and only then does a process read the
//! sockets again. The kept sockets hold the queries, but the slowest waits 150-350 ms on a
//! busy node. A hand-over ([`crate::handover`]) has no gap, but it needs the old process to
//! stay until the new one reads, and systemd kills everything in the unit's cgroup once the
//! main process of a stop has exited. So, when the stop is one of a restart:
//!
//! 1. the old process writes its cache snapshot and starts this binary again through
//!    `systemd-run --scope`, which puts it in a scope unit of its own
//!    (`localdns-bridge-PID.scope`) before it execs: out of the cgroup the stop empties;
//! 2. the descriptors and the snapshot go to it as in a hand-over; it restores the cache,
//!    reads the sockets, writes `$RUNTIME_DIRECTORY/bridge.PID` and says READY;
//! 3. the old process stops as before and the unit restarts as before; the bridge answers
//!    hits from the snapshot and misses through the upstreams meanwhile;
//! 4. the new main process, once it reads the sockets (after READY=1), sends SIGTERM to
//!    every bridge named in the runtime directory; the bridge answers what it has in
//!    flight and exits. A bridge nobody dismisses exits after [`LIFETIME`].
//!
//! The bridge touches nothing of the node and nothing systemd keeps: no setup, no repair,
//! no rules, no fd store, no snapshot writes, no notifications (it has no `NOTIFY_SOCKET`),
//! no HTTP endpoint (the kept HTTP listener queues connections for the new process). Any
//! failure to start it leaves the restart as it was without it.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set in the bridge's environment by the old process.
const ENV: &str = "LOCALDNS_BRIDGE";
/// How long the old process waits for the bridge to read the sockets. Short: the stop
/// waits for it, and a restart without a bridge is still a good restart.
const READY_WITHIN: Duration = Duration::from_secs(2);
/// A bridge that no new main process dismissed exits after this (a start that keeps
/// failing gives the addresses back to kube-proxy meanwhile, see [`crate::lifecycle`]).
pub const LIFETIME: Duration = Duration::from_secs(30);
/// The prefix of the bridge's scope unit, and of its file in the runtime directory.
const SCOPE: &str = "localdns-bridge-";
const FILE: &str = "bridge.";

static BRIDGE: AtomicBool = AtomicBool::new(false);

/// Whether this process is a bridge.
pub fn is_bridge() -> bool {
    BRIDGE.load(Ordering::Relaxed)
}

/// Read (and unset) whether this process was started as a bridge. A bridge also loses the
/// variables that would let it talk to systemd as the unit's process. Must run before any
/// thread starts (it changes the environment).
pub fn take_role() -> bool {
    let bridge = std::env::var_os(ENV).is_some();
    if bridge {
        for var in [ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        BRIDGE.store(true, Ordering::Relaxed);
    }
    bridge
}

/// The old process's side: start the bridge on `fds` and wait until it reads them.
/// Returns its PID.
pub fn start(fds: &[(String, BorrowedFd<'_>)]) -> Result<u32, crate::handover::Error> {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| "/usr/bin/localdns".into());
    let mut cmd = Command::new("systemd-run");
    cmd.arg("--scope")
        .arg("--quiet")
        .arg("--collect")
        .arg(format!("--unit={SCOPE}{}", std::process::id()))
        .arg("--description=localdns serving across a restart of its unit")
        // The unit's own limit, so that the two together stay as bounded as one process
        // was; the old process is gone soon after.
        .arg("--property=MemoryMax=256M")
        .arg("--")
        .arg(program)
        .args(args)
        .env(ENV, "1");
    let out = crate::handover::start_with(cmd, fds, READY_WITHIN)?;
    let pid = out.pid();
    out.confirm()?;
    Ok(pid)
}

/// The bridge's side, once it reads the sockets: say where it is, so that the new main
/// process finds it.
pub fn register() {
    if let Some(dir) = crate::state::runtime_dir() {
        let path = dir.join(format!("{FILE}{}", std::process::id()));
        if let Err(e) = std::fs::write(&path, b"") {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}

/// The bridge's side, on its way out.
pub fn unregister() {
    if let Some(dir) = crate::state::runtime_dir() {
        let _ = std::fs::remove_file(dir.join(format!("{FILE}{}", std::process::id())));
    }
}

/// The new main process's side, once it reads the sockets: tell every bridge to stop.
/// Only a process in a bridge scope is signalled (a PID in a stale file may be another
/// program's by now).
pub fn dismiss() {
    let Some(dir) = crate::state::runtime_dir() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FILE))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if in_bridge_scope(Path::new(&format!("/proc/{pid}/cgroup"))) {
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            ) {
                Ok(()) => tracing::info!(
                    "process {pid} served across the restart; told to stop now that this one reads the sockets"
                ),
                Err(e) => tracing::warn!("cannot stop the bridge process {pid}: {e}"),
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

fn in_bridge_scope(cgroup_file: &Path) -> bool {
    std::fs::read_to_string(cgroup_file).is_ok_and(|text| is_bridge_cgroup(&text))
}

/// `/proc/PID/cgroup` text of a process in a bridge scope.
fn is_bridge_cgroup(text: &str) -> bool {
    text.lines().any(|l| {
        l.rsplit('/')
            .next()
            .is_some_and(|leaf| leaf.starts_with(SCOPE) && leaf.ends_with(".scope"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bridge_scope_is_a_bridge() {
        assert!(is_bridge_cgroup(
            "0::/system.slice/localdns-bridge-4242.scope\n"
        ));
        assert!(!is_bridge_cgroup("0::/system.slice/localdns.service\n"));
        assert!(!is_bridge_cgroup(
            "0::/user.slice/user-0.slice/session-1.scope\n"
        ));
        // A scope whose parent has the name is not one.
        assert!(!is_bridge_cgroup(
            "0::/localdns-bridge-1.scope/other.service\n"
        ));
        assert!(!is_bridge_cgroup(""));
    }
}
