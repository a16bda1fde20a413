//! Giving back a quota unit that must not count, where it was counted: in process, in Redis,
//! or in the batch of units Redis has yet to be told of; refunds Redis did not answer wait for
//! it to, and are given back once however often they are sent.

use futures_util::StreamExt;

use super::local::Settled;
use super::redis::{HeldRefund, RedisCounters};
use super::share::SHARE_CONCURRENCY;
use super::{Counted, FallbackUnit, Limiter, Reservation};
use crate::identity::index::Id;

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
                    // A call followed to its end: where its answer put the unit, or, before
                    // it comes, where that answer says (`follow_late`).
                    Some(FallbackUnit::Awaiting(token)) => {
                        match self.local.refund_awaiting(customer, reservation, token) {
                            None => {}
                            Some(Settled::InRedis { overage }) => {
                                let counted = Reservation {
                                    overage,
                                    ..*reservation
                                };
                                self.refund_in_redis(redis, customer, &counted, true).await;
                            }
                            Some(Settled::Batch(batch))
                                if !self.local.refund_unshared(customer, reservation, batch) =>
                            {
                                self.refund_in_redis(redis, customer, reservation, true)
                                    .await;
                            }
                            // It may never have run: nothing to give back that is known to
                            // be there.
                            Some(Settled::Batch(_) | Settled::Unknown) => {}
                        }
                    }
                    // Taken back here unless the batch is Redis' to give from.
                    Some(FallbackUnit::Batch(token))
                        if !self.local.refund_unshared(customer, reservation, token) =>
                    {
                        self.refund_in_redis(redis, customer, reservation, true)
                            .await;
                    }
                    Some(FallbackUnit::Batch(_)) | None => {}
                }
            }
            _ => self.local.refund(customer, reservation),
        }
        self.metrics.refund();
    }

    /// Gives back `reservation`'s unit in Redis. A call that did not answer (Redis failing,
    /// within `retry_after` of a failure, or a call that timed out or broke midway) waits, when
    /// `hold`, for [`Limiter::share_pending`] to make it again: Redis counts each refund's mark
    /// once, so one that ran after all is not given back twice.
    pub(super) async fn refund_in_redis(
        &self,
        redis: &RedisCounters,
        customer: &Id,
        reservation: &Reservation,
        hold: bool,
    ) {
        let refund = HeldRefund::new(*customer, *reservation);
        let Some(unanswered) = self
            .send_refund(redis, refund, self.clock.now_ms(), false)
            .await
        else {
            return;
        };
        if hold {
            redis.hold_refund(unanswered);
        } else {
            tracing::debug!(
                "a quota unit whose admission call may not have run is not given back in redis \
                 (its call got no answer); the shared count keeps it"
            );
        }
    }

    /// Sends `refund` (`late` when made again) with the marks of the customer's calls Redis
    /// answered, to delete; the refund back when Redis did not answer.
    async fn send_refund(
        &self,
        redis: &RedisCounters,
        mut refund: HeldRefund,
        now: i64,
        late: bool,
    ) -> Option<HeldRefund> {
        let period = refund.reservation.period;
        let forget = self.local.take_answered(&refund.customer, period);
        let sent = redis
            .refund(
                &refund.customer,
                &refund.reservation,
                refund.token,
                &forget,
                now,
                late,
            )
            .await;
        match sent {
            Ok(()) => {
                if !refund.sealed {
                    self.local
                        .note_answered(&refund.customer, period, refund.token);
                }
                None
            }
            Err(failure) => {
                self.local
                    .restore_answered(&refund.customer, period, forget);
                if failure.may_have_run() {
                    tracing::debug!(
                        "a quota unit given back in redis may not have arrived (the call failed \
                         midway); it is sent again once redis answers, and counts once"
                    );
                    refund.sealed = true;
                }
                Some(refund)
            }
        }
    }

    /// Makes again the refunds Redis did not answer when they were made.
    pub(super) async fn give_back_held(&self, redis: &RedisCounters, now: i64) {
        let held = redis.take_held_refunds();
        // In parallel over the multiplexed connection, as batches go: a long outage can leave
        // many, and the batches wait for this.
        futures_util::stream::iter(held)
            .for_each_concurrent(SHARE_CONCURRENCY, |refund| async move {
                if let Some(unanswered) = self.send_refund(redis, refund, now, true).await {
                    redis.hold_refund(unanswered);
                }
            })
            .await;
    }
}
