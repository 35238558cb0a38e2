//! Writes the man page `localdns.toml(5)` (roff) to stdout: every table and key of the
//! config file with its type, default and description. `packaging/build` runs it beside
//! `examples/manpage.rs`:
//!
//!     cargo run --quiet --example manpage5 > localdns.toml.5
//!
//! The page is rendered from `config/example.toml`, the documented node example: its
//! comments are the descriptions and its values the defaults (a comment line
//! `Default V; node value:` names the default where the example shows a node's value, a
//! commented-out `# key = value` is a key with no default). The tests below hold that
//! source to the parser: the defaults on the page load into exactly the built-in defaults,
//! and every key the parser accepts is on the page, so the page cannot drift from the code.

use std::io::Write;

const EXAMPLE: &str = include_str!("../config/example.toml");

fn main() -> std::io::Result<()> {
    let reference = match parse(EXAMPLE) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("manpage5: config/example.toml: {e}");
            std::process::exit(1);
        }
    };
    let page = render(&reference, localdns::cli::VERSION);
    std::io::stdout().lock().write_all(page.as_bytes())
}

/// What the example documents.
#[derive(Debug, Default)]
struct Reference {
    /// The file's leading comment.
    preamble: Vec<String>,
    tables: Vec<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// `listen`, or `stub` for the array of tables `[[stub]]`.
    name: String,
    array: bool,
    description: Vec<String>,
    keys: Vec<Key>,
}

#[derive(Debug, Clone)]
struct Key {
    name: String,
    kind: &'static str,
    /// The default as TOML, `None` when the key has none (not set unless written).
    default: Option<String>,
    /// The example's value where it is not the default (a node's value, or an example).
    example: Option<String>,
    description: Vec<String>,
}

/// Reads the example: a comment block before a table header describes the table, one
/// before a key the key; a key with no comment of its own shares the previous key's.
fn parse(text: &str) -> Result<Reference, String> {
    let mut reference = Reference::default();
    let mut pending: Vec<String> = Vec::new();
    let mut seen_table = false;
    // Inside the commented-out `# [[stub]]` block: `# # text` is a comment, `# k = v` a key.
    let mut commented_block = false;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}", n + 1);
        let line = line.trim_end();
        if line.is_empty() {
            if !seen_table && reference.preamble.is_empty() {
                reference.preamble = std::mem::take(&mut pending);
            }
            pending.clear();
            commented_block = false;
            continue;
        }
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.strip_prefix(' ').unwrap_or(rest)),
            None => (false, line),
        };
        if commented && commented_block {
            if let Some(note) = body.strip_prefix('#') {
                pending.push(note.trim().to_owned());
            } else if let Some((name, value)) = key_line(body) {
                push_key(&mut reference, name, value, false, &mut pending).map_err(at)?;
            } else {
                return Err(at(format!("not a key in the commented block: {body}")));
            }
            continue;
        }
        if let Some(header) = table_header(body) {
            if commented && header.1 {
                commented_block = true;
            } else if commented {
                pending.push(body.to_owned());
                continue;
            }
            seen_table = true;
            let mut description = std::mem::take(&mut pending);
            while description.last().is_some_and(|l| l.is_empty()) {
                description.pop();
            }
            let prefix = format!("[{}]: ", header.0);
            if let Some(first) = description.first_mut() {
                if let Some(rest) = first.strip_prefix(&prefix) {
                    *first = rest.to_owned();
                }
            }
            reference.tables.push(Table {
                name: header.0.to_owned(),
                array: header.1,
                description,
                keys: Vec::new(),
            });
            continue;
        }
        if commented {
            // A commented-out key in a table: documented, not set by default.
            if let Some((name, value)) = key_line(body).filter(|_| seen_table) {
                push_key(&mut reference, name, value, false, &mut pending).map_err(at)?;
            } else {
                pending.push(body.to_owned());
            }
            continue;
        }
        let (name, value) = key_line(body).ok_or_else(|| at(format!("not a key: {body}")))?;
        push_key(&mut reference, name, value, true, &mut pending).map_err(at)?;
    }
    if reference.tables.is_empty() {
        return Err("no table".into());
    }
    Ok(reference)
}

/// `[name]` or `[[name]]`: the name and whether it is an array of tables.
fn table_header(s: &str) -> Option<(&str, bool)> {
    if let Some(name) = s.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
        return Some((name, true));
    }
    let name = s.strip_prefix('[')?.strip_suffix(']')?;
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    plain.then_some((name, false))
}

/// `name = value` with a bare lower-case key and a value TOML reads.
fn key_line(s: &str) -> Option<(&str, toml::Value)> {
    let (name, value) = s.split_once(" = ")?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return None;
    }
    let table: toml::Table = toml::from_str(&format!("v = {value}")).ok()?;
    Some((name, table.get("v")?.clone()))
}

/// Adds a key to the last table. `set`: the example sets it (then its value is the
/// default unless the comment names another); else it is commented out.
fn push_key(
    reference: &mut Reference,
    name: &str,
    value: toml::Value,
    set: bool,
    pending: &mut Vec<String>,
) -> Result<(), String> {
    let table = reference
        .tables
        .last_mut()
        .ok_or_else(|| format!("key {name} before any table"))?;
    let mut description = std::mem::take(pending);
    if description.is_empty() {
        description = table
            .keys
            .last()
            .map(|k| k.description.clone())
            .ok_or_else(|| format!("key {name} has no description"))?;
    }
    let shown = value.to_string();
    let node_default = description
        .iter()
        .position(|l| l.ends_with("node value:"))
        .map(|i| description.remove(i));
    let (default, example) = match (set, node_default) {
        (true, Some(line)) => {
            let d = line
                .strip_prefix("Default ")
                .and_then(|r| r.strip_suffix("; node value:"))
                .ok_or_else(|| format!("{name}: expected `Default V; node value:`, got {line}"))?;
            (Some(d.to_owned()), Some(shown))
        }
        (true, None) => (Some(shown), None),
        (false, _) => (quoted_default(&description), Some(shown)),
    };
    table.keys.push(Key {
        name: name.to_owned(),
        kind: kind(&value, &description),
        default,
        example,
        description,
    });
    Ok(())
}

/// A commented-out key whose description says `"v" (default)`.
fn quoted_default(description: &[String]) -> Option<String> {
    let text = description.join(" ");
    let end = text.find("\" (default)")?;
    let start = text[..end].rfind('"')?;
    Some(text[start..=end].to_owned())
}

fn kind(value: &toml::Value, description: &[String]) -> &'static str {
    let text = description.join(" ");
    match value {
        toml::Value::Boolean(_) => "boolean",
        toml::Value::Integer(_) => "integer",
        toml::Value::String(_) if text.contains("one entry") && text.contains("or a list") => {
            "string or list of strings"
        }
        toml::Value::String(s) if !s.is_empty() && humantime::parse_duration(s).is_ok() => {
            "duration"
        }
        toml::Value::String(_) => "string",
        toml::Value::Array(_) => "list of strings",
        _ => "table",
    }
}

/// The page.
fn render(r: &Reference, version: &str) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        ".TH localdns.toml 5 \"\" \"localdns {}\" \"File Formats\"\n",
        escape(version)
    ));
    // Key names and paths read badly hyphenated.
    o.push_str(".nh\n");
    o.push_str(".SH NAME\nlocaldns.toml \\- configuration of localdns(8)\n");
    o.push_str(".SH SYNOPSIS\n.B /etc/localdns/config.toml\n.br\n.B /etc/localdns/conf.d/*.toml\n");
    o.push_str(".SH DESCRIPTION\n");
    paragraphs(&mut o, &r.preamble);
    o.push_str(
        ".PP\nWith no config file and no drop-in, and no \\fB\\-\\-config\\fR given, localdns \
         runs on its embedded default (see \\fBEMBEDDED DEFAULT\\fR below). Every key below \
         is optional; a key not set has the default shown.\n",
    );
    for t in &r.tables {
        let header = if t.array {
            format!("[[{}]]", t.name)
        } else {
            format!("[{}]", t.name)
        };
        o.push_str(&format!(".SH \"{}\"\n", escape(&header)));
        paragraphs(&mut o, &t.description);
        // Keys that share one comment in the example (`udp_socket_queries` and
        // `udp_socket_lifetime`) share it here too: written once, then pointed at.
        let mut group: Option<&Key> = None;
        for k in &t.keys {
            let default = match &k.default {
                Some(d) => format!("default \\fB{}\\fR", escape(d)),
                None => "no default".to_owned(),
            };
            o.push_str(&format!(
                ".TP\n\\fB{}\\fR (\\fI{}\\fR, {default})\n",
                escape(&k.name),
                k.kind
            ));
            match group.filter(|g| g.description == k.description) {
                Some(first) => o.push_str(&format!("See \\fB{}\\fR.\n", escape(&first.name))),
                None => {
                    paragraphs(&mut o, &k.description);
                    group = Some(k);
                }
            }
            if let Some(e) = &k.example {
                o.push_str(&format!(
                    ".br\nExample: \\fB{} = {}\\fR\n",
                    escape(&k.name),
                    escape(e)
                ));
            }
        }
    }
    o.push_str(".SH \"EMBEDDED DEFAULT\"\nWhat localdns runs on when no file exists:\n.PP\n.nf\n");
    for line in localdns::config::EMBEDDED_DEFAULT.lines() {
        if !line.starts_with('#') && !line.trim().is_empty() {
            o.push_str(&format!("\\&{}\n", escape(line)));
        }
    }
    o.push_str(".fi\n.SH FILES\n");
    for (path, what) in [
        ("/etc/localdns/config.toml", "the main file"),
        (
            "/etc/localdns/conf.d/*.toml",
            "drop-ins, read after it in file-name order",
        ),
        (
            "/var/lib/localdns/last-good.toml",
            "the last config accepted, started on when the files are refused at start",
        ),
    ] {
        o.push_str(&format!(".TP\n.I {path}\n{what}\n"));
    }
    o.push_str(".SH \"SEE ALSO\"\n.BR localdns (8),\n.BR systemctl (1)\n");
    o
}

/// Comment lines as roff text; an empty comment line starts a new paragraph.
fn paragraphs(o: &mut String, lines: &[String]) {
    for line in lines {
        if line.is_empty() {
            o.push_str(".PP\n");
        } else {
            o.push_str(&format!("\\&{}\n", inline(line)));
        }
    }
}

/// `code` as bold, the rest escaped.
fn inline(line: &str) -> String {
    let mut out = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{}\\fR", escape(part)));
        } else {
            out.push_str(&escape(part));
        }
    }
    out
}

/// roff escapes: backslash and dash, and the few non-ASCII characters the comments use.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            'µ' => out.push_str("\\(mc"),
            '—' => out.push_str("\\(em"),
            '–' => out.push_str("\\(en"),
            '±' => out.push_str("\\(+-"),
            '×' => out.push_str("\\(mu"),
            '→' => out.push_str("\\(->"),
            '"' => out.push_str("\\(dq"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use localdns::config::{load_documents, Environment};
    use std::path::PathBuf;

    fn reference() -> Reference {
        parse(EXAMPLE).unwrap()
    }

    fn page() -> String {
        render(&reference(), "0.0.0-test")
    }

    /// An environment whose resolv.conf names one server, so that loading needs no host.
    fn env() -> (tempfile::TempDir, Environment) {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
        let env = Environment {
            resolved_resolv_conf: dir.path().join("absent"),
            etc_resolv_conf: resolv,
        };
        (dir, env)
    }

    fn load(text: &str) -> Result<localdns::config::Config, String> {
        let (_dir, env) = env();
        load_documents(&[(PathBuf::from("page.toml"), text.to_owned())], &env)
            .map(|mut c| {
                c.sources.clear();
                c.upstream.servers_from.clear();
                c
            })
            .map_err(|e| e.to_string())
    }

    /// The parser's own list of the keys it accepts in `table` (`None`: the top level),
    /// read from its answer to a key it does not know.
    fn accepted(table: Option<&str>) -> Vec<String> {
        let doc = match table {
            None => "zz_not_a_key = 1\n".to_owned(),
            Some("stub") => "[[stub]]\nzz_not_a_key = 1\n".to_owned(),
            Some(t) => format!("[{t}]\nzz_not_a_key = 1\n"),
        };
        let err = load(&doc).unwrap_err();
        // serde says "expected `a`", "expected `a` or `b`" or "expected one of `a`, `b`, ...".
        let list = err
            .split_once("unknown field `zz_not_a_key`, expected ")
            .unwrap_or_else(|| panic!("no list of keys in: {err}"))
            .1;
        let list = list.strip_prefix("one of ").unwrap_or(list);
        list.split(", ")
            .flat_map(|k| k.split(" or "))
            .map(|k| k.trim().trim_matches('`').to_owned())
            .collect()
    }

    /// Every key the parser accepts, in every table, is documented on the page, with a
    /// description.
    #[test]
    fn every_key_the_parser_accepts_is_on_the_page() {
        let r = reference();
        let page = page();
        let tables = accepted(None);
        assert!(tables.len() >= 8, "{tables:?}");
        let mut checked = 0;
        for table in &tables {
            let documented = r
                .tables
                .iter()
                .find(|t| &t.name == table)
                .unwrap_or_else(|| panic!("table {table} is not on the page"));
            for key in accepted(Some(table)) {
                let k = documented
                    .keys
                    .iter()
                    .find(|k| k.name == key)
                    .unwrap_or_else(|| panic!("{table}.{key} is not on the page"));
                assert!(
                    !k.description.is_empty(),
                    "{table}.{key} has no description"
                );
                let entry = format!(".TP\n\\fB{}\\fR (", escape(&key));
                assert!(page.contains(&entry), "no {entry:?} in the page");
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} keys");
    }

    /// The page documents no key the parser refuses.
    #[test]
    fn every_key_on_the_page_is_accepted() {
        for t in reference().tables {
            let accepted = accepted(Some(&t.name));
            for k in &t.keys {
                assert!(
                    accepted.contains(&k.name),
                    "{}.{} is refused",
                    t.name,
                    k.name
                );
            }
        }
    }

    /// The defaults on the page, written as a config, are the built-in defaults.
    #[test]
    fn the_defaults_on_the_page_are_the_built_in_ones() {
        let mut doc = String::new();
        for t in reference().tables.iter().filter(|t| !t.array) {
            doc.push_str(&format!("[{}]\n", t.name));
            for k in &t.keys {
                if let Some(d) = &k.default {
                    doc.push_str(&format!("{} = {d}\n", k.name));
                }
            }
        }
        assert_eq!(load(&doc).unwrap(), load("").unwrap(), "{doc}");
        // So a wrong default on the page would be caught.
        let wrong = doc.replace("capacity = 20000", "capacity = 20001");
        assert_ne!(load(&wrong).unwrap(), load("").unwrap());
    }

    /// The keys with no default (a stub zone's) load when given the example's values.
    #[test]
    fn the_examples_of_keys_without_default_load() {
        let r = reference();
        let stub = r.tables.iter().find(|t| t.name == "stub").unwrap();
        let mut doc = String::from("[[stub]]\n");
        for k in &stub.keys {
            doc.push_str(&format!("{} = {}\n", k.name, k.example.as_ref().unwrap()));
        }
        let c = load(&doc).unwrap();
        assert_eq!(c.stubs.len(), 1, "{doc}");
        let protocol = stub.keys.iter().find(|k| k.name == "protocol").unwrap();
        assert_eq!(protocol.default.as_deref(), Some("\"udp\""));
    }

    /// A roff page for section 5, in ASCII, with each table as a section.
    #[test]
    fn the_page_is_roff() {
        let page = page();
        assert!(page.starts_with(".TH localdns.toml 5 "), "{page}");
        assert!(page.is_ascii(), "non-ASCII in the page");
        for t in [
            "[listen]",
            "[cluster]",
            "[upstream]",
            "[[stub]]",
            "[cache]",
            "[network]",
        ] {
            assert!(page.contains(&format!(".SH \"{t}\"")), "no {t}");
        }
        let addresses = "\\fBaddresses\\fR (\\fIlist of strings\\fR, default \\fB[\\(dq169.254.20.10\\(dq]\\fR)";
        assert!(page.contains(addresses), "no {addresses} in\n{page}");
        assert!(page.lines().all(|l| !l.starts_with('\'')));
    }
}
