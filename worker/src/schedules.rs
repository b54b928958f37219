//! A worker's part in firing the config's schedules (`warren-worker run` takes part unless
//! `--no-schedules`): a producer client of its own, and the tick loop of
//! `warren_producer::schedules`, for as long as the worker runs.

use std::sync::Arc;
use std::time::Duration;

use warren_common::Config;
use warren_producer::schedules::Scheduler;
use warren_producer::Client;

/// Pause between attempts to connect the scheduler's client.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Takes part until the returned task is aborted. Nothing to do without schedules.
pub(crate) fn take_part(config: Config) -> Option<tokio::task::JoinHandle<()>> {
    if config.schedules.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let client = loop {
            match Client::connect(config.clone()).await {
                Ok(client) => break Arc::new(client),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot connect the scheduler; trying again.");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        };
        let _scheduler = Scheduler::start(client);
        std::future::pending::<()>().await;
    }))
}
