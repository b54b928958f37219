//! Chaos on a three-node RabbitMQ cluster (`deploy/local/cluster.sh`, started here and stopped at
//! the end, even when the test fails): workers attached to different nodes, producers submitting
//! throughout; the node that leads most queues is SIGKILLed, later started again, then another
//! node is stopped gracefully. Every job's last step ran (none lost), none failed, the DLQ and
//! every queue empty, no worker exited; duplicates, result events read back by id and the time
//! each fault took to heal are printed, and every job's result is read back by id. On RabbitMQ
//! 3.10 a stream can lose result events it confirmed while the node of its leader stops
//! (rabbitmq-server#9457); the workers' results check (`[results] check`, on for a cluster)
//! writes them again, and the test prints how many it wrote.
//!
//! Skipped with `WARREN_CLUSTER_CHAOS=0` (it runs RabbitMQ nodes of its own on this machine,
//! ports 5701-5703). `WARREN_CLUSTER_CHAOS_JOBS` sets the least number of jobs (default 3000).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde_json::json;
use warren_common::backoff::Backoff;
use warren_common::{now_ms, JobId, JobStatus};
use warren_producer::{Client, Job, SubmitError};
use warren_tests::{collect_results, eventually, TestNamespace, WorkerProcess};

use super::{priority, settle_queues, PIPELINE};

const TENANTS: usize = 30;
const PRODUCERS: usize = 3;
/// Producers keep at most this many jobs unfinished, so submitting goes on through every fault.
const IN_FLIGHT: usize = 400;
/// Jobs that must finish after a fault before it counts as healed.
const PROGRESS: usize = 100;
/// The longest any wait of this test may take.
const PATIENCE: Duration = Duration::from_secs(90);
/// How long results may take to be read back once every job's last step has run: longer than a
/// worker waits for a confirm before it publishes again on a fresh channel (15 s), and than the
/// results check takes to write a lost event again (`check_after`, 15 s, then a round of 5 s,
/// the read and the write's confirm).
const RESULTS_PATIENCE: Duration = Duration::from_secs(75);

/// `deploy/local/cluster.sh`, run from this test.
#[derive(Debug, Clone)]
struct ClusterScript(PathBuf);

impl ClusterScript {
    fn new() -> Self {
        Self(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh"))
    }

    /// Runs the script; its stdout. Panics with its output when it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("run deploy/local/cluster.sh");
        assert!(
            out.status.success(),
            "cluster.sh {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Node numbers that are up.
    fn up(&self) -> Vec<usize> {
        self.run(&["status"])
            .lines()
            .filter(|l| l.contains(" up "))
            .filter_map(node_number)
            .collect()
    }

    /// Queues and streams of `prefix` led per node, most first: (node, count).
    fn leaders(&self, prefix: &str) -> Vec<(usize, usize)> {
        self.run(&["leaders", prefix])
            .lines()
            .filter_map(|l| {
                let (count, node) = l.trim().split_once(' ')?;
                Some((node_number(node)?, count.parse().ok()?))
            })
            .collect()
    }

    /// Runs the script off the async runtime: node restarts take seconds.
    async fn blocking(&self, args: &[&str]) -> String {
        let script = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            script.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .expect("cluster.sh")
    }
}

/// `warren2@localhost` (anywhere in `text`) -> 2.
fn node_number(text: &str) -> Option<usize> {
    let at = text.find("warren")? + "warren".len();
    text[at..].chars().next()?.to_digit(10).map(|d| d as usize)
}

/// Starts the cluster, and on drop stops it (when it started it here) or starts its stopped
/// nodes again (when it was running before): the end of the test, or a panic in it.
struct Cluster {
    script: ClusterScript,
    started_here: bool,
}

impl Cluster {
    fn start() -> Self {
        let script = ClusterScript::new();
        let started_here = script.up().len() < 3;
        let cluster = Self {
            script,
            started_here,
        };
        // A start that fails panics here, and dropping `cluster` stops what did start.
        cluster.script.run(&["start"]);
        cluster
    }

    fn urls(&self) -> Vec<String> {
        let urls = self.script.run(&["urls"]);
        urls.trim().split(',').map(str::to_string).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let args: &[&str] = if self.started_here {
            &["stop"]
        } else {
            &["start"]
        };
        let ok = Command::new("bash")
            .arg(&self.script.0)
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cluster.sh {args:?} failed: stop it with deploy/local/cluster.sh stop");
        }
    }
}

/// The node a worker's current session is attached to (from its last "Worker started." line),
/// and whether that session is alive (no "Lost the broker" after it).
fn session(worker: &WorkerProcess) -> (Option<usize>, bool) {
    let log = worker.log_text();
    let started = log.rfind("Worker started.");
    let lost = log.rfind("Lost the broker");
    let node = started.and_then(|at| {
        let line = log[at..].lines().next()?;
        let port = line.split("127.0.0.1:").nth(1)?.get(..4)?;
        port.parse::<usize>().ok().map(|p| p - 5700)
    });
    (
        node,
        started.is_some() && lost.is_none_or(|l| l < started.unwrap_or(0)),
    )
}

fn sessions_started(worker: &WorkerProcess) -> usize {
    worker.log_text().matches("Worker started.").count()
}

/// Jobs whose last step has started (first attempts), counted from the test worker's marker
/// files by one task, so that the many waits of this test do not each read the folder.
#[derive(Debug, Default)]
struct Finished(AtomicUsize);

impl Finished {
    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts until `stop` is set.
    async fn count(self: Arc<Self>, markers: PathBuf, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let n = std::fs::read_dir(&markers).map_or(0, |dir| {
                dir.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains(".c.1."))
                    .count()
            });
            self.0.store(n, Ordering::Relaxed);
            // The next read of a folder of some 20,000 files, not a wait for an outcome.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Jobs whose last step has started at least once.
fn last_steps(ns: &TestNamespace) -> HashSet<String> {
    ns.step_starts()
        .into_iter()
        .filter(|s| s.1 == "c")
        .map(|s| s.0)
        .collect()
}

/// What the producers did.
#[derive(Default)]
struct Submitted {
    ids: StdMutex<Vec<JobId>>,
    next: AtomicUsize,
    /// Submits that reported an error (and were retried, as a caller would).
    errors: AtomicUsize,
    stop: AtomicBool,
}

/// Submits batches of 3-step jobs until told to stop, keeping at most [`IN_FLIGHT`] unfinished.
/// A submit that reports an error is retried for the jobs it did not confirm.
async fn produce(client: Client, finished: Arc<Finished>, done: Arc<Submitted>) {
    while !done.stop.load(Ordering::Relaxed) {
        let backlog_ok = eventually(PATIENCE, || async {
            let submitted = done.next.load(Ordering::Relaxed);
            submitted < finished.get() + IN_FLIGHT || done.stop.load(Ordering::Relaxed)
        })
        .await;
        assert!(backlog_ok, "no job finished for {PATIENCE:?}");
        let first = done.next.fetch_add(30, Ordering::Relaxed);
        let mut batch: Vec<Job> = (first..first + 30)
            .map(|i| {
                Job::new(
                    "chaos",
                    format!("tenant-{}", i % TENANTS),
                    json!({"i": i, "sleep_ms": 2}),
                )
                .priority(priority(i))
            })
            .collect();
        done.ids
            .lock()
            .expect("ids")
            .extend(batch.iter().map(|j| j.id));
        let started = Instant::now();
        // As a caller would, pause before trying again: a refused submit may still be stored
        // (a negative confirm during a quorum queue's fail-over), and each try can add a copy.
        let mut backoff = Backoff::reconnect();
        while !batch.is_empty() {
            let (confirmed, error) = match client.submit_many(batch.clone()).await {
                Ok(_) => (batch.len(), None),
                Err(
                    e @ (SubmitError::Publish { confirmed, .. }
                    | SubmitError::BacklogFull { confirmed, .. }),
                ) => (confirmed, Some(e)),
                Err(e) => panic!("submit: {e}"),
            };
            if let Some(error) = error {
                done.errors.fetch_add(1, Ordering::Relaxed);
                // (the last error says why, should they go on for too long)
                assert!(
                    started.elapsed() < PATIENCE,
                    "submits failed for {PATIENCE:?}; the last: {error}"
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
            batch.drain(..confirmed);
        }
    }
    client.close().await;
}

/// Copies the workers' logs out of the namespace's folder (deleted at the end); where to.
fn keep_logs(workers: &[WorkerProcess]) -> String {
    let dir = std::env::temp_dir().join(format!("warren-cluster-chaos-{}", now_ms()));
    let _ = std::fs::create_dir_all(&dir);
    for (i, worker) in workers.iter().enumerate() {
        let _ = std::fs::write(dir.join(format!("worker-{}.log", i + 1)), worker.log_text());
    }
    dir.display().to_string()
}

/// When the last steps of `jobs` started, in seconds after the first fault, with the faults:
/// whether jobs without a result cluster around one.
fn ran_when(ns: &TestNamespace, jobs: &[&JobId], faults: &[(&str, u64)]) -> String {
    let jobs: HashSet<String> = jobs.iter().map(|id| id.to_string()).collect();
    let first = faults.first().map_or(0, |f| f.1) as i64;
    let mut by_second: std::collections::BTreeMap<i64, usize> = Default::default();
    for start in ns.step_starts() {
        if start.1 == "c" && jobs.contains(&start.0) {
            *by_second
                .entry((start.2 as i64 - first).div_euclid(1000))
                .or_default() += 1;
        }
    }
    let faults: Vec<_> = faults
        .iter()
        .map(|(what, at)| format!("{what} at {:.1} s", (*at as i64 - first) as f64 / 1000.0))
        .collect();
    format!(
        "their last steps started (second after the first fault: starts) {by_second:?}; {}",
        faults.join(", ")
    )
}

/// How one fault went: from the fault until every worker had a session again and
/// [`PROGRESS`] more jobs finished.
async fn heal(
    what: &str,
    finished: &Finished,
    workers: &[WorkerProcess],
    lost_node: usize,
    since: Instant,
    sessions_before: &[usize],
) -> Duration {
    let floor = finished.get() + PROGRESS;
    let healed = eventually(PATIENCE, || async {
        workers.iter().zip(sessions_before).all(|(w, &before)| {
            let (node, alive) = session(w);
            // A worker that was on the lost node must have started a new session since.
            alive && node != Some(lost_node) && (node.is_some() || sessions_started(w) > before)
        }) && finished.get() >= floor
    })
    .await;
    let logs: Vec<_> = workers
        .iter()
        .map(|w| w.log.display().to_string())
        .collect();
    assert!(
        healed,
        "{what}: not healed within {PATIENCE:?}; logs: {logs:?}"
    );
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_nodes_loses_nothing() {
    if std::env::var("WARREN_CLUSTER_CHAOS").is_ok_and(|v| v == "0") {
        return;
    }
    let least: usize = std::env::var("WARREN_CLUSTER_CHAOS_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let started = Instant::now();
    // Given a three-node cluster (dropped last: the namespace is deleted on it first)
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster");
    let script = cluster.script.clone();
    let urls = cluster.urls();
    let ns = Arc::new(TestNamespace::new_on(&urls, PIPELINE).await);
    // ...three workers, worker i listing node i first, so each is attached to a different node
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|i| {
            let mut mine = urls.clone();
            mine.rotate_left(i);
            let text = format!(
                "[broker]\nurls = {mine:?}\nconnect_order = \"listed\"\nnamespace = {:?}\n\n{PIPELINE}",
                ns.name
            );
            let path = ns.dir.join(format!("worker-on-node-{}.toml", i + 1));
            std::fs::write(&path, text).expect("worker config");
            ns.spawn_worker_with_config(&path, &[])
        })
        .collect();
    let attached = eventually(PATIENCE, || async { workers.iter().all(|w| session(w).1) }).await;
    assert!(attached, "the workers did not start");
    let nodes: Vec<_> = workers.iter().map(|w| session(w).0).collect();
    assert_eq!(
        nodes,
        [Some(1), Some(2), Some(3)],
        "each worker on its own node"
    );
    // ...and producers (each on a random member) submitting throughout, 30 tenants, 3 priorities
    let done = Arc::new(Submitted::default());
    let finished = Arc::new(Finished::default());
    let counting = Arc::new(AtomicBool::new(false));
    tokio::spawn(Arc::clone(&finished).count(ns.markers(), Arc::clone(&counting)));
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let client = ns.client().await;
        producers.push(tokio::spawn(produce(
            client,
            Arc::clone(&finished),
            Arc::clone(&done),
        )));
    }
    let flowing = eventually(PATIENCE, || async { finished.get() >= PROGRESS }).await;
    assert!(flowing, "no job finished");

    // When the node that leads most of the namespace's queues is SIGKILLed
    let leaders = script.leaders(&ns.name);
    let (victim, led) = leaders[0];
    let before: Vec<_> = workers.iter().map(sessions_started).collect();
    let at_kill = finished.get();
    let mut faults = vec![("SIGKILL", now_ms())];
    let t = Instant::now();
    script.blocking(&["kill", &victim.to_string()]).await;
    let kill_heal = heal("SIGKILL", &finished, &workers, victim, t, &before).await;
    // ...later started again
    let t = Instant::now();
    faults.push(("restart", now_ms()));
    script.blocking(&["restart", &victim.to_string()]).await;
    let rejoin = t.elapsed();
    let before: Vec<_> = workers.iter().map(sessions_started).collect();
    let restart_heal = heal("restart", &finished, &workers, 0, t, &before).await;
    // ...and then another node, the one leading most now, is stopped gracefully
    let leaders = script.leaders(&ns.name);
    let (stopped, _) = *leaders
        .iter()
        .find(|(node, _)| *node != victim)
        .expect("another node leads queues");
    let before: Vec<_> = workers.iter().map(sessions_started).collect();
    let t = Instant::now();
    faults.push(("graceful stop", now_ms()));
    script.blocking(&["stop", &stopped.to_string()]).await;
    let stop_heal = heal("graceful stop", &finished, &workers, stopped, t, &before).await;
    // (the producers go on until the least number of jobs is reached)
    let enough = eventually(PATIENCE * 2, || async {
        done.next.load(Ordering::Relaxed) >= least
    })
    .await;
    done.stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await.expect("producer");
    }
    counting.store(true, Ordering::Relaxed);
    assert!(enough, "fewer than {least} jobs were submitted");

    // Then every job's last step ran (none lost), and its result is read back by id
    let ids = done.ids.lock().expect("ids").clone();
    let all_ran = eventually(PATIENCE, || async { last_steps(&ns).len() >= ids.len() }).await;
    let ran = last_steps(&ns);
    let lost: Vec<_> = ids
        .iter()
        .filter(|id| !ran.contains(&id.to_string()))
        .collect();
    let client = ns.client().await;
    // Every last step ran, so each result is due within moments, unless the stream lost it.
    let wait = if all_ran { RESULTS_PATIENCE } else { PATIENCE };
    let results = collect_results(&client, &ids, wait).await;
    client.close().await;
    let no_result: Vec<_> = ids.iter().filter(|id| !results.contains_key(id)).collect();
    let failed: Vec<_> = results
        .values()
        .flatten()
        .filter(|r| r.status != JobStatus::Succeeded)
        .collect();
    let duplicate_results: usize = results.values().map(|r| r.len() - 1).sum();
    // Whether the stream holds fewer events than were read (lost) or more (a reading fault).
    if !no_result.is_empty() {
        let path = format!("/api/queues/%2f/{}.results", ns.name);
        let url = format!("http://127.0.0.1:{}{path}", 15700 + victim);
        let stored = match reqwest::Client::new()
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            Ok(response) => response
                .json::<serde_json::Value>()
                .await
                .map_or_else(|e| e.to_string(), |v| v["messages"].to_string()),
            Err(e) => e.to_string(),
        };
        println!(
            "results stream holds {stored} messages; read back {} events",
            results.values().map(Vec::len).sum::<usize>()
        );
    }
    let missing_when = (!no_result.is_empty()).then(|| {
        let kept = keep_logs(&workers);
        format!(
            "{}; worker logs in {kept}",
            ran_when(&ns, &no_result, &faults)
        )
    });
    // ...the dead-letter queue and every other queue of the namespace end empty
    let busy = settle_queues(&ns).await;
    // ...and no worker exited
    let exited = workers
        .iter_mut()
        .map(|w| !w.is_running())
        .filter(|&gone| gone)
        .count();
    // Publishes whose confirm never came, sent again on a fresh channel by the workers.
    let republished: usize = workers
        .iter()
        .map(|w| {
            w.log_text()
                .matches("publishing again on a fresh channel")
                .count()
        })
        .sum();
    // Result events the stream lost, written again by the results check.
    let rewritten: usize = workers
        .iter()
        .map(|w| {
            w.log_text()
                .matches("Wrote a lost result event to the results stream again")
                .count()
        })
        .sum();
    let starts = ns.step_starts();
    let by_job_step: HashMap<(String, String), usize> =
        starts.iter().fold(HashMap::new(), |mut m, s| {
            *m.entry((s.0.clone(), s.1.clone())).or_default() += 1;
            m
        });
    let duplicate_steps: usize = by_job_step.values().map(|n| n - 1).sum();
    println!(
        "cluster chaos: {} jobs x 3 steps, {TENANTS} tenants, 3 workers on nodes {nodes:?}, \
         {PRODUCERS} producers; SIGKILL of warren{victim} (leading {led} queues) healed in \
         {:.1} s (jobs done by then: {at_kill}); its restart took {:.1} s to rejoin, {:.1} s to \
         heal; graceful stop of warren{stopped} healed in {:.1} s; lost = {}, failed = {}, \
         duplicate step executions = {duplicate_steps} (of {} starts), result events read back: \
         {} jobs, missing {}, duplicates {duplicate_results}; publishes sent again for want of a confirm = \
         {republished}; result events the stream lost, written again by the check = {rewritten}; submits that reported an error \
         (retried) = {}, workers exited = {exited}; {:.1} s in all",
        ids.len(),
        kill_heal.as_secs_f64(),
        rejoin.as_secs_f64(),
        restart_heal.as_secs_f64(),
        stop_heal.as_secs_f64(),
        lost.len(),
        failed.len(),
        starts.len(),
        results.len(),
        no_result.len(),
        done.errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    assert!(lost.is_empty(), "{} jobs lost: {lost:?}", lost.len());
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(
        busy.is_empty(),
        "queues not empty (the DLQ among them): {busy:?}"
    );
    assert_eq!(exited, 0, "workers exited");
    let submitted: HashSet<String> = ids.iter().map(JobId::to_string).collect();
    let unknown = by_job_step
        .keys()
        .filter(|(job, _)| !submitted.contains(job));
    assert_eq!(unknown.count(), 0, "steps ran for jobs nobody submitted");
    assert!(
        no_result.is_empty(),
        "{} jobs without a result; {}",
        no_result.len(),
        missing_when.unwrap_or_default()
    );
    for worker in &mut workers {
        assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));
    }
    match Arc::try_unwrap(ns) {
        // The cluster and its data go next: deleting the namespace's queues first would only
        // cost time. (A failing test deletes them on the way out, as any test namespace.)
        Ok(ns) if cluster.started_here => {
            let _ = std::fs::remove_dir_all(&ns.dir);
            std::mem::forget(ns);
        }
        other => drop(other),
    }
    drop(cluster);
}
