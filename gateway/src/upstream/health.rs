//! Health of one target, shared by the request path (reads, passive marks) and the active checker.
//!
//! A target is available when the active checker last judged it healthy (or no check is
//! configured) and no passive mark is in force. Everything is an atomic: the request path never
//! takes a lock for health. The registry's lock is only taken when a config is built.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::config::{PassiveHealth, Target};

/// Milliseconds since the first call: the monotonic clock health marks are measured on.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Health of one target.
#[derive(Debug)]
pub struct TargetHealth {
    active_healthy: AtomicBool,
    /// Consecutive active-check results in the current direction (failures while healthy,
    /// successes while unhealthy).
    active_streak: AtomicU32,
    passive_failures: AtomicU32,
    /// `now_ms()` until which a passive mark keeps the target out; 0 when none.
    passive_until_ms: AtomicU64,
}

impl Default for TargetHealth {
    fn default() -> Self {
        Self {
            active_healthy: AtomicBool::new(true),
            active_streak: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            passive_until_ms: AtomicU64::new(0),
        }
    }
}

impl TargetHealth {
    /// Whether requests may go to this target at `now_ms`.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
            && self.passive_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// The active checker's current verdict.
    pub fn is_active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// Whether a passive mark is in force at `now_ms`.
    pub fn is_passively_down(&self, now_ms: u64) -> bool {
        self.passive_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Sets the active verdict directly.
    pub fn set_active_healthy(&self, healthy: bool) {
        self.active_healthy.store(healthy, Ordering::Relaxed);
        self.active_streak.store(0, Ordering::Relaxed);
    }

    /// Records one active-check result; returns the new verdict when it changed.
    pub fn record_check(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let healthy = self.active_healthy.load(Ordering::Relaxed);
        if ok == healthy {
            self.active_streak.store(0, Ordering::Relaxed);
            if ok {
                // A passing check also clears passive marks: the target answers again.
                self.record_success();
            }
            return None;
        }
        let streak = self.active_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if ok {
            healthy_threshold
        } else {
            unhealthy_threshold
        };
        if streak >= threshold {
            self.set_active_healthy(ok);
            if ok {
                self.record_success();
            }
            Some(ok)
        } else {
            None
        }
    }

    /// A request reached the target.
    pub fn record_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
        if self.passive_until_ms.load(Ordering::Relaxed) != 0 {
            self.passive_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// A connection to the target failed or timed out; returns true when this failure marked it
    /// down.
    pub fn record_failure(&self, passive: &PassiveHealth, now_ms: u64) -> bool {
        if passive.max_fails == 0 {
            return false;
        }
        let failures = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.max_fails {
            let until =
                now_ms + u64::try_from(passive.fail_timeout.as_millis()).unwrap_or(u64::MAX / 2);
            self.passive_until_ms.store(until, Ordering::Relaxed);
            self.passive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Health of every target ever configured, keyed by upstream name and target address, so that a
/// reload keeps what is known about targets that stay.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    // Taken only while a config is built and when a health report is rendered.
    targets: Mutex<HashMap<(String, std::net::SocketAddr), Arc<TargetHealth>>>,
}

impl HealthRegistry {
    /// The health of `target` in `upstream`, created healthy if unknown.
    pub fn get_or_insert(&self, upstream: &str, target: &Target) -> Arc<TargetHealth> {
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        targets
            .entry((upstream.to_owned(), target.address))
            .or_default()
            .clone()
    }

    /// Forgets targets that are no longer configured.
    pub fn retain(&self, keep: impl Fn(&str, &std::net::SocketAddr) -> bool) {
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        targets.retain(|(upstream, address), _| keep(upstream, address));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_verdict_changes_only_after_the_threshold() {
        let health = TargetHealth::default();
        assert_eq!(health.record_check(false, 2, 3), None);
        assert_eq!(health.record_check(false, 2, 3), None);
        assert_eq!(health.record_check(false, 2, 3), Some(false));
        assert!(!health.is_available(0));
        assert_eq!(health.record_check(true, 2, 3), None);
        assert_eq!(
            health.record_check(false, 2, 3),
            None,
            "a failure resets the streak"
        );
        assert_eq!(health.record_check(true, 2, 3), None);
        assert_eq!(health.record_check(true, 2, 3), Some(true));
        assert!(health.is_available(0));
    }
}
