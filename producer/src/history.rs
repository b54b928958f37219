//! Reading the job history: [`Client::status`] (one job, with its fan-out parts) and
//! [`Client::jobs`] (the jobs of a time window that match a filter). Both read the history
//! stream from a time on up to its end at the call (`warren_broker::history::read`) and fold
//! the events (`warren_common::history`).

use std::time::Duration;

use warren_broker::history::{self, ReadError};
use warren_broker::BrokerError;
use warren_common::history::{fold_all, with_parts, Event, JobState, Status};
use warren_common::{now_ms, JobId};

use crate::Client;

/// Why the history could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    #[error("job history is off in this config; turn it on with `[history] enabled = true` in warren.toml, then restart the workers (they declare the stream {stream})")]
    Disabled { stream: String },
    #[error("the history stream {0} does not exist; run `warren topology apply` (or start a worker) with `[history] enabled = true`")]
    Missing(String),
    #[error("no job {0} in the history (unknown id, older than the history's retention, or written with history off)")]
    UnknownJob(JobId),
    #[error("{0} is not a job id made by warren (a UUID v7)")]
    NotV7(JobId),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Read(String),
}

impl From<ReadError> for HistoryError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Missing(stream) => HistoryError::Missing(stream),
            ReadError::Broker(e) => HistoryError::Broker(e),
            other => HistoryError::Read(other.to_string()),
        }
    }
}

/// Which jobs [`Client::jobs`] lists. Empty fields match everything.
#[derive(Debug, Clone)]
pub struct JobFilter {
    pub tenant: Option<String>,
    pub pipeline: Option<String>,
    pub status: Option<Status>,
    /// Jobs made (by their id's time) at most this long ago.
    pub since: Duration,
    /// At most this many, newest first.
    pub limit: usize,
}

impl Default for JobFilter {
    fn default() -> Self {
        Self {
            tenant: None,
            pipeline: None,
            status: None,
            since: Duration::from_secs(3600),
            limit: 100,
        }
    }
}

impl JobFilter {
    fn keeps_event(&self, e: &Event) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == e.tenant)
            && self.pipeline.as_ref().is_none_or(|p| *p == e.pipeline)
    }
}

impl Client {
    fn history_enabled(&self) -> Result<(), HistoryError> {
        match self.config().history.enabled {
            true => Ok(()),
            false => Err(HistoryError::Disabled {
                stream: self.broker().names().history_stream(),
            }),
        }
    }

    /// Where job `id` is and what happened to it, from the history stream. A fan-out parent's
    /// state counts its parts. Reads from a little before the job's id time (a UUID v7 holds
    /// it) to the stream's end now.
    pub async fn status(&self, id: JobId) -> Result<JobState, HistoryError> {
        self.history_enabled()?;
        let made = id.timestamp_ms().ok_or(HistoryError::NotV7(id))?;
        let events = history::read(self.broker(), made, |e| {
            e.job_id == id || e.parent == Some(id)
        })
        .await?;
        let mut states = fold_all(&events);
        let state = states.remove(&id).ok_or(HistoryError::UnknownJob(id))?;
        Ok(with_parts(state, states.values()))
    }

    /// The jobs made within `filter.since` that match it, newest first, at most
    /// `filter.limit`.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobState>, HistoryError> {
        self.history_enabled()?;
        let from = now_ms().saturating_sub(filter.since.as_millis() as u64);
        let events = history::read(self.broker(), from, |e| filter.keeps_event(e)).await?;
        let states = fold_all(&events);
        let mut jobs: Vec<JobState> = states
            .values()
            .filter(|s| s.created_at.unwrap_or(s.updated_at) >= from)
            .filter(|s| filter.status.is_none_or(|status| s.status == status))
            .cloned()
            .collect();
        // Ids are v7: newest first is highest first.
        jobs.sort_by_key(|job| std::cmp::Reverse(job.job_id));
        jobs.truncate(filter.limit);
        Ok(jobs
            .into_iter()
            .map(|job| with_parts(job, states.values()))
            .collect())
    }
}
