//! The counters' background work: sweeping idle counters, and with Redis adding the units
//! counted in process and seeding rebuilt counts again.

use std::sync::Arc;

/// How often the in-process counters are swept.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How often units counted in process are added to Redis
/// ([`Limiter::share_pending`](super::Limiter::share_pending)): what the shared quota count of a
/// customer on a plan without limits may lag by.
pub const SHARE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Sweeps the in-process counters every [`SWEEP_INTERVAL`], so a long-running gateway holds
/// counters for the customers counting now, not for every customer that ever called; and, with
/// Redis, adds the units counted in process to it every [`SHARE_INTERVAL`].
#[derive(Debug)]
pub struct CounterSweep {
    gateway: Arc<crate::state::Gateway>,
}

impl CounterSweep {
    /// The sweep of `gateway`'s counters.
    pub fn new(gateway: Arc<crate::state::Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for CounterSweep {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut share = tokio::time::interval(SHARE_INTERVAL);
        for timer in [&mut sweep, &mut share] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is at once.
            timer.tick().await;
        }
        let mut draining = false;
        loop {
            tokio::select! {
                _ = sweep.tick() => self.gateway.limiter.sweep(),
                _ = share.tick() => {
                    // In a task of its own: a pass of many ledger reads (after Redis lost its
                    // data) does not hold up the sharing.
                    let gateway = Arc::clone(&self.gateway);
                    tokio::spawn(async move { gateway.limiter.reseed_due().await });
                    self.gateway.limiter.share_pending().await;
                }
                // Sharing goes on while the gateway drains (requests are still served), until
                // the process ends; the drain shares once more just before it exits.
                _ = shutdown.changed(), if !draining => draining = true,
            }
        }
    }
}
