//! Reload: on SIGHUP, or when the config file, a file in `conf.d/` or the resolv.conf the
//! default upstreams were read from changes,
//! re-read and validate the config and swap it in. A bad config changes nothing: the error
//! (file, line, key, reason) goes to the journal and into `STATUS=`, and the previous
//! config keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::Inotify;
use parking_lot::Mutex;

use super::resolve::Resolver;
use crate::config::{self, Config, Source};
use crate::systemd;
use crate::watch::{self, Events};

/// Files written in quick succession (an editor, a DaemonSet writing several drop-ins)
/// are read as one change after this quiet period.
const SETTLE: Duration = Duration::from_millis(200);

/// While the default upstreams are empty (resolv.conf had none at start), it is re-read
/// this often, in case it appears somewhere inotify could not watch yet.
const RESOLV_POLL: Duration = Duration::from_secs(5);

/// What the status line needs to know about reloads.
#[derive(Default)]
pub struct ReloadState {
    /// The last refused config's error, until a good one is loaded.
    pub error: Mutex<Option<String>>,
    /// The files the running config was read from.
    pub sources: Mutex<Vec<PathBuf>>,
    /// Start-only settings the files change but this process cannot apply
    /// ([`crate::config::start_only_changes`]); empty when the files match what runs.
    pub restart_required: Mutex<Vec<String>>,
}

/// Watch for reload triggers forever; `status` renders the status line after a reload.
pub async fn watch(
    source: Source,
    mut hup: tokio::signal::unix::Signal,
    resolver: Arc<Resolver>,
    mut current: Config,
    state: Arc<ReloadState>,
    status: impl Fn() -> String,
) {
    // What this process started with: start-only settings are compared with it.
    let started = current.clone();
    let conf_dir = config::conf_dir(&source);
    let mut others = Vec::new();
    let from_resolv_conf = current.upstream.servers_from != "config";
    if from_resolv_conf {
        others.push(PathBuf::from(&current.upstream.servers_from));
        // With `resolv_conf = "auto"` at early boot, systemd-resolved's file may appear
        // after localdns started (its directory too, hence the poll below).
        others.push(config::Environment::default().resolved_resolv_conf);
    }
    let watcher = Watcher::new(Interest {
        config: source.path.clone(),
        conf_dir,
        others,
    });
    let mut poll = tokio::time::interval(RESOLV_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let waiting_for_resolvers = from_resolv_conf && current.upstream.servers.is_empty();
        let reason = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = watcher.changed() => "config files changed",
            _ = poll.tick(), if waiting_for_resolvers => POLLED,
        };
        let mut loaded = config::load(&source).map_err(|e| e.to_string());
        // A poll that finds nothing new stays silent: no RELOADING/READY every few seconds.
        if reason == POLLED && loaded.as_ref().map_or(true, |new| same(new, &current)) {
            continue;
        }
        // Start-only changes are checked against the node now, not at the next restart
        // (after the poll's skip: a silent poll binds no test sockets).
        let mut pending = Vec::new();
        if let Ok(new) = &loaded {
            pending = config::start_only_changes(&started, new);
            if !pending.is_empty() {
                if let Err(why) = super::start_only::check(&started, new).await {
                    loaded = Err(format!(
                        "{} cannot work on this node: {why}",
                        pending.join("; ")
                    ));
                }
            }
        }
        systemd::reloading();
        let c = &resolver.metrics.config;
        c.last_reload_time
            .store(crate::metrics::unix_now(), Ordering::Relaxed);
        c.last_reload_ok.store(loaded.is_ok(), Ordering::Relaxed);
        match loaded {
            Ok(new) => {
                *state.error.lock() = None;
                if pending != *state.restart_required.lock() {
                    if pending.is_empty() {
                        tracing::info!(
                            reason,
                            "the config files match the running process again: no restart required"
                        );
                    } else {
                        tracing::warn!(
                            reason,
                            "config reloaded ({reason}): {}",
                            super::start_only::describe(&pending)
                        );
                    }
                }
                c.restart_required
                    .store(!pending.is_empty(), Ordering::Relaxed);
                *state.restart_required.lock() = pending;
                *state.sources.lock() = new.sources.clone();
                c.last_good.store(false, Ordering::Relaxed);
                crate::state::remember_in_state_dir(&new);
                if same(&new, &current) {
                    // An operator who sent SIGHUP wants to see it was done; file events
                    // that change nothing (an editor's temp file) are not worth a line.
                    if reason == "SIGHUP" {
                        tracing::info!(reason, "config reloaded ({reason}), nothing changed");
                    } else {
                        tracing::debug!(reason, "config reloaded, nothing changed");
                    }
                } else {
                    resolver.apply(&new);
                    c.generation.fetch_add(1, Ordering::Relaxed);
                    let files = new
                        .sources
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    let upstreams = new
                        .upstream
                        .servers
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    tracing::info!(
                        reason,
                        files = %files,
                        upstreams = %upstreams,
                        "config reloaded ({reason}) from {files}; default upstreams {upstreams}"
                    );
                    current = new;
                }
            }
            Err(e) => {
                c.reload_failed.fetch_add(1, Ordering::Relaxed);
                // The facts go into the message too: `journalctl -u localdns` and
                // `systemctl status` show only the message, not the fields.
                tracing::error!(reason, error = %e, "config refused ({reason}): {e}; the previous config keeps serving");
                *state.error.lock() = Some(e.to_string());
            }
        }
        systemd::ready(&status());
    }
}

const POLLED: &str = "resolv.conf re-read while it listed no resolvers";

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

/// inotify on the config directory, `conf.d/` (watched again whenever it appears) and,
/// when the default upstreams come from a resolv.conf, that file's directory: a DHCP
/// renewal that changes the node's resolvers is picked up like a config change. Events are
/// read by a small blocking thread that forwards each batch that concerns one of our files.
struct Watcher {
    events: Events,
}

/// The files whose changes trigger a reload: in the config directory, the config file
/// and `conf.d` itself; in `conf.d`, every `*.toml`; elsewhere, the named files.
struct Interest {
    config: PathBuf,
    conf_dir: PathBuf,
    others: Vec<PathBuf>,
}

impl Interest {
    fn matches(&self, dir: &Path, name: &std::ffi::OsStr) -> bool {
        let path = dir.join(name);
        path == self.config
            || path == self.conf_dir
            || (dir == self.conf_dir && Path::new(name).extension().is_some_and(|e| e == "toml"))
            || self.others.contains(&path)
    }
}

impl Watcher {
    fn new(interest: Interest) -> Watcher {
        let Some(inotify) = watch::inotify("reload on SIGHUP only") else {
            return Watcher {
                events: Events::none(),
            };
        };
        let mut dirs = vec![parent(&interest.config), interest.conf_dir.clone()];
        dirs.extend(interest.others.iter().map(|p| parent(p)));
        dirs.dedup();
        let mut watched = std::collections::HashMap::new();
        fn add(
            inotify: &Inotify,
            watched: &mut std::collections::HashMap<nix::sys::inotify::WatchDescriptor, PathBuf>,
            dir: &Path,
        ) {
            if let Ok(wd) = inotify.add_watch(dir, watch::DIR_CHANGES) {
                watched.insert(wd, dir.to_path_buf());
            }
        }
        for d in &dirs {
            add(&inotify, &mut watched, d);
        }
        let events = Events::spawn("config-watch", inotify, move |inotify, events| {
            let relevant = events.iter().any(|e| {
                let dir = watched.get(&e.wd);
                matches!((dir, &e.name), (Some(d), Some(n)) if interest.matches(d, n))
            });
            // conf.d may have just been created: watch it (a no-op if already).
            add(inotify, &mut watched, &interest.conf_dir);
            relevant
        });
        Watcher { events }
    }

    /// Completes once files changed and then stayed quiet for [`SETTLE`].
    async fn changed(&self) {
        self.events.changed(SETTLE).await
    }
}
