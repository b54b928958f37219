//! A worker killed at any instant loses nothing, and a drained worker finishes what it started.

use std::time::Duration;

use serde_json::json;
use warren_common::JobStatus;
use warren_producer::Job;
use warren_tests::{collect_results, eventually, TestNamespace};

use crate::THREE_STEPS;

#[tokio::test]
async fn sigkill_in_the_middle_of_a_step() {
    // Given a worker running a job's step b, which takes 2 s
    let ns = TestNamespace::new(THREE_STEPS).await;
    let mut doomed = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let id = client
        .submit(Job::new(
            "chain",
            "acme",
            json!({"sleep_ms_at": {"b": 2000}}),
        ))
        .await
        .unwrap();
    let in_b = eventually(Duration::from_secs(20), || async {
        ns.step_starts().iter().any(|(_, step, _)| step == "b")
    })
    .await;
    assert!(in_b, "step b never started");

    // When that worker is killed with SIGKILL, and another one starts
    doomed.kill_hard();
    let _rescuer = ns.spawn_worker(&[]);

    // Then the job completes; step b ran again, step a did not
    let result = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded);
    assert_eq!(result.output["trail"], json!(["a", "b", "c"]));
    let starts = ns.step_starts();
    let count = |step: &str| starts.iter().filter(|s| s.1 == step).count();
    assert_eq!(
        (count("a"), count("b"), count("c")),
        (1, 2, 1),
        "{starts:?}"
    );
}

#[tokio::test]
async fn sigterm_drains_running_steps_and_exits_zero() {
    // Given a worker in the middle of 4 steps of 1.5 s each, with more jobs queued behind them
    let ns = TestNamespace::new(THREE_STEPS).await;
    let mut worker = ns.spawn_worker(&["--shutdown-grace", "20s"]);
    let client = ns.client().await;
    let jobs =
        (0..8).map(|i| Job::new("chain", "acme", json!({"i": i, "sleep_ms_at": {"a": 1500}})));
    let ids = client.submit_many(jobs).await.unwrap();
    let busy = eventually(Duration::from_secs(20), || async {
        ns.step_starts().len() >= 4
    })
    .await;
    assert!(busy);

    // When it gets SIGTERM
    let code = worker.terminate(Duration::from_secs(20));

    // Then it exits 0 after finishing the running steps (their step b is queued, not lost) ...
    assert_eq!(code, Some(0), "worker log:\n{}", worker.log_text());
    assert!(
        worker.log_text().contains("Drained"),
        "{}",
        worker.log_text()
    );
    let a_runs_before = ns.step_starts().iter().filter(|s| s.1 == "a").count();
    // ... and a new worker completes every job, re-running no finished step a
    let _next = ns.spawn_worker(&[]);
    let results = collect_results(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 8);
    assert!(results
        .values()
        .all(|r| r[0].status == JobStatus::Succeeded));
    let a_runs = ns.step_starts().iter().filter(|s| s.1 == "a").count();
    assert_eq!(
        a_runs, 8,
        "step a ran {a_runs} times for 8 jobs ({a_runs_before} before the restart)"
    );
}
