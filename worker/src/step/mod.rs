//! One delivery, from bytes to ack: decode and check it ([`fate::admit`]), run the step, decide
//! what becomes of it ([`fate::fate`]), carry that out through the [`Outbox`] (the next step's
//! message, a retry, the job's result, a dead letter), wait for the broker's confirm, and only
//! then ack. A bundle of fan-out parts ([`bundle`]) is one delivery whose parts each go this
//! way, and it is acked once all have. Whatever happens, the delivery is acked exactly when
//! what it became is safe, or is returned to its queue; it is never dropped.

mod bundle;
mod events;
pub(crate) mod fate;
mod history;
mod outbox;
mod runner;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};
use warren_broker::{Broker, HistoryWriter, PublishError, StepRoute};
use warren_common::history::{Event as HistoryEvent, Kind};
use warren_common::{now_ms, Config, Envelope, Priority, Reason};

use self::events::{
    AckFailed, Event, FannedOut, HandOffFailed, MessageSetAside, StepAbandoned, StepFailed,
    StepLabels, StepRetried, StepStarted, StepSucceeded,
};
use self::fate::{Admitted, Fate, SetAside};
use self::outbox::DeadLetter;
pub(crate) use self::outbox::Outbox;
pub(crate) use self::runner::ServedStep;
use crate::fairness::Fairness;
use crate::handler::{StepContext, StepError};
use crate::metrics::Metrics;

/// Pause before returning a delivery whose hand-off failed, so a broken downstream does not
/// turn into a hot redelivery loop.
const HANDOFF_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// An attempt that ends sooner has no "started" history event: its end event says how long
/// it took, which dates its start (`warren_common::history::fold`). A quick step so costs one
/// history event instead of two; a longer one shows as running while it runs.
const STARTED_EVENT_AFTER: Duration = Duration::from_millis(200);

/// What the step tasks of one connection's session share.
pub(crate) struct StepSession {
    pub(crate) config: Arc<Config>,
    pub(crate) broker: Broker,
    pub(crate) outbox: Outbox,
    /// Hot tenants: where their messages go, and noticing new ones.
    pub(crate) fairness: Fairness,
    /// Cancelled when the session's connection is lost: its deliveries can no longer be acked,
    /// so running steps stop and the broker hands their messages out again.
    pub(crate) lost: CancellationToken,
    pub(crate) metrics: Arc<Metrics>,
    /// The process's history writer, when `[history]` is on.
    pub(crate) history: Option<HistoryWriter>,
}

/// Handles one delivery of `served`'s, taken from the queue of `route`, end to end.
pub(crate) async fn process(
    session: Arc<StepSession>,
    served: Arc<ServedStep>,
    route: Arc<StepRoute>,
    delivery: Delivery,
) {
    let outcome = tokio::select! {
        outcome = handle(&session, &served, &route, &delivery) => outcome,
        // Dropping the attempt kills a command's process group; the message is redelivered.
        _ = session.lost.cancelled() => {
            let queue = session.outbox.queue(&route);
            StepAbandoned { labels: labels(&served, route.priority), queue: &queue }
                .emit(&session.metrics);
            return;
        }
    };
    settle(delivery, outcome, &session.metrics).await;
}

/// Decode → check → run → fate → carry out.
async fn handle(
    session: &Arc<StepSession>,
    served: &ServedStep,
    route: &StepRoute,
    delivery: &Delivery,
) -> Result<(), PublishError> {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str());
    match fate::admit(&delivery.data, message_id, &session.config, served) {
        Ok(Admitted::Job(env)) => handle_job(session, served, route, env, None).await,
        Ok(Admitted::Bundle(parts)) => bundle::handle(session, served, route, parts).await,
        Err(aside) => set_aside(session, served, route, &delivery.data, aside).await,
    }
}

/// Runs one admitted job's step and carries out its fate. `turn`, for a part of a bundle, is
/// the bundle's run slot: held while the step runs, let go before the confirms are awaited.
async fn handle_job(
    session: &Arc<StepSession>,
    served: &ServedStep,
    route: &StepRoute,
    env: Envelope,
    turn: Option<bundle::Turn<'_>>,
) -> Result<(), PublishError> {
    Fairness::observe(session, served, route, env.tenant.as_str());
    let trace_id = env.trace().map(|t| t.trace_id_hex()).unwrap_or_default();
    let parent_job_id = env.part_of.map(|p| tracing::field::display(p.job_id));
    let part = env.part_of.map(|p| p.part);
    let span = info_span!("step", job_id = %env.job_id, tenant = %env.tenant,
        pipeline = %env.pipeline, step = %env.step, attempt = env.attempt, trace_id,
        parent_job_id, part);
    async {
        let (outcome, timing) = run(session, served, &env).await;
        drop(turn);
        // Read after the run: a mark that came meanwhile already sends the output to the lane.
        let hot = session
            .fairness
            .router
            .lane(&served.pipeline, env.tenant.as_str());
        let fate = fate::decide(outcome, &env, served, &session.config, rand::random(), hot);
        report(&fate, &env, served, &timing, &session.metrics);
        let Some(writer) = &session.history else {
            return carry_out(session, route, fate).await;
        };
        // The history of the attempt is confirmed beside the hand-off, not after it: the ack
        // waits for both, and neither waits for the other.
        let events = history::events(&fate, &env, timing.took, &session.config);
        let recorded = async {
            writer
                .record_confirmed(events)
                .await
                .map_err(PublishError::from)
        };
        tokio::try_join!(carry_out(session, route, fate), recorded).map(|_| ())
    }
    .instrument(span)
    .await
}

/// When an attempt ran: how long it took, and how long its message had waited.
struct Timing {
    took: Duration,
    queue_wait_ms: u64,
}

/// Runs the step once on `env`'s input, counted as in flight meanwhile.
async fn run(
    session: &StepSession,
    served: &ServedStep,
    env: &Envelope,
) -> (Result<Value, StepError>, Timing) {
    let ctx = StepContext {
        job_id: env.job_id,
        tenant: env.tenant.to_string(),
        pipeline: env.pipeline.clone(),
        step: env.step.clone(),
        attempt: env.attempt,
        priority: env.priority,
        trace: env.trace(),
    };
    let metrics = &session.metrics;
    let (started, started_at) = (Instant::now(), now_ms());
    let queue_wait_ms = started_at.saturating_sub(env.published_at);
    StepStarted {
        labels: labels(served, env.priority),
        queue_wait: (env.published_at > 0).then(|| Duration::from_millis(queue_wait_ms)),
    }
    .emit(metrics);
    let running = metrics.running(&served.pipeline.name, &served.step.name);
    let attempt = served
        .runner
        .run(env.input.clone(), ctx, served.step.timeout);
    let outcome = match &session.history {
        None => attempt.await,
        Some(writer) => {
            tokio::pin!(attempt);
            tokio::select! {
                biased;
                outcome = &mut attempt => outcome,
                _ = tokio::time::sleep(STARTED_EVENT_AFTER) => {
                    writer.record(HistoryEvent::of_step(Kind::Started, env).at(started_at));
                    attempt.await
                }
            }
        }
    };
    drop(running);
    let timing = Timing {
        took: started.elapsed(),
        queue_wait_ms,
    };
    (outcome, timing)
}

/// Logs and counts what became of the attempt, once.
fn report(fate: &Fate, env: &Envelope, served: &ServedStep, timing: &Timing, metrics: &Metrics) {
    let labels = labels(served, env.priority);
    let took = timing.took;
    let job_took = || Duration::from_millis(now_ms().saturating_sub(env.submitted_at));
    match fate {
        Fate::Next { .. } | Fate::Finish(_) | Fate::FanOut(_) => StepSucceeded {
            labels,
            took,
            queue_wait_ms: timing.queue_wait_ms,
            job_took: matches!(fate, Fate::Finish(_)).then(job_took),
        }
        .emit(metrics),
        Fate::Retry { delay, error, .. } => StepRetried {
            labels,
            took,
            error,
            max_attempts: served.step.max_attempts,
            retry_in: *delay,
        }
        .emit(metrics),
        Fate::DeadLetter { gave_up, error, .. } => StepFailed {
            labels,
            took,
            error,
            gave_up: *gave_up,
            job_took: job_took(),
        }
        .emit(metrics),
    }
}

/// The one effect of a fate: the publish (or two) it asks for, each confirmed.
async fn carry_out(
    session: &StepSession,
    route: &StepRoute,
    fate: Fate,
) -> Result<(), PublishError> {
    let outbox = &session.outbox;
    match fate {
        Fate::Next {
            envelope,
            body,
            route: next,
        } => {
            outbox
                .hand_off(|| outbox.publish_step(&next, &envelope, &body))
                .await
        }
        Fate::Finish(result) => outbox.hand_off(|| outbox.publish_result(&result)).await,
        Fate::FanOut(plan) => {
            // The record first: once a part exists, the coordinator knows its fan-out.
            outbox
                .hand_off(|| outbox.publish_opened(&plan.opened))
                .await?;
            let config = &session.config;
            let router = &session.fairness.router;
            let part_pipeline = config
                .pipeline(&plan.opened.part_pipeline)
                .expect("checked by the fate");
            let tenants = plan.parts.iter().map(|(env, _)| env.tenant.as_str());
            Fairness::notice_fan_out(session, part_pipeline, tenants).await;
            let parts: Vec<_> = plan
                .parts
                .iter()
                .map(|(env, body)| {
                    let route =
                        router.route(part_pipeline, &env.step, env.priority, env.tenant.as_str());
                    (route, env, body.as_slice())
                })
                .collect();
            outbox
                .publish_parts(&parts, config.broker.max_payload_bytes)
                .await?;
            FannedOut {
                parent: &plan.opened.parent.to_string(),
                total: plan.opened.total(),
                released: parts.len(),
                pipeline: &plan.opened.part_pipeline,
            }
            .emit(&session.metrics);
            Ok(())
        }
        Fate::Retry {
            envelope,
            body,
            route: again,
            nominal,
            delay,
            ..
        } => {
            outbox
                .hand_off(|| outbox.publish_retry(&again, &envelope, &body, nominal, delay))
                .await
        }
        Fate::DeadLetter { body, result, .. } => {
            let (id, queue) = (result.job_id.to_string(), outbox.queue(route));
            let text = result.error.as_deref().unwrap_or_default();
            let letter = DeadLetter {
                body: &body,
                id: &id,
                pipeline: Some(&result.pipeline),
                reason: Reason::Failed,
                text,
                queue: &queue,
            };
            outbox.dead_letter(&letter).await?;
            outbox.hand_off(|| outbox.publish_result(&result)).await
        }
    }
}

/// Moves a delivery that cannot run here to the dead-letter queue, and tells a waiting
/// submitter when the job is one of ours.
async fn set_aside(
    session: &StepSession,
    served: &ServedStep,
    route: &StepRoute,
    body: &[u8],
    aside: Box<SetAside>,
) -> Result<(), PublishError> {
    let queue = session.outbox.queue(route);
    MessageSetAside {
        labels: labels(served, route.priority),
        reason: aside.reason,
        text: &aside.text,
        queue: &queue,
    }
    .emit(&session.metrics);
    let letter = DeadLetter {
        body,
        id: &aside.id,
        pipeline: aside.pipeline.as_deref(),
        reason: aside.reason,
        text: &aside.text,
        queue: &queue,
    };
    session.outbox.dead_letter(&letter).await?;
    if let Some(result) = &aside.result {
        session.outbox.publish_result(result).await?;
        if let Some(writer) = &session.history {
            let mut dead = HistoryEvent::new(
                Kind::DeadLettered,
                result.job_id,
                result.tenant.as_str(),
                &result.pipeline,
            )
            .error(&aside.text);
            dead.step = Some(result.step.clone());
            dead.reason = Some(aside.reason.as_str().to_string());
            dead.parent = result.part_of.map(|p| p.job_id);
            writer.record_confirmed(vec![dead]).await?;
        }
    }
    Ok(())
}

fn labels(served: &ServedStep, priority: Priority) -> StepLabels<'_> {
    StepLabels {
        pipeline: &served.pipeline.name,
        step: &served.step.name,
        priority,
    }
}

/// Acks once what the delivery became is confirmed; otherwise returns it to its queue.
async fn settle(delivery: Delivery, outcome: Result<(), PublishError>, metrics: &Metrics) {
    match outcome {
        Ok(()) => {
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                // The channel is gone: the broker redelivers the message, and the step runs again.
                AckFailed { error: &error }.emit(metrics);
            }
        }
        Err(error) => {
            HandOffFailed { error: &error }.emit(metrics);
            tokio::time::sleep(HANDOFF_RETRY_PAUSE).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            let _ = delivery.acker.nack(requeue).await;
        }
    }
}
