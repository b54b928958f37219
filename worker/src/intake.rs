//! One served step's intake: a channel with one consumer per route of the step (priority ×
//! lane), small local buffers they fill (bounded by the prefetch), and a dispatcher that hands
//! buffered deliveries to at most `concurrency` step tasks at once, in the order [`Picker`]
//! decides. Each buffer slot knows its route, so a step task is told where its delivery came
//! from as a value.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_broker::{Broker, BrokerError, StepRoute};
use warren_common::Priority;

use crate::cap::{self, Admission, Caps, Hold, Parked, UNPARK_EVERY};
use crate::dispatch::{Picker, DEFAULT_STARVE_LIMIT};
use crate::fairness::move_delivery;
use crate::step::{process, ServedStep, StepSession};

/// Longest wait for one part of tearing an intake down (a consumer cancel, a channel close):
/// a dead connection may never answer.
pub(crate) const TEARDOWN_PATIENCE: Duration = Duration::from_secs(2);

/// How a session keeps its intakes in hand.
#[derive(Clone)]
pub(crate) struct Control {
    /// Stops the dispatchers.
    pub(crate) cancel: CancellationToken,
    /// Tracks the running step tasks.
    pub(crate) tracker: TaskTracker,
    /// Where a consumer that stopped on its own says why (each at most once).
    pub(crate) fatal: mpsc::UnboundedSender<String>,
}

/// Deliveries received but not started, one buffer per route of the step.
struct Buffers {
    /// Lanes per priority level: every level the pipeline declares has the same lanes.
    lanes: usize,
    /// Where each level's buffers start (`first[priority.index()] + lane`), for the levels the
    /// pipeline declares.
    first: [Option<usize>; 3],
    routes: Vec<Arc<StepRoute>>,
    queues: Mutex<Vec<VecDeque<Delivery>>>,
    ready: Notify,
}

impl Buffers {
    /// Buffers for `routes`, in plan order: the step's priorities, each with the same lanes.
    fn new(routes: Vec<StepRoute>) -> Self {
        let mut first = [None; 3];
        for (slot, route) in routes.iter().enumerate() {
            first[route.priority.index()].get_or_insert(slot);
        }
        let levels = first.iter().flatten().count().max(1);
        let lanes = routes.len() / levels;
        debug_assert!(routes
            .iter()
            .enumerate()
            .all(|(slot, r)| first[r.priority.index()] == Some(slot - slot % lanes)));
        Self {
            lanes,
            first,
            queues: Mutex::new(routes.iter().map(|_| VecDeque::new()).collect()),
            routes: routes.into_iter().map(Arc::new).collect(),
            ready: Notify::new(),
        }
    }

    /// The buffer of `lane` at `priority`, when the step has that priority.
    fn slot(&self, priority: Priority, lane: usize) -> Option<usize> {
        self.first[priority.index()].map(|first| first + lane)
    }

    fn push(&self, slot: usize, delivery: Delivery) {
        self.queues.lock().expect("buffers lock")[slot].push_back(delivery);
        self.ready.notify_one();
    }

    /// The next delivery to run, with the route it came by.
    fn take(&self, picker: &mut Picker) -> Option<(Arc<StepRoute>, Delivery)> {
        let mut queues = self.queues.lock().expect("buffers lock");
        let (priority, lane) =
            picker.pick(|p, l| self.slot(p, l).is_some_and(|slot| !queues[slot].is_empty()))?;
        let slot = self.slot(priority, lane)?;
        let delivery = queues[slot].pop_front()?;
        Some((Arc::clone(&self.routes[slot]), delivery))
    }

    fn drain(&self) -> Vec<Delivery> {
        let mut queues = self.queues.lock().expect("buffers lock");
        queues.iter_mut().flat_map(|q| q.drain(..)).collect()
    }
}

/// A served step's channel, consumers and buffers; its dispatcher runs until the session's
/// [`Control::cancel`].
pub(crate) struct Intake {
    channel: Channel,
    consumer_tags: Vec<String>,
    buffers: Arc<Buffers>,
    caps: Option<Arc<Caps>>,
}

impl Intake {
    /// Starts consuming every queue of `served` and dispatching to its step tasks.
    pub(crate) async fn start(
        broker: &Broker,
        session: &Arc<StepSession>,
        served: &Arc<ServedStep>,
        control: &Control,
    ) -> Result<Self, BrokerError> {
        let concurrency = served.step.concurrency as usize;
        let channel = broker.channel().await?;
        // Per-consumer prefetch: each queue may hand this worker up to `concurrency` messages,
        // so one busy lane can still fill every slot, plus room for the deliveries parked for
        // a tenant cap, which must not take that from other tenants.
        let prefetch = u16::try_from(concurrency + Caps::park_room(served)).unwrap_or(u16::MAX);
        let routes = StepRoute::of_step(&served.pipeline, &served.step.name).collect();
        let buffers = Arc::new(Buffers::new(routes));
        let caps = Caps::open(broker, served, &session.metrics, control.fatal.clone()).await?;
        let mut consumer_tags = Vec::new();
        for (slot, route) in buffers.routes.iter().enumerate() {
            let queue = session.outbox.queue(route);
            let mut consumer =
                warren_broker::consume(&channel, &queue, prefetch, FieldTable::default()).await?;
            consumer_tags.push(consumer.tag().to_string());
            let (buffers, control) = (Arc::clone(&buffers), control.clone());
            let (session, served, route) = (
                Arc::clone(session),
                Arc::clone(served),
                Arc::clone(&buffers.routes[slot]),
            );
            tokio::spawn(async move {
                let reason = loop {
                    match consumer.next().await {
                        // A hot tenant's message moves on at once, without waiting for a slot.
                        Some(Ok(delivery)) => {
                            match session.fairness.diversion(&served, &route, &delivery) {
                                Some(to) => {
                                    control.tracker.spawn(move_delivery(
                                        Arc::clone(&session),
                                        to,
                                        delivery,
                                    ));
                                }
                                None => buffers.push(slot, delivery),
                            }
                        }
                        Some(Err(e)) => break format!("consumer of {queue}: {e}"),
                        None => {
                            break format!(
                                "the broker cancelled the consumer of {queue} (queue deleted?)"
                            )
                        }
                    }
                };
                // During shutdown, consumers end because we cancelled them.
                if !control.cancel.is_cancelled() {
                    let _ = control.fatal.send(reason);
                }
            });
        }
        let dispatcher = Dispatcher {
            session: Arc::clone(session),
            served: Arc::clone(served),
            buffers: Arc::clone(&buffers),
            slots: Arc::new(Semaphore::new(concurrency)),
            control: control.clone(),
            caps: caps.clone(),
        };
        tokio::spawn(dispatcher.run());
        Ok(Self {
            channel,
            consumer_tags,
            buffers,
            caps,
        })
    }

    /// Stops new deliveries and returns the buffered ones to their queues.
    pub(crate) async fn stop_consuming(&self) {
        for tag in &self.consumer_tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            // A dead connection may never answer; its deliveries go back anyway.
            if tokio::time::timeout(TEARDOWN_PATIENCE, cancel)
                .await
                .is_err()
            {
                break;
            }
        }
        for delivery in self.buffers.drain() {
            let _ = delivery.acker.nack(requeue()).await;
        }
        if let Some(caps) = &self.caps {
            caps.return_parked().await;
        }
    }

    pub(crate) async fn close(self) {
        let close = self.channel.close(200, "worker stopped".into());
        let _ = tokio::time::timeout(TEARDOWN_PATIENCE, close).await;
        if let Some(caps) = self.caps {
            caps.close().await;
        }
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    }
}

/// Hands buffered deliveries to step tasks, one per free concurrency slot.
#[derive(Clone)]
struct Dispatcher {
    session: Arc<StepSession>,
    served: Arc<ServedStep>,
    buffers: Arc<Buffers>,
    slots: Arc<Semaphore>,
    control: Control,
    /// The step's cluster-wide caps, when it has any.
    caps: Option<Arc<Caps>>,
}

impl Dispatcher {
    async fn run(self) {
        let Control {
            cancel, tracker, ..
        } = &self.control;
        let mut picker = Picker::new(self.buffers.lanes, DEFAULT_STARVE_LIMIT);
        let mut next_unpark = tokio::time::Instant::now();
        'slots: loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                permit = Arc::clone(&self.slots).acquire_owned() => permit.expect("semaphore never closed"),
            };
            let (route, delivery) = loop {
                // A parked delivery whose tenant has a token free elsewhere takes this slot:
                // at most once per `UNPARK_EVERY`, so a busy worker still serves its buffers.
                if self.caps.as_ref().is_some_and(|c| c.has_parked())
                    && tokio::time::Instant::now() >= next_unpark
                {
                    next_unpark = tokio::time::Instant::now() + jittered(UNPARK_EVERY);
                    match self.unpark().await {
                        Ok(Some((parked, hold))) => {
                            tracker.spawn(self.clone().run_capped(parked, hold, permit));
                            continue 'slots;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = self.control.fatal.send(e.to_string());
                            return;
                        }
                    }
                }
                if let Some((route, delivery)) = self.buffers.take(&mut picker) {
                    // Buffered before its tenant was marked hot: it moves instead of running.
                    match self
                        .session
                        .fairness
                        .diversion(&self.served, &route, &delivery)
                    {
                        Some(to) => {
                            tracker.spawn(move_delivery(Arc::clone(&self.session), to, delivery));
                            continue;
                        }
                        None => break (route, delivery),
                    }
                }
                let parked = self.caps.as_ref().is_some_and(|c| c.has_parked());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.buffers.ready.notified() => {}
                    _ = tokio::time::sleep_until(next_unpark), if parked => {}
                }
            };
            let session = Arc::clone(&self.session);
            let Some(caps) = &self.caps else {
                let served = Arc::clone(&self.served);
                tracker.spawn(async move {
                    process(session, served, route, delivery).await;
                    drop(permit);
                });
                continue;
            };
            match caps.admit(&delivery, cancel).await {
                Ok(Admission::Run(hold)) => {
                    let parked = Parked { route, delivery };
                    tracker.spawn(self.clone().run_capped(parked, hold, permit));
                }
                Ok(Admission::Wait(tenant)) => {
                    // Parked deliveries hold no slot: the permit goes back with this turn.
                    if let Err(back) = caps.park(&tenant, Parked { route, delivery }) {
                        let (p, wait) = *back;
                        tracker.spawn(cap::move_to_wait_lane(session, p.route, p.delivery, wait));
                    }
                }
                Ok(Admission::Stopped) => {
                    let _ = delivery.acker.nack(requeue()).await;
                    return;
                }
                Err(e) => {
                    // The delivery goes back with the session's channels.
                    let _ = self.control.fatal.send(e.to_string());
                    return;
                }
            }
        }
    }

    /// Sends parked deliveries past their time to a wait lane, then looks for a token for the
    /// others.
    async fn unpark(&self) -> Result<Option<(Parked, Hold)>, warren_broker::BrokerError> {
        let Some(caps) = &self.caps else {
            return Ok(None);
        };
        for (p, wait) in caps.expired() {
            let session = Arc::clone(&self.session);
            let moving = cap::move_to_wait_lane(session, p.route, p.delivery, wait);
            self.control.tracker.spawn(moving);
        }
        caps.unpark(&self.control.cancel).await
    }

    /// Runs a capped delivery in this slot, then, while a delivery of the same tenant is
    /// parked here, hands it the tenant token and the slot (the tenant keeps one slot, never
    /// more than it holds tokens); then gives the tokens back.
    async fn run_capped(self, first: Parked, mut hold: Hold, permit: OwnedSemaphorePermit) {
        let caps = self.caps.as_ref().expect("a capped step");
        let mut next = Some(first);
        while let Some(Parked { route, delivery }) = next.take() {
            let (session, served) = (Arc::clone(&self.session), Arc::clone(&self.served));
            process(session, served, route, delivery).await;
            if self.control.cancel.is_cancelled() {
                break;
            }
            let Some(parked) = caps.hand_over(&mut hold).await else {
                break;
            };
            match caps.step_token(&mut hold, &self.control.cancel).await {
                Ok(true) => next = Some(parked),
                Ok(false) => {
                    let _ = parked.delivery.acker.nack(requeue()).await;
                }
                Err(e) => {
                    let _ = parked.delivery.acker.nack(requeue()).await;
                    let _ = self.control.fatal.send(e.to_string());
                }
            }
        }
        hold.release().await;
        drop(permit);
    }
}

/// `every` ± 20%, so the workers' token looks spread out.
fn jittered(every: Duration) -> Duration {
    every.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_broker::Lane;

    fn routes(priorities: &[Priority], lanes: u16) -> Vec<StepRoute> {
        priorities
            .iter()
            .flat_map(|&p| (0..lanes).map(move |l| StepRoute::new("p", "s", p, Lane::Shard(l))))
            .collect()
    }

    #[test]
    fn buffers_place_every_route_whatever_priorities_the_step_has() {
        for priorities in [
            &Priority::ALL[..],
            &[Priority::Normal],
            &[Priority::High, Priority::Low],
        ] {
            let buffers = Buffers::new(routes(priorities, 3));
            assert_eq!(buffers.lanes, 3);
            for (slot, route) in buffers.routes.iter().enumerate() {
                let lane = usize::from(route.lane.shard().expect("a shard"));
                assert_eq!(buffers.slot(route.priority, lane), Some(slot));
            }
            for p in Priority::ALL {
                assert_eq!(buffers.slot(p, 0).is_some(), priorities.contains(&p));
            }
        }
    }
}
