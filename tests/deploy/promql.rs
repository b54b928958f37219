//! Just enough PromQL reading to find which metrics (and which label matchers on them) a
//! dashboard query uses. Not a parser: it tokenizes and recognises functions, aggregations,
//! grouping clauses and selectors, which is all Grafana dashboard queries here need. Anything it
//! cannot place is reported, so an unusual query fails the test instead of passing unchecked.

use std::collections::BTreeSet;

/// One selector in a query: a metric name and the labels its `{...}` matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    pub(crate) metric: String,
    pub(crate) labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
}

/// Aggregation operators: may be followed by `by`/`without` before their `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// PromQL functions (Prometheus 2.x/3.x).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Clauses followed by a parenthesised list of label names (not metrics).
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Binary set operators and modifiers that stand alone.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];

fn tokenize(expr: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            // A string literal (label value or function argument), escapes included.
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            if i >= chars.len() {
                return Err(format!("unterminated string in `{expr}`"));
            }
            i += 1;
            tokens.push(Token::Str);
        } else if c == '[' {
            // A range or subquery window (`[5m]`, `[$__rate_interval]`, `[1h:1m]`): no names.
            match chars[i..].iter().position(|&x| x == ']') {
                Some(n) => i += n + 1,
                None => return Err(format!("unclosed `[` in `{expr}`")),
            }
        } else if c == '$' {
            // A Grafana variable outside a string, e.g. a bare `$__range` or `${window}`.
            i += 1;
            if chars.get(i) == Some(&'{') {
                match chars[i..].iter().position(|&x| x == '}') {
                    Some(n) => i += n + 1,
                    None => return Err(format!("unclosed `${{` in `{expr}`")),
                }
            } else {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // Numbers and durations (`0.95`, `1e3`, `5m`): never names.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    Ok(tokens)
}

/// The selectors of `expr`, in order. An error names what could not be read.
pub(crate) fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let tokens = tokenize(expr)?;
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let next_is_paren = tokens.get(i + 1) == Some(&Token::Punct('('));
        match &tokens[i] {
            Token::Ident(word) if GROUPING.contains(&word.as_str()) => {
                // `by (a, b)`: skip the label list (an empty one too, as in `group_left ()`).
                if !next_is_paren {
                    return Err(format!("`{word}` without a label list in `{expr}`"));
                }
                let close = tokens[i..]
                    .iter()
                    .position(|t| *t == Token::Punct(')'))
                    .ok_or_else(|| format!("unclosed `{word} (` in `{expr}`"))?;
                i += close + 1;
            }
            Token::Ident(word) if AGGREGATIONS.contains(&word.as_str()) => i += 1,
            Token::Ident(word) if KEYWORDS.contains(&word.as_str()) => i += 1,
            Token::Ident(word) if next_is_paren => {
                if !FUNCTIONS.contains(&word.as_str()) {
                    return Err(format!("unknown PromQL function `{word}` in `{expr}`"));
                }
                i += 1;
            }
            Token::Ident(metric) => {
                let mut labels = Vec::new();
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('{')) {
                    i += 1;
                    loop {
                        match tokens.get(i) {
                            Some(Token::Punct('}')) => {
                                i += 1;
                                break;
                            }
                            Some(Token::Punct(',')) => i += 1,
                            Some(Token::Ident(label)) => {
                                labels.push(label.clone());
                                i += 1;
                                // The operator (`=`, `!=`, `=~`, `!~`), then the value string.
                                while matches!(tokens.get(i), Some(Token::Punct('=' | '!' | '~'))) {
                                    i += 1;
                                }
                                if tokens.get(i) != Some(&Token::Str) {
                                    return Err(format!(
                                        "matcher on `{label}` of `{metric}` has no quoted value in `{expr}`"
                                    ));
                                }
                                i += 1;
                            }
                            _ => {
                                return Err(format!(
                                    "cannot read the matchers of `{metric}` in `{expr}`"
                                ))
                            }
                        }
                    }
                }
                found.push(Selector {
                    metric: metric.clone(),
                    labels,
                });
            }
            Token::Punct('{') => {
                return Err(format!(
                    "a selector without a metric name cannot be checked, in `{expr}`"
                ))
            }
            _ => i += 1,
        }
    }
    Ok(found)
}

/// The Grafana variables `expr` refers to (`$name`, `${name}`, `${name:format}`), in strings too.
pub(crate) fn variables(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)").expect("valid regex");
    re.captures_iter(expr).map(|c| c[1].to_string()).collect()
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
    }

    #[test]
    fn refuses_what_it_cannot_check() {
        assert!(selectors(r#"{__name__=~"warren_.*"}"#).is_err());
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
