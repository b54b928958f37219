//! Job history on the real broker: a job's whole life (a retry, a failure to the dead-letter
//! queue, a replay, its success) is in `Client::status`, `Client::jobs` finds it, an unknown
//! job and a config with history off are told apart, and the stream goes with the namespace.

use std::time::Duration;

use serde_json::json;
use warren_broker::Topology;
use warren_producer::{
    DlqFilter, HistoryError, Job, JobFilter, JobId, JobStatus, Outcome, ReplayOptions, Status,
};
use warren_tests::{eventually, TestNamespace};

const TWO_STEPS: &str = r#"
[history]
enabled = true
retention = "1h"

[[pipelines]]
name = "import"
shards = 2

[[pipelines.steps]]
name = "fetch"
handler = "work"
max_attempts = 3
backoff = ["100ms"]

[[pipelines.steps]]
name = "parse"
handler = "work"
max_attempts = 3
backoff = ["100ms"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_life_with_a_retry_a_dead_letter_and_a_replay_is_in_its_status() {
    // Given a worker, and a job whose fetch fails once and whose parse fails for good until a
    // file appears
    let ns = TestNamespace::new(TWO_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let fix = ns.dir.join("fixed");
    let job = Job::new(
        "import",
        "acme",
        json!({"fail_at": "fetch", "fail_times": 1,
               "fail_permanently_at": "parse", "fail_permanently_at_unless_file": fix}),
    );
    let id = client.submit(job).await.unwrap();
    let failed = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);

    // When its status is read once it is in the dead-letter queue
    let dead = eventually(Duration::from_secs(10), || async {
        client
            .status(id)
            .await
            .is_ok_and(|s| s.status == Status::DeadLettered)
    })
    .await;

    // Then it says so, at parse, with the error, after fetch's retry
    assert!(dead, "{:#?}", client.status(id).await);
    let state = client.status(id).await.unwrap();
    assert_eq!(state.step.as_deref(), Some("parse"));
    assert!(state.error.is_some(), "{state:#?}");
    assert!(state.submitted_at.is_some(), "{state:#?}");
    let fetches: Vec<_> = state
        .attempts
        .iter()
        .filter(|a| a.step == "fetch")
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        fetches,
        [(1, Some(Outcome::Retried)), (2, Some(Outcome::Succeeded))],
        "{state:#?}"
    );
    assert!(state.attempts[0].error.is_some(), "{state:#?}");

    // When the fix lands and the dead letter is replayed
    std::fs::write(&fix, b"").unwrap();
    let report = client
        .dlq_replay(&DlqFilter::id(id.to_string()), ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 1, "{report:#?}");

    // Then the job succeeds, and its status has the replay and the earlier attempts
    let done = eventually(Duration::from_secs(30), || async {
        client
            .status(id)
            .await
            .is_ok_and(|s| s.status == Status::Succeeded)
    })
    .await;
    let state = client.status(id).await.unwrap();
    assert!(done, "{state:#?}");
    assert_eq!(state.replays, 1);
    assert_eq!(state.error, None);
    let parse: Vec<_> = state
        .attempts
        .iter()
        .filter(|a| a.step == "parse")
        .map(|a| (a.round, a.outcome))
        .collect();
    assert_eq!(
        parse.first(),
        Some(&(0, Some(Outcome::Failed))),
        "{state:#?}"
    );
    assert_eq!(
        parse.last(),
        Some(&(1, Some(Outcome::Succeeded))),
        "{state:#?}"
    );

    // And the job list finds it by tenant and status, and not under another tenant
    let filter = JobFilter {
        tenant: Some("acme".into()),
        status: Some(Status::Succeeded),
        ..JobFilter::default()
    };
    let jobs = client.jobs(&filter).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| j.job_id).collect::<Vec<_>>(),
        [id],
        "{jobs:#?}"
    );
    let other = JobFilter {
        tenant: Some("globex".into()),
        ..JobFilter::default()
    };
    assert!(client.jobs(&other).await.unwrap().is_empty());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_runs_a_while_shows_as_running_and_a_quick_ones_start_is_dated_by_its_end() {
    // Given a worker, a job whose fetch runs for 3 s, and a job whose steps are quick
    let ns = TestNamespace::new(TWO_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let slow = Job::new("import", "acme", json!({"sleep_ms_at": {"fetch": 3000}}));
    let slow = client.submit(slow).await.unwrap();
    let quick = client
        .submit(Job::new("import", "acme", json!({})))
        .await
        .unwrap();

    // When the slow one's status is read while its fetch runs
    let running = eventually(Duration::from_secs(10), || async {
        client
            .status(slow)
            .await
            .is_ok_and(|s| s.status == Status::Running && s.step.as_deref() == Some("fetch"))
    })
    .await;

    // Then it says running at fetch, with the attempt's start
    assert!(running, "{:#?}", client.status(slow).await);
    let state = client.status(slow).await.unwrap();
    assert!(state.attempts[0].started_at.is_some(), "{state:#?}");

    // And the quick one, done, has a start for each attempt (its end less its duration)
    let done = client.wait(quick, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    let state = eventually_status(&client, quick, Status::Succeeded).await;
    assert_eq!(state.attempts.len(), 2, "{state:#?}");
    for attempt in &state.attempts {
        let (started, ended) = (attempt.started_at.unwrap(), attempt.ended_at.unwrap());
        assert!(started <= ended, "{state:#?}");
        assert!(started >= state.submitted_at.unwrap(), "{state:#?}");
    }
    client.wait(slow, Duration::from_secs(30)).await.unwrap();
    eventually_status(&client, slow, Status::Succeeded).await;

    // And only the slow attempt wrote a "started" event
    let broker = ns.broker().await;
    let since = slow.timestamp_ms().unwrap();
    let started = warren_broker::history::read(&broker, since, |e| {
        e.kind == warren_common::history::Kind::Started
    })
    .await
    .unwrap();
    let started: Vec<_> = started.iter().map(|e| (e.job_id, e.step.clone())).collect();
    assert_eq!(started, [(slow, Some("fetch".to_string()))]);
    client.close().await;
}

/// The job's status once it reads `status` (the history is written beside the result, so a
/// reader may see the result first).
async fn eventually_status(
    client: &warren_producer::Client,
    id: JobId,
    status: Status,
) -> warren_producer::JobState {
    let reached = eventually(Duration::from_secs(10), || async {
        client.status(id).await.is_ok_and(|s| s.status == status)
    })
    .await;
    let state = client.status(id).await.unwrap();
    assert!(reached, "{state:#?}");
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_job_and_history_off_are_told_apart() {
    let ns = TestNamespace::new(TWO_STEPS).await;
    let client = ns.client().await;
    let unknown = JobId::new();
    let started = std::time::Instant::now();
    let e = client.status(unknown).await.unwrap_err();
    assert!(
        matches!(e, HistoryError::UnknownJob(id) if id == unknown),
        "{e}"
    );
    // The end marker ends the read, not a timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    client.close().await;

    let off = TestNamespace::new(&TWO_STEPS.replace("enabled = true", "enabled = false")).await;
    let client = off.client().await;
    let e = client.status(unknown).await.unwrap_err();
    assert!(matches!(e, HistoryError::Disabled { .. }), "{e}");
    assert!(e.to_string().contains("[history] enabled = true"), "{e}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_stream_is_deleted_with_the_namespace() {
    let ns = TestNamespace::new(TWO_STEPS).await;
    let broker = ns.broker().await;
    let stream = broker.names().history_stream();
    let depth = |broker| {
        let stream = stream.clone();
        async move {
            warren_broker::depth::ready_messages(broker, &stream)
                .await
                .unwrap()
        }
    };
    assert!(
        depth(&broker).await.is_some(),
        "declared with the namespace"
    );
    Topology::plan(&ns.config).delete(&broker).await.unwrap();
    assert_eq!(depth(&broker).await, None, "deleted with the namespace");
    broker.close().await;
}
