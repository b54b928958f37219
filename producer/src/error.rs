//! Errors of the producer SDK.

use warren_broker::{BrokerError, PublishError};
use warren_common::{ConfigError, JobId, Priority};

/// A job that was not submitted. Nothing was published unless the variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown pipeline {0:?}: it is not in the config")]
    UnknownPipeline(String),
    /// The pipeline has no queues for the job's priority (its `priorities` key leaves it out).
    #[error("{}", no_such_priority(pipeline, *priority, priorities))]
    PriorityNotDeclared {
        pipeline: String,
        priority: Priority,
        priorities: Vec<Priority>,
    },
    #[error("payload is {size} bytes (MessagePack), more than max_payload_bytes = {max}")]
    PayloadTooLarge { size: usize, max: usize },
    /// The tenant's shard holds `max_queue_length` jobs already; nothing was stored. Retry
    /// later, or raise `max_queue_length` (or add workers).
    #[error("backlog full: queue {queue} holds its max_queue_length = {max} jobs; retry later{}", confirmed_before(*confirmed))]
    BacklogFull {
        queue: String,
        max: u32,
        confirmed: usize,
    },
    #[error("job {index} of the batch: {cause}")]
    InBatch {
        index: usize,
        cause: Box<SubmitError>,
    },
    /// The broker did not take the job. In a batch, the first `confirmed` jobs were confirmed.
    #[error("{cause}{}", confirmed_before(*confirmed))]
    Publish {
        confirmed: usize,
        cause: PublishError,
    },
}

impl SubmitError {
    /// True when retrying later may work: a full backlog, a broker that refused or did not
    /// confirm, a lost connection.
    pub fn is_retryable(&self) -> bool {
        match self {
            SubmitError::BacklogFull { .. } => true,
            SubmitError::Publish { cause, .. } => !matches!(cause, PublishError::Unroutable { .. }),
            SubmitError::InBatch { cause, .. } => cause.is_retryable(),
            _ => false,
        }
    }
}

/// Why a job's priority cannot be submitted or replayed to `pipeline`.
pub(crate) fn no_such_priority(
    pipeline: &str,
    priority: Priority,
    priorities: &[Priority],
) -> String {
    let list: Vec<String> = priorities.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "pipeline {pipeline:?} has no {priority} priority: it declares priorities = [{}]",
        list.join(", ")
    )
}

/// The tail of a batch error: how many jobs before it the broker confirmed, when any.
fn confirmed_before(confirmed: usize) -> String {
    if confirmed > 0 {
        format!(" ({confirmed} jobs of the batch were confirmed before this)")
    } else {
        String::new()
    }
}

/// A wait for results that ended without them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The deadline passed; `job_id` (one of them, when waiting for several) had no result.
    #[error("no result for job {job_id} within {timeout:?}")]
    Timeout {
        job_id: JobId,
        timeout: std::time::Duration,
    },
    /// The broker closed the results stream (say, the stream was deleted).
    #[error("the results stream was closed")]
    StreamClosed,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// [`crate::Client::from_env`] found no usable config, or could not reach the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_say_how_many_jobs_were_confirmed_before_them() {
        let full = |confirmed| SubmitError::BacklogFull {
            queue: "q".into(),
            max: 10,
            confirmed,
        };
        assert_eq!(
            full(0).to_string(),
            "backlog full: queue q holds its max_queue_length = 10 jobs; retry later"
        );
        assert!(full(3)
            .to_string()
            .ends_with("retry later (3 jobs of the batch were confirmed before this)"));
        let nacked = |confirmed| SubmitError::Publish {
            confirmed,
            cause: PublishError::Nacked {
                routing_key: "k".into(),
            },
        };
        assert!(!nacked(0).to_string().contains("confirmed before"));
        assert!(nacked(2)
            .to_string()
            .ends_with("(2 jobs of the batch were confirmed before this)"));
    }

    #[test]
    fn only_refusals_that_may_pass_later_are_retryable() {
        let unroutable = SubmitError::Publish {
            confirmed: 0,
            cause: PublishError::Unroutable {
                exchange: "x".into(),
                routing_key: "k".into(),
            },
        };
        let full = SubmitError::BacklogFull {
            queue: "q".into(),
            max: 1,
            confirmed: 0,
        };
        assert!(!unroutable.is_retryable());
        assert!(full.is_retryable());
        assert!(SubmitError::InBatch {
            index: 1,
            cause: Box::new(full)
        }
        .is_retryable());
        assert!(!SubmitError::UnknownPipeline("p".into()).is_retryable());
        let undeclared = SubmitError::PriorityNotDeclared {
            pipeline: "p".into(),
            priority: Priority::High,
            priorities: vec![Priority::Normal, Priority::Low],
        };
        assert!(!undeclared.is_retryable());
        assert_eq!(
            undeclared.to_string(),
            "pipeline \"p\" has no high priority: it declares priorities = [\"normal\", \"low\"]"
        );
    }
}
