//! Which settings a reload cannot apply: `[listen]`, `[network]` and `[metrics]` are read
//! once, when the process binds its sockets and sets up the node, and take effect only at
//! the next start. A reload that changes them must say so (and the change must be checked
//! against the node when it arrives), not leave it for a restart where a wrong value
//! fails on every node at once.

use super::{render, Config};

/// The sections applied only at start.
pub const START_ONLY: [&str; 3] = ["listen", "network", "metrics"];

/// The start-only settings whose value in `file` differs from the `running` process's,
/// one line each: `listen.port = 5353 (running: 53)`. Empty when a reload applies all of
/// `file`.
pub fn start_only_changes(running: &Config, file: &Config) -> Vec<String> {
    let (running, file) = (settings(running), settings(file));
    let mut changes = Vec::new();
    for (key, value) in &file {
        match running.iter().find(|(k, _)| k == key) {
            Some((_, was)) if was == value => {}
            Some((_, was)) => changes.push(format!("{key} = {value} (running: {was})")),
            None => changes.push(format!("{key} = {value} (running: unset)")),
        }
    }
    for (key, was) in &running {
        if !file.iter().any(|(k, _)| k == key) {
            changes.push(format!("{key} unset (running: {was})"));
        }
    }
    changes
}

/// `(section.key, value)` of the start-only sections, as [`render`] writes them (every
/// key with its effective value, so defaults compare too).
fn settings(c: &Config) -> Vec<(String, String)> {
    let mut section = "";
    let text = render(c);
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = START_ONLY
                .iter()
                .copied()
                .find(|s| *s == name)
                .unwrap_or("");
        } else if section.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some((key, value)) = line.split_once(" = ") {
            out.push((format!("{section}.{}", key.trim()), value.trim().to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_documents, Environment};
    use std::path::PathBuf;

    fn load(text: &str) -> Config {
        let docs = vec![(PathBuf::from("/etc/localdns/config.toml"), text.to_owned())];
        load_documents(&docs, &Environment::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str =
        "[upstream]\nservers = [\"10.0.0.2\"]\n[cluster]\nupstream = [\"10.96.0.11\"]\n";

    #[test]
    fn a_reloadable_change_needs_no_restart() {
        let running = load(BASE);
        let file = load(&format!(
            "{BASE}[cache]\ncapacity = 5000\n[log]\nqueries = \"all\"\n"
        ));
        assert_eq!(start_only_changes(&running, &file), Vec::<String>::new());
    }

    #[test]
    fn listen_network_and_metrics_changes_are_named_with_both_values() {
        let running = load(BASE);
        let file = load(&format!(
            "{BASE}[listen]\nport = 5353\n[network]\ninterface = \"ldns0\"\n[metrics]\naddress = \"127.0.0.1:9300\"\n"
        ));
        let changes = start_only_changes(&running, &file);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(
            changes.contains(&"listen.port = 5353 (running: 53)".to_owned()),
            "{changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("network.interface = \"ldns0\" (running: \"")),
            "{changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("metrics.address = \"127.0.0.1:9300\"")),
            "{changes:?}"
        );
        // The same file again is no change.
        assert!(start_only_changes(&file, &file).is_empty());
    }
}
