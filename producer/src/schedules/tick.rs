//! Who fires: the holder of the circulating tick. Every scheduler consumes `{ns}.sched.tick`, a
//! single-active-consumer queue, so one of them gets the tick; it fires the due slots, sends the
//! next tick through `{ns}.sched.delay` (whose per-message TTL dead-letters it back), and only
//! then acks. Nothing is held unacked longer than one round of firing, so `consumer_timeout`
//! never trips; a holder that dies before its ack hands the tick to the next consumer.
//!
//! Every scheduler sends one tick when it starts, and a tick that comes less than
//! [`DROP_WITHIN`] after the last one processed is acked and dropped, so however many circulate
//! after a restart, the count comes back to one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use warren_broker::{Outgoing, PublishError};
use warren_common::config::Overlap;
use warren_common::schedule::due_slots;

use super::ended::Ended;
use super::fire::{fire, utc_ms};
use super::ledger::{FireKind, Record};
use super::reader::{append, LedgerError, LedgerReader};
use crate::Client;

/// Time between ticks: the latency of a fire, and about how long a fail-over takes after the
/// broker sees the holder's connection close.
pub const TICK: Duration = Duration::from_secs(1);

/// A tick this soon after the last one processed is a surplus one: dropped.
pub const DROP_WITHIN: Duration = Duration::from_millis(750);

/// A tick later than this after the last one processed means another process held it meanwhile:
/// read the ledger up to now before firing.
const HELD_ELSEWHERE_AFTER: Duration = Duration::from_secs(3);

/// How long a new holder waits to read the ledger up to now.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the holder writes every schedule's state again (pauses and last slots must outlive
/// the ledger's retention).
const STATE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// A slot fired this late is on time, not missed: `catch_up = "0s"` still fires it.
pub const LATE_GRACE: Duration = Duration::from_secs(2);

/// Pause before consuming the tick queue again after losing it.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// This process's part in firing the schedules: a task that stops when this is dropped.
pub struct Scheduler {
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scheduler {
    /// Takes part in firing the config's schedules through `client`'s connection.
    pub fn start(client: Arc<Client>) -> Self {
        Self {
            task: tokio::spawn(run(client)),
        }
    }

    /// Stops taking part (an unacked tick goes back to the queue when the channel closes).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// What the tick loop remembers between ticks.
struct Holder {
    ledger: LedgerReader,
    ended: Ended,
    last_tick: Option<Instant>,
    synced: bool,
    states_written: Option<Instant>,
    sent_start_tick: bool,
}

async fn run(client: Arc<Client>) {
    let mut holder = Holder {
        ledger: LedgerReader::start(client.broker()),
        ended: Ended::new(),
        last_tick: None,
        synced: false,
        states_written: None,
        sent_start_tick: false,
    };
    loop {
        let error = session(&client, &mut holder).await;
        tracing::warn!(error = %error, "Lost the schedule tick queue; consuming it again.");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// One consumer of the tick queue: returns why it ended.
async fn session(client: &Client, holder: &mut Holder) -> String {
    let queue = client.broker().names().sched_tick_queue();
    let channel = match client.broker().channel().await {
        Ok(channel) => channel,
        Err(e) => return e.to_string(),
    };
    let mut consumer =
        match warren_broker::consume(&channel, &queue, 1, FieldTable::default()).await {
            Ok(consumer) => consumer,
            Err(e) => return e.to_string(),
        };
    if !holder.sent_start_tick {
        if let Err(e) = send_tick(client).await {
            return format!("send the first tick: {e}");
        }
        holder.sent_start_tick = true;
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(cause) => return format!("read {queue}: {cause}"),
        };
        let now = Instant::now();
        let since_last = holder.last_tick.map(|t| now.duration_since(t));
        if since_last.is_some_and(|d| d < DROP_WITHIN) {
            tracing::debug!("Dropped a surplus schedule tick.");
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                return format!("ack a tick: {e}");
            }
            continue;
        }
        let gained = since_last.is_none_or(|d| d > HELD_ELSEWHERE_AFTER);
        if gained || !holder.synced {
            holder.synced = false;
            match holder
                .ledger
                .sync(client.broker(), client.publisher(), SYNC_TIMEOUT)
                .await
            {
                Ok(()) => {
                    holder.synced = true;
                    tracing::info!("Holds the schedule tick: this process fires the schedules.");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the schedules' ledger; firing nothing this tick.")
                }
            }
        }
        if holder.synced {
            let states_due = holder
                .states_written
                .is_none_or(|t| t.elapsed() > STATE_EVERY);
            if (states_due || gained) && write_states(client, &holder.ledger).await.is_ok() {
                holder.states_written = Some(Instant::now());
            }
            fire_due(client, holder).await;
        }
        // The next tick is safe with the broker before this one is acked.
        if let Err(e) = send_tick(client).await {
            return format!("send the next tick: {e}");
        }
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            return format!("ack a tick: {e}");
        }
        holder.last_tick = Some(now);
    }
    format!("the broker ended the consumer of {queue}")
}

/// Publishes a tick into the delay queue, with confirm; its TTL brings it back in one [`TICK`].
async fn send_tick(client: &Client) -> Result<(), PublishError> {
    let delay = client.broker().names().sched_delay_queue();
    client
        .publisher()
        .publish(Outgoing {
            exchange: "",
            routing_key: &delay,
            body: b"tick",
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_expiration(TICK.as_millis().to_string().into()),
        })
        .await
}

async fn write_states(client: &Client, ledger: &LedgerReader) -> Result<(), LedgerError> {
    let snapshot = ledger.snapshot();
    for schedule in &client.config().schedules {
        let state = snapshot.state(&schedule.name);
        if state.last_slot_ms.is_none() && !state.paused {
            continue;
        }
        let record = Record::State {
            schedule: schedule.name.clone(),
            last_slot_ms: state.last_slot_ms,
            paused: state.paused,
            at_ms: warren_common::now_ms(),
        };
        append(client.broker(), client.publisher(), &record)
            .await
            .map_err(|e| LedgerError {
                stream: client.broker().names().sched_stream(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Fires every schedule's due slots, oldest first. A failure stops that schedule for this tick;
/// its slots are still due at the next one.
async fn fire_due(client: &Client, holder: &mut Holder) {
    for schedule in &client.config().schedules {
        let state = holder.ledger.snapshot().state(&schedule.name);
        if state.paused {
            continue;
        }
        let now = Utc::now();
        let Some(last) = state.last_slot_ms else {
            // First sight: the slots start here; nothing before now fires.
            let start = schedule.cadence.last_at_or_before(now).unwrap_or(now);
            if let Err(e) = fire(client, &holder.ledger, schedule, start, FireKind::Baseline).await
            {
                tracing::warn!(schedule = %schedule.name, error = %e, "Cannot record a new schedule's start.");
            }
            continue;
        };
        if let (Some(previous), Overlap::Skip) = (&state.last_fire, schedule.overlap) {
            // Reading starts now, so the results are in by the time the next slot asks.
            let _ = holder.ended.follow(client, &previous.jobs).await;
        }
        let window = schedule.catch_up + LATE_GRACE;
        let due = due_slots(&schedule.cadence, utc_ms(last), now, window);
        if due.skipped > 0 {
            tracing::warn!(schedule = %schedule.name, skipped = due.skipped,
                catch_up_s = schedule.catch_up.as_secs(),
                "Skipped missed schedule slots older than catch_up.");
            if due.slots.is_empty() {
                if let Some(newest) = due.newest_skipped {
                    let _ =
                        fire(client, &holder.ledger, schedule, newest, FireKind::Baseline).await;
                }
            }
        }
        for slot in due.slots {
            let previous = holder.ledger.snapshot().state(&schedule.name).last_fire;
            let running = match (&previous, schedule.overlap) {
                (Some(previous), Overlap::Skip) => {
                    !holder.ended.all_ended(client, &previous.jobs).await
                }
                _ => false,
            };
            let how = if running {
                FireKind::Skipped
            } else {
                // Watched before they are submitted: a job that ends at once is still seen
                // ending when the next slot asks.
                holder
                    .ended
                    .watch(super::jobs_of(schedule, slot).iter().map(|job| job.id));
                FireKind::Scheduled
            };
            if let Err(e) = fire(client, &holder.ledger, schedule, slot, how).await {
                tracing::warn!(schedule = %schedule.name,
                    slot = %slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    error = %e, "Cannot fire a schedule slot; trying again at the next tick.");
                break;
            }
        }
    }
}
