//! Which firewall holds localdns's rules, and the operations over either one: install,
//! check and repair, clear the others.
//!
//! - **nftables** ([`super::nftables`]): localdns's own `inet localdns` table. Where the
//!   node's iptables filter table drops by default (policy DROP on INPUT or OUTPUT), an
//!   accept in another nftables table cannot undo that drop, so the ACCEPT rules are put
//!   in that iptables filter table (localdns's `LOCALDNS-INPUT`/`LOCALDNS-OUTPUT` chains,
//!   through the same iptables backend code), for the families that drop, and one log
//!   line says so. The check re-reads the policies, so a DROP set later is followed.
//! - **iptables-nft / iptables-legacy** ([`super::iptables`], [`super::firewall`]): the
//!   `LOCALDNS-*` chains in raw and filter.
//!
//! `auto` ([`pick`]): nftables when kube-proxy runs in nftables mode (a `kube-proxy`
//! table exists), or when no iptables backend holds `KUBE-*` chains and `nft` works (a
//! node booting before kubelet and kube-proxy, a node whose kube-proxy replacement does
//! not use iptables); otherwise the iptables backend kube-proxy uses, as before.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::firewall;
use super::iptables::{self, Census, Iptables, Kind, RulesError, Tables};
use super::nfevents;
use super::nftables::{self, Listing};
use super::rules::{self, Family};
use crate::config::Firewall;

/// Where the rules live.
#[derive(Clone)]
pub enum Backend {
    Iptables(Arc<dyn Tables>),
    /// `wait`: the xtables lock bound for the ACCEPT rules in an iptables filter table.
    Nftables {
        wait: Duration,
    },
}

/// ACCEPT rules the nftables backend put in one iptables backend's filter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub kind: Kind,
    /// The families whose filter table drops by default (the rules are only there).
    pub families: Vec<Family>,
    pub snapshot: firewall::Snapshot,
}

/// What the backend held right after install, for the drift check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    Iptables(firewall::Snapshot),
    Nftables { table: Listing, accept: Vec<Accept> },
}

/// What one drift check did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repaired {
    /// What was put back: `rules`, `order`, the nftables parts; empty when all was in place.
    pub what: Vec<&'static str>,
    /// Jumps moved back to the top, with the foreign rules that were ahead.
    pub moved: Vec<firewall::Ahead>,
    /// Jumps with a foreign rule ahead, left there because moving is held back.
    pub held: Vec<firewall::Ahead>,
}

/// What `auto` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Nftables,
    Iptables(Kind),
}

/// The `auto` choice from what the node holds: `nft_tables` (`family name`) when `nft`
/// runs, the census of each iptables backend that runs.
pub fn pick(
    nft_tables: Option<&[String]>,
    nft: Option<&Census>,
    legacy: Option<&Census>,
) -> Option<(Choice, String)> {
    if let Some(tables) = nft_tables {
        if let Some(t) = nftables::kube_proxy_table(tables) {
            return Some((
                Choice::Nftables,
                format!("kube-proxy runs in nftables mode (table {t})"),
            ));
        }
        let kube = nft.map_or(0, |c| c.kube) + legacy.map_or(0, |c| c.kube);
        if kube == 0 {
            return Some((
                Choice::Nftables,
                "no iptables backend holds kube-proxy's KUBE-* chains, and nft works".into(),
            ));
        }
    }
    let (kind, why) = iptables::pick(nft, legacy)?;
    let why = match nft_tables {
        Some(_) => why,
        None => format!("{why}; nft cannot be run"),
    };
    Some((Choice::Iptables(kind), why))
}

impl Backend {
    /// `nftables`, `iptables-nft` or `iptables-legacy` (the `network.firewall` names; also
    /// what the setup record holds).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Nftables { .. } => Firewall::Nftables.name(),
            Backend::Iptables(t) => match t.kind() {
                Kind::Nft => Firewall::IptablesNft.name(),
                Kind::Legacy => Firewall::IptablesLegacy.name(),
            },
        }
    }

    /// The backend [`Backend::name`] names; also the `nft`/`legacy` of records written by
    /// earlier versions.
    pub fn from_name(name: &str, wait: Duration) -> Option<Backend> {
        let iptables = |kind| Some(Backend::Iptables(Arc::new(Iptables::new(kind, wait))));
        match name {
            "nftables" => Some(Backend::Nftables { wait }),
            "iptables-nft" | "nft" => iptables(Kind::Nft),
            "iptables-legacy" | "legacy" => iptables(Kind::Legacy),
            _ => None,
        }
    }

    /// The backend `setting` names, or for `auto` the one [`pick`] chooses here (logged
    /// with the reason). Blocking (runs nft and the iptables tools).
    pub fn choose(setting: Firewall, wait: Duration) -> Result<Backend, RulesError> {
        let iptables = |kind| Backend::Iptables(Arc::new(Iptables::new(kind, wait)));
        Ok(match setting {
            Firewall::Nftables => Backend::Nftables { wait },
            Firewall::IptablesNft => iptables(Kind::Nft),
            Firewall::IptablesLegacy => iptables(Kind::Legacy),
            Firewall::Auto => {
                let tables = super::nft::tables();
                let nft = Iptables::new(Kind::Nft, wait).census();
                let legacy = Iptables::new(Kind::Legacy, wait).census();
                let (choice, why) =
                    pick(tables.as_deref(), nft.as_ref().ok(), legacy.as_ref().ok()).ok_or_else(
                        || {
                            let err = |r: &Result<Census, RulesError>| match r {
                                Ok(_) => String::new(),
                                Err(e) => e.to_string(),
                            };
                            RulesError::NoBackend(format!(
                                "nft cannot be run; {}; {}",
                                err(&nft),
                                err(&legacy)
                            ))
                        },
                    )?;
                let backend = match choice {
                    Choice::Nftables => Backend::Nftables { wait },
                    Choice::Iptables(kind) => iptables(kind),
                };
                tracing::info!(firewall = backend.name(), "firewall chosen: {why}");
                backend
            }
        })
    }

    /// Whether nftables change notifications report changes to these rules (everything
    /// but iptables-legacy, whose tables are not nf_tables).
    pub fn has_events(&self) -> bool {
        match self {
            Backend::Nftables { .. } => true,
            Backend::Iptables(t) => t.kind() == Kind::Nft,
        }
    }

    /// The `(nfproto family, table)` pairs whose change notifications matter.
    pub fn watched_tables(&self) -> Vec<(u8, &'static str)> {
        match self {
            Backend::Nftables { .. } => vec![(nfevents::NFPROTO_INET, nftables::TABLE)],
            Backend::Iptables(_) => rules::TABLES
                .iter()
                .flat_map(|t| [(nfevents::NFPROTO_IPV4, *t), (nfevents::NFPROTO_IPV6, *t)])
                .collect(),
        }
    }

    /// Makes the backend hold exactly localdns's rules for `addresses`; returns what it
    /// then holds. Blocking.
    pub fn install(&self, addresses: &[IpAddr], port: u16) -> Result<Snapshot, RulesError> {
        match self {
            Backend::Iptables(t) => {
                firewall::install(t.as_ref(), addresses, port).map(Snapshot::Iptables)
            }
            Backend::Nftables { wait } => {
                let table = nftables::install(addresses, port)?;
                let accept = accept_rules(*wait, addresses, port, None);
                Ok(Snapshot::Nftables { table, accept })
            }
        }
    }

    /// The rules as they are, when complete (installed by `localdns setup` a moment ago),
    /// else installed. nftables replaces its table in one transaction, so it simply
    /// installs again: no packet ever sees the table missing.
    pub fn adopt(&self, addresses: &[IpAddr], port: u16) -> Result<Snapshot, RulesError> {
        match self {
            Backend::Iptables(t) => {
                firewall::adopt(t.as_ref(), addresses, port).map(Snapshot::Iptables)
            }
            Backend::Nftables { .. } => self.install(addresses, port),
        }
    }

    /// Whether the rules are as `snapshot` says, and (iptables) which of localdns's jumps
    /// have a foreign rule ahead that counts. For nftables, the table only: the ACCEPT
    /// rules are left to the periodic check, and nothing in another base chain can end
    /// ours (see [`nftables`]). Blocking.
    pub fn check(
        &self,
        snapshot: &Snapshot,
        addresses: &[IpAddr],
        port: u16,
    ) -> Result<firewall::Check, RulesError> {
        let intact = |intact| firewall::Check {
            intact,
            ahead: Vec::new(),
        };
        match (self, snapshot) {
            (Backend::Iptables(t), Snapshot::Iptables(s)) => {
                firewall::check(t.as_ref(), s, addresses, port)
            }
            (Backend::Nftables { .. }, Snapshot::Nftables { table, .. }) => {
                Ok(intact(nftables::current()?.as_ref() == Some(table)))
            }
            _ => Ok(intact(false)),
        }
    }

    /// Compares the backend with `snapshot` (`None`: unknown) and puts back what changed.
    /// `named`: the `(nfproto family, table)` pairs a burst of change events named, the
    /// only ones read then (an nftables event reads the table alone); `None`, the
    /// periodic check: everything, and which iptables filter tables drop by default
    /// (the nftables backend's ACCEPT rules). `may_move`: a jump with a
    /// foreign rule ahead is moved back to the top (else it is only reported, see
    /// [`super::order::Brake`]). Returns the new snapshot and what was done. Blocking.
    pub fn repair(
        &self,
        snapshot: Option<&Snapshot>,
        addresses: &[IpAddr],
        port: u16,
        named: Option<&[(u8, &'static str)]>,
        may_move: bool,
    ) -> Result<(Snapshot, Repaired), RulesError> {
        let what = |what: Vec<&'static str>| Repaired {
            what,
            ..Repaired::default()
        };
        match (self, snapshot) {
            (Backend::Iptables(t), Some(Snapshot::Iptables(s))) => {
                let only: Option<Vec<(Family, &str)>> = named.map(|n| {
                    n.iter()
                        .filter_map(|(f, table)| Some((nfevents::family(*f)?, *table)))
                        .collect()
                });
                let c = firewall::check_in(t.as_ref(), s, only.as_deref(), addresses, port)?;
                if !c.intact {
                    // A fresh install puts every jump first as well.
                    let s = firewall::install(t.as_ref(), addresses, port)?;
                    return Ok((Snapshot::Iptables(s), what(vec!["rules"])));
                }
                let kept = Snapshot::Iptables(s.clone());
                if c.ahead.is_empty() {
                    return Ok((kept, Repaired::default()));
                }
                if !may_move {
                    let held = Repaired {
                        held: c.ahead,
                        ..Repaired::default()
                    };
                    return Ok((kept, held));
                }
                firewall::move_first(t.as_ref(), &c.ahead)?;
                let moved = Repaired {
                    what: vec!["order"],
                    moved: c.ahead,
                    held: Vec::new(),
                };
                Ok((kept, moved))
            }
            (Backend::Nftables { wait }, Some(Snapshot::Nftables { table, accept })) => {
                let mut repaired = Vec::new();
                let table = if nftables::current()?.as_ref() == Some(table) {
                    table.clone()
                } else {
                    repaired.push("table inet localdns");
                    nftables::install(addresses, port)?
                };
                let accept = if named.is_none() {
                    let now = accept_rules(*wait, addresses, port, Some(accept));
                    if now != *accept {
                        repaired.push("ACCEPT rules in the iptables filter table");
                    }
                    now
                } else {
                    accept.clone()
                };
                Ok((Snapshot::Nftables { table, accept }, what(repaired)))
            }
            _ => self
                .install(addresses, port)
                .map(|s| (s, what(vec!["rules"]))),
        }
    }

    /// Removes localdns's rules from every other firewall (an earlier install with another
    /// backend): they would confuse everyone. Failures are logged, never fatal.
    pub fn clear_others(&self, snapshot: &Snapshot, wait: Duration) {
        let clear = |kind: Kind, tables: &[&'static str]| match firewall::remove_in(
            &Iptables::new(kind, wait),
            tables,
        ) {
            Ok(true) => tracing::info!(
                "removed localdns rules left in iptables-{} by an earlier install",
                kind.name()
            ),
            Ok(false) | Err(RulesError::Spawn { .. }) => {}
            Err(e) => {
                tracing::warn!("cannot check iptables-{} for old rules: {e}", kind.name())
            }
        };
        match (self, snapshot) {
            (Backend::Iptables(t), _) => {
                let other = match t.kind() {
                    Kind::Nft => Kind::Legacy,
                    Kind::Legacy => Kind::Nft,
                };
                clear(other, &rules::TABLES);
                match nftables::remove() {
                    Ok(true) => tracing::info!(
                        "removed table {} left by an earlier install",
                        nftables::TABLE_ID
                    ),
                    Ok(false) | Err(super::nft::NftError::Missing(_)) => {}
                    Err(e) => tracing::warn!("cannot check for table {}: {e}", nftables::TABLE_ID),
                }
            }
            (Backend::Nftables { .. }, Snapshot::Nftables { accept, .. }) => {
                for kind in [Kind::Nft, Kind::Legacy] {
                    if accept.iter().any(|a| a.kind == kind) {
                        clear(kind, &["raw"]);
                    } else {
                        clear(kind, &rules::TABLES);
                    }
                }
            }
            (Backend::Nftables { .. }, _) => {}
        }
    }
}

/// The families whose iptables filter table of `kind` drops by default; `None` when that
/// backend cannot be read (not installed, or a table it cannot show).
fn dropping(t: &Iptables) -> Option<Vec<(Family, Vec<&'static str>)>> {
    let mut out = Vec::new();
    for family in Family::ALL {
        match t.save(family, "filter") {
            Ok(Some(text)) => {
                let chains = rules::drops_by_default(&text);
                if !chains.is_empty() {
                    out.push((family, chains));
                }
            }
            Ok(None) => {}
            Err(RulesError::Spawn { .. }) => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot read the iptables-{} filter table: {e}; no ACCEPT rules there",
                    t.kind().name()
                );
                return None;
            }
        }
    }
    Some(out)
}

/// The nftables backend's ACCEPT rules: in each iptables backend whose filter table drops
/// by default, for the families that drop; removed where none is needed any more. Says
/// in one log line what was done, when that differs from `before` (`None`: at setup).
fn accept_rules(
    wait: Duration,
    addresses: &[IpAddr],
    port: u16,
    before: Option<&[Accept]>,
) -> Vec<Accept> {
    let mut out = Vec::new();
    let mut said = Vec::new();
    for kind in [Kind::Nft, Kind::Legacy] {
        let t = Iptables::new(kind, wait);
        let Some(drops) = dropping(&t) else { continue };
        let families: Vec<Family> = drops.iter().map(|(f, _)| *f).collect();
        let old = before.and_then(|b| b.iter().find(|a| a.kind == kind));
        if families.is_empty() {
            if old.is_some() || before.is_none() {
                let _ = firewall::remove_in(&t, &["filter"]);
            }
            continue;
        }
        let wanted: Vec<IpAddr> = addresses
            .iter()
            .filter(|ip| families.contains(&Family::of(ip)))
            .copied()
            .collect();
        // Unchanged, still in place and first where it matters: nothing to write. (A
        // foreign DROP ahead of the ACCEPT jump is put behind by the install below.)
        if let Some(old) = old.filter(|o| o.families == families) {
            if firewall::check(&t, &old.snapshot, &wanted, port)
                .is_ok_and(|c| c.intact && c.ahead.is_empty())
            {
                out.push(old.clone());
                continue;
            }
        }
        match firewall::install_in(&t, &wanted, port, &["filter"]) {
            Ok(snapshot) => {
                for (family, chains) in &drops {
                    said.push(format!(
                        "{}-{} filter drops by default ({})",
                        family.command(),
                        kind.name(),
                        chains.join(", ")
                    ));
                }
                out.push(Accept {
                    kind,
                    families,
                    snapshot,
                });
            }
            Err(e) => tracing::error!(
                "the iptables-{} filter table drops by default, and the ACCEPT rules for \
                 DNS to localdns cannot be put there: {e}",
                kind.name()
            ),
        }
    }
    let before_kinds: Vec<Kind> = before.unwrap_or_default().iter().map(|a| a.kind).collect();
    let now_kinds: Vec<Kind> = out.iter().map(|a| a.kind).collect();
    if !said.is_empty() {
        tracing::info!(
            "{}: ACCEPT rules for DNS to and from localdns put there (chains LOCALDNS-INPUT, \
             LOCALDNS-OUTPUT)",
            said.join("; ")
        );
    } else if before.is_none() || before_kinds != now_kinds {
        tracing::info!(
            "no iptables filter table drops by default: no ACCEPT rules needed beside table {}",
            nftables::TABLE_ID
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_nftables_unless_kube_proxy_uses_iptables() {
        let c = |kube, rules| Census { kube, rules };
        let t = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let choice = |tables: Option<Vec<String>>, n: Option<Census>, l: Option<Census>| {
            pick(tables.as_deref(), n.as_ref(), l.as_ref()).map(|p| p.0)
        };
        // kube-proxy in nftables mode: nftables, even beside kubelet's KUBE-* canaries.
        assert_eq!(
            choice(
                Some(t(&["ip kube-proxy", "ip6 kube-proxy"])),
                Some(c(4, 4)),
                None
            ),
            Some(Choice::Nftables)
        );
        // Nothing of kube-proxy anywhere (a node booting before it): nftables.
        assert_eq!(
            choice(Some(t(&["ip filter"])), Some(c(0, 12)), Some(c(0, 0))),
            Some(Choice::Nftables)
        );
        assert_eq!(choice(Some(vec![]), None, None), Some(Choice::Nftables));
        // kube-proxy in iptables mode: the backend holding its chains.
        assert_eq!(
            choice(Some(t(&["ip nat"])), Some(c(30, 40)), Some(c(0, 0))),
            Some(Choice::Iptables(Kind::Nft))
        );
        assert_eq!(
            choice(Some(vec![]), Some(c(0, 0)), Some(c(30, 40))),
            Some(Choice::Iptables(Kind::Legacy))
        );
        // No nft: the iptables choice as before.
        assert_eq!(
            choice(None, Some(c(0, 0)), Some(c(0, 0))),
            Some(Choice::Iptables(Kind::Nft))
        );
        assert_eq!(choice(None, None, None), None);
        let (_, why) = pick(None, Some(&c(0, 0)), None).unwrap();
        assert!(why.contains("nft cannot be run"), "{why}");
    }

    #[test]
    fn names_round_trip_and_old_records_are_read() {
        let wait = Duration::from_secs(1);
        for name in ["nftables", "iptables-nft", "iptables-legacy"] {
            assert_eq!(Backend::from_name(name, wait).unwrap().name(), name);
        }
        assert_eq!(
            Backend::from_name("nft", wait).unwrap().name(),
            "iptables-nft"
        );
        assert_eq!(
            Backend::from_name("legacy", wait).unwrap().name(),
            "iptables-legacy"
        );
        assert!(Backend::from_name("ipfw", wait).is_none());
        assert!(Backend::from_name("nftables", wait).unwrap().has_events());
        assert!(!Backend::from_name("legacy", wait).unwrap().has_events());
    }
}
