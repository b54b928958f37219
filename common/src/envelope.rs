//! The messages warren puts on the wire. Field-by-field documentation with a Python example is in
//! `docs/wire-format.md`; keep the two in step.
//!
//! Both kinds are MessagePack maps keyed by field name. Readers ignore fields they do not know, so
//! new optional fields can be added without a version bump; `v` changes only when an existing
//! field changes meaning.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fanout::PartOf;
use crate::trace::TraceParent;
use crate::{JobId, Priority, TenantId};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One step of one job, waiting in a step queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version, [`FORMAT_VERSION`].
    pub v: u32,
    pub job_id: JobId,
    pub tenant: TenantId,
    pub pipeline: String,
    /// The step this message asks a worker to run.
    pub step: String,
    #[serde(default)]
    pub priority: Priority,
    /// 1 on the first try of this step; grows by one on each retry.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The step's input: the job payload for the first step, else the previous step's output.
    #[serde(default)]
    pub input: Value,
    /// When the job was submitted (ms since the epoch).
    #[serde(default)]
    pub submitted_at: u64,
    /// When this message was published (ms since the epoch): queue wait starts here.
    #[serde(default)]
    pub published_at: u64,
    /// W3C trace context (`00-<trace id>-<parent span id>-<flags>`): every step of a job
    /// carries the same trace id. Optional; an invalid value is ignored, never an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Set on every step message of a job that is a part of a fan-out: the parent job, the
    /// part's index and the number of parts. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<PartOf>,
}

fn first_attempt() -> u32 {
    1
}

impl Envelope {
    /// The first step of a new job.
    pub fn new_job(
        job_id: JobId,
        tenant: TenantId,
        pipeline: &str,
        first_step: &str,
        priority: Priority,
        payload: Value,
    ) -> Self {
        let now = now_ms();
        Self {
            v: FORMAT_VERSION,
            job_id,
            tenant,
            pipeline: pipeline.to_string(),
            step: first_step.to_string(),
            priority,
            attempt: 1,
            input: payload,
            submitted_at: now,
            published_at: now,
            traceparent: Some(TraceParent::new_root().to_string()),
            part_of: None,
        }
    }

    /// The trace context, when the message carries a valid one.
    pub fn trace(&self) -> Option<TraceParent> {
        self.traceparent.as_deref()?.parse().ok()
    }

    /// The message for `next_step`, carrying this step's `output`.
    pub fn next(&self, next_step: &str, output: Value) -> Self {
        Self {
            step: next_step.to_string(),
            attempt: 1,
            input: output,
            published_at: now_ms(),
            // A message without one starts its trace here, so the rest of the job shares it.
            traceparent: Some(
                self.trace()
                    .map_or_else(TraceParent::new_root, |t| t.child())
                    .to_string(),
            ),
            ..self.clone()
        }
    }

    /// The message as bytes, unless its input is over `max` bytes of MessagePack (the measure
    /// `max_payload_bytes` limits; see [`Envelope::input_exceeds`]).
    pub fn encode_within(&self, max: usize) -> Result<Vec<u8>, Oversized> {
        let body = crate::codec::encode(self);
        match self.input_exceeds(body.len(), max) {
            Some(size) => Err(Oversized { size, max }),
            None => Ok(body),
        }
    }

    /// Size of `input` in MessagePack, when it is over `max`: the check for a message already
    /// encoded (a delivery). `body_len` is the size of the whole encoded envelope: the input is
    /// part of it, so the exact (and costlier) measure is only taken when the body alone is over
    /// `max`.
    pub fn input_exceeds(&self, body_len: usize, max: usize) -> Option<usize> {
        if body_len <= max {
            return None;
        }
        let size = rmp_serde::to_vec_named(&self.input).map_or(body_len, |v| v.len());
        (size > max).then_some(size)
    }

    /// The same step again, one attempt later.
    pub fn retry(&self) -> Self {
        Self {
            attempt: self.attempt + 1,
            published_at: now_ms(),
            ..self.clone()
        }
    }
}

/// A step input over `max_payload_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("input is {size} bytes, more than max_payload_bytes = {max}")]
pub struct Oversized {
    /// The input's size in MessagePack.
    pub size: usize,
    pub max: usize,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Succeeded,
    Failed,
}

impl JobStatus {
    /// The status as it is written on the wire (and in result routing keys).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }
}

/// Published to the events exchange when a job ends: after its last step succeeds, or when a step
/// fails for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub v: u32,
    pub job_id: JobId,
    pub tenant: TenantId,
    pub pipeline: String,
    #[serde(default)]
    pub priority: Priority,
    pub status: JobStatus,
    /// The last step's output (succeeded) or null (failed).
    #[serde(default)]
    pub output: Value,
    /// The step that produced the output, or the step that failed.
    pub step: String,
    /// Attempts used by that step.
    #[serde(default)]
    pub attempts: u32,
    /// Why the job failed; absent on success.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub submitted_at: u64,
    #[serde(default)]
    pub finished_at: u64,
    /// The fan-out the job is a part of, as on its step messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<PartOf>,
}

impl ResultEvent {
    pub fn succeeded(env: &Envelope, output: Value) -> Self {
        Self::from_envelope(env, JobStatus::Succeeded, output, None)
    }

    pub fn failed(env: &Envelope, error: String) -> Self {
        Self::from_envelope(env, JobStatus::Failed, Value::Null, Some(error))
    }

    fn from_envelope(
        env: &Envelope,
        status: JobStatus,
        output: Value,
        error: Option<String>,
    ) -> Self {
        Self {
            v: FORMAT_VERSION,
            job_id: env.job_id,
            tenant: env.tenant.clone(),
            pipeline: env.pipeline.clone(),
            priority: env.priority,
            status,
            output,
            step: env.step.clone(),
            attempts: env.attempt,
            error,
            submitted_at: env.submitted_at,
            finished_at: now_ms(),
            part_of: env.part_of,
        }
    }

    /// Submit-to-finish time in milliseconds.
    pub fn latency_ms(&self) -> u64 {
        self.finished_at.saturating_sub(self.submitted_at)
    }
}
