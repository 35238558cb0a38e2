//! Checks of the packages that `packaging/build` leaves in target/packages/ for the crate's
//! version: what they contain, what they declare, and what the linters say. Nothing is
//! installed here; the install, upgrade and removal life cycle runs under a real systemd in
//! the container tests.
//!
//! Without the packages (or a tool to read them) a test prints `SKIPPED ...` and passes, so
//! that a plain `cargo test` works before any package was built; under `CI=true`, where
//! `.ci/run` builds them first, that is a failure instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::CommandFactory;

#[path = "common/skipped.rs"]
mod skipped;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The glibc the binary may need at most: RHEL 8's.
const MAX_GLIBC: &str = "2.28";

/// What both packages must contain (point 2 of the packaging issue), as (path, mode).
const FILES: &[(&str, &str)] = &[
    ("/usr/bin/localdns", "-rwxr-xr-x"),
    ("/usr/lib/systemd/system/localdns.service", "-rw-r--r--"),
    (
        "/usr/lib/systemd/system-preset/50-localdns.preset",
        "-rw-r--r--",
    ),
    ("/usr/libexec/localdns/stop-post", "-rwxr-xr-x"),
    ("/usr/libexec/localdns/node-resolver", "-rwxr-xr-x"),
    ("/usr/lib/tmpfiles.d/localdns.conf", "-rw-r--r--"),
    ("/etc/localdns/config.toml", "-rw-r--r--"),
    ("/usr/share/man/man8/localdns.8.gz", "-rw-r--r--"),
    ("/usr/share/doc/localdns/changelog.Debian.gz", "-rw-r--r--"),
    ("/usr/share/doc/localdns/copyright", "-rw-r--r--"),
    ("/usr/share/licenses/localdns/LICENSE", "-rw-r--r--"),
];
/// Files of the source tree that the packages ship unchanged.
const SHIPPED_AS_IS: &[(&str, &str)] = &[
    (
        "systemd/localdns.service",
        "/usr/lib/systemd/system/localdns.service",
    ),
    ("systemd/stop-post", "/usr/libexec/localdns/stop-post"),
    (
        "cloud-init/node-resolver",
        "/usr/libexec/localdns/node-resolver",
    ),
    (
        "systemd/localdns.tmpfiles",
        "/usr/lib/tmpfiles.d/localdns.conf",
    ),
    (
        "packaging/50-localdns.preset",
        "/usr/lib/systemd/system-preset/50-localdns.preset",
    ),
    ("packaging/config.toml", "/etc/localdns/config.toml"),
    ("LICENSE", "/usr/share/licenses/localdns/LICENSE"),
];
/// In the .deb only: lintian reads its overrides from the package it checks.
const DEB_ONLY: &str = "/usr/share/lintian/overrides/localdns";
/// The conffile / %config(noreplace).
const CONFFILE: &str = "/etc/localdns/config.toml";
/// The empty drop-in directory. cargo-generate-rpm 0.21 cannot write a directory entry
/// (`dir = true` assets fail), so the .rpm's %post makes it instead of shipping it.
const CONF_D: &str = "/etc/localdns/conf.d";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The two packages of this version, or `None` (after saying why) when they or one of the
/// `tools` that read them are missing.
struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

fn packages(test: &str, tools: &[&str]) -> Option<Packages> {
    if !have(test, tools) {
        return None;
    }
    let dir = repo("target/packages");
    let p = Packages {
        deb: dir.join(format!("localdns_{VERSION}-1_amd64.deb")),
        rpm: dir.join(format!("localdns-{VERSION}-1.x86_64.rpm")),
    };
    let missing: Vec<_> = [&p.deb, &p.rpm]
        .into_iter()
        .filter(|f| !f.exists())
        .collect();
    if missing.is_empty() {
        return Some(p);
    }
    skip(test, &format!("{missing:?} missing: run packaging/build"));
    None
}

/// Says why a test cannot run; a failure under CI, where everything must be in place.
fn skip(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why} (CI=true: .ci/run installs the tools and builds the packages)");
    }
    skipped::skipped(test, why);
}

/// `true` when every tool is on PATH; else says which is missing.
fn have(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        test,
        &format!("{missing:?} not installed: run packaging/install-tools"),
    );
    false
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// stdout of a command that must succeed.
fn stdout(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The .deb unpacked into a temporary directory.
fn unpack_deb(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    stdout("dpkg-deb", &["-x", path(deb), path(dir.path())]);
    dir
}

/// The .deb's entries (absolute path -> mode string), directories included.
fn deb_entries(deb: &Path) -> BTreeMap<String, String> {
    stdout("dpkg-deb", &["-c", path(deb)])
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = fields.last().expect("dpkg-deb -c line");
            let name = name.trim_start_matches('.').trim_end_matches('/');
            (
                format!("/{}", name.trim_start_matches('/')),
                fields[0].to_owned(),
            )
        })
        .filter(|(name, _)| name != "/")
        .collect()
}

/// The .rpm's files: absolute path -> (mode string, SHA-256 digest).
fn rpm_files(rpm: &Path) -> BTreeMap<String, (String, String)> {
    let algo = stdout("rpm", &["-qp", "--qf", "%{FILEDIGESTALGO}", path(rpm)]);
    assert_eq!(algo, "8", "file digests are not SHA-256");
    stdout(
        "rpm",
        &[
            "-qp",
            "--qf",
            "[%{FILENAMES} %{FILEMODES:perms} %{FILEDIGESTS}\\n]",
            path(rpm),
        ],
    )
    .lines()
    .map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        (f[0].to_owned(), (f[1].to_owned(), f[2].to_owned()))
    })
    .collect()
}

fn sha256(file: &Path) -> String {
    let out = stdout("sha256sum", &[path(file)]);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn lintian_reports_no_error_and_no_unexplained_warning() {
    let Some(p) = packages(
        "lintian_reports_no_error_and_no_unexplained_warning",
        &["lintian"],
    ) else {
        return;
    };
    let out = run("lintian", &["--allow-root", path(&p.deb)]);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "lintian {}:\n{report}", out.status);
    // Every warning kept is overridden in packaging/deb/lintian-overrides, with its reason.
    let bad: Vec<_> = report
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(bad.is_empty(), "lintian:\n{report}");
}

#[test]
fn rpmlint_reports_no_error_and_no_unexplained_warning() {
    let Some(p) = packages(
        "rpmlint_reports_no_error_and_no_unexplained_warning",
        &["rpmlint"],
    ) else {
        return;
    };
    // rpmlint ignores a -c file that does not exist.
    let config = repo("packaging/rpm/rpmlint.toml");
    assert!(config.exists(), "{config:?}");
    let out = run("rpmlint", &["-c", path(&config), path(&p.rpm)]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rpmlint {}:\n{report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(" 0 errors, 0 warnings"),
        "rpmlint:\n{report}"
    );
}

#[test]
fn the_binary_runs_on_glibc_2_28_and_names_its_version() {
    let Some(p) = packages(
        "the_binary_runs_on_glibc_2_28_and_names_its_version",
        &["dpkg-deb", "objdump"],
    ) else {
        return;
    };
    let tree = unpack_deb(&p.deb);
    let bin = tree.path().join("usr/bin/localdns");
    let symbols = stdout("objdump", &["-T", path(&bin)]);
    let mut versions: Vec<Vec<u32>> = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .map(|v| v.split('.').map(|n| n.parse().unwrap_or(0)).collect())
        .collect();
    versions.sort();
    let newest = versions.last().expect("no GLIBC symbol versions");
    let max: Vec<u32> = MAX_GLIBC.split('.').map(|n| n.parse().unwrap()).collect();
    assert!(*newest <= max, "the binary needs GLIBC {newest:?}");

    // The packaged binary runs here (glibc 2.36) and says what it is.
    let version = stdout(path(&bin), &["--version"]);
    assert!(
        version.starts_with(&format!("localdns {VERSION} (git ")) && version.ends_with(")\n"),
        "{version}"
    );
}

#[test]
fn both_packages_ship_the_same_files() {
    let Some(p) = packages(
        "both_packages_ship_the_same_files",
        &["dpkg-deb", "rpm", "sha256sum"],
    ) else {
        return;
    };
    let deb = deb_entries(&p.deb);
    let rpm = rpm_files(&p.rpm);
    let deb_files: BTreeMap<_, _> = deb
        .iter()
        .filter(|(name, mode)| !mode.starts_with('d') && *name != DEB_ONLY)
        .map(|(name, mode)| (name.clone(), mode.clone()))
        .collect();
    let rpm_modes: BTreeMap<_, _> = rpm
        .iter()
        .map(|(name, (mode, _))| (name.clone(), mode.clone()))
        .collect();
    assert_eq!(deb_files, rpm_modes, "the packages' files differ");
    for (file, mode) in FILES {
        assert_eq!(
            deb_files.get(*file).map(String::as_str),
            Some(*mode),
            "{file}"
        );
    }
    assert!(deb.contains_key(DEB_ONLY), "{deb:?}");
    assert_eq!(deb.get(CONF_D).map(String::as_str), Some("drwxr-xr-x"));

    // Byte for byte: the .rpm's digests are those of the .deb's files.
    let tree = unpack_deb(&p.deb);
    for (file, (_, digest)) in &rpm {
        let local = tree.path().join(file.trim_start_matches('/'));
        assert_eq!(&sha256(&local), digest, "{file} differs");
    }
    for (source, file) in SHIPPED_AS_IS {
        let local = tree.path().join(file.trim_start_matches('/'));
        assert_eq!(
            sha256(&repo(source)),
            sha256(&local),
            "{file} is not {source}"
        );
    }
    // The directory the .rpm cannot ship is made by its %post.
    let post = stdout("rpm", &["-qp", "--qf", "%{POSTIN}", path(&p.rpm)]);
    assert!(
        post.contains(&format!("install -d -m 0755 {CONF_D}")),
        "{post}"
    );
}

#[test]
fn the_config_is_the_only_conffile() {
    let Some(p) = packages("the_config_is_the_only_conffile", &["dpkg-deb", "rpm"]) else {
        return;
    };
    assert_eq!(
        stdout("dpkg-deb", &["-I", path(&p.deb), "conffiles"]),
        format!("{CONFFILE}\n")
    );
    assert_eq!(
        stdout("rpm", &["-qpc", path(&p.rpm)]),
        format!("{CONFFILE}\n")
    );
    // %config(noreplace): an edited copy is kept on upgrade (rpm's FILEFLAGS "cn").
    let flags = stdout(
        "rpm",
        &[
            "-qp",
            "--qf",
            "[%{FILENAMES} %{FILEFLAGS:fflags}\\n]",
            path(&p.rpm),
        ],
    );
    assert!(flags.contains(&format!("{CONFFILE} cn\n")), "{flags}");
}

#[test]
fn dependencies_are_declared() {
    let Some(p) = packages("dependencies_are_declared", &["dpkg-deb", "rpm"]) else {
        return;
    };
    let depends = stdout("dpkg-deb", &["-f", path(&p.deb), "Depends"]);
    let depends: Vec<&str> = depends.trim().split(", ").collect();
    for needed in [
        "nftables",
        "iptables",
        "procps",
        "init-system-helpers (>= 1.57)",
        &format!("libc6 (>= {MAX_GLIBC})"),
    ] {
        assert!(depends.contains(&needed), "{needed} not in {depends:?}");
    }
    let requires = stdout("rpm", &["-qpR", path(&p.rpm)]);
    let requires: Vec<&str> = requires.lines().map(str::trim).collect();
    for needed in [
        "/usr/sbin/nft",
        "/usr/sbin/iptables",
        "/usr/bin/kill",
        "systemd",
        "/bin/sh",
        &format!("libc.so.6(GLIBC_{MAX_GLIBC})(64bit)"),
    ] {
        assert!(requires.contains(&needed), "{needed} not in {requires:?}");
    }
    assert_eq!(
        stdout("dpkg-deb", &["-f", path(&p.deb), "Version"]).trim(),
        format!("{VERSION}-1")
    );
    assert_eq!(
        stdout(
            "rpm",
            &["-qp", "--qf", "%{VERSION}-%{RELEASE}", path(&p.rpm)]
        ),
        format!("{VERSION}-1")
    );
}

/// The maintainer scripts: the packages carry exactly the files of packaging/, and those
/// are valid POSIX sh that shellcheck accepts.
#[test]
fn maintainer_scripts_are_the_checked_ones() {
    let Some(p) = packages(
        "maintainer_scripts_are_the_checked_ones",
        &["dpkg-deb", "rpm", "shellcheck"],
    ) else {
        return;
    };
    let deb_scripts = ["postinst", "prerm", "postrm"];
    for script in deb_scripts {
        let shipped = stdout("dpkg-deb", &["-I", path(&p.deb), script]);
        let source = std::fs::read_to_string(repo(&format!("packaging/deb/{script}"))).unwrap();
        assert_eq!(shipped, source, "the .deb's {script}");
    }
    let rpm_scripts = [
        ("POSTIN", "post.sh"),
        ("PREUN", "preun.sh"),
        ("POSTUN", "postun.sh"),
    ];
    for (tag, script) in rpm_scripts {
        let shipped = stdout(
            "rpm",
            &["-qp", "--qf", &format!("%{{{tag}}}"), path(&p.rpm)],
        );
        let source = std::fs::read_to_string(repo(&format!("packaging/rpm/{script}"))).unwrap();
        assert_eq!(shipped, source, "the .rpm's {tag}");
        // rpm runs a scriptlet without a program with /bin/sh.
        let prog = stdout(
            "rpm",
            &["-qp", "--qf", &format!("%{{{tag}PROG}}"), path(&p.rpm)],
        );
        assert!(prog == "(none)" || prog == "/bin/sh", "{tag}PROG {prog}");
    }
    let files: Vec<PathBuf> = deb_scripts
        .iter()
        .map(|s| repo(&format!("packaging/deb/{s}")))
        .chain(
            rpm_scripts
                .iter()
                .map(|(_, s)| repo(&format!("packaging/rpm/{s}"))),
        )
        .collect();
    for file in &files {
        stdout("sh", &["-n", path(file)]);
    }
    let mut args = vec!["--shell=sh", "--severity=style"];
    args.extend(files.iter().map(|f| path(f)));
    stdout("shellcheck", &args);
}

/// The man page in the packages is rendered from the clap definition: it documents every
/// subcommand the binary has (examples/manpage.rs's own test checks the options too).
#[test]
fn the_man_page_documents_every_subcommand() {
    let Some(p) = packages(
        "the_man_page_documents_every_subcommand",
        &["dpkg-deb", "gzip"],
    ) else {
        return;
    };
    let tree = unpack_deb(&p.deb);
    let page = stdout(
        "gzip",
        &[
            "-dc",
            path(&tree.path().join("usr/share/man/man8/localdns.8.gz")),
        ],
    );
    assert!(page.contains("\n.TH localdns 8 "), "{page}");
    for sub in localdns::cli::Cli::command().get_subcommands() {
        let heading = format!(".SS \"localdns {}\"", sub.get_name());
        assert!(page.contains(&heading), "no {heading} in\n{page}");
    }
}
