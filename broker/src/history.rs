//! The history stream `{ns}.history`: a [`HistoryWriter`] appends lifecycle events in batches
//! (one task per process, many events per stream message), and [`read`] reads them back from a
//! time on, up to the stream's end at the time of the call. The events and their fold are
//! `warren_common::history`.
//!
//! What is confirmed when: [`HistoryWriter::record_confirmed`] resolves once the batch holding
//! the events is confirmed by the broker, so a worker acks a delivery only after its terminal
//! events (succeeded, retried, failed, dead-lettered) are stored, as with results.
//! [`HistoryWriter::record`] ("started" events) waits for nothing: such an event rides in the
//! next batch, and one lost with a crashed process only leaves an attempt without its start
//! time (the attempt's end says how long it took).

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::{mpsc, oneshot};
use warren_common::config::BrokerConfig;
use warren_common::history::{Batch, Event, MAX_EVENTS_PER_MESSAGE};
use warren_common::{now_ms, JobId};

use crate::connection::Broker;
use crate::error::{BrokerError, PublishError};
use crate::publish::{Outgoing, PendingConfirm, Publisher};

/// Batches published and not yet confirmed at once: the next batch fills while these wait.
const IN_FLIGHT: usize = 4;

/// How far before a job's id time reading starts: clock skew between machines, and the
/// granularity of a stream's timestamp offset (a chunk).
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// Credit of a reader's consumer (each message holds up to 500 events).
const PREFETCH: u16 = 200;

/// A history write that did not reach the broker (for every event of the batch).
#[derive(Debug, Clone, thiserror::Error)]
#[error("history stream {stream}: {reason}")]
pub struct HistoryError {
    pub stream: String,
    pub reason: String,
}

impl From<HistoryError> for PublishError {
    fn from(e: HistoryError) -> Self {
        PublishError::Batched {
            routing_key: e.stream,
            reason: e.reason,
        }
    }
}

type Waiter = oneshot::Sender<Result<(), HistoryError>>;

/// Events for the writer's task, with who waits for their confirm.
struct Item {
    events: Vec<Event>,
    waiter: Option<Waiter>,
}

/// A handle on the process's history writer; clones share the one task. The task ends when
/// every handle is dropped, after writing what it holds.
#[derive(Debug, Clone)]
pub struct HistoryWriter {
    tx: mpsc::UnboundedSender<Item>,
    stream: String,
}

/// Where the writer's task gets its connection.
enum Source {
    /// Its own, opened when first needed and again after a failure.
    Own(BrokerConfig, Option<Broker>),
    /// The caller's (whose pool replaces a broken connection).
    Shared(Broker),
}

impl HistoryWriter {
    /// A writer with a connection of its own: a worker's sessions come and go with their
    /// connections, the history writer outlives them.
    pub fn start(config: &BrokerConfig) -> Self {
        Self::spawn(
            crate::names::Names::new(&config.namespace).history_stream(),
            Source::Own(config.clone(), None),
        )
    }

    /// A writer on `broker`'s connections (a producer's).
    pub fn on(broker: &Broker) -> Self {
        Self::spawn(
            broker.names().history_stream(),
            Source::Shared(broker.clone()),
        )
    }

    fn spawn(stream: String, source: Source) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(stream.clone(), source, rx));
        Self { tx, stream }
    }

    /// Queues `event` for the next batch; waits for nothing.
    pub fn record(&self, event: Event) {
        let _ = self.tx.send(Item {
            events: vec![event],
            waiter: None,
        });
    }

    /// Queues `events` and resolves once the broker confirmed the batch(es) holding them.
    pub async fn record_confirmed(&self, events: Vec<Event>) -> Result<(), HistoryError> {
        self.send(events).wait().await
    }

    /// Queues `events` at once; the returned [`Recorded`] resolves once the batch(es) holding
    /// them are confirmed. A caller with more to do meanwhile (publishing the next jobs) waits
    /// on it later.
    pub fn send(&self, mut events: Vec<Event>) -> Recorded {
        let mut confirms = Vec::new();
        while !events.is_empty() {
            let rest = events.split_off(events.len().min(MAX_EVENTS_PER_MESSAGE));
            let (waiter, done) = oneshot::channel();
            let item = Item {
                events: std::mem::replace(&mut events, rest),
                waiter: Some(waiter),
            };
            // A stopped writer drops the waiter, which `wait` reports.
            let _ = self.tx.send(item);
            confirms.push(done);
        }
        Recorded {
            confirms,
            stream: self.stream.clone(),
        }
    }
}

/// Events queued by [`HistoryWriter::send`], awaiting their confirm.
#[must_use = "wait for the confirm, or the events may be lost with the process"]
#[derive(Debug)]
pub struct Recorded {
    confirms: Vec<oneshot::Receiver<Result<(), HistoryError>>>,
    stream: String,
}

impl Recorded {
    /// Resolves once every batch holding the events was confirmed.
    pub async fn wait(self) -> Result<(), HistoryError> {
        for done in self.confirms {
            done.await.map_err(|_| HistoryError {
                stream: self.stream.clone(),
                reason: "the history writer has stopped".into(),
            })??;
        }
        Ok(())
    }
}

/// The writer's task: takes whatever is queued (up to a message's worth), publishes it, and
/// goes on with the next batch while up to [`IN_FLIGHT`] confirms are outstanding. Under load
/// the queue fills while confirms are awaited, so batches grow by themselves; idle, an event
/// goes out at once.
async fn write(stream: String, mut source: Source, mut rx: mpsc::UnboundedReceiver<Item>) {
    let mut publisher: Option<Publisher> = None;
    let mut pending = FuturesUnordered::new();
    let mut carry: Option<Item> = None;
    let mut open = true;
    loop {
        // Wait for work or for a confirm, whichever comes.
        if carry.is_none() {
            tokio::select! {
                item = rx.recv(), if open && pending.len() < IN_FLIGHT => match item {
                    Some(item) => carry = Some(item),
                    None => open = false,
                },
                Some(()) = pending.next(), if !pending.is_empty() => continue,
                else => return,
            }
        }
        let Some(first) = carry.take() else {
            continue;
        };
        let mut events = first.events;
        let mut waiters: Vec<Waiter> = first.waiter.into_iter().collect();
        // Whole items only, so one caller's events go in one message when they fit.
        while events.len() < MAX_EVENTS_PER_MESSAGE {
            match rx.try_recv() {
                Ok(item) if events.len() + item.events.len() <= MAX_EVENTS_PER_MESSAGE => {
                    events.extend(item.events);
                    waiters.extend(item.waiter);
                }
                Ok(item) => {
                    carry = Some(item);
                    break;
                }
                Err(_) => break,
            }
        }
        let body = Batch::events(events).encode();
        let started = publish(&stream, &mut source, &mut publisher, &body).await;
        pending.push(settle(stream.clone(), started, waiters));
        if pending.len() >= IN_FLIGHT {
            pending.next().await;
        }
    }
}

/// Sends one batch; the error says why it could not be sent.
async fn publish(
    stream: &str,
    source: &mut Source,
    publisher: &mut Option<Publisher>,
    body: &[u8],
) -> Result<PendingConfirm, HistoryError> {
    let fail = |reason: String| HistoryError {
        stream: stream.to_string(),
        reason,
    };
    if publisher.is_none() {
        let broker = match source {
            Source::Shared(broker) => broker.clone(),
            Source::Own(config, broker) => match broker {
                Some(b) => b.clone(),
                None => {
                    let fresh = Broker::connect(config)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    *broker = Some(fresh.clone());
                    fresh
                }
            },
        };
        let fresh = Publisher::new(&broker)
            .await
            .map_err(|e| fail(e.to_string()))?
            .reconnect_patience(Duration::from_secs(5));
        *publisher = Some(fresh);
    }
    let msg = Outgoing::persistent("", stream, body, "history");
    let sent = publisher.as_ref().expect("set above").start(msg).await;
    sent.map_err(|e| {
        // Start afresh next time: a new channel, and for an own connection a new connection.
        *publisher = None;
        if let Source::Own(_, broker) = source {
            *broker = None;
        }
        fail(e.to_string())
    })
}

/// Waits for a batch's confirm and tells its waiters.
async fn settle(
    stream: String,
    started: Result<PendingConfirm, HistoryError>,
    waiters: Vec<Waiter>,
) {
    let outcome = match started {
        Ok(confirm) => confirm.wait().await.map_err(|e| HistoryError {
            stream,
            reason: e.to_string(),
        }),
        Err(e) => Err(e),
    };
    if let Err(error) = &outcome {
        tracing::warn!(%error, "A history batch was not stored.");
    }
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

/// Why the history cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream does not exist: history is off, or the topology was not applied with it on.
    #[error("the history stream {0} does not exist")]
    Missing(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("history stream: cannot write the end marker: {0}")]
    Marker(PublishError),
    #[error("history stream: the broker ended the read before its end")]
    Ended,
}

/// The events written from `from_ms` (less [`CLOCK_SKEW_MS`]) up to now that `keep` keeps, in
/// stream order. Where "now" ends: the reader appends an end marker (a message without events)
/// and reads until it meets it, so it never waits on a quiet stream for a timeout.
pub async fn read(
    broker: &Broker,
    from_ms: u64,
    mut keep: impl FnMut(&Event) -> bool,
) -> Result<Vec<Event>, ReadError> {
    let stream = broker.names().history_stream();
    if crate::depth::ready_messages(broker, &stream)
        .await?
        .is_none()
    {
        return Err(ReadError::Missing(stream));
    }
    let nonce = format!("end:{}:{}", std::process::id(), JobId::new());
    let publisher = Publisher::new(broker).await?;
    let body = Batch::marker(nonce.clone()).encode();
    publisher
        .publish(Outgoing::persistent("", &stream, &body, "history-end"))
        .await
        .map_err(ReadError::Marker)?;
    let channel = broker.channel().await?;
    let mut args = FieldTable::default();
    let since = from_ms.saturating_sub(CLOCK_SKEW_MS).min(now_ms());
    args.insert("x-stream-offset".into(), AMQPValue::Timestamp(since / 1000));
    let mut consumer = crate::consume(&channel, &stream, PREFETCH, args).await?;
    let mut kept = Vec::new();
    let mut read = 0u64;
    let mut ended = false;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(BrokerError::amqp(format!("read {stream}")))?;
        read += 1;
        if let Some(batch) = Batch::decode(&delivery.data) {
            if batch.marker.as_deref() == Some(nonce.as_str()) {
                ended = true;
                break;
            }
            kept.extend(batch.events.into_iter().filter(|e| keep(e)));
        }
        // Acks on a stream only return credit.
        if read.is_multiple_of(u64::from(PREFETCH / 2)) {
            let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
        }
    }
    let _ = channel.close(200, "read".into()).await;
    if !ended {
        return Err(ReadError::Ended);
    }
    Ok(kept)
}
