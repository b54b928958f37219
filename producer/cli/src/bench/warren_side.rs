//! warren's side: real `warren_worker::Worker`s with no-op Rust handlers, run in-process on a
//! tokio runtime of their own; a worker process for the memory figures; and a reader of the
//! results stream that notes when each job's result arrived.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use warren_broker::depth::Probe;
use warren_broker::Broker;
use warren_common::{Config, JobId, JobStatus};
use warren_producer::{Client, Since};
use warren_worker::{handler_fn, StepContext, StepError, Worker, WorkerError};

/// The no-op step: its output is its input, so a chain carries the payload along.
async fn noop(input: Value, _ctx: StepContext) -> Result<Value, StepError> {
    Ok(input)
}

/// A step that takes `work_ms` (default 1) of wall time without using the CPU.
async fn work(input: Value, _ctx: StepContext) -> Result<Value, StepError> {
    let ms = input.get("work_ms").and_then(Value::as_u64).unwrap_or(1);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Value::Null)
}

/// S8's step: takes `work_ms` of wall time and says when it ran, in µs of the system clock,
/// so the bench can count how many ran at once across worker processes.
async fn span(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let ms = input.get("work_ms").and_then(Value::as_u64).unwrap_or(1);
    let start_us = now_us();
    // `running_dir`: a file per running execution, named by process, for the bench to see
    // which worker runs steps right now.
    let running = input.get("running_dir").and_then(Value::as_str).map(|dir| {
        std::path::Path::new(dir).join(format!("{}.{}", std::process::id(), ctx.job_id))
    });
    if let Some(path) = &running {
        let _ = std::fs::write(path, b"");
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let end_us = now_us();
    if let Some(path) = &running {
        let _ = std::fs::remove_file(path);
    }
    Ok(serde_json::json!({"start_us": start_us, "end_us": end_us}))
}

/// Microseconds of the system clock: the fan-out figures compare instants taken in handlers
/// with instants taken by the driver.
pub(super) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What S9's handlers noted: when each fan-out step returned, and each join's starts (a join
/// that ran twice has two). Keyed by the parent job.
#[derive(Debug, Default)]
pub(super) struct FanNotes {
    pub(super) planned_us: HashMap<JobId, u64>,
    pub(super) join_starts_us: HashMap<JobId, Vec<u64>>,
}

/// S9's notes, shared by the in-process worker's handlers and the driver.
pub(super) static FAN_NOTES: std::sync::Mutex<Option<FanNotes>> = std::sync::Mutex::new(None);

fn note(f: impl FnOnce(&mut FanNotes)) {
    let mut notes = FAN_NOTES.lock().expect("lock");
    f(notes.get_or_insert_with(FanNotes::default));
}

/// S9's fan-out step: `{"parts": n}` becomes n parts of the parent's tenant.
async fn plan(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let n = input.get("parts").and_then(Value::as_u64).unwrap_or(0);
    let parts: Vec<Value> = (0..n).map(|i| serde_json::json!({"payload": i})).collect();
    note(|n| {
        n.planned_us.insert(ctx.job_id, now_us());
    });
    Ok(Value::Array(parts))
}

/// S9's part: a no-op that says when it ended.
async fn stamp(_input: Value, _ctx: StepContext) -> Result<Value, StepError> {
    Ok(serde_json::json!({"end_us": now_us()}))
}

/// S9's join: notes its start, and passes on the counts.
async fn join(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let start_us = now_us();
    note(|n| {
        n.join_starts_us
            .entry(ctx.job_id)
            .or_default()
            .push(start_us)
    });
    Ok(serde_json::json!({
        "start_us": start_us,
        "total": input["total"],
        "succeeded": input["succeeded"],
    }))
}

/// A worker serving one pipeline of `config` (or all), with the bench's handlers.
pub(super) fn worker(config: Config, pipeline: Option<&str>) -> Result<Worker, WorkerError> {
    Worker::builder(config)
        .pipeline(pipeline.map(str::to_string))
        .shutdown_grace(Duration::from_secs(5))
        .handler("noop", handler_fn(noop))
        .handler("work", handler_fn(work))
        .handler("span", handler_fn(span))
        .handler("plan", handler_fn(plan))
        .handler("stamp", handler_fn(stamp))
        .handler("join", handler_fn(join))
        .build()
}

/// An in-process worker; `stop` drains it.
pub(super) struct Running {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<(), WorkerError>>,
}

impl Running {
    pub(super) fn spawn(handle: &tokio::runtime::Handle, worker: Worker) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let join = handle.spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        Self { stop, join }
    }

    /// Asks it to drain and waits for it (at most `patience`).
    pub(super) async fn stop(self, patience: Duration) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(patience, self.join).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e).context("bench worker"),
            Ok(Err(e)) => Err(e).context("bench worker task"),
            Err(_) => bail!("bench worker did not stop within {patience:?}"),
        }
    }
}

/// Waits until `queue` has a consumer, i.e. a worker started serving it; returns that instant.
pub(super) async fn consuming(
    broker: &Broker,
    queue: &str,
    patience: Duration,
) -> anyhow::Result<Instant> {
    let mut probe = Probe::new(broker);
    let consumed = consumed(&mut probe, queue, patience).await;
    probe.close().await;
    consumed
}

async fn consumed(
    probe: &mut Probe<'_>,
    queue: &str,
    patience: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + patience;
    loop {
        let Some(counts) = probe.read(queue).await? else {
            bail!("{queue} does not exist");
        };
        if counts.consumers > 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("no worker consumed {queue} within {patience:?}");
        }
        // Short, since the clock of a drain starts here.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads every job's final result ([`warren_producer::ResultStream::settled`]) in a task of its
/// own and notes when each arrived, so the instants are those of arrival however late a
/// `wait_all` comes to look; a wait then counts the completions of its jobs among them.
pub(super) struct Watcher {
    rx: mpsc::UnboundedReceiver<(JobId, Instant, bool)>,
    seen: HashMap<JobId, (Instant, bool)>,
    /// Dropped with the watcher: the reader then closes its channel, so no stale stream
    /// consumer keeps taking deliveries on the client's connection.
    _stop: oneshot::Sender<()>,
}

impl Watcher {
    /// Start it before submitting the jobs it is to see: it reads from the stream's end on,
    /// as the raw side's reader does.
    pub(super) async fn start(client: &Client) -> anyhow::Result<Self> {
        let mut settled = client.results(Since::Now).await?.settled();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = settled.next() => event,
                    _ = &mut stopped => break,
                };
                let Ok(Some(event)) = event else { break };
                let ok = event.status == JobStatus::Succeeded;
                if tx.send((event.job_id, Instant::now(), ok)).is_err() {
                    break;
                }
            }
            settled.close().await;
        });
        Ok(Self {
            rx,
            seen: HashMap::new(),
            _stop: stop,
        })
    }

    /// When each of `ids` got its result (in the order of `ids`). Fails on a failed job (a bench
    /// figure over failed jobs means nothing) or after `patience`.
    pub(super) async fn wait_all(
        &mut self,
        ids: &[JobId],
        patience: Duration,
        bar: &ProgressBar,
    ) -> anyhow::Result<Vec<Instant>> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut missing = ids.iter().filter(|id| !self.seen.contains_key(id)).count();
        let wanted: std::collections::HashSet<&JobId> = ids.iter().collect();
        bar.set_position((ids.len() - missing) as u64);
        while missing > 0 {
            let Ok(next) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                bail!(
                    "{missing} of {} results missing after {patience:?}",
                    ids.len()
                );
            };
            let Some((id, at, ok)) = next else {
                bail!("the results stream closed");
            };
            if self.seen.insert(id, (at, ok)).is_none() && wanted.contains(&id) {
                missing -= 1;
                bar.inc(1);
            }
        }
        ids.iter()
            .map(|id| match self.seen[id] {
                (at, true) => Ok(at),
                (_, false) => bail!("job {id} failed; see `warren dlq list`"),
            })
            .collect()
    }
}

/// VmRSS and VmHWM of a process, in MiB, from `/proc/<pid>/status`.
pub(super) fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM in /proc/{pid}/status"),
    }
}

/// `error` with the last lines of the worker process's log at `log`: what the process said
/// before the measurement failed.
pub(super) fn with_log_tail(error: anyhow::Error, log: &std::path::Path) -> anyhow::Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    error.context(format!(
        "worker process log ({}): {}",
        log.display(),
        tail.join(" | ")
    ))
}
