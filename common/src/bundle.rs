//! Part bundles: several fan-out parts of one tenant in one message, for the first hop only.
//!
//! Each message on a quorum queue costs the broker an enqueue, a delivery and an ack; a fan-out of
//! 10,000 parts pays that 10,000 times before any part has done anything. A bundle carries up to
//! [`MAX_PARTS`] parts bound for the same queue and tenant, so a big fan-out's parts reach the
//! workers in a tenth of the messages. A worker runs a bundle's parts one after another on one
//! execution slot; from their first step on, every part is a job of its own again (its own
//! result, retry, dead letter and next-step message).
//!
//! The body is a named MessagePack map `{"v", "tenant", "parts": [bin, ...]}`, each bin an
//! encoded [`Envelope`](crate::Envelope). It has `tenant` where an envelope has it (what moves
//! a hot tenant's message and takes its tenant token reads), and it lacks `job_id`, so a reader
//! that knows only envelopes refuses it as undecodable and dead-letters it whole: nothing in it
//! is lost, and `warren dlq replay` hands it to a worker that reads bundles.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::envelope::FORMAT_VERSION;

/// The most parts one bundle carries.
pub const MAX_PARTS: usize = 10;

/// A queue's share of a release is bundled only when it leaves at least this many messages on
/// the queue: below that, the parts stay single, so as many workers as there are parts can run
/// them at once.
pub const MIN_MESSAGES: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub v: u32,
    pub tenant: String,
    /// The parts' encoded envelopes, in release order.
    pub parts: Vec<ByteBuf>,
}

impl Bundle {
    pub fn new(tenant: &str, parts: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self {
            v: FORMAT_VERSION,
            tenant: tenant.to_string(),
            parts: parts.into_iter().map(ByteBuf::from).collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a bundle always serialises")
    }

    /// The bundle in `body`, when it is one (of this format version).
    pub fn decode(body: &[u8]) -> Option<Self> {
        rmp_serde::from_slice::<Self>(body)
            .ok()
            .filter(|b| b.v == FORMAT_VERSION)
    }
}

/// How many parts go in each bundle of a queue that is given `count` parts of one tenant: as
/// many as keep [`MIN_MESSAGES`] messages on the queue, at most [`MAX_PARTS`]; 1 means single
/// messages.
pub fn parts_per_bundle(count: usize) -> usize {
    (count / MIN_MESSAGES).clamp(1, MAX_PARTS)
}

/// Splits one queue's and tenant's parts (their encoded sizes, in release order) into bundles:
/// consecutive runs of at most `per_bundle` parts and at most `max_bytes` of parts. A part
/// bigger than `max_bytes` travels alone. Returns the runs' lengths; they add up to the parts.
pub fn split(sizes: &[usize], per_bundle: usize, max_bytes: usize) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut len, mut bytes) = (0usize, 0usize);
    for &size in sizes {
        if len > 0 && (len == per_bundle || bytes + size > max_bytes) {
            runs.push(len);
            (len, bytes) = (0, 0);
        }
        len += 1;
        bytes += size;
    }
    if len > 0 {
        runs.push(len);
    }
    runs
}

/// The messages that carry a release of parts: each part's `destination` (its queue and tenant)
/// and encoded size, in release order, in; lists of part indexes out, one per message, in the
/// order of their first parts. Each destination's parts are bundled by [`parts_per_bundle`] of
/// their count and [`split`]; a list of one index is a part sent alone.
pub fn plan<K: Eq + Hash>(
    parts: impl IntoIterator<Item = (K, usize)>,
    max_bytes: usize,
) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    let mut by_destination: HashMap<K, usize> = HashMap::new();
    for (index, (destination, size)) in parts.into_iter().enumerate() {
        let group = *by_destination.entry(destination).or_insert_with(|| {
            groups.push((Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[group].0.push(index);
        groups[group].1.push(size);
    }
    let mut messages = Vec::new();
    for (indexes, sizes) in groups {
        let mut rest = indexes.as_slice();
        for len in split(&sizes, parts_per_bundle(indexes.len()), max_bytes) {
            let (message, after) = rest.split_at(len);
            messages.push(message.to_vec());
            rest = after;
        }
    }
    messages.sort_by_key(|m| m[0]);
    messages
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::{decode, encode, Envelope, JobId, Priority, TenantId};

    fn part(i: u32) -> Vec<u8> {
        let tenant = TenantId::parse("acme").expect("tenant");
        encode(&Envelope::new_job(
            JobId::new(),
            tenant,
            "import-part",
            "fetch",
            Priority::Normal,
            json!({ "part": i }),
        ))
    }

    #[test]
    fn a_bundle_round_trips_and_is_no_envelope() {
        let parts: Vec<_> = (0..3).map(part).collect();
        let body = Bundle::new("acme", parts.clone()).encode();
        let back = Bundle::decode(&body).expect("a bundle");
        assert_eq!(back.tenant, "acme");
        let bodies: Vec<Vec<u8>> = back.parts.into_iter().map(ByteBuf::into_vec).collect();
        assert_eq!(bodies, parts);
        // A reader of envelopes refuses it (and dead-letters it whole), but finds its tenant.
        assert!(decode(&body).is_err());
        assert_eq!(crate::codec::decode_tenant(&body).as_deref(), Some("acme"));
        // An envelope is no bundle.
        assert!(Bundle::decode(&parts[0]).is_none());
    }

    #[test]
    fn small_shares_stay_single() {
        assert_eq!(parts_per_bundle(1), 1);
        assert_eq!(parts_per_bundle(MIN_MESSAGES * 2 - 1), 1);
        assert_eq!(parts_per_bundle(MIN_MESSAGES * 2), 2);
        assert_eq!(parts_per_bundle(10_000), MAX_PARTS);
    }

    proptest! {
        #[test]
        fn a_plan_sends_every_part_once_each_message_to_one_destination(
            parts in proptest::collection::vec((0u8..4, 1usize..3_000), 0..2_000),
            max_bytes in 1usize..20_000,
        ) {
            let messages = plan(parts.iter().copied(), max_bytes);
            let mut seen: Vec<usize> = messages.iter().flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..parts.len()).collect::<Vec<_>>());
            for message in &messages {
                prop_assert!(!message.is_empty() && message.len() <= MAX_PARTS);
                prop_assert!(message.iter().all(|&i| parts[i].0 == parts[message[0]].0));
                // In release order within a message, and messages by their first part.
                prop_assert!(message.windows(2).all(|w| w[0] < w[1]));
            }
            prop_assert!(messages.windows(2).all(|w| w[0][0] < w[1][0]));
            // A destination given fewer than two messages' worth keeps its parts single.
            for destination in 0u8..4 {
                let count = parts.iter().filter(|p| p.0 == destination).count();
                if count < 2 * MIN_MESSAGES {
                    prop_assert!(messages.iter().filter(|m| parts[m[0]].0 == destination).all(|m| m.len() == 1));
                }
            }
        }

        #[test]
        fn runs_cover_every_part_in_order_within_the_bounds(
            sizes in proptest::collection::vec(1usize..5_000, 0..300),
            per_bundle in 1usize..=MAX_PARTS,
            max_bytes in 1usize..20_000,
        ) {
            let runs = split(&sizes, per_bundle, max_bytes);
            prop_assert_eq!(runs.iter().sum::<usize>(), sizes.len());
            let mut at = 0;
            for len in runs {
                prop_assert!(len >= 1 && len <= per_bundle);
                let bytes: usize = sizes[at..at + len].iter().sum();
                prop_assert!(len == 1 || bytes <= max_bytes);
                at += len;
            }
        }
    }
}
