//! Which metrics (and which label matchers on them) a dashboard query uses, read with the
//! `promql-parser` crate, and which Grafana variables it refers to. A query the parser refuses,
//! or a selector without a metric name, is an error, so an unusual query fails the test instead
//! of passing unchecked.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use promql_parser::label::{MatchOp, METRIC_NAME};
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{walk_expr, ExprVisitor};
use regex::Regex;

/// One selector in a query: a metric name and the labels its `{...}` matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub(crate) metric: String,
    pub(crate) labels: Vec<String>,
}

/// A Grafana variable reference: `$name`, `${name}` or `${name:format}`.
static VARIABLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")
        .expect("valid regex")
});

/// What a variable becomes before parsing: Grafana fills them in, Prometheus never sees them.
/// The dashboards use variables as range windows (`[$__rate_interval]`) and inside label
/// values, and a duration is valid in both places.
const VARIABLE_STAND_IN: &str = "1m";

/// The selectors of `expr`, in order. An error names what could not be read.
pub(crate) fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let promql = VARIABLE.replace_all(expr, VARIABLE_STAND_IN);
    let ast = promql_parser::parser::parse(&promql).map_err(|e| format!("`{expr}`: {e}"))?;
    let mut collect = Collect(Vec::new());
    walk_expr(&mut collect, &ast).map_err(|e| format!("{e}, in `{expr}`"))?;
    Ok(collect.0)
}

/// Gathers every selector, range selectors' included, as the walk meets them.
struct Collect(Vec<Selector>);

impl ExprVisitor for Collect {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        match expr {
            Expr::VectorSelector(vs) => self.0.push(selector(vs)?),
            Expr::MatrixSelector(ms) => self.0.push(selector(&ms.vs)?),
            _ => {}
        }
        Ok(true)
    }
}

fn selector(vs: &VectorSelector) -> Result<Selector, String> {
    let matchers = vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten());
    // `{__name__="x"}` names its metric too; `{__name__=~"x.*"}` names none that can be checked.
    let metric = vs.name.clone().or_else(|| {
        matchers
            .clone()
            .find(|m| m.name == METRIC_NAME && m.op == MatchOp::Equal)
            .map(|m| m.value.clone())
    });
    let metric = metric.ok_or("a selector without a metric name cannot be checked")?;
    let labels = matchers
        .filter(|m| m.name != METRIC_NAME)
        .map(|m| m.name.clone())
        .collect();
    Ok(Selector { metric, labels })
}

/// The Grafana variables `expr` refers to (`$name`, `${name}`, `${name:format}`), in strings too.
pub(crate) fn variables(expr: &str) -> BTreeSet<String> {
    VARIABLE
        .captures_iter(expr)
        .filter_map(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| m.as_str().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(expr: &str) -> Vec<String> {
        selectors(expr)
            .unwrap()
            .into_iter()
            .map(|s| s.metric)
            .collect()
    }

    #[test]
    fn finds_metrics_and_skips_functions_grouping_and_windows() {
        let expr = r#"histogram_quantile(0.95, sum by (pipeline, le) (rate(warren_step_duration_seconds_bucket{pipeline=~"$pipeline", outcome!="x}"}[$__rate_interval])))"#;
        assert_eq!(
            selectors(expr).unwrap(),
            vec![Selector {
                metric: "warren_step_duration_seconds_bucket".into(),
                labels: vec!["pipeline".into(), "outcome".into()],
            }]
        );
        assert_eq!(
            metrics("process_resident_memory_bytes and on (job, instance) (a_metric or b_metric)"),
            ["process_resident_memory_bytes", "a_metric", "b_metric"]
        );
        assert_eq!(metrics("sum(x) without (shard) / 1e3 > bool 0.5"), ["x"]);
        assert_eq!(
            selectors(r#"{__name__="warren_x", pool=~"${pipeline:regex}"}"#).unwrap(),
            vec![Selector {
                metric: "warren_x".into(),
                labels: vec!["pool".into()],
            }]
        );
    }

    #[test]
    fn refuses_what_it_cannot_check() {
        assert!(selectors(r#"{__name__=~"warren_.*"}"#)
            .unwrap_err()
            .contains("without a metric name"));
        assert!(selectors("rat(warren_reconnects_total[5m])")
            .unwrap_err()
            .contains("rat"));
        assert!(selectors(r#"warren_x{pipeline=~"a"#).is_err());
        assert!(selectors("sum by pipeline (x)").is_err());
    }

    #[test]
    fn finds_variables_in_strings() {
        let vars =
            variables(r#"x{pool=~"($pipeline)(/.*)?", s="${shard:regex}"}[$__rate_interval]"#);
        assert_eq!(
            vars.into_iter().collect::<Vec<_>>(),
            ["__rate_interval", "pipeline", "shard"]
        );
    }
}
