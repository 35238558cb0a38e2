//! The daemon's life cycle, in order: take the sockets systemd kept, build the runtime,
//! set up the node (link, addresses, rules), bind, serve with drift repair until SIGTERM
//! or SIGINT, then stop cleanly. `localdns run` is this function.

use std::sync::Arc;

use crate::config::{Config, Source};
use crate::metrics::Metrics;
use crate::server::Server;
use crate::{node, systemd};

/// Node setup waits on iptables (each call bounded by `xtables_wait`, retried) and netlink;
/// whatever goes wrong, a start fails within this time (60 s with the default 5 s wait,
/// under systemd's 90 s start timeout) and is restarted, instead of holding up the boot.
pub fn setup_limit(cfg: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(30) + cfg.network.xtables_wait * 6
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(cfg: Config, source: Source) -> anyhow::Result<()> {
    // Before any thread starts: this reads and unsets LISTEN_FDS.
    let mut kept = systemd::Inherited::receive();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("localdns-rt")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The link, addresses and rules come first: the listen addresses must exist to be
        // bound, and READY means the node's DNS works.
        let limit = setup_limit(&cfg);
        let setup = tokio::time::timeout(limit, node::setup(&cfg))
            .await
            .map_err(|_| anyhow::anyhow!("node setup did not finish within {limit:?}"))?
            .map_err(|e| anyhow::anyhow!("node setup failed: {e}"))?;
        let metrics = Arc::new(Metrics::default());
        let repair = tokio::spawn(node::watch(cfg.clone(), setup, Arc::clone(&metrics)));
        let server = Server::bind(cfg, metrics, &mut kept)?;
        kept.release_rest();
        let served = server.run(Some(source), shutdown_signal()).await;
        repair.abort();
        served?;
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// `localdns setup`: the node setup alone, bounded like the daemon's.
pub fn setup(cfg: &Config) -> anyhow::Result<()> {
    once(cfg, || async { node::setup(cfg).await.map(drop) })
}

/// `localdns teardown`: remove exactly what setup installs.
pub fn teardown(cfg: &Config) -> anyhow::Result<()> {
    once(cfg, || node::teardown(cfg))
}

/// Run one node operation on a small runtime, within [`setup_limit`].
fn once<F: std::future::Future<Output = Result<(), node::NodeError>>>(
    cfg: &Config,
    op: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limit = setup_limit(cfg);
    runtime
        .block_on(async { tokio::time::timeout(limit, op()).await })
        .map_err(|_| anyhow::anyhow!("did not finish within {limit:?}"))??;
    Ok(())
}
