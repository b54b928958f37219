//! The schedules' ledger: what the `{ns}.sched` stream records (fired slots, pauses, resumes,
//! states) and the fold of those records into each schedule's state. Pure; the reader
//! (`reader.rs`) feeds it.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use warren_common::JobId;

/// How a slot was fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FireKind {
    /// By the tick holder, at or after its slot.
    Scheduled,
    /// Not fired because the previous fire still ran (`overlap = "skip"`).
    Skipped,
    /// The first sight of a schedule: where its slots start; nothing fired.
    Baseline,
    /// `warren schedules trigger`.
    Trigger,
    /// `warren schedules backfill`.
    Backfill,
}

impl FireKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FireKind::Scheduled => "scheduled",
            FireKind::Skipped => "skipped",
            FireKind::Baseline => "baseline",
            FireKind::Trigger => "trigger",
            FireKind::Backfill => "backfill",
        }
    }

    /// Whether the record moves the schedule's last slot (manual fires do not: the schedule's
    /// own slots still fire).
    fn advances(self) -> bool {
        matches!(
            self,
            FireKind::Scheduled | FireKind::Skipped | FireKind::Baseline
        )
    }
}

/// One entry of the ledger stream (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Fired {
        schedule: String,
        slot_ms: u64,
        how: FireKind,
        jobs: Vec<JobId>,
        /// Who wrote it (host and process id) and when.
        by: String,
        at_ms: u64,
    },
    Paused {
        schedule: String,
        by: String,
        at_ms: u64,
    },
    Resumed {
        schedule: String,
        by: String,
        at_ms: u64,
    },
    /// A schedule's state written again, so it outlives the stream's retention.
    State {
        schedule: String,
        last_slot_ms: Option<u64>,
        paused: bool,
        at_ms: u64,
    },
    /// A reader's marker: once it reads its own, it has read everything written before.
    Sync { nonce: String },
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serialises")
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The last fire of a schedule, of any kind but skipped and baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastFire {
    pub slot_ms: u64,
    pub how: FireKind,
    pub jobs: Vec<JobId>,
    pub at_ms: u64,
}

/// One schedule as the ledger knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleState {
    /// The newest of its own slots fired (or skipped, or its baseline).
    pub last_slot_ms: Option<u64>,
    /// The jobs that ran last, for `overlap = "skip"` and for `warren schedules`.
    pub last_fire: Option<LastFire>,
    pub paused: bool,
    /// Slots fired more than once: a fail-over between a fire and its record.
    pub repeats: u64,
}

/// Every schedule's state, folded from the records in stream order.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub schedules: HashMap<String, ScheduleState>,
    /// Sync markers read so far.
    synced: HashSet<String>,
}

impl Ledger {
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Fired {
                schedule,
                slot_ms,
                how,
                jobs,
                at_ms,
                ..
            } => {
                let state = self.schedules.entry(schedule).or_default();
                if how.advances() {
                    if state.last_slot_ms.is_some_and(|last| slot_ms <= last)
                        && how == FireKind::Scheduled
                    {
                        state.repeats += 1;
                    }
                    state.last_slot_ms = state.last_slot_ms.max(Some(slot_ms));
                }
                if !matches!(how, FireKind::Skipped | FireKind::Baseline) {
                    state.last_fire = Some(LastFire {
                        slot_ms,
                        how,
                        jobs,
                        at_ms,
                    });
                }
            }
            Record::Paused { schedule, .. } => {
                self.schedules.entry(schedule).or_default().paused = true;
            }
            Record::Resumed { schedule, .. } => {
                self.schedules.entry(schedule).or_default().paused = false;
            }
            Record::State {
                schedule,
                last_slot_ms,
                paused,
                ..
            } => {
                let state = self.schedules.entry(schedule).or_default();
                state.last_slot_ms = state.last_slot_ms.max(last_slot_ms);
                state.paused = paused;
            }
            Record::Sync { nonce } => {
                self.synced.insert(nonce);
            }
        }
    }

    pub fn state(&self, schedule: &str) -> ScheduleState {
        self.schedules.get(schedule).cloned().unwrap_or_default()
    }

    pub(crate) fn has_synced(&self, nonce: &str) -> bool {
        self.synced.contains(nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(slot_ms: u64, how: FireKind) -> Record {
        Record::Fired {
            schedule: "s".into(),
            slot_ms,
            how,
            jobs: vec![JobId::for_slot("s", slot_ms, "t")],
            by: "h:1".into(),
            at_ms: slot_ms,
        }
    }

    #[test]
    fn records_round_trip_and_fold_in_order() {
        let mut ledger = Ledger::default();
        for record in [
            fired(1000, FireKind::Baseline),
            fired(2000, FireKind::Scheduled),
            fired(9000, FireKind::Trigger),
            fired(3000, FireKind::Skipped),
            fired(2000, FireKind::Scheduled),
            Record::Paused {
                schedule: "s".into(),
                by: "cli".into(),
                at_ms: 1,
            },
        ] {
            let bytes = record.encode();
            ledger.apply(Record::decode(&bytes).unwrap());
        }
        let state = ledger.state("s");
        assert_eq!(state.last_slot_ms, Some(3000), "a trigger does not move it");
        assert!(state.paused);
        assert_eq!(state.repeats, 1);
        assert_eq!(state.last_fire.unwrap().slot_ms, 2000);
        ledger.apply(Record::Resumed {
            schedule: "s".into(),
            by: "cli".into(),
            at_ms: 2,
        });
        assert!(!ledger.state("s").paused);
        assert!(Record::decode(b"{\"kind\":\"future\"}").is_none());
    }
}
