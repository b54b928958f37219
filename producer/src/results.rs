//! Reading job results from the namespace's results stream. A stream keeps every event for
//! days, so a reader can start from any time, including before it subscribed: no race between
//! "submit" and "wait". A reader that opens before it submits can start at the stream's end
//! instead ([`Since::Now`]), and so skips the results other tenants' jobs wrote before.
//!
//! [`ResultStream`] gives every event as it was written; [`Waiting`] (built on one) gives each
//! job's result once it is final, with the catch-up after a failure that every wait needs.

mod catch_up;
mod waiting;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use warren_broker::{Broker, BrokerError};
use warren_common::backoff::Backoff;
use warren_common::{decode_result, JobId, ResultEvent};

pub use waiting::Waiting;

/// Credit for the stream consumer; streams require a prefetch.
const PREFETCH: u16 = 500;

/// Acks on a stream only return credit, so the reader acks every this many events at once
/// (`multiple`) instead of each one: one frame and one await per event was the reader's
/// largest cost. Well below [`PREFETCH`], so credit never runs out.
const ACK_EVERY: u32 = 100;

/// How far before a job's id-time [`Since::Job`] starts reading, for clock skew between
/// machines.
const CLOCK_SKEW_MS: u64 = 10_000;

/// Where reading the results stream begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Since {
    /// At the stream's end: only results published after the reader opened. Open it before
    /// submitting the jobs you will wait for: their results cannot come before it, and the
    /// reader does not first read through every result of the last seconds, which under
    /// another tenant's flood is tens of thousands of events.
    Now,
    /// At the chunk holding this time (ms since the epoch), so results a little older come too.
    Time(u64),
    /// From a little before the job was submitted (its id's time, less a margin for clock skew
    /// between machines): where a wait for a job that may have finished already reads.
    Job(JobId),
}

impl Since {
    /// The `x-stream-offset` of a consumer that starts here.
    fn offset(self) -> AMQPValue {
        match self {
            Since::Now => AMQPValue::LongString("next".into()),
            Since::Time(ms) => AMQPValue::Timestamp(ms / 1000),
            Since::Job(id) => {
                let ms = id.timestamp_ms().unwrap_or(0).saturating_sub(CLOCK_SKEW_MS);
                AMQPValue::Timestamp(ms / 1000)
            }
        }
    }
}

/// Result events in publish order, from a start on: a [`Stream`] of every event as written
/// (a job replayed from the dead-letter queue has two, and at-least-once delivery can repeat
/// one). When its connection goes away (a broker restart, a node lost), it opens again just
/// after the last event it read, so a reader sees every event once across the outage. Ends
/// when the broker ends it for good (the stream was deleted). Undecodable entries (written by
/// something else) are skipped. To wait for jobs, turn it into a [`Waiting`]
/// ([`ResultStream::wait_for`]).
pub struct ResultStream {
    /// The current consumer's channel, replaced when the reader opens again.
    channel: Arc<Mutex<Channel>>,
    events: BoxStream<'static, Result<ResultEvent, BrokerError>>,
}

impl std::fmt::Debug for ResultStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStream").finish_non_exhaustive()
    }
}

impl ResultStream {
    /// Opens a reader on `broker` (a process without a [`crate::Client`]: a worker).
    pub async fn open(broker: &Broker, since: Since) -> Result<Self, BrokerError> {
        let start = Start::Since(since);
        let (channel, consumer) = subscribe(broker, start).await?;
        let channel = Arc::new(Mutex::new(channel));
        let reader = Reader {
            broker: broker.clone(),
            start,
            consumer,
            channel: Arc::clone(&channel),
        };
        Ok(Self {
            channel,
            events: events(reader).boxed(),
        })
    }

    /// Waits up to `timeout` for these jobs' results; see [`Waiting`].
    pub fn wait_for(
        self,
        ids: impl IntoIterator<Item = JobId>,
        timeout: std::time::Duration,
    ) -> Waiting {
        Waiting::jobs(self, ids, timeout)
    }

    /// The result of every job, each once it is final, for as long as the stream is read: for
    /// a reader that counts completions of jobs it learns about as it goes. See [`Waiting`].
    pub fn settled(self) -> Waiting {
        Waiting::every(self)
    }

    pub async fn close(self) {
        let channel = self.channel.lock().expect("channel lock").clone();
        let _ = channel.close(200, "done".into()).await;
    }
}

impl Stream for ResultStream {
    type Item = Result<ResultEvent, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// Where a reader's consumer starts: where it was asked to, until it has read an event; then
/// just after the last one read.
#[derive(Debug, Clone, Copy)]
enum Start {
    Since(Since),
    After(u64),
}

impl Start {
    fn offset(self) -> AMQPValue {
        match self {
            Start::Since(since) => since.offset(),
            Start::After(offset) => AMQPValue::LongLongInt(offset.saturating_add(1) as i64),
        }
    }
}

/// A consumer of the results stream from `start`, on a channel of its own.
async fn subscribe(broker: &Broker, start: Start) -> Result<(Channel, Consumer), BrokerError> {
    let channel = broker.channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), start.offset());
    let stream = broker.names().results_stream();
    let consumer = warren_broker::consume(&channel, &stream, PREFETCH, args).await?;
    Ok((channel, consumer))
}

/// A stream consumer that opens again where it stopped when its connection goes away.
struct Reader {
    broker: Broker,
    start: Start,
    consumer: Consumer,
    channel: Arc<Mutex<Channel>>,
}

impl Reader {
    /// The next delivery. A lost connection, or a consumer the broker ended (its stream's
    /// member went away), is followed by a new consumer from just after the last delivery;
    /// any other error ends the reader.
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        loop {
            let why = match self.consumer.next().await {
                Some(Ok(delivery)) => {
                    if let Some(offset) = warren_broker::stream_offset(&delivery.properties) {
                        self.start = Start::After(offset);
                    }
                    return Some(Ok(delivery));
                }
                Some(Err(cause)) => {
                    let error = BrokerError::Amqp {
                        action: "read results stream".into(),
                        cause,
                    };
                    if !error.is_connection_lost() {
                        return Some(Err(error));
                    }
                    error.to_string()
                }
                None => "the broker ended the consumer".to_string(),
            };
            tracing::warn!(error = %why, "Lost the results stream; reading on from where it stopped.");
            if let Err(e) = self.reopen().await {
                return Some(Err(e));
            }
        }
    }

    /// A new consumer from where the last one stopped, tried with backoff while the connection
    /// is what fails.
    async fn reopen(&mut self) -> Result<(), BrokerError> {
        let mut backoff = Backoff::reconnect();
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match subscribe(&self.broker, self.start).await {
                Ok((channel, consumer)) => {
                    *self.channel.lock().expect("channel lock") = channel;
                    self.consumer = consumer;
                    tracing::info!(tries = backoff.tries(), "Reading the results stream again.");
                    return Ok(());
                }
                Err(e) if e.is_connection_lost() => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The decoded events of a reader, acking for credit as it goes.
fn events(reader: Reader) -> impl Stream<Item = Result<ResultEvent, BrokerError>> {
    futures::stream::unfold((reader, 0u32), |(mut reader, mut unacked)| async move {
        while let Some(delivery) = reader.next().await {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(error) => return Some((Err(error), (reader, unacked))),
            };
            // The event stays in the stream whether acked or not.
            unacked += 1;
            if unacked >= ACK_EVERY {
                unacked = 0;
                let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
            }
            match decode_result(&delivery.data) {
                Ok(event) => return Some((Ok(event), (reader, unacked))),
                Err(e) => tracing::warn!(error = %e, "Skipped an undecodable result event."),
            }
        }
        None
    })
}
