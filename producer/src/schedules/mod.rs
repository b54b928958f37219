//! Schedules (`[[schedules]]` in the config): firing their slots from whichever process holds
//! the circulating tick ([`Scheduler`], `tick.rs`), the ledger of fired slots and pauses in the
//! `{ns}.sched` stream (`ledger.rs`, `reader.rs`), and the manual actions of
//! `warren schedules` ([`trigger`], [`backfill`], [`pause`], [`resume`], [`status`]).
//! docs/ARCHITECTURE.md, "Schedules", tells the whole story.

mod actions;
mod ended;
mod fire;
mod ledger;
mod reader;
mod tick;

pub use actions::{backfill, pause, resume, status, trigger, ScheduleStatus};
pub use fire::jobs_of;
pub use ledger::{FireKind, LastFire, Ledger, Record, ScheduleState};
pub use reader::{LedgerError, LedgerReader};
pub use tick::{Scheduler, DROP_WITHIN, LATE_GRACE, TICK};

/// Who writes a record: host and process id.
pub(crate) fn writer_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}:{}", std::process::id())
}
