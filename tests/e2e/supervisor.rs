//! `warren-worker supervise` against the real broker: a backlog scales the pool from 1 to 3
//! workers, the drained queues bring it back to 1 after the window, every job completes, a
//! killed worker is replaced, SIGTERM drains every worker before the supervisor exits 0, and a
//! pool of min 0 runs no worker until a job arrives, then goes back to none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use warren_common::JobStatus;
use warren_producer::Job;
use warren_tests::{collect_results, eventually, TestNamespace};

use crate::metrics::{free_port, get, samples};

const PIPELINE: &str = r#"
[[pipelines]]
name = "slow"
shards = 2

[[pipelines.steps]]
name = "s"
handler = "work"
concurrency = 2
"#;

const JOBS: usize = 120;

/// One sample of the supervisor's metrics: (seconds since start, backlog, desired, running).
type Sample = (f64, i64, i64, i64);

fn read_sample(text: &str, t0: Instant) -> Option<Sample> {
    let m = samples(text);
    let pool = |name: &str| {
        m.get(&format!("{name}{{pool=\"slow\"}}"))
            .map(|v| *v as i64)
    };
    let backlog = m
        .iter()
        .filter(|(k, _)| k.starts_with("warren_queue_messages{"))
        .map(|(_, v)| *v as i64)
        .sum();
    Some((
        t0.elapsed().as_secs_f64(),
        backlog,
        pool("warren_supervisor_workers_desired")?,
        pool("warren_supervisor_workers_running")?,
    ))
}

/// The /metrics text, or `None` while nothing answers (the supervisor is starting).
async fn try_metrics(port: u16) -> Option<String> {
    match warren_tests::http_get(port, "/metrics").await? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// Whether `pid` runs: it exists and is not a zombie (an orphan's exit is reaped by whatever
/// init the machine has, maybe late).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// The supervisor's own log lines (its workers' lines are prefixed, so not JSON).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Seconds of the day of a tracing JSON timestamp (`2025-01-01T12:34:56.789012Z`).
fn seconds_of_day(timestamp: &str) -> Option<f64> {
    let time = timestamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_scales_with_the_backlog_and_drains_on_sigterm() {
    // Given a supervisor of 1..3 workers, 20 ready messages per worker, a 2 s window
    let ns = TestNamespace::new(PIPELINE).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut sup = ns.spawn_supervisor(&[
        "--min",
        "1",
        "--max",
        "3",
        "--target-backlog",
        "20",
        "--interval",
        "500ms",
        "--scale-down-after",
        "2s",
        "--metrics-addr",
        &addr,
        "--worker-metrics-base",
        "0",
        "--shutdown-grace",
        "10s",
        "--log-format",
        "json",
    ]);
    let t0 = Instant::now();
    let history: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn({
        let (history, stop) = (history.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(text) = try_metrics(port).await {
                    if let Some(s) = read_sample(&text, t0) {
                        history.lock().unwrap().push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let running_now = || history.lock().unwrap().last().map_or(-1, |s| s.3);
    let ready = eventually(Duration::from_secs(20), || async {
        try_metrics(port).await.is_some()
            && get(port, "/readyz").await.0 == 200
            && running_now() == 1
    })
    .await;
    assert!(
        ready,
        "supervisor not ready with 1 worker:\n{}",
        sup.log_text()
    );

    // When a backlog of slow jobs arrives (120 x 200 ms, 2 at a time per worker)
    let client = ns.client().await;
    let jobs: Vec<Job> = (0..JOBS)
        .map(|i| Job::new("slow", format!("t{}", i % 6), json!({"sleep_ms": 200})))
        .collect();
    let ids = client.submit_many(jobs).await.unwrap();

    // Then the pool grows to 3 workers
    let grew = eventually(Duration::from_secs(15), || async { running_now() == 3 }).await;
    assert!(
        grew,
        "never 3 workers: {:?}\n{}",
        history.lock().unwrap(),
        sup.log_text()
    );

    // And every job completes
    let results = collect_results(&client, &ids, Duration::from_secs(60)).await;
    assert_eq!(results.len(), JOBS, "{}", sup.log_text());
    assert!(results
        .values()
        .all(|r| r.iter().all(|e| e.status == JobStatus::Succeeded)));

    // And once the queue is empty and the window has passed, it is back to 1
    let shrank = eventually(Duration::from_secs(15), || async { running_now() == 1 }).await;
    assert!(
        shrank,
        "never back to 1: {:?}\n{}",
        history.lock().unwrap(),
        sup.log_text()
    );

    // When its worker is killed, then another one is started, and the restart is counted
    let started = |log: &str| -> Vec<i32> {
        json_lines(log)
            .iter()
            .filter(|l| l["message"] == "Started a worker.")
            .filter_map(|l| l["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    };
    let before = started(&sup.log_text());
    let drained_pids = || -> Vec<i64> {
        json_lines(&sup.log_text())
            .iter()
            .filter(|l| l["message"] == "Worker drained and exited.")
            .filter_map(|l| l["pid"].as_i64())
            .collect()
    };
    // The drained ones exit (and are reaped) a moment after the scale-down.
    let gone = eventually(Duration::from_secs(15), || async {
        drained_pids().len() + 1 == before.len()
    })
    .await;
    assert!(gone, "drains never finished:\n{}", sup.log_text());
    let drained_pids = drained_pids();
    let live: Vec<i32> = before
        .iter()
        .copied()
        .filter(|p| !drained_pids.contains(&i64::from(*p)))
        .collect();
    assert_eq!(
        live.len(),
        1,
        "one worker left: {before:?} {drained_pids:?}"
    );
    kill(Pid::from_raw(live[0]), Signal::SIGKILL).unwrap();
    let restarted = eventually(Duration::from_secs(10), || async {
        let m = samples(&try_metrics(port).await.unwrap_or_default());
        m.get("warren_supervisor_restarts_total{pool=\"slow\"}") == Some(&1.0)
            && running_now() == 1
            && started(&sup.log_text()).len() == before.len() + 1
    })
    .await;
    assert!(
        restarted,
        "no restart: {:?}\n{}",
        history.lock().unwrap(),
        sup.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    poller.await.unwrap();

    // When the supervisor gets SIGTERM, then it drains its worker and exits 0
    let code = sup.terminate(Duration::from_secs(30));
    let log = sup.log_text();
    assert_eq!(code, Some(0), "{log}");

    // The decisions, for the record (and the issue note)
    let lines = json_lines(&log);
    let decisions: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "Scaling decision.")
        .collect();
    let start = decisions
        .first()
        .and_then(|d| seconds_of_day(d["timestamp"].as_str()?))
        .unwrap_or(0.0);
    println!("supervisor decisions (min 1, max 3, target-backlog 20, interval 500ms, scale-down-after 2s, {JOBS} jobs x 200 ms, concurrency 2):");
    println!(
        "{:>7} {:>8} {:>8} {:>8} {:>9}  action",
        "t (s)", "backlog", "desired", "running", "scale_to"
    );
    for d in &decisions {
        let t = d["timestamp"]
            .as_str()
            .and_then(seconds_of_day)
            .unwrap_or(start)
            - start;
        println!(
            "{t:>7.2} {:>8} {:>8} {:>8} {:>9}  {}",
            d["backlog"].as_i64().unwrap_or(-1),
            d["desired"].as_i64().unwrap_or(-1),
            d["running"].as_i64().unwrap_or(-1),
            d["scale_to"].as_i64().unwrap_or(-1),
            d["action"].as_str().unwrap_or("?")
        );
    }
    let actions: Vec<(&str, i64)> = decisions
        .iter()
        .map(|d| {
            (
                d["action"].as_str().unwrap_or(""),
                d["scale_to"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert!(actions.contains(&("scale_up", 3)), "{actions:?}");
    assert!(actions.contains(&("scale_down", 1)), "{actions:?}");
    let first_down = actions.iter().position(|a| a.0 == "scale_down");
    let up_to_3 = actions.iter().position(|a| *a == ("scale_up", 3));
    assert!(
        first_down > up_to_3,
        "no scale-down before the scale-up: {actions:?}"
    );

    // The metrics agree: 1, then 3 at the peak, then 1 again
    let history = history.lock().unwrap().clone();
    let mut steps: Vec<i64> = history.iter().map(|s| s.3).collect();
    steps.dedup();
    assert_eq!(steps.first(), Some(&1), "{history:?}");
    assert_eq!(steps.iter().max(), Some(&3), "{history:?}");
    assert_eq!(steps.last(), Some(&1), "{history:?}");
    let peak_backlog = history.iter().map(|s| s.1).max().unwrap_or(0);
    assert!(peak_backlog > 40, "the backlog was seen: {peak_backlog}");

    // And no worker outlives it: every worker it started has exited
    let pids: Vec<i32> = lines
        .iter()
        .filter(|l| l["message"] == "Started a worker.")
        .filter_map(|l| l["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    assert!(pids.len() >= 3, "{pids:?}");
    for pid in &pids {
        assert!(
            kill(Pid::from_raw(*pid), None).is_err(),
            "worker {pid} still runs"
        );
    }
    let drained = lines
        .iter()
        .filter(|l| l["message"] == "Worker drained and exited.")
        .collect::<Vec<_>>();
    let crashed = lines
        .iter()
        .filter(|l| l["message"] == "Worker exited unexpectedly; starting another.")
        .count();
    assert_eq!(crashed, 1, "only the worker we killed:\n{log}");
    assert_eq!(
        drained.len(),
        pids.len() - 1,
        "every other worker drained:\n{log}"
    );
    assert!(
        drained.iter().all(|l| l["status"] == "exit status: 0"),
        "{drained:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_drain_when_their_supervisor_is_killed() {
    // Given a supervisor that keeps 2 workers
    let ns = TestNamespace::new(PIPELINE).await;
    let mut sup = ns.spawn_supervisor(&[
        "--min",
        "2",
        "--max",
        "2",
        "--target-backlog",
        "20",
        "--interval",
        "500ms",
        "--worker-metrics-base",
        "0",
        "--log-format",
        "json",
    ]);
    let pids = || -> Vec<i32> {
        json_lines(&sup.log_text())
            .iter()
            .filter(|l| l["message"] == "Started a worker.")
            .filter_map(|l| l["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    };
    let started = eventually(Duration::from_secs(20), || async { pids().len() == 2 }).await;
    assert!(started, "never 2 workers:\n{}", sup.log_text());
    let workers = pids();

    // When the supervisor is SIGKILLed (it cannot drain them itself)
    sup.kill_hard();

    // Then each worker notices within a few seconds and exits
    let all_gone = eventually(Duration::from_secs(20), || async {
        workers.iter().all(|pid| !alive(*pid))
    })
    .await;
    // Not our children: whether they exited cleanly is in their log lines, not a status.
    assert!(
        all_gone,
        "workers {workers:?} outlived their supervisor:\n{}",
        sup.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_scales_to_zero_and_the_first_job_brings_a_worker_back() {
    // Given a supervisor that may run 0 to 2 workers, on an empty queue
    let ns = TestNamespace::new(PIPELINE).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut sup = ns.spawn_supervisor(&[
        "--min",
        "0",
        "--max",
        "2",
        "--target-backlog",
        "20",
        "--interval",
        "300ms",
        "--scale-down-after",
        "1s",
        "--metrics-addr",
        &addr,
        "--worker-metrics-base",
        "0",
        "--log-format",
        "json",
    ]);
    let running = || async {
        let text = try_metrics(port).await.unwrap_or_default();
        samples(&text)
            .get("warren_supervisor_workers_running{pool=\"slow\"}")
            .copied()
    };
    let started = || {
        json_lines(&sup.log_text())
            .iter()
            .filter(|l| l["message"] == "Started a worker.")
            .count()
    };
    // Then it runs none: a few ticks pass with no worker started
    let answering = eventually(Duration::from_secs(20), || async {
        running().await == Some(0.0)
    })
    .await;
    assert!(answering, "no metrics with 0 running:\n{}", sup.log_text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(started(), 0, "a worker started on an empty queue");

    // When one job arrives
    let client = ns.client().await;
    let id = client
        .submit(Job::new("slow", "t0", json!({"sleep_ms": 50})))
        .await
        .unwrap();

    // Then a worker starts and runs it
    let results = collect_results(&client, &[id], Duration::from_secs(30)).await;
    assert!(
        results
            .get(&id)
            .is_some_and(|r| r.iter().any(|e| e.status == JobStatus::Succeeded)),
        "the job did not complete:\n{}",
        sup.log_text()
    );
    assert_eq!(started(), 1, "{}", sup.log_text());

    // And once the queue has been empty for the window, the pool is back to zero
    let idle = eventually(Duration::from_secs(15), || async {
        running().await == Some(0.0)
    })
    .await;
    assert!(idle, "never back to 0 workers:\n{}", sup.log_text());
    let drained_ok = eventually(Duration::from_secs(15), || async {
        json_lines(&sup.log_text()).iter().any(|l| {
            l["message"] == "Worker drained and exited." && l["status"] == "exit status: 0"
        })
    })
    .await;
    assert!(
        drained_ok,
        "the worker was not drained:\n{}",
        sup.log_text()
    );
    assert_eq!(sup.terminate(Duration::from_secs(20)), Some(0));
}
