//! Queue depth through passive declares: works on any broker, no management plugin needed.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::connection::Broker;
use crate::error::BrokerError;

/// Ready (not yet delivered) messages in `queue`, or `None` when the queue does not exist.
pub async fn ready_messages(broker: &Broker, queue: &str) -> Result<Option<u32>, BrokerError> {
    // A passive declare of a missing queue closes its channel, so each read gets its own.
    let channel = broker.channel().await?;
    let result = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(q) => {
            let _ = channel.close(200, "done".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(e)
            if crate::error::server_reply(&e)
                .is_some_and(|(_, text)| text.contains("NOT_FOUND")) =>
        {
            Ok(None)
        }
        Err(e) => Err(BrokerError::Amqp {
            action: format!("read depth of {queue}"),
            cause: e,
        }),
    }
}
