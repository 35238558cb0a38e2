//! Drift repair while the daemon runs.
//!
//! The link and its addresses: a netlink socket subscribed to link and address events
//! wakes the task on any change on the node (a netlink overrun, which means events were
//! lost, wakes it too); it then compares the link with what it must be and puts back
//! what is missing, within milliseconds. The same comparison also runs on every rules
//! tick, in case the event socket itself fails.
//!
//! The rules: a netlink socket subscribed to nftables notifications ([`nfevents`]) wakes
//! the task when a table holding them changes (nftables and iptables-nft; `nft flush
//! ruleset`, `nft delete table`, another agent's rewrite), and the backend is compared
//! with the snapshot taken after install and put back within milliseconds. Every
//! `rules_check_interval` the same check runs anyway: the safety net for iptables-legacy
//! (which sends no notifications), a failed event socket, and the nftables backend's
//! ACCEPT rules in the iptables filter table.
//!
//! A burst of notifications is checked once ([`super::debounce`]: 50 ms after the last,
//! at most 300 ms after the first), and only the tables it named are read: kube-proxy's
//! syncs rewrite nat (not watched: the kernel drops those notifications before localdns
//! reads them, see [`nfevents`]) and filter, so a sync costs one read of filter. Each
//! check is counted in `localdns_rules_checks_total{trigger="event|interval"}`.
//!
//! The order (iptables only, see [`order`]): each check also finds foreign rules ahead of
//! localdns's jumps that would decide DNS to its addresses first, and moves the jumps back
//! to the top; each distinct foreign rule is logged once (again after [`LOG_AGAIN`]), and
//! an agent that keeps undoing it is backed off from ([`order::Brake`]) and reported in
//! `/ready`, rather than fought.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::MulticastGroup;

use super::backend::{Backend, Repaired, Snapshot};
use super::debounce::Debounce;
use super::firewall::{Ahead, Check};
use super::link::{self, Netlink};
use super::order::Brake;
use super::{join, nfevents, Setup};
use crate::config::Config;
use crate::health::{OrderConflict, RulesState};
use crate::metrics::{inc, Metrics};

/// How long a foreign rule ahead of localdns's jump stays known (logged once).
pub const LOG_AGAIN: Duration = Duration::from_secs(600);
/// Distinct foreign rules remembered for that.
const LOGGED_MAX: usize = 64;

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
    let watched = setup
        .rules
        .as_ref()
        .map(|(b, _)| b.watched_tables())
        .unwrap_or_default();
    // Subscribed before the read-back, so that no change after it is missed.
    let mut nft_events = match setup.rules.as_ref() {
        Some((backend, _)) if backend.has_events() => match nfevents::Events::subscribe(&watched) {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::error!(
                    "cannot subscribe to nftables notifications: {e}; the rules are checked every {:?} instead",
                    n.rules_check_interval
                );
                None
            }
        },
        _ => None,
    };
    let mut rules = match setup.rules {
        Some((backend, Some(snapshot))) => Some((backend, Some(snapshot))),
        Some((backend, None)) => {
            let (b, addresses, port) = (
                backend.clone(),
                cfg.listen.addresses.clone(),
                cfg.listen.port,
            );
            match tokio::task::spawn_blocking(move || b.adopt(&addresses, port)).await {
                Ok(Ok(snapshot)) => Some((backend, Some(snapshot))),
                Ok(Err(e)) => {
                    tracing::error!("cannot read back the firewall rules: {e}; installing them at the next check");
                    Some((backend, None))
                }
                Err(e) => {
                    tracing::error!("firewall read-back task failed: {e}");
                    Some((backend, None))
                }
            }
        }
        None => None,
    };
    if n.setup_interface {
        *metrics.node.link.lock() = Some(Ok(()));
    }
    if let Some((backend, snapshot)) = &rules {
        rules_probe(&metrics, backend, snapshot.as_ref(), &cfg);
    }
    let mut order = Order::new(n.rules_check_interval);
    let mut burst = Debounce::new(n.rules_check_interval);
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
        let nft_event = async {
            match nft_events.as_mut() {
                Some(events) => events.changed(&watched).await,
                None => std::future::pending().await,
            }
        };
        let burst_over = async {
            match burst.due() {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = nft_event => {
                match changed {
                    // Unreadable or lost notifications: every table may have changed.
                    Ok(t) if t.unknown => burst.event(Instant::now(), watched.iter().copied()),
                    Ok(t) => burst.event(Instant::now(), t.tables),
                    Err(e) => {
                        tracing::error!("nftables notifications failed: {e}; the rules are now checked every {:?}", n.rules_check_interval);
                        nft_events = None;
                    }
                }
            }
            _ = burst_over => {
                let Some(named) = burst.take(Instant::now()) else { continue };
                if let Some((backend, snapshot)) = rules.take() {
                    rules = Some(repair_rules(backend, snapshot, Some(&named), &cfg, &metrics, &mut order).await);
                }
            }
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
                burst.covered();
                if let Some((backend, snapshot)) = rules.take() {
                    rules = Some(repair_rules(backend, snapshot, None, &cfg, &metrics, &mut order).await);
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

/// What `/ready` and `localdns status` ask about the rules: are they as `snapshot` says
/// (`None`: not known to be in place yet), and first where it matters.
fn rules_probe(metrics: &Metrics, backend: &Backend, snapshot: Option<&Snapshot>, cfg: &Config) {
    let (b, s) = (backend.clone(), snapshot.cloned());
    let (addresses, port) = (cfg.listen.addresses.clone(), cfg.listen.port);
    *metrics.node.rules_probe.lock() = Some(Arc::new(move || match &s {
        Some(s) => b
            .check(s, &addresses, port)
            .map(|c| state(&c))
            .map_err(|e| e.to_string()),
        None => Ok(RulesState::Changed),
    }));
}

fn state(c: &Check) -> RulesState {
    if !c.intact {
        RulesState::Changed
    } else if c.ahead.is_empty() {
        RulesState::Intact
    } else {
        RulesState::Bypassed(format!(
            "DNS to localdns's addresses is decided by another agent's rule first: {}",
            places(&c.ahead)
        ))
    }
}

/// "`RULE` ahead of localdns's jump in iptables-nft raw PREROUTING; ..."
fn places(ahead: &[Ahead]) -> String {
    let list: Vec<String> = ahead
        .iter()
        .map(|a| format!("`{}` ahead of localdns's jump in {}", a.rule(), a.place()))
        .collect();
    list.join("; ")
}

/// The order repair's memory: the brake, and the foreign rules already logged.
struct Order {
    brake: Brake,
    logged: HashMap<String, Instant>,
}

impl Order {
    fn new(interval: Duration) -> Order {
        Order {
            brake: Brake::new(interval),
            logged: HashMap::new(),
        }
    }

    /// Whether a jump may be moved now.
    fn may_move(&self) -> bool {
        self.brake.wait(Instant::now()).is_none()
    }

    /// Counts and logs a move (each foreign rule once), and engages the brake when the
    /// moves are too many.
    fn moved(&mut self, moved: &[Ahead], took: Duration, metrics: &Metrics) {
        let now = Instant::now();
        inc(&metrics.repairs_order);
        if self.logged.len() >= LOGGED_MAX {
            self.logged
                .retain(|_, at| now.duration_since(*at) < LOG_AGAIN);
            if self.logged.len() >= LOGGED_MAX {
                self.logged.clear();
            }
        }
        for a in moved {
            for rule in &a.rules {
                let key = format!("{} {rule}", a.place());
                let known = self
                    .logged
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < LOG_AGAIN);
                if known {
                    tracing::debug!(
                        "moved localdns's jump back ahead of `{rule}` in {}",
                        a.place()
                    );
                    continue;
                }
                tracing::warn!(
                    "another agent's rule sat ahead of localdns's jump, where it decides DNS to \
                     localdns's addresses first (they bypass localdns; conntrack and kube-proxy \
                     take them): `{rule}` in {}; moved localdns's jump back to the top",
                    a.place()
                );
                self.logged.insert(key, now);
            }
        }
        metrics.node.repaired(format!(
            "moved localdns's jump back to the top, ahead of {}, in {} ms",
            places(moved),
            took.as_millis()
        ));
        if let Some(back) = self.brake.moved(now) {
            let say = format!(
                "another agent keeps putting a rule ahead of localdns's jump ({}): moved back \
                 {} times within {:?}; backing off instead of fighting it, the next move in \
                 {:?}; DNS to localdns's addresses bypasses it meanwhile, /ready says so",
                places(moved),
                back.moves,
                back.window,
                back.delay
            );
            if back.first {
                tracing::error!("{say}");
            } else {
                tracing::info!("{say}");
            }
            *metrics.node.order_conflict.lock() = Some(OrderConflict {
                moves: back.moves,
                window: back.window,
                next: now + back.delay,
            });
        }
    }

    /// The order was found right: a conflict that has been quiet for a window is over.
    fn settled(&mut self, metrics: &Metrics) {
        if self.brake.settled(Instant::now()) {
            tracing::info!(
                "localdns's jumps have stayed first for {:?}: the conflict over rule order is over",
                self.brake.window()
            );
            *metrics.node.order_conflict.lock() = None;
        }
    }
}

/// Checks the rules against `snapshot` and puts back what changed (`named`: see
/// [`Backend::repair`]); counts the check, logs and counts each repair with the time it
/// took.
async fn repair_rules(
    backend: Backend,
    snapshot: Option<Snapshot>,
    named: Option<&[(u8, &'static str)]>,
    cfg: &Config,
    metrics: &Metrics,
    order: &mut Order,
) -> (Backend, Option<Snapshot>) {
    let (addresses, port) = (cfg.listen.addresses.clone(), cfg.listen.port);
    let (b, kept) = (backend.clone(), snapshot.clone());
    let started = std::time::Instant::now();
    let may_move = order.may_move();
    inc(match named {
        Some(_) => &metrics.rules_checks_event,
        None => &metrics.rules_checks_interval,
    });
    let named = named.map(<[_]>::to_vec);
    let checked = tokio::task::spawn_blocking(move || {
        b.repair(
            snapshot.as_ref(),
            &addresses,
            port,
            named.as_deref(),
            may_move,
        )
    })
    .await;
    match checked {
        Ok(Ok((snapshot, done))) => {
            let Repaired { what, moved, held } = done;
            let rest: Vec<&str> = what.into_iter().filter(|w| *w != "order").collect();
            if !rest.is_empty() {
                inc(&metrics.repairs_rules);
                let what = format!(
                    "localdns's firewall rules had changed ({}), installed them again in {} ms",
                    rest.join(", "),
                    started.elapsed().as_millis()
                );
                tracing::warn!(firewall = backend.name(), "repaired: {what}");
                metrics.node.repaired(what);
                rules_probe(metrics, &backend, Some(&snapshot), cfg);
            } else if !moved.is_empty() {
                order.moved(&moved, started.elapsed(), metrics);
            } else if held.is_empty() {
                order.settled(metrics);
            } else {
                tracing::debug!(
                    "backing off: not moving localdns's jump ahead of {}",
                    places(&held)
                );
            }
            (backend, Some(snapshot))
        }
        Ok(Err(e)) => {
            // The next check tries again against the same snapshot.
            metrics.setup_error(if e.to_string().contains("lock") {
                crate::metrics::SetupError::IptablesLock
            } else {
                crate::metrics::SetupError::Iptables
            });
            tracing::error!("cannot check or repair the firewall rules: {e}");
            (backend, kept)
        }
        Err(e) => {
            tracing::error!("firewall check task failed: {e}");
            (backend, kept)
        }
    }
}
