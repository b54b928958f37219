//! The [`StepHandler`] trait: what a Rust step implements. Typed input and output (serde), so a
//! handler never touches JSON unless it wants to (take and return `serde_json::Value`).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;
use warren_common::trace::TraceParent;
use warren_common::{JobId, Priority};

/// A failed attempt, saying what should happen next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Worth another attempt (up to the step's `max_attempts`): a timeout, a flaky dependency.
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed as is (bad input): the job fails now. Like exit 65 of a command step.
    #[error("{0}")]
    Permanent(String),
}

impl StepError {
    pub fn retryable(reason: impl fmt::Display) -> Self {
        Self::Retryable(reason.to_string())
    }

    pub fn permanent(reason: impl fmt::Display) -> Self {
        Self::Permanent(reason.to_string())
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// Who and what an attempt is for.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub job_id: JobId,
    pub tenant: String,
    pub pipeline: String,
    pub step: String,
    /// 1 on the first try.
    pub attempt: u32,
    pub priority: Priority,
    /// The job's W3C trace context, for a handler that reports spans of its own.
    pub trace: Option<TraceParent>,
}

impl StepContext {
    /// `<job_id>/<step>`: steps run at least once, so side effects should be keyed by this.
    pub fn idempotency_key(&self) -> String {
        self.job_id.idempotency_key(&self.step)
    }
}

/// A Rust step, registered on the worker builder under the name the config's `handler = ".."`
/// uses. A panic inside `run` counts as a retryable failure, not a dead worker.
pub trait StepHandler: Send + Sync + 'static {
    type Input: DeserializeOwned + Send + 'static;
    type Output: Serialize + Send + 'static;

    fn run(
        &self,
        input: Self::Input,
        ctx: StepContext,
    ) -> impl Future<Output = Result<Self::Output, StepError>> + Send;
}

/// A plain async function as a handler: `handler_fn(|input: MyInput, ctx| async move { .. })`.
pub fn handler_fn<I, O, F, Fut>(f: F) -> FnHandler<I, O, F>
where
    F: Fn(I, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send,
{
    FnHandler {
        f,
        _types: PhantomData,
    }
}

/// See [`handler_fn`].
pub struct FnHandler<I, O, F> {
    f: F,
    _types: PhantomData<fn(I) -> O>,
}

impl<I, O, F> fmt::Debug for FnHandler<I, O, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

impl<I, O, F, Fut> StepHandler for FnHandler<I, O, F>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send,
{
    type Input = I;
    type Output = O;

    fn run(&self, input: I, ctx: StepContext) -> impl Future<Output = Result<O, StepError>> + Send {
        (self.f)(input, ctx)
    }
}
