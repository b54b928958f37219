//! What runs a step this worker serves: a Rust handler, inline under `catch_unwind` and the
//! step's timeout, or a command (see `command.rs`).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use warren_common::config::{PipelineConfig, StepConfig, StepKind};

use crate::command::CommandSpec;
use crate::handler::{StepContext, StepError};
use crate::registry::{ErasedHandler, Registry};

/// A step this worker serves, with what runs it.
pub(crate) struct ServedStep {
    pub(crate) pipeline: PipelineConfig,
    pub(crate) step: StepConfig,
    pub(crate) runner: Runner,
}

impl ServedStep {
    /// `step` of `pipeline`, run by its command or by the handler its config names; the
    /// handler's name when `registry` does not have it.
    pub(crate) fn resolve<'a>(
        pipeline: &PipelineConfig,
        step: &'a StepConfig,
        registry: &Registry,
    ) -> Result<Self, &'a str> {
        let runner = match &step.kind {
            StepKind::Command(argv) => Runner::Command(CommandSpec {
                argv: argv.clone(),
                pass_env: step.pass_env.clone(),
            }),
            StepKind::Handler(name) => Runner::Handler(registry.get(name).ok_or(name.as_str())?),
        };
        Ok(Self {
            pipeline: pipeline.clone(),
            step: step.clone(),
            runner,
        })
    }

    /// `pipeline/step`, for logs.
    pub(crate) fn label(&self) -> String {
        format!("{}/{}", self.pipeline.name, self.step.name)
    }
}

/// What runs a step.
pub(crate) enum Runner {
    Handler(ErasedHandler),
    Command(CommandSpec),
}

impl Runner {
    /// One attempt. A panic or a timeout is a retryable failure.
    pub(crate) async fn run(
        &self,
        input: Value,
        ctx: StepContext,
        timeout: Duration,
    ) -> Result<Value, StepError> {
        match self {
            Runner::Command(command) => command.run(&input, &ctx, timeout).await,
            Runner::Handler(handler) => {
                // Run inline (no task per step): a panic is caught here, and a timeout drops
                // the future, which cancels the handler at its next await.
                let attempt = AssertUnwindSafe(handler(input, ctx)).catch_unwind();
                match tokio::time::timeout(timeout, attempt).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(panic)) => Err(StepError::retryable(format!(
                        "handler panicked: {}",
                        panic_text(panic.as_ref())
                    ))),
                    Err(_) => Err(StepError::retryable(format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    ))),
                }
            }
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".to_string())
}
