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
/// What the cloud-init image adds (tests/provisioning.rs): cloud-init itself, curl for the
/// user-data's package download, systemd-resolved, as Ubuntu and Amazon Linux nodes have it
/// (the node-resolver opt-in is tested against it), and gpg, which cloud-init's apt module
/// runs to dearmor an apt source's `key:` (cloud images have it; without it the source is
/// added with no key and apt refuses the repository).
pub const CLOUD_INIT_PACKAGES: &str = "cloud-init,curl,systemd-resolved,gpg";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// `target/tmp/systemd-test`: tarball, base tree and per-test run dirs.
pub fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("systemd-test")
}

/// Run `cmd`; panic with its output unless it succeeds; its stdout.
pub fn check(cmd: &mut Command) -> String {
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build_tarball(tarball: &Path, packages: &str, prefix: &str) {
    let partial = tarball.with_extension("partial.tar.zst");
    let _ = std::fs::remove_file(&partial);
    eprintln!("building the container root filesystem with mmdebstrap (about 15-40 s, once)");
    check(Command::new("mmdebstrap").args([
        "--variant=minbase",
        &format!("--include={packages}"),
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
        if name.starts_with(&format!("{prefix}-")) && old.path() != tarball {
            let _ = std::fs::remove_file(old.path());
        }
    }
}

/// The extracted base tree, built on first use. Read-only from then on: containers write
/// to their own overlay upper dirs.
pub fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| image("rootfs", PACKAGES, "base"))
}

/// [`base`] with [`CLOUD_INIT_PACKAGES`] too: a tarball and tree of its own beside the
/// plain one, so that the systemd tests keep booting the smaller image.
pub fn base_with_cloud_init() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let packages = format!("{PACKAGES},{CLOUD_INIT_PACKAGES}");
        image("cloudinit-rootfs", &packages, "base-cloudinit")
    })
}

/// The tree `dir_name` extracted from the tarball `prefix-SUITE-HASH.tar.zst` of `packages`
/// (built with mmdebstrap when missing).
fn image(prefix: &str, packages: &str, dir_name: &str) -> PathBuf {
    let dir = work_dir();
    std::fs::create_dir_all(&dir).expect("work dir");
    // Named by the package list, so that changing it builds a new image.
    let tag = packages
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let tarball = dir.join(format!("{prefix}-{SUITE}-{tag:08x}.tar.zst"));
    if !tarball.exists() {
        build_tarball(&tarball, packages, prefix);
    }
    // The stamp names the tarball and package list the base was extracted from.
    let meta = std::fs::metadata(&tarball).expect("tarball");
    let stamp = format!(
        "{} {} {:?}",
        tarball.display(),
        meta.len(),
        meta.modified().ok()
    );
    let base = dir.join(dir_name);
    let stamp_file = dir.join(format!("{dir_name}.stamp"));
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
}
