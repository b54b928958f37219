//! The `warren` binary against the real broker, with a worker running in this process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use warren_worker::{handler_fn, StepContext, StepError, Worker};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

struct Namespace {
    dir: PathBuf,
    config: PathBuf,
}

impl Namespace {
    fn new() -> Self {
        let name = format!("wcli-{:08x}", uuid::Uuid::now_v7().as_u128() as u32);
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("warren.toml");
        let url = std::env::var("WARREN_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        std::fs::write(
            &config,
            format!(
                r#"[broker]
url = {url:?}
namespace = {name:?}

[[pipelines]]
name = "greet"
shards = 2

[[pipelines.steps]]
name = "hello"
handler = "hello"
"#
            ),
        )
        .unwrap();
        Self { dir, config }
    }

    fn warren(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_warren(&self.config, args, stdin)
    }

    /// The namespace's config as warren reads it (for shards and queue names).
    fn load_config(&self) -> warren_common::Config {
        warren_common::Config::load(Some(&self.config), &std::collections::HashMap::new()).unwrap()
    }

    /// `warren` with the management API at `url` (`WARREN_MANAGEMENT_URL`).
    fn warren_with_management(&self, args: &[&str], url: &str) -> Output {
        warren_command(&self.config, args)
            .env("WARREN_MANAGEMENT_URL", url)
            .output()
            .unwrap()
    }
}

/// `warren --config <config> <args>`, without a management URL from the caller's environment
/// (tests that want one set it).
fn warren_command(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(WARREN);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WARREN_MANAGEMENT_URL");
    command
}

/// Runs `warren --config <config> <args>`, feeding `stdin`.
fn run_warren(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = warren_command(config, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let out = self.warren(&["topology", "delete", "--yes"], None);
        assert!(out.status.success() || std::thread::panicking(), "{out:?}");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `hello`: greets `name`; refuses (permanently) when there is none; hangs on "slow".
async fn hello(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let name = input["name"]
        .as_str()
        .ok_or_else(|| StepError::permanent("no name"))?;
    if name == "slow" {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    Ok(json!({"greeting": format!("hello {name}"), "tenant": ctx.tenant}))
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_bulk_and_exit_codes() {
    // Given a namespace declared by the CLI and a worker serving it
    let ns = Namespace::new();
    let out = ns.warren(&["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("5 exchanges, 11 queues"),
        "{}",
        text(&out.stdout)
    );
    let config = ns.load_config();
    let worker = Worker::builder(config)
        .handler("hello", handler_fn(hello))
        .shutdown_grace(Duration::from_millis(100))
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop.cancelled_owned()).await }
    });
    // The CLI blocks; run it off the runtime that drives the in-process worker.
    let warren = |args: Vec<String>, stdin: Option<String>| {
        let config = ns.config.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_warren(&config, &refs, stdin.as_deref())
        })
    };

    // When a job is submitted with --wait, then the result JSON is printed and the exit is 0
    let out = warren(acme_submit(r#"{"name": "ada"}"#, &["--wait"]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(printed, json!({"greeting": "hello ada", "tenant": "acme"}));

    // When it is submitted without --wait, then the id is printed, and `warren wait` finds the result later
    let out = warren(acme_submit(r#"{"name": "bob"}"#, &["--json"]), None)
        .await
        .unwrap();
    let id = serde_json::from_str::<Value>(text(&out.stdout).trim()).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = warren(args(&["wait", &id, "--json"]), None).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let event: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (event["status"].as_str(), event["job_id"].as_str()),
        (Some("succeeded"), Some(id.as_str()))
    );

    // When a bulk file comes on stdin, with per-line fields and defaults from flags
    let bulk = "{\"tenant\": \"t1\", \"payload\": {\"name\": \"x\"}}\n\n{\"tenant\": \"t2\", \"priority\": \"high\", \"payload\": {\"name\": \"y\"}}\n";
    let out = warren(
        args(&["submit", "--bulk", "-", "--pipeline", "greet", "--wait"]),
        Some(bulk.into()),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(
        stdout.contains("hello x") && stdout.contains("hello y"),
        "{stdout}"
    );

    // When a bulk line is bad, then nothing is submitted and the line is named
    let out = warren(
        args(&["submit", "--bulk", "-", "--pipeline", "greet"]),
        Some("{\"tenant\": \"ok\"}\n{\"tenant\": \"not ok\"}\n".into()),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("job 1 of the batch: invalid tenant"),
        "{}",
        text(&out.stderr)
    );

    // When the job fails, then exit 3 with the reason; when it takes too long, exit 4
    let out = warren(acme_submit("{}", &["--wait"]), None).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no name"),
        "{}",
        text(&out.stderr)
    );
    let out = warren(
        acme_submit(r#"{"name": "slow"}"#, &["--wait", "--timeout", "1s"]),
        None,
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    // When input is wrong before anything is sent: not JSON, unknown pipeline, bad tenant
    for (bad, expect) in [
        (
            ["--tenant", "acme", "--payload", "{nope"],
            "payload is not valid JSON",
        ),
        (["--tenant", "a.b", "--payload", "{}"], "invalid tenant"),
    ] {
        let mut a = vec!["submit", "--pipeline", "greet"];
        a.extend(bad);
        let out = warren(args(&a), None).await.unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
    }
    let out = warren(
        args(&[
            "submit",
            "--pipeline",
            "nope",
            "--tenant",
            "acme",
            "--payload",
            "{}",
        ]),
        None,
    )
    .await
    .unwrap();
    assert!(
        text(&out.stderr).contains("unknown pipeline \"nope\""),
        "{}",
        text(&out.stderr)
    );

    // The job that failed ("no name") waits in the dead-letter queue: list, show, replay, purge
    let out = warren(args(&["dlq", "list", "--json"]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let letters: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let dead = &letters[0];
    assert_eq!(
        (
            dead["reason"].as_str(),
            dead["step"].as_str(),
            dead["tenant"].as_str()
        ),
        (Some("failed"), Some("hello"), Some("acme"))
    );
    assert!(
        dead["error"].as_str().unwrap().contains("no name"),
        "{dead}"
    );
    let dead_id = dead["id"].as_str().unwrap().to_string();
    let out = warren(args(&["dlq", "list"]), None).await.unwrap();
    assert!(
        text(&out.stdout).contains(&dead_id) && text(&out.stdout).contains("1 dead letters"),
        "{}",
        text(&out.stdout)
    );
    let out = warren(args(&["dlq", "show", &dead_id]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("no name"),
        "{}",
        text(&out.stdout)
    );
    // A replay or purge must say what it touches; a purge must be confirmed
    let out = warren(args(&["dlq", "replay"]), None).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = warren(args(&["dlq", "purge", "--all"]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    // Replayed as it is, it fails again, one attempt later
    let out = warren(args(&["dlq", "replay", &dead_id]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed"),
        "{}",
        text(&out.stdout)
    );
    let mut attempts = None;
    for _ in 0..100 {
        let out = warren(args(&["dlq", "list", "--json"]), None)
            .await
            .unwrap();
        if let Some(line) = text(&out.stdout).lines().next() {
            attempts = serde_json::from_str::<Value>(line).unwrap()["attempts"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attempts, Some(2));
    let out = warren(args(&["dlq", "purge", "--tenant", "acme", "--yes"]), None)
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("purged 1"),
        "{}",
        text(&out.stdout)
    );
    let out = warren(args(&["dlq", "show", &dead_id]), None)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[test]
fn bad_config_exits_64_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("wcli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("warren.toml");
    std::fs::write(
        &path,
        "[broker]\nnamespace = \"x\"\n\n[[pipelines]]\nname = \"p\"\nshards = 0\n",
    )
    .unwrap();
    let out = Command::new(WARREN)
        .arg("--config")
        .arg(&path)
        .args(["topology", "plan"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warren.toml:6:") && stderr.contains("`shards`"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let out = Command::new(WARREN)
        .args(["--config", "/nonexistent/warren.toml", "topology", "plan"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("/nonexistent/warren.toml"));
}

/// `submit --pipeline greet --tenant acme --payload <payload> <extra>`.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // Given a reader that has gone away before warren prints (`warren topology plan | head -0`)
    let ns = Namespace::new();
    let mut child = warren_command(&ns.config, &["topology", "plan"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());

    // Then warren stops at its first line with status 0 and no panic on stderr
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn acme_submit(payload: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "submit",
        "--pipeline",
        "greet",
        "--tenant",
        "acme",
        "--payload",
        payload,
    ]);
    a.extend(args(extra));
    a
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn queues_reports_ready_messages_per_queue_and_step() {
    // Given a namespace whose topology is not applied yet
    let ns = Namespace::new();

    // When `warren queues` runs, then every queue is reported missing, and it says what to do
    let out = ns.warren(&["queues", "--json"], None);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3 * 2, "one line per priority x shard");
    assert!(rows
        .iter()
        .all(|r| r["exists"] == json!(false) && r["ready"].is_null()));
    assert!(text(&out.stderr).contains("topology apply"), "{out:?}");

    // Given the topology, and 5 normal jobs of acme and 2 high ones of globex, with no worker
    let out = ns.warren(&["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    let mut bulk = String::new();
    for _ in 0..5 {
        bulk += "{\"tenant\": \"acme\", \"payload\": {\"name\": \"a\"}}\n";
    }
    for _ in 0..2 {
        bulk +=
            "{\"tenant\": \"globex\", \"priority\": \"high\", \"payload\": {\"name\": \"g\"}}\n";
    }
    let out = ns.warren(
        &["submit", "--bulk", "-", "--pipeline", "greet"],
        Some(&bulk),
    );
    assert!(out.status.success(), "{out:?}");

    // When `warren queues --json` runs, then each job is counted in its tenant's shard
    let config = ns.load_config();
    let greet = &config.pipelines[0];
    let out = ns.warren(&["queues", "--json", "--pipeline", "greet"], None);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    let ready = |priority: &str, shard: u16| {
        rows.iter()
            .find(|r| r["priority"] == json!(priority) && r["shard"] == json!(shard))
            .map(|r| r["ready"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(ready("normal", greet.shard_of("acme")), 5, "{rows:?}");
    assert_eq!(ready("high", greet.shard_of("globex")), 2, "{rows:?}");
    let total: u64 = rows.iter().map(|r| r["ready"].as_u64().unwrap()).sum();
    assert_eq!(total, 7);
    assert!(rows
        .iter()
        .all(|r| r["consumers"] == json!(0) && r["step"] == json!("hello")));

    // And the table lists only the non-empty queues, then the step's totals by priority
    let out = ns.warren(&["queues"], None);
    assert!(out.status.success(), "{out:?}");
    let table = text(&out.stdout);
    let queue_lines = table.lines().filter(|l| l.contains(".q.greet.")).count();
    assert_eq!(queue_lines, 2, "{table}");
    let totals: Vec<_> = table
        .lines()
        .find(|l| l.starts_with("greet "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        totals,
        ["greet", "hello", "7", "2", "5", "0", "-", "0"],
        "{table}"
    );
    let out = ns.warren(&["queues", "--all"], None);
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(".q.greet."))
            .count(),
        6
    );

    // And an unknown pipeline is an error
    let out = ns.warren(&["queues", "--pipeline", "nope"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// The management API of the test broker: `WARREN_MANAGEMENT_URL`, else the local one that
/// `deploy/local/test.sh` enables.
fn management_url() -> String {
    std::env::var("WARREN_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_reports_unacked_messages_from_the_management_api() {
    use warren_broker::lapin::types::FieldTable;

    // Given 3 jobs of one tenant, held unacked by a consumer that never acks
    let ns = Namespace::new();
    let out = ns.warren(&["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    let bulk = "{\"tenant\": \"acme\", \"payload\": {\"name\": \"a\"}}\n".repeat(3);
    let out = ns.warren(
        &["submit", "--bulk", "-", "--pipeline", "greet"],
        Some(&bulk),
    );
    assert!(out.status.success(), "{out:?}");
    let config = ns.load_config();
    let queue = warren_broker::StepRoute::for_tenant(
        &config.pipelines[0],
        "hello",
        warren_common::Priority::Normal,
        "acme",
    )
    .queue(&warren_broker::Names::new(&config.broker.namespace));
    let broker = warren_broker::Broker::connect(&config.broker)
        .await
        .unwrap();
    let channel = broker.channel().await.unwrap();
    let _holder = warren_broker::consume(&channel, &queue, 10, FieldTable::default())
        .await
        .unwrap();

    // When `warren queues --json` runs with the management API, then the 3 show as unacked (the
    // broker refreshes these counts every 5 s, hence the patience), not ready
    let url = management_url();
    let mut row = Value::Null;
    for _ in 0..40 {
        let out = ns.warren_with_management(&["queues", "--json"], &url);
        assert!(out.status.success(), "{out:?}");
        assert!(
            out.stderr.is_empty(),
            "is the management plugin on? {}",
            text(&out.stderr)
        );
        row = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["queue"] == json!(queue))
            .unwrap();
        if row["unacked"] == json!(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(row["unacked"], json!(3), "{row}");
    assert_eq!(row["ready"], json!(0), "{row}");
    assert_eq!(row["consumers"], json!(1), "{row}");

    // And the table shows the queue (it holds work, though none is ready) and the step's total
    let out = ns.warren_with_management(&["queues"], &url);
    let table = text(&out.stdout);
    let line: Vec<_> = table
        .lines()
        .find(|l| l.starts_with(&queue))
        .expect("the queue with unacked messages is listed")
        .split_whitespace()
        .collect();
    assert_eq!(line, [queue.as_str(), "0", "3", "1"], "{table}");

    // And with wrong credentials the ready counts still come, unacked is null, and stderr says why
    let wrong = url.replacen("://", "://nobody:wrong@", 1);
    let out = ns.warren_with_management(&["queues", "--json"], &wrong);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("401"), "{out:?}");
    assert!(
        !text(&out.stderr).contains("wrong@"),
        "password shown: {out:?}"
    );
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows
        .iter()
        .all(|r| r["unacked"].is_null() && r["ready"] == json!(0)));

    channel.close(200, "done".into()).await.unwrap();
    broker.close().await;
}
