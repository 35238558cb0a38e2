//! The package repositories of `packaging/repo`, published and served to a test node the
//! way a fleet gets them: a release key (made here, in a throwaway GNUPGHOME), the
//! repository directory written with that key, and a static HTTP server for it on the
//! node's loopback (the container shares the node namespace), as a bucket or a mirror
//! serves it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::netns::Netns;
use super::rootfs::check;

/// Where the repository is served inside the node namespace (and so in the container).
pub const URL: &str = "http://127.0.0.1:8080";
const PORT: &str = "8080";

/// A release signing key without a passphrase, exported (armoured secret key) to
/// `dir/release-key.asc`: what a release pipeline keeps in its secret store and passes to
/// `packaging/repo --key`.
pub fn release_key(dir: &Path) -> PathBuf {
    let home = dir.join("gnupg");
    std::fs::create_dir_all(&home).expect("gnupg dir");
    let gpg = |args: &[&str]| {
        check(
            Command::new("gpg")
                .stdin(Stdio::null())
                .env("GNUPGHOME", &home)
                .args(["--batch", "--quiet", "--pinentry-mode", "loopback"])
                .args(["--passphrase", ""])
                .args(args),
        )
    };
    gpg(&[
        "--quick-generate-key",
        "localdns release (test) <release@example.invalid>",
        "rsa3072",
        "sign",
        "1d",
    ]);
    let secret = gpg(&["--armor", "--export-secret-keys"]);
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", &home)
        .args(["--kill", "all"])
        .output();
    let key = dir.join("release-key.asc");
    std::fs::write(&key, secret).expect("key file");
    key
}

/// `packaging/repo --out OUT --key KEY --from FROM`; its listing.
pub fn publish(from: &Path, out: &Path, key: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/repo");
    check(
        Command::new(script)
            .stdin(Stdio::null())
            .arg("--out")
            .arg(out)
            .arg("--key")
            .arg(key)
            .arg("--from")
            .arg(from),
    )
}

/// python3's `http.server` serving a directory on [`URL`] in a namespace; stopped (by its
/// PID) on drop. Its request log goes to `requests.log` beside the directory.
pub struct Server {
    child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Start it; returns once it listens (it prints "Serving HTTP on ..." after the bind).
    pub fn start(ns: &Netns, dir: &Path) -> Server {
        let log = dir.with_file_name("requests.log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(["python3", "-u", "-m", "http.server", "--bind", "127.0.0.1"])
            .arg("--directory")
            .arg(dir)
            .arg(PORT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("request log"))
            .spawn()
            .expect("python3 -m http.server");
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
        let server = Server { child, log };
        assert!(
            read.is_ok_and(|n| n > 0) && line.starts_with("Serving HTTP on 127.0.0.1"),
            "http.server did not start ({line:?}):\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        server
    }

    /// The requests it answered so far (its log lines).
    pub fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
