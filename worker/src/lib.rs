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
//! The public surface is what a worker binary needs: the handler trait and its helpers, the
//! [`Worker`] and its builder, [`cli::main`] (the `warren-worker` command line, reusable by a
//! custom worker binary with its own handlers) and [`shutdown`] signals. Inside: `builder` and
//! `runtime` (the worker and its sessions), `intake` (one served step's consumers, buffers and
//! dispatcher), `dispatch` (which queue to serve next: pure), `step` (one delivery from decode
//! to ack: pure decisions in `step::fate`, effects in `step::outbox`), `fairness` (noticing hot
//! tenants and moving their queued messages to hot lanes), `presence` (the worker's periodic report
//! on itself, for the console's list of workers), `registry` (name ->
//! handler), `command` (command steps), `metrics`, and `supervisor` (the autoscaling supervisor
//! behind `warren-worker supervise`).

mod builder;
mod cap;
pub mod cli;
mod command;
mod dispatch;
mod fairness;
mod fanin;
mod handler;
mod intake;
mod metrics;
mod presence;
mod registry;
mod results_check;
mod runtime;
mod schedules;
pub mod shutdown;
mod step;
mod supervisor;

pub use builder::{WorkerBuilder, WorkerError};
pub use handler::{handler_fn, FnHandler, StepContext, StepError, StepHandler};
pub use runtime::{Worker, DEFAULT_SHUTDOWN_GRACE};
