//! This worker's presence on the control stream, for the console's list of workers: a
//! [`WorkerReport`] every [`PRESENCE_EVERY`], also when idle, one as soon as it starts to drain,
//! and a last one when it stops (so it leaves the list at once rather than after the reports
//! stop). The report costs nothing per job: the running count is read from the in-flight gauge
//! the steps keep anyway. What readers make of reports is `warren_broker::workers`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;
use warren_broker::workers::{WorkerReport, WorkerState, REPORT_VERSION, WORKER_KIND};
use warren_common::now_ms;

use crate::step::{ServedStep, StepSession};

/// How often a worker reports itself.
pub(crate) const PRESENCE_EVERY: Duration = Duration::from_secs(10);

/// The longest a report may hold up a drain or a stop.
const SEND_PATIENCE: Duration = Duration::from_secs(2);

/// Who this worker is, for the length of its run (across reconnects).
#[derive(Debug)]
pub(crate) struct Presence {
    id: String,
    host: String,
    pid: u32,
    started: u64,
    slots: u32,
    steps: Vec<String>,
    draining: AtomicBool,
}

impl Presence {
    /// A new identity for a run serving `served`, starting now.
    pub(crate) fn new(served: &[Arc<ServedStep>]) -> Self {
        Self {
            id: format!("{:012x}", rand::random::<u64>() >> 16),
            host: host_name(),
            pid: std::process::id(),
            started: now_ms(),
            slots: served.iter().map(|s| s.step.concurrency).sum(),
            steps: served.iter().map(|s| s.label()).collect(),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on the reports say the worker is draining.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn report(&self, state: WorkerState, running: u32) -> WorkerReport {
        WorkerReport {
            v: REPORT_VERSION,
            kind: WORKER_KIND.to_string(),
            id: self.id.clone(),
            host: self.host.clone(),
            pid: self.pid,
            started: self.started,
            at: now_ms(),
            every_ms: PRESENCE_EVERY.as_millis() as u64,
            state,
            running,
            slots: self.slots,
            steps: self.steps.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Publishes a report now: `Stopped` when `stopped`, else serving or draining. A failure
    /// is only logged: the next report, or the reader's timeout, sets things right.
    pub(crate) async fn send(&self, steps: &StepSession, stopped: bool) {
        let state = match (stopped, self.draining.load(Ordering::Relaxed)) {
            (true, _) => WorkerState::Stopped,
            (false, true) => WorkerState::Draining,
            (false, false) => WorkerState::Serving,
        };
        let running = u32::try_from(steps.metrics.in_flight_total().max(0)).unwrap_or(u32::MAX);
        let report = self.report(state, running);
        let sent = tokio::time::timeout(
            SEND_PATIENCE,
            steps
                .fairness
                .router
                .report(steps.outbox.publisher(), &report),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(%error, "Cannot publish this worker's report."),
            Err(_) => debug!("This worker's report was not confirmed in time."),
        }
    }
}

/// Reports the worker every [`PRESENCE_EVERY`], starting at once, until `stop`.
pub(crate) async fn report(
    presence: Arc<Presence>,
    steps: Arc<StepSession>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = presence.send(&steps, false) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRESENCE_EVERY) => {}
        }
    }
}

/// The machine's name (the pod's, in Kubernetes).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}
