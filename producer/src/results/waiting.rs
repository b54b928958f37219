//! [`Waiting`]: each job's final result as it comes, read from a [`ResultStream`] under the
//! catch-up rule of [`super::catch_up`].

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use warren_common::{now_ms, JobId, ResultEvent};

use super::catch_up::CatchUp;
use super::ResultStream;
use crate::error::WaitError;

/// Room left before a wait's deadline to report a failure whose catch-up is not over.
const REPORT_ROOM: Duration = Duration::from_millis(50);

/// The final results of jobs, each as soon as it is final: a success at once; a failure once
/// the reader has caught up with the stream (a job replayed from the dead-letter queue
/// finished again later, and its newest result wins). Either for a set of jobs with a deadline
/// ([`ResultStream::wait_for`], [`crate::Client::wait_all`]), or for every job with no end
/// ([`ResultStream::settled`]: a reader that counts completions).
///
/// ```no_run
/// # use std::time::Duration;
/// # use warren_producer::{Client, Job, Since, WaitError};
/// # async fn demo(client: Client, jobs: Vec<Job>) -> Result<(), Box<dyn std::error::Error>> {
/// // Opened before the submit: the results cannot come before it.
/// let results = client.results(Since::Now).await?;
/// let ids = client.submit_many(jobs).await?;
/// let mut waiting = results.wait_for(ids, Duration::from_secs(60));
/// loop {
///     match waiting.next().await {
///         Ok(Some(result)) => println!("{} {:?}", result.job_id, result.status),
///         Ok(None) => break, // every job has its result
///         Err(WaitError::Timeout { .. }) => {
///             println!("{} jobs still running", waiting.pending().count());
///             break;
///         }
///         Err(e) => return Err(e.into()),
///     }
/// }
/// waiting.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Waiting {
    stream: ResultStream,
    catch_up: CatchUp,
    /// With the timeout it was made from, for the error.
    deadline: Option<(Instant, Duration)>,
    /// The stream failed or ended; reported once the results it released are taken.
    broken: Option<WaitError>,
}

impl Waiting {
    pub(super) fn jobs(
        stream: ResultStream,
        ids: impl IntoIterator<Item = JobId>,
        timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        let deadline = now + timeout;
        let latest = deadline.checked_sub(REPORT_ROOM).unwrap_or(deadline);
        Self {
            stream,
            catch_up: CatchUp::jobs(ids, now, Some(latest)),
            deadline: Some((deadline, timeout)),
            broken: None,
        }
    }

    pub(super) fn every(stream: ResultStream) -> Self {
        Self {
            stream,
            catch_up: CatchUp::every(Instant::now()),
            deadline: None,
            broken: None,
        }
    }

    /// The next final result; `Ok(None)` once every job waited for has had its result.
    /// [`WaitError::Timeout`] (naming a job still without a result) when the deadline passes,
    /// [`WaitError::Broker`] or [`WaitError::StreamClosed`] when the stream fails: after
    /// either, [`Waiting::pending`] tells which jobs had no result.
    pub async fn next(&mut self) -> Result<Option<ResultEvent>, WaitError> {
        loop {
            if let Some(event) = self.catch_up.pop() {
                return Ok(Some(event));
            }
            if let Some(error) = self.broken.take() {
                return Err(error);
            }
            if self.catch_up.is_done() {
                return Ok(None);
            }
            let wake = match (self.catch_up.wake_at(), self.deadline) {
                (Some(at), Some((deadline, _))) => Some(at.min(deadline)),
                (at, deadline) => at.or(deadline.map(|d| d.0)),
            };
            let next = match wake {
                None => self.stream.next().await,
                Some(at) => match tokio::time::timeout_at(at, self.stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let now = Instant::now();
                        let past = self.deadline.filter(|(deadline, _)| now >= *deadline);
                        // (With no job pending, the loop ends at `is_done`.)
                        if let (Some((_, timeout)), Some(job_id)) = (past, self.pending().next()) {
                            return Err(WaitError::Timeout { job_id, timeout });
                        }
                        self.catch_up.tick(now);
                        continue;
                    }
                },
            };
            match next {
                Some(Ok(event)) => self.catch_up.offer(event, Instant::now(), now_ms()),
                // What is held is the newest result there is: report it, then the error.
                Some(Err(e)) => {
                    self.catch_up.release_all();
                    self.broken = Some(e.into());
                }
                None => {
                    self.catch_up.release_all();
                    self.broken = Some(WaitError::StreamClosed);
                }
            }
        }
    }

    /// The jobs waited for that have had no result yet (none when waiting for every job).
    pub fn pending(&self) -> impl Iterator<Item = JobId> + '_ {
        self.catch_up.open()
    }

    /// Closes the stream it reads.
    pub async fn close(self) {
        self.stream.close().await;
    }
}
