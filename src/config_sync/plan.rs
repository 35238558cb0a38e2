//! The pure core of `localdns config-sync`: which files it wants in the host's `conf.d`,
//! which files there are its own, what to write and what to remove, and which documents
//! the host daemon would then load. No I/O: [`super`] reads the directories and applies
//! the plan.
//!
//! # Ownership
//! Every file config-sync writes has a name it owns ([`UPSTREAM_FILE`], [`CONFIGMAP_PREFIX`])
//! and a first line naming the writer: `# localdns config-sync: owner=<pod UID>
//! since=<start time, ns>`. A file is config-sync's only with both, so a node admin's file
//! is never touched, whatever its name. Owners are ordered by start time: a newer writer
//! takes over the files of an older one (a DaemonSet rolling update with `maxSurge`, where
//! the new pod starts before the old one stops, or a pod that was killed without cleaning
//! up), and an older writer that finds a newer owner stands by. So when the old pod of a
//! rolling update stops, it removes nothing: it owns nothing any more, and the node never
//! falls back to its own config between the two pods.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The drop-in carrying `cluster.upstream` from the kube-dns-upstream Service's address.
pub const UPSTREAM_FILE: &str = "70-config-sync-cluster-upstream.toml";
/// Each `*.toml` key of the ConfigMap becomes `71-config-sync-<key>`: after the upstream
/// drop-in (a ConfigMap that sets `cluster.upstream` itself wins) and before `80-*`, which
/// docs/operator-guide.md leaves to the node's own overrides.
pub const CONFIGMAP_PREFIX: &str = "71-config-sync-";
/// The environment variable Kubernetes injects for the `kube-dns-upstream` Service.
pub const UPSTREAM_ENV: &str = "KUBE_DNS_UPSTREAM_SERVICE_HOST";

const MARK: &str = "# localdns config-sync: owner=";

/// Who wrote a file: ordered by start time, then by id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub since_ns: u128,
    pub id: String,
}

impl Owner {
    /// An owner whose id has no whitespace (the header is split on it).
    pub fn new(id: &str, since_ns: u128) -> Owner {
        let id: String = id
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        Owner { since_ns, id }
    }

    /// The first lines of every file this owner writes.
    pub fn header(&self) -> String {
        format!(
            "{MARK}{} since={}\n\
             # Written by localdns config-sync from the cluster's ConfigMap; removed when it \
             stops. Edits here are overwritten.\n",
            self.id, self.since_ns
        )
    }

    /// The owner named by the first line of `text`, if it is a config-sync header.
    pub fn of(text: &str) -> Option<Owner> {
        let first = text.lines().next()?;
        let (id, since) = first.strip_prefix(MARK)?.split_once(" since=")?;
        Some(Owner {
            id: id.to_owned(),
            since_ns: since.trim().parse().ok()?,
        })
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (started at {} ns)", self.id, self.since_ns)
    }
}

/// A name config-sync may write (the header decides whether a file there is its own).
pub fn owned_name(name: &str) -> bool {
    name == UPSTREAM_FILE || (name.starts_with(CONFIGMAP_PREFIX) && name.ends_with(".toml"))
}

/// The owner of a file in `conf.d`, when config-sync wrote it.
pub fn owner_of(name: &str, text: &str) -> Option<Owner> {
    owned_name(name).then(|| Owner::of(text)).flatten()
}

/// A file config-sync wants in `conf.d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Its name in `conf.d`.
    pub name: String,
    /// What follows the header.
    pub body: String,
    /// Where the body comes from, for error messages: the ConfigMap file (whose lines are
    /// the body's lines) or the environment variable.
    pub origin: PathBuf,
}

/// The address in `KUBE_DNS_UPSTREAM_SERVICE_HOST`; `None` when it is unset or empty (no
/// such Service when the pod started).
pub fn upstream_address(value: Option<&str>) -> Result<Option<IpAddr>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{UPSTREAM_ENV}={v:?} is not an IP address")),
    }
}

/// The files wanted for ConfigMap `keys` (`(key, text)`, read from `source`) and the
/// upstream address; and the keys left out because they are not `*.toml`.
pub fn wanted(
    keys: &[(String, String)],
    source: &Path,
    upstream: Option<IpAddr>,
) -> (Vec<Wanted>, Vec<String>) {
    let mut out = Vec::new();
    if let Some(ip) = upstream {
        out.push(Wanted {
            name: UPSTREAM_FILE.to_owned(),
            body: format!("[cluster]\nupstream = [\"{ip}\"]\n"),
            origin: PathBuf::from(format!("(environment {UPSTREAM_ENV})")),
        });
    }
    let mut ignored = Vec::new();
    for (key, text) in keys {
        if key.ends_with(".toml") {
            out.push(Wanted {
                name: format!("{CONFIGMAP_PREFIX}{key}"),
                body: text.clone(),
                origin: source.join(key),
            });
        } else if key != super::stage::STAGE_KEY {
            ignored.push(key.clone());
        }
    }
    (out, ignored)
}

/// The files config-sync has in `conf.d` now (of any owner), as wanted files: a node
/// outside the rollout stage keeps them as they are (its owner header aside, so that the
/// newest pod still takes them over and an older one stopping removes nothing).
pub fn kept(existing: &[(String, String)], conf_dir: &Path) -> Vec<Wanted> {
    existing
        .iter()
        .filter_map(|(name, text)| {
            let owner = owner_of(name, text)?;
            let body = text
                .strip_prefix(&owner.header())
                .unwrap_or_else(|| text.split_once('\n').map_or("", |(_, rest)| rest));
            Some(Wanted {
                name: name.clone(),
                body: body.to_owned(),
                origin: conf_dir.join(name),
            })
        })
        .collect()
}

/// What to do to `conf.d`.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// A newer config-sync owns files here: leave everything to it.
    StandBy { owner: Owner },
    /// Write these `(name, whole text)` and remove these names; both may be empty.
    Apply {
        write: Vec<(String, String)>,
        remove: Vec<String>,
    },
}

/// The plan for `me`, given the files now in `conf.d` (`(name, text)`). Refused when a
/// wanted name is taken by a file config-sync did not write.
pub fn plan(existing: &[(String, String)], wanted: &[Wanted], me: &Owner) -> Result<Plan, String> {
    let newest = existing
        .iter()
        .filter_map(|(name, text)| owner_of(name, text))
        .max();
    if let Some(owner) = newest.filter(|o| o > me) {
        return Ok(Plan::StandBy { owner });
    }
    let now: BTreeMap<&str, &str> = existing
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut write = Vec::new();
    for w in wanted {
        let text = format!("{}{}", me.header(), w.body);
        match now.get(w.name.as_str()) {
            Some(old) if *old == text => {}
            Some(old) if Owner::of(old).is_none() => {
                return Err(format!(
                    "{} is there and was not written by config-sync: not overwriting it \
                     (rename it, or drop key {:?} from the ConfigMap)",
                    w.name,
                    w.name.trim_start_matches(CONFIGMAP_PREFIX)
                ))
            }
            _ => write.push((w.name.clone(), text)),
        }
    }
    let remove = existing
        .iter()
        .filter(|(name, text)| owner_of(name, text).is_some())
        .filter(|(name, _)| !wanted.iter().any(|w| &w.name == name))
        .map(|(name, _)| name.clone())
        .collect();
    Ok(Plan::Apply { write, remove })
}

/// The documents the host daemon would load once the plan is applied, in its merge order:
/// the main file, then the drop-ins by file name, config-sync's own (older) files replaced
/// by the wanted ones. Each wanted document is named by its origin and holds its body
/// only, so that an error names the ConfigMap key and line an operator edits.
pub fn documents_after(
    host: &[(PathBuf, String)],
    conf_dir: &Path,
    wanted: &[Wanted],
) -> Vec<(PathBuf, String)> {
    let mut main = Vec::new();
    let mut drop_ins = BTreeMap::new();
    for (path, text) in host {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.parent() != Some(conf_dir) {
            main.push((path.clone(), text.clone()));
        } else if owner_of(name, text).is_none() {
            drop_ins.insert(name.to_owned(), (path.clone(), text.clone()));
        }
    }
    for w in wanted {
        drop_ins.insert(w.name.clone(), (w.origin.clone(), w.body.clone()));
    }
    main.extend(drop_ins.into_values());
    main
}

/// The start-only sections ([`crate::config::START_ONLY`]) that wanted files set, as
/// `origin: [section]`. config-sync refuses them: a fleet-wide push would reach every
/// node's running daemon only as "restart required", then apply at each node's next
/// restart, where a value that cannot work on the node fails everywhere at once; and the
/// pod (no host network) cannot check the node's interfaces and ports. They belong to the
/// node's own config, which provisioning writes and a restart applies node by node.
pub fn start_only_sections(wanted: &[Wanted]) -> Vec<String> {
    let mut found = Vec::new();
    for w in wanted {
        // A body that does not parse is the loader's to report, with its line.
        let Ok(table) = w.body.parse::<toml::Table>() else {
            continue;
        };
        for section in crate::config::START_ONLY {
            if table.contains_key(section) {
                found.push(format!("{}: [{section}]", w.origin.display()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Owner {
        Owner::new("pod-b", 200)
    }

    fn want(name: &str, body: &str) -> Wanted {
        Wanted {
            name: name.into(),
            body: body.into(),
            origin: PathBuf::from("/cm").join(name),
        }
    }

    fn file(owner: &Owner, body: &str) -> String {
        format!("{}{body}", owner.header())
    }

    #[test]
    fn the_header_names_its_owner_and_only_its_owner() {
        let o = Owner::new("a b", 7);
        assert_eq!(o.id, "a_b");
        assert_eq!(Owner::of(&file(&o, "[cache]\n")), Some(o));
        assert_eq!(Owner::of("# localdns config-sync: owner=x\n"), None);
        assert_eq!(
            Owner::of("[cache]\n# localdns config-sync: owner=x since=1\n"),
            None
        );
        assert_eq!(owner_of("50-mine.toml", &file(&me(), "")), None);
        assert!(owner_of(UPSTREAM_FILE, &file(&me(), "")).is_some());
        assert!(owner_of("71-config-sync-a.toml", &file(&me(), "")).is_some());
        assert!(Owner::new("z", 1) < Owner::new("a", 2));
    }

    #[test]
    fn the_upstream_comes_from_the_environment_or_not_at_all() {
        assert_eq!(upstream_address(None), Ok(None));
        assert_eq!(upstream_address(Some(" ")), Ok(None));
        assert_eq!(
            upstream_address(Some("10.96.0.11")),
            Ok(Some("10.96.0.11".parse().unwrap()))
        );
        let e = upstream_address(Some("10.96.0.11\"]\n[x")).unwrap_err();
        assert!(
            e.contains(UPSTREAM_ENV) && e.contains("not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn toml_keys_become_drop_ins_after_the_upstream_one() {
        let keys = [
            (
                "cache.toml".to_owned(),
                "[cache]\ncapacity = 5\n".to_owned(),
            ),
            ("README".to_owned(), "notes".to_owned()),
        ];
        let (w, ignored) = wanted(&keys, Path::new("/cm"), "fd00::a".parse().ok());
        assert_eq!(ignored, ["README"]);
        assert_eq!(w[0].name, UPSTREAM_FILE);
        assert_eq!(w[0].body, "[cluster]\nupstream = [\"fd00::a\"]\n");
        assert_eq!(w[1].name, "71-config-sync-cache.toml");
        assert_eq!(w[1].origin, PathBuf::from("/cm/cache.toml"));
        let (w, _) = wanted(&[], Path::new("/cm"), None);
        assert!(w.is_empty());
    }

    #[test]
    fn unchanged_files_are_not_written_and_stale_ones_are_removed() {
        let mine = me();
        let older = Owner::new("pod-a", 100);
        let existing = vec![
            ("50-node.toml".to_owned(), "[cache]\n".to_owned()),
            ("71-config-sync-a.toml".to_owned(), file(&mine, "A\n")),
            ("71-config-sync-b.toml".to_owned(), file(&older, "B\n")),
            ("71-config-sync-gone.toml".to_owned(), file(&older, "G\n")),
            // The right name without the header: someone else's file, never removed.
            (
                "71-config-sync-hand.toml".to_owned(),
                "[cache]\n".to_owned(),
            ),
        ];
        let w = [
            want("71-config-sync-a.toml", "A\n"),
            want("71-config-sync-b.toml", "B\n"),
        ];
        let Ok(Plan::Apply { write, remove }) = plan(&existing, &w, &mine) else {
            panic!()
        };
        // b is taken over from the older owner (same body, new header); a is as wanted.
        assert_eq!(
            write,
            [("71-config-sync-b.toml".to_owned(), file(&mine, "B\n"))]
        );
        assert_eq!(remove, ["71-config-sync-gone.toml"]);
    }

    #[test]
    fn kept_files_keep_their_bodies_and_are_only_taken_over() {
        let d = Path::new("/etc/localdns/conf.d");
        let old = Owner::new("pod-old", 100);
        let existing = vec![
            ("50-node.toml".to_owned(), "[cache]\n".to_owned()),
            (UPSTREAM_FILE.to_owned(), file(&old, "U\n")),
            ("71-config-sync-a.toml".to_owned(), file(&old, "A\n")),
        ];
        let kept = kept(&existing, d);
        let bodies: Vec<(&str, &str)> = kept
            .iter()
            .map(|w| (w.name.as_str(), w.body.as_str()))
            .collect();
        assert_eq!(
            bodies,
            [(UPSTREAM_FILE, "U\n"), ("71-config-sync-a.toml", "A\n")]
        );
        assert_eq!(kept[1].origin, d.join("71-config-sync-a.toml"));
        // The newer pod rewrites only the headers; nothing is removed.
        let Ok(Plan::Apply { write, remove }) = plan(&existing, &kept, &me()) else {
            panic!("no plan")
        };
        assert!(remove.is_empty(), "{remove:?}");
        assert_eq!(
            write,
            [
                (UPSTREAM_FILE.to_owned(), file(&me(), "U\n")),
                ("71-config-sync-a.toml".to_owned(), file(&me(), "A\n"))
            ]
        );
        // Its own files: nothing to do.
        let mine: Vec<(String, String)> = write.clone();
        assert_eq!(
            plan(&mine, &super::kept(&mine, d), &me()),
            Ok(Plan::Apply {
                write: vec![],
                remove: vec![]
            })
        );
    }

    #[test]
    fn a_newer_owner_is_left_alone() {
        let newer = Owner::new("pod-c", 300);
        let existing = vec![("71-config-sync-a.toml".to_owned(), file(&newer, "A\n"))];
        let p = plan(&existing, &[want("71-config-sync-a.toml", "X\n")], &me());
        assert_eq!(p, Ok(Plan::StandBy { owner: newer }));
    }

    #[test]
    fn a_file_config_sync_did_not_write_is_never_overwritten() {
        let existing = vec![("71-config-sync-a.toml".to_owned(), "[cache]\n".to_owned())];
        let e = plan(&existing, &[want("71-config-sync-a.toml", "A\n")], &me()).unwrap_err();
        assert!(
            e.contains("71-config-sync-a.toml") && e.contains("not written by config-sync"),
            "{e}"
        );
    }

    #[test]
    fn the_daemon_would_read_main_then_drop_ins_by_name_with_ours_replaced() {
        let d = Path::new("/etc/localdns/conf.d");
        let host = vec![
            (
                PathBuf::from("/etc/localdns/config.toml"),
                "main".to_owned(),
            ),
            (d.join("50-node.toml"), "node".to_owned()),
            (
                d.join("71-config-sync-old.toml"),
                file(&Owner::new("x", 1), "old"),
            ),
            (d.join("90-last.toml"), "last".to_owned()),
        ];
        let w = [
            want(UPSTREAM_FILE, "up"),
            want("71-config-sync-a.toml", "a"),
        ];
        let docs = documents_after(&host, d, &w);
        let texts: Vec<&str> = docs.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["main", "node", "up", "a", "last"]);
        assert_eq!(docs[3].0, PathBuf::from("/cm/71-config-sync-a.toml"));
    }

    #[test]
    fn start_only_sections_in_the_configmap_are_found_by_origin() {
        let w = |origin: &str, body: &str| Wanted {
            name: format!("{CONFIGMAP_PREFIX}{origin}"),
            body: body.into(),
            origin: PathBuf::from(origin),
        };
        let wanted = [
            w("cache.toml", "[cache]\ncapacity = 5000\n"),
            w(
                "node.toml",
                "[listen]\nport = 5353\n[metrics]\naddress = \"\"\n",
            ),
            w("bad.toml", "[network\n"),
        ];
        assert_eq!(
            start_only_sections(&wanted),
            ["node.toml: [listen]", "node.toml: [metrics]"]
        );
        assert!(start_only_sections(&wanted[..1]).is_empty());
    }
}
