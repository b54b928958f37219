//! Which queue a free slot serves next: a pure decision, unit-tested without a broker.
//!
//! Priorities are strict (`high`, then `normal`, then `low`) with an ageing guard: a level that
//! has work but was passed over `starve_limit` times in a row gets the next slot, so `low` still
//! moves under a steady stream of `high`. Within a level, lanes (a step's queues at one priority:
//! its shards) are served round-robin, so a flooded lane gets one turn in `lanes`, not the whole
//! worker.

use warren_common::Priority;

/// Default for [`Picker::new`]: a waiting lower level gets at least one slot in 11.
pub(crate) const DEFAULT_STARVE_LIMIT: u32 = 10;

#[derive(Debug, Clone)]
pub(crate) struct Picker {
    lanes: usize,
    starve_limit: u32,
    passed_over: [u32; 3],
    cursor: [usize; 3],
}

impl Picker {
    /// A picker for `lanes` lanes per priority level.
    pub(crate) fn new(lanes: usize, starve_limit: u32) -> Self {
        Self {
            lanes: lanes.max(1),
            starve_limit: starve_limit.max(1),
            passed_over: [0; 3],
            cursor: [0; 3],
        }
    }

    /// Picks the (priority, lane index) to serve, given which lanes have a delivery waiting.
    pub(crate) fn pick(
        &mut self,
        has_work: impl Fn(Priority, usize) -> bool,
    ) -> Option<(Priority, usize)> {
        let waiting: Vec<Priority> = Priority::ALL
            .into_iter()
            .filter(|&p| (0..self.lanes).any(|s| has_work(p, s)))
            .collect();
        let &most_urgent = waiting.first()?;
        let starved = waiting
            .iter()
            .copied()
            .find(|&p| p != most_urgent && self.passed_over[p.index()] >= self.starve_limit);
        let chosen = starved.unwrap_or(most_urgent);
        for &p in &waiting {
            if p == chosen {
                self.passed_over[p.index()] = 0;
            } else if p > chosen {
                self.passed_over[p.index()] += 1;
            }
        }
        let start = self.cursor[chosen.index()];
        let lane = (0..self.lanes)
            .map(|i| (start + i) % self.lanes)
            .find(|&l| has_work(chosen, l))
            .expect("the chosen level has work");
        self.cursor[chosen.index()] = (lane + 1) % self.lanes;
        Some((chosen, lane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    #[test]
    fn nothing_waiting() {
        assert_eq!(Picker::new(4, 10).pick(|_, _| false), None);
    }

    #[test]
    fn high_first() {
        let mut p = Picker::new(2, 10);
        assert_eq!(
            p.pick(|pr, s| (pr == Low && s == 0) || (pr == High && s == 1)),
            Some((High, 1))
        );
    }

    #[test]
    fn low_is_not_starved_forever() {
        let mut p = Picker::new(1, 10);
        let picks: Vec<_> = (0..22).map(|_| p.pick(|_, _| true).unwrap().0).collect();
        let lows = picks.iter().filter(|&&x| x == Low).count();
        let normals = picks.iter().filter(|&&x| x == Normal).count();
        assert!(lows >= 1 && normals >= 1, "{picks:?}");
        assert!(
            picks.iter().filter(|&&x| x == High).count() >= 16,
            "{picks:?}"
        );
    }

    #[test]
    fn lanes_take_turns() {
        let mut p = Picker::new(4, 10);
        // Lanes 0 and 2 have work: they alternate, whatever their backlog.
        let picks: Vec<_> = (0..6)
            .map(|_| p.pick(|_, s| s == 0 || s == 2).unwrap().1)
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2, 0, 2]);
    }
}
