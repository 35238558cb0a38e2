//! The Debian root filesystem the test containers boot: built once with mmdebstrap into a
//! tarball under the target dir (rebuildable, never committed), extracted once into a base
//! tree, and given to each container as the lower layer of its own overlay.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Debian packages in the image: systemd as PID 1, what the unit runs besides localdns
/// (iptables for the rules, procps for ExecReload's kill; the package depends on both),
/// iproute2 and conntrack to look around, dig for the kubelet stand-in, and rpm for the
/// .rpm package's life cycle (Debian's rpm runs its scriptlets against this systemd), and
/// nftables, whose `nft` deletes the tables iptables-nft created for localdns (and lists
/// what is left).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iptables,iproute2,conntrack,procps,\
                        libnss-systemd,bind9-dnsutils,rpm,nftables";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// `target/tmp/systemd-test`: tarball, base tree and per-test run dirs.
pub fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("systemd-test")
}

fn check(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_tarball(tarball: &Path) {
    let partial = tarball.with_extension("partial.tar.zst");
    let _ = std::fs::remove_file(&partial);
    eprintln!("building the container root filesystem with mmdebstrap (about 15-40 s, once)");
    check(Command::new("mmdebstrap").args([
        "--variant=minbase",
        &format!("--include={PACKAGES}"),
        SUITE,
        partial.to_str().expect("utf-8 path"),
        MIRROR,
    ]));
    std::fs::rename(&partial, tarball).expect("rename tarball");
    // Images of earlier package lists.
    for old in std::fs::read_dir(tarball.parent().expect("dir"))
        .expect("dir")
        .flatten()
    {
        let name = old.file_name().to_string_lossy().into_owned();
        if name.starts_with("rootfs-") && old.path() != tarball {
            let _ = std::fs::remove_file(old.path());
        }
    }
}

/// The extracted base tree, built on first use. Read-only from then on: containers write
/// to their own overlay upper dirs.
pub fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = work_dir();
        std::fs::create_dir_all(&dir).expect("work dir");
        // Named by the package list, so that changing it builds a new image.
        let tag = PACKAGES
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let tarball = dir.join(format!("rootfs-{SUITE}-{tag:08x}.tar.zst"));
        if !tarball.exists() {
            build_tarball(&tarball);
        }
        // The stamp names the tarball and package list the base was extracted from.
        let meta = std::fs::metadata(&tarball).expect("tarball");
        let stamp = format!(
            "{} {} {:?}",
            tarball.display(),
            meta.len(),
            meta.modified().ok()
        );
        let base = dir.join("base");
        let stamp_file = dir.join("base.stamp");
        if std::fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str()) {
            let _ = std::fs::remove_file(&stamp_file);
            if base.exists() {
                std::fs::remove_dir_all(&base).expect("remove old base");
            }
            std::fs::create_dir_all(&base).expect("base dir");
            check(
                Command::new("tar")
                    .arg("-I")
                    .arg("zstd")
                    .arg("-xpf")
                    .arg(&tarball)
                    .arg("-C")
                    .arg(&base),
            );
            std::fs::write(&stamp_file, stamp).expect("stamp");
        }
        base
    })
}
