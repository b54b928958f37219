//! The headers a dead letter in `{ns}.dlq` carries (docs/wire-format.md, "Dead letters"). The
//! worker writes them; the producer SDK's `dlq` operations read them.

/// A short machine code: why the message was set aside.
pub const REASON: &str = "x-warren-reason";
/// Human-readable detail: the step's error, with the tail of stderr for commands.
pub const ERROR: &str = "x-warren-error";
/// The queue the message was taken from.
pub const QUEUE: &str = "x-warren-queue";
/// When it was set aside, ms since the Unix epoch, as decimal text.
pub const FAILED_AT: &str = "x-warren-failed-at";

/// Set by RabbitMQ when it dead-letters a message itself (a quorum queue's delivery limit).
pub const BROKER_REASON: &str = "x-first-death-reason";
/// The queue RabbitMQ dead-lettered the message from.
pub const BROKER_QUEUE: &str = "x-first-death-queue";
