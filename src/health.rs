//! Is this node's DNS healthy, and if not, why: the pure decisions behind `/health`,
//! `/ready` and `localdns status`, and the report they share.
//!
//! `/health` is about the process: the serving loops go round (the same heartbeat the
//! systemd watchdog uses). `/ready` is about the node: every listener bound, the link and
//! rules in place when localdns manages them, and a cluster upstream that answers. The
//! report is what the daemon knows; `localdns status` adds what it checks from outside
//! (whether each listen address answers a real query now).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// What a check of the firewall rules against what was installed found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesState {
    Intact,
    /// Changed or removed (or not known to be in place yet).
    Changed,
    /// In place, but a foreign rule ahead of localdns's jump decides DNS to its addresses
    /// first; says which and where.
    Bypassed(String),
}

/// A check of the firewall rules; `Err` when they cannot be read.
pub type RulesProbe = Arc<dyn Fn() -> Result<RulesState, String> + Send + Sync>;

/// The drift repair backing off from another agent that keeps putting a rule ahead of
/// localdns's jump (see `node::order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderConflict {
    /// Moves back to the top within `window`.
    pub moves: usize,
    pub window: Duration,
    /// When the next move may be made.
    pub next: Instant,
}

/// How long a rules check answers `/ready` before the next one runs (each one reads the
/// firewall with iptables-save: a client polling `/ready` must not spawn one per request).
pub const RULES_CHECK_CACHE: Duration = Duration::from_millis(500);
/// Repairs remembered for `localdns status`.
const RECENT_REPAIRS: usize = 10;

/// What the drift repair task knows about the node setup.
#[derive(Default)]
pub struct NodeHealth {
    /// `None` while localdns does not manage the link; else the last check's result.
    pub link: Mutex<Option<Result<(), String>>>,
    /// Set when localdns manages the rules.
    pub rules_probe: Mutex<Option<RulesProbe>>,
    /// Set while the drift repair backs off from a fight over rule order.
    pub order_conflict: Mutex<Option<OrderConflict>>,
    rules_checked: Mutex<Option<(Instant, Result<(), String>)>>,
    /// (seconds since the epoch, what was repaired), newest last.
    repairs: Mutex<VecDeque<(u64, String)>>,
}

impl std::fmt::Debug for NodeHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHealth")
            .field("link", &*self.link.lock())
            .field("rules_checked", &*self.rules_checked.lock())
            .finish_non_exhaustive()
    }
}

impl NodeHealth {
    pub fn repaired(&self, what: String) {
        let mut r = self.repairs.lock();
        if r.len() == RECENT_REPAIRS {
            r.pop_front();
        }
        r.push_back((crate::metrics::unix_now(), what));
    }

    pub fn recent_repairs(&self) -> Vec<(u64, String)> {
        self.repairs.lock().iter().cloned().collect()
    }

    /// The rules now (`None` when not managed): a check at most [`RULES_CHECK_CACHE`]
    /// old. Blocking (runs iptables-save): call it off the async threads.
    pub fn rules_now(&self) -> Option<Result<(), String>> {
        let probe = self.rules_probe.lock().clone()?;
        let mut checked = self.rules_checked.lock();
        if let Some((at, r)) = &*checked {
            if at.elapsed() < RULES_CHECK_CACHE {
                return Some(r.clone());
            }
        }
        let r = match probe() {
            Ok(RulesState::Intact) => Ok(()),
            Ok(RulesState::Changed) => {
                Err("localdns's firewall rules are not in place (changed or removed)".into())
            }
            Ok(RulesState::Bypassed(why)) => Err(match *self.order_conflict.lock() {
                Some(c) => format!("{why}; {}", conflict(&c, Instant::now())),
                None => why,
            }),
            Err(e) => Err(format!("cannot read the firewall rules: {e}")),
        };
        *checked = Some((Instant::now(), r.clone()));
        Some(r)
    }
}

/// What `/ready` says about a fight over rule order.
fn conflict(c: &OrderConflict, now: Instant) -> String {
    let next = match c.next.checked_duration_since(now) {
        Some(d) if !d.is_zero() => format!("the next move in {} s", d.as_secs().max(1)),
        _ => "the next move at the next check".into(),
    };
    format!(
        "another agent keeps putting it there: localdns moved its jump back {} times within \
         {} s and now backs off ({next})",
        c.moves,
        c.window.as_secs()
    )
}

/// What readiness is decided from.
#[derive(Debug, Clone, Default)]
pub struct ReadyInputs {
    /// Serving loops whose heartbeat is stale.
    pub stuck_loops: usize,
    /// The link, when managed.
    pub link: Option<Result<(), String>>,
    /// The rules, when managed.
    pub rules: Option<Result<(), String>>,
    /// Cluster pool servers (up, total), when a cluster upstream is configured.
    pub cluster: Option<(usize, usize)>,
}

/// Why the node is not ready; empty when it is. Listeners are bound before the server
/// runs at all (a bind failure stops the start), so they need no check here.
pub fn not_ready(i: &ReadyInputs) -> Vec<String> {
    let mut why = Vec::new();
    if i.stuck_loops > 0 {
        why.push(format!(
            "{} serving loop(s) stopped going round",
            i.stuck_loops
        ));
    }
    if let Some(Err(e)) = &i.link {
        why.push(format!("link: {e}"));
    }
    if let Some(Err(e)) = &i.rules {
        why.push(format!("rules: {e}"));
    }
    if let Some((0, total)) = i.cluster {
        why.push(format!("cluster upstream: none of {total} server(s) up"));
    }
    why
}

/// The daemon's report, served as JSON on `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub version: String,
    pub uptime_secs: u64,
    pub healthy: bool,
    pub ready: bool,
    /// Why not ready (or not healthy).
    pub reasons: Vec<String>,
    pub config: ConfigReport,
    pub listen: Vec<String>,
    /// "present", the reason it is not, or "not managed".
    pub link: String,
    pub rules: String,
    pub cache: CacheReport,
    pub upstreams: Vec<UpstreamReport>,
    pub repairs: Vec<RepairReport>,
    /// Clients held back by their miss budget in the last few minutes, most first.
    #[serde(default)]
    pub held_back: Vec<HeldBackReport>,
    /// This endpoint: "listening", or how late it came after failed binds at the start.
    #[serde(default)]
    pub endpoint: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldBackReport {
    pub client: String,
    /// Queries answered at once (stale or SERVFAIL) because it was over its budget.
    pub queries: u64,
    pub last_secs_ago: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigReport {
    pub files: Vec<String>,
    pub generation: u64,
    /// Seconds since the epoch of the last reload attempt; 0 = none since the start.
    pub last_reload_time: u64,
    pub last_reload_ok: bool,
    /// The refusal of the config on disk, while the previous or last good one serves.
    pub refused: Option<String>,
    pub last_good: bool,
    /// Start-only settings the files change, applied at the next restart.
    #[serde(default)]
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheReport {
    pub entries: u64,
    /// Bytes the entries take, against `cache.max_bytes`.
    #[serde(default)]
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UpstreamReport {
    pub pool: String,
    pub server: String,
    pub up: bool,
    pub requests: u64,
    pub failures: u64,
    /// Mean answer time in milliseconds, over the answers so far.
    pub mean_latency_ms: f64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RepairReport {
    pub time: u64,
    pub what: String,
}

/// What `/status` hides from a client that is not the node itself.
pub const HIDDEN: &str =
    "hidden from clients other than the node itself: ask on the node (localdns status)";

impl Report {
    /// The report for a client that is not the node itself (a pod, another host): without
    /// the other clients' addresses (the held-back pods), the text of other agents'
    /// firewall rules (repairs) and the config refusal (file contents). Counts stay.
    pub fn for_other_clients(mut self) -> Report {
        let held: u64 = self.held_back.iter().map(|h| h.queries).sum();
        if !self.held_back.is_empty() {
            self.held_back = vec![HeldBackReport {
                client: format!("{} clients ({HIDDEN})", self.held_back.len()),
                queries: held,
                last_secs_ago: self
                    .held_back
                    .iter()
                    .map(|h| h.last_secs_ago)
                    .min()
                    .unwrap_or(0),
            }];
        }
        for r in &mut self.repairs {
            r.what = HIDDEN.to_string();
        }
        if self.config.refused.is_some() {
            self.config.refused = Some(HIDDEN.to_string());
        }
        self
    }
}

/// hits / (hits + misses), 0 without queries.
pub fn hit_ratio(hits: u64, misses: u64) -> f64 {
    match hits + misses {
        0 => 0.0,
        n => hits as f64 / n as f64,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn other_clients_see_counts_but_no_addresses_rules_or_config_text() {
        use super::*;
        let full = Report {
            held_back: vec![
                HeldBackReport {
                    client: "10.244.1.7".into(),
                    queries: 90,
                    last_secs_ago: 3,
                },
                HeldBackReport {
                    client: "10.244.2.9".into(),
                    queries: 10,
                    last_secs_ago: 1,
                },
            ],
            repairs: vec![RepairReport {
                time: 5,
                what: "order: `-A PREROUTING -s 10.0.0.0/8 -j ACCEPT` ahead".into(),
            }],
            config: ConfigReport {
                refused: Some("/etc/localdns/config.toml:3: secret".into()),
                ..ConfigReport::default()
            },
            ..Report::default()
        };
        let shown = serde_json::to_string(&full.clone().for_other_clients()).unwrap();
        for secret in ["10.244.1.7", "10.244.2.9", "PREROUTING", "secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let other = full.clone().for_other_clients();
        assert_eq!(other.held_back.len(), 1);
        assert_eq!(
            (other.held_back[0].queries, other.held_back[0].last_secs_ago),
            (100, 1)
        );
        assert_eq!(other.repairs.len(), 1);
        // Nothing hidden that was not there, and the node itself sees everything.
        assert_eq!(Report::default().for_other_clients(), Report::default());
        assert!(serde_json::to_string(&full).unwrap().contains("10.244.1.7"));
    }

    use super::*;

    #[test]
    fn ready_only_when_everything_is_in_place() {
        let ok = ReadyInputs {
            stuck_loops: 0,
            link: Some(Ok(())),
            rules: Some(Ok(())),
            cluster: Some((1, 2)),
        };
        assert!(not_ready(&ok).is_empty());
        assert!(not_ready(&ReadyInputs::default()).is_empty());
        let bad = ReadyInputs {
            stuck_loops: 1,
            link: Some(Err("gone".into())),
            rules: Some(Err("flushed".into())),
            cluster: Some((0, 2)),
        };
        let why = not_ready(&bad);
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(why[3].contains("none of 2"), "{why:?}");
    }

    #[test]
    fn rules_checks_are_cached_briefly() {
        let n = NodeHealth::default();
        assert_eq!(n.rules_now(), None);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        *n.rules_probe.lock() = Some(Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(RulesState::Changed)
        }));
        assert!(n.rules_now().unwrap().is_err());
        assert!(n.rules_now().unwrap().is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn a_bypass_is_not_ready_and_says_why_and_about_the_back_off() {
        let n = NodeHealth::default();
        *n.rules_probe.lock() = Some(Arc::new(|| {
            Ok(RulesState::Bypassed(
                "`-A PREROUTING -j ACCEPT` ahead".into(),
            ))
        }));
        assert_eq!(
            n.rules_now(),
            Some(Err("`-A PREROUTING -j ACCEPT` ahead".into()))
        );
        *n.order_conflict.lock() = Some(OrderConflict {
            moves: 5,
            window: Duration::from_secs(10),
            next: Instant::now() + Duration::from_secs(4),
        });
        *n.rules_checked.lock() = None;
        let why = n.rules_now().unwrap().unwrap_err();
        assert!(
            why.starts_with("`-A PREROUTING -j ACCEPT` ahead; another agent keeps putting it there: localdns moved its jump back 5 times within 10 s and now backs off (the next move in "),
            "{why}"
        );
        let late = OrderConflict {
            next: Instant::now(),
            ..n.order_conflict.lock().unwrap()
        };
        assert!(conflict(&late, Instant::now() + Duration::from_secs(1))
            .ends_with("(the next move at the next check)"));
    }

    #[test]
    fn repairs_are_bounded_and_ratio_is_safe() {
        let n = NodeHealth::default();
        for i in 0..15 {
            n.repaired(format!("r{i}"));
        }
        let r = n.recent_repairs();
        assert_eq!(r.len(), RECENT_REPAIRS);
        assert_eq!(r.last().unwrap().1, "r14");
        assert_eq!(hit_ratio(0, 0), 0.0);
        assert_eq!(hit_ratio(3, 1), 0.75);
    }
}
