//! The custom worker example run as a user runs it: `reports-worker run --config
//! examples/reports-worker.toml` on the real broker (127.0.0.1:5672, or `WARREN_AMQP_URL`), in a
//! namespace of its own that is deleted afterwards, pass or fail. A job submitted with the
//! producer SDK goes through `fetch` (Python), `analyze` (the Rust handler) and `render`
//! (Python); then SIGTERM drains the worker, which exits 0. Needs `python3`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use warren_common::env::{ENV_WARREN_AMQP_URL, ENV_WARREN_NAMESPACE};
use warren_common::{Config, JobStatus};
use warren_producer::{Client, Job};
use warren_tests::TestNamespace;

/// Generous: the three steps take well under a second, but CI machines are slow and shared.
const PATIENCE: Duration = Duration::from_secs(90);

#[tokio::test]
async fn reports_worker_runs_its_rust_handler_between_command_steps() {
    let ns = example_namespace().await;
    let log = ns.dir.join("reports-worker.log");
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_reports-worker"))
        .arg("run")
        .arg("--config")
        .arg(&ns.config_path)
        .env(ENV_WARREN_NAMESPACE, &ns.name)
        // Any free port: other tests run workers at the same time.
        .env("WARREN_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start reports-worker");
    let worker_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let client = Client::connect(ns.config.clone()).await.expect("client");
    let job = Job::new(
        "reports",
        "acme",
        json!({"topic": "tidal energy", "paragraphs": 3}),
    );
    let id = client.submit(job).await.expect("submit");
    let result = match client.wait(id, PATIENCE).await {
        Ok(result) => result,
        Err(e) => panic!("no result for job {id}: {e}\nworker log:\n{}", worker_log()),
    };
    assert_eq!(
        result.status,
        JobStatus::Succeeded,
        "job {id} failed: {:?} (is python3 installed?)\nworker log:\n{}",
        result.error,
        worker_log()
    );
    // `render` wrote the report from the numbers `analyze` computed from `fetch`'s document.
    let report = result.output["report"].as_str().unwrap_or_default();
    assert!(
        report.starts_with("# Tidal Energy: notes for acme\n"),
        "report: {report}"
    );
    assert!(report.contains("- top words: "), "report: {report}");
    let stats = &result.output["stats"];
    assert_eq!(stats["paragraphs"], json!(3), "stats: {stats}");
    let words = stats["words"].as_u64().unwrap_or(0);
    let unique = stats["unique_words"].as_u64().unwrap_or(0);
    assert!(words > 0 && unique > 0 && unique <= words, "stats: {stats}");
    client.close().await;

    let pid = Pid::from_raw(worker.id().expect("worker pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let exit = tokio::time::timeout(PATIENCE, worker.wait())
        .await
        .expect("worker still running after SIGTERM")
        .expect("worker exit status");
    assert!(
        exit.success(),
        "worker exited with {exit} after SIGTERM\nworker log:\n{}",
        worker_log()
    );
}

/// examples/reports-worker.toml as it is, in a fresh namespace whose topology is declared here
/// and deleted when the returned value is dropped (even by a failing test).
async fn example_namespace() -> TestNamespace {
    let name = format!("wt-{:08x}", rand::random::<u32>());
    let mut env = HashMap::from([(ENV_WARREN_NAMESPACE.to_string(), name.clone())]);
    if let Ok(url) = std::env::var(ENV_WARREN_AMQP_URL) {
        env.insert(ENV_WARREN_AMQP_URL.to_string(), url);
    }
    let config_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reports-worker.toml");
    let config = Config::load(Some(&config_path), &env).expect("examples/reports-worker.toml");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ns = TestNamespace {
        name,
        dir,
        config_path,
        config,
    };
    ns.declare().await;
    ns
}
