//! `nightly-demo`: the driver behind `deploy/local/demo.sh --nightly`. The workers (started by
//! the script) fire the example's schedule themselves; this only watches the results stream of
//! the namespace: each part of the fan-out as it ends, then the join's per-tenant summary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use warren_producer::{Client, Config, JobStatus, ProcessEnv, Since};

#[derive(Debug, Parser)]
#[command(about = "Wait for the nightly example's first fire to join, and print its summary.")]
struct Args {
    #[arg(long, default_value = "examples/nightly/warren.toml")]
    config: PathBuf,
    /// Give up waiting after this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(Some(&args.config), &ProcessEnv)?;
    let when = config
        .schedule("nightly")
        .map(|s| s.when.clone())
        .context("the config has no schedule `nightly`")?;
    let client = Client::connect(config)
        .await
        .context("connecting to RabbitMQ")?;
    let started = Instant::now();
    println!("waiting for schedule `nightly` ({when}) to fire; its parts as they end:");
    // The namespace is new: its results stream holds this demo's results only, so reading it
    // from the start misses nothing, even a fire that came before this reader opened.
    let mut stream = client.results(Since::Time(0)).await?;
    let join = tokio::time::timeout(args.timeout, async {
        while let Some(event) = stream.next().await {
            let event = event?;
            if event.pipeline == "nightly" {
                return Ok(Some(event));
            }
            let what = match event.status {
                JobStatus::Succeeded => format!("{} items stored", event.output["items"]),
                JobStatus::Failed => format!("FAILED at {}", event.step),
            };
            let part = event.part_of.map_or(0, |p| p.part + 1);
            let total = event.part_of.map_or(0, |p| p.total);
            println!(
                "  {:>5.1}s  part {part:>2}/{total}  {:<13} {what}",
                started.elapsed().as_secs_f64(),
                event.tenant
            );
        }
        anyhow::Ok(None)
    })
    .await;
    stream.close().await;
    client.close().await;
    let event = match join {
        Ok(Ok(Some(event))) => event,
        Ok(Ok(None)) => bail!("the results stream closed before the join ran"),
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("no join within {:?}", args.timeout),
    };
    if event.status != JobStatus::Succeeded {
        bail!(
            "the nightly job failed at step {}: {}",
            event.step,
            event.error.unwrap_or_default()
        );
    }
    let report = event.output["report"].as_str().unwrap_or_default();
    println!(
        "\nnotify ran {:.1}s after this driver started; it says:\n\n{report}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
