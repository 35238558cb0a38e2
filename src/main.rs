//! `localdns`: the command line. Parses arguments ([`localdns::cli`]), loads the config,
//! builds the runtime and hands over to the library; maps errors to exit codes (64 config,
//! 1 runtime).

use std::process::ExitCode;

use clap::Parser;
use localdns::cli::{Cli, Command, ConfigArgs};
use localdns::{config, daemon, logging};

const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(ConfigArgs::default()));
    let source = command.config_args().source();
    let cfg = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("localdns: config error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match command {
        Command::CheckConfig(check) => {
            // The package's postinst starts the service only when this passes.
            if check.require_cluster_upstream && cfg.cluster.upstream.is_empty() {
                eprintln!(
                    "localdns: {} names no cluster upstream ([cluster] upstream is empty): \
                     fill it in, then systemctl start localdns",
                    source.path.display()
                );
                return ExitCode::from(EX_CONFIG);
            }
            print!("{}", config::render(&cfg));
            ExitCode::SUCCESS
        }
        Command::Run(_) => exit(daemon::run(cfg, source)),
        Command::Setup(_) => exit(daemon::setup(&cfg)),
        Command::Teardown(_) => exit(daemon::teardown(&cfg)),
    }
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
