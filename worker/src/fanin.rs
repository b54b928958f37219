//! The fan-in coordinator: every worker runs one, and the one that holds the lock
//! (`{ns}.fanin.lock`, an exclusive queue that dies with its connection) leads. The leader
//! loads the last checkpoint, reads the fan-in stream back from the oldest open fan-out's
//! opened record to the checkpoint's offset (`warren_common::fanin::Resume`: the parts' specs and
//! outputs are not in the checkpoint), then folds each new record
//! (`warren_common::fanout::Fold`, pure), carries out what the fold decides (release the next
//! parts, publish the join step's message), and checkpoints (`warren_common::fanin::Checkpoint`:
//! counts and compact part sets, a few dozen bytes per open fan-out).
//! Nothing is held unacked for long, so RabbitMQ's `consumer_timeout` never trips.
//!
//! A leader killed at any instant leaves a checkpoint behind; its successor refolds from there.
//! What the dead leader published after that checkpoint is published again, with the same job
//! ids: parts and joins run at least once, never zero times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_broker::fanin::{self, FaninRecord};
use warren_broker::{Publisher, StepRoute};
use warren_common::fanin::{Checkpoint, Restored, Resume};
use warren_common::fanout::{Effect, Fold, PartEnd};
use warren_common::{encode, Envelope, JobId};

use crate::step::StepSession;

/// How often a follower tries the lock.
const TRY_LOCK_EVERY: Duration = Duration::from_secs(1);

/// Longest time between checkpoints while there is news.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Unacked fan-in stream messages at once (a stream needs acks for its credit only).
const PREFETCH: u16 = 500;

/// Deliveries acked at once (with `multiple`), well below [`PREFETCH`].
const ACK_EVERY: usize = 100;

/// Whether `config` has a fan-out step, so the coordinator is needed.
pub(crate) fn needed(config: &warren_common::Config) -> bool {
    config
        .pipelines
        .iter()
        .any(|p| p.steps.iter().any(|s| s.fan_out.is_some()))
}

/// Takes part in coordination until `stop`: tries the lock, leads while it holds it.
pub(crate) async fn coordinate(session: Arc<StepSession>, stop: CancellationToken) {
    loop {
        let locked = tokio::select! {
            _ = stop.cancelled() => return,
            locked = fanin::try_lock(&session.broker) => locked,
        };
        match locked {
            Ok(Some(lock)) => {
                let outcome = tokio::select! {
                    _ = stop.cancelled() => Ok(()),
                    led = lead(&session) => led,
                };
                let _ = lock.close(200, "fan-in leadership ends".into()).await;
                match outcome {
                    Ok(()) => return,
                    Err(error) => {
                        warn!(error = %error, "Fan-in coordination stopped; trying again.")
                    }
                }
            }
            Ok(None) => {}
            Err(error) => debug!(error = %error, "Cannot try the fan-in lock."),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TRY_LOCK_EVERY) => {}
        }
    }
}

/// Leads until an error: fold, carry out, checkpoint.
async fn lead(session: &StepSession) -> Result<(), String> {
    let broker = &session.broker;
    let restored = fanin::last_checkpoint(broker)
        .await
        .map_err(|e| e.to_string())?;
    let (mut fold, mut resume) = start_from(restored);
    let read_from = resume
        .as_ref()
        .and_then(Resume::from_offset)
        .unwrap_or(fold.next_offset);
    info!(
        open_fan_outs = resume
            .as_ref()
            .map_or(fold.runs.len(), Resume::open_fan_outs),
        from_offset = read_from,
        checkpoint_offset = fold.next_offset,
        "Coordinating fan-ins."
    );
    let publisher = Publisher::new(broker).await.map_err(|e| e.to_string())?;
    let checkpoints = broker.names().fanin_checkpoints();
    let (_channel, mut consumer) = fanin::read_fanin(broker, read_from, PREFETCH)
        .await
        .map_err(|e| e.to_string())?;
    let mut dirty = false;
    let mut checkpointed = Instant::now();
    // The newest delivery not acked yet, and how many are behind it: acked together.
    let mut unacked: Option<(lapin::Acker, usize)> = None;
    loop {
        let next = tokio::time::timeout(CHECKPOINT_EVERY, consumer.next()).await;
        let quiet = next.is_err();
        let delivery = match next {
            Ok(Some(Ok(delivery))) => Some(delivery),
            Ok(Some(Err(e))) => return Err(format!("read the fan-in stream: {e}")),
            Ok(None) => return Err("the broker ended the fan-in stream's consumer".into()),
            Err(_quiet) => None,
        };
        let mut joined = false;
        if let Some(delivery) = delivery {
            let offset =
                warren_broker::stream_offset(&delivery.properties).unwrap_or(fold.next_offset);
            let record = || FaninRecord::read(delivery.routing_key.as_str(), &delivery.data);
            if let Some(replay) = resume.as_mut().filter(|r| offset < r.until()) {
                // Read back: folded and carried out before the checkpoint.
                match record() {
                    FaninRecord::Opened(opened) => replay.opened(*opened, offset),
                    FaninRecord::Ends(ends) => {
                        for ended in ends {
                            replay.ended(ended.part_of, ended.end, offset);
                        }
                    }
                    FaninRecord::Result(event) => {
                        if let Some((part_of, end)) = PartEnd::of(&event) {
                            replay.ended(part_of, end, offset);
                        }
                    }
                    FaninRecord::Other => {}
                }
                if replay.is_last(offset) {
                    fold = resumed(resume.take());
                }
            } else {
                if resume.is_some() {
                    fold = resumed(resume.take());
                }
                // A stream starts a reader at the chunk that holds its offset: skip what was
                // folded.
                if offset >= fold.next_offset {
                    let effects = match record() {
                        FaninRecord::Opened(opened) => vec![fold.open_at(*opened, offset)],
                        FaninRecord::Ends(ends) => ends
                            .into_iter()
                            .map(|ended| fold.end(ended.part_of, ended.end))
                            .collect(),
                        FaninRecord::Result(event) => match PartEnd::of(&event) {
                            Some((part_of, end)) => vec![fold.end(part_of, end)],
                            None => Vec::new(),
                        },
                        FaninRecord::Other => Vec::new(),
                    };
                    fold.next_offset = offset + 1;
                    dirty = true;
                    joined = carry_out(session, &mut fold, effects.into_iter().flatten()).await?;
                }
            }
            let behind = unacked.take().map_or(0, |(_, n)| n);
            unacked = Some((delivery.acker, behind + 1));
        }
        // A stream needs acks for its credit only: many at once are much cheaper. Below the
        // prefetch, so the credit never runs out; the rest goes when the stream is quiet.
        if let Some((acker, n)) = unacked.take() {
            if n >= ACK_EVERY || quiet {
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            } else {
                unacked = Some((acker, n));
            }
        }
        // A join is checkpointed at once: a successor would otherwise publish it again.
        if dirty && (joined || checkpointed.elapsed() >= CHECKPOINT_EVERY) {
            fanin::checkpoint(&publisher, &checkpoints, &Checkpoint::of(&fold))
                .await
                .map_err(|e| format!("checkpoint: {e}"))?;
            dirty = false;
            checkpointed = Instant::now();
        }
    }
}

/// The fold to start from, and the read-back a checkpoint of this format needs first.
fn start_from(restored: Option<Restored>) -> (Fold, Option<Resume>) {
    match restored {
        None => (Fold::default(), None),
        Some(Restored::Full(fold)) => (fold, None),
        Some(Restored::Marks(checkpoint)) => {
            let resume = Resume::new(checkpoint);
            if resume.from_offset().is_some() {
                let fold = Fold {
                    next_offset: resume.until(),
                    ..Fold::default()
                };
                (fold, Some(resume))
            } else {
                (resumed(Some(resume)), None)
            }
        }
    }
}

/// The fold a finished read-back gives.
fn resumed(resume: Option<Resume>) -> Fold {
    let Some(resume) = resume else {
        return Fold::default();
    };
    let (fold, lost) = resume.finish();
    for parent in lost {
        warn!(parent_job_id = %parent,
            "A fan-out's opened record is no longer in the fan-in stream; its join cannot run.");
    }
    if !fold.runs.is_empty() {
        info!(
            open_fan_outs = fold.runs.len(),
            from_offset = fold.next_offset,
            "Read the open fan-outs back from the stream."
        );
    }
    fold
}

/// Publishes what the fold decided, each confirmed: the parts it releases all at once,
/// through a window of confirms (one batch of ends can release hundreds; confirmed one after
/// the other, they held a `max_parts_in_flight` fan-out to a few hundred parts a second), then
/// the joins. `Ok(true)` when a join was among them.
async fn carry_out(
    session: &StepSession,
    fold: &mut Fold,
    effects: impl IntoIterator<Item = Effect>,
) -> Result<bool, String> {
    let mut parts = Vec::new();
    let mut joins = Vec::new();
    for effect in effects {
        match effect {
            Effect::Release { parent, index } => {
                parts.extend(release(session, fold, parent, index))
            }
            Effect::Join { parent } => joins.push(parent),
        }
    }
    let listed: Vec<_> = parts
        .iter()
        .map(|(route, env, body)| (route.clone(), env, body.as_slice()))
        .collect();
    session
        .outbox
        .publish_parts(&listed, session.config.broker.max_payload_bytes)
        .await
        .map_err(|e| format!("release parts: {e}"))?;
    for (_, env, _) in &parts {
        debug!(parent_job_id = ?env.part_of.map(|p| p.job_id), part = ?env.part_of.map(|p| p.part),
            tenant = %env.tenant, job_id = %env.job_id, "Released a fan-out part.");
    }
    let mut joined = false;
    for parent in joins {
        joined |= join(session, fold, parent).await?;
    }
    Ok(joined)
}

/// Part `index` of `parent`'s fan-out: where it goes, its envelope and its encoding.
fn release(
    session: &StepSession,
    fold: &Fold,
    parent: JobId,
    index: u32,
) -> Option<(StepRoute, Envelope, Vec<u8>)> {
    let opened = &fold.runs.get(&parent)?.opened;
    let Some(pipeline) = session.config.pipeline(&opened.part_pipeline) else {
        warn!(parent_job_id = %parent, pipeline = %opened.part_pipeline,
            "A fan-out's part pipeline is not in the config; its parts cannot be released.");
        return None;
    };
    let env = opened.part_envelope(index, &pipeline.first_step().name);
    let body = encode(&env);
    let route =
        session
            .fairness
            .router
            .route(pipeline, &env.step, env.priority, env.tenant.as_str());
    Some((route, env, body))
}

/// Publishes the join step's message of `parent`'s fan-out, confirmed, and forgets the
/// fan-out. `Ok(true)` when the fan-out was open.
async fn join(session: &StepSession, fold: &mut Fold, parent: JobId) -> Result<bool, String> {
    let (config, router, outbox) = (&session.config, &session.fairness.router, &session.outbox);
    let Some(run) = fold.close(parent) else {
        return Ok(false);
    };
    let opened = &run.opened;
    let Some(pipeline) = config.pipeline(&opened.pipeline) else {
        warn!(parent_job_id = %parent, pipeline = %opened.pipeline,
            "A fan-out's pipeline is not in the config; its join cannot run.");
        return Ok(true);
    };
    let input = run.join_input(config.broker.max_payload_bytes);
    let env = opened.join_envelope(input);
    let body = encode(&env);
    let route = router.route(pipeline, &env.step, env.priority, env.tenant.as_str());
    outbox
        .hand_off(|| outbox.publish_step(&route, &env, &body))
        .await
        .map_err(|e| format!("publish a join: {e}"))?;
    let succeeded = run.succeeded();
    info!(parent_job_id = %parent, tenant = %opened.tenant, step = %opened.join_step,
        parts = opened.total(), succeeded, failed = run.ended.len() as u32 - succeeded,
        "All parts ended; the join step is queued.");
    Ok(true)
}
