//! When a schedule fires, as pure arithmetic: its [`Cadence`] (a cron pattern in a time zone, or
//! a fixed interval) and the slots due between the last fire and now ([`due_slots`]).
//!
//! Daylight-saving changes follow croner's rules for a fixed-time pattern (`0 2 * * *`): a wall
//! time that does not exist (spring forward) fires at the first instant after the gap, and one
//! that happens twice (fall back) fires once, at the earlier instant. So a daily 02:30 in
//! Europe/Warsaw fires every day exactly once. Interval patterns (`*/15 * * * *`) fire on both
//! instants of a repeated hour, as wall clocks show them.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// The most slots one call of [`due_slots`] returns: a long catch-up window of a fast schedule
/// is fired over several ticks instead of one long one.
pub const MAX_SLOTS_PER_CALL: usize = 100;

/// How often a schedule fires.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// A cron pattern (5 fields, or 6 with seconds first) read in a time zone.
    Cron { cron: Box<Cron>, timezone: Tz },
    /// Every multiple of this interval since the Unix epoch (so `every = "1h"` fires on the hour,
    /// whichever machine computes it).
    Every(Duration),
}

impl Cadence {
    /// Parses a cron pattern: 5 fields, or 6 with seconds first.
    pub fn cron(pattern: &str, timezone: Tz) -> Result<Self, String> {
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "`{pattern}` has {fields} fields; a cron pattern has 5, or 6 with seconds first"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| format!("`{pattern}`: {e}"))?;
        Ok(Cadence::Cron {
            cron: Box::new(cron),
            timezone,
        })
    }

    /// An interval of at least one second, in whole seconds.
    pub fn every(interval: Duration) -> Result<Self, String> {
        if interval < Duration::from_secs(1) || interval.subsec_nanos() != 0 {
            return Err("must be a whole number of seconds, at least 1s".into());
        }
        Ok(Cadence::Every(interval))
    }

    /// The first slot strictly after `t`, if any (a pattern may never match again).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Cadence::Cron { cron, timezone } => cron
                .find_next_occurrence(&t.with_timezone(timezone), false)
                .ok()
                .map(|next| next.with_timezone(&Utc)),
            Cadence::Every(interval) => {
                let step = interval.as_secs() as i64;
                let secs = t.timestamp().div_euclid(step) * step + step;
                Utc.timestamp_opt(secs, 0).single()
            }
        }
    }

    /// The last slot at or before `t`, if any.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Cadence::Cron { cron, timezone } => cron
                .find_previous_occurrence(&t.with_timezone(timezone), true)
                .ok()
                .map(|prev| prev.with_timezone(&Utc)),
            Cadence::Every(interval) => {
                let step = interval.as_secs() as i64;
                Utc.timestamp_opt(t.timestamp().div_euclid(step) * step, 0)
                    .single()
            }
        }
    }
}

/// The slots to fire now, and how many fell out of the catch-up window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Oldest first, at most [`MAX_SLOTS_PER_CALL`].
    pub slots: Vec<DateTime<Utc>>,
    /// Slots after the last fire but older than the catch-up window: never fired (counted up to
    /// [`MAX_SLOTS_PER_CALL`] x 100, enough to say so in a log).
    pub skipped: u64,
    /// The newest of the skipped slots: where the schedule's last slot moves when nothing in
    /// the window is due, so they are not counted again.
    pub newest_skipped: Option<DateTime<Utc>>,
}

/// The slots in (`last_fired`, `now`] not older than `catch_up` before `now`, oldest first.
/// A slot exactly `catch_up` old still fires; with `catch_up` zero only a slot at `now` would.
pub fn due_slots(
    cadence: &Cadence,
    last_fired: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: Duration,
) -> Due {
    let window_start = now - chrono::Duration::from_std(catch_up).unwrap_or(chrono::Duration::MAX);
    let mut due = Due::default();
    // Counting the skipped ones walks them; past this many it stops counting.
    let count_limit = (MAX_SLOTS_PER_CALL * 100) as u64;
    let mut cursor = last_fired;
    if window_start > last_fired {
        // Jump to the window for long outages: walk only a bounded number of the skipped slots.
        while let Some(slot) = cadence.next_after(cursor) {
            if slot >= window_start || slot > now {
                break;
            }
            due.skipped += 1;
            due.newest_skipped = Some(slot);
            cursor = slot;
            if due.skipped >= count_limit {
                // A slot just before the window: the walk goes on from there.
                let before = window_start - chrono::Duration::seconds(1);
                cursor = cadence
                    .last_at_or_before(before)
                    .unwrap_or(before)
                    .max(cursor);
                break;
            }
        }
    }
    while let Some(slot) = cadence.next_after(cursor) {
        if slot > now || due.slots.len() >= MAX_SLOTS_PER_CALL {
            break;
        }
        if slot >= window_start {
            due.slots.push(slot);
        } else {
            due.skipped += 1;
            due.newest_skipped = Some(slot);
        }
        cursor = slot;
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn warsaw(pattern: &str) -> Cadence {
        Cadence::cron(pattern, "Europe/Warsaw".parse().unwrap()).unwrap()
    }

    fn all_slots(cadence: &Cadence, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        let (mut t, end) = (utc(from), utc(to));
        let mut out = Vec::new();
        while let Some(next) = cadence.next_after(t) {
            if next > end {
                break;
            }
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn patterns_have_5_or_6_fields() {
        let tz = Tz::UTC;
        assert!(Cadence::cron("0 2 * * *", tz).is_ok());
        assert!(Cadence::cron("*/5 0 2 * * *", tz).is_ok());
        assert!(Cadence::cron("0 2 * *", tz)
            .unwrap_err()
            .contains("4 fields"));
        assert!(Cadence::cron("0 0 2 * * * 2030", tz).is_err());
        assert!(Cadence::cron("0 25 * * *", tz).is_err());
        assert!(Cadence::every(Duration::from_millis(500)).is_err());
        assert!(Cadence::every(Duration::from_millis(1500)).is_err());
    }

    #[test]
    fn six_fields_put_seconds_first() {
        let c = Cadence::cron("30 0 2 * * *", Tz::UTC).unwrap();
        assert_eq!(
            c.next_after(utc("2026-01-01T00:00:00Z")),
            Some(utc("2026-01-01T02:00:30Z"))
        );
    }

    #[test]
    fn spring_forward_fires_a_missing_wall_time_once_right_after_the_gap() {
        // 2026-03-29 in Warsaw: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let slots = all_slots(
            &warsaw("30 2 * * *"),
            "2026-03-27T12:00:00Z",
            "2026-03-31T12:00:00Z",
        );
        assert_eq!(
            slots,
            [
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST, the first instant after the gap
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
                utc("2026-03-31T00:30:00Z"),
            ]
        );
    }

    #[test]
    fn fall_back_fires_a_repeated_wall_time_once_at_the_earlier_instant() {
        // 2026-10-25 in Warsaw: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
        let slots = all_slots(
            &warsaw("30 2 * * *"),
            "2026-10-24T12:00:00Z",
            "2026-10-26T12:00:00Z",
        );
        assert_eq!(
            slots,
            [
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of the two
                utc("2026-10-26T01:30:00Z"), // 02:30 CET
            ]
        );
    }

    #[test]
    fn catch_up_fires_the_window_oldest_first_and_counts_the_rest() {
        let every = Cadence::every(Duration::from_secs(60)).unwrap();
        let last = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-01T00:10:30Z");
        let due = due_slots(&every, last, now, Duration::from_secs(180));
        assert_eq!(
            due.slots,
            [
                utc("2026-01-01T00:08:00Z"),
                utc("2026-01-01T00:09:00Z"),
                utc("2026-01-01T00:10:00Z"),
            ]
        );
        assert_eq!(due.skipped, 7);
        // "0s" skips every missed slot.
        let due = due_slots(&every, last, now, Duration::ZERO);
        assert!(due.slots.is_empty());
        assert_eq!(due.skipped, 10);
        assert_eq!(due.newest_skipped, Some(utc("2026-01-01T00:10:00Z")));
        // Nothing due twice: from the last slot fired, only later ones.
        let due = due_slots(
            &every,
            utc("2026-01-01T00:10:00Z"),
            now,
            Duration::from_secs(3600),
        );
        assert!(due.slots.is_empty());
    }

    #[test]
    fn a_long_outage_is_walked_in_bounded_steps() {
        let every = Cadence::every(Duration::from_secs(1)).unwrap();
        let last = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-05T00:00:00Z");
        let due = due_slots(&every, last, now, Duration::from_secs(10));
        assert_eq!(due.slots.len(), 11);
        assert_eq!(due.slots.last(), Some(&now));
        assert!(due.skipped >= 10_000);
    }

    proptest! {
        /// A daily 02:00 or 02:30 in Warsaw fires exactly once on every local day, DST or not.
        #[test]
        fn daily_fires_once_per_local_day(start_day in 0i64..3000, minute in prop::sample::select(vec![0u32, 30])) {
            let cadence = warsaw(&format!("{minute} 2 * * *"));
            let tz: Tz = "Europe/Warsaw".parse().unwrap();
            let start = utc("2020-01-01T12:00:00Z") + chrono::Duration::days(start_day);
            let slots = all_slots(&cadence, &start.to_rfc3339(), &(start + chrono::Duration::days(40)).to_rfc3339());
            let days: Vec<_> = slots.iter().map(|s| s.with_timezone(&tz).date_naive()).collect();
            prop_assert_eq!(days.len(), 40);
            for pair in days.windows(2) {
                prop_assert_eq!(pair[1] - pair[0], chrono::Duration::days(1));
            }
        }

        /// Firing tick by tick fires every slot once, in order, whatever the tick times.
        #[test]
        fn ticks_fire_each_slot_once(gaps in prop::collection::vec(0u64..5_000, 1..60), secs in 1u64..7) {
            let cadence = Cadence::every(Duration::from_secs(secs)).unwrap();
            let start = utc("2026-03-29T00:59:00Z");
            let (mut now, mut last) = (start, start);
            let mut fired = Vec::new();
            for gap in gaps {
                now += chrono::Duration::milliseconds(gap as i64);
                let due = due_slots(&cadence, last, now, Duration::from_secs(3600));
                if let Some(newest) = due.slots.last() {
                    last = *newest;
                }
                fired.extend(due.slots);
            }
            prop_assert_eq!(fired, all_slots(&cadence, &start.to_rfc3339(), &now.to_rfc3339()));
        }
    }
}
