//! Cluster-wide caps: `max_in_flight` holds across worker processes and comes back whole after a
//! SIGKILL; `tenant_max_in_flight` holds one tenant back without holding up the others.

use std::time::Duration;

use serde_json::{json, Value};
use warren_broker::TokenQueue;
use warren_common::{Config, JobId, JobStatus};
use warren_producer::{Client, Job, ResultEvent};
use warren_tests::TestNamespace;

/// When one execution ran (µs), in which worker process, for which tenant: the `span` handler's
/// output.
#[derive(Debug, Clone)]
struct Span {
    start: u64,
    end: u64,
    pid: u64,
    tenant: String,
}

impl Span {
    fn of(event: &ResultEvent) -> Self {
        let n = |key: &str| event.output.get(key).and_then(Value::as_u64).unwrap_or(0);
        Self {
            start: n("start_us"),
            end: n("end_us"),
            pid: n("pid"),
            tenant: event.output["tenant"].as_str().unwrap_or("").to_string(),
        }
    }
}

/// The most spans running at one instant, and the first instant at or after `from` when
/// `level` ran at once. Touching spans do not overlap.
fn sweep<'a>(
    spans: impl IntoIterator<Item = &'a Span>,
    from: u64,
    level: usize,
) -> (usize, Option<u64>) {
    let mut edges: Vec<(u64, i32)> = spans
        .into_iter()
        .flat_map(|s| [(s.start, 1), (s.end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut peak, mut reached) = (0i32, 0usize, None);
    for (at, delta) in edges {
        now += delta;
        peak = peak.max(now as usize);
        if reached.is_none() && at >= from && now as usize >= level {
            reached = Some(at);
        }
    }
    (peak, reached)
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Submits `jobs` and returns the results of the first `first` of them to finish, then the rest
/// (each job once, all succeeded), with `between` run in the middle.
async fn run_jobs(
    client: &Client,
    jobs: Vec<Job>,
    first: usize,
    between: impl FnOnce(&[ResultEvent]),
) -> Vec<ResultEvent> {
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let mut waiting = client
        .wait_all(&ids, Duration::from_secs(120))
        .await
        .expect("results");
    client.submit_many(jobs).await.expect("submit");
    let mut events = Vec::new();
    let mut between = Some(between);
    while let Some(event) = waiting.next().await.expect("results") {
        assert_eq!(event.status, JobStatus::Succeeded, "{event:?}");
        events.push(event);
        if events.len() == first {
            (between.take().expect("once"))(&events);
        }
    }
    waiting.close().await;
    assert_eq!(events.len(), ids.len(), "every job finished");
    events
}

const STEP_CAP: &str = r#"
[[pipelines]]
name = "capped"
shards = 2
priorities = ["normal"]

[[pipelines.steps]]
name = "s"
handler = "span"
concurrency = 3
max_in_flight = 3
"#;

#[tokio::test]
async fn step_cap_holds_across_workers_and_comes_back_after_sigkill() {
    // Given three workers, each able to run 3 at once, on a step capped at 3
    let ns = TestNamespace::new(STEP_CAP).await;
    let mut workers: Vec<_> = (0..3).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let jobs = |n: usize| -> Vec<Job> {
        (0..n)
            .map(|i| Job::new("capped", format!("t{}", i % 8), json!({"sleep_ms": 300})))
            .collect()
    };

    // When a backlog drains
    let events = run_jobs(&client, jobs(24), 0, |_| {}).await;

    // Then exactly 3 ran at once, never more
    let spans: Vec<Span> = events.iter().map(Span::of).collect();
    assert_eq!(sweep(&spans, 0, 3).0, 3, "{spans:?}");

    // When a worker that has been running steps is SIGKILLed in the middle of another backlog
    let mut killed_at = 0;
    let events = run_jobs(&client, jobs(30), 6, |so_far| {
        let busy = Span::of(so_far.last().expect("a result")).pid;
        let doomed = workers
            .iter_mut()
            .find(|w| w.pid().as_raw() as u64 == busy)
            .expect("the worker that ran it");
        doomed.kill_hard();
        killed_at = now_us();
    })
    .await;

    // Then every job still finishes, never more than 3 at once, and 3 run at once again
    // within 10 s of the kill: the dead worker's tokens came back with its connection
    let spans: Vec<Span> = events.iter().map(Span::of).collect();
    let (peak, whole) = sweep(&spans, killed_at, 3);
    assert_eq!(peak, 3, "{spans:?}");
    let whole = whole.expect("the cap was whole again");
    assert!(
        whole - killed_at < 10_000_000,
        "whole again {} ms after the kill",
        (whole - killed_at) / 1000
    );
    drop(workers);
}

const TENANT_CAP: &str = r#"
[[pipelines]]
name = "shared"
shards = 1
priorities = ["normal"]

[[pipelines.steps]]
name = "s"
handler = "span"
concurrency = 4
timeout = "10s"
max_attempts = 1
tenant_max_in_flight = 1
"#;

/// Deletes the tenant token queues a test made (they would expire on their own, later).
struct TenantQueues(Config, Vec<TokenQueue>);

impl Drop for TenantQueues {
    fn drop(&mut self) {
        let (config, queues) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let broker = warren_broker::Broker::connect(&config.broker)
                    .await
                    .expect("broker");
                let channel = broker.channel().await.expect("channel");
                for q in queues {
                    for name in [q.name(), q.marker_name()] {
                        let _ = channel
                            .queue_delete(name.as_str().into(), Default::default())
                            .await;
                    }
                }
                broker.close().await;
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_tenant_at_its_cap_does_not_hold_up_the_tenants_behind_it() {
    // Given one shard shared by tenant A and small tenants B1-B3, a tenant cap of 1 and two
    // workers
    let ns = TestNamespace::new(TENANT_CAP).await;
    let names = warren_broker::Names::new(&ns.name);
    let _cleanup = TenantQueues(
        ns.config.clone(),
        ["a", "b1", "b2", "b3"]
            .map(|t| TokenQueue::tenant(&names, "shared", "s", t, 1, Duration::from_secs(10)))
            .to_vec(),
    );
    let _workers: Vec<_> = (0..2).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let job = |tenant: &str| Job::new("shared", tenant, json!({"sleep_ms": 200}));
    let latency = |e: &ResultEvent| Duration::from_millis(e.latency_ms());

    let small = ["b1", "b2", "b3"];
    // The small tenants' jobs alone, one after another: their idle time
    let mut idle = Duration::ZERO;
    for tenant in small {
        let events = run_jobs(&client, vec![job(tenant)], 0, |_| {}).await;
        idle = idle.max(latency(&events[0]));
    }

    // When A queues 16 jobs in the shard, then each small tenant one job behind them
    let mut jobs: Vec<Job> = (0..16).map(|_| job("a")).collect();
    jobs.extend(small.map(job));
    let events = run_jobs(&client, jobs, 0, |_| {}).await;

    // Then the small tenants' jobs finish within a small multiple of their idle time...
    let b_slowest = events
        .iter()
        .filter(|e| e.tenant.as_str().starts_with('b'))
        .map(latency)
        .max()
        .expect("b's results");
    let mut timeline: Vec<(u64, u64, String, u64)> = events
        .iter()
        .map(|e| {
            let s = Span::of(e);
            (s.start, s.end, s.tenant, e.latency_ms())
        })
        .collect();
    timeline.sort();
    let t0 = timeline[0].0;
    let timeline: Vec<_> = timeline
        .iter()
        .map(|(s, e, t, l)| {
            format!(
                "{t} {}-{} ms (latency {l})",
                (s - t0) / 1000,
                (e - t0) / 1000
            )
        })
        .collect();
    assert!(
        b_slowest <= idle.max(Duration::from_millis(250)) * 5,
        "a small tenant took {b_slowest:?} behind A's flood, {idle:?} alone: {timeline:#?}"
    );
    // ...while A's all finished too, never more than one at a time
    let a_spans: Vec<Span> = events
        .iter()
        .map(Span::of)
        .filter(|s| s.tenant == "a")
        .collect();
    assert_eq!(a_spans.len(), 16);
    assert_eq!(sweep(&a_spans, 0, 1).0, 1, "{a_spans:?}");
    // and the small tenants ran beside A, not after it
    let all: Vec<Span> = events.iter().map(Span::of).collect();
    assert!(sweep(&all, 0, 2).0 >= 2, "{all:?}");
}

const PARKED_CAP: &str = r#"
[[pipelines]]
name = "parked"
shards = 1
priorities = ["normal"]

[[pipelines.steps]]
name = "s"
handler = "span"
concurrency = 4
timeout = "10s"
max_attempts = 3
tenant_max_in_flight = 2
"#;

#[tokio::test]
async fn parked_backlog_keeps_its_cap_busy_and_never_over_it_even_with_a_kill() {
    // Given one shard shared by tenant A (capped at 2) and small tenants B1-B3, three workers
    let ns = TestNamespace::new(PARKED_CAP).await;
    let names = warren_broker::Names::new(&ns.name);
    let _cleanup = TenantQueues(
        ns.config.clone(),
        ["a", "b1", "b2", "b3"]
            .map(|t| TokenQueue::tenant(&names, "parked", "s", t, 2, Duration::from_secs(10)))
            .to_vec(),
    );
    let mut workers: Vec<_> = (0..3).map(|_| ns.spawn_worker(&[])).collect();
    let client = ns.client().await;
    let job = |tenant: &str| Job::new("parked", tenant, json!({"sleep_ms": 100}));
    let latency = |e: &ResultEvent| Duration::from_millis(e.latency_ms());
    let idle = latency(&run_jobs(&client, vec![job("b1")], 0, |_| {}).await[0]);

    // When A queues 40 jobs in the shard, each small tenant one job behind them, and the
    // worker that ran A's 8th result is SIGKILLed (with what it had parked)
    let mut jobs: Vec<Job> = (0..40).map(|_| job("a")).collect();
    jobs.extend(["b1", "b2", "b3"].map(job));
    let mut killed = 0;
    let events = run_jobs(&client, jobs, 8, |so_far| {
        let busy = Span::of(so_far.last().expect("a result")).pid;
        let doomed = workers
            .iter_mut()
            .find(|w| w.pid().as_raw() as u64 == busy)
            .expect("the worker that ran it");
        doomed.kill_hard();
        killed = busy;
    })
    .await;

    // Then every job finished, the small tenants within a small multiple of their idle time,
    let b_slowest = events
        .iter()
        .filter(|e| e.tenant.as_str().starts_with('b'))
        .map(latency)
        .max()
        .expect("b's results");
    assert!(
        b_slowest <= idle.max(Duration::from_millis(250)) * 5,
        "a small tenant took {b_slowest:?} beside A's parked backlog, {idle:?} alone"
    );
    // and A never ran more than 2 at once, with 2 at once for most of its run
    let a_spans: Vec<Span> = events
        .iter()
        .map(Span::of)
        .filter(|s| s.tenant == "a")
        .collect();
    assert_eq!(a_spans.len(), 40);
    assert_eq!(sweep(&a_spans, 0, 2).0, 2, "{a_spans:?}");
    let first = a_spans.iter().map(|s| s.start).min().expect("spans");
    let last = a_spans.iter().map(|s| s.end).max().expect("spans");
    let busy: u64 = a_spans.iter().map(|s| s.end - s.start).sum();
    // Only a lower bound (the machine is shared): the cap was not mostly idle.
    assert!(
        busy as f64 >= 0.4 * 2.0 * (last - first) as f64,
        "A used {} ms of {} ms x 2 (killed {killed})",
        busy / 1000,
        (last - first) / 1000
    );
    drop(workers);
}
