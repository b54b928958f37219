//! `warren`: the producer-side CLI. Thin: parse, load config, call the SDK, print.

mod bench;
mod console;
mod dlq;
mod output;
mod queues;
mod results;
mod schedules;
mod status;
mod submit;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_common::env::ProcessEnv;
use warren_common::telemetry::{self, LogFormat};
use warren_common::Config;

/// Exit code for a bad config or usage.
pub(crate) const EXIT_USAGE: u8 = warren_common::exit::USAGE;
/// Exit code when `--wait` saw the job fail.
pub(crate) const EXIT_JOB_FAILED: u8 = 3;
/// Exit code when `--wait` gave up.
pub(crate) const EXIT_TIMEOUT: u8 = 4;
/// Exit code when `dlq show` or `dlq replay` found no matching dead letter, or `status` no
/// such job.
pub(crate) const EXIT_NOT_FOUND: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Submit jobs to a warren cluster, manage its topology and its dead-letter queue."
)]
struct Cli {
    /// Config file [default: $WARREN_CONFIG, else ./warren.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Declare or delete the namespace's exchanges and queues.
    Topology(topology::TopologyArgs),
    /// Submit one job (or many with --bulk), optionally waiting for the result.
    Submit(submit::SubmitArgs),
    /// Wait for the result of a job submitted earlier.
    Wait(submit::WaitArgs),
    /// Inspect, replay and purge the dead-letter queue.
    Dlq(dlq::DlqArgs),
    /// Show the ready messages of every step queue, with totals per step.
    Queues(queues::QueuesArgs),
    /// Show the results of a fan-out's parts.
    Results(results::ResultsArgs),
    /// Where a job is and what happened to it, from the job history.
    Status(status::StatusArgs),
    /// List recent jobs from the job history, newest first.
    Jobs(status::JobsArgs),
    /// Show each schedule's next and last fire; trigger, pause, resume or backfill one.
    Schedules(schedules::SchedulesArgs),
    /// Serve the web console (jobs, tenants, failures, schedules) on 127.0.0.1:9400.
    Console(console::ConsoleArgs),
    /// Measure warren against a raw lapin program on this broker, in a throw-away namespace.
    Bench(bench::BenchArgs),
}

/// An error already explained to the user; carries the exit code.
#[derive(Debug)]
pub(crate) struct Exit(pub u8, pub String);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Exit {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench runs without a config file too (default URL), and sets up its own runtimes.
    if let Command::Bench(args) = &cli.command {
        return bench::main(args.clone(), cli.config.clone(), cli.json);
    }
    telemetry::init(LogFormat::Text, &ProcessEnv);
    let config = match Config::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Topology(args) => topology::run(args, &config, cli.json).await,
            Command::Submit(args) => submit::run(args, config, cli.json).await,
            Command::Wait(args) => submit::wait(args, config, cli.json).await,
            Command::Dlq(args) => dlq::run(args, config, cli.json).await,
            Command::Queues(args) => queues::run(args, &config, cli.json).await,
            Command::Results(args) => results::run(args, config, cli.json).await,
            Command::Schedules(args) => schedules::run(args, config, cli.json).await,
            Command::Status(args) => status::status(args, config, cli.json).await,
            Command::Jobs(args) => status::jobs(args, config, cli.json).await,
            Command::Console(args) => console::run(args, config).await,
            Command::Bench(_) => unreachable!("handled before the config is loaded"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Exit>().map_or(1, |exit| exit.0);
            eprintln!("warren: {e:#}");
            ExitCode::from(code)
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
