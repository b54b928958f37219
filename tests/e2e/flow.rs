//! Jobs flow through multi-step pipelines, N-to-N, across worker processes.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use warren_common::trace::TraceParent;
use warren_common::JobStatus;
use warren_producer::{Job, Since};
use warren_tests::{collect_results, TestNamespace};

use crate::THREE_STEPS;

#[tokio::test]
async fn three_steps_many_tenants_two_workers() {
    // Given a 3-step pipeline served by two worker processes
    let ns = TestNamespace::new(THREE_STEPS).await;
    let _w1 = ns.spawn_worker(&[]);
    let _w2 = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When 6 tenants submit 20 jobs each, in one bulk
    let jobs: Vec<Job> = (0..120)
        .map(|i| {
            Job::new(
                "chain",
                format!("tenant-{}", i % 6),
                json!({"n": i, "sleep_ms": 2}),
            )
        })
        .collect();
    let ids = client.submit_many(jobs).await.unwrap();

    // Then every job has exactly one result, with every step run in order for the right tenant
    let results = collect_results(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(results.len(), ids.len(), "some jobs have no result");
    for (i, id) in ids.iter().enumerate() {
        let events = &results[id];
        assert_eq!(events.len(), 1, "job {id} has {} results", events.len());
        let ev = &events[0];
        assert_eq!(ev.status, JobStatus::Succeeded, "{ev:?}");
        assert_eq!(ev.output["n"], json!(i));
        assert_eq!(ev.output["trail"], json!(["a", "b", "c"]));
        assert_eq!(ev.output["tenant_seen"], json!(format!("tenant-{}", i % 6)));
        assert_eq!(ev.tenant.as_str(), format!("tenant-{}", i % 6));
        assert_eq!(ev.step, "c");
    }
    // And both workers took part
    let starts = ns.step_starts();
    assert_eq!(starts.len(), 360, "each of 120 jobs x 3 steps ran once");
}

#[tokio::test]
async fn no_barrier_between_steps() {
    // Given a 2-step pipeline whose first step runs one job at a time and takes 150 ms
    let ns = TestNamespace::new(
        r#"
[[pipelines]]
name = "nn"
shards = 1
[[pipelines.steps]]
name = "first"
handler = "work"
concurrency = 1
[[pipelines.steps]]
name = "second"
handler = "work"
concurrency = 1
"#,
    )
    .await;
    let _w = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When 10 jobs are submitted at once
    let jobs =
        (0..10).map(|i| Job::new("nn", "t1", json!({"i": i, "sleep_ms_at": {"first": 150}})));
    let ids = client.submit_many(jobs).await.unwrap();
    let results = collect_results(&client, &ids, Duration::from_secs(30)).await;
    assert_eq!(results.len(), 10);

    // Then the first job finished its second step before the last job started its first step:
    // each job moved on as soon as its own step was done.
    let first_done = results.values().map(|r| r[0].finished_at).min().unwrap();
    let last_first_step_start = ns
        .step_starts()
        .iter()
        .filter(|(_, step, _)| step == "first")
        .map(|(_, _, at)| *at)
        .max()
        .unwrap();
    assert!(
        first_done < last_first_step_start,
        "first result at {first_done}, last first-step start at {last_first_step_start}"
    );
    let seconds: HashSet<_> = ns
        .step_starts()
        .into_iter()
        .filter(|s| s.1 == "second")
        .map(|s| s.0)
        .collect();
    assert_eq!(seconds.len(), 10);
}

#[tokio::test]
async fn every_step_of_a_job_shares_one_trace() {
    // Given a worker, a job that joins the caller's trace and one that starts its own
    let ns = TestNamespace::new(THREE_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let caller: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let joined = client
        .submit(Job::new("chain", "acme", json!({})).traceparent(caller))
        .await
        .unwrap();
    let own = client
        .submit(Job::new("chain", "acme", json!({})))
        .await
        .unwrap();

    // Then each job's three steps ran in one trace: the caller's, or a fresh one
    let traces = |output: &serde_json::Value| -> Vec<String> {
        serde_json::from_value(output["traces"].clone()).unwrap()
    };
    let joined = client.wait(joined, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        traces(&joined.output),
        vec!["4bf92f3577b34da6a3ce929d0e0e4736"; 3]
    );
    let own = traces(
        &client
            .wait(own, Duration::from_secs(30))
            .await
            .unwrap()
            .output,
    );
    assert_eq!(own.len(), 3);
    assert!(own.iter().all(|t| t == &own[0] && t.len() == 32));
    assert_ne!(own[0], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn a_handler_past_its_timeout_is_cancelled_and_counts_as_a_failed_attempt() {
    // Given a step with a 300 ms timeout and two attempts
    let ns = TestNamespace::new(
        r#"
[[pipelines]]
name = "slow"
shards = 1

[[pipelines.steps]]
name = "a"
handler = "work"
timeout = "300ms"
max_attempts = 2
backoff = ["100ms"]
"#,
    )
    .await;
    let mut worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When its handler takes 1.5 s
    let id = client
        .submit(Job::new(
            "slow",
            "acme",
            json!({"sleep_ms": 1500, "mark_sleep_end": true}),
        ))
        .await
        .unwrap();

    // Then both attempts time out, the job fails, and neither handler ran on past its timeout
    let result = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    assert_eq!(result.attempts, 2);
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 300ms"),
        "{result:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slept: Vec<_> = std::fs::read_dir(ns.markers())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("slept-"))
        .collect();
    assert!(slept.is_empty(), "a timed-out handler kept running");
    assert_eq!(ns.step_starts().len(), 2);
    assert!(
        worker.wait_exit(Duration::from_millis(10)).is_none(),
        "worker died"
    );
}

#[tokio::test]
async fn retries_then_succeeds_and_panics_do_not_kill_the_worker() {
    // Given one worker
    let ns = TestNamespace::new(THREE_STEPS).await;
    let mut worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When one job's step b fails twice, and another's handler panics on its first attempt
    let flaky = client
        .submit(Job::new(
            "chain",
            "acme",
            json!({"fail_at": "b", "fail_times": 2}),
        ))
        .await
        .unwrap();
    let panicky = client
        .submit(Job::new("chain", "acme", json!({"panic_at": "a"})))
        .await
        .unwrap();

    // Then both succeed: the flaky one on attempt 3, the panicky one on attempt 2
    let flaky = client.wait(flaky, Duration::from_secs(30)).await.unwrap();
    assert_eq!(flaky.status, JobStatus::Succeeded, "{flaky:?}");
    assert_eq!(flaky.output["trail"], json!(["a", "b", "c"]));
    let panicky = client.wait(panicky, Duration::from_secs(30)).await.unwrap();
    assert_eq!(panicky.status, JobStatus::Succeeded, "{panicky:?}");
    assert!(
        worker.wait_exit(Duration::from_millis(10)).is_none(),
        "worker died"
    );
    let starts = ns.step_starts();
    assert_eq!(
        starts
            .iter()
            .filter(|s| s.0 == flaky.job_id.to_string() && s.1 == "b")
            .count(),
        3
    );
}

#[tokio::test]
async fn command_steps_follow_the_protocol() {
    // Given a pipeline of shell commands: one echoes its env, one fails until attempt 2,
    // one fails permanently when asked to
    let ns = TestNamespace::new(
        r#"
[[pipelines]]
name = "cmd"
shards = 2
[[pipelines.steps]]
name = "env"
command = ["sh", "-c", "read input; printf '{\"input\": %s, \"job\": \"%s\", \"tenant\": \"%s\", \"step\": \"%s\", \"priority\": \"%s\", \"secret\": \"%s\"}' \"$input\" \"$WARREN_JOB_ID\" \"$WARREN_TENANT\" \"$WARREN_STEP\" \"$WARREN_PRIORITY\" \"${WARREN_AMQP_URL:-none}\""]
[[pipelines.steps]]
name = "flaky"
command = ["sh", "-c", "if [ \"$WARREN_ATTEMPT\" -lt 2 ]; then echo transient >&2; exit 1; fi; cat"]
max_attempts = 3
[[pipelines.steps]]
name = "strict"
command = ["sh", "-c", "x=$(cat); case \"$x\" in *reject*) echo 'rejected: bad input' >&2; exit 65;; esac; echo \"$x\""]
"#,
    )
    .await;
    let _w = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When a good job and a job the last step rejects are submitted
    let good = client
        .submit(Job::new("cmd", "acme", json!({"k": 1})).priority(warren_common::Priority::High))
        .await
        .unwrap();
    let bad = client
        .submit(Job::new("cmd", "acme", json!({"k": "reject"})))
        .await
        .unwrap();

    // Then the good one carries what each step saw, and no broker credentials
    let good_result = client.wait(good, Duration::from_secs(30)).await.unwrap();
    assert_eq!(good_result.status, JobStatus::Succeeded, "{good_result:?}");
    let out = &good_result.output;
    assert_eq!(out["input"], json!({"k": 1}));
    assert_eq!(out["job"], json!(good.to_string()));
    assert_eq!(out["tenant"], json!("acme"));
    assert_eq!(out["step"], json!("env"));
    assert_eq!(out["priority"], json!("high"));
    assert_eq!(out["secret"], json!("none"));
    // And the rejected one failed for good at `strict`, on its first attempt, with stderr kept
    let bad_result = client.wait(bad, Duration::from_secs(30)).await.unwrap();
    assert_eq!(bad_result.status, JobStatus::Failed);
    assert_eq!(bad_result.step, "strict");
    assert_eq!(bad_result.attempts, 1);
    let error = bad_result.error.unwrap();
    assert!(
        error.contains("exit 65") && error.contains("rejected: bad input"),
        "{error}"
    );
}

#[tokio::test]
async fn results_from_now_skip_older_results_and_miss_none_of_later_jobs() {
    // Given a job that has finished, so its result is in the results stream
    let ns = TestNamespace::new(THREE_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let old = client
        .submit(Job::new("chain", "noisy", json!({})))
        .await
        .unwrap();
    let old_result = client.wait(old, Duration::from_secs(30)).await.unwrap();
    assert_eq!(old_result.status, JobStatus::Succeeded);

    // When a reader opens from now on, and only then jobs are submitted (the `submit --wait` order)
    let mut stream = client.results(Since::Now).await.unwrap();
    let jobs: Vec<Job> = (0..5)
        .map(|i| Job::new("chain", "quiet", json!({"i": i})))
        .collect();
    let ids = client.submit_many(jobs).await.unwrap();

    // Then it reads the new jobs' results, every one, and never the older one
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a result within 30 s")
            .expect("the stream stays open")
            .unwrap();
        assert_ne!(event.job_id, old, "read a result from before it opened");
        assert!(ids.contains(&event.job_id), "unknown job {}", event.job_id);
        seen.insert(event.job_id);
    }
    stream.close().await;
}

#[tokio::test]
async fn a_results_reader_reads_on_across_a_lost_connection() {
    // Given a worker, a results reader that has read a quick job's result, and a slow job
    let ns = TestNamespace::new(THREE_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let quick = client
        .submit(Job::new("chain", "quick", json!({"sleep_ms": 0})))
        .await
        .unwrap();
    // From the quick job's time: a reader that opened again there would read it twice.
    let mut results = client.results(Since::Job(quick)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), results.next())
        .await
        .expect("the quick job's result in time")
        .expect("a result")
        .expect("a readable result");
    assert_eq!(first.job_id, quick);
    let slow = client
        .submit(Job::new("chain", "slow", json!({"sleep_ms": 1500})))
        .await
        .unwrap();

    // When the broker closes every connection of the namespace (the reader's and the
    // worker's) while the slow job runs
    let slow_text = slow.to_string();
    let running = warren_tests::eventually(Duration::from_secs(30), || {
        let started = ns.step_starts().iter().any(|(job, _, _)| *job == slow_text);
        async move { started }
    })
    .await;
    assert!(running, "the slow job never started");
    let closed = ns.close_connections(2).await;

    // Then the reader reads on from where it stopped: the slow job's result comes, and the
    // quick one's is not read again
    let mut read = Vec::new();
    let reached = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(event) = results.next().await {
            let event = event.expect("the reader reads on after the connection is lost");
            read.push(event.job_id);
            if event.job_id == slow {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        reached,
        Ok(true),
        "read {read:?} after closing {closed} connections"
    );
    assert!(
        !read.contains(&quick),
        "the quick job's result was read again: {read:?}"
    );
    results.close().await;
}
