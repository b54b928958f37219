//! [`Client`]: connect from a config, submit jobs, wait for results.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use warren_broker::depth::ready_messages;
use warren_broker::{Broker, Outgoing, PublishError, Publisher, StepRoute};
use warren_common::backoff::Backoff;
use warren_common::trace::TraceParent;
use warren_common::{now_ms, Config, Envelope, JobId, JobStatus, Priority, ResultEvent, TenantId};

use crate::error::{SubmitError, WaitError};
use crate::results::{ResultStream, Start};

/// How many publishes a bulk submit keeps in flight before it settles their confirms. Large
/// enough to keep the broker busy, small enough that a failure leaves a short list to redo.
const CONFIRM_WINDOW: usize = 1000;

/// After a failed result is found, how long the stream may stay quiet before the read counts as
/// caught up (a replay's later result would already have been delivered), and the most time
/// the catch-up takes on a stream too busy to go quiet.
const CATCH_UP_IDLE: Duration = Duration::from_millis(250);
const CATCH_UP_MAX: Duration = Duration::from_secs(2);

/// How far before a job's id-time a wait starts reading results, for clock skew between
/// machines.
const CLOCK_SKEW_MS: u64 = 10_000;

/// Where reading the results stream for job `id` starts (ms since the epoch).
fn job_reading_start(id: JobId) -> u64 {
    id.timestamp_ms().unwrap_or(0).saturating_sub(CLOCK_SKEW_MS)
}

/// One job to submit.
#[derive(Debug, Clone)]
pub struct Job {
    /// Made when the job is built, so a caller knows it before submitting.
    pub id: JobId,
    pub pipeline: String,
    pub tenant: String,
    pub priority: Priority,
    pub payload: Value,
    /// The caller's W3C trace context (say, of the web request that made the job): the job's
    /// steps join that trace. Without it, each job starts a trace of its own.
    pub traceparent: Option<TraceParent>,
}

impl Job {
    pub fn new(pipeline: impl Into<String>, tenant: impl Into<String>, payload: Value) -> Self {
        Self {
            id: JobId::new(),
            pipeline: pipeline.into(),
            tenant: tenant.into(),
            priority: Priority::Normal,
            payload,
            traceparent: None,
        }
    }

    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    pub fn traceparent(mut self, parent: TraceParent) -> Self {
        self.traceparent = Some(parent);
        self
    }
}

/// A connection to one warren namespace. Cheap to share behind an `Arc`; every call is `&self`.
#[derive(Debug)]
pub struct Client {
    config: Arc<Config>,
    broker: Broker,
    publisher: Publisher,
    tasks_exchange: String,
}

/// A validated job, ready to publish.
struct Prepared {
    id: JobId,
    routing_key: String,
    body: Vec<u8>,
    /// The step queue it goes to, and that queue's length bound.
    queue: String,
    max_queue_length: u32,
}

impl Client {
    pub async fn connect(config: Config) -> Result<Self, warren_broker::BrokerError> {
        let broker = Broker::connect(&config.broker).await?;
        let publisher = Publisher::new(&broker).await?;
        Ok(Self {
            tasks_exchange: broker.names().tasks_exchange(),
            config: Arc::new(config),
            broker,
            publisher,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub(crate) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub(crate) fn tasks_exchange(&self) -> &str {
        &self.tasks_exchange
    }

    /// Validates and publishes one job; returns its id once the broker has confirmed it.
    pub async fn submit(&self, job: Job) -> Result<JobId, SubmitError> {
        let prepared = self.prepare(job)?;
        let result = self.publisher.publish(self.outgoing(&prepared)).await;
        if let Err(cause) = result {
            return Err(self.publish_error(&prepared, cause, 0).await);
        }
        Ok(prepared.id)
    }

    /// Validates every job first (nothing is published if one is invalid), then publishes them
    /// with up to [`CONFIRM_WINDOW`] confirms in flight. Returns the ids in input order.
    pub async fn submit_many(
        &self,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Result<Vec<JobId>, SubmitError> {
        let prepared = jobs
            .into_iter()
            .enumerate()
            .map(|(index, job)| {
                self.prepare(job).map_err(|e| SubmitError::InBatch {
                    index,
                    cause: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut confirmed = 0;
        for window in prepared.chunks(CONFIRM_WINDOW) {
            let mut pending = Vec::with_capacity(window.len());
            for job in window {
                match self.publisher.start(self.outgoing(job)).await {
                    Ok(confirm) => pending.push((job, confirm)),
                    Err(cause) => return Err(self.publish_error(job, cause, confirmed).await),
                }
            }
            for (job, confirm) in pending {
                if let Err(cause) = confirm.wait().await {
                    return Err(self.publish_error(job, cause, confirmed).await);
                }
                confirmed += 1;
            }
        }
        Ok(prepared.into_iter().map(|p| p.id).collect())
    }

    /// Waits up to `timeout` for the job's result event (success or failure). Works for jobs
    /// that finished before the call, too: results are read from the results stream. A job
    /// that failed and was then replayed from the dead-letter queue has a later event; the
    /// newest one in the stream wins. A lost connection is reopened with backoff, and reading
    /// starts again from the job's time. Reading from the job's time means reading every
    /// result since then; for jobs you are about to submit, [`Client::results_from_now`]
    /// opened before the submit reads only what comes after.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<ResultEvent, WaitError> {
        let since = job_reading_start(id);
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || WaitError::Timeout {
            job_id: id.to_string(),
            timeout,
        };
        let mut backoff = Backoff::reconnect();
        loop {
            match tokio::time::timeout_at(deadline, self.find_result(id, since, deadline)).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(Some(event))) => return Ok(event),
                Ok(Err(WaitError::Broker(e))) if !e.is_connection_lost() => {
                    return Err(WaitError::Broker(e))
                }
                Ok(Err(e @ WaitError::Timeout { .. })) => return Err(e),
                // The stream ended or the connection went away: read again.
                Ok(Ok(None)) | Ok(Err(WaitError::Broker(_))) => {
                    tokio::time::sleep(backoff.next_delay()).await
                }
            }
        }
    }

    /// Reads the results stream from `since_ms` until the job's result. A success is final;
    /// after a failure the read goes on until it has caught up with the stream (an event
    /// newer than the moment the failure was found, [`CATCH_UP_IDLE`] without any event, or
    /// [`CATCH_UP_MAX`]), and a later event for the job replaces it.
    async fn find_result(
        &self,
        id: JobId,
        since_ms: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Option<ResultEvent>, WaitError> {
        let mut stream = self.results(since_ms).await?;
        let mut found: Option<(ResultEvent, u64, tokio::time::Instant)> = None;
        let outcome = loop {
            let next = match &found {
                None => stream.next().await,
                Some((_, _, give_up)) => {
                    let idle = (tokio::time::Instant::now() + CATCH_UP_IDLE).min(*give_up);
                    match tokio::time::timeout_at(idle, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => break Ok(found.take().map(|f| f.0)),
                    }
                }
            };
            let event = match next {
                Ok(Some(event)) => event,
                // A closed stream or a lost connection after a failure was found: report it.
                Ok(None) | Err(_) if found.is_some() => break Ok(found.take().map(|f| f.0)),
                Ok(None) => break Ok(None),
                Err(e) => break Err(e.into()),
            };
            if event.job_id == id {
                if event.status == JobStatus::Succeeded {
                    break Ok(Some(event));
                }
                let found_at = now_ms();
                // Leave room before the caller's deadline to report the failure.
                let give_up = (tokio::time::Instant::now() + CATCH_UP_MAX)
                    .min(deadline - Duration::from_millis(50));
                found = Some((event, found_at, give_up));
            } else if let Some((_, found_at, _)) = &found {
                if event.finished_at > *found_at {
                    break Ok(found.take().map(|f| f.0));
                }
            }
        };
        stream.close().await;
        outcome
    }

    /// Every result event published since `since_ms` (ms since the epoch; results a little
    /// older may come too), then new ones as they arrive.
    pub async fn results(&self, since_ms: u64) -> Result<ResultStream, WaitError> {
        Ok(ResultStream::open(&self.broker, Start::At(since_ms)).await?)
    }

    /// Every result event from a little before `id` was submitted (its id's time, less a
    /// margin for clock skew between machines), then new ones: where [`Client::wait`] reads.
    pub async fn results_since_job(&self, id: JobId) -> Result<ResultStream, WaitError> {
        self.results(job_reading_start(id)).await
    }

    /// Result events published from now on. Open it before submitting the jobs you will wait
    /// for: their results cannot come before it, and the reader does not first read through
    /// every result of the last seconds, which under another tenant's flood is tens of
    /// thousands of events. (`wait` works after the fact, so it starts earlier.)
    pub async fn results_from_now(&self) -> Result<ResultStream, WaitError> {
        Ok(ResultStream::open(&self.broker, Start::Next).await?)
    }

    /// Closes the connection cleanly. Dropping a client without it is safe too.
    pub async fn close(self) {
        self.broker.close().await;
    }

    /// A negative confirm from a queue at its length bound is a full backlog; tell the caller
    /// so, rather than a bare "refused".
    async fn publish_error(
        &self,
        job: &Prepared,
        cause: PublishError,
        confirmed: usize,
    ) -> SubmitError {
        if matches!(cause, PublishError::Nacked { .. }) {
            let depth = ready_messages(&self.broker, &job.queue).await;
            if matches!(depth, Ok(Some(n)) if n >= job.max_queue_length) {
                return SubmitError::BacklogFull {
                    queue: job.queue.clone(),
                    max: job.max_queue_length,
                    confirmed,
                };
            }
        }
        SubmitError::Publish { confirmed, cause }
    }

    fn prepare(&self, job: Job) -> Result<Prepared, SubmitError> {
        let tenant =
            TenantId::parse(job.tenant).map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let pipeline = self
            .config
            .pipeline(&job.pipeline)
            .ok_or_else(|| SubmitError::UnknownPipeline(job.pipeline.clone()))?;
        let first = &pipeline.first_step().name;
        let route = StepRoute::for_tenant(pipeline, first, job.priority, tenant.as_str());
        let mut envelope = Envelope::new_job(
            job.id,
            tenant,
            &pipeline.name,
            first,
            job.priority,
            job.payload,
        );
        if let Some(parent) = job.traceparent {
            envelope.traceparent = Some(parent.child().to_string());
        }
        let body = envelope
            .encode_within(self.config.broker.max_payload_bytes)
            .map_err(|e| SubmitError::PayloadTooLarge {
                size: e.size,
                max: e.max,
            })?;
        Ok(Prepared {
            id: job.id,
            routing_key: route.routing_key(),
            body,
            queue: route.queue(self.broker.names()),
            max_queue_length: pipeline.max_queue_length,
        })
    }

    fn outgoing<'a>(&'a self, job: &'a Prepared) -> Outgoing<'a> {
        Outgoing::persistent(
            &self.tasks_exchange,
            &job.routing_key,
            &job.body,
            &job.id.to_string(),
        )
    }
}
