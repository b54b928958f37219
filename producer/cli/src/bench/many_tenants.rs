//! S7t many tenants (the "S7"; `s7` here is the scale scenario): `--tenants` small
//! tenants submit one job at a time at a steady total rate (`--fair-load` of the worker's
//! capacity) while a flood set (`--fair-floods`, e.g. 3 tenants x 20,000 jobs, each in one
//! `submit_many`) lands. Each small tenant's p95 (submit to result) over the jobs it submitted
//! while the floods were in the system is compared with the idle p95 of the same load just
//! before: the share of tenants within 5x is the fairness figure. Each set runs on `fair_off`
//! (`hot_lanes = 0`, today's hash shards) and then on `fair` (the default hot lanes), and the
//! floods' finish time on `fair` is compared with `fair_off`'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_common::{JobId, Priority};
use warren_producer::{Client, Job};

use super::report::{Row, Target};
use super::scenarios::{jobs, quantile_ms, span};
use super::warren_side::Watcher;
use super::{Bench, FloodSet};

/// A small tenant is within bounds when its p95 under the floods is at most this multiple of
/// the idle p95.
const WITHIN: f64 = 5.0;

/// Load before the idle window that is not counted: the worker's consumers attaching, the
/// submitters' first connections.
const WARM_UP: Duration = Duration::from_secs(2);

/// Runs of a flood set so far in this invocation (all repeats): which pipeline goes first.
static SETS_RUN: AtomicUsize = AtomicUsize::new(0);

pub(super) async fn s7t(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    for &set in &b.args.fair_floods {
        let label = format!("{} floods x {}", set.tenants, set.jobs);
        // The second run of a pair meets a broker still compacting the first one's 60,000
        // messages, so the order alternates from one set (and repeat) to the next.
        let off_first = SETS_RUN.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
        let mut off = None;
        let mut on = None;
        for run_off in [off_first, !off_first] {
            if run_off {
                off = Some(
                    one_run(b, "fair_off", set)
                        .await
                        .with_context(|| format!("{label}, hot_lanes = 0"))?,
                );
            } else {
                on = Some(
                    one_run(b, "fair", set)
                        .await
                        .with_context(|| label.clone())?,
                );
            }
        }
        let (off, on) = (off.expect("ran"), on.expect("ran"));
        // The targets: 99% with a few floods, 95% with twenty.
        let share_target = if set.tenants < 10 { 99.0 } else { 95.0 };
        for (outcome, off_suffix) in [(&off, ", hot_lanes = 0"), (&on, "")] {
            let target = |t: Target| {
                if off_suffix.is_empty() {
                    t
                } else {
                    Target::Info
                }
            };
            let name = |what: &str| format!("{label}{off_suffix}: {what}");
            rows.push(Row::new(
                "S7t",
                name(&format!("tenants with p95 <= {WITHIN}x idle")),
                "%",
                outcome.latency.share_within(WITHIN),
                None,
                target(Target::AtLeast(share_target)),
            ));
            for (which, q) in [("median", 0.5), ("worst", 1.0)] {
                rows.push(Row::new(
                    "S7t",
                    name(&format!("{which} tenant's p95 vs idle p95")),
                    "ms",
                    outcome.latency.tenant_p95_quantile(q),
                    Some(outcome.latency.idle_p95),
                    Target::Info,
                ));
            }
            // The part of a small job's latency spent before its submit was confirmed: the
            // broker taking in the floods' publishes, which no lane choice changes. The share
            // again with latency counted from the confirm says what the lanes achieved.
            rows.push(Row::new(
                "S7t",
                name(&format!("tenants with p95 from confirm <= {WITHIN}x idle")),
                "%",
                outcome.after_confirm.share_within(WITHIN),
                None,
                Target::Info,
            ));
            rows.push(Row::new(
                "S7t",
                name("small jobs' submit confirm p95 vs idle"),
                "ms",
                outcome.confirm_p95,
                Some(outcome.idle_confirm_p95),
                Target::Info,
            ));
            rows.push(Row::new(
                "S7t",
                name("small tenants' load vs intended"),
                "jobs/s",
                outcome.load,
                Some(outcome.intended),
                Target::Info,
            ));
        }
        rows.push(Row::new(
            "S7t",
            format!("{label}, hot_lanes = 0: floods finished in"),
            "s",
            off.floods.as_secs_f64(),
            None,
            Target::Info,
        ));
        rows.push(Row::new(
            "S7t",
            format!("{label}: floods finished in vs hot_lanes = 0"),
            "s",
            on.floods.as_secs_f64(),
            Some(off.floods.as_secs_f64()),
            Target::RatioAtMost(1.1),
        ));
        // Why the floods may finish later with hot lanes: on hash shards the small tenants that
        // share a flood's shard wait behind it, and the floods take their share of the worker.
        // With hot lanes those tenants are served first, so the floods get only what is left.
        // The worker's throughput is the machinery's cost; the small tenants' rate is the share.
        rows.push(Row::new(
            "S7t",
            format!("{label}: small tenants' jobs/s while the floods ran vs hot_lanes = 0"),
            "jobs/s",
            on.small_rate_in_floods,
            Some(off.small_rate_in_floods),
            Target::Info,
        ));
        rows.push(Row::new(
            "S7t",
            format!("{label}: all jobs/s while the floods ran vs hot_lanes = 0"),
            "jobs/s",
            on.all_rate_in_floods,
            Some(off.all_rate_in_floods),
            Target::RatioAtLeast(0.9),
        ));
    }
    Ok(())
}

/// What one run of a flood set measured.
struct Outcome {
    /// Latency from the submit call to the result.
    latency: Shares,
    /// The same from the submit's confirm to the result.
    after_confirm: Shares,
    /// p95 of the submit confirm time (call to confirm) of the small jobs submitted in the idle
    /// window, and of those submitted while the floods were in the system, in ms.
    idle_confirm_p95: f64,
    confirm_p95: f64,
    /// From the start of the floods' submits to their last result.
    floods: Duration,
    /// Small tenants' jobs finished while the floods were in the system, per second: what the
    /// floods left to everyone else.
    small_rate_in_floods: f64,
    /// Every tenant's jobs (floods and small) finished in that window, per second: the
    /// worker's throughput, whichever lanes it served.
    all_rate_in_floods: f64,
    /// The small tenants' rate as submitted (from the idle window to the floods' end), and the
    /// rate asked for.
    load: f64,
    intended: f64,
}

/// Small tenants' latencies: the idle p95 and each tenant's p95 under the floods.
struct Shares {
    /// p95 of every small job submitted in the idle window, in ms.
    idle_p95: f64,
    /// Per small tenant with jobs submitted while the floods were in the system: their p95, ms.
    tenant_p95: Vec<f64>,
}

impl Shares {
    /// Each tenant's p95 of `busy`, and the p95 of `idle`.
    fn of(idle: &[Duration], busy: &HashMap<usize, Vec<Duration>>) -> Self {
        Self {
            idle_p95: quantile_ms(idle, 0.95),
            tenant_p95: busy.values().map(|l| quantile_ms(l, 0.95)).collect(),
        }
    }

    /// The share of small tenants whose p95 stayed within `times` the idle p95, in %.
    fn share_within(&self, times: f64) -> f64 {
        let within = self
            .tenant_p95
            .iter()
            .filter(|p| **p <= times * self.idle_p95)
            .count();
        100.0 * within as f64 / self.tenant_p95.len() as f64
    }

    /// The `q`-quantile of the tenants' p95s (nearest rank), in ms.
    fn tenant_p95_quantile(&self, q: f64) -> f64 {
        let as_durations: Vec<Duration> = self
            .tenant_p95
            .iter()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        quantile_ms(&as_durations, q)
    }
}

/// One flood set on `pipeline`: the small load alone (warm-up, then the idle window), then the
/// floods beside it until their last result, then the load stops and its last results come in.
async fn one_run(b: &Bench, pipeline: &str, set: FloodSet) -> anyhow::Result<Outcome> {
    let label = format!("S7t {}x{} {pipeline}", set.tenants, set.jobs);
    let capacity = f64::from(b.args.fair_concurrency) * 1000.0 / b.args.fair_work_ms.max(1) as f64;
    let intended = b.args.fair_load * capacity;
    // The flooding producers connect and their jobs are built before any clock runs.
    let mut flooders = Vec::with_capacity(set.tenants);
    for i in 0..set.tenants {
        let client = Arc::new(Client::connect(b.config.clone()).await?);
        let tenant = format!("flood{}x{}-{i}", set.tenants, set.jobs);
        let work_ms = b.args.fair_work_ms;
        let (batch, ids) = jobs(pipeline, &tenant, Priority::Normal, set.jobs, work_ms);
        flooders.push((client, batch, ids));
    }
    let flood_ids: Vec<JobId> = flooders
        .iter()
        .flat_map(|(_, _, ids)| ids.clone())
        .collect();

    b.settle().await;
    let mut watcher = Watcher::start(&b.client).await?;
    b.start_worker(
        pipeline,
        &b.queue(pipeline, "work", Priority::Normal, &tenant(0)),
    )
    .await?;
    let load = Load::start(b, pipeline, intended).await?;
    let bar = b.spinner(&format!("{label} idle load"));
    tokio::time::sleep(WARM_UP).await;
    let idle_from = Instant::now();
    tokio::time::sleep(b.args.fair_idle).await;
    bar.finish();

    let floods_started = Instant::now();
    let submits: Vec<JoinHandle<_>> = flooders
        .iter_mut()
        .map(|(client, batch, _)| {
            let (client, batch) = (client.clone(), std::mem::take(batch));
            tokio::spawn(async move { client.submit_many(batch).await })
        })
        .collect();
    let bar = b.bar(flood_ids.len(), &format!("{label} floods"));
    let waited = watcher.wait_all(&flood_ids, b.args.patience, &bar).await;
    bar.finish();
    let sent = load.stop().await;
    for submit in submits {
        submit.await.context("flood submit task")??;
    }
    for (client, _, _) in flooders {
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
    }
    let floods_done = waited?;
    let floods_end = floods_done.iter().max().copied().unwrap_or(floods_started);
    let sent = sent?;

    let small_ids: Vec<JobId> = sent.iter().map(|s| s.id).collect();
    let bar = b.bar(small_ids.len(), &format!("{label} small tenants' last"));
    let small_done = watcher.wait_all(&small_ids, b.args.patience, &bar).await?;
    bar.finish();
    b.stop_worker().await?;

    // Per job: from the call, before the confirm, and from the confirm.
    let (mut idle, mut busy) = ([vec![], vec![], vec![]], [HashMap::new(), HashMap::new()]);
    let mut busy_confirm = Vec::new();
    for (s, done) in sent.iter().zip(&small_done) {
        let spans = [
            done.saturating_duration_since(s.at),
            s.confirmed.saturating_duration_since(s.at),
            done.saturating_duration_since(s.confirmed),
        ];
        if s.at >= idle_from && s.at < floods_started {
            for (list, span) in idle.iter_mut().zip(spans) {
                list.push(span);
            }
        } else if s.at >= floods_started && s.at <= floods_end {
            busy[0]
                .entry(s.tenant)
                .or_insert_with(Vec::new)
                .push(spans[0]);
            busy[1]
                .entry(s.tenant)
                .or_insert_with(Vec::new)
                .push(spans[2]);
            busy_confirm.push(spans[1]);
        }
    }
    let counted = sent
        .iter()
        .filter(|s| s.at >= idle_from && s.at <= floods_end)
        .count();
    let window = floods_end.duration_since(floods_started).as_secs_f64();
    let small_in_floods = small_done
        .iter()
        .filter(|&&done| done >= floods_started && done <= floods_end)
        .count();
    Ok(Outcome {
        latency: Shares::of(&idle[0], &busy[0]),
        after_confirm: Shares::of(&idle[2], &busy[1]),
        idle_confirm_p95: quantile_ms(&idle[1], 0.95),
        confirm_p95: quantile_ms(&busy_confirm, 0.95),
        floods: span(floods_started, &floods_done),
        small_rate_in_floods: small_in_floods as f64 / window,
        all_rate_in_floods: (small_in_floods + floods_done.len()) as f64 / window,
        load: counted as f64 / floods_end.duration_since(idle_from).as_secs_f64(),
        intended,
    })
}

/// The name of small tenant `i`.
fn tenant(i: usize) -> String {
    format!("small-{i:04}")
}

/// One small job as submitted.
struct Sent {
    tenant: usize,
    id: JobId,
    /// When its `submit` call started, and when it returned (the publish confirmed).
    at: Instant,
    confirmed: Instant,
}

/// The small tenants' steady load: `--fair-submitters` tasks on a client of their own, each
/// serving its share of the tenants in turn, one `submit` at a time, evenly spaced so the total
/// is the intended rate (a task that falls behind catches up at once).
struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<Vec<Sent>>>>,
    client: Arc<Client>,
}

impl Load {
    async fn start(b: &Bench, pipeline: &str, rate: f64) -> anyhow::Result<Self> {
        let client = Arc::new(Client::connect(b.config.clone()).await?);
        let tenants = b.args.tenants.max(1);
        let submitters = b.args.fair_submitters.clamp(1, tenants);
        let interval = Duration::from_secs_f64(submitters as f64 / rate.max(1e-3));
        let (stop, stopped) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let tasks = (0..submitters)
            .map(|task| {
                let mine: Vec<usize> = (task..tenants).step_by(submitters).collect();
                // Staggered, so the submitters' ticks interleave evenly.
                let first = start + interval.mul_f64(task as f64 / submitters as f64);
                let (client, mut stopped) = (client.clone(), stopped.clone());
                let (pipeline, work_ms) = (pipeline.to_string(), b.args.fair_work_ms);
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    let mut next = first;
                    for &i in mine.iter().cycle() {
                        tokio::select! {
                            _ = tokio::time::sleep_until(next) => {}
                            _ = stopped.changed() => break,
                        }
                        let job = Job::new(&pipeline, tenant(i), json!({"work_ms": work_ms}));
                        let at = Instant::now();
                        let id = client.submit(job).await?;
                        let confirmed = Instant::now();
                        sent.push(Sent {
                            tenant: i,
                            id,
                            at,
                            confirmed,
                        });
                        next += interval;
                    }
                    Ok(sent)
                })
            })
            .collect();
        Ok(Self {
            stop,
            tasks,
            client,
        })
    }

    /// Stops the submitters; every job they submitted, in no particular order.
    async fn stop(self) -> anyhow::Result<Vec<Sent>> {
        let _ = self.stop.send(true);
        let mut sent = Vec::new();
        for task in self.tasks {
            sent.extend(task.await.context("small tenants' submit task")??);
        }
        if let Ok(client) = Arc::try_unwrap(self.client) {
            client.close().await;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_counts_tenants_within_bounds() {
        let outcome = Shares {
            idle_p95: 10.0,
            tenant_p95: vec![12.0, 50.0, 51.0, 400.0],
        };
        assert_eq!(outcome.share_within(5.0), 50.0);
        assert_eq!(outcome.tenant_p95_quantile(1.0), 400.0);
        assert_eq!(outcome.tenant_p95_quantile(0.5), 50.0);
    }

    #[test]
    fn flood_sets_parse() {
        let set: FloodSet = "3x20000".parse().unwrap();
        assert_eq!((set.tenants, set.jobs), (3, 20_000));
        assert!("3".parse::<FloodSet>().is_err());
        assert!("0x5".parse::<FloodSet>().is_err());
    }
}
