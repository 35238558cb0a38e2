//! Build-time facts for `localdns --version` (`localdns::cli::VERSION`):
//! - `LOCALDNS_BUILD_VERSION`: `$LOCALDNS_VERSION` when set (packaging/build --version sets
//!   it), else the crate version;
//! - `LOCALDNS_BUILD_COMMIT`: `$LOCALDNS_GIT_COMMIT` when set, else the 12-digit commit of
//!   the checkout (`git rev-parse --short=12 HEAD`), else `unknown` (no git, a tarball).
//!
//! Cargo re-runs this only when the checked-out commit moves: it watches `HEAD` and the
//! branch ref it names (loose file, or packed-refs), found through git itself so that
//! worktrees, whose `.git` is a file, work too.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LOCALDNS_VERSION");
    println!("cargo:rerun-if-env-changed=LOCALDNS_GIT_COMMIT");

    let version = std::env::var("LOCALDNS_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    let commit = match std::env::var("LOCALDNS_GIT_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            watch_git();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=LOCALDNS_BUILD_VERSION={version}");
    println!("cargo:rustc-env=LOCALDNS_BUILD_COMMIT={commit}");
}

/// `git ARGS` in the crate's directory: its trimmed stdout, or `None` when git is missing,
/// this is no checkout, or the command fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Emit `rerun-if-changed` for the files whose change means another commit. Only existing
/// files are named: cargo would re-run for a missing one on every build.
fn watch_git() {
    let path = |name: &str| git(&["rev-parse", "--path-format=absolute", "--git-path", name]);
    let mut watched: Vec<PathBuf> = Vec::new();
    watched.extend(path("HEAD").map(PathBuf::from));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A commit rewrites the loose ref; a fresh clone or `git gc` keeps it in packed-refs
        // only, and then the next commit creates the loose file: watch its folder for that.
        if let Some(loose) = path(&branch).map(PathBuf::from) {
            if loose.exists() {
                watched.push(loose);
            } else {
                watched.extend(loose.parent().map(PathBuf::from));
            }
        }
        watched.extend(path("packed-refs").map(PathBuf::from));
    }
    for file in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
}
