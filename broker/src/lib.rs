//! RabbitMQ for warren: where a step message goes ([`route`]: [`StepRoute`], [`Lane`]), every
//! other exchange and queue name ([`names`]), the topology a config implies and its declaration
//! ([`topology`]), pooled connections ([`Broker`]), publishing that waits for the broker's
//! confirm ([`publish`]), consumer set-up ([`consume()`]), queue-depth reads ([`depth`]), the
//! unacked counts and open-files figures only the management API has ([`management`]), and
//! whether a namespace fits the broker's open-files limit ([`capacity`]), and the token queues
//! of the cluster-wide caps ([`tokens`]), and the workers' presence reports ([`workers`]).
//!
//! Messages themselves (envelope, codec) live in `warren-common`; this crate only moves bytes.

pub mod batch;
pub mod capacity;
pub mod connection;
pub mod consume;
pub mod control;
pub mod depth;
mod dial;
pub mod error;
pub mod fanin;
pub mod history;
pub mod hot;
mod lock;
pub mod management;
mod members;
pub mod names;
pub mod publish;
pub mod route;
mod spread;
pub mod tenants;
pub mod tokens;
pub mod topology;
pub mod workers;

pub use batch::BatchWriter;
pub use connection::{connection_name, Broker};
pub use consume::{consume, stream_offset};
pub use control::HotRouter;
pub use error::{BrokerError, ConnectStage, PublishError, TopologyError};
pub use history::{HistoryError, HistoryWriter};
pub use hot::{HotMark, HotReason, HotSet, HotTenant};
pub use lapin;
pub use management::{Management, NodeFiles, QueueInfo};
pub use names::Names;
pub use publish::{Outgoing, PendingConfirm, Publisher};
pub use route::{Lane, StepRoute};
pub use tokens::TokenQueue;
pub use topology::Topology;
