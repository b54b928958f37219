//! Schedules fire from whichever worker holds the tick: every slot fires while any worker runs,
//! a SIGKILLed holder costs at most one repeat, an outage is caught up (or skipped with
//! `catch_up = "0s"`), and `overlap = "skip"` skips while the previous fire runs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use warren_common::JobId;
use warren_tests::{collect_results, eventually, TestNamespace, WorkerProcess};

/// A one-step pipeline and a schedule firing it every second; `extra` adds schedule keys.
fn every_second(extra: &str) -> String {
    format!(
        r#"
[[pipelines]]
name = "tick"
shards = 1

[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 4

[[schedules]]
name = "each"
pipeline = "tick"
every = "1s"
{extra}
"#
    )
}

/// The slots every worker's log says it fired (repeats included), oldest first.
fn fired_slots(workers: &[WorkerProcess]) -> Vec<DateTime<Utc>> {
    let mut slots: Vec<_> = workers
        .iter()
        .flat_map(|w| {
            w.log_text()
                .lines()
                .filter(|l| l.contains("Fired a schedule slot."))
                .filter_map(|l| {
                    l.split("slot=")
                        .nth(1)?
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                })
                .collect::<Vec<_>>()
        })
        .filter_map(|s| DateTime::parse_from_rfc3339(s.trim_matches('"')).ok())
        .map(|t| t.with_timezone(&Utc))
        .collect();
    slots.sort();
    slots
}

fn fires_of(worker: &WorkerProcess) -> usize {
    fired_slots(std::slice::from_ref(worker)).len()
}

/// Waits up to `within` until `workers` have fired `n` slots in all; whether they did.
async fn fired_at_least(workers: &[WorkerProcess], n: usize, within: Duration) -> bool {
    eventually(within, || {
        let fired = fired_slots(workers).len();
        async move { fired >= n }
    })
    .await
}

/// The worker that fires now: the one whose count of fires grows.
async fn holder(workers: &[WorkerProcess]) -> Option<usize> {
    let before: Vec<_> = workers.iter().map(fires_of).collect();
    let mut found = None;
    eventually(Duration::from_secs(15), || {
        let now = workers
            .iter()
            .zip(&before)
            .position(|(w, b)| fires_of(w) > *b);
        found = now;
        async move { now.is_some() }
    })
    .await;
    found
}

/// Every slot from the first to the last fired, one second apart.
fn every_slot_between(fired: &[DateTime<Utc>]) -> Vec<DateTime<Utc>> {
    let (first, last) = (fired[0], *fired.last().unwrap());
    let mut all = vec![first];
    while *all.last().unwrap() < last {
        all.push(*all.last().unwrap() + chrono::Duration::seconds(1));
    }
    all
}

fn ids(slots: &[DateTime<Utc>]) -> Vec<JobId> {
    slots
        .iter()
        .map(|s| JobId::for_slot("each", s.timestamp_millis() as u64, "scheduler"))
        .collect()
}

#[tokio::test]
async fn the_tick_holder_sigkilled_twice_loses_no_slot() {
    // Given three workers taking part in a schedule that fires every second
    let ns = TestNamespace::new(&every_second("overlap = \"allow\"")).await;
    let mut workers: Vec<_> = (0..3).map(|_| ns.spawn_worker(&[])).collect();
    let mut kills = 0;
    let mut longest_gap = Duration::ZERO;

    // When the holder of the tick is SIGKILLed, twice
    for _ in 0..2 {
        let at = holder(&workers).await.expect("a worker fires");
        workers[at].kill_hard();
        kills += 1;
        let killed = Instant::now();
        let alive: Vec<_> = (0..workers.len()).filter(|i| *i != at).collect();
        let before: Vec<_> = alive.iter().map(|i| fires_of(&workers[*i])).collect();
        let took_over = eventually(Duration::from_secs(20), || {
            let grew = alive
                .iter()
                .zip(&before)
                .any(|(i, b)| fires_of(&workers[*i]) > *b);
            async move { grew }
        })
        .await;
        assert!(took_over, "no worker took the tick over after a kill");
        longest_gap = longest_gap.max(killed.elapsed());
        // The dead one stays in the list (its log counts), and is never chosen again.
    }
    let last = holder(&workers).await.expect("the last worker fires");
    let seen = fires_of(&workers[last]);
    assert!(
        fired_at_least(
            std::slice::from_ref(&workers[last]),
            seen + 2,
            Duration::from_secs(10)
        )
        .await
    );

    // Then every slot from the first fire to the last ran, with at most one repeat per kill
    let fired = fired_slots(&workers);
    let slots = every_slot_between(&fired);
    let client = ns.client().await;
    let results = collect_results(&client, &ids(&slots), Duration::from_secs(30)).await;
    let missing: Vec<_> = slots
        .iter()
        .zip(ids(&slots))
        .filter(|(_, id)| !results.contains_key(id))
        .map(|(s, _)| s.to_rfc3339())
        .collect();
    assert!(missing.is_empty(), "slots never run: {missing:?}");
    let repeated_fires = fired.len() - fired.iter().collect::<BTreeSet<_>>().len();
    let repeated_runs: usize = results.values().map(|r| r.len() - 1).sum();
    println!(
        "schedule fail-over: {} slots, {kills} kills, {repeated_fires} repeated fires, \
         {repeated_runs} repeated runs, longest gap {longest_gap:?}",
        slots.len()
    );
    assert!(
        repeated_fires <= kills,
        "{repeated_fires} repeats for {kills} kills"
    );
    client.close().await;
}

/// Runs one worker until it fires twice, stops it over three slots, starts it again, and
/// returns every slot fired.
async fn outage(ns: &TestNamespace) -> Vec<DateTime<Utc>> {
    let mut first = ns.spawn_worker(&[]);
    assert!(
        fired_at_least(std::slice::from_ref(&first), 2, Duration::from_secs(20)).await,
        "{}",
        first.log_text()
    );
    first.kill_hard();
    let stopped = Instant::now();
    // The outage itself: no worker runs for four slots and a half.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(stopped.elapsed())).await;
    let second = ns.spawn_worker(&[]);
    assert!(
        fired_at_least(std::slice::from_ref(&second), 2, Duration::from_secs(20)).await,
        "{}",
        second.log_text()
    );
    fired_slots(&[first, second])
}

#[tokio::test]
async fn slots_missed_while_every_worker_was_down_are_caught_up() {
    let ns = TestNamespace::new(&every_second("catch_up = \"1h\"\noverlap = \"allow\"")).await;
    let fired = outage(&ns).await;
    let all = every_slot_between(&fired);
    let distinct: Vec<_> = fired
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .copied()
        .collect();
    assert_eq!(
        distinct, all,
        "every slot fired, the missed ones after the restart"
    );
}

#[tokio::test]
async fn catch_up_zero_skips_the_missed_slots() {
    let ns = TestNamespace::new(&every_second("catch_up = \"0s\"\noverlap = \"allow\"")).await;
    let fired = outage(&ns).await;
    let all = every_slot_between(&fired);
    let distinct: BTreeSet<_> = fired.iter().collect();
    assert!(
        all.len() - distinct.len() >= 2,
        "the outage's slots were skipped: fired {fired:?}"
    );
}

#[tokio::test]
async fn overlap_skip_fires_nothing_while_the_previous_fire_runs() {
    // Given a schedule every second whose job takes 2.5 s
    let ns = TestNamespace::new(&every_second(
        "overlap = \"skip\"\npayload = { sleep_ms = 2500 }",
    ))
    .await;
    let worker = ns.spawn_worker(&[]);

    // When it runs for four fires
    assert!(
        fired_at_least(std::slice::from_ref(&worker), 4, Duration::from_secs(40)).await,
        "{}",
        worker.log_text()
    );

    // Then consecutive fires are at least the job's length apart, and the slots between skipped
    let fired = fired_slots(std::slice::from_ref(&worker));
    for pair in fired.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::seconds(2),
            "fired while the previous fire ran: {fired:?}"
        );
    }
    assert!(worker.log_text().contains("Skipped a schedule slot"));
}

#[tokio::test]
async fn overlap_skip_fires_on_while_each_fire_ends_in_time() {
    // Given a schedule every second with the default overlap ("skip"), whose job ends at once
    let ns = TestNamespace::new(&every_second("")).await;
    let worker = ns.spawn_worker(&[]);

    // When it runs, then it keeps firing: each fire's job has ended by the next slot (the
    // tick holder once fired twice and then skipped every slot, having read the second
    // job's result before it watched for it)
    assert!(
        fired_at_least(std::slice::from_ref(&worker), 6, Duration::from_secs(60)).await,
        "{}",
        worker.log_text()
    );
}

#[tokio::test]
async fn overlap_skip_fires_on_after_a_trigger_and_a_holder_kill() {
    // Given a schedule every second with the default overlap ("skip"), whose job ends at once,
    // and two workers
    let ns = TestNamespace::new(&every_second("")).await;
    let mut workers = [ns.spawn_worker(&[]), ns.spawn_worker(&[])];
    assert!(
        fired_at_least(&workers, 2, Duration::from_secs(30)).await,
        "no fires"
    );

    // When a fire the holder did not make comes in between (`warren schedules trigger`), and
    // then the holder is SIGKILLed
    let client = ns.client().await;
    warren_producer::schedules::trigger(&client, "each")
        .await
        .unwrap();
    let before = fired_slots(&workers).len();
    assert!(
        fired_at_least(&workers, before + 2, Duration::from_secs(30)).await,
        "the schedule stopped firing after a trigger"
    );
    let holder = holder(&workers).await.expect("a tick holder");
    workers[holder].kill_hard();

    // Then the other worker fires on: the previous fires' jobs are seen to have ended
    let survivor = std::slice::from_ref(&workers[1 - holder]);
    let after_kill = fired_slots(survivor).len();
    assert!(
        fired_at_least(survivor, after_kill + 3, Duration::from_secs(45)).await,
        "the new holder stopped firing: {}",
        workers[1 - holder].log_text()
    );
    client.close().await;
}
