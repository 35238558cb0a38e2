//! Drift repair while the daemon runs.
//!
//! The link and its addresses: a netlink socket subscribed to link and address events
//! wakes the task on any change on the node (a netlink overrun, which means events were
//! lost, wakes it too); it then compares the link with what it must be and puts back
//! what is missing, within milliseconds. The same comparison also runs on every rules
//! tick, in case the event socket itself fails.
//!
//! The rules: every `rules_check_interval` the backend is read and compared with the
//! snapshot taken after install; any difference (a flushed chain, a lost jump, an
//! `iptables-restore` by another agent) reinstalls them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::MulticastGroup;

use super::link::{self, Netlink};
use super::{firewall, join, Setup};
use crate::config::Config;
use crate::metrics::{inc, Metrics};

/// Keeps the setup in place until the task is dropped or aborted.
pub async fn watch(cfg: Config, setup: Setup, metrics: Arc<Metrics>) {
    let n = &cfg.network;
    let mut events = None;
    let mut ops = None;
    if n.setup_interface {
        match events_and_ops() {
            Ok((rx, nl)) => {
                events = Some(rx);
                ops = Some(nl);
            }
            Err(e) => tracing::error!(
                "cannot watch interface {}: {e}; it is checked every {:?} instead",
                n.interface,
                n.rules_check_interval
            ),
        }
        if ops.is_none() {
            ops = Netlink::connect().ok();
        }
    }
    let mut rules = match setup.rules {
        Some((tables, Some(snapshot))) => Some((tables, snapshot)),
        Some((tables, None)) => {
            let (t, addresses, port) = (
                Arc::clone(&tables),
                cfg.listen.addresses.clone(),
                cfg.listen.port,
            );
            match tokio::task::spawn_blocking(move || firewall::adopt(t.as_ref(), &addresses, port))
                .await
            {
                Ok(Ok(snapshot)) => Some((tables, snapshot)),
                Ok(Err(e)) => {
                    tracing::error!("cannot read back the firewall rules: {e}; installing them at the next check");
                    Some((tables, firewall::Snapshot::default()))
                }
                Err(e) => {
                    tracing::error!("firewall read-back task failed: {e}");
                    Some((tables, firewall::Snapshot::default()))
                }
            }
        }
        None => None,
    };
    if n.setup_interface {
        *metrics.node.link.lock() = Some(Ok(()));
    }
    if let Some((tables, snapshot)) = &rules {
        let (t, s) = (Arc::clone(tables), snapshot.clone());
        *metrics.node.rules_probe.lock() = Some(Arc::new(move || {
            firewall::intact(t.as_ref(), &s).map_err(|e| e.to_string())
        }));
    }
    let mut tick = tokio::time::interval(n.rules_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let event = async {
            match events.as_mut() {
                Some(rx) => rx.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = event => {
                let Some((msg, _)) = msg else {
                    tracing::error!("netlink event socket closed; interface {} is now checked every {:?}", n.interface, n.rules_check_interval);
                    events = None;
                    continue;
                };
                if matches!(msg.payload, NetlinkPayload::Overrun(_)) {
                    tracing::warn!("netlink events were lost (overrun): re-reading interface {}", n.interface);
                }
                // Take every event already queued: one check covers them all.
                if let Some(rx) = events.as_mut() {
                    while let Some(Some(_)) = rx.next().now_or_never() {}
                }
                if let Some(nl) = &ops {
                    repair_link(nl, &cfg, &metrics).await;
                }
            }
            _ = tick.tick() => {
                if let Some(nl) = &ops {
                    repair_link(nl, &cfg, &metrics).await;
                }
                if let Some((tables, snapshot)) = rules.take() {
                    rules = Some(repair_rules(tables, snapshot, &cfg, &metrics).await);
                }
            }
        }
    }
}

type Events = futures_util::stream::BoxStream<
    'static,
    (
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    ),
>;

fn events_and_ops() -> std::io::Result<(Events, Netlink)> {
    let (conn, _handle, rx) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(conn);
    let nl = Netlink::connect().map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((rx.boxed(), nl))
}

async fn repair_link(nl: &Netlink, cfg: &Config, metrics: &Metrics) {
    let name = &cfg.network.interface;
    match link::ensure(nl, name, &cfg.listen.addresses).await {
        Ok(c) if c.is_empty() => {}
        Ok(c) => {
            let count = |counter: &AtomicU64, n: usize| {
                for _ in 0..n {
                    inc(counter);
                }
            };
            let what = if let Some(kind) = c.created {
                count(&metrics.repairs_link, 1);
                Some(format!(
                    "interface {name} was gone, created it again ({kind})"
                ))
            } else if c.set_up {
                count(&metrics.repairs_link, 1);
                Some(format!("interface {name} was down, set it up"))
            } else {
                None
            };
            if let Some(what) = what {
                tracing::warn!("repaired: {what}");
                metrics.node.repaired(what);
            }
            if !c.added.is_empty() {
                count(&metrics.repairs_addresses, c.added.len());
                let what = format!("put back {} on interface {name}", join(&c.added));
                tracing::warn!("repaired: {what}");
                metrics.node.repaired(what);
            }
            *metrics.node.link.lock() = Some(Ok(()));
        }
        Err(e) => {
            metrics.setup_error(crate::metrics::SetupError::InterfaceAdd);
            tracing::error!("cannot repair interface {name}: {e}");
            *metrics.node.link.lock() = Some(Err(format!("interface {name}: {e}")));
        }
    }
}

async fn repair_rules(
    tables: Arc<dyn super::iptables::Tables>,
    snapshot: firewall::Snapshot,
    cfg: &Config,
    metrics: &Metrics,
) -> (Arc<dyn super::iptables::Tables>, firewall::Snapshot) {
    let (addresses, port) = (cfg.listen.addresses.clone(), cfg.listen.port);
    let (t, kept) = (Arc::clone(&tables), snapshot.clone());
    let checked = tokio::task::spawn_blocking(move || {
        if firewall::intact(t.as_ref(), &snapshot)? {
            return Ok((snapshot, false));
        }
        firewall::install(t.as_ref(), &addresses, port).map(|s| (s, true))
    })
    .await;
    match checked {
        Ok(Ok((snapshot, repaired))) => {
            if repaired {
                inc(&metrics.repairs_rules);
                let what = format!(
                    "localdns's firewall rules had changed, installed them again (iptables {})",
                    tables.kind().name()
                );
                tracing::warn!(backend = tables.kind().name(), "repaired: {what}");
                metrics.node.repaired(what);
                let (t, s) = (Arc::clone(&tables), snapshot.clone());
                *metrics.node.rules_probe.lock() = Some(Arc::new(move || {
                    firewall::intact(t.as_ref(), &s).map_err(|e| e.to_string())
                }));
            }
            (tables, snapshot)
        }
        Ok(Err(e)) => {
            // The next tick tries again against the same snapshot.
            metrics.setup_error(if e.to_string().contains("lock") {
                crate::metrics::SetupError::IptablesLock
            } else {
                crate::metrics::SetupError::Iptables
            });
            tracing::error!("cannot check or repair the firewall rules: {e}");
            (tables, kept)
        }
        Err(e) => {
            tracing::error!("firewall check task failed: {e}");
            (tables, kept)
        }
    }
}
