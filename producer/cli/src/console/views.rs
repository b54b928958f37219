//! What each console page shows, computed from the jobs read from the history and the newest
//! broker reading. Each page's HTML and its JSON API (`/api/...`) are the same value: the
//! template renders it, the API serialises it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_broker::workers::{self, WorkerReport};
use warren_common::history::{JobState, Status};
use warren_common::{now_ms, JobId};
use warren_producer::schedules::ScheduleStatus;
use warren_producer::HotTenant;

use super::probe::{Depth, Reading};
use super::state::{Jobs, Row};

/// The window of "jobs/s" on the overview.
const RATE_WINDOW_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// Most rows a list page shows.
const LIST_LIMIT: usize = 200;

/// How the console is doing, on every page.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Health {
    /// The history written before the console started is read.
    pub(crate) ready: bool,
    pub(crate) ready_after_ms: Option<u64>,
    pub(crate) events: u64,
    pub(crate) jobs: usize,
    /// Why the history or the broker could not be read, when that is so.
    pub(crate) errors: Vec<String>,
}

// === Overview ===

#[derive(Debug, Serialize)]
pub(crate) struct Overview {
    /// Per pipeline: jobs per second that ended in the last minute, by outcome, and how many
    /// are running or waiting now.
    pub(crate) pipelines: Vec<PipelineRates>,
    /// Step queues with messages waiting, and the total per pipeline.
    pub(crate) backlog: Vec<Depth>,
    pub(crate) backlog_total: u64,
    pub(crate) dead_letters: Option<u32>,
    pub(crate) hot_tenants: Vec<Hot>,
    /// The worker processes running now (those heard from in the last 25 s or so).
    pub(crate) workers: Vec<WorkerRow>,
}

/// One running worker process, from its latest presence report.
#[derive(Debug, Serialize)]
pub(crate) struct WorkerRow {
    /// Unique per run of the process.
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    /// When it started, ms since the epoch.
    pub(crate) started: u64,
    /// How long ago its latest report was made (ms).
    pub(crate) reported_ms_ago: u64,
    /// `serving` or `draining`.
    pub(crate) state: &'static str,
    /// Step attempts running in it, and how many it may run at once.
    pub(crate) running: u32,
    pub(crate) slots: u32,
    /// The pipelines it serves, and its steps as `pipeline/step`.
    pub(crate) pipelines: Vec<String>,
    pub(crate) steps: Vec<String>,
    pub(crate) version: String,
}

impl WorkerRow {
    fn of(report: &WorkerReport, now_ms: u64) -> Self {
        Self {
            id: report.id.clone(),
            host: report.host.clone(),
            pid: report.pid,
            started: report.started,
            reported_ms_ago: now_ms.saturating_sub(report.at),
            state: report.state.as_str(),
            running: report.running,
            slots: report.slots,
            pipelines: report.pipelines().into_iter().map(String::from).collect(),
            steps: report.steps.clone(),
            version: report.version.clone(),
        }
    }
}

/// The workers live at `now_ms` among the reports read.
pub(crate) fn live_workers(reports: &[WorkerReport], now_ms: u64) -> Vec<WorkerRow> {
    workers::live(reports, now_ms)
        .iter()
        .map(|r| WorkerRow::of(r, now_ms))
        .collect()
}

/// A tenant marked hot, moved to an overflow lane.
#[derive(Debug, Serialize)]
pub(crate) struct Hot {
    pub(crate) pipeline: String,
    pub(crate) tenant: String,
    pub(crate) lane: String,
    /// When the mark ends, ms since the epoch.
    pub(crate) until: u64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct PipelineRates {
    pub(crate) pipeline: String,
    pub(crate) succeeded_per_s: f64,
    pub(crate) failed_per_s: f64,
    pub(crate) running: u64,
    pub(crate) waiting: u64,
    /// Messages ready in its step queues.
    pub(crate) backlog: u64,
}

pub(crate) fn overview(jobs: &Jobs, reading: &Reading, hot: Vec<HotTenant>) -> Overview {
    let since = now_ms().saturating_sub(RATE_WINDOW_MS);
    let mut by: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
    for row in jobs.newest_first() {
        let counts = by.entry(row.pipeline.to_string()).or_default();
        match row.status {
            Status::Succeeded if row.ended_at.is_some_and(|t| t >= since) => counts.0 += 1,
            Status::Failed | Status::DeadLettered if row.ended_at.is_some_and(|t| t >= since) => {
                counts.1 += 1
            }
            Status::Running => counts.2 += 1,
            Status::Queued | Status::Retrying | Status::WaitingForParts => counts.3 += 1,
            _ => {}
        }
    }
    let mut backlogs: BTreeMap<String, u64> = BTreeMap::new();
    for depth in &reading.depths {
        *backlogs.entry(depth.pipeline.clone()).or_default() += u64::from(depth.ready);
        by.entry(depth.pipeline.clone()).or_default();
    }
    let window_s = (RATE_WINDOW_MS / 1000) as f64;
    let pipelines = by
        .into_iter()
        .map(|(pipeline, (ok, failed, running, waiting))| PipelineRates {
            backlog: backlogs.get(&pipeline).copied().unwrap_or(0),
            pipeline,
            succeeded_per_s: ok as f64 / window_s,
            failed_per_s: failed as f64 / window_s,
            running,
            waiting,
        })
        .collect();
    Overview {
        pipelines,
        backlog: reading.depths.clone(),
        backlog_total: backlogs.values().sum(),
        dead_letters: reading.dead_letters,
        hot_tenants: hot
            .into_iter()
            .map(|h| Hot {
                lane: h.lane.to_string(),
                pipeline: h.pipeline,
                tenant: h.tenant,
                until: h.until,
            })
            .collect(),
        workers: live_workers(&reading.workers, now_ms()),
    }
}

// === Tenants ===

#[derive(Debug, Default, Serialize)]
pub(crate) struct TenantRow {
    pub(crate) tenant: String,
    /// Estimated messages waiting (from the workers' lane reports).
    pub(crate) backlog: u64,
    pub(crate) running: u64,
    pub(crate) succeeded_1h: u64,
    pub(crate) failed_1h: u64,
    /// The 95th percentile of the wait from submit to a first step's start, over the jobs
    /// made in the last hour (ms).
    pub(crate) p95_wait_ms: Option<u64>,
}

pub(crate) fn tenants(jobs: &Jobs, reading: &Reading) -> Vec<TenantRow> {
    let hour_ago = now_ms().saturating_sub(HOUR_MS);
    let mut rows: HashMap<String, TenantRow> = HashMap::new();
    let mut waits: HashMap<String, Vec<u64>> = HashMap::new();
    for row in jobs.newest_first() {
        let recent = row.updated_at >= hour_ago;
        if !recent && !matches!(row.status, Status::Running) {
            continue;
        }
        let tenant = rows
            .entry(row.tenant.to_string())
            .or_insert_with(|| TenantRow {
                tenant: row.tenant.to_string(),
                ..TenantRow::default()
            });
        let ended_recently = row.ended_at.is_some_and(|t| t >= hour_ago);
        match row.status {
            Status::Running => tenant.running += 1,
            Status::Succeeded if ended_recently => tenant.succeeded_1h += 1,
            Status::Failed | Status::DeadLettered if ended_recently => tenant.failed_1h += 1,
            _ => {}
        }
        if let (Some(wait), true) = (row.wait_ms, row.created_at.is_some_and(|t| t >= hour_ago)) {
            waits.entry(row.tenant.to_string()).or_default().push(wait);
        }
    }
    for backlog in &reading.tenant_backlogs {
        rows.entry(backlog.tenant.clone())
            .or_insert_with(|| TenantRow {
                tenant: backlog.tenant.clone(),
                ..TenantRow::default()
            })
            .backlog += backlog.backlog;
    }
    for (tenant, mut list) in waits {
        list.sort_unstable();
        let at = (list.len() * 95).div_ceil(100).saturating_sub(1);
        if let Some(row) = rows.get_mut(&tenant) {
            row.p95_wait_ms = list.get(at).copied();
        }
    }
    let mut rows: Vec<TenantRow> = rows.into_values().collect();
    rows.sort_by(|a, b| b.backlog.cmp(&a.backlog).then(a.tenant.cmp(&b.tenant)));
    rows
}

// === Jobs ===

/// The search of the jobs page (its query string).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct JobSearch {
    /// A job id, or the start of one.
    pub(crate) id: String,
    pub(crate) tenant: String,
    pub(crate) pipeline: String,
    pub(crate) status: String,
    /// Jobs made at most this long ago (`15m`, `2h`, `3d`); empty means any time.
    pub(crate) since: String,
    /// Words the error holds (the failures page).
    pub(crate) error: String,
    pub(crate) step: String,
}

impl JobSearch {
    fn since_ms(&self) -> Result<Option<u64>, String> {
        match self.since.trim() {
            "" => Ok(None),
            text => humantime::parse_duration(text)
                .map(|d| Some(now_ms().saturating_sub(d.as_millis() as u64)))
                .map_err(|e| format!("since {text:?}: {e} (say 15m, 2h or 3d)")),
        }
    }

    fn status(&self) -> Result<Option<Status>, String> {
        match self.status.trim() {
            "" => Ok(None),
            text => text.parse().map(Some),
        }
    }

    fn matches(&self, row: &Row, status: Option<Status>) -> bool {
        let is = |want: &str, have: &str| want.trim().is_empty() || want.trim() == have;
        row.job_id.to_string().starts_with(self.id.trim())
            && is(&self.tenant, &row.tenant)
            && is(&self.pipeline, &row.pipeline)
            && is(&self.step, row.step.as_deref().unwrap_or(""))
            && status.is_none_or(|s| s == row.status)
            && (self.error.trim().is_empty()
                || row
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(self.error.trim())))
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct JobList {
    pub(crate) search: JobSearch,
    pub(crate) jobs: Vec<Row>,
    /// More matched than are shown.
    pub(crate) more: bool,
    /// Why the search is not understood.
    pub(crate) problem: Option<String>,
    pub(crate) statuses: Vec<&'static str>,
}

/// The newest jobs that match `search`, at most [`LIST_LIMIT`].
pub(crate) fn job_list(jobs: &Jobs, search: JobSearch) -> JobList {
    let statuses = Status::ALL.iter().map(|s| s.as_str()).collect();
    let (from, status) = match (search.since_ms(), search.status()) {
        (Ok(from), Ok(status)) => (from, status),
        (Err(problem), _) | (_, Err(problem)) => {
            return JobList {
                search,
                jobs: Vec::new(),
                more: false,
                problem: Some(problem),
                statuses,
            }
        }
    };
    let mut found = Vec::new();
    let mut more = false;
    for row in jobs.newest_first() {
        // Newest first: once one is older than the window, so is the rest.
        if from.is_some_and(|from| row.created_at.unwrap_or(row.updated_at) < from) {
            break;
        }
        if search.matches(row, status) {
            if found.len() == LIST_LIMIT {
                more = true;
                break;
            }
            found.push(row.clone());
        }
    }
    JobList {
        search,
        jobs: found,
        more,
        problem: None,
        statuses,
    }
}

/// The failures page: dead-lettered (and failed) jobs matching a search.
pub(crate) fn failures(jobs: &Jobs, mut search: JobSearch, reading: &Reading) -> Failures {
    let statuses = [Status::DeadLettered, Status::Failed];
    let wanted = search.status.clone();
    search.status = String::new();
    let mut list = job_list(jobs, search);
    list.jobs.retain(|row| {
        statuses.contains(&row.status) && (wanted.is_empty() || row.status.as_str() == wanted)
    });
    list.search.status = wanted;
    Failures {
        list,
        dead_letters: reading.dead_letters,
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Failures {
    pub(crate) list: JobList,
    /// Messages in the dead-letter queue (some may predate the history).
    pub(crate) dead_letters: Option<u32>,
}

// === One job ===

#[derive(Debug, Serialize)]
pub(crate) struct JobPage {
    pub(crate) job: JobState,
    /// The job's result output, when it succeeded and the results stream still has it.
    pub(crate) output: Option<serde_json::Value>,
    /// The same, pretty-printed for the page (which escapes it like any text).
    pub(crate) output_text: Option<String>,
    /// A fan-out's parts, those that need a look first, at most [`PARTS_LISTED`].
    pub(crate) parts: Vec<Row>,
    /// How many parts it has in the history.
    pub(crate) parts_known: usize,
}

/// Most parts a fan-out's page lists (a fan-out can have tens of thousands); the counts above
/// the list cover them all, and `warren results --parent` lists every part's result.
const PARTS_LISTED: usize = 200;

pub(crate) fn job_page(jobs: &Jobs, id: JobId) -> Option<JobPage> {
    let job = jobs.job(id)?;
    let mut parts = jobs.parts(id);
    let parts_known = parts.len();
    // Failed first, then those still going, then the succeeded; in part order within each
    // (the sort is stable).
    parts.sort_by_key(|row| match row.status {
        Status::Failed | Status::DeadLettered => 0,
        Status::Succeeded => 2,
        _ => 1,
    });
    parts.truncate(PARTS_LISTED);
    Some(JobPage {
        job,
        output: None,
        output_text: None,
        parts: parts.into_iter().cloned().collect(),
        parts_known,
    })
}

// === Schedules ===

#[derive(Debug, Serialize)]
pub(crate) struct Schedules {
    pub(crate) schedules: Vec<ScheduleStatus>,
}

/// How long a job page waits for a succeeded job's result from the results stream.
pub(crate) const OUTPUT_WAIT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use warren_broker::workers::{WorkerState, REPORT_VERSION, WORKER_KIND};

    use super::*;

    fn report(id: &str, at: u64, state: WorkerState) -> WorkerReport {
        WorkerReport {
            v: REPORT_VERSION,
            kind: WORKER_KIND.into(),
            id: id.into(),
            host: "box".into(),
            pid: 42,
            started: 1_000,
            at,
            every_ms: 10_000,
            state,
            running: 3,
            slots: 8,
            steps: vec!["import/load".into(), "import/save".into()],
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_big_fan_out_lists_its_failed_then_unfinished_parts_first_up_to_the_cap() {
        use warren_common::history::{Event, Kind};
        let mut jobs = Jobs::default();
        let parent = JobId::new();
        let mut opened = Event::new(Kind::Parts, parent, "acme", "nightly").at(2);
        opened.parts_total = Some(250);
        jobs.add(&Event::new(Kind::Submitted, parent, "acme", "nightly").at(1));
        jobs.add(&opened);
        // Parts 0-239 succeed, 240-244 run, 245-249 fail.
        let mut ids = Vec::new();
        for i in 0..250u64 {
            let id = JobId::new();
            let kind = match i {
                0..240 => Kind::Succeeded,
                240..245 => Kind::Started,
                _ => Kind::Failed,
            };
            let mut event = Event::new(kind, id, "acme", "part").at(10 + i);
            event.step = Some("load".into());
            event.attempt = Some(1);
            event.parent = Some(parent);
            jobs.add(&event);
            ids.push(id);
        }
        jobs.refold();

        let page = job_page(&jobs, parent).unwrap();

        assert_eq!((page.parts.len(), page.parts_known), (PARTS_LISTED, 250));
        let listed: Vec<JobId> = page.parts.iter().map(|r| r.job_id).collect();
        assert_eq!(
            listed[..5],
            ids[245..],
            "the failed parts first, in part order"
        );
        assert_eq!(listed[5..10], ids[240..245], "then the running ones");
        assert_eq!(listed[10..], ids[..PARTS_LISTED - 10], "then the succeeded");
    }

    #[test]
    fn the_overview_lists_the_live_workers_with_their_pipelines() {
        let now = 1_000_000;
        let reports = [
            report("a", now - 4_000, WorkerState::Draining),
            report("gone", now - 40_000, WorkerState::Serving),
            report("left", now - 1_000, WorkerState::Stopped),
        ];
        let rows = live_workers(&reports, now);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!((row.id.as_str(), row.state), ("a", "draining"));
        assert_eq!((row.running, row.slots, row.reported_ms_ago), (3, 8, 4_000));
        assert_eq!(row.pipelines, ["import"]);
    }
}
