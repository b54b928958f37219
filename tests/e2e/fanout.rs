//! Fan-out / fan-in: a step's output becomes jobs of another pipeline, one per part, and the
//! next step (the join) runs once they have ended, whatever worker is killed meanwhile.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use warren_broker::{Lane, StepRoute};
use warren_common::fanout::part_job_id;
use warren_common::{JobId, JobStatus, Priority};
use warren_producer::{Client, Job, ReplayOptions};
use warren_tests::{eventually, TestNamespace};

/// `nightly: plan (fan-out to part) -> notify`; `part: a -> b`.
fn config(fan_out_keys: &str, part_steps: &str) -> String {
    format!(
        r#"
[[pipelines]]
name = "nightly"
shards = 2

[[pipelines.steps]]
name = "plan"
handler = "plan"
fan_out = "part"
{fan_out_keys}

[[pipelines.steps]]
name = "notify"
handler = "work"

[[pipelines]]
name = "part"
shards = 4
{part_steps}
"#
    )
}

const TWO_WORK_STEPS: &str = r#"
[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 16

[[pipelines.steps]]
name = "b"
handler = "work"
concurrency = 16
"#;

/// Checks a join's input: `n` parts, all succeeded, each of `parent`'s parts listed once, each
/// output through steps a and b. Returns the list.
fn every_part_once_through_a_and_b(out: &Value, parent: JobId, n: u32) -> &[Value] {
    assert_eq!(
        (&out["total"], &out["succeeded"], &out["failed"]),
        (&json!(n), &json!(n), &json!(0)),
        "{} parts listed",
        out["parts"].as_array().map_or(0, Vec::len)
    );
    let listed = out["parts"].as_array().unwrap();
    let ids: HashSet<&str> = listed
        .iter()
        .map(|p| p["job_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| part_job_id(parent, i).to_string()).collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect());
    assert!(listed
        .iter()
        .all(|p| p["output"]["trail"] == json!(["a", "b"])));
    listed
}

/// The join step's runs (one marker file per start of step `notify`).
fn join_runs(ns: &TestNamespace) -> usize {
    ns.step_starts()
        .iter()
        .filter(|(_, step, _)| step == "notify")
        .count()
}

#[tokio::test]
async fn a_fan_out_joins_with_every_part_while_a_worker_is_killed() {
    // Given two workers and a job whose plan step splits 300 parts over 30 tenants
    let ns = TestNamespace::new(&config("", TWO_WORK_STEPS)).await;
    let mut workers = [ns.spawn_worker(&[]), ns.spawn_worker(&[])];
    let client = ns.client().await;
    let parent = submit_plan(&client, 300, 100).await;

    // When the coordinating worker (the one that took the lock) is SIGKILLed mid-run, and a
    // third starts
    let leads = |w: &warren_tests::WorkerProcess| w.log_text().contains("Coordinating fan-ins.");
    let midway = eventually(Duration::from_secs(30), || async {
        ns.step_starts().len() >= 200 && workers.iter().any(leads)
    })
    .await;
    assert!(
        midway,
        "the parts never got going, or no worker coordinates"
    );
    let leader = workers.iter().position(leads).expect("a coordinator");
    workers[leader].kill_hard();
    let third = ns.spawn_worker(&[]);

    // Then the parent job finishes with its join, which saw every part once
    let result = client.wait(parent, Duration::from_secs(80)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(result.step, "notify");
    let out = &result.output;
    let listed = every_part_once_through_a_and_b(out, parent, 300);
    let tenants: HashSet<&str> = listed
        .iter()
        .map(|p| p["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants.len(), 30);
    assert_eq!(out["input"]["parts"].as_array().unwrap().len(), 300);
    let joins = join_runs(&ns);
    assert!(joins >= 1, "the join never ran");
    // (The join may have run before the kill was noticed: the lock still passes on.)
    let took_over = eventually(Duration::from_secs(30), || async {
        workers.iter().chain([&third]).filter(|w| leads(w)).count() >= 2
    })
    .await;
    assert!(took_over, "no other worker took over the coordination");
    eprintln!("fan-out of 300, coordinator SIGKILLed: join ran {joins} time(s)");
}

#[tokio::test]
async fn a_thousand_parts_join_after_the_coordinator_and_another_worker_are_killed() {
    // Given three workers and a job whose plan step splits 1,000 parts over 30 tenants
    let ns = TestNamespace::new(&config("", TWO_WORK_STEPS)).await;
    let mut workers = vec![
        ns.spawn_worker(&[]),
        ns.spawn_worker(&[]),
        ns.spawn_worker(&[]),
    ];
    let client = ns.client().await;
    let parent = submit_plan(&client, 1_000, 400).await;

    // When, midway, the coordinating worker and one other are SIGKILLed (the
    // successor resumes from a checkpoint that no longer holds the parts' outputs), and a
    // fresh worker starts
    let leads = |w: &warren_tests::WorkerProcess| w.log_text().contains("Coordinating fan-ins.");
    // (once a worker has led for 2.5 s: a leader checkpoints every 2 s)
    let leading_since = std::cell::Cell::new(None::<std::time::Instant>);
    let midway = eventually(Duration::from_secs(60), || async {
        if leading_since.get().is_none() && workers.iter().any(leads) {
            leading_since.set(Some(std::time::Instant::now()));
        }
        leading_since
            .get()
            .is_some_and(|t| t.elapsed() >= Duration::from_millis(2_500))
    })
    .await;
    assert!(
        midway,
        "the parts never got going, or no worker coordinates"
    );
    let ended_before = ns.step_starts().iter().filter(|s| s.1 == "b").count();
    assert!(ended_before < 1_000, "every part ran before the kill");
    let leader = workers.iter().position(leads).expect("a coordinator");
    workers[leader].kill_hard();
    workers[(leader + 1) % 3].kill_hard();
    workers.push(ns.spawn_worker(&[]));

    // Then the parent job finishes with its join, which accounts for every part once
    let result = client.wait(parent, Duration::from_secs(120)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(result.step, "notify");
    // Every output made it through the kill: read back from the stream, not the checkpoint.
    let listed = every_part_once_through_a_and_b(&result.output, parent, 1_000);
    let tenants: HashSet<&str> = listed
        .iter()
        .map(|p| p["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants.len(), 30);
    let joins = join_runs(&ns);
    assert!(joins >= 1, "the join never ran");
    let survivors = workers.iter().filter(|w| leads(w)).count();
    assert!(survivors >= 2, "no other worker took over the coordination");
    let read_back = |w: &warren_tests::WorkerProcess| {
        w.log_text()
            .contains("Read the open fan-outs back from the stream.")
    };
    assert!(
        workers.iter().any(read_back),
        "the successor did not resume from a checkpoint with the fan-out open: {}",
        workers
            .iter()
            .filter(|w| leads(w))
            .map(|w| w
                .log_text()
                .lines()
                .filter(|l| l.contains("fanin"))
                .collect::<Vec<_>>()
                .join("\n"))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    // Duplicates: part steps that ran more than once (the killed workers' in-flight steps).
    let starts = ns.step_starts();
    let parts_only = starts
        .iter()
        .filter(|(_, step, _)| step != "notify")
        .count();
    let repeats = parts_only - 2 * 1_000;
    eprintln!(
        "fan-out of 1,000 over 30 tenants, coordinator and one more worker SIGKILLed with \
         {ended_before} parts in step b or past it: join ran {joins} time(s), {repeats} part \
         step(s) ran again"
    );
}

#[tokio::test]
async fn max_parts_in_flight_holds_across_workers() {
    // Given a fan-out of 24 parts of 150 ms each, at most 4 at once, and two roomy workers
    let fan_out = "max_parts_in_flight = 4";
    let span = "[[pipelines.steps]]\nname = \"s\"\nhandler = \"span\"\nconcurrency = 16\n";
    let ns = TestNamespace::new(&config(fan_out, span)).await;
    let _workers = [ns.spawn_worker(&[]), ns.spawn_worker(&[])];
    let client = ns.client().await;
    let parts: Vec<Value> = (0..24)
        .map(|i| json!({"payload": {"sleep_ms": 150}, "tenant": format!("t{}", i % 5)}))
        .collect();
    let parent = submit_parts(&client, parts).await;

    // When it runs to its join
    let result = client.wait(parent, Duration::from_secs(60)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");

    // Then no more than 4 parts ever ran at once, and 4 did
    let spans: Vec<(u64, u64)> = result.output["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let o = &p["output"];
            (
                o["start_us"].as_u64().unwrap(),
                o["end_us"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(spans.len(), 24);
    let most = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 4, "{most} parts ran at once");
    assert!(most >= 2, "the window was never used: {most}");
    eprintln!("max_parts_in_flight = 4: at most {most} parts ran at once");
}

#[tokio::test]
async fn under_wait_a_failed_part_holds_the_join_until_its_replay_succeeds() {
    // Given a fan-out under `wait` of 10 parts, of which part 3 fails until a file exists
    let ns = TestNamespace::new(&config("on_part_failure = \"wait\"", TWO_WORK_STEPS)).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let fix = ns.dir.join("fixed");
    let parts: Vec<Value> = (0..10)
        .map(|i| {
            let mut payload = json!({"i": i});
            if i == 3 {
                payload["fail_permanently_at"] = json!("b");
                payload["fail_permanently_at_unless_file"] = json!(fix.display().to_string());
            }
            json!({"payload": payload, "tenant": format!("t{i}")})
        })
        .collect();
    let parent = submit_parts(&client, parts).await;
    let failed = part_job_id(parent, 3);

    // When every part has ended, part 3 in the dead-letter queue
    let ended = eventually(Duration::from_secs(30), || async {
        let letters = client
            .dlq_list(&Default::default())
            .await
            .unwrap_or_default();
        let b_runs = ns.step_starts().iter().filter(|s| s.1 == "b").count();
        letters.iter().any(|l| l.job_id == Some(failed)) && b_runs >= 10
    })
    .await;
    assert!(ended, "part 3 never reached the dead-letter queue");
    // (the coordinator has 2 s to get it wrong)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        join_runs(&ns),
        0,
        "the join ran with a failed part under `wait`"
    );

    // And the fix lands and the dead letter is replayed
    std::fs::write(&fix, "").unwrap();
    let report = client
        .dlq_replay(&Default::default(), ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 1, "{report:?}");

    // Then the join runs with all 10 succeeded, and only part 3's step b ran again
    let result = client.wait(parent, Duration::from_secs(40)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(result.output["succeeded"], json!(10), "{}", result.output);
    let starts = ns.step_starts();
    let runs = |id: String, step: &str| {
        starts
            .iter()
            .filter(|(job, s, _)| *job == id && s == step)
            .count()
    };
    for i in 0..10 {
        let id = part_job_id(parent, i).to_string();
        let b = if i == 3 { 2 } else { 1 };
        assert_eq!((runs(id.clone(), "a"), runs(id, "b")), (1, b), "part {i}");
    }
    assert_eq!(join_runs(&ns), 1);
}

#[tokio::test]
async fn a_fan_out_of_hot_depth_parts_of_one_tenant_puts_them_in_its_hot_lane() {
    // Given a tenant counts as hot at 100 jobs, and a part step of one slot
    let one_slot = "[[pipelines.steps]]\nname = \"a\"\nhandler = \"work\"\nconcurrency = 1\n";
    let config = format!("[fairness]\nhot_depth = 100\n{}", config("", one_slot));
    let ns = TestNamespace::new(&config).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When a plan step gives one tenant 150 parts of 50 ms
    let parts: Vec<Value> = (0..150)
        .map(|i| json!({"payload": {"i": i, "sleep_ms": 50}, "tenant": "big"}))
        .collect();
    submit_parts(&client, parts).await;
    let started = eventually(Duration::from_secs(30), || async {
        ns.step_starts().iter().any(|(_, step, _)| step == "a")
    })
    .await;
    assert!(started, "no part started");

    // Then the parts wait in the tenant's hot lane from the first one, none in its shard
    // (where a worker would notice the flood only after 50 of them, and move the rest one by
    // one), as a producer's bulk submit of as many jobs does
    let part = ns.config.pipeline("part").unwrap();
    let broker = ns.broker().await;
    let ready = |lane: Lane| {
        let queue = StepRoute::new("part", "a", Priority::Normal, lane).queue(broker.names());
        let broker = broker.clone();
        async move {
            warren_broker::depth::ready_messages(&broker, &queue)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    let hot = Lane::hot_for(part, "big").expect("the part pipeline has hot lanes");
    let shard = StepRoute::for_tenant(part, "a", Priority::Normal, "big").lane;
    let (in_hot, in_shard) = (ready(hot).await, ready(shard).await);
    broker.close().await;
    // (150 parts of one queue and tenant travel in bundles of 2: 75 messages)
    assert_eq!(in_shard, 0, "{in_hot} messages in the hot lane");
    assert!(in_hot >= 70, "{in_hot} messages in the hot lane");
    let marked = eventually(Duration::from_secs(10), || async {
        client.hot_tenants().iter().any(|h| h.tenant == "big")
    })
    .await;
    assert!(marked, "the producer's router never saw the tenant hot");
}

#[tokio::test]
async fn a_join_whose_parts_list_passes_the_payload_limit_gets_the_counts() {
    // Given a payload limit that holds a plan of 200 parts, but not the ids and statuses of
    // 200 parts (about 80 bytes each)
    let config = format!("max_payload_bytes = 12000\n{}", config("", TWO_WORK_STEPS));
    let ns = TestNamespace::new(&config).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When a job fans out to 200 parts
    let parent = submit_plan(&client, 200, 0).await;

    // Then the join runs with the counts, and says the list is left out
    let result = client.wait(parent, Duration::from_secs(60)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(result.step, "notify");
    let out = &result.output;
    assert_eq!(
        (&out["total"], &out["succeeded"], &out["failed"]),
        (&json!(200), &json!(200), &json!(0)),
        "{out}"
    );
    assert_eq!(
        (
            &out["parts"],
            &out["outputs_omitted"],
            &out["parts_omitted"]
        ),
        (&json!([]), &json!(true), &json!(true)),
    );
}

#[tokio::test]
async fn many_parts_of_one_tenant_travel_in_bundles_and_survive_a_killed_worker() {
    // Given a job whose plan gives 1,500 parts to two tenants (750 each: a share that big
    // travels in bundles of 10), and, at first, a worker for its own pipeline only
    let ns = TestNamespace::new(&config("", TWO_WORK_STEPS)).await;
    let _planner = ns.spawn_worker(&["--pipeline", "nightly"]);
    let client = ns.client().await;
    let parent = submit_tenants_plan(&client, 1_500, 20, 2).await;

    // When its parts are published, they wait in 150 messages, not 1,500
    let part_a_depth = || async {
        ns.work_queue_depths()
            .await
            .iter()
            .filter(|(queue, _)| queue.contains(".q.part.a."))
            .map(|(_, depth)| depth)
            .sum::<u32>()
    };
    let bundled = eventually(Duration::from_secs(30), || async {
        part_a_depth().await == 150
    })
    .await;
    assert!(
        bundled,
        "part queues hold {} messages",
        part_a_depth().await
    );

    // and two part workers take them, one SIGKILLed while bundles run, a third started
    let mut part_workers = vec![
        ns.spawn_worker(&["--pipeline", "part"]),
        ns.spawn_worker(&["--pipeline", "part"]),
    ];
    let going = eventually(Duration::from_secs(60), || async {
        ns.step_starts().iter().filter(|s| s.1 == "a").count() >= 300
    })
    .await;
    assert!(going, "the parts never got going");
    part_workers[0].kill_hard();
    part_workers.push(ns.spawn_worker(&["--pipeline", "part"]));

    // Then the join accounts for every part once, each through both of its steps
    let result = client.wait(parent, Duration::from_secs(120)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    every_part_once_through_a_and_b(&result.output, parent, 1_500);
    assert!(join_runs(&ns) >= 1, "the join never ran");
    // Every part's next step went out alone: step b ran 1,500 times, plus repeats of the
    // killed worker's bundles.
    let starts = ns.step_starts();
    let (a, b) = (
        starts.iter().filter(|s| s.1 == "a").count(),
        starts.iter().filter(|s| s.1 == "b").count(),
    );
    assert!(a >= 1_500 && b >= 1_500, "a ran {a} times, b {b}");
    eprintln!(
        "1,500 parts in bundles, a part worker SIGKILLed: step a ran {} extra time(s), b {}",
        a - 1_500,
        b - 1_500
    );
}

#[tokio::test]
async fn a_bundle_of_slow_parts_sends_the_rest_back_after_its_hold() {
    // Given 640 parts of one tenant (64 bundles of 10) that take 1.5 s each, and a worker
    // that runs 64 at once
    let one_step = "[[pipelines.steps]]\nname = \"a\"\nhandler = \"work\"\nconcurrency = 64\n";
    let ns = TestNamespace::new(&config("", one_step)).await;
    let worker = ns.spawn_worker(&[]);
    let client = ns.client().await;

    // When the fan-out runs
    let parent = submit_tenants_plan(&client, 640, 1_500, 1).await;

    // Then each bundle runs parts for its 10 s hold and sends the rest back one by one: the
    // join comes with every part, each run once, well before 10 parts in line would take
    let started = std::time::Instant::now();
    let result = client.wait(parent, Duration::from_secs(90)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    assert_eq!(
        (&result.output["total"], &result.output["succeeded"]),
        (&json!(640), &json!(640))
    );
    let runs = ns.step_starts().iter().filter(|s| s.1 == "a").count();
    assert_eq!(runs, 640, "a part ran twice, or not at all");
    assert!(
        worker
            .log_text()
            .contains("its parts not yet started go back to the queue one by one"),
        "no bundle sent parts back"
    );
    eprintln!(
        "640 parts of 1.5 s in bundles of 10 on 64 slots: joined after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn parts_in_a_bundle_retry_and_fail_each_on_their_own() {
    // Given 200 parts of one tenant (bundles of 3), of which every tenth fails once and part 7
    // fails for good
    let one_step = "[[pipelines.steps]]\nname = \"a\"\nhandler = \"work\"\nconcurrency = 16\nbackoff = [\"200ms\"]\n";
    let ns = TestNamespace::new(&config("", one_step)).await;
    let _worker = ns.spawn_worker(&[]);
    let client = ns.client().await;
    let parts: Vec<Value> = (0..200)
        .map(|i| {
            let mut payload = json!({ "i": i });
            if i % 10 == 0 {
                payload["fail_at"] = json!("a");
                payload["fail_times"] = json!(1);
            }
            if i == 7 {
                payload["fail_permanently_at"] = json!("a");
            }
            json!({ "payload": payload, "tenant": "big" })
        })
        .collect();

    // When the fan-out runs
    let parent = submit_parts(&client, parts).await;

    // Then the join counts 199 successes and part 7's failure, each retried part ran twice
    // and no other part again, and the dead-letter queue holds part 7 alone
    let result = client.wait(parent, Duration::from_secs(60)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{result:?}");
    let out = &result.output;
    assert_eq!(
        (&out["total"], &out["succeeded"], &out["failed"]),
        (&json!(200), &json!(199), &json!(1)),
    );
    let failed: Vec<&Value> = out["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == json!("failed"))
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0]["job_id"],
        json!(part_job_id(parent, 7).to_string())
    );
    let runs = ns.step_starts().iter().filter(|s| s.1 == "a").count();
    assert_eq!(runs, 200 + 20, "step a ran {runs} times");
    let letters = client
        .dlq_list(&warren_producer::DlqFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].job_id, Some(part_job_id(parent, 7)));
    assert_eq!(letters[0].bundled_parts, None);
}

/// Submits a `nightly` job whose plan splits `parts` parts of `sleep_ms` over 30 tenants.
async fn submit_plan(client: &Client, parts: u32, sleep_ms: u64) -> JobId {
    submit_tenants_plan(client, parts, sleep_ms, 30).await
}

/// Submits a `nightly` job whose plan splits `parts` parts of `sleep_ms` over `tenants` tenants.
async fn submit_tenants_plan(client: &Client, parts: u32, sleep_ms: u64, tenants: u32) -> JobId {
    let parts: Vec<Value> = (0..parts)
        .map(|i| json!({"payload": {"i": i, "sleep_ms": sleep_ms}, "tenant": format!("t{}", i % tenants)}))
        .collect();
    submit_parts(client, parts).await
}

/// Submits a `nightly` job whose plan is `parts` as given.
async fn submit_parts(client: &Client, parts: Vec<Value>) -> JobId {
    client
        .submit(Job::new("nightly", "ops", json!({ "parts": parts })))
        .await
        .unwrap()
}
