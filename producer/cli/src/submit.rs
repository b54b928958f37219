//! `warren submit` (one job, or `--bulk` one JSON job per line) and `warren wait`.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};
use warren_producer::{
    Client, Config, Job, JobId, JobStatus, Priority, ResultEvent, Since, WaitError, Waiting,
};

use crate::output::outln;
use crate::{Exit, EXIT_JOB_FAILED, EXIT_TIMEOUT};

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// Pipeline to run (with --bulk: the default for lines without one).
    #[arg(long, required_unless_present = "bulk")]
    pipeline: Option<String>,
    /// Tenant id (with --bulk: the default for lines without one).
    #[arg(long, required_unless_present = "bulk")]
    tenant: Option<String>,
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Job payload as JSON.
    #[arg(long, conflicts_with_all = ["payload_file", "bulk"])]
    payload: Option<String>,
    /// Read the payload JSON from this file.
    #[arg(long, conflicts_with = "bulk")]
    payload_file: Option<PathBuf>,
    /// Submit one job per line of this file (`-` for stdin): {"pipeline", "tenant", "priority", "payload"}.
    #[arg(long, value_name = "FILE")]
    bulk: Option<PathBuf>,
    /// Wait for the result(s) and print them.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits (for all jobs, with --bulk).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct WaitArgs {
    /// The job id `submit` printed.
    job_id: JobId,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// One line of a --bulk file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkLine {
    pipeline: Option<String>,
    tenant: Option<String>,
    priority: Option<Priority>,
    #[serde(default)]
    payload: Value,
}

pub(crate) async fn run(args: SubmitArgs, config: Config, json: bool) -> anyhow::Result<()> {
    let jobs = match &args.bulk {
        Some(path) => read_bulk(path, &args)?,
        None => vec![single_job(&args)?],
    };
    let client = Client::connect(config).await?;
    // Opened before the submit, so the results of these jobs cannot come before it, and the
    // wait reads only what is published from now on.
    let results = if args.wait {
        Some(client.results(Since::Now).await?)
    } else {
        None
    };
    let ids = if jobs.len() == 1 && args.bulk.is_none() {
        vec![
            client
                .submit(jobs.into_iter().next().expect("one job"))
                .await?,
        ]
    } else {
        client.submit_many(jobs).await?
    };
    let outcome = if let Some(stream) = results {
        let total = ids.len();
        report(stream.wait_for(ids, args.timeout), total, json).await
    } else {
        for id in &ids {
            if json {
                outln!("{}", json!({"job_id": id.to_string()}));
            } else {
                outln!("{id}");
            }
        }
        Ok(())
    };
    client.close().await;
    outcome
}

pub(crate) async fn wait(args: WaitArgs, config: Config, json: bool) -> anyhow::Result<()> {
    let client = Client::connect(config).await?;
    // The job may have finished before this command ran: read from its submit time.
    let outcome = match client.wait_all(&[args.job_id], args.timeout).await {
        Ok(waiting) => report(waiting, 1, json).await,
        Err(e) => Err(e.into()),
    };
    client.close().await;
    outcome
}

/// Prints each of `total` jobs' result as it is final (output JSON, or the event with
/// --json); fails if any job failed or did not finish in time.
async fn report(mut waiting: Waiting, total: usize, json: bool) -> anyhow::Result<()> {
    let mut failed = 0usize;
    let outcome: anyhow::Result<()> = loop {
        match waiting.next().await {
            Ok(Some(event)) => {
                print_result(&event, json, total > 1);
                if event.status == JobStatus::Failed {
                    failed += 1;
                }
            }
            Ok(None) => break Ok(()),
            Err(WaitError::Timeout { timeout, .. }) => {
                let missing = waiting.pending().count();
                break Err(Exit(
                    EXIT_TIMEOUT,
                    format!("{missing} of {total} jobs had no result within {timeout:?}"),
                )
                .into());
            }
            Err(e) => break Err(e.into()),
        }
    };
    waiting.close().await;
    outcome?;
    if failed > 0 {
        return Err(Exit(EXIT_JOB_FAILED, format!("{failed} of {total} jobs failed")).into());
    }
    Ok(())
}

fn print_result(event: &ResultEvent, json: bool, many: bool) {
    if json {
        outln!(
            "{}",
            serde_json::to_string(event).expect("result events serialise")
        );
    } else if event.status == JobStatus::Succeeded {
        if many {
            outln!("{} {}", event.job_id, event.output);
        } else {
            outln!("{}", event.output);
        }
    } else {
        eprintln!(
            "job {} failed at step {} after {} attempt(s): {}",
            event.job_id,
            event.step,
            event.attempts,
            event.error.as_deref().unwrap_or("no reason given")
        );
    }
}

fn single_job(args: &SubmitArgs) -> anyhow::Result<Job> {
    let text = match (&args.payload, &args.payload_file) {
        (Some(text), None) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read payload file {}", path.display()))?,
        (None, None) => bail!("give the payload with --payload JSON or --payload-file FILE"),
        (Some(_), Some(_)) => bail!("give either --payload or --payload-file, not both"),
    };
    let payload: Value = serde_json::from_str(&text).context("payload is not valid JSON")?;
    let pipeline = args.pipeline.clone().expect("clap requires --pipeline");
    let tenant = args.tenant.clone().expect("clap requires --tenant");
    Ok(Job::new(pipeline, tenant, payload).priority(args.priority))
}

fn read_bulk(path: &PathBuf, args: &SubmitArgs) -> anyhow::Result<Vec<Job>> {
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot open bulk file {}", path.display()))?,
        )
    };
    let mut jobs = Vec::new();
    for (n, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.context("cannot read bulk input")?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: &dyn std::fmt::Display| anyhow!("bulk line {}: {e}", n + 1);
        let parsed: BulkLine = serde_json::from_str(&line).map_err(|e| at(&e))?;
        let pipeline = parsed
            .pipeline
            .or_else(|| args.pipeline.clone())
            .ok_or_else(|| at(&"no pipeline (add one, or pass --pipeline)"))?;
        let tenant = parsed
            .tenant
            .or_else(|| args.tenant.clone())
            .ok_or_else(|| at(&"no tenant (add one, or pass --tenant)"))?;
        let priority = parsed.priority.unwrap_or(args.priority);
        jobs.push(Job::new(pipeline, tenant, parsed.payload).priority(priority));
    }
    if jobs.is_empty() {
        bail!("bulk input has no jobs");
    }
    Ok(jobs)
}
