//! [`WorkerBuilder`]: handlers and options in, a [`Worker`] out, checked against the config
//! before anything connects; and [`WorkerError`], what can stop a worker.

use std::sync::Arc;
use std::time::Duration;

use warren_broker::{BrokerError, TopologyError};
use warren_common::Config;

use crate::handler::StepHandler;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::runtime::{Worker, DEFAULT_SHUTDOWN_GRACE};
use crate::step::ServedStep;

/// Why a worker cannot start, or stopped. Every variant but [`WorkerError::Broker`] is about
/// the config or the handlers, and retrying will not help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Two handlers were registered under one name.
    #[error("handler {0:?} is registered twice")]
    DuplicateHandler(String),
    /// A step's `handler = ".."` names no registered handler.
    #[error("pipelines.{pipeline}.steps.{step}.handler = {handler:?} is not registered in this worker binary (registered: {registered:?})")]
    UnregisteredHandler {
        pipeline: String,
        step: String,
        handler: String,
        registered: Vec<String>,
    },
    /// The pipeline and step filters match no step of the config.
    #[error("nothing to serve: no step matches pipeline {:?} and step {:?} in the config", any(.pipeline), any(.step))]
    NothingToServe {
        pipeline: Option<String>,
        step: Option<String>,
    },
    /// The broker has a queue or exchange of this config with other arguments.
    #[error(transparent)]
    TopologyConflict(TopologyError),
    /// The broker cannot be reached, or refused what the worker asked.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl WorkerError {
    /// The config or the handlers are at fault (a usage error), not the broker.
    pub fn is_setup(&self) -> bool {
        !matches!(self, WorkerError::Broker(_))
    }
}

/// A filter's value for an error message: its name, or `(any)`.
fn any(filter: &Option<String>) -> &str {
    filter.as_deref().unwrap_or("(any)")
}

/// Collects handlers and options; [`WorkerBuilder::build`] checks them against the config.
#[derive(Debug)]
pub struct WorkerBuilder {
    config: Config,
    registry: Registry,
    duplicates: Vec<String>,
    pipeline: Option<String>,
    step: Option<String>,
    grace: Duration,
}

impl WorkerBuilder {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            registry: Registry::default(),
            duplicates: Vec::new(),
            pipeline: None,
            step: None,
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Registers a Rust handler under the name the config's `handler = ".."` uses.
    pub fn handler<H: StepHandler>(mut self, name: &str, handler: H) -> Self {
        if let Err(name) = self.registry.insert(name, handler) {
            self.duplicates.push(name);
        }
        self
    }

    /// Serve only this pipeline (default: all).
    pub fn pipeline(mut self, name: Option<String>) -> Self {
        self.pipeline = name;
        self
    }

    /// Serve only steps of this name (default: all).
    pub fn step(mut self, name: Option<String>) -> Self {
        self.step = name;
        self
    }

    /// How long running steps may take to finish after shutdown is asked for.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The worker, once every step it is to serve has something to run it.
    pub fn build(self) -> Result<Worker, WorkerError> {
        if let Some(name) = self.duplicates.first() {
            return Err(WorkerError::DuplicateHandler(name.clone()));
        }
        let mut served = Vec::new();
        for pipeline in &self.config.pipelines {
            if self.pipeline.as_ref().is_some_and(|p| p != &pipeline.name) {
                continue;
            }
            for step in &pipeline.steps {
                if self.step.as_ref().is_some_and(|s| s != &step.name) {
                    continue;
                }
                let resolved = ServedStep::resolve(pipeline, step, &self.registry);
                let step = resolved.map_err(|handler| WorkerError::UnregisteredHandler {
                    pipeline: pipeline.name.clone(),
                    step: step.name.clone(),
                    handler: handler.to_string(),
                    registered: self.registry.names().map(str::to_string).collect(),
                })?;
                served.push(Arc::new(step));
            }
        }
        if served.is_empty() {
            return Err(WorkerError::NothingToServe {
                pipeline: self.pipeline,
                step: self.step,
            });
        }
        Ok(Worker::new(
            Arc::new(self.config),
            served,
            self.grace,
            Arc::new(Metrics::new()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use serde_json::Value;

    use super::*;
    use crate::handler::{handler_fn, StepContext, StepError};

    fn config() -> Config {
        let toml = r#"
[[pipelines]]
name = "p"
[[pipelines.steps]]
name = "a"
handler = "work"
[[pipelines.steps]]
name = "b"
command = ["true"]
"#;
        Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap()
    }

    fn echo() -> impl StepHandler {
        handler_fn(|v: Value, _: StepContext| async move { Ok::<_, StepError>(v) })
    }

    #[test]
    fn builds_what_the_filters_select() {
        let worker = Worker::builder(config())
            .handler("work", echo())
            .build()
            .unwrap();
        assert_eq!(format!("{worker:?}"), r#"Worker { steps: ["p/a", "p/b"] }"#);
        // A command step needs no handler.
        let worker = Worker::builder(config())
            .step(Some("b".into()))
            .build()
            .unwrap();
        assert_eq!(format!("{worker:?}"), r#"Worker { steps: ["p/b"] }"#);
    }

    #[test]
    fn setup_errors_name_what_is_wrong() {
        let twice = Worker::builder(config())
            .handler("work", echo())
            .handler("work", echo())
            .build()
            .unwrap_err();
        assert!(matches!(&twice, WorkerError::DuplicateHandler(name) if name == "work"));
        assert_eq!(twice.to_string(), r#"handler "work" is registered twice"#);

        let missing = Worker::builder(config())
            .handler("other", echo())
            .build()
            .unwrap_err();
        assert_eq!(
            missing.to_string(),
            r#"pipelines.p.steps.a.handler = "work" is not registered in this worker binary (registered: ["other"])"#
        );

        let nothing = Worker::builder(config())
            .pipeline(Some("q".into()))
            .build()
            .unwrap_err();
        assert_eq!(
            nothing.to_string(),
            r#"nothing to serve: no step matches pipeline "q" and step "(any)" in the config"#
        );
        assert!(twice.is_setup() && missing.is_setup() && nothing.is_setup());
    }
}
