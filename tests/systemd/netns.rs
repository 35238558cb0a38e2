//! Network namespaces the test creates and deletes: a node (where the container runs, with
//! the fake upstream) and a pod joined to it by a veth pair, as in shared/TESTING.md:
//!
//! ```text
//! pod netns (10.244.0.2/24 eth0) --veth-- node netns (10.244.0.1/24 veth-pod)
//!    routes 169.254.20.10/32 and 10.96.0.10/32 via 10.244.0.1
//! ```
//!
//! Nothing here touches the machine's own network namespace: links are created directly in
//! the test namespaces, and every command names its namespace. Dropping a [`Netns`] deletes
//! it (and with it everything inside), also when the test panics.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// The listen addresses the tests serve: the link-local address and the kube-dns Service IP.
pub const LINK_LOCAL: &str = "169.254.20.10";
pub const SERVICE_IP: &str = "10.96.0.10";

/// Run `ip ARGS` (or any command) and panic with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        // A namespace left by an earlier run that was killed (guards did not run).
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run("ip", &["netns", "add", name]);
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME PROGRAM ARGS`, not checked.
    pub fn exec(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.name))
    }

    /// Run `f` on a new thread inside this namespace: sockets it creates live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Run `f` inside this namespace and wait for its result.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The node and pod namespaces of one test.
pub struct Topology {
    pub pod: Netns,
    pub node: Netns,
}

impl Topology {
    /// `tag` makes the names unique per test (`ldsd-TAG-node`, `ldsd-TAG-pod`).
    pub fn new(tag: &str) -> Topology {
        let node = Netns::create(&format!("ldsd-{tag}-node"));
        let pod = Netns::create(&format!("ldsd-{tag}-pod"));
        // Created directly in the two namespaces.
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name",
                "veth-pod", "netns", &node.name,
            ],
        );
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "veth-pod"]);
        node.ip(&["link", "set", "veth-pod", "up"]);
        pod.ip(&["addr", "add", "10.244.0.2/24", "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        for dst in [LINK_LOCAL, SERVICE_IP] {
            pod.ip(&["route", "add", &format!("{dst}/32"), "via", "10.244.0.1"]);
        }
        // A kube-proxy stand-in: a fresh namespace tracks nothing until some rule uses
        // conntrack, and "no conntrack entry for DNS" must not pass for that reason.
        for tool in ["iptables", "ip6tables"] {
            let out = node.exec(
                tool,
                &[
                    "-w",
                    "-A",
                    "INPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
            );
            assert!(out.status.success(), "{tool}: {out:?}");
        }
        Topology { pod, node }
    }

    /// Index of a link in the node namespace, None when it does not exist.
    pub fn node_link_index(&self, link: &str) -> Option<u32> {
        let out = Command::new("ip")
            .args(["-n", &self.node.name, "-o", "link", "show", "dev", link])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Every iptables rule and chain in the node namespace (nft and legacy, v4 and v6), as
    /// `iptables-save` prints them, then localdns's nftables table, when there is one
    /// (`network.firewall = "auto"` picks nftables where no `KUBE-*` chain exists).
    pub fn node_rules(&self) -> String {
        let mut all = String::new();
        for tool in [
            "iptables-nft-save",
            "ip6tables-nft-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ] {
            let out = self.node.exec(tool, &[]);
            all.push_str(&format!(
                "# {tool}\n{}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let table = self
            .node
            .exec("nft", &["list", "table", "inet", "localdns"]);
        if table.status.success() {
            all.push_str(&format!(
                "# nftables\n{}",
                String::from_utf8_lossy(&table.stdout)
            ));
        }
        all
    }
}
