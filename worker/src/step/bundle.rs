//! A bundle of fan-out parts ([`warren_common::bundle`]) on one execution slot: its parts run one
//! after another, each on its own way from run to confirmed effects; a part does not wait for
//! the confirms of the one before it, and the bundle is acked once every part's are in.
//!
//! A bundle held past [`HOLD`] sends its parts not yet started back to their queue, each alone
//! and confirmed: slow parts then neither keep one message unacked for long (RabbitMQ's
//! `consumer_timeout`) nor wait in line here while other workers could run them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, MutexGuard};
use tracing::info;
use warren_broker::{PublishError, StepRoute};
use warren_common::{JobId, Reason};

use super::fate::{self, Admitted, SetAside};
use super::{handle_job, set_aside, ServedStep, StepSession};

/// How long a bundle's parts may keep starting here, one after another.
const HOLD: Duration = Duration::from_secs(10);

/// A bundle's run slot, held by the part whose step runs.
pub(super) type Turn<'a> = MutexGuard<'a, ()>;

/// Runs the parts of one bundle taken from `route`'s queue; `Ok` once every part's effects are
/// confirmed (then the bundle is acked), else the first error (then it returns to its queue,
/// and its parts run again: duplicates, which the fan-in's fold takes once).
pub(super) async fn handle(
    session: &Arc<StepSession>,
    served: &ServedStep,
    route: &StepRoute,
    parts: Vec<Vec<u8>>,
) -> Result<(), PublishError> {
    let slot = Mutex::new(());
    let since = Instant::now();
    let sent_back = AtomicBool::new(false);
    let count = parts.len();
    let each = parts.iter().enumerate().map(|(index, body)| {
        let (slot, sent_back) = (&slot, &sent_back);
        async move {
            let env = match fate::admit(body, None, &session.config, served) {
                Ok(Admitted::Job(env)) => env,
                Ok(Admitted::Bundle(_)) => {
                    let aside = SetAside {
                        reason: Reason::Undecodable,
                        text: "a bundle inside a bundle".into(),
                        id: JobId::new().to_string(),
                        pipeline: None,
                        result: None,
                    };
                    return set_aside(session, served, route, body, Box::new(aside)).await;
                }
                Err(aside) => return set_aside(session, served, route, body, aside).await,
            };
            // Slots are granted in the order asked for: the parts run in bundle order.
            let turn = slot.lock().await;
            if since.elapsed() > HOLD {
                drop(turn);
                if !sent_back.swap(true, Ordering::Relaxed) {
                    info!(pipeline = %served.pipeline.name, step = %served.step.name,
                        tenant = %env.tenant, parts = count - index,
                        "A bundle of parts has run here for {HOLD:?}: its parts not yet started go back to the queue one by one.");
                }
                let outbox = &session.outbox;
                return outbox
                    .hand_off(|| outbox.publish_step(route, &env, body))
                    .await;
            }
            handle_job(session, served, route, env, Some(turn)).await
        }
    });
    futures::future::try_join_all(each).await.map(|_| ())
}
