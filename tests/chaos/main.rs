//! Chaos: thousands of 3-step jobs while worker processes are SIGKILLed and the broker restarts;
//! a run where the server closes every connection; and a run with flaky and broken steps and a
//! dead-letter replay. Nothing may be lost; duplicates (at-least-once) are counted and printed.
//!
//! The same on a three-node cluster, where nodes are killed instead: `cluster.rs`.
//!
//! Runs with the test suite; alone: `cargo test -p warren-tests --test chaos -- --nocapture`.
//! `WARREN_CHAOS_JOBS` sets the size of the first run (default 4000). The broker restart and the
//! connection closing use `rabbitmqctl` on this machine's node; set
//! `WARREN_CHAOS_BROKER_RESTART=0` when the broker is elsewhere (those parts are then skipped).

mod cluster;
mod replay;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;
use warren_common::{JobId, JobStatus, Priority};
use warren_producer::{Client, Job, SubmitError};
use warren_tests::{collect_results, eventually, TestNamespace, WorkerProcess};

/// Both runs kill workers (and one restarts the broker): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

const PIPELINE: &str = r#"
[[pipelines]]
name = "chaos"
shards = 4

[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 8
backoff = ["100ms", "300ms"]

[[pipelines.steps]]
name = "b"
handler = "work"
concurrency = 8
backoff = ["100ms", "300ms"]

[[pipelines.steps]]
name = "c"
handler = "work"
concurrency = 8
backoff = ["100ms", "300ms"]
"#;

const TENANTS: usize = 40;
const WORKERS: usize = 3;
const KILL_EVERY: Duration = Duration::from_secs(2);

fn priority(i: usize) -> Priority {
    Priority::ALL[i % 3]
}

/// Submits `jobs` in batches, resubmitting what was not confirmed when the broker goes away
/// (a resubmitted job may then exist twice: at least once, never lost). The pause between
/// batches spreads 4000 jobs over about 4 s, so work is still arriving at the second SIGKILL
/// however fast the workers are.
async fn submit_all(client: &Client, jobs: Vec<Job>) {
    for batch in jobs.chunks(250) {
        let mut rest = batch.to_vec();
        let started = Instant::now();
        while !rest.is_empty() {
            match client.submit_many(rest.clone()).await {
                Ok(_) => rest.clear(),
                Err(SubmitError::Publish { confirmed, cause }) => {
                    assert!(started.elapsed() < Duration::from_secs(90), "{cause}");
                    rest.drain(..confirmed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("submit: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Job ids whose last step has started at least once, from the test worker's marker files.
fn finished_jobs(ns: &TestNamespace) -> HashSet<String> {
    ns.step_starts()
        .into_iter()
        .filter(|s| s.1 == "c")
        .map(|s| s.0)
        .collect()
}

/// Stops and starts the RabbitMQ application of the local node, and waits until it answers.
fn restart_broker() {
    let run = |args: &[&str]| {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl (set WARREN_CHAOS_BROKER_RESTART=0 for a remote broker)");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    };
    run(&["stop_app"]);
    run(&["start_app"]);
    run(&["await_startup"]);
}

fn broker_restart_enabled() -> bool {
    std::env::var("WARREN_CHAOS_BROKER_RESTART").map_or(true, |v| v != "0")
}

/// Waits until every work queue of the namespace stays empty for a moment (late duplicates
/// settle), then returns the non-empty ones, if any.
async fn settle_queues(ns: &TestNamespace) -> Vec<(String, u32)> {
    let mut quiet_since = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy: Vec<_> = ns
            .work_queue_depths()
            .await
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        match (busy.is_empty(), quiet_since) {
            (true, Some(t)) if Instant::now() - t > Duration::from_secs(1) => return busy,
            (true, None) => quiet_since = Some(Instant::now()),
            (false, _) => quiet_since = None,
            _ => {}
        }
        if Instant::now() > deadline {
            return busy;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_and_a_broker_restart_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let total: usize = std::env::var("WARREN_CHAOS_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4000);
    // Given three workers on a 3-step pipeline, and a few thousand jobs from 40 tenants in
    // three priorities arriving in batches
    let ns = TestNamespace::new(PIPELINE).await;
    let mut workers: Vec<WorkerProcess> = (0..WORKERS).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let jobs: Vec<Job> = (0..total)
        .map(|i| {
            Job::new(
                "chaos",
                format!("tenant-{}", i % TENANTS),
                json!({"i": i, "sleep_ms": 3}),
            )
            .priority(priority(i))
        })
        .collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let started = Instant::now();
    let submitter = {
        let client = ns.client().await;
        tokio::spawn(async move { submit_all(&client, jobs).await })
    };

    // When a random worker is SIGKILLed (and replaced) every 2 s, and the broker restarts once
    let (mut kills, mut restarts) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(240);
    while finished_jobs(&ns).len() < total && Instant::now() < deadline {
        tokio::time::sleep(KILL_EVERY).await;
        let victim = rand::random_range(0..WORKERS);
        workers[victim].kill_hard();
        workers[victim] = ns.spawn_worker(&[]);
        kills += 1;
        if kills == 2 && broker_restart_enabled() {
            tokio::task::spawn_blocking(restart_broker).await.unwrap();
            restarts += 1;
        }
    }
    submitter.await.expect("submitter");
    let chaos_secs = started.elapsed().as_secs_f64();

    // Then every job has its final result: none missing, none failed, none unknown
    let results = collect_results(&client, &ids, Duration::from_secs(120)).await;
    let missing: Vec<_> = ids.iter().filter(|id| !results.contains_key(id)).collect();
    let failed: Vec<_> = results
        .values()
        .flatten()
        .filter(|r| r.status != JobStatus::Succeeded)
        .collect();
    // ...and the dead-letter queue and every other queue of the namespace end empty
    let busy = settle_queues(&ns).await;
    let starts = ns.step_starts();
    let by_job_step: HashMap<(String, String), usize> =
        starts.iter().fold(HashMap::new(), |mut m, s| {
            *m.entry((s.0.clone(), s.1.clone())).or_default() += 1;
            m
        });
    let duplicate_steps: usize = by_job_step.values().map(|n| n - 1).sum();
    let duplicate_results: usize = results.values().map(|r| r.len() - 1).sum();
    println!(
        "chaos run: {total} jobs x 3 steps, {TENANTS} tenants, {WORKERS} workers, {kills} SIGKILLs, \
         {restarts} broker restarts, {chaos_secs:.1} s; lost = {}, failed = {}, duplicate step \
         executions = {duplicate_steps} (of {} starts), duplicate result events = {duplicate_results}",
        missing.len(),
        failed.len(),
        starts.len()
    );
    assert!(
        missing.is_empty(),
        "{} jobs lost: {missing:?}",
        missing.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(busy.is_empty(), "queues not empty: {busy:?}");
    assert!(kills >= 2, "the run ended before any chaos");
    let submitted: HashSet<String> = ids.iter().map(JobId::to_string).collect();
    let unknown = by_job_step
        .keys()
        .filter(|(job, _)| !submitted.contains(job));
    assert_eq!(unknown.count(), 0, "steps ran for jobs nobody submitted");
    for worker in &mut workers {
        assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closing_every_connection_loses_nothing() {
    if !broker_restart_enabled() {
        return; // needs rabbitmqctl on this machine, like the restart
    }
    let _serial = SERIAL.lock().await;
    // Given three workers busy with 1500 jobs: 150 ms a step keeps them busy for about 10 s
    // (72 steps at a time), well past the few seconds `rabbitmqctl` needs to start twice
    let ns = TestNamespace::new(PIPELINE).await;
    let mut workers: Vec<WorkerProcess> = (0..WORKERS).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let jobs: Vec<Job> = (0..1500)
        .map(|i| {
            Job::new(
                "chaos",
                format!("tenant-{}", i % TENANTS),
                json!({"i": i, "sleep_ms": 150}),
            )
            .priority(priority(i))
        })
        .collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let submitter = {
        let client = ns.client().await;
        tokio::spawn(async move { submit_all(&client, jobs).await })
    };

    // When the broker closes every client connection, twice, while they work
    let mut done_at_close: Vec<usize> = Vec::new();
    for _ in 0..2 {
        // Each close must meet every worker started (again, after a reconnect) and working: a
        // close that lands while a worker is still reconnecting has nothing to close. The first
        // close waits for 100 finished jobs, the next for 50 more than the previous close saw;
        // rabbitmqctl itself takes a few seconds to start, so the counts at the closes run higher.
        let before = done_at_close.len();
        let floor = done_at_close.last().map_or(100, |&d| d + 50);
        let reached = eventually(Duration::from_secs(60), || async {
            let all_back = workers
                .iter()
                .all(|w| w.log_text().matches("Worker started.").count() > before);
            all_back && finished_jobs(&ns).len() >= floor
        })
        .await;
        assert!(
            reached,
            "{floor} jobs did not finish, or a worker did not reconnect"
        );
        let out = Command::new("rabbitmqctl")
            .args(["close_all_connections", "warren chaos test"])
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "{out:?}");
        done_at_close.push(finished_jobs(&ns).len());
    }
    let closes = done_at_close.len();
    submitter.await.expect("submitter");

    // Then the workers reconnect and every job succeeds; nothing is left in any queue
    let results = collect_results(&client, &ids, Duration::from_secs(120)).await;
    let missing = ids.iter().filter(|id| !results.contains_key(id)).count();
    let failed = results
        .values()
        .flatten()
        .filter(|r| r.status != JobStatus::Succeeded)
        .count();
    let busy = settle_queues(&ns).await;
    let starts = ns.step_starts().len();
    println!(
        "connection-close run: 1500 jobs x 3 steps, {closes} server-side closes of every \
         connection (jobs done by then: {done_at_close:?}); lost = {missing}, failed = {failed}, \
         duplicate step executions = {}",
        starts.saturating_sub(3 * 1500)
    );
    assert!(
        done_at_close.iter().all(|&done| done < 1500),
        "the jobs were done before a close took effect: {done_at_close:?}"
    );
    assert_eq!((missing, failed), (0, 0));
    assert!(busy.is_empty(), "queues not empty: {busy:?}");
    for worker in &mut workers {
        let lost = worker.log_text().matches("Lost the broker").count();
        assert!(
            lost >= closes,
            "a worker saw {lost} of {closes} closes:\n{}",
            worker.log_text()
        );
        assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));
    }
}
