//! `localdns`: the command line. Parses arguments ([`localdns::cli`]), loads the config,
//! builds the runtime and hands over to the library; maps errors to exit codes (64 config,
//! 1 runtime).

use std::process::ExitCode;

use clap::Parser;
use localdns::cli::{Cli, Command, ConfigArgs, StatusArgs};
use localdns::{config, config_sync, daemon, logging};

const EX_CONFIG: u8 = 64;

/// mimalloc, not glibc malloc: the cache's long-lived entries and a miss's short-lived
/// buffers are allocated on different threads and freed on others, and glibc's per-thread
/// arenas fragmented under that (after 10,000 misses 12.7 MiB of arenas held 4.1 MiB in
/// use, and `malloc_trim` gave back 0.5). mimalloc's per-page free lists keep the resident
/// size near the live heap and it is faster on the miss path (bench/quick.sh miss). Its
/// arenas are not committed up front (.cargo/config.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    localdns::allocator::configure();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        None | Some(Command::Run(_)) | Some(Command::Fallback(_))
    ) {
        // Before anything else: a SIGHUP or SIGTERM during the start waits for its handler.
        localdns::lifecycle::signals::hold();
    }
    logging::init();
    let command = cli.command.unwrap_or(Command::Run(ConfigArgs::default()));
    let source = command.config_args().source();
    match command {
        Command::Teardown(_) => exit(daemon::teardown(&source)),
        Command::CheckConfig(check) => match config::load(&source) {
            // The package's postinst starts the service only when this passes.
            Ok(cfg) if check.require_cluster_upstream && cfg.cluster.upstream.is_empty() => {
                eprintln!(
                    "localdns: {} names no cluster upstream ([cluster] upstream is empty): \
                     fill it in, then systemctl start localdns",
                    source.path.display()
                );
                ExitCode::from(EX_CONFIG)
            }
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
        Command::Status(args) => status(&args, &source),
        Command::Handover(args) => match localdns::handover::request(&args.unit) {
            Ok(pid) => {
                println!("localdns: {} handed over to process {pid}", args.unit);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("localdns: {}: {e:#}", args.unit);
                ExitCode::FAILURE
            }
        },
        Command::Fallback(args) if args.remove => exit(localdns::fallback::remove()),
        Command::Fallback(args) if args.removal_notice => {
            if let Some(notice) = localdns::fallback::removal_notice(&source) {
                println!("{notice}");
            }
            ExitCode::SUCCESS
        }
        Command::Fallback(_) => exit(localdns::fallback::run(&source)),
        Command::Setup(_) => match daemon::setup(&source) {
            Ok(()) => ExitCode::SUCCESS,
            Err(daemon::SetupFailure::Config(e)) => config_error(e),
            Err(e) => exit(Err(e.into())),
        },
        Command::ConfigSync(sync) if sync.probe => match config_sync::probe(&sync.status_file) {
            Ok(message) => {
                println!("{message}");
                ExitCode::SUCCESS
            }
            Err(why) => {
                println!("{why}");
                ExitCode::FAILURE
            }
        },
        Command::ConfigSync(sync) => exit(config_sync::run(config_sync::Options {
            source: sync.source,
            host: source,
            status_file: sync.status_file,
            interval: sync.interval,
            upstream: std::env::var(config_sync::plan::UPSTREAM_ENV).ok(),
            node: std::env::var(config_sync::stage::NODE_ENV).ok(),
            owner: config_sync::Options::owner_now(),
        })),
    }
}

/// `localdns status`: 0 healthy and ready, 1 not (with the reasons), 3 no daemon.
fn status(args: &StatusArgs, source: &config::Source) -> ExitCode {
    let address = match args.address {
        Some(a) => Some(a),
        None => match localdns::state::load_for_status(source) {
            Ok(cfg) => localdns::status::endpoint_of(&cfg.metrics.addresses),
            Err(e) => return config_error(e),
        },
    };
    let result = address
        .ok_or(localdns::status::StatusError::NoEndpoint)
        .and_then(localdns::status::ask);
    let daemon = match result {
        Ok(d) => d,
        Err(e) => {
            eprintln!("localdns: {e}");
            return ExitCode::from(3);
        }
    };
    let probes = daemon
        .listen
        .iter()
        .map(|a| localdns::status::probe(a))
        .collect();
    let s = localdns::status::Status { daemon, probes };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        print!("{}", localdns::status::render(&s));
    }
    if s.problems().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
