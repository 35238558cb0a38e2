//! `localdns config-sync`: runs in the optional `localdns-config-sync` DaemonSet and keeps
//! the host's `conf.d/` in step with a ConfigMap, so that one edit changes the config of
//! every node. The host daemon picks the files up with its own reload (inotify on
//! `conf.d/`, [`crate::server::reload`]); config-sync never talks to it.
//!
//! Each sync reads the ConfigMap volume ([`source`]) and `KUBE_DNS_UPSTREAM_SERVICE_HOST`,
//! plans the files ([`plan`]), validates the config the host daemon would then load with
//! the daemon's own loader ([`config::load_documents`], over the host's main file and
//! drop-ins as they are), and only then writes, each file atomically and only when its
//! content changed ([`state::write_atomic`]). A refused config writes nothing: the reason
//! (file, line, key) is logged and put in the status file the readiness probe reads
//! ([`status`]). On SIGTERM (the pod is deleted: the DaemonSet was removed, or replaced
//! without a newer pod having taken over) it removes the files it owns, so the node falls
//! back to its own config. A node is never left without a cluster upstream: a result
//! without one is refused, and at stop the upstream file stays when the node has none.
//!
//! It syncs when the ConfigMap volume or `conf.d/` changes (inotify: kubelet's `..data`
//! swap is a rename in the volume's directory) and every `--interval` besides, which
//! also catches what inotify cannot see (a file edited through another mount) and repairs
//! a removed file. A sync whose inputs are those of the last one does nothing at all.
//!
//! A ConfigMap may hold a rollout stage ([`stage`]): a node outside it keeps the version
//! its `conf.d` has and says so in the status file (state `waiting`, still ready).

pub mod plan;
mod source;
pub mod stage;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Source};
use crate::state;
use crate::watch::{self, Events};
use plan::{Owner, Plan, Wanted};
use status::{State, Status};

/// What `localdns config-sync` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The ConfigMap volume.
    pub source: PathBuf,
    /// The host's config as mounted in the pod (main file and `conf.d/`).
    pub host: Source,
    /// Where the readiness probe reads the outcome of the last sync.
    pub status_file: PathBuf,
    /// Sync at least this often.
    pub interval: Duration,
    /// The value of `KUBE_DNS_UPSTREAM_SERVICE_HOST`.
    pub upstream: Option<String>,
    /// The node's name (`NODE_NAME`), which places it in or out of a rollout stage.
    pub node: Option<String>,
    /// This writer, named in the header of every file it writes.
    pub owner: Owner,
}

impl Options {
    /// The owner of a process started now: the pod's UID (`POD_UID`, from the downward
    /// API) or, outside a pod, the process id.
    pub fn owner_now() -> Owner {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let id = std::env::var("POD_UID")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| format!("pid-{}", std::process::id()));
        Owner::new(&id, since)
    }
}

/// `localdns config-sync --probe`: `Ok` with the message when the last sync left the node
/// as the ConfigMap says.
pub fn probe(status_file: &Path) -> Result<String, String> {
    Status::probe(std::fs::read_to_string(status_file).ok().as_deref())
}

/// Sync until SIGTERM or SIGINT, then remove the files this process owns.
pub fn run(opts: Options) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(serve(opts))
}

async fn serve(opts: Options) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let conf_dir = config::conf_dir(&opts.host);
    let watch = Watch::new(&[&opts.source, &conf_dir]);
    tracing::info!(
        owner = %opts.owner,
        source = %opts.source.display(),
        conf_dir = %conf_dir.display(),
        "config-sync started"
    );
    let mut syncer = Syncer::new(opts);
    syncer.publish(State::Starting, "no sync yet".into());
    loop {
        syncer.sync();
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = watch.changed() => {}
            _ = tokio::time::sleep(syncer.opts.interval) => {}
        }
    }
    syncer.stop()
}

/// The sync loop's state between rounds.
struct Syncer {
    opts: Options,
    conf_dir: PathBuf,
    syncs: u64,
    /// The inputs of the last sync (ConfigMap keys, host documents): the same inputs give
    /// the same outcome, so a sync that finds them again does nothing.
    last_inputs: Option<Inputs>,
    last: Option<(State, String)>,
}

type Inputs = (Vec<(String, String)>, Vec<(PathBuf, String)>);

impl Syncer {
    fn new(opts: Options) -> Syncer {
        Syncer {
            conf_dir: config::conf_dir(&opts.host),
            opts,
            syncs: 0,
            last_inputs: None,
            last: None,
        }
    }

    fn sync(&mut self) {
        self.syncs += 1;
        let (state, message) = match self.try_sync() {
            Ok(outcome) | Err(outcome) => outcome,
        };
        self.publish(state, message);
    }

    /// Reads the inputs; the same inputs as the last time give the same outcome, and
    /// nothing is done again (no write, no log line). A read or write error is tried again
    /// at the next sync.
    fn try_sync(&mut self) -> Result<(State, String), (State, String)> {
        let error = |e: String| (State::Error, e);
        let keys = source::read_configmap(&self.opts.source)
            .map_err(|e| error(format!("{}: {e}", self.opts.source.display())))?;
        let host = config::read_documents(&self.opts.host).map_err(|e| error(e.to_string()))?;
        let inputs = (keys, host);
        if self.last_inputs.as_ref() == Some(&inputs) {
            if let Some((state, message)) = self.last.clone() {
                return if state.ready() {
                    Ok((state, message))
                } else {
                    Err((state, message))
                };
            }
        }
        let outcome = self.apply_inputs(&inputs);
        let retry = matches!(&outcome, Err((State::Error, _)));
        self.last_inputs = (!retry).then_some(inputs);
        outcome
    }

    fn apply_inputs(&self, (keys, host): &Inputs) -> Result<(State, String), (State, String)> {
        let error = |e: String| (State::Error, e);
        let refused = |e: String| (State::Refused, e);
        let upstream = plan::upstream_address(self.opts.upstream.as_deref()).map_err(refused)?;
        let existing = self.existing(host);
        let stage = stage::from_keys(keys, &self.opts.source).map_err(refused)?;
        let (wanted, ignored) = match stage::decide(stage.as_ref(), self.opts.node.as_deref()) {
            stage::Decision::Wait(why) => {
                let kept = plan::kept(&existing, &self.conf_dir);
                return self.keep(host, &existing, &kept).map(|names| {
                    (
                        State::Waiting,
                        format!("waiting for the stage: {why}; conf.d keeps {names}"),
                    )
                });
            }
            stage::Decision::Take(why) => {
                if let Some(why) = why {
                    tracing::debug!("in the rollout stage: {why}");
                }
                plan::wanted(keys, &self.opts.source, upstream)
            }
        };
        if !ignored.is_empty() {
            tracing::warn!(keys = ?ignored, "ConfigMap keys not ending in .toml are not synced");
        }
        if upstream.is_none() {
            tracing::warn!(
                "{} is not set (no kube-dns-upstream Service when the pod started): cluster.upstream is left to the node's config",
                plan::UPSTREAM_ENV
            );
        }
        let outcome = match plan::plan(&existing, &wanted, &self.opts.owner).map_err(refused)? {
            Plan::StandBy { owner } => {
                format!("standing by: a newer config-sync, {owner}, owns the files")
            }
            Plan::Apply { write, remove } => {
                self.validate(host, &wanted).map_err(refused)?;
                self.apply(&write, &remove).map_err(error)?;
                let names: Vec<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
                let mut message = format!("in sync: {}", names.join(", "));
                if names.is_empty() {
                    message = "in sync: nothing to write".into();
                }
                if !write.is_empty() || !remove.is_empty() {
                    let written: Vec<&str> = write.iter().map(|(n, _)| n.as_str()).collect();
                    tracing::info!(written = ?written, removed = ?remove, "conf.d updated");
                }
                message
            }
        };
        Ok((State::Ready, outcome))
    }

    /// Outside the stage: the files config-sync has in `conf.d` stay as they are (taken
    /// over by this pod when it is the newest, so that an older pod that stops removes
    /// none of them); what they hold, for the status.
    fn keep(
        &self,
        host: &[(PathBuf, String)],
        existing: &[(String, String)],
        kept: &[Wanted],
    ) -> Result<String, (State, String)> {
        let names: Vec<&str> = kept.iter().map(|w| w.name.as_str()).collect();
        let names = if names.is_empty() {
            "nothing of config-sync's".to_string()
        } else {
            names.join(", ")
        };
        match plan::plan(existing, kept, &self.opts.owner).map_err(|e| (State::Refused, e))? {
            Plan::StandBy { .. } => {}
            Plan::Apply { write, remove } => {
                self.validate(host, kept).map_err(|e| (State::Refused, e))?;
                self.apply(&write, &remove).map_err(|e| (State::Error, e))?;
            }
        }
        Ok(names)
    }

    /// `(name, text)` of the drop-ins in `conf.d`.
    fn existing(&self, host: &[(PathBuf, String)]) -> Vec<(String, String)> {
        host.iter()
            .filter(|(path, _)| path.parent() == Some(&self.conf_dir))
            .filter_map(|(path, text)| {
                let name = path.file_name()?.to_str()?;
                Some((name.to_owned(), text.clone()))
            })
            .collect()
    }

    /// The daemon's loader over what the host would hold after the plan.
    fn validate(&self, host: &[(PathBuf, String)], wanted: &[Wanted]) -> Result<(), String> {
        let start_only = plan::start_only_sections(wanted);
        if !start_only.is_empty() {
            return Err(format!(
                "the ConfigMap sets settings that apply only when localdns starts ({}): a \
                 rollout would change them on every node at its next restart; set them in the \
                 node's own config (/etc/localdns/config.toml or conf.d/80-*.toml from the \
                 node's provisioning)",
                start_only.join(", ")
            ));
        }
        let docs = plan::documents_after(host, &self.conf_dir, wanted);
        if docs.is_empty() {
            // The daemon then runs on its embedded default: nothing of ours to check.
            return Ok(());
        }
        let config = config::load_documents(&docs, &config::Environment::default())
            .map_err(|e| format!("the node's config with the ConfigMap would be refused: {e}"))?;
        // As the packages require before they start localdns: without a cluster upstream,
        // cluster names would go to the node's resolvers and fail.
        if config.cluster.upstream.is_empty() {
            return Err(format!(
                "the node's config with the ConfigMap names no cluster upstream: create the \
                 kube-dns-upstream Service before the DaemonSet ({}), or set [cluster] \
                 upstream in the ConfigMap",
                plan::UPSTREAM_ENV
            ));
        }
        Ok(())
    }

    /// Whether the node's own config, without config-sync's files, names no cluster
    /// upstream (while it is otherwise valid): then removing ours would send cluster
    /// names to the node's resolvers.
    fn node_lacks_cluster_upstream(&self, host: &[(PathBuf, String)]) -> bool {
        let own = plan::documents_after(host, &self.conf_dir, &[]);
        !own.is_empty()
            && config::load_documents(&own, &config::Environment::default())
                .is_ok_and(|c| c.cluster.upstream.is_empty())
    }

    fn apply(&self, write: &[(String, String)], remove: &[String]) -> Result<(), String> {
        for (name, text) in write {
            let path = self.conf_dir.join(name);
            state::write_atomic(&path, text.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        self.remove(remove)
    }

    fn remove(&self, names: &[String]) -> Result<(), String> {
        for name in names {
            let path = self.conf_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
            }
        }
        if !names.is_empty() {
            // The removals are durable once the directory is synced.
            std::fs::File::open(&self.conf_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("{}: {e}", self.conf_dir.display()))?;
        }
        Ok(())
    }

    /// Log a change of outcome once, and write the status file.
    fn publish(&mut self, state: State, message: String) {
        let changed = self.last.as_ref() != Some(&(state, message.clone()));
        if changed {
            match state {
                State::Ready | State::Waiting | State::Starting | State::Stopped => {
                    tracing::info!("{message}")
                }
                State::Refused => tracing::error!("refused, nothing written: {message}"),
                State::Error => tracing::error!("{message}"),
            }
        }
        let status = Status {
            state,
            message: message.clone(),
            syncs: self.syncs,
        };
        if let Err(e) = state::write_atomic(&self.opts.status_file, status.to_string().as_bytes()) {
            if changed {
                tracing::warn!("cannot write {}: {e}", self.opts.status_file.display());
            }
        }
        self.last = Some((state, message));
    }

    /// Remove the files this process owns: the node falls back to its own config.
    fn stop(mut self) -> anyhow::Result<()> {
        let host = config::read_documents(&self.opts.host).unwrap_or_default();
        let mut mine: Vec<String> = self
            .existing(&host)
            .into_iter()
            .filter(|(name, text)| plan::owner_of(name, text).as_ref() == Some(&self.opts.owner))
            .map(|(name, _)| name)
            .collect();
        // Never leave a node without a cluster upstream: keep that one file, and say so.
        let keep = mine.iter().any(|n| n == plan::UPSTREAM_FILE)
            && self.node_lacks_cluster_upstream(&host);
        mine.retain(|n| !keep || n != plan::UPSTREAM_FILE);
        let removed = self.remove(&mine);
        let mut message = match &removed {
            Ok(()) if mine.is_empty() => "stopped: removed no file".into(),
            Ok(()) => format!(
                "stopped: removed {}; the node is back on its own config",
                mine.join(", ")
            ),
            Err(e) => format!("stopped: {e}"),
        };
        if keep {
            message = format!(
                "{message}; kept {}: without it the node's own config names no cluster \
                 upstream and cluster names would fail; set [cluster] upstream on the node, \
                 then delete that file",
                plan::UPSTREAM_FILE
            );
        }
        self.publish(State::Stopped, message);
        removed.map_err(anyhow::Error::msg)
    }
}

/// inotify on the ConfigMap volume and `conf.d/`; without inotify, only the interval.
struct Watch {
    events: Events,
}

/// kubelet's swap is a burst of creates and renames: let it finish, then sync once.
const SETTLE: Duration = Duration::from_millis(100);

impl Watch {
    fn new(dirs: &[&Path]) -> Watch {
        let Some(inotify) = watch::inotify("syncing every interval only") else {
            return Watch {
                events: Events::none(),
            };
        };
        for dir in dirs {
            if let Err(e) = inotify.add_watch(*dir, watch::DIR_CHANGES) {
                tracing::warn!(error = %e, "cannot watch {}: syncing it every interval only", dir.display());
            }
        }
        Watch {
            events: Events::spawn("config-sync-watch", inotify, |_, _| true),
        }
    }

    async fn changed(&self) {
        self.events.changed(SETTLE).await
    }
}
