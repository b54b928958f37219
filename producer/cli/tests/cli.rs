//! The `warren` binary against the real broker, with a worker running in this process.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_producer::JobStatus;
use warren_tests::{collect_results, eventually, management_url, SilentBroker, TestNamespace};
use warren_worker::{handler_fn, StepContext, StepError, Worker, WorkerError};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// The pipeline every test here runs: one step, served by [`hello`].
const GREET: &str = r#"
[[pipelines]]
name = "greet"
shards = 2

[[pipelines.steps]]
name = "hello"
handler = "hello"
"#;

/// `warren --config <the namespace's config> <args>`, feeding `stdin`.
fn warren_on(ns: &TestNamespace, args: &[&str], stdin: Option<&str>) -> Output {
    run_warren(&ns.config_path, args, stdin)
}

/// `warren` with the management API at `url` (`WARREN_MANAGEMENT_URL`).
fn warren_with_management(ns: &TestNamespace, args: &[&str], url: &str) -> Output {
    warren_command(&ns.config_path, args)
        .env("WARREN_MANAGEMENT_URL", url)
        .output()
        .unwrap()
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `hello`: greets `name`; refuses (permanently) when there is none, or while the file
/// `unless_file` names does not exist; hangs on "slow".
async fn hello(input: Value, ctx: StepContext) -> Result<Value, StepError> {
    let name = input["name"]
        .as_str()
        .ok_or_else(|| StepError::permanent("no name"))?;
    if let Some(fix) = input["unless_file"].as_str() {
        if !Path::new(fix).exists() {
            return Err(StepError::permanent("not fixed yet"));
        }
    }
    if name == "slow" {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    Ok(json!({"greeting": format!("hello {name}"), "tenant": ctx.tenant}))
}

/// A worker serving `greet` with [`hello`], in this process.
struct HelloWorker {
    stop: CancellationToken,
    join: JoinHandle<Result<(), WorkerError>>,
}

impl HelloWorker {
    fn start(ns: &TestNamespace) -> Self {
        let worker = Worker::builder(ns.config.clone())
            .handler("hello", handler_fn(hello))
            .shutdown_grace(Duration::from_millis(100))
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let join = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
        Self { stop, join }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.join.await.unwrap().unwrap();
    }
}

/// `warren <args>` on the namespace, off the runtime (the CLI blocks; the runtime drives the
/// in-process worker).
async fn warren_off_runtime(
    ns: &TestNamespace,
    args: Vec<String>,
    stdin: Option<String>,
) -> Output {
    let config = ns.config_path.clone();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_warren(&config, &refs, stdin.as_deref())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_bulk_and_exit_codes() {
    // Given a namespace declared by the CLI and a worker serving it
    let ns = TestNamespace::undeclared(GREET);
    let out = warren_on(&ns, &["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("5 exchanges, 18 queues"),
        "{}",
        text(&out.stdout)
    );
    let worker = HelloWorker::start(&ns);
    let warren = |args, stdin| warren_off_runtime(&ns, args, stdin);

    // When a job is submitted with --wait, then the result JSON is printed and the exit is 0
    let out = warren(acme_submit(r#"{"name": "ada"}"#, &["--wait"]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(printed, json!({"greeting": "hello ada", "tenant": "acme"}));

    // When it is submitted without --wait, then the id is printed, and `warren wait` finds the result later
    let out = warren(acme_submit(r#"{"name": "bob"}"#, &["--json"]), None).await;
    let id = serde_json::from_str::<Value>(text(&out.stdout).trim()).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = warren(args(&["wait", &id, "--json"]), None).await;
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
    .await;
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
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("job 1 of the batch: invalid tenant"),
        "{}",
        text(&out.stderr)
    );

    // When the job fails, then exit 3 with the reason; when it takes too long, exit 4
    let out = warren(acme_submit("{}", &["--wait"]), None).await;
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
    .await;
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
        let out = warren(args(&a), None).await;
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
    .await;
    assert!(
        text(&out.stderr).contains("unknown pipeline \"nope\""),
        "{}",
        text(&out.stderr)
    );

    // The job that failed ("no name") waits in the dead-letter queue: list, show, replay, purge
    let out = warren(args(&["dlq", "list", "--json"]), None).await;
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
    let out = warren(args(&["dlq", "list"]), None).await;
    assert!(
        text(&out.stdout).contains(&dead_id) && text(&out.stdout).contains("1 dead letter\n"),
        "{}",
        text(&out.stdout)
    );
    let out = warren(args(&["dlq", "show", &dead_id]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("no name"),
        "{}",
        text(&out.stdout)
    );
    // A replay or purge must say what it touches; a purge must be confirmed
    let out = warren(args(&["dlq", "replay"]), None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = warren(args(&["dlq", "purge", "--all"]), None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    // Replayed as it is, it fails again, one attempt later
    let out = warren(args(&["dlq", "replay", &dead_id]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed"),
        "{}",
        text(&out.stdout)
    );
    let mut attempts = None;
    for _ in 0..100 {
        let out = warren(args(&["dlq", "list", "--json"]), None).await;
        if let Some(line) = text(&out.stdout).lines().next() {
            attempts = serde_json::from_str::<Value>(line).unwrap()["attempts"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attempts, Some(2));
    let out = warren(args(&["dlq", "purge", "--tenant", "acme", "--yes"]), None).await;
    assert!(
        text(&out.stdout).contains("purged 1"),
        "{}",
        text(&out.stdout)
    );
    let out = warren(args(&["dlq", "show", &dead_id]), None).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_prints_the_newest_result_of_a_job_replayed_from_the_dead_letter_queue() {
    // Given a worker, and a job that failed for good (into the dead-letter queue) until a fix
    let ns = TestNamespace::new(GREET).await;
    let worker = HelloWorker::start(&ns);
    let fix = ns.dir.join("fixed");
    let payload = json!({"name": "zoe", "unless_file": fix}).to_string();
    let out = warren_off_runtime(&ns, acme_submit(&payload, &["--wait", "--json"]), None).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let failed: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(failed["status"], json!("failed"), "{failed}");
    let id = failed["job_id"].as_str().unwrap().to_string();
    let in_dlq = eventually(Duration::from_secs(10), || async {
        let out = warren_off_runtime(&ns, args(&["dlq", "list", "--json"]), None).await;
        text(&out.stdout).contains(&id)
    })
    .await;
    assert!(in_dlq, "the failed job is not in the dead-letter queue");

    // When the fix lands and the job is replayed, and its success reaches the results stream
    std::fs::write(&fix, "fixed").unwrap();
    let out = warren_off_runtime(&ns, args(&["dlq", "replay", &id]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed"),
        "{}",
        text(&out.stdout)
    );
    let client = ns.client().await;
    let job = id.parse().unwrap();
    let both = eventually(Duration::from_secs(20), || async {
        let results = collect_results(&client, &[job], Duration::from_secs(2)).await;
        results.get(&job).is_some_and(|events| {
            events.iter().map(|e| e.status).collect::<Vec<_>>()
                == [JobStatus::Failed, JobStatus::Succeeded]
        })
    })
    .await;
    assert!(
        both,
        "the stream does not hold the failure, then the success"
    );
    client.close().await;

    // Then `warren wait` prints the newest result, the success, and exits 0
    let out = warren_off_runtime(&ns, args(&["wait", &id, "--json"]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let event: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(event["status"], json!("succeeded"), "{event}");
    assert_eq!(event["output"]["greeting"], json!("hello zoe"), "{event}");
    let out = warren_off_runtime(&ns, args(&["wait", &id]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello zoe"),
        "{}",
        text(&out.stdout)
    );

    worker.stop().await;
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

#[test]
fn a_broker_that_never_answers_fails_the_command_after_the_connect_timeout() {
    // Given a broker that takes the TCP connection and never answers, and a 1 s connect_timeout
    let ns = TestNamespace::undeclared(GREET);
    let silent = SilentBroker::start();
    let text_of_config = std::fs::read_to_string(&ns.config_path).unwrap();
    let path = ns.dir.join("silent.toml");
    std::fs::write(
        &path,
        text_of_config.replace("[broker]\n", "[broker]\nconnect_timeout = \"1s\"\n"),
    )
    .unwrap();

    // When a one-shot command runs against it (the URL from the environment)
    let started = std::time::Instant::now();
    let submit = [
        "submit",
        "--pipeline",
        "greet",
        "--tenant",
        "acme",
        "--payload",
        "{}",
    ];
    let out = warren_command(&path, &submit)
        .env("WARREN_AMQP_URL", silent.url())
        .output()
        .unwrap();

    // Then it exits 1 soon after the deadline, saying which stage hung and why it usually does
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    for part in [
        "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1",
        "AMQP handshake within 1s",
        "open-files limit",
        "docs/deploy.md",
    ] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
    assert!(silent.accepted() >= 1);
}

/// `submit --pipeline greet --tenant acme --payload <payload> <extra>`.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // Given a reader that has gone away before warren prints (`warren topology plan | head -0`)
    let ns = TestNamespace::undeclared(GREET);
    let mut child = warren_command(&ns.config_path, &["topology", "plan"])
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

#[tokio::test(flavor = "multi_thread")]
async fn status_and_jobs_read_the_history() {
    // Given a worker and a job that succeeded and one that failed, both submitted by the CLI
    let owned = TestNamespace::new(&format!("[history]\nenabled = true\n{GREET}")).await;
    // A reference, so each closure below copies it.
    let ns = &owned;
    let worker = HelloWorker::start(ns);
    let warren = |args, stdin| warren_off_runtime(ns, args, stdin);
    let submit = |payload: &'static str| async move {
        let out = warren_off_runtime(ns, acme_submit(payload, &["--json"]), None).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_str::<Value>(text(&out.stdout).trim()).unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ok = submit(r#"{"name": "ada"}"#).await;
    let bad = submit("{}").await;

    // When `warren status` is asked until both ended
    let status = |id: String| async move {
        let out = warren_off_runtime(ns, args(&["status", &id, "--json"]), None).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_str::<Value>(text(&out.stdout).trim()).unwrap()
    };
    let ended = eventually(Duration::from_secs(30), || async {
        status(ok.clone()).await["status"] == "succeeded"
            && status(bad.clone()).await["status"] == "dead_lettered"
    })
    .await;

    // Then each says how it ended, the failure with its error and attempt
    let failed = status(bad.clone()).await;
    assert!(ended, "{failed:#}");
    assert_eq!(failed["step"], "hello", "{failed:#}");
    assert_eq!(failed["error"], "permanent failure: no name", "{failed:#}");
    assert_eq!(failed["attempts"][0]["outcome"], "failed", "{failed:#}");
    let out = warren(args(&["status", &bad]), None).await;
    let shown = text(&out.stdout);
    assert!(
        shown.contains("failed at step hello; dead-lettered") && shown.contains("no name"),
        "{shown}"
    );

    // And `warren jobs` lists both newest first, and filters by status
    let out = warren(args(&["jobs", "--tenant", "acme", "--json"]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: Vec<Value> = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let ids: Vec<&str> = listed.iter().filter_map(|j| j["job_id"].as_str()).collect();
    assert_eq!(ids, [bad.as_str(), ok.as_str()]);
    let out = warren(args(&["jobs", "--status", "succeeded"]), None).await;
    let shown = text(&out.stdout);
    assert!(shown.contains(&ok) && !shown.contains(&bad), "{shown}");

    // When the job is unknown, then exit 5
    let unknown = warren_producer::JobId::new().to_string();
    let out = warren(args(&["status", &unknown]), None).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no job"),
        "{}",
        text(&out.stderr)
    );
    worker.stop().await;

    // When history is off in the config, then exit 64 saying how to turn it on
    let off = TestNamespace::undeclared(&format!("[history]\nenabled = false\n{GREET}"));
    for command in [vec!["status", ok.as_str()], vec!["jobs"]] {
        let out = warren_on(&off, &command, None);
        assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("[history] enabled = true"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn queues_reports_ready_messages_per_queue_and_step() {
    // Given a namespace whose topology is not applied yet
    let ns = TestNamespace::undeclared(GREET);

    // When `warren queues` runs, then every queue is reported missing, and it says what to do
    let out = warren_on(&ns, &["queues", "--json"], None);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.len(),
        3 * 4,
        "one line per priority x lane (2 shards, 2 hot lanes)"
    );
    assert!(rows
        .iter()
        .all(|r| r["exists"] == json!(false) && r["ready"].is_null()));
    assert!(text(&out.stderr).contains("topology apply"), "{out:?}");

    // Given the topology, and 5 normal jobs of acme and 2 high ones of globex, with no worker
    let out = warren_on(&ns, &["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    let mut bulk = String::new();
    for _ in 0..5 {
        bulk += "{\"tenant\": \"acme\", \"payload\": {\"name\": \"a\"}}\n";
    }
    for _ in 0..2 {
        bulk +=
            "{\"tenant\": \"globex\", \"priority\": \"high\", \"payload\": {\"name\": \"g\"}}\n";
    }
    let out = warren_on(
        &ns,
        &["submit", "--bulk", "-", "--pipeline", "greet"],
        Some(&bulk),
    );
    assert!(out.status.success(), "{out:?}");

    // When `warren queues --json` runs, then each job is counted in its tenant's shard
    let config = ns.config.clone();
    let greet = &config.pipelines[0];
    let out = warren_on(&ns, &["queues", "--json", "--pipeline", "greet"], None);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    assert_eq!(
        rows.iter().filter(|r| r["lane"] == json!("hot1")).count(),
        3
    );
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
    let out = warren_on(&ns, &["queues"], None);
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
    let out = warren_on(&ns, &["queues", "--all"], None);
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(".q.greet."))
            .count(),
        12
    );

    // And an unknown pipeline is an error
    let out = warren_on(&ns, &["queues", "--pipeline", "nope"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_reports_unacked_messages_from_the_management_api() {
    use warren_broker::lapin::types::FieldTable;

    // Given 3 jobs of one tenant, held unacked by a consumer that never acks
    let ns = TestNamespace::undeclared(GREET);
    let out = warren_on(&ns, &["topology", "apply"], None);
    assert!(out.status.success(), "{out:?}");
    let bulk = "{\"tenant\": \"acme\", \"payload\": {\"name\": \"a\"}}\n".repeat(3);
    let out = warren_on(
        &ns,
        &["submit", "--bulk", "-", "--pipeline", "greet"],
        Some(&bulk),
    );
    assert!(out.status.success(), "{out:?}");
    let config = ns.config.clone();
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
        let out = warren_with_management(&ns, &["queues", "--json"], &url);
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
    let out = warren_with_management(&ns, &["queues"], &url);
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
    let out = warren_with_management(&ns, &["queues", "--json"], &wrong);
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

#[test]
fn plan_and_apply_count_the_queues_and_check_the_brokers_open_files() {
    // Given a namespace of one pipeline, 1 step x 3 priorities x (2 shards + 2 hot lanes), not
    // applied yet
    let ns = TestNamespace::undeclared(GREET);
    let url = management_url();

    // When `topology plan --json` runs with the management API
    let out = warren_with_management(&ns, &["--json", "topology", "plan"], &url);
    assert!(out.status.success(), "{out:?}");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();

    // Then it counts the queues: 12 step queues, the delay queues, the DLQ, the results and the
    // control streams (history is off by default)
    let counts = &plan["counts"];
    let queues = plan["queues"].as_array().unwrap().len() as u64;
    assert_eq!(counts["queues"], json!(queues), "{plan}");
    assert_eq!(counts["step_queues"], json!(12), "{plan}");
    assert_eq!(
        counts["pipelines"],
        json!([{"pipeline": "greet", "queues": 12, "steps": 1, "priorities": 3, "shards": 2, "hot_lanes": 2}])
    );
    let delay = counts["delay"].as_u64().unwrap();
    assert_eq!(queues, 12 + delay + 3, "{plan}");
    assert_eq!(
        (counts["quorum"].as_u64(), counts["stream"].as_u64()),
        (Some(queues - 2), Some(2))
    );
    // And the broker's open files, with every queue still to come
    let handles = counts["handles"].as_u64().unwrap();
    assert_eq!(handles, 3 * (queues - 2) + 4, "{plan}");
    let files = &plan["open_files"];
    assert!(files["fd_total"].as_u64().unwrap() > 0, "{plan}");
    assert_eq!(files["needed"], json!(handles), "{plan}");
    assert_eq!(files["exhausts"], json!(false), "{plan}");

    // When it is applied, then the text output says the same before the usual line
    let out = warren_with_management(&ns, &["topology", "apply"], &url);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "needs {queues} queues ({} quorum, 2 stream)",
            queues - 2
        )) && stdout.contains(
            "pipeline greet: 12 step queues (1 steps x 3 priorities x (2 shards + 2 hot lanes))"
        ) && stdout.contains(&format!("{handles} more for the queues not there yet")),
        "{stdout}"
    );

    // And a plan of the applied namespace needs no more handles: its queues hold theirs already,
    // 3 per quorum queue on top of the node's open files (other namespaces may add more)
    let out = warren_with_management(&ns, &["--json", "topology", "plan"], &url);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = &plan["open_files"];
    assert_eq!(files["needed"], json!(0), "{plan}");
    let (in_use, fd_used) = (files["in_use"].as_u64(), files["fd_used"].as_u64());
    assert!(in_use >= fd_used.map(|n| n + 3 * (queues - 2)), "{plan}");
}
