//! The worker process: one lane per served step. A lane consumes every priority x shard queue of
//! its step into small local buffers (bounded by the prefetch), and a dispatcher hands buffered
//! deliveries to at most `concurrency` step tasks at once, in the order [`Picker`] decides.
//!
//! Shutdown: stop dispatching, cancel the consumers, return buffered deliveries, let running
//! steps finish within the grace period, then close the channel (the broker requeues whatever
//! is still unacked).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_broker::{Broker, BrokerError, Publisher, Topology, TopologyError};
use warren_common::backoff::Backoff;
use warren_common::config::StepKind;
use warren_common::{Config, Priority};

use crate::dispatch::{Picker, DEFAULT_STARVE_LIMIT};
use crate::handler::StepHandler;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::step::{process, LaneStep, Runner, Shared};

/// Default time running steps get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Longest wait for one part of tearing a session down (a channel close, a consumer cancel,
/// abandoned steps stopping): a dead connection may never answer.
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The worker cannot start with this config and these handlers.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

// === impl WorkerBuilder ===

/// Collects handlers and options; [`WorkerBuilder::build`] checks them against the config.
#[derive(Debug)]
pub struct WorkerBuilder {
    config: Config,
    registry: Registry,
    duplicates: Vec<String>,
    pipeline: Option<String>,
    step: Option<String>,
    grace: Duration,
}

impl WorkerBuilder {
    /// Registers a Rust handler under the name the config's `handler = ".."` uses.
    pub fn handler<H: StepHandler>(mut self, name: &str, handler: H) -> Self {
        if let Err(name) = self.registry.insert(name, handler) {
            self.duplicates.push(name);
        }
        self
    }

    /// Serve only this pipeline (default: all).
    pub fn pipeline(mut self, name: Option<String>) -> Self {
        self.pipeline = name;
        self
    }

    /// Serve only steps of this name (default: all).
    pub fn step(mut self, name: Option<String>) -> Self {
        self.step = name;
        self
    }

    /// How long running steps may take to finish after shutdown is asked for.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn build(self) -> Result<Worker, WorkerError> {
        if let Some(name) = self.duplicates.first() {
            return Err(WorkerError::Setup(format!(
                "handler {name:?} is registered twice"
            )));
        }
        let mut lanes = Vec::new();
        for pipeline in &self.config.pipelines {
            if self.pipeline.as_ref().is_some_and(|p| p != &pipeline.name) {
                continue;
            }
            for step in &pipeline.steps {
                if self.step.as_ref().is_some_and(|s| s != &step.name) {
                    continue;
                }
                let runner = match &step.kind {
                    StepKind::Command(argv) => {
                        Runner::Command(Arc::new((argv.clone(), step.pass_env.clone())))
                    }
                    StepKind::Handler(name) => {
                        Runner::Handler(self.registry.get(name).ok_or_else(|| {
                            let known: Vec<_> = self.registry.names().collect();
                            WorkerError::Setup(format!(
                                "pipelines.{}.steps.{}.handler = {name:?} is not registered in this worker binary (registered: {known:?})",
                                pipeline.name, step.name
                            ))
                        })?)
                    }
                };
                lanes.push(Arc::new(LaneStep {
                    pipeline: pipeline.clone(),
                    step: step.clone(),
                    runner,
                }));
            }
        }
        if lanes.is_empty() {
            return Err(WorkerError::Setup(format!(
                "nothing to serve: no step matches pipeline {:?} and step {:?} in the config",
                self.pipeline.as_deref().unwrap_or("(any)"),
                self.step.as_deref().unwrap_or("(any)")
            )));
        }
        Ok(Worker {
            config: Arc::new(self.config),
            lanes,
            grace: self.grace,
            metrics: Arc::new(Metrics::new()),
        })
    }
}

// === impl Worker ===

/// A built worker, ready to [`run`](Worker::run).
pub struct Worker {
    config: Arc<Config>,
    lanes: Vec<Arc<LaneStep>>,
    grace: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<_> = self
            .lanes
            .iter()
            .map(|l| format!("{}/{}", l.pipeline.name, l.step.name))
            .collect();
        f.debug_struct("Worker").field("steps", &steps).finish()
    }
}

impl Worker {
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            registry: Registry::default(),
            duplicates: Vec::new(),
            pipeline: None,
            step: None,
            grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// This worker's metrics, for `/metrics` and `/readyz` (see `crate::metrics::serve_metrics`).
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until `shutdown` resolves, then drains. A lost connection (broker restart, a
    /// connection closed by the server, a channel error) does not end the run: the worker
    /// reconnects with backoff, declares the topology again and carries on; what it held
    /// unacked went back to the queues with the old connection. Only a config the broker
    /// cannot take (a conflicting queue) is an error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::reconnect();
        loop {
            // Not raced with `shutdown`: once consumers start, a signal must drain them, and
            // `serve` sees a signal that came during start-up.
            let reason = match self.session(&mut backoff).await {
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
    async fn session(&self, backoff: &mut Backoff) -> Result<Session, WorkerError> {
        let broker = Broker::connect(&self.config.broker).await?;
        // Declaring is idempotent, so a worker never waits on a forgotten `topology apply`; a
        // queue that exists with other arguments stops it here, by name.
        Topology::plan(&self.config)
            .declare(&broker)
            .await
            .map_err(|e| match e {
                TopologyError::Broker(e) => WorkerError::Broker(e),
                conflict => WorkerError::Setup(conflict.to_string()),
            })?;
        let names = broker.names().clone();
        let shared = Arc::new(Shared {
            config: Arc::clone(&self.config),
            publisher: Publisher::new(&broker).await?,
            tasks_exchange: names.tasks_exchange(),
            events_exchange: names.events_exchange(),
            names,
            lost: CancellationToken::new(),
            metrics: Arc::clone(&self.metrics),
        });
        // Bounded by the number of consumers: each reports at most one error before it stops.
        let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
        let mut session = Session {
            broker,
            shared,
            lanes: Vec::new(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            fatal_rx,
        };
        for step in &self.lanes {
            let started = Lane::start(
                &session.broker,
                &session.shared,
                step,
                &session.cancel,
                &session.tracker,
                &fatal_tx,
            )
            .await;
            match started {
                Ok(lane) => session.lanes.push(lane),
                Err(e) => {
                    // Lanes already started must not run on unsupervised.
                    session.abandon().await;
                    return Err(e);
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
            steps = ?self.lanes.iter().map(|l| format!("{}/{}", l.pipeline.name, l.step.name)).collect::<Vec<_>>(),
            "Worker started.");
        Ok(session)
    }
}

// === impl Session ===

/// One connection's worth of serving: its consumers, dispatchers and running steps.
struct Session {
    broker: Broker,
    shared: Arc<Shared>,
    lanes: Vec<Lane>,
    /// Stops the dispatchers.
    cancel: CancellationToken,
    tracker: TaskTracker,
    fatal_rx: mpsc::UnboundedReceiver<String>,
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
        self.cancel.cancel();
        for lane in &self.lanes {
            lane.stop_consuming().await;
        }
        self.tracker.close();
        let running = self.tracker.len();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            info!(finished = running, "Drained: every running step finished.");
        } else {
            warn!(unfinished = self.tracker.len(), grace = ?grace,
                "Grace period over; unfinished steps go back to their queues.");
        }
        for lane in self.lanes {
            lane.close().await;
        }
        self.broker.close().await;
        None
    }

    /// Stops everything at once. Nothing started on a lost connection can be acked any more,
    /// so running steps are dropped and the broker hands their messages out again.
    async fn abandon(self) {
        self.cancel.cancel();
        self.shared.lost.cancel();
        self.tracker.close();
        // Steps stop at once when `lost` fires; the bound is for one stuck in an ack on a dead
        // channel, which must not keep the worker from reconnecting.
        if tokio::time::timeout(TEARDOWN_PATIENCE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                unfinished = self.tracker.len(),
                "Steps did not stop in time; leaving them behind."
            );
        }
        for lane in self.lanes {
            lane.close().await;
        }
        self.broker.close().await;
    }
}

// === impl Lane ===

/// Deliveries received but not started, one buffer per (priority, shard) queue.
struct Buffers {
    shards: usize,
    /// The broker queue behind each slot, named once here rather than per delivery.
    names: Vec<Arc<str>>,
    queues: Mutex<Vec<VecDeque<Delivery>>>,
    ready: Notify,
}

impl Buffers {
    fn push(&self, slot: usize, delivery: Delivery) {
        self.queues.lock().expect("buffers lock")[slot].push_back(delivery);
        self.ready.notify_one();
    }

    /// The next delivery to run, with the name of the queue it came from.
    fn take(&self, picker: &mut Picker) -> Option<(Arc<str>, Delivery)> {
        let mut queues = self.queues.lock().expect("buffers lock");
        let shards = self.shards;
        let (priority, shard) = picker.pick(|p, s| !queues[p.index() * shards + s].is_empty())?;
        let slot = priority.index() * shards + shard;
        let delivery = queues[slot].pop_front()?;
        Some((Arc::clone(&self.names[slot]), delivery))
    }

    fn drain(&self) -> Vec<Delivery> {
        let mut queues = self.queues.lock().expect("buffers lock");
        queues.iter_mut().flat_map(|q| q.drain(..)).collect()
    }
}

struct Lane {
    channel: Channel,
    consumer_tags: Vec<String>,
    buffers: Arc<Buffers>,
}

impl Lane {
    async fn start(
        broker: &Broker,
        shared: &Arc<Shared>,
        step: &Arc<LaneStep>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
        fatal: &mpsc::UnboundedSender<String>,
    ) -> Result<Self, WorkerError> {
        let shards = usize::from(step.pipeline.shards);
        let concurrency = step.step.concurrency as usize;
        let channel = broker.channel().await?;
        // Per-consumer prefetch (global = false), set before consuming: each queue may hand this
        // worker up to `concurrency` messages, so one busy shard can still fill every slot.
        let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|cause| BrokerError::Amqp {
                action: "set prefetch".into(),
                cause,
            })?;
        let names: Vec<Arc<str>> = Priority::ALL
            .into_iter()
            .flat_map(|priority| (0..shards).map(move |shard| (priority, shard as u16)))
            .map(|(priority, shard)| {
                let name =
                    shared
                        .names
                        .step_queue(&step.pipeline.name, &step.step.name, priority, shard);
                Arc::from(name.as_str())
            })
            .collect();
        let buffers = Arc::new(Buffers {
            shards,
            names,
            queues: Mutex::new((0..3 * shards).map(|_| VecDeque::new()).collect()),
            ready: Notify::new(),
        });
        let mut consumer_tags = Vec::new();
        for (slot, queue) in buffers.names.iter().enumerate() {
            let queue = Arc::clone(queue);
            let mut consumer = channel
                .basic_consume(
                    queue.as_ref().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|cause| BrokerError::Amqp {
                    action: format!("consume {queue}"),
                    cause,
                })?;
            consumer_tags.push(consumer.tag().to_string());
            let (buffers, cancel, fatal) = (Arc::clone(&buffers), cancel.clone(), fatal.clone());
            tokio::spawn(async move {
                let reason = loop {
                    match consumer.next().await {
                        Some(Ok(delivery)) => buffers.push(slot, delivery),
                        Some(Err(e)) => break format!("consumer of {queue}: {e}"),
                        None => {
                            break format!(
                                "the broker cancelled the consumer of {queue} (queue deleted?)"
                            )
                        }
                    }
                };
                // During shutdown, consumers end because we cancelled them.
                if !cancel.is_cancelled() {
                    let _ = fatal.send(reason);
                }
            });
        }
        tokio::spawn(dispatch(
            Arc::clone(shared),
            Arc::clone(step),
            Arc::clone(&buffers),
            Arc::new(Semaphore::new(concurrency)),
            cancel.clone(),
            tracker.clone(),
        ));
        Ok(Self {
            channel,
            consumer_tags,
            buffers,
        })
    }

    /// Stops new deliveries and returns the buffered ones to their queues.
    async fn stop_consuming(&self) {
        for tag in &self.consumer_tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            // A dead connection may never answer; its deliveries go back anyway.
            if tokio::time::timeout(TEARDOWN_PATIENCE, cancel)
                .await
                .is_err()
            {
                break;
            }
        }
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        for delivery in self.buffers.drain() {
            let _ = delivery.acker.nack(requeue).await;
        }
    }

    async fn close(self) {
        let close = self.channel.close(200, "worker stopped".into());
        let _ = tokio::time::timeout(TEARDOWN_PATIENCE, close).await;
    }
}

/// Hands buffered deliveries to step tasks, one per free concurrency slot.
async fn dispatch(
    shared: Arc<Shared>,
    step: Arc<LaneStep>,
    buffers: Arc<Buffers>,
    slots: Arc<Semaphore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut picker = Picker::new(buffers.shards, DEFAULT_STARVE_LIMIT);
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (queue, delivery) = loop {
            if let Some(taken) = buffers.take(&mut picker) {
                break taken;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = buffers.ready.notified() => {}
            }
        };
        let (shared, step) = (Arc::clone(&shared), Arc::clone(&step));
        tracker.spawn(async move {
            process(shared, step, queue, delivery).await;
            drop(permit);
        });
    }
}
