//! Which tenants the backlog belongs to. A queue cannot be read without taking its messages, so
//! workers report what they see instead: every few seconds, for each lane they took work from, a
//! [`LaneDigest`] on the control stream (the lane's depth and the tenants of its last
//! deliveries). [`estimate`] turns the latest digest of each lane into a backlog per tenant: the
//! lane's depth shared out by the tenants' shares of its recent deliveries. An estimate, good for
//! "who is flooding", not an exact count.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use warren_common::Priority;

/// `kind` of a lane digest on the control stream.
pub const DIGEST_KIND: &str = "lane";

/// One worker's view of one lane at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneDigest {
    pub v: u32,
    pub kind: String,
    pub pipeline: String,
    pub step: String,
    pub priority: Priority,
    /// The lane's name part: a shard number or `hot<n>`.
    pub lane: String,
    /// Ready messages in the lane when the digest was made.
    pub depth: u32,
    /// The deliveries the shares are of (up to the window of 200).
    pub seen: u32,
    /// Tenants with their deliveries among `seen`, most first (the top few).
    pub tenants: Vec<(String, u32)>,
    /// When (ms since the epoch) and by whom.
    pub at: u64,
    pub by: String,
}

impl LaneDigest {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a digest always encodes")
    }

    /// A digest, if the bytes are one (a hot mark or anything else is not).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        rmp_serde::from_slice::<Self>(bytes)
            .ok()
            .filter(|d| d.kind == DIGEST_KIND)
    }
}

/// One tenant's estimated backlog in a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantBacklog {
    pub pipeline: String,
    pub tenant: String,
    /// Estimated messages waiting, over every step, priority and lane.
    pub backlog: u64,
    /// The lanes it was seen in (`step.priority.lane`).
    pub lanes: Vec<String>,
}

/// The estimated backlog of each tenant, biggest first: the newest digest of each lane counts
/// (several workers report the same lane), each lane's depth shared by its tenants' shares.
pub fn estimate(digests: &[LaneDigest]) -> Vec<TenantBacklog> {
    let mut newest: HashMap<(&str, &str, Priority, &str), &LaneDigest> = HashMap::new();
    for d in digests {
        let key = (
            d.pipeline.as_str(),
            d.step.as_str(),
            d.priority,
            d.lane.as_str(),
        );
        let slot = newest.entry(key).or_insert(d);
        if d.at > slot.at {
            *slot = d;
        }
    }
    let mut backlog: HashMap<(&str, &str), (f64, Vec<String>)> = HashMap::new();
    for d in newest.values() {
        for (tenant, count) in &d.tenants {
            let share = f64::from(*count) / f64::from(d.seen.max(1));
            let entry = backlog.entry((&d.pipeline, tenant)).or_default();
            entry.0 += share * f64::from(d.depth);
            entry
                .1
                .push(format!("{}.{}.{}", d.step, d.priority, d.lane));
        }
    }
    let mut all: Vec<TenantBacklog> = backlog
        .into_iter()
        .map(|((pipeline, tenant), (n, mut lanes))| {
            lanes.sort();
            TenantBacklog {
                pipeline: pipeline.to_string(),
                tenant: tenant.to_string(),
                backlog: n.round() as u64,
                lanes,
            }
        })
        .collect();
    all.sort_by(|a, b| {
        (&a.pipeline, std::cmp::Reverse(a.backlog), &a.tenant).cmp(&(
            &b.pipeline,
            std::cmp::Reverse(b.backlog),
            &b.tenant,
        ))
    });
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(lane: &str, depth: u32, tenants: &[(&str, u32)], at: u64) -> LaneDigest {
        LaneDigest {
            v: 1,
            kind: DIGEST_KIND.into(),
            pipeline: "p".into(),
            step: "a".into(),
            priority: Priority::Normal,
            lane: lane.into(),
            depth,
            seen: 200,
            tenants: tenants.iter().map(|(t, c)| (t.to_string(), *c)).collect(),
            at,
            by: "w".into(),
        }
    }

    #[test]
    fn depth_is_shared_by_delivery_share_and_the_newest_digest_counts() {
        let digests = vec![
            digest("1", 1000, &[("flood", 180), ("small", 20)], 5),
            // An older view of the same lane, from another worker: ignored.
            digest("1", 50, &[("small", 200)], 1),
            digest("hot0", 400, &[("flood", 200)], 5),
        ];
        let est = estimate(&digests);
        assert_eq!(est[0].tenant, "flood");
        assert_eq!(est[0].backlog, 900 + 400);
        assert_eq!(est[0].lanes, ["a.normal.1", "a.normal.hot0"]);
        assert_eq!((est[1].tenant.as_str(), est[1].backlog), ("small", 100));
    }

    #[test]
    fn digests_and_marks_never_read_as_each_other() {
        let d = digest("0", 1, &[("t", 1)], 1);
        assert_eq!(LaneDigest::decode(&d.encode()), Some(d.clone()));
        assert!(crate::hot::HotMark::decode(&d.encode()).is_err());
        let p = crate::topology::tests::two_steps_two_shards().pipelines[0].clone();
        let mark = crate::hot::HotMark::new(&p, "t", 0, 1, crate::hot::HotReason::Bulk, "")
            .expect("reroutable");
        assert_eq!(LaneDigest::decode(&mark.encode()), None);
    }
}
