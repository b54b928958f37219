//! The fan-in stream `{ns}.fanin` and what goes with it: the record that opens a fan-out, the
//! parts' ends (appended in batches by a [`crate::batch::BatchWriter`]), the coordinator's checkpoints
//! `{ns}.fanin.ckpt`, and the lock `{ns}.fanin.lock` whose holder is the one coordinator. The
//! fold itself is pure, in `warren_common::fanout`; the coordinator is the worker's `fanin`
//! module.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};
use warren_common::fanin::{Checkpoint, Restored};
use warren_common::fanout::{EndedPart, Opened};
use warren_common::ResultEvent;

use crate::connection::Broker;
use crate::error::{BrokerError, PublishError};
use crate::publish::{Outgoing, Publisher};

/// What the fan-in stream is bound to on the events exchange.
pub const FANIN_BINDING: &str = "fanin.#";

/// Routing key of an opened record.
pub const OPENED_KEY: &str = "fanin.opened";

/// Routing key of a batch of parts' ends.
pub const ENDS_KEY: &str = "fanin.ends";

/// The extra routing key (`CC`) of a part's result event, as workers before the batched ends
/// copied it here: still read, so a stream written by them folds the same.
pub const PART_KEY: &str = "fanin.part";

/// Quiet time after which reading the last checkpoint counts as done.
const QUIET: Duration = Duration::from_millis(500);

/// How long the first checkpoint may take to come: longer than [`QUIET`], since a busy broker
/// can be slow to start a stream consumer, and a checkpoint missed costs a refold of the whole
/// fan-in stream. Only a namespace with no checkpoint yet waits it out.
const FIRST_WAIT: Duration = Duration::from_secs(3);

/// Appends `opened` to the fan-in stream and waits for the confirm.
pub async fn publish_opened(
    publisher: &Publisher,
    exchange: &str,
    opened: &Opened,
) -> Result<(), PublishError> {
    let body = rmp_serde::to_vec_named(opened).expect("an opened record encodes");
    let id = format!("fanin:{}", opened.parent);
    publisher
        .publish(Outgoing::persistent(exchange, OPENED_KEY, &body, &id))
        .await
}

/// One message of the fan-in stream.
#[derive(Debug)]
pub enum FaninRecord {
    Opened(Box<Opened>),
    /// A batch of parts' ends, in the order they were appended.
    Ends(Vec<EndedPart>),
    /// One part's result event (the copy older workers made).
    Result(Box<ResultEvent>),
    /// Not ours, or not readable: skipped.
    Other,
}

impl FaninRecord {
    /// Reads a delivery of the fan-in stream, told apart by its routing key.
    pub fn read(routing_key: &str, body: &[u8]) -> Self {
        if routing_key == OPENED_KEY {
            match rmp_serde::from_slice::<Opened>(body) {
                Ok(opened) => FaninRecord::Opened(Box::new(opened)),
                Err(_) => FaninRecord::Other,
            }
        } else if routing_key == ENDS_KEY {
            FaninRecord::Ends(EndedPart::decode_batch(body))
        } else {
            match warren_common::decode_result(body) {
                Ok(event) => FaninRecord::Result(Box::new(event)),
                Err(_) => FaninRecord::Other,
            }
        }
    }
}

/// Consumes `stream` from `offset` (a number, or "last"/"first").
async fn consume_from(
    broker: &Broker,
    stream: &str,
    offset: AMQPValue,
    prefetch: u16,
) -> Result<(Channel, Consumer), BrokerError> {
    let channel = broker.channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    let consumer = crate::consume(&channel, stream, prefetch, args).await?;
    Ok((channel, consumer))
}

/// Consumes the fan-in stream from `offset` on.
pub async fn read_fanin(
    broker: &Broker,
    offset: u64,
    prefetch: u16,
) -> Result<(Channel, Consumer), BrokerError> {
    let stream = broker.names().fanin_stream();
    consume_from(
        broker,
        &stream,
        AMQPValue::LongLongInt(offset as i64),
        prefetch,
    )
    .await
}

/// The newest checkpoint, in either format; `None` when there is none (or it cannot be read:
/// then the coordinator folds the whole stream, which is slower, never wrong).
pub async fn last_checkpoint(broker: &Broker) -> Result<Option<Restored>, BrokerError> {
    let stream = broker.names().fanin_checkpoints();
    let last = AMQPValue::LongString(LongString::from("last"));
    let (channel, mut consumer) = consume_from(broker, &stream, last, 100).await?;
    let mut newest: Option<(u64, Vec<u8>)> = None;
    let mut wait = FIRST_WAIT;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, consumer.next()).await {
        wait = QUIET;
        let offset = crate::stream_offset(&delivery.properties).unwrap_or(0);
        if newest.as_ref().is_none_or(|(o, _)| offset >= *o) {
            newest = Some((offset, delivery.data.clone()));
        }
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
    let _ = channel.close(200, "read".into()).await;
    Ok(newest.and_then(|(_, body)| Restored::read(&body)))
}

/// Appends a checkpoint and waits for the confirm.
pub async fn checkpoint(
    publisher: &Publisher,
    stream: &str,
    checkpoint: &Checkpoint,
) -> Result<(), PublishError> {
    let body = checkpoint.encode();
    let id = format!("ckpt:{}", checkpoint.next_offset);
    publisher
        .publish(Outgoing::persistent("", stream, &body, &id))
        .await
}

/// Tries to take the coordinator's lock: an exclusive queue, held by this channel's connection
/// and gone with it. `Ok(None)`: another connection holds it.
pub async fn try_lock(broker: &Broker) -> Result<Option<Channel>, BrokerError> {
    crate::lock::try_lock(broker, &broker.names().fanin_lock()).await
}
