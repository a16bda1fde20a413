//! Failed authentications per client address: past `limit` in a sliding minute, the address is
//! answered 429 before any credential is looked at, so the key space cannot be scanned cheaply.
//!
//! IPv6 addresses count per /64, the block one client usually holds. The table is split in
//! shards, each behind a mutex held for a few instructions and never across an `.await`; it is
//! swept of idle addresses when it grows, so a scan from many addresses cannot grow it without
//! bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

const WINDOW_MS: i64 = 60_000;
const SHARDS: usize = 16;
/// Addresses per shard past which idle ones are swept.
const SWEEP_AT: usize = 16_384;

/// The failure counts.
#[derive(Debug)]
pub struct FailedAuth {
    /// `[auth] failed_per_minute`, which a reload may change.
    limit: AtomicU32,
    shards: Vec<Mutex<Shard>>,
    /// Addresses in all shards: while it is 0, the request path takes no lock.
    tracked: AtomicUsize,
}

/// One shard of the table.
#[derive(Debug, Default)]
struct Shard {
    windows: HashMap<IpAddr, Window>,
    last_sweep_ms: i64,
}

/// Failures of one address in the current and the previous minute.
#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: i64,
    current: u32,
    previous: u32,
}

impl Window {
    /// Moves the window to the minute holding `now_ms`.
    fn roll(&mut self, now_ms: i64) {
        let elapsed = now_ms - self.start_ms;
        if elapsed >= 2 * WINDOW_MS {
            *self = Window {
                start_ms: now_ms - now_ms.rem_euclid(WINDOW_MS),
                current: 0,
                previous: 0,
            };
        } else if elapsed >= WINDOW_MS {
            self.previous = self.current;
            self.current = 0;
            self.start_ms += WINDOW_MS;
        }
    }

    /// The sliding-window estimate: this minute's count plus the share of the previous minute
    /// still inside the last 60 s.
    fn count(&self, now_ms: i64) -> f64 {
        let into = (now_ms - self.start_ms).clamp(0, WINDOW_MS) as f64 / WINDOW_MS as f64;
        f64::from(self.current) + f64::from(self.previous) * (1.0 - into)
    }

    /// The first millisecond the estimate is under `limit`, if no failure is added: later in
    /// this minute as the previous minute's share shrinks, or else in the next one as this
    /// minute's does. In whole numbers, so it is never a millisecond early.
    fn under_limit_at(&self, limit: u32) -> i64 {
        let (limit, current, previous) = (
            i64::from(limit),
            i64::from(self.current),
            i64::from(self.previous),
        );
        if current < limit && previous > 0 {
            // current + previous × (W − d) / W < limit  ⇔  previous × d > W × (previous + current − limit)
            let past = WINDOW_MS * (previous + current - limit);
            self.start_ms + past.div_euclid(previous) + 1
        } else if limit > 0 && current > 0 {
            // From the next minute on: current × (W − d) / W < limit  ⇔  current × d > W × (current − limit)
            let past = WINDOW_MS * (current - limit);
            self.start_ms + WINDOW_MS + past.div_euclid(current) + 1
        } else {
            // A limit of 0 (refused by the config's checks): every count is over it.
            self.start_ms + 2 * WINDOW_MS
        }
    }
}

impl FailedAuth {
    /// At most `limit` failures per address and minute.
    pub fn new(limit: u32) -> Self {
        Self {
            limit: AtomicU32::new(limit),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            tracked: AtomicUsize::new(0),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the limit (a reload): counts so far stay, and are held against the new limit.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// `Some(seconds to wait)` when `address` is over the limit.
    pub fn blocked(&self, address: IpAddr, now_ms: i64) -> Option<u64> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let key = block(address);
        let mut shard = self.shard(&key);
        let window = shard.windows.get_mut(&key)?;
        window.roll(now_ms);
        let limit = self.limit();
        if window.count(now_ms) < f64::from(limit) {
            return None;
        }
        let until = window.under_limit_at(limit);
        Some(((until - now_ms).max(1000) as u64).div_ceil(1000))
    }

    /// Counts a failure of `address`.
    pub fn record(&self, address: IpAddr, now_ms: i64) {
        let key = block(address);
        let mut shard = self.shard(&key);
        let before = shard.windows.len();
        if shard.windows.len() >= SWEEP_AT && !shard.windows.contains_key(&key) {
            // Idle addresses are swept at most once a second; when the shard is still full of
            // active ones, an arbitrary one is forgotten, so the table stays bounded and a
            // failure never costs more than one sweep per second.
            if now_ms - shard.last_sweep_ms >= 1000 {
                shard.last_sweep_ms = now_ms;
                shard
                    .windows
                    .retain(|_, window| now_ms - window.start_ms < 2 * WINDOW_MS);
            }
            if shard.windows.len() >= SWEEP_AT
                && let Some(evict) = shard.windows.keys().next().copied()
            {
                shard.windows.remove(&evict);
            }
        }
        let window = shard.windows.entry(key).or_insert(Window {
            start_ms: now_ms - now_ms.rem_euclid(WINDOW_MS),
            current: 0,
            previous: 0,
        });
        window.roll(now_ms);
        window.current = window.current.saturating_add(1);
        let after = shard.windows.len();
        if after > before {
            self.tracked.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.tracked.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    fn shard(&self, key: &IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let index = match key {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
            IpAddr::V6(v6) => usize::from(v6.octets()[7]),
        } % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The unit counted: the address, or its /64 for IPv6. An IPv4 client reaching a dual-stack
/// listener (`::ffff:a.b.c.d`) counts as its IPv4 address.
fn block(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn blocks_past_the_limit_and_says_how_long() {
        let failures = FailedAuth::new(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..3 {
            assert_eq!(failures.blocked(ip, T0 + i), None, "failure {i}");
            failures.record(ip, T0 + i);
        }
        // T0 starts a minute: the three count in full until the next one starts.
        assert_eq!(failures.blocked(ip, T0 + 10), Some(60));
        // Another address is not affected.
        assert_eq!(failures.blocked("192.0.2.8".parse().unwrap(), T0), None);
    }

    #[test]
    fn the_window_slides_and_then_forgets() {
        let failures = FailedAuth::new(4);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let start = T0 - T0.rem_euclid(WINDOW_MS);
        for _ in 0..4 {
            failures.record(ip, start);
        }
        assert!(failures.blocked(ip, start + 1).is_some());
        // Half-way through the next minute half of the previous minute still counts: 2 < 4.
        assert_eq!(
            failures.blocked(ip, start + WINDOW_MS + WINDOW_MS / 2),
            None
        );
        assert_eq!(failures.blocked(ip, start + 3 * WINDOW_MS), None);
    }

    #[test]
    fn the_wait_said_is_until_the_estimate_falls_under_the_limit() {
        let failures = FailedAuth::new(4);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let start = T0 - T0.rem_euclid(WINDOW_MS);
        for _ in 0..6 {
            failures.record(ip, start);
        }
        // 10 s into the next minute, 6 × 5/6 = 5 still count; under 4 once a third of the
        // minute has passed, 20 s in: 10 s from now.
        let next = start + WINDOW_MS;
        assert_eq!(failures.blocked(ip, next + 10_000), Some(11));
        assert!(failures.blocked(ip, next + 20_000).is_some());
        assert_eq!(failures.blocked(ip, next + 20_001), None);
        // Two this minute on top of the six: under 4 once 6 × (1 − into) < 2, 40 s in.
        failures.record(ip, next + 20_001);
        failures.record(ip, next + 20_002);
        assert_eq!(failures.blocked(ip, next + 30_000), Some(11));
        assert_eq!(failures.blocked(ip, next + 40_001), None);

        // Where the estimate reaches the limit on a whole millisecond (72 × 50/60 = 60 at
        // 10 s), the wait is past it, not to it.
        let failures = FailedAuth::new(60);
        for _ in 0..72 {
            failures.record(ip, start);
        }
        assert_eq!(failures.blocked(ip, next + 5_000), Some(6));
        assert!(failures.blocked(ip, next + 10_000).is_some());
        assert_eq!(failures.blocked(ip, next + 10_001), None);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_count_as_themselves() {
        let failures = FailedAuth::new(1);
        failures.record("::ffff:192.0.2.7".parse().unwrap(), T0);
        assert!(
            failures
                .blocked("192.0.2.7".parse().unwrap(), T0 + 1)
                .is_some()
        );
        assert_eq!(
            failures.blocked("::ffff:192.0.2.8".parse().unwrap(), T0 + 1),
            None,
            "another IPv4 client is not blocked"
        );
    }

    #[test]
    fn ipv6_counts_per_64() {
        let failures = FailedAuth::new(2);
        failures.record("2001:db8:1:2::1".parse().unwrap(), T0);
        failures.record("2001:db8:1:2:ffff::9".parse().unwrap(), T0);
        assert!(
            failures
                .blocked("2001:db8:1:2::77".parse().unwrap(), T0 + 1)
                .is_some()
        );
        assert_eq!(
            failures.blocked("2001:db8:1:3::1".parse().unwrap(), T0 + 1),
            None
        );
    }
}
