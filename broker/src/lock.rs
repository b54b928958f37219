//! A lock on RabbitMQ alone: an exclusive, auto-delete queue of a fixed name. The connection
//! that declared it holds it; it is gone with that connection, so a dead holder frees it at once.

use lapin::options::QueueDeclareOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::Channel;

use crate::connection::Broker;
use crate::error::{server_reply, BrokerError};

/// Tries to take the lock `name` once: the channel whose connection now holds it, or `Ok(None)`
/// when another connection does.
pub(crate) async fn try_lock(broker: &Broker, name: &str) -> Result<Option<Channel>, BrokerError> {
    let channel = broker.channel().await?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => Ok(Some(channel)),
        Err(e) if is_locked(&e) => Ok(None),
        Err(cause) => Err(BrokerError::Amqp {
            action: format!("lock {name}"),
            cause,
        }),
    }
}

fn is_locked(err: &lapin::Error) -> bool {
    matches!(
        server_reply(err),
        Some((Some(AMQPSoftError::RESOURCELOCKED), _))
    )
}
