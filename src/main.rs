//! The `pgpilot` command: run the proxy, check a config, or run the local demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgpilot::config::Config;

#[derive(Parser)]
#[command(
    name = "pgpilot",
    version,
    about = "PostgreSQL high-availability proxy"
)]
struct Cli {
    /// Config file (same as `pgpilot run --config FILE`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Run,
    /// Validate a config file and print the effective configuration.
    Check,
    /// Start a local three-node PostgreSQL cluster with the proxy in front.
    Demo {
        /// Port for the proxy.
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, String> {
    let path = path.ok_or("missing --config FILE")?;
    Config::load(&path).map_err(|e| e.to_string())
}

fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Check => load(cli.config).map(|c| print!("{}", c.to_masked_toml())),
        Cmd::Run => load(cli.config.clone()).and_then(|config| {
            runtime(config.proxy.worker_threads)?
                .block_on(pgpilot::app::run(
                    config,
                    cli.config,
                    pgpilot::app::shutdown_signal(),
                ))
                .map_err(|e| e.to_string())
        }),
        Cmd::Demo { port } => runtime(0).and_then(|rt| {
            rt.block_on(pgpilot::demo::run(port))
                .map_err(|e| e.to_string())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgpilot: {e}");
            ExitCode::FAILURE
        }
    }
}
