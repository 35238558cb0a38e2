//! Configuration: TOML files → one validated [`Config`].
//!
//! The pipeline is staged so that each error can name the file and line it comes from:
//!
//! 1. each document (the main file, then `conf.d/*.toml` in file-name order) is parsed and
//!    checked on its own against the raw schema ([`raw`]): syntax, unknown keys, types and
//!    every value that can be checked alone ([`document`]);
//! 2. the documents are merged, later over earlier ([`merge`]);
//! 3. the merged document is checked as a whole and upstreams are resolved, reading
//!    resolv.conf when needed ([`validate`]).
//!
//! Reload runs the same [`load`]; a failure leaves the running config untouched because
//! nothing here has side effects besides reading files and logging warnings.

mod document;
mod error;
mod merge;
mod raw;
mod render;
mod resolv;
mod restart;
mod types;
mod validate;
mod value;

#[cfg(test)]
mod tests;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub use error::{ConfigError, Location};
pub use render::render;
pub use restart::{start_only_changes, START_ONLY};
pub use types::*;

use document::Document;
use raw::RawConfig;
use validate::Provenance;

/// The main config file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/localdns/config.toml";

/// The config used when no file exists and none was asked for: a developer laptop, no root.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Where to read from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The main config file.
    pub path: PathBuf,
    /// The user passed `--config`: then a missing `path` is an error.
    pub explicit: bool,
    /// Drop-in directory; `None` means `<dir of path>/conf.d`.
    pub conf_dir: Option<PathBuf>,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            path: DEFAULT_PATH.into(),
            explicit: false,
            conf_dir: None,
        }
    }
}

/// What validation reads from the host. Tests point it at temporary files.
#[derive(Debug, Clone)]
pub struct Environment {
    /// systemd-resolved's list of the real upstream servers; preferred when present.
    pub resolved_resolv_conf: PathBuf,
    /// The classic resolv.conf, used when systemd-resolved's file is absent.
    pub etc_resolv_conf: PathBuf,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            resolved_resolv_conf: "/run/systemd/resolve/resolv.conf".into(),
            etc_resolv_conf: "/etc/resolv.conf".into(),
        }
    }
}

/// Reads `source.path` and its conf.d, or the embedded default when neither exists and
/// the path was not given explicitly.
pub fn load(source: &Source) -> Result<Config, ConfigError> {
    load_with(source, &Environment::default())
}

fn load_with(source: &Source, env: &Environment) -> Result<Config, ConfigError> {
    let docs = read_documents(source)?;
    if docs.is_empty() {
        tracing::info!(
            "no config file at {}: using the embedded default",
            source.path.display()
        );
        return load_embedded(env);
    }
    load_documents(&docs, env)
}

/// The drop-in directory of `source`: `--conf-dir`, else `conf.d` beside the main file.
pub fn conf_dir(source: &Source) -> PathBuf {
    match &source.conf_dir {
        Some(dir) => dir.clone(),
        None => source.path.parent().unwrap_or(Path::new("")).join("conf.d"),
    }
}

/// The files [`load`] reads, `(path, text)` in merge order: the main file (when it exists
/// or was asked for), then the drop-ins. Empty when there is none (then [`load`] uses the
/// embedded default). `localdns config-sync` validates its files merged with these.
pub fn read_documents(source: &Source) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ConfigError::Io { path, source }
    };
    let mut docs = Vec::new();
    match std::fs::read_to_string(&source.path) {
        Ok(text) => docs.push((source.path.clone(), text)),
        Err(e) if e.kind() == ErrorKind::NotFound && !source.explicit => {}
        Err(e) => return Err(io(&source.path)(e)),
    }
    for path in drop_ins(&conf_dir(source))? {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        docs.push((path, text));
    }
    Ok(docs)
}

/// The `*.toml` files of `dir` in byte-wise name order; none when `dir` does not exist.
/// Hidden files (editor backups such as `.10-x.toml.swp` or `.#10-x.toml`) are skipped.
fn drop_ins(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().unwrap_or_default();
        let hidden = name.as_encoded_bytes().starts_with(b".");
        if !hidden && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    // OsStr orders by bytes on Unix.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn load_embedded(env: &Environment) -> Result<Config, ConfigError> {
    let docs = [(
        PathBuf::from("(embedded default)"),
        EMBEDDED_DEFAULT.to_owned(),
    )];
    let mut config = load_documents(&docs, env)?;
    config.sources.clear();
    Ok(config)
}

/// The whole pipeline over in-memory documents `(name, text)` in merge order.
pub fn load_documents(
    docs: &[(PathBuf, String)],
    env: &Environment,
) -> Result<Config, ConfigError> {
    let docs = docs
        .iter()
        .map(|(name, text)| Document::parse(name.clone(), text))
        .collect::<Result<Vec<_>, _>>()?;
    let mut merged = toml::Table::new();
    for doc in &docs {
        merge::merge(&mut merged, doc.table.clone());
    }
    // Every document passed alone and merging only combines them, so this rarely fails
    // (and if it does, no single file is to blame).
    let raw: RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            ConfigError::Invalid {
                at: Location::defaults(),
                key: Some(e.path().to_string()),
                reason: format!("after merging all files: {}", e.inner().message()),
            }
        })?;
    let provenance = Provenance::new(&docs, &raw);
    let mut config = validate::validate(raw, env, &provenance)?;
    config.sources = docs.into_iter().map(|d| d.name).collect();
    Ok(config)
}

/// The `[network]` defaults: what `teardown` falls back on when no config can be read.
pub fn default_network() -> Network {
    let r = raw::RawNetwork::default();
    Network {
        firewall: r.firewall(),
        interface: r.interface.0,
        setup_interface: r.setup_interface,
        setup_rules: r.setup_rules,
        rules_check_interval: r.rules_check_interval.0,
        xtables_wait: r.xtables_wait.0,
        fallback: r.fallback,
        fallback_address: r.fallback_address,
    }
}
