//! Records that many step tasks append and each waits for, written as few messages: a
//! [`BatchWriter`] concatenates the encoded records that arrive while earlier batches await
//! their confirms into the next message (group commit, as the history writer does it; idle, a
//! record goes out at once), so the broker writes, and the reader reads, one message per batch
//! instead of one per record. A task waits for the confirm of the batch that holds its record
//! before it acks, so a record is stored at least once. Used for fan-out parts' ends
//! (`fanin.ends` in the fan-in stream) and the results check's copies of result events.

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::error::PublishError;
use crate::publish::{Outgoing, PendingConfirm, Publisher};

/// Batches published and not yet confirmed at once.
const IN_FLIGHT: usize = 4;

/// Most records in one message.
const MAX_RECORDS: usize = 1_000;

/// Most bytes in one message, records being as large as their outputs (a batch passes this by
/// at most one record).
const MAX_BYTES: usize = 1 << 20;

type Waiter = oneshot::Sender<Result<(), String>>;

/// One encoded record, and who waits for its confirm.
struct Item {
    body: Vec<u8>,
    waiter: Waiter,
}

/// A handle on a batch writer; the task ends when the handle is dropped, after writing what
/// it holds.
#[derive(Debug)]
pub struct BatchWriter {
    tx: mpsc::UnboundedSender<Item>,
    routing_key: String,
}

impl BatchWriter {
    /// A writer publishing to `exchange` with `routing_key` through `publisher`, a channel of
    /// its own; `message_id` names what its messages are.
    pub fn start(
        publisher: Publisher,
        exchange: String,
        routing_key: String,
        message_id: &'static str,
    ) -> Self {
        // Unbounded: each item is a step task waiting for its confirm, so the deliveries in
        // flight (the prefetch) bound it.
        let (tx, rx) = mpsc::unbounded_channel();
        let to = Destination {
            exchange,
            routing_key: routing_key.clone(),
            message_id,
        };
        tokio::spawn(write(publisher, to, rx));
        Self { tx, routing_key }
    }

    /// Appends `record` (self-delimiting: MessagePack) and resolves once the batch holding it
    /// is confirmed.
    pub async fn append(&self, record: Vec<u8>) -> Result<(), PublishError> {
        let (waiter, done) = oneshot::channel();
        let failed = |reason: String| PublishError::Batched {
            routing_key: self.routing_key.clone(),
            reason,
        };
        self.tx
            .send(Item {
                body: record,
                waiter,
            })
            .map_err(|_| failed("the batch writer has stopped".into()))?;
        done.await
            .map_err(|_| failed("the batch writer has stopped".into()))?
            .map_err(failed)
    }
}

/// Where a writer's messages go.
struct Destination {
    exchange: String,
    routing_key: String,
    message_id: &'static str,
}

/// The writer's task: takes what is queued (up to a message's worth), publishes it, and goes
/// on with the next batch while up to [`IN_FLIGHT`] confirms are outstanding.
async fn write(publisher: Publisher, to: Destination, mut rx: mpsc::UnboundedReceiver<Item>) {
    let mut pending = FuturesUnordered::new();
    let mut carry: Option<Item> = None;
    let mut open = true;
    loop {
        if carry.is_none() {
            tokio::select! {
                item = rx.recv(), if open && pending.len() < IN_FLIGHT => match item {
                    Some(item) => carry = Some(item),
                    None => open = false,
                },
                Some(()) = pending.next(), if !pending.is_empty() => continue,
                else => return,
            }
        }
        let Some(first) = carry.take() else {
            continue;
        };
        let mut body = first.body;
        let mut waiters = vec![first.waiter];
        while waiters.len() < MAX_RECORDS && body.len() < MAX_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    body.extend_from_slice(&item.body);
                    waiters.push(item.waiter);
                }
                Err(_) => break,
            }
        }
        let msg = Outgoing::persistent(&to.exchange, &to.routing_key, &body, to.message_id);
        let started = publisher.start(msg).await;
        pending.push(settle(started, waiters));
        if pending.len() >= IN_FLIGHT {
            pending.next().await;
        }
    }
}

/// Waits for a batch's confirm and tells its waiters.
async fn settle(started: Result<PendingConfirm, PublishError>, waiters: Vec<Waiter>) {
    let outcome = match started {
        Ok(confirm) => confirm.wait().await,
        Err(e) => Err(e),
    }
    .map_err(|e| e.to_string());
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}
