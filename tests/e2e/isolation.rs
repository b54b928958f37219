//! Fairness: a flooded shard or a low-priority backlog does not hold up other work.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use warren_common::shard::shard_for;
use warren_common::{Priority, ResultEvent};
use warren_producer::{Client, Job, Since};
use warren_tests::TestNamespace;

const ONE_SLOW_STEP: &str = r#"
[[pipelines]]
name = "slow"
shards = 4
[[pipelines.steps]]
name = "only"
handler = "work"
concurrency = 1
"#;

/// Reads results until `target` shows up; returns how many `flood` results came before it.
async fn floods_before(
    client: &Client,
    target: warren_common::JobId,
    since: u64,
) -> (usize, ResultEvent) {
    let mut stream = client.results(Since::Time(since)).await.unwrap();
    let mut before = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("target job finished in time")
            .expect("the stream stays open")
            .unwrap();
        if event.job_id == target {
            return (before, event);
        }
        before += 1;
    }
}

#[tokio::test]
async fn a_flooded_shard_does_not_block_another_shard() {
    // Given one worker running one step at a time, and two tenants on different shards
    let ns = TestNamespace::new(ONE_SLOW_STEP).await;
    let pins = BTreeMap::new();
    let noisy = "noisy";
    let quiet = (0..)
        .map(|i| format!("quiet-{i}"))
        .find(|t| shard_for(t, 4, &pins) != shard_for(noisy, 4, &pins))
        .unwrap();
    let client = ns.client().await;
    let since = warren_common::now_ms();

    // When the noisy tenant floods 150 jobs of 20 ms (3 s of work) and then the quiet one submits
    let flood = (0..150).map(|i| Job::new("slow", noisy, json!({"i": i, "sleep_ms": 20})));
    client.submit_many(flood).await.unwrap();
    let _w = ns.spawn_worker(&[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet_job = client
        .submit(Job::new("slow", quiet.as_str(), json!({"sleep_ms": 20})))
        .await
        .unwrap();

    // Then the quiet job is served after a handful of flood jobs, not after the whole flood
    let (before, _) = floods_before(&client, quiet_job, since).await;
    eprintln!("flood jobs finished before the quiet tenant's job: {before} of 150");
    assert!(
        before < 60,
        "{before} flood jobs finished before the quiet tenant's job"
    );
}

#[tokio::test]
async fn high_priority_overtakes_a_low_backlog() {
    // Given one worker running one step at a time, busy with a backlog of low jobs
    let ns = TestNamespace::new(ONE_SLOW_STEP).await;
    let client = ns.client().await;
    let since = warren_common::now_ms();
    let backlog = (0..150)
        .map(|i| Job::new("slow", "acme", json!({"i": i, "sleep_ms": 20})).priority(Priority::Low));
    client.submit_many(backlog).await.unwrap();
    let _w = ns.spawn_worker(&[]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // When a high job arrives for the same tenant (same shard)
    let urgent = client
        .submit(Job::new("slow", "acme", json!({"sleep_ms": 20})).priority(Priority::High))
        .await
        .unwrap();

    // Then it is served next, ahead of the remaining backlog
    let (before, event) = floods_before(&client, urgent, since).await;
    eprintln!("low jobs finished before the high one: {before} of 150");
    assert_eq!(event.priority, Priority::High);
    assert!(
        before < 60,
        "{before} low jobs finished before the high one"
    );
}
