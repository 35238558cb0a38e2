//! Reload: on SIGHUP, or when a file under the config directory or `conf.d/` changes,
//! re-read and validate the config and swap it in. A bad config changes nothing: the error
//! (file, line, key, reason) goes to the journal and into `STATUS=`, and the previous
//! config keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use parking_lot::Mutex;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::resolve::Resolver;
use crate::config::{self, Config, Source};
use crate::systemd;

/// Files written in quick succession (an editor, a DaemonSet writing several drop-ins)
/// are read as one change after this quiet period.
const SETTLE: Duration = Duration::from_millis(200);

/// What the status line needs to know about reloads.
#[derive(Default)]
pub struct ReloadState {
    /// The last refused config's error, until a good one is loaded.
    pub error: Mutex<Option<String>>,
}

/// Watch for reload triggers forever; `status` renders the status line after a reload.
pub async fn watch(
    source: Source,
    resolver: Arc<Resolver>,
    mut current: Config,
    state: Arc<ReloadState>,
    status: impl Fn() -> String,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot catch SIGHUP: reload only on file changes");
        return;
    };
    let conf_dir = source
        .conf_dir
        .clone()
        .unwrap_or_else(|| parent(&source.path).join("conf.d"));
    let watcher = Watcher::new(parent(&source.path), conf_dir);
    loop {
        let reason = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = watcher.changed() => "config files changed",
        };
        systemd::reloading();
        match config::load(&source) {
            Ok(new) => {
                *state.error.lock() = None;
                if same(&new, &current) {
                    tracing::info!(reason, "config reloaded, nothing changed");
                } else {
                    if new.listen != current.listen || new.network != current.network {
                        tracing::warn!(reason, "listen and network changes take effect at the next restart (`systemctl restart localdns` keeps the sockets)");
                    }
                    resolver.apply(&new);
                    tracing::info!(reason, files = %new.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","), "config reloaded");
                    current = new;
                }
            }
            Err(e) => {
                tracing::error!(reason, error = %e, "config refused; the previous config keeps serving");
                *state.error.lock() = Some(e.to_string());
            }
        }
        systemd::ready(&status());
    }
}

fn same(a: &Config, b: &Config) -> bool {
    Config {
        sources: Vec::new(),
        ..a.clone()
    } == Config {
        sources: Vec::new(),
        ..b.clone()
    }
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// inotify on the config directory and `conf.d/` (watched again whenever it appears),
/// read by a small blocking thread that forwards each batch of events.
struct Watcher {
    events: Option<tokio::sync::Mutex<mpsc::Receiver<()>>>,
}

const EVENTS: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE);

impl Watcher {
    fn new(dir: PathBuf, conf_dir: PathBuf) -> Watcher {
        let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "no inotify: reload on SIGHUP only");
                return Watcher { events: None };
            }
        };
        let _ = inotify.add_watch(&dir, EVENTS);
        let _ = inotify.add_watch(&conf_dir, EVENTS);
        let (tx, rx) = mpsc::channel(1);
        let spawned = std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || {
                while inotify.read_events().is_ok() {
                    let _ = inotify.add_watch(&conf_dir, EVENTS);
                    if tx.try_send(()).is_err() && tx.is_closed() {
                        return;
                    }
                }
            });
        Watcher {
            events: spawned.ok().map(|_| tokio::sync::Mutex::new(rx)),
        }
    }

    /// Completes once files changed and then stayed quiet for [`SETTLE`].
    async fn changed(&self) {
        let Some(events) = &self.events else {
            return std::future::pending().await;
        };
        let mut events = events.lock().await;
        if events.recv().await.is_none() {
            return std::future::pending().await;
        }
        // Let the writer finish, then swallow what it wrote meanwhile.
        tokio::time::sleep(SETTLE).await;
        while events.try_recv().is_ok() {}
    }
}
