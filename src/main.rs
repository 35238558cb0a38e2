//! `localdns`: the command line. Parses arguments, loads the config, builds the runtime
//! and hands over to the library; maps errors to exit codes (64 config, 1 runtime).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use localdns::{config, logging, metrics::Metrics, server::Server, systemd};

/// Node-local DNS cache for Kubernetes nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve DNS (the daemon).
    Run(ConfigArgs),
    /// Validate the config and print the effective merged result.
    CheckConfig(ConfigArgs),
}

#[derive(Args, Default)]
struct ConfigArgs {
    /// Config file; `*.toml` in `conf.d/` beside it are merged in name order.
    /// Without this flag and without any file, an embedded default is used.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Drop-in directory (default: `conf.d` beside the config file).
    #[arg(long, value_name = "DIR")]
    conf_dir: Option<PathBuf>,
}

const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(ConfigArgs::default()));
    let (Command::Run(args) | Command::CheckConfig(args)) = &command;
    let source = config::Source {
        explicit: args.config.is_some(),
        path: args
            .config
            .clone()
            .unwrap_or_else(|| config::DEFAULT_PATH.into()),
        conf_dir: args.conf_dir.clone(),
    };
    let cfg = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("localdns: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match command {
        Command::CheckConfig(_) => {
            print!("{}", config::render(&cfg));
            ExitCode::SUCCESS
        }
        Command::Run(_) => match run(cfg, source) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(cfg: config::Config, source: config::Source) -> anyhow::Result<()> {
    if cfg.sources.is_empty() {
        tracing::info!("no config file found, using the embedded default");
    }
    // Before any thread starts: this reads and unsets LISTEN_FDS.
    let mut kept = systemd::Inherited::receive();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("localdns-rt")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::bind(cfg, Arc::new(Metrics::default()), &mut kept)?;
        kept.release_rest();
        server.run(Some(source), shutdown_signal()).await?;
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
