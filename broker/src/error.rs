//! Errors of the broker layer. Messages never contain the AMQP password.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    // The lapin error is in the message, not exposed as `source()`, so a `{:#}` chain does not
    // print it twice.
    #[error("{action}: {cause}")]
    Amqp { action: String, cause: lapin::Error },
    #[error("RabbitMQ management API at {url}: {reason}")]
    Management { url: String, reason: String },
}

impl BrokerError {
    /// Wraps a lapin error with what was being done: `.map_err(BrokerError::amqp("declare x"))`.
    pub fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let action = action.into();
        move |cause| BrokerError::Amqp { action, cause }
    }

    /// True when the connection (not just one call) is gone: the caller should reconnect.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            BrokerError::Connect { .. } => true,
            BrokerError::Management { .. } => false,
            BrokerError::Amqp { cause, .. } => {
                cause.is_io_error() || cause.is_amqp_hard_error() || !cause.can_be_recovered()
            }
        }
    }
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error("nothing on the broker takes {routing_key:?} from exchange {exchange:?}: is the topology applied (`warren topology apply`)?")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// A negative confirm. warren's step queues refuse publishes when they hold
    /// `max_queue_length` messages, so this usually means "backlog full, try later".
    #[error("the broker refused the message for {routing_key:?} (negative confirm: the queue is full, or the broker is out of resources)")]
    Nacked { routing_key: String },
    /// No confirm came in time: the message may or may not be stored.
    #[error("no confirm from the broker for {routing_key:?} within {waited:?}; the message may or may not be stored")]
    Unconfirmed {
        routing_key: String,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The broker's topology does not match what the config asks for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    #[error("{kind} {name:?} already exists with other settings than the config asks for ({detail}); delete it (or pick another namespace) to apply this config")]
    Conflict {
        kind: &'static str,
        name: String,
        detail: String,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The broker's reply code and text, when `err` is a channel or connection close from the server.
pub(crate) fn server_reply(err: &lapin::Error) -> Option<(Option<AMQPSoftError>, String)> {
    if let lapin::ErrorKind::ProtocolError(e) = err.kind() {
        let soft = match e.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        };
        return Some((soft, e.get_message().to_string()));
    }
    None
}
