//! Hot-tenant isolation: a tenant flooding a shard is marked hot and its jobs move to a hot
//! lane, so a tenant that shares the shard is not stuck behind the flood; the mark cools down;
//! routing falls back to the shards when the control stream is gone; jobs published by a
//! producer that knows nothing of hot lanes still run.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use warren_broker::control;
use warren_broker::tenants::estimate;
use warren_broker::{Lane, StepRoute};
use warren_common::shard::shard_for;
use warren_common::{encode, Envelope, JobId, Priority, TenantId};
use warren_producer::{Client, Job};
use warren_tests::{collect_results, eventually, TestNamespace};

/// One step of `sleep_ms` work on 4 shards and 2 hot lanes; a tenant counts as hot at 200 jobs.
fn pipeline(hot_for: &str) -> String {
    format!(
        r#"
[fairness]
hot_depth = 200
hot_for = "{hot_for}"

[[pipelines]]
name = "imp"
shards = 4
[[pipelines.steps]]
name = "only"
handler = "work"
concurrency = 8
"#
    )
}

/// A tenant other than `of` on the same shard of 4.
fn collider(of: &str) -> String {
    let pins = BTreeMap::new();
    (0..)
        .map(|i| format!("small-{i}"))
        .find(|t| shard_for(t, 4, &pins) == shard_for(of, 4, &pins))
        .unwrap()
}

/// Publishes jobs of `tenant` the way a producer in another language would: encoded envelopes
/// on the tenant's shard by the documented hash, with plain AMQP and confirms, ignoring hot
/// lanes altogether. Returns their ids.
async fn publish_foreign(ns: &TestNamespace, tenant: &str, n: usize, sleep_ms: u64) -> Vec<JobId> {
    let conn = Connection::connect(ns.config.broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let pipeline = &ns.config.pipelines[0];
    let key = StepRoute::for_tenant(pipeline, "only", Priority::Normal, tenant).routing_key();
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for i in 0..n {
        let id = JobId::new();
        let env = Envelope::new_job(
            id,
            TenantId::parse(tenant.to_string()).unwrap(),
            "imp",
            "only",
            Priority::Normal,
            json!({"i": i, "sleep_ms": sleep_ms}),
        );
        let confirm = channel
            .basic_publish(
                format!("{}.tasks", ns.name).into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &encode(&env),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.to_string().into()),
            )
            .await
            .unwrap();
        pending.push(confirm);
        ids.push(id);
    }
    for confirm in pending {
        assert_eq!(confirm.await.unwrap(), lapin::Confirmation::Ack(None));
    }
    let _ = conn.close(200, "done".into()).await;
    ids
}

/// Ready messages of `lane` of the only step at normal priority.
async fn depth(ns: &TestNamespace, lane: Lane) -> u32 {
    let broker = ns.broker().await;
    let queue = StepRoute::new("imp", "only", Priority::Normal, lane).queue(broker.names());
    let depth = warren_broker::depth::ready_messages(&broker, &queue)
        .await
        .unwrap()
        .unwrap_or(0);
    broker.close().await;
    depth
}

/// Every id has a result; returns how many repeats there were.
fn all_done(found: &HashMap<JobId, Vec<warren_common::ResultEvent>>, ids: &[JobId]) -> usize {
    let missing = ids.iter().filter(|id| !found.contains_key(id)).count();
    assert_eq!(missing, 0, "{missing} of {} jobs have no result", ids.len());
    ids.iter().map(|id| found[id].len() - 1).sum()
}

#[tokio::test]
async fn a_collider_is_not_stuck_behind_a_flood_workers_detect() {
    // Given 3,000 queued jobs of 100 ms from a producer that ignores hot lanes (19 s of work
    // for two workers of 8 slots), all on the flooding tenant's shard
    let ns = TestNamespace::new(&pipeline("60s")).await;
    let flood = publish_foreign(&ns, "flood", 3_000, 100).await;
    let small = collider("flood");
    let client = ns.client().await;
    let started = Instant::now();

    // When workers start, and the small tenant on the same shard submits a job at a time
    let mut workers = vec![ns.spawn_worker(&[]), ns.spawn_worker(&[])];
    assert!(
        eventually(Duration::from_secs(30), || async {
            client.hot_tenants().iter().any(|h| h.tenant == "flood")
        })
        .await,
        "the workers marked the flooding tenant hot"
    );
    // (one of them SIGKILLed at once, while the moves of the flood to its hot lane are under way;
    // another takes its place)
    workers[0].kill_hard();
    workers.push(ns.spawn_worker(&[]));
    let mut small_ids = Vec::new();
    for i in 0..5 {
        let id = client
            .submit(Job::new(
                "imp",
                small.as_str(),
                json!({"i": i, "sleep_ms": 20}),
            ))
            .await
            .unwrap();
        small_ids.push(id);
    }
    // (read as they come: a wait for quiet on the results stream would last as long as the flood)
    let mut waiting = client
        .wait_all(&small_ids, Duration::from_secs(60))
        .await
        .unwrap();
    let mut small_done = 0;
    while let Ok(Some(_)) = waiting.next().await {
        small_done += 1;
    }
    waiting.close().await;
    let small_took = started.elapsed();
    assert_eq!(small_done, small_ids.len(), "every small job finished");

    // Then its jobs finish while most of the flood still waits, in its hot lane
    let moved = depth(&ns, Lane::Hot(0)).await + depth(&ns, Lane::Hot(1)).await;
    let left_in_shard = depth(
        &ns,
        StepRoute::for_tenant(&ns.config.pipelines[0], "only", Priority::Normal, "flood").lane,
    )
    .await;
    eprintln!("small tenant done after {small_took:?}; flood jobs in hot lanes {moved}, in the shard {left_in_shard}");
    assert!(
        moved > 500,
        "the flood waits in a hot lane, not the shard ({moved} there)"
    );

    // And the workers' reports name it as the tenant with the backlog, hot (`warren queues
    // --tenants` reads the same)
    let broker = ns.broker().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let top = loop {
        let control::Recent { hot, digests, .. } =
            control::read_recent(&broker, Duration::from_secs(60))
                .await
                .unwrap();
        let top = estimate(&digests).into_iter().next();
        let found = top
            .as_ref()
            .is_some_and(|b| b.tenant == "flood" && b.backlog > 0)
            && hot.iter().any(|h| h.tenant == "flood");
        if found || Instant::now() > deadline {
            break top;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    broker.close().await;
    eprintln!("top tenant reported: {top:?}");
    assert!(
        top.is_some_and(|b| b.tenant == "flood" && b.backlog > 0),
        "the flooding tenant is reported first"
    );

    // And the worker SIGKILLed mid-move lost nothing: every flood job finishes, each repeat is
    // counted
    let found = collect_results(&client, &flood, Duration::from_secs(180)).await;
    let repeats = all_done(&found, &flood);
    eprintln!(
        "flood: {} jobs done, {repeats} repeats after the kill",
        flood.len()
    );
    assert!(
        repeats <= 100,
        "{repeats} repeats: more than the killed worker held"
    );
}

#[tokio::test]
async fn a_bulk_submit_takes_a_hot_lane_from_the_first_job_and_cools_down() {
    // Given no worker yet, so the queues show where each job went
    let ns = TestNamespace::new(&pipeline("2s")).await;
    let client = ns.client().await;
    let shard =
        StepRoute::for_tenant(&ns.config.pipelines[0], "only", Priority::Normal, "big").lane;

    // When a tenant submits 200 jobs at once (hot_depth)
    let jobs = (0..200).map(|i| Job::new("imp", "big", json!({"i": i})));
    let mut ids = client.submit_many(jobs).await.unwrap();

    // Then they all wait in its hot lane, none in its shard
    let hot = Lane::hot_for(&ns.config.pipelines[0], "big").unwrap();
    assert_eq!((depth(&ns, hot).await, depth(&ns, shard).await), (200, 0));
    assert!(client.hot_tenants().iter().any(|h| h.tenant == "big"));

    // And a producer that ignores hot lanes still gets its jobs of the tenant run
    ids.extend(publish_foreign(&ns, "big", 20, 0).await);

    // When the mark's 2 s pass, the tenant is back on its shard
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.hot_tenants().is_empty()
        })
        .await,
        "the mark expired"
    );
    // (by a producer that has not itself just sent 200 of its jobs: that one would mark it
    // again, for the rate of its own submits)
    let other = ns.client().await;
    ids.push(
        other
            .submit(Job::new("imp", "big", json!({})))
            .await
            .unwrap(),
    );
    let (in_shard, in_hot) = (depth(&ns, shard).await, depth(&ns, hot).await);
    assert_eq!((in_shard, in_hot), (21, 200));

    // And a worker runs every one of them
    let _w = ns.spawn_worker(&[]);
    let found = collect_results(&client, &ids, Duration::from_secs(60)).await;
    all_done(&found, &ids);
}

#[tokio::test]
async fn routing_falls_back_to_the_shards_without_the_control_stream() {
    // Given the namespace's control stream is gone
    let ns = TestNamespace::new(&pipeline("60s")).await;
    let broker = ns.broker().await;
    let channel = broker.channel().await.unwrap();
    channel
        .queue_delete(
            broker.names().control_stream().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    broker.close().await;
    let client: Client = ns.client().await;

    // When a tenant floods
    let jobs = (0..300).map(|i| Job::new("imp", "big", json!({"i": i})));
    let ids = client.submit_many(jobs).await.unwrap();

    // Then nothing is marked and its jobs take its shard, as without fairness
    let shard =
        StepRoute::for_tenant(&ns.config.pipelines[0], "only", Priority::Normal, "big").lane;
    assert!(client.hot_tenants().is_empty());
    assert_eq!(depth(&ns, shard).await, 300);

    // And a worker (which declares the stream again) runs them all
    let _w = ns.spawn_worker(&[]);
    let found = collect_results(&client, &ids, Duration::from_secs(60)).await;
    all_done(&found, &ids);
}
