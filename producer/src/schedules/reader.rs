//! Reading and writing the ledger stream. A [`LedgerReader`] tails `{ns}.sched` from its first
//! record into a [`Ledger`] for as long as it lives; [`LedgerReader::sync`] waits until it has
//! read everything written before the call (it writes a marker and waits to read it back).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::sync::watch;
use warren_broker::{Broker, Outgoing, PublishError, Publisher};

use super::ledger::{Ledger, Record};

/// Credit of the ledger's consumer (streams require a prefetch).
const PREFETCH: u16 = 1000;
/// Acks on a stream only return credit: one per this many records.
const ACK_EVERY: u64 = 200;
/// Pause before reading the stream again after losing it.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The ledger could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("the schedules' ledger {stream}: {reason}")]
pub struct LedgerError {
    pub stream: String,
    pub reason: String,
}

/// Writes `record` to the ledger and waits for the broker's confirm.
pub(super) async fn append(
    broker: &Broker,
    publisher: &Publisher,
    record: &Record,
) -> Result<(), PublishError> {
    let body = record.encode();
    let stream = broker.names().sched_stream();
    publisher
        .publish(Outgoing {
            exchange: "",
            routing_key: &stream,
            body: &body,
            properties: BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        })
        .await
}

/// The ledger as read so far, kept current by a task that stops when this is dropped.
pub struct LedgerReader {
    ledger: Arc<Mutex<Ledger>>,
    /// Bumped on every record read.
    read: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LedgerReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerReader").finish_non_exhaustive()
    }
}

impl Drop for LedgerReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LedgerReader {
    pub fn start(broker: &Broker) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (tx, read) = watch::channel(0);
        let task = tokio::spawn(read_forever(broker.clone(), Arc::clone(&ledger), tx));
        Self { ledger, read, task }
    }

    /// A copy of the ledger as read so far.
    pub fn snapshot(&self) -> Ledger {
        self.ledger.lock().expect("ledger lock").clone()
    }

    /// Applies a record this process has just written (and the broker confirmed) without
    /// waiting to read it back.
    pub fn apply(&self, record: Record) {
        self.ledger.lock().expect("ledger lock").apply(record);
    }

    /// Waits, up to `timeout`, until everything written to the ledger before this call is read.
    pub async fn sync(
        &self,
        broker: &Broker,
        publisher: &Publisher,
        timeout: Duration,
    ) -> Result<(), LedgerError> {
        let nonce = format!("{}:{}", super::writer_id(), warren_common::JobId::new());
        append(
            broker,
            publisher,
            &Record::Sync {
                nonce: nonce.clone(),
            },
        )
        .await
        .map_err(|e| LedgerError {
            stream: broker.names().sched_stream(),
            reason: format!("write a sync marker: {e}"),
        })?;
        let mut read = self.read.clone();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if self.ledger.lock().expect("ledger lock").has_synced(&nonce) {
                    return true;
                }
                if read.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            _ => Err(LedgerError {
                stream: broker.names().sched_stream(),
                reason: format!("not read back within {timeout:?}"),
            }),
        }
    }
}

async fn read_forever(broker: Broker, ledger: Arc<Mutex<Ledger>>, read: watch::Sender<u64>) {
    loop {
        let error = read_once(&broker, &ledger, &read).await;
        tracing::warn!(error = %error, "Cannot read the schedules' ledger stream; trying again.");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// One session of reading from the first record (the fold is the same on a second pass).
async fn read_once(broker: &Broker, ledger: &Mutex<Ledger>, read: &watch::Sender<u64>) -> String {
    let stream = broker.names().sched_stream();
    let channel = match broker.channel().await {
        Ok(channel) => channel,
        Err(e) => return e.to_string(),
    };
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = match warren_broker::consume(&channel, &stream, PREFETCH, args).await {
        Ok(consumer) => consumer,
        Err(e) => return e.to_string(),
    };
    let mut count = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(cause) => return format!("read {stream}: {cause}"),
        };
        count += 1;
        if let Some(record) = Record::decode(&delivery.data) {
            ledger.lock().expect("ledger lock").apply(record);
        }
        read.send_modify(|n| *n += 1);
        if count.is_multiple_of(ACK_EVERY) {
            let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
        }
    }
    format!("the broker ended the consumer of {stream} (stream deleted?)")
}
