//! S8 caps: a step with `max_in_flight = 4` served by three worker processes (this binary,
//! `--serve-worker`), each able to run 4 at once. Every execution reports when it ran (the
//! bench's `span` handler), so the bench counts how many ran at once across the processes:
//! the peak (exactly the cap), the throughput against `cap / step time`, and, after one worker
//! is SIGKILLed mid-run, how long until the cap is whole again (the dead worker's tokens come
//! back with its connection).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::json;
use warren_broker::depth::Probe;
use warren_broker::{Names, StepRoute, TokenQueue, Topology};
use warren_common::{JobId, JobStatus, Priority};
use warren_producer::{Client, Job};

use super::report::{Row, Target};
use super::warren_side::with_log_tail;
use super::Bench;

const CAP: u32 = 4;
/// `tenant_max_in_flight` of the one-tenant backlog phase.
const TENANT_CAP: u32 = 2;
const WORKERS: usize = 3;
/// Results of the second phase seen before the kill: the cap is busy by then. The worker
/// killed is the one that ran the last of them.
const BEFORE_KILL: usize = 12;

/// When one execution ran, in µs of the system clock.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The most spans running at one instant, and the first instant at or after `from` when
/// `level` ran at once. An end and a start at the same instant do not overlap.
fn sweep(spans: &[Span], from: u64, level: usize) -> (usize, Option<u64>) {
    let mut edges: Vec<(u64, i32)> = spans
        .iter()
        .flat_map(|s| [(s.start, 1), (s.end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut peak, mut reached) = (0i32, 0usize, None);
    for (at, delta) in edges {
        now += delta;
        peak = peak.max(now as usize);
        if reached.is_none() && at >= from && now as usize >= level {
            reached = Some(at);
        }
    }
    (peak, reached)
}

pub(super) async fn s8(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let ns = format!("{}-s8", b.config.broker.namespace);
    let file = std::env::temp_dir().join(format!("{ns}.toml"));
    std::fs::write(
        &file,
        format!(
            "[[pipelines]]\nname = \"capped\"\nshards = 4\npriorities = [\"normal\"]\n\n\
             [[pipelines.steps]]\nname = \"work\"\nhandler = \"span\"\nconcurrency = {CAP}\n\
             max_in_flight = {CAP}\n\n\
             [[pipelines]]\nname = \"tcapped\"\nshards = 4\npriorities = [\"normal\"]\n\n\
             [[pipelines.steps]]\nname = \"work\"\nhandler = \"span\"\nconcurrency = {CAP}\n\
             timeout = \"10s\"\ntenant_max_in_flight = {TENANT_CAP}\n"
        ),
    )?;
    let config = super::scale::load_config(&b.config, &ns, &file)?;
    let plan = Topology::plan(&config);
    // From here on the bench deletes the namespace whatever happens.
    b.more_plans.lock().expect("lock").push(plan.clone());
    plan.declare(&b.admin).await?;
    let client = Client::connect(config.clone()).await?;
    let logs: Vec<_> = (0..WORKERS)
        .map(|i| std::env::temp_dir().join(format!("{ns}-worker-{i}.log")))
        .collect();
    let mut workers = Vec::new();
    for log in &logs {
        workers.push(b.worker_process(log, Some((&ns, &file)))?);
    }
    let measured = measure(b, &client, &config, &mut workers).await;
    for mut worker in workers {
        drop(worker.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), worker.wait())
            .await
            .is_err()
        {
            let _ = worker.kill().await;
        }
    }
    client.close().await;
    let deleted = plan.delete(&b.admin).await;
    // The tenant's token queue is made on first use, outside the plan.
    let tokens = TokenQueue::tenant(
        &Names::new(&ns),
        "tcapped",
        "work",
        "solo",
        TENANT_CAP,
        Duration::from_secs(10),
    );
    if let Ok(channel) = b.admin.channel().await {
        for name in [tokens.name(), tokens.marker_name()] {
            let _ = channel
                .queue_delete(name.as_str().into(), Default::default())
                .await;
        }
        let _ = channel.close(200, "done".into()).await;
    }
    let figures = match measured {
        Ok(f) => f,
        Err(e) => return Err(with_log_tail(e, &logs[1])),
    };
    deleted.context("deleting the S8 namespace")?;
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    let _ = std::fs::remove_file(&file);

    let nominal = f64::from(CAP) / (b.args.cap_step_ms as f64 / 1000.0);
    rows.push(Row::new(
        "S8",
        format!("peak at once, max_in_flight = {CAP}, {WORKERS} workers"),
        "steps",
        figures.peak as f64,
        None,
        Target::Exactly(f64::from(CAP)),
    ));
    rows.push(Row::new(
        "S8",
        format!("throughput vs cap / step time ({} ms)", b.args.cap_step_ms),
        "jobs/s",
        figures.throughput,
        Some(nominal),
        Target::RatioAtLeast(0.9),
    ));
    let tenant_nominal = f64::from(TENANT_CAP) / (b.args.tenant_cap_step_ms as f64 / 1000.0);
    rows.push(Row::new(
        "S8",
        format!(
            "one tenant's backlog of {}, tenant_max_in_flight = {TENANT_CAP}: peak at once",
            b.args.tenant_cap_jobs
        ),
        "steps",
        figures.tenant_peak as f64,
        None,
        Target::Exactly(f64::from(TENANT_CAP)),
    ));
    rows.push(Row::new(
        "S8",
        format!(
            "its throughput vs tenant cap / step time ({} ms)",
            b.args.tenant_cap_step_ms
        ),
        "jobs/s",
        figures.tenant_throughput,
        Some(tenant_nominal),
        Target::RatioAtLeast(0.8),
    ));
    rows.push(Row::new(
        "S8",
        "peak at once around a worker's SIGKILL",
        "steps",
        figures.peak_after_kill as f64,
        None,
        Target::Exactly(f64::from(CAP)),
    ));
    rows.push(Row::new(
        "S8",
        "steps the killed worker was running",
        "steps",
        figures.killed_held as f64,
        None,
        Target::Info,
    ));
    rows.push(Row::new(
        "S8",
        "SIGKILL to the cap whole again",
        "s",
        figures.recovery.as_secs_f64(),
        None,
        Target::Below(10.0),
    ));
    Ok(())
}

struct Figures {
    peak: usize,
    throughput: f64,
    /// One tenant's backlog under its tenant cap.
    tenant_peak: usize,
    tenant_throughput: f64,
    /// Steps (so tokens) the killed worker was running when it was killed.
    killed_held: usize,
    peak_after_kill: usize,
    recovery: Duration,
}

async fn measure(
    b: &Bench,
    client: &Client,
    config: &warren_common::Config,
    workers: &mut [tokio::process::Child],
) -> anyhow::Result<Figures> {
    let pipeline = config.pipeline("capped").context("S8 pipeline")?;
    let queue = StepRoute::for_tenant(pipeline, "work", Priority::Normal, "any")
        .queue(&Names::new(&config.broker.namespace));
    every_worker_consumes(b, &queue).await?;
    let (n, work_ms) = (b.args.cap_jobs, b.args.cap_step_ms);
    let running_dir = std::env::temp_dir().join(format!("{}-running", config.broker.namespace));
    std::fs::create_dir_all(&running_dir)?;
    let dir = running_dir.to_string_lossy().into_owned();
    // Phase 0: one tenant's backlog under its tenant cap, every worker alive.
    let tcapped = config.pipeline("tcapped").context("S8 tenant pipeline")?;
    let tqueue = StepRoute::for_tenant(tcapped, "work", Priority::Normal, "solo")
        .queue(&Names::new(&config.broker.namespace));
    every_worker_consumes(b, &tqueue).await?;
    let batch: Vec<Job> = (0..b.args.tenant_cap_jobs)
        .map(|_| {
            let input = json!({"work_ms": b.args.tenant_cap_step_ms});
            Job::new("tcapped", "solo", input)
        })
        .collect();
    let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
    let mut waiting = client.wait_all(&ids, b.args.patience).await?;
    client.submit_many(batch).await?;
    let spans = collect(&mut waiting, ids.len()).await?;
    waiting.close().await;
    let (tenant_peak, _) = sweep(&spans, 0, TENANT_CAP as usize);
    let tenant_throughput = throughput_of(&spans);

    let jobs = |phase: usize| -> Vec<Job> {
        (0..n)
            .map(|i| {
                // Tenants spread over the shards, so every consumer has work.
                let tenant = format!("t{}", i % 16);
                let input = json!({"phase": phase, "work_ms": work_ms, "running_dir": dir});
                Job::new("capped", &tenant, input)
            })
            .collect()
    };

    // Phase 1: a backlog, drained under the cap.
    let batch = jobs(1);
    let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
    let mut waiting = client.wait_all(&ids, b.args.patience).await?;
    client.submit_many(batch).await?;
    let spans = collect(&mut waiting, ids.len()).await?;
    waiting.close().await;
    let (peak, _) = sweep(&spans, 0, CAP as usize);
    let throughput = throughput_of(&spans);

    // Phase 2: the same, and one worker killed once the cap is busy.
    let batch = jobs(2);
    let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
    let mut waiting = client.wait_all(&ids, b.args.patience).await?;
    client.submit_many(batch).await?;
    let mut spans = collect(&mut waiting, BEFORE_KILL.min(ids.len())).await?;
    // The process running the most steps right now: it holds that many tokens.
    let (busy, held) = busiest(&running_dir).await?;
    let doomed = workers
        .iter_mut()
        .find(|w| w.id().is_some_and(|pid| u64::from(pid) == busy))
        .context("the worker running steps")?;
    doomed.start_kill().context("SIGKILL a worker")?;
    let killed_at = now_us();
    let rest = ids.len() - spans.len();
    spans.extend(collect(&mut waiting, rest).await?);
    waiting.close().await;
    let _ = std::fs::remove_dir_all(&running_dir);
    let (peak_after_kill, whole) = sweep(&spans, killed_at, CAP as usize);
    let Some(whole) = whole else {
        bail!("the cap never ran {CAP} at once after the kill");
    };
    Ok(Figures {
        peak,
        throughput,
        tenant_peak,
        tenant_throughput,
        killed_held: held,
        peak_after_kill,
        recovery: Duration::from_micros(whole.saturating_sub(killed_at)),
    })
}

/// Executions per second from the first start to the last end.
fn throughput_of(spans: &[Span]) -> f64 {
    let first = spans.iter().map(|s| s.start).min().unwrap_or(0);
    let last = spans.iter().map(|s| s.end).max().unwrap_or(0);
    spans.len() as f64 / (last.saturating_sub(first) as f64 / 1e6).max(1e-9)
}

/// The worker process with the most steps running now (files in `dir` named `<pid>.<job>`),
/// and how many it runs; waits until some process runs one.
async fn busiest(dir: &std::path::Path) -> anyhow::Result<(u64, usize)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut counts = std::collections::HashMap::<u64, usize>::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.split('.').next().and_then(|p| p.parse().ok()) {
                *counts.entry(pid).or_default() += 1;
            }
        }
        if let Some((pid, n)) = counts.into_iter().max_by_key(|(_, n)| *n) {
            return Ok((pid, n));
        }
        if std::time::Instant::now() > deadline {
            bail!("no worker is running a step");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the S8 step queue has a consumer from each worker process.
async fn every_worker_consumes(b: &Bench, queue: &str) -> anyhow::Result<()> {
    let mut probe = Probe::new(&b.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        match probe.read(queue).await {
            Ok(Some(c)) if c.consumers as usize >= WORKERS => break Ok(()),
            Err(e) => break Err(e.into()),
            _ if tokio::time::Instant::now() > deadline => {
                break Err(anyhow::anyhow!(
                    "{WORKERS} workers did not all consume {queue}"
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    probe.close().await;
    outcome
}

/// The spans of the next `n` results.
async fn collect(waiting: &mut warren_producer::Waiting, n: usize) -> anyhow::Result<Vec<Span>> {
    let mut spans = Vec::with_capacity(n);
    while spans.len() < n {
        let Some(event) = waiting.next().await? else {
            bail!("{} of the S8 results missing", n - spans.len());
        };
        if event.status != JobStatus::Succeeded {
            bail!("S8 job {} failed: {:?}", event.job_id, event.error);
        }
        let at = |key: &str| event.output.get(key).and_then(serde_json::Value::as_u64);
        match (at("start_us"), at("end_us")) {
            (Some(start), Some(end)) => spans.push(Span { start, end }),
            _ => bail!("S8 job {} has no span: {}", event.job_id, event.output),
        }
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_counts_overlaps_and_finds_the_level() {
        let s = |start, end| Span { start, end };
        // Touching spans do not overlap; 3 at once during 25..30.
        let spans = [s(0, 10), s(10, 30), s(20, 40), s(25, 35)];
        assert_eq!(sweep(&spans, 0, 3), (3, Some(25)));
        assert_eq!(sweep(&spans, 26, 3), (3, None));
        assert_eq!(sweep(&spans, 0, 2), (3, Some(20)));
        assert_eq!(sweep(&[], 0, 1), (0, None));
    }
}
