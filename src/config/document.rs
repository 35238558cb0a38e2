//! One config document: parsed, checked on its own, and able to say on which line a key is.
//!
//! Each file is deserialized into [`RawConfig`] by itself before merging, so that a bad key
//! or value is reported against the file and line that holds it. The document keeps a
//! span-preserving parse (`toml_edit`) only to turn key paths into line numbers, both for
//! those errors and for cross-field errors found after merging.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use super::error::{ConfigError, Location};
use super::raw::RawConfig;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `stub[2].servers`, as shown in error messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// Parses the internal spelling `a.b[1].c`; only for key names of our own schema.
    pub fn of(text: &str) -> Self {
        let mut segs = Vec::new();
        for part in text.split('.') {
            let (key, indices) = part
                .split_once('[')
                .map_or((part, ""), |(k, rest)| (k, rest));
            segs.push(Seg::Key(key.to_owned()));
            for index in indices.split('[').filter(|s| !s.is_empty()) {
                if let Ok(i) = index.trim_end_matches(']').parse() {
                    segs.push(Seg::Index(i));
                }
            }
        }
        Self(segs)
    }

    fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        let segs = path
            .iter()
            .filter_map(|s| match s {
                Segment::Seq { index } => Some(Seg::Index(*index)),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    Some(Seg::Key(key.clone()))
                }
                Segment::Unknown => None,
            })
            .collect();
        Self(segs)
    }

    /// The path with its first `stub[i]` replaced by `stub[j]`.
    pub fn with_stub_index(&self, j: usize) -> Self {
        let mut segs = self.0.clone();
        if let Some(Seg::Index(i)) = segs.get_mut(1) {
            *i = j;
        }
        Self(segs)
    }

    /// For `stub[i]…`, the index `i`.
    pub fn stub_index(&self) -> Option<usize> {
        match self.0.as_slice() {
            [Seg::Key(k), Seg::Index(i), ..] if k == "stub" => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// A document that passed its own checks.
pub struct Document {
    pub name: PathBuf,
    text: String,
    /// For merging.
    pub table: toml::Table,
    /// For line numbers.
    spans: toml_edit::ImDocument<String>,
    /// The normalised zones of its `[[stub]]` entries, in order.
    pub stub_zones: Vec<String>,
}

impl Document {
    /// Parses `text` and checks every key and value in it.
    pub fn parse(name: PathBuf, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(name, text, DEPRECATED)
    }

    /// [`Document::parse`] with another list of deprecated keys (for tests).
    pub fn parse_with(
        name: PathBuf,
        text: &str,
        deprecated: &[Deprecated],
    ) -> Result<Self, ConfigError> {
        let spans = toml_edit::ImDocument::parse(text.to_owned());
        // Keys a later version removed are dropped with a warning, never refused: an
        // upgrade must not turn a working node config into a refused one.
        let mut cleaned = text.parse::<toml::Table>().ok();
        // Where `key` stands in this document, for the warnings.
        let location = |key: &str| {
            let at = spans
                .as_ref()
                .ok()
                .and_then(|doc| span_of(doc, &KeyPath::of(key)))
                .map(|r| r.start);
            Location::at_offset(name.clone(), text, at)
        };
        for r in RENAMED {
            if cleaned.as_ref().is_some_and(|t| holds(t, r.key)) {
                tracing::warn!(
                    "{}: key `{}` is deprecated since localdns {} and still honoured: {}",
                    location(r.key),
                    r.key,
                    r.since,
                    r.instead
                );
            }
        }
        let dropped = cleaned
            .as_mut()
            .map(|t| strip_deprecated(t, deprecated))
            .unwrap_or_default();
        for d in &dropped {
            tracing::warn!(
                "{}: key `{}` is deprecated since localdns {} and ignored: {}; remove it",
                location(d.key),
                d.key,
                d.since,
                d.instead
            );
        }
        let parsed = match cleaned.filter(|_| !dropped.is_empty()) {
            Some(table) => serde_path_to_error::deserialize(toml::Value::Table(table))
                .map_err(|e| (KeyPath::from_serde(e.path()), e.into_inner())),
            None => serde_path_to_error::deserialize(toml::Deserializer::new(text))
                .map_err(|e| (KeyPath::from_serde(e.path()), e.into_inner())),
        };
        let raw: RawConfig = match parsed {
            Ok(raw) => raw,
            Err((mut key, inner)) => {
                // toml's syntax messages may span lines; keep the error on one line for the journal.
                let reason: Vec<&str> = inner
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect();
                let reason = reason.join(": ");
                // toml has no message for some syntax errors (a key with no value at the end).
                let reason = if reason.is_empty() {
                    "invalid TOML syntax".to_owned()
                } else {
                    reason
                };
                // serde_path_to_error usually records the unknown key itself; make sure.
                if let Some(field) = unknown_field(&reason) {
                    if key.0.last() != Some(&Seg::Key(field.to_owned())) {
                        key.0.push(Seg::Key(field.to_owned()));
                    }
                }
                let span = spans.as_ref().ok().and_then(|doc| span_of(doc, &key));
                let at = span.or(inner.span()).map(|s| s.start);
                return Err(ConfigError::Invalid {
                    at: Location::at_offset(name, text, at),
                    key: (!key.0.is_empty()).then(|| key.to_string()),
                    reason,
                });
            }
        };
        // Both parsers accept the same language, so these cannot fail after the above.
        let invalid = |reason: String| ConfigError::Invalid {
            at: Location::at_offset(name.clone(), text, None),
            key: None,
            reason,
        };
        let mut table = text
            .parse::<toml::Table>()
            .map_err(|e| invalid(e.message().to_owned()))?;
        strip_deprecated(&mut table, deprecated);
        let spans = spans.map_err(|e| invalid(e.message().to_owned()))?;
        Ok(Self {
            name,
            text: text.to_owned(),
            table,
            spans,
            stub_zones: raw.stub.into_iter().map(|s| s.zone.0).collect(),
        })
    }

    /// Does this document set `key` (up to its first array index)?
    pub fn sets(&self, key: &KeyPath) -> bool {
        let mut table = &self.table;
        let keys: Vec<&str> = key
            .0
            .iter()
            .map_while(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                Seg::Index(_) => None,
            })
            .collect();
        for (n, k) in keys.iter().enumerate() {
            match table.get(*k) {
                None => return false,
                Some(_) if n + 1 == keys.len() => return true,
                Some(toml::Value::Table(t)) => table = t,
                Some(_) => return false,
            }
        }
        false
    }

    /// Where `key` is in this document; the line is `None` when it cannot be found.
    pub fn location(&self, key: &KeyPath) -> Location {
        let at = span_of(&self.spans, key).map(|s| s.start);
        Location::at_offset(self.name.clone(), &self.text, at)
    }
}

/// A key that a later version removed: accepted with a warning for at least one minor
/// version after its removal, then refused like any unknown key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deprecated {
    /// Dotted path, e.g. `network.some_key`.
    pub key: &'static str,
    /// The version that stopped using it.
    pub since: &'static str,
    /// What to do instead.
    pub instead: &'static str,
}

/// Keys removed from the schema and still accepted. None yet: 0.1 is the first release.
/// When a key goes, it moves here (and out of [`super::raw`]) in the same change.
pub const DEPRECATED: &[Deprecated] = &[];

/// Keys that have a new name and are still read, with a warning naming the file and line,
/// for at least one minor version; then they move to [`DEPRECATED`].
pub const RENAMED: &[Deprecated] = &[Deprecated {
    key: "network.iptables_backend",
    since: "0.2",
    instead: "use `network.firewall` instead (`auto`, `nftables`, `iptables-nft`, \
              `iptables-legacy`; `nft` is `iptables-nft`, `legacy` is `iptables-legacy`); \
              `network.firewall` wins when both are set",
}];

/// Whether `table` holds the dotted `key`.
fn holds(table: &toml::Table, key: &str) -> bool {
    let mut parts = key.split('.').peekable();
    let mut t = table;
    while let Some(p) = parts.next() {
        match (t.get(p), parts.peek()) {
            (Some(_), None) => return true,
            (Some(toml::Value::Table(next)), Some(_)) => t = next,
            _ => return false,
        }
    }
    false
}

/// Remove every key of `list` from `table`; returns the ones that were there.
pub fn strip_deprecated(table: &mut toml::Table, list: &[Deprecated]) -> Vec<Deprecated> {
    let mut found = Vec::new();
    for d in list {
        let mut parts: Vec<&str> = d.key.split('.').collect();
        let Some(last) = parts.pop() else { continue };
        let holder = parts
            .into_iter()
            .try_fold(&mut *table, |t, p| match t.get_mut(p) {
                Some(toml::Value::Table(next)) => Some(next),
                _ => None,
            });
        if holder.is_some_and(|t| t.remove(last).is_some()) {
            found.push(*d);
        }
    }
    found
}

/// The field name in serde's "unknown field `x`, expected …" message.
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The byte span of the value at `key`, or of the nearest key or table on the way to it.
fn span_of(doc: &toml_edit::ImDocument<String>, key: &KeyPath) -> Option<Range<usize>> {
    let mut item = doc.as_item();
    let mut best = None;
    for seg in &key.0 {
        let next = match seg {
            Seg::Key(k) => match item.as_table_like().and_then(|t| t.get_key_value(k)) {
                Some((found, next)) => {
                    best = found.span().or(best);
                    next
                }
                None => break,
            },
            Seg::Index(i) => match item.get(*i) {
                Some(next) => next,
                None => break,
            },
        };
        best = next.span().or(best);
        item = next;
    }
    best
}
