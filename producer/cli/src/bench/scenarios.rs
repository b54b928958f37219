//! The scenarios. Each measures warren and its baseline in the same invocation, close together
//! in time, so both see the same broker and the same machine load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use warren_broker::Lane;
use warren_common::{JobId, Priority};
use warren_producer::Job;

use super::raw::{Done, Hop};
use super::report::{Row, Target};
use super::warren_side::{memory_mib, with_log_tail, Watcher};
use super::{Bench, HistoryMode, Scenario};

pub(super) async fn run_once(b: &Bench) -> anyhow::Result<Vec<Row>> {
    let mut scenarios = b.args.scenarios.clone();
    scenarios.sort();
    scenarios.dedup();
    let mut rows = Vec::new();
    for scenario in scenarios {
        match scenario {
            Scenario::S1 | Scenario::S2 if b.args.history() == HistoryMode::Both => {
                history_pair(b, scenario, &mut rows).await
            }
            Scenario::S1 => s1(b, &mut rows).await,
            Scenario::S2 => s2(b, &mut rows).await,
            Scenario::S3 => noisy_neighbour(b, &mut rows, false).await,
            Scenario::S3c => super::collider::s3c(b, &mut rows).await,
            Scenario::S4 => noisy_neighbour(b, &mut rows, true).await,
            Scenario::S5 => s5(b, &mut rows).await,
            Scenario::S6 => s6(b, &mut rows).await,
            Scenario::S7 => super::scale::s7(b, &mut rows).await,
            Scenario::S8 => super::caps::s8(b, &mut rows).await,
            Scenario::S7t => super::many_tenants::s7t(b, &mut rows).await,
            Scenario::S9 => super::fanout::s9(b, &mut rows).await,
        }
        .with_context(|| format!("scenario {scenario:?}"))?;
    }
    Ok(rows)
}

/// The cost target of job history: S1 and S2 with it on at least this fraction of off.
const HISTORY_COST_TARGET: f64 = 0.85;

/// History pairs of S1 and of S2 run so far in this invocation (all repeats): which mode goes
/// first.
static PAIRS_RUN: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// `--history both`: S1 or S2 with history off, then on, each row of both, and a row of their
/// ratio (on over off) per figure, held to [`HISTORY_COST_TARGET`] where the figure has a
/// target of its own.
async fn history_pair(b: &Bench, scenario: Scenario, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut runs = [Vec::new(), Vec::new()];
    // The second run meets a broker still compacting the first one's messages, so which mode
    // goes first alternates from one pair (and repeat) to the next.
    let counter = &PAIRS_RUN[usize::from(scenario != Scenario::S1)];
    let on_first = counter.fetch_add(1, Ordering::Relaxed) % 2 == 1;
    for on in [on_first, !on_first] {
        let out = &mut runs[usize::from(on)];
        b.set_history(on);
        let ran = match scenario {
            Scenario::S1 => s1(b, out).await,
            _ => s2(b, out).await,
        };
        b.set_history(true);
        ran?;
    }
    let [off, on] = runs;
    for (off, on) in off.into_iter().zip(on) {
        let tagged = |row: &Row, mode: &str| {
            Row::new(
                row.scenario,
                format!("{} [history {mode}]", row.metric),
                row.unit,
                row.warren,
                row.baseline,
                row.target,
            )
        };
        rows.push(tagged(&off, "off"));
        rows.push(tagged(&on, "on"));
        let target = match off.target {
            Target::Info => Target::Info,
            _ => Target::RatioAtLeast(HISTORY_COST_TARGET),
        };
        rows.push(Row::new(
            off.scenario,
            format!("{}: history on vs off", off.metric),
            off.unit,
            on.warren,
            Some(off.warren),
            target,
        ));
    }
    Ok(())
}

pub(super) fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q`-quantile (0..=1) of some durations, in ms (nearest rank).
pub(super) fn quantile_ms(times: &[Duration], q: f64) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

pub(super) fn jobs(
    pipeline: &str,
    tenant: &str,
    priority: Priority,
    n: usize,
    work_ms: u64,
) -> (Vec<Job>, Vec<JobId>) {
    let jobs: Vec<Job> = (0..n)
        .map(|i| Job::new(pipeline, tenant, json!({"n": i, "work_ms": work_ms})).priority(priority))
        .collect();
    let ids = jobs.iter().map(|j| j.id).collect();
    (jobs, ids)
}

/// Single jobs per [`one_at_a_time`] probe in S3/S4.
const SINGLE_JOBS: usize = 20;

/// The metric of S1's drain row, which S3 compares its flood's drain rate with.
pub(super) const S1_DRAIN: &str = "drain vs raw relay";

/// The metric of S1's submit row, which S9 composes with its drain.
pub(super) const S1_SUBMIT: &str = "submit_many vs raw publish";

/// How long after `start` the last of `done` came.
pub(super) fn span(start: Instant, done: &[Instant]) -> Duration {
    done.iter()
        .max()
        .map_or(Duration::ZERO, |last| last.saturating_duration_since(start))
}

/// Rounds S1's raw publish and warren submit take turns in.
const PUBLISH_ROUNDS: usize = 4;

/// S1: bulk submit vs raw publish with the same confirm window, in turns; drain of a backlog by
/// a worker vs raw consume+ack and raw relay (consume, publish a result with confirm, ack; done when the
/// result is read from the raw results stream, as warren's are).
async fn s1(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = b.args.jobs;
    let (pipeline, step, tenant) = ("one", "noop", "bulk");
    let (raw_queue, raw_key) = b.raw.route(pipeline, step, Priority::Normal, tenant);

    // The two sides publish in turns, each round into its own queue and the order swapped
    // every round (raw, warren, warren, raw, ...), so a slow spell of the broker (a log flush,
    // a snapshot) falls on both alike; a side's rate is over its rounds.
    let (batch, ids) = jobs(pipeline, tenant, Priority::Normal, n, 0);
    let mut watcher = Watcher::start(&b.client).await?;
    b.settle().await;
    let bar = b.spinner("S1 raw publish and warren submit, in turns");
    let (mut raw_publish, mut warren_submit) = (Duration::ZERO, Duration::ZERO);
    for (i, round) in batch.chunks(n.div_ceil(PUBLISH_ROUNDS).max(1)).enumerate() {
        if i % 2 == 0 {
            raw_publish += b.raw.publish(&raw_key, round.len()).await?;
        }
        let jobs = round.to_vec();
        // submit_many publishes from a task of its own, as the raw side does (docs/bench.md,
        // "Why S1's submit ratio swung").
        let started = Instant::now();
        b.client().submit_many(jobs).await?;
        warren_submit += started.elapsed();
        if i % 2 == 1 {
            raw_publish += b.raw.publish(&raw_key, round.len()).await?;
        }
    }
    bar.finish_with_message(format!(
        "raw {:.0} msg/s, warren {:.0} jobs/s",
        rate(n, raw_publish),
        rate(n, warren_submit)
    ));

    let only_ack = vec![Hop {
        queue: raw_queue,
        next: None,
    }];
    b.settle().await;
    let bar = b.bar(n, "S1 raw consume+ack");
    let raw_ack = b
        .raw
        .drain(only_ack, n, b.prefetch(), Done::Acked, bar.clone())
        .await?;
    bar.finish();

    b.settle().await;
    let start = b
        .start_worker(pipeline, &b.queue(pipeline, step, Priority::Normal, tenant))
        .await?;
    let bar = b.bar(n, "S1 warren drain");
    let done = watcher.wait_all(&ids, b.args.patience, &bar).await?;
    bar.finish();
    let warren_drain = span(start, &done);
    b.stop_worker().await?;

    // The relay needs the backlog again.
    let raw_relay = raw_relay(b, pipeline, tenant, n, "S1 raw relay").await?;

    let drain = rate(n, warren_drain);
    rows.push(Row::new(
        "S1",
        S1_SUBMIT,
        "jobs/s",
        rate(n, warren_submit),
        Some(rate(n, raw_publish)),
        Target::RatioAtLeast(0.8),
    ));
    rows.push(Row::new(
        "S1",
        S1_DRAIN,
        "jobs/s",
        drain,
        Some(rate(n, raw_relay)),
        Target::RatioAtLeast(0.8),
    ));
    rows.push(Row::new(
        "S1",
        "drain vs raw consume+ack",
        "jobs/s",
        drain,
        Some(rate(n, raw_ack)),
        Target::Info,
    ));
    Ok(())
}

/// S2: a backlog through three no-op steps vs a raw 3-hop relay.
async fn s2(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = b.args.chain_jobs;
    let (pipeline, tenant) = ("chain", "chain");
    let raw = raw_relay(b, pipeline, tenant, n, "S2 raw 3-hop relay").await?;

    let (batch, ids) = jobs(pipeline, tenant, Priority::Normal, n, 0);
    let mut watcher = Watcher::start(&b.client).await?;
    b.client().submit_many(batch).await?;
    b.settle().await;
    let start = b
        .start_worker(pipeline, &b.queue(pipeline, "a", Priority::Normal, tenant))
        .await?;
    let bar = b.bar(n, "S2 warren 3-step chain");
    let done = watcher.wait_all(&ids, b.args.patience, &bar).await?;
    bar.finish();
    b.stop_worker().await?;
    rows.push(Row::new(
        "S2",
        "3-step chain vs raw 3-hop relay",
        "jobs/s",
        rate(n, span(start, &done)),
        Some(rate(n, raw)),
        Target::RatioAtLeast(0.8),
    ));
    Ok(())
}

/// Times a raw relay of `n` messages through the steps of `pipeline` ([`Raw::relay`]), done
/// when their results are read. The messages are published to the first step before, untimed.
///
/// [`Raw::relay`]: super::raw::Raw::relay
async fn raw_relay(
    b: &Bench,
    pipeline: &str,
    tenant: &str,
    n: usize,
    label: &str,
) -> anyhow::Result<Duration> {
    let (first, hops) = b.raw.relay(pipeline, tenant);
    b.raw.publish(&first, n).await?;
    b.settle().await;
    let bar = b.bar(n, label);
    let took = b
        .raw
        .drain(hops, n, b.prefetch(), Done::ResultRead, bar.clone())
        .await?;
    bar.finish();
    Ok(took)
}

/// A tenant whose jobs take `lane` of the `work` pipeline (`same`) or another one.
fn tenant_near(b: &Bench, prefix: &str, lane: Lane, same: bool) -> String {
    tenant_near_in(b, "work", prefix, lane, same)
}

/// A tenant whose jobs take `lane` of `pipeline` (`same`) or another one.
pub(super) fn tenant_near_in(
    b: &Bench,
    pipeline: &str,
    prefix: &str,
    lane: Lane,
    same: bool,
) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|t| (b.lane_in(pipeline, t) == lane) == same)
        .expect("some tenant hashes there")
}

/// S3 (`priority` false): a small tenant on another shard than a noisy tenant's backlog. S4
/// (`priority` true): the backlog is `low`, the small tenant's jobs `high` on the same shard.
/// Each is compared with the small tenant's latency on the idle system, measured just before.
async fn noisy_neighbour(b: &Bench, rows: &mut Vec<Row>, priority: bool) -> anyhow::Result<()> {
    let name = if priority { "S4" } else { "S3" };
    let label = name;
    let pipeline = "work";
    let noisy = "noisy";
    let small = tenant_near(
        b,
        if priority { "urgent" } else { "small" },
        b.lane(noisy),
        priority,
    );
    let (flood_priority, small_priority) = if priority {
        (Priority::Low, Priority::High)
    } else {
        (Priority::Normal, Priority::Normal)
    };
    let mut watcher = Watcher::start(&b.client).await?;
    b.start_worker(pipeline, &b.queue(pipeline, "work", flood_priority, noisy))
        .await?;

    // A first batch, not counted: the first jobs after a worker starts (and after earlier
    // scenarios) wait on one-off work (consumers still attaching, the results reader catching
    // up), which is no part of an idle system's latency.
    small_batch(
        b,
        &mut watcher,
        pipeline,
        &small,
        small_priority,
        &format!("{label} warm-up"),
    )
    .await?;
    let (idle, idle_single) = small_tenant(
        b,
        &mut watcher,
        &small,
        small_priority,
        &format!("{label} idle"),
    )
    .await?;

    let (flood, flood_ids) = jobs(
        pipeline,
        noisy,
        flood_priority,
        b.args.flood,
        b.args.work_ms,
    );
    let bar = b.spinner(&format!("{label} noisy tenant submit"));
    let flood_started = Instant::now();
    b.client.submit_many(flood).await?;
    let flood_submitted = Instant::now();
    bar.finish();
    let (busy, busy_single) = small_tenant(
        b,
        &mut watcher,
        &small,
        small_priority,
        &format!("{label} in flood"),
    )
    .await?;
    let bar = b.bar(flood_ids.len(), &format!("{label} noisy tenant drain"));
    let flood_done = watcher.wait_all(&flood_ids, b.args.patience, &bar).await?;
    bar.finish();
    b.stop_worker().await?;

    let p95_target = if priority {
        Target::RatioAtMostAndBelow(5.0, 14.0)
    } else {
        Target::RatioAtMost(5.0)
    };
    let (p50, p95, single) = if priority {
        (
            "high p50 under low flood vs idle",
            "high p95 under low flood vs idle",
            "one high job at a time: p95 under flood vs idle",
        )
    } else {
        (
            "other-shard p50 under flood vs idle",
            "other-shard p95 under flood vs idle",
            "one job at a time: p95 under flood vs idle",
        )
    };
    rows.push(Row::new(
        name,
        p50,
        "ms",
        quantile_ms(&busy, 0.5),
        Some(quantile_ms(&idle, 0.5)),
        Target::Info,
    ));
    rows.push(Row::new(
        name,
        p95,
        "ms",
        quantile_ms(&busy, 0.95),
        Some(quantile_ms(&idle, 0.95)),
        p95_target,
    ));
    rows.push(Row::new(
        name,
        single,
        "ms",
        quantile_ms(&busy_single, 0.95),
        Some(quantile_ms(&idle_single, 0.95)),
        Target::Info,
    ));
    let drained_in = span(flood_started, &flood_done);
    rows.push(Row::new(
        name,
        "noisy tenant's backlog drained in",
        "s",
        drained_in.as_secs_f64(),
        None,
        Target::Info,
    ));
    if !priority {
        // The second S3 target: the flood's backlog (1 ms of work per job) drains at least
        // 0.8x as fast as S1's no-op backlog, when S1 ran too. Like S1's, this drain has no
        // submit running beside it: it counts the jobs still to do once the submit returned,
        // from then on. (The figure above includes the submit, which shares the broker.)
        let s1_drain = rows
            .iter()
            .find(|r| r.scenario == "S1" && r.metric == S1_DRAIN)
            .map(|r| r.warren);
        let left = flood_done
            .iter()
            .filter(|at| **at > flood_submitted)
            .count();
        rows.push(Row::new(
            name,
            "noisy drain (after submit) vs S1 drain",
            "jobs/s",
            rate(left, span(flood_submitted, &flood_done)),
            s1_drain,
            if s1_drain.is_some() {
                Target::RatioAtLeast(0.8)
            } else {
                Target::Info
            },
        ));
    }
    Ok(())
}

/// The small tenant's two probes: a batch, then jobs one at a time.
async fn small_tenant(
    b: &Bench,
    watcher: &mut Watcher,
    tenant: &str,
    priority: Priority,
    label: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let batch = small_batch(
        b,
        watcher,
        "work",
        tenant,
        priority,
        &format!("{label}, small tenant"),
    )
    .await?;
    let singles = one_at_a_time(
        b,
        watcher,
        tenant,
        priority,
        &format!("{label}, one job at a time"),
    )
    .await?;
    Ok((batch, singles))
}

/// Jobs in a row, each submitted once the one before has its result: the latency of a single
/// job, without the queueing behind its own batch that [`small_batch`] includes.
async fn one_at_a_time(
    b: &Bench,
    watcher: &mut Watcher,
    tenant: &str,
    priority: Priority,
    label: &str,
) -> anyhow::Result<Vec<Duration>> {
    let bar = b.bar(SINGLE_JOBS, label);
    let mut times = Vec::with_capacity(SINGLE_JOBS);
    for _ in 0..SINGLE_JOBS {
        let (mut batch, ids) = jobs("work", tenant, priority, 1, b.args.work_ms);
        let started = Instant::now();
        b.client.submit(batch.remove(0)).await?;
        let done = watcher.wait_all(&ids, b.args.patience, &bar).await?;
        times.push(span(started, &done));
    }
    bar.finish();
    Ok(times)
}

/// The small tenant's batch: latency of each job from the submit to its result.
pub(super) async fn small_batch(
    b: &Bench,
    watcher: &mut Watcher,
    pipeline: &str,
    tenant: &str,
    priority: Priority,
    label: &str,
) -> anyhow::Result<Vec<Duration>> {
    let (batch, ids) = jobs(pipeline, tenant, priority, b.args.small, b.args.work_ms);
    let bar = b.bar(ids.len(), label);
    let started = Instant::now();
    b.client.submit_many(batch).await?;
    let done = watcher.wait_all(&ids, b.args.patience, &bar).await?;
    bar.finish();
    Ok(done
        .iter()
        .map(|at| at.saturating_duration_since(started))
        .collect())
}

/// S5: one job at a time on an idle worker, submit to result, vs a raw publish (with confirm)
/// to consume round trip.
async fn s5(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let m = b.args.latency_jobs;
    let (pipeline, step, tenant) = ("one", "noop", "latency");
    let mut watcher = Watcher::start(&b.client).await?;
    b.start_worker(pipeline, &b.queue(pipeline, step, Priority::Normal, tenant))
        .await?;
    let bar = b.bar(m, "S5 warren one at a time");
    let mut warren = Vec::with_capacity(m);
    for i in 0..m {
        let job = Job::new(pipeline, tenant, json!({"n": i}));
        let started = Instant::now();
        let id = b.client.submit(job).await?;
        let done = watcher.wait_all(&[id], b.args.patience, &bar).await?;
        warren.push(span(started, &done));
    }
    bar.finish();
    b.stop_worker().await?;

    let (queue, key) = b.raw.route(pipeline, step, Priority::Normal, tenant);
    let bar = b.bar(m, "S5 raw round trips");
    let raw = b
        .raw
        .round_trips(&queue, &key, m, b.prefetch(), bar.clone())
        .await?;
    bar.finish();
    rows.push(Row::new(
        "S5",
        "submit to result p50 vs raw round trip",
        "ms",
        quantile_ms(&warren, 0.5),
        Some(quantile_ms(&raw, 0.5)),
        Target::RatioAtMost(2.0),
    ));
    rows.push(Row::new(
        "S5",
        "submit to result p99 vs raw round trip",
        "ms",
        quantile_ms(&warren, 0.99),
        Some(quantile_ms(&raw, 0.99)),
        Target::Info,
    ));
    Ok(())
}

/// S6: a worker process (this binary, `--serve-worker`): VmRSS when idle, and VmHWM (peak
/// RSS) after it drained S1's load.
async fn s6(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = b.args.jobs;
    let (pipeline, step, tenant) = ("one", "noop", "memory");
    let log = std::env::temp_dir().join(format!("{}-worker.log", b.config.broker.namespace));
    let pid = b.spawn_worker_process(&log, None)?;
    let measured = async {
        super::warren_side::consuming(
            &b.admin,
            &b.queue(pipeline, step, Priority::Normal, tenant),
            Duration::from_secs(60),
        )
        .await?;
        // Let start-up allocations settle before calling it idle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle, _) = memory_mib(pid)?;
        let (batch, ids) = jobs(pipeline, tenant, Priority::Normal, n, 0);
        let mut watcher = Watcher::start(&b.client).await?;
        let bar = b.bar(n, "S6 worker process load");
        let started = Instant::now();
        b.client.submit_many(batch).await?;
        let done = watcher.wait_all(&ids, b.args.patience, &bar).await?;
        bar.finish();
        let (_, peak) = memory_mib(pid)?;
        Ok::<_, anyhow::Error>((idle, peak, rate(n, span(started, &done))))
    }
    .await;
    b.stop_worker_process().await;
    let (idle, peak, rate) = match measured {
        Ok(m) => m,
        Err(e) => return Err(with_log_tail(e, &log)),
    };
    let _ = std::fs::remove_file(&log);
    rows.push(Row::new(
        "S6",
        "worker process RSS idle",
        "MiB",
        idle,
        None,
        Target::Below(20.0),
    ));
    rows.push(Row::new(
        "S6",
        "worker process RSS peak (VmHWM), S1 load",
        "MiB",
        peak,
        None,
        Target::Below(64.0),
    ));
    rows.push(Row::new(
        "S6",
        "worker process, submit and drain together",
        "jobs/s",
        rate,
        None,
        Target::Info,
    ));
    Ok(())
}
