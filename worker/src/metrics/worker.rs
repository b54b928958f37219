//! The worker's metrics: what happens to step attempts, publishes and the connection.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use warren_common::Priority;

use super::{Def, Exposition};

const STEP_EXECUTIONS: Def = Def {
    name: "warren_step_executions_total",
    help: "Step attempts finished, by outcome.",
    labels: &["pipeline", "step", "priority", "outcome"],
};
const STEP_DURATION: Def = Def {
    name: "warren_step_duration_seconds",
    help: "How long a step attempt ran.",
    labels: &["pipeline", "step", "outcome"],
};
const QUEUE_WAIT: Def = Def {
    name: "warren_step_queue_wait_seconds",
    help: "From the publish of a step message to the start of its attempt.",
    labels: &["pipeline", "step", "priority"],
};
const JOB_DURATION: Def = Def {
    name: "warren_job_duration_seconds",
    help: "From submit to the job's result, observed at the last or the failing step.",
    labels: &["pipeline", "priority", "outcome"],
};
const IN_FLIGHT: Def = Def {
    name: "warren_steps_in_flight",
    help: "Step attempts running now.",
    labels: &["pipeline", "step"],
};
const DEAD_LETTERS: Def = Def {
    name: "warren_dead_letters_total",
    help: "Messages sent to the dead-letter queue, by reason.",
    labels: &["pipeline", "reason"],
};
const PUBLISH_CONFIRM: Def = Def {
    name: "warren_publish_confirm_seconds",
    help: "From publish to the broker's confirm.",
    labels: &["kind"],
};
const CAP_HELD: Def = Def {
    name: "warren_cap_tokens_held",
    help: "Cap tokens this process holds now, by kind (step or tenant).",
    labels: &["pipeline", "step", "kind"],
};
const CAP_WAITS: Def = Def {
    name: "warren_cap_waits_total",
    help: "Deliveries that found their cap full: waited for a step token, or moved to a wait lane for their tenant's.",
    labels: &["pipeline", "step", "kind"],
};
const CAP_ACQUIRE: Def = Def {
    name: "warren_cap_acquire_seconds",
    help: "From asking for a step cap token to holding it.",
    labels: &["pipeline", "step"],
};
const RECONNECTS: Def = Def {
    name: "warren_reconnects_total",
    help: "Sessions started again after a lost connection.",
    labels: &[],
};
const CONNECTED: Def = Def {
    name: "warren_worker_connected",
    help: "1 while connected and consuming, else 0.",
    labels: &[],
};

const LANE_MOVES: Def = Def {
    name: "warren_lane_moves_total",
    help: "Step messages of hot tenants moved from a shard to a hot lane.",
    labels: &["pipeline", "step"],
};
const HOT_MARKS: Def = Def {
    name: "warren_hot_marks_total",
    help: "Hot-tenant marks this worker published, by why.",
    labels: &["pipeline", "reason"],
};
const HOT_TENANTS: Def = Def {
    name: "warren_hot_tenants",
    help: "Tenants hot now, as this worker reads the control stream.",
    labels: &["pipeline"],
};
const RESULTS_CHECKED: Def = Def {
    name: "warren_results_checked_total",
    help: "Result events the results check looked for in the results stream.",
    labels: &[],
};
const RESULTS_REWRITTEN: Def = Def {
    name: "warren_results_rewritten_total",
    help: "Result events the results stream had lost, written to it again by the results check.",
    labels: &[],
};

/// Every metric the worker exports.
#[cfg(test)]
pub(super) const DEFS: &[&Def] = &[
    &STEP_EXECUTIONS,
    &STEP_DURATION,
    &QUEUE_WAIT,
    &JOB_DURATION,
    &IN_FLIGHT,
    &DEAD_LETTERS,
    &PUBLISH_CONFIRM,
    &CAP_HELD,
    &CAP_WAITS,
    &CAP_ACQUIRE,
    &RECONNECTS,
    &CONNECTED,
    &LANE_MOVES,
    &HOT_MARKS,
    &HOT_TENANTS,
    &RESULTS_CHECKED,
    &RESULTS_REWRITTEN,
];

/// What happened to one attempt, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Retried,
    Failed,
    DeadLettered,
    Abandoned,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Which publish a confirm latency belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PublishKind {
    NextStep,
    Retry,
    Result,
    DeadLetter,
    CapWait,
    /// A hot tenant's message moved to its hot lane, or a hot mark.
    Fairness,
}

impl PublishKind {
    fn as_str(self) -> &'static str {
        match self {
            PublishKind::NextStep => "next_step",
            PublishKind::Retry => "retry",
            PublishKind::Result => "result",
            PublishKind::DeadLetter => "dead_letter",
            PublishKind::CapWait => "cap_wait",
            PublishKind::Fairness => "fairness",
        }
    }
}

/// One worker's metrics, ready (for `/readyz`) while it is connected and consuming.
#[derive(Debug)]
pub(crate) struct Metrics {
    exposition: Exposition,
    executions: IntCounterVec,
    step_duration: HistogramVec,
    queue_wait: HistogramVec,
    job_duration: HistogramVec,
    in_flight: IntGaugeVec,
    dead_letters: IntCounterVec,
    confirm: HistogramVec,
    cap_held: IntGaugeVec,
    cap_waits: IntCounterVec,
    cap_acquire: HistogramVec,
    reconnects: IntCounter,
    connected: IntGauge,
    lane_moves: IntCounterVec,
    hot_marks: IntCounterVec,
    hot_tenants: IntGaugeVec,
    results_checked: IntCounter,
    results_rewritten: IntCounter,
}

/// Buckets from 1 ms to about 17 minutes: steps range from no-ops to long imports.
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.5, 16).expect("valid buckets")
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let exposition = Exposition::new();
        Self {
            executions: exposition.counter_vec(&STEP_EXECUTIONS),
            step_duration: exposition.histogram_vec(&STEP_DURATION, duration_buckets()),
            queue_wait: exposition.histogram_vec(&QUEUE_WAIT, duration_buckets()),
            job_duration: exposition.histogram_vec(&JOB_DURATION, duration_buckets()),
            in_flight: exposition.gauge_vec(&IN_FLIGHT),
            dead_letters: exposition.counter_vec(&DEAD_LETTERS),
            confirm: exposition.histogram_vec(
                &PUBLISH_CONFIRM,
                prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            ),
            cap_held: exposition.gauge_vec(&CAP_HELD),
            cap_waits: exposition.counter_vec(&CAP_WAITS),
            cap_acquire: exposition.histogram_vec(&CAP_ACQUIRE, duration_buckets()),
            reconnects: exposition.counter(&RECONNECTS),
            connected: exposition.gauge(&CONNECTED),
            lane_moves: exposition.counter_vec(&LANE_MOVES),
            hot_marks: exposition.counter_vec(&HOT_MARKS),
            hot_tenants: exposition.gauge_vec(&HOT_TENANTS),
            results_checked: exposition.counter(&RESULTS_CHECKED),
            results_rewritten: exposition.counter(&RESULTS_REWRITTEN),
            exposition,
        }
    }

    /// What `/metrics` and `/readyz` serve.
    pub(crate) fn exposition(&self) -> &Exposition {
        &self.exposition
    }

    pub(crate) fn execution(
        &self,
        pipeline: &str,
        step: &str,
        priority: Priority,
        outcome: Outcome,
        took: Option<Duration>,
    ) {
        self.executions
            .with_label_values(&[pipeline, step, priority.as_str(), outcome.as_str()])
            .inc();
        if let Some(took) = took {
            self.step_duration
                .with_label_values(&[pipeline, step, outcome.as_str()])
                .observe(took.as_secs_f64());
        }
    }

    pub(crate) fn queue_wait(
        &self,
        pipeline: &str,
        step: &str,
        priority: Priority,
        waited: Duration,
    ) {
        self.queue_wait
            .with_label_values(&[pipeline, step, priority.as_str()])
            .observe(waited.as_secs_f64());
    }

    pub(crate) fn job_finished(
        &self,
        pipeline: &str,
        priority: Priority,
        succeeded: bool,
        took: Duration,
    ) {
        let outcome = if succeeded {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        };
        self.job_duration
            .with_label_values(&[pipeline, priority.as_str(), outcome.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Counts the attempt as running until the guard drops (also when it is cancelled).
    pub(crate) fn running(&self, pipeline: &str, step: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[pipeline, step]);
        gauge.inc();
        InFlight(gauge)
    }

    /// Attempts running now, over every step: the sum of the in-flight gauge (read every few
    /// seconds for the worker's presence report, so the steps pay nothing for it).
    pub(crate) fn in_flight_total(&self) -> i64 {
        self.in_flight
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_gauge().get_value() as i64)
            .sum()
    }

    pub(crate) fn dead_letter(&self, pipeline: Option<&str>, reason: &str) {
        self.dead_letters
            .with_label_values(&[pipeline.unwrap_or("unknown"), reason])
            .inc();
    }

    pub(crate) fn confirmed(&self, kind: PublishKind, took: Duration) {
        self.confirm
            .with_label_values(&[kind.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Counts a cap token as held until the guard drops.
    pub(crate) fn cap_held(&self, pipeline: &str, step: &str, kind: &str) -> InFlight {
        let gauge = self.cap_held.with_label_values(&[pipeline, step, kind]);
        gauge.inc();
        InFlight(gauge)
    }

    pub(crate) fn cap_wait(&self, pipeline: &str, step: &str, kind: &str) {
        self.cap_waits
            .with_label_values(&[pipeline, step, kind])
            .inc();
    }

    pub(crate) fn cap_acquired(&self, pipeline: &str, step: &str, took: Duration) {
        self.cap_acquire
            .with_label_values(&[pipeline, step])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn moved(&self, pipeline: &str, step: &str) {
        self.lane_moves.with_label_values(&[pipeline, step]).inc();
    }

    pub(crate) fn hot_marked(&self, pipeline: &str, reason: &str) {
        self.hot_marks.with_label_values(&[pipeline, reason]).inc();
    }

    /// Sets the hot-tenant count of every pipeline in `counts` (the others read 0).
    pub(crate) fn set_hot_tenants<'a>(
        &self,
        pipelines: impl IntoIterator<Item = &'a str>,
        counts: &std::collections::HashMap<String, i64>,
    ) {
        for pipeline in pipelines {
            let n = counts.get(pipeline).copied().unwrap_or(0);
            self.hot_tenants.with_label_values(&[pipeline]).set(n);
        }
    }

    /// A round of the results check: `checked` events looked for, `rewritten` of them missing.
    pub(crate) fn results_checked(&self, checked: usize, rewritten: usize) {
        self.results_checked.inc_by(checked as u64);
        self.results_rewritten.inc_by(rewritten as u64);
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Connected and consuming (ready), or not.
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
        self.exposition.set_ready(up);
    }
}

/// Decrements its gauge (attempts in flight, cap tokens held) when dropped.
#[derive(Debug)]
pub(crate) struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_carry_the_values() {
        let m = Metrics::new();
        m.execution("p", "s", Priority::High, Outcome::Retried, None);
        m.dead_letter(None, "undecodable");
        let running = m.running("p", "s");
        let text = m.exposition().render();
        assert!(text.contains(
            "warren_step_executions_total{outcome=\"retried\",pipeline=\"p\",priority=\"high\",step=\"s\"} 1"
        ), "{text}");
        assert!(text.contains("warren_steps_in_flight{pipeline=\"p\",step=\"s\"} 1"));
        let other = m.running("q", "t");
        assert_eq!(m.in_flight_total(), 2);
        drop(other);
        assert!(text
            .contains("warren_dead_letters_total{pipeline=\"unknown\",reason=\"undecodable\"} 1"));
        drop(running);
        let text = m.exposition().render();
        assert!(text.contains("warren_steps_in_flight{pipeline=\"p\",step=\"s\"} 0"));
        assert_eq!(m.in_flight_total(), 0);
    }

    #[test]
    fn ready_follows_the_connection() {
        let m = Metrics::new();
        assert!(!m.exposition().is_ready());
        m.set_connected(true);
        assert!(m.exposition().is_ready());
        assert!(m
            .exposition()
            .render()
            .contains("warren_worker_connected 1"));
        m.set_connected(false);
        assert!(!m.exposition().is_ready());
    }
}
