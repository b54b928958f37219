//! One delivery, from bytes to ack: decode, check, run the step, hand the output on (next
//! step's queue, or the job's result event), wait for the broker's confirm, and only then ack.
//! Whatever happens, the delivery is acked exactly when its successor message is safe, or is
//! returned to its queue; it is never dropped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info_span, warn, Instrument};
use warren_broker::{Names, Outgoing, PublishError, Publisher};
use warren_common::backoff::{nominal_retry_delay, retry_delay, Backoff};
use warren_common::config::{PipelineConfig, StepConfig};
use warren_common::dead_letter as headers;
use warren_common::{
    decode, encode, encode_result, now_ms, Config, Envelope, Priority, ResultEvent,
};

use crate::handler::{StepContext, StepError};
use crate::metrics::{Metrics, Outcome, PublishKind};
use crate::registry::ErasedHandler;

/// Pause before returning a delivery whose hand-off failed, so a broken downstream does not
/// turn into a hot redelivery loop.
const HANDOFF_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Longest wait between tries to hand an output to a full queue.
const BACKLOG_FULL_MAX_WAIT: Duration = Duration::from_secs(5);

/// What every step task of one connection's session shares.
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) names: Names,
    pub(crate) publisher: Publisher,
    pub(crate) tasks_exchange: String,
    pub(crate) events_exchange: String,
    /// Cancelled when the session's connection is lost: its deliveries can no longer be acked,
    /// so running steps stop and the broker hands their messages out again.
    pub(crate) lost: CancellationToken,
    pub(crate) metrics: Arc<Metrics>,
}

/// What runs a step.
#[derive(Clone)]
pub(crate) enum Runner {
    Handler(ErasedHandler),
    /// The program and its arguments, and the variables to pass through (`pass_env`).
    Command(Arc<(Vec<String>, Vec<String>)>),
}

/// The step one lane of the worker serves.
pub(crate) struct LaneStep {
    pub(crate) pipeline: PipelineConfig,
    pub(crate) step: StepConfig,
    pub(crate) runner: Runner,
}

impl Runner {
    async fn run(
        &self,
        input: Value,
        ctx: StepContext,
        timeout: Duration,
    ) -> Result<Value, StepError> {
        match self {
            Runner::Command(spec) => {
                let (argv, pass_env) = &**spec;
                crate::command::run(argv, pass_env, &input, &ctx, timeout).await
            }
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

/// Handles one delivery, taken from `queue`, end to end.
pub(crate) async fn process(
    shared: Arc<Shared>,
    lane: Arc<LaneStep>,
    queue: Arc<str>,
    delivery: Delivery,
) {
    let outcome = tokio::select! {
        outcome = handle(&shared, &lane, &queue, &delivery) => outcome,
        // Dropping the attempt kills a command's process group; the message is redelivered.
        _ = shared.lost.cancelled() => {
            debug!(queue = %queue, "Connection lost mid-step; the broker will redeliver the message.");
            let priority = priority_of(&queue);
            shared.metrics.execution(&lane.pipeline.name, &lane.step.name, priority, Outcome::Abandoned, None);
            return;
        }
    };
    settle(delivery, outcome).await;
}

/// The priority part of a step queue's name (`{ns}.q.<pipeline>.<step>.<priority>.<shard>`).
fn priority_of(queue: &str) -> Priority {
    let part = queue.rsplit('.').nth(1);
    part.and_then(|p| p.parse().ok()).unwrap_or_default()
}

async fn handle(
    shared: &Shared,
    lane: &LaneStep,
    queue: &str,
    delivery: &Delivery,
) -> Result<(), PublishError> {
    let env = match decode(&delivery.data) {
        Ok(env) => env,
        Err(e) => {
            return set_aside(
                shared,
                lane,
                delivery,
                queue,
                None,
                "undecodable",
                &e.to_string(),
            )
            .await
        }
    };
    let max = shared.config.broker.max_payload_bytes;
    if let Some(size) = env.input_exceeds(delivery.data.len(), max) {
        let text = format!("input is {size} bytes, more than max_payload_bytes = {max}");
        return set_aside(
            shared,
            lane,
            delivery,
            queue,
            Some(&env),
            "oversized",
            &text,
        )
        .await;
    }
    if let Err((reason, text)) = check(&shared.config, lane, &env) {
        return set_aside(shared, lane, delivery, queue, Some(&env), reason, &text).await;
    }
    let trace_id = env.trace().map(|t| t.trace_id_hex()).unwrap_or_default();
    let span = info_span!("step", job_id = %env.job_id, tenant = %env.tenant,
        pipeline = %env.pipeline, step = %env.step, attempt = env.attempt, trace_id);
    run_step(shared, lane, queue, env).instrument(span).await
}

/// The envelope must name this lane's pipeline and step.
fn check(config: &Config, lane: &LaneStep, env: &Envelope) -> Result<(), (&'static str, String)> {
    let Some(pipeline) = config.pipeline(&env.pipeline) else {
        return Err((
            "unknown-pipeline",
            format!("no pipeline {:?} in the config", env.pipeline),
        ));
    };
    if pipeline.step(&env.step).is_none() {
        return Err((
            "unknown-step",
            format!("pipeline {} has no step {:?}", env.pipeline, env.step),
        ));
    }
    if env.pipeline != lane.pipeline.name || env.step != lane.step.name {
        return Err((
            "wrong-queue",
            format!(
                "message for {}/{} arrived on a queue of {}/{}",
                env.pipeline, env.step, lane.pipeline.name, lane.step.name
            ),
        ));
    }
    Ok(())
}

async fn run_step(
    shared: &Shared,
    lane: &LaneStep,
    queue: &str,
    env: Envelope,
) -> Result<(), PublishError> {
    let ctx = StepContext {
        job_id: env.job_id,
        tenant: env.tenant.to_string(),
        pipeline: env.pipeline.clone(),
        step: env.step.clone(),
        attempt: env.attempt,
        priority: env.priority,
        trace: env.trace(),
    };
    let (pipeline, step, priority) = (&lane.pipeline.name, &lane.step.name, env.priority);
    let metrics = &shared.metrics;
    let started = Instant::now();
    let queue_wait_ms = now_ms().saturating_sub(env.published_at);
    if env.published_at > 0 {
        metrics.queue_wait(
            pipeline,
            step,
            priority,
            Duration::from_millis(queue_wait_ms),
        );
    }
    let running = metrics.running(pipeline, step);
    let mut result = lane
        .runner
        .run(env.input.clone(), ctx, lane.step.timeout)
        .await;
    drop(running);
    let took = started.elapsed();
    let took_ms = took.as_millis() as u64;
    // The output travels as the next step's input, so it obeys the same size limit.
    // The successor, encoded once: for the size check and for the publish.
    let mut next: Option<(Envelope, Vec<u8>)> = None;
    if let Ok(output) = result {
        let max = shared.config.broker.max_payload_bytes;
        result = match lane.pipeline.next_step(&env.step) {
            Some(step) => {
                let successor = env.next(&step.name, output);
                let body = encode(&successor);
                let oversized = successor.input_exceeds(body.len(), max);
                next = Some((successor, body));
                match oversized {
                    Some(size) => Err(StepError::permanent(format!(
                        "output is {size} bytes, more than max_payload_bytes = {max}"
                    ))),
                    None => Ok(Value::Null),
                }
            }
            None => Ok(output),
        };
    }
    let job_took = || Duration::from_millis(now_ms().saturating_sub(env.submitted_at));
    match result {
        Ok(output) => {
            debug!(took_ms, queue_wait_ms, "Step finished.");
            metrics.execution(pipeline, step, priority, Outcome::Succeeded, Some(took));
            match next {
                Some((next, body)) => {
                    hand_off(shared, || {
                        publish_step(shared, &lane.pipeline, &next, &body)
                    })
                    .await
                }
                None => {
                    metrics.job_finished(pipeline, priority, true, job_took());
                    let event = ResultEvent::succeeded(&env, output);
                    hand_off(shared, || publish_result(shared, &event)).await
                }
            }
        }
        Err(e) if e.is_retryable() && env.attempt < lane.step.max_attempts => {
            metrics.execution(pipeline, step, priority, Outcome::Retried, Some(took));
            let nominal = nominal_retry_delay(&lane.step.backoff, env.attempt);
            let delay = retry_delay(&lane.step.backoff, env.attempt, rand::random::<f64>());
            warn!(took_ms, error = %e, max_attempts = lane.step.max_attempts,
                retry_in_ms = delay.as_millis() as u64, "Step failed; it will be retried.");
            let retry = env.retry();
            hand_off(shared, || {
                publish_retry(shared, lane, &retry, nominal, delay)
            })
            .await
        }
        Err(e) => {
            let why = if e.is_retryable() {
                "attempts used up"
            } else {
                "permanent failure"
            };
            warn!(took_ms, error = %e, "Step failed for good ({why}); the job goes to the dead-letter queue.");
            metrics.execution(pipeline, step, priority, Outcome::Failed, Some(took));
            metrics.job_finished(pipeline, priority, false, job_took());
            let text = format!("{why}: {e}");
            dead_letter(
                shared,
                &encode(&env),
                &env.job_id.to_string(),
                Some(pipeline),
                "failed",
                &text,
                queue,
            )
            .await?;
            let event = ResultEvent::failed(&env, text);
            hand_off(shared, || publish_result(shared, &event)).await
        }
    }
}

/// Publishes a step's successor. A queue at its length bound refuses the publish (negative
/// confirm): then the finished work waits here and tries again, rather than being dropped or
/// dead-lettered, until the queue has room or the connection is lost.
async fn hand_off<'a, F, Fut>(shared: &'a Shared, publish: F) -> Result<(), PublishError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), PublishError>> + 'a,
{
    let mut backoff =
        Backoff::try_new(Duration::from_millis(50), BACKLOG_FULL_MAX_WAIT).expect("valid bounds");
    loop {
        match publish().await {
            Err(PublishError::Nacked { routing_key }) => {
                let wait = backoff.next_delay();
                if backoff.tries() == 1 || backoff.tries().is_multiple_of(20) {
                    warn!(routing_key, tries = backoff.tries(),
                        "Next queue is full (or refused the message); holding the output and trying again.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.lost.cancelled() => return Err(PublishError::Nacked { routing_key }),
                }
            }
            other => return other,
        }
    }
}

/// Publishes `env`, already encoded as `body`, to its step queue.
async fn publish_step(
    shared: &Shared,
    pipeline: &PipelineConfig,
    env: &Envelope,
    body: &[u8],
) -> Result<(), PublishError> {
    let shard = pipeline.shard_of(env.tenant.as_str());
    let key = Names::step_key(&pipeline.name, &env.step, env.priority, shard);
    let msg = Outgoing::persistent(&shared.tasks_exchange, &key, body, &env.job_id.to_string());
    timed_publish(shared, PublishKind::NextStep, msg).await
}

/// Publishes with confirm, and records how long the confirm took.
async fn timed_publish(
    shared: &Shared,
    kind: PublishKind,
    msg: Outgoing<'_>,
) -> Result<(), PublishError> {
    let started = Instant::now();
    let result = shared.publisher.publish(msg).await;
    if result.is_ok() {
        shared.metrics.confirmed(kind, started.elapsed());
    }
    result
}

/// Parks a retry in the delay queue of its nominal delay; the message's own TTL (the delay with
/// jitter) sends it back to its step queue. The step queue itself stays free for other jobs.
async fn publish_retry(
    shared: &Shared,
    lane: &LaneStep,
    env: &Envelope,
    nominal: Duration,
    delay: Duration,
) -> Result<(), PublishError> {
    let nominal_ms = nominal.as_millis() as u64;
    if nominal_ms == 0 {
        return publish_step(shared, &lane.pipeline, env, &encode(env)).await;
    }
    let shard = lane.pipeline.shard_of(env.tenant.as_str());
    let key = Names::step_key(&lane.pipeline.name, &env.step, env.priority, shard);
    let body = encode(env);
    let exchange = shared.names.delay_exchange(nominal_ms);
    let mut msg = Outgoing::persistent(&exchange, &key, &body, &env.job_id.to_string());
    msg.properties = msg
        .properties
        .with_expiration(delay.as_millis().max(1).to_string().into());
    timed_publish(shared, PublishKind::Retry, msg).await
}

async fn publish_result(shared: &Shared, event: &ResultEvent) -> Result<(), PublishError> {
    let key = Names::result_key(event.status, &event.pipeline, event.tenant.as_str());
    let body = encode_result(event);
    let msg = Outgoing::persistent(
        &shared.events_exchange,
        &key,
        &body,
        &event.job_id.to_string(),
    );
    timed_publish(shared, PublishKind::Result, msg).await
}

/// Moves a delivery that cannot run to the dead-letter queue, with the reason.
async fn set_aside(
    shared: &Shared,
    lane: &LaneStep,
    delivery: &Delivery,
    queue: &str,
    env: Option<&Envelope>,
    reason: &str,
    text: &str,
) -> Result<(), PublishError> {
    warn!(
        reason,
        error = text,
        queue,
        "Message set aside in the dead-letter queue."
    );
    // Every dead letter gets an id that `warren dlq show` can find: the job id when the body is
    // an envelope, else the original message id, else a fresh one.
    let id = env
        .map(|e| e.job_id.to_string())
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
        })
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| warren_common::JobId::new().to_string());
    shared.metrics.execution(
        &lane.pipeline.name,
        &lane.step.name,
        priority_of(queue),
        Outcome::DeadLettered,
        None,
    );
    let pipeline = env.map(|e| e.pipeline.as_str());
    dead_letter(shared, &delivery.data, &id, pipeline, reason, text, queue).await?;
    // Tell a waiting submitter, when the job is one of ours.
    if let Some(env) = env.filter(|e| shared.config.pipeline(&e.pipeline).is_some()) {
        publish_result(
            shared,
            &ResultEvent::failed(env, format!("{reason}: {text}")),
        )
        .await?;
    }
    Ok(())
}

async fn dead_letter(
    shared: &Shared,
    body: &[u8],
    id: &str,
    pipeline: Option<&str>,
    reason: &str,
    text: &str,
    queue: &str,
) -> Result<(), PublishError> {
    let dlq = shared.names.dlq();
    let msg = Outgoing::persistent("", &dlq, body, id).with_headers(&[
        (headers::REASON, reason.to_string()),
        (headers::ERROR, text.to_string()),
        (headers::QUEUE, queue.to_string()),
        (headers::FAILED_AT, now_ms().to_string()),
    ]);
    timed_publish(shared, PublishKind::DeadLetter, msg).await?;
    // A pipeline name from a message we could not place would be unbounded label values.
    let known = pipeline.filter(|p| shared.config.pipeline(p).is_some());
    shared.metrics.dead_letter(known, reason);
    Ok(())
}

/// Acks once the successor is confirmed; otherwise returns the delivery to its queue.
async fn settle(delivery: Delivery, outcome: Result<(), PublishError>) {
    match outcome {
        Ok(()) => {
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                // The channel is gone: the broker redelivers the message, and the step runs again.
                warn!(error = %e, "Could not ack; the message will be redelivered.");
            }
        }
        Err(e) => {
            error!(error = %e, "Could not hand the step's result on; the message goes back to its queue.");
            tokio::time::sleep(HANDOFF_RETRY_PAUSE).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let _ = delivery.acker.nack(requeue).await;
        }
    }
}
