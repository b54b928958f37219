//! Which tenants are hot (flooding) right now, and where that sends their jobs: a pure set of
//! [`HotMark`]s, each with an expiry, so a flood that ends cools down by itself. The set is fed
//! from the namespace's control stream (`control.rs`); routing through it is [`HotSet::route`].
//!
//! A hot tenant's step messages take a hot lane of its pipeline (`Lane::Hot`) instead of its
//! shard, so the tenants that share its shard are not queued behind the flood. Pinned tenants
//! and pipelines with `hot_lanes = 0` are never rerouted. An empty set routes exactly like
//! [`StepRoute::for_tenant`]: that is the fallback when the control stream cannot be read.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use warren_common::{PipelineConfig, Priority};

use crate::route::{Lane, StepRoute};

/// Version of the mark format on the control stream.
pub const MARK_VERSION: u32 = 1;

/// Why a tenant was marked hot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotReason {
    /// A worker saw it hold `hot_share` of a lane with `hot_depth` ready messages.
    Depth,
    /// A producer was handed `hot_depth` of its jobs in one bulk submit.
    Bulk,
    /// A producer submitted `hot_depth` of its jobs within a short window.
    Rate,
}

impl HotReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HotReason::Depth => "depth",
            HotReason::Bulk => "bulk",
            HotReason::Rate => "rate",
        }
    }
}

/// One entry of the control stream: `tenant` is hot in `pipeline` until `until` (ms since the
/// epoch), and its step messages take hot lane `lane`. A MessagePack map with these field names
/// (`docs/wire-format.md`); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HotMark {
    pub v: u32,
    pub pipeline: String,
    pub tenant: String,
    pub lane: u16,
    pub until: u64,
    pub reason: HotReason,
    /// Who marked it (host and process), for the operator reading the stream.
    #[serde(default)]
    pub by: String,
}

impl HotMark {
    /// A mark for `tenant` in `pipeline` lasting `for_ms` from `now_ms`, on the tenant's hot
    /// lane; `None` when the pipeline would not reroute the tenant (no hot lanes, or pinned).
    pub fn new(
        pipeline: &PipelineConfig,
        tenant: &str,
        now_ms: u64,
        for_ms: u64,
        reason: HotReason,
        by: &str,
    ) -> Option<Self> {
        let Lane::Hot(lane) = Lane::hot_for(pipeline, tenant)? else {
            return None;
        };
        Some(Self {
            v: MARK_VERSION,
            pipeline: pipeline.name.clone(),
            tenant: tenant.to_string(),
            lane,
            until: now_ms.saturating_add(for_ms),
            reason,
            by: by.to_string(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a mark always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

/// A tenant's standing in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    lane: u16,
    until: u64,
}

/// The hot tenants of a namespace, by pipeline.
#[derive(Debug, Default, Clone)]
pub struct HotSet {
    pipelines: HashMap<String, HashMap<String, Entry>>,
}

/// One hot tenant, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotTenant {
    pub pipeline: String,
    pub tenant: String,
    pub lane: Lane,
    pub until: u64,
}

impl HotSet {
    /// Takes in a mark: the later expiry wins, so marks read out of order or twice are harmless.
    pub fn apply(&mut self, mark: &HotMark) {
        let entries = self.pipelines.entry(mark.pipeline.clone()).or_default();
        let entry = entries.entry(mark.tenant.clone()).or_insert(Entry {
            lane: mark.lane,
            until: 0,
        });
        if mark.until >= entry.until {
            *entry = Entry {
                lane: mark.lane,
                until: mark.until,
            };
        }
    }

    /// Forgets expired marks.
    pub fn prune(&mut self, now_ms: u64) {
        for entries in self.pipelines.values_mut() {
            entries.retain(|_, e| e.until > now_ms);
        }
        self.pipelines.retain(|_, entries| !entries.is_empty());
    }

    pub fn clear(&mut self) {
        self.pipelines.clear();
    }

    /// Whether any tenant of `pipeline` may be hot (expired marks not yet pruned count): the
    /// cheap test before looking at a message's tenant.
    pub fn any_in(&self, pipeline: &str) -> bool {
        self.pipelines.get(pipeline).is_some_and(|e| !e.is_empty())
    }

    /// When `tenant`'s mark in `pipeline` expires, if it is hot at `now_ms`.
    pub fn until(&self, pipeline: &str, tenant: &str, now_ms: u64) -> Option<u64> {
        let entry = self.pipelines.get(pipeline)?.get(tenant)?;
        (entry.until > now_ms).then_some(entry.until)
    }

    /// The hot lane `tenant`'s messages take in `pipeline` at `now_ms`, or `None` when they take
    /// their shard: not hot, pinned, or a lane the pipeline does not have (a mark from a config
    /// with more hot lanes).
    pub fn lane(&self, pipeline: &PipelineConfig, tenant: &str, now_ms: u64) -> Option<Lane> {
        let entry = self.pipelines.get(&pipeline.name)?.get(tenant)?;
        let usable = entry.until > now_ms
            && entry.lane < pipeline.hot_lanes
            && !pipeline.pins.contains_key(tenant);
        usable.then_some(Lane::Hot(entry.lane))
    }

    /// The route of `tenant`'s message for `step` of `pipeline` at `priority`: its hot lane
    /// while it is hot, else its shard.
    pub fn route(
        &self,
        pipeline: &PipelineConfig,
        step: &str,
        priority: Priority,
        tenant: &str,
        now_ms: u64,
    ) -> StepRoute {
        match self.lane(pipeline, tenant, now_ms) {
            Some(lane) => StepRoute::new(&pipeline.name, step, priority, lane),
            None => StepRoute::for_tenant(pipeline, step, priority, tenant),
        }
    }

    /// Every tenant hot at `now_ms`, by pipeline then tenant.
    pub fn list(&self, now_ms: u64) -> Vec<HotTenant> {
        let mut all: Vec<HotTenant> = self
            .pipelines
            .iter()
            .flat_map(|(pipeline, entries)| {
                entries
                    .iter()
                    .filter(move |(_, e)| e.until > now_ms)
                    .map(move |(tenant, e)| HotTenant {
                        pipeline: pipeline.clone(),
                        tenant: tenant.clone(),
                        lane: Lane::Hot(e.lane),
                        until: e.until,
                    })
            })
            .collect();
        all.sort_by(|a, b| (&a.pipeline, &a.tenant).cmp(&(&b.pipeline, &b.tenant)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn pipeline(hot_lanes: u16) -> PipelineConfig {
        let mut p = crate::topology::tests::two_steps_two_shards().pipelines[0].clone();
        p.hot_lanes = hot_lanes;
        p.pins = BTreeMap::from([("pinned".to_string(), 1)]);
        p
    }

    fn mark(p: &PipelineConfig, tenant: &str, now: u64) -> HotMark {
        HotMark::new(p, tenant, now, 60_000, HotReason::Depth, "test").expect("reroutable")
    }

    #[test]
    fn a_hot_tenant_takes_its_hot_lane_until_the_mark_expires() {
        let p = pipeline(2);
        let mut set = HotSet::default();
        let m = mark(&p, "flood", 1_000);
        set.apply(&m);
        let hot = set.route(&p, "a", Priority::Normal, "flood", 2_000);
        assert_eq!(hot.lane, Lane::Hot(m.lane));
        assert_eq!(hot.routing_key(), format!("p.a.normal.hot{}", m.lane));
        // Others keep their shard; the mark's end brings the tenant back to its own.
        let small = set.route(&p, "a", Priority::Normal, "small", 2_000);
        assert_eq!(
            small,
            StepRoute::for_tenant(&p, "a", Priority::Normal, "small")
        );
        let later = set.route(&p, "a", Priority::Normal, "flood", m.until);
        assert_eq!(
            later,
            StepRoute::for_tenant(&p, "a", Priority::Normal, "flood")
        );
        assert!(set.any_in("p"));
        set.prune(m.until);
        assert!(!set.any_in("p"));
    }

    #[test]
    fn pins_and_pipelines_without_hot_lanes_are_never_rerouted() {
        assert!(HotMark::new(&pipeline(2), "pinned", 0, 1, HotReason::Bulk, "").is_none());
        assert!(HotMark::new(&pipeline(0), "flood", 0, 1, HotReason::Bulk, "").is_none());
        // A mark from a config with more hot lanes than this one is ignored here.
        let mut set = HotSet::default();
        let mut m = mark(&pipeline(2), "flood", 0);
        m.lane = 5;
        set.apply(&m);
        assert_eq!(set.lane(&pipeline(2), "flood", 1), None);
    }

    #[test]
    fn the_later_expiry_wins_in_any_order() {
        let p = pipeline(2);
        let (early, late) = (mark(&p, "t", 0), mark(&p, "t", 30_000));
        for order in [[&early, &late], [&late, &early]] {
            let mut set = HotSet::default();
            order.iter().for_each(|m| set.apply(m));
            assert_eq!(set.until("p", "t", 0), Some(late.until));
        }
    }

    #[test]
    fn marks_round_trip_as_named_maps() {
        let m = mark(&pipeline(2), "acme", 5);
        assert_eq!(HotMark::decode(&m.encode()).unwrap(), m);
        // A foreign writer's map with an extra field still reads.
        let mut value = rmp_serde::to_vec_named(&serde_json::json!({
            "v": 1, "pipeline": "p", "tenant": "acme", "lane": 1, "until": 9,
            "reason": "rate", "by": "go-producer", "extra": true
        }))
        .unwrap();
        let read = HotMark::decode(&value).unwrap();
        assert_eq!((read.lane, read.reason), (1, HotReason::Rate));
        value.truncate(3);
        assert!(HotMark::decode(&value).is_err());
    }

    proptest! {
        #[test]
        fn every_route_is_an_enumerated_one(
            tenant in "[A-Za-z0-9_-]{1,12}",
            hot_lanes in 0u16..4,
            marked in any::<bool>(),
            now in 0u64..120_000,
        ) {
            let p = pipeline(hot_lanes);
            let mut set = HotSet::default();
            if let (true, Some(m)) = (marked, HotMark::new(&p, &tenant, 0, 60_000, HotReason::Depth, "")) {
                set.apply(&m);
            }
            let route = set.route(&p, "b", Priority::Low, &tenant, now);
            prop_assert!(StepRoute::of_step(&p, "b").any(|r| r == route));
            let hot = marked && hot_lanes > 0 && tenant != "pinned" && now < 60_000;
            prop_assert_eq!(route.lane.is_hot(), hot);
        }
    }
}
