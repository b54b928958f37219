//! The rule of every wait for results, without the reading: which result of a job counts, and
//! when a wait is over. A success is final. A failure may not be: a job replayed from the
//! dead-letter queue finishes again later, so a failure is held until the reader has caught up
//! with the stream (an event that finished after the failure was read, or a quiet stream, or
//! [`CATCH_UP_MAX`]), and a later result of the job replaces it. Time comes in as arguments,
//! so the rule is tested without a broker or a clock.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use warren_common::{JobId, JobStatus, ResultEvent};

/// After a failed result is read, how long the stream may stay quiet before the reader counts
/// as caught up (a replay's later result would already have been delivered), and the most time
/// the catch-up takes on a stream too busy to go quiet.
pub(crate) const CATCH_UP_IDLE: Duration = Duration::from_millis(250);
pub(crate) const CATCH_UP_MAX: Duration = Duration::from_secs(2);

/// The results read so far of the jobs waited for, and which are final.
#[derive(Debug)]
pub(crate) struct CatchUp {
    /// Jobs without a final result yet; `None` when every job counts (a wait with no end).
    open: Option<HashSet<JobId>>,
    /// Failures read and not yet final, oldest first.
    held: Vec<Held>,
    /// Final results not yet taken, in the order they became final.
    settled: VecDeque<ResultEvent>,
    /// When the last event was read: a stream quiet since then has nothing newer.
    last_event: Instant,
    /// No catch-up lasts past this (the caller's deadline, less room to report).
    latest: Option<Instant>,
}

/// A failure waiting to be confirmed as the job's newest result.
#[derive(Debug)]
struct Held {
    event: ResultEvent,
    /// Wall-clock time (ms) the failure was read: an event that finished later was written
    /// after it, so the reader has read past it.
    read_at_ms: u64,
    give_up: Instant,
}

impl CatchUp {
    /// Waits for `ids`; `latest` bounds every catch-up.
    pub(crate) fn jobs(
        ids: impl IntoIterator<Item = JobId>,
        now: Instant,
        latest: Option<Instant>,
    ) -> Self {
        Self::new(Some(ids.into_iter().collect()), now, latest)
    }

    /// Every job's result counts; the wait never ends.
    pub(crate) fn every(now: Instant) -> Self {
        Self::new(None, now, None)
    }

    fn new(open: Option<HashSet<JobId>>, now: Instant, latest: Option<Instant>) -> Self {
        Self {
            open,
            held: Vec::new(),
            settled: VecDeque::new(),
            last_event: now,
            latest,
        }
    }

    /// An event read from the stream at `now` (`now_ms` on the wall clock).
    pub(crate) fn offer(&mut self, event: ResultEvent, now: Instant, now_ms: u64) {
        self.last_event = now;
        if !self.held.is_empty() {
            // Another job's event that finished after a failure was read: the reader is past
            // the point where the failure was the newest thing in the stream.
            let caught_up =
                |h: &Held| h.event.job_id != event.job_id && event.finished_at > h.read_at_ms;
            self.release(caught_up);
        }
        if !self
            .open
            .as_ref()
            .is_none_or(|open| open.contains(&event.job_id))
        {
            return;
        }
        let job = event.job_id;
        self.held.retain(|h| h.event.job_id != job);
        if event.status == JobStatus::Succeeded {
            self.settle(event);
        } else {
            let give_up = now + CATCH_UP_MAX;
            self.held.push(Held {
                event,
                read_at_ms: now_ms,
                give_up: self.latest.map_or(give_up, |latest| give_up.min(latest)),
            });
        }
    }

    /// Time has passed without an event: the held failures whose catch-up is over become final.
    pub(crate) fn tick(&mut self, now: Instant) {
        let quiet = now >= self.last_event + CATCH_UP_IDLE;
        self.release(|h| quiet || now >= h.give_up);
    }

    /// The stream ended: what is held is the newest there is.
    pub(crate) fn release_all(&mut self) {
        self.release(|_| true);
    }

    /// When [`CatchUp::tick`] may release something, if anything is held.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let give_up = self.held.iter().map(|h| h.give_up).min()?;
        Some(give_up.min(self.last_event + CATCH_UP_IDLE))
    }

    /// The next final result, in the order they became final.
    pub(crate) fn pop(&mut self) -> Option<ResultEvent> {
        self.settled.pop_front()
    }

    /// Every job waited for has a final result, and it was taken.
    pub(crate) fn is_done(&self) -> bool {
        self.settled.is_empty() && self.open.as_ref().is_some_and(HashSet::is_empty)
    }

    /// The jobs without a final result yet.
    pub(crate) fn open(&self) -> impl Iterator<Item = JobId> + '_ {
        self.open.iter().flatten().copied()
    }

    fn release(&mut self, done: impl Fn(&Held) -> bool) {
        let mut i = 0;
        while i < self.held.len() {
            if done(&self.held[i]) {
                let held = self.held.remove(i);
                self.settle(held.event);
            } else {
                i += 1;
            }
        }
    }

    fn settle(&mut self, event: ResultEvent) {
        if let Some(open) = &mut self.open {
            open.remove(&event.job_id);
        }
        self.settled.push_back(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use warren_common::{Priority, TenantId};

    fn event(job: JobId, status: JobStatus, finished_at: u64) -> ResultEvent {
        ResultEvent {
            v: 1,
            job_id: job,
            tenant: TenantId::parse("acme").unwrap(),
            pipeline: "p".into(),
            priority: Priority::Normal,
            status,
            output: serde_json::Value::Null,
            step: "s".into(),
            attempts: 1,
            error: None,
            submitted_at: 0,
            finished_at,
            part_of: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(c: &mut CatchUp) -> Vec<(JobId, JobStatus)> {
        std::iter::from_fn(|| c.pop())
            .map(|e| (e.job_id, e.status))
            .collect()
    }

    #[test]
    fn a_success_is_final_at_once() {
        let (job, t0) = (JobId::new(), Instant::now());
        let mut c = CatchUp::jobs([job], t0, None);
        c.offer(event(job, JobStatus::Succeeded, 1_000), t0, 1_000);
        assert_eq!(drain(&mut c), [(job, JobStatus::Succeeded)]);
        assert!(c.is_done());
        assert_eq!(c.wake_at(), None);
    }

    #[test]
    fn a_failure_then_a_replayed_success_gives_the_success() {
        // The stream holds the old failure and, later, the replay's success
        let (job, t0) = (JobId::new(), Instant::now());
        let mut c = CatchUp::jobs([job], t0, None);
        c.offer(event(job, JobStatus::Failed, 1_000), t0, 5_000);
        assert!(c.pop().is_none(), "a failure is not final yet");
        assert!(!c.is_done());
        c.offer(event(job, JobStatus::Succeeded, 4_000), t0 + ms(1), 5_001);
        assert_eq!(drain(&mut c), [(job, JobStatus::Succeeded)]);
        assert!(c.is_done());
    }

    #[test]
    fn a_failure_is_final_once_a_later_event_shows_the_reader_caught_up() {
        let (job, other, t0) = (JobId::new(), JobId::new(), Instant::now());
        let mut c = CatchUp::jobs([job], t0, None);
        c.offer(event(job, JobStatus::Failed, 1_000), t0, 5_000);
        // An older event of another job: still catching up
        c.offer(event(other, JobStatus::Succeeded, 4_999), t0 + ms(1), 5_001);
        assert!(c.pop().is_none());
        // One that finished after the failure was read: caught up
        c.offer(event(other, JobStatus::Succeeded, 5_002), t0 + ms(2), 5_002);
        assert_eq!(drain(&mut c), [(job, JobStatus::Failed)]);
        assert!(c.is_done());
    }

    #[test]
    fn a_failure_is_final_when_the_stream_goes_quiet_or_after_the_longest_catch_up() {
        let (job, other, t0) = (JobId::new(), JobId::new(), Instant::now());
        let mut c = CatchUp::jobs([job], t0, None);
        c.offer(event(job, JobStatus::Failed, 1_000), t0, 5_000);
        assert_eq!(c.wake_at(), Some(t0 + CATCH_UP_IDLE));
        c.tick(t0 + CATCH_UP_IDLE - ms(1));
        assert!(c.pop().is_none());
        c.tick(t0 + CATCH_UP_IDLE);
        assert_eq!(drain(&mut c), [(job, JobStatus::Failed)]);

        // A busy stream of older events never goes quiet: the catch-up ends at CATCH_UP_MAX
        let mut c = CatchUp::jobs([job], t0, None);
        c.offer(event(job, JobStatus::Failed, 1_000), t0, 5_000);
        let mut now = t0;
        while now < t0 + CATCH_UP_MAX {
            assert!(c.pop().is_none());
            now += ms(100);
            c.offer(event(other, JobStatus::Succeeded, 10), now, 5_000);
            c.tick(now);
        }
        assert_eq!(drain(&mut c), [(job, JobStatus::Failed)]);
    }

    #[test]
    fn a_catch_up_ends_before_the_callers_deadline() {
        let (job, t0) = (JobId::new(), Instant::now());
        let latest = t0 + ms(100);
        let mut c = CatchUp::jobs([job], t0, Some(latest));
        c.offer(event(job, JobStatus::Failed, 1_000), t0, 5_000);
        assert_eq!(c.wake_at(), Some(latest));
        c.tick(latest);
        assert_eq!(drain(&mut c), [(job, JobStatus::Failed)]);
    }

    #[test]
    fn other_jobs_and_repeats_are_ignored_and_the_open_jobs_are_known() {
        let (a, b, stranger, t0) = (JobId::new(), JobId::new(), JobId::new(), Instant::now());
        let mut c = CatchUp::jobs([a, b], t0, None);
        c.offer(event(stranger, JobStatus::Succeeded, 1), t0, 1);
        c.offer(event(a, JobStatus::Succeeded, 1), t0, 1);
        c.offer(event(a, JobStatus::Succeeded, 2), t0, 2);
        assert_eq!(drain(&mut c), [(a, JobStatus::Succeeded)]);
        assert_eq!(c.open().collect::<Vec<_>>(), [b]);
        assert!(!c.is_done());
    }

    #[test]
    fn every_job_counts_when_waiting_with_no_end() {
        let (a, b, t0) = (JobId::new(), JobId::new(), Instant::now());
        let mut c = CatchUp::every(t0);
        c.offer(event(a, JobStatus::Succeeded, 1), t0, 1);
        c.offer(event(b, JobStatus::Failed, 2), t0, 10);
        assert_eq!(drain(&mut c), [(a, JobStatus::Succeeded)]);
        c.release_all();
        assert_eq!(drain(&mut c), [(b, JobStatus::Failed)]);
        assert!(!c.is_done(), "a wait for every job never ends");
        assert_eq!(c.open().count(), 0);
    }

    /// What a job's events look like in the stream: failures, maybe a success at the end.
    fn history() -> impl Strategy<Value = Vec<JobStatus>> {
        (0usize..4, any::<bool>()).prop_map(|(failures, success)| {
            let mut h = vec![JobStatus::Failed; failures];
            if success {
                h.push(JobStatus::Succeeded);
            }
            h
        })
    }

    proptest! {
        /// However the jobs' events interleave and however the clock moves, each job gets
        /// exactly one final result, one of its own events, and the wait is over exactly when
        /// every job has one. When each job's events come in a row, that result is the job's
        /// newest: a replay's success replaces the failure before it.
        #[test]
        fn each_job_settles_once_and_on_its_newest_result_when_caught_up(
            histories in prop::collection::vec(history(), 1..5),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
            gaps in prop::collection::vec(0u64..600, 40),
            in_a_row in any::<bool>(),
        ) {
            let jobs: Vec<JobId> = histories.iter().map(|_| JobId::new()).collect();
            let t0 = Instant::now();
            let mut c = CatchUp::jobs(jobs.clone(), t0, None);
            let mut remaining: Vec<VecDeque<JobStatus>> =
                histories.iter().map(|h| h.iter().copied().collect()).collect();
            let (mut now, mut wall) = (t0, 1_000u64);
            let mut got: Vec<ResultEvent> = Vec::new();
            let mut pick = order.into_iter();
            let mut gap = gaps.into_iter().cycle();
            loop {
                let live: Vec<usize> =
                    (0..jobs.len()).filter(|i| !remaining[*i].is_empty()).collect();
                let Some(first) = live.first() else { break };
                let i = if in_a_row {
                    *first
                } else {
                    live[pick.next().map_or(0, |p| p.index(live.len()))]
                };
                let status = remaining[i].pop_front().unwrap();
                let mut step = gap.next().unwrap();
                if in_a_row {
                    // Quick enough that no catch-up ends between a job's own events.
                    step %= CATCH_UP_IDLE.as_millis() as u64;
                }
                now += ms(step);
                wall += step;
                c.tick(now);
                c.offer(event(jobs[i], status, wall), now, wall);
                got.extend(std::iter::from_fn(|| c.pop()));
            }
            c.release_all();
            got.extend(std::iter::from_fn(|| c.pop()));
            prop_assert_eq!(c.is_done(), histories.iter().all(|h| !h.is_empty()));
            for (job, history) in jobs.iter().zip(&histories) {
                let mine: Vec<&ResultEvent> = got.iter().filter(|e| e.job_id == *job).collect();
                if history.is_empty() {
                    prop_assert!(mine.is_empty());
                    continue;
                }
                prop_assert_eq!(mine.len(), 1, "job settled {} times", mine.len());
                prop_assert!(history.contains(&mine[0].status));
                if in_a_row {
                    prop_assert_eq!(mine[0].status, *history.last().unwrap());
                }
            }
        }
    }
}
