//! Which of the watched jobs have ended, read from the results stream, for `overlap = "skip"`.
//! The reader notes the results of watched jobs only (it may read millions of others), so a
//! job must be watched before its result passes: the tick holder watches the jobs it fires
//! before it submits them, and follows each schedule's last fire on every tick, so a fire it
//! did not make (`warren schedules trigger`, an earlier holder) makes the reader start again
//! from a little before it, well before the next slot asks.

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

impl Seen {
    /// Whether every one of `jobs` has ended; if so they are forgotten, so the set holds only
    /// the fires still asked about (the next fire is what the slot after it asks about; a job
    /// asked about again is unwatched, and read again).
    fn take_if_all_ended(&mut self, jobs: &[JobId]) -> bool {
        if !jobs.iter().all(|id| self.ended.contains(id)) {
            return false;
        }
        for id in jobs {
            self.ended.remove(id);
        }
        true
    }
}

/// The reader of the results stream and what it saw; it stops when this is dropped.
pub(super) struct Ended {
    seen: Arc<Mutex<Seen>>,
    /// The reader of the results stream, once one was needed.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ended").finish_non_exhaustive()
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(task) = self.reader.take() {
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

    /// Watches `jobs` from now on: called before they are submitted, so a running reader sees
    /// their results however soon they come.
    pub(super) fn watch(&self, jobs: impl IntoIterator<Item = JobId>) {
        let mut seen = self.seen.lock().expect("ended lock");
        seen.watched.extend(jobs);
    }

    /// Makes sure the reader sees `jobs` end, without waiting: a job it has neither watched nor
    /// seen end is watched, and the reader starts again from a little before the oldest job
    /// watched (that job's result may have passed). The tick holder calls this on every tick
    /// for each schedule's last fire, so a new holder starts reading while the next slot is
    /// still ahead, not when it comes. Returns whether the reader started again, or `Err` when
    /// the results stream cannot be read.
    pub(super) async fn follow(&mut self, client: &Client, jobs: &[JobId]) -> Result<bool, ()> {
        let oldest = {
            let mut seen = self.seen.lock().expect("ended lock");
            let unwatched = jobs
                .iter()
                .any(|id| !seen.ended.contains(id) && !seen.watched.contains(id));
            seen.watched.extend(jobs.iter().copied());
            // A reader that stopped (its stream failed for good) starts again too.
            let stopped = self.reader.as_ref().is_none_or(|task| task.is_finished());
            if !(unwatched || stopped) {
                return Ok(false);
            }
            seen.watched.iter().filter_map(JobId::timestamp_ms).min()
        };
        let Some(oldest) = oldest else {
            return Ok(false);
        };
        if let Some(task) = self.reader.take() {
            task.abort();
        }
        let since = Since::Time(oldest.saturating_sub(CLOCK_SKEW_MS));
        let mut stream = match client.results(since).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e,
                    "Cannot read the results stream; a schedule with overlap = \"skip\" fires anyway.");
                return Err(());
            }
        };
        let seen = Arc::clone(&self.seen);
        self.reader = Some(tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                let mut seen = seen.lock().expect("ended lock");
                seen.last_read = Some(Instant::now());
                if seen.watched.remove(&event.job_id) {
                    seen.ended.insert(event.job_id);
                }
            }
        }));
        Ok(true)
    }

    /// Whether every one of `jobs` has a result ([`Ended::follow`] first). A reader that had to
    /// start again has the stream's past to read: it decides once that has gone quiet (or
    /// after [`CATCH_UP_PATIENCE`]), rather than skip a slot for jobs that ended long ago.
    pub(super) async fn all_ended(&mut self, client: &Client, jobs: &[JobId]) -> bool {
        if self
            .seen
            .lock()
            .expect("ended lock")
            .take_if_all_ended(jobs)
        {
            return true;
        }
        let Ok(restarted) = self.follow(client, jobs).await else {
            return true;
        };
        let started = tokio::time::Instant::now();
        loop {
            let (done, quiet) = {
                let mut seen = self.seen.lock().expect("ended lock");
                let quiet = seen.last_read.is_none_or(|t| t.elapsed() >= QUIET);
                (seen.take_if_all_ended(jobs), quiet)
            };
            let waited = started.elapsed();
            if done || !restarted || (quiet && waited >= QUIET) || waited >= CATCH_UP_PATIENCE {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_jobs_are_forgotten_once_all_of_a_fire_have_ended() {
        let (a, b) = (JobId::new(), JobId::new());
        let mut seen = Seen::default();
        seen.ended.insert(a);
        assert!(!seen.take_if_all_ended(&[a, b]), "b has not ended");
        assert!(
            seen.ended.contains(&a),
            "a is kept while its fire is asked about"
        );
        seen.ended.insert(b);
        assert!(seen.take_if_all_ended(&[a, b]));
        assert!(
            seen.ended.is_empty(),
            "nothing is kept for a fire that ended"
        );
    }
}
