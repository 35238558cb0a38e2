//! localdns under a real systemd: the unit in `systemd/` and the daemon's side of the
//! systemd contract, tested in a Debian bookworm (systemd 252) booted with
//! `systemd-nspawn --boot` inside a node network namespace the test creates, with a pod
//! namespace joined to it by a veth pair and a fake kube-dns in the node namespace.
//!
//! Needs root and the tools `.ci/run` installs (systemd-container, mmdebstrap, zstd; for the
//! repository test also python3, gpg, reprepro, createrepo_c and rpmsign); each
//! test says `SKIPPED` with the reason otherwise. The root filesystem is built once into
//! `target/tmp/systemd-test/` (about 80 MB); whole-boot journals of the last run are kept
//! in `target/tmp/systemd-test/logs/`.
//!
//! Readiness is waited for, never slept on: `is-system-running --wait` for the boot,
//! `systemctl` (which returns once a Type=notify unit sent READY=1), and polling of unit
//! properties or the journal with a deadline.

mod common;
#[path = "systemd/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use harness::container::{text, Container, Entry, Install};
use harness::load::{Proto, Stream, Target};
use harness::netns::{LINK_LOCAL, SERVICE_IP};
use harness::{built_package, Node, Options};

const UNIT: &str = "localdns.service";
/// The link-local fallback relay, wanted by localdns.service.
const RELAY: &str = "localdns-fallback.service";
const LINK: &str = "nodelocaldns";
/// Queries per second to each of the four targets: 400/s in all.
const RATE: u32 = 100;

/// systemd's catalogue IDs of "Starting UNIT..." and "Started UNIT." (unit became active).
const MSG_UNIT_STARTING: &str = "7d4958e842da4a758f6c1cdc7b36dcc5";
const MSG_UNIT_STARTED: &str = "39f53479d3a045ac8e11786248231fbf";

fn position(entries: &[Entry], what: &str, f: impl Fn(&Entry) -> bool) -> usize {
    entries
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no journal entry: {what}"))
}

fn field<'a>(e: &'a Entry, name: &str) -> &'a str {
    e.get(name).map_or("", String::as_str)
}

/// The prepared (not booted) container tree, for the static unit checks.
fn staged(tag: &str) -> Container {
    let install = Install {
        binary: common::daemon::bin().into(),
        standin_addresses: None,
        config: harness::node_config("127.0.0.1:53".parse().unwrap()),
        units: Vec::new(),
        enable: vec![UNIT.into()],
        from_package: false,
    };
    Container::prepare(tag, &install)
}

// ---------------------------------------------------------------- the unit, statically

#[test]
fn unit_verify_is_clean() {
    require_root_and_tools!("unit_verify_is_clean");
    let c = staged("verify");
    for unit in [UNIT, RELAY] {
        // verify exits 0 on unknown keys and unknown Type= values: its output is the verdict.
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", c.root().display()))
            .arg(unit)
            .output()
            .expect("systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("systemd-analyze verify {unit}: {} {text:?}", out.status);
        assert!(out.status.success() && text.trim().is_empty(), "{text}");
    }
    let sh = std::process::Command::new("sh")
        .arg("-n")
        .arg(c.path("/usr/libexec/localdns/stop-post"))
        .status()
        .expect("sh");
    assert!(sh.success(), "stop-post does not parse");
}

#[test]
fn unit_security_exposure_at_most_2() {
    require_root_and_tools!("unit_security_exposure_at_most_2");
    let c = staged("security");
    for unit in [UNIT, RELAY] {
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", c.root().display()))
            .arg(unit)
            .output()
            .expect("systemd-analyze");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.starts_with('✗')) {
            println!("{line}");
        }
        let score: f64 = text
            .lines()
            .find_map(|l| l.split(&format!("exposure level for {unit}:")).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
        println!("{unit} exposure score: {score}");
        assert!(score <= 2.0, "{unit}: exposure {score} > 2.0:\n{text}");
    }
}

// ---------------------------------------------------------------- start, answers, journal

#[test]
fn start_becomes_active_on_ready_and_answers_pods() {
    require_root_and_tools!("start_becomes_active_on_ready_and_answers_pods");
    let node = Node::boot("start", Options::default());
    let c = &node.c;
    assert_eq!(
        c.prop(UNIT, "ActiveState"),
        "inactive",
        "started before we asked"
    );

    // The unit as systemd 252 loaded it: Type=notify-reload would load as "simple".
    let props: HashMap<&str, String> = [
        "Type",
        "NotifyAccess",
        "Restart",
        "FileDescriptorStoreMax",
        "Before",
        "After",
        "Wants",
        "Requires",
        "MemoryMax",
        "UnitFileState",
    ]
    .into_iter()
    .map(|p| (p, c.prop(UNIT, p)))
    .collect();
    println!("unit properties: {props:?}");
    assert_eq!(props["Type"], "notify");
    assert_eq!(props["NotifyAccess"], "main");
    assert_eq!(props["Restart"], "always");
    assert_ne!(props["FileDescriptorStoreMax"], "0");
    assert!(props["Before"].split(' ').any(|u| u == "kubelet.service"));
    for dep in ["After", "Wants", "Requires"] {
        assert!(
            !props[dep].contains("network-online"),
            "{dep}={}",
            props[dep]
        );
    }
    assert_eq!(props["MemoryMax"], (256u64 << 20).to_string());

    // Start without waiting and watch the state until it settles.
    c.ok(&["systemctl", "start", "--no-block", UNIT]);
    let mut states = vec![];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.prop(UNIT, "ActiveState");
        if states.last() != Some(&s) {
            states.push(s.clone());
        }
        if s == "active" || s == "failed" || Instant::now() > deadline {
            break;
        }
    }
    println!("states seen while starting: {states:?}");
    assert_eq!(
        states.last().map(String::as_str),
        Some("active"),
        "{}",
        c.journal_text(UNIT, 40)
    );
    // Active means serving, at once.
    node.assert_pod_answered();
    // Only known once started (before, 252 shows "infinity").
    let watchdog = c.prop(UNIT, "WatchdogUSec");
    assert!(
        !["0", "infinity", ""].contains(&watchdog.as_str()),
        "WatchdogUSec={watchdog}"
    );

    // The journal's order: systemd's "Starting" (activating), then the daemon's start-up
    // line, written before it sends READY=1, then systemd's "Started" (active).
    let j = c.journal(UNIT);
    let main_pid = node.main_pid().to_string();
    let starting = position(&j, "Starting", |e| {
        field(e, "MESSAGE_ID") == MSG_UNIT_STARTING
    });
    let serving = position(&j, "daemon start-up line with LISTEN", |e| {
        field(e, "_PID") == main_pid && e.keys().any(|k| k.ends_with("LISTEN"))
    });
    let started = position(&j, "Started", |e| {
        field(e, "MESSAGE_ID") == MSG_UNIT_STARTED
    });
    assert!(
        starting < serving && serving < started,
        "journal order Starting {starting}, start-up line {serving}, Started {started}"
    );
    let active = c
        .prop(UNIT, "ActiveEnterTimestampMonotonic")
        .parse::<u64>()
        .unwrap();
    let exec = c
        .prop(UNIT, "ExecMainStartTimestampMonotonic")
        .parse::<u64>()
        .unwrap();
    println!(
        "main process started {exec} µs, active at {active} µs: READY after {} µs",
        active - exec
    );
    assert!(exec < active);

    // Start-up lines carry structured fields; logged through the journal protocol.
    let line = &j[serving];
    let listen = line
        .iter()
        .find(|(k, _)| k.ends_with("LISTEN"))
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    println!(
        "start-up line: MESSAGE={:?} LISTEN={listen:?} fields {:?}",
        field(line, "MESSAGE"),
        line.keys()
            .filter(|k| !k.starts_with('_'))
            .collect::<Vec<_>>()
    );
    assert!(
        listen.contains(&format!("{LINK_LOCAL}:53"))
            && listen.contains(&format!("{SERVICE_IP}:53"))
    );
    assert_eq!(
        field(line, "_TRANSPORT"),
        "journal",
        "not structured journald logging"
    );
    assert_eq!(field(line, "SYSLOG_IDENTIFIER"), "localdns");
    let status = c.prop(UNIT, "StatusText");
    println!("STATUS: {status:?}");
    assert!(!status.is_empty(), "no STATUS= text");

    // The link, the addresses on it, and DNS skipping conntrack.
    let addrs = node.net.node.ip(&["-o", "addr", "show", "dev", LINK]);
    assert!(
        addrs.contains(LINK_LOCAL) && addrs.contains(SERVICE_IP),
        "{addrs}"
    );
    let mut dig = node.net.pod.exec(
        "dig",
        &[
            "+time=2",
            "+tries=1",
            &format!("@{LINK_LOCAL}"),
            harness::WWW,
            "A",
        ],
    );
    let dig_out = String::from_utf8_lossy(&dig.stdout).into_owned();
    assert!(
        dig.status.success() && dig_out.contains(harness::WWW_ADDR),
        "{dig_out}"
    );
    dig = node.net.pod.exec(
        "dig",
        &[
            "+tcp",
            "+time=2",
            "+tries=1",
            &format!("@{SERVICE_IP}"),
            harness::WWW,
        ],
    );
    assert!(String::from_utf8_lossy(&dig.stdout).contains(harness::WWW_ADDR));
    for proto in ["udp", "tcp"] {
        let ct = node
            .net
            .node
            .exec("conntrack", &["-L", "-p", proto, "--dport", "53"]);
        let listed = String::from_utf8_lossy(&ct.stdout).into_owned();
        assert!(
            listed.trim().is_empty(),
            "conntrack entries for {proto}/53:\n{listed}"
        );
    }
}

// ---------------------------------------------------------------- reload

/// A second upstream in the node namespace for the zone `corp.example`.
fn corp_upstream(node: &Node) -> common::upstream::Upstream {
    node.net.node.run_in(|| {
        let up = common::upstream::Upstream::start();
        up.zone("corp.example");
        for i in 0..10 {
            up.a(&format!("h{i}.corp.example"), 300, "192.0.2.99");
        }
        up
    })
}

/// A conf.d drop-in that sends `corp.example` to `corp`.
fn add_corp_stub(node: &Node, corp: &common::upstream::Upstream) {
    node.c.write(
        "/etc/localdns/conf.d/20-corp.toml",
        &format!(
            "[[stub]]\nzone = \"corp.example\"\nservers = [\"{}\"]\n",
            corp.addr
        ),
    );
}

/// Wait until names under `corp.example` get the corp upstream's answer, asking a
/// different name each time so that nothing cached before the change is seen.
fn wait_corp_answers(node: &Node, what: &str) {
    let mut i = 1;
    node.c.wait_for(what, Duration::from_secs(10), |_| {
        i += 1;
        answer(node, &format!("h{}.corp.example", i % 10)) == ["192.0.2.99"]
    });
}

fn answer(node: &Node, name: &str) -> Vec<String> {
    let t = Target {
        proto: Proto::Udp,
        server: format!("{LINK_LOCAL}:53").parse().unwrap(),
    };
    harness::load::ask(&node.net.pod, t, name)
        .map(|m| common::client::addrs(&m))
        .unwrap_or_default()
}

/// Poll the journal of the current main process until an entry mentions all of `words`.
fn wait_journal(node: &Node, what: &str, words: &[&str]) -> Entry {
    let mut found = None;
    node.c.wait_for(what, Duration::from_secs(10), |c| {
        found = c
            .journal(UNIT)
            .into_iter()
            .find(|e| words.iter().all(|w| e.values().any(|v| v.contains(w))));
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn reload_applies_a_good_config_and_keeps_serving_on_a_bad_one() {
    require_root_and_tools!("reload_applies_a_good_config_and_keeps_serving_on_a_bad_one");
    let node = Node::boot("reload", Options::default());
    let corp = corp_upstream(&node);
    node.start_localdns();
    let pid = node.main_pid();
    // Before: corp.example goes to the default upstream, which does not know it.
    assert!(answer(&node, "h0.corp.example").is_empty());

    // Good: a drop-in adds the stub zone; `systemctl reload` (SIGHUP) applies it.
    add_corp_stub(&node, &corp);
    node.c.ok(&["systemctl", "reload", UNIT]);
    wait_corp_answers(&node, "the stub zone to answer after reload");
    assert_eq!(
        node.main_pid(),
        pid,
        "reload restarted the daemon instead of reloading"
    );
    assert_eq!(node.c.prop(UNIT, "ActiveState"), "active");

    // Bad: a drop-in with a type error on line 2. Refused with file, line and reason; the
    // old config keeps serving.
    node.c.write(
        "/etc/localdns/conf.d/50-bad.toml",
        "[cache]\ncapacity = \"lots\"\n",
    );
    node.c.ok(&["systemctl", "reload", UNIT]);
    let e = wait_journal(
        &node,
        "the bad file named in the journal",
        &["/etc/localdns/conf.d/50-bad.toml:2", "cache.capacity"],
    );
    println!(
        "journal: {:?} (priority {})",
        field(&e, "MESSAGE"),
        field(&e, "PRIORITY")
    );
    assert_eq!(node.main_pid(), pid, "a bad config restarted the daemon");
    assert_eq!(node.c.prop(UNIT, "ActiveState"), "active");
    assert_eq!(
        answer(&node, "h3.corp.example"),
        ["192.0.2.99"],
        "old config stopped serving"
    );
    node.assert_pod_answered();
    let status = node.c.prop(UNIT, "StatusText");
    println!("STATUS after the bad reload: {status:?}");
    assert!(
        status.contains("50-bad.toml"),
        "STATUS= does not name the bad file: {status:?}"
    );
    // As a person reads it (`journalctl -u localdns`, `systemctl status`): the message
    // text alone names the file, line, key and reason, not only the journal fields.
    let shown = node
        .c
        .ok(&["journalctl", "-b", "-u", UNIT, "-o", "cat", "--no-pager"]);
    let line = shown
        .lines()
        .find(|l| l.contains("config refused"))
        .unwrap_or_else(|| panic!("no refusal in the journal as shown:\n{shown}"));
    println!("journalctl -o cat: {line}");
    for want in [
        "/etc/localdns/conf.d/50-bad.toml:2",
        "cache.capacity",
        "previous config keeps serving",
    ] {
        assert!(line.contains(want), "{want:?} missing from {line:?}");
    }
}

#[test]
fn a_change_under_conf_d_is_applied_without_sighup() {
    require_root_and_tools!("a_change_under_conf_d_is_applied_without_sighup");
    let node = Node::boot("watch", Options::default());
    let corp = corp_upstream(&node);
    node.start_localdns();
    let pid = node.main_pid();
    assert!(answer(&node, "h0.corp.example").is_empty());
    add_corp_stub(&node, &corp);
    wait_corp_answers(&node, "the conf.d change to be applied");
    assert_eq!(node.main_pid(), pid, "the change restarted the daemon");
}

// ---------------------------------------------------------------- restart and crash

/// Run the query stream from the pod around `disrupt`, which returns once localdns is
/// back; print and return the counts.
fn under_load(node: &Node, what: &str, disrupt: impl FnOnce(&Node)) -> harness::load::Report {
    // Warm the cache so the stream measures serving, not the first upstream round trips.
    for name in harness::load_names() {
        let _ = answer(node, &name);
    }
    let stream = Stream::start(&node.net.pod, Node::targets(), RATE, harness::load_names());
    // Some steady traffic before and after; these waits pace the load, they do not
    // synchronise with anything.
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    disrupt(node);
    let back = t.elapsed();
    std::thread::sleep(Duration::from_millis(700));
    let report = stream.finish();
    println!(
        "{what}: localdns back after {back:?}; {} queries/s per target:\n{report}",
        RATE
    );
    report
}

/// Names for a stream of hits (the warmed `hits`) and, every third query, a name never
/// asked before: misses in flight at whatever happens.
fn hits_and_misses(hits: &[String]) -> Vec<String> {
    harness::miss_names()
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            [
                hits[i % hits.len()].clone(),
                hits[(i + 7) % hits.len()].clone(),
                m.clone(),
            ]
        })
        .collect()
}

/// Bridge scopes (src/bridge.rs) the node's systemd knows.
fn bridge_scopes(node: &Node) -> String {
    node.c.ok(&[
        "systemctl",
        "list-units",
        "--all",
        "--no-legend",
        "--plain",
        "localdns-bridge-*",
    ])
}

/// `systemctl restart` under a stream of hits and misses to all four targets: a bridge
/// process in a scope of its own serves while the unit stops and starts (src/bridge.rs),
/// so no query waits for the stop, the hooks and the start (190-350 ms here without it).
/// No query lost or retried, the slowest answer far below that, the link kept, the
/// cache kept (no name asked before reaches kube-dns again), and the bridge gone once the
/// new main process reads the sockets.
#[test]
fn restart_under_load_loses_no_query() {
    require_root_and_tools!("restart_under_load_loses_no_query");
    let node = Node::boot("restart", Options::default());
    node.start_localdns();
    let link = node.net.node_link_index(LINK).expect("no link after start");
    let Switch {
        report,
        hits,
        asked,
        new,
        ..
    } = switch_under_load(&node, "systemctl restart", &["systemctl", "restart", UNIT]);
    let journal = node.c.journal_text(UNIT, 60);
    assert_eq!(
        node.net.node_link_index(LINK),
        Some(link),
        "the link was removed and re-created during the restart"
    );
    assert!(
        journal.contains("serves across the restart"),
        "no bridge across the restart:\n{journal}"
    );
    assert_no_gap(&node, "the restart", &report, &journal, &hits, &asked);
    assert!(
        journal.contains("served across the restart; told to stop"),
        "the new main process did not dismiss the bridge:\n{journal}"
    );
    node.c
        .wait_for("the bridge scope to end", Duration::from_secs(10), |_| {
            bridge_scopes(&node).trim().is_empty()
        });
    node.assert_pod_answered();
    assert_eq!(node.main_pid(), new);
}

/// `localdns handover` (the package upgrade path) under a stream of hits and misses to all
/// four targets: the new process reads the sockets before the old one stops, so nothing
/// waits for a stop and a start. No query lost or retried, the slowest answer far below a
/// restart's (which waits for the stop, the hooks and the start: 190-350 ms here), the
/// cache kept (no name asked before reaches kube-dns again), and systemd saw no stop: no
/// restart counted, no stop hook run.
#[test]
fn a_handover_under_load_has_no_gap_and_keeps_the_cache() {
    require_root_and_tools!("a_handover_under_load_has_no_gap_and_keeps_the_cache");
    let node = Node::boot("handover", Options::default());
    node.start_localdns();
    let Switch {
        report,
        hits,
        asked,
        new,
        ..
    } = switch_under_load(&node, "localdns handover", &["localdns", "handover"]);
    let journal = node.c.journal_text(UNIT, 40);
    assert_no_gap(&node, "the hand-over", &report, &journal, &hits, &asked);
    assert!(
        journal.contains(&format!("handed over to process {new}")),
        "{journal}"
    );
    assert_eq!(node.c.prop(UNIT, "NRestarts"), "0", "{journal}");
    assert!(
        !journal.contains("stop-post"),
        "the stop hook ran:\n{journal}"
    );
    // The new main process answers and pings the watchdog: still active a while later.
    node.assert_pod_answered();
    assert_eq!(node.main_pid(), new);
}

/// What [`switch_under_load`] saw.
struct Switch {
    report: harness::load::Report,
    /// The names asked (and cached) before, and how often each reached kube-dns.
    hits: Vec<String>,
    asked: Vec<usize>,
    /// The main process after the switch.
    new: u32,
}

/// Warm the cache with the load names, then run `cmd` (a restart or a hand-over) under a
/// stream of those hits and misses to all four targets; returns once a new main process
/// is there and the stream has run on after it.
fn switch_under_load(node: &Node, what: &str, cmd: &[&str]) -> Switch {
    let pid = node.main_pid();
    let hits = harness::load_names();
    for name in &hits {
        assert!(!answer(node, name).is_empty(), "{name}");
    }
    let asked = upstream_counts(node, &hits);
    let stream = Stream::start(&node.net.pod, Node::targets(), RATE, hits_and_misses(&hits));
    // Steady traffic before and after; these waits pace the load, they synchronise nothing.
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    let out = node.c.ok(cmd);
    let new = node.wait_new_main_pid(pid, Duration::from_secs(15));
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(700));
    let report = stream.finish();
    println!(
        "{what} ({}) in {took:?}; {RATE} queries/s per target:\n{report}",
        out.trim()
    );
    Switch {
        report,
        hits,
        asked,
        new,
    }
}

/// Across `what`, no query was lost or retried, none waited for a process to stop and
/// another to start, and no name of `hits` reached kube-dns beyond the counts `asked`.
fn assert_no_gap(
    node: &Node,
    what: &str,
    report: &harness::load::Report,
    journal: &str,
    hits: &[String],
    asked: &[usize],
) {
    let total = report.total();
    assert!(total.sent > 0);
    assert_eq!(
        total.unanswered(),
        0,
        "queries lost across {what}:\n{report}\n{journal}"
    );
    assert_eq!(total.retried, 0, "{what} made clients retry:\n{report}");
    // A correctness bound, not a speed target (bench/ has those): an answer that waited for
    // a process to stop and another to start would take 150 ms and more.
    assert!(
        total.slowest < Duration::from_millis(100),
        "a query waited {:?} across {what}:\n{report}\n{journal}",
        total.slowest
    );
    assert_eq!(
        upstream_counts(node, hits),
        asked,
        "names cached before {what} were asked upstream again:\n{journal}"
    );
}

/// Queries each of `names` made the fake kube-dns (the node's only upstream) see.
fn upstream_counts(node: &Node, names: &[String]) -> Vec<usize> {
    names
        .iter()
        .map(|n| node.upstream.count(n, hickory_proto::rr::RecordType::A))
        .collect()
}

/// `localdns_cache_snapshot_entries` of the running daemon (0 when it does not answer).
fn snapshot_entries(node: &Node) -> f64 {
    node.net.node.run_in(|| {
        common::metrics::http_get("127.0.0.1:9253".parse().unwrap(), "/metrics")
            .map(|(_, body)| {
                common::metrics::parse(&body).value("localdns_cache_snapshot_entries", &[])
            })
            .unwrap_or(0.0)
    })
}

#[test]
fn the_cache_survives_a_restart_and_a_kill_9() {
    require_root_and_tools!("the_cache_survives_a_restart_and_a_kill_9");
    let node = Node::boot("warm", Options::default());
    node.start_localdns();
    let names = harness::load_names();
    let (before_restart, before_kill) = names.split_at(names.len() / 2);
    for name in before_restart {
        assert!(!answer(&node, name).is_empty(), "{name}");
    }
    let asked = upstream_counts(&node, &names);
    let pid = node.main_pid();
    node.c.ok(&["systemctl", "restart", UNIT]);
    let pid = node.wait_new_main_pid(pid, Duration::from_secs(15));
    assert_answered_from_the_cache(&node, "the restart", before_restart, &names, &asked);

    for name in before_kill {
        assert!(!answer(&node, name).is_empty(), "{name}");
    }
    let asked = upstream_counts(&node, &names);
    // A kill -9 keeps what the last periodic snapshot held: wait until one has them all.
    node.c.wait_for(
        "a cache snapshot with every name",
        Duration::from_secs(30),
        |_| snapshot_entries(&node) >= names.len() as f64,
    );
    node.c.ok(&["kill", "-KILL", &pid.to_string()]);
    node.wait_new_main_pid(pid, Duration::from_secs(15));
    assert_answered_from_the_cache(&node, "kill -9", &names, &names, &asked);
}

/// After `what`, every one of `cached` is answered, no name of `all` reached the upstream
/// beyond the counts `asked`, and the journal says the new process took `cached` over.
fn assert_answered_from_the_cache(
    node: &Node,
    what: &str,
    cached: &[String],
    all: &[String],
    asked: &[usize],
) {
    for name in cached {
        assert!(!answer(node, name).is_empty(), "{name} after {what}");
    }
    assert_eq!(
        upstream_counts(node, all),
        asked,
        "names cached before {what} were asked upstream again:\n{}",
        node.c.journal_text(UNIT, 30)
    );
    let j = node.c.journal_text(UNIT, 40);
    let taken = format!(
        "cache: {} answers taken over from the previous process",
        cached.len()
    );
    assert!(j.contains(&taken), "{j}");
}

#[test]
fn kill_9_under_load_loses_no_query() {
    require_root_and_tools!("kill_9_under_load_loses_no_query");
    let node = Node::boot("kill", Options::default());
    node.start_localdns();
    let link = node.net.node_link_index(LINK).expect("no link after start");
    let pid = node.main_pid();
    let report = under_load(&node, "kill -9 of the main process", |n| {
        n.c.ok(&["kill", "-KILL", &pid.to_string()]);
        n.wait_new_main_pid(pid, Duration::from_secs(15));
    });
    assert_eq!(node.c.prop(UNIT, "NRestarts"), "1");
    assert_eq!(
        node.net.node_link_index(LINK),
        Some(link),
        "the link was re-created"
    );
    let total = report.total();
    assert!(total.sent > 0);
    assert_eq!(
        total.unanswered(),
        0,
        "unanswered queries across kill -9:\n{report}"
    );
    // With the sockets kept, a client retries only what the killed process itself held:
    // at most a datagram per UDP socket it was answering and the TCP connections it had
    // accepted, a handful at this rate.
    assert!(
        total.retried <= 8,
        "{} queries needed a retry:\n{report}",
        total.retried
    );
}

// ---------------------------------------------------------------- watchdog

#[test]
fn watchdog_keeps_a_pinging_daemon_and_restarts_a_wedged_one() {
    require_root_and_tools!("watchdog_keeps_a_pinging_daemon_and_restarts_a_wedged_one");
    let node = Node::boot("watchdog", Options::default());
    let c = &node.c;
    // A short interval so that the test waits seconds, not the unit's 10 s.
    c.write(
        "/etc/systemd/system/localdns.service.d/50-test-watchdog.conf",
        "[Service]\nWatchdogSec=2s\n",
    );
    c.ok(&["systemctl", "daemon-reload"]);
    node.start_localdns();
    let pid = node.main_pid();
    // Time is what is under test here: three intervals without a ping would be a kill.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        (node.main_pid(), c.prop(UNIT, "NRestarts").as_str()),
        (pid, "0"),
        "the watchdog killed a healthy daemon: it does not send WATCHDOG=1\n{}",
        c.journal_text(UNIT, 20)
    );
    // Wedge one serving loop, not the process: SIGSTOP (even sent to one thread with
    // tgkill) stops the whole thread group, so the thread `udp-0` is stopped with ptrace
    // instead (PTRACE_SEIZE + PTRACE_INTERRUPT stop only that thread). Every other thread
    // runs on, the watchdog task included: only its check of each loop's heartbeat can
    // stop the pings, and then systemd aborts the daemon and restarts it.
    let tid = c
        .host_thread(pid, "udp-0")
        .expect("no thread udp-0 in the daemon");
    let stopped = StoppedThread::new(tid);
    node.wait_new_main_pid(pid, Duration::from_secs(30));
    drop(stopped);
    let j = c.journal(UNIT);
    assert!(j
        .iter()
        .any(|e| field(e, "MESSAGE").contains("Watchdog timeout")));
    assert!(
        j.iter()
            .any(|e| field(e, "MESSAGE").contains("stopped going round their loop")),
        "the pings stopped for another reason than the stopped loop"
    );
    node.assert_pod_answered();
}

/// One thread of another process held stopped by ptrace until this is dropped. The
/// tracer is a thread of its own: ptrace ties a tracee to the thread that attached.
struct StoppedThread {
    release: Option<std::sync::mpsc::Sender<()>>,
    tracer: Option<std::thread::JoinHandle<()>>,
}

impl StoppedThread {
    fn new(tid: u32) -> StoppedThread {
        use nix::sys::ptrace;
        use nix::unistd::Pid;
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (ready, attached) = std::sync::mpsc::channel();
        let tracer = std::thread::spawn(move || {
            let t = Pid::from_raw(tid as i32);
            let r = ptrace::seize(t, ptrace::Options::empty()).and_then(|()| ptrace::interrupt(t));
            let ok = r.is_ok();
            let _ = ready.send(r);
            if !ok {
                return;
            }
            // Held until released; exiting the tracer thread detaches (and resumes it if
            // the process still exists). Meanwhile the tracer reaps the thread when the
            // process is killed: a traced thread that exits stays a zombie until its tracer
            // waits for it, and the process would not be seen to exit.
            loop {
                use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
                let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
                if matches!(
                    waitpid(t, Some(flags)),
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
                ) {
                    break;
                }
                if !matches!(
                    wait.recv_timeout(Duration::from_millis(50)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            }
        });
        attached
            .recv()
            .expect("tracer thread")
            .unwrap_or_else(|e| panic!("ptrace thread {tid}: {e}"));
        StoppedThread {
            release: Some(release),
            tracer: Some(tracer),
        }
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.tracer.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- stop

#[test]
fn stop_leaves_no_link_and_no_rule() {
    require_root_and_tools!("stop_leaves_no_link_and_no_rule");
    let node = Node::boot("stop", Options::default());
    let tables_before = node.c.ok(&["nft", "list", "tables"]);
    node.start_localdns();
    assert!(
        node.net.node_link_index(LINK).is_some(),
        "setup made no link"
    );
    let before = node.net.node_rules();
    assert!(
        before.contains(LINK_LOCAL),
        "setup installed no rule:\n{before}"
    );
    // No KUBE-* chain on this node: `auto` picked the nftables backend.
    assert!(
        before.contains("# nftables\ntable inet localdns {"),
        "{before}"
    );

    node.c.ok(&["systemctl", "stop", UNIT]);
    assert_eq!(node.c.prop(UNIT, "ActiveState"), "inactive");
    assert_eq!(
        node.net.node_link_index(LINK),
        None,
        "link {LINK} left behind"
    );
    // The relay stays for the link-local address (it started with localdns, which wants
    // it); stopped too, it leaves nothing either.
    assert_eq!(node.c.prop(RELAY, "ActiveState"), "active");
    let tables = node.c.ok(&["nft", "list", "tables"]);
    assert!(tables.contains("table ip localdns-fallback"), "{tables}");
    node.c.ok(&["systemctl", "stop", RELAY]);
    assert_eq!(node.net.node_link_index("localdns-fb"), None);
    assert_eq!(
        node.c.ok(&["nft", "list", "tables"]),
        tables_before,
        "the nf_tables tables differ from before the start"
    );
    let after = node.net.node_rules();
    for needle in [LINK_LOCAL, SERVICE_IP, "LOCALDNS", "NOTRACK"] {
        assert!(
            !after.contains(needle),
            "{needle} left in the rules:\n{after}"
        );
    }
    let j = node.c.journal(UNIT);
    assert!(
        j.iter()
            .any(|e| field(e, "MESSAGE").contains("job stop; removing")),
        "stop-post did not tear down on the stop job"
    );
    // The unit's sandbox lets the daemon join the nftables notifications.
    assert!(
        !j.iter()
            .any(|e| field(e, "MESSAGE").contains("nftables notifications")),
        "{j:?}"
    );
    assert!(
        j.iter()
            .any(|e| field(e, "MESSAGE").contains("firewall chosen: no iptables backend holds")),
        "{j:?}"
    );
}

/// UDP and TCP to `ip`, port 53.
fn targets_of(ip: &str) -> Vec<Target> {
    [Proto::Udp, Proto::Tcp]
        .into_iter()
        .map(|proto| Target {
            proto,
            server: format!("{ip}:53").parse().unwrap(),
        })
        .collect()
}

/// The stream of the stop and removal tests: the Service IP only. The link-local address
/// is relayed while localdns is stopped (see `link_local_mode_fails_open`) but has
/// nobody behind it once the package is removed (kubelet is pointed back at the Service
/// IP first), so what these must not lose is the Service IP's queries.
fn service_ip_targets() -> Vec<Target> {
    targets_of(SERVICE_IP)
}

#[test]
fn stop_under_load_hands_the_service_ip_to_kube_proxy_without_losing_a_query() {
    require_root_and_tools!(
        "stop_under_load_hands_the_service_ip_to_kube_proxy_without_losing_a_query"
    );
    let node = Node::boot(
        "handover",
        Options {
            kube_proxy: true,
            ..Options::default()
        },
    );
    node.start_localdns();
    for name in harness::load_names() {
        let _ = answer(&node, &name);
    }
    remove_under_load(&node, &["systemctl", "stop", UNIT]);
    assert_eq!(node.c.prop(UNIT, "ActiveState"), "inactive");
    let j = node.c.journal_text(UNIT, 60);
    assert!(
        j.contains("final stop (stop job): removing the rules first"),
        "{j}"
    );
}

// ---------------------------------------------------------------- link-local fallback

/// The kube-dns-upstream Service IP of the link-local tests: kube-proxy stand-ins DNAT
/// it to the fake kube-dns, for pods and for the node's own processes (the relay).
const KUBE_DNS_UPSTREAM: &str = "10.96.0.11";

#[derive(Clone, Copy, Debug)]
enum KubeProxy {
    Iptables,
    Nftables,
}

/// The stand-in of kube-proxy in `mode` for the Service IP and kube-dns-upstream, both to
/// [`harness::KUBE_DNS_POD`], in PREROUTING (pods) and OUTPUT (the node), in a
/// `KUBE-SERVICES` chain (iptables) or the `ip kube-proxy` table (nftables), as
/// kube-proxy names them: localdns's `auto` firewall follows them.
fn kube_proxy_in(node: &Node, mode: KubeProxy) {
    let pod = harness::KUBE_DNS_POD.split(':').next().unwrap();
    let ns = &node.net.node;
    // A node has a route to the Service CIDR (its default route, here the pod link): the
    // relay's packets to kube-dns-upstream need one before kube-proxy's DNAT redirects them.
    ns.ip(&["route", "add", "10.96.0.0/12", "dev", "veth-pod"]);
    // Options::kube_proxy's plain PREROUTING rule is replaced by the mode's own.
    assert!(ns
        .exec("iptables", &["-w", "-t", "nat", "-F", "PREROUTING"])
        .status
        .success());
    match mode {
        KubeProxy::Iptables => {
            let ipt = |args: &[&str]| {
                let mut all = vec!["-w", "-t", "nat"];
                all.extend_from_slice(args);
                let out = ns.exec("iptables", &all);
                assert!(out.status.success(), "iptables {args:?}: {out:?}");
            };
            ipt(&["-N", "KUBE-SERVICES"]);
            ipt(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
            ipt(&["-A", "OUTPUT", "-j", "KUBE-SERVICES"]);
            for ip in [SERVICE_IP, KUBE_DNS_UPSTREAM] {
                harness::dnat_dns(ns, "KUBE-SERVICES", ip, harness::KUBE_DNS_POD);
            }
        }
        KubeProxy::Nftables => {
            let rules = |chain: &str| {
                format!(
                    "add rule ip kube-proxy {chain} ip daddr {{ {SERVICE_IP}, {KUBE_DNS_UPSTREAM} }} meta l4proto {{ tcp, udp }} th dport 53 dnat to {pod}\n"
                )
            };
            let doc = format!(
                "add table ip kube-proxy\n\
                 add chain ip kube-proxy nat-prerouting {{ type nat hook prerouting priority dstnat; }}\n\
                 add chain ip kube-proxy nat-output {{ type nat hook output priority -100; }}\n{}{}",
                rules("nat-prerouting"),
                rules("nat-output")
            );
            let path = std::env::temp_dir().join(format!("kube-proxy-{}.nft", std::process::id()));
            std::fs::write(&path, doc).unwrap();
            let out = ns.exec("nft", &["-f", path.to_str().unwrap()]);
            let _ = std::fs::remove_file(&path);
            assert!(out.status.success(), "nft: {out:?}");
        }
    }
}

/// Queries for the load names that reached the fake kube-dns.
fn kube_dns_load_queries(node: &Node) -> usize {
    let kube_dns = node.kube_dns.as_ref().expect("kube-dns stand-in");
    harness::load_names()
        .iter()
        .map(|n| kube_dns.count(n, hickory_proto::rr::RecordType::A))
        .sum()
}

/// Link-local mode under kube-proxy in `mode`: pods asking 169.254.20.10 are answered
/// while localdns is stopped (through the relay to kube-dns-upstream) and when it is
/// back; the relay sees nothing while localdns serves.
fn link_local_mode_fails_open(tag: &str, mode: KubeProxy, backend: &str) {
    let node = Node::boot(
        tag,
        Options {
            kube_proxy: true,
            ..Options::default()
        },
    );
    kube_proxy_in(&node, mode);
    // The cluster upstream is kube-dns-upstream, through the stand-in; other names go to
    // the node's upstream (the first fake), so a load name reaching kube-dns came through
    // the relay.
    let path = "/etc/localdns/config.toml";
    let config = std::fs::read_to_string(node.c.path(path)).unwrap();
    let cluster = format!("[cluster]\nupstream = [\"{}\"]", node.upstream.addr);
    assert!(config.contains(&cluster), "{config}");
    node.c.write(
        path,
        &config.replace(
            &cluster,
            &format!("[cluster]\nupstream = [\"{KUBE_DNS_UPSTREAM}\"]"),
        ),
    );
    node.start_localdns();
    assert_eq!(
        node.c.prop(RELAY, "ActiveState"),
        "active",
        "the relay did not start with localdns"
    );
    let rules = node.net.node_rules();
    assert!(
        rules.contains(backend),
        "localdns's rules are not in {backend}:\n{rules}"
    );
    for name in harness::load_names() {
        assert!(
            !answer(&node, &name).is_empty(),
            "{name} not answered by localdns"
        );
    }

    let stream = Stream::start(
        &node.net.pod,
        targets_of(LINK_LOCAL),
        10,
        harness::load_names(),
    );
    // These waits pace the load; they synchronise with nothing.
    std::thread::sleep(Duration::from_millis(700));
    let served_by_localdns = kube_dns_load_queries(&node);
    node.c.ok(&["systemctl", "stop", UNIT]);
    assert_eq!(
        node.net.node_link_index(LINK),
        None,
        "localdns's link is still there"
    );
    std::thread::sleep(Duration::from_millis(2000));
    let while_stopped = kube_dns_load_queries(&node) - served_by_localdns;
    node.start_localdns();
    std::thread::sleep(Duration::from_millis(300));
    let at_restart = kube_dns_load_queries(&node);
    std::thread::sleep(Duration::from_millis(700));
    let report = stream.finish();
    let after_restart = kube_dns_load_queries(&node) - at_restart;
    println!(
        "link-local mode, kube-proxy {mode:?}: localdns stopped for 2 s and started again, \
         10 queries/s per target; {while_stopped} relayed to kube-dns while stopped:\n{report}"
    );
    let total = report.total();
    assert!(total.sent >= 40, "{report}");
    assert_eq!(
        total.unanswered(),
        0,
        "queries to {LINK_LOCAL} unanswered while localdns was stopped:\n{report}\n{}",
        node.c.journal_text(RELAY, 40)
    );
    assert_eq!(
        served_by_localdns, 0,
        "the relay answered while localdns was serving"
    );
    assert!(
        while_stopped >= 20,
        "only {while_stopped} queries reached kube-dns while localdns was stopped"
    );
    assert_eq!(
        after_restart, 0,
        "the relay still answered after localdns was back"
    );
    let slowest = total.slowest;
    assert!(
        slowest < Duration::from_millis(1000),
        "slowest answer {slowest:?}:\n{report}"
    );
}

#[test]
fn link_local_mode_answers_pods_while_localdns_is_stopped_under_iptables_kube_proxy() {
    require_root_and_tools!(
        "link_local_mode_answers_pods_while_localdns_is_stopped_under_iptables_kube_proxy"
    );
    link_local_mode_fails_open("ll-ipt", KubeProxy::Iptables, "LOCALDNS-PREROUTING");
}

#[test]
fn link_local_mode_answers_pods_while_localdns_is_stopped_under_nftables_kube_proxy() {
    require_root_and_tools!(
        "link_local_mode_answers_pods_while_localdns_is_stopped_under_nftables_kube_proxy"
    );
    link_local_mode_fails_open("ll-nft", KubeProxy::Nftables, "table inet localdns");
}

/// A config broken by hand (an unknown key, as an upgrade that dropped a key would see).
fn break_config(node: &Node) {
    let path = "/etc/localdns/config.toml";
    let good = std::fs::read_to_string(node.c.path(path)).expect("config");
    node.c
        .write(path, &format!("{good}\n[cache]\nno_such_key = 1\n"));
}

#[test]
fn a_restart_with_a_refused_config_serves_on_the_last_good_one() {
    require_root_and_tools!("a_restart_with_a_refused_config_serves_on_the_last_good_one");
    let node = Node::boot("lastgood", Options::default());
    node.start_localdns();
    assert!(
        node.c.path("/var/lib/localdns/last-good.toml").exists(),
        "the accepted config was not kept"
    );
    break_config(&node);
    let _ = restarted_under_load(
        &node,
        "systemctl restart with a refused config",
        &["systemctl", "restart", UNIT],
    );
    assert_eq!(node.c.prop(UNIT, "ActiveState"), "active");
    node.assert_pod_answered();
    let status = node.c.prop(UNIT, "StatusText");
    assert!(
        status.contains("CONFIG REFUSED") && status.contains("no_such_key"),
        "STATUS does not say the config was refused: {status}"
    );
    let j = node.c.journal_text(UNIT, 40);
    assert!(
        j.contains("/etc/localdns/config.toml:") && j.contains("starting on the last good config"),
        "the journal does not name the refused file and line:\n{j}"
    );
    // check-config stays strict.
    let out = node.c.exec(&[
        "localdns",
        "check-config",
        "--config",
        "/etc/localdns/config.toml",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[test]
fn a_refused_config_without_a_last_good_one_still_tears_down_on_stop() {
    require_root_and_tools!("a_refused_config_without_a_last_good_one_still_tears_down_on_stop");
    let node = Node::boot("badstop", Options::default());
    node.start_localdns();
    node.c.remove("/var/lib/localdns/last-good.toml");
    break_config(&node);
    node.c.ok(&["systemctl", "stop", UNIT]);
    assert_eq!(node.net.node_link_index(LINK), None, "link left behind");
    let rules = node.net.node_rules();
    assert!(
        !rules.to_lowercase().contains("localdns"),
        "rules left behind:\n{rules}"
    );
    // And a start with it fails loudly (exit 64) without leaving anything either.
    let out = node.c.systemctl(&["start", UNIT]);
    assert!(!out.status.success());
    assert_eq!(node.net.node_link_index(LINK), None, "link left behind");
    assert!(!node.net.node_rules().to_lowercase().contains("localdns"));
}

// ---------------------------------------------------------------- boot ordering

const KUBELET: &str = "[Unit]
Description=kubelet stand-in: records whether node DNS answered when it started
# Like the real kubelet unit, it knows nothing of localdns: the ordering comes from
# localdns.service's Before=kubelet.service.

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'dig +time=1 +tries=1 @169.254.20.10 www.example.com A > /run/kubelet-standin.dig 2>&1; echo \"dig exit $?\" >> /run/kubelet-standin.dig'

[Install]
WantedBy=multi-user.target
";

#[test]
fn boot_starts_kubelet_after_localdns_is_ready() {
    require_root_and_tools!("boot_starts_kubelet_after_localdns_is_ready");
    let node = Node::boot(
        "boot",
        Options {
            enable_at_boot: true,
            units: vec![("kubelet.service".into(), KUBELET.into())],
            ..Options::default()
        },
    );
    let c = &node.c;
    assert_eq!(
        c.prop(UNIT, "ActiveState"),
        "active",
        "{}",
        c.journal_text(UNIT, 40)
    );
    assert_eq!(c.prop("kubelet.service", "ActiveState"), "active");
    let ready = c
        .prop(UNIT, "ActiveEnterTimestampMonotonic")
        .parse::<u64>()
        .unwrap();
    let kubelet = c
        .prop("kubelet.service", "ExecMainStartTimestampMonotonic")
        .parse::<u64>()
        .unwrap();
    let dig = c.ok(&["cat", "/run/kubelet-standin.dig"]);
    println!(
        "localdns ready at {ready} µs, kubelet started at {kubelet} µs; kubelet's dig:\n{dig}"
    );
    assert!(ready < kubelet, "kubelet started before localdns was ready");
    assert!(
        dig.contains("status: NOERROR") && dig.contains(harness::WWW_ADDR),
        "node DNS did not answer when kubelet started:\n{dig}"
    );
    node.assert_pod_answered();
}

// ---------------------------------------------------------------- the packages' life cycle

/// The next release of the package of kind `ext`: the same binary packaged as version
/// 99.0.0 by `packaging/build --arch amd64 --no-build --version 99.0.0 --out DIR` (the
/// container is amd64: the arm64 packages would only cost time).
fn newer_package(ext: &str, dir: &std::path::Path) -> std::path::PathBuf {
    // One at a time: packaging/build writes its generated files (the changelog, ...) to
    // target/packaging, and the package tests call this before they take the node lock.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(repo.join("packaging/build"))
        .args([
            "--arch",
            "amd64",
            "--no-build",
            "--version",
            "99.0.0",
            "--out",
        ])
        .arg(dir)
        .output()
        .expect("packaging/build");
    assert!(
        out.status.success(),
        "packaging/build --no-build --version 99.0.0: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_dir(dir)
        .expect("out dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .unwrap_or_else(|| panic!("packaging/build made no .{ext}"))
}

/// No conntrack entry for the intercepted addresses (queries skipped conntrack).
fn assert_no_conntrack_for_dns(node: &Node) {
    for ip in [LINK_LOCAL, SERVICE_IP] {
        for dir in ["-d", "-s"] {
            let ct = node.net.node.exec("conntrack", &["-L", dir, ip]);
            let listed = String::from_utf8_lossy(&ct.stdout).into_owned();
            assert!(
                listed.trim().is_empty(),
                "conntrack entries {dir} {ip}:\n{listed}"
            );
        }
    }
}

fn assert_nothing_of_localdns_left(node: &Node, what: &str) {
    assert_eq!(
        node.net.node_link_index(LINK),
        None,
        "{what}: link left behind"
    );
    // iptables-nft made the raw tables for localdns's NOTRACK rules (the test's own rules
    // are in filter and nat): teardown deletes them again.
    let tables = node.c.ok(&["nft", "list", "tables"]);
    assert!(
        !tables.contains("raw"),
        "{what}: tables created for localdns left behind:\n{tables}"
    );
    let rules = node.net.node_rules();
    // The Service IP stays in the kube-proxy stand-in's DNAT rule, which is not ours.
    for needle in ["LOCALDNS", "NOTRACK", LINK_LOCAL] {
        assert!(
            !rules.contains(needle),
            "{what}: {needle} left in the rules:\n{rules}"
        );
    }
}

/// Restart localdns with `cmd` (inside the container: an upgrade, or a restart) under the
/// four-way query stream: the sockets are kept, so no query may be lost or retried (every
/// answer came within the first attempt's 1.5 s).
fn restarted_under_load(node: &Node, what: &str, cmd: &[&str]) -> harness::load::Report {
    let pid = node.main_pid();
    let report = under_load(node, what, |n| {
        let out = n.c.ok(cmd);
        println!("{}:\n{out}", cmd.join(" "));
        n.wait_new_main_pid(pid, Duration::from_secs(15));
    });
    let total = report.total();
    assert!(total.sent > 0);
    assert_eq!(total.unanswered(), 0, "queries lost in `{what}`:\n{report}");
    assert_eq!(total.retried, 0, "`{what}` made clients retry:\n{report}");
    report
}

/// A package upgrade under load (`restarted_under_load`) went through `localdns handover`:
/// no restart, and no answer waited for a stop and a start (a correctness bound; a restart
/// takes 150 ms and more here).
fn assert_upgraded_by_handover(node: &Node, report: &harness::load::Report) {
    let journal = node.c.journal_text(UNIT, 60);
    assert!(
        journal.contains("handed over to process"),
        "the upgrade did not hand over:\n{journal}"
    );
    assert_eq!(node.c.prop(UNIT, "NRestarts"), "0", "{journal}");
    let slowest = report.total().slowest;
    assert!(
        slowest < Duration::from_millis(100),
        "a query waited {slowest:?} across the upgrade:\n{report}\n{journal}"
    );
}

/// Remove with `cmd` under a stream to the Service IP: kube-dns takes over through the
/// kube-proxy stand-in and not a query is lost; nothing of localdns stays in the network.
fn remove_under_load(node: &Node, cmd: &[&str]) {
    let kube_dns = node.kube_dns.as_ref().expect("kube-dns stand-in");
    let before = kube_dns.seen().len();
    let stream = Stream::start(
        &node.net.pod,
        service_ip_targets(),
        150,
        harness::load_names(),
    );
    std::thread::sleep(Duration::from_millis(700));
    let out = node.c.ok(cmd);
    println!("{}:\n{out}", cmd.join(" "));
    std::thread::sleep(Duration::from_millis(1000));
    let report = stream.finish();
    println!(
        "{} under 300 queries/s to the Service IP:\n{report}",
        cmd.join(" ")
    );
    assert_eq!(
        report.total().unanswered(),
        0,
        "queries to the Service IP lost in the removal:\n{report}"
    );
    assert!(
        kube_dns.seen().len() > before,
        "kube-dns got no query after the removal"
    );
    assert_nothing_of_localdns_left(node, &cmd.join(" "));
}

/// Enabled, active, and answering the pod's four ways (after an install that starts it).
fn assert_installed_and_serving(node: &Node) {
    let c = &node.c;
    assert_eq!(c.systemctl(&["is-enabled", UNIT]).status.code(), Some(0));
    assert_eq!(
        c.prop(UNIT, "ActiveState"),
        "active",
        "{}",
        c.journal_text(UNIT, 30)
    );
    node.assert_pod_answered();
}

/// A node with a kube-proxy stand-in and nothing of localdns, the package of kind `ext`
/// and its next version copied in as `/root/localdns-{old,new}.EXT`, and the old one
/// installed with `install` (which must enable and, with the node's drop-in naming the
/// cluster upstream, start the unit). None when the package was not built.
fn node_with_package(ext: &str, install: &[&str]) -> Option<Node> {
    let old = built_package(ext)?;
    let work = tempfile::tempdir().expect("tmp");
    let newer = newer_package(ext, work.path());
    let node = Node::boot(
        ext,
        Options {
            kube_proxy: true,
            from_package: true,
            ..Options::default()
        },
    );
    let c = &node.c;
    c.copy_in(&old, &format!("/root/localdns-old.{ext}"));
    c.copy_in(&newer, &format!("/root/localdns-new.{ext}"));
    let mut cmd = install.to_vec();
    let target = format!("/root/localdns-old.{ext}");
    cmd.push(&target);
    let out = c.ok(&cmd);
    println!("{}:\n{out}", cmd.join(" "));
    assert_installed_and_serving(&node);
    Some(node)
}

#[test]
fn deb_install_upgrade_remove_purge_lose_no_query() {
    require_root_and_tools!("deb_install_upgrade_remove_purge_lose_no_query");
    let Some(deb) = built_package("deb") else {
        return;
    };
    let Some(node) = node_with_package("deb", &["dpkg", "-i"]) else {
        return;
    };
    let c = &node.c;
    let _ = node.net.node.exec("conntrack", &["-F"]);
    node.assert_pod_answered();
    assert_no_conntrack_for_dns(&node);

    // Upgrade under load: a restart that keeps the sockets, so nothing is lost.
    let conffile = c.ok(&["cat", "/etc/localdns/config.toml"]);
    let report = restarted_under_load(
        &node,
        "dpkg -i of a newer version (upgrade)",
        &["dpkg", "-i", "/root/localdns-new.deb"],
    );
    assert_upgraded_by_handover(&node, &report);
    assert_eq!(
        c.ok(&["dpkg-query", "-W", "-f", "${Version}", "localdns"]),
        "99.0.0-1"
    );
    assert_eq!(
        c.ok(&["cat", "/etc/localdns/config.toml"]),
        conffile,
        "conffile changed"
    );

    // Remove under load to the Service IP: kube-dns takes over through kube-proxy.
    remove_under_load(&node, &["dpkg", "-r", "localdns"]);
    assert!(!c.path("/usr/bin/localdns").exists());
    assert!(!c.path("/usr/lib/systemd/system/localdns.service").exists());
    assert!(
        c.path("/etc/localdns/config.toml").exists(),
        "remove must keep the config"
    );

    // Purge: nothing of localdns left.
    c.ok(&["dpkg", "--purge", "localdns"]);
    for path in [
        "/etc/localdns",
        "/var/lib/localdns",
        "/run/localdns",
        "/usr/libexec/localdns",
    ] {
        assert!(!c.path(path).exists(), "{path} left after purge");
    }
    let listed = c.exec(&["dpkg", "-s", "localdns"]);
    assert!(
        !listed.status.success(),
        "dpkg still knows localdns after purge"
    );
    let units = c.exec(&["systemctl", "list-unit-files", "--no-legend", "localdns*"]);
    let units = String::from_utf8_lossy(&units.stdout);
    assert!(units.trim().is_empty(), "unit files left: {units}");
    // Every file the package shipped is gone (directories shared with others may stay).
    let listing = harness::netns::run("dpkg-deb", &["-c", deb.to_str().expect("utf-8")]);
    for line in listing.lines().filter(|l| !l.starts_with('d')) {
        let path = line
            .split_whitespace()
            .last()
            .expect("path")
            .trim_start_matches('.');
        assert!(!c.path(path).exists(), "{path} left after purge");
    }
}

#[test]
fn deb_install_with_the_untouched_config_enables_but_does_not_start() {
    require_root_and_tools!("deb_install_with_the_untouched_config_enables_but_does_not_start");
    let Some(deb) = built_package("deb") else {
        return;
    };
    let node = Node::boot_with_config(
        "debfresh",
        Options {
            from_package: true,
            ..Options::default()
        },
        String::new(),
    );
    let c = &node.c;
    c.copy_in(&deb, "/root/localdns.deb");
    let out = c.ok(&["dpkg", "-i", "/root/localdns.deb"]);
    println!("dpkg -i:\n{out}");
    assert_eq!(c.systemctl(&["is-enabled", UNIT]).status.code(), Some(0));
    assert_eq!(c.prop(UNIT, "ActiveState"), "inactive");
    assert!(
        out.contains("cluster upstream") || out.contains("[cluster] upstream"),
        "dpkg -i does not say why localdns was not started:\n{out}"
    );
    assert_nothing_of_localdns_left(&node, "an install that did not start");
}

#[test]
fn rpm_install_upgrade_erase_lose_no_query() {
    require_root_and_tools!("rpm_install_upgrade_erase_lose_no_query");
    // Debian's rpm has its own empty database: dependencies are Debian's packages.
    let Some(node) = node_with_package("rpm", &["rpm", "-i", "--nodeps"]) else {
        return;
    };
    let c = &node.c;
    let report = restarted_under_load(
        &node,
        "rpm -U of a newer version",
        &["rpm", "-U", "--nodeps", "/root/localdns-new.rpm"],
    );
    assert_upgraded_by_handover(&node, &report);
    remove_under_load(&node, &["rpm", "-e", "--nodeps", "localdns"]);
    assert!(!c.path("/usr/bin/localdns").exists());
    assert!(!c.systemctl(&["is-enabled", UNIT]).status.success());
}

// ---------------------------------------------------------------- from a repository

/// apt-get in the container, non-interactive and keeping changed conffiles, as
/// unattended-upgrades runs it; followed by its arguments.
const APT_GET: &[&str] = &[
    "env",
    "DEBIAN_FRONTEND=noninteractive",
    "apt-get",
    "-q",
    "-y",
    "-o",
    "Dpkg::Options::=--force-confold",
];

/// [`APT_GET`] `args` in the container; its output.
fn apt_get(c: &Container, args: &[&str]) -> std::process::Output {
    c.exec(&[APT_GET, args].concat())
}

fn installed_version(c: &Container) -> String {
    c.ok(&["dpkg-query", "-W", "-f", "${Version}", "localdns"])
}

/// A node that knows only the localdns repository (`signed-by=` its key, over HTTP from
/// the node's loopback) installs localdns with `apt-get install`; a newer version is
/// published; an `InRelease` changed after signing is refused and installs nothing; with
/// the real one back, `apt-get update && apt-get upgrade` (what unattended-upgrades runs)
/// moves to the new version under the four-way query stream: none lost, none retried.
#[test]
fn apt_install_and_upgrade_from_the_signed_repository_lose_no_query() {
    let test = "apt_install_and_upgrade_from_the_signed_repository_lose_no_query";
    require_root_and_tools!(test);
    if let Some(why) =
        harness::missing_tool(&["python3", "gpg", "reprepro", "createrepo_c", "rpmsign"])
    {
        common::skipped::skipped(test, &why);
        return;
    }
    let Some(old) = built_package("deb") else {
        return;
    };
    let started = Instant::now();
    let work = tempfile::tempdir().expect("tmp");
    let key = harness::repo::release_key(work.path());
    let (first, second, site) = (
        work.path().join("release-1"),
        work.path().join("release-2"),
        work.path().join("site"),
    );
    std::fs::create_dir_all(&first).expect("mkdir");
    std::fs::copy(&old, first.join(old.file_name().expect("name"))).expect("copy");
    harness::repo::publish(&first, &site, &key);

    let node = Node::boot(
        "aptrepo",
        Options {
            kube_proxy: true,
            from_package: true,
            ..Options::default()
        },
    );
    let server = harness::repo::Server::start(&node.net.node, &site);
    let c = &node.c;
    // Only this repository: the image's Debian mirror is not reachable from the node.
    c.remove("/etc/apt/sources.list");
    c.copy_in(&site.join("localdns.gpg"), "/etc/apt/keyrings/localdns.gpg");
    c.write(
        "/etc/apt/sources.list.d/localdns.list",
        &format!(
            "deb [signed-by=/etc/apt/keyrings/localdns.gpg] {}/apt stable main\n",
            harness::repo::URL
        ),
    );
    let update = apt_get(c, &["update"]);
    assert!(update.status.success(), "{}", text(&update));
    let install = apt_get(c, &["install", "localdns"]);
    assert!(install.status.success(), "{}", text(&install));
    println!("apt-get install localdns:\n{}", text(&install));
    assert_eq!(
        installed_version(c),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    assert_installed_and_serving(&node);
    assert!(
        server.requests().contains("GET /apt/pool/main/l/localdns/"),
        "the package did not come from the HTTP server:\n{}",
        server.requests()
    );

    // The next release, published beside the old one (the index names the newest).
    std::fs::create_dir_all(&second).expect("mkdir");
    std::fs::copy(&old, second.join(old.file_name().expect("name"))).expect("copy");
    newer_package("deb", &second);
    harness::repo::publish(&second, &site, &key);
    let in_release = site.join("apt/dists/stable/InRelease");
    let signed = std::fs::read_to_string(&in_release).expect("InRelease");
    assert!(signed.contains("-----BEGIN PGP SIGNED MESSAGE-----"));

    // Forged: one hash in the signed text changed, so the signature no longer matches.
    let at = signed.find("SHA256:").expect("SHA256 section") + 9;
    let mut forged = signed.clone().into_bytes();
    forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&in_release, &forged).expect("forge");
    let update = apt_get(c, &["update"]);
    let said = text(&update);
    println!("apt-get update with a forged InRelease:\n{said}");
    // apt keeps the index it had and says why (a warning: the exit status is 0 when an
    // older index exists, unless `--error-on=any`).
    assert!(
        said.contains("BADSIG") && said.contains("The repository is not updated"),
        "apt-get update did not refuse a forged InRelease:\n{said}"
    );
    let failing = apt_get(c, &["--error-on=any", "update"]);
    assert!(
        !failing.status.success(),
        "apt-get --error-on=any update passed a forged InRelease:\n{}",
        text(&failing)
    );
    let policy = c.ok(&["apt-cache", "policy", "localdns"]);
    assert!(
        policy.contains(&format!("Candidate: {}-1", env!("CARGO_PKG_VERSION"))),
        "the forged index was used:\n{policy}"
    );
    let upgrade = apt_get(c, &["upgrade"]);
    assert!(upgrade.status.success(), "{}", text(&upgrade));
    assert_eq!(
        installed_version(c),
        format!("{}-1", env!("CARGO_PKG_VERSION")),
        "installed from a repository whose InRelease was forged"
    );

    // The real InRelease back: the upgrade, under load.
    std::fs::write(&in_release, &signed).expect("restore");
    let update = apt_get(c, &["update"]);
    assert!(update.status.success(), "{}", text(&update));
    let report = restarted_under_load(
        &node,
        "apt-get upgrade from the repository",
        &[APT_GET, &["upgrade"]].concat(),
    );
    assert_eq!(installed_version(c), "99.0.0-1");
    let slowest = report.total().slowest;
    assert!(
        slowest < Duration::from_millis(1000),
        "slowest answer {slowest:?} during the upgrade:\n{report}"
    );
    node.assert_pod_answered();
    println!(
        "repository install, forged InRelease and upgrade took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------- failing starts

/// The pod's queries to the Service IP, 2 per second over UDP and over TCP, during `secs`
/// seconds after `during` (issue 17 measured 20 queries in 8 s; this sends about 32).
fn pods_during_failing_starts(
    node: &Node,
    secs: u64,
    during: impl FnOnce(&Node),
) -> harness::load::Report {
    let stream = Stream::start(
        &node.net.pod,
        service_ip_targets(),
        2,
        harness::load_names(),
    );
    during(node);
    // Paces the observation window; the assertions are on what happened in it.
    std::thread::sleep(Duration::from_secs(secs));
    stream.finish()
}

/// At least 19 of every 20 queries answered (issue 17's target).
fn assert_19_of_20(report: &harness::load::Report, what: &str) {
    let total = report.total();
    assert!(total.sent >= 20, "{what}: only {} sent", total.sent);
    assert!(
        total.unanswered() * 20 <= total.sent,
        "{what}: {} of {} pod queries unanswered:\n{report}",
        total.unanswered(),
        total.sent
    );
}

/// GET `path` on the metrics endpoint from the node namespace: the status code.
fn http_status(node: &Node, path: &'static str) -> Option<u16> {
    node.net.node.run_in(move || {
        common::metrics::http_get("127.0.0.1:9253".parse().unwrap(), path)
            .ok()
            .map(|(code, _)| code)
    })
}

#[test]
fn a_start_with_the_metrics_port_held_serves_dns_and_listens_once_it_is_free() {
    require_root_and_tools!(
        "a_start_with_the_metrics_port_held_serves_dns_and_listens_once_it_is_free"
    );
    let node = Node::boot(
        "porthold",
        Options {
            kube_proxy: true,
            ..Options::default()
        },
    );
    // Another program holds the metrics port (node-local-dns uses 9253 too).
    let squatter = node
        .net
        .node
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:9253").expect("hold 9253"));
    let report = pods_during_failing_starts(&node, 8, |n| {
        n.c.ok(&["systemctl", "start", UNIT]);
    });
    println!("metrics port held at start:\n{report}");
    let restarts: u32 = node.c.prop(UNIT, "NRestarts").parse().unwrap();
    assert_eq!(
        restarts,
        0,
        "the held port restarted localdns:\n{}",
        node.c.journal_text(UNIT, 40)
    );
    assert_19_of_20(&report, "metrics port held");
    node.assert_pod_answered();
    let status = node.c.prop(UNIT, "StatusText");
    assert!(
        status.contains("NO METRICS/HEALTH ENDPOINT") && status.contains("9253"),
        "STATUS does not say the endpoint is missing: {status}"
    );
    // The port is given up: the endpoint comes within the retry back-off (at most 30 s).
    drop(squatter);
    node.c
        .wait_for("/health answers", Duration::from_secs(40), |_| {
            http_status(&node, "/health") == Some(200)
        });
    wait_journal(
        &node,
        "the late bind logged",
        &["listening on 127.0.0.1:9253", "late"],
    );
    assert_eq!(node.c.prop(UNIT, "NRestarts"), "0");
}

#[test]
fn a_config_error_without_a_last_good_config_is_braked_and_pods_keep_dns() {
    require_root_and_tools!(
        "a_config_error_without_a_last_good_config_is_braked_and_pods_keep_dns"
    );
    let node = Node::boot(
        "cfgloop",
        Options {
            kube_proxy: true,
            ..Options::default()
        },
    );
    assert!(!node.c.path("/var/lib/localdns/last-good.toml").exists());
    let good = std::fs::read_to_string(node.c.path("/etc/localdns/config.toml")).unwrap();
    break_config(&node);
    let report = pods_during_failing_starts(&node, 8, |n| {
        n.c.ok(&["systemctl", "start", "--no-block", UNIT]);
    });
    let restarts: u32 = node.c.prop(UNIT, "NRestarts").parse().unwrap();
    println!("config error, no last good config: {restarts} restarts in 8 s\n{report}");
    assert!(
        (1..=5).contains(&restarts),
        "{restarts} restarts in 8 s:\n{}",
        node.c.journal_text(UNIT, 60)
    );
    assert_19_of_20(&report, "config error");
    wait_journal(&node, "the brake logged", &["start braked", "in a row"]);
    // Fixed: the next start is not braked (the config changed since the last failure).
    node.c.write("/etc/localdns/config.toml", &good);
    node.c
        .wait_for("active after the fix", Duration::from_secs(40), |c| {
            c.prop(UNIT, "ActiveState") == "active"
        });
    node.assert_pod_answered();
}
