//! Everything observable on a delivery's path, one value per happening: [`Event::emit`] writes
//! its log line and moves its metrics together, with the same labels, so the two cannot drift
//! apart. Names and labels are in docs/metrics.md.

use std::time::Duration;

use tracing::{debug, error, info, warn};
use warren_common::{Priority, Reason};

use super::fate::GaveUp;
use crate::handler::StepError;
use crate::metrics::{Metrics, Outcome, PublishKind};

/// Something that happened to a delivery.
pub(crate) trait Event {
    /// Logs it and counts it.
    fn emit(self, metrics: &Metrics);
}

/// The step a metric is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepLabels<'a> {
    pub(crate) pipeline: &'a str,
    pub(crate) step: &'a str,
    pub(crate) priority: Priority,
}

impl StepLabels<'_> {
    fn execution(&self, metrics: &Metrics, outcome: Outcome, took: Option<Duration>) {
        metrics.execution(self.pipeline, self.step, self.priority, outcome, took);
    }

    fn job_finished(&self, metrics: &Metrics, succeeded: bool, took: Duration) {
        metrics.job_finished(self.pipeline, self.priority, succeeded, took);
    }
}

/// An attempt starts, `queue_wait` after its message was published (when the message says).
#[derive(Debug)]
pub(crate) struct StepStarted<'a> {
    pub(crate) labels: StepLabels<'a>,
    pub(crate) queue_wait: Option<Duration>,
}

impl Event for StepStarted<'_> {
    fn emit(self, metrics: &Metrics) {
        if let Some(waited) = self.queue_wait {
            let StepLabels {
                pipeline,
                step,
                priority,
            } = self.labels;
            metrics.queue_wait(pipeline, step, priority, waited);
        }
    }
}

/// An attempt succeeded; `job_took` is the whole job's time when it was the last step.
#[derive(Debug)]
pub(crate) struct StepSucceeded<'a> {
    pub(crate) labels: StepLabels<'a>,
    pub(crate) took: Duration,
    pub(crate) queue_wait_ms: u64,
    pub(crate) job_took: Option<Duration>,
}

impl Event for StepSucceeded<'_> {
    fn emit(self, metrics: &Metrics) {
        let took_ms = self.took.as_millis() as u64;
        debug!(
            took_ms,
            queue_wait_ms = self.queue_wait_ms,
            "Step finished."
        );
        self.labels
            .execution(metrics, Outcome::Succeeded, Some(self.took));
        if let Some(job_took) = self.job_took {
            self.labels.job_finished(metrics, true, job_took);
        }
    }
}

/// An attempt failed and the step runs again after `retry_in`.
#[derive(Debug)]
pub(crate) struct StepRetried<'a> {
    pub(crate) labels: StepLabels<'a>,
    pub(crate) took: Duration,
    pub(crate) error: &'a StepError,
    pub(crate) max_attempts: u32,
    pub(crate) retry_in: Duration,
}

impl Event for StepRetried<'_> {
    fn emit(self, metrics: &Metrics) {
        let took_ms = self.took.as_millis() as u64;
        warn!(took_ms, error = %self.error, max_attempts = self.max_attempts,
            retry_in_ms = self.retry_in.as_millis() as u64, "Step failed; it will be retried.");
        self.labels
            .execution(metrics, Outcome::Retried, Some(self.took));
    }
}

/// An attempt failed and the job with it: it goes to the dead-letter queue.
#[derive(Debug)]
pub(crate) struct StepFailed<'a> {
    pub(crate) labels: StepLabels<'a>,
    pub(crate) took: Duration,
    pub(crate) error: &'a StepError,
    pub(crate) gave_up: GaveUp,
    pub(crate) job_took: Duration,
}

impl Event for StepFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        let took_ms = self.took.as_millis() as u64;
        let why = self.gave_up.as_str();
        warn!(took_ms, error = %self.error,
            "Step failed for good ({why}); the job goes to the dead-letter queue.");
        self.labels
            .execution(metrics, Outcome::Failed, Some(self.took));
        self.labels.job_finished(metrics, false, self.job_took);
    }
}

/// A delivery that cannot run here goes to the dead-letter queue without running.
#[derive(Debug)]
pub(crate) struct MessageSetAside<'a> {
    /// The step whose queue it came from.
    pub(crate) labels: StepLabels<'a>,
    pub(crate) reason: Reason,
    pub(crate) text: &'a str,
    pub(crate) queue: &'a str,
}

impl Event for MessageSetAside<'_> {
    fn emit(self, metrics: &Metrics) {
        warn!(
            reason = self.reason.as_str(),
            error = self.text,
            queue = self.queue,
            "Message set aside in the dead-letter queue."
        );
        self.labels.execution(metrics, Outcome::DeadLettered, None);
    }
}

/// The dead-letter queue confirmed a message. `pipeline` is `None` unless the config has it.
#[derive(Debug)]
pub(crate) struct DeadLettered<'a> {
    pub(crate) pipeline: Option<&'a str>,
    pub(crate) reason: Reason,
}

impl Event for DeadLettered<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.dead_letter(self.pipeline, self.reason.as_str());
    }
}

/// The connection was lost while the step ran: the broker hands the message out again.
#[derive(Debug)]
pub(crate) struct StepAbandoned<'a> {
    pub(crate) labels: StepLabels<'a>,
    pub(crate) queue: &'a str,
}

impl Event for StepAbandoned<'_> {
    fn emit(self, metrics: &Metrics) {
        debug!(queue = %self.queue, "Connection lost mid-step; the broker will redeliver the message.");
        self.labels.execution(metrics, Outcome::Abandoned, None);
    }
}

/// The broker confirmed a publish, `took` after it was sent.
#[derive(Debug)]
pub(crate) struct PublishConfirmed {
    pub(crate) kind: PublishKind,
    pub(crate) took: Duration,
}

impl Event for PublishConfirmed {
    fn emit(self, metrics: &Metrics) {
        metrics.confirmed(self.kind, self.took);
    }
}

/// The queue an output goes to refused it (full): the output waits and is offered again.
#[derive(Debug)]
pub(crate) struct HandOffHeld<'a> {
    pub(crate) routing_key: &'a str,
    pub(crate) tries: u32,
}

impl Event for HandOffHeld<'_> {
    fn emit(self, _: &Metrics) {
        // One line at the first refusal, then one in 20: a full queue can last minutes.
        if self.tries == 1 || self.tries.is_multiple_of(20) {
            warn!(
                routing_key = self.routing_key,
                tries = self.tries,
                "Next queue is full (or refused the message); holding the output and trying again."
            );
        }
    }
}

/// A hand-off's confirm did not come in time: it is published again on a fresh channel.
#[derive(Debug)]
pub(crate) struct PublishUnconfirmed<'a> {
    pub(crate) routing_key: &'a str,
    pub(crate) waited: Duration,
}

impl Event for PublishUnconfirmed<'_> {
    fn emit(self, _: &Metrics) {
        warn!(
            routing_key = self.routing_key,
            waited_ms = self.waited.as_millis() as u64,
            "No confirm from the broker in time; publishing again on a fresh channel."
        );
    }
}

/// The output could not be handed on: the delivery goes back to its queue.
#[derive(Debug)]
pub(crate) struct HandOffFailed<'a> {
    pub(crate) error: &'a dyn std::error::Error,
}

impl Event for HandOffFailed<'_> {
    fn emit(self, _: &Metrics) {
        error!(error = %self.error,
            "Could not hand the step's result on; the message goes back to its queue.");
    }
}

/// The ack of a handled delivery failed (its channel is gone): the step will run again.
#[derive(Debug)]
pub(crate) struct AckFailed<'a> {
    pub(crate) error: &'a dyn std::error::Error,
}

impl Event for AckFailed<'_> {
    fn emit(self, _: &Metrics) {
        warn!(error = %self.error, "Could not ack; the message will be redelivered.");
    }
}

/// A fan-out step's parts were published (the first `released` of `total`; the coordinator
/// releases the rest as parts end).
pub(crate) struct FannedOut<'a> {
    pub(crate) parent: &'a str,
    pub(crate) total: u32,
    pub(crate) released: usize,
    pub(crate) pipeline: &'a str,
}

impl Event for FannedOut<'_> {
    fn emit(self, _metrics: &Metrics) {
        info!(parent_job_id = %self.parent, parts = self.total, released = self.released,
            part_pipeline = %self.pipeline, "Fanned out.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> StepLabels<'static> {
        StepLabels {
            pipeline: "p",
            step: "s",
            priority: Priority::Low,
        }
    }

    fn count(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn each_outcome_counts_once_with_its_labels() {
        let metrics = Metrics::new();
        let error = StepError::retryable("flaky");
        let took = Duration::from_millis(5);
        StepSucceeded {
            labels: labels(),
            took,
            queue_wait_ms: 1,
            job_took: Some(took),
        }
        .emit(&metrics);
        StepRetried {
            labels: labels(),
            took,
            error: &error,
            max_attempts: 3,
            retry_in: took,
        }
        .emit(&metrics);
        StepFailed {
            labels: labels(),
            took,
            error: &error,
            gave_up: GaveUp::AttemptsUsedUp,
            job_took: took,
        }
        .emit(&metrics);
        MessageSetAside {
            labels: labels(),
            reason: Reason::WrongQueue,
            text: "elsewhere",
            queue: "ns.q.p.s.low.0",
        }
        .emit(&metrics);
        StepAbandoned {
            labels: labels(),
            queue: "ns.q.p.s.low.0",
        }
        .emit(&metrics);
        DeadLettered {
            pipeline: Some("p"),
            reason: Reason::WrongQueue,
        }
        .emit(&metrics);

        let text = metrics.exposition().render();
        for outcome in [
            "succeeded",
            "retried",
            "failed",
            "dead_lettered",
            "abandoned",
        ] {
            let series = format!(
                "warren_step_executions_total{{outcome=\"{outcome}\",pipeline=\"p\",priority=\"low\",step=\"s\"}}"
            );
            assert_eq!(count(&text, &series), 1, "{series} in\n{text}");
        }
        for outcome in ["succeeded", "failed"] {
            let series = format!(
                "warren_job_duration_seconds_count{{outcome=\"{outcome}\",pipeline=\"p\",priority=\"low\"}}"
            );
            assert_eq!(count(&text, &series), 1, "{series} in\n{text}");
        }
        // Only attempts that ran have a duration.
        let ran =
            r#"warren_step_duration_seconds_count{outcome="dead_lettered",pipeline="p",step="s"}"#;
        assert_eq!(count(&text, ran), 0, "{text}");
        let dead = r#"warren_dead_letters_total{pipeline="p",reason="wrong-queue"}"#;
        assert_eq!(count(&text, dead), 1, "{text}");
    }
}
