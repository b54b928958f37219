//! The dead-letter queue through the SDK: listing leaves it as it was, replay resumes a job at
//! the step that failed, purge removes only what it selects.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use warren_broker::{Lane, StepRoute};
use warren_common::bundle::Bundle;
use warren_common::{dead_letter, encode, Envelope, JobId, JobStatus, Priority, TenantId};
use warren_producer::{DlqFilter, Job, ReplayOptions};
use warren_tests::{collect_results, eventually, TestNamespace};

use crate::THREE_STEPS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_replay_and_purge_the_dead_letter_queue() {
    // Given a worker, two jobs of acme that fail permanently at step b until a fix lands, one
    // of globex that fails the same way, and a message that is not an envelope at all
    let ns = TestNamespace::new(THREE_STEPS).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let fix = ns.dir.join("fixed");
    let broken = |tenant: &str, n: u32| {
        Job::new(
            "chain",
            tenant,
            json!({"n": n, "fail_permanently_at": "b", "fail_permanently_at_unless_file": fix}),
        )
    };
    let acme = client
        .submit_many([broken("acme", 1), broken("acme", 2)])
        .await
        .unwrap();
    let globex = client.submit(broken("globex", 3)).await.unwrap();
    let broker = ns.broker().await;
    let channel = broker.confirm_channel().await.unwrap();
    let garbage_queue =
        StepRoute::new("chain", "a", Priority::Normal, Lane::Shard(0)).queue(broker.names());
    channel
        .basic_publish(
            "".into(),
            garbage_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not msgpack at all",
            BasicProperties::default().with_message_id("garbage-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    for id in acme.iter().chain([&globex]) {
        let result = client.wait(*id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(result.status, JobStatus::Failed);
    }
    let dlq = broker.names().dlq();
    let four = eventually(Duration::from_secs(10), || async {
        warren_broker::depth::ready_messages(&broker, &dlq)
            .await
            .unwrap()
            == Some(4)
    })
    .await;
    assert!(four, "expected 4 dead letters");

    // When the DLQ is listed, twice
    let all = client.dlq_list(&DlqFilter::default()).await.unwrap();
    let again = client.dlq_list(&DlqFilter::default()).await.unwrap();

    // Then every dead letter is there with what failed and why, and listing removed nothing
    assert_eq!(all.len(), 4, "{all:#?}");
    let ids = |v: &[warren_producer::DeadLetter]| {
        let mut ids: Vec<String> = v.iter().map(|l| l.id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&all), ids(&again));
    let first = all
        .iter()
        .find(|l| l.job_id == Some(acme[0]))
        .expect("acme's first job");
    assert_eq!(first.reason, "failed");
    assert_eq!(first.tenant.as_deref(), Some("acme"));
    assert_eq!(first.pipeline.as_deref(), Some("chain"));
    assert_eq!(first.step.as_deref(), Some("b"));
    assert_eq!(first.attempts, Some(1));
    assert!(
        first.error.contains("told to fail permanently"),
        "{first:?}"
    );
    assert!(first
        .failed_at
        .is_some_and(|t| t >= first.submitted_at.unwrap()));
    assert_eq!(first.input.as_ref().unwrap()["trail"], json!(["a"]));
    let garbage = all.iter().find(|l| l.id == "garbage-1").expect("garbage");
    assert_eq!(garbage.reason, "undecodable");
    assert_eq!(garbage.raw.as_deref(), Some("not msgpack at all"));
    let by_tenant = DlqFilter {
        tenant: Some("acme".into()),
        ..DlqFilter::default()
    };
    assert_eq!(client.dlq_list(&by_tenant).await.unwrap().len(), 2);

    // When the fix lands and acme's dead letters are replayed
    std::fs::write(&fix, "fixed").unwrap();
    let report = client
        .dlq_replay(&by_tenant, ReplayOptions::default())
        .await
        .unwrap();

    // Then both resume at step b (attempt 2) and finish; step a does not run again
    assert_eq!(report.replayed.len(), 2, "{report:?}");
    assert!(report.skipped.is_empty(), "{report:?}");
    for id in &acme {
        let done = eventually(Duration::from_secs(20), || async {
            ns.step_starts_with_attempts()
                .iter()
                .any(|s| s.job == id.to_string() && s.step == "c")
        })
        .await;
        assert!(done, "job {id} did not reach step c after the replay");
        let starts = ns.step_starts_with_attempts();
        let of = |step: &str| -> Vec<u32> {
            starts
                .iter()
                .filter(|s| s.job == id.to_string() && s.step == step)
                .map(|s| s.attempt)
                .collect()
        };
        assert_eq!(of("a"), vec![1], "job {id}: step a ran again");
        let mut b = of("b");
        b.sort();
        assert_eq!(b, vec![1, 2], "job {id}");
    }
    // ...and once their success is in the results stream, waiting on them gives that newest
    // result, not the failure that came before it
    let succeeded = eventually(Duration::from_secs(20), || async {
        let results = collect_results(&client, &acme, Duration::from_secs(2)).await;
        acme.iter().all(|id| {
            results
                .get(id)
                .is_some_and(|events| events.iter().any(|e| e.status == JobStatus::Succeeded))
        })
    })
    .await;
    assert!(succeeded, "no success event after the replay");
    for id in &acme {
        let result = client.wait(*id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    }

    // When everything is replayed: the garbage cannot be, and stays; globex's job can
    let report = client
        .dlq_replay(
            &DlqFilter::default(),
            ReplayOptions {
                reset_attempts: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 1, "{report:?}");
    assert_eq!(report.replayed[0].job_id, Some(globex));
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(report.skipped[0].why.contains("not a warren envelope"));
    let globex_done = eventually(Duration::from_secs(20), || async {
        ns.step_starts_with_attempts()
            .iter()
            .any(|s| s.job == globex.to_string() && s.step == "c")
    })
    .await;
    assert!(globex_done, "globex's job did not finish after the replay");
    let globex_b: Vec<u32> = ns
        .step_starts_with_attempts()
        .iter()
        .filter(|s| s.job == globex.to_string() && s.step == "b")
        .map(|s| s.attempt)
        .collect();
    assert_eq!(
        globex_b,
        vec![1, 1],
        "--reset-attempts starts b at attempt 1"
    );

    // When the garbage is purged by id, then the DLQ is empty
    let purged = client.dlq_purge(&DlqFilter::id("garbage-1")).await.unwrap();
    assert_eq!(purged.len(), 1);
    assert!(client
        .dlq_list(&DlqFilter::default())
        .await
        .unwrap()
        .is_empty());
    let busy: Vec<_> = ns
        .work_queue_depths()
        .await
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    assert!(busy.is_empty(), "{busy:?}");
    broker.close().await;
}

#[tokio::test]
async fn a_bundle_an_older_worker_set_aside_is_replayed_whole() {
    // Given a bundle of two first-step messages in the DLQ, as a worker from before bundles
    // leaves one (undecodable to it, set aside whole)
    let ns = TestNamespace::new(THREE_STEPS).await;
    let client = ns.client().await;
    let broker = ns.broker().await;
    let jobs: Vec<Envelope> = (0..2)
        .map(|n| {
            Envelope::new_job(
                JobId::new(),
                TenantId::parse("acme").unwrap(),
                "chain",
                "a",
                Priority::Normal,
                json!({ "n": n }),
            )
        })
        .collect();
    let bundle = Bundle::new("acme", jobs.iter().map(encode)).encode();
    let queue = StepRoute::for_tenant(
        ns.config.pipeline("chain").unwrap(),
        "a",
        Priority::Normal,
        "acme",
    )
    .queue(broker.names());
    let mut headers = lapin::types::FieldTable::default();
    for (key, value) in [
        (dead_letter::REASON, "undecodable"),
        (dead_letter::QUEUE, queue.as_str()),
    ] {
        headers.insert(
            key.into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
    }
    let channel = broker.confirm_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            broker.names().dlq().as_str().into(),
            BasicPublishOptions::default(),
            &bundle,
            BasicProperties::default()
                .with_message_id(jobs[0].job_id.to_string().into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // When it is listed, then replayed, with a worker running
    let listed = client.dlq_list(&DlqFilter::default()).await.unwrap();
    let _worker = ns.spawn_worker(&[]);
    let report = client
        .dlq_replay(&DlqFilter::default(), ReplayOptions::default())
        .await
        .unwrap();

    // Then the listing names its tenant, pipeline and size, and both jobs run to their end
    assert_eq!(listed.len(), 1, "{listed:?}");
    let letter = &listed[0];
    assert_eq!(letter.bundled_parts, Some(2));
    assert_eq!(
        (letter.tenant.as_deref(), letter.pipeline.as_deref()),
        (Some("acme"), Some("chain"))
    );
    assert_eq!(report.replayed.len(), 1, "{report:?}");
    for env in &jobs {
        let result = client
            .wait(env.job_id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
        assert_eq!(result.output["trail"], json!(["a", "b", "c"]));
    }
}
