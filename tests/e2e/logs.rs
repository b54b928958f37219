//! `--log-format json`: one JSON object per line, and a step's lines carry the job, tenant,
//! pipeline, step and attempt, so a log aggregator can follow one job or one tenant.

use std::time::Duration;

use serde_json::{json, Value};
use warren_common::JobStatus;
use warren_producer::Job;
use warren_tests::{collect_results, TestNamespace};

const ONE_STEP: &str = r#"
[[pipelines]]
name = "logged"
shards = 1

[[pipelines.steps]]
name = "a"
handler = "work"
max_attempts = 2
backoff = ["100ms"]
"#;

#[tokio::test]
async fn json_logs_carry_the_job_on_every_step_line() {
    // Given a worker logging JSON
    let ns = TestNamespace::new(ONE_STEP).await;
    let mut worker = ns.spawn_worker(&["--log-format", "json"]);
    let client = ns.client().await;

    // When a job fails once, then succeeds on its retry
    let id = client
        .submit(Job::new(
            "logged",
            "acme-logs",
            json!({"fail_at": "a", "fail_times": 1}),
        ))
        .await
        .unwrap();
    let results = collect_results(&client, &[id], Duration::from_secs(30)).await;
    assert!(results[&id]
        .iter()
        .any(|r| r.status == JobStatus::Succeeded));
    assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));

    // Then every line of its log is a JSON object with a level, a message and a timestamp
    let log = worker.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        for key in ["timestamp", "level", "message"] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
    }
    // And the retry warning names the job, tenant, pipeline, step and attempt in its span
    let retry = lines
        .iter()
        .find(|l| l["message"] == "Step failed; it will be retried.")
        .unwrap_or_else(|| panic!("no retry line:\n{log}"));
    let span = &retry["span"];
    assert_eq!(span["job_id"], id.to_string(), "{retry}");
    assert_eq!(span["tenant"], "acme-logs", "{retry}");
    assert_eq!(span["pipeline"], "logged", "{retry}");
    assert_eq!(span["step"], "a", "{retry}");
    assert_eq!(span["attempt"], 1, "{retry}");
}
