//! A job's state from its events, pure. Events are sorted (by time, then by [`Kind`] for one
//! millisecond) and exact duplicates dropped before the fold, so the same events in any order,
//! any number of times over (an at-least-once writer repeats a batch after a lost confirm),
//! fold to the same state. Writers' clocks order events of different machines: keep them in
//! sync (NTP), as every time-ordered log asks.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use super::event::{Event, Kind};
use crate::ids::JobId;
use crate::priority::Priority;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting in the queue of `step`.
    Queued,
    /// An attempt of `step` is running.
    Running,
    /// An attempt of `step` failed; the step runs again at `retry_at`.
    Retrying,
    /// A fan-out step made its parts; `step` (the join) runs when they have all ended.
    WaitingForParts,
    Succeeded,
    /// `step` failed for good (its dead-lettering not recorded, or not done).
    Failed,
    /// `step` failed for good and the job's message is in the dead-letter queue.
    DeadLettered,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Running,
        Status::Retrying,
        Status::WaitingForParts,
        Status::Succeeded,
        Status::Failed,
        Status::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::WaitingForParts => "waiting_for_parts",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::DeadLettered => "dead_lettered",
        }
    }

    /// The job has ended (until a replay).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::DeadLettered
        )
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.replace('-', "_");
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = Status::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status `{s}`; one of: {}", all.join(", "))
            })
    }
}

/// How one attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Retried,
    Failed,
}

/// One attempt of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub step: String,
    pub attempt: u32,
    /// 0 before any replay, then one more after each.
    pub round: u32,
    pub started_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub took_ms: Option<u64>,
    /// None while it runs (or its end was not recorded).
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
}

/// A fan-out parent's parts, from its `parts` events and its parts' own events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Parts {
    pub total: u32,
    /// Queued, running, retrying or waiting.
    pub running: u32,
    pub succeeded: u32,
    /// Failed or dead-lettered.
    pub failed: u32,
}

/// What the events of one job say about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobState {
    pub job_id: JobId,
    pub tenant: String,
    pub pipeline: String,
    pub priority: Option<Priority>,
    pub status: Status,
    /// The step `status` is about (none once the job succeeded).
    pub step: Option<String>,
    /// `retrying`: when the next attempt is due (ms since the epoch).
    pub retry_at: Option<u64>,
    /// The newest error, while the job has not succeeded since.
    pub error: Option<String>,
    /// When the job was made (its id's time), submitted, and last heard of.
    pub created_at: Option<u64>,
    pub submitted_at: Option<u64>,
    pub updated_at: u64,
    /// When it ended (succeeded, failed), if it has.
    pub ended_at: Option<u64>,
    pub attempts: Vec<Attempt>,
    pub replays: u32,
    /// Set on a fan-out part: the job that made it.
    pub parent: Option<JobId>,
    /// The schedule that fired it.
    pub schedule: Option<String>,
    /// Set on a fan-out parent; see [`with_parts`].
    pub parts: Option<Parts>,
}

/// Sorted, without exact duplicates.
fn ordered<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<&'a Event> {
    let mut seen = HashSet::new();
    let mut list: Vec<&Event> = events
        .into_iter()
        .filter(|e| e.kind != Kind::Unknown && seen.insert(*e))
        .collect();
    // A total order (the encoded bytes last), so the fold does not depend on the input's.
    list.sort_by_cached_key(|e| {
        (
            e.at,
            e.kind,
            e.step.clone(),
            e.attempt,
            rmp_serde::to_vec_named(e).unwrap_or_default(),
        )
    });
    list
}

/// Folds the events of one job (all with its `job_id`); `None` without any.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<JobState> {
    let events = ordered(events);
    let first = events.first()?;
    let mut state = JobState {
        job_id: first.job_id,
        tenant: first.tenant.clone(),
        pipeline: first.pipeline.clone(),
        priority: None,
        status: Status::Queued,
        step: None,
        retry_at: None,
        error: None,
        created_at: first.job_id.timestamp_ms(),
        submitted_at: None,
        updated_at: first.at,
        ended_at: None,
        attempts: Vec::new(),
        replays: 0,
        parent: None,
        schedule: None,
        parts: None,
    };
    // Whether something past `submitted` has set the status yet.
    let mut moved = false;
    for event in events {
        apply(&mut state, event, &mut moved);
    }
    Some(state)
}

fn apply(state: &mut JobState, e: &Event, moved: &mut bool) {
    state.updated_at = state.updated_at.max(e.at);
    if e.parent.is_some() {
        state.parent = e.parent;
    }
    let round = state.replays;
    let mut set = |state: &mut JobState, status: Status, step: Option<&String>| {
        state.status = status;
        state.step = step.cloned();
        state.retry_at = None;
        state.ended_at = status.is_final().then_some(e.at);
        *moved = true;
    };
    match e.kind {
        Kind::Fired => state.schedule = e.schedule.clone(),
        Kind::Submitted => {
            state.submitted_at = Some(e.at);
            state.priority = e.priority.or(state.priority);
            if !*moved {
                state.status = Status::Queued;
                state.step = e.step.clone();
            }
        }
        Kind::Replayed => {
            state.replays += 1;
            state.error = None;
            set(state, Status::Queued, e.step.as_ref());
        }
        Kind::Started => {
            let attempt = attempt(state, e, round);
            attempt.started_at = Some(attempt.started_at.map_or(e.at, |t| t.min(e.at)));
            // A duplicate `started` of an attempt that has ended says nothing new.
            if attempt.outcome.is_none() {
                set(state, Status::Running, e.step.as_ref());
            }
        }
        Kind::Retried => {
            end(attempt(state, e, round), e, Outcome::Retried);
            state.error = e.error.clone();
            set(state, Status::Retrying, e.step.as_ref());
            state.retry_at = e.retry_in_ms.map(|d| e.at + d);
        }
        Kind::Succeeded => {
            end(attempt(state, e, round), e, Outcome::Succeeded);
            match &e.next {
                Some(next) => set(state, Status::Queued, Some(next)),
                None => {
                    state.error = None;
                    set(state, Status::Succeeded, None);
                }
            }
        }
        Kind::Parts => {
            let parts = state.parts.get_or_insert_with(Parts::default);
            parts.total = e.parts_total.unwrap_or(parts.total);
            // Progress never moves a join that has started back to waiting.
            if matches!(state.status, Status::Queued | Status::WaitingForParts) {
                let step = state.step.clone();
                set(state, Status::WaitingForParts, step.as_ref());
            }
        }
        Kind::Failed => {
            end(attempt(state, e, round), e, Outcome::Failed);
            state.error = e.error.clone().or(state.error.take());
            set(state, Status::Failed, e.step.as_ref());
        }
        Kind::DeadLettered => {
            if state.error.is_none() {
                state.error = e.error.clone().or(e.reason.clone());
            }
            let step = e.step.as_ref().or(state.step.as_ref()).cloned();
            set(state, Status::DeadLettered, step.as_ref());
        }
        Kind::Unknown => {}
    }
}

/// The attempt `e` is about, made when it is the first event of it.
fn attempt<'s>(state: &'s mut JobState, e: &Event, round: u32) -> &'s mut Attempt {
    let step = e.step.clone().unwrap_or_default();
    let number = e.attempt.unwrap_or(1);
    let at = state
        .attempts
        .iter()
        .position(|a| a.step == step && a.attempt == number && a.round == round);
    let index = at.unwrap_or_else(|| {
        state.attempts.push(Attempt {
            step,
            attempt: number,
            round,
            started_at: None,
            ended_at: None,
            took_ms: None,
            outcome: None,
            error: None,
        });
        state.attempts.len() - 1
    });
    &mut state.attempts[index]
}

fn end(attempt: &mut Attempt, e: &Event, outcome: Outcome) {
    attempt.ended_at = Some(e.at);
    attempt.took_ms = e.took_ms.or(attempt.took_ms);
    attempt.outcome = Some(outcome);
    attempt.error = e.error.clone();
    if attempt.started_at.is_none() {
        attempt.started_at = e.took_ms.map(|took| e.at.saturating_sub(took));
    }
}

/// Folds the events of many jobs, one state each, by job id.
pub fn fold_all<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeMap<JobId, JobState> {
    let mut by_job: BTreeMap<JobId, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_job.entry(event.job_id).or_default().push(event);
    }
    by_job
        .into_iter()
        .filter_map(|(id, events)| Some((id, fold(events)?)))
        .collect()
}

/// Fills in `parent`'s parts from the states of its parts (the jobs whose `parent` it is).
/// Parts not heard of yet count as running.
pub fn with_parts<'a>(
    mut parent: JobState,
    states: impl IntoIterator<Item = &'a JobState>,
) -> JobState {
    let mut parts = parent.parts.unwrap_or_default();
    let (mut seen, mut succeeded, mut failed) = (0u32, 0u32, 0u32);
    for part in states
        .into_iter()
        .filter(|s| s.parent == Some(parent.job_id))
    {
        seen += 1;
        match part.status {
            Status::Succeeded => succeeded += 1,
            Status::Failed | Status::DeadLettered => failed += 1,
            _ => {}
        }
    }
    if parent.parts.is_none() && seen == 0 {
        return parent;
    }
    parts.total = parts.total.max(seen);
    parts.succeeded = succeeded;
    parts.failed = failed;
    parts.running = parts.total - succeeded - failed;
    parent.parts = Some(parts);
    parent
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job() -> JobId {
        JobId::new()
    }

    fn ev(id: JobId, kind: Kind, at: u64, step: &str, attempt: u32) -> Event {
        let mut e = Event::new(kind, id, "acme", "import").at(at);
        e.step = Some(step.into());
        e.attempt = (kind != Kind::Submitted).then_some(attempt);
        e
    }

    /// submitted, fetch retried once then succeeded, parse failed for good, dead-lettered,
    /// replayed, parse succeeded (the last step).
    fn life(id: JobId) -> Vec<Event> {
        let mut retried = ev(id, Kind::Retried, 20, "fetch", 1).error("timeout");
        retried.retry_in_ms = Some(5);
        let mut fetched = ev(id, Kind::Succeeded, 40, "fetch", 2).took_ms(8);
        fetched.next = Some("parse".into());
        let mut dead = ev(id, Kind::DeadLettered, 61, "parse", 1);
        dead.reason = Some("failed".into());
        let mut submitted = ev(id, Kind::Submitted, 1, "fetch", 0);
        submitted.priority = Some(Priority::High);
        vec![
            submitted,
            ev(id, Kind::Started, 10, "fetch", 1),
            retried,
            ev(id, Kind::Started, 30, "fetch", 2),
            fetched,
            ev(id, Kind::Started, 50, "parse", 1),
            ev(id, Kind::Failed, 60, "parse", 1).error("exit 65: bad row"),
            dead,
            ev(id, Kind::Replayed, 100, "parse", 0),
            ev(id, Kind::Started, 110, "parse", 1),
            ev(id, Kind::Succeeded, 120, "parse", 1).took_ms(10),
        ]
    }

    #[test]
    fn a_whole_life_folds_to_succeeded_with_every_attempt() {
        let id = job();
        let state = fold(&life(id)).unwrap();
        assert_eq!(state.status, Status::Succeeded);
        assert_eq!(state.priority, Some(Priority::High));
        assert_eq!(state.replays, 1);
        assert_eq!(state.error, None);
        assert_eq!(state.ended_at, Some(120));
        let summary: Vec<_> = state
            .attempts
            .iter()
            .map(|a| (a.step.as_str(), a.attempt, a.round, a.outcome))
            .collect();
        assert_eq!(
            summary,
            [
                ("fetch", 1, 0, Some(Outcome::Retried)),
                ("fetch", 2, 0, Some(Outcome::Succeeded)),
                ("parse", 1, 0, Some(Outcome::Failed)),
                ("parse", 1, 1, Some(Outcome::Succeeded)),
            ]
        );
        assert_eq!(state.attempts[0].error.as_deref(), Some("timeout"));
        assert_eq!(state.attempts[2].error.as_deref(), Some("exit 65: bad row"));
    }

    #[test]
    fn each_prefix_of_a_life_says_where_the_job_is() {
        let id = job();
        let life = life(id);
        let at = |n: usize| fold(&life[..n]).unwrap();
        assert_eq!(
            (at(1).status, at(1).step.as_deref()),
            (Status::Queued, Some("fetch"))
        );
        assert_eq!(at(2).status, Status::Running);
        let retrying = at(3);
        assert_eq!(retrying.status, Status::Retrying);
        assert_eq!(retrying.retry_at, Some(25));
        assert_eq!(retrying.error.as_deref(), Some("timeout"));
        assert_eq!(
            (at(5).status, at(5).step.as_deref()),
            (Status::Queued, Some("parse"))
        );
        assert_eq!(at(7).status, Status::Failed);
        let dead = at(8);
        assert_eq!(
            (dead.status, dead.step.as_deref()),
            (Status::DeadLettered, Some("parse"))
        );
        assert_eq!(dead.error.as_deref(), Some("exit 65: bad row"));
        assert_eq!(
            (at(9).status, at(9).error.as_deref()),
            (Status::Queued, None)
        );
    }

    #[test]
    fn a_late_submitted_does_not_move_a_running_job_back() {
        let id = job();
        // The producer's clock is ahead of the worker's.
        let events = [
            ev(id, Kind::Started, 10, "fetch", 1),
            ev(id, Kind::Submitted, 12, "fetch", 0),
        ];
        assert_eq!(fold(&events).unwrap().status, Status::Running);
    }

    #[test]
    fn a_fan_out_parent_counts_its_parts() {
        let parent = job();
        let mut fanned = ev(parent, Kind::Succeeded, 10, "split", 1);
        fanned.next = Some("join".into());
        let mut parts = ev(parent, Kind::Parts, 10, "split", 1);
        parts.parts_total = Some(3);
        parts.parts_ended = Some(0);
        let states = fold_all(&[fanned, parts]);
        let parent_state = states[&parent].clone();
        assert_eq!(parent_state.status, Status::WaitingForParts);
        assert_eq!(parent_state.step.as_deref(), Some("join"));
        let part = |status_kind: Kind, at: u64| {
            let id = job();
            let mut e = ev(id, status_kind, at, "work", 1);
            e.parent = Some(parent);
            fold(&[e]).unwrap()
        };
        let children = [part(Kind::Succeeded, 20), part(Kind::Failed, 21)];
        let with = with_parts(parent_state, &children);
        assert_eq!(
            with.parts,
            Some(Parts {
                total: 3,
                running: 1,
                succeeded: 1,
                failed: 1
            })
        );
    }

    #[test]
    fn statuses_parse_from_their_names() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
        }
        assert_eq!("dead-lettered".parse::<Status>(), Ok(Status::DeadLettered));
        assert!("lost".parse::<Status>().unwrap_err().contains("queued"));
    }

    proptest! {
        /// Any order, any duplicates: the same state.
        #[test]
        fn order_and_duplicates_do_not_matter(
            cut in 1usize..=11,
            order in Just(()).prop_perturb(|_, mut rng| {
                let mut keys: Vec<u64> = (0..22).map(|_| rng.random()).collect();
                keys.truncate(22);
                keys
            }),
            doubled in proptest::collection::vec(any::<bool>(), 11),
        ) {
            let id = job();
            let events: Vec<Event> = life(id).into_iter().take(cut).collect();
            let expected = fold(&events);
            let mut shuffled: Vec<(u64, Event)> = Vec::new();
            for (i, e) in events.iter().enumerate() {
                shuffled.push((order[i], e.clone()));
                if doubled[i] {
                    shuffled.push((order[i + 11], e.clone()));
                }
            }
            shuffled.sort_by_key(|(k, _)| *k);
            let shuffled: Vec<Event> = shuffled.into_iter().map(|(_, e)| e).collect();
            prop_assert_eq!(fold(&shuffled), expected);
        }
    }
}
