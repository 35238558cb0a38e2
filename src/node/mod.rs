//! The node's network side: the link that holds the listen addresses and the firewall
//! rules that let DNS to them skip conntrack, installed, kept in place, and removed.
//!
//! - [`setup`] (also `localdns setup`, the unit's ExecStartPre) creates the link, puts the
//!   addresses on it and installs the rules; running it again changes nothing.
//! - [`watch`] runs beside the server and repairs drift: link and address changes are
//!   seen through netlink events and repaired at once; the rules are checked every
//!   `network.rules_check_interval`. Each repair is logged and counted.
//! - [`teardown`] (also `localdns teardown`, ExecStopPost) removes exactly that: the jumps
//!   to `LOCALDNS-*` chains, those chains (from both iptables backends), and the link.
//!
//! `localdns run` does not tear down when it stops: the rules fail open (see [`rules`]),
//! so a stopped or killed localdns leaves the kube-dns Service IP working through
//! kube-proxy, and a restart finds everything in place.
//!
//! OS effects sit behind [`link::LinkOps`] and [`iptables::Tables`] so that the logic is
//! unit-tested without root; the real implementations are tested in network namespaces.

pub mod firewall;
pub mod iptables;
pub mod link;
pub mod repair;
pub mod rules;

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::Config;
use iptables::{Iptables, Kind, RulesError, Tables};
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
    /// The backend holding the rules and what they looked like after install; `None`
    /// when `network.setup_rules` is false.
    pub rules: Option<(Arc<dyn Tables>, firewall::Snapshot)>,
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
            "interface {} is up and holds {}",
            n.interface,
            join(addresses)
        );
    }
    let mut rules = None;
    if n.setup_rules {
        let (backend, wait) = (n.iptables_backend, n.xtables_wait);
        let (addresses, port) = (addresses.clone(), cfg.listen.port);
        let (tables, snapshot) = tokio::task::spawn_blocking(move || {
            let tables: Arc<dyn Tables> = Arc::new(Iptables::choose(backend, wait)?);
            let snapshot = firewall::install(tables.as_ref(), &addresses, port)?;
            remove_from_other_backend(tables.kind(), wait);
            Ok::<_, NodeError>((tables, snapshot))
        })
        .await??;
        tracing::info!(
            backend = tables.kind().name(),
            "NOTRACK/ACCEPT rules installed for port {} of {}",
            cfg.listen.port,
            join(&cfg.listen.addresses)
        );
        rules = Some((tables, snapshot));
    }
    Ok(Setup { rules })
}

/// Rules left in the other backend by an earlier install (the node switched between
/// nft and legacy) would shadow nothing but confuse everyone: they go.
fn remove_from_other_backend(used: Kind, wait: std::time::Duration) {
    let other = match used {
        Kind::Nft => Kind::Legacy,
        Kind::Legacy => Kind::Nft,
    };
    match firewall::remove(&Iptables::new(other, wait)) {
        Ok(true) => tracing::info!(
            "removed localdns rules left in iptables-{} by an earlier install",
            other.name()
        ),
        Ok(false) | Err(RulesError::Spawn { .. }) => {}
        Err(e) => tracing::warn!("cannot check iptables-{} for old rules: {e}", other.name()),
    }
}

/// Removes what [`setup`] installs: every jump to a `LOCALDNS-*` chain and those chains
/// in both backends (when `setup_rules`), and the link with its addresses (when
/// `setup_interface`). Idempotent; removes nothing that is not localdns's.
pub async fn teardown(cfg: &Config) -> Result<(), NodeError> {
    let n = &cfg.network;
    if n.setup_rules {
        let wait = n.xtables_wait;
        tokio::task::spawn_blocking(move || {
            let mut ran = 0;
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
            if ran == 0 {
                return Err(RulesError::NoBackend(
                    "neither iptables-nft-save nor iptables-legacy-save runs".into(),
                ));
            }
            Ok(())
        })
        .await??;
    }
    if n.setup_interface {
        let nl = Netlink::connect()?;
        if link::remove(&nl, &n.interface).await? {
            tracing::info!("removed interface {}", n.interface);
        }
    }
    Ok(())
}
