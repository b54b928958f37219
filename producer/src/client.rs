//! [`Client`]: connect from a config, submit jobs, wait for results.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use warren_broker::depth::ready_messages;
use warren_broker::{
    Broker, BrokerError, HistoryError as HistoryWriteError, HistoryWriter, HotMark, HotRouter,
    HotTenant, Lane, Outgoing, PublishError, Publisher,
};
use warren_common::backoff::Backoff;
use warren_common::env::ProcessEnv;
use warren_common::history::Event;
use warren_common::trace::TraceParent;
use warren_common::{now_ms, Config, Envelope, JobId, Priority, ResultEvent, TenantId};

use crate::error::{ConnectError, SubmitError, WaitError};
use crate::flood::Floods;
use crate::results::{ResultStream, Since, Waiting};

/// How many publishes a bulk submit keeps in flight before it settles their confirms. Large
/// enough to keep the broker busy, small enough that a failure leaves a short list to redo.
pub const CONFIRM_WINDOW: usize = 1000;

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
    /// Shared with the task that publishes a [`Client::submit_many`] batch.
    publisher: Arc<Publisher>,
    tasks_exchange: String,
    /// Hot tenants, read from the control stream: their jobs take a hot lane.
    router: HotRouter,
    /// This producer's own submits per tenant, to see a flood coming.
    floods: Mutex<Floods>,
    /// No mark is tried before this time (ms) after one could not be published, so a missing
    /// control stream costs one warning and one round trip per pause, not per submit.
    marks_paused_until: AtomicU64,
    /// Writes "submitted" (and "replayed") history events, when `[history]` is on.
    history: Option<HistoryWriter>,
}

/// How long a producer stops marking after a mark could not be published.
const MARK_RETRY_PAUSE_MS: u64 = 10_000;

/// A validated job, ready to publish.
struct Prepared {
    id: JobId,
    routing_key: String,
    body: Vec<u8>,
    /// The length bound of the step queue it goes to (that queue's name is only needed when a
    /// publish is refused, so it is made then, from the routing key).
    max_queue_length: u32,
    /// Its "submitted" history event, written once the publish is confirmed.
    submitted: Event,
}

impl Client {
    pub async fn connect(config: Config) -> Result<Self, BrokerError> {
        let broker = Broker::connect(&config.broker).await?;
        let publisher = Publisher::new(&broker).await?;
        Ok(Self {
            tasks_exchange: broker.names().tasks_exchange(),
            router: HotRouter::start(&broker, config.fairness.hot_for),
            floods: Mutex::new(Floods::default()),
            marks_paused_until: AtomicU64::new(0),
            history: config.history.enabled.then(|| HistoryWriter::on(&broker)),
            config: Arc::new(config),
            broker,
            publisher: Arc::new(publisher),
        })
    }

    /// Loads the config the usual way (`$WARREN_CONFIG`, else `./warren.toml`; then the
    /// `WARREN_*` environment overrides) and connects.
    pub async fn from_env() -> Result<Self, ConnectError> {
        let config = Config::load(None, &ProcessEnv)?;
        Ok(Self::connect(config).await?)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn broker(&self) -> &Broker {
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
        self.notice_floods(std::slice::from_ref(&job)).await;
        let prepared = self.prepare(job)?;
        let result = self
            .publisher
            .publish(outgoing(&self.tasks_exchange, &prepared))
            .await;
        if let Err(cause) = result {
            return Err(self.publish_error(&prepared, cause, 0).await);
        }
        self.record(vec![prepared.submitted]).await;
        Ok(prepared.id)
    }

    /// Validates every job first (nothing is published if one is invalid), then publishes them
    /// with up to [`CONFIRM_WINDOW`] confirms in flight. Returns the ids in input order.
    pub async fn submit_many(
        &self,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Result<Vec<JobId>, SubmitError> {
        let jobs: Vec<Job> = jobs.into_iter().collect();
        self.notice_floods(&jobs).await;
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
        let ids = prepared.iter().map(|p| p.id).collect();
        // The publishing runs as a task of its own. Awaited in a caller's `#[tokio::main]`
        // future (the thread `block_on` runs on, not a runtime worker), the same loop published
        // in stalls of 45-105 ms now and then on a busy 2-core machine (docs/bench.md).
        let task = AbortOnDrop(tokio::spawn(publish_batch(
            self.publisher.clone(),
            self.tasks_exchange.clone(),
            self.history.clone(),
            prepared,
        )));
        match task.wait().await {
            Ok(()) => Ok(ids),
            Err(refused) => Err(self
                .publish_error(&refused.job, refused.cause, refused.confirmed)
                .await),
        }
    }

    /// Waits up to `timeout` for the job's result (success or failure). Works for jobs that
    /// finished before the call, too: results are read from the results stream, from the
    /// job's time on. A job that failed and was then replayed from the dead-letter queue has a
    /// later result; the newest one wins (see [`Waiting`]). A lost connection is reopened with
    /// backoff, and reading starts again from the job's time.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<ResultEvent, WaitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || WaitError::Timeout {
            job_id: id,
            timeout,
        };
        let mut backoff = Backoff::reconnect();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = async {
                let mut waiting = self.wait_all(&[id], left).await?;
                let result = waiting.next().await;
                waiting.close().await;
                result
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(Some(event))) => return Ok(event),
                Err(_) | Ok(Ok(None)) | Ok(Err(WaitError::Timeout { .. })) => {
                    return Err(timed_out())
                }
                Ok(Err(WaitError::Broker(e))) if !e.is_connection_lost() => {
                    return Err(WaitError::Broker(e))
                }
                // The stream ended or the connection went away: read again.
                Ok(Err(_)) => tokio::time::sleep(backoff.next_delay()).await,
            }
        }
    }

    /// Waits up to `timeout` for the results of `ids`, read from the earliest job's time on:
    /// each as soon as it is final, in that order (see [`Waiting`]). For jobs you are about to
    /// submit, [`Client::results`] from [`Since::Now`], opened before the submit, then
    /// [`ResultStream::wait_for`], reads only what comes after.
    pub async fn wait_all(&self, ids: &[JobId], timeout: Duration) -> Result<Waiting, BrokerError> {
        let earliest = ids.iter().min_by_key(|id| id.timestamp_ms());
        let since = earliest.map_or(Since::Now, |id| Since::Job(*id));
        Ok(self
            .results(since)
            .await?
            .wait_for(ids.iter().copied(), timeout))
    }

    /// Every result event from `since` on, then new ones as they arrive.
    pub async fn results(&self, since: Since) -> Result<ResultStream, BrokerError> {
        ResultStream::open(&self.broker, since).await
    }

    /// The tenants hot now, as the control stream says (those this client marked included).
    pub fn hot_tenants(&self) -> Vec<HotTenant> {
        self.router.list()
    }

    /// Counts `jobs` per tenant and marks the tenants they make a flood of hot, before any is
    /// published, so their jobs take a hot lane from the first one. A mark that cannot be
    /// published leaves routing by shard, as without fairness.
    async fn notice_floods(&self, jobs: &[Job]) {
        let mut groups: HashMap<(&str, &str), u64> = HashMap::new();
        for job in jobs {
            *groups.entry((&job.pipeline, &job.tenant)).or_default() += 1;
        }
        let settings = &self.config.fairness;
        let hot_for_ms = settings.hot_for.as_millis() as u64;
        let now = now_ms();
        if now < self.marks_paused_until.load(Ordering::Relaxed) {
            return;
        }
        let floods: Vec<_> = {
            let mut counts = self.floods.lock().expect("floods lock");
            groups
                .into_iter()
                .filter_map(|((pipeline, tenant), n)| {
                    let reason = counts.count(pipeline, tenant, n, now, settings.hot_depth)?;
                    Some((pipeline, tenant, reason))
                })
                .collect()
        };
        for (pipeline, tenant, reason) in floods {
            let Some(pipeline) = self.config.pipeline(pipeline) else {
                continue;
            };
            let fresh = self.router.fresh(&pipeline.name, tenant, hot_for_ms);
            if fresh || TenantId::parse(tenant.to_string()).is_err() {
                continue;
            }
            let by = format!("producer/{}", std::process::id());
            let Some(mark) = HotMark::new(pipeline, tenant, now, hot_for_ms, reason, &by) else {
                continue;
            };
            match self.router.mark(&self.publisher, &mark).await {
                Ok(()) => {
                    tracing::info!(tenant, pipeline = %pipeline.name, reason = reason.as_str(),
                    lane = %Lane::Hot(mark.lane), "Tenant marked hot: its jobs take a hot lane.")
                }
                Err(error) => {
                    tracing::warn!(%error, tenant, pipeline = %pipeline.name,
                        "Cannot publish a hot mark; the tenant's jobs go to its shard.");
                    let until = now + MARK_RETRY_PAUSE_MS;
                    self.marks_paused_until.store(until, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Writes history events (after the publishes they tell of were confirmed) and waits for
    /// their confirm, so a process that exits right after a submit leaves its "submitted"
    /// events behind. A failure is logged, not returned: the jobs are submitted either way.
    pub(crate) async fn record(&self, events: Vec<Event>) {
        let Some(history) = &self.history else {
            return;
        };
        log_unrecorded(history.record_confirmed(events).await);
    }

    /// Closes the connection cleanly. Dropping a client without it is safe too.
    pub async fn close(self) {
        self.router.stop();
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
            // A step queue's name is its routing key under the namespace's prefix.
            let queue = format!(
                "{}{}",
                self.broker.names().step_queue_prefix(),
                job.routing_key
            );
            let depth = ready_messages(&self.broker, &queue).await;
            if matches!(depth, Ok(Some(n)) if n >= job.max_queue_length) {
                return SubmitError::BacklogFull {
                    queue,
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
        if !pipeline.has_priority(job.priority) {
            return Err(SubmitError::PriorityNotDeclared {
                pipeline: pipeline.name.clone(),
                priority: job.priority,
                priorities: pipeline.priorities.clone(),
            });
        }
        let first = &pipeline.first_step().name;
        let route = self
            .router
            .route(pipeline, first, job.priority, tenant.as_str());
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
            submitted: Event::submitted(&envelope),
            id: job.id,
            routing_key: route.routing_key(),
            body,
            max_queue_length: pipeline.max_queue_length,
        })
    }
}

/// The job of a batch the broker did not take, and how many jobs it confirmed before that one.
struct Refused {
    job: Prepared,
    cause: PublishError,
    confirmed: usize,
}

/// Publishes `prepared` with up to [`CONFIRM_WINDOW`] confirms in flight; the job the broker
/// did not take ends it.
async fn publish_batch(
    publisher: Arc<Publisher>,
    exchange: String,
    history: Option<HistoryWriter>,
    mut prepared: Vec<Prepared>,
) -> Result<(), Refused> {
    let outcome = publish_windows(&publisher, &exchange, history.as_ref(), &prepared).await;
    outcome.map_err(|(index, cause, confirmed)| Refused {
        job: prepared.swap_remove(index),
        cause,
        confirmed,
    })
}

/// [`publish_batch`]'s loop. Each window's "submitted" events go out once its jobs are
/// confirmed, while the next window is published; their confirms are awaited at the end. An
/// error names the job's index and how many were confirmed before it.
async fn publish_windows(
    publisher: &Publisher,
    exchange: &str,
    history: Option<&HistoryWriter>,
    prepared: &[Prepared],
) -> Result<(), (usize, PublishError, usize)> {
    let mut confirmed = 0;
    let mut recorded = Vec::new();
    for (w, window) in prepared.chunks(CONFIRM_WINDOW).enumerate() {
        let first = w * CONFIRM_WINDOW;
        let mut pending = Vec::with_capacity(window.len());
        for (i, job) in window.iter().enumerate() {
            match publisher.start(outgoing(exchange, job)).await {
                Ok(confirm) => pending.push((first + i, confirm)),
                Err(cause) => return Err((first + i, cause, confirmed)),
            }
        }
        for (index, confirm) in pending {
            if let Err(cause) = confirm.wait().await {
                return Err((index, cause, confirmed));
            }
            confirmed += 1;
        }
        if let Some(history) = history {
            recorded.push(history.send(window.iter().map(|p| p.submitted.clone()).collect()));
        }
    }
    for batch in recorded {
        log_unrecorded(batch.wait().await);
    }
    Ok(())
}

/// A spawned task that is aborted when its handle is dropped: a caller that gives up on
/// `submit_many` (a timeout, a cancelled request) stops its publishing, as it did when the loop
/// ran in the caller's future.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn wait(mut self) -> T {
        match (&mut self.0).await {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels it while this handle still waits.
            Err(e) => panic!("submit_many's publishing stopped: {e}"),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `job`'s message to the tasks exchange.
fn outgoing<'a>(exchange: &'a str, job: &'a Prepared) -> Outgoing<'a> {
    Outgoing::persistent(exchange, &job.routing_key, &job.body, &job.id.to_string())
}

/// A history write that failed is logged, not returned: the jobs are submitted either way.
fn log_unrecorded(outcome: Result<(), HistoryWriteError>) {
    if let Err(error) = outcome {
        tracing::warn!(%error, "Cannot write history events; the jobs are submitted.");
    }
}
