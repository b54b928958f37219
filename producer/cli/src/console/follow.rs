//! Reads the history stream from its first retained event and then follows it live, feeding
//! every event into the console's [`Jobs`]. Where "caught up" is: like
//! `warren_broker::history::read`, the follower appends an end marker first and counts the
//! catch-up done when it meets it. After a lost connection it resumes after the last offset it
//! read, so nothing is folded twice or missed.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use warren_broker::{Broker, Outgoing, Publisher};
use warren_common::history::Batch;
use warren_common::{Config, JobId};

use super::state::Jobs;

/// Credit of the follower's consumer (each message holds up to 500 events).
const PREFETCH: u16 = 200;

/// Stream messages folded before the rows are refolded and the lock let go, while catching up.
const CATCH_UP_SLICE: u64 = 500;

/// How long the follower waits before reconnecting after a failure.
const RETRY: Duration = Duration::from_secs(2);

/// How far the follower has got.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Set once everything written before the console started is folded.
    pub(crate) ready: Option<Duration>,
    /// The newest read failure, cleared by the next successful read.
    pub(crate) error: Option<String>,
}

/// Follows the stream until the process ends.
pub(crate) async fn follow(
    config: Config,
    jobs: Arc<RwLock<Jobs>>,
    progress: Arc<RwLock<Progress>>,
) {
    let started = Instant::now();
    let mut next_offset: Option<i64> = None;
    loop {
        let outcome = read(&config, &jobs, &progress, started, &mut next_offset).await;
        if let Err(error) = outcome {
            tracing::warn!(%error, "The console lost the history stream; reconnecting.");
            progress.write().expect("progress lock").error = Some(error);
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn read(
    config: &Config,
    jobs: &RwLock<Jobs>,
    progress: &RwLock<Progress>,
    started: Instant,
    next_offset: &mut Option<i64>,
) -> Result<(), String> {
    let broker = Broker::connect(&config.broker)
        .await
        .map_err(|e| e.to_string())?;
    let stream = broker.names().history_stream();
    let caught_up = progress.read().expect("progress lock").ready.is_some();
    let nonce = format!("console:{}:{}", std::process::id(), JobId::new());
    if !caught_up {
        let publisher = Publisher::new(&broker).await.map_err(|e| e.to_string())?;
        let body = Batch::marker(nonce.clone()).encode();
        publisher
            .publish(Outgoing::persistent("", &stream, &body, "history-end"))
            .await
            .map_err(|e| format!("{stream}: cannot write the end marker: {e}"))?;
    }
    let channel = broker.channel().await.map_err(|e| e.to_string())?;
    let mut args = FieldTable::default();
    let from = match *next_offset {
        Some(offset) => AMQPValue::LongLongInt(offset),
        None => AMQPValue::LongString("first".into()),
    };
    args.insert("x-stream-offset".into(), from);
    let mut consumer = warren_broker::consume(&channel, &stream, PREFETCH, args)
        .await
        .map_err(|e| e.to_string())?;
    progress.write().expect("progress lock").error = None;
    let mut unfolded = 0u64;
    let mut read = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|e| format!("read {stream}: {e}"))?;
        read += 1;
        if let Some(offset) = warren_broker::stream_offset(&delivery.properties) {
            *next_offset = Some(offset as i64 + 1);
        }
        let ready = progress.read().expect("progress lock").ready.is_some();
        if let Some(batch) = Batch::decode(&delivery.data) {
            if !ready && batch.marker.as_deref() == Some(nonce.as_str()) {
                let (events, count) = {
                    let mut jobs = jobs.write().expect("jobs lock");
                    jobs.refold();
                    jobs.compact();
                    (jobs.events, jobs.len())
                };
                let took = started.elapsed();
                tracing::info!(
                    events,
                    jobs = count,
                    took_ms = took.as_millis() as u64,
                    "Console ready: the history is read."
                );
                // Never under the jobs' lock: readers take the two one at a time.
                progress.write().expect("progress lock").ready = Some(took);
            } else if !batch.events.is_empty() {
                let mut jobs = jobs.write().expect("jobs lock");
                for event in &batch.events {
                    jobs.add(event);
                }
                unfolded += 1;
                // Live, every message shows at once; catching up, rows are folded in slices.
                if ready || unfolded >= CATCH_UP_SLICE {
                    jobs.refold();
                    unfolded = 0;
                }
            }
        }
        // Acks on a stream only return credit.
        if read.is_multiple_of(u64::from(PREFETCH / 2)) {
            let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
        }
    }
    Err(format!("the broker ended the read of {stream}"))
}
