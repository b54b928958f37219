//! The results check (`[results] check`) writes a result event the results stream does not
//! hold to it again, and leaves alone the events it holds. On one node the stream loses
//! nothing, so the loss is made here: an event that reached the check queue alone.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use warren_broker::{Outgoing, Publisher};
use warren_common::{encode_result, now_ms, Envelope, JobId, JobStatus, Priority, TenantId};
use warren_producer::{Job, ResultEvent, ResultStream, Since};
use warren_tests::TestNamespace;

use crate::THREE_STEPS;

#[tokio::test]
async fn an_event_the_results_stream_lost_is_written_again_once() {
    // Given a worker that checks results one second after they come
    let started = now_ms();
    let config = format!("[results]\ncheck = \"on\"\ncheck_after = \"1s\"\n{THREE_STEPS}");
    let ns = TestNamespace::new(&config).await;
    let mut worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When a job runs as usual
    let ran = client
        .submit(Job::new("chain", "acme", json!({})))
        .await
        .unwrap();
    let result = client.wait(ran, Duration::from_secs(60)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");

    // And a result event reaches the check queue but not the stream (what a stream leader's
    // move on a 3.10 cluster does to events it confirmed)
    let env = Envelope::new_job(
        JobId::new(),
        TenantId::parse("acme").unwrap(),
        "chain",
        "c",
        Priority::Normal,
        json!({}),
    );
    let lost = ResultEvent::succeeded(&env, json!({"lost": "and found"}));
    let broker = ns.broker().await;
    let queue = broker.names().results_check();
    let id = lost.job_id.to_string();
    Publisher::new(&broker)
        .await
        .unwrap()
        .publish(Outgoing::persistent("", &queue, &encode_result(&lost), &id))
        .await
        .expect("the check queue takes it");

    // Then a wait for it ends, with the event as it was
    let found = client
        .wait(lost.job_id, Duration::from_secs(60))
        .await
        .expect("the lost event written to the stream again");
    assert_eq!(found.output, json!({"lost": "and found"}));
    assert_eq!(found.finished_at, lost.finished_at);

    // And the stream holds each event once: the one it had was not written again
    let mut stream = ResultStream::open(&broker, Since::Time(started.saturating_sub(1_000)))
        .await
        .unwrap();
    let mut counts: HashMap<JobId, usize> = HashMap::new();
    // The check looks every 5 s; give it two rounds past the one that found the lost event.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(12), stream.next()).await {
        *counts.entry(event.unwrap().job_id).or_default() += 1;
    }
    stream.close().await;
    assert_eq!(counts.get(&ran), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&lost.job_id), Some(&1), "{counts:?}");
    let log = worker.log_text();
    assert!(
        log.contains("wrote them again"),
        "the worker did not say what it did:\n{log}"
    );

    assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));
    client.close().await;
    broker.close().await;
}
