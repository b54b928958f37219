//! `warren bench`: runs workload scenarios against the configured broker, each twice: through
//! warren (the producer SDK and real in-process workers) and through a minimal raw-lapin program
//! with the same guarantees, and prints both figures and their ratio. Everything happens in a
//! throw-away namespace (and a second one for the raw side), deleted at the end, on error and on
//! Ctrl-C. `docs/bench.md` describes the scenarios and how to read the table.

mod caps;
mod collider;
mod fanout;
mod many_tenants;
mod raw;
mod report;
mod scale;
mod scenarios;
mod warren_side;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::runtime::{Handle, Runtime};
use warren_broker::{Broker, Lane, StepRoute, Topology};
use warren_common::env::{Env, ProcessEnv, ENV_WARREN_LOG};
use warren_common::telemetry::{self, LogFormat};
use warren_common::{Config, Priority};
use warren_producer::Client;

use crate::output::outln;
use raw::Raw;
use warren_side::Running;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Scenario {
    S1,
    S2,
    S3,
    /// Not in the default set: S3 with the small tenant on the flood's own shard, with hot lanes
    /// off and on (docs/bench.md).
    S3c,
    S4,
    S5,
    S6,
    /// Not in the default set: about two minutes (docs/bench.md).
    S7,
    /// Not in the default set: cluster-wide caps over three worker processes (docs/bench.md).
    S8,
    /// Not in the default set: many small tenants beside floods, with hot lanes off and on; a
    /// few minutes per flood set (docs/bench.md). The "S7"; `s7` is the scale scenario.
    S7t,
    /// A fan-out of `--fanout-parts` parts and its join, against S1's drain (docs/bench.md).
    S9,
}

impl Scenario {
    /// Whether it needs the fairness pipelines (`fairness_toml`).
    fn fairness(self) -> bool {
        matches!(self, Scenario::S3c | Scenario::S7t)
    }
}

/// One flood set of S7t: `tenants` tenants that each submit `jobs` jobs in one `submit_many`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FloodSet {
    tenants: usize,
    jobs: usize,
}

impl std::str::FromStr for FloodSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected TENANTSxJOBS, e.g. 3x20000");
        let (tenants, jobs) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let tenants: usize = tenants.trim().parse().map_err(|_| bad())?;
        let jobs: usize = jobs.trim().parse().map_err(|_| bad())?;
        if tenants == 0 || jobs == 0 {
            return Err(bad());
        }
        Ok(Self { tenants, jobs })
    }
}

/// Job history during the bench: S1 and S2 run once per mode of `both`, with rows comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum HistoryMode {
    On,
    Off,
    Both,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Job history on or off for warren's side, or `both`: S1 and S2 then run with it off and
    /// on, with rows of the on/off ratio [default: the config's default]. The other scenarios
    /// run with it on when it is on or both.
    #[arg(long)]
    history: Option<HistoryMode>,
    /// Scenarios to run, comma-separated (S3c, S7, S7t and S8 only when named).
    #[arg(long, value_delimiter = ',', default_value = "s1,s2,s3,s4,s5,s6,s9")]
    scenarios: Vec<Scenario>,
    /// S1 (and S6's load): one-step no-op jobs.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// S2: jobs through the 3-step no-op pipeline.
    #[arg(long, default_value_t = 5_000)]
    chain_jobs: usize,
    /// S3, S4: the noisy tenant's jobs.
    #[arg(long, default_value_t = 20_000)]
    flood: usize,
    /// S3, S4: the small tenant's jobs.
    #[arg(long, default_value_t = 50)]
    small: usize,
    /// S3, S4: wall time of one step, in ms.
    #[arg(long, default_value_t = 1)]
    work_ms: u64,
    /// S5: jobs submitted one at a time.
    #[arg(long, default_value_t = 200)]
    latency_jobs: usize,
    /// Step concurrency of the bench's workers; also the raw side's prefetch per consumer.
    #[arg(long, default_value_t = 50)]
    concurrency: u16,
    /// Run everything this many times and report per-row medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Pause before each timed throughput phase, for the broker's background work after the
    /// phase before (see docs/bench.md).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Longest wait for any one phase.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    patience: Duration,
    /// S7: how many 3-step pipelines each set declares (the largest also with only `normal`).
    #[arg(long, value_delimiter = ',', default_value = "1,5,20")]
    scale_pipelines: Vec<usize>,
    /// S7: shards of its pipelines (default: the config's default).
    #[arg(long)]
    scale_shards: Option<u16>,
    /// S7: how long the idle CPU of the worker and the broker is measured.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    scale_window: Duration,
    /// S8: jobs in each of its two phases (before and after the kill).
    #[arg(long, default_value_t = 100)]
    cap_jobs: usize,
    /// S8: wall time of one capped step, in ms.
    #[arg(long, default_value_t = 200)]
    cap_step_ms: u64,
    /// S8: one tenant's backlog under `tenant_max_in_flight`.
    #[arg(long, default_value_t = 200)]
    tenant_cap_jobs: usize,
    /// S8: wall time of one step of that backlog, in ms.
    #[arg(long, default_value_t = 100)]
    tenant_cap_step_ms: u64,
    /// S7t: small tenants submitting at a steady rate beside the floods.
    #[arg(long, default_value_t = 400)]
    tenants: usize,
    /// S7t: the flood sets, each run with hot lanes off and on: TENANTSxJOBS, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3x20000,20x1000")]
    fair_floods: Vec<FloodSet>,
    /// S7t: wall time of one step, in ms.
    #[arg(long, default_value_t = 20)]
    fair_work_ms: u64,
    /// S7t: step concurrency of its worker (capacity = this x 1000 / --fair-work-ms jobs/s).
    #[arg(long, default_value_t = 32)]
    fair_concurrency: u16,
    /// S7t: the small tenants' total rate, as a share of that capacity.
    #[arg(long, default_value_t = 0.4)]
    fair_load: f64,
    /// S7t: shards of its pipeline.
    #[arg(long, default_value_t = 8)]
    fair_shards: u16,
    /// S7t: tasks submitting the small tenants' jobs, one `submit` at a time each.
    #[arg(long, default_value_t = 16)]
    fair_submitters: usize,
    /// S7t: how long the small tenants' idle latency is measured before the floods start.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    fair_idle: Duration,
    /// S3c, S7t: hot lanes of the pipelines with hot lanes (default: the config's default).
    #[arg(long)]
    hot_lanes: Option<u16>,
    /// S9: parts of its fan-out.
    #[arg(long, default_value_t = 10_000)]
    fanout_parts: usize,
    /// S9: fan-outs run one after the other; the median is reported.
    #[arg(long, default_value_t = 5)]
    fanout_runs: usize,
    /// Internal: serve the bench's `one` pipeline in namespace NS as a worker process (S6).
    #[arg(long, hide = true, value_name = "NS")]
    serve_worker: Option<String>,
    /// Internal: with `--serve-worker`, serve every pipeline of this file instead (S7).
    #[arg(long, hide = true, value_name = "FILE")]
    serve_config: Option<PathBuf>,
}

/// `WARREN_LOG` when set, else warnings only: info lines would tear the progress display.
struct QuietEnv;

impl BenchArgs {
    fn history(&self) -> HistoryMode {
        self.history
            .unwrap_or(match warren_common::config::HISTORY_ENABLED_BY_DEFAULT {
                true => HistoryMode::On,
                false => HistoryMode::Off,
            })
    }
}

impl Env for QuietEnv {
    fn var(&self, key: &str) -> Option<String> {
        ProcessEnv
            .var(key)
            .or_else(|| (key == ENV_WARREN_LOG).then(|| "warn,lapin=off".to_string()))
    }
}

pub(crate) fn main(args: BenchArgs, config_path: Option<PathBuf>, json: bool) -> ExitCode {
    telemetry::init(LogFormat::Text, &QuietEnv);
    let base = match load_base(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    if let Some(ns) = &args.serve_worker {
        return serve_worker(&base, ns, args.concurrency, args.serve_config.as_deref());
    }
    // Three runtimes, so neither side's message path shares threads with the driver (which
    // submits, reads results and draws progress): warren's workers get two threads, as a
    // `warren-worker` on this 2-core class of machine would, and the raw program the same.
    let side = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    let (driver, workers, raw) = (
        side("bench-driver"),
        side("bench-warren"),
        side("bench-raw"),
    );
    let handles = (workers.handle().clone(), raw.handle().clone());
    let result = driver.block_on(run(args, config_path, base, json, handles));
    workers.shutdown_timeout(Duration::from_secs(2));
    raw.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--config`, `$WARREN_CONFIG` or `./warren.toml` when there is one; else the defaults (and
/// `WARREN_AMQP_URL`). Only `[broker]` matters: the bench brings its own pipelines.
fn load_base(path: Option<&Path>) -> Result<Config, warren_common::config::ConfigError> {
    let have_file = path.is_some()
        || ProcessEnv.var("WARREN_CONFIG").is_some()
        || Path::new(warren_common::config::DEFAULT_CONFIG_PATH).exists();
    if have_file {
        Config::load(path, &ProcessEnv)
    } else {
        Config::parse("", "(defaults)", Path::new("."), &ProcessEnv)
    }
}

/// The bench's pipelines (and the TOML of `more`), on the base config's broker, in namespace
/// `ns`.
fn bench_config(base: &Config, ns: &str, concurrency: u16, more: &str) -> anyhow::Result<Config> {
    let step = |name: &str, handler: &str| {
        format!(
            "[[pipelines.steps]]\nname = \"{name}\"\nhandler = \"{handler}\"\nconcurrency = {concurrency}\nmax_attempts = 1\n"
        )
    };
    let text = format!(
        "[[pipelines]]\nname = \"one\"\nshards = 4\n{}\n[[pipelines]]\nname = \"chain\"\nshards = 4\n{}{}{}\n[[pipelines]]\nname = \"work\"\nshards = 4\n{}",
        step("noop", "noop"),
        step("a", "noop"),
        step("b", "noop"),
        step("c", "noop"),
        step("work", "work"),
    ) + more;
    let mut config = Config::parse(&text, "bench", Path::new("."), &HashMap::new())?;
    config.broker = base.broker.clone();
    config.broker.namespace = ns.to_string();
    // The user's `[fairness]` tuning is what the fairness scenarios measure; `[results]` says
    // whether the workers copy and check their results (on a cluster, by default).
    config.fairness = base.fairness.clone();
    config.results = base.results.clone();
    Ok(config)
}

/// The pipelines of the fairness scenarios, each twice: with the default hot lanes, and as
/// `<name>_off` with `hot_lanes = 0` (plain hash shards, as before hot-tenant isolation).
/// S3c's `collide` is `work` again; S7t's `fair` has its own shards and concurrency. Both have
/// room for every flood in one queue, and `normal` queues only (every queue costs the broker).
fn fairness_toml(args: &BenchArgs) -> String {
    let pipeline = |name: &str, shards: u16, concurrency: u16, off: bool| {
        format!(
            "\n[[pipelines]]\nname = \"{name}{}\"\nshards = {shards}\npriorities = [\"normal\"]\nmax_queue_length = 10000000\n{}\
             [[pipelines.steps]]\nname = \"work\"\nhandler = \"work\"\nconcurrency = {concurrency}\nmax_attempts = 1\n",
            if off { "_off" } else { "" },
            match (off, args.hot_lanes) {
                (true, _) => "hot_lanes = 0\n".to_string(),
                (false, Some(n)) => format!("hot_lanes = {n}\n"),
                (false, None) => String::new(),
            },
        )
    };
    [false, true]
        .into_iter()
        .map(|off| {
            pipeline("collide", 4, args.concurrency, off)
                + &pipeline("fair", args.fair_shards, args.fair_concurrency, off)
        })
        .collect()
}

/// S6's and S7's worker process: a real worker on its own, as `warren-worker run` would be,
/// with the bench's Rust handlers: S6's serves the bench's `one` pipeline, S7's every pipeline
/// of `scale_config`. Stops on SIGTERM/SIGINT or when its stdin closes (the bench died).
fn serve_worker(
    base: &Config,
    ns: &str,
    concurrency: u16,
    scale_config: Option<&Path>,
) -> ExitCode {
    let worker = match scale_config {
        None => bench_config(base, ns, concurrency, "")
            .and_then(|c| Ok(warren_side::worker(c, Some("one"))?)),
        Some(path) => {
            scale::load_config(base, ns, path).and_then(|c| Ok(warren_side::worker(c, None)?))
        }
    }
    .map_err(|e| format!("{e:#}"));
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(crate::EXIT_USAGE);
        }
    };
    // The same runtime `warren-worker` builds.
    let runtime = Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        let signals = warren_worker::shutdown::Signals::install();
        let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        });
        worker
            .run(async {
                tokio::select! {
                    _ = signals.shutdown() => {}
                    _ = closed => {}
                }
            })
            .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: BenchArgs,
    config_path: Option<PathBuf>,
    base: Config,
    json: bool,
    (workers, raw_handle): (Handle, Handle),
) -> anyhow::Result<()> {
    // Installed first: from here on Ctrl-C (or SIGTERM) ends the run through the clean-up below.
    // A second one exits at once.
    let interrupted = warren_worker::shutdown::Signals::install().shutdown();
    tokio::pin!(interrupted);
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let ns = format!("wbench-{unique:08x}");
    // The fairness pipelines only when a scenario needs them: every queue costs the broker.
    let fairness = match args.scenarios.iter().any(|s| s.fairness()) {
        true => fairness_toml(&args),
        false => String::new(),
    };
    let fan = match args.scenarios.contains(&Scenario::S9) {
        true => fanout::toml(args.concurrency),
        false => String::new(),
    };
    let mut config = bench_config(&base, &ns, args.concurrency, &(fairness + &fan))?;
    config.history.enabled = args.history() != HistoryMode::Off;
    let raw_config = bench_config(&base, &format!("{ns}-raw"), args.concurrency, "")?;
    let admin = Broker::connect(&config.broker)
        .await
        .context("connecting to RabbitMQ")?;
    // With the history stream whatever the mode: a worker process (S6) declares it by the
    // config's default, and the namespace's deletion must take it too.
    let mut with_history = config.clone();
    with_history.history.enabled = true;
    let plans = [Topology::plan(&with_history), Topology::plan(&raw_config)];
    // Declared before the SDK client connects, so its hot-lane router finds the control stream.
    let declared = async {
        for plan in &plans {
            plan.declare(&admin).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let client = match declared {
        Ok(()) => connect_clients(&config, args.history()).await,
        Err(e) => Err(e),
    };
    let (client, client_off) = match client {
        Ok(clients) => clients,
        Err(e) => {
            for plan in &plans {
                let _ = plan.delete(&admin).await;
            }
            return Err(e);
        }
    };
    // The raw side moves bodies as big as warren's envelopes of the same jobs.
    let sample = warren_common::Envelope::new_job(
        warren_common::JobId::new(),
        warren_common::TenantId::parse("bulk").expect("valid tenant"),
        "one",
        "noop",
        Priority::Normal,
        json!({"n": 10_000}),
    );
    let raw = match Raw::connect(
        raw_handle,
        raw_config.clone(),
        warren_common::encode(&sample),
    )
    .await
    {
        Ok(raw) => raw,
        Err(e) => {
            client.close().await;
            if let Some(off) = client_off {
                off.close().await;
            }
            for plan in &plans {
                let _ = plan.delete(&admin).await;
            }
            return Err(e);
        }
    };
    let bench = Bench {
        args,
        config_path,
        history_on: std::sync::atomic::AtomicBool::new(config.history.enabled),
        config,
        client,
        client_off,
        admin: admin.clone(),
        workers,
        raw,
        running: Mutex::new(None),
        child: Mutex::new(None),
        more_plans: Mutex::new(Vec::new()),
    };
    let load_before = load_average();
    eprintln!(
        "warren bench: namespaces {ns} and {ns}-raw on {}",
        admin.redacted_url()
    );
    let outcome = tokio::select! {
        runs = async {
            let mut runs = Vec::new();
            for i in 0..bench.args.repeat.max(1) {
                if bench.args.repeat > 1 {
                    eprintln!("run {} of {}", i + 1, bench.args.repeat);
                }
                runs.push(scenarios::run_once(&bench).await?);
            }
            Ok::<_, anyhow::Error>(runs)
        } => runs,
        _ = &mut interrupted => Err(anyhow!("interrupted; the bench namespaces are deleted")),
    };
    // Workers first: a worker whose queues vanish reconnects and declares them again.
    bench.stop_everything().await;
    // The client's router reads the control stream: closed before the namespaces go.
    bench.client.close().await;
    if let Some(off) = bench.client_off {
        off.close().await;
    }
    let more_plans = std::mem::take(&mut *bench.more_plans.lock().expect("lock"));
    for plan in plans.iter().chain(&more_plans) {
        if let Err(e) = plan.delete(&admin).await {
            eprintln!("warren: could not delete a bench namespace: {e}");
        }
    }
    admin.close().await;
    let runs = outcome?;
    let rows = report::medians(&runs);
    let conditions = json!({
        "namespace": ns,
        "broker": admin.redacted_url(),
        "queue_type": bench.config.broker.queue_type.as_str(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "runs": runs.len(),
        "concurrency": bench.args.concurrency,
        "history": format!("{:?}", bench.args.history()).to_lowercase(),
        "results_check": bench.config.checks_results(),
        "confirm_window": raw::CONFIRM_WINDOW,
        "workers": "1 in-process warren_worker::Worker, 2 tokio threads; raw side 1 connection, 2 tokio threads",
        "sizes": {
            "jobs": bench.args.jobs, "chain_jobs": bench.args.chain_jobs, "flood": bench.args.flood,
            "small": bench.args.small, "work_ms": bench.args.work_ms, "latency_jobs": bench.args.latency_jobs,
            "scale_pipelines": bench.args.scale_pipelines, "scale_shards": bench.args.scale_shards,
            "scale_window_s": bench.args.scale_window.as_secs_f64(),
            "tenants": bench.args.tenants,
            "fair_floods": bench.args.fair_floods.iter().map(|f| format!("{}x{}", f.tenants, f.jobs)).collect::<Vec<_>>(),
            "fair_work_ms": bench.args.fair_work_ms, "fair_concurrency": bench.args.fair_concurrency,
            "fair_load": bench.args.fair_load, "fair_shards": bench.args.fair_shards,
            "fair_submitters": bench.args.fair_submitters, "hot_lanes": bench.args.hot_lanes, "fair_idle_s": bench.args.fair_idle.as_secs_f64(),
            "fanout_parts": bench.args.fanout_parts, "fanout_runs": bench.args.fanout_runs,
        },
    });
    if json {
        outln!("{}", report::json(&rows, &conditions));
    } else {
        outln!(
            "warren bench: {} build, {} CPUs, load {} -> {}, queue type {}, results check {}, concurrency {}, confirm window {}, {} run(s){}",
            conditions["build"].as_str().unwrap_or(""),
            conditions["cpus"],
            conditions["load_average_before"].as_str().unwrap_or("?"),
            conditions["load_average_after"].as_str().unwrap_or("?"),
            conditions["queue_type"].as_str().unwrap_or(""),
            if conditions["results_check"] == true { "on" } else { "off" },
            bench.args.concurrency,
            raw::CONFIRM_WINDOW,
            runs.len(),
            if runs.len() > 1 { ", medians" } else { "" },
        );
        print!("{}", report::table(&rows));
    }
    Ok(())
}

/// The bench's SDK client (history as `config` says), and for `--history both` a second one
/// with history off.
async fn connect_clients(
    config: &Config,
    mode: HistoryMode,
) -> anyhow::Result<(Client, Option<Client>)> {
    let client = Client::connect(config.clone()).await?;
    if mode != HistoryMode::Both {
        return Ok((client, None));
    }
    let mut off = config.clone();
    off.history.enabled = false;
    match Client::connect(off).await {
        Ok(off) => Ok((client, Some(off))),
        Err(e) => {
            client.close().await;
            Err(e.into())
        }
    }
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// What every scenario works with.
pub(super) struct Bench {
    args: BenchArgs,
    config_path: Option<PathBuf>,
    /// The bench config in warren's namespace.
    config: Config,
    client: Client,
    /// `--history both`: a client with history off, for the runs with it off.
    client_off: Option<Client>,
    /// Whether warren's side runs with history now (workers started from here on, and
    /// [`Bench::client`]).
    history_on: std::sync::atomic::AtomicBool,
    /// A connection of the bench's own, for what the SDK does not offer (queue consumers).
    admin: Broker,
    /// The runtime the in-process workers run on.
    workers: Handle,
    raw: Raw,
    running: Mutex<Option<Running>>,
    child: Mutex<Option<tokio::process::Child>>,
    /// Namespaces a scenario declared for itself (S7), deleted with the bench's own if the
    /// scenario did not get to it (an error, Ctrl-C).
    more_plans: Mutex<Vec<Topology>>,
}

impl Bench {
    /// The SDK client of the current history mode.
    fn client(&self) -> &Client {
        match (self.history_on(), &self.client_off) {
            (false, Some(off)) => off,
            _ => &self.client,
        }
    }

    fn history_on(&self) -> bool {
        self.history_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switches history for what starts from here on (`--history both` only).
    fn set_history(&self, on: bool) {
        self.history_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The warren step queue a tenant's message for `pipeline`/`step` goes to.
    fn queue(&self, pipeline: &str, step: &str, priority: Priority, tenant: &str) -> String {
        let pipeline = self.config.pipeline(pipeline).expect("bench pipeline");
        StepRoute::for_tenant(pipeline, step, priority, tenant).queue(self.admin.names())
    }

    /// The lane a tenant's jobs take in the `work` pipeline.
    fn lane(&self, tenant: &str) -> Lane {
        self.lane_in("work", tenant)
    }

    /// The shard lane a tenant's jobs take in `pipeline` (when not hot).
    fn lane_in(&self, pipeline: &str, tenant: &str) -> Lane {
        Lane::for_tenant(
            self.config.pipeline(pipeline).expect("bench pipeline"),
            tenant,
        )
    }

    /// Waits `--settle` before a timed throughput phase. After a burst, RabbitMQ keeps working
    /// for a while (quorum queues flush their log to segment files and snapshot after a drain,
    /// deleted queues are cleaned up); a phase that starts then is slower for it, whichever
    /// side it measures. Without the pause S1's submit ratio ranged 0.6-1.35 between runs.
    async fn settle(&self) {
        tokio::time::sleep(self.args.settle).await;
    }

    /// Starts an in-process worker on `pipeline`; returns when it consumes `queue`.
    async fn start_worker(&self, pipeline: &str, queue: &str) -> anyhow::Result<Instant> {
        let mut config = self.config.clone();
        config.history.enabled = self.history_on();
        let worker = warren_side::worker(config, Some(pipeline))?;
        let running = Running::spawn(&self.workers, worker);
        let old = self.running.lock().expect("lock").replace(running);
        if let Some(old) = old {
            old.stop(Duration::from_secs(10)).await?;
        }
        warren_side::consuming(&self.admin, queue, Duration::from_secs(60)).await
    }

    /// Starts an in-process worker on every pipeline (with the fan-in coordinator when one
    /// fans out); returns when it consumes `queue`.
    async fn start_worker_all(&self, queue: &str) -> anyhow::Result<Instant> {
        let worker = warren_side::worker(self.config.clone(), None)?;
        let running = Running::spawn(&self.workers, worker);
        let old = self.running.lock().expect("lock").replace(running);
        if let Some(old) = old {
            old.stop(Duration::from_secs(10)).await?;
        }
        warren_side::consuming(&self.admin, queue, Duration::from_secs(60)).await
    }

    async fn stop_worker(&self) -> anyhow::Result<()> {
        let running = self.running.lock().expect("lock").take();
        match running {
            Some(running) => running.stop(Duration::from_secs(10)).await,
            None => Ok(()),
        }
    }

    /// Starts S6's worker process: this binary again, as `warren bench --serve-worker NS`; or
    /// S7's, serving namespace `ns` with the pipelines of `scale_config`.
    fn spawn_worker_process(
        &self,
        log: &Path,
        scale: Option<(&str, &Path)>,
    ) -> anyhow::Result<u32> {
        let child = self.worker_process(log, scale)?;
        let pid = child.id().context("worker process has no pid")?;
        *self.child.lock().expect("lock") = Some(child);
        Ok(pid)
    }

    /// A worker process as [`Bench::spawn_worker_process`] starts it, left to the caller; it
    /// is killed when dropped.
    fn worker_process(
        &self,
        log: &Path,
        scale: Option<(&str, &Path)>,
    ) -> anyhow::Result<tokio::process::Child> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        if let Some(path) = &self.config_path {
            command.arg("--config").arg(path);
        }
        let ns = scale.map_or(self.config.broker.namespace.as_str(), |(ns, _)| ns);
        if let Some((_, file)) = scale {
            command.arg("bench").arg("--serve-config").arg(file);
        } else {
            command.arg("bench");
        }
        let child = command
            .args(["--serve-worker", ns])
            .arg("--concurrency")
            .arg(self.args.concurrency.to_string())
            .env(
                ENV_WARREN_LOG,
                QuietEnv.var(ENV_WARREN_LOG).unwrap_or_default(),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the worker process")?;
        Ok(child)
    }

    /// Closes the worker process's stdin (it drains and exits), then kills it if it lingers.
    async fn stop_worker_process(&self) {
        let child = self.child.lock().expect("lock").take();
        if let Some(mut child) = child {
            drop(child.stdin.take());
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    async fn stop_everything(&self) {
        if let Err(e) = self.stop_worker().await {
            eprintln!("warren: {e:#}");
        }
        self.stop_worker_process().await;
    }

    fn prefetch(&self) -> u16 {
        self.args.concurrency
    }

    /// A progress bar on stderr (hidden when stderr is not a terminal).
    fn bar(&self, len: usize, label: &str) -> ProgressBar {
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:<28} {bar:30} {pos:>6}/{len:<6} {per_sec:>14} {elapsed:>4} {msg}",
            )
            .expect("template"),
        );
        bar.set_prefix(label.to_string());
        bar
    }

    /// A spinner for a phase that is one call (a bulk submit).
    fn spinner(&self, label: &str) -> ProgressBar {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{prefix:<28} {spinner} {elapsed:>4} {msg}")
                .expect("template"),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_config_keeps_the_users_results_and_fairness_settings() {
        let text = "[broker]\nurls = [\"amqp://a:5701/%2f\", \"amqp://b:5702/%2f\"]\n\
                    [results]\ncheck = \"off\"\n[fairness]\nhot_depth = 7\n";
        let base = Config::parse(text, "user.toml", Path::new("."), &HashMap::new()).unwrap();
        let config = bench_config(&base, "wbench-x", 50, "").unwrap();
        assert_eq!(config.broker.urls, base.broker.urls);
        assert_eq!(config.broker.namespace, "wbench-x");
        // Two members would turn the check on by default; the user's `off` wins.
        assert!(!config.checks_results());
        assert_eq!(config.fairness.hot_depth, 7);
        let defaults = Config::parse(
            "[broker]\nurls = [\"amqp://a:5701/%2f\", \"amqp://b:5702/%2f\"]\n",
            "user.toml",
            Path::new("."),
            &HashMap::new(),
        )
        .unwrap();
        assert!(bench_config(&defaults, "wbench-y", 50, "")
            .unwrap()
            .checks_results());
    }
}
