//! The fan-in coordinator's checkpoint, the pure part: what it holds, how it is read (this
//! format and the first one), and how a new coordinator gets from it back to the whole fold.
//!
//! The first format held the fold itself: every open fan-out's opened record (all its parts)
//! and every ended part's result, about 1.3 MiB for 10,000 parts, written every 2 s. This one
//! holds, per open fan-out, where its opened record is in the fan-in stream, two counters and
//! two compact sets of part indexes (ended, succeeded): a few dozen bytes when the parts end
//! roughly in order, at most one bit per part per set otherwise. The parts' specs and outputs
//! stay where they already are, in the fan-in stream: a resuming coordinator reads them back
//! from the oldest open fan-out's opened record up to the checkpoint's offset ([`Resume`]),
//! then folds on as before. The checkpoint's sets are the authority for what had ended, so the
//! join input a successor builds is the one its predecessor would have built.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bin::Bin;
use crate::envelope::JobStatus;
use crate::fanout::{part_job_id, Fold, Opened, PartEnd, PartOf, Run};
use crate::JobId;

/// The version field of this checkpoint format (the first format had none).
pub const CHECKPOINT_VERSION: u32 = 2;

/// The error of a part whose result the fan-in stream no longer holds (its retention dropped
/// it before the join); its status is still known from the checkpoint.
pub const OUTPUT_GONE: &str = "the part's result is no longer in the fan-in stream";

/// A set of part indexes, kept as sorted, disjoint, non-touching ranges: parts end roughly in
/// order, so a set is a handful of ranges. On the wire it takes the smaller of that form and a
/// bitmap (one bit per part up to the highest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SetWire", from = "SetWire")]
pub struct PartSet {
    /// Half-open `[start, end)` ranges.
    ranges: Vec<(u32, u32)>,
}

impl PartSet {
    /// Adds `i`; `false` when it was there.
    pub fn insert(&mut self, i: u32) -> bool {
        // The first range that ends at or after i.
        let at = self.ranges.partition_point(|&(_, end)| end < i);
        if let Some(&(start, end)) = self.ranges.get(at) {
            if start <= i && i < end {
                return false;
            }
            if end == i {
                // Extends this range at its end, and joins the next when they touch.
                self.ranges[at].1 = i + 1;
                if self.ranges.get(at + 1).is_some_and(|next| next.0 == i + 1) {
                    self.ranges[at].1 = self.ranges[at + 1].1;
                    self.ranges.remove(at + 1);
                }
                return true;
            }
            if start == i + 1 {
                self.ranges[at].0 = i;
                return true;
            }
        }
        self.ranges.insert(at, (i, i + 1));
        true
    }

    pub fn contains(&self, i: u32) -> bool {
        let at = self.ranges.partition_point(|&(_, end)| end <= i);
        self.ranges.get(at).is_some_and(|&(start, _)| start <= i)
    }

    pub fn len(&self) -> u32 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(s, e)| s..e)
    }
}

impl FromIterator<u32> for PartSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = PartSet::default();
        for i in iter {
            set.insert(i);
        }
        set
    }
}

/// A [`PartSet`] on the wire: `r` (ranges) or `b` (a bitmap, bit `i % 8` of byte `i / 8`).
#[derive(Serialize, Deserialize)]
struct SetWire {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    r: Vec<(u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<Bin>,
}

impl From<PartSet> for SetWire {
    fn from(set: PartSet) -> Self {
        let top = set.ranges.last().map_or(0, |r| r.1);
        let bitmap_len = top.div_ceil(8) as usize;
        // A range costs up to 11 bytes of MessagePack (two u32 and an array header).
        if set.ranges.len() * 11 <= bitmap_len {
            return SetWire {
                r: set.ranges,
                b: None,
            };
        }
        let mut bits = vec![0u8; bitmap_len];
        for i in set.iter() {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
        SetWire {
            r: Vec::new(),
            b: Some(Bin(bits)),
        }
    }
}

impl From<SetWire> for PartSet {
    fn from(wire: SetWire) -> Self {
        let mut set = PartSet::default();
        for (start, end) in wire.r {
            for i in start..end {
                set.insert(i);
            }
        }
        for (byte_index, byte) in wire.b.map(|b| b.0).unwrap_or_default().iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.insert(byte_index as u32 * 8 + bit);
                }
            }
        }
        set
    }
}

/// One open fan-out in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub parent: JobId,
    /// Where its opened record is in the fan-in stream (or before it).
    pub opened_offset: u64,
    pub total: u32,
    /// Parts published so far: 0..released.
    pub released: u32,
    pub ended: PartSet,
    pub succeeded: PartSet,
}

/// The coordinator's checkpoint: where it read the fan-in stream to, and its open fan-outs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub v: u32,
    /// The fan-in stream offset to read from next.
    pub next_offset: u64,
    pub runs: Vec<Mark>,
}

impl Checkpoint {
    /// The checkpoint of `fold`.
    pub fn of(fold: &Fold) -> Self {
        let runs = fold
            .runs
            .values()
            .map(|run| Mark {
                parent: run.opened.parent,
                opened_offset: run.opened_offset,
                total: run.opened.total(),
                released: run.released,
                ended: run.ended.keys().copied().collect(),
                succeeded: run
                    .ended
                    .iter()
                    .filter(|(_, e)| e.status == JobStatus::Succeeded)
                    .map(|(i, _)| *i)
                    .collect(),
            })
            .collect();
        Self {
            v: CHECKPOINT_VERSION,
            next_offset: fold.next_offset,
            runs,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a checkpoint encodes")
    }
}

/// A checkpoint as read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Restored {
    /// This format: the fold is rebuilt by a [`Resume`].
    Marks(Checkpoint),
    /// The first format: the whole fold.
    Full(Fold),
}

impl Restored {
    /// Reads either format; `None` when neither reads (then the coordinator refolds the whole
    /// stream, which is slower, never wrong).
    pub fn read(body: &[u8]) -> Option<Self> {
        if let Ok(checkpoint) = rmp_serde::from_slice::<Checkpoint>(body) {
            return Some(Restored::Marks(checkpoint));
        }
        rmp_serde::from_slice::<Fold>(body).ok().map(Restored::Full)
    }
}

/// A coordinator getting back from a [`Checkpoint`] to its fold: feed it the fan-in stream's
/// records from [`Resume::from_offset`] on, up to (not including) [`Resume::until`]; those
/// records were folded and carried out before, so nothing they imply is done again. Then
/// [`Resume::finish`] gives the fold to go on with.
#[derive(Debug)]
pub struct Resume {
    marks: BTreeMap<JobId, Mark>,
    fold: Fold,
}

impl Resume {
    pub fn new(checkpoint: Checkpoint) -> Self {
        let fold = Fold {
            runs: BTreeMap::new(),
            next_offset: checkpoint.next_offset,
        };
        let marks = checkpoint.runs.into_iter().map(|m| (m.parent, m)).collect();
        Self { marks, fold }
    }

    /// Where to start reading: the oldest open fan-out's opened record. `None`: nothing to
    /// read back.
    pub fn from_offset(&self) -> Option<u64> {
        let from = self.marks.values().map(|m| m.opened_offset).min()?;
        (from < self.until()).then_some(from)
    }

    /// How many fan-outs the checkpoint had open.
    pub fn open_fan_outs(&self) -> usize {
        self.marks.len()
    }

    /// The checkpoint's offset: records from here on are new.
    pub fn until(&self) -> u64 {
        self.fold.next_offset
    }

    /// Whether the record at `offset` is the last to read back.
    pub fn is_last(&self, offset: u64) -> bool {
        offset + 1 >= self.until()
    }

    /// An opened record read back.
    pub fn opened(&mut self, opened: Opened, offset: u64) {
        if offset < self.until() && self.marks.contains_key(&opened.parent) {
            let _ = self.fold.open_at(opened, offset);
        }
    }

    /// A part's end read back.
    pub fn ended(&mut self, part_of: PartOf, end: PartEnd, offset: u64) {
        if offset < self.until() && self.marks.contains_key(&part_of.job_id) {
            let _ = self.fold.end(part_of, end);
        }
    }

    /// The fold to go on with, and the fan-outs whose opened record was not found (the
    /// stream's retention dropped it): they cannot join, and are left out.
    pub fn finish(self) -> (Fold, Vec<JobId>) {
        let Resume { marks, mut fold } = self;
        let mut lost = Vec::new();
        for (parent, mark) in marks {
            let Some(run) = fold.runs.get_mut(&parent) else {
                lost.push(parent);
                continue;
            };
            settle(run, &mark);
        }
        (fold, lost)
    }
}

/// Makes `run` say what `mark` says: the checkpoint is the authority on which parts had ended
/// and how. What the replay found agrees with it unless the stream lost records; a part whose
/// result is gone keeps its status, with no output.
fn settle(run: &mut Run, mark: &Mark) {
    run.released = mark.released.min(run.opened.total());
    run.ended.retain(|i, _| mark.ended.contains(*i));
    for i in mark.ended.iter() {
        let ok = mark.succeeded.contains(i);
        let agrees = run
            .ended
            .get(&i)
            .is_some_and(|e| (e.status == JobStatus::Succeeded) == ok);
        if agrees || i >= run.opened.total() {
            continue;
        }
        let tenant = run.opened.parts[i as usize].tenant.clone();
        run.ended.insert(
            i,
            PartEnd {
                job_id: part_job_id(run.opened.parent, i),
                tenant,
                status: if ok {
                    JobStatus::Succeeded
                } else {
                    JobStatus::Failed
                },
                output: Value::Null,
                error: Some(OUTPUT_GONE.to_string()),
            },
        );
    }
}

#[cfg(test)]
mod tests;
