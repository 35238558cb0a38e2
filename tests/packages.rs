//! Checks of the packages that `packaging/build` leaves in target/packages/ for the crate's
//! version, for each architecture (amd64 and arm64): what they contain, what they declare,
//! what the linters say, and that the packaged binary runs and answers queries (the arm64
//! one under `qemu-aarch64-static` with Debian's arm64 libc). Nothing is installed here;
//! the install, upgrade and removal life cycle runs under a real systemd in the container
//! tests (amd64).
//!
//! Without the packages (or a tool to read them) a test prints `SKIPPED ...` and passes, so
//! that a plain `cargo test` works before any package was built; under `CI=true`, where
//! `.ci/run` builds them first, that is a failure instead.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use clap::CommandFactory;
use common::daemon::{Config, Daemon};
use common::dig::dig;
use common::skipped;
use common::upstream::{Transport, Upstream};
use hickory_proto::rr::RecordType;

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
    ("/usr/share/man/man5/localdns.toml.5.gz", "-rw-r--r--"),
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

/// An architecture `packaging/build` makes packages for.
struct Arch {
    /// Debian's name, in the .deb's name and Architecture field.
    deb: &'static str,
    /// rpm's name, in the .rpm's name and ARCH tag.
    rpm: &'static str,
    /// What `readelf -h` says the binary's machine is.
    machine: &'static str,
    /// What runs the binary here (an x86_64 machine): nothing, or an emulator with the
    /// architecture's libc (Debian's qemu-user-static and libc6-arm64-cross).
    runner: &'static [&'static str],
}

const ARCHES: &[Arch] = &[
    Arch {
        deb: "amd64",
        rpm: "x86_64",
        machine: "Advanced Micro Devices X86-64",
        runner: &[],
    },
    Arch {
        deb: "arm64",
        rpm: "aarch64",
        machine: "AArch64",
        runner: &["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"],
    },
];

impl Arch {
    /// A command that runs `bin` (a binary of this architecture).
    fn command(&self, bin: &Path) -> Command {
        match self.runner {
            [] => Command::new(bin),
            [runner, args @ ..] => {
                let mut c = Command::new(runner);
                c.args(args).arg(bin);
                c
            }
        }
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The two packages of this version for one architecture.
struct Packages {
    arch: &'static Arch,
    deb: PathBuf,
    rpm: PathBuf,
}

/// The packages of this version, one pair per architecture, or `None` (after saying why)
/// when any of them or one of the `tools` that read them are missing.
fn packages(test: &str, tools: &[&str]) -> Option<Vec<Packages>> {
    if !have(test, tools) {
        return None;
    }
    let dir = repo("target/packages");
    let all: Vec<Packages> = ARCHES
        .iter()
        .map(|arch| Packages {
            arch,
            deb: dir.join(format!("localdns_{VERSION}-1_{}.deb", arch.deb)),
            rpm: dir.join(format!("localdns-{VERSION}-1.{}.rpm", arch.rpm)),
        })
        .collect();
    let missing: Vec<_> = all
        .iter()
        .flat_map(|p| [&p.deb, &p.rpm])
        .filter(|f| !f.exists())
        .collect();
    if missing.is_empty() {
        return Some(all);
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

/// The arm64 binary runs here under qemu-aarch64-static with Debian's arm64 libc
/// (libc6-arm64-cross), whose dynamic loader is this.
const ARM64_LOADER: &str = "/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1";

/// The packages, when every binary in them can run here (for arm64: the emulator and the
/// arm64 libc) and the `tools` are installed.
fn runnable_packages(test: &str, tools: &[&str]) -> Option<Vec<Packages>> {
    let mut tools = tools.to_vec();
    tools.extend(ARCHES.iter().filter_map(|a| a.runner.first()));
    let pkgs = packages(test, &tools)?;
    if !Path::new(ARM64_LOADER).exists() {
        skip(
            test,
            &format!("no {ARM64_LOADER}: apt-get install libc6-arm64-cross"),
        );
        return None;
    }
    Some(pkgs)
}

/// The glibc symbol versions `bin` needs (`readelf -V`, which reads every architecture's
/// ELF), e.g. [2, 28], oldest first.
fn glibc_versions(bin: &Path) -> Vec<Vec<u32>> {
    let out = stdout("readelf", &["-V", "--wide", path(bin)]);
    let mut versions: Vec<Vec<u32>> = out
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| v.split('.').map(|n| n.parse().ok()).collect())
        .collect();
    versions.sort();
    versions.dedup();
    versions
}

fn dotted(version: &[u32]) -> String {
    let parts: Vec<String> = version.iter().map(u32::to_string).collect();
    parts.join(".")
}

#[test]
fn lintian_reports_no_error_and_no_unexplained_warning() {
    let Some(pkgs) = packages(
        "lintian_reports_no_error_and_no_unexplained_warning",
        &["lintian"],
    ) else {
        return;
    };
    for p in &pkgs {
        let out = run("lintian", &["--allow-root", path(&p.deb)]);
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "lintian {} ({}):\n{report}",
            out.status,
            p.arch.deb
        );
        // Every warning kept is overridden in packaging/deb/lintian-overrides, with its reason.
        let bad: Vec<_> = report
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
            .collect();
        assert!(bad.is_empty(), "lintian ({}):\n{report}", p.arch.deb);
    }
}

#[test]
fn rpmlint_reports_no_error_and_no_unexplained_warning() {
    let Some(pkgs) = packages(
        "rpmlint_reports_no_error_and_no_unexplained_warning",
        &["rpmlint"],
    ) else {
        return;
    };
    // rpmlint ignores a -c file that does not exist.
    let config = repo("packaging/rpm/rpmlint.toml");
    assert!(config.exists(), "{config:?}");
    for p in &pkgs {
        let out = run("rpmlint", &["-c", path(&config), path(&p.rpm)]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rpmlint {} ({}):\n{report}{}",
            out.status,
            p.arch.rpm,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            report.contains(" 0 errors, 0 warnings"),
            "rpmlint ({}):\n{report}",
            p.arch.rpm
        );
    }
}

#[test]
fn the_binary_runs_on_glibc_2_28_and_names_its_version() {
    let Some(pkgs) = runnable_packages(
        "the_binary_runs_on_glibc_2_28_and_names_its_version",
        &["dpkg-deb", "readelf"],
    ) else {
        return;
    };
    let max: Vec<u32> = MAX_GLIBC.split('.').map(|n| n.parse().unwrap()).collect();
    for p in &pkgs {
        let arch = p.arch.deb;
        let tree = unpack_deb(&p.deb);
        let bin = tree.path().join("usr/bin/localdns");
        // The binary is of the package's architecture.
        let header = stdout("readelf", &["-h", path(&bin)]);
        let machine = header
            .lines()
            .find_map(|l| l.trim().strip_prefix("Machine:"))
            .map(str::trim);
        assert_eq!(machine, Some(p.arch.machine), "{arch}: {header}");

        let versions = glibc_versions(&bin);
        let newest = versions.last().expect("no GLIBC symbol versions");
        assert!(*newest <= max, "{arch}: the binary needs GLIBC {newest:?}");
        eprintln!("{arch}: needs GLIBC_{} at most", dotted(newest));

        // The packaged binary runs here (glibc 2.36; arm64 under the emulator) and says
        // what it is.
        let out = p
            .arch
            .command(&bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{arch}: run {bin:?}: {e}"));
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && version.starts_with(&format!("localdns {VERSION} (git "))
                && version.ends_with(")\n"),
            "{arch}: {}: {version}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The packaged binary of each architecture serves DNS here: the arm64 one under the
/// emulator, on loopback, with a test upstream behind it. A name forwarded over UDP, a
/// cluster name forwarded over TCP, the first again from the cache, then a clean exit on
/// SIGTERM.
#[test]
fn the_packaged_binary_answers_queries() {
    let Some(pkgs) = runnable_packages("the_packaged_binary_answers_queries", &["dpkg-deb", "dig"])
    else {
        return;
    };
    const WWW: &str = "www.example.com";
    const SVC: &str = "kubernetes.default.svc.cluster.local";
    for p in &pkgs {
        let arch = p.arch.deb;
        let tree = unpack_deb(&p.deb);
        let bin = tree.path().join("usr/bin/localdns");
        let up = Upstream::start();
        up.a(WWW, 300, "192.0.2.1").a(SVC, 30, "10.96.0.1");
        // Config::to sends cluster names over TCP, the rest over UDP.
        let d = Daemon::start_command(&Config::to(up.addr), || p.arch.command(&bin));
        let answer = |name: &str| {
            let d = dig(d.dns, &[name, "A"]);
            assert_eq!(d.status().as_deref(), Some("NOERROR"), "{arch}: {d:?}");
            let rdata: Vec<String> = d.answers().into_iter().map(|rr| rr.rdata).collect();
            rdata
        };
        assert_eq!(answer(WWW), ["192.0.2.1"], "{arch}");
        assert_eq!(
            up.count_over(WWW, RecordType::A, Transport::Udp),
            1,
            "{arch}"
        );
        assert_eq!(answer(SVC), ["10.96.0.1"], "{arch}");
        assert_eq!(
            up.count_over(SVC, RecordType::A, Transport::Tcp),
            1,
            "{arch}"
        );
        assert_eq!(answer(WWW), ["192.0.2.1"], "{arch}");
        assert_eq!(
            up.count(WWW, RecordType::A),
            1,
            "{arch}: not from the cache"
        );
        let status = d.terminate(Duration::from_secs(10));
        assert!(status.success(), "{arch}: exit after SIGTERM: {status}");
        eprintln!("{arch}: answered {WWW} (UDP upstream, then cache) and {SVC} (TCP upstream)");
    }
}

#[test]
fn both_packages_ship_the_same_files() {
    let Some(pkgs) = packages(
        "both_packages_ship_the_same_files",
        &["dpkg-deb", "rpm", "sha256sum"],
    ) else {
        return;
    };
    let mut digests = Vec::new();
    for p in &pkgs {
        let arch = p.arch.deb;
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
        assert_eq!(deb_files, rpm_modes, "{arch}: the packages' files differ");
        for (file, mode) in FILES {
            assert_eq!(
                deb_files.get(*file).map(String::as_str),
                Some(*mode),
                "{arch}: {file}"
            );
        }
        assert!(deb.contains_key(DEB_ONLY), "{arch}: {deb:?}");
        assert_eq!(deb.get(CONF_D).map(String::as_str), Some("drwxr-xr-x"));

        // Byte for byte: the .rpm's digests are those of the .deb's files.
        let tree = unpack_deb(&p.deb);
        for (file, (_, digest)) in &rpm {
            let local = tree.path().join(file.trim_start_matches('/'));
            assert_eq!(&sha256(&local), digest, "{arch}: {file} differs");
        }
        for (source, file) in SHIPPED_AS_IS {
            let local = tree.path().join(file.trim_start_matches('/'));
            assert_eq!(
                sha256(&repo(source)),
                sha256(&local),
                "{arch}: {file} is not {source}"
            );
        }
        // The directory the .rpm cannot ship is made by its %post.
        let post = stdout("rpm", &["-qp", "--qf", "%{POSTIN}", path(&p.rpm)]);
        assert!(
            post.contains(&format!("install -d -m 0755 {CONF_D}")),
            "{arch}: {post}"
        );
        let digests_of: BTreeMap<String, String> =
            rpm.into_iter().map(|(name, (_, d))| (name, d)).collect();
        digests.push((arch, digests_of));
    }
    // Across architectures only the binary differs (the man page is rendered once).
    let (first, reference) = &digests[0];
    for (arch, files) in &digests[1..] {
        for (file, digest) in files {
            let same = reference.get(file) == Some(digest);
            assert_eq!(
                same,
                file != "/usr/bin/localdns",
                "{file}: {arch} against {first}"
            );
        }
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{arch} against {first}"
        );
    }
}

#[test]
fn the_config_is_the_only_conffile() {
    let Some(pkgs) = packages("the_config_is_the_only_conffile", &["dpkg-deb", "rpm"]) else {
        return;
    };
    for p in &pkgs {
        assert_eq!(
            stdout("dpkg-deb", &["-I", path(&p.deb), "conffiles"]),
            format!("{CONFFILE}\n"),
            "{}",
            p.arch.deb
        );
        assert_eq!(
            stdout("rpm", &["-qpc", path(&p.rpm)]),
            format!("{CONFFILE}\n"),
            "{}",
            p.arch.rpm
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
}

#[test]
fn dependencies_are_declared() {
    let Some(pkgs) = packages("dependencies_are_declared", &["dpkg-deb", "rpm", "readelf"]) else {
        return;
    };
    for p in &pkgs {
        let arch = p.arch.deb;
        let field = |name: &str| stdout("dpkg-deb", &["-f", path(&p.deb), name]);
        let rpm_tag = |format: &str| stdout("rpm", &["-qp", "--qf", format, path(&p.rpm)]);
        assert_eq!(field("Architecture").trim(), p.arch.deb);
        assert_eq!(rpm_tag("%{ARCH}"), p.arch.rpm);

        let depends = field("Depends");
        let depends: Vec<&str> = depends.trim().split(", ").collect();
        for needed in [
            "nftables",
            "iptables",
            "procps",
            "init-system-helpers (>= 1.57)",
            &format!("libc6 (>= {MAX_GLIBC})"),
        ] {
            assert!(
                depends.contains(&needed),
                "{arch}: {needed} not in {depends:?}"
            );
        }
        // The .rpm requires the newest glibc symbol version the binary needs (rpm reads
        // them from the ELF itself: 2.28 on amd64, a lower one may do on arm64).
        let tree = unpack_deb(&p.deb);
        let newest = glibc_versions(&tree.path().join("usr/bin/localdns"))
            .pop()
            .expect("no GLIBC symbol versions");
        let requires = stdout("rpm", &["-qpR", path(&p.rpm)]);
        let requires: Vec<&str> = requires.lines().map(str::trim).collect();
        for needed in [
            "/usr/sbin/nft",
            "/usr/sbin/iptables",
            "/usr/bin/kill",
            "systemd",
            "/bin/sh",
            &format!("libc.so.6(GLIBC_{})(64bit)", dotted(&newest)),
        ] {
            assert!(
                requires.contains(&needed),
                "{arch}: {needed} not in {requires:?}"
            );
        }
        assert_eq!(field("Version").trim(), format!("{VERSION}-1"));
        assert_eq!(rpm_tag("%{VERSION}-%{RELEASE}"), format!("{VERSION}-1"));
    }
}

/// The maintainer scripts: the packages carry exactly the files of packaging/, and those
/// are valid POSIX sh that shellcheck accepts.
#[test]
fn maintainer_scripts_are_the_checked_ones() {
    let Some(pkgs) = packages(
        "maintainer_scripts_are_the_checked_ones",
        &["dpkg-deb", "rpm", "shellcheck"],
    ) else {
        return;
    };
    let deb_scripts = ["postinst", "prerm", "postrm"];
    let rpm_scripts = [
        ("POSTIN", "post.sh"),
        ("PREUN", "preun.sh"),
        ("POSTUN", "postun.sh"),
    ];
    for p in &pkgs {
        for script in deb_scripts {
            let shipped = stdout("dpkg-deb", &["-I", path(&p.deb), script]);
            let source = std::fs::read_to_string(repo(&format!("packaging/deb/{script}"))).unwrap();
            assert_eq!(shipped, source, "the {} .deb's {script}", p.arch.deb);
        }
        for (tag, script) in rpm_scripts {
            let shipped = stdout(
                "rpm",
                &["-qp", "--qf", &format!("%{{{tag}}}"), path(&p.rpm)],
            );
            let source = std::fs::read_to_string(repo(&format!("packaging/rpm/{script}"))).unwrap();
            assert_eq!(shipped, source, "the {} .rpm's {tag}", p.arch.rpm);
            // rpm runs a scriptlet without a program with /bin/sh.
            let prog = stdout(
                "rpm",
                &["-qp", "--qf", &format!("%{{{tag}PROG}}"), path(&p.rpm)],
            );
            assert!(prog == "(none)" || prog == "/bin/sh", "{tag}PROG {prog}");
        }
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
/// subcommand the binary has (examples/manpage.rs's own test checks the options too). The
/// same page is in every architecture's packages (`both_packages_ship_the_same_files`).
#[test]
fn the_man_page_documents_every_subcommand() {
    let Some(pkgs) = packages(
        "the_man_page_documents_every_subcommand",
        &["dpkg-deb", "gzip"],
    ) else {
        return;
    };
    let tree = unpack_deb(&pkgs[0].deb);
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

/// localdns.toml(5) is in the packages beside localdns(8) (`both_packages_ship_the_same_files`
/// checks the .rpm has the same bytes), renders with neither groff nor man warning, and
/// documents every table (examples/manpage5.rs's tests check every key against the parser).
#[test]
fn the_config_man_page_renders_without_warnings() {
    let Some(pkgs) = packages(
        "the_config_man_page_renders_without_warnings",
        &["dpkg-deb", "gzip", "groff", "man"],
    ) else {
        return;
    };
    let tree = unpack_deb(&pkgs[0].deb);
    let gz = tree.path().join("usr/share/man/man5/localdns.toml.5.gz");
    let page = stdout("gzip", &["-dc", path(&gz)]);
    assert!(page.starts_with(".TH localdns.toml 5 "), "{page}");
    // Each table header of the example it is rendered from, `# [[stub]]` included.
    let example = std::fs::read_to_string(repo("config/example.toml")).unwrap();
    let tables: Vec<&str> = example
        .lines()
        .map(|l| l.trim_start_matches("# "))
        .filter(|l| l.starts_with('[') && l.ends_with(']'))
        .collect();
    assert!(tables.len() >= 8, "{tables:?}");
    for table in tables {
        assert!(
            page.contains(&format!(".SH \"{table}\"")),
            "no {table} in\n{page}"
        );
    }
    let plain = tree.path().join("localdns.toml.5");
    std::fs::write(&plain, &page).unwrap();
    let groff = run("groff", &["-ww", "-man", "-z", path(&plain)]);
    assert!(
        groff.status.success() && groff.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&groff.stderr)
    );
    let man = Command::new("man")
        .args(["--warnings", "-l", path(&gz)])
        .env("MANWIDTH", "80")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .unwrap();
    assert!(man.status.success(), "man: {man:?}");
    assert!(
        man.stderr.is_empty(),
        "man: {}",
        String::from_utf8_lossy(&man.stderr)
    );
    assert!(String::from_utf8_lossy(&man.stdout).contains("fallback_address"));
}

// ---------------------------------------------------------------- the repositories

/// `packaging/repo --out DIR --from FROM` (a throwaway key: no `--key`), or its output.
fn publish(from: &Path, out: &Path) -> String {
    let started = std::time::Instant::now();
    let o = Command::new(repo("packaging/repo"))
        .args(["--out", path(out), "--from", path(from)])
        .stdin(Stdio::null())
        .output()
        .expect("packaging/repo");
    assert!(
        o.status.success(),
        "packaging/repo: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!(
        "packaging/repo took {} ms:\n{listing}",
        started.elapsed().as_millis()
    );
    listing
}

/// `dnf list --available` of the rpm repository `dir` for `arch`, in a throwaway install
/// root, with the packages' and the metadata's signatures checked against `key`
/// (`gpgcheck`, `repo_gpgcheck`) and a failing repository an error (`skip_if_unavailable=0`).
fn dnf_list(dir: &Path, key: &Path, arch: &str) -> Output {
    let root = tempfile::tempdir().expect("tempdir");
    let url = format!("l,file://{}", path(dir));
    let gpgkey = format!("l.gpgkey=file://{}", path(key));
    run(
        "dnf",
        &[
            "-y",
            "--installroot",
            path(root.path()),
            "--releasever=1",
            &format!("--forcearch={arch}"),
            "--repofrompath",
            &url,
            "--repo=l",
            "--setopt=l.gpgcheck=1",
            "--setopt=l.repo_gpgcheck=1",
            "--setopt=l.skip_if_unavailable=0",
            "--setopt",
            &gpgkey,
            "list",
            "--available",
        ],
    )
}

/// `rpm -K` of `rpm` against a throwaway rpm database holding `key` (none: an empty one).
fn rpm_k(rpm: &Path, key: Option<&Path>) -> Output {
    let db = tempfile::tempdir().expect("tempdir");
    let dbpath = path(db.path());
    stdout("rpm", &["--dbpath", dbpath, "--initdb"]);
    if let Some(key) = key {
        stdout("rpm", &["--dbpath", dbpath, "--import", path(key)]);
    }
    run("rpm", &["--dbpath", dbpath, "-K", path(rpm)])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Flip one byte of `file`, `back` bytes before its end (inside a package's payload, or in
/// the signed text of a clear-signed file).
fn tamper(file: &Path, back: usize) {
    let mut bytes = std::fs::read(file).expect("read");
    let i = bytes.len() - back;
    bytes[i] ^= 0x20;
    std::fs::write(file, bytes).expect("write");
}

#[test]
fn the_repositories_are_signed_and_tampering_is_refused() {
    let test = "the_repositories_are_signed_and_tampering_is_refused";
    let tools = [
        "reprepro",
        "createrepo_c",
        "gpg",
        "gpgv",
        "rpmsign",
        "rpm",
        "dnf",
    ];
    let Some(pkgs) = packages(test, &tools) else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (from, out) = (work.path().join("from"), work.path().join("out"));
    std::fs::create_dir(&from).expect("mkdir");
    for p in &pkgs {
        for f in [&p.deb, &p.rpm] {
            std::fs::copy(f, from.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let listing = publish(&from, &out);
    let keyring = out.join("localdns.gpg");
    let armored = out.join("localdns.asc");

    // apt: InRelease and Release.gpg verify with the published key; each architecture's
    // index lists its package, which the pool holds unchanged.
    let dists = out.join("apt/dists/stable");
    stdout(
        "gpgv",
        &["--keyring", path(&keyring), path(&dists.join("InRelease"))],
    );
    stdout(
        "gpgv",
        &[
            "--keyring",
            path(&keyring),
            path(&dists.join("Release.gpg")),
            path(&dists.join("Release")),
        ],
    );
    let release = std::fs::read_to_string(dists.join("Release")).expect("Release");
    for line in [
        "Suite: stable",
        "Architectures: amd64 arm64",
        "Components: main",
    ] {
        assert!(
            release.contains(line),
            "Release has no `{line}`:\n{release}"
        );
    }
    for p in &pkgs {
        let arch = p.arch.deb;
        let index = dists.join(format!("main/binary-{arch}/Packages"));
        let index = std::fs::read_to_string(&index).expect("Packages");
        for line in [
            "Package: localdns".to_string(),
            format!("Version: {VERSION}-1"),
            format!("Architecture: {arch}"),
            format!("SHA256: {}", sha256(&p.deb)),
        ] {
            assert!(
                index.contains(&line),
                "binary-{arch}: no `{line}`:\n{index}"
            );
        }
        let pooled = out.join(format!(
            "apt/pool/main/l/localdns/localdns_{VERSION}-1_{arch}.deb"
        ));
        assert_eq!(sha256(&pooled), sha256(&p.deb), "{arch}: pool copy differs");
    }
    let forged = work.path().join("InRelease");
    std::fs::copy(dists.join("InRelease"), &forged).expect("copy");
    let text_end = std::fs::read_to_string(&forged)
        .expect("InRelease")
        .find("-----BEGIN PGP SIGNATURE-----")
        .expect("clear-signed");
    let len = std::fs::metadata(&forged).expect("len").len() as usize;
    tamper(&forged, len - text_end + 10);
    let o = run("gpgv", &["--keyring", path(&keyring), path(&forged)]);
    assert!(!o.status.success(), "gpgv accepted a tampered InRelease");
    assert!(text(&o).contains("BAD signature"), "{}", text(&o));

    // rpm: each architecture's repository verifies with the key (metadata and packages),
    // and `rpm -K` checks each package's signature, which a changed byte breaks.
    for p in &pkgs {
        let arch = p.arch.rpm;
        let dir = out.join("rpm").join(arch);
        let o = dnf_list(&dir, &armored, arch);
        let listed = text(&o);
        assert!(o.status.success(), "dnf ({arch}): {listed}");
        assert!(
            listed.contains(&format!("localdns.{arch}"))
                && listed.contains(&format!("{VERSION}-1")),
            "dnf ({arch}) does not list the package:\n{listed}"
        );
        let signed = dir.join(p.rpm.file_name().expect("name"));
        let o = rpm_k(&signed, Some(&armored));
        assert!(o.status.success(), "rpm -K ({arch}): {}", text(&o));
        assert!(text(&o).contains("digests signatures OK"), "{}", text(&o));
        let o = rpm_k(&signed, None);
        assert!(
            !o.status.success(),
            "rpm -K without the key passed: {}",
            text(&o)
        );
        let o = rpm_k(&p.rpm, Some(&armored));
        assert!(
            !text(&o).contains("signatures OK"),
            "the unsigned build output verified as signed: {}",
            text(&o)
        );
        let forged = work.path().join(format!("forged.{arch}.rpm"));
        std::fs::copy(&signed, &forged).expect("copy");
        tamper(&forged, 4096);
        let o = rpm_k(&forged, Some(&armored));
        assert!(
            !o.status.success(),
            "rpm -K passed a tampered package: {}",
            text(&o)
        );
    }
    // Metadata changed after signing: dnf refuses the repository.
    let dir = out.join("rpm/x86_64");
    let repomd = dir.join("repodata/repomd.xml");
    let xml = std::fs::read_to_string(&repomd).expect("repomd.xml");
    std::fs::write(&repomd, xml.replacen("<revision>", "<revision>1", 1)).expect("write");
    let o = dnf_list(&dir, &armored, "x86_64");
    assert!(
        !o.status.success(),
        "dnf used forged metadata: {}",
        text(&o)
    );
    assert!(text(&o).contains("Bad GPG signature"), "{}", text(&o));

    let du = stdout("du", &["-sh", "--apparent-size", path(&out)]);
    eprintln!("repository size: {du}");
    assert!(listing.contains("localdns.gpg"));
}
