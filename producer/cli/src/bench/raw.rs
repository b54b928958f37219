//! The raw-lapin counterpart: the least a program must do for the same guarantees as warren
//! (persistent messages, publisher confirms with the same window, manual acks after the
//! successor's confirm, and with `[results] check` on a copy of each result in a quorum queue),
//! on queues declared exactly like warren's step queues (through the same `Topology` plan, in a
//! namespace of its own). Nothing of warren is on its message path: no envelope, no codec, no
//! dispatcher, no `Publisher`; only lapin calls (warren's names and its `consume` set-up, a qos
//! and a `basic.consume`, only say where). It runs on a tokio runtime of its own, sized like the
//! one the warren workers get.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use indicatif::ProgressBar;
use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use warren_broker::{consume, Broker, Names, StepRoute};
use warren_common::{now_ms, Config, JobStatus, Priority};

/// Confirms in flight per batch: `Client::submit_many`'s own window, so both sides publish alike.
pub(super) use warren_producer::CONFIRM_WINDOW;

/// Credit of the results-stream reader, and how many events it acks at once: the same as the
/// SDK's `ResultStream`.
const RESULTS_PREFETCH: u16 = 500;
const RESULTS_ACK_EVERY: u32 = 100;

/// What counts as one message done at the end of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    /// The last hop acked it.
    Acked,
    /// Its result arrived on the results stream, read as warren's SDK reads results: the
    /// moment a user could see it.
    ResultRead,
}

/// One hop of a relay: consume `queue`; publish each message on to `next` (exchange, routing
/// key) with confirm before acking it, or just ack when `next` is `None`.
#[derive(Debug, Clone)]
pub(super) struct Hop {
    pub(super) queue: String,
    pub(super) next: Option<(String, String)>,
}

pub(super) struct Raw {
    handle: Handle,
    broker: Broker,
    /// One confirm channel for every publish, as a warren worker has one `Publisher`.
    publish: Channel,
    config: Config,
    /// A body as big as a warren step message, so both sides move the same bytes.
    body: Arc<Vec<u8>>,
}

impl Raw {
    /// Connects from inside `handle`'s runtime, so lapin's I/O runs there.
    pub(super) async fn connect(
        handle: Handle,
        config: Config,
        body: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let broker_config = config.broker.clone();
        let copies = config.checks_results();
        let (broker, publish) = handle
            .spawn(async move {
                let broker = Broker::connect(&broker_config).await?;
                let publish = broker.confirm_channel().await?;
                if copies {
                    copy_results(&broker).await?;
                }
                Ok::<_, anyhow::Error>((broker, publish))
            })
            .await??;
        Ok(Self {
            handle,
            broker,
            publish,
            config,
            body: Arc::new(body),
        })
    }

    pub(super) fn names(&self) -> &Names {
        self.broker.names()
    }

    /// The step queue and routing key a tenant's message for `pipeline`/`step` uses.
    pub(super) fn route(
        &self,
        pipeline: &str,
        step: &str,
        priority: Priority,
        tenant: &str,
    ) -> (String, String) {
        let pipeline = self.config.pipeline(pipeline).expect("bench pipeline");
        let route = StepRoute::for_tenant(pipeline, step, priority, tenant);
        (route.queue(self.names()), route.routing_key())
    }

    /// A relay through every step of `pipeline` for `tenant`'s normal-priority messages, as a
    /// worker carries its jobs: each hop consumes a step's queue and publishes on to the next
    /// step, the last one to the events exchange, under the job's result key. Also returns the
    /// routing key of the first step, where the messages start.
    pub(super) fn relay(&self, pipeline: &str, tenant: &str) -> (String, Vec<Hop>) {
        let steps = &self
            .config
            .pipeline(pipeline)
            .expect("bench pipeline")
            .steps;
        let routes: Vec<_> = steps
            .iter()
            .map(|s| self.route(pipeline, &s.name, Priority::Normal, tenant))
            .collect();
        let result = (
            self.events_exchange(),
            Names::result_key(JobStatus::Succeeded, pipeline, tenant),
        );
        let hops = routes
            .iter()
            .enumerate()
            .map(|(i, (queue, _))| Hop {
                queue: queue.clone(),
                next: Some(match routes.get(i + 1) {
                    Some((_, key)) => (self.tasks_exchange(), key.clone()),
                    None => result.clone(),
                }),
            })
            .collect();
        (routes[0].1.clone(), hops)
    }

    pub(super) fn tasks_exchange(&self) -> String {
        self.names().tasks_exchange()
    }

    pub(super) fn events_exchange(&self) -> String {
        self.names().events_exchange()
    }

    fn results_stream(&self) -> String {
        self.names().results_stream()
    }

    /// Publishes `n` messages to the tasks exchange under `key`, [`CONFIRM_WINDOW`] at a time,
    /// each window's confirms settled before the next: what `submit_many` does. Returns the
    /// time it took.
    pub(super) async fn publish(&self, key: &str, n: usize) -> anyhow::Result<Duration> {
        let (channel, body, exchange, key) = (
            self.publish.clone(),
            Arc::clone(&self.body),
            self.tasks_exchange(),
            key.to_string(),
        );
        self.handle
            .spawn(async move {
                let started = Instant::now();
                let mut sent = 0;
                while sent < n {
                    let window = CONFIRM_WINDOW.min(n - sent);
                    let mut pending = Vec::with_capacity(window);
                    for i in sent..sent + window {
                        let id = format!("raw-{i:032}");
                        pending.push(publish_start(&channel, &exchange, &key, &body, &id).await?);
                    }
                    for confirm in pending {
                        check(&confirm.await?, &key)?;
                    }
                    sent += window;
                }
                Ok(started.elapsed())
            })
            .await?
    }

    /// S9's raw counterpart: publishes `n` messages under `key` on a confirm channel of their
    /// own, through a sliding window of [`CONFIRM_WINDOW`] confirms (as a warren fan-out
    /// publishes its parts), while [`Raw::drain`] relays them through `hops` at once. Returns
    /// the time from the first publish to the `n`th result read.
    pub(super) async fn fan_out(
        &self,
        key: &str,
        hops: Vec<Hop>,
        n: usize,
        prefetch: u16,
        bar: ProgressBar,
    ) -> anyhow::Result<Duration> {
        let (broker, body) = (self.broker.clone(), Arc::clone(&self.body));
        let (exchange, key) = (self.tasks_exchange(), key.to_string());
        let channel = self
            .handle
            .spawn(async move { broker.confirm_channel().await })
            .await??;
        let parts = channel.clone();
        let publish = self.handle.spawn(async move {
            let mut window = std::collections::VecDeque::with_capacity(CONFIRM_WINDOW);
            for i in 0..n {
                if window.len() == CONFIRM_WINDOW {
                    let oldest: lapin::PublisherConfirm = window.pop_front().expect("full");
                    check(&oldest.await?, &key)?;
                }
                let id = format!("part-{i:032}");
                window.push_back(publish_start(&parts, &exchange, &key, &body, &id).await?);
            }
            for confirm in window {
                check(&confirm.await?, &key)?;
            }
            Ok::<_, anyhow::Error>(())
        });
        let started = Instant::now();
        let (published, drained) = tokio::join!(
            async { publish.await? },
            self.drain(hops, n, prefetch, Done::ResultRead, bar)
        );
        let took = started.elapsed();
        let closed = self
            .handle
            .spawn(async move { channel.close(200, "done".into()).await });
        let _ = closed.await;
        published?;
        drained?;
        Ok(took)
    }

    /// Starts a consumer per hop (prefetch `prefetch`, like a warren lane's per-consumer
    /// prefetch) and returns when `n` messages are [`Done`]: the time from the first
    /// `basic.consume` to the `n`th.
    pub(super) async fn drain(
        &self,
        hops: Vec<Hop>,
        n: usize,
        prefetch: u16,
        count: Done,
        bar: ProgressBar,
    ) -> anyhow::Result<Duration> {
        let (broker, publish) = (self.broker.clone(), self.publish.clone());
        let stream = self.results_stream();
        self.handle
            .spawn(async move {
                let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(), String>>();
                let mut channels = Vec::new();
                if count == Done::ResultRead {
                    // Attached before the clock starts, as warren's reader is; only results
                    // written from now on ("next").
                    let channel = broker.channel().await?;
                    let mut args = FieldTable::default();
                    args.insert(
                        "x-stream-offset".into(),
                        AMQPValue::LongString("next".into()),
                    );
                    let mut results = consume(&channel, &stream, RESULTS_PREFETCH, args).await?;
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        let mut unacked = 0;
                        while let Some(Ok(delivery)) = results.next().await {
                            // Acks on a stream only return credit: one for many, as the SDK's
                            // reader does.
                            unacked += 1;
                            if unacked >= RESULTS_ACK_EVERY {
                                unacked = 0;
                                let multiple = BasicAckOptions { multiple: true };
                                let _ = delivery.acker.ack(multiple).await;
                            }
                            if done.send(Ok(())).is_err() {
                                break;
                            }
                        }
                    });
                    channels.push(channel);
                }
                let started = Instant::now();
                let last = hops.len() - 1;
                for (i, hop) in hops.into_iter().enumerate() {
                    let channel = broker.channel().await?;
                    let mut consumer =
                        consume(&channel, &hop.queue, prefetch, FieldTable::default()).await?;
                    // Every hop reports failures; the last one also its acks, when they count.
                    let done = done_tx.clone();
                    let count_acks = i == last && count == Done::Acked;
                    let publish = publish.clone();
                    tokio::spawn(async move {
                        while let Some(Ok(delivery)) = consumer.next().await {
                            let Some((exchange, key)) = hop.next.clone() else {
                                let acked = delivery.acker.ack(BasicAckOptions::default()).await;
                                if count_acks || acked.is_err() {
                                    let _ = done.send(acked.map(|_| ()).map_err(|e| e.to_string()));
                                }
                                continue;
                            };
                            // A task per delivery, as a warren worker runs each step in a task
                            // of its own; the prefetch bounds how many are in flight.
                            let (publish, done) = (publish.clone(), done.clone());
                            tokio::spawn(async move {
                                let id = delivery
                                    .properties
                                    .message_id()
                                    .as_ref()
                                    .map(|m| m.to_string())
                                    .unwrap_or_default();
                                let result = async {
                                    let confirm = publish_start(
                                        &publish,
                                        &exchange,
                                        &key,
                                        &delivery.data,
                                        &id,
                                    )
                                    .await?;
                                    check(&confirm.await?, &key)?;
                                    delivery.acker.ack(BasicAckOptions::default()).await?;
                                    Ok::<_, anyhow::Error>(())
                                }
                                .await;
                                if count_acks || result.is_err() {
                                    let _ = done.send(result.map_err(|e| e.to_string()));
                                }
                            });
                        }
                    });
                    channels.push(channel);
                }
                drop(done_tx);
                let mut count = 0;
                while count < n {
                    match done_rx.recv().await {
                        Some(Ok(())) => {
                            count += 1;
                            bar.set_position(count as u64);
                        }
                        Some(Err(e)) => bail!("raw relay: {e}"),
                        None => bail!("raw consumers stopped after {count} of {n} messages"),
                    }
                }
                let took = started.elapsed();
                // Closing the channels cancels the consumers.
                for channel in channels {
                    let _ = channel.close(200, "done".into()).await;
                }
                Ok(took)
            })
            .await?
    }

    /// `m` times, one at a time: publish one message with confirm, and time until a consumer of
    /// its queue has it.
    pub(super) async fn round_trips(
        &self,
        queue: &str,
        key: &str,
        m: usize,
        prefetch: u16,
        bar: ProgressBar,
    ) -> anyhow::Result<Vec<Duration>> {
        let (broker, publish, body) = (
            self.broker.clone(),
            self.publish.clone(),
            Arc::clone(&self.body),
        );
        let (queue, key, exchange) = (queue.to_string(), key.to_string(), self.tasks_exchange());
        self.handle
            .spawn(async move {
                let channel = broker.channel().await?;
                let mut consumer =
                    consume(&channel, &queue, prefetch, FieldTable::default()).await?;
                let (tx, mut rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        let at = Instant::now();
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        if tx.send(at).is_err() {
                            break;
                        }
                    }
                });
                let mut times = Vec::with_capacity(m);
                for i in 0..m {
                    let started = Instant::now();
                    let id = format!("rtt-{i:032}");
                    check(
                        &publish_start(&publish, &exchange, &key, &body, &id)
                            .await?
                            .await?,
                        &key,
                    )?;
                    let Some(at) = rx.recv().await else {
                        bail!("raw round-trip consumer stopped");
                    };
                    times.push(at - started);
                    bar.inc(1);
                }
                let _ = channel.close(200, "done".into()).await;
                Ok(times)
            })
            .await?
    }
}

/// With `[results] check` on, a warren step is acked only once a copy of its result is in a
/// quorum queue too: on RabbitMQ 3.10 a stream can lose events it confirmed when its leader moves
/// (rabbitmq-server#9457). The raw program gets the same guarantee the cheapest way it has: a
/// binding that routes every result to its namespace's check queue beside the results stream,
/// so its one publish is confirmed once both hold it.
async fn copy_results(broker: &Broker) -> anyhow::Result<()> {
    let names = broker.names();
    let (queue, exchange) = (names.results_check(), names.events_exchange());
    let channel = broker.channel().await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            Names::EVERY_RESULT.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("bind {queue} to {exchange}"))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// The properties warren puts on every message (`Outgoing::persistent`).
fn properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/msgpack".into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_timestamp(now_ms() / 1000)
}

async fn publish_start(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    id: &str,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties(id),
        )
        .await
}

fn check(confirmation: &Confirmation, key: &str) -> anyhow::Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("raw publish to {key}: unroutable"),
        _ => bail!("raw publish to {key}: not confirmed"),
    }
}
