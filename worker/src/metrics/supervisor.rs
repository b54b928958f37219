//! The supervisor's metrics: the depth of the queues it watches and the size of its pools.

use prometheus::{IntCounterVec, IntGaugeVec};
use warren_broker::depth::QueueDepth;

use super::{Def, Exposition};

const QUEUE_MESSAGES: Def = Def {
    name: "warren_queue_messages",
    help: "Ready messages in each step queue.",
    labels: &["pipeline", "step", "priority", "shard"],
};
const QUEUE_UNACKED: Def = Def {
    name: "warren_queue_messages_unacked",
    help: "Messages delivered to workers but not yet acked, in each step queue (management API).",
    labels: &["pipeline", "step", "priority", "shard"],
};
const WORKERS_DESIRED: Def = Def {
    name: "warren_supervisor_workers_desired",
    help: "Workers the supervisor wants in the pool.",
    labels: &["pool"],
};
const WORKERS_RUNNING: Def = Def {
    name: "warren_supervisor_workers_running",
    help: "Worker processes alive in the pool (not counting those draining).",
    labels: &["pool"],
};
const RESTARTS: Def = Def {
    name: "warren_supervisor_restarts_total",
    help: "Workers that died unexpectedly and were started again.",
    labels: &["pool"],
};

/// Every metric the supervisor exports.
#[cfg(test)]
pub(super) const DEFS: &[&Def] = &[
    &QUEUE_MESSAGES,
    &QUEUE_UNACKED,
    &WORKERS_DESIRED,
    &WORKERS_RUNNING,
    &RESTARTS,
];

/// The supervisor's metrics, ready (for `/readyz`) once a depth read succeeded.
#[derive(Debug)]
pub(crate) struct SupervisorMetrics {
    exposition: Exposition,
    queue_messages: IntGaugeVec,
    queue_unacked: IntGaugeVec,
    desired: IntGaugeVec,
    running: IntGaugeVec,
    restarts: IntCounterVec,
}

impl SupervisorMetrics {
    pub(crate) fn new() -> Self {
        let exposition = Exposition::new();
        Self {
            queue_messages: exposition.gauge_vec(&QUEUE_MESSAGES),
            queue_unacked: exposition.gauge_vec(&QUEUE_UNACKED),
            desired: exposition.gauge_vec(&WORKERS_DESIRED),
            running: exposition.gauge_vec(&WORKERS_RUNNING),
            restarts: exposition.counter_vec(&RESTARTS),
            exposition,
        }
    }

    /// What `/metrics` and `/readyz` serve.
    pub(crate) fn exposition(&self) -> &Exposition {
        &self.exposition
    }

    /// Makes the pool's counters exist from the start, so "no restarts" reads as 0, not as no
    /// data.
    pub(crate) fn pool_added(&self, pool: &str) {
        self.restarts.with_label_values(&[pool]);
    }

    pub(crate) fn restarted(&self, pool: &str) {
        self.restarts.with_label_values(&[pool]).inc();
    }

    pub(crate) fn desired(&self, pool: &str, workers: u32) {
        self.desired
            .with_label_values(&[pool])
            .set(i64::from(workers));
    }

    pub(crate) fn running(&self, pool: &str, workers: u32) {
        self.running
            .with_label_values(&[pool])
            .set(i64::from(workers));
    }

    /// One read of the queues' depths: what it knows of each queue.
    pub(crate) fn depths_read(&self, depths: &[QueueDepth]) {
        for d in depths {
            let q = &d.route;
            let lane = q.lane.to_string();
            let labels = [
                q.pipeline.as_str(),
                q.step.as_str(),
                q.priority.as_str(),
                &lane,
            ];
            if let Some(ready) = d.ready {
                self.queue_messages
                    .with_label_values(&labels)
                    .set(i64::from(ready));
            }
            if let Some(unacked) = d.unacked {
                self.queue_unacked
                    .with_label_values(&labels)
                    .set(i64::try_from(unacked).unwrap_or(i64::MAX));
            }
        }
        self.exposition.set_ready(true);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use warren_broker::{Names, StepRoute};
    use warren_common::Config;

    use super::*;

    /// Gives every metric a value (a labelled one is exported only once it has one).
    pub(crate) fn touch_every_metric(m: &SupervisorMetrics) {
        let toml = "[broker]\nnamespace = \"ns\"\n[[pipelines]]\nname = \"p\"\nshards = 1\n\
                    [[pipelines.steps]]\nname = \"s\"\nhandler = \"h\"\n";
        let config = Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap();
        let route = StepRoute::all(&config).remove(0);
        m.depths_read(&[QueueDepth {
            queue: route.queue(&Names::new("ns")),
            route,
            ready: Some(3),
            consumers: Some(1),
            unacked: Some(1),
        }]);
        m.desired("p", 2);
        m.running("p", 1);
        m.restarted("p");
    }

    #[test]
    fn depths_make_it_ready_and_are_labelled() {
        let m = SupervisorMetrics::new();
        m.pool_added("p");
        assert!(m
            .exposition()
            .render()
            .contains("warren_supervisor_restarts_total{pool=\"p\"} 0"));
        assert!(!m.exposition().is_ready());
        touch_every_metric(&m);
        assert!(m.exposition().is_ready());
        let text = m.exposition().render();
        assert!(
            text.contains(
                "warren_queue_messages{pipeline=\"p\",priority=\"high\",shard=\"0\",step=\"s\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("warren_supervisor_restarts_total{pool=\"p\"} 1"));
    }
}
