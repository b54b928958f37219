//! Token queues: the broker side of the cluster-wide caps (`max_in_flight`,
//! `tenant_max_in_flight`). A cap of N is a queue holding N token messages; a worker holds one
//! unacked while an attempt runs and gives it back with `basic.nack(requeue)`, which neither
//! duplicates nor loses it, and the broker requeues it by itself when the worker's connection
//! dies. This module names those queues and fills each with its N tokens exactly once;
//! taking and giving back tokens is the worker's (`worker/src/cap/`).
//!
//! Filling races between workers, so it happens under a lock: an exclusive queue, which only one
//! connection can hold and which vanishes with it. A crash in the middle of a fill would leave a
//! short queue (a cap that stays low for ever), so a durable *fill-pending* marker queue exists
//! from before the token queue is declared until its last token is confirmed: whoever takes the
//! lock next and finds the marker deletes the short queue and fills it again. No worker takes a
//! token from a queue while its marker exists, so no token of a discarded queue is held.
//!
//! Token queues are classic, durable, and never quorum: a quorum queue records every requeue
//! in its Raft log, and RabbitMQ 4 dead-letters (drops) a quorum message after 20 returns by
//! default, while a token is returned after every attempt.

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Channel;
use warren_common::config::Config;

use crate::connection::Broker;
use crate::error::{BrokerError, PublishError};
use crate::names::Names;
use crate::publish::{Outgoing, Publisher};

/// Nominal delays (ms) of a job that found its tenant at its cap: first, second, and every
/// later wait. Each wait goes through the delay queue of that length, like a retry.
pub const CAP_WAIT_DELAYS_MS: [u64; 3] = [250, 1_000, 4_000];

/// How long an unused tenant token queue lives on past the step's `timeout`: the broker
/// deletes it (`x-expires`) once nobody took a token for that long. The margin keeps a queue
/// from expiring under a token held by an attempt that runs to its timeout.
pub const TENANT_QUEUE_IDLE_MARGIN: Duration = Duration::from_secs(300);

/// How long a fill-pending marker outlives a crashed fill when no worker comes back to it.
const MARKER_EXPIRES: Duration = Duration::from_secs(24 * 3600);

/// How long taking the fill lock keeps trying while another worker holds it.
const LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// One capped key: a token queue and its N.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenQueue {
    /// `<pipeline>.<step>.<n>` or `<pipeline>.<step>.t.<tenant>.<n>`: the queue name after
    /// `<ns>.cap.`. N is part of it, so a changed cap makes a new queue and never mixes counts.
    key: String,
    ns: String,
    /// Tokens it holds when full: the cap.
    pub tokens: u32,
    /// `x-expires`: tenant queues go away when unused; the step cap's stays.
    pub expires: Option<Duration>,
}

impl TokenQueue {
    /// The `max_in_flight` queue of `pipeline`/`step`.
    pub fn step(names: &Names, pipeline: &str, step: &str, cap: u32) -> Self {
        Self {
            key: format!("{pipeline}.{step}.{cap}"),
            ns: names.namespace().to_string(),
            tokens: cap,
            expires: None,
        }
    }

    /// The `tenant_max_in_flight` queue of `tenant` at `pipeline`/`step`; it expires after
    /// `step_timeout` plus [`TENANT_QUEUE_IDLE_MARGIN`] unused.
    pub fn tenant(
        names: &Names,
        pipeline: &str,
        step: &str,
        tenant: &str,
        cap: u32,
        step_timeout: Duration,
    ) -> Self {
        Self {
            key: format!("{pipeline}.{step}.t.{tenant}.{cap}"),
            ns: names.namespace().to_string(),
            tokens: cap,
            expires: Some(step_timeout + TENANT_QUEUE_IDLE_MARGIN),
        }
    }

    /// `<ns>.cap.<key>`: holds the tokens.
    pub fn name(&self) -> String {
        format!("{}.cap.{}", self.ns, self.key)
    }

    /// `<ns>.cap-lock.<key>`: exclusive, held while filling.
    pub fn lock_name(&self) -> String {
        format!("{}.cap-lock.{}", self.ns, self.key)
    }

    /// `<ns>.cap-fill.<key>`: exists while a fill is unfinished.
    pub fn marker_name(&self) -> String {
        format!("{}.cap-fill.{}", self.ns, self.key)
    }

    fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("classic")),
        );
        if let Some(expires) = self.expires {
            args.insert(
                ShortString::from("x-expires"),
                AMQPValue::LongLongInt(expires.as_millis() as i64),
            );
        }
        args
    }

    /// Makes sure the queue exists with its N tokens, filling it if nobody has (or a fill
    /// crashed). Cheap when it is already there; safe to call from any number of workers.
    pub async fn ensure(&self, broker: &Broker) -> Result<(), BrokerError> {
        // Within one process, connections are pooled: an exclusive queue would not keep two of
        // its own tasks apart, so they take turns here first.
        static IN_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = IN_PROCESS.lock().await;
        let lock = self.take_lock(broker).await?;
        let outcome = self.fill_unless_filled(broker).await;
        let delete = lock.queue_delete(
            self.lock_name().as_str().into(),
            QueueDeleteOptions::default(),
        );
        let _ = delete.await;
        let _ = lock.close(200, "filled".into()).await;
        outcome
    }

    /// The channel whose connection holds the lock queue.
    async fn take_lock(&self, broker: &Broker) -> Result<Channel, BrokerError> {
        let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(channel) = crate::lock::try_lock(broker, &self.lock_name()).await? {
                return Ok(channel);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BrokerError::Fill {
                    queue: self.name(),
                    reason: format!(
                        "lock {} still held by another connection after {LOCK_PATIENCE:?}",
                        self.lock_name()
                    ),
                });
            }
            tokio::time::sleep(pause.mul_f64(0.5 + rand::random::<f64>())).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn fill_unless_filled(&self, broker: &Broker) -> Result<(), BrokerError> {
        let mut probe = crate::depth::Probe::new(broker);
        let read = async {
            let marker = probe.read(&self.marker_name()).await?;
            Ok::<_, BrokerError>((marker, probe.read(&self.name()).await?))
        }
        .await;
        probe.close().await;
        let (marker, tokens) = read?;
        if tokens.is_some() && marker.is_none() {
            return Ok(());
        }
        let channel = broker.channel().await?;
        let mut marker_args = FieldTable::default();
        marker_args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongLongInt(MARKER_EXPIRES.as_millis() as i64),
        );
        channel
            .queue_declare(
                self.marker_name().as_str().into(),
                QueueDeclareOptions::durable(),
                marker_args,
            )
            .await
            .map_err(BrokerError::amqp(format!("declare {}", self.marker_name())))?;
        if tokens.is_some() {
            // A fill that crashed: nobody has taken these (the marker was there all along).
            channel
                .queue_delete(self.name().as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(BrokerError::amqp(format!("delete {}", self.name())))?;
        }
        channel
            .queue_declare(
                self.name().as_str().into(),
                QueueDeclareOptions::durable(),
                self.arguments(),
            )
            .await
            .map_err(BrokerError::amqp(format!("declare {}", self.name())))?;
        let publisher = Publisher::new(broker).await?;
        let name = self.name();
        let mut pending = Vec::with_capacity(self.tokens as usize);
        for i in 0..self.tokens {
            let msg = Outgoing::persistent("", &name, b"token", &format!("token-{i}"));
            pending.push(publisher.start(msg).await.map_err(publish_failed(&name))?);
        }
        for confirm in pending {
            confirm.wait().await.map_err(publish_failed(&name))?;
        }
        channel
            .queue_delete(
                self.marker_name().as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("delete {}", self.marker_name())))?;
        let _ = channel.close(200, "filled".into()).await;
        tracing::info!(queue = %name, tokens = self.tokens, "Filled a cap's token queue.");
        Ok(())
    }
}

fn publish_failed(queue: &str) -> impl Fn(PublishError) -> BrokerError + '_ {
    move |e| match e {
        PublishError::Broker(e) => e,
        other => BrokerError::Fill {
            queue: queue.to_string(),
            reason: other.to_string(),
        },
    }
}

/// The `max_in_flight` token queues of `config`, one per capped step.
pub fn step_caps(config: &Config) -> Vec<TokenQueue> {
    let names = Names::new(&config.broker.namespace);
    config
        .pipelines
        .iter()
        .flat_map(|p| p.steps.iter().map(move |s| (p, s)))
        .filter_map(|(p, s)| {
            s.max_in_flight
                .map(|cap| TokenQueue::step(&names, &p.name, &s.name, cap))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_cap_and_the_tenant() {
        let names = Names::new("ns");
        let q = TokenQueue::step(&names, "p", "s", 4);
        assert_eq!(q.name(), "ns.cap.p.s.4");
        assert_eq!(q.lock_name(), "ns.cap-lock.p.s.4");
        assert_eq!(q.marker_name(), "ns.cap-fill.p.s.4");
        assert_eq!(q.expires, None);
        let t = TokenQueue::tenant(&names, "p", "s", "acme", 1, Duration::from_secs(60));
        assert_eq!(t.name(), "ns.cap.p.s.t.acme.1");
        assert_eq!(t.expires, Some(Duration::from_secs(360)));
        assert_ne!(
            TokenQueue::step(&names, "p", "s", 5).name(),
            q.name(),
            "a new cap is a new queue"
        );
    }
}
