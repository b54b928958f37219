//! The warren producer SDK: submit jobs (one, or many with pipelined confirms) and wait for
//! their results; list, replay and purge the dead-letter queue. Everything a producer needs is
//! re-exported here, so this is the only warren crate it depends on.
//!
//! ```no_run
//! use std::time::Duration;
//! use warren_producer::{Client, Job, JobStatus};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // $WARREN_CONFIG or ./warren.toml, with the WARREN_* overrides.
//! let client = Client::from_env().await?;
//! let id = client
//!     .submit(Job::new("thumbnails", "acme", serde_json::json!({"url": "https://x/y.png"})))
//!     .await?;
//! let result = client.wait(id, Duration::from_secs(30)).await?;
//! if result.status == JobStatus::Succeeded {
//!     println!("{}", result.output);
//! }
//! # Ok(()) }
//! ```

mod client;
mod dlq;
mod error;
mod flood;
mod history;
mod results;
pub mod schedules;

pub use client::{Client, Job, CONFIRM_WINDOW};
pub use dlq::{DeadLetter, DlqError, DlqFilter, ReplayOptions, ReplayReport, Skipped};
pub use error::{ConnectError, SubmitError, WaitError};
pub use history::{HistoryError, JobFilter};
pub use results::{ResultStream, Since, Waiting};
pub use warren_broker::{BrokerError, HotTenant, PublishError};
pub use warren_common::env::{Env, ProcessEnv};
pub use warren_common::history::{Attempt, JobState, Outcome, Parts, Status};
pub use warren_common::trace::TraceParent;
pub use warren_common::{Config, ConfigError, JobId, JobStatus, Priority, ResultEvent, TenantId};
