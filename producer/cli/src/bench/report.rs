//! The bench's output: one row per figure, a target per row, the table and the JSON, and the
//! medians over repeated runs.

use serde_json::{json, Value};

/// What a row is held to. Ratios are warren's figure over the baseline's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Target {
    /// Shown for context; no target.
    Info,
    /// Throughput: warren at least this fraction of the baseline.
    RatioAtLeast(f64),
    /// Latency: warren at most this multiple of the baseline.
    RatioAtMost(f64),
    /// Latency: at most this multiple of the baseline, and below this many ms.
    RatioAtMostAndBelow(f64, f64),
    /// An absolute bound on warren's figure, in the row's unit.
    Below(f64),
    /// Exactly this figure (a count, such as a cap's observed peak).
    Exactly(f64),
    /// An absolute floor on warren's figure, in the row's unit (S7t's share of tenants).
    AtLeast(f64),
}

impl Target {
    fn text(self, unit: &str) -> String {
        match self {
            Target::Info => "-".into(),
            Target::RatioAtLeast(r) => format!(">= {r}x"),
            Target::RatioAtMost(r) => format!("<= {r}x"),
            Target::RatioAtMostAndBelow(r, v) => format!("<= {r}x, < {v} {unit}"),
            Target::Below(v) => format!("< {v} {unit}"),
            Target::Exactly(v) => format!("= {v} {unit}"),
            Target::AtLeast(v) => format!(">= {v} {unit}"),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) scenario: &'static str,
    pub(super) metric: String,
    pub(super) unit: &'static str,
    pub(super) warren: f64,
    /// The raw-lapin figure, or for S3/S4 warren's own on an idle system; none for S6.
    pub(super) baseline: Option<f64>,
    pub(super) ratio: Option<f64>,
    pub(super) target: Target,
}

impl Row {
    pub(super) fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        unit: &'static str,
        warren: f64,
        baseline: Option<f64>,
        target: Target,
    ) -> Self {
        let ratio = baseline.filter(|b| *b > 0.0).map(|b| warren / b);
        Self {
            scenario,
            metric: metric.into(),
            unit,
            warren,
            baseline,
            ratio,
            target,
        }
    }

    /// `None` for rows without a target.
    pub(super) fn pass(&self) -> Option<bool> {
        let ratio = self.ratio.unwrap_or(f64::NAN);
        match self.target {
            Target::Info => None,
            Target::RatioAtLeast(r) => Some(ratio >= r),
            Target::RatioAtMost(r) => Some(ratio <= r),
            Target::RatioAtMostAndBelow(r, v) => Some(ratio <= r && self.warren < v),
            Target::Below(v) => Some(self.warren < v),
            Target::Exactly(v) => Some(self.warren == v),
            Target::AtLeast(v) => Some(self.warren >= v),
        }
    }
}

/// Per-row medians over runs (the runs give the same rows in the same order). The ratio is the
/// median of each run's own ratio: warren and its baseline ran minutes apart at most, so a
/// run's ratio is steadier than a ratio of medians taken from different runs.
pub(super) fn medians(runs: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let column = |f: &dyn Fn(&Row) -> Option<f64>| {
                median(
                    runs.iter()
                        .filter_map(|run| run.get(i).and_then(f))
                        .collect(),
                )
            };
            Row {
                warren: column(&|r| Some(r.warren)).unwrap_or(f64::NAN),
                baseline: column(&|r| r.baseline),
                ratio: column(&|r| r.ratio),
                ..first[i].clone()
            }
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub(super) fn table(rows: &[Row]) -> String {
    let width = rows
        .iter()
        .map(|r| r.metric.len() + r.unit.len() + 3)
        .max()
        .unwrap_or(0)
        .max(52);
    let mut out = format!(
        "{:<4} {:<width$} {:>9} {:>9} {:>7}  {:<18} {}\n",
        "", "metric", "warren", "raw|idle", "ratio", "target", "result"
    );
    for row in rows {
        let metric = format!("{} ({})", row.metric, row.unit);
        let result = match row.pass() {
            None => "-",
            Some(true) => "pass",
            Some(false) => "FAIL",
        };
        // A figure this machine cannot take (S7's broker CPU with a remote broker).
        let warren = match row.warren.is_nan() {
            true => "n/a".into(),
            false => number(row.warren),
        };
        out.push_str(&format!(
            "{:<4} {:<width$} {:>9} {:>9} {:>7}  {:<18} {}\n",
            row.scenario,
            metric,
            warren,
            row.baseline.map_or("-".into(), number),
            row.ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            row.target.text(row.unit),
            result
        ));
    }
    out
}

pub(super) fn json(rows: &[Row], conditions: &Value) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario,
                "metric": r.metric,
                "unit": r.unit,
                "warren": finite(r.warren),
                "baseline": r.baseline.and_then(finite),
                "ratio": r.ratio.and_then(finite),
                "target": r.target.text(r.unit),
                "pass": r.pass(),
            })
        })
        .collect();
    json!({ "conditions": conditions, "rows": rows })
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_medians() {
        let row =
            |w: f64, b: f64| Row::new("S1", "m", "jobs/s", w, Some(b), Target::RatioAtLeast(0.8));
        assert_eq!(row(90.0, 100.0).pass(), Some(true));
        assert_eq!(row(70.0, 100.0).pass(), Some(false));
        let high = Row::new(
            "S4",
            "p95",
            "ms",
            15.0,
            Some(5.0),
            Target::RatioAtMostAndBelow(5.0, 14.0),
        );
        assert_eq!(high.pass(), Some(false), "under 5x but not under 14 ms");
        let share = |w: f64| Row::new("S7t", "share", "%", w, None, Target::AtLeast(99.0));
        assert_eq!(share(99.0).pass(), Some(true));
        assert_eq!(share(98.9).pass(), Some(false));
        assert_eq!(share(f64::NAN).pass(), Some(false));
        let runs = vec![
            vec![row(1.0, 2.0)],
            vec![row(3.0, 3.0)],
            vec![row(2.0, 8.0)],
        ];
        let m = &medians(&runs)[0];
        assert_eq!((m.warren, m.baseline, m.ratio), (2.0, Some(3.0), Some(0.5)));
        assert!(table(&medians(&runs)).contains("0.50x"));
    }
}
