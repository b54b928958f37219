//! Packed events: the events of one history message that differ only in their job, their time
//! and their duration travel as one [`Group`] (the shared fields once, each job as 16 bytes of
//! id, a time offset and a duration). A bulk submit's "submitted" events and a worker's
//! "started" and "succeeded" events pack about 7x smaller than as maps, which is what history
//! costs the broker and the writer. Pure: [`Batch`](super::Batch) packs on encode and unpacks
//! on decode, so every reader still sees one [`Event`] per job.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::{Event, Kind};
use crate::bin::Bin;
use crate::ids::JobId;
use crate::priority::Priority;

/// Fewest events a group packs; a lone event stays a plain map, readable at a glance.
const MIN_GROUP: usize = 2;

/// Events of one kind sharing every field but `job_id`, `at` and `took_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Group {
    kind: Kind,
    tenant: String,
    pipeline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<JobId>,
    /// The earliest `at` of the group.
    at: u64,
    /// The jobs' UUIDs, 16 bytes each, one after another.
    ids: Bin,
    /// Each job's `at` minus the group's; absent when all are 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dt: Option<Vec<u64>>,
    /// Each job's `took_ms`; absent when the events have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    took_ms: Option<Vec<u64>>,
}

/// What events of one group share (borrowed from the first of them).
#[derive(PartialEq, Eq, Hash)]
struct Key<'a> {
    kind: Kind,
    tenant: &'a str,
    pipeline: &'a str,
    step: Option<&'a str>,
    attempt: Option<u32>,
    next: Option<&'a str>,
    priority: Option<Priority>,
    parent: Option<JobId>,
    timed: bool,
}

impl<'a> Key<'a> {
    /// `None` for events with a field a group cannot hold (an error, a schedule, a count...).
    fn of(e: &'a Event) -> Option<Self> {
        let plain = e.error.is_none()
            && e.retry_in_ms.is_none()
            && e.reason.is_none()
            && e.parts_total.is_none()
            && e.parts_ended.is_none()
            && e.schedule.is_none()
            && e.kind != Kind::Unknown;
        plain.then(|| Key {
            kind: e.kind,
            tenant: &e.tenant,
            pipeline: &e.pipeline,
            step: e.step.as_deref(),
            attempt: e.attempt,
            next: e.next.as_deref(),
            priority: e.priority,
            parent: e.parent,
            timed: e.took_ms.is_some(),
        })
    }
}

/// Splits `events` into those that stay plain and the groups of the rest (each group's jobs in
/// their order in `events`).
pub(super) fn pack(events: Vec<Event>) -> (Vec<Event>, Vec<Group>) {
    // Members of each group, by index into `events`, groups in order of their first event.
    let mut members: Vec<Vec<usize>> = Vec::new();
    {
        let mut index: HashMap<Key<'_>, usize> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            if let Some(key) = Key::of(event) {
                let next = members.len();
                let g = *index.entry(key).or_insert(next);
                if g == next {
                    members.push(Vec::new());
                }
                members[g].push(i);
            }
        }
    }
    let mut slots: Vec<Option<Event>> = events.into_iter().map(Some).collect();
    let mut groups = Vec::new();
    for member in members.iter().filter(|m| m.len() >= MIN_GROUP) {
        let taken: Vec<Event> = member
            .iter()
            .map(|&i| slots[i].take().expect("each event is in one group"))
            .collect();
        groups.push(Group::of(taken));
    }
    (slots.into_iter().flatten().collect(), groups)
}

/// The events of `groups`, in order; a group whose columns do not match its ids (not written
/// by warren) is skipped.
pub(super) fn unpack(groups: Vec<Group>) -> Vec<Event> {
    let mut events = Vec::new();
    for group in groups {
        group.expand_into(&mut events);
    }
    events
}

impl Group {
    /// The group of `events`, which share one [`Key`] (at least one of them).
    fn of(events: Vec<Event>) -> Self {
        let at = events.iter().map(|e| e.at).min().unwrap_or(0);
        let mut ids = Vec::with_capacity(events.len() * 16);
        for e in &events {
            ids.extend_from_slice(e.job_id.as_uuid().as_bytes());
        }
        let dt: Vec<u64> = events.iter().map(|e| e.at - at).collect();
        let took_ms: Option<Vec<u64>> = events.iter().map(|e| e.took_ms).collect();
        let first = events.into_iter().next().expect("a group has events");
        Self {
            kind: first.kind,
            tenant: first.tenant,
            pipeline: first.pipeline,
            step: first.step,
            attempt: first.attempt,
            next: first.next,
            priority: first.priority,
            parent: first.parent,
            at,
            ids: Bin(ids),
            dt: dt.iter().any(|&d| d != 0).then_some(dt),
            took_ms,
        }
    }

    fn expand_into(self, out: &mut Vec<Event>) {
        let bytes = &self.ids.0;
        let n = bytes.len() / 16;
        let fits = |column: &Option<Vec<u64>>| column.as_ref().is_none_or(|c| c.len() == n);
        if !bytes.len().is_multiple_of(16) || !fits(&self.dt) || !fits(&self.took_ms) {
            return;
        }
        out.reserve(n);
        for (i, id) in bytes.chunks_exact(16).enumerate() {
            let id = Uuid::from_slice(id).expect("16 bytes");
            let dt = self.dt.as_ref().map_or(0, |dt| dt[i]);
            let mut event = Event::new(
                self.kind,
                JobId::from_uuid(id),
                &self.tenant,
                &self.pipeline,
            )
            .at(self.at.saturating_add(dt));
            event.step = self.step.clone();
            event.attempt = self.attempt;
            event.next = self.next.clone();
            event.priority = self.priority;
            event.parent = self.parent;
            event.took_ms = self.took_ms.as_ref().map(|t| t[i]);
            out.push(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(mut events: Vec<Event>) -> Vec<Event> {
        events.sort_by(|a, b| {
            (a.job_id, a.at, a.kind, a.took_ms).cmp(&(b.job_id, b.at, b.kind, b.took_ms))
        });
        events
    }

    fn submitted(tenant: &str, at: u64) -> Event {
        let mut e = Event::new(Kind::Submitted, JobId::new(), tenant, "import").at(at);
        e.step = Some("fetch".into());
        e.priority = Some(Priority::Normal);
        e
    }

    #[test]
    fn a_submit_window_packs_into_one_group() {
        let events: Vec<Event> = (0..1000)
            .map(|i| submitted("acme", 1_000 + i / 300))
            .collect();
        let (plain, groups) = pack(events.clone());
        assert!(plain.is_empty());
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].at, 1_000);
        assert_eq!(groups[0].took_ms, None);
        // Jobs keep their order.
        assert_eq!(unpack(groups), events);
    }

    #[test]
    fn lone_and_unpackable_events_stay_plain() {
        let mut failed = submitted("acme", 5);
        failed.kind = Kind::Failed;
        failed = failed.error("boom");
        let events = vec![failed, submitted("acme", 5), submitted("other", 5)];
        let (plain, groups) = pack(events.clone());
        assert_eq!(plain, events);
        assert!(groups.is_empty());
    }

    #[test]
    fn columns_that_do_not_match_the_ids_are_skipped() {
        let (_, mut groups) = pack(vec![submitted("a", 1), submitted("a", 2)]);
        groups[0].dt = Some(vec![1]);
        assert!(unpack(groups.clone()).is_empty());
        groups[0].dt = None;
        groups[0].ids.0.pop();
        assert!(unpack(groups).is_empty());
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            prop::sample::select(vec![
                Kind::Submitted,
                Kind::Started,
                Kind::Succeeded,
                Kind::Retried,
                Kind::Failed,
            ]),
            any::<u128>(),
            1_700_000_000_000u64..1_700_000_000_100,
            prop::sample::select(vec!["a", "b"]),
            proptest::option::of(prop::sample::select(vec!["s1", "s2"])),
            proptest::option::of(1u32..3),
            proptest::option::of(0u64..50),
            proptest::option::of(Just("boom")),
            proptest::option::of(prop::sample::select(vec![Priority::High, Priority::Low])),
            proptest::option::of(Just(JobId::from_uuid(Uuid::from_u128(7)))),
        )
            .prop_map(
                |(kind, id, at, tenant, step, attempt, took, error, priority, parent)| {
                    let mut e =
                        Event::new(kind, JobId::from_uuid(Uuid::from_u128(id)), tenant, "p").at(at);
                    e.step = step.map(str::to_string);
                    e.next = step.map(|s| format!("after-{s}"));
                    e.attempt = attempt;
                    e.took_ms = took;
                    e.priority = priority;
                    e.parent = parent;
                    if let Some(error) = error {
                        e = e.error(error);
                    }
                    e
                },
            )
    }

    proptest! {
        /// Packing, then unpacking, gives back the same events.
        #[test]
        fn unpack_undoes_pack(events in prop::collection::vec(event(), 0..60)) {
            let (plain, groups) = pack(events.clone());
            prop_assert!(groups.iter().all(|g| g.ids.0.len() >= 16 * MIN_GROUP));
            let mut back = plain;
            back.extend(unpack(groups));
            prop_assert_eq!(sorted(back), sorted(events));
        }
    }
}
