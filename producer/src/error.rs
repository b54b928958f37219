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
    #[error("job {index} of the batch: {source}")]
    InBatch {
        index: usize,
        #[source]
        source: Box<SubmitError>,
    },
    /// The broker did not confirm. In a batch, `confirmed` jobs before it were confirmed.
    #[error("{source} ({confirmed} jobs of the batch were confirmed before this)")]
    Publish {
        confirmed: usize,
        #[source]
        source: PublishError,
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
