//! Upstream pools: target selection, and the health state that active checks and passive failure
//! marking share.
//!
//! # Layout
//! - [`health`]: per-target health state, kept across reloads in a [`health::HealthRegistry`].
//! - [`check`]: the background service that runs active HTTP health checks.

pub mod check;
pub mod health;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Target, Upstream};
use health::{HealthRegistry, TargetHealth};

/// An upstream of the running config: its settings, its targets' health, and its round-robin
/// cursor.
#[derive(Debug)]
pub struct Pool {
    /// The checked settings.
    pub upstream: Upstream,
    /// Health of each target, in the order of `upstream.targets`.
    pub health: Vec<Arc<TargetHealth>>,
    cursor: AtomicUsize,
}

impl Pool {
    /// A pool whose targets' health comes from `registry` (so it survives a reload).
    /// Without active checks, nothing would ever bring back a target an earlier config's checks
    /// took out, so its active verdict is reset to healthy.
    pub fn new(upstream: Upstream, registry: &HealthRegistry) -> Self {
        let health: Vec<Arc<TargetHealth>> = upstream
            .targets
            .iter()
            .map(|target| registry.get_or_insert(&upstream.name, target))
            .collect();
        if upstream.health_check.is_none() {
            for target in &health {
                if !target.is_active_healthy() {
                    target.set_active_healthy(true);
                }
            }
        }
        Self {
            upstream,
            health,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next available target in round-robin order that is not in `excluding`, as an index.
    ///
    /// `now_ms` is the health clock's current time (see [`health::now_ms`]).
    pub fn pick(&self, excluding: &[usize], now_ms: u64) -> Option<usize> {
        let count = self.upstream.targets.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| (start + offset) % count)
            .find(|i| !excluding.contains(i) && self.health[*i].is_available(now_ms))
    }

    /// Whether a target outside `excluding` is available, without moving the round-robin cursor.
    pub fn has_available(&self, excluding: &[usize], now_ms: u64) -> bool {
        (0..self.upstream.targets.len())
            .any(|i| !excluding.contains(&i) && self.health[i].is_available(now_ms))
    }

    /// The target at `index`.
    pub fn target(&self, index: usize) -> &Target {
        &self.upstream.targets[index]
    }

    /// Whether any target is available now.
    pub fn any_available(&self, now_ms: u64) -> bool {
        self.health.iter().any(|h| h.is_available(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PassiveHealth, Timeouts};
    use std::time::Duration;

    fn pool(targets: usize, registry: &HealthRegistry) -> Pool {
        Pool::new(upstream(targets), registry)
    }

    fn upstream(targets: usize) -> Upstream {
        Upstream {
            name: "u".into(),
            targets: (0..targets)
                .map(|i| Target {
                    name: format!("127.0.0.1:{}", 1000 + i),
                    address: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    host: "127.0.0.1".into(),
                })
                .collect(),
            tls: false,
            sni: None,
            host_header: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(1),
                write: Duration::from_secs(1),
                request: None,
                idle: Duration::from_secs(1),
                websocket_idle: Duration::from_secs(1),
            },
            connect_retries: 1,
            health_check: None,
            passive: PassiveHealth {
                max_fails: 2,
                fail_timeout: Duration::from_secs(10),
            },
        }
    }

    #[test]
    fn round_robin_visits_every_target_in_turn() {
        let registry = HealthRegistry::default();
        let pool = pool(3, &registry);
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[], 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_tried_and_unhealthy_targets() {
        let registry = HealthRegistry::default();
        let pool = pool(3, &registry);
        pool.health[1].set_active_healthy(false);
        let picks: Vec<usize> = (0..4).map(|_| pool.pick(&[], 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 2, 0]);
        assert_eq!(pool.pick(&[0, 2], 0), None);
        assert!(!pool.has_available(&[0, 2], 0));
        assert!(pool.has_available(&[0], 0));
    }

    #[test]
    fn passive_failures_take_a_target_out_for_the_fail_timeout() {
        let registry = HealthRegistry::default();
        let pool = pool(2, &registry);
        let passive = pool.upstream.passive;
        pool.health[0].record_failure(&passive, 1_000);
        assert!(
            pool.health[0].is_available(1_000),
            "one failure of two allowed"
        );
        pool.health[0].record_failure(&passive, 1_000);
        assert!(!pool.health[0].is_available(1_000));
        assert!(!pool.health[0].is_available(10_999));
        assert!(pool.health[0].is_available(11_000));
        assert_eq!(pool.pick(&[], 5_000), Some(1));
        assert_eq!(pool.pick(&[], 5_000), Some(1));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let registry = HealthRegistry::default();
        let pool = pool(1, &registry);
        let passive = pool.upstream.passive;
        pool.health[0].record_failure(&passive, 0);
        pool.health[0].record_success();
        pool.health[0].record_failure(&passive, 0);
        assert!(pool.health[0].is_available(0));
    }

    #[test]
    fn health_survives_a_rebuilt_pool() {
        let registry = HealthRegistry::default();
        let checked = |registry: &HealthRegistry| {
            let mut upstream = upstream(2);
            upstream.health_check = Some(crate::config::HealthCheck {
                path: "/".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
                host: None,
            });
            Pool::new(upstream, registry)
        };
        checked(&registry).health[1].set_active_healthy(false);
        let rebuilt = checked(&registry);
        assert!(!rebuilt.health[1].is_available(0));
        assert!(rebuilt.health[0].is_available(0));
    }

    #[test]
    fn removing_active_checks_brings_targets_back() {
        let registry = HealthRegistry::default();
        pool(2, &registry).health[1].set_active_healthy(false);
        let unchecked = pool(2, &registry);
        assert!(unchecked.health[1].is_available(0));
    }
}
