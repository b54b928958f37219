//! `warren-demo`: the driver behind `deploy/local/demo.sh`. Submits a multi-tenant workload to
//! the example `reports` pipeline (one noisy tenant, several small ones, a few urgent jobs, a
//! flaky one and a bad one), shows progress from the results stream, and prints a summary per
//! tenant. Workers are started by the script, not here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use warren_producer::{
    Client, Config, Job, JobId, JobStatus, Priority, ProcessEnv, ResultEvent, Since, WaitError,
};

#[derive(Debug, Parser)]
#[command(about = "Submit the demo workload and report what happened.")]
struct Args {
    #[arg(long, default_value = "examples/warren.toml")]
    config: PathBuf,
    #[arg(long, default_value = "reports")]
    pipeline: String,
    /// Jobs of the noisy tenant, submitted first.
    #[arg(long, default_value_t = 120)]
    flood: usize,
    /// Jobs of each small tenant.
    #[arg(long, default_value_t = 4)]
    per_tenant: usize,
    /// Give up waiting after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// The file umbrella's "late data" job waits for (relative to the workers' folder, the
/// repository root under `deploy/local/demo.sh`): create it, then replay the job.
const LATE_FILE: &str = ".warren-demo/late-data.csv";

const SMALL_TENANTS: [&str; 6] = ["acme", "globex", "initech", "umbrella", "hooli", "wayne"];
const TOPICS: [&str; 5] = [
    "solar power",
    "city bikes",
    "coffee prices",
    "rail freight",
    "tidal energy",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(Some(&args.config), &ProcessEnv)?;
    let client = Client::connect(config)
        .await
        .context("connecting to RabbitMQ")?;
    let started = Instant::now();
    let since = warren_common::now_ms();

    // The noisy tenant floods first; the small tenants and the urgent jobs come right after.
    let mut jobs = Vec::new();
    for i in 0..args.flood {
        jobs.push(report_job(
            &args.pipeline,
            "big-customer",
            i,
            Priority::Normal,
        ));
    }
    for (t, tenant) in SMALL_TENANTS.iter().enumerate() {
        for i in 0..args.per_tenant {
            jobs.push(report_job(&args.pipeline, tenant, t + i, Priority::Normal));
        }
    }
    for i in 0..3 {
        jobs.push(report_job(&args.pipeline, "acme", 100 + i, Priority::High));
    }
    // One step that fails twice before it works, and one job whose input is refused for good.
    jobs.push(Job::new(
        &args.pipeline,
        "globex",
        json!({"topic": "retries", "paragraphs": 2, "flaky": 2}),
    ));
    jobs.push(Job::new(
        &args.pipeline,
        "initech",
        json!({"topic": "", "paragraphs": 2}),
    ));
    // And one that fails until its source file appears: the job to replay from the console.
    jobs.push(Job::new(
        &args.pipeline,
        "umbrella",
        json!({"topic": "late data", "paragraphs": 2, "needs_file": LATE_FILE}),
    ));

    let tenants_of: BTreeMap<JobId, (String, Priority)> = jobs
        .iter()
        .map(|j| (j.id, (j.tenant.clone(), j.priority)))
        .collect();
    let total = jobs.len();
    println!(
        "Submitting {total} jobs: {} for big-customer, {} for each of {} small tenants, 3 high-priority for acme, 1 flaky, 1 with bad input, 1 waiting for {LATE_FILE}.",
        args.flood,
        args.per_tenant,
        SMALL_TENANTS.len()
    );
    // Opened before the submit: every result of these jobs comes after it.
    let stream = client.results(Since::Now).await?;
    client
        .submit_many(jobs)
        .await
        .context("submitting the workload")?;
    println!(
        "Submitted and confirmed by the broker in {:.2?}.",
        started.elapsed()
    );

    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} jobs  {elapsed}  {msg}",
    )?);
    let mut results: BTreeMap<JobId, ResultEvent> = BTreeMap::new();
    let mut waiting = stream.wait_for(tenants_of.keys().copied(), args.timeout);
    loop {
        match waiting.next().await {
            Ok(Some(event)) => {
                results.insert(event.job_id, event);
                let failed = results
                    .values()
                    .filter(|e| e.status == JobStatus::Failed)
                    .count();
                bar.set_message(format!("{failed} failed"));
                bar.inc(1);
            }
            Ok(None) | Err(WaitError::StreamClosed) => break,
            Err(WaitError::Timeout { .. }) => {
                bar.abandon_with_message("timed out");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    waiting.close().await;
    bar.finish();
    print_summary(&results, &tenants_of, since);
    Ok(())
}

fn report_job(pipeline: &str, tenant: &str, i: usize, priority: Priority) -> Job {
    let payload = json!({"topic": TOPICS[i % TOPICS.len()], "paragraphs": 2 + i % 4});
    Job::new(pipeline, tenant, payload).priority(priority)
}

fn print_summary(
    results: &BTreeMap<JobId, ResultEvent>,
    tenants_of: &BTreeMap<JobId, (String, Priority)>,
    since: u64,
) {
    #[derive(Default)]
    struct Row {
        jobs: usize,
        ok: usize,
        failed: usize,
        latencies: Vec<u64>,
        done_at: u64,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (id, (tenant, priority)) in tenants_of {
        let key = if *priority == Priority::High {
            format!("{tenant} (high)")
        } else {
            tenant.clone()
        };
        let row = rows.entry(key).or_default();
        row.jobs += 1;
        if let Some(ev) = results.get(id) {
            match ev.status {
                JobStatus::Succeeded => row.ok += 1,
                JobStatus::Failed => row.failed += 1,
            }
            row.latencies.push(ev.latency_ms());
            row.done_at = row.done_at.max(ev.finished_at);
        }
    }
    println!(
        "\n{:<20} {:>5} {:>4} {:>6} {:>9} {:>9} {:>12}",
        "tenant", "jobs", "ok", "failed", "p50 (s)", "max (s)", "all done (s)"
    );
    for (tenant, row) in &mut rows {
        row.latencies.sort_unstable();
        let secs = |ms: u64| ms as f64 / 1000.0;
        let p50 = row
            .latencies
            .get(row.latencies.len() / 2)
            .copied()
            .unwrap_or(0);
        let max = row.latencies.last().copied().unwrap_or(0);
        println!(
            "{tenant:<20} {:>5} {:>4} {:>6} {:>9.2} {:>9.2} {:>12.2}",
            row.jobs,
            row.ok,
            row.failed,
            secs(p50),
            secs(max),
            secs(row.done_at.saturating_sub(since))
        );
    }
    let missing = tenants_of.len() - results.len();
    if missing > 0 {
        println!("\n{missing} jobs had no result yet.");
    }
    for ev in results.values().filter(|e| e.status == JobStatus::Failed) {
        println!(
            "\nFailed: job {} of {} at step {}: {}\n  It is in the dead-letter queue with its input as it was.",
            ev.job_id,
            ev.tenant,
            ev.step,
            ev.error.as_deref().unwrap_or("")
        );
    }
    println!("\nbig-customer's flood was queued first, yet the small tenants finish long before it: big-customer is pinned to a shard of its own (examples/warren.toml), and workers take turns across shards instead of draining one queue first.");
}
