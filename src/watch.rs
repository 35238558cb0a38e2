//! Waking async code on inotify events: a small blocking thread reads the events and
//! passes on each batch a filter keeps; [`Events::changed`] completes once a burst of them
//! has settled. Used by the daemon's reload ([`crate::server::reload`]) and by
//! `localdns config-sync` ([`crate::config_sync`]).

use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::sync::{mpsc, Mutex};

/// What changes a directory's files: a file written and closed, renamed in or out,
/// created or deleted.
pub const DIR_CHANGES: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE);

/// A new inotify instance; `None`, with a warning saying what happens `instead`, when the
/// kernel or its limits refuse one.
pub fn inotify(instead: &str) -> Option<Inotify> {
    Inotify::init(InitFlags::IN_CLOEXEC)
        .inspect_err(|e| tracing::warn!(error = %e, "no inotify ({e}): {instead}"))
        .ok()
}

/// Batches of relevant events; none at all when inotify could not be used.
pub struct Events {
    rx: Option<Mutex<mpsc::Receiver<()>>>,
}

impl Events {
    /// Never fires (no inotify).
    pub fn none() -> Events {
        Events { rx: None }
    }

    /// Reads `inotify` on a thread named `name`; `relevant` sees each batch (and may add
    /// watches) and says whether it should wake [`Events::changed`].
    pub fn spawn(
        name: &str,
        inotify: Inotify,
        mut relevant: impl FnMut(&Inotify, &[InotifyEvent]) -> bool + Send + 'static,
    ) -> Events {
        let (tx, rx) = mpsc::channel(1);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(events) = inotify.read_events() {
                    if relevant(&inotify, &events) && tx.try_send(()).is_err() && tx.is_closed() {
                        return;
                    }
                }
            });
        Events {
            rx: spawned.ok().map(|_| Mutex::new(rx)),
        }
    }

    /// Completes once files changed and then stayed quiet for `settle`.
    pub async fn changed(&self, settle: Duration) {
        let Some(rx) = &self.rx else {
            return std::future::pending().await;
        };
        let mut rx = rx.lock().await;
        if rx.recv().await.is_none() {
            return std::future::pending().await;
        }
        // Let the writer finish, then swallow what it wrote meanwhile.
        tokio::time::sleep(settle).await;
        while rx.try_recv().is_ok() {}
    }
}
