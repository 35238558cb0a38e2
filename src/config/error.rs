//! The one error type of config loading, and where in which file a problem is.

use std::fmt;
use std::path::PathBuf;

/// Why a config could not be loaded. Every variant names the file; `Invalid` also names
/// the line and the key when they are known. Callers exit with 64 (EX_USAGE) on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file or conf.d directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad syntax, an unknown key, a wrong type, a bad value, or a bad combination of values.
    #[error("{at}: {}{reason}", key_prefix(key.as_deref()))]
    Invalid {
        at: Location,
        /// Dotted key path such as `listen.addresses[1]`; `None` for syntax errors.
        key: Option<String>,
        reason: String,
    },
}

fn key_prefix(key: Option<&str>) -> String {
    key.map(|k| format!("key `{k}`: ")).unwrap_or_default()
}

/// A place in the config: a file (or the built-in defaults) and a line when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `None` when the value came from the built-in defaults.
    pub file: Option<PathBuf>,
    /// 1-based.
    pub line: Option<usize>,
}

impl Location {
    pub(crate) fn defaults() -> Self {
        Self {
            file: None,
            line: None,
        }
    }

    /// The location of byte offset `at` in `text`, read from `file`.
    pub(crate) fn at_offset(file: PathBuf, text: &str, at: Option<usize>) -> Self {
        let line = at.map(|at| {
            text.as_bytes()[..at.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        Self {
            file: Some(file),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("(defaults)")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_key_and_reason() {
        let e = ConfigError::Invalid {
            at: Location {
                file: Some("/etc/localdns/conf.d/10-x.toml".into()),
                line: Some(7),
            },
            key: Some("listen.addresses[1]".into()),
            reason: "invalid IP address syntax".into(),
        };
        assert_eq!(
            e.to_string(),
            "/etc/localdns/conf.d/10-x.toml:7: key `listen.addresses[1]`: invalid IP address syntax"
        );
        let e = ConfigError::Invalid {
            at: Location::defaults(),
            key: Some("upstream.servers".into()),
            reason: "empty".into(),
        };
        assert_eq!(e.to_string(), "(defaults): key `upstream.servers`: empty");
    }

    #[test]
    fn lines_count_from_one() {
        let text = "a = 1\nb = 2\n";
        assert_eq!(Location::at_offset("f".into(), text, Some(0)).line, Some(1));
        assert_eq!(Location::at_offset("f".into(), text, Some(6)).line, Some(2));
    }
}
