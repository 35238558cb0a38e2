//! Any text as config files: the main file and up to two conf.d drop-ins (split at NUL
//! bytes), through the whole loader. Never a panic; either a config or an error that names
//! where: a file that was given (and a line inside it) or a key.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localdns::config::{load_documents, ConfigError, Environment};

/// resolv.conf files in a private temporary directory, written once per process.
fn environment() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("localdns-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let etc = dir.join("resolv.conf");
        std::fs::write(&etc, "nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
            .expect("resolv.conf");
        Environment {
            resolved_resolv_conf: dir.join("absent-resolved.conf"),
            etc_resolv_conf: etc,
        }
    })
}

const NAMES: [&str; 3] = [
    "/etc/localdns/config.toml",
    "/etc/localdns/conf.d/10-cluster.toml",
    "/etc/localdns/conf.d/20-stubs.toml",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let docs: Vec<(PathBuf, String)> = text
        .splitn(NAMES.len(), '\0')
        .zip(NAMES)
        .map(|(t, n)| (PathBuf::from(n), t.to_owned()))
        .collect();
    match load_documents(&docs, environment()) {
        Ok(_) => {}
        Err(ConfigError::Invalid { at, key, reason }) => {
            assert!(!reason.is_empty(), "empty reason at {at:?}, key {key:?}");
            match &at.file {
                Some(file) => {
                    let (_, t) = docs.iter().find(|(n, _)| n == file).expect("a given file");
                    if let Some(line) = at.line {
                        assert!(line >= 1 && line <= t.lines().count() + 1, "line {line}");
                    }
                }
                None => assert!(key.is_some(), "neither a file nor a key: {reason}"),
            }
        }
        Err(e @ ConfigError::Io { .. }) => panic!("I/O error on in-memory documents: {e}"),
    }
});
