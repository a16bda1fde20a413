//! Sliding rate-limit windows, counted in sub-buckets: the pure arithmetic both the in-process
//! counters and the Redis script follow.
//!
//! A window of `W` ms is cut into [`SLOTS`] buckets of `W / SLOTS` ms, aligned on multiples of the
//! bucket width since the Unix epoch. A request counts in the bucket of its arrival, and a bucket
//! counts until its *end* is `W` ms in the past. So in any interval of `W` ms no more than the
//! limit is admitted (the strict sliding-window guarantee, never the doubled burst of fixed windows
//! or token buckets at a window edge), and a unit is given back at most one bucket width (5% of the
//! window) later than an exact request log would. The state is `SLOTS + 1` counters per customer
//! and window, whatever the limit.

/// Buckets per window.
pub const SLOTS: i64 = 20;

/// A window's counters: bucket `head - i` is at slot `(head - i) mod (SLOTS + 1)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCounts {
    /// Window length, ms.
    window_ms: i64,
    /// Index of the newest bucket written (`time / width`).
    head: i64,
    slots: [u32; SLOTS as usize + 1],
}

/// A window's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// The window's limit.
    pub limit: u64,
    /// The window's length, ms.
    pub window_ms: i64,
    /// Units left after this request.
    pub remaining: u64,
    /// Ms until a counted unit is given back (for a refusal: until enough are for this request).
    pub reset_ms: i64,
}

impl WindowCounts {
    /// Empty counters for a window of `window_ms` (a multiple of [`SLOTS`] ms).
    pub fn new(window_ms: i64) -> Self {
        Self {
            window_ms,
            head: i64::MIN,
            slots: [0; SLOTS as usize + 1],
        }
    }

    /// The window's length, ms.
    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    fn width(&self) -> i64 {
        (self.window_ms / SLOTS).max(1)
    }

    fn slot(bucket: i64) -> usize {
        bucket.rem_euclid(SLOTS + 1) as usize
    }

    /// Moves the head to `now`'s bucket, clearing buckets that no longer count.
    fn advance(&mut self, now_ms: i64) {
        let bucket = now_ms.div_euclid(self.width());
        if bucket <= self.head {
            return;
        }
        let stale = if self.head == i64::MIN {
            SLOTS + 1
        } else {
            (bucket - self.head).min(SLOTS + 1)
        };
        for i in 0..stale {
            self.slots[Self::slot(bucket - i)] = 0;
        }
        self.head = bucket;
    }

    /// Units counted at `now_ms`.
    pub fn count(&mut self, now_ms: i64) -> u64 {
        self.advance(now_ms);
        self.slots.iter().map(|&n| u64::from(n)).sum()
    }

    /// Whether nothing counts at `now_ms` any more: the counters can be forgotten.
    pub fn is_idle(&mut self, now_ms: i64) -> bool {
        self.count(now_ms) == 0
    }

    /// Ms from `now_ms` until the counted units drop to `target` or below (0 if they are).
    fn ms_until_at_most(&mut self, target: u64, now_ms: i64) -> i64 {
        let mut counted = self.count(now_ms);
        if counted <= target {
            return 0;
        }
        let width = self.width();
        // Oldest bucket first: each is given back when its end is a window in the past.
        for bucket in self.head - SLOTS..=self.head {
            counted -= u64::from(self.slots[Self::slot(bucket)]);
            if counted <= target {
                return (bucket + 1) * width + self.window_ms - now_ms;
            }
        }
        self.window_ms
    }

    /// Raises the units counted at `now_ms` to `counted` (what the shared counters said), by
    /// counting the difference now; never lowers them. Counted in the newest bucket, those
    /// units are given back up to one window later than the shared buckets give them back:
    /// counting in process after Redis fails starts at least as full as Redis was, so a
    /// customer cannot get a fresh window from every gateway at once.
    pub fn follow(&mut self, counted: u64, now_ms: i64) {
        let here = self.count(now_ms);
        if counted > here {
            self.add(u32::try_from(counted - here).unwrap_or(u32::MAX), now_ms);
        }
    }

    /// Counts `units` now.
    fn add(&mut self, units: u32, now_ms: i64) {
        self.advance(now_ms);
        let slot = &mut self.slots[Self::slot(self.head)];
        *slot = slot.saturating_add(units);
    }
}

/// Whether a unit counted at `at_ms` still counts in a window of `window_ms` at `now_ms`: until
/// its bucket's end is a window in the past, as [`WindowCounts`] and the Redis script count.
pub fn still_counted(at_ms: i64, window_ms: i64, now_ms: i64) -> bool {
    let width = (window_ms / SLOTS).max(1);
    let bucket_end = (at_ms.div_euclid(width) + 1).saturating_mul(width);
    bucket_end.saturating_add(window_ms) > now_ms
}

/// Admits `units` at `now_ms` if every window has room, counting them in all; otherwise counts
/// nothing. Fills `states` with each window's state (in the order given); returns whether the
/// units were admitted.
pub fn admit(
    windows: &mut [(&mut WindowCounts, u64)],
    units: u32,
    now_ms: i64,
    states: &mut Vec<WindowState>,
) -> bool {
    let admitted = windows
        .iter_mut()
        .all(|(counts, limit)| counts.count(now_ms) + u64::from(units) <= *limit);
    if admitted {
        for (counts, _) in windows.iter_mut() {
            counts.add(units, now_ms);
        }
    }
    peek(windows, units, now_ms, states);
    admitted
}

/// Fills `states` with each window's state at `now_ms` without counting anything: for a window
/// with no room for `units`, `reset_ms` is when there will be.
pub fn peek(
    windows: &mut [(&mut WindowCounts, u64)],
    units: u32,
    now_ms: i64,
    states: &mut Vec<WindowState>,
) {
    states.clear();
    for (counts, limit) in windows.iter_mut() {
        let limit = *limit;
        let counted = counts.count(now_ms);
        let reset_ms = if counted + u64::from(units) > limit {
            counts.ms_until_at_most(limit.saturating_sub(u64::from(units)), now_ms)
        } else {
            counts.ms_until_at_most(counted.saturating_sub(1), now_ms)
        };
        states.push(WindowState {
            limit,
            window_ms: counts.window_ms(),
            remaining: limit.saturating_sub(counted),
            reset_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(counts: &mut WindowCounts, limit: u64, now: i64) -> (bool, WindowState) {
        let mut states = Vec::new();
        let admitted = admit(&mut [(counts, limit)], 1, now, &mut states);
        (admitted, states[0])
    }

    #[test]
    fn exactly_20_of_25_sequential_requests_pass_with_remaining_counting_down() {
        let mut counts = WindowCounts::new(60_000);
        let now = 1_700_000_000_000;
        let mut remaining = Vec::new();
        let mut admitted = 0;
        for i in 0..25 {
            let (ok, state) = one(&mut counts, 20, now + i);
            admitted += u32::from(ok);
            remaining.push(state.remaining);
        }
        assert_eq!(admitted, 20);
        let expected: Vec<u64> = (0..20).rev().chain([0; 5]).collect();
        assert_eq!(remaining, expected);
    }

    #[test]
    fn a_unit_still_counts_exactly_while_its_window_counts_it() {
        let mut counts = WindowCounts::new(60_000);
        counts.add(1, 1_000);
        for now in [1_000, 62_999, 63_000, 70_000] {
            assert_eq!(
                still_counted(1_000, 60_000, now),
                counts.count(now) == 1,
                "at {now}"
            );
        }
        assert!(still_counted(1_000, 60_000, 62_999));
        assert!(!still_counted(1_000, 60_000, 63_000));
    }

    #[test]
    fn a_unit_comes_back_one_window_after_its_bucket_ends() {
        // Window 60 s in 3 s buckets; the request at 1_000 is in bucket [0, 3_000).
        let mut counts = WindowCounts::new(60_000);
        assert!(one(&mut counts, 1, 1_000).0);
        let (ok, refused) = one(&mut counts, 1, 62_999);
        assert!(!ok);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_ms, 1);
        assert!(one(&mut counts, 1, 63_000).0);
    }

    #[test]
    fn no_interval_of_one_window_admits_more_than_the_limit() {
        let mut counts = WindowCounts::new(1_000);
        let mut admitted_at = Vec::new();
        for t in (0..5_000).step_by(7) {
            if one(&mut counts, 10, t).0 {
                admitted_at.push(t);
            }
        }
        for (i, &start) in admitted_at.iter().enumerate() {
            let within = admitted_at[i..]
                .iter()
                .take_while(|&&t| t < start + 1_000)
                .count();
            assert!(
                within <= 10,
                "{within} admitted in [{start}, {})",
                start + 1_000
            );
        }
        // And the limiter is not much stricter than that: 10 per 1_050 ms at least.
        assert!(
            admitted_at.len() >= 5_000 / 1_050 * 10,
            "{}",
            admitted_at.len()
        );
    }

    #[test]
    fn every_window_must_have_room_and_a_refusal_counts_in_none() {
        let mut second = WindowCounts::new(1_000);
        let mut minute = WindowCounts::new(60_000);
        let mut states = Vec::new();
        let mut run = |second: &mut WindowCounts, minute: &mut WindowCounts, now| {
            admit(&mut [(second, 2), (minute, 3)], 1, now, &mut states)
        };
        assert!(run(&mut second, &mut minute, 0));
        assert!(run(&mut second, &mut minute, 10));
        // The second is full: refused, and the minute does not count it.
        assert!(!run(&mut second, &mut minute, 20));
        assert_eq!(minute.count(20), 2);
        assert!(run(&mut second, &mut minute, 1_100));
        // Now the minute is full.
        assert!(!run(&mut second, &mut minute, 2_200));
        assert_eq!(second.count(2_200), 0);
    }

    #[test]
    fn a_lower_limit_keeps_what_was_counted_and_waits_for_enough_to_expire() {
        let mut counts = WindowCounts::new(20_000);
        for t in [0, 1_000, 2_000, 3_000] {
            assert!(one(&mut counts, 10, t).0);
        }
        // Downgraded to 2 with 4 counted: one more fits only once three have left, the third
        // (bucket [2_000, 3_000), 1 s wide) at 23_000.
        let (ok, refused) = one(&mut counts, 2, 3_500);
        assert!(!ok);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_ms, 23_000 - 3_500);
    }

    #[test]
    fn reset_is_when_the_oldest_counted_unit_comes_back() {
        let mut counts = WindowCounts::new(10_000);
        assert!(one(&mut counts, 5, 250).0);
        let (ok, state) = one(&mut counts, 5, 4_000);
        assert!(ok);
        assert_eq!(state.remaining, 3);
        // Bucket [0, 500) ends at 500, counts until 10_500.
        assert_eq!(state.reset_ms, 10_500 - 4_000);
    }

    #[test]
    fn following_the_shared_count_raises_it_and_never_lowers_it() {
        let mut counts = WindowCounts::new(1_000);
        counts.add(2, 0);
        counts.follow(5, 100);
        assert_eq!(counts.count(100), 5);
        counts.follow(3, 200);
        assert_eq!(counts.count(200), 5, "a lower shared count leaves it");
        // What was raised now is given back a window after its bucket ends.
        assert_eq!(counts.count(1_049), 5);
        assert_eq!(counts.count(1_050), 3);
        assert_eq!(counts.count(1_150), 0);
    }

    #[test]
    fn a_long_silence_clears_everything() {
        let mut counts = WindowCounts::new(1_000);
        assert!(one(&mut counts, 1, 0).0);
        assert!(counts.is_idle(10_000_000));
        assert!(one(&mut counts, 1, 10_000_000).0);
    }
}
