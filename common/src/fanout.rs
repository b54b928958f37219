//! Fan-out / fan-in, the pure part: what a fan-out step's output must look like, the ids of its
//! parts, the record that opens a fan-out, and the fold of part completions into the join
//! decision. The fold is set-based, keyed by part index: a completion seen twice (at-least-once
//! delivery, a refold after a crash) changes nothing, and a success supersedes a failure (a part
//! replayed from the dead-letter queue). The worker's coordinator (worker/src/fanin/) carries the
//! decisions out; docs/ARCHITECTURE.md, "Fan-out / fan-in", tells the whole story.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::OnPartFailure;
use crate::envelope::{now_ms, Envelope, JobStatus, ResultEvent, FORMAT_VERSION};
use crate::shard::fnv1a64;
use crate::trace::TraceParent;
use crate::{JobId, Priority, TenantId};

/// Which fan-out a job is a part of: on a part's every step message and on its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOf {
    /// The job whose fan-out step made this part (the join continues that job).
    pub job_id: JobId,
    /// 0-based position in the fan-out step's output.
    pub part: u32,
    pub total: u32,
}

/// One part, checked: a job of the fan-out's pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartSpec {
    pub tenant: TenantId,
    pub priority: Priority,
    pub payload: Value,
}

/// A part as a fan-out step writes it; tenant and priority default to the parent job's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPart {
    payload: Value,
    tenant: Option<String>,
    priority: Option<Priority>,
}

/// Reads a fan-out step's output: a JSON array of `{"payload", "tenant"?, "priority"?}`. The
/// error says what is wrong and where, for the dead letter.
pub fn parse_parts(
    output: &Value,
    parent_tenant: &TenantId,
    parent_priority: Priority,
) -> Result<Vec<PartSpec>, String> {
    let Value::Array(items) = output else {
        return Err(format!(
            "a fan_out step's output must be a JSON array of parts, got {}",
            kind_of(output)
        ));
    };
    if items.len() > u32::MAX as usize {
        return Err("too many parts".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let raw = RawPart::deserialize(item).map_err(|e| format!("part {i}: {e}"))?;
            let tenant = match raw.tenant {
                Some(t) => TenantId::parse(t).map_err(|e| format!("part {i}: {e}"))?,
                None => parent_tenant.clone(),
            };
            Ok(PartSpec {
                tenant,
                priority: raw.priority.unwrap_or(parent_priority),
                payload: raw.payload,
            })
        })
        .collect()
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The job id of part `index` of `parent`'s fan-out: the same on every run of the fan-out step,
/// so a repeat after a crash republishes the same jobs. It is a UUID v7 carrying the parent's
/// time, so a waiter reading results from a job's id-time sees the part's result.
pub fn part_job_id(parent: JobId, index: u32) -> JobId {
    let mut bytes = *parent.as_uuid().as_bytes();
    let mut seed = bytes.to_vec();
    seed.extend_from_slice(&index.to_be_bytes());
    let a = fnv1a64(&seed).to_be_bytes();
    seed.push(0x5a);
    let b = fnv1a64(&seed).to_be_bytes();
    bytes[6..14].copy_from_slice(&a);
    bytes[14..16].copy_from_slice(&b[..2]);
    bytes[6] = (bytes[6] & 0x0f) | 0x70; // version 7
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    JobId::from_uuid(uuid::Uuid::from_bytes(bytes))
}

/// The record that opens a fan-out, appended to the fan-in stream (confirmed) before any part
/// is published: everything the coordinator needs to release the remaining parts and to
/// publish the join step's message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    pub v: u32,
    /// The job whose fan-out step ran (the join continues it, under the same id).
    pub parent: JobId,
    pub tenant: TenantId,
    pub pipeline: String,
    #[serde(default)]
    pub priority: Priority,
    /// The step after the fan-out step.
    pub join_step: String,
    /// The fan-out step's input: the join's input carries it as `input`.
    pub input: Value,
    /// The pipeline every part is a job of.
    pub part_pipeline: String,
    pub parts: Vec<PartSpec>,
    pub on_part_failure: OnPartFailure,
    #[serde(default)]
    pub max_parts_in_flight: Option<u32>,
    /// Parts the fan-out step published itself: the first ones, up to `max_parts_in_flight`.
    pub released: u32,
    #[serde(default)]
    pub submitted_at: u64,
    #[serde(default)]
    pub traceparent: Option<String>,
    /// When the parent is itself a part of another fan-out.
    #[serde(default)]
    pub part_of: Option<PartOf>,
}

impl Opened {
    /// Opens a fan-out of `parts` for `env`, whose step fans out to `part_pipeline`.
    pub fn new(
        env: &Envelope,
        join_step: &str,
        part_pipeline: &str,
        parts: Vec<PartSpec>,
        on_part_failure: OnPartFailure,
        max_parts_in_flight: Option<u32>,
    ) -> Self {
        let total = parts.len() as u32;
        Self {
            v: FORMAT_VERSION,
            parent: env.job_id,
            tenant: env.tenant.clone(),
            pipeline: env.pipeline.clone(),
            priority: env.priority,
            join_step: join_step.to_string(),
            input: env.input.clone(),
            part_pipeline: part_pipeline.to_string(),
            parts,
            on_part_failure,
            max_parts_in_flight,
            released: max_parts_in_flight.map_or(total, |p| p.min(total)),
            submitted_at: env.submitted_at,
            traceparent: env.traceparent.clone(),
            part_of: env.part_of,
        }
    }

    pub fn total(&self) -> u32 {
        self.parts.len() as u32
    }

    /// The first step's message of part `index` (its pipeline's `first_step`).
    pub fn part_envelope(&self, index: u32, first_step: &str) -> Envelope {
        let spec = &self.parts[index as usize];
        let mut env = Envelope::new_job(
            part_job_id(self.parent, index),
            spec.tenant.clone(),
            &self.part_pipeline,
            first_step,
            spec.priority,
            spec.payload.clone(),
        );
        // One trace for the whole fan-out.
        if let Some(trace) = self
            .traceparent
            .as_deref()
            .and_then(|t| t.parse::<TraceParent>().ok())
        {
            env.traceparent = Some(trace.child().to_string());
        }
        env.part_of = Some(PartOf {
            job_id: self.parent,
            part: index,
            total: self.total(),
        });
        env
    }

    /// The join step's message: the parent job, moving on with the parts' results.
    pub fn join_envelope(&self, input: Value) -> Envelope {
        let parent = Envelope {
            v: FORMAT_VERSION,
            job_id: self.parent,
            tenant: self.tenant.clone(),
            pipeline: self.pipeline.clone(),
            step: String::new(),
            priority: self.priority,
            attempt: 1,
            input: Value::Null,
            submitted_at: self.submitted_at,
            published_at: now_ms(),
            traceparent: self.traceparent.clone(),
            part_of: self.part_of,
        };
        parent.next(&self.join_step, input)
    }
}

/// How one part ended, as its result event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartEnd {
    pub job_id: JobId,
    pub tenant: TenantId,
    pub status: JobStatus,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub error: Option<String>,
}

impl PartEnd {
    /// The part a result event ends, if the job was a part.
    pub fn of(event: &ResultEvent) -> Option<(PartOf, PartEnd)> {
        let part_of = event.part_of?;
        let end = PartEnd {
            job_id: event.job_id,
            tenant: event.tenant.clone(),
            status: event.status,
            output: event.output.clone(),
            error: event.error.clone(),
        };
        Some((part_of, end))
    }
}

/// A part's end as the fan-in stream holds it. Workers append ends in batches: one `fanin.ends`
/// message is one or more of these maps, back to back, so a batch is the concatenation of
/// its ends' encodings (each end is encoded once, by the task that ended the part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedPart {
    pub v: u32,
    pub part_of: PartOf,
    pub end: PartEnd,
}

impl EndedPart {
    /// The end a result event reports, if the job was a part.
    pub fn of(event: &ResultEvent) -> Option<Self> {
        let (part_of, end) = PartEnd::of(event)?;
        Some(Self {
            v: FORMAT_VERSION,
            part_of,
            end,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a part end encodes")
    }

    /// Reads a batch. An unreadable end ends the read (what follows it cannot be found): the
    /// ends before it are returned.
    pub fn decode_batch(body: &[u8]) -> Vec<Self> {
        crate::codec::decode_concatenated(body)
    }
}

/// One open fan-out, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub opened: Opened,
    /// Ended parts by index: a set, so duplicates count once.
    pub ended: BTreeMap<u32, PartEnd>,
    /// Parts published so far: 0..released.
    pub released: u32,
    /// Where in the fan-in stream its opened record is, or before it: a resuming coordinator
    /// reads the record (and the parts' outputs) back from there. 0 when unknown (a run from a
    /// checkpoint of the first format): read from the stream's start.
    #[serde(default)]
    pub opened_offset: u64,
}

impl Run {
    pub fn succeeded(&self) -> u32 {
        self.ended
            .values()
            .filter(|e| e.status == JobStatus::Succeeded)
            .count() as u32
    }

    /// Whether the join may run: every part ended (`continue`) or succeeded (`wait`).
    pub fn complete(&self) -> bool {
        let total = self.opened.total();
        match self.opened.on_part_failure {
            OnPartFailure::Continue => self.ended.len() as u32 == total,
            // Counting successes walks every part: only once every part has ended.
            OnPartFailure::Wait => self.ended.len() as u32 == total && self.succeeded() == total,
        }
    }

    /// Released parts that have not ended.
    pub fn in_flight(&self) -> u32 {
        let ended_released = self.ended.range(..self.released).count() as u32;
        self.released - ended_released
    }

    /// The join step's input, at most `max_bytes` in MessagePack where it can be. When the
    /// parts' outputs would make it bigger, `parts` keeps ids and statuses only and
    /// `outputs_omitted` says so; when even those would (tens of thousands of parts), `parts` is
    /// empty and `parts_omitted` says so. What is left out stays in the results stream
    /// (`warren results --parent`).
    pub fn join_input(&self, max_bytes: usize) -> Value {
        let total = self.opened.total();
        let succeeded = self.succeeded();
        let build = |listed: Listed| {
            let parts: Vec<Value> = match listed {
                Listed::Nothing => Vec::new(),
                Listed::Statuses | Listed::Outputs => self
                    .ended
                    .values()
                    .map(|end| {
                        let mut part = json!({
                            "job_id": end.job_id.to_string(),
                            "tenant": end.tenant.as_str(),
                            "status": end.status.as_str(),
                        });
                        if listed == Listed::Outputs {
                            part["output"] = end.output.clone();
                        }
                        if let Some(error) = &end.error {
                            part["error"] = json!(error);
                        }
                        part
                    })
                    .collect(),
            };
            json!({
                "input": self.opened.input,
                "total": total,
                "succeeded": succeeded,
                "failed": self.ended.len() as u32 - succeeded,
                "parts": parts,
                "outputs_omitted": listed != Listed::Outputs,
                "parts_omitted": listed == Listed::Nothing,
            })
        };
        let fits =
            |input: &Value| rmp_serde::to_vec_named(input).is_ok_and(|b| b.len() <= max_bytes);
        [Listed::Outputs, Listed::Statuses]
            .into_iter()
            .map(build)
            .find(fits)
            .unwrap_or_else(|| build(Listed::Nothing))
    }
}

/// How much of each part a join's input lists, from the most to the least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    Outputs,
    Statuses,
    Nothing,
}

/// What the coordinator must do after a fold step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Publish part `index` of `parent`'s fan-out.
    Release { parent: JobId, index: u32 },
    /// Publish the join step's message of `parent`'s fan-out; the run is then forgotten.
    Join { parent: JobId },
}

/// Every open fan-out, and where in the fan-in stream they were read to: the coordinator's
/// whole state, and its checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    pub runs: BTreeMap<JobId, Run>,
    /// The fan-in stream offset to read from next.
    pub next_offset: u64,
}

impl Fold {
    /// A fan-out opened (its record at an unknown offset). A repeat (the fan-out step ran
    /// twice) keeps what is known.
    pub fn open(&mut self, opened: Opened) -> Vec<Effect> {
        self.open_at(opened, 0)
    }

    /// A fan-out opened, its record read at stream offset `offset`.
    pub fn open_at(&mut self, opened: Opened, offset: u64) -> Vec<Effect> {
        let parent = opened.parent;
        if self.runs.contains_key(&parent) {
            return Vec::new();
        }
        let released = opened.released.min(opened.total());
        self.runs.insert(
            parent,
            Run {
                opened,
                ended: BTreeMap::new(),
                released,
                opened_offset: offset,
            },
        );
        self.decide(parent)
    }

    /// A part ended. Unknown fan-outs (their join already ran) are ignored; a success is final.
    pub fn end(&mut self, part_of: PartOf, end: PartEnd) -> Vec<Effect> {
        let Some(run) = self.runs.get_mut(&part_of.job_id) else {
            return Vec::new();
        };
        if part_of.part >= run.opened.total() {
            return Vec::new();
        }
        match run.ended.get(&part_of.part) {
            Some(known) if known.status == JobStatus::Succeeded => return Vec::new(),
            _ => {
                run.ended.insert(part_of.part, end);
            }
        }
        self.decide(part_of.job_id)
    }

    /// Releases up to the window, or the join once complete.
    fn decide(&mut self, parent: JobId) -> Vec<Effect> {
        let Some(run) = self.runs.get_mut(&parent) else {
            return Vec::new();
        };
        if run.complete() {
            return vec![Effect::Join { parent }];
        }
        let total = run.opened.total();
        let window = run.opened.max_parts_in_flight.unwrap_or(u32::MAX);
        let mut effects = Vec::new();
        while run.released < total && run.in_flight() < window {
            effects.push(Effect::Release {
                parent,
                index: run.released,
            });
            run.released += 1;
        }
        effects
    }

    /// Forgets a fan-out whose join was published.
    pub fn close(&mut self, parent: JobId) -> Option<Run> {
        self.runs.remove(&parent)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parent_env() -> Envelope {
        Envelope::new_job(
            JobId::new(),
            "acme".parse().unwrap(),
            "nightly",
            "plan",
            Priority::Normal,
            json!({"day": 1}),
        )
    }

    fn opened(total: u32, policy: OnPartFailure, window: Option<u32>) -> Opened {
        let parts = (0..total)
            .map(|i| PartSpec {
                tenant: format!("t{}", i % 7).parse().unwrap(),
                priority: Priority::Normal,
                payload: json!(i),
            })
            .collect();
        Opened::new(&parent_env(), "notify", "part", parts, policy, window)
    }

    fn end(opened: &Opened, i: u32, ok: bool) -> (PartOf, PartEnd) {
        let part_of = PartOf {
            job_id: opened.parent,
            part: i,
            total: opened.total(),
        };
        let end = PartEnd {
            job_id: part_job_id(opened.parent, i),
            tenant: opened.parts[i as usize].tenant.clone(),
            status: if ok {
                JobStatus::Succeeded
            } else {
                JobStatus::Failed
            },
            output: if ok { json!(i * 10) } else { Value::Null },
            error: (!ok).then(|| "boom".to_string()),
        };
        (part_of, end)
    }

    #[test]
    fn parts_are_read_with_defaults_and_errors_say_where() {
        let tenant: TenantId = "acme".parse().unwrap();
        let output =
            json!([{"payload": 1}, {"payload": {"a": 2}, "tenant": "globex", "priority": "high"}]);
        let parts = parse_parts(&output, &tenant, Priority::Low).unwrap();
        assert_eq!(parts[0].tenant.as_str(), "acme");
        assert_eq!(parts[0].priority, Priority::Low);
        assert_eq!(
            (parts[1].tenant.as_str(), parts[1].priority),
            ("globex", Priority::High)
        );
        let e = parse_parts(&json!({"a": 1}), &tenant, Priority::Low).unwrap_err();
        assert!(
            e.contains("must be a JSON array") && e.contains("an object"),
            "{e}"
        );
        let e = parse_parts(
            &json!([{"payload": 1}, {"tenant": "x"}]),
            &tenant,
            Priority::Low,
        )
        .unwrap_err();
        assert!(e.starts_with("part 1:") && e.contains("payload"), "{e}");
        let e = parse_parts(
            &json!([{"payload": 1, "tenant": "a b"}]),
            &tenant,
            Priority::Low,
        )
        .unwrap_err();
        assert!(e.starts_with("part 0:"), "{e}");
        let e =
            parse_parts(&json!([{"payload": 1, "extra": 2}]), &tenant, Priority::Low).unwrap_err();
        assert!(e.contains("extra"), "{e}");
        assert_eq!(parse_parts(&json!([]), &tenant, Priority::Low), Ok(vec![]));
    }

    #[test]
    fn part_ids_are_deterministic_distinct_and_carry_the_parents_time() {
        let parent = JobId::new();
        let a = part_job_id(parent, 0);
        assert_eq!(a, part_job_id(parent, 0));
        assert_ne!(a, part_job_id(parent, 1));
        assert_ne!(a, part_job_id(JobId::new(), 0));
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert_eq!(a.timestamp_ms(), parent.timestamp_ms());
        let ids: std::collections::HashSet<_> =
            (0..10_000).map(|i| part_job_id(parent, i)).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn a_window_releases_one_part_per_ended_part() {
        let opened = opened(5, OnPartFailure::Continue, Some(2));
        assert_eq!(opened.released, 2);
        let mut fold = Fold::default();
        assert_eq!(fold.open(opened.clone()), vec![]);
        let (p, e) = end(&opened, 0, true);
        let parent = opened.parent;
        assert_eq!(
            fold.end(p, e.clone()),
            vec![Effect::Release { parent, index: 2 }]
        );
        assert_eq!(fold.end(p, e), vec![], "a duplicate releases nothing");
        let (p, e) = end(&opened, 1, false);
        assert_eq!(fold.end(p, e), vec![Effect::Release { parent, index: 3 }]);
    }

    #[test]
    fn wait_holds_the_join_until_a_failed_part_succeeds() {
        let opened = opened(3, OnPartFailure::Wait, None);
        let parent = opened.parent;
        let mut fold = Fold::default();
        fold.open(opened.clone());
        for (i, ok) in [(0, true), (1, false), (2, true)] {
            let (p, e) = end(&opened, i, ok);
            assert_eq!(fold.end(p, e), vec![]);
        }
        let (p, e) = end(&opened, 1, true);
        assert_eq!(fold.end(p, e), vec![Effect::Join { parent }]);
        let run = fold.close(parent).unwrap();
        let input = run.join_input(1 << 20);
        assert_eq!(
            (input["succeeded"].clone(), input["failed"].clone()),
            (json!(3), json!(0))
        );
        assert_eq!(input["input"], json!({"day": 1}));
        assert_eq!(input["parts"][1]["output"], json!(10));
        // Late news of a closed fan-out is ignored.
        let (p, e) = end(&opened, 1, false);
        assert_eq!(fold.end(p, e), vec![]);
    }

    #[test]
    fn big_outputs_leave_ids_and_statuses_only() {
        let opened = opened(2, OnPartFailure::Continue, None);
        let mut fold = Fold::default();
        fold.open(opened.clone());
        for i in 0..2 {
            let (p, mut e) = end(&opened, i, true);
            e.output = json!("x".repeat(600));
            fold.end(p, e);
        }
        let run = &fold.runs[&opened.parent];
        let input = run.join_input(1000);
        assert_eq!(input["outputs_omitted"], json!(true));
        assert!(input["parts"][0].get("output").is_none());
        assert_eq!(input["parts"][0]["status"], json!("succeeded"));
        assert_eq!(run.join_input(1 << 20)["outputs_omitted"], json!(false));
        assert_eq!(input["parts_omitted"], json!(false));
    }

    #[test]
    fn too_many_parts_for_the_limit_leave_counts_only() {
        let opened = opened(3, OnPartFailure::Continue, None);
        let mut fold = Fold::default();
        fold.open(opened.clone());
        for i in 0..3 {
            let (p, e) = end(&opened, i, i != 1);
            fold.end(p, e);
        }
        let run = &fold.runs[&opened.parent];
        let full = run.join_input(1 << 20);
        let listed = rmp_serde::to_vec_named(&full).unwrap().len();
        // A limit under even the ids and statuses of three parts.
        let input = run.join_input(listed / 3);
        assert_eq!(
            (&input["parts_omitted"], &input["outputs_omitted"]),
            (&json!(true), &json!(true))
        );
        assert_eq!(input["parts"], json!([]));
        assert_eq!(
            (&input["total"], &input["succeeded"], &input["failed"]),
            (&json!(3), &json!(2), &json!(1))
        );
        assert!(rmp_serde::to_vec_named(&input).unwrap().len() <= listed / 3);
    }

    #[test]
    fn the_join_envelope_continues_the_parent() {
        let opened = opened(1, OnPartFailure::Continue, None);
        let join = opened.join_envelope(json!({"total": 1}));
        assert_eq!(
            (join.job_id, join.step.as_str(), join.attempt),
            (opened.parent, "notify", 1)
        );
        assert_eq!(join.pipeline, "nightly");
        let part = opened.part_envelope(0, "first");
        assert_eq!(part.part_of.unwrap().job_id, opened.parent);
        assert_eq!(part.job_id, part_job_id(opened.parent, 0));
        assert_eq!(
            part.trace().unwrap().trace_id_hex(),
            join.trace().unwrap().trace_id_hex()
        );
    }

    #[test]
    fn a_batch_of_ends_reads_back_in_order_up_to_a_bad_end() {
        let opened = opened(3, OnPartFailure::Continue, None);
        let ends: Vec<EndedPart> = (0..3)
            .map(|i| {
                let (part_of, end) = end(&opened, i, i != 1);
                EndedPart {
                    v: FORMAT_VERSION,
                    part_of,
                    end,
                }
            })
            .collect();
        let mut batch: Vec<u8> = ends.iter().flat_map(EndedPart::encode).collect();
        assert_eq!(EndedPart::decode_batch(&batch), ends);
        // A torn tail loses only itself.
        batch.truncate(batch.len() - 3);
        assert_eq!(EndedPart::decode_batch(&batch), ends[..2]);
        assert!(EndedPart::decode_batch(&[]).is_empty());
    }

    /// Each part's outcomes, each delivered one or more times, in any order.
    fn deliveries() -> impl Strategy<Value = (u32, Option<u32>, bool, Vec<(u32, bool)>)> {
        (1u32..40, proptest::option::of(1u32..10), any::<bool>()).prop_flat_map(
            |(total, window, wait)| {
                let outcomes = proptest::collection::vec(any::<bool>(), total as usize);
                let repeats = proptest::collection::vec(1usize..3, total as usize);
                (outcomes, repeats, any::<u64>()).prop_map(move |(outcomes, repeats, seed)| {
                    let mut list: Vec<(u32, bool)> = Vec::new();
                    for (i, ok) in outcomes.iter().enumerate() {
                        for _ in 0..repeats[i] {
                            list.push((i as u32, *ok));
                        }
                    }
                    // A seeded shuffle.
                    let mut state = seed | 1;
                    for i in (1..list.len()).rev() {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        list.swap(i, (state % (i as u64 + 1)) as usize);
                    }
                    (total, window, wait, list)
                })
            },
        )
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates_gives_the_same_join(
            (total, window, wait, list) in deliveries(),
        ) {
            let policy = if wait { OnPartFailure::Wait } else { OnPartFailure::Continue };
            let opened = opened(total, policy, window);
            let parent = opened.parent;
            let mut fold = Fold::default();
            let mut released: Vec<u32> = (0..opened.released).collect();
            prop_assert!(fold.open(opened.clone()).is_empty());
            let mut joins = 0;
            let mut joined = None;
            for (i, ok) in &list {
                // Parts only end once released: hold back news of the others.
                let (p, e) = end(&opened, *i, *ok);
                for effect in fold.end(p, e) {
                    match effect {
                        Effect::Release { index, .. } => released.push(index),
                        Effect::Join { parent: p } => {
                            prop_assert_eq!(p, parent);
                            joins += 1;
                            joined = fold.close(parent);
                        }
                    }
                }
                if let (Some(run), Some(w)) = (fold.runs.get(&parent), window) {
                    prop_assert!(run.in_flight() <= w);
                }
            }
            let expected_succeeded = (0..total)
                .filter(|i| list.iter().any(|(j, ok)| j == i && *ok))
                .count() as u32;
            let all_ok = expected_succeeded == total;
            if wait && !all_ok {
                prop_assert_eq!(joins, 0);
            } else {
                prop_assert_eq!(joins, 1);
                let input = joined.unwrap().join_input(1 << 20);
                prop_assert_eq!(input["total"].clone(), json!(total));
                prop_assert_eq!(input["succeeded"].clone(), json!(expected_succeeded));
                prop_assert_eq!(input["failed"].clone(), json!(total - expected_succeeded));
                prop_assert_eq!(input["parts"].as_array().unwrap().len(), total as usize);
                released.sort_unstable();
                // Every part was released once, or the join came before the window opened
                // for the last ones (parts ended without being released: not in real runs).
                released.dedup();
                prop_assert!(released.len() as u32 <= total);
            }
        }
    }
}
