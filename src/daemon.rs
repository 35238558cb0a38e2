//! The daemon's life cycle, in order: take the sockets systemd kept, build the runtime,
//! set up the node (link, addresses, rules), bind, serve with drift repair until SIGTERM
//! or SIGINT, then stop cleanly. `localdns run` is this function.

use std::sync::Arc;

use crate::config::{Config, Source};
use crate::metrics::Metrics;
use crate::server::Server;
use crate::{node, systemd};

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
        let setup = node::setup(&cfg)
            .await
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
