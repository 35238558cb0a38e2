//! The daemon's life cycle, in order: take the sockets systemd kept, build the runtime,
//! set up the node (link, addresses, rules), bind, serve with drift repair until SIGTERM
//! or SIGINT, hand the Service IP back to kube-proxy when the stop is final, then stop
//! cleanly. `localdns run`, `setup` and `teardown` are the functions here.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Config, Source};
use crate::metrics::Metrics;
use crate::server::{Ending, Server};
use crate::state::{self, Loaded, SetupRecord};
use crate::{lifecycle, node, systemd};

/// Node setup waits on iptables (each call bounded by `xtables_wait`, retried) and netlink;
/// whatever goes wrong, a start fails within this time (60 s with the default 5 s wait,
/// under systemd's 90 s start timeout) and is restarted, instead of holding up the boot.
pub fn setup_limit(cfg: &Config) -> Duration {
    node_limit(cfg.network.xtables_wait)
}

/// [`setup_limit`] for a given xtables lock wait (teardown may have no config).
fn node_limit(xtables_wait: Duration) -> Duration {
    Duration::from_secs(30) + xtables_wait * 6
}

/// After the rules are removed on a final stop, the sockets are still read this long: what
/// the socket match steered to them before the removal is answered, while new queries to
/// the Service IP already go to kube-dns through kube-proxy.
const HANDOVER_DRAIN: Duration = Duration::from_millis(200);

/// Load the config for `run` or `setup`, falling back to the last good one when the files
/// on disk are refused (see [`state`]); the refusal is logged as an error either way.
pub fn load_for_start(source: &Source) -> Result<Loaded, config::ConfigError> {
    let loaded = state::load_for_start(source)?;
    if let Some(e) = &loaded.refused {
        tracing::error!(
            "config refused: {e}; starting on the last good config instead ({}). \
             Fix the file, then `systemctl reload localdns`",
            loaded
                .config
                .sources
                .first()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    Ok(loaded)
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(loaded: Loaded, source: Source) -> anyhow::Result<()> {
    let Loaded {
        config: cfg,
        refused,
    } = loaded;
    // Before any thread starts: these read and unset LISTEN_FDS or the hand-over's variables.
    let bridge = crate::bridge::take_role();
    let (mut kept, incoming) = match crate::handover::receive() {
        None => (systemd::Inherited::receive(), None),
        Some(Ok((fds, incoming))) => {
            tracing::info!(
                "taking over from the old process: {} descriptors received",
                fds.len()
            );
            (systemd::Inherited::from_fds(fds), Some(incoming))
        }
        // The old process goes on serving; nothing here was touched.
        Some(Err(e)) => anyhow::bail!("hand-over from the old process failed: {e}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("localdns-rt")
        .enable_all()
        .build()?;
    if bridge {
        return runtime.block_on(bridge_serve(cfg, kept, incoming));
    }
    runtime.block_on(async {
        let signals = lifecycle::signals::Signals::catch()?;
        let collector = crate::allocator::spawn_collector();
        let removal = node::Removal::of(&cfg);
        let names = crate::server::socket_names(&cfg);
        let served = serve(cfg, refused, source, &mut kept, incoming, signals, &removal).await;
        match served {
            Ok(Ending::Stop) => lifecycle::stopped(),
            // The new process serves: the record, the sockets and the rules are its own.
            Ok(Ending::HandedOver) => {}
            Err(ref e) => give_back(e, &removal, &names).await,
        }
        kept.release_rest();
        collector.abort();
        served.map(drop)
    })
}

/// Serve as the bridge across a restart ([`crate::bridge`]) until the new main process
/// dismisses it or [`crate::bridge::LIFETIME`] has passed. Nothing of the node is touched,
/// whatever happens here.
async fn bridge_serve(
    mut cfg: Config,
    mut kept: systemd::Inherited,
    incoming: Option<crate::handover::Incoming>,
) -> anyhow::Result<()> {
    let lifecycle::signals::Signals {
        mut term, mut int, ..
    } = lifecycle::signals::Signals::catch()?;
    // The kept HTTP listener queues scrapes and probes for the new main process.
    cfg.metrics.addresses.clear();
    let server = Server::bind(cfg, Arc::new(Metrics::default()), &mut kept)?.taking_over(incoming);
    // What is not used here stays in systemd's fd store for the new main process.
    drop(kept);
    let stop = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = tokio::time::sleep(crate::bridge::LIFETIME) => tracing::warn!(
                "no new main process took the sockets within {:?}; the bridge exits",
                crate::bridge::LIFETIME
            ),
        }
        Ending::HandedOver
    };
    crate::bridge::register();
    let served = server.run(None, stop).await;
    crate::bridge::unregister();
    served.map(drop).map_err(Into::into)
}

/// Set up the node, bind and serve until SIGTERM or SIGINT.
async fn serve(
    cfg: Config,
    refused: Option<config::ConfigError>,
    source: Source,
    kept: &mut systemd::Inherited,
    incoming: Option<crate::handover::Incoming>,
    signals: lifecycle::signals::Signals,
    removal: &node::Removal,
) -> anyhow::Result<Ending> {
    let lifecycle::signals::Signals {
        mut term,
        mut int,
        hup,
        mut usr2,
    } = signals;
    // The link, addresses and rules come first: the listen addresses must exist to be
    // bound, and READY means the node's DNS works.
    let limit = setup_limit(&cfg);
    let setup = match node::done_in_this_invocation(&cfg) {
        Some(done) => done,
        None => tokio::time::timeout(limit, node::setup(&cfg))
            .await
            .map_err(|_| anyhow::anyhow!("node setup did not finish within {limit:?}"))?
            .map_err(|e| anyhow::anyhow!("node setup failed: {e}"))?,
    };
    let metrics = Arc::new(Metrics::default());
    let repair = tokio::spawn(node::watch(cfg.clone(), setup, Arc::clone(&metrics)));
    let server = match Server::bind(cfg, metrics, kept) {
        Ok(s) => s
            .refused_at_start(refused.map(|e| e.to_string()))
            .taking_over(incoming),
        Err(e) => {
            repair.abort();
            return Err(e.into());
        }
    };
    std::mem::take(kept).release_rest();
    let kit = server.handover_kit().map(Arc::new);
    crate::handover::advertise();
    let stop = async {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr2.recv() => match &kit {
                    Ok(kit) if to_new_process(kit).await => {
                        repair.abort();
                        return Ending::HandedOver;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!("cannot hand over to a new process: {e}"),
                },
            }
        }
        hand_over(&repair, removal, kit.as_ref().ok()).await;
        Ending::Stop
    };
    let served = server.run(Some((source, hup)), stop).await;
    repair.abort();
    Ok(served?)
}

/// SIGUSR2 (`localdns handover`): start the new binary on the same sockets and the cache,
/// and make it the main process once it reads them ([`crate::handover`]). `false` when it
/// did not take over: this process goes on serving as before.
async fn to_new_process(kit: &Arc<crate::server::HandoverKit>) -> bool {
    tracing::info!("hand-over asked: writing the cache snapshot and starting the new binary");
    kit.save_snapshot().await;
    let started = std::time::Instant::now();
    let kit = Arc::clone(kit);
    let outcome = tokio::task::spawn_blocking(move || {
        let out = crate::handover::start(&kit.fds())?;
        systemd::main_pid(out.pid());
        let pid = out.pid();
        out.confirm().map(|()| pid)
    })
    .await;
    match outcome {
        Ok(Ok(pid)) => {
            tracing::info!(
                "handed over to process {pid} in {:?}: it reads the sockets and is the main \
                 process; answering what is in flight here, then exiting",
                started.elapsed()
            );
            true
        }
        Ok(Err(e)) => {
            tracing::error!("hand-over not done: {e}; serving on");
            false
        }
        Err(e) => {
            tracing::error!("hand-over not done: {e}; serving on");
            false
        }
    }
}

/// Before a restart: start the bridge that serves until the new main process reads the
/// sockets ([`crate::bridge`]). Without it, the restart goes on as before: the kept
/// sockets hold the queries.
async fn to_bridge(kit: &Arc<crate::server::HandoverKit>) {
    kit.save_snapshot().await;
    let started = std::time::Instant::now();
    let kit = Arc::clone(kit);
    match tokio::task::spawn_blocking(move || crate::bridge::start(&kit.fds())).await {
        Ok(Ok(pid)) => tracing::info!(
            "process {pid} serves across the restart (started in {:?}); the new main process stops it",
            started.elapsed()
        ),
        Ok(Err(e)) => tracing::warn!(
            "no bridge across the restart ({e}): the kept sockets hold the queries until the new process reads them"
        ),
        Err(e) => tracing::warn!("no bridge across the restart: {e}"),
    }
}

/// The daemon cannot serve (setup or a bind failed): give the node's DNS addresses back
/// before exiting, so that nothing waits on sockets nobody reads until a start succeeds.
/// systemd closes the sockets it keeps for us (then the socket match no longer steers
/// queries here) and the rules go, so queries to the Service IP go to kube-dns through
/// kube-proxy; the next start (braked, see [`lifecycle`]) puts them back.
async fn give_back(why: &anyhow::Error, removal: &node::Removal, names: &[String]) {
    tracing::error!(
        "cannot serve: {why:#}; giving the DNS addresses back (the kept sockets are closed{}) \
         so that pods reach kube-dns through kube-proxy until a start succeeds",
        if removal.rules {
            " and the rules removed"
        } else {
            ""
        }
    );
    systemd::forget(names.iter().map(String::as_str));
    if removal.rules {
        remove_rules(removal, "after a failed start").await;
    }
}

/// Remove the rules off the async threads (iptables waits on the xtables lock); a failure
/// is logged with `when`.
async fn remove_rules(removal: &node::Removal, when: &str) {
    let (expected, wait) = (removal.rules, removal.xtables_wait);
    match tokio::task::spawn_blocking(move || node::remove_rules(expected, wait)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("cannot remove the rules {when}: {e}"),
        Err(e) => tracing::error!("cannot remove the rules {when}: {e}"),
    }
}

/// On a final stop, remove the rules while the sockets are still read, so that no query
/// to the Service IP is steered to a socket nobody reads any more: the ones already
/// steered are answered, the next ones go to kube-dns through kube-proxy. Before a
/// restart, everything stays for the next process (the kept sockets queue the queries).
async fn hand_over(
    repair: &tokio::task::JoinHandle<()>,
    removal: &node::Removal,
    kit: Option<&Arc<crate::server::HandoverKit>>,
) {
    let kind = tokio::task::spawn_blocking(systemd::stop_kind)
        .await
        .unwrap_or(systemd::Stop::Unmanaged);
    match kind {
        systemd::Stop::Final(why) if removal.rules => {
            repair.abort();
            tracing::info!(
                "final stop ({why}): removing the rules first, so that queries to the \
                 Service IP go to kube-dns through kube-proxy while those already here are answered"
            );
            remove_rules(removal, "before stopping").await;
            tokio::time::sleep(HANDOVER_DRAIN).await;
        }
        systemd::Stop::Final(why) => tracing::info!("final stop ({why})"),
        systemd::Stop::Restart(why) => {
            tracing::info!(
                "stopping for a restart ({why}): the link, rules and sockets stay for the next process"
            );
            if let Some(kit) = kit {
                to_bridge(kit).await;
            }
        }
        systemd::Stop::Unmanaged => {}
    }
}

/// `localdns setup` (`ExecStartPre=`): first the restart brake ([`lifecycle`]), then the
/// config, then the node setup, bounded like the daemon's. While a braked start waits, the
/// rules are out of the way, so that queries to the Service IP go to kube-dns through
/// kube-proxy instead of to sockets systemd keeps and nobody reads.
pub fn setup(source: &Source) -> Result<(), SetupFailure> {
    if let Some(start) = lifecycle::begin(config_mtime(source)) {
        brake(&start);
    }
    let loaded = load_for_start(source).map_err(SetupFailure::Config)?;
    let cfg = &loaded.config;
    once(setup_limit(cfg), || async {
        node::setup(cfg).await.map(drop)
    })
    .map_err(SetupFailure::Node)
}

/// Why `setup` failed: the config (exit 64) or the node.
#[derive(Debug, thiserror::Error)]
pub enum SetupFailure {
    #[error("config error: {0}")]
    Config(config::ConfigError),
    #[error("{0:#}")]
    Node(anyhow::Error),
}

/// Say why this start comes, and wait when it follows failures in a row.
fn brake(start: &lifecycle::Start) {
    let Some(after) = start.after else { return };
    if start.wait.is_zero() {
        tracing::warn!(
            "starting again after {after} ({} in a row within {:?}{})",
            start.failures,
            lifecycle::WINDOW,
            if start.config_changed {
                "; the config changed since, so at once"
            } else {
                ""
            }
        );
        return;
    }
    let gave_back = SetupRecord::read().is_some_and(|r| r.rules)
        && node::remove_rules(true, config::default_network().xtables_wait)
            .map_err(|e| tracing::warn!("cannot remove the rules while waiting: {e}"))
            .is_ok();
    tracing::error!(
        "start braked: {} failures in a row within {:?}, the last {after}; waiting {:?}{}",
        start.failures,
        lifecycle::WINDOW,
        start.wait,
        if gave_back {
            " with the rules removed, so that pods reach kube-dns through kube-proxy meanwhile"
        } else {
            ""
        }
    );
    std::thread::sleep(start.wait);
}

/// When the config files (the main file and the drop-ins) last changed.
fn config_mtime(source: &Source) -> Option<std::time::SystemTime> {
    let mut files = vec![source.path.clone()];
    if let Ok(dir) = std::fs::read_dir(config::conf_dir(source)) {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    files
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

/// `localdns teardown`: remove what setup installed. Never needs a valid config: a bad
/// edit, or an upgrade whose new version refuses an old key, must not leave the link-local
/// address on the node with nothing behind it. The links removed are the one setup
/// recorded under `$RUNTIME_DIRECTORY` and the one the config names; when neither can be
/// read, the default interface. Rules are removed wherever they are found.
pub fn teardown(source: &Source) -> anyhow::Result<()> {
    let recorded = SetupRecord::read();
    let mut what = match config::load(source) {
        Ok(cfg) => node::Removal::of(&cfg),
        Err(e) => {
            tracing::error!(
                "config refused: {e}; tearing down {} anyway",
                if recorded.is_some() {
                    "what setup recorded"
                } else {
                    "the default interface and every localdns rule"
                }
            );
            let defaults = config::default_network();
            node::Removal {
                interfaces: if recorded.is_some() {
                    Vec::new()
                } else {
                    vec![defaults.interface]
                },
                rules: true,
                xtables_wait: defaults.xtables_wait,
                created_tables: Vec::new(),
            }
        }
    };
    if let Some(r) = &recorded {
        what.rules |= r.rules;
        what.created_tables.clone_from(&r.created_tables);
        if let Some(i) = &r.interface {
            if !what.interfaces.contains(i) {
                what.interfaces.push(i.clone());
            }
        }
    }
    once(node_limit(what.xtables_wait), || node::teardown(&what))?;
    SetupRecord::clear();
    Ok(())
}

/// Run one node operation on a small runtime, within `limit`.
fn once<F: std::future::Future<Output = Result<(), node::NodeError>>>(
    limit: Duration,
    op: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(async { tokio::time::timeout(limit, op()).await })
        .map_err(|_| anyhow::anyhow!("did not finish within {limit:?}"))??;
    Ok(())
}
