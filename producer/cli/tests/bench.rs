//! `warren bench` with tiny sizes against the real broker: a smoke test of the harness (every
//! scenario reports numbers, the namespaces are gone afterwards). It never asserts timings.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use warren_broker::depth::ready_messages;
use warren_broker::Broker;
use warren_common::Config;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

#[tokio::test]
async fn bench_reports_every_scenario_and_cleans_up() {
    let report = bench(
        Command::new(WARREN)
            .args([
                "--json",
                "bench",
                "--jobs",
                "200",
                "--chain-jobs",
                "100",
                "--flood",
                "200",
            ])
            .args(["--small", "10", "--latency-jobs", "20", "--patience", "60s"])
            .args(["--fanout-parts", "200", "--fanout-runs", "2"])
            .args(["--settle", "0s"]),
    );
    let rows = report["rows"].as_array().expect("rows");
    let scenarios: BTreeSet<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(
        scenarios,
        ["S1", "S2", "S3", "S4", "S5", "S6", "S9"].into(),
        "{report:#}"
    );
    for row in rows {
        assert!(row["warren"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        if !row["baseline"].is_null() {
            assert!(row["baseline"].as_f64().is_some_and(|v| v > 0.0), "{row}");
            assert!(row["ratio"].as_f64().is_some(), "{row}");
        }
        assert!(
            row["target"].is_string() && row["metric"].is_string(),
            "{row}"
        );
    }
    // Both throw-away namespaces were deleted.
    let ns = report["conditions"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_gone(&[
        format!("{ns}.q.one.noop.normal.0"),
        format!("{ns}-raw.q.one.noop.normal.0"),
    ])
    .await;
}

/// S7 is not in the default set (it takes minutes at its default sizes): here it runs with one
/// pipeline and a 1 s window.
#[tokio::test]
async fn the_scale_scenario_reports_its_rows_and_deletes_its_namespaces() {
    let report = bench(
        Command::new(WARREN)
            .args(["--json", "bench", "--scenarios", "s7"])
            .args(["--scale-pipelines", "1", "--scale-window", "1s"])
            .args(["--settle", "0s", "--patience", "60s"]),
    );
    let rows = report["rows"].as_array().expect("rows");
    let figure = |metric: &str| {
        rows.iter()
            .find(|r| r["metric"] == metric)
            .and_then(|r| r["warren"].as_f64())
            .unwrap_or_else(|| panic!("no {metric:?} in {report:#}"))
    };
    assert_eq!(rows.len(), 12, "two sets of 6 rows: {report:#}");
    // 3 steps x 3 priorities x (4 shards + 2 hot lanes), and a third of that with only `normal`.
    assert_eq!(figure("1 pipeline: consumers of the worker"), 54.0);
    assert_eq!(
        figure("1 pipeline, normal only: consumers of the worker"),
        18.0
    );
    for set in ["1 pipeline", "1 pipeline, normal only"] {
        assert!(figure(&format!("{set}: worker start to every consumer")) > 0.0);
        assert!(figure(&format!("{set}: worker RSS idle")) > 0.0);
        assert!(figure(&format!("{set}: worker CPU idle")) >= 0.0);
    }
    assert!(figure("1 pipeline: topology apply, 60 queues") > 0.0);
    assert!(figure("1 pipeline, normal only: topology apply, 24 queues") > 0.0);

    // Every namespace of the run was deleted.
    let ns = report["conditions"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_gone(&[
        format!("{ns}.q.one.noop.normal.0"),
        format!("{ns}-s7-1.q.p0.a.high.0"),
        format!("{ns}-s7-1n.q.p0.a.normal.0"),
    ])
    .await;
}

/// S3c and S7t are not in the default set (minutes at their default sizes): here with tiny
/// floods and few tenants. Their targets depend on hot-lane routing, so only the report is
/// checked: every row is there with a number, and the namespaces are gone.
#[tokio::test]
async fn the_fairness_scenarios_report_their_rows_and_delete_their_namespaces() {
    let report = bench(
        Command::new(WARREN)
            .args(["--json", "bench", "--scenarios", "s3c,s7t"])
            .args(["--flood", "300", "--small", "10"])
            .args([
                "--tenants",
                "20",
                "--fair-floods",
                "2x300",
                "--fair-idle",
                "2s",
            ])
            .args(["--settle", "0s", "--patience", "60s"]),
    );
    let rows = report["rows"].as_array().expect("rows");
    let figure = |scenario: &str, metric: &str| {
        rows.iter()
            .find(|r| r["scenario"] == scenario && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no {scenario} {metric:?} in {report:#}"))
    };
    // S3c: both passes, each latency with its idle baseline.
    for metric in [
        "same-shard p95 under flood vs idle, hot_lanes = 0",
        "same-shard p95 under flood vs idle",
    ] {
        let row = figure("S3c", metric);
        assert!(row["warren"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        assert!(row["ratio"].as_f64().is_some_and(|v| v > 0.0), "{row}");
    }
    assert_eq!(
        figure("S3c", "same-shard p95 under flood vs idle")["target"],
        "<= 5x"
    );
    let drained = figure("S3c", "flood drained in vs hot_lanes = 0");
    assert!(
        drained["baseline"].as_f64().is_some_and(|v| v > 0.0),
        "{drained}"
    );
    // S7t: one flood set, run with hot lanes off and on.
    let set = "2 floods x 300";
    for suffix in [", hot_lanes = 0", ""] {
        for share in [
            "tenants with p95 <= 5x idle",
            "tenants with p95 from confirm <= 5x idle",
        ] {
            let share = figure("S7t", &format!("{set}{suffix}: {share}"));
            assert!(
                share["warren"]
                    .as_f64()
                    .is_some_and(|v| (0.0..=100.0).contains(&v)),
                "{share}"
            );
        }
        for metric in [
            "median tenant's p95 vs idle p95",
            "worst tenant's p95 vs idle p95",
            "small tenants' load vs intended",
            "small jobs' submit confirm p95 vs idle",
        ] {
            let row = figure("S7t", &format!("{set}{suffix}: {metric}"));
            assert!(row["warren"].as_f64().is_some_and(|v| v > 0.0), "{row}");
            assert!(row["baseline"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        }
    }
    assert_eq!(
        figure("S7t", &format!("{set}: tenants with p95 <= 5x idle"))["target"],
        ">= 99 %"
    );
    let floods = figure(
        "S7t",
        &format!("{set}: floods finished in vs hot_lanes = 0"),
    );
    assert!(
        floods["ratio"].as_f64().is_some_and(|v| v > 0.0),
        "{floods}"
    );
    for metric in [
        "small tenants' jobs/s while the floods ran vs hot_lanes = 0",
        "all jobs/s while the floods ran vs hot_lanes = 0",
    ] {
        // A rate, so zero is possible only for the small tenants in a tiny run; never negative.
        let row = figure("S7t", &format!("{set}: {metric}"));
        assert!(row["warren"].as_f64().is_some_and(|v| v >= 0.0), "{row}");
        assert!(row["baseline"].as_f64().is_some_and(|v| v >= 0.0), "{row}");
    }
    assert_eq!(rows.len(), 4 + 16, "{report:#}");

    // The fairness pipelines were in the bench's namespace, which was deleted.
    let ns = report["conditions"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_gone(&[
        format!("{ns}.q.collide.work.normal.0"),
        format!("{ns}.q.collide_off.work.normal.0"),
        format!("{ns}.q.fair.work.normal.hot0"),
        format!("{ns}.q.fair_off.work.normal.7"),
    ])
    .await;
}

/// S9 at a small size (200 parts, twice, and the raw fan-out twice), beside S1 for its
/// baselines: every S9 row is there with a number, the join ran once per fan-out, and the namespace is gone.
#[tokio::test]
async fn the_fan_out_scenario_reports_its_rows_and_deletes_its_namespace() {
    let report = bench(
        Command::new(WARREN)
            .args(["--json", "bench", "--scenarios", "s1,s9"])
            .args([
                "--jobs",
                "200",
                "--fanout-parts",
                "200",
                "--fanout-runs",
                "2",
            ])
            .args(["--settle", "0s", "--patience", "60s"]),
    );
    let rows = report["rows"].as_array().expect("rows");
    let figure = |metric: &str| {
        rows.iter()
            .find(|r| r["scenario"] == "S9" && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no S9 {metric:?} in {report:#}"))
    };
    for metric in [
        "200-part fan-out vs S1 drain",
        "200-part fan-out vs S1 submit then drain",
        "200-part fan-out vs raw fan-out",
        "raw fan-out vs raw relay (S1's drain baseline)",
    ] {
        let row = figure(metric);
        assert!(row["warren"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        assert!(row["baseline"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        assert!(row["ratio"].as_f64().is_some_and(|v| v > 0.0), "{row}");
    }
    assert_eq!(figure("200-part fan-out vs S1 drain")["target"], ">= 0.8x");
    assert_eq!(
        figure("200-part fan-out vs raw fan-out")["target"],
        ">= 0.8x"
    );
    let gap = figure("last part end to join start, p50");
    assert!(gap["warren"].as_f64().is_some_and(|v| v >= 0.0), "{gap}");
    let joins = figure("joins per fan-out");
    assert_eq!(joins["warren"].as_f64(), Some(1.0), "{joins}");
    let s9 = rows.iter().filter(|r| r["scenario"] == "S9").count();
    assert_eq!(s9, 6, "{report:#}");

    let ns = report["conditions"]["namespace"]
        .as_str()
        .expect("namespace");
    assert_gone(&[
        format!("{ns}.q.fan.plan.normal.0"),
        format!("{ns}.q.part.stamp.normal.0"),
        format!("{ns}.fanin"),
        format!("{ns}.fanin.ckpt"),
    ])
    .await;
}

/// Runs `warren bench` as on a machine without a warren.toml (defaults plus WARREN_AMQP_URL),
/// asserts it succeeded and returns its JSON report.
fn bench(command: &mut Command) -> Value {
    let out = command
        .env_remove("WARREN_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warren bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON document on stdout")
}

/// None of `queues` exists on the test broker any more.
async fn assert_gone(queues: &[String]) {
    let mut config = Config::parse("", "test", Path::new("."), &HashMap::new()).unwrap();
    if let Ok(url) = std::env::var("WARREN_AMQP_URL") {
        config.broker.urls = vec![url];
    }
    let broker = Broker::connect(&config.broker).await.unwrap();
    for queue in queues {
        assert_eq!(
            ready_messages(&broker, queue).await.unwrap(),
            None,
            "{queue} is left"
        );
    }
    broker.close().await;
}
