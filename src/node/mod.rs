//! The node's network side: the link that holds the listen addresses and the firewall
//! rules that let DNS to them skip conntrack, installed, kept in place, and removed.
//!
//! - [`setup`] (also `localdns setup`, the unit's ExecStartPre) creates the link, puts the
//!   addresses on it and installs the rules; running it again changes nothing.
//! - [`watch`] runs beside the server and repairs drift: link and address changes are
//!   seen through netlink events and repaired at once; the rules are checked every
//!   `network.rules_check_interval`. Each repair is logged and counted. In iptables the
//!   check also keeps localdns's jumps ahead of foreign rules that would decide DNS to its
//!   addresses first ([`order`]), and backs off from an agent that keeps undoing that.
//! - [`teardown`] (also `localdns teardown`, ExecStopPost) removes exactly that: the
//!   `inet localdns` nftables table, the jumps to `LOCALDNS-*` chains and those chains
//!   (from both iptables backends), and the link.
//!
//! The rules go to one of three firewalls ([`backend`]): localdns's own nftables table
//! ([`nftables`]), or iptables-nft / iptables-legacy ([`iptables`], [`firewall`]).
//!
//! `localdns run` does not tear down when it stops: the rules fail open (see [`rules`]),
//! so a stopped or killed localdns leaves the kube-dns Service IP working through
//! kube-proxy, and a restart finds everything in place.
//!
//! OS effects sit behind [`link::LinkOps`] and [`iptables::Tables`] so that the logic is
//! unit-tested without root; the real implementations are tested in network namespaces.
//! The nftables table is built as data ([`nftables::transaction`]) and tested the same way.

pub mod backend;
pub mod debounce;
pub mod firewall;
pub mod iptables;
pub mod link;
pub mod nfevents;
pub mod nft;
pub mod nftables;
pub mod order;
pub mod repair;
pub mod rules;

use std::net::IpAddr;

use crate::config::{Config, Firewall};
use backend::Backend;
use iptables::{Iptables, Kind, RulesError};
use link::{LinkError, Netlink};

pub use repair::watch;

/// Why the node setup or teardown failed. The inner error is shown in the message (and
/// not chained as a source, so that `{:#}` does not print it twice).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("interface: {0}")]
    Link(LinkError),
    #[error("firewall rules: {0}")]
    Rules(RulesError),
    #[error("firewall task failed: {0}")]
    Task(tokio::task::JoinError),
}

impl From<LinkError> for NodeError {
    fn from(e: LinkError) -> Self {
        NodeError::Link(e)
    }
}

impl From<RulesError> for NodeError {
    fn from(e: RulesError) -> Self {
        NodeError::Rules(e)
    }
}

impl From<tokio::task::JoinError> for NodeError {
    fn from(e: tokio::task::JoinError) -> Self {
        NodeError::Task(e)
    }
}

/// What [`setup`] installed; handed to [`watch`].
#[derive(Clone)]
pub struct Setup {
    /// The backend holding the rules and what they looked like after install (`None`
    /// until read back, when another process installed them); `None` when
    /// `network.setup_rules` is false.
    pub rules: Option<(Backend, Option<backend::Snapshot>)>,
}

fn join(ips: &[IpAddr]) -> String {
    let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
    list.join(", ")
}

/// Creates the link, holds the listen addresses on it and installs the rules, as far as
/// `network.setup_interface` and `network.setup_rules` ask. Idempotent. Must run inside
/// a tokio runtime.
pub async fn setup(cfg: &Config) -> Result<Setup, NodeError> {
    let n = &cfg.network;
    let addresses = &cfg.listen.addresses;
    if n.setup_interface {
        let nl = Netlink::connect()?;
        let changes = link::ensure(&nl, &n.interface, addresses).await?;
        tracing::info!(
            created = changes.created.unwrap_or("no (already there)"),
            added = %join(&changes.added),
            "interface {} is up and holds {} (created: {}; addresses added: {})",
            n.interface,
            join(addresses),
            changes.created.unwrap_or("no, already there"),
            join(&changes.added)
        );
    }
    let mut rules = None;
    let mut created = Vec::new();
    if n.setup_rules {
        let (setting, wait) = (n.firewall, n.xtables_wait);
        let (addresses, port) = (addresses.clone(), cfg.listen.port);
        // A restart in this boot (setup recorded a backend and no teardown cleared it):
        // the rules were left in place for this start, so they are not read here; the
        // daemon reads them back right after READY and puts back whatever is missing
        // ([`watch`]). This keeps the restart's gap to the link check. The backend is the
        // one chosen at the first start: kube-proxy does not switch within a boot.
        let recorded = crate::state::SetupRecord::read()
            .and_then(|r| Backend::from_name(r.backend.as_deref()?, wait))
            .filter(|_| setting == Firewall::Auto);
        if let Some(backend) = recorded {
            tracing::info!(
                firewall = backend.name(),
                "restart: the rules of the previous start stay; they are checked once serving"
            );
            rules = Some((backend, None));
        } else {
            let started = std::time::Instant::now();
            let (backend, snapshot, made) = tokio::task::spawn_blocking(move || {
                let backend = Backend::choose(setting, wait)?;
                let iptables_nft = backend.name() == Firewall::IptablesNft.name();
                let before = iptables_nft.then(nft::tables).flatten();
                let snapshot = backend.adopt(&addresses, port)?;
                let made = if iptables_nft {
                    created_tables(before.as_deref())
                } else {
                    Vec::new()
                };
                backend.clear_others(&snapshot, wait);
                Ok::<_, NodeError>((backend, snapshot, made))
            })
            .await??;
            created = made;
            tracing::info!(
                firewall = backend.name(),
                "NOTRACK rules installed for port {} of {} in {} ms",
                cfg.listen.port,
                join(&cfg.listen.addresses),
                started.elapsed().as_millis()
            );
            rules = Some((backend, Some(snapshot)));
        }
    }
    crate::state::SetupRecord {
        interface: n.setup_interface.then(|| n.interface.clone()),
        rules: n.setup_rules,
        backend: rules.as_ref().map(|(b, _)| b.name().to_owned()),
        invocation: std::env::var("INVOCATION_ID").ok(),
        created_tables: created,
    }
    .write();
    Ok(Setup { rules })
}

/// The setup `localdns setup` did in this same systemd invocation (the unit's
/// ExecStartPre, a moment ago), when it matches `cfg`: then the daemon does not install
/// everything again, which would double the time from start to READY (and with it the
/// gap a restart or a crash leaves). The rules are read back on the side by [`watch`],
/// which puts back whatever is missing.
pub fn done_in_this_invocation(cfg: &Config) -> Option<Setup> {
    let invocation = std::env::var("INVOCATION_ID").ok()?;
    let record = crate::state::SetupRecord::read()?;
    let n = &cfg.network;
    let same = record.invocation.as_deref() == Some(invocation.as_str())
        && record.interface == n.setup_interface.then(|| n.interface.clone())
        && record.rules == n.setup_rules;
    if !same {
        return None;
    }
    let rules = match (
        n.setup_rules,
        record
            .backend
            .as_deref()
            .and_then(|b| Backend::from_name(b, n.xtables_wait)),
    ) {
        (false, _) => None,
        (true, Some(backend)) => Some(backend),
        (true, None) => return None,
    };
    tracing::info!("the link and rules were set up by `localdns setup` of this start");
    Some(Setup {
        rules: rules.map(|backend| (backend, None)),
    })
}

/// The nf_tables tables that exist now and did not in `before` (what an iptables-nft
/// install made).
fn created_tables(before: Option<&[String]>) -> Vec<String> {
    let Some(before) = before else {
        tracing::info!(
            "nft is not installed: the nf_tables tables iptables-nft creates for the rules \
             stay (empty) after teardown"
        );
        return Vec::new();
    };
    let made: Vec<String> = nft::tables()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    if !made.is_empty() {
        tracing::info!(
            "iptables-nft created the tables {}; teardown deletes them when they are empty",
            made.join(", ")
        );
    }
    made
}

/// Could the link `name` hold the listen addresses (absent, or ours)? For a
/// `network.interface` change that a reload brings ([`crate::server::start_only`]).
pub async fn check_link(name: &str) -> Result<(), String> {
    let ops = link::Netlink::connect().map_err(|e| e.to_string())?;
    link::usable(&ops, name).await.map_err(|e| e.to_string())
}

/// What [`teardown`] removes.
#[derive(Debug, Clone)]
pub struct Removal {
    /// Links to remove (each only if it is one localdns makes: dummy or ifb).
    pub interfaces: Vec<String>,
    /// Whether rules are expected: then a machine where neither iptables backend runs is
    /// an error. `LOCALDNS-*` chains are removed wherever they are found either way.
    pub rules: bool,
    /// Bound on each wait for the xtables lock.
    pub xtables_wait: std::time::Duration,
    /// nf_tables tables setup created (`ip raw`): deleted when left empty.
    pub created_tables: Vec<String>,
}

impl Removal {
    /// What `cfg` sets up.
    pub fn of(cfg: &Config) -> Removal {
        let n = &cfg.network;
        Removal {
            interfaces: n
                .setup_interface
                .then(|| n.interface.clone())
                .into_iter()
                .collect(),
            rules: n.setup_rules,
            xtables_wait: n.xtables_wait,
            created_tables: Vec::new(),
        }
    }
}

/// Removes the firewall rules alone: the `inet localdns` table, every jump to a
/// `LOCALDNS-*` chain and those chains, in both iptables backends. Idempotent; removes
/// nothing that is not localdns's. Blocking (runs nft and the iptables tools).
pub fn remove_rules(expected: bool, wait: std::time::Duration) -> Result<(), RulesError> {
    let mut ran = 0;
    match nftables::remove() {
        Ok(removed) => {
            ran += 1;
            if removed {
                tracing::info!("removed table {}", nftables::TABLE_ID);
            }
        }
        // No nft: there is no table of ours either (it is written with nft).
        Err(nft::NftError::Missing(_)) => {}
        Err(e) => return Err(e.into()),
    }
    for kind in [Kind::Nft, Kind::Legacy] {
        match firewall::remove(&Iptables::new(kind, wait)) {
            Ok(removed) => {
                ran += 1;
                if removed {
                    tracing::info!("removed localdns rules from iptables-{}", kind.name());
                }
            }
            // A backend that is not installed holds nothing of ours.
            Err(RulesError::Spawn { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if ran == 0 && expected {
        return Err(RulesError::NoBackend(
            "neither nft nor iptables-nft-save nor iptables-legacy-save runs".into(),
        ));
    }
    Ok(())
}

/// Removes what [`setup`] installs: the rules (see [`remove_rules`]) and the links of
/// `what` with their addresses. Idempotent; removes nothing that is not localdns's.
pub async fn teardown(what: &Removal) -> Result<(), NodeError> {
    let (expected, wait, tables) = (what.rules, what.xtables_wait, what.created_tables.clone());
    tokio::task::spawn_blocking(move || {
        remove_rules(expected, wait)?;
        for t in tables {
            match nft::delete_if_empty(&t) {
                Ok(true) => tracing::info!("removed table {t}, which setup had created"),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot remove table {t}: {e}"),
            }
        }
        Ok::<_, RulesError>(())
    })
    .await??;
    if !what.interfaces.is_empty() {
        let nl = Netlink::connect()?;
        for name in &what.interfaces {
            if link::remove(&nl, name).await? {
                tracing::info!("removed interface {name}");
            }
        }
    }
    Ok(())
}
