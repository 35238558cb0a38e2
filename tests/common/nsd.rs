//! NSD, a real authoritative server, on 127.0.0.1 at a free port, serving one zone the test
//! writes, with server options of the test's own (rate limiting, say). Its process group is
//! killed when the guard drops (NSD forks: xfrd and a server process).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nsd {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nsd {
    /// Serve `zone` with the zone file `text`; `server` is more `server:` lines (each
    /// indented by two spaces). Returns once `ready(addr)` is true (NSD has no readiness
    /// signal of its own).
    pub fn start(zone: &str, text: &str, server: &str, ready: impl Fn(SocketAddr) -> bool) -> Nsd {
        assert!(
            Command::new("nsd").arg("-v").output().is_ok(),
            "nsd is not installed (apt-get install nsd; .ci/run installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        // A port nobody holds on both UDP and TCP, released for NSD to bind.
        let port = {
            let (udp, _tcp) = super::upstream::bind_pair();
            udp.local_addr().unwrap().port()
        };
        std::fs::write(dir.path().join("zone"), text).unwrap();
        std::fs::write(
            dir.path().join("nsd.conf"),
            format!(
                "server:\n  ip-address: 127.0.0.1@{port}\n  username: \"\"\n  chroot: \"\"\n  database: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  server-count: 1\n  tcp-count: 200\n  verbosity: 1\n{server}remote-control:\n  control-enable: no\nzone:\n  name: {zone}\n  zonefile: \"{d}/zone\"\n"
            ),
        )
        .unwrap();
        let child = Command::new("nsd")
            .args(["-d", "-c"])
            .arg(dir.path().join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start nsd");
        let nsd = Nsd {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(nsd.addr) {
            assert!(
                Instant::now() < deadline,
                "nsd not answering: {}",
                nsd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nsd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nsd.log")).unwrap_or_default()
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
