//! The documents: every relative link and anchor in README.md and docs/*.md resolves, every
//! document is reachable from the README, and the README keeps the commands CI and a new
//! user run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and docs/*.md, as paths relative to the repository.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![PathBuf::from("README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(root()).unwrap().to_owned())
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The text outside fenced code blocks, with inline code spans blanked (their content is
/// not markdown), and the heading lines.
fn prose(text: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut headings = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if fenced {
            out.push('\n');
            continue;
        }
        if line.starts_with('#') {
            headings.push(line.trim_start_matches('#').trim().to_owned());
        }
        out.push_str(&blank_code_spans(line));
        out.push('\n');
    }
    (out, headings)
}

fn blank_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push('`');
        } else if in_code {
            out.push('x');
        } else {
            out.push(c);
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, only letters, digits, `-`, `_` and spaces
/// kept, spaces made `-`; a repeated heading gets `-1`, `-2`...
fn anchors(headings: &[String]) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for h in headings {
        let slug: String = h
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// The targets of the inline links `[text](target)` in `prose`.
fn link_targets(prose: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        out.push(rest[..end].trim().to_owned());
        rest = &rest[end..];
    }
    out
}

#[test]
fn slugs_are_githubs() {
    let got = anchors(&[
        "Cluster manifests (deploy/)".into(),
        "What `/ready` means when kube-dns is down everywhere".into(),
        "Operator's guide".into(),
        "Sizing: memory".into(),
        "Sizing: memory".into(),
    ]);
    let want = [
        "cluster-manifests-deploy",
        "what-ready-means-when-kube-dns-is-down-everywhere",
        "operators-guide",
        "sizing-memory",
        "sizing-memory-1",
    ];
    assert_eq!(got, want.iter().map(|s| s.to_string()).collect());
    let links = link_targets("a [b `x`](c.md#d) and [e\nf](g/) [h](https://i)");
    assert_eq!(links, ["c.md#d", "g/", "https://i"]);
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let docs = documents();
    let mut anchors_of = BTreeMap::new();
    let mut links = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let (prose, headings) = prose(&text);
        anchors_of.insert(doc.clone(), anchors(&headings));
        links.extend(link_targets(&prose).into_iter().map(|l| (doc.clone(), l)));
    }
    assert!(links.len() > 50, "too few links found: {links:?}");
    let mut broken = Vec::new();
    for (doc, link) in &links {
        if link.contains("://") || link.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = link.split_once('#').unwrap_or((link, ""));
        let target = if path.is_empty() {
            doc.clone()
        } else {
            let joined = doc.parent().unwrap().join(path);
            // Normalise `docs/../x` to `x` without touching the file system.
            let mut norm = PathBuf::new();
            for part in joined.components() {
                match part {
                    std::path::Component::ParentDir => assert!(norm.pop(), "{doc:?}: {link}"),
                    std::path::Component::CurDir => {}
                    p => norm.push(p),
                }
            }
            norm
        };
        if !root().join(&target).exists() {
            broken.push(format!(
                "{}: {link}: no file {}",
                doc.display(),
                target.display()
            ));
            continue;
        }
        if anchor.is_empty() {
            continue;
        }
        match anchors_of.get(&target) {
            Some(known) if known.contains(anchor) => {}
            Some(known) => broken.push(format!(
                "{}: {link}: no heading #{anchor} in {} (has {known:?})",
                doc.display(),
                target.display()
            )),
            None => broken.push(format!(
                "{}: {link}: an anchor into {}, which is not a checked document",
                doc.display(),
                target.display()
            )),
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_document_is_linked_from_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let linked: BTreeSet<String> = link_targets(&prose(&readme).0)
        .into_iter()
        .map(|l| l.split('#').next().unwrap().to_owned())
        .collect();
    for doc in documents().iter().skip(1) {
        let name = doc.display().to_string();
        assert!(linked.contains(&name), "README.md does not link {name}");
    }
}

/// The two commands a new user is told to run, and the test command `.ci/run` runs.
#[test]
fn the_readme_keeps_its_commands() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for command in [
        "cargo build --release && target/release/localdns run",
        "dig @127.0.0.1 -p 5353 example.com",
        "```sh\n.ci/run\n```",
        "`cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test --release`",
    ] {
        assert!(readme.contains(command), "README.md lost {command:?}");
    }
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l
            == "cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test --release"),
        ".ci/run no longer runs the README's test command"
    );
    // The quick start's claims are the embedded default's.
    let default = localdns::config::EMBEDDED_DEFAULT;
    assert!(default.contains("addresses = [\"127.0.0.1\"]") && default.contains("port = 5353"));
    assert!(readme.contains("`127.0.0.1:5353`") && default.contains("\"127.0.0.1:9253\""));
}
