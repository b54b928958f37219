//! What the results check holds and decides, without effects: the deliveries taken from the
//! check queue (unacked, in delivery order; each a batch of result events), which of them are
//! due to be looked for, and, given what the results stream was seen to hold, which events to
//! write again and how far to ack.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use warren_common::{JobId, ResultEvent};

/// A result event's identity. A step run again (a rerun, a replay) writes another event, with
/// a later `finished_at`; a publish sent again writes the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct EventKey {
    pub(crate) job: JobId,
    pub(crate) finished_at: u64,
}

impl EventKey {
    pub(crate) fn of(event: &ResultEvent) -> Self {
        Self {
            job: event.job_id,
            finished_at: event.finished_at,
        }
    }
}

/// One delivery from the check queue.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    pub(crate) tag: u64,
    /// Its result events, each with its encoding; none for a body that holds no result event
    /// (nothing to look for: acked with the rest).
    pub(crate) events: Vec<(EventKey, Vec<u8>)>,
    pub(crate) received: Instant,
}

/// The events to look for now: the oldest `count` taken, finished between `from_ms` and
/// `to_ms` (by their workers' clocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) count: usize,
    pub(crate) keys: HashSet<EventKey>,
    pub(crate) from_ms: u64,
    pub(crate) to_ms: u64,
}

/// What to do about a due batch once the stream was read.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Events the stream does not hold, encoded: to be written to it again (confirmed) before
    /// the ack.
    pub(crate) missing: Vec<(EventKey, Vec<u8>)>,
    /// Ack every delivery up to this tag (`multiple`).
    pub(crate) ack_through: Option<u64>,
}

/// The deliveries taken and not yet acked, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    taken: VecDeque<Taken>,
}

impl Ledger {
    pub(crate) fn take(&mut self, taken: Taken) {
        self.taken.push_back(taken);
    }

    pub(crate) fn len(&self) -> usize {
        self.taken.len()
    }

    /// The oldest deliveries received at least `after` before `now` (a prefix: the queue hands
    /// them out in order), or `None` when none is.
    pub(crate) fn due(&self, now: Instant, after: Duration) -> Option<Due> {
        let count = self
            .taken
            .iter()
            .take_while(|t| now.saturating_duration_since(t.received) >= after)
            .count();
        if count == 0 {
            return None;
        }
        let keys: HashSet<EventKey> = self
            .taken
            .iter()
            .take(count)
            .flat_map(|t| t.events.iter().map(|(key, _)| *key))
            .collect();
        let times = || keys.iter().map(|k| k.finished_at);
        Some(Due {
            count,
            from_ms: times().min().unwrap_or(0),
            to_ms: times().max().unwrap_or(0),
            keys,
        })
    }

    /// Removes the due batch: the events of it that `unseen` still names are missing from the
    /// stream (each once, however often it was delivered), the rest are done.
    pub(crate) fn settle(&mut self, due: &Due, unseen: &HashSet<EventKey>) -> Settled {
        let mut settled = Settled::default();
        let mut named = HashSet::new();
        for taken in self.taken.drain(..due.count) {
            settled.ack_through = Some(taken.tag);
            for (key, body) in taken.events {
                if unseen.contains(&key) && named.insert(key) {
                    settled.missing.push((key, body));
                }
            }
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn taken(tag: u64, job: JobId, finished_at: u64, received: Instant) -> Taken {
        Taken {
            tag,
            events: vec![(EventKey { job, finished_at }, vec![tag as u8])],
            received,
        }
    }

    #[test]
    fn only_events_old_enough_are_due_and_settling_them_names_the_missing() {
        let start = Instant::now();
        let after = Duration::from_secs(15);
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        let mut ledger = Ledger::default();
        ledger.take(taken(1, a, 1_000, start));
        ledger.take(taken(2, b, 1_500, start + Duration::from_secs(1)));
        ledger.take(taken(3, c, 9_000, start + Duration::from_secs(10)));
        assert_eq!(ledger.due(start + Duration::from_secs(14), after), None);

        let due = ledger.due(start + Duration::from_secs(16), after).unwrap();
        assert_eq!((due.count, due.from_ms, due.to_ms), (2, 1_000, 1_500));
        let unseen: HashSet<_> = [EventKey {
            job: b,
            finished_at: 1_500,
        }]
        .into();
        let settled = ledger.settle(&due, &unseen);
        assert_eq!(settled.ack_through, Some(2));
        assert_eq!(settled.missing.len(), 1);
        assert_eq!(settled.missing[0].1, vec![2]);
        assert_eq!(ledger.len(), 1, "the younger event waits");
    }

    #[test]
    fn a_body_that_is_no_result_is_acked_with_the_rest() {
        let start = Instant::now();
        let mut ledger = Ledger::default();
        ledger.take(Taken {
            tag: 7,
            events: vec![],
            received: start,
        });
        let due = ledger.due(start, Duration::ZERO).unwrap();
        assert!(due.keys.is_empty());
        let settled = ledger.settle(&due, &HashSet::new());
        assert_eq!(settled.ack_through, Some(7));
        assert!(settled.missing.is_empty());
    }

    proptest! {
        /// Whatever arrives, in batches of any size, and whatever the stream lost: every due
        /// delivery is acked, each lost event is written again exactly once, and nothing seen is
        /// written again.
        #[test]
        fn every_due_delivery_is_acked_and_each_lost_event_written_once(
            batches in prop::collection::vec(
                (prop::collection::vec((0u8..20, 0u64..5, any::<bool>()), 0..4), 0u64..30),
                1..40,
            ),
            after in 0u64..30,
        ) {
            let start = Instant::now();
            let jobs: Vec<JobId> = (0..20).map(|_| JobId::new()).collect();
            let mut ledger = Ledger::default();
            let mut lost = HashSet::new();
            let mut received_at = 0;
            for (tag, (events, gap)) in batches.iter().enumerate() {
                received_at += gap;
                let events = events
                    .iter()
                    .map(|(job, finished, is_lost)| {
                        let key = EventKey { job: jobs[*job as usize], finished_at: *finished };
                        if *is_lost {
                            lost.insert(key);
                        }
                        (key, vec![])
                    })
                    .collect();
                ledger.take(Taken {
                    tag: tag as u64 + 1,
                    events,
                    received: start + Duration::from_secs(received_at),
                });
            }
            let now = start + Duration::from_secs(received_at);
            let before = ledger.len();
            match ledger.due(now, Duration::from_secs(after)) {
                None => prop_assert_eq!(ledger.len(), before),
                Some(due) => {
                    let unseen: HashSet<_> = due.keys.intersection(&lost).copied().collect();
                    let settled = ledger.settle(&due, &unseen);
                    prop_assert_eq!(settled.ack_through, Some(due.count as u64));
                    prop_assert_eq!(ledger.len(), before - due.count);
                    let written: Vec<_> = settled.missing.iter().map(|(k, _)| *k).collect();
                    let distinct: HashSet<_> = written.iter().copied().collect();
                    prop_assert_eq!(written.len(), distinct.len());
                    prop_assert_eq!(distinct, unseen);
                }
            }
        }
    }
}
