//! The staged rollout: whether this node takes the ConfigMap as it is now, or keeps the
//! version its `conf.d` already has. Pure: the ConfigMap's keys and the node name in,
//! a decision out.
//!
//! A ConfigMap edit reaches every node within seconds, so a config that is valid but wrong
//! (a stub zone to the wrong servers, a cache too small) would reach all of them at once.
//! With a [`STAGE_KEY`] key in the ConfigMap, only the nodes in the stage take the new
//! version: the nodes it names, and `percent` of the others, chosen by a stable hash of
//! the node name (64-bit FNV-1a of its bytes, modulo 100: the node's bucket; it is in the
//! stage when its bucket is below `percent`). Raising `percent` only adds nodes, so 5, 25,
//! 100 is a rollout in steps; removing the key (or `percent = 100`) finishes it. The node
//! name comes from the downward API (`spec.nodeName` as [`NODE_ENV`]).
//!
//! Node labels would be the other way to pick canaries, but reading them needs the API
//! server, and config-sync has no token and talks to nothing.

use std::path::Path;

use serde::Deserialize;

/// The ConfigMap key that holds the stage (TOML: `percent`, `nodes`). Not a drop-in.
pub const STAGE_KEY: &str = "rollout-stage";
/// The environment variable with the node's name.
pub const NODE_ENV: &str = "NODE_NAME";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    /// Percent of the nodes, by bucket, that take this version (0 to 100; default 0).
    #[serde(default)]
    percent: u64,
    /// Nodes that take it whatever their bucket (canaries).
    #[serde(default)]
    nodes: Vec<String>,
}

/// Which nodes take the ConfigMap as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub percent: u8,
    pub nodes: Vec<String>,
}

/// The stage in the ConfigMap's keys (`(key, text)`, read from `source`), if it has one.
pub fn from_keys(keys: &[(String, String)], source: &Path) -> Result<Option<Stage>, String> {
    let Some((_, text)) = keys.iter().find(|(k, _)| k == STAGE_KEY) else {
        return Ok(None);
    };
    let origin = source.join(STAGE_KEY);
    let raw: RawStage = toml::from_str(text).map_err(|e| {
        format!(
            "{}: {}",
            origin.display(),
            e.to_string().trim_end().replace('\n', " ")
        )
    })?;
    let percent = u8::try_from(raw.percent)
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| {
            format!(
                "{}: percent = {}: must be 0 to 100",
                origin.display(),
                raw.percent
            )
        })?;
    if let Some(empty) = raw.nodes.iter().find(|n| n.trim().is_empty()) {
        return Err(format!(
            "{}: nodes: {empty:?} is not a node name",
            origin.display()
        ));
    }
    Ok(Some(Stage {
        percent,
        nodes: raw.nodes,
    }))
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The node's bucket, 0 to 99: the same on every run, on every node, for every version.
pub fn bucket(node: &str) -> u8 {
    (fnv1a(node.as_bytes()) % 100) as u8
}

/// What this node does with the ConfigMap as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take it (why, for the status when there is a stage).
    Take(Option<String>),
    /// Keep what `conf.d` has: the sentence the status and the log say.
    Wait(String),
}

/// The decision for `node` (`None`: [`NODE_ENV`] is not set) under `stage`.
pub fn decide(stage: Option<&Stage>, node: Option<&str>) -> Decision {
    let Some(stage) = stage else {
        return Decision::Take(None);
    };
    let node = node.map(str::trim).filter(|n| !n.is_empty());
    let said = format!(
        "{STAGE_KEY}: percent = {}{}",
        stage.percent,
        if stage.nodes.is_empty() {
            String::new()
        } else {
            format!(", nodes = {}", stage.nodes.join(", "))
        }
    );
    match node {
        Some(n) if stage.nodes.iter().any(|s| s == n) => {
            Decision::Take(Some(format!("{n} is named in the stage ({said})")))
        }
        _ if stage.percent >= 100 => Decision::Take(Some(format!("every node ({said})"))),
        None => Decision::Wait(format!(
            "{NODE_ENV} is not set, so this node is in no stage below 100% ({said})"
        )),
        Some(n) => {
            let b = bucket(n);
            if b < stage.percent {
                Decision::Take(Some(format!("{n} is in bucket {b}, below {said}")))
            } else {
                Decision::Wait(format!(
                    "{n} is in bucket {b} of 0-99, not below the stage's ({said})"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(text: &str) -> Result<Option<Stage>, String> {
        from_keys(
            &[
                ("cache.toml".into(), "[cache]\n".into()),
                (STAGE_KEY.into(), text.into()),
            ],
            Path::new("/cm"),
        )
    }

    #[test]
    fn the_stage_is_read_from_its_key_and_bad_ones_are_refused_with_the_reason() {
        assert_eq!(from_keys(&[], Path::new("/cm")), Ok(None));
        assert_eq!(
            stage("percent = 10\nnodes = [\"node-a\"]\n"),
            Ok(Some(Stage {
                percent: 10,
                nodes: vec!["node-a".into()]
            }))
        );
        // An empty stage holds every node where it is.
        assert_eq!(
            stage(""),
            Ok(Some(Stage {
                percent: 0,
                nodes: vec![]
            }))
        );
        for (text, why) in [
            (
                "percent = 150\n",
                "/cm/rollout-stage: percent = 150: must be 0 to 100",
            ),
            ("percent = -1\n", "/cm/rollout-stage: "),
            ("percent = \"10%\"\n", "invalid type"),
            ("precent = 10\n", "unknown field `precent`"),
            ("percent = 10\nnodes = [\" \"]\n", "is not a node name"),
            ("percent =\n", "line 1"),
        ] {
            let e = stage(text).unwrap_err();
            assert!(
                e.contains(why) && e.starts_with("/cm/rollout-stage: "),
                "{text:?}: {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn buckets_are_fnv1a_of_the_name_and_spread_evenly() {
        // FNV-1a 64 test vectors, then the bucket of a name computed by hand.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"node-b"), 0xe697_1dc2_2078_cd06);
        assert_eq!(bucket("node-b"), 82);
        let mut counts = [0u32; 100];
        for i in 0..10_000 {
            counts[usize::from(bucket(&format!(
                "ip-10-0-{}-{}.ec2.internal",
                i / 250,
                i % 250
            )))] += 1;
        }
        let in_10 = counts[..10].iter().sum::<u32>();
        assert!(
            (800..1200).contains(&in_10),
            "{in_10} of 10000 in a 10% stage"
        );
        assert!(counts.iter().all(|c| *c > 50), "{counts:?}");
    }

    #[test]
    fn named_nodes_and_low_buckets_take_the_new_version_the_rest_wait() {
        let s = |percent, nodes: &[&str]| Stage {
            percent,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        };
        assert_eq!(decide(None, Some("node-b")), Decision::Take(None));
        assert_eq!(decide(None, None), Decision::Take(None));
        // node-b is in bucket 82.
        assert!(
            matches!(decide(Some(&s(82, &[])), Some("node-b")), Decision::Wait(w) if w.contains("bucket 82"))
        );
        assert!(matches!(
            decide(Some(&s(83, &[])), Some("node-b")),
            Decision::Take(Some(_))
        ));
        assert!(
            matches!(decide(Some(&s(0, &["node-b"])), Some("node-b")), Decision::Take(Some(w)) if w.contains("named"))
        );
        assert!(matches!(
            decide(Some(&s(0, &["node-a"])), Some("node-b")),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(Some(&s(100, &[])), Some("node-b")),
            Decision::Take(Some(_))
        ));
        // Without the node's name only a 100% stage includes it.
        assert!(
            matches!(decide(Some(&s(99, &[])), None), Decision::Wait(w) if w.contains("NODE_NAME is not set"))
        );
        assert!(matches!(
            decide(Some(&s(99, &[])), Some(" ")),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(Some(&s(100, &[])), None),
            Decision::Take(_)
        ));
        // Raising the percentage only adds nodes.
        for i in 0..500 {
            let n = format!("node-{i}");
            let mut was_in = false;
            for p in 0..=100 {
                let now_in = matches!(decide(Some(&s(p, &[])), Some(&n)), Decision::Take(_));
                assert!(now_in || !was_in, "{n} left the stage at {p}%");
                was_in = now_in;
            }
            assert!(was_in);
        }
    }
}
