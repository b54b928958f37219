//! Every environment variable warren reads, and an injectable lookup so tests never touch the
//! real process environment.

use std::collections::HashMap;

/// Path of the config file when `--config` is not given.
pub const ENV_WARREN_CONFIG: &str = "WARREN_CONFIG";
/// Overrides `[broker] url`.
pub const ENV_WARREN_AMQP_URL: &str = "WARREN_AMQP_URL";
/// Overrides `[broker] namespace`.
pub const ENV_WARREN_NAMESPACE: &str = "WARREN_NAMESPACE";
/// Overrides `[broker] management_url`.
pub const ENV_WARREN_MANAGEMENT_URL: &str = "WARREN_MANAGEMENT_URL";
/// Log filter, in `tracing_subscriber::EnvFilter` syntax.
pub const ENV_WARREN_LOG: &str = "WARREN_LOG";
/// A worker's `--metrics-addr` (the supervisor sets it for each worker it starts).
pub const ENV_WARREN_METRICS_ADDR: &str = "WARREN_METRICS_ADDR";
/// The pid of the supervisor that started this worker: the worker drains once it is gone.
pub const ENV_WARREN_SUPERVISOR_PID: &str = "WARREN_SUPERVISOR_PID";

// What a command step sees (DESIGN.md, contract 2).
pub const ENV_WARREN_JOB_ID: &str = "WARREN_JOB_ID";
pub const ENV_WARREN_TENANT: &str = "WARREN_TENANT";
pub const ENV_WARREN_PIPELINE: &str = "WARREN_PIPELINE";
pub const ENV_WARREN_STEP: &str = "WARREN_STEP";
pub const ENV_WARREN_ATTEMPT: &str = "WARREN_ATTEMPT";
pub const ENV_WARREN_PRIORITY: &str = "WARREN_PRIORITY";
pub const ENV_WARREN_IDEMPOTENCY_KEY: &str = "WARREN_IDEMPOTENCY_KEY";

/// A source of environment variables.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}
