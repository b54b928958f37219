//! The `warren-worker` command line, as a library function so a custom worker binary (one that
//! registers its own Rust handlers) gets the same flags: `warren_worker::cli::main(|b| b.handler(..))`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_common::env::ProcessEnv;
use warren_common::telemetry::{self, LogFormat};
use warren_common::Config;

use crate::metrics::MetricsAddr;
use crate::runtime::{Worker, WorkerBuilder, WorkerError};

/// Exit code for a bad config or set-up (BSD sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "warren-worker",
    version,
    about = "Run warren steps from RabbitMQ queues."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve steps until SIGTERM/SIGINT, then drain and exit 0.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Config file [default: $WARREN_CONFIG, else ./warren.toml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve only this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// Serve only steps with this name.
    #[arg(long)]
    step: Option<String>,
    /// Time running steps get to finish after a shutdown signal.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Log line format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Serve /metrics, /healthz and /readyz here (HOST:PORT; port 0 picks a free one), or `off`.
    #[arg(long, env = "WARREN_METRICS_ADDR", hide_env_values = true,
          default_value = crate::metrics::DEFAULT_METRICS_ADDR)]
    metrics_addr: MetricsAddr,
}

/// Parses the command line, builds the worker (after `customize` adds handlers) and runs it.
pub fn main(customize: impl FnOnce(WorkerBuilder) -> WorkerBuilder) -> ExitCode {
    let cli = Cli::parse();
    let Command::Run(args) = cli.command;
    telemetry::init(args.log_format, &ProcessEnv);
    let config = match Config::load(args.config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-worker: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let builder = Worker::builder(config)
        .pipeline(args.pipeline)
        .step(args.step)
        .shutdown_grace(args.shutdown_grace);
    let worker = match customize(builder).build() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("warren-worker: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let run = async {
        // Before connecting: a SIGTERM during start-up must drain, not kill.
        let signals = crate::shutdown::Signals::install();
        if let MetricsAddr::On(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                WorkerError::Setup(format!(
                    "cannot serve metrics on {addr}: {e} (pass --metrics-addr HOST:PORT, port 0 for any free one, or `off`)"
                ))
            })?;
            let bound = listener.local_addr().map_or(addr, |a| a);
            tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
            tokio::spawn(crate::metrics::serve(listener, worker.metrics()));
        }
        worker.run(signals.recv()).await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ WorkerError::Setup(_)) => {
            eprintln!("warren-worker: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("warren-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }
}
