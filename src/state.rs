//! What localdns keeps on disk between runs, so that neither a bad config nor a lost one
//! can leave a node without DNS.
//!
//! - **The last good config** (`$STATE_DIRECTORY/last-good.toml`, from the unit's
//!   `StateDirectory=localdns`): the effective config of the last start or reload that was
//!   accepted, rendered as TOML ([`config::render`], which loads back to the same config).
//!   When the config on disk is refused at start (a bad edit, or an upgrade whose new
//!   version rejects a key), `run` and `setup` start on this one and say so loudly, instead
//!   of exiting and leaving the link-local address with nothing behind it.
//! - **What setup created** (`$RUNTIME_DIRECTORY/setup`, from `RuntimeDirectory=localdns`):
//!   the interface name, so that `teardown` removes the right link even when no config can
//!   be read at all.
//!
//! Both directories come from systemd's environment only: run by hand or by tests, nothing
//! is written (tests set the variables to directories of their own).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError, Source};

const LAST_GOOD: &str = "last-good.toml";
const SETUP_RECORD: &str = "setup";

fn dir_from(var: &str) -> Option<PathBuf> {
    // systemd may list several directories separated by ':'; ours is the first.
    let value = std::env::var_os(var)?;
    let first = value.to_str()?.split(':').next()?.to_owned();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// `$STATE_DIRECTORY` (`/var/lib/localdns` under the unit).
pub fn state_dir() -> Option<PathBuf> {
    dir_from("STATE_DIRECTORY")
}

/// `$RUNTIME_DIRECTORY` (`/run/localdns` under the unit).
pub fn runtime_dir() -> Option<PathBuf> {
    dir_from("RUNTIME_DIRECTORY")
}

/// Write `contents` to `path` atomically (temporary file, fsync, rename), unless the file
/// already holds exactly that.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // Per process: localdns's setup and the fallback relay start together and may both
    // write the last good config.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(dir)?.sync_all()
}

/// A config that is running: how it was obtained.
pub struct Loaded {
    pub config: Config,
    /// Set when the config on disk was refused and the last good one is used instead: the
    /// refusal (file, line, key, reason).
    pub refused: Option<ConfigError>,
}

/// Load the config for a start (`run`, `setup`): the files of `source` when they are
/// valid, and then they become the last good config; otherwise the last good config, when
/// there is one, with the refusal returned alongside. The error is the refusal of the
/// files on disk when there is nothing to fall back on.
pub fn load_for_start(source: &Source) -> Result<Loaded, ConfigError> {
    load_with_fallback(source, state_dir().as_deref())
}

/// Load the config for `localdns status` (to find the daemon): the files of `source`, or,
/// when they are refused, the last good config the daemon kept (in `$STATE_DIRECTORY`,
/// else `/var/lib/localdns`), without writing anything.
pub fn load_for_status(source: &Source) -> Result<Config, ConfigError> {
    config::load(source).or_else(|refused| {
        let dir = state_dir().unwrap_or_else(|| PathBuf::from("/var/lib/localdns"));
        let path = dir.join(LAST_GOOD);
        if !path.exists() {
            return Err(refused);
        }
        config::load(&Source {
            conf_dir: Some(path.with_extension("d-none")),
            path,
            explicit: true,
        })
        .map_err(|_| refused)
    })
}

fn load_with_fallback(source: &Source, state: Option<&Path>) -> Result<Loaded, ConfigError> {
    match config::load(source) {
        Ok(config) => {
            if let Some(dir) = state {
                remember(dir, &config);
            }
            Ok(Loaded {
                config,
                refused: None,
            })
        }
        Err(refused) => {
            let Some(path) = state.map(|d| d.join(LAST_GOOD)).filter(|p| p.exists()) else {
                return Err(refused);
            };
            let fallback = Source {
                path: path.clone(),
                explicit: true,
                // No drop-ins: the file is the whole merged config.
                conf_dir: Some(path.with_extension("d-none")),
            };
            match config::load(&fallback) {
                Ok(config) => Ok(Loaded {
                    config,
                    refused: Some(refused),
                }),
                Err(e) => {
                    tracing::error!(
                        "the last good config {} cannot be used either: {e}",
                        path.display()
                    );
                    Err(refused)
                }
            }
        }
    }
}

/// Keep `config` as the last good one (a reload that was accepted calls this too).
/// Failing to write it is logged, never fatal: serving matters more.
pub fn remember(dir: &Path, config: &Config) {
    let text = format!(
        "# The last config localdns accepted, kept so that a start with a refused config\n\
         # still serves. Written by localdns; edits here are overwritten.\n{}",
        config::render(config)
    );
    if let Err(e) = std::fs::create_dir_all(dir)
        .and_then(|()| write_atomic(&dir.join(LAST_GOOD), text.as_bytes()))
    {
        tracing::warn!("cannot keep the last good config in {}: {e}", dir.display());
    }
}

/// [`remember`] in `$STATE_DIRECTORY`, when there is one.
pub fn remember_in_state_dir(config: &Config) {
    if let Some(dir) = state_dir() {
        remember(&dir, config);
    }
}

/// What setup created, for teardown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupRecord {
    /// The interface that holds the listen addresses, when setup manages it.
    pub interface: Option<String>,
    /// Whether setup installed rules.
    pub rules: bool,
    /// The firewall the rules went to (`nftables`, `iptables-nft`, `iptables-legacy`;
    /// earlier versions wrote `nft`, `legacy`, which are still read).
    pub backend: Option<String>,
    /// The systemd invocation (`INVOCATION_ID`) whose ExecStartPre ran the setup: the
    /// daemon of the same invocation does not install everything a second time.
    pub invocation: Option<String>,
    /// nf_tables tables (`ip raw`) that iptables-nft created for localdns's rules: teardown
    /// deletes them again when they are left empty.
    pub created_tables: Vec<String>,
}

impl SetupRecord {
    fn render(&self) -> String {
        let mut out = String::from("# What `localdns setup` installed, for `localdns teardown`.\n");
        if let Some(i) = &self.interface {
            out.push_str(&format!("interface={i}\n"));
        }
        out.push_str(&format!("rules={}\n", self.rules));
        if let Some(b) = &self.backend {
            out.push_str(&format!("backend={b}\n"));
        }
        if let Some(i) = &self.invocation {
            out.push_str(&format!("invocation={i}\n"));
        }
        for t in &self.created_tables {
            out.push_str(&format!("created_table={t}\n"));
        }
        out
    }

    fn parse(text: &str) -> SetupRecord {
        let mut r = SetupRecord::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("interface", v)) if !v.is_empty() => r.interface = Some(v.to_owned()),
                Some(("rules", v)) => r.rules = v == "true",
                Some(("backend", v)) if !v.is_empty() => r.backend = Some(v.to_owned()),
                Some(("invocation", v)) if !v.is_empty() => r.invocation = Some(v.to_owned()),
                Some(("created_table", v)) if !v.is_empty() => r.created_tables.push(v.to_owned()),
                _ => {}
            }
        }
        r
    }

    /// The record in `$RUNTIME_DIRECTORY`, if any.
    pub fn read() -> Option<SetupRecord> {
        let text = std::fs::read_to_string(runtime_dir()?.join(SETUP_RECORD)).ok()?;
        Some(SetupRecord::parse(&text))
    }

    /// Save it in `$RUNTIME_DIRECTORY` (when there is one). Tables recorded by an earlier
    /// setup of this boot stay recorded: a restart's setup finds them already there, but
    /// localdns made them.
    pub fn write(mut self) {
        let Some(dir) = runtime_dir() else { return };
        for t in SetupRecord::read()
            .map(|r| r.created_tables)
            .unwrap_or_default()
        {
            if !self.created_tables.contains(&t) {
                self.created_tables.push(t);
            }
        }
        if let Err(e) = write_atomic(&dir.join(SETUP_RECORD), self.render().as_bytes()) {
            tracing::warn!(
                "cannot record the setup in {}: {e}; teardown without a readable config \
                 falls back to the default interface name",
                dir.display()
            );
        }
    }

    /// Forget it, once teardown removed everything.
    pub fn clear() {
        if let Some(dir) = runtime_dir() {
            let _ = std::fs::remove_file(dir.join(SETUP_RECORD));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn source(path: PathBuf) -> Source {
        Source {
            conf_dir: Some(path.with_extension("d")),
            path,
            explicit: true,
        }
    }

    const GOOD: &str = "[listen]\naddresses = [\"127.0.0.1\"]\nport = 5399\n[upstream]\nservers = [\"192.0.2.1\"]\n";

    #[test]
    fn a_good_config_becomes_the_last_good_one_and_a_bad_one_falls_back_to_it() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let cfg = write(tmp.path(), "config.toml", GOOD);
        let loaded = load_with_fallback(&source(cfg.clone()), Some(&state)).unwrap();
        assert!(loaded.refused.is_none());
        assert!(state.join(LAST_GOOD).exists());

        // A key this version does not know, as after a downgrade or a typo.
        write(tmp.path(), "config.toml", &format!("{GOOD}bogus = 1\n"));
        let loaded = load_with_fallback(&source(cfg.clone()), Some(&state)).unwrap();
        let refused = loaded.refused.expect("the refusal is reported").to_string();
        assert!(refused.contains("config.toml:6"), "{refused}");
        assert!(refused.contains("bogus"), "{refused}");
        assert_eq!(loaded.config.listen.port, 5399);
        assert_eq!(
            loaded.config.upstream.servers,
            vec!["192.0.2.1:53".parse().unwrap()]
        );
        assert_eq!(loaded.config.sources, vec![state.join(LAST_GOOD)]);
    }

    #[test]
    fn a_bad_config_without_a_last_good_one_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = write(tmp.path(), "config.toml", "[listen]\nport = \"x\"\n");
        let state = tmp.path().join("state");
        assert!(load_with_fallback(&source(cfg.clone()), Some(&state)).is_err());
        assert!(load_with_fallback(&source(cfg), None).is_err());
        assert!(!state.join(LAST_GOOD).exists());
    }

    #[test]
    fn the_last_good_config_loads_back_to_the_same_config() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = write(
            tmp.path(),
            "config.toml",
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
                .unwrap(),
        );
        let state = tmp.path().join("state");
        let first = load_with_fallback(&source(cfg.clone()), Some(&state))
            .unwrap()
            .config;
        std::fs::write(&cfg, "not toml [").unwrap();
        let second = load_with_fallback(&source(cfg), Some(&state))
            .unwrap()
            .config;
        assert_eq!(
            Config {
                sources: vec![],
                ..first
            },
            Config {
                sources: vec![],
                ..second
            }
        );
    }

    #[test]
    fn the_setup_record_round_trips() {
        let r = SetupRecord {
            interface: Some("nodelocaldns".into()),
            rules: true,
            backend: Some("nft".into()),
            invocation: Some("0123abcd".into()),
            created_tables: vec!["ip raw".into(), "ip6 raw".into()],
        };
        assert_eq!(SetupRecord::parse(&r.render()), r);
        assert_eq!(SetupRecord::parse("garbage\n"), SetupRecord::default());
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }
}
