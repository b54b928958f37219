//! The namespace's control stream (`{ns}.control`), where hot marks are published and read,
//! and where workers report their lanes (`tenants.rs`) and themselves (`workers.rs`).
//! Every producer and worker tails it into its [`HotSet`] from a little before the longest a
//! mark lives, so a process that starts mid-flood knows the hot tenants at once. When the stream
//! cannot be read the set is emptied, which routes every job by the plain hash again (the
//! fallback), and the reader keeps trying to come back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use warren_common::{now_ms, PipelineConfig, Priority};

use crate::connection::Broker;
use crate::error::{BrokerError, PublishError};
use crate::hot::{HotMark, HotSet, HotTenant};
use crate::publish::{Outgoing, Publisher};
use crate::route::{Lane, StepRoute};
use crate::tenants::LaneDigest;
use crate::workers::WorkerReport;

/// How long the control stream keeps marks: far more than a reader looks back.
pub const CONTROL_MAX_AGE: &str = "1h";

/// What the control stream takes from the events exchange: every `control.` key.
pub const CONTROL_BINDING: &str = "control.#";

/// Routing key prefix of hot marks on the events exchange.
pub const HOT_KEY_PREFIX: &str = "control.hot.";

/// Routing key prefix of lane digests (`tenants.rs`) on the events exchange.
pub const LANES_KEY_PREFIX: &str = "control.lanes.";

/// Routing key prefix of worker reports (`workers.rs`) on the events exchange.
pub const WORKERS_KEY_PREFIX: &str = "control.worker.";

/// How long [`read_recent`] waits for one more entry before it counts the stream as read.
const QUIET: Duration = Duration::from_millis(500);
/// The longest [`read_recent`] reads a busy stream.
const READ_AT_MOST: Duration = Duration::from_secs(5);

/// Credit of the control stream's consumer (streams require a prefetch).
const PREFETCH: u16 = 200;

/// How far before its expiry window a reader starts, for clock skew between machines.
const LOOK_BACK_MARGIN: Duration = Duration::from_secs(30);

/// Pause between attempts to read the stream again after losing it.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The hot tenants as this process knows them, kept current by a reader task of the control
/// stream that stops when this is dropped.
pub struct HotRouter {
    set: Arc<RwLock<HotSet>>,
    live: Arc<AtomicBool>,
    /// Set before the reader is aborted: an abort lands only at the reader's next await, and
    /// the connection closing meanwhile must not read as a lost stream.
    stopped: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    exchange: String,
}

impl std::fmt::Debug for HotRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotRouter")
            .field("live", &self.is_live())
            .finish_non_exhaustive()
    }
}

impl Drop for HotRouter {
    fn drop(&mut self) {
        self.stop();
    }
}

impl HotRouter {
    /// Starts tailing the control stream of `broker`'s namespace, from `hot_for` (the longest a
    /// mark lives) ago. Never fails: until the stream is read, nothing is hot.
    pub fn start(broker: &Broker, hot_for: Duration) -> Self {
        let set = Arc::new(RwLock::new(HotSet::default()));
        let live = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_forever(
            broker.clone(),
            Arc::clone(&set),
            Arc::clone(&live),
            Arc::clone(&stopped),
            hot_for + LOOK_BACK_MARGIN,
        ));
        Self {
            set,
            live,
            stopped,
            reader,
            exchange: broker.names().events_exchange(),
        }
    }

    /// Stops reading, before the connection is closed on purpose (so its end is not reported as
    /// a lost stream).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.reader.abort();
    }

    /// Whether the stream is being read (when not, nothing is hot).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// The route of `tenant`'s message for `step` of `pipeline`: its hot lane while it is hot,
    /// else its shard.
    pub fn route(
        &self,
        pipeline: &PipelineConfig,
        step: &str,
        priority: Priority,
        tenant: &str,
    ) -> StepRoute {
        self.read()
            .route(pipeline, step, priority, tenant, now_ms())
    }

    /// The hot lane of `tenant` in `pipeline` now, if it is hot there.
    pub fn lane(&self, pipeline: &PipelineConfig, tenant: &str) -> Option<Lane> {
        self.read().lane(pipeline, tenant, now_ms())
    }

    /// Whether `pipeline` may have hot tenants: the cheap test before decoding a message.
    pub fn any_in(&self, pipeline: &str) -> bool {
        self.read().any_in(pipeline)
    }

    /// Whether `tenant` is marked hot in `pipeline` with more than half of `hot_for_ms` left:
    /// such a mark needs no renewal yet.
    pub fn fresh(&self, pipeline: &str, tenant: &str, hot_for_ms: u64) -> bool {
        let now = now_ms();
        self.read()
            .until(pipeline, tenant, now)
            .is_some_and(|until| until > now + hot_for_ms / 2)
    }

    /// Every tenant hot now.
    pub fn list(&self) -> Vec<HotTenant> {
        self.read().list(now_ms())
    }

    /// Publishes `mark` (with confirm) and, once the broker has it, applies it here without
    /// waiting for the stream to bring it back. A mark the stream did not take is not applied:
    /// routing stays by shard, as everywhere else.
    pub async fn mark(&self, publisher: &Publisher, mark: &HotMark) -> Result<(), PublishError> {
        let key = format!("{HOT_KEY_PREFIX}{}", mark.pipeline);
        let body = mark.encode();
        let id = format!("hot:{}:{}:{}", mark.pipeline, mark.tenant, mark.until);
        publisher
            .publish(Outgoing::persistent(&self.exchange, &key, &body, &id))
            .await?;
        self.set.write().expect("hot set lock").apply(mark);
        Ok(())
    }

    /// Publishes a lane digest (with confirm).
    pub async fn digest(
        &self,
        publisher: &Publisher,
        digest: &LaneDigest,
    ) -> Result<(), PublishError> {
        let key = format!("{LANES_KEY_PREFIX}{}", digest.pipeline);
        let body = digest.encode();
        let id = format!("lanes:{}:{}", digest.by, digest.at);
        publisher
            .publish(Outgoing::persistent(&self.exchange, &key, &body, &id))
            .await
    }

    /// Publishes a worker's report on itself (with confirm).
    pub async fn report(
        &self,
        publisher: &Publisher,
        report: &WorkerReport,
    ) -> Result<(), PublishError> {
        let key = format!("{WORKERS_KEY_PREFIX}{}", report.id);
        let body = report.encode();
        let id = format!("worker:{}:{}", report.id, report.at);
        publisher
            .publish(Outgoing::persistent(&self.exchange, &key, &body, &id))
            .await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HotSet> {
        self.set.read().expect("hot set lock")
    }
}

/// A consumer of the control stream from `look_back` ago, on a channel of its own.
async fn open(broker: &Broker, look_back: Duration) -> Result<(Channel, Consumer), BrokerError> {
    let channel = broker.channel().await?;
    let from_ms = now_ms().saturating_sub(look_back.as_millis() as u64);
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::Timestamp(from_ms / 1000),
    );
    let stream = broker.names().control_stream();
    let consumer = crate::consume(&channel, &stream, PREFETCH, args).await?;
    Ok((channel, consumer))
}

/// What the control stream held over a look-back window.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    /// The tenants hot now.
    pub hot: Vec<HotTenant>,
    /// Every lane digest of the window.
    pub digests: Vec<LaneDigest>,
    /// The newest report of each worker heard from in the window (stopped ones included: see
    /// [`crate::workers::live`]).
    pub workers: Vec<WorkerReport>,
}

/// What the control stream holds from `look_back` ago until now. For a one-off look
/// (`warren queues --tenants`, the console), not for routing.
pub async fn read_recent(broker: &Broker, look_back: Duration) -> Result<Recent, BrokerError> {
    let (channel, mut consumer) = open(broker, look_back).await?;
    let (mut set, mut digests, mut workers) = (HotSet::default(), Vec::new(), Vec::new());
    let until = tokio::time::Instant::now() + READ_AT_MOST;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + QUIET),
        consumer.next(),
    )
    .await
    {
        if let Ok(mark) = HotMark::decode(&delivery.data) {
            set.apply(&mark);
        } else if let Some(digest) = LaneDigest::decode(&delivery.data) {
            digests.push(digest);
        } else if let Some(report) = WorkerReport::decode(&delivery.data) {
            workers.push(report);
        }
        // Anything else (a newer version's kind) is skipped.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
    let _ = channel.close(200, "read".into()).await;
    Ok(Recent {
        hot: set.list(now_ms()),
        digests,
        workers: crate::workers::newest(workers),
    })
}

/// Reads the stream into `set` for as long as the process runs, emptying the set whenever the
/// stream is lost.
async fn read_forever(
    broker: Broker,
    set: Arc<RwLock<HotSet>>,
    live: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    look_back: Duration,
) {
    // Said once per loss: when reading stops, not again for each failed retry.
    let mut lost = false;
    loop {
        let error = read(&broker, &set, &live, look_back, lost).await;
        let was_live = live.swap(false, Ordering::Relaxed);
        set.write().expect("hot set lock").clear();
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        if was_live || !lost {
            tracing::warn!(error = %error,
                "Cannot read the control stream; routing every tenant by its shard until it is back.");
        }
        lost = true;
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// One session of reading: returns why it ended.
async fn read(
    broker: &Broker,
    set: &RwLock<HotSet>,
    live: &AtomicBool,
    look_back: Duration,
    was_lost: bool,
) -> String {
    let stream = broker.names().control_stream();
    let (_channel, mut consumer) = match open(broker, look_back).await {
        Ok(opened) => opened,
        Err(e) => return e.to_string(),
    };
    live.store(true, Ordering::Relaxed);
    if was_lost {
        tracing::info!(stream = %stream, "Reading the control stream again; hot tenants take their hot lanes.");
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(cause) => return format!("read {stream}: {cause}"),
        };
        // Anything else on the stream (a foreign writer's, a newer version's) is skipped.
        if let Ok(mark) = HotMark::decode(&delivery.data) {
            let now = now_ms();
            let mut set = set.write().expect("hot set lock");
            set.apply(&mark);
            set.prune(now);
        }
        // On a stream an ack only returns credit.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
    format!("the broker ended the consumer of {stream} (stream deleted?)")
}
