use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::config::OnPartFailure;
use crate::envelope::Envelope;
use crate::fanout::{Effect, PartSpec};
use crate::Priority;

fn opened(total: u32, policy: OnPartFailure, window: Option<u32>) -> Opened {
    let env = Envelope::new_job(
        JobId::new(),
        "acme".parse().unwrap(),
        "nightly",
        "plan",
        Priority::Normal,
        json!({"day": 1}),
    );
    let parts = (0..total)
        .map(|i| PartSpec {
            tenant: format!("t{}", i % 7).parse().unwrap(),
            priority: Priority::Normal,
            payload: json!(i),
        })
        .collect();
    Opened::new(&env, "notify", "part", parts, policy, window)
}

fn end(opened: &Opened, i: u32, ok: bool) -> (PartOf, PartEnd) {
    let part_of = PartOf {
        job_id: opened.parent,
        part: i,
        total: opened.total(),
    };
    let end = PartEnd {
        job_id: part_job_id(opened.parent, i),
        tenant: opened.parts[i as usize].tenant.clone(),
        status: if ok {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        },
        output: if ok { json!({"n": i}) } else { Value::Null },
        error: (!ok).then(|| "boom".to_string()),
    };
    (part_of, end)
}

#[test]
fn a_part_set_merges_ranges_and_picks_the_smaller_wire_form() {
    let mut set = PartSet::default();
    for i in [5, 3, 4, 9, 7, 8, 0] {
        assert!(set.insert(i));
    }
    assert!(!set.insert(4));
    assert_eq!(set.ranges, vec![(0, 1), (3, 6), (7, 10)]);
    assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 3, 4, 5, 7, 8, 9]);
    assert!(set.contains(3) && set.contains(9) && !set.contains(6) && !set.contains(10));
    set.insert(6);
    set.insert(1);
    set.insert(2);
    assert_eq!(set.ranges, vec![(0, 10)]);
    assert_eq!(set.len(), 10);

    // In order: one range on the wire, whatever the count.
    let all: PartSet = (0..10_000).collect();
    let bytes = rmp_serde::to_vec_named(&all).unwrap();
    assert!(bytes.len() < 16, "{} bytes", bytes.len());
    // Every other part: a bitmap, one bit per part.
    let odd: PartSet = (0..10_000).filter(|i| i % 2 == 1).collect();
    let bytes = rmp_serde::to_vec_named(&odd).unwrap();
    assert!(bytes.len() <= 1_260, "{} bytes", bytes.len());
    for set in [all, odd, PartSet::default()] {
        let back: PartSet = rmp_serde::from_slice(&rmp_serde::to_vec_named(&set).unwrap()).unwrap();
        assert_eq!(back, set);
    }
}

#[test]
fn a_checkpoint_of_ten_thousand_parts_is_small() {
    let opened = opened(10_000, OnPartFailure::Continue, None);
    let mut fold = Fold::default();
    fold.open_at(opened.clone(), 7);
    // All but the last part ended, in order but for a few stragglers, one failed.
    for i in 0..9_999 {
        let (p, e) = end(&opened, i, i != 4_321);
        fold.end(p, e);
    }
    fold.next_offset = 10_007;
    let first_format = rmp_serde::to_vec_named(&fold).unwrap();
    let body = Checkpoint::of(&fold).encode();
    assert!(body.len() < 200, "{} bytes", body.len());
    assert!(first_format.len() > 300_000, "{} bytes", first_format.len());
    assert_eq!(
        Restored::read(&body),
        Some(Restored::Marks(Checkpoint::of(&fold)))
    );
}

#[test]
fn the_first_format_is_still_read() {
    let opened = opened(3, OnPartFailure::Continue, None);
    let mut fold = Fold::default();
    fold.open(opened.clone());
    let (p, e) = end(&opened, 1, true);
    fold.end(p, e);
    fold.next_offset = 12;
    // The first format: the fold as it was, with no `opened_offset` on a run.
    #[derive(Serialize)]
    struct OldRun<'a> {
        opened: &'a Opened,
        ended: &'a BTreeMap<u32, PartEnd>,
        released: u32,
    }
    #[derive(Serialize)]
    struct OldFold<'a> {
        runs: BTreeMap<JobId, OldRun<'a>>,
        next_offset: u64,
    }
    let old = OldFold {
        runs: fold
            .runs
            .iter()
            .map(|(id, run)| {
                let run = OldRun {
                    opened: &run.opened,
                    ended: &run.ended,
                    released: run.released,
                };
                (*id, run)
            })
            .collect(),
        next_offset: fold.next_offset,
    };
    let body = rmp_serde::to_vec_named(&old).unwrap();
    assert_eq!(Restored::read(&body), Some(Restored::Full(fold)));
    assert_eq!(Restored::read(b"\xc1junk"), None);
}

#[test]
fn a_part_whose_result_is_gone_keeps_its_status() {
    let opened = opened(3, OnPartFailure::Continue, None);
    let mut fold = Fold::default();
    fold.open_at(opened.clone(), 0);
    for i in 0..2 {
        let (p, e) = end(&opened, i, true);
        fold.end(p, e);
    }
    fold.next_offset = 3;
    let mut resume = Resume::new(Checkpoint::of(&fold));
    assert_eq!(resume.from_offset(), Some(0));
    // Retention dropped part 0's result: only the record and part 1's are read back.
    resume.opened(opened.clone(), 0);
    let (p, e) = end(&opened, 1, true);
    resume.ended(p, e, 2);
    let (back, lost) = resume.finish();
    assert!(lost.is_empty());
    let run = &back.runs[&opened.parent];
    assert_eq!(run.ended[&0].status, JobStatus::Succeeded);
    assert_eq!(run.ended[&0].error.as_deref(), Some(OUTPUT_GONE));
    assert_eq!(run.ended[&1], fold.runs[&opened.parent].ended[&1]);
    // A fan-out whose record is gone cannot join.
    let resume = Resume::new(Checkpoint::of(&fold));
    assert_eq!(resume.finish().1, vec![opened.parent]);
}

/// A fan-in stream: the records of `fans` fan-outs, each part's outcome delivered one or more
/// times, interleaved in any order after its fan-out's record.
#[derive(Debug, Clone)]
enum Record {
    Opened(Box<Opened>),
    End(PartOf, PartEnd),
}

fn stream() -> impl Strategy<Value = Vec<Record>> {
    let fan = (1u32..25, proptest::option::of(1u32..6), any::<bool>()).prop_flat_map(
        |(total, window, wait)| {
            let n = total as usize;
            (
                proptest::collection::vec(any::<bool>(), n),
                proptest::collection::vec(1usize..3, n),
            )
                .prop_map(move |(oks, repeats)| {
                    let policy = if wait {
                        OnPartFailure::Wait
                    } else {
                        OnPartFailure::Continue
                    };
                    let opened = opened(total, policy, window);
                    let mut ends = Vec::new();
                    for (i, ok) in oks.iter().enumerate() {
                        for r in 0..repeats[i] {
                            // A retried failure may succeed later (a DLQ replay).
                            let (p, e) = end(&opened, i as u32, *ok || r > 0);
                            ends.push(Record::End(p, e));
                        }
                    }
                    (opened, ends)
                })
        },
    );
    (proptest::collection::vec(fan, 1..3), any::<u64>()).prop_map(|(fans, seed)| {
        let mut records: Vec<Record> = Vec::new();
        let mut state = seed | 1;
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for (opened, ends) in fans {
            let at = rand(records.len() + 1);
            records.insert(at, Record::Opened(Box::new(opened)));
            // Each end anywhere after its record.
            for e in ends {
                let after = records
                    .iter()
                    .position(|r| matches!(r, Record::Opened(o) if o.parent == parent_of(&e)))
                    .unwrap();
                let at = after + 1 + rand(records.len() - after);
                records.insert(at, e);
            }
        }
        records
    })
}

fn parent_of(record: &Record) -> JobId {
    match record {
        Record::Opened(o) => o.parent,
        Record::End(p, _) => p.job_id,
    }
}

/// A leader's fold of `records[from..]`, checkpointing after each record whose index is in
/// `checkpoints` (and at once after a join, as the coordinator does), until it is killed
/// before record `kill`. Returns the joins it published, with their inputs, and its last
/// checkpoint's bytes.
fn lead(
    mut fold: Fold,
    records: &[Record],
    checkpoints: &[bool],
    kill: usize,
    last: &mut Option<Vec<u8>>,
) -> Vec<(JobId, Value)> {
    let mut joins = Vec::new();
    for (offset, record) in records.iter().enumerate().take(kill) {
        let offset = offset as u64;
        if offset < fold.next_offset {
            continue;
        }
        let effects = match record {
            Record::Opened(o) => fold.open_at((**o).clone(), offset),
            Record::End(p, e) => fold.end(*p, e.clone()),
        };
        fold.next_offset = offset + 1;
        let mut joined = false;
        for effect in effects {
            if let Effect::Join { parent } = effect {
                let run = fold.close(parent).unwrap();
                joins.push((parent, run.join_input(1 << 20)));
                joined = true;
            }
        }
        if joined || checkpoints[offset as usize] {
            *last = Some(Checkpoint::of(&fold).encode());
        }
    }
    joins
}

/// What a new leader starts from: the last checkpoint read back through a [`Resume`].
fn resume(last: Option<&[u8]>, records: &[Record]) -> Fold {
    let Some(Restored::Marks(checkpoint)) = last.and_then(Restored::read) else {
        return Fold::default();
    };
    let mut resume = Resume::new(checkpoint);
    if let Some(from) = resume.from_offset() {
        for (offset, record) in records.iter().enumerate().skip(from as usize) {
            let offset = offset as u64;
            match record {
                Record::Opened(o) => resume.opened((**o).clone(), offset),
                Record::End(p, e) => resume.ended(*p, e.clone(), offset),
            }
            if resume.is_last(offset) {
                break;
            }
        }
    }
    let (fold, lost) = resume.finish();
    assert!(lost.is_empty());
    fold
}

proptest! {
    #[test]
    fn a_leader_killed_anywhere_is_succeeded_by_one_that_joins_the_same(
        records in stream(),
        marks in proptest::collection::vec(any::<bool>(), 200),
        kill in any::<prop::sample::Index>(),
    ) {
        let checkpoints: Vec<bool> = (0..records.len()).map(|i| marks[i % marks.len()]).collect();
        // The run nobody kills.
        let mut unused = None;
        let whole = lead(Fold::default(), &records, &checkpoints, records.len(), &mut unused);

        // A leader killed before record `kill`; a successor from its last checkpoint.
        let kill = kill.index(records.len() + 1);
        let mut last = None;
        let first = lead(Fold::default(), &records, &checkpoints, kill, &mut last);
        let checkpointed = last.clone();
        let fold = resume(checkpointed.as_deref(), &records);
        let second = lead(fold, &records, &checkpoints, records.len(), &mut last);

        // Every join of the whole run happens, with the same input; the successor makes each
        // at most once, and none its predecessor had checkpointed.
        for (parent, input) in &whole {
            let seen: Vec<&Value> = first.iter().chain(&second)
                .filter(|(p, _)| p == parent).map(|(_, i)| i).collect();
            prop_assert!(!seen.is_empty(), "the join of {} never ran", parent);
            for i in &seen {
                prop_assert_eq!(*i, input);
            }
            prop_assert!(second.iter().filter(|(p, _)| p == parent).count() <= 1);
            // The predecessor's join was checkpointed at once: never repeated.
            if first.iter().any(|(p, _)| p == parent) {
                prop_assert!(second.iter().all(|(p, _)| p != parent));
            }
        }
        prop_assert_eq!(first.len() + second.len(), whole.len());
    }
}

proptest! {
    #[test]
    fn a_part_set_is_a_set_on_the_wire_too(items in proptest::collection::vec(0u32..300, 0..200)) {
        let mut set = PartSet::default();
        let mut model = std::collections::BTreeSet::new();
        for i in &items {
            prop_assert_eq!(set.insert(*i), model.insert(*i));
        }
        prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        prop_assert_eq!(set.len() as usize, model.len());
        for i in 0..300 {
            prop_assert_eq!(set.contains(i), model.contains(&i));
        }
        let back: PartSet = rmp_serde::from_slice(&rmp_serde::to_vec_named(&set).unwrap()).unwrap();
        prop_assert_eq!(back, set);
    }
}
