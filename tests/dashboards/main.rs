//! The Grafana dashboards, proven against a live Prometheus: a real `prometheus` scrapes a local
//! supervisor and its workers while a workload runs, then every panel's query goes to
//! Prometheus's HTTP API and must be valid and return at least one series.
//!
//! Needs the `prometheus` binary (Debian's `prometheus` package; `deploy/local/test.sh`
//! installs it). Alone: `cargo test -p warren-tests --test dashboards -- --nocapture`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use warren_common::Priority;
use warren_producer::{Client, Job};
use warren_tests::{eventually, http_get as get, management_url, test_worker_bin, TestNamespace};

const PIPELINE: &str = r#"
[[pipelines]]
name = "chain"
shards = 2

[[pipelines.steps]]
name = "a"
handler = "work"
backoff = ["200ms"]
max_attempts = 2

[[pipelines.steps]]
name = "b"
handler = "work"
backoff = ["200ms"]
"#;

/// Values the dashboards' template variables take in the queries sent here.
const VARIABLES: &[(&str, &str)] = &[
    ("pipeline", "chain"),
    ("step", "a"),
    ("shard", "0"),
    ("priority", "normal"),
    ("pool", "chain"),
    ("__rate_interval", "15s"),
    ("__interval", "5s"),
    ("__range", "5m"),
];

/// Stops the child when dropped: SIGTERM (a supervisor then drains its workers), SIGKILL if
/// it is still there after 20 s.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every `expr` of every panel (nested rows included) of a dashboard, with the panel's title.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                found.push((title.clone(), expr.to_string()));
            }
        }
    }
    found
}

fn substitute(expr: &str) -> String {
    let mut out = expr.to_string();
    for (name, value) in VARIABLES {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, json)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty(), "no dashboards in {}", dir.display());
    found
}

/// Submits a mixed workload until `until`: successes, retries and permanent failures, in every
/// priority, so every metric has series.
async fn workload(client: Client, until: Instant) {
    let mut i = 0u64;
    while Instant::now() < until {
        let jobs: Vec<Job> = (0..20)
            .map(|_| {
                i += 1;
                let payload = match i % 10 {
                    0 => json!({"fail_permanently_at": "b"}),
                    5 => json!({"fail_permanently_at": "a"}),
                    1 => json!({"fail_at": "a", "fail_times": 1}),
                    _ => json!({"sleep_ms": 20}),
                };
                Job::new("chain", format!("tenant-{}", i % 7), payload)
                    .priority(Priority::ALL[(i % 3) as usize])
            })
            .collect();
        client.submit_many(jobs).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_live_prometheus() {
    let prometheus = which("prometheus").expect(
        "the `prometheus` binary is needed: run deploy/local/test.sh (it installs Debian's \
         prometheus package) or apt-get install prometheus",
    );
    // Given a supervisor with its workers on a namespace of their own
    let ns = TestNamespace::new(PIPELINE).await;
    let (sup_port, worker_base) = (free_port(), free_port());
    let supervisor = Running(
        Command::new(test_worker_bin())
            .args(["supervise", "--config"])
            .arg(&ns.config_path)
            .args(["--min", "1", "--max", "2", "--target-backlog", "20"])
            .args(["--interval", "500ms", "--scale-down-after", "30s"])
            .args(["--metrics-addr", &format!("127.0.0.1:{sup_port}")])
            .args(["--worker-metrics-base", &worker_base.to_string()])
            .env_remove("WARREN_AMQP_URL")
            // For warren_queue_messages_unacked.
            .env("WARREN_MANAGEMENT_URL", management_url())
            .env(warren_tests::ENV_TEST_DIR, ns.markers())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(ns.dir.join("supervisor.log")).unwrap())
            .spawn()
            .expect("start the supervisor"),
    );

    // And a Prometheus scraping them every second
    let prom_port = free_port();
    let targets: Vec<String> = [sup_port, worker_base, worker_base + 1]
        .iter()
        .map(|p| format!("'127.0.0.1:{p}'"))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: warren\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(ns.dir.join("prometheus.yml"), config).unwrap();
    let _prometheus = Running(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                ns.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                ns.dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(ns.dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    let ready = eventually(Duration::from_secs(30), || async {
        matches!(get(prom_port, "/-/ready").await, Some((200, _)))
    })
    .await;
    assert!(ready, "prometheus did not start; see {}", ns.dir.display());

    // When a mixed workload runs for a while (and keeps running while the queries are made)
    let until = Instant::now() + Duration::from_secs(40);
    let load = tokio::spawn(workload(ns.client().await, until));
    tokio::time::sleep(Duration::from_secs(20)).await;

    // Then every panel query of every dashboard is valid and returns series
    let mut failures = Vec::new();
    let mut checked = 0;
    for (path, dashboard) in dashboards() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (title, expr) in panel_queries(&dashboard) {
            let query = substitute(&expr);
            let encoded = reqwest::Url::parse_with_params("http://x/", [("query", &query)])
                .expect("a valid query string");
            let encoded = encoded.query().expect("just set");
            // A series that needs one more scrape (a rate over a fresh counter) gets a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            let (ok, outcome) = loop {
                let (ok, outcome) = match get(prom_port, &format!("/api/v1/query?{encoded}")).await
                {
                    Some((200, body)) => {
                        let answer: Value = serde_json::from_str(&body).unwrap_or_default();
                        let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
                        (series > 0, format!("{series} series"))
                    }
                    Some((status, body)) => (false, format!("HTTP {status}: {body}")),
                    None => (false, "no answer".to_string()),
                };
                if ok || Instant::now() > deadline {
                    break (ok, outcome);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            checked += 1;
            println!("{name} / {title}: {query} -> {outcome}");
            if !ok {
                failures.push(format!("{name} / {title}: {query} -> {outcome}"));
            }
        }
    }
    load.abort();
    drop(supervisor);
    println!("{checked} panel queries checked against Prometheus");
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{} of {checked} queries failed (logs in {}):\n{}",
        failures.len(),
        ns.dir.display(),
        failures.join("\n")
    );
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
