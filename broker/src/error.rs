//! Errors of the broker layer. Messages never contain the AMQP password.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// A connection attempt that did not finish within `[broker] connect_timeout`.
    #[error("cannot connect to RabbitMQ at {url}: {}", stage.explain(*waited))]
    ConnectTimeout {
        url: String,
        stage: ConnectStage,
        waited: Duration,
    },
    // The lapin error is in the message, not exposed as `source()`, so a `{:#}` chain does not
    // print it twice.
    #[error("{action}: {cause}")]
    Amqp { action: String, cause: lapin::Error },
    #[error("RabbitMQ management API at {url}: {reason}")]
    Management { url: String, reason: String },
    /// A cap's token queue could not be filled (a token publish was refused or unconfirmed).
    #[error("fill token queue {queue}: {reason}")]
    Fill { queue: String, reason: String },
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
            BrokerError::Connect { .. } | BrokerError::ConnectTimeout { .. } => true,
            BrokerError::Management { .. } | BrokerError::Fill { .. } => false,
            BrokerError::Amqp { cause, .. } => {
                cause.is_io_error() || cause.is_amqp_hard_error() || !cause.can_be_recovered()
            }
        }
    }
}

/// How far a connection attempt got before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStage {
    /// No TCP connection: the host does not answer (a firewall dropping packets looks like this).
    Tcp,
    /// The broker took the TCP connection but did not complete the TLS and AMQP handshake.
    Handshake,
}

impl ConnectStage {
    /// What did not finish, and what commonly causes it.
    fn explain(self, waited: Duration) -> String {
        match self {
            ConnectStage::Tcp => format!(
                "the TCP connect did not complete within {waited:?}; is the host up and the port \
                 open (a firewall that drops packets looks like this)?"
            ),
            ConnectStage::Handshake => format!(
                "the broker accepted the TCP connection but did not complete the AMQP handshake \
                 within {waited:?}; a common cause is the broker's open-files limit (each quorum \
                 queue holds file handles; see docs/deploy.md, 'Open files')"
            ),
        }
    }
}

impl std::fmt::Display for ConnectStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectStage::Tcp => "TCP connect",
            ConnectStage::Handshake => "AMQP handshake",
        })
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
    /// A publish shared with others (a batch of history events) that failed; `reason` says how.
    #[error("a batched publish to {routing_key:?} failed: {reason}")]
    Batched { routing_key: String, reason: String },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(stage: ConnectStage) -> BrokerError {
        BrokerError::ConnectTimeout {
            url: "amqp://guest:***@rabbit:5672/%2f".into(),
            stage,
            waited: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_connect_timeout_names_broker_stage_wait_and_cause_and_is_retried() {
        let tcp = timeout(ConnectStage::Tcp);
        let text = tcp.to_string();
        assert!(text.starts_with("cannot connect to RabbitMQ at amqp://guest:***@rabbit:5672/%2f: the TCP connect did not complete within 10s"), "{text}");
        assert!(text.contains("firewall"), "{text}");
        let text = timeout(ConnectStage::Handshake).to_string();
        assert!(
            text.contains("AMQP handshake within 10s")
                && text.contains("open-files limit")
                && text.contains("docs/deploy.md, 'Open files'"),
            "{text}"
        );
        assert!(tcp.is_connection_lost());
        assert!(timeout(ConnectStage::Handshake).is_connection_lost());
    }
}
