//! Consumer set-up: the prefetch, then the consumer, on one channel.

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};

use crate::error::BrokerError;

/// Starts consuming `queue` on `channel`, with up to `prefetch` unacked deliveries for this
/// consumer (set first: a consumer started before it would be handed the whole queue). The
/// prefetch is per consumer, so several consumers on one channel (a worker's lane) get
/// `prefetch` each. `args` are the consume arguments (a stream's `x-stream-offset`, say). Errors
/// name the queue.
pub async fn consume(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    args: FieldTable,
) -> Result<Consumer, BrokerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(BrokerError::amqp(format!(
            "set prefetch to consume {queue}"
        )))?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(BrokerError::amqp(format!("consume {queue}")))
}

/// The offset RabbitMQ gives each message it delivers from a stream (its `x-stream-offset`
/// header): where a reader that lost its consumer starts again, one past it.
pub fn stream_offset(properties: &BasicProperties) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}
