//! The Grafana dashboards: valid, wired to the Prometheus datasource variable, and querying only
//! metrics and labels documented in docs/metrics.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

use crate::files::{files_under, json_doc, k8s, rel, repo, str_at, str_list, yaml_docs};
use crate::kustomize::generator_files;
use crate::metrics_doc::{check_selector, documented_metrics, Metric};
use crate::promql;

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard
        .pointer("/panels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(panel);
        out.extend(
            panel
                .pointer("/panels")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        );
    }
    out
}

/// Grafana's own variables a query may use.
const GRAFANA_BUILTINS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// Problems of one dashboard, each naming the file and the panel.
fn dashboard_problems(
    path: &Path,
    dashboard: &Value,
    docs: &BTreeMap<String, Metric>,
) -> Vec<String> {
    let at = rel(path);
    let mut problems = Vec::new();
    let schema = dashboard.pointer("/schemaVersion").and_then(Value::as_u64);
    if schema.is_none_or(|v| v < 36) {
        problems.push(format!("{at}: schemaVersion must be 36 or more"));
    }
    for key in ["/uid", "/title"] {
        if str_at(dashboard, key).is_none_or(str::is_empty) {
            problems.push(format!("{at}: no {}", &key[1..]));
        }
    }

    let variables: Vec<&Value> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let var_names: BTreeSet<&str> = variables
        .iter()
        .filter_map(|v| str_at(v, "/name"))
        .collect();
    let datasource_var = variables.iter().find(|v| {
        str_at(v, "/type") == Some("datasource") && str_at(v, "/query") == Some("prometheus")
    });
    let Some(ds_name) = datasource_var.and_then(|v| str_at(v, "/name")) else {
        problems.push(format!("{at}: no Prometheus datasource variable"));
        return problems;
    };
    // Datasource references must go through the variable, so the dashboard works on any Grafana.
    let ds_ok = |v: Option<&Value>| match v {
        None => true,
        Some(ds) => str_at(ds, "/uid")
            .is_some_and(|uid| uid == format!("${{{ds_name}}}") || uid == format!("${ds_name}")),
    };
    let known_var = |name: &str| var_names.contains(name) || GRAFANA_BUILTINS.contains(&name);

    // Variables' own queries: `label_values(<selector>, <label>)`.
    let label_values =
        Regex::new(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$").unwrap();
    for var in variables
        .iter()
        .filter(|v| str_at(v, "/type") == Some("query"))
    {
        let name = str_at(var, "/name").unwrap_or("?");
        if !ds_ok(var.pointer("/datasource")) {
            problems.push(format!("{at}: variable `{name}` does not use ${ds_name}"));
        }
        let query = str_at(var, "/query/query")
            .or_else(|| str_at(var, "/query"))
            .unwrap_or("");
        let Some(c) = label_values.captures(query) else {
            problems.push(format!(
                "{at}: variable `{name}`: expected label_values(metric, label), got `{query}`"
            ));
            continue;
        };
        match promql::selectors(&c[1]) {
            Ok(sels) if sels.len() == 1 => {
                if let Err(e) = check_selector(&sels[0], docs) {
                    problems.push(format!("{at}: variable `{name}`: {e}"));
                } else if let Some(m) = docs.get(&sels[0].metric) {
                    if !m.labels.contains(&c[2]) {
                        problems.push(format!(
                            "{at}: variable `{name}`: `{}` has no label `{}`",
                            sels[0].metric, &c[2]
                        ));
                    }
                }
            }
            Ok(_) => problems.push(format!(
                "{at}: variable `{name}`: label_values needs one selector"
            )),
            Err(e) => problems.push(format!("{at}: variable `{name}`: {e}")),
        }
        for v in promql::variables(query) {
            if !known_var(&v) || v == name {
                problems.push(format!(
                    "{at}: variable `{name}` uses `${v}`, which is not defined before it"
                ));
            }
        }
    }

    let mut ids = BTreeSet::new();
    for panel in panels(dashboard) {
        let title = str_at(panel, "/title").unwrap_or("?");
        let Some(id) = panel.pointer("/id").and_then(Value::as_u64) else {
            problems.push(format!("{at}: panel `{title}` has no id"));
            continue;
        };
        if !ids.insert(id) {
            problems.push(format!("{at}: panel id {id} (`{title}`) is used twice"));
        }
        if str_at(panel, "/type") == Some("row") {
            continue;
        }
        let here = format!("{at}: panel {id} `{title}`");
        if !ds_ok(panel.pointer("/datasource")) {
            problems.push(format!("{here}: datasource is not ${ds_name}"));
        }
        let targets = panel
            .pointer("/targets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{here}: no query"));
        }
        for target in &targets {
            if !ds_ok(target.pointer("/datasource")) {
                problems.push(format!("{here}: a query's datasource is not ${ds_name}"));
            }
            let expr = str_at(target, "/expr").unwrap_or("");
            match promql::selectors(expr) {
                Ok(sels) if sels.is_empty() => {
                    problems.push(format!("{here}: query `{expr}` uses no metric"))
                }
                Ok(sels) => {
                    for sel in sels {
                        if let Err(e) = check_selector(&sel, docs) {
                            problems.push(format!("{here}: {e}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("{here}: {e}")),
            }
            for v in promql::variables(expr) {
                if !known_var(&v) {
                    problems.push(format!(
                        "{here}: `${v}` is not a variable of this dashboard"
                    ));
                }
            }
        }
    }
    problems
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = repo().join("deploy/grafana/dashboards");
    let found: Vec<(PathBuf, Value)> = files_under(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v = json_doc(&p).unwrap();
            (p, v)
        })
        .collect();
    let names: BTreeSet<String> = found
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in ["warren-overview.json", "warren-pipeline.json"] {
        assert!(
            names.contains(wanted),
            "deploy/grafana/dashboards: no {wanted}"
        );
    }
    found
}

#[test]
fn dashboards_query_only_documented_metrics_and_labels() {
    let docs = documented_metrics();
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (path, dashboard) in dashboards() {
        problems.extend(dashboard_problems(&path, &dashboard, &docs));
        if !uids.insert(str_at(&dashboard, "/uid").unwrap_or("").to_string()) {
            problems.push(format!("{}: uid used by another dashboard", rel(&path)));
        }
        for panel in panels(&dashboard) {
            for target in panel
                .pointer("/targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for sel in
                    promql::selectors(str_at(target, "/expr").unwrap_or("")).unwrap_or_default()
                {
                    used.insert(sel.metric);
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The overview shows what the issue asks for: each of these is on some panel.
    for metric in [
        "warren_job_duration_seconds_count",
        "warren_step_executions_total",
        "warren_step_duration_seconds_bucket",
        "warren_step_queue_wait_seconds_bucket",
        "warren_queue_messages",
        "warren_dead_letters_total",
        "warren_supervisor_workers_desired",
        "warren_supervisor_workers_running",
        "warren_publish_confirm_seconds_bucket",
        "warren_steps_in_flight",
        "warren_reconnects_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            used.contains(metric),
            "deploy/grafana/dashboards: no panel shows {metric}"
        );
    }
}

#[test]
fn pipeline_dashboard_has_pipeline_step_and_shard_variables() {
    let (path, dashboard) = dashboards()
        .into_iter()
        .find(|(p, _)| p.ends_with("warren-pipeline.json"))
        .unwrap();
    let names: BTreeSet<&str> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| str_at(v, "/type") == Some("query"))
        .filter_map(|v| str_at(v, "/name"))
        .collect();
    for var in ["pipeline", "step", "shard"] {
        assert!(
            names.contains(var),
            "{}: no query variable `{var}`",
            rel(&path)
        );
    }
}

#[test]
fn dashboards_configmap_carries_every_dashboard() {
    let dir = repo().join("deploy/grafana");
    let k = &yaml_docs(&dir.join("kustomization.yaml")).unwrap()[0];
    let generator = k
        .pointer("/configMapGenerator/0")
        .expect("deploy/grafana/kustomization.yaml: no configMapGenerator");
    assert_eq!(
        str_at(generator, "/options/labels/grafana_dashboard"),
        Some("1"),
        "deploy/grafana/kustomization.yaml: label grafana_dashboard: \"1\""
    );
    let listed: BTreeSet<PathBuf> = generator_files(generator)
        .into_iter()
        .map(|(_, f)| dir.join(f))
        .collect();
    let present: BTreeSet<PathBuf> = dashboards().into_iter().map(|(p, _)| p).collect();
    assert_eq!(listed, present, "deploy/grafana/kustomization.yaml: the generator must list exactly deploy/grafana/dashboards/*.json");
    let k8s_resources = str_list(
        &yaml_docs(&k8s().join("kustomization.yaml")).unwrap()[0],
        "/resources",
    );
    assert!(
        k8s_resources.iter().any(|r| r == "../grafana"),
        "deploy/k8s/kustomization.yaml: does not include ../grafana"
    );
}

// The checks above must be able to fail: fed broken input, they complain, naming the problem.
#[test]
fn dashboard_check_catches_undocumented_metrics_labels_and_duplicate_ids() {
    let docs = documented_metrics();
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let board = |exprs: &[&str], ids: &[u64]| {
        serde_json::json!({
            "uid": "x", "title": "x", "schemaVersion": 39,
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
            "panels": exprs.iter().zip(ids).map(|(e, id)| serde_json::json!({
                "id": id, "type": "timeseries", "title": "t", "datasource": ds,
                "targets": [{"refId": "A", "datasource": ds, "expr": e}]
            })).collect::<Vec<_>>()
        })
    };
    let path = repo().join("deploy/grafana/dashboards/test.json");
    let check = |b: &Value| dashboard_problems(&path, b, &docs).join("\n");

    assert_eq!(
        check(&board(
            &["sum(rate(warren_step_executions_total[5m]))"],
            &[1]
        )),
        ""
    );
    assert!(check(&board(&["rate(warren_jobs_total[5m])"], &[1]))
        .contains("`warren_jobs_total` is not in docs/metrics.md"));
    assert!(
        check(&board(&["warren_step_executions_total_bucket"], &[1]))
            .contains("not in docs/metrics.md")
    );
    assert!(check(&board(
        &[r#"warren_step_executions_total{shard="1"}"#],
        &[1]
    ))
    .contains("no label `shard`"));
    assert!(check(&board(
        &[r#"warren_step_duration_seconds_sum{le="1"}"#],
        &[1]
    ))
    .contains("no label `le`"));
    assert!(
        check(&board(&[r#"warren_queue_messages{shard=~"$shard"}"#], &[1]))
            .contains("`$shard` is not a variable")
    );
    assert!(check(&board(
        &["warren_steps_in_flight", "warren_steps_in_flight"],
        &[3, 3]
    ))
    .contains("panel id 3"));
    let mut no_ds = board(&["warren_steps_in_flight"], &[1]);
    no_ds["templating"]["list"] = serde_json::json!([]);
    assert!(check(&no_ds).contains("no Prometheus datasource variable"));
    let mut old = board(&["warren_steps_in_flight"], &[1]);
    old["schemaVersion"] = Value::from(27);
    assert!(check(&old).contains("schemaVersion"));
}
