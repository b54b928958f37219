//! `warren results --parent ID`: the results of a fan-out's parts, read from the results
//! stream (every part's result is there, whether or not the join step could carry its output).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use warren_producer::{Client, Config, JobId, JobStatus, ResultEvent, Since};

/// How long the stream must stay quiet before the read counts as caught up.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub(crate) struct ResultsArgs {
    /// The job whose fan-out step made the parts (the id `submit` printed).
    #[arg(long)]
    parent: JobId,
}

pub(crate) async fn run(args: ResultsArgs, config: Config, json: bool) -> anyhow::Result<()> {
    let client = Client::connect(config).await?;
    // Parts' ids carry their parent's time, so the stream is read from there.
    let mut stream = client.results(Since::Job(args.parent)).await?;
    let mut parts: BTreeMap<u32, ResultEvent> = BTreeMap::new();
    while let Ok(Some(Ok(event))) = tokio::time::timeout(QUIET, stream.next()).await {
        let Some(part_of) = event.part_of.filter(|p| p.job_id == args.parent) else {
            continue;
        };
        // The newest result of a part wins, but a success stays (a replay only follows a failure).
        let keep_old = parts
            .get(&part_of.part)
            .is_some_and(|old| old.status == JobStatus::Succeeded);
        if !keep_old {
            parts.insert(part_of.part, event);
        }
    }
    stream.close().await;
    client.close().await;
    if json {
        let list: Vec<_> = parts
            .iter()
            .map(|(i, e)| serde_json::json!({"part": i, "result": e}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let total = parts.values().find_map(|e| e.part_of).map(|p| p.total);
    let succeeded = parts
        .values()
        .filter(|e| e.status == JobStatus::Succeeded)
        .count();
    println!(
        "parent {}: {} of {} parts ended, {succeeded} succeeded, {} failed",
        args.parent,
        parts.len(),
        total.map_or("?".to_string(), |t| t.to_string()),
        parts.len() - succeeded
    );
    for (i, e) in &parts {
        let detail = match e.status {
            JobStatus::Succeeded => e.output.to_string(),
            JobStatus::Failed => e.error.clone().unwrap_or_default(),
        };
        println!(
            "{i:>6}  {}  {:<16} {:<9} {detail}",
            e.job_id,
            e.tenant.as_str(),
            e.status.as_str()
        );
    }
    Ok(())
}
