//! The worker process: [`Worker::run`] keeps a [`Session`] (one connection's worth of serving)
//! going, reconnecting when the connection is lost. A session starts one [`Intake`] per served
//! step.
//!
//! Shutdown: stop dispatching, cancel the consumers, return buffered deliveries, let running
//! steps finish within the grace period, then close the channels (the broker requeues whatever
//! is still unacked).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_broker::{Broker, HistoryWriter, Topology, TopologyError};
use warren_common::backoff::Backoff;
use warren_common::Config;

use crate::builder::{WorkerBuilder, WorkerError};
use crate::fairness::{Fairness, REPORT_EVERY};
use crate::intake::{Control, Intake, TEARDOWN_PATIENCE};
use crate::metrics::Metrics;
use crate::presence::{self, Presence};
use crate::step::{Outbox, ServedStep, StepSession};

/// Default time running steps get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A built worker, ready to [`run`](Worker::run).
pub struct Worker {
    config: Arc<Config>,
    served: Vec<Arc<ServedStep>>,
    grace: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("steps", &self.step_labels())
            .finish()
    }
}

impl Worker {
    /// Starts building a worker for `config`: register handlers, then [`WorkerBuilder::build`].
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder::new(config)
    }

    pub(crate) fn new(
        config: Arc<Config>,
        served: Vec<Arc<ServedStep>>,
        grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            served,
            grace,
            metrics,
        }
    }

    /// This worker's metrics, for `/metrics` and `/readyz`.
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// `pipeline/step` of every served step.
    fn step_labels(&self) -> Vec<String> {
        self.served.iter().map(|s| s.label()).collect()
    }

    /// Serves until `shutdown` resolves, then drains. A lost connection (broker restart, a
    /// connection closed by the server, a channel error) does not end the run: the worker
    /// reconnects with backoff, declares the topology again and carries on; what it held
    /// unacked went back to the queues with the old connection. Only a config the broker
    /// cannot take (a conflicting queue) is an error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::reconnect();
        // One per process, with its own connection: it outlives the sessions.
        let history = self
            .config
            .history
            .enabled
            .then(|| HistoryWriter::start(&self.config.broker));
        // One identity for the whole run: a reconnect is the same worker.
        let presence = Arc::new(Presence::new(&self.served));
        loop {
            // Not raced with `shutdown`: once consumers start, a signal must drain them, and
            // `serve` sees a signal that came during start-up.
            let session = self
                .session(&mut backoff, history.clone(), Arc::clone(&presence))
                .await;
            let reason = match session {
                Ok(session) => {
                    let outcome = session.serve(&mut shutdown, self.grace).await;
                    self.metrics.set_connected(false);
                    match outcome {
                        None => return Ok(()),
                        Some(reason) => reason,
                    }
                }
                Err(WorkerError::Broker(e)) => e.to_string(),
                Err(e) => return Err(e),
            };
            let wait = backoff.next_delay();
            warn!(reason = %reason, retry_in_ms = wait.as_millis() as u64, tries = backoff.tries(),
                "Lost the broker; reconnecting.");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    /// Connects, declares the topology and starts consuming.
    async fn session(
        &self,
        backoff: &mut Backoff,
        history: Option<HistoryWriter>,
        presence: Arc<Presence>,
    ) -> Result<Session, WorkerError> {
        let broker = Broker::connect(&self.config.broker).await?;
        // Declaring is idempotent, so a worker never waits on a forgotten `topology apply`; a
        // queue that exists with other arguments stops it here, by name.
        Topology::plan(&self.config)
            .declare(&broker)
            .await
            .map_err(|e| match e {
                TopologyError::Broker(e) => WorkerError::Broker(e),
                conflict => WorkerError::TopologyConflict(conflict),
            })?;
        let lost = CancellationToken::new();
        let steps = Arc::new(StepSession {
            config: Arc::clone(&self.config),
            broker: broker.clone(),
            fairness: Fairness::start(&broker, &self.config),
            outbox: Outbox::new(
                &broker,
                self.config.checks_results(),
                lost.clone(),
                Arc::clone(&self.metrics),
            )
            .await?,
            lost,
            metrics: Arc::clone(&self.metrics),
            history,
        });
        // Bounded by the number of consumers: each reports at most one error before it stops.
        let (fatal, fatal_rx) = mpsc::unbounded_channel();
        let mut session = Session {
            broker,
            steps,
            intakes: Vec::new(),
            control: Control {
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
                fatal,
            },
            fatal_rx,
            presence,
            presence_stop: CancellationToken::new(),
        };
        tokio::spawn(presence::report(
            Arc::clone(&session.presence),
            Arc::clone(&session.steps),
            session.presence_stop.clone(),
        ));
        tokio::spawn(fairness_reports(
            Arc::clone(&session.steps),
            session.control.cancel.clone(),
        ));
        if crate::fanin::needed(&self.config) {
            tokio::spawn(crate::fanin::coordinate(
                Arc::clone(&session.steps),
                session.control.cancel.clone(),
            ));
        }
        if self.config.checks_results() {
            tokio::spawn(crate::results_check::check(
                Arc::clone(&session.steps),
                session.control.cancel.clone(),
            ));
        }
        for served in &self.served {
            let started =
                Intake::start(&session.broker, &session.steps, served, &session.control).await;
            match started {
                Ok(intake) => session.intakes.push(intake),
                Err(e) => {
                    // Intakes already started must not run on unsupervised.
                    session.abandon().await;
                    return Err(e.into());
                }
            }
        }
        if backoff.tries() > 0 {
            info!(tries = backoff.tries(), "Reconnected.");
            self.metrics.reconnected();
        }
        backoff.reset();
        self.metrics.set_connected(true);
        info!(broker = %session.broker.redacted_url(), namespace = %self.config.broker.namespace,
            steps = ?self.step_labels(), "Worker started.");
        Ok(session)
    }
}

/// Keeps the hot-tenant gauge current and reports the lanes' tenants, until the session stops.
async fn fairness_reports(steps: Arc<StepSession>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
        steps.fairness.update_gauge(&steps.config, &steps.metrics);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = Fairness::publish_digests(&steps) => {}
        }
    }
}

/// One connection's worth of serving: its intakes and running steps.
struct Session {
    broker: Broker,
    steps: Arc<StepSession>,
    intakes: Vec<Intake>,
    control: Control,
    fatal_rx: mpsc::UnboundedReceiver<String>,
    presence: Arc<Presence>,
    /// Ends the presence reports: they go on while draining, so a long drain stays listed.
    presence_stop: CancellationToken,
}

impl Session {
    /// Serves until `shutdown` (then drains and returns `None`) or until the connection is lost
    /// (then abandons running steps and returns why).
    async fn serve(
        mut self,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        grace: Duration,
    ) -> Option<String> {
        let lost = tokio::select! {
            _ = shutdown => None,
            reason = self.fatal_rx.recv() => Some(reason.unwrap_or_default()),
        };
        if let Some(reason) = lost {
            self.abandon().await;
            return Some(reason);
        }
        self.control.cancel.cancel();
        for intake in &self.intakes {
            intake.stop_consuming().await;
        }
        self.presence.set_draining();
        self.presence.send(&self.steps, false).await;
        let tracker = &self.control.tracker;
        tracker.close();
        let running = tracker.len();
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            info!(finished = running, "Drained: every running step finished.");
        } else {
            warn!(unfinished = tracker.len(), grace = ?grace,
                "Grace period over; unfinished steps go back to their queues.");
        }
        self.presence_stop.cancel();
        self.presence.send(&self.steps, true).await;
        for intake in self.intakes {
            intake.close().await;
        }
        self.steps.fairness.router.stop();
        self.broker.close().await;
        None
    }

    /// Stops everything at once. Nothing started on a lost connection can be acked any more,
    /// so running steps are dropped and the broker hands their messages out again.
    async fn abandon(self) {
        self.control.cancel.cancel();
        self.presence_stop.cancel();
        self.steps.lost.cancel();
        let tracker = &self.control.tracker;
        tracker.close();
        // Steps stop at once when `lost` fires; the bound is for one stuck in an ack on a dead
        // channel, which must not keep the worker from reconnecting.
        if tokio::time::timeout(TEARDOWN_PATIENCE, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                unfinished = tracker.len(),
                "Steps did not stop in time; leaving them behind."
            );
        }
        for intake in self.intakes {
            intake.close().await;
        }
        self.steps.fairness.router.stop();
        self.broker.close().await;
    }
}
