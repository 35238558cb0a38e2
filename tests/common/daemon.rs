//! Runs the real `localdns` binary: writes its config into a per-test temp dir, starts it with
//! `NOTIFY_SOCKET` pointing at a datagram socket we own, and waits for `READY=1` (sd_notify)
//! before handing it to the test. Killed by PID when the guard drops.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::upstream::bind_pair;

/// The binary under test. `LOCALDNS_TEST_BIN` runs the suite against another executable with
/// the same command line (used to check the harness itself with a stand-in).
pub fn bin() -> String {
    std::env::var("LOCALDNS_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_localdns").to_string())
}
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The knobs of the config file the tests turn. `Config::to(up)` sends everything (cluster
/// domain, reverse zones and the default) to one upstream; the rest are the contract defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_domain: String,
    pub cluster: Vec<SocketAddr>,
    pub cluster_protocol: String,
    pub servers: Vec<SocketAddr>,
    pub protocol: String,
    pub timeout: String,
    pub attempts: u32,
    pub down_after_failures: u32,
    pub down_time: String,
    pub stubs: Vec<(String, Vec<SocketAddr>)>,
    pub negative_max_ttl: String,
    pub servfail_ttl: String,
    pub serve_stale: String,
    pub prefetch: bool,
    /// Raw TOML lines added to the `[cache]` table.
    pub cache_extra: String,
    /// Raw TOML lines added to the `[upstream]` table.
    pub upstream_extra: String,
    /// Raw TOML lines added to the `[listen]` table.
    pub listen_extra: String,
    /// More addresses to listen on, on the same port as `dns` (e.g. "127.0.0.2").
    pub listen_also: Vec<String>,
    /// Raw TOML appended at the end (extra tables such as more `[[stub]]`s).
    pub extra: String,
}

impl Config {
    pub fn to(upstream: SocketAddr) -> Config {
        Config {
            cluster_domain: "cluster.local".into(),
            cluster: vec![upstream],
            cluster_protocol: "tcp".into(),
            servers: vec![upstream],
            protocol: "udp".into(),
            timeout: "1s".into(),
            attempts: 3,
            down_after_failures: 3,
            down_time: "5s".into(),
            stubs: Vec::new(),
            negative_max_ttl: "5s".into(),
            servfail_ttl: "1s".into(),
            serve_stale: "1h".into(),
            prefetch: true,
            cache_extra: String::new(),
            upstream_extra: String::new(),
            listen_extra: String::new(),
            listen_also: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn render(&self, listen: SocketAddr, metrics: &str) -> String {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = String::new();
        let _ = write!(
            s,
            r#"# written by tests/common/daemon.rs
[listen]
addresses = ["{ip}"{also}]
port = {port}
{listen_extra}
[cluster]
domain = "{domain}"
upstream = [{cluster}]
protocol = "{cproto}"

[upstream]
servers = [{servers}]
protocol = "{proto}"
timeout = "{timeout}"
attempts = {attempts}
down_after_failures = {daf}
down_time = "{down_time}"
{upstream_extra}
"#,
            ip = listen.ip(),
            also = self
                .listen_also
                .iter()
                .map(|a| format!(", \"{a}\""))
                .collect::<String>(),
            port = listen.port(),
            domain = self.cluster_domain,
            cluster = list(&self.cluster),
            cproto = self.cluster_protocol,
            servers = list(&self.servers),
            proto = self.protocol,
            timeout = self.timeout,
            attempts = self.attempts,
            daf = self.down_after_failures,
            down_time = self.down_time,
            upstream_extra = self.upstream_extra,
            listen_extra = self.listen_extra,
        );
        for (zone, servers) in &self.stubs {
            let _ = write!(
                s,
                "\n[[stub]]\nzone = \"{zone}\"\nservers = [{}]\n",
                list(servers)
            );
        }
        let _ = write!(
            s,
            r#"
[cache]
capacity = 20000
max_ttl = "1h"
negative_max_ttl = "{neg}"
servfail_ttl = "{sf}"
serve_stale = "{stale}"
prefetch = {prefetch}
{cache_extra}
[network]
setup_interface = false
setup_rules = false

[metrics]
address = "{metrics}"
{extra}"#,
            neg = self.negative_max_ttl,
            sf = self.servfail_ttl,
            stale = self.serve_stale,
            prefetch = self.prefetch,
            cache_extra = self.cache_extra,
            extra = self.extra,
        );
        s
    }
}

/// A running localdns. Dropping it kills the process (by PID).
pub struct Daemon {
    child: Child,
    pub dns: SocketAddr,
    pub metrics: SocketAddr,
    pub config_path: PathBuf,
    /// The sd_notify socket the daemon reports to (READY, RELOADING, STATUS).
    notify: UnixDatagram,
    dir: tempfile::TempDir,
}

fn free_tcp_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

impl Daemon {
    /// Start localdns with this config; panics with its stderr if it is not ready in 10 s.
    pub fn start(cfg: &Config) -> Daemon {
        Daemon::start_command(cfg, || Command::new(bin()))
    }

    /// Like `start`, with the process made by `command`: another localdns binary, or a
    /// runner whose arguments end with one (`qemu-aarch64-static -L ROOT BIN`, which runs
    /// it in its own process: the PID is still the daemon's). `run --config ...` follows.
    pub fn start_command(cfg: &Config, command: impl Fn() -> Command) -> Daemon {
        // The ports are picked by binding and releasing them; another test can grab one in
        // between, so a start that fails with "in use" is retried on fresh ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Daemon::try_start(cfg, command()) {
                Ok(d) => return d,
                Err(log) if log.to_ascii_lowercase().contains("in use") => last = log,
                Err(log) => panic!("localdns did not become ready:\n{log}"),
            }
        }
        panic!("localdns could not bind after 3 tries:\n{last}");
    }

    fn try_start(cfg: &Config, mut command: Command) -> Result<Daemon, String> {
        let dir = tempfile::Builder::new()
            .prefix("localdns-it-")
            .tempdir()
            .expect("tempdir");
        let dns = {
            let (udp, _tcp) = bind_pair();
            udp.local_addr().expect("addr")
        };
        let metrics = free_tcp_port();
        let config_path = dir.path().join("localdns.toml");
        let text = cfg.render(dns, &metrics.to_string());
        std::fs::write(&config_path, &text).expect("write config");

        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");

        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("log");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log");
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()));
        let mut d = Daemon {
            child,
            dns,
            metrics,
            config_path,
            notify,
            dir,
        };

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        loop {
            match d.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if msg.lines().any(|l| l.trim() == "READY=1") {
                        return Ok(d);
                    }
                    got.push(msg);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(format!(
                    "localdns exited ({status}) before READY=1; notify messages {got:?}\nconfig:\n{text}\nstderr:\n{}",
                    d.stderr()
                ));
            }
            if Instant::now() > deadline {
                let _ = d.child.kill();
                let _ = d.child.wait();
                return Err(format!(
                    "no READY=1 within {READY_TIMEOUT:?}; notify messages {got:?}\nconfig:\n{text}\nstderr:\n{}",
                    d.stderr()
                ));
            }
        }
    }

    /// Read sd_notify messages until one has a line equal to `line`; returns that message.
    /// Panics after `timeout`.
    pub fn wait_notify(&self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l.trim() == line) {
                    return msg;
                }
                got.push(msg);
            }
        }
        panic!(
            "no {line} within {timeout:?}; got {got:?}; stderr:\n{}",
            self.stderr()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        read_log(self.dir.path(), "stderr.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM, then wait up to `timeout` for the exit status (SIGKILL and panic after that).
    pub fn terminate(mut self, timeout: Duration) -> ExitStatus {
        terminate(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "localdns did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }
}

/// SIGTERM to `child` (by PID), then its exit status within `timeout`; `None` (and
/// SIGKILL) when it did not exit by then.
pub fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Child::kill is SIGKILL to this PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- localdns stderr ({}) ---\n{}", self.dns, self.stderr());
        }
    }
}

/// `localdns check-config --config PATH`.
pub fn check_config(path: &Path) -> Output {
    check_config_with(path, &[])
}

/// `localdns check-config --config PATH FLAGS...`.
pub fn check_config_with(path: &Path, flags: &[&str]) -> Output {
    Command::new(bin())
        .arg("check-config")
        .args(flags)
        .arg("--config")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin()))
}
