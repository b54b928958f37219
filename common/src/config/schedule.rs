//! `[[schedules]]`: a pipeline run at cron slots or every interval, for one or many tenants
//! (docs/config.md, "Schedules"). Each key is checked while deserialising, so its error carries
//! its line; that the pipeline exists is checked once the whole file is read
//! ([`check_pipelines`]), with the line of the schedule's `pipeline` key.

use std::collections::HashSet;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

use crate::ids::{validate_name, TenantId};
use crate::priority::Priority;
use crate::schedule::Cadence;

/// Tenant of a schedule's job when it names none.
pub const DEFAULT_SCHEDULE_TENANT: &str = "scheduler";

/// One `[[schedules]]` table.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub name: String,
    pub pipeline: String,
    /// `cron` (in `timezone`) or `every`.
    pub cadence: Cadence,
    /// The `cron` or `every` text, for display.
    pub when: String,
    /// One job per tenant per slot.
    pub tenants: Vec<TenantId>,
    /// The first step's input, to which warren adds `schedule` and `slot`.
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// Missed slots not older than this are fired after an outage; older ones are skipped.
    pub catch_up: Duration,
    pub overlap: Overlap,
    pub priority: Priority,
    /// Where `pipeline` is in the file (byte range), for the error when it names no pipeline.
    pub(crate) pipeline_span: std::ops::Range<usize>,
}

/// Whether a slot fires while the schedule's previous fire still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// No new fire while any job of the previous fire has not ended.
    #[default]
    Skip,
    /// Fire anyway.
    Allow,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    #[serde(deserialize_with = "schedule_name")]
    name: String,
    pipeline: toml::Spanned<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default, deserialize_with = "every")]
    every: Option<Duration>,
    #[serde(default = "default_timezone", deserialize_with = "timezone")]
    timezone: Tz,
    #[serde(default, deserialize_with = "tenants")]
    tenants: Option<Vec<TenantId>>,
    #[serde(default, deserialize_with = "tenant")]
    tenant: Option<TenantId>,
    #[serde(default, deserialize_with = "payload")]
    payload: serde_json::Map<String, serde_json::Value>,
    #[serde(default = "default_catch_up", with = "humantime_serde")]
    catch_up: Duration,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default)]
    priority: Priority,
}

impl<'de> Deserialize<'de> for ScheduleConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawSchedule::deserialize(d)?;
        let fail = |m: String| serde::de::Error::custom(format!("schedule `{}`: {m}", raw.name));
        let (cadence, when) = match (&raw.cron, raw.every) {
            (Some(pattern), None) => (
                Cadence::cron(pattern, raw.timezone).map_err(|e| fail(format!("`cron` {e}")))?,
                pattern.clone(),
            ),
            (None, Some(interval)) => (
                Cadence::every(interval).map_err(|e| fail(format!("`every` {e}")))?,
                humantime::format_duration(interval).to_string(),
            ),
            (Some(_), Some(_)) => return Err(fail("set `cron` or `every`, not both".into())),
            (None, None) => return Err(fail("set `cron` or `every`".into())),
        };
        let tenants = match (raw.tenants, raw.tenant) {
            (Some(_), Some(_)) => return Err(fail("set `tenants` or `tenant`, not both".into())),
            (Some(list), None) => list,
            (None, Some(one)) => vec![one],
            (None, None) => vec![TenantId::parse(DEFAULT_SCHEDULE_TENANT).expect("valid")],
        };
        if raw.payload.contains_key("schedule") || raw.payload.contains_key("slot") {
            return Err(fail(
                "`payload` must not set `schedule` or `slot`: warren adds them".into(),
            ));
        }
        let pipeline_span = raw.pipeline.span();
        Ok(Self {
            name: raw.name,
            pipeline: raw.pipeline.into_inner(),
            cadence,
            when,
            tenants,
            payload: raw.payload,
            catch_up: raw.catch_up,
            overlap: raw.overlap,
            priority: raw.priority,
            pipeline_span,
        })
    }
}

/// The list, with names unique.
pub(crate) fn schedules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ScheduleConfig>, D::Error> {
    let list = Vec::<ScheduleConfig>::deserialize(d)?;
    let mut seen = HashSet::new();
    for s in &list {
        if !seen.insert(s.name.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "schedules: duplicate schedule name `{}`",
                s.name
            )));
        }
    }
    Ok(list)
}

/// The first schedule whose pipeline the config lacks: (byte offset of its `pipeline`, message).
pub(crate) fn check_pipelines(
    schedules: &[ScheduleConfig],
    has_pipeline: impl Fn(&str) -> bool,
) -> Result<(), (usize, String)> {
    for s in schedules {
        if !has_pipeline(&s.pipeline) {
            return Err((
                s.pipeline_span.start,
                format!(
                    "schedule `{}`: `pipeline` names no pipeline of this config: `{}`",
                    s.name, s.pipeline
                ),
            ));
        }
    }
    Ok(())
}

fn default_timezone() -> Tz {
    Tz::UTC
}

fn default_catch_up() -> Duration {
    Duration::from_secs(3600)
}

fn schedule_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    validate_name("schedule name", &value).map_err(serde::de::Error::custom)?;
    Ok(value)
}

fn every<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    humantime_serde::deserialize(d)
}

fn timezone<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
    let value = String::deserialize(d)?;
    value.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`timezone` must be an IANA time zone name (e.g. \"Europe/Warsaw\"), got {value:?}"
        ))
    })
}

fn tenants<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<TenantId>>, D::Error> {
    let list = Vec::<TenantId>::deserialize(d)?;
    if list.is_empty() {
        return Err(serde::de::Error::custom("`tenants` must not be empty"));
    }
    Ok(Some(list))
}

fn tenant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TenantId>, D::Error> {
    TenantId::deserialize(d).map(Some)
}

fn payload<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<serde_json::Map<String, serde_json::Value>, D::Error> {
    serde_json::Map::deserialize(d)
}
