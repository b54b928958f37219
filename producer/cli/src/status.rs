//! `warren status JOB` and `warren jobs`: the job history, as text or `--json`.

use std::time::Duration;

use clap::Args;
use warren_producer::{Client, Config, HistoryError, JobFilter, JobId, JobState, Outcome, Status};

use crate::output::outln;
use crate::{Exit, EXIT_NOT_FOUND, EXIT_USAGE};

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The job id `submit` printed.
    job: JobId,
}

#[derive(Debug, Args)]
pub(crate) struct JobsArgs {
    /// Only this tenant's jobs.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this pipeline's jobs.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only jobs in this state: queued, running, retrying, waiting_for_parts, succeeded,
    /// failed, dead_lettered.
    #[arg(long)]
    status: Option<Status>,
    /// Jobs made at most this long ago.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    since: Duration,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// What a history error means for the exit code.
fn exit(e: HistoryError) -> anyhow::Error {
    match e {
        HistoryError::Disabled { .. } | HistoryError::NotV7(_) => {
            Exit(EXIT_USAGE, e.to_string()).into()
        }
        HistoryError::UnknownJob(_) => Exit(EXIT_NOT_FOUND, e.to_string()).into(),
        other => other.into(),
    }
}

pub(crate) async fn status(args: StatusArgs, config: Config, json: bool) -> anyhow::Result<()> {
    if !config.history.enabled {
        // Said before connecting: no broker needed to know it.
        return Err(exit(HistoryError::Disabled {
            stream: format!("{}.history", config.broker.namespace),
        }));
    }
    let client = Client::connect(config).await?;
    let state = client.status(args.job).await;
    client.close().await;
    let state = state.map_err(exit)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    for line in describe(&state) {
        outln!("{line}");
    }
    Ok(())
}

pub(crate) async fn jobs(args: JobsArgs, config: Config, json: bool) -> anyhow::Result<()> {
    if !config.history.enabled {
        return Err(exit(HistoryError::Disabled {
            stream: format!("{}.history", config.broker.namespace),
        }));
    }
    let filter = JobFilter {
        tenant: args.tenant,
        pipeline: args.pipeline,
        status: args.status,
        since: args.since,
        limit: args.limit,
    };
    let client = Client::connect(config).await?;
    let jobs = client.jobs(&filter).await;
    client.close().await;
    let jobs = jobs.map_err(exit)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    if jobs.is_empty() {
        outln!(
            "no jobs made in the last {} match",
            humantime::format_duration(args.since)
        );
        return Ok(());
    }
    outln!(
        "{:<36}  {:<23}  {:<16} {:<16} {:<18} {}",
        "JOB",
        "MADE",
        "TENANT",
        "PIPELINE",
        "STATUS",
        "STEP"
    );
    for job in &jobs {
        outln!(
            "{:<36}  {:<23}  {:<16} {:<16} {:<18} {}",
            job.job_id,
            time(job.created_at),
            job.tenant,
            job.pipeline,
            job.status.as_str(),
            job.step.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// A job's state as lines of text: where it is, then its timeline.
fn describe(s: &JobState) -> Vec<String> {
    let mut lines = vec![format!(
        "job {}  tenant {}  pipeline {}{}",
        s.job_id,
        s.tenant,
        s.pipeline,
        s.priority
            .map(|p| format!("  priority {p}"))
            .unwrap_or_default()
    )];
    let at = s.step.as_deref().unwrap_or("-");
    let status = match s.status {
        Status::Queued => format!("queued at step {at}"),
        Status::Running => format!("running step {at}"),
        Status::Retrying => format!(
            "retrying step {at}{}",
            s.retry_at
                .map(|t| format!(" at {}", time(Some(t))))
                .unwrap_or_default()
        ),
        Status::WaitingForParts => format!("waiting for its parts before step {at}"),
        Status::Succeeded => "succeeded".to_string(),
        Status::Failed => format!("failed at step {at}"),
        Status::DeadLettered => format!(
            "failed at step {at}; dead-lettered (`warren dlq replay {}`)",
            s.job_id
        ),
    };
    lines.push(format!("status: {status}"));
    if let Some(error) = &s.error {
        lines.push(format!("error: {}", one_line(error)));
    }
    lines.push(format!(
        "made {}  submitted {}  {} {}",
        time(s.created_at),
        time(s.submitted_at),
        if s.ended_at.is_some() {
            "ended"
        } else {
            "updated"
        },
        time(s.ended_at.or(Some(s.updated_at)))
    ));
    if let Some(schedule) = &s.schedule {
        lines.push(format!("fired by schedule {schedule}"));
    }
    if let Some(parent) = s.parent {
        lines.push(format!("part of {parent}"));
    }
    if let Some(p) = s.parts {
        lines.push(format!(
            "parts: {} total, {} running, {} succeeded, {} failed",
            p.total, p.running, p.succeeded, p.failed
        ));
    }
    if s.replays > 0 {
        lines.push(format!("replayed {} time(s)", s.replays));
    }
    lines.push("timeline:".to_string());
    for a in &s.attempts {
        let took = a.took_ms.map(|t| format!(" in {t} ms")).unwrap_or_default();
        let outcome = match a.outcome {
            Some(Outcome::Succeeded) => format!("succeeded{took}"),
            Some(Outcome::Retried) => format!("failed{took}, retried"),
            Some(Outcome::Failed) => format!("failed{took}"),
            None => "running".to_string(),
        };
        let round = if a.round > 0 {
            format!(" (after replay {})", a.round)
        } else {
            String::new()
        };
        let error = a
            .error
            .as_deref()
            .map(|e| format!(": {}", one_line(e)))
            .unwrap_or_default();
        lines.push(format!(
            "  {}  {:<16} attempt {}{round}  {outcome}{error}",
            time(a.started_at.or(a.ended_at)),
            a.step,
            a.attempt
        ));
    }
    lines
}

/// The last line of a (possibly multi-line) error, where the cause usually is, and the count
/// of lines before it.
fn one_line(error: &str) -> String {
    let lines: Vec<&str> = error.trim().lines().collect();
    match lines.len() {
        0 | 1 => error.trim().to_string(),
        n => format!(
            "{} (last of {n} lines; --json has all)",
            lines[n - 1].trim()
        ),
    }
}

/// UTC, to the millisecond.
fn time(ms: Option<u64>) -> String {
    ms.and_then(|ms| chrono::DateTime::from_timestamp_millis(ms as i64))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "-".to_string())
}
