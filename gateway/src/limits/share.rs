//! Adding to Redis the quota units counted in process without asking it (while it failed, or
//! for a plan without limits), so that an outage hands out no quota for free.

use futures_util::StreamExt;

use super::Limiter;
use super::local::{Taken, Unshared};
use super::metrics::FallbackUnits;
use super::redis::{RedisCounters, Sharing};
use crate::identity::index::Id;

/// Customers whose batches [`Limiter::share_pending`] sends at once.
pub(super) const SHARE_CONCURRENCY: usize = 64;

impl Limiter {
    /// Adds to Redis `batches`, quota units this process counted for `customer` without asking
    /// Redis (while it failed, or for a plan without limits): before Redis decides this
    /// customer's next request here, and every [`SHARE_INTERVAL`](super::SHARE_INTERVAL)
    /// ([`Self::share_pending`]). Otherwise an outage, or a slow Redis, would hand out quota for
    /// free, and a plan change would not go on from the customer's count. Kept for a later
    /// attempt when Redis fails again.
    pub(super) async fn share_unshared(
        &self,
        redis: &RedisCounters,
        customer: &Id,
        batches: Vec<Unshared>,
        now: i64,
    ) {
        let mut batches = batches.into_iter();
        while let Some(batch) = batches.next() {
            // Marks of batches this count took before go with this call.
            let forget = self.local.take_answered(customer, batch.period);
            match redis.share(customer, &batch, &forget, now).await {
                Ok((sharing @ (Sharing::Added | Sharing::AddedToLater), version)) => {
                    self.metrics
                        .fallback_units(batch.units, FallbackUnits::Shared);
                    let taken = Taken {
                        at_ms: self.clock.now_ms(),
                        version,
                    };
                    let refunds = self.local.settle_unshared(customer, &batch, Some(taken));
                    self.give_back_held_for(redis, customer, &refunds).await;
                    if sharing == Sharing::AddedToLater {
                        // Redis counts in another generation now: ask it before batching again.
                        self.local
                            .forget_generation(customer, batch.period, batch.generation);
                    }
                }
                Ok((Sharing::Refused, _)) => {
                    // The marks of `forget` were deleted all the same.
                    self.metrics
                        .fallback_units(batch.units, FallbackUnits::Ledger);
                    // Refunds of its units held meanwhile are nobody's: it never counted.
                    self.local.settle_unshared(customer, &batch, None);
                    // Redis counts in another generation now: ask it before batching again.
                    self.local
                        .forget_generation(customer, batch.period, batch.generation);
                    tracing::warn!(
                        units = batch.units,
                        "quota units counted in process were left to a quota count redis \
                         rebuilt from the ledger since"
                    );
                }
                Err(failure) => {
                    // The rest were not sent.
                    let sent = failure.may_have_run();
                    self.local.restore_answered(customer, batch.period, forget);
                    self.local.restore_unshared(customer, batch, sent);
                    for batch in batches {
                        self.local.restore_unshared(customer, batch, false);
                    }
                    return;
                }
            }
        }
    }

    /// Gives back in Redis the units of a batch it has just taken that were refunded while it
    /// was on its way there.
    async fn give_back_held_for(
        &self,
        redis: &RedisCounters,
        customer: &Id,
        refunds: &[super::Reservation],
    ) {
        for reservation in refunds {
            self.refund_in_redis(redis, customer, reservation, true)
                .await;
        }
    }

    /// Adds to Redis the batches of every customer that came to hold some since the last
    /// call (units of plans without limits, and units counted while Redis failed), unless Redis
    /// is failing: then they wait for the next call, or for their customer's next request that
    /// Redis decides. Run every [`SHARE_INTERVAL`](super::SHARE_INTERVAL).
    pub async fn share_pending(&self) {
        let Some(redis) = &self.redis else {
            return;
        };
        // One pass at a time: the drain's last pass waits for the one under way.
        let _pass = self.sharing.lock().await;
        let now = self.clock.now_ms();
        if redis.is_failing(now) {
            return;
        }
        self.give_back_held(redis, now).await;
        // Customers' batches go in parallel over the multiplexed connection, one customer's in
        // order.
        futures_util::stream::iter(self.local.take_pending())
            .for_each_concurrent(SHARE_CONCURRENCY, |customer| async move {
                let batches = self.local.take_unshared(&customer);
                if !batches.is_empty() {
                    self.share_unshared(redis, &customer, batches, now).await;
                }
            })
            .await;
    }
}
