//! Helpers of `tests/systemd.rs`: the Debian root filesystem, the network namespaces, the
//! booted container, the query stream, and [`Node`], which puts them together the way a
//! Kubernetes node has them.

#![allow(dead_code)]

pub mod container;
pub mod load;
pub mod netns;
pub mod repo;
pub mod rootfs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::common::daemon::bin;
use crate::common::upstream::Upstream;
use container::{Container, Install};
use load::{Proto, Target};
use netns::{Topology, LINK_LOCAL, SERVICE_IP};

/// Why these tests cannot run here, or None. Needs root (namespaces, mounts, nspawn) and
/// the tools `.ci/run` installs. Under CI (`CI=true`) a missing one (root or a tool) is a
/// failure, not a skip: CI is root and installs them.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        let why = "not root: network namespaces, overlay mounts and systemd-nspawn need root";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
        return Some(why.into());
    }
    missing_tool(&[
        "systemd-nspawn",
        "mmdebstrap",
        "zstd",
        "nsenter",
        "ip",
        "iptables",
        "systemd-analyze",
        "dig",
        "conntrack",
    ])
}

/// The first of `tools` that is not installed, with why; None when all are. Under CI a
/// missing one is a failure, not a skip.
pub fn missing_tool(tools: &[&str]) -> Option<String> {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            let why = format!("`{tool}` is not installed (.ci/run installs it)");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
            return Some(why);
        }
    }
    None
}

/// Skip the calling test, saying why, when the machine cannot run it.
#[macro_export]
macro_rules! require_root_and_tools {
    ($name:expr) => {
        if let Some(why) = $crate::harness::missing_prerequisite() {
            $crate::common::skipped::skipped($name, &why);
            return;
        }
    };
}

/// Containers boot one at a time: two cores, and the zero-loss counts must not depend on
/// another test's load.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the binary under test has `setup` and `teardown`. Without them (before the node
/// setup work is merged) the container gets the shell stand-in, and says so.
pub fn has_setup_command() -> bool {
    let ok = Command::new(bin())
        .args(["setup", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "NOTE: {} has no `setup`/`teardown` commands: the container uses \
             tests/systemd/standin-setup.sh (ip and iptables, inside the unit's sandbox) \
             in their place",
            bin()
        );
    }
    ok
}

/// The package of kind `ext` (`deb`, `rpm`) of this crate's version that `packaging/build`
/// made, if any. Under CI (which builds them before the tests) a missing one is a failure.
pub fn built_package(ext: &str) -> Option<PathBuf> {
    let v = env!("CARGO_PKG_VERSION");
    let name = match ext {
        "deb" => format!("localdns_{v}-1_amd64.deb"),
        _ => format!("localdns-{v}-1.x86_64.rpm"),
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/packages")
        .join(name);
    if !path.exists() {
        let why = format!("no {}: run packaging/build", path.display());
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
        crate::common::skipped::skipped(&format!("{ext} package"), &why);
        return None;
    }
    Some(path)
}

/// Names the fake kube-dns answers; the load streams cycle through `load*`.
pub const WWW: &str = "www.example.com";
pub const WWW_ADDR: &str = "192.0.2.1";
pub const LOAD_NAMES: usize = 20;

pub fn load_names() -> Vec<String> {
    (0..LOAD_NAMES)
        .map(|i| format!("load{i}.example.com"))
        .collect()
}

/// Names asked once each under load (misses, so that some are in flight at any moment).
pub const MISS_NAMES: usize = 400;

pub fn miss_names() -> Vec<String> {
    (0..MISS_NAMES)
        .map(|i| format!("miss{i}.example.com"))
        .collect()
}

/// `/etc/localdns/config.toml` for a node whose kube-dns (and every other upstream) is
/// `upstream`: both listen addresses on the `nodelocaldns` link, with rules.
pub fn node_config(upstream: SocketAddr) -> String {
    format!(
        r#"# written by tests/systemd.rs
[listen]
addresses = ["{LINK_LOCAL}", "{SERVICE_IP}"]
port = 53

[cluster]
upstream = ["{upstream}"]

[upstream]
servers = ["{upstream}"]

[network]
interface = "nodelocaldns"
setup_interface = true
setup_rules = true

[metrics]
address = "127.0.0.1:9253"
"#
    )
}

/// What a test wants besides the defaults.
#[derive(Default)]
pub struct Options {
    /// Enable localdns.service (and these extra units) before the boot, so they start with it.
    pub enable_at_boot: bool,
    pub units: Vec<(String, String)>,
    /// A kube-proxy stand-in: the Service IP DNATed (nat PREROUTING) to a second fake
    /// kube-dns with the same names, so that what is not intercepted by localdns still
    /// gets answers, as on a real node.
    pub kube_proxy: bool,
    /// Install nothing: the test installs the package (see [`Install::from_package`]).
    pub from_package: bool,
}

/// Where the kube-proxy stand-in sends the Service IP: the node's address on the pod veth.
pub const KUBE_DNS_POD: &str = "10.244.0.1:53";

/// The names every fake kube-dns answers.
fn fill(up: &Upstream) {
    up.zone("example.com").a(WWW, 300, WWW_ADDR);
    for (i, name) in load_names().iter().enumerate() {
        up.a(name, 300, &format!("192.0.2.{}", 10 + i));
    }
    for (i, name) in miss_names().iter().enumerate() {
        up.a(name, 300, &format!("198.51.100.{}", i % 250));
    }
}

/// nat PREROUTING DNAT of the Service IP's port 53 to [`KUBE_DNS_POD`], as kube-proxy's
/// iptables mode has it (reduced to the one rule that matters here).
fn kube_proxy_standin(node: &netns::Netns) {
    dnat_dns(node, "PREROUTING", SERVICE_IP, KUBE_DNS_POD);
}

/// `iptables -t nat -A CHAIN -d IP -p udp|tcp --dport 53 -j DNAT --to-destination TO` in
/// `node`, for UDP and TCP.
pub fn dnat_dns(node: &netns::Netns, chain: &str, ip: &str, to: &str) {
    for proto in ["udp", "tcp"] {
        let out = node.exec(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                chain,
                "-d",
                ip,
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "DNAT",
                "--to-destination",
                to,
            ],
        );
        assert!(out.status.success(), "kube-proxy stand-in: {out:?}");
    }
}

/// A node: its namespaces, a fake kube-dns in the node namespace, and the booted container
/// running systemd with localdns installed. Fields drop in order: the container powers off
/// first, then the upstreams stop, then the namespaces go, then the next test may start.
pub struct Node {
    pub c: Container,
    pub upstream: Upstream,
    /// The kube-dns behind the kube-proxy stand-in, when there is one.
    pub kube_dns: Option<Upstream>,
    pub net: Topology,
    _serial: MutexGuard<'static, ()>,
}

impl Node {
    pub fn boot(tag: &str, opts: Options) -> Node {
        Node::boot_with_config(tag, opts, "\0".into())
    }

    /// [`Node::boot`] with `config` in place of the node config naming the fake kube-dns
    /// (`"\0"` means that one; an empty string writes none).
    pub fn boot_with_config(tag: &str, opts: Options, config: String) -> Node {
        let serial = serial();
        let net = Topology::new(tag);
        let upstream = net.node.run_in(|| {
            let up = Upstream::start();
            fill(&up);
            up
        });
        let kube_dns = opts.kube_proxy.then(|| {
            kube_proxy_standin(&net.node);
            net.node.run_in(|| {
                let up = Upstream::start_at(KUBE_DNS_POD.parse().expect("addr"));
                fill(&up);
                up
            })
        });
        let mut enable = Vec::new();
        if opts.enable_at_boot {
            enable.push("localdns.service".to_string());
            enable.extend(opts.units.iter().map(|(n, _)| n.clone()));
        }
        let install = Install {
            binary: PathBuf::from(bin()),
            standin_addresses: (!has_setup_command()).then(|| format!("{LINK_LOCAL} {SERVICE_IP}")),
            config: if config == "\0" {
                node_config(upstream.addr)
            } else {
                config
            },
            units: opts.units,
            enable,
            from_package: opts.from_package,
        };
        let mut c = Container::prepare(tag, &install);
        c.boot(&net.node);
        Node {
            c,
            upstream,
            kube_dns,
            net,
            _serial: serial,
        }
    }

    pub fn start_localdns(&self) {
        self.c.ok(&["systemctl", "start", "localdns.service"]);
        assert_eq!(self.c.prop("localdns.service", "ActiveState"), "active");
    }

    pub fn main_pid(&self) -> u32 {
        self.c
            .prop("localdns.service", "MainPID")
            .parse()
            .expect("MainPID")
    }

    /// Wait until localdns is active under a main PID other than `old`.
    pub fn wait_new_main_pid(&self, old: u32, timeout: Duration) -> u32 {
        let mut pid = 0;
        self.c
            .wait_for("localdns active with a new main PID", timeout, |c| {
                pid = c.prop("localdns.service", "MainPID").parse().unwrap_or(0);
                pid != 0 && pid != old && c.prop("localdns.service", "ActiveState") == "active"
            });
        pid
    }

    /// The four ways pods reach localdns.
    pub fn targets() -> Vec<Target> {
        let mut v = Vec::new();
        for ip in [LINK_LOCAL, SERVICE_IP] {
            for proto in [Proto::Udp, Proto::Tcp] {
                v.push(Target {
                    proto,
                    server: SocketAddr::new(ip.parse().expect("ip"), 53),
                });
            }
        }
        v
    }

    /// Assert each way gets the right answer for `www.example.com` from the pod.
    pub fn assert_pod_answered(&self) {
        for t in Self::targets() {
            let m = load::ask(&self.net.pod, t, WWW).unwrap_or_else(|e| {
                panic!(
                    "{t}: no answer from the pod: {e}\n{}",
                    self.c.journal_text("localdns.service", 40)
                )
            });
            let addrs = crate::common::client::addrs(&m);
            assert_eq!(addrs, vec![WWW_ADDR.to_string()], "{t}: {m:?}");
        }
    }
}
