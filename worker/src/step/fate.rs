//! What becomes of a delivery: pure decisions, tested without a broker. [`admit`] decides
//! before the step runs (may this message run here at all?), [`fate`] after it ran (hand the
//! output on, finish the job, retry later, or fail for good). `step/mod.rs` carries the answer
//! out; nothing here publishes, sleeps or counts.

use std::time::Duration;

use serde_json::Value;
use warren_broker::{Lane, StepRoute};
use warren_common::backoff::{nominal_retry_delay, retry_delay};
use warren_common::bundle::Bundle;
use warren_common::fanout::{parse_parts, Opened};
use warren_common::{decode, encode, Config, Envelope, JobId, Oversized, Reason, ResultEvent};

use super::runner::ServedStep;
use crate::handler::StepError;

/// A delivery that cannot run here: it goes to the dead-letter queue as it came.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SetAside {
    pub(crate) reason: Reason,
    pub(crate) text: String,
    /// The dead letter's message id, so `warren dlq show` can find it.
    pub(crate) id: String,
    /// The pipeline label of the dead-letter metric: only a pipeline of the config, since one
    /// from a message we could not place would be an unbounded label value.
    pub(crate) pipeline: Option<String>,
    /// The failed result that tells a waiting submitter, when the job is one of ours.
    pub(crate) result: Option<ResultEvent>,
}

/// What a delivery that may run here holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Admitted {
    /// One job's step message.
    Job(Envelope),
    /// A bundle of fan-out parts ([`warren_common::bundle`]): each part's encoded envelope, to
    /// be admitted on its own.
    Bundle(Vec<Vec<u8>>),
}

/// Decodes a delivery's `body` and checks it may run as `served`: it decodes (as an envelope or
/// a bundle of them), its input fits `max_payload_bytes`, and it names this step of a pipeline
/// in `config`. `message_id` is the delivery's own, the dead letter's id when the body is not
/// an envelope.
pub(crate) fn admit(
    body: &[u8],
    message_id: Option<&str>,
    config: &Config,
    served: &ServedStep,
) -> Result<Admitted, Box<SetAside>> {
    let env = match decode(body) {
        Ok(env) => env,
        Err(e) => {
            if let Some(bundle) = Bundle::decode(body) {
                let parts = bundle.parts.into_iter().map(|p| p.into_vec()).collect();
                return Ok(Admitted::Bundle(parts));
            }
            // Every dead letter gets an id: the original message id, else a fresh one.
            let id = message_id
                .filter(|id| !id.is_empty())
                .map_or_else(|| JobId::new().to_string(), str::to_string);
            return Err(Box::new(SetAside {
                reason: Reason::Undecodable,
                text: e.to_string(),
                id,
                pipeline: None,
                result: None,
            }));
        }
    };
    match check(body.len(), config, served, &env) {
        Ok(()) => Ok(Admitted::Job(env)),
        Err((reason, text)) => {
            let ours = config.pipeline(&env.pipeline).is_some();
            Err(Box::new(SetAside {
                id: env.job_id.to_string(),
                pipeline: ours.then(|| env.pipeline.clone()),
                result: ours.then(|| ResultEvent::failed(&env, format!("{reason}: {text}"))),
                reason,
                text,
            }))
        }
    }
}

/// Why a decoded envelope may not run here, if it may not.
fn check(
    body_len: usize,
    config: &Config,
    served: &ServedStep,
    env: &Envelope,
) -> Result<(), (Reason, String)> {
    let max = config.broker.max_payload_bytes;
    if let Some(size) = env.input_exceeds(body_len, max) {
        return Err((Reason::Oversized, Oversized { size, max }.to_string()));
    }
    let Some(pipeline) = config.pipeline(&env.pipeline) else {
        let text = format!("no pipeline {:?} in the config", env.pipeline);
        return Err((Reason::UnknownPipeline, text));
    };
    if pipeline.step(&env.step).is_none() {
        let text = format!("pipeline {} has no step {:?}", env.pipeline, env.step);
        return Err((Reason::UnknownStep, text));
    }
    let (here_pipeline, here_step) = (&served.pipeline.name, &served.step.name);
    if env.pipeline != *here_pipeline || env.step != *here_step {
        let text = format!(
            "message for {}/{} arrived on a queue of {here_pipeline}/{here_step}",
            env.pipeline, env.step
        );
        return Err((Reason::WrongQueue, text));
    }
    Ok(())
}

/// What becomes of a delivery once its step ran.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fate {
    /// Hand the output on: the next step's message, encoded, and where it goes.
    Next {
        envelope: Envelope,
        body: Vec<u8>,
        route: StepRoute,
    },
    /// The last step succeeded: the job's result.
    Finish(ResultEvent),
    /// A fan-out step succeeded: open the fan-out, then publish its first parts.
    FanOut(Box<FanOutPlan>),
    /// Run the step again after `delay` (the `nominal` delay with jitter): the next attempt's
    /// message, encoded, and the step queue it returns to.
    Retry {
        envelope: Envelope,
        body: Vec<u8>,
        route: StepRoute,
        nominal: Duration,
        delay: Duration,
        error: StepError,
    },
    /// The job failed for good: the message goes to the dead-letter queue (as
    /// [`Reason::Failed`], with the result's error as text), and the failed result out.
    DeadLetter {
        gave_up: GaveUp,
        error: StepError,
        /// The delivery's envelope, encoded again.
        body: Vec<u8>,
        result: ResultEvent,
    },
}

/// What a fan-out step's success publishes: the record that opens the fan-out, then the parts
/// the step releases itself (all, or the first `max_parts_in_flight`), each its pipeline's
/// first step message, encoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FanOutPlan {
    pub(crate) opened: Opened,
    pub(crate) parts: Vec<(Envelope, Vec<u8>)>,
}

/// [`fate`], for a step that may fan out: a fan-out step's output becomes a [`FanOutPlan`], or,
/// when it is not a valid list of parts, a permanent failure that says why.
pub(crate) fn decide(
    outcome: Result<Value, StepError>,
    env: &Envelope,
    served: &ServedStep,
    config: &Config,
    jitter: f64,
    hot: Option<Lane>,
) -> Fate {
    let max_payload = config.broker.max_payload_bytes;
    let outcome = match (&served.step.fan_out, outcome) {
        (Some(_), Ok(output)) => match fan_out(&output, env, served, config) {
            Ok(plan) => return Fate::FanOut(Box::new(plan)),
            Err(text) => Err(StepError::permanent(format!("fan_out: {text}"))),
        },
        (_, outcome) => outcome,
    };
    fate(outcome, env, served, max_payload, jitter, hot)
}

/// The plan of a fan-out step's `output`, or what is wrong with it.
fn fan_out(
    output: &Value,
    env: &Envelope,
    served: &ServedStep,
    config: &Config,
) -> Result<FanOutPlan, String> {
    let fan = served.step.fan_out.as_ref().expect("a fan-out step");
    let max = config.broker.max_payload_bytes;
    let Some(pipeline) = config.pipeline(&fan.pipeline) else {
        return Err(format!("no pipeline {:?} in the config", fan.pipeline));
    };
    let Some(join) = served.pipeline.next_step(&served.step.name) else {
        return Err("no next step to join the parts".into());
    };
    let parts = parse_parts(output, &env.tenant, env.priority)?;
    for (i, part) in parts.iter().enumerate() {
        if !pipeline.has_priority(part.priority) {
            return Err(format!(
                "part {i}: pipeline {} has no priority {}",
                pipeline.name, part.priority
            ));
        }
    }
    let opened = Opened::new(
        env,
        &join.name,
        &pipeline.name,
        parts,
        fan.on_part_failure,
        fan.max_parts_in_flight,
    );
    let first = &pipeline.first_step().name;
    let mut released = Vec::with_capacity(opened.released as usize);
    for i in 0..opened.total() {
        let part = opened.part_envelope(i, first);
        // Every part is checked, the ones the coordinator releases later too.
        let body = part
            .encode_within(max)
            .map_err(|e| format!("part {i}: {e}"))?;
        if i < opened.released {
            released.push((part, body));
        }
    }
    Ok(FanOutPlan {
        opened,
        parts: released,
    })
}

/// Why a failed step is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GaveUp {
    /// The error says retrying cannot help (or the output is over the size limit).
    Permanent,
    /// The last of `max_attempts` failed.
    AttemptsUsedUp,
}

impl GaveUp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GaveUp::Permanent => "permanent failure",
            GaveUp::AttemptsUsedUp => "attempts used up",
        }
    }
}

/// Decides what becomes of `env`'s delivery, given its step's `outcome`. An output travels as
/// the next step's input, so it obeys the same `max_payload` limit: a bigger one fails the
/// step for good, since running it again would give the same output. `jitter` in `[0, 1)`
/// places the retry delay within its jitter band.
pub(crate) fn fate(
    outcome: Result<Value, StepError>,
    env: &Envelope,
    served: &ServedStep,
    max_payload: usize,
    jitter: f64,
    hot: Option<Lane>,
) -> Fate {
    let error = match outcome {
        Ok(output) => match served.pipeline.next_step(&env.step) {
            None => return Fate::Finish(ResultEvent::succeeded(env, output)),
            Some(next) => {
                let envelope = env.next(&next.name, output);
                match envelope.encode_within(max_payload) {
                    Ok(body) => {
                        let route = route_of(served, &envelope, hot);
                        return Fate::Next {
                            envelope,
                            body,
                            route,
                        };
                    }
                    Err(Oversized { size, max }) => StepError::permanent(format!(
                        "output is {size} bytes, more than max_payload_bytes = {max}"
                    )),
                }
            }
        },
        Err(error) => error,
    };
    let step = &served.step;
    let gave_up = if !error.is_retryable() {
        GaveUp::Permanent
    } else if env.attempt >= step.max_attempts {
        GaveUp::AttemptsUsedUp
    } else {
        let envelope = env.retry();
        return Fate::Retry {
            body: encode(&envelope),
            route: route_of(served, &envelope, hot),
            nominal: nominal_retry_delay(&step.backoff, env.attempt),
            delay: retry_delay(&step.backoff, env.attempt, jitter),
            envelope,
            error,
        };
    };
    let text = format!("{}: {error}", gave_up.as_str());
    Fate::DeadLetter {
        gave_up,
        error,
        body: encode(env),
        result: ResultEvent::failed(env, text),
    }
}

/// Where `env` goes: its step's queue for its tenant and priority, in the tenant's hot lane
/// `hot` while it is hot, else in its shard.
fn route_of(served: &ServedStep, env: &Envelope, hot: Option<Lane>) -> StepRoute {
    match hot {
        Some(lane) => StepRoute::new(&served.pipeline.name, &env.step, env.priority, lane),
        None => StepRoute::for_tenant(
            &served.pipeline,
            &env.step,
            env.priority,
            env.tenant.as_str(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use proptest::prelude::*;
    use serde_json::json;
    use warren_common::{JobStatus, Priority, TenantId};

    use super::*;

    /// Most decisions here are for a tenant that is not hot.
    fn fate(
        outcome: Result<Value, StepError>,
        env: &Envelope,
        served: &ServedStep,
        max_payload: usize,
        jitter: f64,
    ) -> Fate {
        super::fate(outcome, env, served, max_payload, jitter, None)
    }
    use crate::command::CommandSpec;
    use crate::step::runner::Runner;

    const MAX: usize = 1024;

    fn config() -> Config {
        let toml = r#"
[broker]
namespace = "ns"
max_payload_bytes = 1024
[[pipelines]]
name = "p"
shards = 4
pins = { pinned = 3 }
[[pipelines.steps]]
name = "a"
handler = "h"
max_attempts = 3
backoff = ["1s", "10s"]
[[pipelines.steps]]
name = "b"
handler = "h"
max_attempts = 1
[[pipelines]]
name = "other"
[[pipelines.steps]]
name = "only"
handler = "h"
"#;
        Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap()
    }

    fn served(config: &Config, pipeline: &str, step: &str) -> ServedStep {
        let pipeline = config.pipeline(pipeline).unwrap();
        ServedStep {
            pipeline: pipeline.clone(),
            step: pipeline.step(step).unwrap().clone(),
            runner: Runner::Command(CommandSpec {
                argv: vec!["true".into()],
                pass_env: vec![],
            }),
        }
    }

    fn envelope(step: &str, tenant: &str, attempt: u32) -> Envelope {
        let tenant: TenantId = tenant.parse().unwrap();
        let job = Envelope::new_job(JobId::new(), tenant, "p", "a", Priority::High, json!(1));
        Envelope {
            step: step.into(),
            attempt,
            ..job
        }
    }

    fn route(step: &str, shard: u16) -> StepRoute {
        StepRoute {
            pipeline: "p".into(),
            step: step.into(),
            priority: Priority::High,
            lane: Lane::Shard(shard),
        }
    }

    #[test]
    fn success_hands_on_to_the_next_step_at_attempt_one() {
        let config = config();
        let env = envelope("a", "pinned", 2);
        let decided = fate(
            Ok(json!({"n": 2})),
            &env,
            &served(&config, "p", "a"),
            MAX,
            0.5,
        );
        let Fate::Next {
            envelope,
            body,
            route: to,
        } = decided
        else {
            panic!("{decided:?}")
        };
        assert_eq!((envelope.step.as_str(), envelope.attempt), ("b", 1));
        assert_eq!(envelope.input, json!({"n": 2}));
        assert_eq!(decode(&body).unwrap(), envelope);
        assert_eq!(to, route("b", 3));
    }

    #[test]
    fn a_hot_tenant_hands_on_and_retries_in_its_hot_lane() {
        let config = config();
        let env = envelope("a", "acme", 1);
        let served = served(&config, "p", "a");
        let hot = Some(Lane::Hot(1));
        let Fate::Next { route: to, .. } = super::fate(Ok(json!(1)), &env, &served, MAX, 0.5, hot)
        else {
            panic!("a success hands on")
        };
        assert_eq!(to, StepRoute::new("p", "b", env.priority, Lane::Hot(1)));
        let retry = super::fate(Err(StepError::retryable("x")), &env, &served, MAX, 0.5, hot);
        let Fate::Retry { route: again, .. } = retry else {
            panic!("{retry:?}")
        };
        assert_eq!(again, StepRoute::new("p", "a", env.priority, Lane::Hot(1)));
    }

    #[test]
    fn success_on_the_last_step_finishes_with_the_output() {
        let config = config();
        let env = envelope("b", "acme", 1);
        let decided = fate(
            Ok(json!("done")),
            &env,
            &served(&config, "p", "b"),
            MAX,
            0.5,
        );
        let Fate::Finish(result) = decided else {
            panic!("{decided:?}")
        };
        assert_eq!(result.status, JobStatus::Succeeded);
        assert_eq!(result.output, json!("done"));
        assert_eq!((result.step.as_str(), result.attempts), ("b", 1));
    }

    #[test]
    fn a_retry_waits_its_backoff_in_its_own_queue() {
        let config = config();
        let served = served(&config, "p", "a");
        let env = envelope("a", "pinned", 2);
        let decided = fate(Err(StepError::retryable("flaky")), &env, &served, MAX, 0.0);
        let Fate::Retry {
            envelope,
            route: to,
            nominal,
            delay,
            ..
        } = decided
        else {
            panic!("{decided:?}")
        };
        assert_eq!((envelope.step.as_str(), envelope.attempt), ("a", 3));
        assert_eq!(to, route("a", 3));
        assert_eq!(nominal, Duration::from_secs(10));
        assert_eq!(delay, Duration::from_secs(9));
    }

    #[test]
    fn the_last_attempt_and_a_permanent_error_fail_for_good() {
        let config = config();
        let served = served(&config, "p", "a");
        let env = envelope("a", "acme", 3);
        let decided = fate(Err(StepError::retryable("flaky")), &env, &served, MAX, 0.5);
        let Fate::DeadLetter {
            gave_up,
            body,
            result,
            ..
        } = decided
        else {
            panic!("{decided:?}")
        };
        assert_eq!(gave_up, GaveUp::AttemptsUsedUp);
        assert_eq!(decode(&body).unwrap(), env);
        assert_eq!(result.status, JobStatus::Failed);
        assert_eq!(result.error.as_deref(), Some("attempts used up: flaky"));

        let env = envelope("a", "acme", 1);
        let decided = fate(Err(StepError::permanent("bad")), &env, &served, MAX, 0.5);
        let Fate::DeadLetter { result, .. } = decided else {
            panic!("{decided:?}")
        };
        assert_eq!(result.error.as_deref(), Some("permanent failure: bad"));
    }

    #[test]
    fn an_oversized_output_fails_for_good() {
        let config = config();
        let env = envelope("a", "acme", 1);
        let big = json!("x".repeat(2 * MAX));
        let decided = fate(Ok(big), &env, &served(&config, "p", "a"), MAX, 0.5);
        let Fate::DeadLetter {
            gave_up, result, ..
        } = decided
        else {
            panic!("{decided:?}")
        };
        assert_eq!(gave_up, GaveUp::Permanent);
        let error = result.error.unwrap();
        assert!(
            error.starts_with("permanent failure: output is ")
                && error.ends_with("more than max_payload_bytes = 1024"),
            "{error}"
        );
    }

    #[test]
    fn a_fan_out_step_opens_its_fan_out_or_fails_for_good_saying_why() {
        let toml = r#"
[broker]
namespace = "ns"
max_payload_bytes = 1024
[[pipelines]]
name = "p"
[[pipelines.steps]]
name = "plan"
handler = "h"
fan_out = "part"
max_parts_in_flight = 2
[[pipelines.steps]]
name = "join"
handler = "h"
[[pipelines]]
name = "part"
priorities = ["normal"]
[[pipelines.steps]]
name = "x"
handler = "h"
"#;
        let config = Config::parse(toml, "t", Path::new("."), &HashMap::new()).unwrap();
        let served = served(&config, "p", "plan");
        let env = Envelope {
            step: "plan".into(),
            priority: Priority::Normal,
            ..envelope("plan", "acme", 1)
        };
        let output = json!([{"payload": 1}, {"payload": 2, "tenant": "globex"}, {"payload": 3}]);
        let Fate::FanOut(plan) = decide(Ok(output), &env, &served, &config, 0.5, None) else {
            panic!("a list of parts fans out")
        };
        assert_eq!((plan.opened.total(), plan.opened.released), (3, 2));
        assert_eq!(plan.parts.len(), 2);
        assert_eq!(plan.opened.join_step, "join");
        let (part, body) = &plan.parts[1];
        assert_eq!((part.pipeline.as_str(), part.step.as_str()), ("part", "x"));
        assert_eq!(part.tenant.as_str(), "globex");
        assert_eq!(part.part_of.unwrap().job_id, env.job_id);
        assert_eq!(&decode(body).unwrap(), part);
        for (bad, says) in [
            (json!({"a": 1}), "must be a JSON array"),
            (
                json!([{"payload": 1, "priority": "high"}]),
                "has no priority high",
            ),
            (
                json!([{"payload": "x".repeat(2 * MAX)}]),
                "part 0: input is",
            ),
        ] {
            let decided = decide(Ok(bad), &env, &served, &config, 0.5, None);
            let Fate::DeadLetter {
                gave_up, result, ..
            } = decided
            else {
                panic!("{decided:?}")
            };
            assert_eq!(gave_up, GaveUp::Permanent);
            let error = result.error.unwrap();
            assert!(
                error.contains("fan_out: ") && error.contains(says),
                "{error}"
            );
        }
    }

    #[test]
    fn admit_sets_aside_what_cannot_run_here() {
        let config = config();
        let served = served(&config, "p", "a");
        let set_aside = |env: &Envelope| admit(&encode(env), None, &config, &served).unwrap_err();

        let garbage = admit(b"\x01junk", Some("m-1"), &config, &served).unwrap_err();
        assert_eq!(garbage.reason, Reason::Undecodable);
        assert_eq!((garbage.id.as_str(), garbage.pipeline), ("m-1", None));
        assert_eq!(garbage.result, None);
        let fresh = admit(b"\x01junk", Some(""), &config, &served).unwrap_err();
        assert!(fresh.id.parse::<JobId>().is_ok(), "{}", fresh.id);

        let mut env = envelope("a", "acme", 1);
        env.input = json!("x".repeat(2 * MAX));
        let big = set_aside(&env);
        assert_eq!(big.reason, Reason::Oversized);
        assert!(big.text.starts_with("input is "), "{}", big.text);
        assert_eq!(big.id, env.job_id.to_string());
        assert_eq!(big.pipeline.as_deref(), Some("p"));
        let result = big.result.unwrap();
        assert!(result.error.unwrap().starts_with("oversized: input is "));

        let env = Envelope {
            pipeline: "gone".into(),
            ..envelope("a", "acme", 1)
        };
        let unknown = set_aside(&env);
        assert_eq!(unknown.reason, Reason::UnknownPipeline);
        assert_eq!((unknown.pipeline, unknown.result), (None, None));

        let unknown = set_aside(&envelope("zz", "acme", 1));
        assert_eq!(unknown.reason, Reason::UnknownStep);
        assert_eq!(unknown.text, "pipeline p has no step \"zz\"");

        let wrong = set_aside(&envelope("b", "acme", 1));
        assert_eq!(wrong.reason, Reason::WrongQueue);
        assert_eq!(wrong.text, "message for p/b arrived on a queue of p/a");
        assert_eq!(
            wrong.result.unwrap().error.as_deref(),
            Some("wrong-queue: message for p/b arrived on a queue of p/a")
        );

        let env = envelope("a", "acme", 1);
        assert_eq!(
            admit(&encode(&env), None, &config, &served),
            Ok(Admitted::Job(env.clone()))
        );

        // A bundle is admitted as its parts, each to be checked on its own.
        let parts = vec![encode(&env), encode(&envelope("b", "acme", 1))];
        let bundle = Bundle::new("acme", parts.clone()).encode();
        assert_eq!(
            admit(&bundle, None, &config, &served),
            Ok(Admitted::Bundle(parts))
        );
    }

    fn any_outcome() -> impl Strategy<Value = Result<Value, StepError>> {
        prop_oneof![
            any::<i64>().prop_map(|n| Ok(json!(n))),
            (0..3 * MAX).prop_map(|len| Ok(json!("x".repeat(len)))),
            "[a-z ]{0,20}".prop_map(|e| Err(StepError::retryable(e))),
            "[a-z ]{0,20}".prop_map(|e| Err(StepError::permanent(e))),
        ]
    }

    proptest! {
        #[test]
        fn whatever_arrives_is_admitted_or_set_aside_with_an_id(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            step in prop_oneof![Just("a"), Just("b"), Just("zz")],
            tenant in "[a-z]{1,8}",
        ) {
            let config = config();
            let served = served(&config, "p", "a");
            let env = envelope(step, &tenant, 1);
            for body in [bytes, encode(&env)] {
                match admit(&body, Some("m"), &config, &served) {
                    Ok(Admitted::Job(admitted)) => {
                        prop_assert_eq!(admitted.pipeline.as_str(), "p");
                        prop_assert_eq!(admitted.step.as_str(), "a");
                    }
                    // Random bytes are no bundle: a bundle needs its named keys.
                    Ok(Admitted::Bundle(parts)) => prop_assert!(false, "a bundle: {parts:?}"),
                    Err(aside) => {
                        prop_assert!(!aside.id.is_empty());
                        // A failed result goes out exactly for a job of a known pipeline.
                        prop_assert_eq!(aside.result.is_some(), aside.pipeline.is_some());
                    }
                }
            }
        }

        #[test]
        fn decisions_keep_their_promises(
            outcome in any_outcome(),
            last_step in any::<bool>(),
            max_attempts in 1u32..6,
            attempt_offset in 0u32..6,
            tenant in "[a-z]{1,8}",
            jitter in 0.0f64..1.0,
        ) {
            let config = config();
            let mut served = served(&config, "p", if last_step { "b" } else { "a" });
            served.step.max_attempts = max_attempts;
            // Attempts run from 1 to max_attempts.
            let attempt = 1 + attempt_offset % max_attempts;
            let env = envelope(&served.step.name, &tenant, attempt);
            let decided = fate(outcome.clone(), &env, &served, MAX, jitter);
            match (&outcome, decided) {
                (Ok(output), Fate::Finish(result)) => {
                    prop_assert!(last_step);
                    prop_assert_eq!(&result.output, output);
                }
                (Ok(output), Fate::Next { envelope, body, route }) => {
                    prop_assert!(!last_step);
                    prop_assert_eq!(envelope.attempt, 1);
                    prop_assert_eq!(&envelope.input, output);
                    prop_assert_eq!(envelope.encode_within(MAX), Ok(body));
                    let shard = served.pipeline.shard_of(&tenant);
                    prop_assert_eq!(route.lane, Lane::Shard(shard));
                    prop_assert_eq!(route, StepRoute::for_tenant(&served.pipeline, "b", Priority::High, &tenant));
                }
                (Ok(output), Fate::DeadLetter { gave_up, .. }) => {
                    // Only an output too big for the next step's input fails a success.
                    prop_assert!(!last_step);
                    prop_assert_eq!(gave_up, GaveUp::Permanent);
                    prop_assert!(env.next("b", output.clone()).encode_within(MAX).is_err());
                }
                (Err(e), Fate::Retry { envelope, nominal, delay, error, route, .. }) => {
                    prop_assert!(e.is_retryable());
                    prop_assert_eq!(&error, e);
                    prop_assert!(attempt < max_attempts);
                    prop_assert_eq!(envelope.attempt, attempt + 1);
                    prop_assert!(envelope.attempt <= max_attempts);
                    prop_assert_eq!(nominal, nominal_retry_delay(&served.step.backoff, attempt));
                    prop_assert_eq!(delay, retry_delay(&served.step.backoff, attempt, jitter));
                    prop_assert_eq!(route.step, env.step.clone());
                }
                (Err(e), Fate::DeadLetter { gave_up, error, result, .. }) => {
                    prop_assert_eq!(&error, e);
                    let expected = if e.is_retryable() {
                        prop_assert_eq!(attempt, max_attempts);
                        GaveUp::AttemptsUsedUp
                    } else {
                        GaveUp::Permanent
                    };
                    prop_assert_eq!(gave_up, expected);
                    prop_assert_eq!(result.status, JobStatus::Failed);
                    prop_assert_eq!(result.attempts, attempt);
                }
                (outcome, fate) => prop_assert!(false, "{outcome:?} became {fate:?}"),
            }
        }
    }
}
