//! The `warren-worker` command line, as a library function so a custom worker binary (one that
//! registers its own Rust handlers) gets the same flags: `warren_worker::cli::main(|b| b.handler(..))`.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_common::env::{ProcessEnv, ENV_WARREN_METRICS_ADDR};
use warren_common::telemetry::{self, LogFormat};
use warren_common::Config;

use crate::metrics::{serve_metrics, MetricsAddr, SUPERVISOR_DEFAULT_ADDR, WORKER_DEFAULT_ADDR};
use crate::shutdown::{self, Signals};
use crate::supervisor::{self, WorkerMetricsBase};
use crate::{Worker, WorkerBuilder};

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
    #[arg(long, default_value = SUPERVISOR_DEFAULT_ADDR)]
    metrics_addr: MetricsAddr,
    /// Worker in slot N serves its metrics on 127.0.0.1:(this + N); 0 for any free port; `off`.
    #[arg(long, default_value = "9480")]
    worker_metrics_base: WorkerMetricsBase,
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
    #[arg(long, env = ENV_WARREN_METRICS_ADDR, hide_env_values = true,
          default_value = WORKER_DEFAULT_ADDR)]
    metrics_addr: MetricsAddr,
    /// Take no part in firing the config's `[[schedules]]` (by default every worker does, and
    /// one at a time fires).
    #[arg(long)]
    no_schedules: bool,
}

/// Parses the command line, builds the worker (after `customize` adds handlers) and runs it.
pub fn main(customize: impl FnOnce(WorkerBuilder) -> WorkerBuilder) -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(args, customize),
        Command::Supervise(args) => supervise(args),
    }
}

/// Prints `error` as the command's last word and returns `code`.
fn fail(error: impl Display, code: ExitCode) -> ExitCode {
    eprintln!("warren-worker: {error}");
    code
}

/// A bad config, bad flags, or a set-up that cannot work.
fn usage(error: impl Display) -> ExitCode {
    fail(error, ExitCode::from(warren_common::exit::USAGE))
}

/// What both commands do first: set up logging, then load the config (a bad one is a usage
/// error, exit 64, with the file, line and key in the message).
fn start(log_format: LogFormat, config: Option<&Path>) -> Result<Config, ExitCode> {
    telemetry::init(log_format, &ProcessEnv);
    Config::load(config, &ProcessEnv).map_err(usage)
}

fn run(args: RunArgs, customize: impl FnOnce(WorkerBuilder) -> WorkerBuilder) -> ExitCode {
    let config = match start(args.log_format, args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let schedules = (!args.no_schedules).then(|| config.clone());
    let builder = Worker::builder(config)
        .pipeline(args.pipeline)
        .step(args.step)
        .shutdown_grace(args.shutdown_grace);
    let worker = match customize(builder).build() {
        Ok(w) => w,
        Err(e) => return usage(e),
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        // Before connecting: a SIGTERM during start-up must drain, not kill.
        let signals = Signals::install();
        if let Err(e) = serve_metrics(args.metrics_addr, worker.metrics().exposition()).await {
            return usage(e);
        }
        let supervisor = shutdown::supervisor_pid(&ProcessEnv);
        let scheduler = schedules.and_then(crate::schedules::take_part);
        let outcome = worker.run(shutdown::requested(signals, supervisor)).await;
        if let Some(scheduler) = scheduler {
            scheduler.abort();
        }
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.is_setup() => usage(e),
            Err(e) => fail(e, ExitCode::FAILURE),
        }
    })
}

fn supervise(args: SuperviseArgs) -> ExitCode {
    let config = match start(args.log_format, args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            return fail(
                format_args!("cannot find this executable to start workers: {e}"),
                ExitCode::FAILURE,
            )
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
        metrics_addr: args.metrics_addr,
        worker_metrics: args.worker_metrics_base,
        shutdown_grace: args.shutdown_grace,
        log_format: args.log_format,
        exe,
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        match supervisor::run(config, options, Signals::install()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => usage(e),
        }
    })
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
