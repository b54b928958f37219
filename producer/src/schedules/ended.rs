//! Which of the watched jobs have ended, read from the results stream, for `overlap = "skip"`.
//! Started on demand from a little before the oldest watched job, so a new tick holder learns
//! about jobs the previous one fired.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use futures::StreamExt;
use warren_common::JobId;

use crate::{Client, Since};

/// The longest a freshly started reader may take to read the results up to now.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(3);
/// How far before the oldest watched job the reader starts, for clock skew between machines.
const CLOCK_SKEW_MS: u64 = 10_000;
/// A fresh reader that read nothing for this long has read the past.
const QUIET: Duration = Duration::from_millis(300);

#[derive(Default)]
struct Seen {
    watched: HashSet<JobId>,
    ended: HashSet<JobId>,
    /// When the reader last read an event.
    last_read: Option<Instant>,
}

/// The reader of the results stream and what it saw; it stops when this is dropped.
pub(super) struct Ended {
    seen: Arc<Mutex<Seen>>,
    /// The reader and the oldest job time (ms) it started before.
    reader: Option<(tokio::task::JoinHandle<()>, u64)>,
}

impl std::fmt::Debug for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ended").finish_non_exhaustive()
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some((task, _)) = self.reader.take() {
            task.abort();
        }
    }
}

impl Ended {
    pub(super) fn new() -> Self {
        Self {
            seen: Arc::new(Mutex::new(Seen::default())),
            reader: None,
        }
    }

    /// Whether every one of `jobs` has a result. The first time it is asked about a job older
    /// than the reader's start, the reader starts again from before it.
    pub(super) async fn all_ended(&mut self, client: &Client, jobs: &[JobId]) -> bool {
        {
            let mut seen = self.seen.lock().expect("ended lock");
            if jobs.iter().all(|id| seen.ended.contains(id)) {
                return true;
            }
            seen.watched.extend(jobs.iter().copied());
        }
        let Some(oldest) = jobs.iter().filter_map(JobId::timestamp_ms).min() else {
            return true;
        };
        let restart = self.reader.as_ref().is_none_or(|(_, from)| oldest < *from);
        if restart {
            if let Some((task, _)) = self.reader.take() {
                task.abort();
            }
            match client
                .results(Since::Time(oldest.saturating_sub(CLOCK_SKEW_MS)))
                .await
            {
                Ok(mut stream) => {
                    let seen = Arc::clone(&self.seen);
                    let task = tokio::spawn(async move {
                        while let Some(Ok(event)) = stream.next().await {
                            let mut seen = seen.lock().expect("ended lock");
                            seen.last_read = Some(Instant::now());
                            if seen.watched.remove(&event.job_id) {
                                seen.ended.insert(event.job_id);
                            }
                        }
                    });
                    self.reader = Some((task, oldest));
                }
                Err(e) => {
                    tracing::warn!(error = %e,
                        "Cannot read the results stream; a schedule with overlap = \"skip\" fires anyway.");
                    return true;
                }
            }
        }
        // A reader that just started has the stream's past to read first: it decides once
        // that has gone quiet, rather than skip a slot for jobs that ended long ago.
        let started = tokio::time::Instant::now();
        loop {
            let (done, quiet) = {
                let seen = self.seen.lock().expect("ended lock");
                let quiet = seen.last_read.is_none_or(|t| t.elapsed() >= QUIET);
                (jobs.iter().all(|id| seen.ended.contains(id)), quiet)
            };
            let waited = started.elapsed();
            if done || !restart || (quiet && waited >= QUIET) || waited >= CATCH_UP_PATIENCE {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
