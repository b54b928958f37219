//! Job history: the lifecycle events workers and producers append to the stream
//! `{ns}.history` ([`event`]), and the pure fold of a job's events into where it is and what
//! happened to it ([`fold()`]). Writing and reading the stream is `warren_broker::history`.

pub mod event;
pub mod fold;
mod pack;

pub use event::{Batch, Event, Kind, HISTORY_VERSION, MAX_EVENTS_PER_MESSAGE};
pub use fold::{fold, fold_all, with_parts, Attempt, JobState, Outcome, Parts, Status};
