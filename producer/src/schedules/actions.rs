//! What `warren schedules` does: read every schedule's state, fire one by hand, backfill a
//! range, pause and resume. Each reads the ledger up to now first.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use warren_common::config::ScheduleConfig;
use warren_common::{now_ms, JobId};

use super::fire::{fire, utc_ms};
use super::ledger::{FireKind, Record};
use super::reader::{append, LedgerReader};
use crate::{Client, SubmitError};

/// How long a command waits to read the ledger up to now.
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

/// The most slots one backfill fires.
pub(super) const MAX_BACKFILL_SLOTS: usize = 10_000;

/// One schedule for `warren schedules`.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleStatus {
    pub name: String,
    pub pipeline: String,
    /// The `cron` pattern or `every` interval.
    pub when: String,
    pub timezone: String,
    pub tenants: Vec<String>,
    pub paused: bool,
    /// The newest of its own slots handled (fired, skipped, or where it started).
    pub last_slot: Option<DateTime<Utc>>,
    /// Its last fire with jobs (its own, a trigger or a backfill).
    pub last_fire: Option<DateTime<Utc>>,
    pub last_fire_kind: Option<FireKind>,
    pub last_fire_jobs: Vec<JobId>,
    /// The next slot it fires, unless paused.
    pub next: Option<DateTime<Utc>>,
    /// Slots of its own fired twice (a fail-over between a fire and its record).
    pub repeats: u64,
}

async fn read_ledger(client: &Client) -> Result<LedgerReader, SubmitError> {
    let reader = LedgerReader::start(client.broker());
    reader
        .sync(client.broker(), client.publisher(), SYNC_TIMEOUT)
        .await
        .map_err(|e| SubmitError::Invalid(format!("cannot read the schedules' ledger: {e}")))?;
    Ok(reader)
}

fn schedule<'a>(client: &'a Client, name: &str) -> Result<&'a ScheduleConfig, SubmitError> {
    client
        .config()
        .schedule(name)
        .ok_or_else(|| SubmitError::Invalid(format!("no schedule named `{name}` in the config")))
}

/// Every schedule of the config with its state.
pub async fn status(client: &Client) -> Result<Vec<ScheduleStatus>, SubmitError> {
    let ledger = read_ledger(client).await?.snapshot();
    let now = Utc::now();
    Ok(client
        .config()
        .schedules
        .iter()
        .map(|s| {
            let state = ledger.state(&s.name);
            let from = state.last_slot_ms.map(utc_ms).unwrap_or(now).max(now);
            let timezone = match &s.cadence {
                warren_common::schedule::Cadence::Cron { timezone, .. } => timezone.to_string(),
                warren_common::schedule::Cadence::Every(_) => "UTC".into(),
            };
            ScheduleStatus {
                name: s.name.clone(),
                pipeline: s.pipeline.clone(),
                when: s.when.clone(),
                timezone,
                tenants: s.tenants.iter().map(|t| t.to_string()).collect(),
                paused: state.paused,
                last_slot: state.last_slot_ms.map(utc_ms),
                last_fire: state.last_fire.as_ref().map(|f| utc_ms(f.slot_ms)),
                last_fire_kind: state.last_fire.as_ref().map(|f| f.how),
                last_fire_jobs: state.last_fire.map(|f| f.jobs).unwrap_or_default(),
                next: (!state.paused)
                    .then(|| s.cadence.next_after(from))
                    .flatten(),
                repeats: state.repeats,
            }
        })
        .collect())
}

/// Fires `name` now (its slot: this second), whatever its cadence; returns the job ids.
pub async fn trigger(client: &Client, name: &str) -> Result<Vec<JobId>, SubmitError> {
    let schedule = schedule(client, name)?;
    let ledger = read_ledger(client).await?;
    let slot = utc_ms(now_ms() / 1000 * 1000);
    fire(client, &ledger, schedule, slot, FireKind::Trigger).await
}

/// Fires every slot of `name` in [`from`, `to`], oldest first (at most
/// 10,000 slots); returns the slots and their job ids. The ids are the ones the
/// schedule itself gives those slots, so a slot that ran already is recognisable.
pub async fn backfill(
    client: &Client,
    name: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, Vec<JobId>)>, SubmitError> {
    let schedule = schedule(client, name)?;
    let mut slots = Vec::new();
    let mut cursor = from - chrono::Duration::milliseconds(1);
    while let Some(slot) = schedule.cadence.next_after(cursor) {
        if slot > to {
            break;
        }
        if slots.len() == MAX_BACKFILL_SLOTS {
            return Err(SubmitError::Invalid(format!(
                "the range holds more than {MAX_BACKFILL_SLOTS} slots; backfill a shorter one"
            )));
        }
        slots.push(slot);
        cursor = slot;
    }
    let ledger = read_ledger(client).await?;
    let mut fired = Vec::new();
    for slot in slots {
        let jobs = fire(client, &ledger, schedule, slot, FireKind::Backfill).await?;
        fired.push((slot, jobs));
    }
    Ok(fired)
}

/// Stops `name` firing until [`resume`]: every scheduler reads it from the ledger.
pub async fn pause(client: &Client, name: &str) -> Result<(), SubmitError> {
    set_paused(client, name, true).await
}

/// Lets `name` fire again; the slots it missed while paused are caught up as after an outage.
pub async fn resume(client: &Client, name: &str) -> Result<(), SubmitError> {
    set_paused(client, name, false).await
}

async fn set_paused(client: &Client, name: &str, paused: bool) -> Result<(), SubmitError> {
    schedule(client, name)?;
    let (schedule, by, at_ms) = (name.to_string(), super::writer_id(), now_ms());
    let record = if paused {
        Record::Paused {
            schedule,
            by,
            at_ms,
        }
    } else {
        Record::Resumed {
            schedule,
            by,
            at_ms,
        }
    };
    append(client.broker(), client.publisher(), &record)
        .await
        .map_err(|cause| SubmitError::Publish {
            confirmed: 0,
            cause,
        })
}
