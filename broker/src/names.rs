//! Every exchange and queue name warren uses, in one place (a step queue's name and routing key
//! come from its [`StepRoute`](crate::StepRoute)). All of them start with the namespace, so several deployments
//! (and parallel tests) share a broker without meeting.
//! `docs/wire-format.md` documents these for producers in other languages.

use warren_common::JobStatus;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Direct exchange every step message is published to.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.ns)
    }

    /// Topic exchange for job result events.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.ns)
    }

    /// Stream queue that keeps every result event, so a result can be read after the fact.
    pub fn results_stream(&self) -> String {
        format!("{}.results", self.ns)
    }

    /// Quorum queue of the workers' copies of their result events (in batches), while
    /// `[results] check` is on: the worker that consumes it (single active consumer) looks for
    /// each event in the results stream and writes the ones the stream lost again.
    pub fn results_check(&self) -> String {
        format!("{}{}", self.ns, Self::RESULTS_CHECK_SUFFIX)
    }

    /// How the results check queue's name ends.
    pub const RESULTS_CHECK_SUFFIX: &'static str = ".results.check";

    /// Stream of control messages (hot-tenant marks) every producer and worker reads.
    pub fn control_stream(&self) -> String {
        format!("{}.control", self.ns)
    }

    /// Stream of fan-out records and fan-out parts' results, folded by the fan-in coordinator.
    pub fn fanin_stream(&self) -> String {
        format!("{}.fanin", self.ns)
    }

    /// Stream of the fan-in coordinator's checkpoints (its state and stream offset).
    pub fn fanin_checkpoints(&self) -> String {
        format!("{}.fanin.ckpt", self.ns)
    }

    /// Exclusive queue whose holder (one connection) is the fan-in coordinator.
    pub fn fanin_lock(&self) -> String {
        format!("{}.fanin.lock", self.ns)
    }

    /// The schedulers' tick: a single-active-consumer queue whose one consumer at a time fires
    /// the due schedule slots (docs/ARCHITECTURE.md, "Schedules").
    pub fn sched_tick_queue(&self) -> String {
        format!("{}.sched.tick", self.ns)
    }

    /// Where the next tick waits out its interval before dead-lettering back to the tick queue.
    pub fn sched_delay_queue(&self) -> String {
        format!("{}.sched.delay", self.ns)
    }

    /// Stream of the schedules' ledger: fired slots, pauses and resumes.
    pub fn sched_stream(&self) -> String {
        format!("{}.sched", self.ns)
    }

    /// Stream of job lifecycle events (`[history]`), read by `warren status` and `warren jobs`.
    pub fn history_stream(&self) -> String {
        format!("{}.history", self.ns)
    }

    /// Where messages that cannot or must not run any more are set aside.
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.ns)
    }

    /// Fanout exchange in front of [`Names::delay_queue`]: a retry is published here with its
    /// step's routing key, which the message keeps until it is dead-lettered back.
    pub fn delay_exchange(&self, delay_ms: u64) -> String {
        format!("{}.delay.{delay_ms}", self.ns)
    }

    /// Where retries wait `delay_ms` (per-message TTL, with jitter) before their TTL
    /// dead-letters them to the tasks exchange, under their step's routing key.
    pub fn delay_queue(&self, delay_ms: u64) -> String {
        format!("{}.delay.{delay_ms}", self.ns)
    }

    /// What every step queue's name starts with: `<ns>.q.` ([`StepRoute::queue`](crate::StepRoute::queue) names them).
    pub fn step_queue_prefix(&self) -> String {
        format!("{}.q.", self.ns)
    }

    /// The binding pattern that takes every result key ([`Names::result_key`]).
    pub const EVERY_RESULT: &'static str = "result.#";

    /// `result.<status>.<pipeline>.<tenant>` on the events exchange.
    pub fn result_key(status: JobStatus, pipeline: &str, tenant: &str) -> String {
        format!("result.{}.{pipeline}.{tenant}", status.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced() {
        let n = Names::new("acme-prod");
        assert_eq!(n.tasks_exchange(), "acme-prod.tasks");
        assert_eq!(n.events_exchange(), "acme-prod.events");
        assert_eq!(n.results_stream(), "acme-prod.results");
        assert_eq!(n.dlq(), "acme-prod.dlq");
        assert_eq!(n.sched_tick_queue(), "acme-prod.sched.tick");
        assert_eq!(n.sched_delay_queue(), "acme-prod.sched.delay");
        assert_eq!(n.sched_stream(), "acme-prod.sched");
        assert_eq!(n.history_stream(), "acme-prod.history");
        assert_eq!(n.delay_queue(1500), "acme-prod.delay.1500");
        assert_eq!(n.delay_exchange(1500), "acme-prod.delay.1500");
        assert_eq!(
            Names::result_key(JobStatus::Failed, "thumbnails", "t1"),
            "result.failed.thumbnails.t1"
        );
    }
}
