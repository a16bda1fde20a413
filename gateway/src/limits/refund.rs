//! Giving back a quota unit that must not count, where it was counted: in process, in Redis,
//! or in the batch of units Redis has yet to be told of; refunds Redis could not take wait for
//! it to answer.

use std::sync::PoisonError;

use futures_util::StreamExt;

use super::redis::RedisCounters;
use super::share::SHARE_CONCURRENCY;
use super::{Counted, FallbackUnit, Limiter, Reservation};
use crate::identity::index::Id;

/// Most refunds waiting for Redis; past it, one is dropped with a warning (Redis then counts
/// its unit until the period ends, never more than the customer used plus it).
const MAX_PENDING_REFUNDS: usize = 100_000;

impl Limiter {
    /// Gives back a reservation that must not count, where it was counted.
    pub async fn refund(&self, customer: &Id, reservation: &Reservation) {
        match (&self.redis, reservation.counted) {
            (Some(redis), Counted::Redis) => {
                // This process's own count follows Redis' (it is what a count Redis makes
                // again is raised to): the unit leaves both.
                self.local.refund(customer, reservation);
                self.refund_in_redis(redis, customer, reservation, true)
                    .await;
            }
            (Some(redis), Counted::Fallback | Counted::Batched) => {
                self.local.refund(customer, reservation);
                // Given back where its unit went: its batch while unsent, Redis once the batch
                // is sent, nowhere when only the ledger has it. A unit whose call may have run
                // in Redis is given back there if Redis takes it now, and never later: that
                // call may not have run, and a refund then would free a unit never counted.
                match reservation.fallback {
                    Some(FallbackUnit::MaybeInRedis) => {
                        self.refund_in_redis(redis, customer, reservation, false)
                            .await;
                    }
                    Some(FallbackUnit::Batch(token)) => {
                        if !self.local.refund_unshared(customer, reservation, token) {
                            self.refund_in_redis(redis, customer, reservation, true)
                                .await;
                        }
                    }
                    Some(FallbackUnit::Unplaced) | None => {}
                }
            }
            _ => self.local.refund(customer, reservation),
        }
        self.metrics.refund();
    }

    /// Gives `reservation`'s unit back in Redis; a call that did not run (Redis failing, or
    /// within `retry_after` of a failure) waits, when `hold`, for [`Limiter::share_pending`] to
    /// make it again. One that may have run (a timeout, a broken connection) is not made again:
    /// giving the unit back twice would let the customer past the quota.
    async fn refund_in_redis(
        &self,
        redis: &RedisCounters,
        customer: &Id,
        reservation: &Reservation,
        hold: bool,
    ) {
        match redis
            .refund(customer, reservation, self.clock.now_ms(), false)
            .await
        {
            Ok(()) => {}
            Err(failure) if failure.may_have_run() => {
                tracing::warn!(
                    "a quota unit given back in redis may not have arrived (the call failed \
                     midway); it is not sent again"
                );
            }
            Err(_) if hold => self.hold_refund(customer, reservation),
            Err(_) => tracing::debug!(
                "a quota unit whose admission call may not have run is not given back in redis \
                 (redis is failing); the shared count keeps it"
            ),
        }
    }

    fn hold_refund(&self, customer: &Id, reservation: &Reservation) {
        let mut refunds = self.refunds.lock().unwrap_or_else(PoisonError::into_inner);
        if refunds.len() >= MAX_PENDING_REFUNDS {
            tracing::warn!("too many quota units wait to be given back in redis; one is dropped");
            return;
        }
        refunds.push((*customer, *reservation));
    }

    /// Makes again the refunds Redis could not take when they were made.
    pub(super) async fn give_back_held(&self, redis: &RedisCounters, now: i64) {
        let held =
            std::mem::take(&mut *self.refunds.lock().unwrap_or_else(PoisonError::into_inner));
        // In parallel over the multiplexed connection, as batches go: a long outage can leave
        // many, and the batches wait for this.
        futures_util::stream::iter(held)
            .for_each_concurrent(SHARE_CONCURRENCY, |(customer, reservation)| async move {
                match redis.refund(&customer, &reservation, now, true).await {
                    Ok(()) => {}
                    Err(failure) if failure.may_have_run() => {
                        tracing::warn!(
                            "a quota unit given back in redis may not have arrived (the call \
                             failed midway); it is not sent again"
                        );
                    }
                    Err(_) => self.hold_refund(&customer, &reservation),
                }
            })
            .await;
    }
}
