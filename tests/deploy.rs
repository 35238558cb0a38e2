//! deploy/: the Kubernetes manifests, checked by `kubernetes-validate --strict` for the
//! Kubernetes versions we support, and `localdns config-sync` run as a command (the real
//! binary) against a temporary tree laid out as kubelet writes a ConfigMap volume, and
//! against a real `localdns run` that reloads what it writes. Unprivileged.
//!
//! `kubernetes-validate` (PyPI, pinned) is found through `$KUBERNETES_VALIDATE`, then the
//! venv `.ci/run` makes (`target/k8s-validate`), then `PATH`; without it the manifest test
//! prints why it skips, and fails under `CI=true`.
//!
//! deploy/monitoring/'s Prometheus Operator objects (PrometheusRule, ScrapeConfig) are
//! checked against the operator's CRD schemas by tests/operator-schemas/check.mjs (the npm
//! package `@kubernetes-models/prometheus-operator`, pinned by its lock file; `.ci/run`
//! installs it under target/operator-schemas), compared with the plain Prometheus files
//! they repeat, and the rules taken out of the PrometheusRule go through `promtool`.
//!
//! Waits poll the status file that config-sync writes after every sync (its readiness
//! signal) with a deadline; nothing sleeps for a fixed time.

mod common;

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::client::{self, query};
use common::daemon::{bin, Config, Daemon};
use common::upstream::Upstream;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MANIFESTS: [&str; 4] = [
    "deploy/kube-dns-upstream.yaml",
    "deploy/localdns-config.yaml",
    "deploy/localdns-config-sync.yaml",
    "deploy/networkpolicy-dns-egress.yaml",
];
const UPSTREAM_FILE: &str = "70-config-sync-cluster-upstream.toml";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- the manifests

fn validator() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("KUBERNETES_VALIDATE").map(PathBuf::from),
        Some(Path::new(ROOT).join("target/k8s-validate/bin/kubernetes-validate")),
        Some(PathBuf::from("kubernetes-validate")),
    ];
    let found = candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let why = "kubernetes-validate not found ($KUBERNETES_VALIDATE, target/k8s-validate, PATH): .ci/run installs it";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        common::skipped::skipped("manifests", why);
    }
    found
}

fn validate(tool: &Path, version: &str, files: &[PathBuf]) -> Output {
    Command::new(tool)
        .args(["--strict", "-k", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict_for_1_30_and_1_34() {
    let Some(tool) = validator() else { return };
    let files: Vec<PathBuf> = MANIFESTS.iter().map(|m| Path::new(ROOT).join(m)).collect();
    let listed: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("deploy"))
        .expect("deploy/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    assert_eq!(
        listed.len(),
        MANIFESTS.len(),
        "a manifest is not checked: {listed:?}"
    );
    for version in ["1.30.0", "1.34.0"] {
        let out = validate(&tool, version, &files);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        println!("kubernetes-validate --strict -k {version}:\n{text}");
        assert!(out.status.success(), "{text}");
        let short = &version[..4];
        for m in MANIFESTS {
            assert!(
                text.lines()
                    .any(|l| l.contains(m) && l.contains("passed") && l.contains(short)),
                "{m} not passed for {version}:\n{text}"
            );
        }
    }
    // The control: --strict does refuse a field the API does not have.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    let daemonset = std::fs::read_to_string(&files[2]).expect("read");
    let typo = daemonset.replacen("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1);
    std::fs::write(&bad, typo).expect("write");
    let out = validate(&tool, "1.34.0", &[bad]);
    assert!(!out.status.success(), "{out:?}");
}

// ---------------------------------------------------------------- deploy/monitoring/

/// `node` and the packages of tests/operator-schemas (`$OPERATOR_SCHEMAS_MODULES`, else
/// target/operator-schemas/node_modules, which `.ci/run` installs); without them the test
/// says why it skips, and fails under `CI=true`.
fn operator_schemas(test: &str) -> Option<PathBuf> {
    let modules = std::env::var_os("OPERATOR_SCHEMAS_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target/operator-schemas/node_modules"));
    let node = Command::new("node").arg("--version").output();
    let why = match node {
        Err(e) => format!("node: {e}"),
        Ok(_)
            if !modules
                .join("@kubernetes-models/prometheus-operator")
                .is_dir() =>
        {
            format!(
                "no @kubernetes-models/prometheus-operator under {} (.ci/run installs it)",
                modules.display()
            )
        }
        Ok(_) => return Some(modules),
    };
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    common::skipped::skipped(test, &why);
    None
}

/// `node tests/operator-schemas/check.mjs ARGS` (status, stdout and stderr together).
fn check_mjs(modules: &Path, args: &[&Path]) -> (bool, String) {
    let out = Command::new("node")
        .arg(Path::new(ROOT).join("tests/operator-schemas/check.mjs"))
        .args(args)
        .env("OPERATOR_SCHEMAS_MODULES", modules)
        .output()
        .expect("run node");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The documents of a YAML file, read by the same YAML parser as the schema check.
fn yaml_documents(modules: &Path, file: &str) -> Vec<serde_json::Value> {
    let path = Path::new(ROOT).join(file);
    let (ok, text) = check_mjs(modules, &[Path::new("json"), &path]);
    assert!(ok, "{file}: {text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{file}: {e}: {l}")))
        .collect()
}

fn monitoring(file: &str) -> PathBuf {
    Path::new(ROOT).join("deploy/monitoring").join(file)
}

#[test]
fn the_operator_objects_pass_the_prometheus_operator_crd_schemas_and_broken_ones_do_not() {
    let Some(modules) = operator_schemas("prometheus-operator schemas") else {
        return;
    };
    let (rule, scrape) = (
        monitoring("prometheusrule.yaml"),
        monitoring("scrapeconfig.yaml"),
    );
    let (ok, text) = check_mjs(&modules, &[Path::new("validate"), &rule, &scrape]);
    println!("{text}");
    assert!(ok, "{text}");
    for want in [
        "prometheusrule.yaml: monitoring.coreos.com/v1 PrometheusRule/localdns passed",
        "scrapeconfig.yaml: monitoring.coreos.com/v1alpha1 ScrapeConfig/localdns passed",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // The controls: each break is refused, naming the field.
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = std::fs::read_to_string(&rule).expect("read");
    let scrapes = std::fs::read_to_string(&scrape).expect("read");
    let broken = [
        (
            "a rule without expr",
            rules.replacen("          expr: up{job=\"localdns\"} == 0\n", "", 1),
            "must have required property expr",
        ),
        (
            "a number for a duration",
            rules.replacen("for: 2m", "for: 2", 1),
            "/for must be string",
        ),
        (
            "a duration Prometheus cannot read",
            rules.replacen("for: 2m", "for: 2 minutes", 1),
            "/for must match pattern",
        ),
        (
            "a discovery role the operator does not have",
            scrapes.replacen("role: Node", "role: Nodes", 1),
            "kubernetesSDConfigs/0/role must be equal to one of the allowed values",
        ),
        (
            "a list for a string",
            scrapes.replacen("targetLabel: node", "targetLabel: [node]", 1),
            "relabelings/1/targetLabel must be string",
        ),
    ];
    for (i, (what, text, why)) in broken.iter().enumerate() {
        let original = if i < 3 { &rules } else { &scrapes };
        assert_ne!(text, original, "{what}: the break did not apply");
        let bad = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&bad, text).expect("write");
        let (ok, said) = check_mjs(&modules, &[Path::new("validate"), &bad]);
        assert!(!ok && said.contains(why), "{what}: {said}");
    }
}

/// The names the operator gives the fields of a plain scrape job, and its enum's
/// spelling of a discovery role.
fn operator_form(plain: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match plain {
        Value::Array(a) => Value::Array(a.iter().map(operator_form).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        "kubernetes_sd_configs" => "kubernetesSDConfigs".to_string(),
                        "relabel_configs" => "relabelings".to_string(),
                        k => {
                            let mut parts = k.split('_');
                            let first = parts.next().unwrap_or_default().to_string();
                            parts.fold(first, |mut s, p| {
                                let mut c = p.chars();
                                s.extend(c.next().map(|c| c.to_ascii_uppercase()));
                                s.push_str(c.as_str());
                                s
                            })
                        }
                    };
                    let value = match (k.as_str(), v.as_str()) {
                        ("role", Some(role)) => {
                            let mut c = role.chars();
                            let first = c.next().map(|c| c.to_ascii_uppercase());
                            Value::String(first.into_iter().chain(c).collect())
                        }
                        _ => operator_form(v),
                    };
                    (key, value)
                })
                .collect(),
        ),
        v => v.clone(),
    }
}

/// `promtool check ARGS FILE` with `value` written to FILE as JSON (which is YAML);
/// false when promtool is absent (and not under CI).
fn promtool(args: &[&str], value: &serde_json::Value) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("extracted.yaml");
    std::fs::write(&file, value.to_string()).expect("write");
    match Command::new("promtool").args(args).arg(&file).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            println!("promtool {}: {text}", args.join(" "));
            assert!(out.status.success(), "promtool {args:?} {value}: {text}");
            true
        }
        Err(e) => {
            let why = format!("promtool: {e} (apt-get install prometheus)");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            common::skipped::skipped("promtool", &why);
            false
        }
    }
}

#[test]
fn the_operator_objects_say_what_the_plain_files_say_and_promtool_passes_them() {
    let Some(modules) = operator_schemas("operator objects = plain files") else {
        return;
    };
    let plain = yaml_documents(&modules, "deploy/monitoring/prometheus-rules.yaml");
    let object = yaml_documents(&modules, "deploy/monitoring/prometheusrule.yaml");
    assert_eq!((plain.len(), object.len()), (1, 1));
    let groups = &object[0]["spec"]["groups"];
    assert!(
        groups.as_array().is_some_and(|g| !g.is_empty()),
        "{object:?}"
    );
    assert_eq!(groups, &plain[0]["groups"], "prometheusrule.yaml drifted");
    let spec = &object[0]["spec"];
    assert_eq!(spec.as_object().map(|s| s.len()), Some(1), "{spec}");
    // The rules taken out of the object are a rules file promtool accepts.
    if promtool(&["check", "rules"], spec) {
        let mut broken = spec.clone();
        broken["groups"][0]["rules"][0]["expr"] = "up{job=".into();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, broken.to_string()).expect("write");
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("promtool");
        assert!(!out.status.success(), "{out:?}");
    }

    let plain = yaml_documents(&modules, "deploy/monitoring/scrape-config.yaml");
    let object = yaml_documents(&modules, "deploy/monitoring/scrapeconfig.yaml");
    let jobs = plain[0]
        .as_array()
        .expect("scrape-config.yaml is a list of jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        object[0]["spec"],
        operator_form(&jobs[0]),
        "scrapeconfig.yaml drifted"
    );
    assert_eq!(object[0]["spec"]["kubernetesSDConfigs"][0]["role"], "Node");
    // (Not `promtool check config` on the plain job: Debian builds promtool without
    // Kubernetes discovery, "field kubernetes_sd_configs not found".)
}

#[test]
fn the_image_copies_the_binary_packaging_build_makes_and_the_probe_runs_it() {
    let containerfile =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/Containerfile")).expect("read");
    let build = std::fs::read_to_string(Path::new(ROOT).join("packaging/build")).expect("read");
    assert!(
        build.contains("bin() { echo \"target/$(triple \"$1\")/release/localdns\"; }"),
        "packaging/build moved its binary"
    );
    assert!(build.contains("amd64) echo x86_64-unknown-linux-gnu ;;\n"));
    assert!(
        containerfile.contains(
            "COPY --chmod=0755 target/x86_64-unknown-linux-gnu/release/localdns /usr/bin/localdns"
        ),
        "{containerfile}"
    );
    assert!(containerfile.contains("ENTRYPOINT [\"/usr/bin/localdns\"]"));
    let daemonset =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/localdns-config-sync.yaml"))
            .expect("read");
    assert!(daemonset
        .contains("- /usr/bin/localdns\n                - config-sync\n                - --probe"));
    // Each path config-sync is given is a mount of the pod.
    for (arg, mount) in [
        (
            "--source=/etc/localdns-config-sync",
            "mountPath: /etc/localdns-config-sync\n",
        ),
        (
            "--conf-dir=/etc/localdns/conf.d",
            "mountPath: /etc/localdns/conf.d\n",
        ),
        (
            "--status-file=/run/localdns-config-sync/status",
            "mountPath: /run/localdns-config-sync\n",
        ),
    ] {
        assert!(
            daemonset.contains(arg) && daemonset.contains(mount),
            "{arg} / {mount}"
        );
    }
    assert!(daemonset.contains("path: /etc/localdns/conf.d\n"));
    // The node's name, for the rollout stage.
    assert!(daemonset.contains(
        "- name: NODE_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: spec.nodeName\n"
    ));
}

/// The drop-in held by deploy/localdns-config.yaml (`data: cluster.toml: |`).
fn shipped_drop_in() -> String {
    let yaml =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/localdns-config.yaml")).expect("read");
    let block: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "cluster.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    assert!(block.len() > 3, "no cluster.toml in the ConfigMap");
    block.join("\n") + "\n"
}

// ---------------------------------------------------------------- the tree config-sync sees

/// A temporary host (`etc/localdns/config.toml`, `conf.d/`), a ConfigMap volume laid out as
/// kubelet's atomic writer does, and a status file.
struct Tree {
    dir: tempfile::TempDir,
    versions: u32,
}

impl Tree {
    fn new(main: &str, keys: &[(&str, &str)]) -> Tree {
        let dir = tempfile::Builder::new()
            .prefix("localdns-sync-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc/localdns/conf.d")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("configmap")).expect("mkdir");
        std::fs::write(dir.path().join("etc/localdns/config.toml"), main).expect("write");
        let mut t = Tree { dir, versions: 0 };
        t.publish(keys);
        t
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("etc/localdns/config.toml")
    }

    fn conf_d(&self) -> PathBuf {
        self.dir.path().join("etc/localdns/conf.d")
    }

    fn source(&self) -> PathBuf {
        self.dir.path().join("configmap")
    }

    /// A new version of the ConfigMap, as kubelet writes it: a timestamped directory, a
    /// `..data_tmp` link renamed over `..data`, a `KEY -> ..data/KEY` link per key, and
    /// the old directory removed.
    fn publish(&mut self, keys: &[(&str, &str)]) {
        self.versions += 1;
        let src = self.source();
        let version = format!(
            "..2026_11_28_05_00_{:02}.{}",
            self.versions,
            100 + self.versions
        );
        std::fs::create_dir(src.join(&version)).expect("mkdir version");
        for (key, text) in keys {
            std::fs::write(src.join(&version).join(key), text).expect("write key");
        }
        let old = std::fs::read_link(src.join("..data")).ok();
        symlink(&version, src.join("..data_tmp")).expect("symlink");
        std::fs::rename(src.join("..data_tmp"), src.join("..data")).expect("swap ..data");
        for (key, _) in keys {
            let link = src.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(key), link).expect("symlink key");
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(src.join(old)).expect("remove old version");
        }
    }

    /// `(name, text)` of conf.d, hidden files included (a temporary file left behind).
    fn conf_d_files(&self) -> Vec<(String, String)> {
        let mut files: Vec<_> = std::fs::read_dir(self.conf_d())
            .expect("conf.d")
            .map(|e| {
                let p = e.expect("entry").path();
                let text = std::fs::read_to_string(&p).expect("read");
                (p.file_name().unwrap().to_string_lossy().into_owned(), text)
            })
            .collect();
        files.sort();
        files
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.conf_d().join(name)).unwrap_or_default()
    }

    /// (inode, mtime in ns) of a conf.d file.
    fn stamp(&self, name: &str) -> (u64, i64) {
        let m = std::fs::metadata(self.conf_d().join(name)).expect("stat");
        (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec())
    }
}

/// A running `localdns config-sync`, killed by PID when dropped.
struct Sync {
    child: Child,
    status: PathBuf,
    log: PathBuf,
}

impl Sync {
    fn start(tree: &Tree, upstream: Option<&str>, interval: &str, pod: &str) -> Sync {
        Sync::start_for(tree, &tree.config(), upstream, interval, pod)
    }

    fn start_for(
        tree: &Tree,
        config: &Path,
        upstream: Option<&str>,
        interval: &str,
        pod: &str,
    ) -> Sync {
        Sync::spawn(tree, config, upstream, interval, pod, None)
    }

    /// A pod on the node named `node` (`NODE_NAME`).
    fn start_on(tree: &Tree, node: &str, pod: &str) -> Sync {
        Sync::spawn(
            tree,
            &tree.config(),
            Some("10.96.0.11"),
            "200ms",
            pod,
            Some(node),
        )
    }

    fn spawn(
        tree: &Tree,
        config: &Path,
        upstream: Option<&str>,
        interval: &str,
        pod: &str,
        node: Option<&str>,
    ) -> Sync {
        let log = tree.dir.path().join(format!("{pod}.log"));
        // Each pod its own status file (an emptyDir of its own), never one left before.
        let status = tree.dir.path().join(format!("{pod}.status"));
        let _ = std::fs::remove_file(&status);
        let mut cmd = Command::new(bin());
        cmd.arg("config-sync")
            .arg("--source")
            .arg(tree.source())
            .arg("--config")
            .arg(config)
            .arg("--status-file")
            .arg(&status)
            .args(["--interval", interval])
            .env("POD_UID", pod)
            .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        if let Some(ip) = upstream {
            cmd.env("KUBE_DNS_UPSTREAM_SERVICE_HOST", ip);
        }
        match node {
            Some(node) => cmd.env("NODE_NAME", node),
            None => cmd.env_remove("NODE_NAME"),
        };
        let child = cmd.spawn().expect("spawn localdns config-sync");
        Sync { child, status, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(state, message, syncs)` of the status file.
    fn status(&self) -> Option<(String, String, u64)> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        let mut lines = text.lines();
        let state = lines.next()?.to_owned();
        let message = lines.next()?.to_owned();
        let syncs = lines.next()?.strip_prefix("syncs ")?.parse().ok()?;
        Some((state, message, syncs))
    }

    /// Polls the status file until `done` holds; panics with the log after [`WAIT`].
    fn wait(&self, what: &str, done: impl Fn(&str, &str, u64) -> bool) -> (String, u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((state, message, syncs)) = self.status() {
                if done(&state, &message, syncs) {
                    return (message, syncs);
                }
            }
            assert!(
                Instant::now() < deadline,
                "config-sync: no {what} within {WAIT:?}; status {:?}; log:\n{}",
                self.status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_ready(&self) -> (String, u64) {
        self.wait("ready", |s, _, _| s == "ready")
    }

    /// Two whole syncs after now: the second one started after this call.
    fn wait_two_syncs(&self) -> (String, String) {
        let start = self.status().map_or(0, |s| s.2);
        let (_, _) = self.wait("two more syncs", |_, _, n| n >= start + 2);
        let (state, message, _) = self.status().expect("status");
        (state, message)
    }

    /// `localdns config-sync --probe` as the readiness probe runs it.
    fn probe(&self) -> Output {
        Command::new(bin())
            .args(["config-sync", "--probe", "--status-file"])
            .arg(&self.status)
            .output()
            .expect("probe")
    }

    fn terminate(mut self) -> ExitStatus {
        common::daemon::terminate(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- config-sync log ---\n{}", self.log());
        }
    }
}

/// A node's own config: intercept mode, its own cluster upstream.
const HOST: &str = "[listen]\naddresses = [\"169.254.20.10\", \"10.96.0.10\"]\n\
                    [cluster]\nupstream = [\"10.96.0.20\"]\n\
                    [upstream]\nservers = [\"192.0.2.53\"]\n";
/// A node that leaves the cluster upstream to config-sync.
const HOST_WITHOUT_UPSTREAM: &str = "[listen]\naddresses = [\"169.254.20.10\", \"10.96.0.10\"]\n\
                    [upstream]\nservers = [\"192.0.2.53\"]\n";

fn header_owner(text: &str) -> &str {
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("# localdns config-sync: owner=")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no owner header: {text}"))
}

/// inotify events on conf.d: `(name, mask)` read without blocking.
fn drain(inotify: &Inotify) -> Vec<(String, AddWatchFlags)> {
    let mut all = Vec::new();
    while let Ok(events) = inotify.read_events() {
        all.extend(
            events
                .into_iter()
                .filter_map(|e| Some((e.name?.to_string_lossy().into_owned(), e.mask))),
        );
    }
    all
}

// ---------------------------------------------------------------- config-sync

#[test]
fn config_sync_writes_atomically_only_what_changed_and_follows_a_data_swap() {
    let cluster = shipped_drop_in();
    let mut tree = Tree::new(HOST, &[("cluster.toml", &cluster), ("README", "not toml")]);
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
    inotify
        .add_watch(&tree.conf_d(), AddWatchFlags::IN_ALL_EVENTS)
        .expect("watch conf.d");
    // A long interval: only inotify can notice the ..data swap below.
    let sync = Sync::start(&tree, Some("10.96.0.11"), "1h", "pod-a");
    sync.wait_ready();
    // Its own writes wake it once more (inotify on conf.d); that sync writes nothing.
    sync.wait("the sync after its own writes", |_, _, n| n >= 2);

    let files = tree.conf_d_files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [UPSTREAM_FILE, "71-config-sync-cluster.toml"],
        "{files:?}"
    );
    assert_eq!(header_owner(&files[0].1), "pod-a");
    assert!(
        files[0]
            .1
            .ends_with("[cluster]\nupstream = [\"10.96.0.11\"]\n"),
        "{}",
        files[0].1
    );
    assert!(files[1].1.ends_with(&cluster), "{}", files[1].1);
    // The node's loader accepts the result, with the Service address as cluster upstream.
    let check = common::daemon::check_config(&tree.config());
    assert!(check.status.success(), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains("10.96.0.11"));

    // Atomic: each file appeared by a rename onto its name, never written in place.
    let events = drain(&inotify);
    for name in names {
        let on = |flag| events.iter().any(|(n, m)| n == name && m.contains(flag));
        assert!(on(AddWatchFlags::IN_MOVED_TO), "{name}: {events:?}");
        for flag in [
            AddWatchFlags::IN_CREATE,
            AddWatchFlags::IN_MODIFY,
            AddWatchFlags::IN_CLOSE_WRITE,
        ] {
            assert!(!on(flag), "{name} written in place: {events:?}");
        }
    }

    // Unchanged content: a new ConfigMap version with the same keys, and a file the node
    // adds itself, give no write (same inode, same mtime, no event on our files).
    let before = (
        tree.stamp(UPSTREAM_FILE),
        tree.stamp("71-config-sync-cluster.toml"),
    );
    std::fs::write(
        tree.conf_d().join("50-node.toml"),
        "[cache]\ncapacity = 1000\n",
    )
    .expect("write");
    tree.publish(&[("cluster.toml", &cluster), ("README", "not toml")]);
    let (message, _) = sync.wait("a sync after the change", |s, _, n| s == "ready" && n >= 3);
    assert!(message.starts_with("in sync"), "{message}");
    assert_eq!(
        before,
        (
            tree.stamp(UPSTREAM_FILE),
            tree.stamp("71-config-sync-cluster.toml")
        )
    );
    let writes = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    // (config-sync reads them, of course.)
    let ours: Vec<_> = drain(&inotify)
        .into_iter()
        .filter(|(n, m)| n.contains("config-sync") && m.intersects(writes))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");

    // A changed ConfigMap: kubelet swaps ..data, inotify wakes config-sync.
    let changed = cluster.replace("capacity = 20000", "capacity = 30000");
    assert_ne!(changed, cluster);
    let swapped = Instant::now();
    tree.publish(&[("cluster.toml", &changed)]);
    while !tree.read("71-config-sync-cluster.toml").ends_with(&changed) {
        assert!(
            swapped.elapsed() < WAIT,
            "swap not picked up:\n{}",
            sync.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("..data swap to the file written: {:?}", swapped.elapsed());
    // No temporary file is left; the node's own file is untouched.
    let names: Vec<String> = tree.conf_d_files().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["50-node.toml", UPSTREAM_FILE, "71-config-sync-cluster.toml"]
    );
    assert!(sync.probe().status.success());
}

#[test]
fn an_invalid_config_map_is_refused_with_nothing_written_and_said_by_the_probe() {
    // Invalid from the start: nothing is ever written.
    let bad = "[cache]\ncapacity = 100\nmax_ttl = \"soon\"\n";
    let mut tree = Tree::new(HOST, &[("cache.toml", bad)]);
    let sync = Sync::start(&tree, Some("10.96.0.11"), "200ms", "pod-a");
    let (message, _) = sync.wait("refused", |s, _, _| s == "refused");
    let key_file = tree.source().join("cache.toml");
    assert!(
        message.contains(&format!("{}:3", key_file.display())) && message.contains("cache.max_ttl"),
        "{message}"
    );
    assert!(tree.conf_d_files().is_empty(), "{:?}", tree.conf_d_files());
    let probe = sync.probe();
    assert!(!probe.status.success());
    let said = String::from_utf8_lossy(&probe.stdout);
    assert!(
        said.contains("refused") && said.contains("cache.toml:3"),
        "{said}"
    );
    assert!(sync.log().contains("cache.toml:3"), "{}", sync.log());

    // Fixed: written. Then broken in a way only the merge shows (a listen address as the
    // cluster upstream: a forwarding loop): refused, and the good files stay as they were.
    tree.publish(&[("cache.toml", "[cache]\ncapacity = 100\n")]);
    sync.wait_ready();
    let good = tree.conf_d_files();
    assert_eq!(good.len(), 2, "{good:?}");
    let stamps = (
        tree.stamp(UPSTREAM_FILE),
        tree.stamp("71-config-sync-cache.toml"),
    );
    tree.publish(&[("cache.toml", "[cluster]\nupstream = [\"10.96.0.10\"]\n")]);
    let (message, _) = sync.wait("refused again", |s, _, _| s == "refused");
    assert!(
        message.contains("cluster.upstream") && message.contains("cache.toml:2"),
        "{message}"
    );
    assert_eq!(tree.conf_d_files(), good);
    assert_eq!(
        stamps,
        (
            tree.stamp(UPSTREAM_FILE),
            tree.stamp("71-config-sync-cache.toml")
        )
    );
    assert!(!sync.probe().status.success());

    // A file of the node's own under one of config-sync's names is never overwritten.
    let sync = {
        drop(sync);
        std::fs::remove_file(tree.conf_d().join("71-config-sync-cache.toml")).expect("rm");
        std::fs::write(tree.conf_d().join("71-config-sync-cache.toml"), "[cache]\n")
            .expect("write");
        tree.publish(&[("cache.toml", "[cache]\ncapacity = 100\n")]);
        Sync::start(&tree, Some("10.96.0.11"), "200ms", "pod-b")
    };
    let (message, _) = sync.wait("refused", |s, _, _| s == "refused");
    assert!(message.contains("not written by config-sync"), "{message}");
    assert_eq!(tree.read("71-config-sync-cache.toml"), "[cache]\n");
}

#[test]
fn sigterm_removes_only_its_own_files_and_a_newer_pod_takes_over_first() {
    let mut tree = Tree::new(HOST, &[("cache.toml", "[cache]\ncapacity = 100\n")]);
    std::fs::write(
        tree.conf_d().join("50-node.toml"),
        "[cache]\ncapacity = 7\n",
    )
    .expect("write");
    // A file the old pod wrote for a key that is gone, then the pod was killed (SIGKILL):
    // the next owner removes it.
    let old = Sync::start(&tree, Some("10.96.0.11"), "200ms", "pod-old");
    old.wait_ready();
    tree.publish(&[
        ("cache.toml", "[cache]\ncapacity = 100\n"),
        ("gone.toml", "[cache]\n"),
    ]);
    old.wait("gone.toml", |_, m, _| m.contains("gone.toml"));
    drop(old);
    tree.publish(&[("cache.toml", "[cache]\ncapacity = 100\n")]);

    // A rolling update with maxSurge: pod-a runs, pod-b (newer) starts beside it.
    let a = Sync::start(&tree, Some("10.96.0.11"), "200ms", "pod-a");
    a.wait_ready();
    assert!(!tree.conf_d().join("71-config-sync-gone.toml").exists());
    assert_eq!(header_owner(&tree.read(UPSTREAM_FILE)), "pod-a");
    let b = Sync::start(&tree, Some("10.96.0.11"), "200ms", "pod-b");
    b.wait_ready();
    let deadline = Instant::now() + WAIT;
    while header_owner(&tree.read("71-config-sync-cache.toml")) != "pod-b"
        || header_owner(&tree.read(UPSTREAM_FILE)) != "pod-b"
    {
        assert!(Instant::now() < deadline, "not taken over:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    // pod-a stands by (and stays ready), then stops: it owns nothing, removes nothing.
    let (state, message) = a.wait_two_syncs();
    assert_eq!(state, "ready", "{message}");
    assert!(
        message.contains("standing by") && message.contains("pod-b"),
        "{message}"
    );
    assert!(a.terminate().success());
    assert_eq!(tree.conf_d_files().len(), 3, "{:?}", tree.conf_d_files());
    assert_eq!(header_owner(&tree.read(UPSTREAM_FILE)), "pod-b");

    // The DaemonSet is deleted: pod-b gets SIGTERM and removes its files, only those.
    let b_status = b.status.clone();
    assert!(b.terminate().success());
    let left: Vec<String> = tree.conf_d_files().into_iter().map(|(n, _)| n).collect();
    assert_eq!(left, ["50-node.toml"]);
    let status = std::fs::read_to_string(&b_status).expect("status");
    assert!(
        status.starts_with("stopped\n") && status.contains("back on its own config"),
        "{status}"
    );
}

#[test]
fn a_node_is_never_left_without_a_cluster_upstream() {
    let tree = Tree::new(
        HOST_WITHOUT_UPSTREAM,
        &[("cache.toml", "[cache]\ncapacity = 100\n")],
    );
    // No kube-dns-upstream Service, none in the ConfigMap, none on the node: refused.
    let sync = Sync::start(&tree, None, "1h", "pod-a");
    let (message, _) = sync.wait("refused", |s, _, _| s == "refused");
    assert!(message.contains("names no cluster upstream"), "{message}");
    assert!(tree.conf_d_files().is_empty());
    drop(sync);

    // With the Service: written; on SIGTERM the upstream file stays, the rest goes.
    let sync = Sync::start(&tree, Some("10.96.0.11"), "1h", "pod-b");
    sync.wait_ready();
    assert_eq!(tree.conf_d_files().len(), 2);
    let status = sync.status.clone();
    assert!(sync.terminate().success());
    let left: Vec<String> = tree.conf_d_files().into_iter().map(|(n, _)| n).collect();
    assert_eq!(left, [UPSTREAM_FILE]);
    let said = std::fs::read_to_string(status).expect("status");
    assert!(
        said.contains("removed 71-config-sync-cache.toml") && said.contains("kept"),
        "{said}"
    );
    let check = common::daemon::check_config_with(&tree.config(), &["--require-cluster-upstream"]);
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn a_rollout_stage_holds_the_nodes_outside_it_on_the_version_they_have() {
    const CACHE: &str = "71-config-sync-cache.toml";
    let v1 = [("cache.toml", "[cache]\ncapacity = 100\n")];
    let (mut canary, mut other) = (Tree::new(HOST, &v1), Tree::new(HOST, &v1));
    let on_canary = Sync::start_on(&canary, "node-canary", "pod-c");
    // node-b is in bucket 82 (FNV-1a of the name, modulo 100).
    assert_eq!(localdns::config_sync::stage::bucket("node-b"), 82);
    let mut on_b = Sync::start_on(&other, "node-b", "pod-b");
    on_canary.wait_ready();
    on_b.wait_ready();
    let stamp = other.stamp(CACHE);

    // A new version, staged to the canary by name: only it takes the version.
    let v2 = "[cache]\ncapacity = 200\n";
    fn staged(stage: &str) -> [(&str, &str); 2] {
        [
            ("cache.toml", "[cache]\ncapacity = 200\n"),
            ("rollout-stage", stage),
        ]
    }
    let only_canary = staged("percent = 0\nnodes = [\"node-canary\"]\n");
    canary.publish(&only_canary);
    other.publish(&only_canary);
    let (message, _) = on_b.wait("waiting", |s, _, _| s == "waiting");
    assert!(
        message.contains("waiting for the stage: node-b is in bucket 82")
            && message.contains(&format!("conf.d keeps {UPSTREAM_FILE}, {CACHE}")),
        "{message}"
    );
    on_canary.wait("v2 on the canary", |s, _, _| {
        s == "ready" && canary.read(CACHE).ends_with(v2)
    });
    assert!(other.read(CACHE).ends_with("capacity = 100\n"));
    assert_eq!(other.stamp(CACHE), stamp, "written while waiting");
    // Waiting is ready (the node is where the operator wants it), and the probe says why.
    let probe = on_b.probe();
    assert!(probe.status.success(), "{probe:?}");
    assert!(String::from_utf8_lossy(&probe.stdout).starts_with("waiting for the stage: node-b"));
    assert!(!on_b.log().contains("not synced"), "{}", on_b.log());

    // A rolling update of the DaemonSet on node-b during the stage: the new pod keeps the
    // same version and takes the files over, so the old one stopping removes nothing.
    let newer = Sync::start_on(&other, "node-b", "pod-b2");
    newer.wait("waiting", |s, _, _| s == "waiting");
    let deadline = Instant::now() + WAIT;
    while header_owner(&other.read(CACHE)) != "pod-b2" {
        assert!(
            Instant::now() < deadline,
            "not taken over:\n{}",
            newer.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(on_b.terminate().success());
    assert!(other.read(CACHE).ends_with("capacity = 100\n"));
    assert_eq!(header_owner(&other.read(UPSTREAM_FILE)), "pod-b2");
    on_b = newer;

    // A stage config-sync cannot read is refused: nothing changes anywhere.
    other.publish(&staged("percent = 150\n"));
    let (message, _) = on_b.wait("refused", |s, _, _| s == "refused");
    assert!(
        message.contains("rollout-stage: percent = 150: must be 0 to 100"),
        "{message}"
    );
    assert!(other.read(CACHE).ends_with("capacity = 100\n"));

    // The stage widened to 83%: node-b's bucket is in it now.
    other.publish(&staged("percent = 83\n"));
    on_b.wait("v2 on node-b", |s, m, _| {
        s == "ready" && m.starts_with("in sync")
    });
    assert!(other.read(CACHE).ends_with(v2), "{}", other.read(CACHE));
    let names: Vec<String> = other.conf_d_files().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, [UPSTREAM_FILE, CACHE]);
}

#[test]
fn a_running_localdns_reloads_what_config_sync_writes_and_what_it_removes() {
    let up = Upstream::start();
    up.zone("example.com")
        .a("www.example.com", 300, "192.0.2.1");
    let corp = Upstream::start();
    corp.zone("corp.example")
        .a("db.corp.example", 300, "10.1.1.1");
    let d = Daemon::start(&Config::to(up.addr));
    std::fs::create_dir_all(d.config_path.parent().expect("dir").join("conf.d")).expect("mkdir");
    let before = client::udp(d.dns, &query("db.corp.example", RecordType::A)).expect("answer");
    assert_ne!(before.response_code(), ResponseCode::NoError);

    // The ConfigMap adds a stub zone; no kube-dns-upstream Service in this "cluster".
    let stub = format!(
        "[[stub]]\nzone = \"corp.example\"\nservers = [\"{}\"]\n",
        corp.addr
    );
    let tree = Tree::new("", &[("corp.toml", &stub)]);
    let started = Instant::now();
    let sync = Sync::start_for(&tree, &d.config_path, None, "1h", "pod-a");
    sync.wait_ready();
    d.wait_notify("RELOADING=1", WAIT);
    let ready = d.wait_notify("READY=1", WAIT);
    assert!(!ready.contains("REFUSED"), "{ready}");
    println!(
        "config-sync started to localdns reloaded: {:?}",
        started.elapsed()
    );
    let after = client::udp(d.dns, &query("db.corp.example", RecordType::A)).expect("answer");
    assert_eq!(after.response_code(), ResponseCode::NoError, "{after:?}");
    assert_eq!(client::addrs(&after), ["10.1.1.1"]);
    assert!(
        sync.log()
            .contains("KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"),
        "{}",
        sync.log()
    );

    // Stopped: the file goes, the daemon reloads its own config, the stub is gone.
    assert!(sync.terminate().success());
    d.wait_notify("RELOADING=1", WAIT);
    d.wait_notify("READY=1", WAIT);
    assert!(d.stderr().contains("config reloaded"), "{}", d.stderr());
    let gone = client::udp(d.dns, &query("other.corp.example", RecordType::A)).expect("answer");
    assert_ne!(gone.response_code(), ResponseCode::NoError);
    assert_eq!(corp.count("other.corp.example", RecordType::A), 0);
}
