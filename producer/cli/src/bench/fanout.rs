//! S9: one job whose step fans out to `--fanout-parts` one-step no-op parts, joined by the step
//! after it, `--fanout-runs` times; the median run is reported. Its baseline is S1's drain in
//! the same invocation: a fan-out's parts should move about as fast as a backlog of plain jobs.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use warren_common::{JobId, JobStatus, Priority};
use warren_producer::{Job, Since};

use super::report::{Row, Target};
use super::scenarios::{rate, S1_DRAIN, S1_SUBMIT};
use super::warren_side::{now_us, FanNotes, FAN_NOTES};
use super::Bench;

/// The pipelines S9 adds to the bench config: `fan: plan (fan-out to part) -> join`, and
/// `part: stamp`, on the bench's step concurrency.
pub(super) fn toml(concurrency: u16) -> String {
    format!(
        r#"
[[pipelines]]
name = "fan"
shards = 1
priorities = ["normal"]

[[pipelines.steps]]
name = "plan"
handler = "plan"
fan_out = "part"
max_attempts = 1

[[pipelines.steps]]
name = "join"
handler = "join"
max_attempts = 1

[[pipelines]]
name = "part"
shards = 4
priorities = ["normal"]

[[pipelines.steps]]
name = "stamp"
handler = "stamp"
concurrency = {concurrency}
max_attempts = 1
"#
    )
}

/// One fan-out's figures.
struct Run {
    /// Parts per second from the fan-out step's return to the last part's result read, as S1's
    /// drain is timed to its last result read.
    parts_per_s: f64,
    /// From the last part's end to the join's start.
    gap_ms: f64,
}

pub(super) async fn s9(b: &Bench, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = b.args.fanout_parts;
    let runs = b.args.fanout_runs.max(1);
    *FAN_NOTES.lock().expect("lock") = Some(FanNotes::default());
    b.start_worker_all(&b.queue("fan", "plan", Priority::Normal, "fan"))
        .await?;
    let mut figures = Vec::with_capacity(runs);
    let mut parents = Vec::with_capacity(runs);
    for i in 0..runs {
        b.settle().await;
        let bar = b.bar(n, &format!("S9 fan-out {} of {runs}", i + 1));
        let (run, parent) = one(b, n, &bar).await?;
        bar.finish_with_message(format!("{:.0} parts/s", run.parts_per_s));
        figures.push(run);
        parents.push(parent);
    }
    // Drained: a join that runs twice has run twice by now (or is lost with the worker, and
    // then it had run once: a repeat needs a crash).
    b.stop_worker().await?;
    // The raw program's fan-out on S1's queue: the most the broker gives a fan-out here, where
    // the parts' publishing and their relay share its CPU.
    let (first, hops) = b.raw.relay("one", "bulk");
    let mut raw_rates = Vec::with_capacity(runs);
    for i in 0..runs {
        b.settle().await;
        let bar = b.bar(n, &format!("S9 raw fan-out {} of {runs}", i + 1));
        let took = b
            .raw
            .fan_out(&first, hops.clone(), n, b.prefetch(), bar.clone())
            .await?;
        bar.finish();
        raw_rates.push(rate(n, took));
    }
    let notes = FAN_NOTES.lock().expect("lock").take().unwrap_or_default();
    let joins = parents
        .iter()
        .map(|p| notes.join_starts_us.get(p).map_or(0, Vec::len))
        .max()
        .unwrap_or(0);

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let s1 = |metric: &str| {
        rows.iter()
            .find(|r| r.scenario == "S1" && r.metric == metric)
    };
    let s1_drain = s1(S1_DRAIN).map(|r| r.warren);
    let s1_raw_relay = s1(S1_DRAIN).and_then(|r| r.baseline);
    // A fan-out's clock holds both the parts' publishing and their drain; S1 times the two
    // apart. Their serial sum is what a like-for-like baseline would be.
    let s1_submit_then_drain = s1(S1_SUBMIT)
        .map(|r| r.warren)
        .zip(s1_drain)
        .map(|(submit, drain)| 1.0 / (1.0 / submit + 1.0 / drain));
    let parts_per_s = median(figures.iter().map(|r| r.parts_per_s).collect());
    let raw_parts_per_s = median(raw_rates);
    rows.push(Row::new(
        "S9",
        format!("{n}-part fan-out vs S1 drain"),
        "parts/s",
        parts_per_s,
        s1_drain,
        if s1_drain.is_some() {
            Target::RatioAtLeast(0.8)
        } else {
            Target::Info
        },
    ));
    rows.push(Row::new(
        "S9",
        format!("{n}-part fan-out vs S1 submit then drain"),
        "parts/s",
        parts_per_s,
        s1_submit_then_drain,
        Target::Info,
    ));
    rows.push(Row::new(
        "S9",
        format!("{n}-part fan-out vs raw fan-out"),
        "parts/s",
        parts_per_s,
        Some(raw_parts_per_s),
        Target::RatioAtLeast(0.8),
    ));
    rows.push(Row::new(
        "S9",
        "raw fan-out vs raw relay (S1's drain baseline)",
        "parts/s",
        raw_parts_per_s,
        s1_raw_relay,
        Target::Info,
    ));
    rows.push(Row::new(
        "S9",
        "last part end to join start, p50",
        "ms",
        median(figures.iter().map(|r| r.gap_ms).collect()),
        None,
        Target::Info,
    ));
    rows.push(Row::new(
        "S9",
        "joins per fan-out",
        "joins",
        joins as f64,
        None,
        Target::Exactly(1.0),
    ));
    Ok(())
}

/// Submits one fan-out and waits for its join's result, reading every part's result on the way.
async fn one(b: &Bench, n: usize, bar: &indicatif::ProgressBar) -> anyhow::Result<(Run, JobId)> {
    // Opened before the submit, so no result is missed.
    let mut results = b.client.results(Since::Now).await?;
    let parent = b
        .client
        .submit(Job::new("fan", "fan", json!({"parts": n})))
        .await?;
    let deadline = tokio::time::Instant::now() + b.args.patience;
    let mut ended = HashSet::with_capacity(n);
    let (mut last_end_us, mut last_read_us) = (0u64, 0u64);
    let join_start_us = loop {
        let next = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut results)).await;
        let event = match next {
            Err(_) => bail!(
                "S9: {} of {n} parts ended, no join after {:?}",
                ended.len(),
                b.args.patience
            ),
            Ok(None) => bail!("the results stream closed"),
            Ok(Some(event)) => event?,
        };
        if event.part_of.is_some_and(|p| p.job_id == parent) {
            if event.status != JobStatus::Succeeded {
                bail!("S9: part {} failed: {:?}", event.job_id, event.error);
            }
            if ended.insert(event.job_id) {
                bar.inc(1);
                last_read_us = now_us();
            }
            let end = event.output["end_us"].as_u64().unwrap_or(0);
            last_end_us = last_end_us.max(end);
        } else if event.job_id == parent {
            if event.status != JobStatus::Succeeded {
                bail!("S9: the fan-out job failed: {:?}", event.error);
            }
            break event.output["start_us"]
                .as_u64()
                .context("the join's output has no start_us")?;
        }
    };
    results.close().await;
    if ended.len() != n {
        bail!("S9: the join ran with {} of {n} parts seen", ended.len());
    }
    let planned_us = FAN_NOTES
        .lock()
        .expect("lock")
        .as_ref()
        .and_then(|notes| notes.planned_us.get(&parent).copied())
        .context("the fan-out step did not note its end")?;
    let took = Duration::from_micros(last_read_us.saturating_sub(planned_us));
    let run = Run {
        parts_per_s: rate(n, took),
        gap_ms: join_start_us.saturating_sub(last_end_us) as f64 / 1000.0,
    };
    Ok((run, parent))
}
