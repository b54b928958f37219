//! Bad input gets a clear error or is set aside with its reason; workers keep serving.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use warren_broker::publish::header;
use warren_broker::{consume, Lane, Names, PublishError, StepRoute};
use warren_common::{Config, JobStatus, Priority};
use warren_producer::{Job, SubmitError};
use warren_tests::TestNamespace;

use crate::THREE_STEPS;

#[tokio::test]
async fn sdk_refuses_bad_jobs_before_publishing() {
    let ns = TestNamespace::new(THREE_STEPS).await;
    let client = ns.client().await;
    for tenant in ["", "a.b", "a*", "#", "x y", &"t".repeat(65)] {
        let err = client
            .submit(Job::new("chain", tenant, json!({})))
            .await
            .unwrap_err();
        assert!(matches!(err, SubmitError::Invalid(_)), "{tenant:?}: {err}");
        assert!(err.to_string().contains("tenant"), "{err}");
    }
    let err = client
        .submit(Job::new("nope", "acme", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::UnknownPipeline(_)), "{err}");
    let big = json!({"blob": "x".repeat(2 * 1024 * 1024)});
    let err = client
        .submit(Job::new("chain", "acme", big))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::PayloadTooLarge { .. }), "{err}");
    // A bad job in a batch stops the whole batch before anything is published
    let batch = vec![
        Job::new("chain", "ok", json!({})),
        Job::new("chain", "not ok", json!({})),
    ];
    let err = client.submit_many(batch).await.unwrap_err();
    assert!(
        matches!(err, SubmitError::InBatch { index: 1, .. }),
        "{err}"
    );
    let first_queue = ns.broker().await;
    let depth = warren_broker::depth::ready_messages(
        &first_queue,
        &StepRoute::for_tenant(&ns.config.pipelines[0], "a", Priority::Normal, "ok")
            .queue(first_queue.names()),
    )
    .await
    .unwrap();
    assert_eq!(depth, Some(0));
}

#[tokio::test]
async fn unroutable_job_is_an_error_not_a_silent_drop() {
    // Given a config whose pipeline was never declared on the broker
    let ns = TestNamespace::new(THREE_STEPS).await;
    let extra = format!(
        "[broker]\nurl = {:?}\nnamespace = {:?}\n[[pipelines]]\nname = \"undeclared\"\n[[pipelines.steps]]\nname = \"s\"\nhandler = \"work\"\n",
        ns.config.broker.url(), ns.name
    );
    let config = Config::parse(
        &extra,
        "inline",
        Path::new("."),
        &std::collections::HashMap::new(),
    )
    .unwrap();
    let client = warren_producer::Client::connect(config).await.unwrap();
    // When a job for it is submitted
    let err = client
        .submit(Job::new("undeclared", "acme", json!({})))
        .await
        .unwrap_err();
    // Then the caller hears about it
    assert!(
        matches!(
            err,
            SubmitError::Publish {
                cause: PublishError::Unroutable { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("topology apply"), "{err}");
}

#[tokio::test]
async fn garbage_on_a_step_queue_is_set_aside_and_the_worker_goes_on() {
    // Given a running worker
    let ns = TestNamespace::new(THREE_STEPS).await;
    let mut worker = ns.spawn_worker(&[]);
    let broker = ns.broker().await;
    let names = Names::new(&ns.name);
    let channel = broker.confirm_channel().await.unwrap();
    let queue = StepRoute::new("chain", "a", Priority::Normal, Lane::Shard(0)).queue(&names);
    let publish = |body: Vec<u8>| {
        let (channel, queue) = (channel.clone(), queue.clone());
        async move {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // When garbage bytes, a future format version, an unknown pipeline...
    publish(b"\xc1\xff definitely not msgpack".to_vec()).await;
    let mut future_version = rmp_serde::to_vec_named(&json!({"v": 99, "job_id": "x"})).unwrap();
    publish(std::mem::take(&mut future_version)).await;
    let stranger = json!({"v": 1, "job_id": uuid::Uuid::now_v7().to_string(), "tenant": "acme",
        "pipeline": "nope", "step": "a", "input": null});
    publish(rmp_serde::to_vec_named(&stranger).unwrap()).await;
    // ...and an input over max_payload_bytes (1 MiB by default)
    let huge = json!({"v": 1, "job_id": uuid::Uuid::now_v7().to_string(), "tenant": "acme",
        "pipeline": "chain", "step": "a", "input": "x".repeat(1_100_000)});
    publish(rmp_serde::to_vec_named(&huge).unwrap()).await;

    // Then each is in the dead-letter queue with its reason, the raw bytes kept...
    let dlq = names.dlq();
    let reader = broker.channel().await.unwrap();
    let mut consumer = consume(&reader, &dlq, 10, FieldTable::default())
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let reason = header(&d.properties, "x-warren-reason").unwrap();
        assert_eq!(header(&d.properties, "x-warren-queue").unwrap(), queue);
        let error = header(&d.properties, "x-warren-error").unwrap();
        assert!(!error.is_empty());
        if reason == "undecodable" && d.data.starts_with(b"\xc1\xff") {
            assert!(error.contains("not a warren message"), "{error}");
        }
        reasons.push(reason);
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "oversized",
            "undecodable",
            "undecodable",
            "unknown-pipeline"
        ]
    );

    // ...and the worker still serves real jobs
    let client = ns.client().await;
    let id = client
        .submit(Job::new("chain", "acme", json!({})))
        .await
        .unwrap();
    let result = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded);
    assert!(
        worker.wait_exit(Duration::from_millis(10)).is_none(),
        "worker died"
    );
}

#[tokio::test]
async fn config_typo_stops_the_worker_with_key_and_line() {
    // Given a config with a typo in a step key
    let ns = TestNamespace::new(THREE_STEPS).await;
    let broken = std::fs::read_to_string(&ns.config_path).unwrap().replacen(
        "concurrency = 4",
        "concurency = 4",
        1,
    );
    let path = ns.dir.join("broken.toml");
    std::fs::write(&path, &broken).unwrap();
    let line = broken
        .lines()
        .position(|l| l.starts_with("concurency"))
        .unwrap()
        + 1;

    // When a worker starts with it
    let out = run_worker(&path);

    // Then it exits 64 with one line naming the file, line and key
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("broken.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("unknown field `concurency`"), "{stderr}");

    // And a config naming a handler this binary lacks is refused, naming the key
    let unknown = std::fs::read_to_string(&ns.config_path).unwrap().replacen(
        "handler = \"work\"",
        "handler = \"resize\"",
        1,
    );
    std::fs::write(&path, unknown).unwrap();
    let out = run_worker(&path);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pipelines.chain.steps.a.handler = \"resize\""),
        "{stderr}"
    );
}

/// Runs the test worker on `config` to its end (it is expected to refuse to start).
fn run_worker(config: &Path) -> std::process::Output {
    std::process::Command::new(warren_tests::test_worker_bin())
        .args(["run", "--config"])
        .arg(config)
        .output()
        .unwrap()
}
