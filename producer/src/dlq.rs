//! The dead-letter queue `{ns}.dlq`: list, replay and purge what waits in it.
//!
//! AMQP has no "peek", so every operation walks the queue once: it takes each message that was
//! there when it started and sends it on before acking it: to the back of the DLQ (kept), to
//! the step queue it failed in (replayed), or nowhere (purged). Every send is confirmed before
//! the ack, so a crash mid-walk leaves a dead letter twice at worst and never loses one.
//! (Nacking with requeue would be cheaper, but counts as a delivery, and RabbitMQ 4 drops a
//! quorum-queue message after 20 of those.)

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde::Serialize;
use serde_json::Value;
use warren_broker::depth::ready_messages;
use warren_broker::publish::header;
use warren_broker::{BrokerError, Outgoing, PendingConfirm, PublishError, StepRoute};
use warren_common::bundle::Bundle;
use warren_common::dead_letter::{self as headers, Reason};
use warren_common::{decode, now_ms, Envelope, JobId, Priority};

use crate::client::Client;

/// How many dead letters a walk takes before it settles their sends: enough to keep the broker
/// busy, few enough that a crash repeats little.
const WALK_BATCH: usize = 200;

/// One message in the dead-letter queue, as far as it can be read.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The message id: the job id when known (what `warren dlq show` takes).
    pub id: String,
    /// The rest is absent when the body is not a warren envelope (reason `undecodable`).
    pub job_id: Option<JobId>,
    pub tenant: Option<String>,
    pub pipeline: Option<String>,
    /// The step that failed.
    pub step: Option<String>,
    pub priority: Option<Priority>,
    /// The attempt that failed.
    pub attempts: Option<u32>,
    /// A short code: one of warren's [`Reason`]s (`failed`, `undecodable`, `oversized`, ...),
    /// kept as text, since a dead letter set aside by another tool may say anything.
    pub reason: String,
    /// The last error (the handler's error text, or the tail of the command's stderr).
    pub error: String,
    /// The queue it was taken from.
    pub queue: Option<String>,
    /// When it was set aside / submitted, ms since the Unix epoch.
    pub failed_at: Option<u64>,
    pub submitted_at: Option<u64>,
    /// The failed step's input, as it was.
    pub input: Option<Value>,
    /// The raw body as (lossy) text, when it is not an envelope.
    pub raw: Option<String>,
    /// The job's W3C trace context, kept across a replay.
    pub traceparent: Option<String>,
    /// The fan-out the job is a part of, kept across a replay so its join hears of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_of: Option<warren_common::fanout::PartOf>,
    pub body_bytes: usize,
    /// When the body is a bundle of fan-out parts (a worker from before bundles sets one aside
    /// whole, as undecodable): how many parts it holds. The fields above are then its first
    /// part's, and a replay puts the bundle back as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundled_parts: Option<usize>,
    #[serde(skip)]
    bundle: Option<Vec<u8>>,
}

impl DeadLetter {
    fn read(delivery: &Delivery) -> Self {
        let props = &delivery.properties;
        let envelope = decode(&delivery.data).ok();
        let bundle = envelope
            .is_none()
            .then(|| Bundle::decode(&delivery.data))
            .flatten();
        let first = bundle
            .as_ref()
            .and_then(|b| b.parts.first())
            .and_then(|part| decode(part).ok());
        let reason = header(props, headers::REASON)
            .or_else(|| header(props, headers::BROKER_REASON).map(|r| Reason::of_broker(&r)))
            .unwrap_or_else(|| "unknown".into());
        let id = props
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .or_else(|| envelope.as_ref().map(|e| e.job_id.to_string()))
            .unwrap_or_default();
        let env = envelope.as_ref().or(first.as_ref());
        let raw = env
            .is_none()
            .then(|| String::from_utf8_lossy(&delivery.data).into_owned());
        Self {
            id,
            job_id: env.map(|e| e.job_id),
            tenant: env.map(|e| e.tenant.to_string()),
            pipeline: env.map(|e| e.pipeline.clone()),
            step: env.map(|e| e.step.clone()),
            priority: env.map(|e| e.priority),
            attempts: env.map(|e| e.attempt),
            reason,
            error: header(props, headers::ERROR).unwrap_or_default(),
            queue: header(props, headers::QUEUE).or_else(|| header(props, headers::BROKER_QUEUE)),
            failed_at: header(props, headers::FAILED_AT).and_then(|t| t.parse().ok()),
            submitted_at: env.map(|e| e.submitted_at),
            input: env.map(|e| e.input.clone()),
            raw,
            traceparent: env.and_then(|e| e.traceparent.clone()),
            part_of: env.and_then(|e| e.part_of),
            body_bytes: delivery.data.len(),
            bundled_parts: bundle.as_ref().map(|b| b.parts.len()),
            bundle: bundle.map(|_| delivery.data.to_vec()),
        }
    }
}

/// Which dead letters an operation touches. The default matches all of them.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    /// The message id (the job id).
    pub id: Option<String>,
    pub pipeline: Option<String>,
    pub tenant: Option<String>,
    pub reason: Option<String>,
    /// Any of these message ids (a selection of several dead letters, in one walk).
    pub ids: Option<std::collections::HashSet<String>>,
}

impl DlqFilter {
    pub fn id(id: impl Into<String>) -> Self {
        Self {
            id: Some(id.into()),
            ..Self::default()
        }
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        fn same(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| have == Some(w))
        }
        same(&self.id, Some(&letter.id))
            && self.ids.as_ref().is_none_or(|ids| ids.contains(&letter.id))
            && same(&self.pipeline, letter.pipeline.as_deref())
            && same(&self.tenant, letter.tenant.as_deref())
            && same(&self.reason, Some(&letter.reason))
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayOptions {
    /// Start the failed step over at attempt 1, with its full `max_attempts`. Without it the
    /// replay is the next attempt (so a job whose attempts were used up gets one more try).
    pub reset_attempts: bool,
}

/// What a replay did.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Published to the step that failed, and removed from the DLQ.
    pub replayed: Vec<DeadLetter>,
    /// Matched, but left in the DLQ, with why.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub letter: DeadLetter,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    #[error(
        "dead-letter queue {0} does not exist: is the topology applied (`warren topology apply`)?"
    )]
    Missing(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "could not move a dead letter: {0} (what was not moved is still in the dead-letter queue)"
    )]
    Publish(#[from] PublishError),
}

/// What a walk does with one dead letter.
enum Fate {
    Keep,
    Purge,
    /// Publish this to the tasks exchange, then drop it from the DLQ.
    Replay {
        routing_key: String,
        body: Vec<u8>,
    },
    /// Keep it, and say why it was not replayed.
    Skip(String),
}

/// What a walk did with one dead letter.
enum Done {
    Kept,
    Purged,
    Replayed,
    Skipped(String),
}

impl Client {
    /// The dead letters matching `filter`, oldest first.
    pub async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DeadLetter>, DlqError> {
        let walked = self.walk(|_| Fate::Keep).await?;
        Ok(walked
            .into_iter()
            .map(|(letter, _)| letter)
            .filter(|l| filter.matches(l))
            .collect())
    }

    /// Publishes each matching dead letter to the step that failed, with its input as it was
    /// (the steps before it do not run again), and removes it from the DLQ once the broker has
    /// confirmed the publish. Dead letters that cannot be replayed (not an envelope, a pipeline
    /// or step no longer in the config, a priority the pipeline no longer declares, a full step
    /// queue) stay, listed in `skipped`.
    pub async fn dlq_replay(
        &self,
        filter: &DlqFilter,
        options: ReplayOptions,
    ) -> Result<ReplayReport, DlqError> {
        let walked = self
            .walk(|letter| {
                if !filter.matches(letter) {
                    return Fate::Keep;
                }
                match self.replay_of(letter, options) {
                    Ok((routing_key, body)) => Fate::Replay { routing_key, body },
                    Err(why) => Fate::Skip(why),
                }
            })
            .await?;
        let mut report = ReplayReport::default();
        for (letter, done) in walked {
            match done {
                Done::Replayed => report.replayed.push(letter),
                Done::Skipped(why) => report.skipped.push(Skipped { letter, why }),
                Done::Kept | Done::Purged => {}
            }
        }
        Ok(report)
    }

    /// Deletes the matching dead letters; returns them.
    pub async fn dlq_purge(&self, filter: &DlqFilter) -> Result<Vec<DeadLetter>, DlqError> {
        let walked = self
            .walk(|letter| match filter.matches(letter) {
                true => Fate::Purge,
                false => Fate::Keep,
            })
            .await?;
        Ok(walked
            .into_iter()
            .filter(|(_, done)| matches!(done, Done::Purged))
            .map(|(letter, _)| letter)
            .collect())
    }

    /// The routing key and body that put `letter` back into its step, or why it cannot be.
    fn replay_of(
        &self,
        letter: &DeadLetter,
        options: ReplayOptions,
    ) -> Result<(String, Vec<u8>), String> {
        let (Some(job_id), Some(tenant), Some(pipeline), Some(step), Some(priority)) = (
            letter.job_id,
            &letter.tenant,
            &letter.pipeline,
            &letter.step,
            letter.priority,
        ) else {
            return Err(format!(
                "not a warren envelope ({}); purge it when you have looked at it",
                letter.reason
            ));
        };
        let config = self.config();
        let pipeline = config
            .pipeline(pipeline)
            .ok_or_else(|| format!("pipeline {pipeline:?} is not in the config"))?;
        if pipeline.step(step).is_none() {
            return Err(format!(
                "pipeline {:?} has no step {step:?} in the config",
                pipeline.name
            ));
        }
        if !pipeline.has_priority(priority) {
            return Err(crate::error::no_such_priority(
                &pipeline.name,
                priority,
                &pipeline.priorities,
            ));
        }
        let tenant = warren_common::TenantId::parse(tenant.as_str()).map_err(|e| e.to_string())?;
        let route = StepRoute::for_tenant(pipeline, step, priority, tenant.as_str());
        if let Some(bundle) = &letter.bundle {
            // Its parts are first attempts, each to be admitted on its own by the worker.
            return Ok((route.routing_key(), bundle.clone()));
        }
        let attempt = match options.reset_attempts {
            true => 1,
            false => letter.attempts.unwrap_or(1).saturating_add(1),
        };
        let envelope = Envelope {
            attempt,
            published_at: now_ms(),
            submitted_at: letter.submitted_at.unwrap_or(0),
            traceparent: letter.traceparent.clone(),
            part_of: letter.part_of,
            ..Envelope::new_job(
                job_id,
                tenant,
                &pipeline.name,
                step,
                priority,
                letter.input.clone().unwrap_or(Value::Null),
            )
        };
        let body = envelope
            .encode_within(config.broker.max_payload_bytes)
            .map_err(|e| e.to_string())?;
        Ok((route.routing_key(), body))
    }

    /// Takes every message that is in the DLQ now, once, and does with each what `decide`
    /// says; returns them in order with what was done.
    async fn walk(
        &self,
        decide: impl FnMut(&DeadLetter) -> Fate,
    ) -> Result<Vec<(DeadLetter, Done)>, DlqError> {
        let broker = self.broker();
        let dlq = broker.names().dlq();
        let Some(total) = ready_messages(broker, &dlq).await? else {
            return Err(DlqError::Missing(dlq));
        };
        let channel = broker.channel().await?;
        let walked = self.walk_on(&channel, &dlq, total as usize, decide).await;
        // Closing the channel also puts back whatever a failed walk took and did not settle.
        let _ = channel.close(200, "done".into()).await;
        walked
    }

    async fn walk_on(
        &self,
        channel: &lapin::Channel,
        dlq: &str,
        total: usize,
        mut decide: impl FnMut(&DeadLetter) -> Fate,
    ) -> Result<Vec<(DeadLetter, Done)>, DlqError> {
        let mut walked = Vec::with_capacity(total);
        while walked.len() < total {
            let want = WALK_BATCH.min(total - walked.len());
            let mut batch = Vec::with_capacity(want);
            for _ in 0..want {
                let got = channel
                    .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(BrokerError::amqp(format!("read {dlq}")))?;
                match got {
                    Some(message) => batch.push(message.delivery),
                    None => break,
                }
            }
            if batch.is_empty() {
                break; // someone else took the rest
            }
            // Send everything first, then settle: one round trip per batch, not per message.
            let mut sent = Vec::with_capacity(batch.len());
            for delivery in batch {
                // The replay's history time: before its publish, so before the step's start.
                let at = now_ms();
                let letter = DeadLetter::read(&delivery);
                let fate = decide(&letter);
                let confirm = match &fate {
                    Fate::Purge => None,
                    Fate::Replay { routing_key, body } => {
                        let msg = Outgoing::persistent(
                            self.tasks_exchange(),
                            routing_key,
                            body,
                            &letter.id,
                        );
                        Some(self.publisher().start(msg).await)
                    }
                    Fate::Keep | Fate::Skip(_) => Some(self.keep(dlq, &delivery).await),
                };
                sent.push((delivery, letter, fate, confirm, at));
            }
            for (delivery, letter, fate, confirm, at) in sent {
                let outcome = match confirm {
                    None => Ok(()),
                    Some(Ok(pending)) => pending.wait().await,
                    Some(Err(e)) => Err(e),
                };
                let done = match (fate, outcome) {
                    (Fate::Keep, Ok(())) => Done::Kept,
                    (Fate::Purge, Ok(())) => Done::Purged,
                    (Fate::Replay { .. }, Ok(())) => Done::Replayed,
                    (Fate::Skip(why), Ok(())) => Done::Skipped(why),
                    // The step queue refused it (full), or has no queue (topology not applied):
                    // keep the dead letter for a later replay.
                    (
                        Fate::Replay { .. },
                        Err(e @ (PublishError::Nacked { .. } | PublishError::Unroutable { .. })),
                    ) => {
                        self.keep(dlq, &delivery).await?.wait().await?;
                        Done::Skipped(e.to_string())
                    }
                    // Not moved: the caller's closing of the channel puts it back.
                    (_, Err(e)) => return Err(e.into()),
                };
                if matches!(done, Done::Replayed) {
                    if let Some(event) = replayed(&letter) {
                        self.record(vec![event.at(at)]).await;
                    }
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BrokerError::amqp(format!("ack in {dlq}")))?;
                walked.push((letter, done));
            }
        }
        Ok(walked)
    }

    /// Starts a confirmed publish of the dead letter, as it is, to the back of the DLQ.
    async fn keep(&self, dlq: &str, delivery: &Delivery) -> Result<PendingConfirm, PublishError> {
        let msg = Outgoing {
            exchange: "",
            routing_key: dlq,
            body: &delivery.data,
            properties: delivery.properties.clone(),
        };
        self.publisher().start(msg).await
    }
}

/// The "replayed" history event of a dead letter put back on its step.
fn replayed(letter: &DeadLetter) -> Option<warren_common::history::Event> {
    if letter.bundle.is_some() {
        // Its parts never failed: they go back to their first step, as released.
        return None;
    }
    let (Some(job_id), Some(tenant), Some(pipeline)) =
        (letter.job_id, &letter.tenant, &letter.pipeline)
    else {
        return None;
    };
    let mut event = warren_common::history::Event::new(
        warren_common::history::Kind::Replayed,
        job_id,
        tenant,
        pipeline,
    );
    event.step = letter.step.clone();
    event.parent = letter.part_of.map(|p| p.job_id);
    Some(event)
}
