//! Link-local mode fails open: `localdns fallback`, the standby relay of
//! localdns-fallback.service.
//!
//! In intercept mode a stopped localdns is no outage: its rules match only while a
//! localdns socket listens, so queries to the kube-dns Service IP fall through to
//! kube-proxy. A link-local address (kubelet `clusterDNS: 169.254.20.10`, what IPVS and
//! Cilium nodes need) has nobody behind it but localdns: stopped, crash-looping or failing
//! to start, pods asking it get nothing. This relay is the somebody. It runs beside
//! localdns as a separate, small process (no cache, no config reloads, nothing that can
//! break with localdns), and holds:
//!
//! - its own address (`network.fallback_address`, 169.254.20.11) on its own link
//!   ([`LINK`]), so that neither localdns's link nor its teardown touch it;
//! - the nftables table `ip localdns-fallback` ([`table`]): DNAT of DNS to each relayed
//!   address to the relay, which only ever sees the queries no localdns socket takes
//!   (localdns's raw rules NOTRACK the others, and untracked packets skip NAT);
//! - UDP and TCP sockets on its address and the listen port, relaying to the cluster
//!   upstream (the kube-dns-upstream Service: the same CoreDNS pods kube-dns has), or to
//!   the default upstreams when there is none ([`relay`]).
//!
//! While localdns serves, the relay sees no packet. It repairs its table and link every
//! `network.rules_check_interval`, logs when it starts and stops relaying (and how much,
//! at most once a minute), and removes exactly its table and link when it stops.

pub mod relay;
pub mod table;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, Source};
use crate::node::link::{self, Netlink};
use crate::{lifecycle, systemd};

/// The relay's link (kind dummy, or ifb where the kernel has no dummy).
pub const LINK: &str = "localdns-fb";

/// What the relay does with a config.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Relay these addresses.
    Relay(Plan),
    /// Nothing to relay, and why (said in the log and in `systemctl status`).
    Idle(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The listen addresses relayed: the IPv4 link-local ones.
    pub relayed: Vec<Ipv4Addr>,
    /// Their port, on which the relay listens too.
    pub port: u16,
    /// The relay's own address.
    pub address: Ipv4Addr,
    /// Where queries go.
    pub servers: Vec<SocketAddr>,
    /// How long one attempt may take.
    pub timeout: Duration,
    pub check_interval: Duration,
}

/// The listen addresses nobody but localdns answers: the IPv4 link-local ones.
fn link_local(cfg: &Config) -> Vec<Ipv4Addr> {
    cfg.listen
        .addresses
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if v4.is_link_local() => Some(*v4),
            _ => None,
        })
        .collect()
}

/// What the relay does for `cfg`: pure.
pub fn plan(cfg: &Config) -> Decision {
    let n = &cfg.network;
    if !n.fallback {
        return Decision::Idle("network.fallback is false".into());
    }
    if !n.setup_rules {
        return Decision::Idle(
            "network.setup_rules is false: localdns installs no rules, so the relay adds none"
                .into(),
        );
    }
    let relayed = link_local(cfg);
    if relayed.is_empty() {
        return Decision::Idle(
            "no link-local listen address: the Service IP falls back to kube-proxy by itself"
                .into(),
        );
    }
    let servers = if cfg.cluster.upstream.is_empty() {
        cfg.upstream.servers.clone()
    } else {
        cfg.cluster.upstream.clone()
    };
    if servers.is_empty() {
        return Decision::Idle("no server to relay to (no cluster or default upstream)".into());
    }
    Decision::Relay(Plan {
        relayed,
        port: cfg.listen.port,
        address: n.fallback_address,
        servers,
        timeout: cfg.upstream.timeout,
        check_interval: n.rules_check_interval,
    })
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Plan {
    fn describe(&self) -> String {
        format!(
            "relays DNS to {} that localdns does not take, from {}:{} to {}",
            join(&self.relayed),
            self.address,
            self.port,
            join(&self.servers)
        )
    }
}

/// `localdns fallback`: run the relay until SIGTERM or SIGINT.
pub fn run(source: &Source) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut signals = lifecycle::signals::Signals::catch()?;
        let Some(cfg) = config(source, &mut signals).await else {
            return Ok(());
        };
        match plan(&cfg) {
            Decision::Idle(why) => idle(&why, signals).await,
            Decision::Relay(p) => serve(p, signals).await,
        }
    })
}

/// How often a refused config (with no last good one) is read again.
const CONFIG_RETRY: Duration = Duration::from_secs(5);

/// The config of the start (the last good one when the files are refused). With none at
/// all, the relay says so (READY, so that the boot goes on, and `STATUS=`) and reads the
/// files again every [`CONFIG_RETRY`] instead of exiting: a restart loop would say the
/// same thing every second. `None` when stopped meanwhile.
async fn config(source: &Source, signals: &mut lifecycle::signals::Signals) -> Option<Config> {
    let mut told = false;
    loop {
        match crate::daemon::load_for_start(source) {
            Ok(loaded) => return Some(loaded.config),
            Err(e) if !told => {
                tracing::error!(
                    "fallback relay waits for a config it can use (read again every {}s): {e}",
                    CONFIG_RETRY.as_secs()
                );
                systemd::ready(&format!("NOT RELAYING: config refused: {e}"));
                told = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = signals.term.recv() => return None,
            _ = signals.int.recv() => return None,
            _ = signals.hup.recv() => {}
            _ = tokio::time::sleep(CONFIG_RETRY) => {}
        }
    }
}

/// What removing the package does to pods, in link-local mode (`None` in intercept mode):
/// printed by the removal scripts once localdns has stopped and before the relay does.
pub fn removal_notice(source: &Source) -> Option<String> {
    let cfg = crate::state::load_for_start(source).ok()?.config;
    let relayed = link_local(&cfg);
    (!relayed.is_empty()).then(|| {
        format!(
            "localdns: removed in link-local mode: pods whose DNS server is {} (kubelet \
             clusterDNS) have NO DNS from now on. Point kubelet's clusterDNS at the kube-dns \
             Service IP and re-create those pods, or install localdns again.",
            join(&relayed)
        )
    })
}

/// `localdns fallback --remove` (the unit's ExecStopPost): remove the table and the link.
pub fn remove() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(remove_all())
}

async fn remove_all() -> anyhow::Result<()> {
    let table = tokio::task::spawn_blocking(table::remove).await??;
    let nl = Netlink::connect()?;
    let link = link::remove(&nl, LINK).await?;
    if table || link {
        tracing::info!(
            table = table,
            link = link,
            "fallback relay removed: table {}: {}, link {LINK}: {}",
            table::TABLE_ID,
            if table { "deleted" } else { "absent" },
            if link { "deleted" } else { "absent" }
        );
    }
    Ok(())
}

async fn idle(why: &str, mut signals: lifecycle::signals::Signals) -> anyhow::Result<()> {
    tracing::info!("fallback relay idle: {why}");
    // What an earlier config installed would send queries to a relay that is not there.
    remove_all().await?;
    systemd::ready(&format!("idle: {why}"));
    loop {
        tokio::select! {
            _ = signals.term.recv() => return Ok(()),
            _ = signals.int.recv() => return Ok(()),
            // SIGHUP does nothing here (the relay takes config changes at its restart).
            _ = signals.hup.recv() => {}
        }
    }
}

/// Link, table, sockets; [`table::install`] replaces whatever table was there.
async fn install(p: &Plan, nl: &Netlink) -> anyhow::Result<()> {
    link::ensure(nl, LINK, &[IpAddr::V4(p.address)])
        .await
        .map_err(|e| anyhow::anyhow!("link {LINK}: {e}"))?;
    let (relayed, port, address) = (p.relayed.clone(), p.port, p.address);
    tokio::task::spawn_blocking(move || table::install(&relayed, port, address))
        .await?
        .map_err(|e| anyhow::anyhow!("table {}: {e}", table::TABLE_ID))?;
    Ok(())
}

async fn serve(p: Plan, mut signals: lifecycle::signals::Signals) -> anyhow::Result<()> {
    let nl = Netlink::connect()?;
    install(&p, &nl).await?;
    let at = SocketAddr::new(IpAddr::V4(p.address), p.port);
    let udp = tokio::net::UdpSocket::bind(at)
        .await
        .map_err(|e| anyhow::anyhow!("UDP {at}: {e}"))?;
    let tcp = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| anyhow::anyhow!("TCP {at}: {e}"))?;
    let target = Arc::new(relay::Target {
        servers: p.servers.clone(),
        timeout: p.timeout,
    });
    let counts = Arc::new(relay::Counts::default());
    let relays = [
        tokio::spawn(relay::udp(udp, target.clone(), counts.clone())),
        tokio::spawn(relay::tcp(tcp, target, counts.clone())),
    ];
    let what = p.describe();
    tracing::info!("fallback relay ready: {what}");
    systemd::ready(&format!("standby: {what}"));

    let mut check = tokio::time::interval(p.check_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = systemd::watchdog_interval().map(|w| w / 2);
    let mut watchdog = tokio::time::interval(ping.unwrap_or(Duration::from_secs(3600)));
    let mut report = Report::default();
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => {}
            _ = watchdog.tick(), if ping.is_some() => systemd::watchdog(),
            _ = check.tick() => {
                repair(&p, &nl).await;
                if let Some(line) = report.step(counts.tally(), Instant::now()) {
                    tracing::warn!("fallback relay: {line}");
                    systemd::status(&format!("{}: {what}", report.state()));
                }
            }
        }
    }
    systemd::stopping();
    // The table first: from here on a query no localdns socket takes is not relayed.
    let removed = remove_all().await;
    for r in relays {
        r.abort();
    }
    removed
}

/// Put back the table or the link address when something removed them.
async fn repair(p: &Plan, nl: &Netlink) {
    match link::ensure(nl, LINK, &[IpAddr::V4(p.address)]).await {
        Ok(changes) if !changes.is_empty() => {
            tracing::warn!("fallback relay: link {LINK} or its address was removed: put back")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("fallback relay: cannot check link {LINK}: {e}"),
    }
    let present = tokio::task::spawn_blocking(table::present).await;
    if matches!(present, Ok(Ok(true))) {
        return;
    }
    let (relayed, port, address) = (p.relayed.clone(), p.port, p.address);
    match tokio::task::spawn_blocking(move || table::install(&relayed, port, address)).await {
        Ok(Ok(())) => tracing::warn!(
            "fallback relay: table {} was removed: put back",
            table::TABLE_ID
        ),
        Ok(Err(e)) => tracing::warn!("fallback relay: cannot put back {}: {e}", table::TABLE_ID),
        Err(e) => tracing::warn!("fallback relay: table check failed: {e}"),
    }
}

/// When to tell the journal about relaying: when it starts, at most every
/// [`REPORT_EVERY`] while it goes on, and when it stops. Pure: fed the relay's counts.
#[derive(Debug, Default)]
pub struct Report {
    seen: relay::Tally,
    /// Relaying since the counts last moved from still: when, and the counts then.
    episode: Option<(relay::Tally, Instant)>,
    last_line: Option<Instant>,
}

pub const REPORT_EVERY: Duration = Duration::from_secs(60);

fn queries(now: relay::Tally, then: relay::Tally) -> String {
    let unanswered = now.failed - then.failed;
    let n = now.taken - then.taken;
    match unanswered {
        0 => format!("{n} queries"),
        u => format!("{n} queries ({u} got no answer from the servers)"),
    }
}

impl Report {
    pub fn step(&mut self, now_counts: relay::Tally, now: Instant) -> Option<String> {
        let moved = now_counts.taken > self.seen.taken;
        let before = self.seen;
        self.seen = now_counts;
        match (self.episode, moved) {
            (None, true) => {
                self.episode = Some((before, now));
                self.last_line = Some(now);
                Some(format!(
                    "relaying: {} no localdns socket took (localdns is not serving)",
                    queries(now_counts, before)
                ))
            }
            (Some((start, since)), true) => {
                let due = self
                    .last_line
                    .map_or(true, |t| now.duration_since(t) >= REPORT_EVERY);
                due.then(|| {
                    self.last_line = Some(now);
                    format!(
                        "still relaying: {} in {}s (localdns is not serving)",
                        queries(now_counts, start),
                        now.duration_since(since).as_secs()
                    )
                })
            }
            (Some((start, since)), false) => {
                self.episode = None;
                Some(format!(
                    "standing by again after relaying {} in {}s",
                    queries(now_counts, start),
                    now.duration_since(since).as_secs()
                ))
            }
            (None, false) => None,
        }
    }

    fn state(&self) -> &'static str {
        if self.episode.is_some() {
            "RELAYING (localdns not serving)"
        } else {
            "standby"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        crate::config::load(&Source {
            explicit: true,
            path,
            conf_dir: None,
        })
        .unwrap()
    }

    const NODE: &str = "[listen]\naddresses = [\"169.254.20.10\", \"10.96.0.10\"]\nport = 53\n\
                        [cluster]\nupstream = [\"10.96.0.11\"]\n\
                        [upstream]\nservers = [\"10.0.0.2\"]\n";

    #[test]
    fn a_node_relays_its_link_local_address_to_the_cluster_upstream() {
        let Decision::Relay(p) = plan(&config(NODE)) else {
            panic!("idle")
        };
        assert_eq!(p.relayed, ["169.254.20.10".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(p.address, "169.254.20.11".parse::<Ipv4Addr>().unwrap());
        assert_eq!(p.port, 53);
        assert_eq!(p.servers, ["10.96.0.11:53".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn without_a_cluster_upstream_the_default_upstreams_are_used() {
        let c = config(
            "[listen]\naddresses = [\"169.254.20.10\"]\n[upstream]\nservers = [\"10.0.0.2\"]\n",
        );
        let Decision::Relay(p) = plan(&c) else {
            panic!("idle")
        };
        assert_eq!(p.servers, ["10.0.0.2:53".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn intercept_mode_only_or_no_rules_or_off_is_idle_with_the_reason() {
        let cases = [
            (
                "[listen]\naddresses = [\"10.96.0.10\"]\n[upstream]\nservers = [\"10.0.0.2\"]\n",
                "no link-local",
            ),
            (
                &format!("{NODE}[network]\nsetup_rules = false\n"),
                "setup_rules",
            ),
            (
                &format!("{NODE}[network]\nfallback = false\n"),
                "fallback is false",
            ),
        ];
        for (toml, why) in cases {
            match plan(&config(toml)) {
                Decision::Idle(reason) => assert!(reason.contains(why), "{reason}"),
                d => panic!("{toml}: {d:?}"),
            }
        }
    }

    #[test]
    fn the_relay_address_must_be_link_local_and_not_a_listen_address() {
        for (addr, why) in [
            ("10.0.0.9", "not an IPv4 link-local"),
            ("169.254.20.10", "also a listen address"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("config.toml");
            std::fs::write(
                &path,
                format!("{NODE}[network]\nfallback_address = \"{addr}\"\n"),
            )
            .unwrap();
            let e = crate::config::load(&Source {
                explicit: true,
                path,
                conf_dir: None,
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("network.fallback_address") && e.contains(why),
                "{e}"
            );
            assert!(e.contains("config.toml:9:"), "file and line: {e}");
        }
    }

    #[test]
    fn relaying_is_reported_when_it_starts_once_a_minute_and_when_it_stops() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let n = |taken, failed| relay::Tally { taken, failed };
        let mut r = Report::default();
        assert_eq!(r.step(n(0, 0), at(0)), None, "standby says nothing");
        let first = r.step(n(3, 0), at(5)).expect("the start is told at once");
        assert!(first.contains("relaying: 3 queries no localdns"), "{first}");
        assert_eq!(r.state(), "RELAYING (localdns not serving)");
        assert_eq!(r.step(n(10, 0), at(10)), None, "not again within a minute");
        let again = r.step(n(50, 4), at(66)).expect("a minute later");
        assert!(
            again.contains("50 queries (4 got no answer from the servers) in 61s"),
            "{again}"
        );
        let done = r.step(n(50, 4), at(70)).expect("the end is told");
        assert!(done.contains("after relaying 50 queries (4 got"), "{done}");
        assert_eq!(r.state(), "standby");
        assert_eq!(r.step(n(50, 4), at(75)), None);
    }
}
