//! The warren worker runtime: consume step queues, run each step (a Rust handler or a command),
//! hand its output to the next step with a confirmed publish, and only then ack.
//!
//! ```no_run
//! use warren_worker::{handler_fn, StepContext, StepError, Worker};
//! # async fn demo(config: warren_common::Config) -> anyhow::Result<()> {
//! let worker = Worker::builder(config)
//!     .handler("shout", handler_fn(|text: String, _ctx: StepContext| async move {
//!         Ok::<_, StepError>(text.to_uppercase())
//!     }))
//!     .build()?;
//! worker.run(warren_worker::shutdown::signal()).await?;
//! # Ok(()) }
//! ```
//!
//! Module map: [`handler`] (the trait users implement), [`registry`] (name -> handler),
//! [`command`] (command steps), [`dispatch`] (which queue to serve next: pure), `step` (one
//! delivery from decode to ack), `runtime` (consumers, concurrency, shutdown), [`cli`] (the
//! `warren-worker` command line, reusable by custom worker binaries), [`supervisor`] (the
//! autoscaling supervisor behind `warren-worker supervise`).

pub mod cli;
pub mod command;
pub mod dispatch;
pub mod handler;
pub mod metrics;
pub mod registry;
mod runtime;
pub mod shutdown;
mod step;
pub mod supervisor;

pub use handler::{handler_fn, StepContext, StepError, StepHandler};
pub use runtime::{Worker, WorkerBuilder, WorkerError, DEFAULT_SHUTDOWN_GRACE};
