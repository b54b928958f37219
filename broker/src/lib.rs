//! RabbitMQ for warren: every exchange and queue name ([`names`]), the topology a config implies
//! and its declaration ([`topology`]), pooled connections ([`Broker`]), publishing that waits for
//! the broker's confirm ([`publish`]), and queue-depth reads ([`depth`]).
//!
//! Messages themselves (envelope, codec) live in `warren-common`; this crate only moves bytes.

pub mod connection;
pub mod depth;
pub mod error;
pub mod names;
pub mod publish;
pub mod topology;

pub use connection::Broker;
pub use error::{BrokerError, PublishError, TopologyError};
pub use lapin;
pub use names::Names;
pub use publish::{Outgoing, PendingConfirm, Publisher};
pub use topology::Topology;
