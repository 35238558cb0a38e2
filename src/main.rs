//! `localdns`: the command line. Parses arguments, loads the config, builds the runtime
//! and hands over to the library; maps errors to exit codes (64 config, 1 runtime).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use localdns::{config, daemon, logging};

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
    /// Create the interface and addresses and install the rules (idempotent).
    Setup(ConfigArgs),
    /// Remove exactly what `setup` installs (idempotent; needs no valid config).
    Teardown(ConfigArgs),
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
    let (Command::Run(args)
    | Command::CheckConfig(args)
    | Command::Setup(args)
    | Command::Teardown(args)) = &command;
    let source = config::Source {
        explicit: args.config.is_some(),
        path: args
            .config
            .clone()
            .unwrap_or_else(|| config::DEFAULT_PATH.into()),
        conf_dir: args.conf_dir.clone(),
    };
    match command {
        Command::Teardown(_) => exit(daemon::teardown(&source)),
        Command::CheckConfig(_) => match config::load(&source) {
            Ok(cfg) => {
                print!("{}", config::render(&cfg));
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Command::Run(_) => match daemon::load_for_start(&source) {
            Ok(loaded) => exit(daemon::run(loaded, source)),
            Err(e) => config_error(e),
        },
        Command::Setup(_) => match daemon::load_for_start(&source) {
            Ok(loaded) => exit(daemon::setup(&loaded.config)),
            Err(e) => config_error(e),
        },
    }
}

fn config_error(e: config::ConfigError) -> ExitCode {
    eprintln!("localdns: config error: {e}");
    ExitCode::from(EX_CONFIG)
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
