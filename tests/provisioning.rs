//! Provisioning (`cloud-init/`): the user-data examples, the image bake and the
//! node-resolver opt-in, each checked with the real tool.
//!
//! - Every cloud-config (the EKS example's is a part of a MIME multi-part document) passes
//!   `cloud-init schema --config-file` (Debian 12's cloud-init), and a broken one does not;
//!   the EKS `NodeConfig` part is YAML with the expected apiVersion, kind and clusterDNS.
//! - The localdns drop-in each one writes passes `localdns check-config
//!   --require-cluster-upstream` on top of the package's config.toml.
//! - `node-resolver` against a plain resolv.conf (a temporary file), and both scripts pass
//!   shellcheck.
//! - End to end, as root: a Debian 12 root with cloud-init and systemd-resolved booted with
//!   `systemd-nspawn --boot` in a node network namespace, with a NoCloud seed holding
//!   `kubeadm-node.yaml`. Two substitutions, both checked to match exactly one line: the
//!   package URL becomes a `file://` URL of the .deb that `packaging/build` made, and
//!   `kubeadm join` (which cannot run without a cluster) becomes a stand-in that records
//!   whether localdns was active and answering at that moment. Then the node-resolver
//!   opt-in under systemd-resolved: no forwarding loop, and the node still resolves with
//!   localdns stopped. The image-bake path: the package baked into the image in a chroot,
//!   then the same user-data at first boot. The repository path: `ubuntu-node.yaml` with
//!   its apt source pointed at a signed repository that `packaging/repo` wrote (served
//!   over HTTP in the node namespace) and its key in place of the example's: cloud-init
//!   adds the source and installs localdns from it, in link-local mode.
//!
//! The YAML and MIME are read by `tests/provisioning/userdata.py` with the parsers
//! cloud-init itself uses (PyYAML, Python's email package).

mod common;
#[path = "systemd/mod.rs"]
mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::container::{Container, Install};
use harness::load::{self, Proto, Target};
use harness::netns::{Netns, Topology, LINK_LOCAL, SERVICE_IP};
use harness::rootfs;

/// Every user-data example.
const USER_DATA: &[&str] = &[
    "cloud-init/kubeadm-node.yaml",
    "cloud-init/ubuntu-node.yaml",
    "cloud-init/eks-al2023.mime",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

macro_rules! require_tools {
    ($name:expr, $tools:expr) => {
        if let Some(why) = harness::missing_tool($tools) {
            common::skipped::skipped($name, &why);
            return;
        }
    };
}

/// The parts of a user-data file as cloud-init splits them: (file, content type).
fn parts(user_data: &str, dir: &Path) -> Vec<(PathBuf, String)> {
    let out = run_ok(
        "python3",
        &[
            repo("tests/provisioning/userdata.py")
                .to_str()
                .expect("utf-8"),
            "parts",
            repo(user_data).to_str().expect("utf-8"),
            dir.to_str().expect("utf-8"),
        ],
    );
    out.lines()
        .map(|l| {
            let (n, ctype) = l.split_once('\t').expect("N<TAB>type");
            (dir.join(format!("part-{n}")), ctype.to_string())
        })
        .collect()
}

/// Every cloud-config of every example: (example, file of the cloud-config).
fn cloud_configs(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut all = Vec::new();
    for (i, user_data) in USER_DATA.iter().enumerate() {
        let found: Vec<PathBuf> = parts(user_data, &dir.join(i.to_string()))
            .into_iter()
            .filter(|(_, ctype)| ctype == "text/cloud-config")
            .map(|(file, _)| file)
            .collect();
        assert_eq!(found.len(), 1, "{user_data}: one cloud-config part");
        all.extend(found.into_iter().map(|f| (*user_data, f)));
    }
    all
}

fn schema(file: &Path) -> Output {
    run(
        "cloud-init",
        &["schema", "--config-file", file.to_str().expect("utf-8")],
    )
}

#[test]
fn every_cloud_config_passes_cloud_init_schema() {
    require_tools!(
        "every_cloud_config_passes_cloud_init_schema",
        &["cloud-init", "python3"]
    );
    let dir = tempfile::tempdir().expect("tmp");
    for (user_data, file) in cloud_configs(dir.path()) {
        let out = schema(&file);
        println!("{user_data}: {}", text(&out).trim());
        assert!(out.status.success(), "{user_data}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Valid cloud-config"),
            "{user_data}: {}",
            text(&out)
        );
    }
    // The validator refuses what cloud-init would not run: a misspelt key of write_files.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "#cloud-config\nwrite_files:\n  - path: /etc/x\n    contents: y\n",
    )
    .expect("write");
    let out = schema(&bad);
    println!("a broken cloud-config: {}", text(&out).trim());
    assert!(!out.status.success(), "accepted: {}", text(&out));
}

#[test]
fn eks_user_data_has_a_node_config_and_a_cloud_config() {
    require_tools!(
        "eks_user_data_has_a_node_config_and_a_cloud_config",
        &["python3"]
    );
    let dir = tempfile::tempdir().expect("tmp");
    let found = parts("cloud-init/eks-al2023.mime", dir.path());
    let types: Vec<&str> = found.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(types, ["application/node.eks.aws", "text/cloud-config"]);
    let docs = run_ok(
        "python3",
        &[
            repo("tests/provisioning/userdata.py")
                .to_str()
                .expect("utf-8"),
            "nodeconfig",
            found[0].0.to_str().expect("utf-8"),
        ],
    );
    println!(
        "NodeConfig part (apiVersion, kind, clusterDNS): {}",
        docs.trim()
    );
    assert_eq!(
        docs.lines().collect::<Vec<_>>(),
        [format!("node.eks.aws/v1alpha1\tNodeConfig\t{LINK_LOCAL}")]
    );
}

/// The files a cloud-config writes, under `root`; their paths as written.
fn write_files(cloud_config: &Path, root: &Path) -> Vec<String> {
    run_ok(
        "python3",
        &[
            repo("tests/provisioning/userdata.py")
                .to_str()
                .expect("utf-8"),
            "write-files",
            cloud_config.to_str().expect("utf-8"),
            root.to_str().expect("utf-8"),
        ],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn check_config(root: &Path, require_cluster_upstream: bool) -> Output {
    let config = root.join("etc/localdns/config.toml");
    let mut args = vec!["check-config", "--config", config.to_str().expect("utf-8")];
    if require_cluster_upstream {
        args.push("--require-cluster-upstream");
    }
    run(&common::daemon::bin(), &args)
}

#[test]
fn every_drop_in_passes_check_config_over_the_package_config() {
    require_tools!(
        "every_drop_in_passes_check_config_over_the_package_config",
        &["python3"]
    );
    let dir = tempfile::tempdir().expect("tmp");
    for (i, (user_data, file)) in cloud_configs(&dir.path().join("parts"))
        .into_iter()
        .enumerate()
    {
        let root = dir.path().join(format!("root-{i}"));
        std::fs::create_dir_all(root.join("etc/localdns")).expect("mkdir");
        std::fs::copy(
            repo("packaging/config.toml"),
            root.join("etc/localdns/config.toml"),
        )
        .expect("copy config.toml");
        // The package's config alone names no cluster upstream: refused.
        let out = check_config(&root, true);
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));

        let written = write_files(&file, &root);
        let drop_ins: Vec<&String> = written
            .iter()
            .filter(|p| p.starts_with("/etc/localdns/conf.d/") && p.ends_with(".toml"))
            .collect();
        assert_eq!(drop_ins.len(), 1, "{user_data}: one localdns drop-in");
        let out = check_config(&root, true);
        assert!(out.status.success(), "{user_data}: {}", text(&out));
        let effective: toml::Table =
            toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("rendered TOML");
        let addresses = effective["listen"]["addresses"].as_array().expect("list");
        let upstream = effective["cluster"]["upstream"].as_array().expect("list");
        println!(
            "{user_data}: {} passes: listen {addresses:?}, cluster upstream {upstream:?}",
            drop_ins[0]
        );
        assert!(!upstream.is_empty(), "{user_data}: no cluster upstream");
        assert!(
            addresses.iter().any(|a| a.as_str() == Some(LINK_LOCAL)),
            "{user_data}: {addresses:?}"
        );
        // Intercept mode in the kubeadm example: the kube-dns Service IP too.
        if user_data.ends_with("kubeadm-node.yaml") {
            assert!(
                addresses.iter().any(|a| a.as_str() == Some(SERVICE_IP)),
                "{addresses:?}"
            );
        }
    }
}

/// `cloud-init/node-resolver` with its files pointed at `resolv_conf`.
fn node_resolver(resolv_conf: &Path, arg: &str) -> Output {
    Command::new(repo("cloud-init/node-resolver"))
        .arg(arg)
        .env("LOCALDNS_RESOLV_CONF", resolv_conf)
        .env(
            "LOCALDNS_RESOLVED_CONF_DIR",
            resolv_conf.with_extension("d"),
        )
        .output()
        .expect("node-resolver")
}

#[test]
fn node_resolver_puts_the_link_local_address_first_and_removes_only_that() {
    let dir = tempfile::tempdir().expect("tmp");
    let resolv = dir.path().join("resolv.conf");
    let original = "# from DHCP\nsearch example.internal\noptions ndots:2 timeout:3\n\
                    nameserver 10.0.0.2\nnameserver 10.0.0.3\n";
    std::fs::write(&resolv, original).expect("write");
    let status = node_resolver(&resolv, "status");
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));

    let out = node_resolver(&resolv, "enable");
    assert!(out.status.success(), "{}", text(&out));
    let enabled = std::fs::read_to_string(&resolv).expect("read");
    println!("after enable:\n{enabled}");
    let nameservers: Vec<&str> = enabled
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(nameservers, [LINK_LOCAL, "10.0.0.2", "10.0.0.3"]);
    // Our timeout first: the file's own options line, later, still wins.
    assert!(enabled.starts_with("options timeout:1 "), "{enabled}");
    assert!(enabled.contains("options ndots:2 timeout:3\n"), "{enabled}");
    // What localdns reads from it: the real resolvers, never itself.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/localdns")).expect("mkdir");
    std::fs::write(
        root.join("etc/localdns/config.toml"),
        format!(
            "[upstream]\nresolv_conf = {:?}\n[network]\nsetup_interface = false\nsetup_rules = false\n",
            resolv.display().to_string()
        ),
    )
    .expect("write");
    let out = check_config(&root, false);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not forwarding to 169.254.20.10:53"),
        "{}",
        text(&out)
    );

    // Idempotent.
    assert!(node_resolver(&resolv, "enable").status.success());
    assert_eq!(std::fs::read_to_string(&resolv).expect("read"), enabled);
    assert_eq!(node_resolver(&resolv, "status").status.code(), Some(0));

    // Back to the byte.
    let out = node_resolver(&resolv, "disable");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&resolv).expect("read"), original);
    assert!(node_resolver(&resolv, "disable").status.success());
    assert_eq!(std::fs::read_to_string(&resolv).expect("read"), original);

    // glibc reads 3 nameservers: a fourth line is said to be lost.
    std::fs::write(
        &resolv,
        "nameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n",
    )
    .expect("write");
    let out = node_resolver(&resolv, "enable");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("warning"), "{}", text(&out));
    assert_eq!(node_resolver(&resolv, "bogus").status.code(), Some(64));
}

#[test]
fn provisioning_scripts_pass_shellcheck() {
    require_tools!("provisioning_scripts_pass_shellcheck", &["shellcheck"]);
    let out = run(
        "shellcheck",
        &[
            repo("cloud-init/node-resolver").to_str().expect("utf-8"),
            repo("cloud-init/image-bake.sh").to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

// ---------------------------------------------------------------- booted with cloud-init

/// The kube-dns-upstream Service IP in the examples: the fake kube-dns listens there.
const KUBE_DNS_UPSTREAM: &str = "10.96.0.11";
/// The node's own resolver (what DHCP would give it), in the node namespace.
const NODE_RESOLVER: &str = "10.244.0.53";
const CLUSTER_NAME: &str = "kubernetes.default.svc.cluster.local";
const CLUSTER_ADDR: &str = "10.96.0.1";
const EXTERNAL: &str = "www.example.com";
const EXTERNAL_ADDR: &str = "192.0.2.1";
/// Where the seed's `kubeadm join` stand-in writes what it saw.
const JOIN_STANDIN: &str = "/run/kubeadm-join-standin";

/// Replace the one line of `text` that starts (after indentation) with `prefix` by
/// `replacement`, keeping the indentation. Panics unless exactly one line matches, so that
/// a change to the example cannot make the test run something else silently.
fn replace_line(text: &str, prefix: &str, replacement: &str) -> String {
    let matching = text
        .lines()
        .filter(|l| l.trim_start().starts_with(prefix))
        .count();
    assert_eq!(matching, 1, "lines starting with {prefix:?}");
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with(prefix) {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}{replacement}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// kubeadm-node.yaml as the test's NoCloud seed: the package from `deb_url` (None: the
/// example's URL), and the join replaced by the stand-in.
fn seeded_user_data(deb_url: Option<&str>) -> String {
    let original = std::fs::read_to_string(repo("cloud-init/kubeadm-node.yaml")).expect("read");
    let with_url = match deb_url {
        Some(url) => replace_line(
            &original,
            "LOCALDNS_DEB_URL=",
            &format!("LOCALDNS_DEB_URL=\"{url}\""),
        ),
        None => original,
    };
    replace_line(
        &with_url,
        "kubeadm join ",
        &format!(
            "{{ systemctl is-active localdns.service; dig +short +time=2 +tries=1 @{LINK_LOCAL} {CLUSTER_NAME}; }} >{JOIN_STANDIN} 2>&1"
        ),
    )
}

/// The namespaces and fake servers of a cloud-init node: kube-dns behind the
/// kube-dns-upstream Service IP, and the node's own resolver.
struct Net {
    kube_dns: common::upstream::Upstream,
    resolver: common::upstream::Upstream,
    topo: Topology,
}

fn net(tag: &str) -> Net {
    let topo = Topology::new(tag);
    for addr in [KUBE_DNS_UPSTREAM, NODE_RESOLVER] {
        topo.node
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
    }
    let kube_dns = topo.node.run_in(|| {
        let up = common::upstream::Upstream::start_at(SocketAddr::new(
            KUBE_DNS_UPSTREAM.parse().expect("ip"),
            53,
        ));
        up.zone("cluster.local").a(CLUSTER_NAME, 30, CLUSTER_ADDR);
        up
    });
    let resolver = topo.node.run_in(|| {
        let up = common::upstream::Upstream::start_at(SocketAddr::new(
            NODE_RESOLVER.parse().expect("ip"),
            53,
        ));
        up.zone("example.com").a(EXTERNAL, 300, EXTERNAL_ADDR).a(
            "www2.example.com",
            300,
            "192.0.2.2",
        );
        up
    });
    Net {
        kube_dns,
        resolver,
        topo,
    }
}

/// A container of the cloud-init image with nothing of localdns, and the NoCloud seed.
fn seeded_container(tag: &str, user_data: &str) -> Container {
    let install = Install {
        binary: PathBuf::new(),
        standin_addresses: None,
        config: String::new(),
        units: Vec::new(),
        enable: Vec::new(),
        from_package: true,
    };
    let c = Container::prepare_on(rootfs::base_with_cloud_init(), tag, &install);
    c.write(
        "/var/lib/cloud/seed/nocloud/meta-data",
        &format!("instance-id: localdns-{tag}\nlocal-hostname: node-{tag}\n"),
    );
    c.write("/var/lib/cloud/seed/nocloud/user-data", user_data);
    // The test's environment, not the example's: only NoCloud is looked for, cloud-init
    // leaves the network of the test's namespace alone, and the locale is one the minimal
    // image has (for en_US.UTF-8, cloud-init's default, its `update-locale` fails).
    c.write(
        "/etc/cloud/cloud.cfg.d/90-localdns-test.cfg",
        "datasource_list: [ NoCloud ]\nnetwork: {config: disabled}\nlocale: C.UTF-8\n",
    );
    c
}

fn target(ip: &str, proto: Proto) -> Target {
    Target {
        proto,
        server: SocketAddr::new(ip.parse().expect("ip"), 53),
    }
}

/// Ask `name` over UDP from the pod every 50 ms (each attempt waits 50 ms for its answer)
/// until answered with `addr`; the moment it was.
fn first_answer(
    pod: &Netns,
    name: &'static str,
    addr: &'static str,
    within: Duration,
) -> Option<Instant> {
    let server = SocketAddr::new(LINK_LOCAL.parse().expect("ip"), 53);
    pod.run_in(move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.connect(server).expect("connect");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut buf = vec![0u8; 65535];
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let q = common::client::query(name, hickory_proto::rr::RecordType::A);
            // Nothing there yet: refused (ICMP) or no answer within 50 ms; ask again.
            if sock.send(&common::client::encode(&q)).is_err() {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let Ok(n) = sock.recv(&mut buf) else {
                continue;
            };
            let answered = hickory_proto::op::Message::from_vec(&buf[..n])
                .is_ok_and(|m| m.id() == q.id() && common::client::addrs(&m) == [addr]);
            if answered {
                return Some(Instant::now());
            }
        }
        None
    })
}

/// Both addresses in intercept mode (kubeadm-node.yaml); link-local mode holds only one.
const BOTH: &[&str] = &[LINK_LOCAL, SERVICE_IP];

fn assert_pod_answered(pod: &Netns, c: &Container, addresses: &[&str]) {
    for &ip in addresses {
        for proto in [Proto::Udp, Proto::Tcp] {
            let t = target(ip, proto);
            let m = load::ask(pod, t, CLUSTER_NAME).unwrap_or_else(|e| {
                panic!(
                    "{t}: no answer from the pod: {e}\n{}",
                    c.journal_text("localdns.service", 40)
                )
            });
            assert_eq!(common::client::addrs(&m), [CLUSTER_ADDR], "{t}: {m:?}");
        }
    }
}

fn assert_no_conntrack(node: &Netns, addresses: &[&str]) {
    for &ip in addresses {
        for dir in ["-d", "-s"] {
            let ct = node.exec("conntrack", &["-L", dir, ip]);
            let listed = String::from_utf8_lossy(&ct.stdout).into_owned();
            assert!(listed.trim().is_empty(), "conntrack {dir} {ip}:\n{listed}");
        }
    }
}

/// cloud-init's result: `status: done` and no errors, else the output log.
fn assert_cloud_init_done(c: &Container) {
    // cloud-init validates its merged config (the seed's user-data included) at boot.
    let journal = c.exec(&["journalctl", "-b", "--no-pager", "-o", "cat"]);
    assert!(
        !text(&journal).contains("Invalid cloud-config"),
        "cloud-init found the config invalid at boot:\n{}",
        text(&journal)
    );
    let status = c.exec(&["cloud-init", "status", "--long"]);
    let log = c.exec(&["cat", "/var/log/cloud-init-output.log"]);
    println!("cloud-init status --long:\n{}", text(&status).trim());
    assert!(
        status.status.success() && text(&status).contains("status: done"),
        "cloud-init did not finish cleanly:\n{}\n/var/log/cloud-init-output.log:\n{}",
        text(&status),
        text(&log)
    );
}

fn metric(name: &str, node: &Netns) -> f64 {
    let addr: SocketAddr = "127.0.0.1:9253".parse().expect("addr");
    let name = name.to_string();
    node.run_in(move || common::metrics::scrape(addr).value(&name, &[]))
}

/// Microseconds of CLOCK_MONOTONIC at which `prop` (a `...TimestampMonotonic`) of `unit`
/// was reached; the manager's own with `unit` empty.
fn monotonic(c: &Container, unit: &str, prop: &str) -> u64 {
    let mut args = vec!["systemctl", "show", "-P", prop];
    if !unit.is_empty() {
        args.push(unit);
    }
    c.ok(&args).trim().parse().unwrap_or(0)
}

/// Boot the seeded container while the pod asks 169.254.20.10 for a cluster name; then
/// check what cloud-init did: it finished cleanly, localdns is installed, enabled and
/// active, the join stand-in saw it active and answering, and pods get answers on both
/// addresses without conntrack. Prints the time from boot to the first answer.
/// Boot the seeded container; localdns must answer pods on `addresses` without conntrack,
/// and have been active and answering at the join.
fn boot_and_check(c: &mut Container, net: &Net, addresses: &[&str]) {
    let (pod, node) = (&net.topo.pod, &net.topo.node);
    let (booted_at, booted, first) = std::thread::scope(|s| {
        let poller =
            s.spawn(|| first_answer(pod, CLUSTER_NAME, CLUSTER_ADDR, Duration::from_secs(90)));
        let booted_at = Instant::now();
        c.boot(node);
        let booted = booted_at.elapsed();
        (booted_at, booted, poller.join().expect("poller"))
    });
    let first = first.unwrap_or_else(|| {
        panic!(
            "no answer from localdns within 90 s of the boot\n{}",
            c.journal_text("localdns.service", 40)
        )
    });
    let pid1 = monotonic(c, "", "UserspaceTimestampMonotonic");
    let ms = |t: u64| t.saturating_sub(pid1) / 1000;
    println!(
        "{}: from systemd-nspawn started to the first answer in the pod: {} ms          (`is-system-running` done at {} ms); after the container's systemd started:          cloud-final {} ms, localdns active {} ms",
        c.name,
        first.duration_since(booted_at).as_millis(),
        booted.as_millis(),
        ms(monotonic(c, "cloud-final.service", "ExecMainStartTimestampMonotonic")),
        ms(monotonic(c, "localdns.service", "ActiveEnterTimestampMonotonic")),
    );

    assert_cloud_init_done(c);
    assert_eq!(c.prop("localdns.service", "ActiveState"), "active");
    let enabled = c.systemctl(&["is-enabled", "localdns.service"]);
    assert_eq!(enabled.status.code(), Some(0), "{}", text(&enabled));
    let version = c.ok(&["dpkg-query", "-W", "-f", "${Version}", "localdns"]);
    assert_eq!(version, format!("{}-1", env!("CARGO_PKG_VERSION")));
    // At the join, localdns was active and answered the cluster name on 169.254.20.10.
    let join = c.ok(&["cat", JOIN_STANDIN]);
    assert_eq!(join.lines().collect::<Vec<_>>(), ["active", CLUSTER_ADDR]);

    // Pods: both addresses, UDP and TCP, without conntrack.
    let _ = node.exec("conntrack", &["-F"]);
    assert_pod_answered(pod, c, addresses);
    assert_no_conntrack(node, addresses);
    assert!(
        net.kube_dns.total() > 0,
        "kube-dns-upstream was never asked"
    );
}

fn deb_path_inside(deb: &Path) -> String {
    format!(
        "/var/cache/localdns-test/{}",
        deb.file_name().expect("name").to_string_lossy()
    )
}

#[test]
fn cloud_init_installs_and_starts_localdns_before_the_join() {
    require_root_and_tools!("cloud_init_installs_and_starts_localdns_before_the_join");
    let Some(deb) = harness::built_package("deb") else {
        return;
    };
    let _serial = harness::serial();
    let net = net("ci");
    let deb_inside = deb_path_inside(&deb);
    let user_data = seeded_user_data(Some(&format!("file://{deb_inside}")));
    let mut c = seeded_container("ci", &user_data);
    c.copy_in(&deb, &deb_inside);
    boot_and_check(&mut c, &net, BOTH);
    node_resolver_under_systemd_resolved(&net, &c);
}

/// ubuntu-node.yaml as the test's NoCloud seed: the repository `url` with the public key
/// `armored` in place of the example's, the join replaced by the stand-in, and
/// `preserve_sources_list` (the image's Debian mirror is not reachable from the test's
/// namespace: only this repository is a source).
fn seeded_repo_user_data(url: &str, armored: &str) -> String {
    let original = std::fs::read_to_string(repo("cloud-init/ubuntu-node.yaml")).expect("read");
    let with_source = replace_line(
        &original,
        "source: \"deb [signed-by=$KEY_FILE] ",
        &format!("source: \"deb [signed-by=$KEY_FILE] {url}/apt stable main\""),
    );
    let (begin, end) = (
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        "-----END PGP PUBLIC KEY BLOCK-----",
    );
    let (from, to) = (
        with_source.find(begin).expect("the example's key block"),
        with_source.find(end).expect("the example's key block") + end.len(),
    );
    let key: Vec<String> = armored
        .trim()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.to_string()
            } else {
                format!("        {l}")
            }
        })
        .collect();
    let with_key = format!(
        "{}{}{}",
        &with_source[..from],
        key.join("\n"),
        &with_source[to..]
    );
    let joined = replace_line(
        &with_key,
        "kubeadm join ",
        &format!(
            "{{ systemctl is-active localdns.service; dig +short +time=2 +tries=1 @{LINK_LOCAL} {CLUSTER_NAME}; }} >{JOIN_STANDIN} 2>&1"
        ),
    );
    let preserved = joined.replacen("\napt:\n", "\napt:\n  preserve_sources_list: true\n", 1);
    assert_ne!(preserved, joined, "no top-level apt: key");
    preserved
}

/// ubuntu-node.yaml as written: cloud-init adds the signed apt repository (its key in a
/// keyring of its own, `signed-by=`) and installs localdns from it before runcmd, served
/// over HTTP in the node namespace as a bucket would be; link-local mode, so pods ask
/// 169.254.20.10 only.
#[test]
fn cloud_init_installs_localdns_from_the_signed_repository() {
    let test = "cloud_init_installs_localdns_from_the_signed_repository";
    require_root_and_tools!(test);
    if let Some(why) =
        harness::missing_tool(&["python3", "gpg", "reprepro", "createrepo_c", "rpmsign"])
    {
        common::skipped::skipped(test, &why);
        return;
    }
    let Some(deb) = harness::built_package("deb") else {
        return;
    };
    let _serial = harness::serial();
    let work = tempfile::tempdir().expect("tmp");
    let key = harness::repo::release_key(work.path());
    let (release, site) = (work.path().join("release"), work.path().join("site"));
    std::fs::create_dir_all(&release).expect("mkdir");
    std::fs::copy(&deb, release.join(deb.file_name().expect("name"))).expect("copy");
    harness::repo::publish(&release, &site, &key);
    let armored = std::fs::read_to_string(site.join("localdns.asc")).expect("localdns.asc");

    let net = net("cirepo");
    let server = harness::repo::Server::start(&net.topo.node, &site);
    let user_data = seeded_repo_user_data(harness::repo::URL, &armored);
    let mut c = seeded_container("cirepo", &user_data);
    c.remove("/etc/apt/sources.list");
    c.remove("/etc/apt/sources.list.d/debian.sources");
    boot_and_check(&mut c, &net, &[LINK_LOCAL]);
    assert!(
        server.requests().contains("GET /apt/pool/main/l/localdns/"),
        "the package did not come from the repository:\n{}",
        server.requests()
    );
    let source = c.ok(&["cat", "/etc/apt/sources.list.d/localdns.list"]);
    assert!(
        source.contains("signed-by=") && source.contains(harness::repo::URL),
        "{source}"
    );
    // apt takes localdns from that source (and no other: it is the only one).
    let policy = c.ok(&["apt-cache", "policy", "localdns"]);
    assert!(policy.contains(harness::repo::URL), "{policy}");
}

/// `image-bake.sh` in the image tree (no systemd running, as in an image build), then the
/// same user-data at first boot. The package URL is left as in the example, which this
/// namespace cannot reach: the user-data must use the baked package.
#[test]
fn a_baked_image_gets_its_cluster_config_from_cloud_init() {
    require_root_and_tools!("a_baked_image_gets_its_cluster_config_from_cloud_init");
    let Some(deb) = harness::built_package("deb") else {
        return;
    };
    let _serial = harness::serial();
    let net = net("bake");
    let mut c = seeded_container("bake", &seeded_user_data(None));
    let deb_inside = deb_path_inside(&deb);
    c.copy_in(&deb, &deb_inside);
    c.copy_in(&repo("cloud-init/image-bake.sh"), "/root/image-bake.sh");
    let bake = |c: &Container| {
        Command::new("systemd-nspawn")
            .arg("-D")
            .arg(c.root())
            .args(["--register=no", "--keep-unit", "-q", "--private-network"])
            .args(["--pipe", "sh", "/root/image-bake.sh", &deb_inside])
            .output()
            .expect("systemd-nspawn")
    };
    // Cluster config in the image is refused.
    c.write("/etc/localdns/conf.d/50-cluster.toml", "[cluster]\n");
    let out = bake(&c);
    assert!(
        !out.status.success(),
        "baked with a drop-in:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("does not belong in an image"),
        "{}",
        text(&out)
    );
    c.remove("/etc/localdns/conf.d/50-cluster.toml");

    let out = bake(&c);
    println!("image-bake.sh:\n{}", text(&out));
    assert!(out.status.success(), "image-bake.sh:\n{}", text(&out));
    // (A link to an absolute path inside the image: read, not followed.)
    let wants = c.path("/etc/systemd/system/multi-user.target.wants/localdns.service");
    assert!(std::fs::read_link(&wants).is_ok(), "not enabled");
    assert!(c
        .path("/etc/systemd/system/localdns.service.d/10-image.conf")
        .exists());
    let conf_d: Vec<_> = std::fs::read_dir(c.path("/etc/localdns/conf.d"))
        .expect("conf.d")
        .collect();
    assert!(conf_d.is_empty(), "cluster config in the image: {conf_d:?}");
    assert!(!c.path("/var/lib/localdns/last-good.toml").exists());

    boot_and_check(&mut c, &net, BOTH);
    // Until the drop-in existed, the baked unit did not start on the package's config.
    let journal = c.journal_text("localdns.service", 200);
    if journal.contains("unmet condition check") {
        println!("at boot, before cloud-init wrote the drop-in, localdns was skipped: ConditionPathExistsGlob");
    }
}

/// The opt-in under systemd-resolved, on the booted node: the node's link resolver is
/// `NODE_RESOLVER` (set as DHCP would, per link), then `node-resolver enable`.
fn node_resolver_under_systemd_resolved(net: &Net, c: &Container) {
    let (pod, node) = (&net.topo.pod, &net.topo.node);
    c.ok(&["resolvectl", "dns", "veth-pod", NODE_RESOLVER]);
    let resolved_file = "/run/systemd/resolve/resolv.conf";
    let out = c.ok(&["/usr/libexec/localdns/node-resolver", "enable"]);
    println!("node-resolver enable: {out}");
    c.wait_for(
        "169.254.20.10 first in resolved's resolv.conf",
        Duration::from_secs(10),
        |c| {
            let file = c.ok(&["cat", resolved_file]);
            let ns: Vec<&str> = file
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver "))
                .collect();
            ns == [LINK_LOCAL, NODE_RESOLVER]
        },
    );
    println!("{resolved_file}:\n{}", c.ok(&["cat", resolved_file]));
    // localdns reads that file: it takes the real resolver and refuses itself.
    c.wait_for(
        "localdns to forward external names",
        Duration::from_secs(10),
        |_| {
            load::ask(pod, target(LINK_LOCAL, Proto::Udp), EXTERNAL)
                .is_ok_and(|m| common::client::addrs(&m) == [EXTERNAL_ADDR])
        },
    );
    // It may have re-read the file before node-resolver changed it: wait for the re-read.
    c.wait_for(
        "localdns to say it refuses itself as an upstream",
        Duration::from_secs(10),
        |c| {
            c.journal_text("localdns.service", 200)
                .contains("not forwarding to 169.254.20.10:53")
        },
    );

    // No loop: a name no upstream answers reaches the real resolver at most `attempts`
    // (3) times, and localdns is asked once (a loop would ask it again).
    let silent = "nowhere.example.com";
    net.resolver.set_name_delay(silent, Duration::from_secs(60));
    let (q0, u0) = (
        metric("localdns_queries_total", node),
        metric("localdns_upstream_queries_total", node),
    );
    let started = Instant::now();
    let out = pod.exec(
        "dig",
        &["+tries=1", "+time=10", &format!("@{LINK_LOCAL}"), silent],
    );
    let took = started.elapsed();
    let (q1, u1) = (
        metric("localdns_queries_total", node),
        metric("localdns_upstream_queries_total", node),
    );
    let at_resolver = net.resolver.count(silent, hickory_proto::rr::RecordType::A);
    println!(
        "unanswered name: SERVFAIL after {} ms; the real resolver got it {at_resolver} times; \
         localdns: {} queries in, {} upstream",
        took.as_millis(),
        q1 - q0,
        u1 - u0
    );
    assert!(text(&out).contains("SERVFAIL"), "{}", text(&out));
    assert!(
        (1..=3).contains(&at_resolver),
        "{at_resolver} upstream queries"
    );
    assert!(u1 - u0 <= 3.0, "{} upstream queries", u1 - u0);
    assert_eq!(q1 - q0, 1.0, "localdns was asked again: a loop");
    assert_eq!(
        net.kube_dns.count(silent, hickory_proto::rr::RecordType::A),
        0
    );

    // The node itself resolves through resolved, which asks localdns too.
    let before = metric("localdns_queries_total", node);
    let got = c.ok(&["getent", "ahostsv4", EXTERNAL]);
    assert!(got.contains(EXTERNAL_ADDR), "{got}");
    assert!(
        metric("localdns_queries_total", node) > before,
        "the node's lookup did not reach localdns"
    );

    // localdns stopped: the node still resolves external names (from the link's resolver).
    c.ok(&["systemctl", "stop", "localdns.service"]);
    let started = Instant::now();
    let got = c.exec(&["getent", "ahostsv4", "www2.example.com"]);
    let took = started.elapsed();
    println!(
        "localdns stopped: the node resolved www2.example.com in {} ms",
        took.as_millis()
    );
    assert!(text(&got).contains("192.0.2.2"), "{}", text(&got));
}
