//! Reading the ConfigMap volume as kubelet writes it (its "atomic writer"): every key is a
//! symlink `KEY -> ..data/KEY`, `..data` is a symlink to a timestamped directory
//! (`..2026_11_28_05_00_00.123456789`), and an update writes a new directory, then renames
//! a new `..data` link over the old one. Resolving `..data` once and reading the keys from
//! that directory gives all keys of one version even while kubelet swaps. A plain
//! directory (no `..data`) is read as it is.

use std::io::{self, ErrorKind};
use std::path::Path;

/// `(key, text)` of every file in the volume, sorted by key; hidden entries (kubelet's own)
/// are skipped.
pub fn read_configmap(dir: &Path) -> io::Result<Vec<(String, String)>> {
    let base = match std::fs::read_link(dir.join("..data")) {
        Ok(target) => dir.join(target),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput) => {
            dir.to_path_buf()
        }
        Err(e) => return Err(e),
    };
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&base)? {
        let path = entry?.path();
        let Some(key) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if key.starts_with('.') || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        keys.push((key.to_owned(), text));
    }
    keys.sort();
    Ok(keys)
}
