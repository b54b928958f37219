//! Where a step message goes: a [`StepRoute`] (pipeline, step, priority, [`Lane`]) gives the
//! routing key it is published with on the tasks exchange and the queue it waits in. Every part
//! of warren that publishes to, declares, consumes or measures a step queue goes through it.
//!
//! The names are an external contract (`docs/wire-format.md`): routing key
//! `<pipeline>.<step>.<priority>.<lane>`, queue `{ns}.q.<routing key>`, where a shard's lane
//! part is the shard number and a hot lane's is `hot<n>`. A new kind of lane is a change in this
//! file only: its variant, its name part (`Display`), and its place in [`Lane::all`].

use std::fmt;

use warren_common::{Config, PipelineConfig, Priority};

use crate::names::Names;

/// One queue of a step at one priority: which of a step's queues a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// Shard `n` of the pipeline's `shards`: the tenants the stable hash (or a pin) maps to it.
    Shard(u16),
    /// Overflow lane `n` of the pipeline's `hot_lanes`: the jobs of tenants marked hot (flooding),
    /// moved out of their shards so the tenants behind them are not stuck (`hot.rs`).
    Hot(u16),
}

impl Lane {
    /// The lane `tenant`'s messages take in `pipeline` (pins included).
    pub fn for_tenant(pipeline: &PipelineConfig, tenant: &str) -> Lane {
        Lane::Shard(pipeline.shard_of(tenant))
    }

    /// The hot lane `tenant` takes in `pipeline` while it is hot, or `None` when the pipeline
    /// has no hot lanes or the tenant is pinned (a pin is a dedicated shard: it stays there).
    pub fn hot_for(pipeline: &PipelineConfig, tenant: &str) -> Option<Lane> {
        if pipeline.hot_lanes == 0 || pipeline.pins.contains_key(tenant) {
            return None;
        }
        let h = warren_common::shard::fnv1a64(tenant.as_bytes());
        Some(Lane::Hot((h % u64::from(pipeline.hot_lanes)) as u16))
    }

    /// Every lane of a step of `pipeline`, in plan order: the shards, then the hot lanes.
    pub fn all(pipeline: &PipelineConfig) -> impl Iterator<Item = Lane> {
        (0..pipeline.shards)
            .map(Lane::Shard)
            .chain((0..pipeline.hot_lanes).map(Lane::Hot))
    }

    /// The shard this lane is, when it is one.
    pub fn shard(self) -> Option<u16> {
        match self {
            Lane::Shard(shard) => Some(shard),
            Lane::Hot(_) => None,
        }
    }

    /// Whether this is a hot (overflow) lane.
    pub fn is_hot(self) -> bool {
        matches!(self, Lane::Hot(_))
    }

    /// Its place in [`Lane::all`] of `pipeline`.
    pub fn index(self, pipeline: &PipelineConfig) -> usize {
        match self {
            Lane::Shard(shard) => usize::from(shard),
            Lane::Hot(n) => usize::from(pipeline.shards) + usize::from(n),
        }
    }
}

/// The lane's part of the routing key and of the queue name (the last one).
impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lane::Shard(shard) => write!(f, "{shard}"),
            Lane::Hot(n) => write!(f, "hot{n}"),
        }
    }
}

/// Where one step message goes: the step queue of a pipeline's step at one priority and lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepRoute {
    pub pipeline: String,
    pub step: String,
    pub priority: Priority,
    pub lane: Lane,
}

impl StepRoute {
    pub fn new(pipeline: &str, step: &str, priority: Priority, lane: Lane) -> StepRoute {
        StepRoute {
            pipeline: pipeline.to_string(),
            step: step.to_string(),
            priority,
            lane,
        }
    }

    /// The route of `tenant`'s message for `step` of `pipeline` at `priority`.
    pub fn for_tenant(
        pipeline: &PipelineConfig,
        step: &str,
        priority: Priority,
        tenant: &str,
    ) -> StepRoute {
        StepRoute::new(
            &pipeline.name,
            step,
            priority,
            Lane::for_tenant(pipeline, tenant),
        )
    }

    /// Routing key on the tasks exchange: `<pipeline>.<step>.<priority>.<lane>`.
    pub fn routing_key(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.pipeline, self.step, self.priority, self.lane
        )
    }

    /// The queue: `{ns}.q.<pipeline>.<step>.<priority>.<lane>`.
    pub fn queue(&self, names: &Names) -> String {
        format!("{}{}", names.step_queue_prefix(), self.routing_key())
    }

    /// Every route of `step` of `pipeline`, in plan order (priority, then lane): the
    /// priorities the pipeline declares, each with every lane.
    pub fn of_step<'a>(
        pipeline: &'a PipelineConfig,
        step: &'a str,
    ) -> impl Iterator<Item = StepRoute> + 'a {
        pipeline.priorities.iter().flat_map(move |&priority| {
            Lane::all(pipeline)
                .map(move |lane| StepRoute::new(&pipeline.name, step, priority, lane))
        })
    }

    /// Every route of `config`, in plan order (pipeline, step, priority, lane).
    pub fn all(config: &Config) -> Vec<StepRoute> {
        config
            .pipelines
            .iter()
            .flat_map(|p| p.steps.iter().flat_map(|s| Self::of_step(p, &s.name)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    /// Pipeline `p` (steps `a` and `b` over 2 shards) and pipeline `pinned` (its first step
    /// over 8 shards, the last one pinned to `big-customer`).
    fn config() -> Config {
        let mut config = crate::topology::tests::two_steps_two_shards();
        let p = &config.pipelines[0];
        let pinned = PipelineConfig {
            name: "pinned".into(),
            shards: 8,
            pins: BTreeMap::from([("big-customer".to_string(), 7)]),
            steps: p.steps[..1].to_vec(),
            hot_lanes: 0,
            ..p.clone()
        };
        config.pipelines.push(pinned);
        config
    }

    fn route(pipeline: &str, step: &str, priority: Priority, shard: u16) -> StepRoute {
        StepRoute::new(pipeline, step, priority, Lane::Shard(shard))
    }

    #[test]
    fn names_are_the_documented_ones() {
        let r = route("thumbnails", "fetch", Priority::High, 3);
        assert_eq!(r.routing_key(), "thumbnails.fetch.high.3");
        assert_eq!(
            r.queue(&Names::new("acme-prod")),
            "acme-prod.q.thumbnails.fetch.high.3"
        );
    }

    #[test]
    fn a_tenant_takes_its_shard_and_a_pin_wins() {
        let config = config();
        let pinned = config.pipeline("pinned").unwrap();
        let r = StepRoute::for_tenant(pinned, "a", Priority::Low, "big-customer");
        assert_eq!(r, route("pinned", "a", Priority::Low, 7));
        // Values from docs/wire-format.md: acme is on shard 5 of 8 when shard 7 is pinned.
        let r = StepRoute::for_tenant(pinned, "a", Priority::Normal, "acme");
        assert_eq!(r.lane, Lane::Shard(5));
        assert_eq!(r.lane, Lane::Shard(pinned.shard_of("acme")));
    }

    #[test]
    fn enumeration_is_in_plan_order() {
        let config = config();
        let all = StepRoute::all(&config);
        // `p`: 2 steps x 3 priorities x (2 shards + 2 hot lanes); `pinned`: 3 x 8 shards.
        assert_eq!(all.len(), 2 * 3 * 4 + 3 * 8);
        // Step b (second), low (third level), shard 1: 1*12 + 2*4 + 1.
        assert_eq!(all[21], route("p", "b", Priority::Low, 1));
        assert_eq!(all[0], route("p", "a", Priority::High, 0));
        let hot1 = StepRoute::new("p", "a", Priority::High, Lane::Hot(1));
        assert_eq!(all[3], hot1);
        assert_eq!(hot1.routing_key(), "p.a.high.hot1");
        assert_eq!(all[24], route("pinned", "a", Priority::High, 0));
        let p = config.pipeline("p").unwrap();
        let of_b: Vec<_> = StepRoute::of_step(p, "b").collect();
        assert_eq!(of_b, all[12..24]);
        let lanes: Vec<_> = Lane::all(p).collect();
        assert_eq!(
            lanes,
            [Lane::Shard(0), Lane::Shard(1), Lane::Hot(0), Lane::Hot(1)]
        );
        for (i, lane) in lanes.iter().enumerate() {
            assert_eq!(lane.index(p), i);
        }
        // Every tenant's route is one of the enumerated ones.
        for tenant in ["acme", "globex", "big-customer", "t-42"] {
            for pipeline in &config.pipelines {
                let first = &pipeline.first_step().name;
                let r = StepRoute::for_tenant(pipeline, first, Priority::High, tenant);
                assert!(all.contains(&r), "{r:?}");
            }
        }
    }

    #[test]
    fn a_pipeline_enumerates_only_its_priorities() {
        let mut config = config();
        config.pipelines[0].priorities = vec![Priority::Normal];
        let p = config.pipeline("p").unwrap();
        let of_a: Vec<_> = StepRoute::of_step(p, "a").collect();
        assert_eq!(
            of_a,
            [
                route("p", "a", Priority::Normal, 0),
                route("p", "a", Priority::Normal, 1),
                StepRoute::new("p", "a", Priority::Normal, Lane::Hot(0)),
                StepRoute::new("p", "a", Priority::Normal, Lane::Hot(1)),
            ]
        );
        // The other pipeline keeps all three.
        assert_eq!(StepRoute::all(&config).len(), 2 * 4 + 3 * 8);
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,12}"
    }

    fn any_route() -> impl Strategy<Value = StepRoute> {
        let lane = prop_oneof![
            any::<u16>().prop_map(Lane::Shard),
            any::<u16>().prop_map(Lane::Hot)
        ];
        (name(), name(), 0..3usize, lane)
            .prop_map(|(p, s, i, lane)| StepRoute::new(&p, &s, Priority::ALL[i], lane))
    }

    proptest! {
        #[test]
        fn names_are_distinct_per_route(a in any_route(), b in any_route()) {
            let names = Names::new("ns");
            prop_assert_eq!(a == b, a.routing_key() == b.routing_key());
            prop_assert_eq!(a == b, a.queue(&names) == b.queue(&names));
            prop_assert_eq!(a.queue(&names), format!("ns.q.{}", a.routing_key()));
        }

        #[test]
        fn every_tenant_lands_on_an_enumerated_lane(tenant in name(), shards in 1u16..20) {
            let pipeline = PipelineConfig {
                shards,
                pins: BTreeMap::new(),
                ..config().pipelines[0].clone()
            };
            let lane = Lane::for_tenant(&pipeline, &tenant);
            prop_assert!(Lane::all(&pipeline).any(|l| l == lane));
            let all: HashSet<_> = Lane::all(&pipeline).collect();
            prop_assert_eq!(all.len(), usize::from(shards) + usize::from(pipeline.hot_lanes));
            let hot = Lane::hot_for(&pipeline, &tenant).expect("hot lanes by default");
            prop_assert!(all.contains(&hot) && hot.is_hot());
        }
    }
}
