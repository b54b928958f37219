//! `warren-worker supervise`: keeps pools of local worker processes sized to their backlog.
//!
//! A pool is a pipeline, or one step of it. Every `interval` the supervisor reads the backlog of
//! the pool's step queues: ready messages (passive declares, see `warren_broker::depth`) plus,
//! when `[broker] management_url` is set, the messages workers hold unacked. It sizes
//! the pool to `clamp(ceil(backlog / target_backlog), min, max)`: up at once, down only once the
//! wanted count has stayed lower for `scale_down_after`. Scaling down sends SIGTERM, so the
//! worker drains (finishes its steps, returns its prefetch) and nothing is lost. Workers are
//! this same executable (`run --pipeline P [--step S]`), so a custom worker binary built on
//! [`crate::cli::main`] supervises its own handlers.
//!
//! The sizing rule is the pure [`decide`]; everything else here is process plumbing.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal as unix_signal, SignalKind};
use tracing::{debug, info, warn};
use warren_broker::depth::{add_unacked, read_depths};
use warren_broker::{Broker, Management, Names, StepRoute};
use warren_common::telemetry::LogFormat;
use warren_common::Config;

use crate::metrics::{register, register_process_metrics, Exposed};

/// Where the supervisor serves its own metrics unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9478";

/// Every metric name the supervisor exports (docs/metrics.md documents each).
pub const NAMES: &[&str] = &[
    "warren_queue_messages",
    "warren_queue_messages_unacked",
    "warren_supervisor_workers_desired",
    "warren_supervisor_workers_running",
    "warren_supervisor_restarts_total",
];

/// A worker that exits sooner than this after its start is crash-looping: its restarts back off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Extra time a draining worker gets beyond its shutdown grace before it is killed.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);

// === the sizing rule (pure) ===

/// How a pool is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Ready messages one worker is expected to keep up with.
    pub target_backlog: u64,
    /// Below this backlog the pool wants no worker at all (only matters with `min = 0`).
    pub activation: u64,
    /// How long the wanted count must stay below the running count before workers are drained.
    pub scale_down_after: Duration,
}

impl Policy {
    /// `clamp(ceil(backlog / target_backlog), min, max)`; 0 below the activation threshold
    /// (then clamped to `min` all the same).
    pub fn desired(&self, backlog: u64) -> u32 {
        let wanted = if backlog < self.activation.max(1) {
            0
        } else {
            backlog.div_ceil(self.target_backlog.max(1))
        };
        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
        wanted.clamp(self.min, self.max.max(self.min))
    }
}

/// One tick's verdict for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What the backlog asks for right now.
    pub desired: u32,
    /// How many workers the pool should run after this tick.
    pub target: u32,
}

/// The sizing rule. `lower_for` is how long the wanted count has been below `running` without
/// a break, as of the previous tick (zero if it was not below then). Scaling up is immediate;
/// scaling down waits until `lower_for` reaches `policy.scale_down_after`, so a short lull
/// between bursts does not drain workers that the next burst needs again.
pub fn decide(backlog: u64, running: u32, policy: &Policy, lower_for: Duration) -> Decision {
    let desired = policy.desired(backlog);
    let target = if desired >= running || lower_for >= policy.scale_down_after {
        desired
    } else {
        running
    };
    Decision { desired, target }
}

// === options ===

/// `--worker-metrics-base`: the first port of the workers' metrics (slot 0), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMetricsBase {
    Off,
    /// Port 0 gives every worker any free port.
    Port(u16),
}

impl FromStr for WorkerMetricsBase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::Port)
            .map_err(|_| format!("{s:?} is not a port number or `off`"))
    }
}

impl WorkerMetricsBase {
    /// The `WARREN_METRICS_ADDR` of the worker in `slot`.
    fn addr(self, slot: usize) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Port(0) => "127.0.0.1:0".into(),
            Self::Port(base) => match u16::try_from(usize::from(base) + slot) {
                Ok(port) => format!("127.0.0.1:{port}"),
                Err(_) => "127.0.0.1:0".into(),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Passed on to the workers as `--config` (else they find the config as we did).
    pub config_path: Option<PathBuf>,
    /// Pools for these pipelines (all when empty)...
    pub pipelines: Vec<String>,
    /// ...or for these steps of them, one pool each.
    pub steps: Vec<String>,
    pub policy: Policy,
    pub interval: Duration,
    pub worker_metrics: WorkerMetricsBase,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// The worker executable: this one.
    pub exe: PathBuf,
}

/// What one pool runs: `run --pipeline P [--step S]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// `pipeline` or `pipeline/step`: the `pool` label.
    pub name: String,
    pub pipeline: String,
    pub step: Option<String>,
}

/// The pools for the given pipelines and steps. An unknown name is an error naming it.
pub fn plan_pools(
    config: &Config,
    pipelines: &[String],
    steps: &[String],
) -> Result<Vec<PoolSpec>, String> {
    for p in pipelines {
        if !config.pipelines.iter().any(|c| &c.name == p) {
            return Err(format!("pipeline {p:?} is not in the config"));
        }
    }
    let chosen: Vec<_> = config
        .pipelines
        .iter()
        .filter(|p| pipelines.is_empty() || pipelines.contains(&p.name))
        .collect();
    for s in steps {
        if !chosen.iter().any(|p| p.step(s).is_some()) {
            return Err(format!("no supervised pipeline has a step {s:?}"));
        }
    }
    let mut pools = Vec::new();
    for p in chosen {
        if steps.is_empty() {
            pools.push(PoolSpec {
                name: p.name.clone(),
                pipeline: p.name.clone(),
                step: None,
            });
            continue;
        }
        for s in p.steps.iter().filter(|s| steps.contains(&s.name)) {
            pools.push(PoolSpec {
                name: format!("{}/{}", p.name, s.name),
                pipeline: p.name.clone(),
                step: Some(s.name.clone()),
            });
        }
    }
    if pools.is_empty() {
        return Err("nothing to supervise: the config has no pipeline".into());
    }
    Ok(pools)
}

// === metrics ===

/// The supervisor's metrics and readiness (ready once a depth read succeeded).
#[derive(Debug)]
pub struct SupervisorMetrics {
    registry: Registry,
    queue_messages: IntGaugeVec,
    queue_unacked: IntGaugeVec,
    desired: IntGaugeVec,
    running: IntGaugeVec,
    restarts: IntCounterVec,
    ready: AtomicBool,
}

impl SupervisorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(&registry, g)
        };
        let queue_messages = gauge(
            "warren_queue_messages",
            "Ready messages in each step queue.",
            &["pipeline", "step", "priority", "shard"],
        );
        let queue_unacked = gauge(
            "warren_queue_messages_unacked",
            "Messages delivered to workers but not yet acked, in each step queue (management API).",
            &["pipeline", "step", "priority", "shard"],
        );
        let desired = gauge(
            "warren_supervisor_workers_desired",
            "Workers the supervisor wants in the pool.",
            &["pool"],
        );
        let running = gauge(
            "warren_supervisor_workers_running",
            "Worker processes alive in the pool (not counting those draining).",
            &["pool"],
        );
        let restarts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "warren_supervisor_restarts_total",
                    "Workers that died unexpectedly and were started again.",
                ),
                &["pool"],
            )
            .expect("valid metric"),
        );
        register_process_metrics(&registry);
        Self {
            registry,
            queue_messages,
            queue_unacked,
            desired,
            running,
            restarts,
            ready: AtomicBool::new(false),
        }
    }
}

impl Default for SupervisorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Exposed for SupervisorMetrics {
    fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("text encoding never fails")
    }
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

// === processes ===

/// SIGTERM and SIGINT, installed before anything slow (as the worker does).
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside a tokio runtime.
    pub fn install() -> Self {
        Self {
            term: unix_signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: unix_signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[derive(Debug)]
struct WorkerChild {
    slot: usize,
    pid: u32,
    started: Instant,
    child: Child,
    /// When it was sent SIGTERM.
    draining: Option<Instant>,
}

impl WorkerChild {
    fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
    }
}

#[derive(Debug)]
struct Pool {
    spec: PoolSpec,
    /// Indices into the supervisor's queue list.
    queues: Vec<usize>,
    children: Vec<WorkerChild>,
    /// Since when the wanted count has been below the running count, without a break.
    lower_since: Option<Instant>,
    /// No start before this (a crash-looping worker backs off).
    hold_starts_until: Option<Instant>,
    crash_backoff: Duration,
    last_desired: u32,
    /// What the last info-level decision line said, to log changes and not every tick.
    last_logged: Option<(u32, u32, &'static str)>,
}

impl Pool {
    fn running(&self) -> u32 {
        self.children
            .iter()
            .filter(|c| c.draining.is_none())
            .count() as u32
    }
}

struct Supervisor {
    options: Options,
    metrics: Arc<SupervisorMetrics>,
    queues: Vec<StepRoute>,
    pools: Vec<Pool>,
    used_slots: BTreeSet<usize>,
    broker: Option<Broker>,
    broker_down_logged: bool,
    /// Where unacked counts come from, if configured.
    management: Option<Management>,
    management_down_logged: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// Bad options or a config the supervisor cannot serve.
    #[error("{0}")]
    Setup(String),
}

/// The pools these options ask for, or why they cannot run (checked before anything starts).
pub fn check(config: &Config, options: &Options) -> Result<Vec<PoolSpec>, SupervisorError> {
    let p = options.policy;
    if p.max == 0 || p.min > p.max {
        return Err(SupervisorError::Setup(format!(
            "--min {} --max {}: need 0 <= min <= max and max >= 1",
            p.min, p.max
        )));
    }
    if p.target_backlog == 0 || options.interval.is_zero() {
        return Err(SupervisorError::Setup(
            "--target-backlog and --interval must be above zero".into(),
        ));
    }
    plan_pools(config, &options.pipelines, &options.steps).map_err(SupervisorError::Setup)
}

/// Supervises until SIGTERM/SIGINT, then drains every worker and returns.
pub async fn run(
    config: Config,
    options: Options,
    metrics: Arc<SupervisorMetrics>,
    mut signals: Signals,
) -> Result<(), SupervisorError> {
    let p = options.policy;
    let specs = check(&config, &options)?;
    let management = Management::from_config(&config.broker)
        .map_err(|e| SupervisorError::Setup(e.to_string()))?;
    let queues: Vec<StepRoute> = StepRoute::all(&config)
        .into_iter()
        .filter(|q| specs.iter().any(|s| serves(s, q)))
        .collect();
    let pools: Vec<Pool> = specs
        .into_iter()
        .map(|spec| Pool {
            queues: (0..queues.len())
                .filter(|i| serves(&spec, &queues[*i]))
                .collect(),
            spec,
            children: Vec::new(),
            lower_since: None,
            hold_starts_until: None,
            crash_backoff: Duration::from_secs(1),
            last_desired: p.min,
            last_logged: None,
        })
        .collect();
    // Every pool's counter exists from the start, so "no restarts" reads as 0, not as no data.
    for pool in &pools {
        metrics.restarts.with_label_values(&[&pool.spec.name]);
    }
    let mut sup = Supervisor {
        options,
        metrics,
        queues,
        pools,
        used_slots: BTreeSet::new(),
        broker: None,
        broker_down_logged: false,
        management,
        management_down_logged: false,
    };
    info!(
        pools = %sup.pools.iter().map(|p| p.spec.name.as_str()).collect::<Vec<_>>().join(","),
        min = p.min, max = p.max, target_backlog = p.target_backlog,
        interval = ?sup.options.interval, scale_down_after = ?p.scale_down_after,
        "Supervising."
    );
    let mut ticks = tokio::time::interval(sup.options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => sup.tick(&config).await,
            _ = signals.recv() => break,
        }
    }
    sup.shutdown(&mut signals).await;
    if let Some(broker) = sup.broker.take() {
        broker.close().await;
    }
    Ok(())
}

fn serves(spec: &PoolSpec, q: &StepRoute) -> bool {
    q.pipeline == spec.pipeline && spec.step.as_ref().is_none_or(|s| s == &q.step)
}

impl Supervisor {
    async fn tick(&mut self, config: &Config) {
        // A broker that stops answering must not stop the restarts of dead workers.
        let patience = self.options.interval.max(Duration::from_secs(5));
        let backlogs = match tokio::time::timeout(patience, self.read_backlogs(config)).await {
            Ok(b) => b,
            Err(_) => {
                self.broker = None;
                self.broker_unreadable("no answer from the broker");
                None
            }
        };
        let now = Instant::now();
        for i in 0..self.pools.len() {
            self.reap(i, now);
            let backlog = backlogs.as_ref().map(|b| b[i]);
            self.scale(i, backlog, now);
        }
    }

    /// The backlog of each pool, or `None` if the broker could not be read this time.
    async fn read_backlogs(&mut self, config: &Config) -> Option<Vec<u64>> {
        if self.broker.is_none() {
            match Broker::connect(&config.broker).await {
                Ok(b) => self.broker = Some(b),
                Err(e) => {
                    self.broker_unreadable(&e.to_string());
                    return None;
                }
            }
        }
        let broker = self.broker.as_ref()?;
        let mut depths = match read_depths(broker, &self.queues).await {
            Ok(d) => d,
            Err(e) => {
                if e.is_connection_lost() {
                    if let Some(b) = self.broker.take() {
                        b.close().await;
                    }
                }
                self.broker_unreadable(&e.to_string());
                return None;
            }
        };
        if self.broker_down_logged {
            info!("Reading queue depths again.");
            self.broker_down_logged = false;
        }
        if let Some(management) = &self.management {
            // Without it the backlog is the ready messages alone, as without a management_url.
            let prefix = Names::new(&config.broker.namespace).step_queue_prefix();
            match add_unacked(management, &prefix, &mut depths).await {
                Ok(()) if self.management_down_logged => {
                    info!("Reading unacked counts again.");
                    self.management_down_logged = false;
                }
                Ok(()) => {}
                Err(e) if !self.management_down_logged => {
                    warn!(error = %e, "Cannot read unacked counts; sizing on ready messages alone.");
                    self.management_down_logged = true;
                }
                Err(_) => {}
            }
        }
        for d in &depths {
            let q = &d.route;
            let labels = [
                q.pipeline.as_str(),
                q.step.as_str(),
                q.priority.as_str(),
                &q.lane.to_string(),
            ];
            if let Some(ready) = d.ready {
                let gauge = self.metrics.queue_messages.with_label_values(&labels);
                gauge.set(i64::from(ready));
            }
            if let Some(unacked) = d.unacked {
                let gauge = self.metrics.queue_unacked.with_label_values(&labels);
                gauge.set(i64::try_from(unacked).unwrap_or(i64::MAX));
            }
        }
        self.metrics.ready.store(true, Ordering::Relaxed);
        let backlogs = self
            .pools
            .iter()
            .map(|p| p.queues.iter().map(|i| depths[*i].backlog()).sum())
            .collect();
        Some(backlogs)
    }

    fn broker_unreadable(&mut self, error: &str) {
        if !self.broker_down_logged {
            warn!(
                error,
                "Cannot read queue depths; keeping the pools as they are."
            );
            self.broker_down_logged = true;
        }
    }

    /// Collects the workers of pool `i` that exited. One that was not told to stop is a crash:
    /// counted, and started again by the scaling that follows (after a backoff if it keeps
    /// dying at start).
    fn reap(&mut self, i: usize, now: Instant) {
        let grace = self.options.shutdown_grace;
        let pool = &mut self.pools[i];
        let mut k = 0;
        while k < pool.children.len() {
            let c = &mut pool.children[k];
            let status = match c.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => {
                    if c.draining
                        .is_some_and(|since| now - since > grace + DRAIN_MARGIN)
                    {
                        warn!(pool = %pool.spec.name, pid = c.pid, "Worker still draining past its grace; killing it.");
                        let _ = c.child.start_kill();
                    }
                    k += 1;
                    continue;
                }
                Err(e) => {
                    warn!(pool = %pool.spec.name, pid = c.pid, error = %e, "Cannot check a worker.");
                    k += 1;
                    continue;
                }
            };
            let c = pool.children.swap_remove(k);
            self.used_slots.remove(&c.slot);
            if c.draining.is_some() {
                info!(pool = %pool.spec.name, pid = c.pid, slot = c.slot, status = %status, "Worker drained and exited.");
                continue;
            }
            self.metrics
                .restarts
                .with_label_values(&[pool.spec.name.as_str()])
                .inc();
            let lived = now - c.started;
            if lived < STABLE_AFTER {
                pool.hold_starts_until = Some(now + pool.crash_backoff);
                pool.crash_backoff = (pool.crash_backoff * 2).min(RESTART_BACKOFF_MAX);
            } else {
                pool.crash_backoff = Duration::from_secs(1);
            }
            warn!(
                pool = %pool.spec.name, pid = c.pid, slot = c.slot, status = %status,
                lived = ?lived, "Worker exited unexpectedly; starting another."
            );
        }
    }

    fn scale(&mut self, i: usize, backlog: Option<u64>, now: Instant) {
        let policy = self.options.policy;
        let pool = &mut self.pools[i];
        let running = pool.running();
        let lower_for = pool.lower_since.map_or(Duration::ZERO, |t| now - t);
        let decision = match backlog {
            Some(b) => decide(b, running, &policy, lower_for),
            // Blind: keep what we had (restarting the dead), never scale down.
            None => Decision {
                desired: pool.last_desired,
                target: pool.last_desired.max(running),
            },
        };
        pool.last_desired = decision.desired;
        pool.lower_since = if decision.desired < running && decision.target == running {
            Some(pool.lower_since.unwrap_or(now))
        } else {
            None
        };
        let held = pool.hold_starts_until.is_some_and(|t| now < t);
        let action = match decision.target.cmp(&running) {
            std::cmp::Ordering::Greater if held => "wait_restart_backoff",
            std::cmp::Ordering::Greater => "scale_up",
            std::cmp::Ordering::Less => "scale_down",
            std::cmp::Ordering::Equal if decision.desired < running => "hold",
            std::cmp::Ordering::Equal => "none",
        };
        let name = pool.spec.name.clone();
        let logged = (decision.desired, running, action);
        if pool.last_logged != Some(logged) {
            info!(
                pool = %name, backlog = backlog.map_or(-1, |b| b as i64),
                desired = decision.desired, running, scale_to = decision.target, action,
                "Scaling decision."
            );
            pool.last_logged = Some(logged);
        } else {
            debug!(pool = %name, backlog = ?backlog, desired = decision.desired, running, action, "Scaling decision.");
        }
        self.metrics
            .desired
            .with_label_values(&[name.as_str()])
            .set(i64::from(decision.desired));
        match action {
            "scale_up" => {
                for _ in running..decision.target {
                    if let Err(e) = self.start(i) {
                        warn!(pool = %name, error = %e, "Cannot start a worker.");
                        let pool = &mut self.pools[i];
                        pool.hold_starts_until = Some(now + pool.crash_backoff);
                        pool.crash_backoff = (pool.crash_backoff * 2).min(RESTART_BACKOFF_MAX);
                        break;
                    }
                }
            }
            "scale_down" => {
                // The newest first: the oldest have warm caches and long-running steps.
                let pool = &mut self.pools[i];
                pool.children.sort_by_key(|c| c.started);
                let mut to_drain = running - decision.target;
                for c in pool.children.iter_mut().rev() {
                    if to_drain == 0 {
                        break;
                    }
                    if c.draining.is_none() {
                        c.signal(Signal::SIGTERM);
                        c.draining = Some(now);
                        to_drain -= 1;
                        info!(pool = %name, pid = c.pid, slot = c.slot, "Draining a worker (SIGTERM).");
                    }
                }
            }
            _ => {}
        }
        let running = self.pools[i].running();
        self.metrics
            .running
            .with_label_values(&[name.as_str()])
            .set(i64::from(running));
    }

    /// Starts one worker of pool `i` in the lowest free slot.
    fn start(&mut self, i: usize) -> std::io::Result<()> {
        let slot = (0..).find(|s| !self.used_slots.contains(s)).unwrap_or(0);
        let o = &self.options;
        let spec = &self.pools[i].spec;
        let mut cmd = Command::new(&o.exe);
        cmd.arg("run");
        if let Some(path) = &o.config_path {
            cmd.arg("--config").arg(path);
        }
        cmd.arg("--pipeline").arg(&spec.pipeline);
        if let Some(step) = &spec.step {
            cmd.arg("--step").arg(step);
        }
        cmd.arg("--shutdown-grace")
            .arg(humantime::format_duration(o.shutdown_grace).to_string())
            .arg("--log-format")
            .arg(match o.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            })
            .env("WARREN_METRICS_ADDR", o.worker_metrics.addr(slot))
            .env(
                crate::shutdown::ENV_SUPERVISOR_PID,
                std::process::id().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in the terminal reaches only the supervisor,
            // which then drains each worker with one SIGTERM (a second would stop it at once).
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let prefix = format!("{}#{slot}", spec.name);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(relay(out, prefix.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relay(err, prefix));
        }
        info!(pool = %spec.name, pid, slot, metrics = %o.worker_metrics.addr(slot), "Started a worker.");
        self.used_slots.insert(slot);
        self.pools[i].children.push(WorkerChild {
            slot,
            pid,
            started: Instant::now(),
            child,
            draining: None,
        });
        Ok(())
    }

    /// Drains every worker and waits for all of them; a second signal stops them at once.
    async fn shutdown(&mut self, signals: &mut Signals) {
        let now = Instant::now();
        let total: usize = self.pools.iter().map(|p| p.children.len()).sum();
        info!(
            workers = total,
            "Shutdown requested; draining every worker (a second signal stops them at once)."
        );
        for pool in &mut self.pools {
            for c in pool.children.iter_mut().filter(|c| c.draining.is_none()) {
                c.signal(Signal::SIGTERM);
                c.draining = Some(now);
            }
        }
        let mut hurried = false;
        loop {
            for i in 0..self.pools.len() {
                self.reap(i, Instant::now());
                let name = self.pools[i].spec.name.clone();
                self.metrics.running.with_label_values(&[&name]).set(0);
            }
            if self.pools.iter().all(|p| p.children.is_empty()) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = signals.recv(), if !hurried => {
                    hurried = true;
                    warn!("Second signal: stopping the workers now; unfinished steps return to their queues.");
                    // A worker's second signal makes it exit at once.
                    self.pools.iter().flat_map(|p| &p.children).for_each(|c| c.signal(Signal::SIGTERM));
                }
            }
        }
        info!("Every worker has exited.");
    }
}

/// Copies a worker's output lines to our stderr, each prefixed with `pool#slot | `.
async fn relay(stream: impl AsyncRead + Unpin, prefix: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // Not eprintln!: a closed stderr must not panic the relay.
        let _ = writeln!(std::io::stderr().lock(), "{prefix} | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn policy(min: u32, max: u32, target: u64) -> Policy {
        Policy {
            min,
            max,
            target_backlog: target,
            activation: 1,
            scale_down_after: Duration::from_secs(30),
        }
    }

    #[test]
    fn desired_is_the_clamped_ceiling() {
        let p = policy(1, 5, 20);
        assert_eq!(p.desired(0), 1);
        assert_eq!(p.desired(1), 1);
        assert_eq!(p.desired(20), 1);
        assert_eq!(p.desired(21), 2);
        assert_eq!(p.desired(100), 5);
        assert_eq!(p.desired(u64::MAX), 5);
    }

    #[test]
    fn scale_to_zero_and_activation() {
        let p = Policy {
            activation: 10,
            ..policy(0, 3, 20)
        };
        assert_eq!(p.desired(0), 0);
        assert_eq!(p.desired(9), 0, "below the activation threshold");
        assert_eq!(p.desired(10), 1);
        // An idle pool of zero starts a worker as soon as the threshold is reached.
        assert_eq!(decide(10, 0, &p, Duration::ZERO).target, 1);
        assert_eq!(decide(9, 0, &p, Duration::ZERO).target, 0);
        // And it goes back to zero only after the window.
        assert_eq!(decide(0, 1, &p, Duration::from_secs(5)).target, 1);
        assert_eq!(decide(0, 1, &p, Duration::from_secs(30)).target, 0);
    }

    #[test]
    fn up_at_once_down_after_the_window() {
        let p = policy(1, 3, 20);
        assert_eq!(
            decide(100, 1, &p, Duration::ZERO),
            Decision {
                desired: 3,
                target: 3
            }
        );
        let lull = decide(0, 3, &p, Duration::from_secs(29));
        assert_eq!(
            lull,
            Decision {
                desired: 1,
                target: 3
            }
        );
        assert_eq!(decide(0, 3, &p, Duration::from_secs(30)).target, 1);
        assert_eq!(decide(30, 3, &p, Duration::from_secs(30)).target, 2);
    }

    #[test]
    fn pools_per_pipeline_or_per_step() {
        let toml = r#"
[broker]
namespace = "ns"
[[pipelines]]
name = "p"
shards = 1
[[pipelines.steps]]
name = "a"
handler = "h"
[[pipelines.steps]]
name = "b"
handler = "h"
[[pipelines]]
name = "q"
shards = 1
[[pipelines.steps]]
name = "a"
handler = "h"
"#;
        let config = Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap();
        let names = |pools: Vec<PoolSpec>| pools.into_iter().map(|p| p.name).collect::<Vec<_>>();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(names(plan_pools(&config, &[], &[]).unwrap()), ["p", "q"]);
        assert_eq!(names(plan_pools(&config, &s(&["q"]), &[]).unwrap()), ["q"]);
        assert_eq!(
            names(plan_pools(&config, &[], &s(&["a"])).unwrap()),
            ["p/a", "q/a"]
        );
        assert_eq!(
            names(plan_pools(&config, &s(&["p"]), &s(&["b", "a"])).unwrap()),
            ["p/a", "p/b"]
        );
        assert!(plan_pools(&config, &s(&["x"]), &[])
            .unwrap_err()
            .contains("\"x\""));
        assert!(plan_pools(&config, &s(&["q"]), &s(&["b"]))
            .unwrap_err()
            .contains("\"b\""));
    }

    #[test]
    fn worker_metrics_ports_follow_the_slot() {
        let base: WorkerMetricsBase = "9480".parse().unwrap();
        assert_eq!(base.addr(0), "127.0.0.1:9480");
        assert_eq!(base.addr(2), "127.0.0.1:9482");
        assert_eq!("off".parse::<WorkerMetricsBase>().unwrap().addr(1), "off");
        assert_eq!(WorkerMetricsBase::Port(0).addr(3), "127.0.0.1:0");
        assert_eq!(WorkerMetricsBase::Port(65535).addr(1), "127.0.0.1:0");
    }

    #[test]
    fn every_name_is_exported_and_documented() {
        let m = SupervisorMetrics::new();
        m.queue_messages
            .with_label_values(&["p", "s", "normal", "0"])
            .set(3);
        m.queue_unacked
            .with_label_values(&["p", "s", "normal", "0"])
            .set(1);
        m.desired.with_label_values(&["p"]).set(2);
        m.running.with_label_values(&["p"]).set(1);
        m.restarts.with_label_values(&["p"]).inc();
        let text = m.render();
        let docs = include_str!("../../docs/metrics.md");
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} not exported"
            );
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} not in docs/metrics.md"
            );
        }
        assert!(text.contains(
            "warren_queue_messages{pipeline=\"p\",priority=\"normal\",shard=\"0\",step=\"s\"} 3"
        ));
        assert!(!m.is_ready());
    }

    proptest! {
        #[test]
        fn desired_stays_within_bounds_and_covers_the_backlog(
            backlog in any::<u64>(), min in 0u32..10, extra in 0u32..10, target in 1u64..1000,
        ) {
            let p = policy(min, min + extra.max(1), target);
            let d = p.desired(backlog);
            prop_assert!(p.min <= d && d <= p.max);
            // Below max, the workers cover the backlog at `target` each, with none to spare.
            if d < p.max {
                prop_assert!(u64::from(d) * target >= backlog);
            }
            if d > p.min.max(1) {
                prop_assert!(u64::from(d - 1) * target < backlog);
            }
        }

        #[test]
        fn up_is_immediate_and_down_waits_for_the_window(
            backlog in 0u64..10_000, running in 0u32..12, lower_ms in 0u64..60_000,
            window_ms in 0u64..60_000, min in 0u32..4, target in 1u64..100,
        ) {
            let p = Policy {
                scale_down_after: Duration::from_millis(window_ms),
                ..policy(min, min + 8, target)
            };
            let lower_for = Duration::from_millis(lower_ms);
            let d = decide(backlog, running, &p, lower_for);
            prop_assert_eq!(d.desired, p.desired(backlog));
            if d.desired >= running {
                prop_assert_eq!(d.target, d.desired, "up (or steady) at once");
            } else if lower_ms < window_ms {
                prop_assert_eq!(d.target, running, "no scale-down inside the window");
            } else {
                prop_assert_eq!(d.target, d.desired, "down once the window has passed");
            }
            prop_assert!(d.target >= d.desired);
        }
    }
}
