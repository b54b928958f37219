//! Many independent broker calls (declares, deletes) spread over a few channels, with several
//! in flight on each. A RabbitMQ channel runs its methods one after another, and a quorum
//! queue's declare waits for the queue's Raft cluster to start, so one channel declaring 700
//! queues in turn takes seconds; several channels run in parallel on the broker, and pipelining
//! on each hides the round trips.

use std::future::Future;

use futures::stream::{FuturesUnordered, StreamExt};
use lapin::Channel;

use crate::connection::Broker;
use crate::error::BrokerError;

/// Channels a spread opens (fewer for fewer items).
pub(crate) const CHANNELS: usize = 8;
/// Calls in flight on each channel. Replies on a channel come in order, so lapin matches them.
pub(crate) const IN_FLIGHT: usize = 4;

/// Which channel item `index` of `items` goes to: round-robin, so every channel gets a share
/// of every kind of item.
fn channel_of(index: usize, channels: usize) -> usize {
    index % channels
}

/// How many channels `items` items need.
fn channels_for(items: usize) -> usize {
    items.div_ceil(IN_FLIGHT).clamp(1, CHANNELS)
}

/// Runs `call` on every item and returns each item's result, in the order of `items`; fails
/// only when a channel cannot be opened. The channels are opened one after another (so they
/// share one pooled connection) and closed at the end. A call that fails closes its channel
/// on the broker, and the calls after it on that channel then fail too: the caller decides
/// what to retry.
pub(crate) async fn spread<T, R, E, F, Fut>(
    broker: &Broker,
    items: &[T],
    call: F,
) -> Result<Vec<Result<R, E>>, BrokerError>
where
    T: Copy,
    F: Fn(Channel, T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let count = channels_for(items.len());
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        match broker.channel().await {
            Ok(channel) => channels.push(channel),
            Err(e) => {
                close(channels).await;
                return Err(e);
            }
        }
    }
    let mut batches: Vec<Vec<(usize, T)>> = vec![Vec::new(); count];
    for (i, item) in items.iter().enumerate() {
        batches[channel_of(i, count)].push((i, *item));
    }
    let runs = channels
        .iter()
        .zip(batches)
        .map(|(channel, batch)| run_batch(channel, batch, &call));
    let mut done: Vec<(usize, Result<R, E>)> = futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    close(channels).await;
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, result)| result).collect())
}

/// One channel's share, [`IN_FLIGHT`] at a time.
async fn run_batch<T, R, E, F, Fut>(
    channel: &Channel,
    batch: Vec<(usize, T)>,
    call: &F,
) -> Vec<(usize, Result<R, E>)>
where
    F: Fn(Channel, T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let mut done = Vec::with_capacity(batch.len());
    let mut waiting = batch.into_iter();
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < IN_FLIGHT {
            let Some((i, item)) = waiting.next() else {
                break;
            };
            let call = call(channel.clone(), item);
            in_flight.push(async move { (i, call.await) });
        }
        match in_flight.next().await {
            Some(result) => done.push(result),
            None => return done,
        }
    }
}

async fn close(channels: Vec<Channel>) {
    for channel in channels {
        if channel.status().connected() {
            let _ = channel.close(200, "done".into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_item_has_one_channel_and_channels_share_evenly(items in 1usize..2000) {
            let count = channels_for(items);
            prop_assert!((1..=CHANNELS).contains(&count));
            let mut load = vec![0usize; count];
            for i in 0..items {
                load[channel_of(i, count)] += 1;
            }
            let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            prop_assert!(max - min <= 1, "{load:?}");
            prop_assert!(*min >= 1);
        }
    }
}
