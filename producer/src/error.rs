//! Errors of the producer SDK.

use warren_broker::{BrokerError, PublishError};

/// A job that was not submitted. Nothing was published unless the variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown pipeline {0:?}: it is not in the config")]
    UnknownPipeline(String),
    #[error("payload is {size} bytes (MessagePack), more than max_payload_bytes = {max}")]
    PayloadTooLarge { size: usize, max: usize },
    /// The tenant's shard holds `max_queue_length` jobs already; nothing was stored. Retry
    /// later, or raise `max_queue_length` (or add workers).
    #[error("backlog full: queue {queue} holds its max_queue_length = {max} jobs; retry later{}", if *confirmed > 0 { format!(" ({confirmed} jobs of the batch were confirmed before this)") } else { String::new() })]
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
    #[error("{cause}{}", if *confirmed > 0 { format!(" ({confirmed} jobs of the batch were confirmed before this)") } else { String::new() })]
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

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    #[error("no result for job {job_id} within {timeout:?}")]
    Timeout {
        job_id: String,
        timeout: std::time::Duration,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}
