//! Parts' ends on their way to the fan-in stream: a [`FaninWriter`] appends them in batches
//! (`fanin.ends` messages, many ends each), so the broker writes, and the coordinator reads,
//! one message per batch instead of one per part. A part's task waits for the confirm of the
//! batch that holds its end before it acks, so an end is in the stream at least once.
//!
//! This is group commit, as the history writer does it: the ends that come while earlier
//! batches await their confirms make the next batch; idle, an end goes out at once.

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::ENDS_KEY;
use crate::error::PublishError;
use crate::publish::{Outgoing, PendingConfirm, Publisher};

/// Batches published and not yet confirmed at once.
const IN_FLIGHT: usize = 4;

/// Most ends in one message.
const MAX_ENDS: usize = 1_000;

/// Most bytes in one message, ends being as large as their outputs (a batch passes this by
/// at most one end).
const MAX_BYTES: usize = 1 << 20;

type Waiter = oneshot::Sender<Result<(), String>>;

/// One encoded end, and who waits for its confirm.
struct Item {
    body: Vec<u8>,
    waiter: Waiter,
}

/// A handle on a fan-in writer; the task ends when the handle is dropped, after writing what
/// it holds.
#[derive(Debug)]
pub struct FaninWriter {
    tx: mpsc::UnboundedSender<Item>,
}

impl FaninWriter {
    /// A writer publishing to `exchange` (the events exchange) through `publisher`, a channel
    /// of its own.
    pub fn start(publisher: Publisher, exchange: String) -> Self {
        // Unbounded: each item is a part task waiting for its confirm, so the deliveries in
        // flight (the prefetch) bound it.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(publisher, exchange, rx));
        Self { tx }
    }

    /// Appends `end` (an encoded `EndedPart`) and resolves once the batch holding it is
    /// confirmed.
    pub async fn append(&self, end: Vec<u8>) -> Result<(), PublishError> {
        let (waiter, done) = oneshot::channel();
        let failed = |reason: String| PublishError::Batched {
            routing_key: ENDS_KEY.to_string(),
            reason,
        };
        self.tx
            .send(Item { body: end, waiter })
            .map_err(|_| failed("the fan-in writer has stopped".into()))?;
        done.await
            .map_err(|_| failed("the fan-in writer has stopped".into()))?
            .map_err(failed)
    }
}

/// The writer's task: takes what is queued (up to a message's worth), publishes it, and goes
/// on with the next batch while up to [`IN_FLIGHT`] confirms are outstanding.
async fn write(publisher: Publisher, exchange: String, mut rx: mpsc::UnboundedReceiver<Item>) {
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
        while waiters.len() < MAX_ENDS && body.len() < MAX_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    body.extend_from_slice(&item.body);
                    waiters.push(item.waiter);
                }
                Err(_) => break,
            }
        }
        let msg = Outgoing::persistent(&exchange, ENDS_KEY, &body, "fanin:ends");
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
