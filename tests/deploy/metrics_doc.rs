//! docs/metrics.md read as a contract: the metric tables (name, type, labels), the default
//! ports and the endpoint paths.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;

use crate::files::{read, repo};
use crate::promql;

#[derive(Debug)]
pub(crate) struct Metric {
    pub(crate) kind: String,
    pub(crate) labels: BTreeSet<String>,
}

fn metrics_doc() -> String {
    read(&repo().join("docs/metrics.md"))
}

/// The metric tables of docs/metrics.md: name -> type and labels. A row may name several
/// metrics (the `process_*` one does).
pub(crate) fn documented_metrics() -> BTreeMap<String, Metric> {
    let name_re = Regex::new(r"`([a-z_:][a-z0-9_:]*)`").unwrap();
    let mut metrics = BTreeMap::new();
    for line in metrics_doc().lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| name | type | labels | meaning |` splits into 6 cells, the outer two empty.
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let labels: BTreeSet<String> = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        for name in name_re.captures_iter(cells[1]) {
            metrics.insert(
                name[1].to_string(),
                Metric {
                    kind: cells[2].to_string(),
                    labels: labels.clone(),
                },
            );
        }
    }
    assert!(
        metrics.contains_key("warren_step_executions_total")
            && metrics.contains_key("process_resident_memory_bytes"),
        "docs/metrics.md: could not read the metric tables (found {:?})",
        metrics.keys().collect::<Vec<_>>()
    );
    metrics
}

/// Labels any series has besides its own: the scrape target's, and the PodMonitor's.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
];

/// Checks one selector (metric name, and the labels it matches on) against the docs.
pub(crate) fn check_selector(
    sel: &promql::Selector,
    docs: &BTreeMap<String, Metric>,
) -> Result<(), String> {
    let (base, is_bucket) = match ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| sel.metric.strip_suffix(s).map(|b| (b, *s == "_bucket")))
    {
        // A histogram's series; `_total` counters ending in `_count` are not a thing here.
        Some((base, bucket)) if docs.get(base).is_some_and(|m| m.kind == "histogram") => {
            (base, bucket)
        }
        _ => (sel.metric.as_str(), false),
    };
    let metric = docs
        .get(base)
        .ok_or_else(|| format!("metric `{}` is not in docs/metrics.md", sel.metric))?;
    for label in &sel.labels {
        let known = metric.labels.contains(label)
            || TARGET_LABELS.contains(&label.as_str())
            || (is_bucket && label == "le");
        if !known {
            return Err(format!(
                "`{}` has no label `{label}` (docs/metrics.md lists: {})",
                sel.metric,
                metric.labels.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

/// The port of `--metrics-addr` defaults in docs/metrics.md: (worker, supervisor, first
/// supervised worker).
pub(crate) fn documented_ports() -> (u16, u16, u16) {
    let doc = metrics_doc();
    let addr = Regex::new(r"`--metrics-addr`\s+\(default\s+`127\.0\.0\.1:(\d+)`").unwrap();
    let ports: Vec<u16> = addr
        .captures_iter(&doc)
        .map(|c| c[1].parse().unwrap())
        .collect();
    let base = Regex::new(r"listen on\s+`127\.0\.0\.1:(\d+)`").unwrap();
    let base: u16 = base
        .captures(&doc)
        .expect("docs/metrics.md: no supervised worker port")[1]
        .parse()
        .unwrap();
    assert_eq!(
        ports.len(),
        2,
        "docs/metrics.md: expected the worker's and the supervisor's default --metrics-addr"
    );
    (ports[0], ports[1], base)
}

/// The path of docs/metrics.md's endpoint row whose meaning mentions `what`.
pub(crate) fn documented_path(what: &str) -> String {
    let doc = metrics_doc();
    let line = doc
        .lines()
        .find(|l| l.starts_with("| `/") && l.contains(what))
        .unwrap_or_else(|| panic!("docs/metrics.md: no endpoint row for {what}"));
    line.split('`').nth(1).unwrap().to_string()
}
