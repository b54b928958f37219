//! The effects of a delivery's fate: every publish a step makes (the next step's message, a
//! retry, the job's result, a dead letter), each waiting for the broker's confirm, and the
//! hand-off that holds an output while its queue is full. Where a step message goes comes from
//! its [`StepRoute`]; nothing here decides.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use warren_broker::fanin::{self, ENDS_KEY};
use warren_broker::{
    BatchWriter, Broker, BrokerError, HotMark, HotRouter, Names, Outgoing, PendingConfirm,
    PublishError, Publisher, StepRoute,
};
use warren_common::backoff::Backoff;
use warren_common::bundle::{self, Bundle};
use warren_common::dead_letter as headers;
use warren_common::fanout::{EndedPart, Opened};
use warren_common::{encode_result, now_ms, Envelope, Reason, ResultEvent};

use super::events::{DeadLettered, Event, HandOffHeld, PublishConfirmed, PublishUnconfirmed};
use crate::metrics::{Metrics, PublishKind};

/// Part publishes awaiting their confirms at once.
const PARTS_IN_FLIGHT: usize = 1_000;

/// Longest wait between tries to hand an output to a full queue.
const BACKLOG_FULL_MAX_WAIT: Duration = Duration::from_secs(5);

/// How long a hand-off waits for its confirm before it publishes again on a fresh channel.
/// Shorter than the publisher's default: a step holds its delivery (and a prefetch slot) while
/// it waits, and on RabbitMQ 3.10 a channel whose stream changed leader may never confirm.
const CONFIRM_PATIENCE: Duration = Duration::from_secs(15);

/// Where one session's step tasks publish.
pub(crate) struct Outbox {
    publisher: Publisher,
    broker: Broker,
    /// Parts' ends for the fan-in stream, on a channel of their own; started by the first end.
    fanin: OnceCell<BatchWriter>,
    /// Copies of result events for the results check's queue, in batches, while `[results]
    /// check` is on; started by the first result.
    check: Option<OnceCell<BatchWriter>>,
    /// A fan-out's parts, on a channel of their own: a broker confirms a channel's publishes in
    /// order, so on the shared one every result of a part that already ran would wait behind
    /// the window of parts still being enqueued, and the parts' processing would stall.
    parts: OnceCell<Publisher>,
    names: Names,
    tasks_exchange: String,
    events_exchange: String,
    /// Cancelled when the session's connection is lost: a held output gives up waiting.
    lost: CancellationToken,
    metrics: Arc<Metrics>,
}

/// A message for the dead-letter queue, with what its headers say.
#[derive(Debug)]
pub(crate) struct DeadLetter<'a> {
    pub(crate) body: &'a [u8],
    /// Its message id: the job id, or what the set-aside decision chose.
    pub(crate) id: &'a str,
    /// The pipeline label of the dead-letter metric, when the config has it.
    pub(crate) pipeline: Option<&'a str>,
    pub(crate) reason: Reason,
    pub(crate) text: &'a str,
    /// The queue it was taken from.
    pub(crate) queue: &'a str,
}

impl Outbox {
    /// `checks_results`: whether results are copied for the results check
    /// (`Config::checks_results`).
    pub(crate) async fn new(
        broker: &Broker,
        checks_results: bool,
        lost: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BrokerError> {
        let names = broker.names().clone();
        Ok(Self {
            publisher: Publisher::new(broker)
                .await?
                .confirm_patience(CONFIRM_PATIENCE),
            broker: broker.clone(),
            fanin: OnceCell::new(),
            check: checks_results.then(OnceCell::new),
            parts: OnceCell::new(),
            tasks_exchange: names.tasks_exchange(),
            events_exchange: names.events_exchange(),
            names,
            lost,
            metrics,
        })
    }

    /// Publishes with `publish` until it is confirmed. A queue at its length bound refuses the
    /// publish (negative confirm): then the finished work waits here and tries again, rather
    /// than being dropped or dead-lettered, until the queue has room or the connection is lost.
    /// A publish whose confirm did not come in time is sent again on a fresh channel: it may be
    /// stored twice (readers take a job's result once by id; a step message twice runs the step
    /// twice, as a redelivery would), never lost, and the step does not run again for it.
    pub(crate) async fn hand_off<'a, F, Fut>(&'a self, publish: F) -> Result<(), PublishError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), PublishError>> + 'a,
    {
        let mut backoff = Backoff::try_new(Duration::from_millis(50), BACKLOG_FULL_MAX_WAIT)
            .expect("valid bounds");
        loop {
            match publish().await {
                Err(PublishError::Nacked { routing_key }) => {
                    let wait = backoff.next_delay();
                    let tries = backoff.tries();
                    HandOffHeld {
                        routing_key: &routing_key,
                        tries,
                    }
                    .emit(&self.metrics);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.lost.cancelled() => return Err(PublishError::Nacked { routing_key }),
                    }
                }
                Err(PublishError::Unconfirmed {
                    routing_key,
                    waited,
                }) if !self.lost.is_cancelled() => {
                    PublishUnconfirmed {
                        routing_key: &routing_key,
                        waited,
                    }
                    .emit(&self.metrics);
                }
                other => return other,
            }
        }
    }

    /// Publishes `env`, already encoded as `body`, to its step queue.
    pub(crate) async fn publish_step(
        &self,
        route: &StepRoute,
        env: &Envelope,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let key = route.routing_key();
        let id = env.job_id.to_string();
        let msg = Outgoing::persistent(&self.tasks_exchange, &key, body, &id);
        self.publish(PublishKind::NextStep, msg).await
    }

    /// Parks a retry in the delay queue of its `nominal` delay; the message's own TTL (the
    /// `delay`, with jitter) sends it back to its step queue, which stays free for other jobs
    /// meanwhile. Without a delay it goes straight back.
    pub(crate) async fn publish_retry(
        &self,
        route: &StepRoute,
        env: &Envelope,
        body: &[u8],
        nominal: Duration,
        delay: Duration,
    ) -> Result<(), PublishError> {
        let nominal_ms = nominal.as_millis() as u64;
        if nominal_ms == 0 {
            return self.publish_step(route, env, body).await;
        }
        let key = route.routing_key();
        let exchange = self.names.delay_exchange(nominal_ms);
        let mut msg = Outgoing::persistent(&exchange, &key, body, &env.job_id.to_string());
        msg.properties = msg
            .properties
            .with_expiration(delay.as_millis().max(1).to_string().into());
        self.publish(PublishKind::Retry, msg).await
    }

    /// Moves a step message whose tenant is at its cap to a wait lane: the delay queue of
    /// `nominal`, whose TTL (`delay`, with jitter) returns it to its step queue, with the waits
    /// so far in a header (the next wait grows with it). The message itself is unchanged.
    pub(crate) async fn publish_cap_wait(
        &self,
        route: &StepRoute,
        body: &[u8],
        id: &str,
        waits: u32,
        nominal: Duration,
        delay: Duration,
    ) -> Result<(), PublishError> {
        let key = route.routing_key();
        let exchange = self.names.delay_exchange(nominal.as_millis() as u64);
        let mut msg = Outgoing::persistent(&exchange, &key, body, id)
            .with_headers(&[(crate::cap::WAITS_HEADER, waits.to_string())]);
        msg.properties = msg
            .properties
            .with_expiration(delay.as_millis().max(1).to_string().into());
        self.publish(PublishKind::CapWait, msg).await
    }

    /// Publishes a job's result event. A fan-out part's end also goes to the fan-in stream, in
    /// a batch with other parts' ends, so the join hears of every part that ended; while the
    /// results check is on, a copy of the event goes to its queue, in a batch with other
    /// results. All are confirmed before this returns.
    pub(crate) async fn publish_result(&self, event: &ResultEvent) -> Result<(), PublishError> {
        let key = Names::result_key(event.status, &event.pipeline, event.tenant.as_str());
        let body = encode_result(event);
        let id = event.job_id.to_string();
        let msg = Outgoing::persistent(&self.events_exchange, &key, &body, &id);
        let result = self.publish(PublishKind::Result, msg);
        // A part's end goes to the fan-in stream.
        let end = async {
            let Some(ended) = EndedPart::of(event) else {
                return Ok(());
            };
            let to = || (self.events_exchange.clone(), ENDS_KEY.to_string());
            self.append_batched(&self.fanin, to, "fanin:ends", ended.encode())
                .await
        };
        // The check's copy goes straight to its queue, by the default exchange.
        let copy = async {
            let Some(writer) = &self.check else {
                return Ok(());
            };
            let to = || (String::new(), self.names.results_check());
            self.append_batched(writer, to, "results:check", body.clone())
                .await
        };
        tokio::try_join!(result, end, copy).map(|_| ())
    }

    /// Appends `record` to the batch writer in `cell` and waits for its batch's confirm. The
    /// writer starts on first use, on a channel of its own, publishing to the exchange and
    /// routing key `destination` gives.
    async fn append_batched(
        &self,
        cell: &OnceCell<BatchWriter>,
        destination: impl FnOnce() -> (String, String),
        message_id: &'static str,
        record: Vec<u8>,
    ) -> Result<(), PublishError> {
        let writer = cell
            .get_or_try_init(|| async {
                let publisher = Publisher::new(&self.broker)
                    .await?
                    .confirm_patience(CONFIRM_PATIENCE);
                let (exchange, routing_key) = destination();
                Ok::<_, BrokerError>(BatchWriter::start(
                    publisher,
                    exchange,
                    routing_key,
                    message_id,
                ))
            })
            .await?;
        writer.append(record).await
    }

    /// Appends the record that opens a fan-out to the fan-in stream.
    pub(crate) async fn publish_opened(&self, opened: &Opened) -> Result<(), PublishError> {
        let started = Instant::now();
        fanin::publish_opened(&self.publisher, &self.events_exchange, opened).await?;
        PublishConfirmed {
            kind: PublishKind::NextStep,
            took: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Publishes a fan-out's parts, bundled where a queue gets many parts of one tenant
    /// ([`warren_common::bundle`]; no bundle passes `max_bytes`), through a sliding window of
    /// confirms: up to [`PARTS_IN_FLIGHT`] messages awaited at once, the next sent as the
    /// oldest is confirmed (the broker confirms in order, so waiting on the oldest costs
    /// nothing). A message refused by a full queue has its parts held and retried one by one,
    /// as a hand-off is.
    pub(crate) async fn publish_parts(
        &self,
        parts: &[(StepRoute, &Envelope, &[u8])],
        max_bytes: usize,
    ) -> Result<(), PublishError> {
        let publisher = self
            .parts
            .get_or_try_init(|| Publisher::new(&self.broker))
            .await?;
        let destinations = parts
            .iter()
            .map(|(route, env, body)| ((route.routing_key(), env.tenant.as_str()), body.len()));
        let messages = bundle::plan(destinations, max_bytes);
        let mut window = std::collections::VecDeque::with_capacity(PARTS_IN_FLIGHT);
        for message in messages {
            if window.len() == PARTS_IN_FLIGHT {
                self.settle_parts(parts, window.pop_front()).await?;
            }
            let (route, env, body) = &parts[message[0]];
            let key = route.routing_key();
            let id = env.job_id.to_string();
            let confirm = if message.len() == 1 {
                publisher
                    .start(Outgoing::persistent(&self.tasks_exchange, &key, body, &id))
                    .await
            } else {
                let bodies = message.iter().map(|&i| parts[i].2.to_vec());
                let bundled = Bundle::new(env.tenant.as_str(), bodies).encode();
                publisher
                    .start(Outgoing::persistent(
                        &self.tasks_exchange,
                        &key,
                        &bundled,
                        &id,
                    ))
                    .await
            };
            window.push_back((message, confirm));
        }
        while let Some(oldest) = window.pop_front() {
            self.settle_parts(parts, Some(oldest)).await?;
        }
        Ok(())
    }

    /// Waits for one message's confirm; the parts of a message refused by a full queue are
    /// handed off again, each alone.
    async fn settle_parts(
        &self,
        parts: &[(StepRoute, &Envelope, &[u8])],
        pending: Option<(Vec<usize>, Result<PendingConfirm, PublishError>)>,
    ) -> Result<(), PublishError> {
        let Some((message, confirm)) = pending else {
            return Ok(());
        };
        let confirmed = match confirm {
            Ok(confirm) => confirm.wait().await,
            Err(e) => Err(e),
        };
        if let Err(PublishError::Nacked { .. }) = confirmed {
            for index in message {
                let (route, env, body) = &parts[index];
                self.hand_off(|| self.publish_step(route, env, body))
                    .await?;
            }
            Ok(())
        } else {
            confirmed
        }
    }

    /// Sends `letter` to the dead-letter queue.
    pub(crate) async fn dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), PublishError> {
        let dlq = self.names.dlq();
        let msg = Outgoing::persistent("", &dlq, letter.body, letter.id).with_headers(&[
            (headers::REASON, letter.reason.as_str().to_string()),
            (headers::ERROR, letter.text.to_string()),
            (headers::QUEUE, letter.queue.to_string()),
            (headers::FAILED_AT, now_ms().to_string()),
        ]);
        self.publish(PublishKind::DeadLetter, msg).await?;
        DeadLettered {
            pipeline: letter.pipeline,
            reason: letter.reason,
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Publishes with confirm, and records how long the confirm took.
    async fn publish(&self, kind: PublishKind, msg: Outgoing<'_>) -> Result<(), PublishError> {
        let started = Instant::now();
        self.publisher.publish(msg).await?;
        PublishConfirmed {
            kind,
            took: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Publishes a step message, as it came (`body`, its message id), to `route`: a hot
    /// tenant's message moving from its shard to its hot lane.
    pub(crate) async fn publish_moved(
        &self,
        route: &StepRoute,
        body: &[u8],
        id: &str,
    ) -> Result<(), PublishError> {
        let key = route.routing_key();
        let msg = Outgoing::persistent(&self.tasks_exchange, &key, body, id);
        self.publish(PublishKind::Fairness, msg).await
    }

    /// Publishes a hot mark on the control stream through `router`, which applies it here too.
    pub(crate) async fn publish_mark(
        &self,
        router: &HotRouter,
        mark: &HotMark,
    ) -> Result<(), PublishError> {
        let started = Instant::now();
        router.mark(&self.publisher, mark).await?;
        PublishConfirmed {
            kind: PublishKind::Fairness,
            took: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// The confirm-mode publisher, for the control stream's messages.
    pub(crate) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The name of the queue behind `route`.
    pub(crate) fn queue(&self, route: &StepRoute) -> String {
        route.queue(&self.names)
    }
}
