//! Helpers for the network-namespace tests: namespaces that delete themselves, the
//! pod ↔ node ↔ kube-dns topology, a fake DNS server, a DNS client, and the real
//! `localdns` run inside the node namespace with readiness from `NOTIFY_SOCKET`.
//!
//! Nothing here touches the machine's root network namespace: every link, address and
//! rule is made by a command run inside a namespace created here, and every packet goes
//! to an address inside those namespaces.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const LINK_LOCAL: &str = "169.254.20.10";
pub const SERVICE: &str = "10.96.0.10";
pub const SERVICE6: &str = "fd00:96::10";
/// What the fake upstream (reached by localdns) answers.
pub const VIA_LOCALDNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// What the fake kube-dns (reached through the kube-proxy stand-in) answers.
pub const VIA_KUBE_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// Why the test cannot run here, if it cannot: not root, no `ip netns`, or no `nft`.
pub fn missing_capability() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    if !Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("`nft` cannot be run (apt-get install nftables)".into());
    }
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let probe = format!("ld-probe-{}-{n}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` cannot be run: {e}")),
    }
}

/// Returns early from a test, saying why, when the machine cannot run it. Under CI
/// (`CI=true`, root, tools installed by `.ci/run`) that is a failure instead of a skip.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(why) = $crate::helpers::missing_capability() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: {}: {why}",
                module_path!()
            );
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ld-{role}-{}-{n}", std::process::id());
        check(
            "ip netns add",
            Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .unwrap(),
        );
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// Output of a command run inside the namespace; `None` when it failed.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs a shell command line inside the namespace; panics on failure.
    pub fn sh(&self, line: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-ec", line])
            .output()
            .unwrap();
        check(&format!("[{}] {line}", self.name), out)
    }

    /// Runs `f` on a thread that has entered this namespace: its sockets live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .expect("thread inside the namespace panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// ---- DNS on the wire, just enough for the tests ----

pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// End of the question section of a message with one question.
fn question_end(m: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = *m.get(i)? as usize;
        if len == 0 {
            return Some(i + 5);
        }
        i += 1 + len;
    }
}

/// The first A record of an answer with ID `id`; `None` for anything else.
pub fn answer_a(m: &[u8], id: u16) -> Option<Ipv4Addr> {
    if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != id || m[3] & 0x0f != 0 {
        return None;
    }
    let mut i = question_end(m)?;
    let ancount = u16::from_be_bytes([m[6], m[7]]);
    for _ in 0..ancount {
        // Owner name: labels and/or a pointer.
        loop {
            let b = *m.get(i)?;
            if b & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            if b == 0 {
                i += 1;
                break;
            }
            i += 1 + b as usize;
        }
        let rtype = u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]);
        let rdlen = u16::from_be_bytes([*m.get(i + 8)?, *m.get(i + 9)?]) as usize;
        let rdata = m.get(i + 10..i + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        i += 10 + rdlen;
    }
    None
}

/// An answer to `q` with one A record `ip` (TTL 300).
fn respond(q: &[u8], ip: Ipv4Addr) -> Option<Vec<u8>> {
    let end = question_end(q)?;
    if q.len() < end {
        return None;
    }
    let mut r = q[..end].to_vec();
    r[2] = 0x81 | (q[2] & 0x01);
    r[3] = 0x80;
    r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
    r.extend_from_slice(&ip.octets());
    Some(r)
}

/// A fake DNS server on UDP and TCP of each address, answering every name with `ip`.
/// Runs on threads inside a namespace until dropped.
pub struct FakeDns {
    stop: Arc<AtomicBool>,
    pub queries: Arc<AtomicUsize>,
}

impl FakeDns {
    pub fn start(ns: &Netns, addrs: &[SocketAddr], ip: Ipv4Addr) -> FakeDns {
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        for &addr in addrs {
            let (stop_u, stop_t, q_u, q_t) =
                (stop.clone(), stop.clone(), queries.clone(), queries.clone());
            let udp = ns.enter(move || UdpSocket::bind(addr).unwrap());
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop_u.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        q_u.fetch_add(1, Ordering::Relaxed);
                        if let Some(r) = respond(&buf[..n], ip) {
                            let _ = udp.send_to(&r, from);
                        }
                    }
                }
            });
            let tcp = ns.enter(move || TcpListener::bind(addr).unwrap());
            tcp.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                while !stop_t.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, _)) => {
                            let (stop, q) = (stop_t.clone(), q_t.clone());
                            std::thread::spawn(move || serve_tcp(conn, ip, stop, q));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        FakeDns { stop, queries }
    }
}

fn serve_tcp(mut conn: TcpStream, ip: Ipv4Addr, stop: Arc<AtomicBool>, q: Arc<AtomicUsize>) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 2];
    while !stop.load(Ordering::Relaxed) && conn.read_exact(&mut len).is_ok() {
        let mut msg = vec![0; u16::from_be_bytes(len) as usize];
        if conn.read_exact(&mut msg).is_err() {
            return;
        }
        q.fetch_add(1, Ordering::Relaxed);
        let Some(r) = respond(&msg, ip) else { return };
        let mut out = (r.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&r);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One UDP query over `sock` (connected or not) to `server`: the A record, or `None`
/// on timeout or a bad answer.
pub fn ask_udp(sock: &UdpSocket, server: SocketAddr, id: u16, name: &str) -> Option<Ipv4Addr> {
    sock.send_to(&query(id, name), server).ok()?;
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + sock.read_timeout().ok()??;
    while Instant::now() < deadline {
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        // A late answer to an earlier query is skipped.
        if from == server && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return answer_a(&buf[..n], id);
        }
    }
    None
}

/// Queries over one TCP connection; `None` for each that failed.
pub fn ask_tcp(conn: &mut TcpStream, id: u16, name: &str) -> Option<Ipv4Addr> {
    let q = query(id, name);
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    conn.write_all(&out).ok()?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).ok()?;
    let mut msg = vec![0; u16::from_be_bytes(len) as usize];
    conn.read_exact(&mut msg).ok()?;
    answer_a(&msg, id)
}

/// Tallies of a batch of queries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub localdns: usize,
    pub kube_dns: usize,
    pub failed: usize,
}

impl Tally {
    pub fn add(&mut self, answer: Option<Ipv4Addr>) {
        match answer {
            Some(ip) if ip == VIA_LOCALDNS => self.localdns += 1,
            Some(ip) if ip == VIA_KUBE_DNS => self.kube_dns += 1,
            _ => self.failed += 1,
        }
    }
}

/// `count` UDP queries to `server` from one socket (one source port), names cycling
/// through 20 so that both hits and misses are seen.
pub fn udp_batch(server: SocketAddr, count: usize) -> Tally {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut t = Tally::default();
    for i in 0..count {
        t.add(ask_udp(
            &sock,
            server,
            i as u16,
            &format!("n{}.example", i % 20),
        ));
    }
    t
}

/// `count` TCP queries to `server`, `per_conn` per connection.
pub fn tcp_batch(server: SocketAddr, count: usize, per_conn: usize) -> Tally {
    let mut t = Tally::default();
    let mut i = 0;
    while i < count {
        match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
            Ok(mut conn) => {
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                for _ in 0..per_conn.min(count - i) {
                    t.add(ask_tcp(
                        &mut conn,
                        i as u16,
                        &format!("t{}.example", i % 20),
                    ));
                    i += 1;
                }
            }
            Err(_) => {
                t.failed += 1;
                i += 1;
            }
        }
    }
    t
}

// ---- the topology ----

/// pod ↔ node ↔ kube-dns namespaces, a kube-proxy stand-in on the node (DNAT of the
/// Service IPs to the fake kube-dns, and a conntrack rule so conntrack is active), a
/// fake kube-dns and a fake upstream for localdns in the kube-dns namespace.
pub struct Topology {
    // Dropped first: the servers' threads stop before their namespace goes.
    pub kube_dns: FakeDns,
    pub upstream: FakeDns,
    pub pod: Netns,
    pub node: Netns,
    pub kdns: Netns,
    /// `nft` or `legacy` (iptables-nft, iptables-legacy) or `nftables` (kube-proxy's
    /// nftables mode): where the kube-proxy stand-in lives.
    pub backend: &'static str,
}

impl Topology {
    pub fn new(backend: &'static str) -> Topology {
        let pod = Netns::new("pod");
        let node = Netns::new("node");
        let kdns = Netns::new("kdns");
        // No duplicate address detection, for the link-local addresses either: while one is
        // tentative, neighbour discovery on its link stalls for about a second, and the
        // first IPv6 query of a test that gets there early is lost (seen as 1 of 20 failing
        // in nftables_setup_repair_fail_open_and_exact_teardown).
        for ns in [&pod, &node, &kdns] {
            ns.sh("sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0");
        }
        node.sh(&format!(
            "ip link add n0 type veth peer name p0 netns {pod}
             ip link add n1 type veth peer name k0 netns {kdns}
             ip addr add 10.244.0.1/24 dev n0
             ip addr add fd00:244::1/64 dev n0 nodad
             ip addr add 10.244.1.1/24 dev n1
             ip addr add fd00:244:1::1/64 dev n1 nodad
             ip link set n0 up
             ip link set n1 up
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            pod = pod.name,
            kdns = kdns.name
        ));
        pod.sh("ip addr add 10.244.0.2/24 dev p0
             ip addr add fd00:244::2/64 dev p0 nodad
             ip link set p0 up
             ip route add default via 10.244.0.1
             ip -6 route add default via fd00:244::1");
        kdns.sh("ip addr add 10.244.1.2/24 dev k0
             ip addr add 10.244.1.3/24 dev k0
             ip addr add fd00:244:1::2/64 dev k0 nodad
             ip addr add fd00:244:1::3/64 dev k0 nodad
             ip link set k0 up
             ip route add default via 10.244.1.1
             ip -6 route add default via fd00:244:1::1");
        // kube-proxy stand-in: Service IP → kube-dns pod, through conntrack.
        let b = backend;
        if b == "nftables" {
            node.sh(&format!("nft -f - <<'EOF'\n{}EOF", kube_proxy_nftables()));
        } else {
            node.sh(&format!(
            "for p in udp tcp; do
               iptables-{b} -t nat -N KUBE-SVC-$p
               iptables-{b} -t nat -A KUBE-SVC-$p -d {SERVICE}/32 -p $p --dport 53 -j DNAT --to-destination 10.244.1.2:53
               iptables-{b} -t nat -A PREROUTING -j KUBE-SVC-$p
               iptables-{b} -t nat -A OUTPUT -j KUBE-SVC-$p
               ip6tables-{b} -t nat -N KUBE-SVC-$p
               ip6tables-{b} -t nat -A KUBE-SVC-$p -d {SERVICE6}/128 -p $p --dport 53 -j DNAT --to-destination [fd00:244:1::2]:53
               ip6tables-{b} -t nat -A PREROUTING -j KUBE-SVC-$p
               ip6tables-{b} -t nat -A OUTPUT -j KUBE-SVC-$p
             done
             iptables-{b} -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
             ip6tables-{b} -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            ));
        }
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let kube_dns = FakeDns::start(
            &kdns,
            &[sa("10.244.1.2:53"), sa("[fd00:244:1::2]:53")],
            VIA_KUBE_DNS,
        );
        let upstream = FakeDns::start(
            &kdns,
            &[sa("10.244.1.3:5353"), sa("[fd00:244:1::3]:5353")],
            VIA_LOCALDNS,
        );
        Topology {
            kube_dns,
            upstream,
            pod,
            node,
            kdns,
            backend,
        }
    }

    /// Conntrack entries for DNS (port 53), IPv4 and IPv6, UDP and TCP, on the node.
    pub fn dns_conntrack(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for family in ["ipv4", "ipv6"] {
            for proto in ["udp", "tcp"] {
                let out = self
                    .node
                    .try_run(&[
                        "conntrack",
                        "-L",
                        "-f",
                        family,
                        "-p",
                        proto,
                        "--dport",
                        "53",
                    ])
                    .unwrap_or_else(|e| panic!("conntrack -L failed: {e}"));
                lines.extend(out.lines().map(str::to_owned));
            }
        }
        lines
    }
}

/// A node namespace wired to a kube-dns namespace whose pods have the addresses `pods`
/// (10.244.1.x; the node is 10.244.1.1), with the Service range 10.96.0.0/12 routed there
/// for the kube-proxy stand-in the test adds.
pub fn node_and_kube_dns(pods: &[&str]) -> (Netns, Netns) {
    let node = Netns::new("node");
    let kdns = Netns::new("kdns");
    node.sh(&format!(
        "ip link add n1 type veth peer name k0 netns {kdns}
         ip addr add 10.244.1.1/24 dev n1
         ip link set n1 up
         ip route add 10.96.0.0/12 dev n1",
        kdns = kdns.name
    ));
    let addrs: String = pods
        .iter()
        .map(|p| format!("ip addr add {p}/24 dev k0\n"))
        .collect();
    kdns.sh(&format!(
        "{addrs}ip link set k0 up
         ip route add default via 10.244.1.1"
    ));
    (node, kdns)
}

/// The config of a localdns on 127.0.0.1:53 of the node namespace, without interface or
/// rules, whose cluster upstream is the kube-dns-upstream Service 10.96.0.20 over TCP and
/// whose default upstream is `default`; `upstream_extra` is added to `[upstream]`.
pub fn cluster_config(dir: &Path, default: &str, upstream_extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]
addresses = [\"127.0.0.1\"]
port = 53
udp_threads = 1
[cluster]
upstream = [\"10.96.0.20:53\"]
protocol = \"tcp\"
[upstream]
servers = [\"{default}\"]
{upstream_extra}
[network]
setup_interface = false
setup_rules = false
[metrics]
address = \"127.0.0.1:9253\"
"
        ),
    )
    .unwrap();
    path
}

/// A kube-proxy in nftables mode, as far as DNS goes: its `ip kube-proxy` and
/// `ip6 kube-proxy` tables with the DNAT of the Service IP to the kube-dns pod at the
/// dstnat hooks (prerouting for pods, output for the node), and a conntrack rule in a
/// filter chain (so conntrack is active, as kube-proxy's own rules make it).
pub fn kube_proxy_nftables() -> String {
    let mut out = String::new();
    for (family, service, pod) in [
        ("ip", SERVICE, "10.244.1.2"),
        ("ip6", SERVICE6, "[fd00:244:1::2]"),
    ] {
        out.push_str(&format!(
            "table {family} kube-proxy {{
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain services {{
    {family} daddr {service} meta l4proto {{ tcp, udp }} th dport 53 dnat to {pod}:53
  }}
  chain filter-input {{
    type filter hook input priority -110; policy accept;
    ct state established,related accept
  }}
}}
"
        ));
    }
    out
}

/// The config localdns runs with in the node namespace. `firewall` is a
/// `network.firewall` value, or `nft`/`legacy` for the iptables ones.
pub fn config(dir: &Path, firewall: &str) -> PathBuf {
    let firewall = match firewall {
        "nft" => "iptables-nft",
        "legacy" => "iptables-legacy",
        other => other,
    };
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]
addresses = [\"{LINK_LOCAL}\", \"{SERVICE}\", \"{SERVICE6}\"]
udp_threads = 1
[upstream]
servers = [\"10.244.1.3:5353\", \"[fd00:244:1::3]:5353\"]
[network]
interface = \"nodelocaldns\"
firewall = \"{firewall}\"
rules_check_interval = \"1s\"
xtables_wait = \"3s\"
[metrics]
address = \"127.0.0.1:9253\"
"
        ),
    )
    .unwrap();
    path
}

/// Moves the periodic rules check of `config` out of the way (1 h), so that only
/// netlink events can explain a repair within a test.
pub fn events_only(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let slow = text.replace(
        "rules_check_interval = \"1s\"",
        "rules_check_interval = \"1h\"",
    );
    assert_ne!(text, slow);
    std::fs::write(config, slow).unwrap();
}

/// `localdns setup|teardown` in a namespace; (success, stderr).
pub fn localdns_cmd(ns: &Netns, cmd: &str, config: &Path) -> (bool, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_localdns"),
            cmd,
        ])
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `localdns run`, killed (SIGKILL, by PID) on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts localdns in `ns` and waits until it sends READY=1.
    pub fn start(ns: &Netns, config: &Path, dir: &Path) -> Daemon {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let notify_path = dir.join(format!("notify-{n}"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = dir.join(format!("localdns-{n}.log"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_localdns"),
                "run",
            ])
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("LOCALDNS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return d;
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("localdns exited before READY ({status}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "localdns not READY in 30 s:\n{}",
                d.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The reply (head and body) to `GET path` from the metrics endpoint of a localdns in `ns`
/// (127.0.0.1:9253, as the configs here have it).
pub fn http_get(ns: &Netns, path: &str) -> String {
    let path = path.to_string();
    ns.enter(move || {
        let mut c = TcpStream::connect("127.0.0.1:9253").unwrap();
        write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    })
}

/// Polls `cond` every 5 ms until it holds; the time it took, or `None` past `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `iptables-save` output without comments and counters, for comparison.
pub fn save_normalised(ns: &Netns, program: &str) -> String {
    let out = ns.try_run(&[program]).unwrap_or_default();
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
