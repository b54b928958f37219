//! The warren producer SDK: submit jobs (one, or many with pipelined confirms) and wait for
//! their results; list, replay and purge the dead-letter queue.
//!
//! ```no_run
//! use std::time::Duration;
//! use warren_producer::{Client, Job};
//! # async fn demo() -> anyhow::Result<()> {
//! let config = warren_common::Config::load(None, &warren_common::env::ProcessEnv)?;
//! let client = Client::connect(config).await?;
//! let id = client
//!     .submit(Job::new("thumbnails", "acme", serde_json::json!({"url": "https://x/y.png"})))
//!     .await?;
//! let result = client.wait(id, Duration::from_secs(30)).await?;
//! println!("{:?} {}", result.status, result.output);
//! # Ok(()) }
//! ```

mod client;
mod dlq;
mod error;
mod results;

pub use client::{Client, Job};
pub use dlq::{DeadLetter, DlqError, DlqFilter, ReplayOptions, ReplayReport, Skipped};
pub use error::{SubmitError, WaitError};
pub use results::ResultStream;
