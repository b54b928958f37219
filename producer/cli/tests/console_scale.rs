//! The console's memory and start-up with a million retained history events (ignored: it
//! writes ~1M events to the broker). Run it with
//!
//! ```sh
//! cargo build --release -p warren-cli
//! WARREN_BIN=$PWD/target/release/warren cargo test -p warren-cli --test console_scale -- --ignored --nocapture
//! ```
//!
//! It prints the time until `/api/health` says ready and the console's peak RSS, and fails past
//! the targets (500 MiB, 30 s).

use std::time::{Duration, Instant};

use futures::future::try_join_all;
use serde_json::Value;
use warren_broker::HistoryWriter;
use warren_common::history::{Event, Kind};
use warren_producer::JobId;
use warren_tests::{eventually, TestNamespace};

/// How many events (`WARREN_SCALE_EVENTS` for another count).
mod support;

const EVENTS: usize = 1_000_000;
/// Events per job: submitted, started, then retried + started + succeeded, or succeeded, or
/// failed + dead-lettered.
const TENANTS: usize = 2_000;
const MAX_RSS_MIB: u64 = 500;
const MAX_READY: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[history]
enabled = true
retention = "1d"

[[pipelines]]
name = "import"
shards = 1

[[pipelines.steps]]
name = "fetch"
handler = "none"

[[pipelines.steps]]
name = "parse"
handler = "none"
"#;

/// The events of job number `n`.
fn life(n: usize) -> Vec<Event> {
    let id = JobId::new();
    let tenant = format!("tenant-{:04}", n % TENANTS);
    let at = warren_common::now_ms() - 3_600_000 + (n as u64 % 3_600_000);
    let step = |kind: Kind, step: &str, attempt: u32, dt: u64| {
        let mut e = Event::new(kind, id, &tenant, "import").at(at + dt);
        e.step = Some(step.into());
        e.attempt = (kind != Kind::Submitted).then_some(attempt);
        e
    };
    let mut events = vec![step(Kind::Submitted, "fetch", 0, 0)];
    events.push(step(Kind::Started, "fetch", 1, 5));
    match n % 10 {
        0 => {
            let mut retried = step(Kind::Retried, "fetch", 1, 20)
                .took_ms(15)
                .error("exit 1: connection reset by peer");
            retried.retry_in_ms = Some(1000);
            events.push(retried);
        }
        1 => {
            events.push(
                step(Kind::Failed, "fetch", 1, 20)
                    .took_ms(15)
                    .error("permanent failure: exit 65: bad row 17: price is not a number"),
            );
            let mut dead = step(Kind::DeadLettered, "fetch", 1, 21);
            dead.reason = Some("failed".into());
            events.push(dead);
        }
        _ => {
            let mut done = step(Kind::Succeeded, "fetch", 1, 20).took_ms(15);
            done.next = Some("parse".into());
            events.push(done);
            events.push(step(Kind::Started, "parse", 1, 25));
            events.push(step(Kind::Succeeded, "parse", 1, 40).took_ms(15));
        }
    }
    events
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a million events; run by hand (see the module doc)"]
async fn a_million_events_fit_in_500_mib_and_are_read_within_30_s() {
    // Given a history stream holding a million events
    let ns = TestNamespace::new(CONFIG).await;
    let broker = ns.broker().await;
    let writer = HistoryWriter::on(&broker);
    let target: usize = std::env::var("WARREN_SCALE_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(EVENTS);
    let mut events = Vec::with_capacity(target + 10);
    let mut n = 0;
    while events.len() < target {
        events.extend(life(n));
        n += 1;
    }
    let written = events.len();
    let started = Instant::now();
    let chunks: Vec<Vec<Event>> = events.chunks(50_000).map(<[Event]>::to_vec).collect();
    drop(events);
    try_join_all(chunks.into_iter().map(|c| writer.record_confirmed(c)))
        .await
        .unwrap();
    println!(
        "wrote {written} events of {n} jobs in {:.1?}",
        started.elapsed()
    );

    // When the console starts on it
    let bin = std::env::var("WARREN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_warren").into());
    let started = Instant::now();
    let (console, url) = support::start_console(&bin, &ns.config_path);
    let pid = console.0.id();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let ready = eventually(Duration::from_secs(300), || async {
        support::health(&http, &url).await.is_some_and(|h| {
            h["ready"] == Value::Bool(true) && h["events"].as_u64() >= Some(written as u64)
        })
    })
    .await;
    let took = started.elapsed();
    // A page over every job, to count its cost too.
    let tenants = http.get(format!("{url}/api/tenants")).send().await.unwrap();
    assert!(tenants.status().is_success());
    let peak_mib = rss_kib(pid, "VmHWM:") / 1024;
    let now_mib = rss_kib(pid, "VmRSS:") / 1024;
    drop(console);

    // Then it is ready within 30 s and under 500 MiB
    println!("console ({bin}): ready after {took:.1?}; RSS peak {peak_mib} MiB, now {now_mib} MiB");
    assert!(ready, "not ready within 300 s");
    assert!(took <= MAX_READY, "ready after {took:?}");
    assert!(peak_mib <= MAX_RSS_MIB, "peak RSS {peak_mib} MiB");
    broker.close().await;
}
