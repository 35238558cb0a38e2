//! The command line as data: what `localdns` accepts, parsed by clap. It lives in the
//! library rather than in `main.rs` so that the man page, `localdns(8)`, is rendered from
//! this very definition (`examples/manpage.rs`, run by `packaging/build`) and can never
//! drift from the binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config;

/// `localdns --version`: the package version and the commit it was built from, e.g.
/// `0.1.0 (git 196d1d0abcde)`. Both come from `build.rs` (`LOCALDNS_VERSION` and
/// `LOCALDNS_GIT_COMMIT` override them).
pub const VERSION: &str = concat!(
    env!("LOCALDNS_BUILD_VERSION"),
    " (git ",
    env!("LOCALDNS_BUILD_COMMIT"),
    ")"
);

/// `localdns --help` and the DESCRIPTION of localdns(8).
const LONG_ABOUT: &str = "\
Node-local DNS cache for Kubernetes nodes, run as a host systemd service (localdns.service) \
started before kubelet.

Without a subcommand, localdns runs the daemon. The config is /etc/localdns/config.toml, \
then /etc/localdns/conf.d/*.toml in file-name order, each overriding the one before key by \
key; `localdns check-config` shows the merged result.

Exit status: 0 on success; 64 for a config error (its file, line and key are named); 1 for \
any other error.";

/// Node-local DNS cache for Kubernetes nodes.
#[derive(Parser, Debug)]
#[command(name = "localdns", version = VERSION, about, long_about = LONG_ABOUT)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve DNS (the daemon).
    Run(ConfigArgs),
    /// Validate the config and print the effective merged result.
    CheckConfig(CheckArgs),
    /// Create the interface and addresses and install the rules (idempotent).
    Setup(ConfigArgs),
    /// Remove exactly what `setup` installs (idempotent; needs no valid config).
    Teardown(ConfigArgs),
    /// Keep the host's conf.d in step with a ConfigMap (the localdns-config-sync
    /// DaemonSet): validate, write atomically, remove its files on SIGTERM.
    ConfigSync(ConfigSyncArgs),
    /// The standby relay of localdns-fallback.service: DNS to the link-local listen
    /// addresses that no localdns socket takes is relayed to the cluster upstream.
    Fallback(FallbackArgs),
    /// Ask the running daemon how the node's DNS is (exit 0 healthy and ready, 1 not,
    /// 3 no daemon answers).
    Status(StatusArgs),
    /// Hand the running daemon over to the binary now installed, with no gap in serving:
    /// the new process takes the sockets and the cache, and is ready before the old one
    /// stops reading (the package upgrade path; exit 1 when it did not happen, and the
    /// old process serves on).
    Handover(HandoverArgs),
}

impl Command {
    /// Where this command reads its config from.
    pub fn config_args(&self) -> &ConfigArgs {
        match self {
            Command::Run(args) | Command::Setup(args) | Command::Teardown(args) => args,
            Command::CheckConfig(check) => &check.config,
            Command::ConfigSync(sync) => &sync.config,
            Command::Status(status) => &status.config,
            Command::Fallback(fallback) => &fallback.config,
            Command::Handover(handover) => &handover.config,
        }
    }
}

#[derive(Args, Default, Debug)]
pub struct ConfigArgs {
    /// Config file; `*.toml` in `conf.d/` beside it are merged in name order.
    /// Without this flag and without any file, an embedded default is used.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Drop-in directory (default: `conf.d` beside the config file).
    #[arg(long, value_name = "DIR")]
    pub conf_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn source(&self) -> config::Source {
        config::Source {
            explicit: self.config.is_some(),
            path: self
                .config
                .clone()
                .unwrap_or_else(|| config::DEFAULT_PATH.into()),
            conf_dir: self.conf_dir.clone(),
        }
    }
}

#[derive(Args, Default, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also fail (exit 64) when the merged config names no cluster upstream, as the
    /// shipped config does until it is filled in. The package's install scripts start
    /// the service only when this passes.
    #[arg(long)]
    pub require_cluster_upstream: bool,
}

/// `localdns config-sync`. `--config` and `--conf-dir` name the host's files as mounted
/// in the pod; the cluster upstream comes from `KUBE_DNS_UPSTREAM_SERVICE_HOST`, the
/// owner written into each file from `POD_UID`.
#[derive(Args, Debug)]
pub struct ConfigSyncArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The ConfigMap volume: each `*.toml` key becomes `conf.d/71-config-sync-KEY`.
    #[arg(long, value_name = "DIR", default_value = "/etc/localdns-config-sync")]
    pub source: PathBuf,
    /// Where the outcome of the last sync is written for `--probe`.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/localdns-config-sync/status"
    )]
    pub status_file: PathBuf,
    /// Sync at least this often, besides on inotify events (e.g. `10s`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// Only read the status file: exit 0 when the last sync succeeded, else print why and
    /// exit 1 (the DaemonSet's readiness probe).
    #[arg(long)]
    pub probe: bool,
}

#[derive(Args, Default, Debug)]
pub struct FallbackArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Remove the relay's nftables table and link, and exit (the unit's ExecStopPost).
    #[arg(long)]
    pub remove: bool,
    /// Print what removing localdns does to pods in link-local mode, and exit (the
    /// package's removal scripts; prints nothing in intercept mode).
    #[arg(long, conflicts_with = "remove")]
    pub removal_notice: bool,
}

#[derive(Args, Default, Debug)]
pub struct HandoverArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The daemon's systemd unit.
    #[arg(long, default_value = "localdns.service")]
    pub unit: String,
}

#[derive(Args, Default, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the report as JSON (the daemon's `/status` plus the address checks).
    #[arg(long)]
    pub json: bool,
    /// The daemon's HTTP endpoint (default: `metrics.address` of the config).
    #[arg(long, value_name = "IP:PORT")]
    pub address: Option<std::net::SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn version_names_the_commit() {
        assert!(
            VERSION.starts_with(env!("LOCALDNS_BUILD_VERSION")) && VERSION.contains(" (git "),
            "{VERSION}"
        );
    }

    #[test]
    fn check_config_takes_the_config_flags_and_the_requirement() {
        let cli = Cli::try_parse_from([
            "localdns",
            "check-config",
            "--require-cluster-upstream",
            "--config",
            "/x/c.toml",
        ])
        .unwrap();
        let Some(Command::CheckConfig(check)) = &cli.command else {
            panic!("{cli:?}")
        };
        assert!(check.require_cluster_upstream);
        let source = cli.command.as_ref().unwrap().config_args().source();
        assert!(source.explicit);
        assert_eq!(source.path, PathBuf::from("/x/c.toml"));
        let sync = Cli::try_parse_from(["localdns", "config-sync", "--interval", "2s"]).unwrap();
        let Some(Command::ConfigSync(args)) = &sync.command else {
            panic!("{sync:?}")
        };
        assert_eq!(args.interval, std::time::Duration::from_secs(2));
        assert!(!args.probe);
        let run = Cli::try_parse_from(["localdns", "run"]).unwrap();
        let source = run.command.unwrap().config_args().source();
        assert!(!source.explicit);
        assert_eq!(source.path, PathBuf::from(config::DEFAULT_PATH));
    }
}
