//! The history events of an attempt's fate, pure: what `warren status` will say happened.
//! Written through the process's `HistoryWriter` and confirmed before the delivery is acked
//! (see `step/mod.rs`).

use std::time::Duration;

use warren_common::history::{Event, Kind};
use warren_common::{Config, Envelope};

use super::fate::Fate;

/// The events that say what became of the attempt of `env` that took `took`.
pub(super) fn events(fate: &Fate, env: &Envelope, took: Duration, config: &Config) -> Vec<Event> {
    let took_ms = took.as_millis() as u64;
    let step = |kind: Kind| Event::of_step(kind, env).took_ms(took_ms);
    match fate {
        Fate::Next { envelope, .. } => {
            let mut event = step(Kind::Succeeded);
            event.next = Some(envelope.step.clone());
            vec![event]
        }
        Fate::Finish(_) => vec![step(Kind::Succeeded)],
        Fate::FanOut(plan) => {
            let mut event = step(Kind::Succeeded);
            event.next = config
                .pipeline(&env.pipeline)
                .and_then(|p| p.next_step(&env.step))
                .map(|s| s.name.clone());
            let mut parts = Event::of_step(Kind::Parts, env).at(event.at);
            parts.parts_total = Some(plan.opened.total());
            parts.parts_ended = Some(0);
            let mut events = vec![event, parts];
            // The parts released now are submitted jobs of their own (their parent on each).
            events.extend(plan.parts.iter().map(|(part, _)| Event::submitted(part)));
            events
        }
        Fate::Retry { delay, error, .. } => {
            let mut event = step(Kind::Retried).error(&error.to_string());
            event.retry_in_ms = Some(delay.as_millis() as u64);
            vec![event]
        }
        Fate::DeadLetter { error, result, .. } => {
            let text = result.error.clone().unwrap_or_else(|| error.to_string());
            let failed = step(Kind::Failed).error(&text);
            let mut dead = Event::of_step(Kind::DeadLettered, env).at(failed.at);
            dead.reason = Some(warren_common::Reason::Failed.as_str().to_string());
            vec![failed, dead]
        }
    }
}
