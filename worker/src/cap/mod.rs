//! Cluster-wide caps on a served step: `max_in_flight` (attempts of the step at once, across
//! every worker) and `tenant_max_in_flight` (the same, per tenant). Each is a token queue
//! (`warren_broker::tokens`); an attempt runs only while this worker holds a token of each cap,
//! unacked, and gives them back with `basic.nack(requeue)` when it ends. A worker that dies
//! returns its tokens with its connection, at once.
//!
//! - The step token is awaited: a consumer with prefetch 1 exists only while a delivery of the
//!   step waits for one, and is cancelled as soon as it has its token. Idle workers hold none,
//!   and waiting workers are served in turn by the broker's round-robin.
//! - The tenant token is tried once (`basic.get`): a delivery whose tenant is at its cap is not
//!   held (it would block other tenants' jobs behind it) but moved to a wait lane, a delay
//!   queue that returns it to its step queue a moment later ([`wait`]), published with a
//!   confirm before the ack.
//!
//! Tokens live on one channel per served step. If that channel dies while the connection lives
//! (a broker `consumer_timeout`, an operator closing it), the broker has already handed its
//! tokens back, so the session is given up, like a lost connection: running capped steps stop.

mod wait;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warren_broker::publish::header;
use warren_broker::{Broker, BrokerError, StepRoute, TokenQueue};

use crate::intake::TEARDOWN_PATIENCE;
use crate::metrics::{InFlight, Metrics};
use crate::step::{ServedStep, StepSession};
pub(crate) use wait::WAITS_HEADER;
use wait::{next_wait, Wait};

/// How often a cap's channel is checked while the session runs.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Pause before returning a delivery whose move to a wait lane failed.
const WAIT_LANE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The caps of one served step, for one session.
pub(crate) struct Caps {
    broker: Broker,
    channel: Channel,
    pipeline: String,
    step: String,
    /// `max_in_flight`'s token queue.
    step_tokens: Option<String>,
    /// `tenant_max_in_flight`, and when each tenant's queue was last known to exist.
    tenant: Option<TenantCap>,
    metrics: Arc<Metrics>,
    /// Stops the channel's watcher when the caps close on purpose.
    closing: CancellationToken,
}

struct TenantCap {
    cap: u32,
    step_timeout: Duration,
    seen: Mutex<HashMap<String, Instant>>,
}

/// What a delivery taken from the buffers may do.
pub(crate) enum Admission {
    /// Run, holding these tokens until the attempt is over.
    Run(Hold),
    /// Its tenant is at its cap: move it to a wait lane.
    Wait(Wait),
    /// The dispatcher was stopped while it waited for a step token.
    Stopped,
}

impl Caps {
    /// The caps of `served`, or `None` when it has none.
    pub(crate) async fn open(
        broker: &Broker,
        served: &ServedStep,
        metrics: &Arc<Metrics>,
        fatal: mpsc::UnboundedSender<String>,
    ) -> Result<Option<Arc<Self>>, BrokerError> {
        let step = &served.step;
        if step.max_in_flight.is_none() && step.tenant_max_in_flight.is_none() {
            return Ok(None);
        }
        let channel = broker.channel().await?;
        // Per consumer: a step-token consumer is made for one token.
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(BrokerError::amqp("set the cap channel's prefetch"))?;
        // The session's topology declare has filled it (`Topology::declare`).
        let step_tokens = step.max_in_flight.map(|cap| {
            TokenQueue::step(broker.names(), &served.pipeline.name, &step.name, cap).name()
        });
        let caps = Arc::new(Self {
            broker: broker.clone(),
            channel,
            pipeline: served.pipeline.name.clone(),
            step: step.name.clone(),
            step_tokens,
            tenant: step.tenant_max_in_flight.map(|cap| TenantCap {
                cap,
                step_timeout: step.timeout,
                seen: Mutex::new(HashMap::new()),
            }),
            metrics: Arc::clone(metrics),
            closing: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&caps).watch(fatal));
        Ok(Some(caps))
    }

    /// Reports the channel's death to the session: its tokens are back on the broker.
    async fn watch(self: Arc<Self>, fatal: mpsc::UnboundedSender<String>) {
        loop {
            tokio::select! {
                _ = self.closing.cancelled() => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            if !self.channel.status().connected() {
                let _ = fatal.send(format!(
                    "the cap channel of {}/{} closed; its tokens went back",
                    self.pipeline, self.step
                ));
                return;
            }
        }
    }

    /// Takes the tokens `delivery` needs: its tenant's, tried once, then the step's, awaited.
    pub(crate) async fn admit(
        &self,
        delivery: &Delivery,
        stop: &CancellationToken,
    ) -> Result<Admission, BrokerError> {
        let mut hold = Hold::default();
        if let Some(tenant_cap) = &self.tenant {
            // An undecodable message holds no tenant token: the step sets it aside unrun.
            if let Ok(env) = warren_common::decode(&delivery.data) {
                let tenant = env.tenant.as_str();
                match self.try_tenant_token(tenant_cap, tenant).await? {
                    Some(token) => hold.push(token, self.held("tenant")),
                    None => {
                        self.metrics.cap_wait(&self.pipeline, &self.step, "tenant");
                        let so_far = header(&delivery.properties, WAITS_HEADER)
                            .and_then(|w| w.parse().ok())
                            .unwrap_or(0);
                        return Ok(Admission::Wait(next_wait(so_far, rand::random())));
                    }
                }
            }
        }
        if let Some(queue) = &self.step_tokens {
            let asked = Instant::now();
            match self.await_step_token(queue, stop).await? {
                Some(token) => {
                    let took = asked.elapsed();
                    self.metrics.cap_acquired(&self.pipeline, &self.step, took);
                    if took > Duration::from_millis(50) {
                        self.metrics.cap_wait(&self.pipeline, &self.step, "step");
                    }
                    hold.push(token, self.held("step"));
                }
                None => {
                    hold.release().await;
                    return Ok(Admission::Stopped);
                }
            }
        }
        Ok(Admission::Run(hold))
    }

    fn held(&self, kind: &str) -> InFlight {
        self.metrics.cap_held(&self.pipeline, &self.step, kind)
    }

    /// One `basic.get` on the tenant's token queue, made (and filled) on first use.
    async fn try_tenant_token(
        &self,
        cap: &TenantCap,
        tenant: &str,
    ) -> Result<Option<Delivery>, BrokerError> {
        let queue = TokenQueue::tenant(
            self.broker.names(),
            &self.pipeline,
            &self.step,
            tenant,
            cap.cap,
            cap.step_timeout,
        );
        let idle_limit = queue.expires.unwrap_or(Duration::MAX) / 2;
        let known = {
            let seen = cap.seen.lock().expect("tenant caps lock");
            seen.get(tenant).is_some_and(|at| at.elapsed() < idle_limit)
        };
        // The broker deletes a tenant's queue once unused for `expires`; ours were used less
        // than half of that ago, so it is still there (a get on a missing queue would close
        // the channel and every token on it).
        if !known {
            queue.ensure(&self.broker).await?;
        }
        {
            let mut seen = cap.seen.lock().expect("tenant caps lock");
            seen.retain(|_, at| at.elapsed() < idle_limit);
            seen.insert(tenant.to_string(), Instant::now());
        }
        let got = self
            .channel
            .basic_get(
                queue.name().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "take a token from {}",
                queue.name()
            )))?;
        Ok(got.map(|message| message.delivery))
    }

    /// Waits for a step token: a consumer of its own, with prefetch 1, cancelled once it has
    /// one. `None` when `stop` came first.
    async fn await_step_token(
        &self,
        queue: &str,
        stop: &CancellationToken,
    ) -> Result<Option<Delivery>, BrokerError> {
        let mut consumer = self
            .channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("wait for a token of {queue}")))?;
        let got = tokio::select! {
            got = consumer.next() => got,
            _ = stop.cancelled() => None,
        };
        let cancel = self
            .channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(TEARDOWN_PATIENCE, cancel).await;
        match got {
            Some(Ok(token)) => Ok(Some(token)),
            Some(Err(e)) => Err(BrokerError::Amqp {
                action: format!("wait for a token of {queue}"),
                cause: e,
            }),
            None => {
                // A token may have come between the stop and the cancel: give it back.
                while let Ok(Some(Ok(token))) =
                    tokio::time::timeout(TEARDOWN_PATIENCE, consumer.next()).await
                {
                    let _ = token.acker.nack(requeue()).await;
                }
                Ok(None)
            }
        }
    }

    /// Stops the watcher and closes the channel: whatever it still holds goes back.
    pub(crate) async fn close(&self) {
        self.closing.cancel();
        let close = self.channel.close(200, "worker stopped".into());
        let _ = tokio::time::timeout(TEARDOWN_PATIENCE, close).await;
    }
}

/// The tokens one attempt holds; [`Hold::release`] gives them back.
#[derive(Default)]
pub(crate) struct Hold {
    tokens: Vec<(Delivery, InFlight)>,
}

impl Hold {
    fn push(&mut self, token: Delivery, held: InFlight) {
        self.tokens.push((token, held));
    }

    /// Returns every token to its queue (`basic.nack` with requeue: atomic, so a token is
    /// never lost or doubled).
    pub(crate) async fn release(mut self) {
        for (token, held) in std::mem::take(&mut self.tokens) {
            let _ = token.acker.nack(requeue()).await;
            drop(held);
        }
    }
}

impl Drop for Hold {
    // An attempt dropped before its release (the session was lost): hand the tokens back
    // anyway; on a dead channel the broker already has.
    fn drop(&mut self) {
        let tokens = std::mem::take(&mut self.tokens);
        if !tokens.is_empty() {
            tokio::spawn(async move {
                for (token, _held) in tokens {
                    let _ = token.acker.nack(requeue()).await;
                }
            });
        }
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    }
}

/// Moves `delivery` (its tenant at its cap) to a wait lane: publish with confirm, then ack.
/// If the publish fails, the delivery goes back to its queue after a pause instead.
pub(crate) async fn move_to_wait_lane(
    session: Arc<StepSession>,
    route: Arc<StepRoute>,
    delivery: Delivery,
    wait: Wait,
) {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let moved = session
        .outbox
        .publish_cap_wait(
            &route,
            &delivery.data,
            &id,
            wait.waits,
            wait.nominal,
            wait.delay,
        )
        .await;
    match moved {
        Ok(()) => {
            debug!(job_id = %id, waits = wait.waits, delay_ms = wait.delay.as_millis() as u64,
                "Tenant at its cap; the job waits in a wait lane.");
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Err(error) => {
            warn!(job_id = %id, error = %error, "Could not move a job to a wait lane; returning it.");
            tokio::time::sleep(WAIT_LANE_RETRY_PAUSE).await;
            let _ = delivery.acker.nack(requeue()).await;
        }
    }
}
