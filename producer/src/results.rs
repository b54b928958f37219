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
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use warren_broker::{Broker, BrokerError};
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
/// one). Ends when the broker closes it. Undecodable entries (written by something else) are
/// skipped. To wait for jobs, turn it into a [`Waiting`] ([`ResultStream::wait_for`]).
pub struct ResultStream {
    channel: Channel,
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
        let channel = broker.channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), since.offset());
        let stream = broker.names().results_stream();
        let consumer = warren_broker::consume(&channel, &stream, PREFETCH, args).await?;
        Ok(Self {
            channel,
            events: events(consumer).boxed(),
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
        let _ = self.channel.close(200, "done".into()).await;
    }
}

impl Stream for ResultStream {
    type Item = Result<ResultEvent, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// The decoded events of a stream consumer, acking for credit as it goes.
fn events(consumer: Consumer) -> impl Stream<Item = Result<ResultEvent, BrokerError>> {
    futures::stream::unfold((consumer, 0u32), |(mut consumer, mut unacked)| async move {
        while let Some(delivery) = consumer.next().await {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(cause) => {
                    let error = BrokerError::Amqp {
                        action: "read results stream".into(),
                        cause,
                    };
                    return Some((Err(error), (consumer, unacked)));
                }
            };
            // The event stays in the stream whether acked or not.
            unacked += 1;
            if unacked >= ACK_EVERY {
                unacked = 0;
                let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
            }
            match decode_result(&delivery.data) {
                Ok(event) => return Some((Ok(event), (consumer, unacked))),
                Err(e) => tracing::warn!(error = %e, "Skipped an undecodable result event."),
            }
        }
        None
    })
}
