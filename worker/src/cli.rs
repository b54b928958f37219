//! The `warren-worker` command line, as a library function so a custom worker binary (one that
//! registers its own Rust handlers) gets the same flags: `warren_worker::cli::main(|b| b.handler(..))`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_common::env::ProcessEnv;
use warren_common::telemetry::{self, LogFormat};
use warren_common::Config;

use crate::metrics::MetricsAddr;
use crate::supervisor;
use crate::{Worker, WorkerBuilder, WorkerError};

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
    /// Run pools of workers (this same executable), sized to their queues' backlog.
    Supervise(SuperviseArgs),
}

#[derive(Debug, clap::Args)]
struct SuperviseArgs {
    /// Config file [default: $WARREN_CONFIG, else ./warren.toml]; passed on to the workers.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A pool for this pipeline (repeatable) [default: one per pipeline of the config].
    #[arg(long)]
    pipeline: Vec<String>,
    /// One pool per step of this name (repeatable) instead of one per pipeline.
    #[arg(long)]
    step: Vec<String>,
    /// Fewest workers per pool (0 scales an idle pool to zero).
    #[arg(long)]
    min: u32,
    /// Most workers per pool.
    #[arg(long)]
    max: u32,
    /// Ready messages per worker: a pool wants ceil(backlog / this) workers, within min..max.
    #[arg(long)]
    target_backlog: u64,
    /// How often to read the queues and decide.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long the wanted count must stay lower before workers are drained.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    scale_down_after: Duration,
    /// Backlog at which an idle pool (min 0) starts a worker; below it, it wants none.
    #[arg(long, default_value_t = 1)]
    activation: u64,
    /// Serve the supervisor's /metrics, /healthz and /readyz here (HOST:PORT), or `off`.
    #[arg(long, default_value = crate::supervisor::DEFAULT_METRICS_ADDR)]
    metrics_addr: MetricsAddr,
    /// Worker in slot N serves its metrics on 127.0.0.1:(this + N); 0 for any free port; `off`.
    #[arg(long, default_value = "9480")]
    worker_metrics_base: crate::supervisor::WorkerMetricsBase,
    /// The workers' --shutdown-grace; a draining worker is killed 10s after it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Log line format (supervisor and workers): text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
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
    match Cli::parse().command {
        Command::Run(args) => run(args, customize),
        Command::Supervise(args) => supervise(args),
    }
}

/// What both commands do first: set up logging, then load the config (a bad one is a usage
/// error, exit 64, with the file, line and key in the message).
fn start(log_format: LogFormat, config: Option<&Path>) -> Result<Config, ExitCode> {
    telemetry::init(log_format, &ProcessEnv);
    Config::load(config, &ProcessEnv).map_err(|e| {
        eprintln!("warren-worker: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn run(args: RunArgs, customize: impl FnOnce(WorkerBuilder) -> WorkerBuilder) -> ExitCode {
    let config = match start(args.log_format, args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
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
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|cause| WorkerError::MetricsAddr { addr, cause })?;
            let bound = listener.local_addr().map_or(addr, |a| a);
            tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
            tokio::spawn(crate::metrics::serve(listener, worker.metrics()));
        }
        // Started by a supervisor: also drain when it dies, so no worker outlives it.
        let supervisor = std::env::var(crate::shutdown::ENV_SUPERVISOR_PID)
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok());
        worker
            .run(async move {
                match supervisor {
                    Some(pid) => tokio::select! {
                        _ = signals.recv() => {}
                        _ = crate::shutdown::parent_gone(pid) => {}
                    },
                    None => signals.recv().await,
                }
            })
            .await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_setup() => {
            eprintln!("warren-worker: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("warren-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn supervise(args: SuperviseArgs) -> ExitCode {
    let config = match start(args.log_format, args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("warren-worker: cannot find this executable to start workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = supervisor::Options {
        config_path: args.config,
        pipelines: args.pipeline,
        steps: args.step,
        policy: supervisor::Policy {
            min: args.min,
            max: args.max,
            target_backlog: args.target_backlog,
            activation: args.activation,
            scale_down_after: args.scale_down_after,
        },
        interval: args.interval,
        worker_metrics: args.worker_metrics_base,
        shutdown_grace: args.shutdown_grace,
        log_format: args.log_format,
        exe,
    };
    if let Err(e) = supervisor::check(&config, &options) {
        eprintln!("warren-worker: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        let signals = supervisor::Signals::install();
        let metrics = Arc::new(supervisor::SupervisorMetrics::new());
        if let MetricsAddr::On(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                supervisor::SupervisorError::Setup(format!(
                    "cannot serve metrics on {addr}: {e} (pass --metrics-addr HOST:PORT, port 0 for any free one, or `off`)"
                ))
            })?;
            let bound = listener.local_addr().map_or(addr, |a| a);
            tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
            tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
        }
        supervisor::run(config, options, metrics, signals).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-worker: {e}");
            ExitCode::from(EXIT_USAGE)
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
