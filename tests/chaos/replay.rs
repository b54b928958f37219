//! The second chaos run: flaky steps retry with backoff, broken ones land in the dead-letter
//! queue, and a replay after the fix resumes them at the step that failed.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use warren_common::{JobId, JobStatus};
use warren_producer::{DlqFilter, Job, ReplayOptions};
use warren_tests::{collect_results, eventually, TestNamespace, WorkerProcess};

use crate::{priority, settle_queues, PIPELINE, SERIAL, WORKERS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_steps_retry_and_broken_ones_resume_from_the_dead_letter_queue() {
    let _serial = SERIAL.lock().await;
    // Given three workers, and 600 jobs: every 5th fails once or twice at some step before it
    // works, and every 100th fails permanently at step b until it is "fixed"
    let ns = TestNamespace::new(PIPELINE).await;
    let _workers: Vec<WorkerProcess> = (0..WORKERS).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let fixed_flag = ns.dir.join("fixed");
    let steps = ["a", "b", "c"];
    let jobs: Vec<Job> = (0..600)
        .map(|i| {
            let mut payload = json!({"i": i, "sleep_ms": 2});
            if i % 100 == 7 {
                payload["fail_permanently_at"] = json!("b");
                payload["fail_permanently_at_unless_file"] = json!(fixed_flag);
            } else if i % 5 == 0 {
                payload["fail_at"] = json!(steps[i % 3]);
                payload["fail_times"] = json!(1 + i % 2);
            }
            Job::new("chaos", format!("tenant-{}", i % 30), payload).priority(priority(i))
        })
        .collect();
    let broken: HashSet<JobId> = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 100 == 7)
        .map(|(_, j)| j.id)
        .collect();
    let ids = client.submit_many(jobs).await.unwrap();

    // When they have run
    let results = collect_results(&client, &ids, Duration::from_secs(120)).await;
    assert_eq!(results.len(), ids.len(), "jobs without a result");
    let failed: HashSet<JobId> = results
        .iter()
        .filter(|(_, r)| r[0].status == JobStatus::Failed)
        .map(|(id, _)| *id)
        .collect();

    // Then the broken ones, and only those, failed and wait in the dead-letter queue at step b
    assert_eq!(failed, broken);
    let dead = client.dlq_list(&DlqFilter::default()).await.unwrap();
    let dead_ids: HashSet<JobId> = dead.iter().filter_map(|d| d.job_id).collect();
    assert_eq!(dead_ids, broken);
    assert!(dead.iter().all(|d| d.step.as_deref() == Some("b")));
    let flaky_retries = ns
        .step_starts_with_attempts()
        .iter()
        .filter(|s| s.attempt > 1)
        .count();

    // When the cause is fixed and the dead letters are replayed
    std::fs::write(&fixed_flag, "fixed").unwrap();
    let report = client
        .dlq_replay(&DlqFilter::default(), ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), broken.len(), "{report:?}");

    // Then they complete, resuming at step b: step a never ran again
    let broken_ids: Vec<JobId> = broken.iter().copied().collect();
    let replayed = eventually(Duration::from_secs(60), || async {
        let starts = ns.step_starts();
        broken_ids
            .iter()
            .all(|id| starts.iter().any(|s| s.0 == id.to_string() && s.1 == "c"))
    })
    .await;
    assert!(replayed, "replayed jobs did not reach step c");
    let starts = ns.step_starts();
    for id in &broken_ids {
        let runs = |step: &str| {
            starts
                .iter()
                .filter(|s| s.0 == id.to_string() && s.1 == step)
                .count()
        };
        assert_eq!(runs("a"), 1, "job {id}: step a ran again after replay");
        assert_eq!(runs("b"), 2, "job {id}: failed b once, then replayed");
    }
    let busy = settle_queues(&ns).await;
    assert!(busy.is_empty(), "queues not empty: {busy:?}");
    println!(
        "failure run: 600 jobs, {} retried attempts, {} permanent failures dead-lettered and \
         replayed from step b",
        flaky_retries,
        broken.len()
    );
}
