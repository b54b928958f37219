//! Reading job results from the namespace's results stream. A stream keeps every event for
//! days, so a reader can start from any time, including before it subscribed: no race between
//! "submit" and "wait". A reader that opens before it submits can start at the stream's end
//! instead ([`Start::Next`]), and so skips the results other tenants' jobs wrote before.

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use warren_broker::{Broker, BrokerError};
use warren_common::{decode_result, ResultEvent};

/// Credit for the stream consumer; streams require a prefetch.
const PREFETCH: u16 = 500;

/// Acks on a stream only return credit, so the reader acks every this many events at once
/// (`multiple`) instead of each one: one frame and one await per event was the reader's
/// largest cost. Well below [`PREFETCH`], so credit never runs out.
const ACK_EVERY: u32 = 100;

/// Where a [`ResultStream`] begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At the chunk holding this time (ms since the epoch), so a little earlier.
    At(u64),
    /// After the last event written before the subscription: only events published later.
    Next,
}

/// Result events in publish order, from a start on.
pub struct ResultStream {
    channel: Channel,
    consumer: Consumer,
    unacked: u32,
}

impl std::fmt::Debug for ResultStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStream").finish_non_exhaustive()
    }
}

impl ResultStream {
    pub(crate) async fn open(broker: &Broker, start: Start) -> Result<Self, BrokerError> {
        let channel = broker.channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|cause| BrokerError::Amqp {
                action: "set results prefetch".into(),
                cause,
            })?;
        let mut args = FieldTable::default();
        let offset = match start {
            Start::At(ms) => AMQPValue::Timestamp(ms / 1000),
            Start::Next => AMQPValue::LongString("next".into()),
        };
        args.insert("x-stream-offset".into(), offset);
        let consumer = channel
            .basic_consume(
                broker.names().results_stream().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|cause| BrokerError::Amqp {
                action: format!("read {}", broker.names().results_stream()),
                cause,
            })?;
        Ok(Self {
            channel,
            consumer,
            unacked: 0,
        })
    }

    /// The next result event; `Ok(None)` when the stream was closed. Undecodable entries
    /// (written by something else) are skipped.
    pub async fn next(&mut self) -> Result<Option<ResultEvent>, BrokerError> {
        while let Some(delivery) = self.consumer.next().await {
            let delivery = delivery.map_err(|cause| BrokerError::Amqp {
                action: "read results stream".into(),
                cause,
            })?;
            // The event stays in the stream whether acked or not.
            self.unacked += 1;
            if self.unacked >= ACK_EVERY {
                self.unacked = 0;
                let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
            }
            match decode_result(&delivery.data) {
                Ok(event) => return Ok(Some(event)),
                Err(e) => tracing::warn!(error = %e, "Skipped an undecodable result event."),
            }
        }
        Ok(None)
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}
