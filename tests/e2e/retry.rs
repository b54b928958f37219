//! Retries wait out their backoff outside the work queues, and full queues push back instead of
//! losing or dead-lettering work.

use std::time::Duration;

use serde_json::json;
use warren_broker::depth::ready_messages;
use warren_broker::{Broker, Lane, Outgoing, PublishError, Publisher, StepRoute};
use warren_common::{encode, Envelope, JobId, JobStatus, Priority, TenantId};
use warren_producer::{Client, Job, SubmitError};
use warren_tests::{collect_results, eventually, TestNamespace};

const ONE_STEP_WITH_BACKOFF: &str = r#"
[[pipelines]]
name = "solo"
shards = 1

[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 1
max_attempts = 3
backoff = ["400ms", "800ms"]
"#;

#[tokio::test]
async fn retries_wait_their_backoff_and_do_not_block_the_shard() {
    // Given one worker running one step at a time on a single shard
    let ns = TestNamespace::new(ONE_STEP_WITH_BACKOFF).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When a job fails twice before it works, and a second job comes right behind it
    let flaky = client
        .submit(Job::new(
            "solo",
            "acme",
            json!({"fail_at": "a", "fail_times": 2}),
        ))
        .await
        .unwrap();
    let quick = client
        .submit(Job::new("solo", "acme", json!({})))
        .await
        .unwrap();

    // Then both succeed, the flaky one on its third attempt...
    let results = collect_results(&client, &[flaky, quick], Duration::from_secs(30)).await;
    let flaky_result = &results[&flaky][0];
    assert_eq!(
        flaky_result.status,
        JobStatus::Succeeded,
        "{flaky_result:?}"
    );
    assert_eq!(flaky_result.attempts, 3);
    // ...its attempts (which the step sees) spaced by the backoff, within its 10% jitter...
    let mut starts: Vec<(u32, u64)> = ns
        .step_starts_with_attempts()
        .into_iter()
        .filter(|s| s.job == flaky.to_string())
        .map(|s| (s.attempt, s.at_ms))
        .collect();
    starts.sort();
    let attempts: Vec<u32> = starts.iter().map(|s| s.0).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let gap = |i: usize| starts[i].1 - starts[i - 1].1;
    assert!(gap(1) >= 360, "first retry after {} ms", gap(1));
    assert!(gap(2) >= 720, "second retry after {} ms", gap(2));
    // ...while the job behind it on the same shard did not wait for those retries
    let quick_start = ns
        .step_starts_with_attempts()
        .into_iter()
        .find(|s| s.job == quick.to_string())
        .expect("quick job ran")
        .at_ms;
    assert!(
        quick_start < starts[1].1,
        "the quick job waited for the retry"
    );
    assert!(results[&quick][0].status == JobStatus::Succeeded);
}

const BOUNDED: &str = r#"
[[pipelines]]
name = "bounded"
shards = 1
max_queue_length = 3

[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 4

[[pipelines.steps]]
name = "b"
handler = "work"
concurrency = 4
"#;

/// Submits jobs until the shard refuses one; returns the accepted ids.
async fn fill_with_jobs(client: &Client) -> Vec<JobId> {
    let mut ids = Vec::new();
    for i in 0..20 {
        match client
            .submit(Job::new("bounded", "acme", json!({ "i": i })))
            .await
        {
            Ok(id) => ids.push(id),
            Err(err) => {
                assert!(matches!(err, SubmitError::BacklogFull { .. }), "{err}");
                assert!(err.is_retryable());
                assert!(err.to_string().contains("backlog full"), "{err}");
                return ids;
            }
        }
    }
    panic!("the queue never refused a job");
}

/// Publishes step-b messages straight to queue b until it refuses one; returns their ids.
async fn fill_step_b(broker: &Broker) -> Vec<JobId> {
    let publisher = Publisher::new(broker).await.unwrap();
    let exchange = broker.names().tasks_exchange();
    let key = StepRoute::new("bounded", "b", Priority::Normal, Lane::Shard(0)).routing_key();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let tenant = TenantId::parse("acme").unwrap();
        let env = Envelope::new_job(
            JobId::new(),
            tenant,
            "bounded",
            "b",
            Priority::Normal,
            json!({}),
        );
        let body = encode(&env);
        let msg = Outgoing::persistent(&exchange, &key, &body, &env.job_id.to_string());
        match publisher.publish(msg).await {
            Ok(()) => ids.push(env.job_id),
            Err(PublishError::Nacked { .. }) => return ids,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("queue b never refused a message");
}

#[tokio::test]
async fn a_full_queue_pushes_back_on_producers_and_workers() {
    // Given a pipeline whose queues hold about 3 messages (a quorum queue may take one more
    // before it starts refusing), with queue b full, and no worker yet
    let ns = TestNamespace::new(BOUNDED).await;
    let client = ns.client().await;
    let broker = ns.broker().await;
    let queue = |step: &str| {
        StepRoute::new("bounded", step, Priority::Normal, Lane::Shard(0)).queue(broker.names())
    };
    let in_b = fill_step_b(&broker).await;
    assert!((3..=4).contains(&in_b.len()), "queue b took {}", in_b.len());

    // When a producer keeps submitting, then it soon gets a clear "backlog full" error
    let jobs = fill_with_jobs(&client).await;
    assert!((3..=4).contains(&jobs.len()), "queue a took {}", jobs.len());

    // When a worker serving only step a runs them
    let _a = ns.spawn_worker(&["--step", "a"]);
    let ran = eventually(Duration::from_secs(20), || async {
        ns.step_starts().iter().filter(|s| s.1 == "a").count() == jobs.len()
    })
    .await;
    assert!(ran, "step a did not run");

    // Then it holds their outputs while queue b is full: nothing is dropped or dead-lettered,
    // and queue b stays at its bound
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b_depth = ready_messages(&broker, &queue("b")).await.unwrap();
    assert_eq!(b_depth, Some(in_b.len() as u32));
    let dlq = ready_messages(&broker, &broker.names().dlq())
        .await
        .unwrap();
    assert_eq!(dlq, Some(0));

    // When step b gets a worker, then every job completes and no step a ran twice
    let _b = ns.spawn_worker(&["--step", "b"]);
    let all: Vec<JobId> = jobs.iter().chain(&in_b).copied().collect();
    let results = collect_results(&client, &all, Duration::from_secs(30)).await;
    assert_eq!(results.len(), all.len());
    assert!(results
        .values()
        .all(|r| r[0].status == JobStatus::Succeeded));
    assert_eq!(
        ns.step_starts().iter().filter(|s| s.1 == "a").count(),
        jobs.len(),
        "a held output was recomputed"
    );
}
