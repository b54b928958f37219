//! Firing one slot of a schedule: its jobs (one per tenant, with deterministic ids) are
//! submitted with confirm, then the fire is recorded in the ledger. A crash between the two
//! fires the slot again on the next tick holder: the same ids, so at most one recognisable
//! duplicate per fail-over, and never a lost slot.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::Value;
use warren_common::config::ScheduleConfig;
use warren_common::{now_ms, JobId};

use super::ledger::{FireKind, Record};
use super::reader::{append, LedgerReader};
use crate::{Client, Job, SubmitError};

/// The jobs of `schedule` at `slot`: one per tenant, each with the id [`JobId::for_slot`] and
/// the schedule's payload plus `schedule` and `slot` (RFC 3339, UTC).
pub fn jobs_of(schedule: &ScheduleConfig, slot: DateTime<Utc>) -> Vec<Job> {
    let slot_ms = slot.timestamp_millis().max(0) as u64;
    let mut payload = schedule.payload.clone();
    payload.insert("schedule".into(), Value::from(schedule.name.clone()));
    payload.insert(
        "slot".into(),
        Value::from(slot.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    schedule
        .tenants
        .iter()
        .map(|tenant| {
            let mut job = Job::new(
                schedule.pipeline.clone(),
                tenant.as_str(),
                Value::Object(payload.clone()),
            )
            .priority(schedule.priority);
            job.id = JobId::for_slot(&schedule.name, slot_ms, tenant.as_str());
            job
        })
        .collect()
}

/// Submits the jobs of `slot` (none for a skipped or baseline record), then records the fire in
/// the ledger, each with confirm; returns the job ids.
pub(super) async fn fire(
    client: &Client,
    ledger: &LedgerReader,
    schedule: &ScheduleConfig,
    slot: DateTime<Utc>,
    how: FireKind,
) -> Result<Vec<JobId>, SubmitError> {
    let jobs = match how {
        FireKind::Skipped | FireKind::Baseline => Vec::new(),
        _ => {
            let mut jobs = jobs_of(schedule, slot);
            // A manual fire is not one of the schedule's slots: fresh ids, so triggering twice
            // (or in the second of a slot) runs the jobs again instead of repeating ids.
            if how == FireKind::Trigger {
                for job in &mut jobs {
                    job.id = JobId::new();
                }
            }
            let fired: Vec<_> = jobs
                .iter()
                .map(|job| {
                    let mut event = warren_common::history::Event::new(
                        warren_common::history::Kind::Fired,
                        job.id,
                        &job.tenant,
                        &job.pipeline,
                    );
                    event.schedule = Some(schedule.name.clone());
                    event
                })
                .collect();
            let ids = client.submit_many(jobs).await?;
            client.record(fired).await;
            ids
        }
    };
    let record = Record::Fired {
        schedule: schedule.name.clone(),
        slot_ms: slot.timestamp_millis().max(0) as u64,
        how,
        jobs: jobs.clone(),
        by: super::writer_id(),
        at_ms: now_ms(),
    };
    append(client.broker(), client.publisher(), &record)
        .await
        .map_err(|cause| SubmitError::Publish {
            confirmed: jobs.len(),
            cause,
        })?;
    ledger.apply(record);
    let slot_text = slot.to_rfc3339_opts(SecondsFormat::Secs, true);
    if matches!(how, FireKind::Skipped) {
        tracing::info!(schedule = %schedule.name, slot = %slot_text, how = how.as_str(),
            "Skipped a schedule slot: its previous fire still runs (overlap = \"skip\").");
    } else if matches!(how, FireKind::Scheduled) {
        tracing::info!(schedule = %schedule.name, slot = %slot_text, how = how.as_str(),
            pipeline = %schedule.pipeline, jobs = jobs.len(), "Fired a schedule slot.");
    } else if !matches!(how, FireKind::Baseline) {
        // `warren schedules trigger|backfill`: the command prints what it fired.
        tracing::debug!(schedule = %schedule.name, slot = %slot_text, how = how.as_str(),
            pipeline = %schedule.pipeline, jobs = jobs.len(), "Fired a schedule slot.");
    }
    Ok(jobs)
}

/// A time in ms since the epoch as a UTC time.
pub(super) fn utc_ms(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_default()
}
