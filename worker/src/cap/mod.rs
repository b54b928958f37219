//! Cluster-wide caps on a served step: `max_in_flight` (attempts of the step at once, across
//! every worker) and `tenant_max_in_flight` (the same, per tenant). Each is a token queue
//! (`warren_broker::tokens`); an attempt runs only while this worker holds a token of each cap,
//! unacked, and gives them back with `basic.nack(requeue)` when it ends. A worker that dies
//! returns its tokens with its connection, at once.
//!
//! - The step token is awaited: a consumer with prefetch 1 exists only while a delivery of the
//!   step waits for one, and is cancelled as soon as it has its token. Idle workers hold none,
//!   and waiting workers are served in turn by the broker's round-robin.
//! - The tenant token is tried once (`basic.get`): a delivery whose tenant is at its cap does
//!   not hold an execution slot (it would block other tenants' jobs behind it). It is parked
//!   ([`park`]): kept unacked beside the slots, a few per tenant, until a token of its tenant
//!   comes free. When this worker's own attempt of that tenant ends, its token passes straight
//!   to a parked delivery (no nack and get round trip); tokens other workers give back are
//!   looked for with a `basic.get` every [`UNPARK_EVERY`]. Past the lot's bounds, or after
//!   [`park::MAX_PARK`], it moves to a wait lane, a delay queue that returns it to its step
//!   queue a moment later ([`wait`]), published with a confirm before the ack.
//!
//! Tokens live on one channel per served step. If that channel dies while the connection lives
//! (a broker `consumer_timeout`, an operator closing it), the broker has already handed its
//! tokens back, so the session is given up, like a lost connection: running capped steps stop.

mod park;
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
use park::{Lot, MAX_PARK};
pub(crate) use wait::WAITS_HEADER;
use wait::{next_wait, Wait};

/// How often parked deliveries look for a token given back by another worker.
pub(crate) const UNPARK_EVERY: Duration = Duration::from_millis(50);

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
    /// Deliveries waiting here for a token of their tenant.
    lot: Mutex<Lot<Parked>>,
}

/// A parked delivery and the route it came by.
pub(crate) struct Parked {
    pub(crate) route: Arc<StepRoute>,
    pub(crate) delivery: Delivery,
}

/// What a delivery taken from the buffers may do.
pub(crate) enum Admission {
    /// Run, holding these tokens until the attempt is over.
    Run(Hold),
    /// Its tenant (named) is at its cap: park it, or move it to a wait lane.
    Wait(String),
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
                lot: Mutex::new(Lot::new(
                    (cap as usize).max(Self::park_room(served) / 2),
                    Self::park_room(served),
                    MAX_PARK,
                )),
            }),
            metrics: Arc::clone(metrics),
            closing: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&caps).watch(fatal));
        Ok(Some(caps))
    }

    /// How many deliveries the step's intake may park in all: its concurrency, added to its
    /// prefetch so that parked deliveries leave other tenants theirs.
    pub(crate) fn park_room(served: &ServedStep) -> usize {
        if served.step.tenant_max_in_flight.is_some() {
            served.step.concurrency as usize
        } else {
            0
        }
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
            // An undecodable message holds no tenant token: the step sets it aside unrun. A
            // bundle of parts names its one tenant where an envelope does.
            if let Some(tenant) = warren_common::codec::decode_tenant(&delivery.data) {
                let tenant = tenant.as_str();
                match self.try_tenant_token(tenant_cap, tenant).await? {
                    Some(token) => {
                        hold.tenant = Some(tenant.to_string());
                        hold.push(token, self.held("tenant"));
                    }
                    None => return Ok(Admission::Wait(tenant.to_string())),
                }
            }
        }
        if self.step_token(&mut hold, stop).await? {
            Ok(Admission::Run(hold))
        } else {
            hold.release().await;
            Ok(Admission::Stopped)
        }
    }

    /// Adds a step token to `hold` when the step has `max_in_flight`; false when `stop` came
    /// first.
    pub(crate) async fn step_token(
        &self,
        hold: &mut Hold,
        stop: &CancellationToken,
    ) -> Result<bool, BrokerError> {
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
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Parks `parked` for `tenant`, or gives it back with its wait when the lot is full.
    pub(crate) fn park(&self, tenant: &str, parked: Parked) -> Result<(), Box<(Parked, Wait)>> {
        let Some(cap) = &self.tenant else {
            let wait = wait_of(&parked.delivery, false);
            return Err(Box::new((parked, wait)));
        };
        let (outcome, draining) = {
            let mut lot = cap.lot.lock().expect("lot lock");
            let draining = lot.parked(tenant) > 0;
            (lot.park(tenant, parked, Instant::now()), draining)
        };
        let kind = if outcome.is_ok() {
            "tenant_parked"
        } else {
            "tenant"
        };
        self.metrics.cap_wait(&self.pipeline, &self.step, kind);
        outcome.map_err(|p| {
            let wait = wait_of(&p.delivery, draining);
            Box::new((p, wait))
        })
    }

    /// The attempt holding `hold` is over: its tenant token passes to a parked delivery of the
    /// same tenant, if any, and the step token is given back. With `None`, `hold` is
    /// untouched, for the caller to release.
    pub(crate) async fn hand_over(&self, hold: &mut Hold) -> Option<Parked> {
        let cap = self.tenant.as_ref()?;
        let tenant = hold.tenant.as_deref()?;
        let next = cap.lot.lock().expect("lot lock").take(tenant)?;
        hold.release_step().await;
        Some(next)
    }

    /// A parked delivery whose tenant has a token free on the broker, with that token (and the
    /// step's, awaited), if any. Tries each parked tenant once, longest waiting first.
    pub(crate) async fn unpark(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<(Parked, Hold)>, BrokerError> {
        let Some(cap) = &self.tenant else {
            return Ok(None);
        };
        let tenants = cap.lot.lock().expect("lot lock").tenants();
        for tenant in tenants {
            let Some(token) = self.try_tenant_token(cap, &tenant).await? else {
                continue;
            };
            let mut hold = Hold::default();
            hold.tenant = Some(tenant.clone());
            hold.push(token, self.held("tenant"));
            let Some(parked) = cap.lot.lock().expect("lot lock").take(&tenant) else {
                // Taken by a hand-over meanwhile.
                hold.release().await;
                continue;
            };
            if self.step_token(&mut hold, stop).await? {
                return Ok(Some((parked, hold)));
            }
            hold.release().await;
            let _ = parked.delivery.acker.nack(requeue()).await;
            return Ok(None);
        }
        Ok(None)
    }

    /// Parked deliveries past [`MAX_PARK`], each with its wait: they go to a wait lane.
    pub(crate) fn expired(&self) -> Vec<(Parked, Wait)> {
        let Some(cap) = &self.tenant else {
            return Vec::new();
        };
        let out = cap.lot.lock().expect("lot lock").expired(Instant::now());
        out.into_iter()
            .map(|p| {
                let wait = wait_of(&p.delivery, false);
                (p, wait)
            })
            .collect()
    }

    /// Whether any delivery is parked.
    pub(crate) fn has_parked(&self) -> bool {
        self.tenant
            .as_ref()
            .is_some_and(|cap| cap.lot.lock().expect("lot lock").len() > 0)
    }

    /// Returns every parked delivery to its queue (shutdown).
    pub(crate) async fn return_parked(&self) {
        let Some(cap) = &self.tenant else {
            return;
        };
        let parked = cap.lot.lock().expect("lot lock").drain();
        for p in parked {
            let _ = p.delivery.acker.nack(requeue()).await;
        }
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

/// The wait lane `delivery` goes to next, after the waits its header counts.
fn wait_of(delivery: &Delivery, draining: bool) -> Wait {
    let so_far = header(&delivery.properties, WAITS_HEADER)
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    next_wait(so_far, draining, rand::random())
}

/// The tokens one attempt holds; [`Hold::release`] gives them back.
#[derive(Default)]
pub(crate) struct Hold {
    /// The tenant whose token it holds, if any.
    tenant: Option<String>,
    /// Tokens, the tenant's first.
    tokens: Vec<(Delivery, InFlight)>,
}

impl Hold {
    fn push(&mut self, token: Delivery, held: InFlight) {
        self.tokens.push((token, held));
    }

    /// Gives back every token but the tenant's (the step token, if any).
    async fn release_step(&mut self) {
        let keep = usize::from(self.tenant.is_some());
        for (token, held) in self.tokens.split_off(keep.min(self.tokens.len())) {
            let _ = token.acker.nack(requeue()).await;
            drop(held);
        }
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
