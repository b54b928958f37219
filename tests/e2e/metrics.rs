//! A worker's /metrics, /healthz and /readyz, scraped over HTTP while it runs real jobs.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use tokio::net::TcpStream;
use warren_broker::{Lane, StepRoute};
use warren_common::{JobStatus, Priority};
use warren_producer::Job;
use warren_tests::{eventually, TestNamespace};

const PIPELINE: &str = r#"
[[pipelines]]
name = "chain"
shards = 2

[[pipelines.steps]]
name = "a"
handler = "work"

[[pipelines.steps]]
name = "b"
handler = "work"
backoff = ["100ms"]
"#;

/// GET from a port that must answer: (status, body).
pub(crate) async fn get(port: u16, path: &str) -> (u16, String) {
    warren_tests::http_get(port, path)
        .await
        .unwrap_or_else(|| panic!("nothing answers on port {port}"))
}

/// `name{labels} value` lines of the text format, by everything before the value.
pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_count_what_happened() {
    // Given a worker serving metrics on a port of its own
    let ns = TestNamespace::new(PIPELINE).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let worker = ns.spawn_worker(&["--metrics-addr", &addr]);
    let up = eventually(Duration::from_secs(20), || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    assert!(up, "no metrics endpoint: {}", worker.log_text());
    assert_eq!(get(port, "/healthz").await.0, 200);
    let ready = eventually(Duration::from_secs(20), || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "never ready");

    // When two jobs succeed, one succeeds after a retry at b, one fails for good at a, and a
    // garbage message lands on a step queue
    let client = ns.client().await;
    let jobs = vec![
        Job::new("chain", "acme", json!({})),
        Job::new("chain", "globex", json!({})),
        Job::new("chain", "acme", json!({"fail_at": "b", "fail_times": 1})),
        Job::new("chain", "acme", json!({"fail_permanently_at": "a"})),
    ];
    let ids = client.submit_many(jobs).await.unwrap();
    for (id, want) in ids.iter().zip([
        JobStatus::Succeeded,
        JobStatus::Succeeded,
        JobStatus::Succeeded,
        JobStatus::Failed,
    ]) {
        let result = match client.wait(*id, Duration::from_secs(30)).await {
            Ok(result) => result,
            // Where the job is helps tell a lost message from a lost result.
            Err(e) => panic!(
                "job {id}: {e}; ready: {:?}; unacked: {:?}; worker log:\n{}",
                ns.work_queue_depths().await,
                ns.unacked().await,
                worker.log_text()
            ),
        };
        assert_eq!(result.status, want, "{result:?}");
    }
    let broker = ns.broker().await;
    let channel = broker.confirm_channel().await.unwrap();
    let queue = StepRoute::new("chain", "a", Priority::High, Lane::Shard(1)).queue(broker.names());
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"garbage",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // Then /metrics counts each outcome, with pipeline, step and priority labels
    let undecodable = "warren_dead_letters_total{pipeline=\"unknown\",reason=\"undecodable\"}";
    let counted = eventually(Duration::from_secs(10), || async {
        samples(&get(port, "/metrics").await.1).contains_key(undecodable)
    })
    .await;
    let m = samples(&get(port, "/metrics").await.1);
    assert!(counted, "{m:#?}");
    let execution = |step: &str, priority: &str, outcome: &str| {
        let key = format!(
            "warren_step_executions_total{{outcome=\"{outcome}\",pipeline=\"chain\",priority=\"{priority}\",step=\"{step}\"}}"
        );
        m.get(&key).copied().unwrap_or(0.0)
    };
    assert_eq!(execution("a", "normal", "succeeded"), 3.0);
    assert_eq!(execution("a", "normal", "failed"), 1.0);
    assert_eq!(execution("b", "normal", "retried"), 1.0);
    assert_eq!(execution("b", "normal", "succeeded"), 3.0);
    assert_eq!(execution("a", "high", "dead_lettered"), 1.0);
    let value = |key: &str| m.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        value("warren_dead_letters_total{pipeline=\"chain\",reason=\"failed\"}"),
        1.0
    );
    assert_eq!(
        value("warren_job_duration_seconds_count{outcome=\"succeeded\",pipeline=\"chain\",priority=\"normal\"}"),
        3.0
    );
    assert_eq!(
        value("warren_job_duration_seconds_count{outcome=\"failed\",pipeline=\"chain\",priority=\"normal\"}"),
        1.0
    );
    assert_eq!(
        value("warren_step_queue_wait_seconds_count{pipeline=\"chain\",priority=\"normal\",step=\"b\"}"),
        4.0,
        "3 jobs reach b, one of them twice"
    );
    assert!(value("warren_publish_confirm_seconds_count{kind=\"result\"}") >= 4.0);
    assert!(value("warren_publish_confirm_seconds_count{kind=\"retry\"}") >= 1.0);
    assert_eq!(
        value("warren_steps_in_flight{pipeline=\"chain\",step=\"a\"}"),
        0.0
    );
    assert_eq!(value("warren_worker_connected"), 1.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
    // No tenant ever becomes a label
    let text = get(port, "/metrics").await.1;
    assert!(!text.contains("acme") && !text.contains("globex"));
    assert_eq!(get(port, "/nope").await.0, 404);
    broker.close().await;
}
