//! The warm hand-over to a new process (`localdns handover`, SIGUSR2 to the daemon): the
//! package upgrade path, with no gap in serving.
//!
//! A restart (`systemctl restart`, the package scripts before this) stops the old process
//! before the new one starts: the kept sockets hold the queries, but they wait for the
//! stop, the hooks and the start, 150-350 ms on a busy node. Here the old process starts the
//! new binary itself, as nginx's binary upgrade and HAProxy's socket transfer do, and both
//! read the same sockets for a moment:
//!
//! 1. the old process writes its cache snapshot, then starts `argv[0]` with its own
//!    arguments and one end of a `SOCK_SEQPACKET` pair as [`ENV`];
//! 2. it sends, one message each, the name and descriptor of every listening socket, the
//!    HTTP listener and the snapshot's memfd (the same names as in systemd's fd store),
//!    then [`END`];
//! 3. the new process takes them as it takes the fd store's after a restart (its setup of
//!    this invocation is found done), restores the snapshot, starts reading, and says
//!    [`READY`];
//! 4. the old process tells systemd `MAINPID=` the new one and says [`MAIN`]; the new one
//!    sends READY=1 (now from the main PID) and pings the watchdog from then on;
//! 5. the old process stops reading, answers the misses it has in flight, and exits
//!    without touching the link, the rules or the fd store.
//!
//! Whatever fails before step 4 (the new binary does not start, refuses, dies, or is not
//! ready within [`READY_WITHIN`]) leaves the old process serving, as if nothing had been
//! asked; the new one is killed. systemd sees one service that never stopped: no
//! `ExecStopPost=`, no `ExecStartPre=`, no restart counted.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The variable that gives the new process its end of the channel (a descriptor number).
pub const ENV: &str = "LOCALDNS_HANDOVER_FD";
/// The descriptor number the channel has in the new process.
const CHILD_FD: RawFd = 3;
/// The old process's last message of descriptors.
const END: &[u8] = b"END";
/// The new process reads the sockets.
const READY: &[u8] = b"READY";
/// The new process is the unit's main process now.
const MAIN: &[u8] = b"MAIN";
/// How long the new process may take from its start to [`READY`].
pub const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long the new process waits for [`MAIN`] after [`READY`].
const MAIN_WITHIN: Duration = Duration::from_secs(5);
/// Longest socket name sent.
const NAME_MAX: usize = 256;

/// The file in `$RUNTIME_DIRECTORY` in which a daemon that can hand over writes its PID.
/// `localdns handover` signals only a main process named there: SIGUSR2 would kill a
/// daemon of a version from before hand-overs (the upgrade from it restarts instead).
const MARKER: &str = "handover";

/// Say that this process takes SIGUSR2 as a hand-over (under systemd only).
pub fn advertise() {
    if let Some(dir) = crate::state::runtime_dir() {
        let path = dir.join(MARKER);
        let pid = format!("{}\n", std::process::id());
        if let Err(e) = crate::state::write_atomic(&path, pid.as_bytes()) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}

/// Why a hand-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("channel to the new process: {0}")]
    Channel(#[from] nix::Error),
    #[error("the new process {0}")]
    Child(String),
}

/// The new process's side, after the descriptors came.
pub struct Incoming {
    channel: OwnedFd,
}

/// If this process was started by a hand-over, take the descriptors the old process sends
/// (by name) and unset [`ENV`]. Must run before any thread starts (it changes the
/// environment). `Err` when the channel is there but broken: the old process then goes on
/// serving, and this one should exit.
pub fn receive() -> Option<io::Result<(HashMap<String, OwnedFd>, Incoming)>> {
    let fd: RawFd = std::env::var(ENV).ok()?.parse().ok()?;
    std::env::remove_var(ENV);
    // SAFETY: the old process put its end of the pair at this number for us, and nothing
    // else in this process has taken it (the variable is read once, and unset).
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(read_descriptors(&channel).map(|fds| (fds, Incoming { channel })))
}

fn read_descriptors(channel: &OwnedFd) -> io::Result<HashMap<String, OwnedFd>> {
    set_timeout(channel, READY_WITHIN)?;
    let mut fds = HashMap::new();
    loop {
        let mut name = [0u8; NAME_MAX];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut name)];
        let msg = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut got = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                for r in received {
                    // SAFETY: the kernel just installed this descriptor in this process
                    // for this message; nothing else refers to it.
                    let owned = unsafe { OwnedFd::from_raw_fd(r) };
                    got.get_or_insert(owned);
                }
            }
        }
        let n = msg.bytes;
        let name = &name[..n];
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the old process closed the channel",
            ));
        }
        if name == END {
            return Ok(fds);
        }
        if let Some(fd) = got {
            fds.insert(String::from_utf8_lossy(name).into_owned(), fd);
        }
    }
}

impl Incoming {
    /// Say the sockets are read, and wait until the old process made this one the unit's
    /// main process (then systemd accepts READY=1 and the watchdog from it).
    pub fn ready(self) -> io::Result<()> {
        send_word(&self.channel, READY)?;
        set_timeout(&self.channel, MAIN_WITHIN)?;
        let mut buf = [0u8; 16];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let n = recvmsg::<()>(self.channel.as_raw_fd(), &mut iov, None, MsgFlags::empty())?.bytes;
        if &buf[..n] == MAIN {
            Ok(())
        } else {
            Err(io::Error::other("the old process did not hand over"))
        }
    }
}

/// The old process's side: start the new process and give it `fds`. Returns once the new
/// process reads the sockets; [`Outgoing::confirm`] then makes it the main process.
pub fn start(fds: &[(String, BorrowedFd<'_>)]) -> Result<Outgoing, Error> {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| "/usr/bin/localdns".into());
    let mut cmd = Command::new(&program);
    cmd.args(args);
    start_with(cmd, fds, READY_WITHIN)
}

/// Start `cmd` (which runs this binary with this process's arguments, perhaps through a
/// wrapper that execs it) as the receiving side, give it `fds`, and wait at most
/// `ready_within` for it to read the sockets.
pub(crate) fn start_with(
    mut cmd: Command,
    fds: &[(String, BorrowedFd<'_>)],
    ready_within: Duration,
) -> Result<Outgoing, Error> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.env(ENV, CHILD_FD.to_string())
        // systemd gave the watchdog to this PID; the new one takes it over with MAINPID=.
        .env_remove("WATCHDOG_PID");
    let their_fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and fcntl on a
    // descriptor this process owns.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if their_fd == CHILD_FD {
                nix::fcntl::fcntl(
                    BorrowedFd::borrow_raw(their_fd),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            } else if nix::libc::dup2(their_fd, CHILD_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|source| Error::Spawn { program, source })?;
    drop(theirs);
    let mut out = Outgoing {
        channel: ours,
        child: Some(child),
    };
    out.send(fds)?;
    out.wait_ready(ready_within)?;
    Ok(out)
}

/// A new process that reads the sockets and waits for [`Outgoing::confirm`]; dropped
/// without it, the new process is killed.
pub struct Outgoing {
    channel: OwnedFd,
    child: Option<Child>,
}

impl Outgoing {
    fn send(&self, fds: &[(String, BorrowedFd<'_>)]) -> Result<(), Error> {
        for (name, fd) in fds {
            let raw = [fd.as_raw_fd()];
            sendmsg::<()>(
                self.channel.as_raw_fd(),
                &[io::IoSlice::new(name.as_bytes())],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )?;
        }
        send_word(&self.channel, END)?;
        Ok(())
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), Error> {
        set_timeout(&self.channel, within).map_err(|e| Error::Child(e.to_string()))?;
        let mut buf = [0u8; 16];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let n = match recvmsg::<()>(self.channel.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
            Ok(m) => m.bytes,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(Error::Child(format!("was not ready within {within:?}")))
            }
            Err(e) => return Err(e.into()),
        };
        if &buf[..n] == READY {
            return Ok(());
        }
        let status = self.child.as_mut().and_then(|c| c.wait().ok());
        Err(Error::Child(match status {
            Some(s) => format!("exited before it was ready ({s})"),
            None => "closed the channel before it was ready".into(),
        }))
    }

    /// The new process's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Tell the new process it is the main process now (after `MAINPID=` went to systemd).
    pub fn confirm(mut self) -> Result<(), Error> {
        send_word(&self.channel, MAIN)?;
        // It lives on when this process exits (systemd reaps it): not killed on drop.
        self.child = None;
        Ok(())
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `localdns handover`: send SIGUSR2 to the unit's main process and wait until another
/// process is the main one and the unit is active. Returns the new main PID.
pub fn request(unit: &str) -> anyhow::Result<u32> {
    use anyhow::Context;
    let show = |prop: &str| -> anyhow::Result<String> {
        let out = Command::new("systemctl")
            .args(["show", "-p", prop, "--value", unit])
            .output()
            .context("cannot run systemctl")?;
        anyhow::ensure!(
            out.status.success(),
            "systemctl show {unit}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let old: u32 = show("MainPID")?.parse().context("MainPID")?;
    anyhow::ensure!(old != 0, "not running (no main process)");
    let dir = crate::state::runtime_dir().unwrap_or_else(|| "/run/localdns".into());
    let marker = std::fs::read_to_string(dir.join(MARKER)).unwrap_or_default();
    anyhow::ensure!(
        marker.trim() == old.to_string(),
        "the running daemon (process {old}) is of a version that cannot hand over: restart it"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .with_context(|| format!("cannot signal process {old}"))?;
    let deadline = std::time::Instant::now() + READY_WITHIN + MAIN_WITHIN;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now: u32 = show("MainPID")?.parse().unwrap_or(0);
        if now != old && now != 0 && show("ActiveState")? == "active" {
            return Ok(now);
        }
        let old_alive =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), None).is_ok();
        anyhow::ensure!(
            now == old || old_alive,
            "the main process {old} is gone and no new one took over"
        );
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "no new process took over within {:?}; process {old} serves on (its journal says why)",
                READY_WITHIN + MAIN_WITHIN
            );
        }
    }
}

/// One message without descriptors.
fn send_word(channel: &OwnedFd, word: &[u8]) -> nix::Result<()> {
    sendmsg::<()>(
        channel.as_raw_fd(),
        &[io::IoSlice::new(word)],
        &[],
        MsgFlags::empty(),
        None,
    )
    .map(drop)
}

fn set_timeout(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    setsockopt(fd, ReceiveTimeout, &tv).map_err(io::Error::from)
}
