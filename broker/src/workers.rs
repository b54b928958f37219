//! Which workers are running. Every `warren-worker run` process sends a [`WorkerReport`] on the
//! control stream every few seconds, also when idle, and one more when it stops; a reader (the
//! console) looks back over the stream and [`live`] keeps the workers heard from recently. A
//! worker that dies stops reporting and drops out within [`MISSED`] report intervals. Nothing is
//! sent per job: the cost is one small message per worker per interval.
//!
//! Liveness compares the report's `at` (the worker's clock) with the reader's clock, so it
//! assumes clocks agree within a few seconds, as hot marks' expiries already do.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `kind` of a worker report on the control stream.
pub const WORKER_KIND: &str = "worker";

/// Version of the report format.
pub const REPORT_VERSION: u32 = 1;

/// Report intervals (`every_ms`) a worker may miss, in tenths, before it counts as gone: one lost
/// or late report is forgiven, a second is not (25 s at the default 10 s).
pub const MISSED: u64 = 25;

/// What a worker is doing, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Taking and running jobs.
    Serving,
    /// Asked to stop: takes no more jobs, lets the running ones finish.
    Draining,
    /// Gone for good (its last report).
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Serving => "serving",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// One worker process at one time. A MessagePack map with these field names
/// (`docs/wire-format.md`); unknown fields are ignored, so later versions may add some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub v: u32,
    pub kind: String,
    /// Unique per run of a worker (random), so a restarted process with the same host and pid
    /// (pid 1 in a container) is a new worker.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// When the worker started (ms since the epoch).
    pub started: u64,
    /// When this report was made (ms since the epoch).
    pub at: u64,
    /// How often it reports (ms): readers judge liveness by it.
    pub every_ms: u64,
    pub state: WorkerState,
    /// Step attempts running in it now.
    pub running: u32,
    /// Attempts it may run at once: the sum of its steps' `concurrency`.
    pub slots: u32,
    /// The steps it serves, `pipeline/step`.
    pub steps: Vec<String>,
    /// The worker's warren version.
    pub version: String,
}

impl WorkerReport {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a worker report always encodes")
    }

    /// A report, if the bytes are one (a hot mark, a lane digest or anything else is not).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        rmp_serde::from_slice::<Self>(bytes)
            .ok()
            .filter(|r| r.kind == WORKER_KIND)
    }

    /// Whether the worker still counts as running at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.state != WorkerState::Stopped
            && now_ms
                <= self
                    .at
                    .saturating_add(self.every_ms.saturating_mul(MISSED) / 10)
    }

    /// The pipelines of its steps, each once, in order.
    pub fn pipelines(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .steps
            .iter()
            .map(|s| s.split_once('/').map_or(s.as_str(), |(p, _)| p))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// The newest report of each worker, the stopped ones included (a reader keeps these and asks
/// [`live`] at the time it shows them).
pub fn newest(reports: impl IntoIterator<Item = WorkerReport>) -> Vec<WorkerReport> {
    let mut by_id: HashMap<String, WorkerReport> = HashMap::new();
    for report in reports {
        match by_id.get(&report.id) {
            Some(kept) if kept.at > report.at => {}
            _ => {
                by_id.insert(report.id.clone(), report);
            }
        }
    }
    by_id.into_values().collect()
}

/// The workers running at `now_ms`, from their reports (any order, several per worker): each
/// one's newest report, unless it said it stopped or is too old. Sorted by host, then start.
pub fn live(reports: &[WorkerReport], now_ms: u64) -> Vec<WorkerReport> {
    let mut all: Vec<WorkerReport> = newest(reports.iter().cloned())
        .into_iter()
        .filter(|r| r.is_live(now_ms))
        .collect();
    all.sort_by(|a, b| (&a.host, a.started, &a.id).cmp(&(&b.host, b.started, &b.id)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, at: u64, state: WorkerState) -> WorkerReport {
        WorkerReport {
            v: REPORT_VERSION,
            kind: WORKER_KIND.into(),
            id: id.into(),
            host: "h".into(),
            pid: 7,
            started: 1_000,
            at,
            every_ms: 10_000,
            state,
            running: 0,
            slots: 4,
            steps: vec![
                "import/load".into(),
                "import/save".into(),
                "mail/send".into(),
            ],
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_worker_is_live_until_it_misses_two_reports_or_says_it_stopped() {
        let now = 100_000;
        let reports = vec![
            // a: reported 20 s ago (missed one report): live.
            report("a", now - 20_000, WorkerState::Serving),
            report("a", now - 30_000, WorkerState::Serving),
            // b: last heard 26 s ago: gone.
            report("b", now - 26_000, WorkerState::Serving),
            // c: stopped after an earlier report: gone at once.
            report("c", now - 12_000, WorkerState::Serving),
            report("c", now - 2_000, WorkerState::Stopped),
            // d: draining, reported just now: still listed.
            report("d", now - 1_000, WorkerState::Draining),
            // e: its clock is ahead of ours: live.
            report("e", now + 3_000, WorkerState::Serving),
        ];
        let ids: Vec<String> = live(&reports, now).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "d", "e"]);
        // The newest of a's reports is the one kept.
        assert_eq!(live(&reports, now)[0].at, now - 20_000);
        // 25 s after its last report, a is gone too.
        assert!(live(&reports, now + 5_001).iter().all(|r| r.id != "a"));
    }

    #[test]
    fn a_restarted_worker_with_the_same_host_and_pid_is_another_worker() {
        let mut old = report("old", 50_000, WorkerState::Serving);
        old.started = 1_000;
        let mut new = report("new", 60_000, WorkerState::Serving);
        new.started = 55_000;
        let listed = live(&[new, old], 60_000);
        assert_eq!(
            listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["old", "new"]
        );
    }

    #[test]
    fn reports_marks_and_digests_never_read_as_each_other() {
        let r = report("a", 1, WorkerState::Serving);
        assert_eq!(WorkerReport::decode(&r.encode()), Some(r.clone()));
        // Readers that know only marks and digests (older versions) skip a report.
        assert!(crate::hot::HotMark::decode(&r.encode()).is_err());
        assert_eq!(crate::tenants::LaneDigest::decode(&r.encode()), None);
        let digest = crate::tenants::LaneDigest {
            v: 1,
            kind: crate::tenants::DIGEST_KIND.into(),
            pipeline: "p".into(),
            step: "s".into(),
            priority: warren_common::Priority::Normal,
            lane: "0".into(),
            depth: 1,
            seen: 1,
            tenants: vec![],
            at: 1,
            by: "w".into(),
        };
        assert_eq!(WorkerReport::decode(&digest.encode()), None);
        let mark = crate::hot::HotMark {
            v: 1,
            pipeline: "p".into(),
            tenant: "t".into(),
            lane: 0,
            until: 1,
            reason: crate::hot::HotReason::Depth,
            by: "w".into(),
        };
        assert_eq!(WorkerReport::decode(&mark.encode()), None);
        assert_eq!(WorkerReport::decode(b"\x81\xa1v\x01"), None);
    }

    #[test]
    fn pipelines_are_named_once() {
        let r = report("a", 1, WorkerState::Serving);
        assert_eq!(r.pipelines(), ["import", "mail"]);
    }
}
