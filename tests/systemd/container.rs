//! A Debian system booted with `systemd-nspawn --boot` in the test's node network namespace,
//! with localdns installed the way its package installs it. The host is not run by systemd,
//! so the container is driven through `nsenter` into its PID 1 (shared/TESTING.md).
//!
//! Each container gets its own overlay (lower: the shared base tree; upper: a per-test dir)
//! mounted under the target dir, so files can be written into it from the host before and
//! during the boot. Dropping the [`Container`] saves its journal, powers it off (or kills
//! the nspawn process we started, by PID), unmounts the overlay and removes the run dir.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::rootfs;

/// What goes into the container before it boots.
pub struct Install {
    /// The localdns binary under test.
    pub binary: PathBuf,
    /// Space-separated listen addresses, for the setup stand-in; `None` installs the binary
    /// as it is (it has its own `setup`/`teardown`).
    pub standin_addresses: Option<String>,
    /// `/etc/localdns/config.toml`.
    pub config: String,
    /// Extra units for `/etc/systemd/system`: (file name, contents).
    pub units: Vec<(String, String)>,
    /// Units enabled before the boot (`systemctl --root enable`), as the package would.
    pub enable: Vec<String>,
    /// Install nothing of localdns: the test installs its package. `config` then goes to
    /// `/etc/localdns/conf.d/50-node.toml`, as cloud-init writes a node's drop-in.
    pub from_package: bool,
}

/// A journal entry: field name to (text) value.
pub type Entry = HashMap<String, String>;

pub struct Container {
    pub name: String,
    dir: PathBuf,
    root: PathBuf,
    mounted: bool,
    nspawn: Option<Child>,
    leader: Option<u32>,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// stdout and stderr of `out`, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Unmount overlays left under `runs/` by an earlier run that was killed before its guards
/// ran, and remove their dirs. Only mounts under this project's target dir are touched.
fn sweep_stale_runs(runs: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = runs.to_string_lossy().into_owned();
    for line in info.lines() {
        if let Some(mnt) = line.split(' ').nth(4) {
            if mnt.starts_with(&prefix) {
                let _ = Command::new("umount").arg("-l").arg(mnt).output();
            }
        }
    }
    let _ = std::fs::remove_dir_all(runs);
}

impl Container {
    /// Mount a fresh overlay of the base tree and install localdns into it.
    pub fn prepare(tag: &str, install: &Install) -> Container {
        Container::prepare_on(rootfs::base(), tag, install)
    }

    /// [`Container::prepare`] on another base tree (e.g. [`rootfs::base_with_cloud_init`]).
    pub fn prepare_on(base: &Path, tag: &str, install: &Install) -> Container {
        let runs = rootfs::work_dir().join("runs");
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| sweep_stale_runs(&runs));
        let dir = runs.join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).expect("run dirs");
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&root)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount overlay: {}", text(&out));
        let c = Container {
            name: format!("ldsd-{tag}"),
            dir,
            root,
            mounted: true,
            nspawn: None,
            leader: None,
        };
        c.install(install);
        c
    }

    /// The package's files, where the package puts them.
    fn install(&self, i: &Install) {
        if i.from_package {
            if !i.config.is_empty() {
                self.write("/etc/localdns/conf.d/50-node.toml", &i.config);
            }
            for (name, contents) in &i.units {
                self.write(&format!("/etc/systemd/system/{name}"), contents);
            }
            return;
        }
        let binary =
            std::fs::read(&i.binary).unwrap_or_else(|e| panic!("{}: {e}", i.binary.display()));
        match &i.standin_addresses {
            None => self.write_mode("/usr/bin/localdns", &binary, 0o755),
            Some(addresses) => {
                self.write_mode("/usr/lib/localdns-test/localdns", &binary, 0o755);
                let script = std::fs::read_to_string(repo("tests/systemd/standin-setup.sh"))
                    .expect("standin script")
                    .replace("@ADDRESSES@", addresses);
                self.write_mode("/usr/bin/localdns", script.as_bytes(), 0o755);
            }
        }
        let file = |p: &str| std::fs::read(repo(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        self.write_mode(
            "/usr/lib/systemd/system/localdns.service",
            &file("systemd/localdns.service"),
            0o644,
        );
        self.write_mode(
            "/usr/lib/systemd/system/localdns-fallback.service",
            &file("systemd/localdns-fallback.service"),
            0o644,
        );
        self.write_mode(
            "/usr/libexec/localdns/stop-post",
            &file("systemd/stop-post"),
            0o755,
        );
        self.write_mode(
            "/usr/lib/tmpfiles.d/localdns.conf",
            &file("systemd/localdns.tmpfiles"),
            0o644,
        );
        self.write("/etc/localdns/config.toml", &i.config);
        std::fs::create_dir_all(self.path("/etc/localdns/conf.d")).expect("conf.d");
        for (name, contents) in &i.units {
            self.write(&format!("/etc/systemd/system/{name}"), contents);
        }
        for unit in &i.enable {
            let out = Command::new("systemctl")
                .arg(format!("--root={}", self.root.display()))
                .args(["enable", unit])
                .output()
                .expect("systemctl --root enable");
            assert!(out.status.success(), "enable {unit}: {}", text(&out));
        }
    }

    /// The host path of a path inside the container.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// The root the container boots from (for `systemd-analyze --root=`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn write(&self, inside: &str, contents: &str) {
        self.write_mode(inside, contents.as_bytes(), 0o644);
    }

    fn write_mode(&self, inside: &str, contents: &[u8], mode: u32) {
        write_file(&self.path(inside), contents, mode);
    }

    /// Copy a host file into the container.
    pub fn copy_in(&self, host: &Path, inside: &str) {
        let bytes = std::fs::read(host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        self.write_mode(inside, &bytes, 0o644);
    }

    pub fn remove(&self, inside: &str) {
        let _ = std::fs::remove_file(self.path(inside));
    }

    /// Boot with the network namespace `node`; returns once systemd reports the boot done
    /// (`is-system-running --wait`: running or degraded).
    pub fn boot(&mut self, node: &Netns) {
        let log = std::fs::File::create(self.dir.join("nspawn.log")).expect("nspawn log");
        let child = Command::new("systemd-nspawn")
            .arg("--boot")
            .arg("-D")
            .arg(&self.root)
            .args(["--register=no", "--keep-unit", "-M", &self.name])
            .args(["--console=passive", "-q"])
            .arg(format!(
                "--network-namespace-path={}",
                node.path().display()
            ))
            // The namespace does not grant the capabilities; localdns needs these two.
            .arg("--capability=CAP_NET_ADMIN,CAP_NET_RAW")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        let nspawn_pid = child.id();
        self.nspawn = Some(child);

        let deadline = Instant::now() + BOOT_TIMEOUT;
        // The container's PID 1 is the child of the nspawn process.
        let leader = loop {
            // nspawn forks an intermediate process before the container's init; wait for
            // the child that runs systemd, or nsenter would aim at a process that is gone.
            if let Some(pid) =
                child_of(nspawn_pid).filter(|&pid| comm(pid).as_deref() == Some("systemd"))
            {
                break pid;
            }
            if let Some(Ok(Some(status))) = self.nspawn.as_mut().map(|c| c.try_wait()) {
                panic!("systemd-nspawn exited ({status}):\n{}", self.nspawn_log());
            }
            assert!(
                Instant::now() < deadline,
                "no container PID 1:\n{}",
                self.nspawn_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.leader = Some(leader);
        loop {
            let out = self.exec(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.exec(&["systemctl", "--failed", "--no-legend"]);
                    eprintln!("{}: boot degraded: {}", self.name, text(&failed));
                    return;
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let jobs = self.exec(&["systemctl", "list-jobs", "--no-pager"]);
                let unit = self.exec(&[
                    "journalctl",
                    "-b",
                    "-u",
                    "localdns",
                    "--no-pager",
                    "-o",
                    "short-precise",
                ]);
                let status = self.exec(&["systemctl", "status", "localdns", "--no-pager"]);
                panic!(
                    "{} did not finish booting ({state}):\njobs:\n{}\nlocaldns status:\n{}\nlocaldns journal:\n{}\nconsole:\n{}",
                    self.name,
                    text(&jobs),
                    text(&status),
                    text(&unit),
                    self.nspawn_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
    }

    /// Run a command inside the container (all its namespaces), not checked.
    pub fn exec(&self, args: &[&str]) -> Output {
        let leader = self.leader.expect("container not booted");
        Command::new("nsenter")
            .args(["-t", &leader.to_string(), "-a", "--"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SYSTEMD_PAGER", "cat")
            .env("SYSTEMD_COLORS", "0")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Run a command inside; panic with its output unless it succeeds; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {}: {}\n{}",
            self.name,
            args.join(" "),
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `systemctl show -P PROP UNIT`.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&["systemctl", "show", "-P", prop, unit])
            .trim()
            .to_string()
    }

    /// Poll `cond` (every 20 ms) until it holds; panic with `what` after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {timeout:?} waiting for {what}\n{}",
                self.name,
                self.journal_text("localdns.service", 60)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unit's journal entries of this boot (`journalctl -o export`).
    /// The host's ID of the thread named `thread` (`/proc/PID/task/TID/comm`) of the
    /// process that has PID `inside` in the container.
    pub fn host_thread(&self, inside: u32, thread: &str) -> Option<u32> {
        let leader = self.leader.expect("container not booted");
        let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        let want = ns(leader)?;
        let host = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let nspid = status.lines().find(|l| l.starts_with("NSpid:"))?;
            let last: u32 = nspid.split_whitespace().last()?.parse().ok()?;
            (last == inside && ns(pid).as_ref() == Some(&want)).then_some(pid)
        })?;
        std::fs::read_dir(format!("/proc/{host}/task"))
            .ok()?
            .flatten()
            .find_map(|e| {
                let tid: u32 = e.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/{host}/task/{tid}/comm")).ok()?;
                (comm.trim() == thread).then_some(tid)
            })
    }

    pub fn journal(&self, unit: &str) -> Vec<Entry> {
        let out = self.exec(&["journalctl", "-b", "-u", unit, "-o", "export", "--no-pager"]);
        parse_export(&out.stdout)
    }

    /// The last `lines` journal lines of a unit, for failure messages.
    pub fn journal_text(&self, unit: &str, lines: usize) -> String {
        let n = lines.to_string();
        text(&self.exec(&["journalctl", "-b", "-u", unit, "-n", &n, "--no-pager"]))
    }
}

/// The first process whose parent is `ppid`.
/// The command name of a process (`/proc/PID/comm`), if it still exists.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

fn child_of(ppid: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(ppid) {
            return Some(pid);
        }
    }
    None
}

/// Parse journalctl's export format: `KEY=value` lines, binary fields as `KEY\n`, a
/// little-endian u64 length and the bytes, entries separated by an empty line.
pub fn parse_export(bytes: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut cur = Entry::new();
    let mut i = 0;
    while i < bytes.len() {
        let end = bytes[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |p| i + p);
        let line = &bytes[i..end];
        i = end + 1;
        if line.is_empty() {
            if !cur.is_empty() {
                entries.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            cur.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
        } else if i + 8 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes")) as usize;
            let start = i + 8;
            let stop = (start + len).min(bytes.len());
            cur.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&bytes[start..stop]).into_owned(),
            );
            i = stop + 1;
        }
    }
    if !cur.is_empty() {
        entries.push(cur);
    }
    entries
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader.is_some() {
            // Keep the whole boot's journal beside the run for a look after a failure.
            let journal = self.exec(&["journalctl", "-b", "--no-pager"]);
            let logs = rootfs::work_dir().join("logs");
            let _ = std::fs::create_dir_all(&logs);
            let saved = logs.join(format!("{}.journal", self.name));
            let _ = std::fs::write(&saved, &journal.stdout);
            if std::thread::panicking() {
                eprintln!(
                    "--- {} journal of localdns.service (whole boot in {}) ---\n{}",
                    self.name,
                    saved.display(),
                    self.journal_text("localdns.service", 80)
                );
            }
            let _ = self.exec(&["systemctl", "poweroff"]);
        }
        if let Some(mut child) = self.nspawn.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        // SIGKILL to the nspawn process we started. That does not take its
                        // container with it (nspawn gets no chance to clean up), so the
                        // container's init, which we started through it, is killed too:
                        // that ends its whole PID namespace.
                        let _ = child.kill();
                        let _ = child.wait();
                        if let Some(leader) = self.leader {
                            if comm(leader).as_deref() == Some("systemd") {
                                let _ = Command::new("kill")
                                    .args(["-KILL", &leader.to_string()])
                                    .output();
                            }
                        }
                        break;
                    }
                }
            }
        }
        if self.mounted {
            let out = Command::new("umount").arg(&self.root).output();
            if !matches!(out, Ok(ref o) if o.status.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.root).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
