//! Shared vocabulary of warren: the message envelope and its MessagePack codec, validated ids and
//! names, the tenant-to-shard function, the config model, and tracing set-up.
//!
//! Nothing here talks to RabbitMQ; that is `warren-broker`'s job. Everything here is pure and
//! unit-tested, so producers in other languages can be checked against it.

pub mod backoff;
pub mod bin;
pub mod bundle;
pub mod codec;
pub mod config;
pub mod dead_letter;
pub mod env;
pub mod envelope;
pub mod exit;
pub mod fanin;
pub mod fanout;
pub mod history;
pub mod ids;
pub mod priority;
pub mod schedule;
pub mod shard;
pub mod telemetry;
pub mod trace;

pub use codec::{decode, decode_result, decode_results, encode, encode_result, DecodeError};
pub use config::{Config, ConfigError, OnPartFailure, PipelineConfig, StepConfig, StepKind};
pub use dead_letter::Reason;
pub use envelope::{now_ms, Envelope, JobStatus, Oversized, ResultEvent, FORMAT_VERSION};
pub use ids::{JobId, NameError, TenantId};
pub use priority::Priority;
