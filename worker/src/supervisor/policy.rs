//! How a pool is sized, as pure functions of the backlog, the running count and the clock:
//! [`decide`] the size, then the [`Action`] that gets there, with the memory a pool keeps
//! between ticks ([`Sizing`]: how long it has wanted fewer, how long its restarts back off).

use std::time::{Duration, Instant};

/// A worker that exits sooner than this after its start is crash-looping: its restarts back off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How a pool is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) min: u32,
    pub(crate) max: u32,
    /// Ready messages one worker is expected to keep up with.
    pub(crate) target_backlog: u64,
    /// Below this backlog the pool wants no worker at all (only matters with `min = 0`).
    pub(crate) activation: u64,
    /// How long the wanted count must stay below the running count before workers are drained.
    pub(crate) scale_down_after: Duration,
}

impl Policy {
    /// `clamp(ceil(backlog / target_backlog), min, max)`; 0 below the activation threshold
    /// (then clamped to `min` all the same).
    pub(crate) fn desired(&self, backlog: u64) -> u32 {
        let wanted = if backlog < self.activation.max(1) {
            0
        } else {
            backlog.div_ceil(self.target_backlog.max(1))
        };
        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
        wanted.clamp(self.min, self.max.max(self.min))
    }
}

/// One tick's verdict for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// What the backlog asks for right now.
    pub(crate) desired: u32,
    /// How many workers the pool should run after this tick.
    pub(crate) target: u32,
}

/// The sizing rule. `lower_for` is how long the wanted count has been below `running` without
/// a break, as of the previous tick (zero if it was not below then). Scaling up is immediate;
/// scaling down waits until `lower_for` reaches `policy.scale_down_after`, so a short lull
/// between bursts does not drain workers that the next burst needs again.
pub(crate) fn decide(backlog: u64, running: u32, policy: &Policy, lower_for: Duration) -> Decision {
    let desired = policy.desired(backlog);
    let target = if desired >= running || lower_for >= policy.scale_down_after {
        desired
    } else {
        running
    };
    Decision { desired, target }
}

/// What a tick does to a pool (the `action` of the "Scaling decision." log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start workers up to the target.
    ScaleUp,
    /// Drain workers down to the target.
    ScaleDown,
    /// Fewer are wanted, but not yet for `scale_down_after`: keep them.
    Hold,
    /// More are wanted, but the pool's workers crash at start: wait out the backoff.
    WaitRestartBackoff,
    /// The pool is the size it should be (`none`).
    Steady,
}

impl Action {
    /// `running` workers now; `held` while a crash backoff forbids starts.
    pub(crate) fn of(decision: Decision, running: u32, held: bool) -> Self {
        match decision.target.cmp(&running) {
            std::cmp::Ordering::Greater if held => Action::WaitRestartBackoff,
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal if decision.desired < running => Action::Hold,
            std::cmp::Ordering::Equal => Action::Steady,
        }
    }

    /// As the log says it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::ScaleUp => "scale_up",
            Action::ScaleDown => "scale_down",
            Action::Hold => "hold",
            Action::WaitRestartBackoff => "wait_restart_backoff",
            Action::Steady => "none",
        }
    }
}

/// What a pool remembers between ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sizing {
    /// Since when the wanted count has been below the running count, without a break.
    lower_since: Option<Instant>,
    /// The last wanted count, kept while the backlog cannot be read.
    last_desired: u32,
    /// No start before this (a crash-looping worker backs off).
    hold_starts_until: Option<Instant>,
    crash_backoff: Duration,
}

impl Sizing {
    pub(crate) fn new(policy: &Policy) -> Self {
        Self {
            lower_since: None,
            last_desired: policy.min,
            hold_starts_until: None,
            crash_backoff: RESTART_BACKOFF_MIN,
        }
    }

    /// This tick's decision and action for a pool of `running` workers. With no `backlog` (the
    /// broker cannot be read) the pool is blind: it keeps what it had, restarting the dead, and
    /// never scales down.
    pub(crate) fn tick(
        &mut self,
        policy: &Policy,
        backlog: Option<u64>,
        running: u32,
        now: Instant,
    ) -> (Decision, Action) {
        let lower_for = self.lower_since.map_or(Duration::ZERO, |t| now - t);
        let decision = match backlog {
            Some(b) => decide(b, running, policy, lower_for),
            None => Decision {
                desired: self.last_desired,
                target: self.last_desired.max(running),
            },
        };
        self.last_desired = decision.desired;
        self.lower_since = if decision.desired < running && decision.target == running {
            Some(self.lower_since.unwrap_or(now))
        } else {
            None
        };
        let held = self.hold_starts_until.is_some_and(|t| now < t);
        (decision, Action::of(decision, running, held))
    }

    /// A worker died unasked after running for `lived`: one that died soon after its start
    /// holds the pool's starts back, twice as long each time; one that ran a while resets that.
    pub(crate) fn crashed(&mut self, lived: Duration, now: Instant) {
        if lived < STABLE_AFTER {
            self.back_off(now);
        } else {
            self.crash_backoff = RESTART_BACKOFF_MIN;
        }
    }

    /// A worker could not be started at all: back off as after a crash at start.
    pub(crate) fn start_failed(&mut self, now: Instant) {
        self.back_off(now);
    }

    fn back_off(&mut self, now: Instant) {
        self.hold_starts_until = Some(now + self.crash_backoff);
        self.crash_backoff = (self.crash_backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(min: u32, max: u32, target: u64) -> Policy {
        Policy {
            min,
            max,
            target_backlog: target,
            activation: 1,
            scale_down_after: Duration::from_secs(30),
        }
    }

    #[test]
    fn desired_is_the_clamped_ceiling() {
        let p = policy(1, 5, 20);
        assert_eq!(p.desired(0), 1);
        assert_eq!(p.desired(1), 1);
        assert_eq!(p.desired(20), 1);
        assert_eq!(p.desired(21), 2);
        assert_eq!(p.desired(100), 5);
        assert_eq!(p.desired(u64::MAX), 5);
    }

    #[test]
    fn scale_to_zero_and_activation() {
        let p = Policy {
            activation: 10,
            ..policy(0, 3, 20)
        };
        assert_eq!(p.desired(0), 0);
        assert_eq!(p.desired(9), 0, "below the activation threshold");
        assert_eq!(p.desired(10), 1);
        // An idle pool of zero starts a worker as soon as the threshold is reached.
        assert_eq!(decide(10, 0, &p, Duration::ZERO).target, 1);
        assert_eq!(decide(9, 0, &p, Duration::ZERO).target, 0);
        // And it goes back to zero only after the window.
        assert_eq!(decide(0, 1, &p, Duration::from_secs(5)).target, 1);
        assert_eq!(decide(0, 1, &p, Duration::from_secs(30)).target, 0);
    }

    #[test]
    fn up_at_once_down_after_the_window() {
        let p = policy(1, 3, 20);
        assert_eq!(
            decide(100, 1, &p, Duration::ZERO),
            Decision {
                desired: 3,
                target: 3
            }
        );
        let lull = decide(0, 3, &p, Duration::from_secs(29));
        assert_eq!(
            lull,
            Decision {
                desired: 1,
                target: 3
            }
        );
        assert_eq!(decide(0, 3, &p, Duration::from_secs(30)).target, 1);
        assert_eq!(decide(30, 3, &p, Duration::from_secs(30)).target, 2);
    }

    #[test]
    fn each_action_and_its_label() {
        let d = |desired, target| Decision { desired, target };
        let cases = [
            (Action::of(d(3, 3), 1, false), Action::ScaleUp, "scale_up"),
            (
                Action::of(d(3, 3), 1, true),
                Action::WaitRestartBackoff,
                "wait_restart_backoff",
            ),
            (
                Action::of(d(1, 1), 3, false),
                Action::ScaleDown,
                "scale_down",
            ),
            (Action::of(d(1, 3), 3, false), Action::Hold, "hold"),
            (Action::of(d(2, 2), 2, false), Action::Steady, "none"),
            // A backoff only holds back starts.
            (
                Action::of(d(1, 1), 3, true),
                Action::ScaleDown,
                "scale_down",
            ),
            (Action::of(d(2, 2), 2, true), Action::Steady, "none"),
        ];
        for (got, want, label) in cases {
            assert_eq!(got, want);
            assert_eq!(got.as_str(), label);
        }
    }

    #[test]
    fn a_lull_drains_only_once_it_outlasts_the_window() {
        let p = policy(1, 5, 10);
        let mut s = Sizing::new(&p);
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(s.tick(&p, Some(50), 1, at(0)).1, Action::ScaleUp);
        assert_eq!(s.tick(&p, Some(0), 5, at(2)).1, Action::Hold);
        assert_eq!(s.tick(&p, Some(0), 5, at(20)).1, Action::Hold);
        // A burst breaks the lull: the window starts again after it.
        assert_eq!(s.tick(&p, Some(50), 5, at(25)).1, Action::Steady);
        assert_eq!(s.tick(&p, Some(0), 5, at(30)).1, Action::Hold);
        assert_eq!(s.tick(&p, Some(0), 5, at(59)).1, Action::Hold);
        let (decision, action) = s.tick(&p, Some(0), 5, at(60));
        assert_eq!((decision.target, action), (1, Action::ScaleDown));
    }

    #[test]
    fn blind_keeps_the_pool_and_restarts_the_dead() {
        let p = policy(1, 5, 10);
        let mut s = Sizing::new(&p);
        let now = Instant::now();
        s.tick(&p, Some(30), 0, now);
        // Two of three died while the broker cannot be read: start them again.
        let (decision, action) = s.tick(&p, None, 1, now);
        assert_eq!((decision.desired, decision.target), (3, 3));
        assert_eq!(action, Action::ScaleUp);
        // More running than wanted: blind, it never drains, however long.
        let (decision, action) = s.tick(&p, None, 4, now);
        assert_eq!((decision.target, action), (4, Action::Hold));
        let (decision, action) = s.tick(&p, None, 4, now + Duration::from_secs(600));
        assert_eq!((decision.target, action), (4, Action::Hold));
    }

    #[test]
    fn crash_loops_back_off_doubling_and_a_stable_run_resets() {
        let p = policy(1, 2, 10);
        let mut s = Sizing::new(&p);
        let now = Instant::now();
        let quick = Duration::from_secs(1);
        let mut holds = Vec::new();
        for _ in 0..7 {
            s.crashed(quick, now);
            holds.push(s.hold_starts_until.unwrap() - now);
        }
        let secs: Vec<u64> = holds.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(
            s.tick(&p, Some(10), 0, now + Duration::from_secs(29)).1,
            Action::WaitRestartBackoff
        );
        assert_eq!(
            s.tick(&p, Some(10), 0, now + Duration::from_secs(30)).1,
            Action::ScaleUp
        );
        s.crashed(STABLE_AFTER, now);
        s.start_failed(now);
        assert_eq!(s.hold_starts_until, Some(now + RESTART_BACKOFF_MIN));
    }

    proptest! {
        #[test]
        fn desired_stays_within_bounds_and_covers_the_backlog(
            backlog in any::<u64>(), min in 0u32..10, extra in 0u32..10, target in 1u64..1000,
        ) {
            let p = policy(min, min + extra.max(1), target);
            let d = p.desired(backlog);
            prop_assert!(p.min <= d && d <= p.max);
            // Below max, the workers cover the backlog at `target` each, with none to spare.
            if d < p.max {
                prop_assert!(u64::from(d) * target >= backlog);
            }
            if d > p.min.max(1) {
                prop_assert!(u64::from(d - 1) * target < backlog);
            }
        }

        #[test]
        fn up_is_immediate_and_down_waits_for_the_window(
            backlog in 0u64..10_000, running in 0u32..12, lower_ms in 0u64..60_000,
            window_ms in 0u64..60_000, min in 0u32..4, target in 1u64..100,
        ) {
            let p = Policy {
                scale_down_after: Duration::from_millis(window_ms),
                ..policy(min, min + 8, target)
            };
            let lower_for = Duration::from_millis(lower_ms);
            let d = decide(backlog, running, &p, lower_for);
            prop_assert_eq!(d.desired, p.desired(backlog));
            if d.desired >= running {
                prop_assert_eq!(d.target, d.desired, "up (or steady) at once");
            } else if lower_ms < window_ms {
                prop_assert_eq!(d.target, running, "no scale-down inside the window");
            } else {
                prop_assert_eq!(d.target, d.desired, "down once the window has passed");
            }
            prop_assert!(d.target >= d.desired);
        }

        #[test]
        fn the_action_moves_toward_the_target(
            backlog in 0u64..10_000, running in 0u32..12, lower_ms in 0u64..60_000,
            held: bool, min in 0u32..4, target in 1u64..100,
        ) {
            let p = policy(min, min + 8, target);
            let d = decide(backlog, running, &p, Duration::from_millis(lower_ms));
            let action = Action::of(d, running, held);
            match action {
                Action::ScaleUp => prop_assert!(d.target > running && !held),
                Action::WaitRestartBackoff => prop_assert!(d.target > running && held),
                Action::ScaleDown => prop_assert!(d.target < running),
                Action::Hold => prop_assert!(d.target == running && d.desired < running),
                Action::Steady => prop_assert!(d.target == running && d.desired == running),
            }
        }
    }
}
