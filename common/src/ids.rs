//! Identifiers: job ids (UUID v7, time ordered) and validated names.
//!
//! Tenants, pipelines, steps, handlers and the namespace all end up inside queue names and
//! routing keys, so they share one strict alphabet: 1-64 characters of `[A-Za-z0-9_-]`. That rules
//! out the `.`, `*` and `#` that would let a name reach into another tenant's routing keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The longest name accepted for a tenant, pipeline, step, handler or namespace.
pub const MAX_NAME_LEN: usize = 64;

/// A name that breaks the naming rule, with what it was meant to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Checks `value` against the naming rule; `what` names the thing in the error.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            what,
            // Keep errors readable even when the input is a megabyte of garbage.
            value: value.chars().take(80).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return fail("must be at most 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return fail("may only contain letters, digits, '_' and '-'");
    }
    Ok(())
}

// === impl TenantId ===

/// A validated tenant (customer) id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        validate_name("tenant", &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> Self {
        t.0
    }
}

impl FromStr for TenantId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl JobId ===

/// A job id: a UUID v7, so ids sort by submission time. On the wire it is the hyphenated text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// A job id from a UUID made elsewhere (a fan-out part's derived id).
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The id of the job a schedule fires for `tenant` at `slot_ms`: the same on every machine
    /// and every try, so a repeated fire (after a fail-over) is recognisable and a step can
    /// dedupe on its idempotency key. Still a v7 id, whose time is the slot; the rest is a
    /// stable hash (FNV-1a) of the three.
    pub fn for_slot(schedule: &str, slot_ms: u64, tenant: &str) -> Self {
        let key = format!("{schedule}\0{slot_ms}\0{tenant}");
        let high = crate::shard::fnv1a64(key.as_bytes());
        let low = crate::shard::fnv1a64(format!("warren-schedule\0{key}").as_bytes());
        let mut random = [0u8; 10];
        random[..8].copy_from_slice(&high.to_be_bytes());
        random[8..].copy_from_slice(&low.to_be_bytes()[..2]);
        Self(uuid::Builder::from_unix_timestamp_millis(slot_ms, &random).into_uuid())
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// Milliseconds since the Unix epoch at which the id was made, when it is a v7 id.
    pub fn timestamp_ms(&self) -> Option<u64> {
        let (secs, nanos) = self.0.get_timestamp()?.to_unix();
        Some(secs * 1000 + u64::from(nanos) / 1_000_000)
    }

    /// The key a step can use to make its side effect idempotent: `<job_id>/<step>`.
    pub fn idempotency_key(&self, step: &str) -> String {
        format!("{}/{step}", self.0)
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

// Always text, even in MessagePack (uuid's own impl writes 16 raw bytes for binary formats),
// because producers in other languages build this field by hand.
impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid job_id {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rule() {
        assert!(TenantId::parse("acme").is_ok());
        assert!(TenantId::parse("Acme_Corp-42").is_ok());
        assert!(TenantId::parse("a".repeat(64)).is_ok());
        for bad in ["", "a.b", "a*", "#", "a b", "ü", "a/b", &"a".repeat(65)] {
            let err = TenantId::parse(bad).unwrap_err();
            assert_eq!(err.what, "tenant", "{bad:?}");
        }
    }

    #[test]
    fn job_ids_are_v7_and_ordered() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(a.as_uuid().get_version_num(), 7);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now.abs_diff(a.timestamp_ms().unwrap()) < 5_000);
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
        assert_eq!(a.idempotency_key("fetch"), format!("{a}/fetch"));
    }

    #[test]
    fn slot_ids_are_deterministic_v7_ids_at_the_slot() {
        let a = JobId::for_slot("nightly", 1_767_232_800_000, "acme");
        assert_eq!(a, JobId::for_slot("nightly", 1_767_232_800_000, "acme"));
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert_eq!(a.timestamp_ms(), Some(1_767_232_800_000));
        assert_ne!(a, JobId::for_slot("nightly", 1_767_232_800_000, "globex"));
        assert_ne!(a, JobId::for_slot("nightly", 1_767_232_801_000, "acme"));
        assert_ne!(a, JobId::for_slot("hourly", 1_767_232_800_000, "acme"));
    }
}
