//! The nightly example (examples/nightly/) end to end, as `deploy/local/demo.sh --nightly`
//! runs it: two workers on its config, in a namespace of its own deleted afterwards, pass or
//! fail. The schedule (`every = "20s"`) fires one job; its plan step fans out 16 parts over 12
//! tenants (big-customer in 5), at most 6 at once; umbrella's part fails on a corrupt record;
//! the join (`on_part_failure = "continue"`) still runs and reports it. Needs `python3`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use warren_common::env::{ENV_WARREN_AMQP_URL, ENV_WARREN_NAMESPACE};
use warren_common::{Config, JobId, JobStatus, ResultEvent};
use warren_producer::{Client, Since};
use warren_tests::TestNamespace;

/// Generous: the first slot comes within 20 s and the parts take a few seconds, but CI
/// machines are slow and shared.
const PATIENCE: Duration = Duration::from_secs(120);

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nightly")
}

#[tokio::test]
async fn the_nightly_schedule_fans_out_and_its_join_reports_every_tenant() {
    let started = Instant::now();
    let ns = example_namespace(&example_dir().join("warren.toml")).await;
    let client = Client::connect(ns.config.clone()).await.expect("client");
    // The namespace is new: reading its results from the start sees everything of this test.
    let mut results = client.results(Since::Time(0)).await.expect("results");
    let mut workers = [spawn_worker(&ns, 0), spawn_worker(&ns, 1)];
    let logs = || {
        (0..2)
            .map(|i| std::fs::read_to_string(log_path(&ns, i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // The schedule fires on its own; every part ends, then the join.
    let mut parts: Vec<ResultEvent> = Vec::new();
    let join = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = results.next().await {
            let event = event.expect("result event");
            if event.pipeline == "nightly" {
                return Some(event);
            }
            parts.push(event);
        }
        None
    })
    .await;
    results.close().await;
    let join = match join {
        Ok(Some(join)) => join,
        _ => panic!(
            "no join within {PATIENCE:?}; {} parts ended\nworker logs:\n{}",
            parts.len(),
            logs()
        ),
    };
    assert_eq!(
        (join.status, join.step.as_str()),
        (JobStatus::Succeeded, "notify"),
        "{:?} (is python3 installed?)\nworker logs:\n{}",
        join.error,
        logs()
    );
    let out = &join.output;

    // The job is the schedule's own: its id is the one of (nightly, its slot, ops).
    let slot = out["slot"].as_str().expect("slot");
    let slot_ms = chrono::DateTime::parse_from_rfc3339(slot)
        .expect("an RFC 3339 slot")
        .timestamp_millis() as u64;
    assert_eq!(join.job_id, JobId::for_slot("nightly", slot_ms, "ops"));
    assert_eq!(slot_ms % 20_000, 0, "every = \"20s\" slots: {slot}");

    // 16 parts ended before the join: umbrella's failed at transform, the rest succeeded.
    assert_eq!(parts.len(), 16, "{parts:#?}");
    let failed: Vec<_> = parts
        .iter()
        .filter(|p| p.status == JobStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(
        (failed[0].tenant.as_str(), failed[0].step.as_str()),
        ("umbrella", "transform")
    );
    assert!(parts.iter().all(|p| p
        .part_of
        .is_some_and(|o| o.job_id == join.job_id && o.total == 16)));

    // The summary: every tenant of the data file with its items, umbrella's failure named.
    assert_eq!(
        out["summary"],
        json!("12 tenants, 509 items, 15 of 16 parts ok, 1 failed"),
        "{}",
        out["report"]
    );
    let tenants = out["tenants"].as_object().expect("tenants");
    let expected = expected_items();
    assert_eq!(tenants.len(), expected.len(), "{}", out["report"]);
    for (tenant, items) in &expected {
        let row = &tenants[tenant.as_str()];
        let (parts, stored) = if tenant == "umbrella" {
            (1, 0)
        } else {
            (items.div_ceil(50), *items)
        };
        assert_eq!(row["items"], json!(items), "{tenant}: {row}");
        assert_eq!(row["stored"], json!(stored), "{tenant}: {row}");
        assert_eq!(row["parts"], json!(parts), "{tenant}: {row}");
        assert_eq!(
            row["failed"],
            json!(u64::from(tenant == "umbrella")),
            "{tenant}: {row}"
        );
    }
    assert_eq!(tenants["big-customer"]["parts"], json!(5));
    let why = tenants["umbrella"]["errors"][0]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("record umbrella-0012 has no price"), "{why}");
    client.close().await;

    // SIGTERM drains both workers, which exit 0.
    for (i, worker) in workers.iter_mut().enumerate() {
        let pid = Pid::from_raw(worker.id().expect("worker pid") as i32);
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let exit = tokio::time::timeout(PATIENCE, worker.wait())
            .await
            .expect("worker still running after SIGTERM")
            .expect("worker exit status");
        assert!(exit.success(), "worker {i} exited with {exit}\n{}", logs());
    }
    eprintln!(
        "nightly example: {} ({:.1?} from start to both workers stopped)",
        out["summary"],
        started.elapsed()
    );
}

/// Items per tenant as examples/nightly/data/tenants.json has them.
fn expected_items() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(example_dir().join("data/tenants.json")).expect("data");
    let data: Value = serde_json::from_str(&text).expect("JSON");
    data["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["items"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn log_path(ns: &TestNamespace, i: usize) -> PathBuf {
    ns.dir.join(format!("worker-{i}.log"))
}

/// A worker on the example's config: `reports-worker`, which is the stock `warren-worker`
/// command line plus one Rust handler this config does not use.
fn spawn_worker(ns: &TestNamespace, i: usize) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_reports-worker"))
        .arg("run")
        .arg("--config")
        .arg(&ns.config_path)
        .env(ENV_WARREN_NAMESPACE, &ns.name)
        // Any free port: other tests run workers at the same time.
        .env("WARREN_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(ns, i)).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start a worker")
}

/// `config_path` as it is, in a fresh namespace whose topology is declared here and deleted
/// when the returned value is dropped (even by a failing test).
async fn example_namespace(config_path: &Path) -> TestNamespace {
    let name = format!("wt-{:08x}", rand::random::<u32>());
    let mut env = HashMap::from([(ENV_WARREN_NAMESPACE.to_string(), name.clone())]);
    if let Ok(url) = std::env::var(ENV_WARREN_AMQP_URL) {
        env.insert(ENV_WARREN_AMQP_URL.to_string(), url);
    }
    let config = Config::load(Some(config_path), &env).expect("the example's config");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ns = TestNamespace {
        name,
        dir,
        config_path: config_path.to_path_buf(),
        config,
    };
    ns.declare().await;
    ns
}
