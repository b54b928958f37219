//! One lifecycle event of a job, and the stream message that carries many of them (a
//! [`Batch`]). MessagePack maps with field names, like every warren message; unknown fields and
//! unknown kinds are ignored, so a newer writer does not break an older reader.
//! `docs/wire-format.md` documents them field by field.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::pack::{pack, unpack, Group};
use crate::envelope::{now_ms, Envelope};
use crate::ids::JobId;
use crate::priority::Priority;

/// Version of the history batch format: 2 added packed events (`packed`); a version 1 message
/// (events as maps only) reads the same way.
pub const HISTORY_VERSION: u32 = 2;

/// Most events one stream message carries.
pub const MAX_EVENTS_PER_MESSAGE: usize = 500;

/// Longest error text an event keeps (the end of it, where a stack trace's cause is).
pub const MAX_ERROR_CHARS: usize = 2000;

/// What happened. The order is the tie-break of two events of one job in the same millisecond:
/// what happens first in a job's life sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A schedule fired the job.
    Fired,
    /// A producer's publish of the job was confirmed.
    Submitted,
    /// `warren dlq replay` put the job's dead letter back on its step queue.
    Replayed,
    /// A worker started an attempt of a step (not confirmed before anything: see
    /// docs/ARCHITECTURE.md, "History").
    Started,
    /// An attempt failed and the step runs again after `retry_in_ms`.
    Retried,
    /// An attempt succeeded; `next` is the step the job goes to, none when it was the last.
    Succeeded,
    /// A fan-out's progress: `parts_total` parts, `parts_ended` of them ended.
    Parts,
    /// A step failed for good (a permanent failure, or its last attempt).
    Failed,
    /// The job's message went to the dead-letter queue.
    DeadLettered,
    /// A kind this version does not know: kept out of every fold.
    Unknown,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Fired,
        Kind::Submitted,
        Kind::Replayed,
        Kind::Started,
        Kind::Retried,
        Kind::Succeeded,
        Kind::Parts,
        Kind::Failed,
        Kind::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fired => "fired",
            Kind::Submitted => "submitted",
            Kind::Replayed => "replayed",
            Kind::Started => "started",
            Kind::Retried => "retried",
            Kind::Succeeded => "succeeded",
            Kind::Parts => "parts",
            Kind::Failed => "failed",
            Kind::DeadLettered => "dead_lettered",
            Kind::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or(Kind::Unknown)
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Kind::parse(&String::deserialize(d)?))
    }
}

/// One thing that happened to one job. Every event names its job, tenant and pipeline, so a
/// reader can filter without any other event; the rest depends on the kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    pub job_id: JobId,
    /// When it happened, ms since the epoch, on the writer's clock.
    pub at: u64,
    pub tenant: String,
    pub pipeline: String,
    /// The step it is about (for `submitted` and `replayed`: the step the job is queued at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How long the attempt ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    /// `retried`, `failed`, `dead_lettered`: why (the end of a command's stderr, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `succeeded`: the step the job goes to; absent when the job is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// `retried`: the delay before the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// `dead_lettered`: the dead-letter reason (`failed`, `bad_message`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `submitted`: the job's priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Set on every event of a fan-out part: the job whose fan-out made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<JobId>,
    /// `parts`: how many parts the fan-out has, and how many of them ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts_total: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts_ended: Option<u32>,
    /// `fired`: the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

impl Event {
    /// An event of `kind` about `job_id`, now.
    pub fn new(kind: Kind, job_id: JobId, tenant: &str, pipeline: &str) -> Self {
        Self {
            kind,
            job_id,
            at: now_ms(),
            tenant: tenant.to_string(),
            pipeline: pipeline.to_string(),
            step: None,
            attempt: None,
            took_ms: None,
            error: None,
            next: None,
            retry_in_ms: None,
            reason: None,
            priority: None,
            parent: None,
            parts_total: None,
            parts_ended: None,
            schedule: None,
        }
    }

    /// An event about the step and attempt `env` is at.
    pub fn of_step(kind: Kind, env: &Envelope) -> Self {
        let mut event = Self::new(kind, env.job_id, env.tenant.as_str(), &env.pipeline);
        event.step = Some(env.step.clone());
        event.attempt = Some(env.attempt);
        event.parent = env.part_of.map(|p| p.job_id);
        event
    }

    /// `submitted`: a new job, queued at its first step.
    pub fn submitted(env: &Envelope) -> Self {
        let mut event = Self::of_step(Kind::Submitted, env);
        event.attempt = None;
        event.priority = Some(env.priority);
        event
    }

    pub fn at(mut self, at: u64) -> Self {
        self.at = at;
        self
    }

    pub fn took_ms(mut self, took_ms: u64) -> Self {
        self.took_ms = Some(took_ms);
        self
    }

    /// Keeps the last [`MAX_ERROR_CHARS`] characters of `error`.
    pub fn error(mut self, error: &str) -> Self {
        let skip = error.chars().count().saturating_sub(MAX_ERROR_CHARS);
        self.error = Some(error.chars().skip(skip).collect());
        self
    }
}

/// One message of the history stream: up to [`MAX_EVENTS_PER_MESSAGE`] events, or a reader's
/// end marker (no events, a `marker`). On the wire, events that share all but their job, time
/// and duration travel packed (`super::pack`); [`Batch::decode`] gives them back one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub v: u32,
    pub events: Vec<Event>,
    /// Written by a reader to know where the stream ended when it started reading.
    pub marker: Option<String>,
}

/// A [`Batch`] as MessagePack carries it.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u32,
    #[serde(default)]
    events: Vec<Event>,
    /// Version 2 on: groups of packed events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    packed: Vec<Group>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    marker: Option<String>,
}

impl Batch {
    pub fn events(events: Vec<Event>) -> Self {
        Self {
            v: HISTORY_VERSION,
            events,
            marker: None,
        }
    }

    pub fn marker(nonce: String) -> Self {
        Self {
            v: HISTORY_VERSION,
            events: Vec::new(),
            marker: Some(nonce),
        }
    }

    /// The message body: events that share a group's fields packed, the others as maps.
    pub fn encode(self) -> Vec<u8> {
        let (events, packed) = pack(self.events);
        let wire = Wire {
            v: self.v,
            events,
            packed,
            marker: self.marker,
        };
        rmp_serde::to_vec_named(&wire).expect("a history batch encodes")
    }

    /// Reads a stream message (of any version), packed events unpacked after the plain ones;
    /// `None` when it is not a history batch.
    pub fn decode(body: &[u8]) -> Option<Self> {
        let wire: Wire = rmp_serde::from_slice(body).ok()?;
        let mut events = wire.events;
        events.extend(unpack(wire.packed));
        Some(Self {
            v: wire.v,
            events,
            marker: wire.marker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TenantId;
    use serde_json::json;

    #[test]
    fn a_batch_round_trips_as_a_named_map() {
        let env = Envelope::new_job(
            JobId::new(),
            TenantId::parse("acme").unwrap(),
            "import",
            "fetch",
            Priority::High,
            json!({}),
        );
        let batch = Batch::events(vec![
            Event::submitted(&env),
            Event::of_step(Kind::Retried, &env).error("boom"),
        ]);
        let bytes = batch.clone().encode();
        assert_eq!(Batch::decode(&bytes), Some(batch.clone()));
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).unwrap();
        let text = value.to_string();
        assert!(text.contains("\"kind\": \"submitted\""), "{text}");
        assert!(text.contains("\"priority\": \"high\""), "{text}");
        assert!(
            !text.contains("took_ms"),
            "absent fields are left out: {text}"
        );
    }

    #[test]
    fn a_submit_window_travels_packed_and_reads_back_as_events() {
        let tenant = TenantId::parse("acme").unwrap();
        let events: Vec<Event> = (0..MAX_EVENTS_PER_MESSAGE)
            .map(|_| {
                let env = Envelope::new_job(
                    JobId::new(),
                    tenant.clone(),
                    "import",
                    "fetch",
                    Priority::Normal,
                    json!({}),
                );
                Event::submitted(&env)
            })
            .collect();
        let as_maps = rmp_serde::to_vec_named(&events).unwrap().len();
        let bytes = Batch::events(events.clone()).encode();
        // 16 bytes of id and an offset of a few ms a job, against ~120 bytes as a map.
        assert!(bytes.len() * 6 < as_maps, "{} vs {as_maps}", bytes.len());
        let batch = Batch::decode(&bytes).unwrap();
        assert_eq!(batch.v, HISTORY_VERSION);
        assert_eq!(batch.events, events);
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).unwrap();
        let text = value.to_string();
        assert!(
            text.contains("\"packed\": [{\"kind\": \"submitted\""),
            "{text:.300}"
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_tolerated() {
        let value = rmpv::Value::Map(vec![
            ("v".into(), 1.into()),
            (
                "events".into(),
                rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                    ("kind".into(), "paused".into()),
                    ("job_id".into(), JobId::new().to_string().into()),
                    ("at".into(), 5.into()),
                    ("tenant".into(), "t".into()),
                    ("pipeline".into(), "p".into()),
                    ("colour".into(), "blue".into()),
                ])]),
            ),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        let batch = Batch::decode(&bytes).unwrap();
        assert_eq!(batch.events[0].kind, Kind::Unknown);
    }

    #[test]
    fn errors_keep_their_end() {
        let long = format!("{}cause", "x".repeat(5000));
        let event = Event::new(Kind::Failed, JobId::new(), "t", "p").error(&long);
        let kept = event.error.unwrap();
        assert_eq!(kept.chars().count(), MAX_ERROR_CHARS);
        assert!(kept.ends_with("cause"));
    }

    proptest::proptest! {
        /// A damaged packed message reads as something or nothing, never a panic.
        #[test]
        fn decode_survives_mutated_packed_messages(pos in 0usize..4000, byte in 0u8..=255) {
            let events = (0..20u64)
                .map(|i| Event::new(Kind::Started, JobId::new(), "t", "p").at(i).took_ms(i))
                .collect();
            let mut bytes = Batch::events(events).encode();
            let at = pos % bytes.len();
            bytes[at] = byte;
            let _ = Batch::decode(&bytes);
        }
    }
}
