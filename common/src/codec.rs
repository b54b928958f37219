//! MessagePack encoding of the envelope and result events, as named maps (rmp-serde's
//! `to_vec_named`), never positional arrays, so other languages can read and write them by name.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::envelope::{Envelope, ResultEvent, FORMAT_VERSION};

/// Why bytes could not be read as a warren message. Never a panic: the fuzz test holds us to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("not a warren message: {0}")]
    Malformed(String),
    #[error("unsupported format version {found} (this build reads {FORMAT_VERSION})")]
    Version { found: u64 },
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    to_vec(envelope)
}

pub fn encode_result(event: &ResultEvent) -> Vec<u8> {
    to_vec(event)
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    from_slice(bytes)
}

pub fn decode_result(bytes: &[u8]) -> Result<ResultEvent, DecodeError> {
    from_slice(bytes)
}

/// Reads result events written one after another in one body (a batch of the results check's
/// copies); see [`decode_concatenated`].
pub fn decode_results(bytes: &[u8]) -> Vec<ResultEvent> {
    decode_concatenated(bytes)
}

/// Reads MessagePack values written one after another in one body (what a `BatchWriter`
/// sends). An unreadable value ends the read (what follows it cannot be found): the values
/// before it are returned.
pub fn decode_concatenated<T: DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
    let mut cursor = std::io::Cursor::new(bytes);
    let mut values = Vec::new();
    while (cursor.position() as usize) < bytes.len() {
        let mut de = rmp_serde::Deserializer::new(&mut cursor);
        match T::deserialize(&mut de) {
            Ok(value) => values.push(value),
            Err(_) => break,
        }
    }
    values
}

/// The tenant of an encoded envelope, without decoding the rest (the payload above all): what a
/// worker reads to move a hot tenant's message. `None` when the bytes are no envelope.
pub fn decode_tenant(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Addressed {
        tenant: String,
    }
    rmp_serde::from_slice::<Addressed>(bytes)
        .ok()
        .map(|a| a.tenant)
}

fn to_vec<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own structs into a Vec cannot fail: every field is a plain map, string or
    // JSON value.
    rmp_serde::to_vec_named(value).expect("warren messages always serialise")
}

fn from_slice<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match rmp_serde::from_slice::<T>(bytes) {
        Ok(msg) if msg.version() == FORMAT_VERSION => Ok(msg),
        Ok(msg) => Err(DecodeError::Version {
            found: u64::from(msg.version()),
        }),
        // Only now look at the version alone, so a future format gets a clear error instead
        // of a confusing "missing field" (and a good message is parsed once, not twice).
        Err(e) => {
            #[derive(Deserialize)]
            struct Version {
                v: Option<u64>,
            }
            match rmp_serde::from_slice::<Version>(bytes) {
                Ok(Version { v: Some(found) }) if found != u64::from(FORMAT_VERSION) => {
                    Err(DecodeError::Version { found })
                }
                _ => Err(DecodeError::Malformed(e.to_string())),
            }
        }
    }
}

/// Messages that carry the format version.
trait Versioned {
    fn version(&self) -> u32;
}

impl Versioned for Envelope {
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for ResultEvent {
    fn version(&self) -> u32 {
        self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobId, JobStatus, Priority, TenantId};
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn results_written_one_after_another_read_back_until_one_is_unreadable() {
        let events: Vec<ResultEvent> = (0..3)
            .map(|i| ResultEvent::succeeded(&sample(), json!({ "n": i })))
            .collect();
        let mut body: Vec<u8> = events.iter().flat_map(encode_result).collect();
        assert_eq!(decode_results(&body), events);
        body.extend_from_slice(b"\xc1junk");
        body.extend(encode_result(&events[0]));
        assert_eq!(
            decode_results(&body),
            events,
            "the read ends at what it cannot read"
        );
        assert!(decode_results(b"").is_empty());
    }

    fn sample() -> Envelope {
        Envelope::new_job(
            JobId::new(),
            TenantId::parse("acme").unwrap(),
            "thumbnails",
            "fetch",
            Priority::High,
            json!({"url": "https://example.com/a.png", "sizes": [64, 128], "x": 1.5, "n": null}),
        )
    }

    #[test]
    fn round_trip() {
        let env = sample();
        assert_eq!(decode(&encode(&env)).unwrap(), env);
        let ev = ResultEvent::succeeded(&env, json!({"ok": true}));
        assert_eq!(decode_result(&encode_result(&ev)).unwrap(), ev);
        // The status travels under its own name.
        for status in [JobStatus::Succeeded, JobStatus::Failed] {
            let text = serde_json::to_string(&status).unwrap();
            assert_eq!(text, format!("\"{}\"", status.as_str()));
        }
    }

    #[test]
    fn the_tenant_reads_alone() {
        assert_eq!(decode_tenant(&encode(&sample())).as_deref(), Some("acme"));
        assert_eq!(decode_tenant(b"not msgpack"), None);
        assert_eq!(
            decode_tenant(&encode_result(&ResultEvent::succeeded(&sample(), json!(1)))).as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn input_size_is_measured_only_when_the_body_is_big() {
        let mut env = sample();
        env.input = json!({"blob": "x".repeat(1000)});
        let body = encode(&env);
        assert_eq!(env.input_exceeds(body.len(), body.len()), None);
        // The input alone is about 1010 bytes: under 1100, over 900.
        assert_eq!(env.input_exceeds(body.len(), 1100), None);
        let size = env.input_exceeds(body.len(), 900).expect("over the limit");
        assert!((1000..1100).contains(&size), "{size}");
    }

    #[test]
    fn encode_within_checks_the_input_alone() {
        let mut env = sample();
        env.input = json!({"blob": "x".repeat(1000)});
        let body = encode(&env);
        // The whole body is over 1100 bytes, the input alone is not: it goes.
        assert!(body.len() > 1100);
        assert_eq!(env.encode_within(1100), Ok(body.clone()));
        assert_eq!(env.encode_within(body.len()), Ok(body));
        let err = env.encode_within(900).unwrap_err();
        assert_eq!(err.max, 900);
        assert!((1000..1100).contains(&err.size), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "input is {} bytes, more than max_payload_bytes = 900",
                err.size
            )
        );
    }

    #[test]
    fn is_a_named_map() {
        let value: rmpv::Value = rmp_serde::from_slice(&encode(&sample())).unwrap();
        let map = value.as_map().expect("a map, not an array");
        let keys: Vec<&str> = map.iter().filter_map(|(k, _)| k.as_str()).collect();
        for key in [
            "v", "job_id", "tenant", "pipeline", "step", "priority", "attempt", "input",
        ] {
            assert!(keys.contains(&key), "missing {key} in {keys:?}");
        }
        let job_id = map
            .iter()
            .find(|(k, _)| k.as_str() == Some("job_id"))
            .unwrap();
        assert!(job_id.1.is_str(), "job_id travels as text");
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_apply() {
        let id = JobId::new().to_string();
        let hand_built = rmpv::Value::Map(vec![
            ("v".into(), 1.into()),
            ("job_id".into(), id.as_str().into()),
            ("tenant".into(), "acme".into()),
            ("pipeline".into(), "p".into()),
            ("step".into(), "s".into()),
            ("from_the_future".into(), "ignored".into()),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &hand_built).unwrap();
        let env = decode(&bytes).unwrap();
        assert_eq!(env.attempt, 1);
        assert_eq!(env.priority, Priority::Normal);
        assert_eq!(env.input, serde_json::Value::Null);
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(decode(b"garbage"), Err(DecodeError::Malformed(_))));
        let mut env = sample();
        env.v = 9;
        assert!(matches!(
            decode(&encode(&env)),
            Err(DecodeError::Version { found: 9 })
        ));
        let mut bad_tenant = rmp_serde::to_vec_named(&sample()).unwrap();
        // Same length as "acme", but with a wildcard in it.
        let pos = bad_tenant.windows(4).position(|w| w == b"acme").unwrap();
        bad_tenant[pos..pos + 4].copy_from_slice(b"ac.*");
        let err = decode(&bad_tenant).unwrap_err().to_string();
        assert!(err.contains("tenant"), "{err}");
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = decode_result(&bytes);
        }

        #[test]
        fn decoder_survives_mutated_messages(pos in 0usize..200, byte in any::<u8>()) {
            let mut bytes = encode(&sample());
            let at = pos % bytes.len();
            bytes[at] = byte;
            let _ = decode(&bytes);
        }
    }
}
