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
    #[error("payload is {size} bytes of JSON, more than max_payload_bytes = {max}")]
    PayloadTooLarge { size: usize, max: usize },
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
