//! The results check: on RabbitMQ 3.10 a stream whose leader moves (a node stopped or lost)
//! can lose events it already confirmed (rabbitmq-server#9457), so a job's result would be
//! missing from `{ns}.results` although its last step ran. While `[results] check` is on, every
//! worker also copies its result events to `{ns}.results.check`, a quorum queue (which loses
//! nothing on a fail-over), in batches (group commit: one message per batch of results that
//! came while earlier batches awaited their confirms), and acks a step only once both the
//! result and its copy are confirmed. Every worker consumes that queue; single active consumer
//! makes one of them the checker.
//! It holds each event unacked for `check_after`, then reads the stream over the events' time
//! span and writes each event the stream does not hold to it again (confirmed), and only then
//! acks. A checker that dies leaves its events unacked, so the next one checks them: a result
//! may be written twice (readers take a job's result once), never lost.
//!
//! Cost: one more quorum-queue message per batch of results, and the stream read about three
//! times over by one worker; so `auto` turns it on only for a cluster (`[broker] urls` with
//! several members), where a leader can move.

mod ledger;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_broker::{BrokerError, Outgoing, PublishError, Publisher};
use warren_common::{decode_results, encode_result};
use warren_producer::{ResultStream, Since};

use crate::step::StepSession;
use ledger::{Due, EventKey, Ledger, Taken};

/// Unacked deliveries the checker may hold, each a batch of up to 1,000 events from one worker:
/// `check_after` plus a round of them at a busy cluster's pace. When it holds this many, the
/// queue waits (nothing is lost, the check lags).
const PREFETCH: u16 = 5_000;

/// How often due events are looked for: each look reads the stream from the oldest due event.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Clock skew allowed between the workers that wrote the events and the broker's chunk times.
const SKEW: Duration = Duration::from_secs(10);

/// A read of the stream that gets nothing for this long has reached its end.
const QUIET: Duration = Duration::from_secs(2);

/// Longest one look at the stream may take; what it has not seen by then is written again.
const LOOK_AT_MOST: Duration = Duration::from_secs(60);

/// How long a rewrite waits for its confirm before it is tried again on a fresh channel.
const CONFIRM_PATIENCE: Duration = Duration::from_secs(15);

/// Takes part in checking until `stop`; a lost channel or connection is retried after a pause.
pub(crate) async fn check(session: Arc<StepSession>, stop: CancellationToken) {
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = serve(&session) => outcome,
        };
        if let Err(error) = outcome {
            debug!(error = %error, "The results check stopped; starting it again.");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Consumes the check queue (idle unless this worker is its active consumer), looking for the
/// due events every [`CHECK_EVERY`].
async fn serve(session: &StepSession) -> Result<(), String> {
    let names = session.broker.names();
    let queue = names.results_check();
    let channel = session.broker.channel().await.map_err(|e| e.to_string())?;
    let mut consumer = warren_broker::consume(&channel, &queue, PREFETCH, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let publisher = Publisher::new(&session.broker)
        .await
        .map_err(|e| e.to_string())?
        .confirm_patience(CONFIRM_PATIENCE);
    let after = session.config.results.check_after;
    let mut ledger = Ledger::default();
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let delivery = delivery
                    .ok_or_else(|| format!("the consumer of {queue} ended"))?
                    .map_err(|e| format!("consume {queue}: {e}"))?;
                let events = decode_results(&delivery.data)
                    .iter()
                    .map(|event| (EventKey::of(event), encode_result(event)))
                    .collect();
                ledger.take(Taken {
                    tag: delivery.delivery_tag,
                    events,
                    received: Instant::now(),
                });
            }
            _ = ticks.tick() => {
                let Some(due) = ledger.due(Instant::now(), after) else { continue };
                let unseen = look_for(session, &due).await.map_err(|e| e.to_string())?;
                let settled = ledger.settle(&due, &unseen);
                for (key, body) in &settled.missing {
                    write_again(session, &publisher, key, body).await?;
                }
                if !settled.missing.is_empty() {
                    warn!(events = settled.missing.len(), checked = due.keys.len(),
                        "The results stream had lost result events it had confirmed; wrote them again.");
                }
                session.metrics.results_checked(due.keys.len(), settled.missing.len());
                if let Some(tag) = settled.ack_through {
                    channel
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await
                        .map_err(|e| format!("ack {queue}: {e}"))?;
                }
                debug!(checked = due.count, held = ledger.len(), "Checked result events.");
            }
        }
    }
}

/// Reads the results stream over the due events' time span; returns the keys it did not see.
/// It stops once every key is seen, at an event well past the span, at the stream's end (a
/// quiet read), or after [`LOOK_AT_MOST`].
async fn look_for(session: &StepSession, due: &Due) -> Result<HashSet<EventKey>, BrokerError> {
    let mut unseen = due.keys.clone();
    if unseen.is_empty() {
        return Ok(unseen);
    }
    let skew = SKEW.as_millis() as u64;
    let from = due.from_ms.saturating_sub(skew);
    let past = due.to_ms + skew;
    let mut stream = ResultStream::open(&session.broker, Since::Time(from)).await?;
    let deadline = tokio::time::Instant::now() + LOOK_AT_MOST;
    while !unseen.is_empty() && tokio::time::Instant::now() < deadline {
        let event = match tokio::time::timeout(QUIET, stream.next()).await {
            Ok(Some(event)) => event?,
            Ok(None) | Err(_) => break,
        };
        unseen.remove(&EventKey::of(&event));
        if event.finished_at > past {
            break;
        }
    }
    stream.close().await;
    Ok(unseen)
}

/// Writes one event to the results stream again, straight to the queue (the default exchange),
/// so the check queue does not get it a second time. Retried while the confirm does not come.
async fn write_again(
    session: &StepSession,
    publisher: &Publisher,
    key: &EventKey,
    body: &[u8],
) -> Result<(), String> {
    let stream = session.broker.names().results_stream();
    let id = key.job.to_string();
    loop {
        let msg = Outgoing::persistent("", &stream, body, &id);
        match publisher.publish(msg).await {
            Ok(()) => {
                info!(job_id = %id, "Wrote a lost result event to the results stream again.");
                return Ok(());
            }
            Err(PublishError::Unconfirmed { .. }) => continue,
            Err(error) => return Err(format!("write a result event again: {error}")),
        }
    }
}
