//! End-to-end tests against the real RabbitMQ. Each test makes its own namespace (deleted when it
//! ends), so they run in parallel.

mod bad_input;
mod caps;
mod confirm;
mod connect;
mod dlq;
mod fairness;
mod fanout;
mod flow;
mod history;
mod isolation;
mod kill;
mod logs;
mod metrics;
mod results_check;
mod retry;
mod schedules;
mod security;
mod supervisor;
mod topology;
mod wire_format;

/// A 3-step pipeline of the test worker's `work` handler.
pub(crate) const THREE_STEPS: &str = r#"
[[pipelines]]
name = "chain"
shards = 4

[[pipelines.steps]]
name = "a"
handler = "work"
concurrency = 4

[[pipelines.steps]]
name = "b"
handler = "work"
concurrency = 4

[[pipelines.steps]]
name = "c"
handler = "work"
concurrency = 4
"#;
