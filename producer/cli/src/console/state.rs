//! The console's picture of every job in the history stream, kept as the stream is read.
//!
//! Per job it keeps the job's events, MessagePack-encoded one after another (a compact form:
//! a million events fit in well under the 500 MiB the console may use), and a [`Row`], the
//! summary the lists and counts need, refolded from the events whenever one of them arrives.
//! A job's page decodes its events and folds them again (`warren_common::history::fold`), so
//! the console shows exactly what `warren status` shows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use warren_common::history::{fold, with_parts, Event, JobState, Status};
use warren_common::JobId;

/// Longest error a [`Row`] keeps (the job page has all of it).
const ROW_ERROR_CHARS: usize = 300;

/// What the lists show of one job.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) job_id: JobId,
    pub(crate) tenant: Arc<str>,
    pub(crate) pipeline: Arc<str>,
    pub(crate) status: Status,
    pub(crate) step: Option<String>,
    /// The end of the newest error, while the job has not succeeded since.
    pub(crate) error: Option<String>,
    pub(crate) created_at: Option<u64>,
    pub(crate) updated_at: u64,
    pub(crate) ended_at: Option<u64>,
    /// Set on a fan-out part: the job that made it.
    pub(crate) parent: Option<JobId>,
    pub(crate) replays: u32,
    /// From its submit to its first attempt's start (ms), once it started.
    pub(crate) wait_ms: Option<u64>,
}

impl Row {
    fn of(state: &JobState, tenant: Arc<str>, pipeline: Arc<str>) -> Self {
        let error = state.error.as_deref().map(|e| {
            let skip = e.chars().count().saturating_sub(ROW_ERROR_CHARS);
            e.chars().skip(skip).collect()
        });
        Self {
            job_id: state.job_id,
            tenant,
            pipeline,
            status: state.status,
            step: state.step.clone(),
            error,
            created_at: state.created_at,
            updated_at: state.updated_at,
            ended_at: state.ended_at,
            parent: state.parent,
            replays: state.replays,
            wait_ms: state
                .attempts
                .first()
                .and_then(|a| a.started_at)
                .zip(state.submitted_at)
                .map(|(started, submitted)| started.saturating_sub(submitted)),
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// Every event of the job, MessagePack, one after another.
    events: Vec<u8>,
    row: Option<Row>,
}

/// Every job the console has read of, by id (ids are UUID v7: in time order).
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    entries: BTreeMap<JobId, Entry>,
    /// Fan-out parents to their parts.
    parts: HashMap<JobId, Vec<JobId>>,
    /// One copy of each tenant and pipeline name.
    names: HashSet<Arc<str>>,
    /// Jobs with events not folded into their row yet.
    dirty: HashSet<JobId>,
    pub(crate) events: u64,
}

impl Jobs {
    /// Takes in one event; [`Self::refold`] brings the rows up to date.
    pub(crate) fn add(&mut self, event: &Event) {
        self.events += 1;
        let entry = self.entries.entry(event.job_id).or_default();
        if rmp_serde::encode::write_named(&mut entry.events, event).is_err() {
            return;
        }
        if let Some(parent) = event.parent {
            let parts = self.parts.entry(parent).or_default();
            if !parts.contains(&event.job_id) {
                parts.push(event.job_id);
            }
        }
        self.dirty.insert(event.job_id);
    }

    /// Folds the events of every job that had new ones into its row.
    pub(crate) fn refold(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            let Some(state) = self.state(id) else {
                continue;
            };
            let tenant = self.name(&state.tenant);
            let pipeline = self.name(&state.pipeline);
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.row = Some(Row::of(&state, tenant, pipeline));
            }
        }
    }

    /// Gives back what the event buffers over-allocated while they grew (up to half of them):
    /// once the catch-up is done, most jobs get few events more.
    pub(crate) fn compact(&mut self) {
        for entry in self.entries.values_mut() {
            entry.events.shrink_to_fit();
        }
    }

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let fresh: Arc<str> = Arc::from(name);
        self.names.insert(fresh.clone());
        fresh
    }

    /// The events of job `id`, as read.
    pub(crate) fn events(&self, id: JobId) -> Vec<Event> {
        let Some(entry) = self.entries.get(&id) else {
            return Vec::new();
        };
        let mut bytes = entry.events.as_slice();
        let mut events = Vec::new();
        while !bytes.is_empty() {
            match rmp_serde::from_read::<_, Event>(&mut bytes) {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        events
    }

    /// Job `id`'s state from its events (without its parts).
    fn state(&self, id: JobId) -> Option<JobState> {
        fold(&self.events(id))
    }

    /// Job `id`'s state, a fan-out parent's with its parts counted.
    pub(crate) fn job(&self, id: JobId) -> Option<JobState> {
        let state = self.state(id)?;
        let parts: Vec<JobState> = self
            .parts_of(id)
            .iter()
            .filter_map(|part| self.state(*part))
            .collect();
        Some(with_parts(state, &parts))
    }

    /// The rows of a fan-out's parts.
    pub(crate) fn parts(&self, id: JobId) -> Vec<&Row> {
        self.parts_of(id)
            .iter()
            .filter_map(|part| self.row(*part))
            .collect()
    }

    fn parts_of(&self, id: JobId) -> &[JobId] {
        self.parts.get(&id).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn row(&self, id: JobId) -> Option<&Row> {
        self.entries.get(&id)?.row.as_ref()
    }

    /// Every row, newest job first.
    pub(crate) fn newest_first(&self) -> impl Iterator<Item = &Row> {
        self.entries.values().rev().filter_map(|e| e.row.as_ref())
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets the jobs last heard of before `cutoff` (ms): the stream no longer has their
    /// events either, so a restarted console would not know them.
    pub(crate) fn forget_before(&mut self, cutoff: u64) {
        let old: Vec<JobId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.row.as_ref().is_some_and(|r| r.updated_at < cutoff))
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.entries.remove(&id);
            self.parts.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_common::history::Kind;

    fn event(id: JobId, kind: Kind, at: u64) -> Event {
        let mut e = Event::new(kind, id, "acme", "import").at(at);
        e.step = Some("fetch".into());
        e.attempt = (kind != Kind::Submitted).then_some(1);
        e
    }

    #[test]
    fn rows_follow_the_events_and_the_job_folds_like_status() {
        let mut jobs = Jobs::default();
        let (a, b) = (JobId::new(), JobId::new());
        jobs.add(&event(a, Kind::Submitted, 1));
        jobs.add(&event(b, Kind::Submitted, 2));
        jobs.refold();
        assert_eq!(jobs.row(a).unwrap().status, Status::Queued);
        jobs.add(&event(a, Kind::Started, 3));
        jobs.add(&event(a, Kind::Failed, 4).error("<script>boom</script>"));
        jobs.refold();
        let row = jobs.row(a).unwrap();
        assert_eq!(row.status, Status::Failed);
        assert_eq!(row.error.as_deref(), Some("<script>boom</script>"));
        let events = jobs.events(a);
        assert_eq!(events.len(), 3);
        assert_eq!(jobs.job(a), fold(&events));
        let order: Vec<JobId> = jobs.newest_first().map(|r| r.job_id).collect();
        assert_eq!(order, [b, a]);
        assert!(Arc::ptr_eq(
            &jobs.row(a).unwrap().tenant,
            &jobs.row(b).unwrap().tenant
        ));
    }

    #[test]
    fn a_fan_out_counts_its_parts_and_old_jobs_are_forgotten() {
        let mut jobs = Jobs::default();
        let parent = JobId::new();
        let mut parts = event(parent, Kind::Parts, 5);
        parts.parts_total = Some(2);
        jobs.add(&event(parent, Kind::Submitted, 1));
        jobs.add(&parts);
        let part = JobId::new();
        let mut done = event(part, Kind::Succeeded, 6);
        done.parent = Some(parent);
        jobs.add(&done);
        jobs.refold();
        let state = jobs.job(parent).unwrap();
        assert_eq!(state.parts.unwrap().succeeded, 1);
        assert_eq!(state.parts.unwrap().running, 1);
        assert_eq!(jobs.parts(parent).len(), 1);
        jobs.forget_before(6);
        assert_eq!(jobs.len(), 1);
        assert!(jobs.row(parent).is_none());
    }
}
