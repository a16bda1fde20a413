//! The calls Redis takes once per mark: adding a batch of units counted in process, and giving a
//! unit back. Each leaves its mark in the customer's quota hash, so a call made again after a
//! timeout (it may have run) adds or gives back nothing; the customer's next call deletes the
//! marks of calls answered the first time.

use std::sync::{Arc, Mutex, PoisonError};

use super::{Failure, RedisCounters};
use crate::identity::index::Id;
use crate::limits::Reservation;
use crate::limits::local::Unshared;

/// What became of a batch sent to Redis ([`RedisCounters::share`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Added to the count it was counted for (now, or by an earlier call).
    Added,
    /// Added to a count Redis made again after losing that one, before any of its units was
    /// decided: the new count held them in no part.
    AddedToLater,
    /// Not added: the count it was counted for is gone and the one made since may hold some
    /// of its units (in the ledger's part), or there is none.
    Refused,
}

/// Most refunds held for Redis at once.
const MAX_HELD_REFUNDS: usize = 100_000;

impl HeldRefund {
    /// A refund of `reservation`, not sent yet, with a mark of its own.
    pub fn new(customer: Id, reservation: Reservation) -> Self {
        Self {
            customer,
            reservation,
            token: uuid::Uuid::new_v4().as_u128(),
            sealed: false,
        }
    }
}

/// The refunds held for Redis, until a pass of [`Limiter::share_pending`] makes them.
///
/// [`Limiter::share_pending`]: crate::limits::Limiter::share_pending
#[derive(Debug, Clone, Default)]
pub struct RefundHolder(Arc<Mutex<Vec<HeldRefund>>>);

impl RefundHolder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HeldRefund>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `refund`, to make once Redis answers; past `MAX_HELD_REFUNDS` (100,000), drops it
    /// with a warning (Redis then counts its unit until the period ends, never more than the
    /// customer used plus it).
    pub fn hold(&self, refund: HeldRefund) {
        let mut held = self.lock();
        if held.len() >= MAX_HELD_REFUNDS {
            tracing::warn!("too many quota units wait to be given back in redis; one is dropped");
            return;
        }
        held.push(refund);
    }
}

/// A refund to give back in Redis whose call got no answer, held until Redis answers.
#[derive(Debug, Clone, Copy)]
pub struct HeldRefund {
    /// Whose unit.
    pub customer: Id,
    /// What to give back.
    pub reservation: Reservation,
    /// Its mark in the customer's count: Redis gives it back once.
    pub token: u128,
    /// Sent without an answer: Redis may have taken it (or may yet, over another connection),
    /// so its mark stays until the count expires.
    pub sealed: bool,
}

impl RedisCounters {
    /// Adds to the shared quota count a batch of units this gateway counted in process without
    /// asking Redis, while it failed or for a plan without limits, and deletes from that count
    /// the marks of `forget`, batches it took before:
    /// - to the quota hash the batch's customer was last counted in, seeded then (its rebuild
    ///   from the ledger was over before those units were counted, so they are not in it):
    ///   [`Sharing::Added`], also when an earlier call that timed out added it already;
    /// - to a hash made since (Redis lost its data meanwhile), when it was made before the
    ///   batch's first unit was decided: that hash holds none of them, neither in the ledger's
    ///   part (events before it was made) nor in its own ([`Sharing::AddedToLater`]);
    /// - to no hash otherwise ([`Sharing::Refused`]): a hash made after some of its units were
    ///   decided reads their events from the ledger, and adding them would count them twice.
    ///
    /// With it, the count's version once it holds the batch: a decision made at a lower one
    /// ([`Decision::count_version`]) does not hold it.
    ///
    /// [`Decision::count_version`]: crate::limits::Decision::count_version
    pub async fn share(
        &self,
        customer: &Id,
        batch: &Unshared,
        forget: &[u128],
        now_ms: i64,
    ) -> Result<(Sharing, i64), Failure> {
        let mut invocation = self.share.prepare_invoke();
        invocation
            .key(self.key(customer, "q", batch.period.start_ms))
            .arg(batch.units)
            .arg(batch.overage)
            .arg(batch.generation)
            .arg(mark(batch.token))
            .arg(batch.first_ms);
        for &token in forget {
            invocation.arg(mark(token));
        }
        let answer = self.call::<i64>(&invocation, now_ms).await?;
        let sharing = match answer % 4 {
            1 => Sharing::Added,
            2 => Sharing::AddedToLater,
            _ => Sharing::Refused,
        };
        Ok((sharing, answer / 4))
    }

    /// Keeps a refund whose call got no answer, to make again once Redis answers
    /// ([`RefundHolder::hold`]).
    pub fn hold_refund(&self, refund: HeldRefund) {
        self.held_refunds.hold(refund);
    }

    /// Where refunds are held, for a task that outlives its request.
    pub fn refund_holder(&self) -> RefundHolder {
        self.held_refunds.clone()
    }

    /// The refunds held, to make again.
    pub fn take_held_refunds(&self) -> Vec<HeldRefund> {
        std::mem::take(&mut *self.held_refunds.lock())
    }

    /// Gives back a reservation counted in Redis, once for `token` however often it is sent
    /// (a call that timed out may have run: it is sent again with the same token), and deletes
    /// from the count the marks of `forget`, as [`Self::share`] does. `late` for a refund Redis
    /// could not take when it was due.
    pub async fn refund(
        &self,
        customer: &Id,
        reservation: &Reservation,
        token: u128,
        forget: &[u128],
        now_ms: i64,
        late: bool,
    ) -> Result<(), Failure> {
        let mut invocation = self.refund.prepare_invoke();
        invocation
            .key(self.key(customer, "q", reservation.period.start_ms))
            .arg(-i64::try_from(reservation.units).unwrap_or(i64::MAX))
            .arg(-i64::try_from(reservation.overage).unwrap_or(i64::MAX))
            .arg(reservation.at_ms)
            .arg(u8::from(late))
            .arg(mark(token));
        for &token in forget {
            invocation.arg(mark(token));
        }
        self.call::<i64>(&invocation, now_ms).await.map(drop)
    }
}

/// Adds a batch of units counted in process (ARGV: units, overage, the generation of the hash
/// they belong in, the batch's mark, when its earliest unit was decided) to a quota hash seeded
/// from the ledger (`s` = 1) of that generation (`n`, absent in a hash made before generations:
/// -1), or to one made since (Redis lost theirs) before any of its units was decided: that hash
/// holds them in no part. Once per mark, which stays in the hash until a later call deletes it.
/// ARGV 6 on: marks to delete first, of batches sent once and answered, of which no other copy
/// can arrive. 1 if it added the batch (now or before) to its own hash, 2 to a later one, 0 if
/// the hash is of another generation and made after the batch began, not seeded, or gone; plus
/// 4 times the hash's version (`v`, raised when the batch is added; the admission script
/// raises it too, and returns it).
pub(super) const SHARE_SCRIPT: &str = r"
if #ARGV > 5 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 6))
end
local state = redis.call('HMGET', KEYS[1], 's', 'n', 'a')
local own = state[1] == '1' and (tonumber(state[2]) or -1) == tonumber(ARGV[3])
local later = not own and state[3] and tonumber(ARGV[5]) >= tonumber(state[3])
if not own and not later then
  return 0
end
if redis.call('HSETNX', KEYS[1], ARGV[4], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'u', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'o', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'v', 1)
end
local version = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if own then
  return 1 + 4 * version
end
return 2 + 4 * version
";

/// The field a batch's or a refund's call leaves in its quota hash.
fn mark(token: u128) -> String {
    format!("g{token:032x}")
}

/// Gives back units of a quota hash that still exists (ARGV: units and overage, negated, when
/// they were counted, 1 for a refund made late, and the refund's mark), and of its part from
/// before it was made when they were in it. Once per mark, which stays in the hash until a later
/// call deletes it (ARGV 6 on: marks to delete first, as for batches): whichever copy of a
/// refund arrives first decides, and leaves the mark. A refund made late (Redis failed when it
/// was due) is not made in a hash made after its units were counted: that hash's count came
/// from the ledger and from gateways' counts that had given them back already.
pub(super) const REFUND_SCRIPT: &str = r"
if #ARGV > 5 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 6))
end
local state = redis.call('HMGET', KEYS[1], 'u', 'a')
if not state[1] or redis.call('HSETNX', KEYS[1], ARGV[5], 1) == 0 then
  return 0
end
if ARGV[4] == '1' and state[2] and tonumber(ARGV[3]) < tonumber(state[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'u', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'o', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'v', 1)
if state[2] and tonumber(ARGV[3]) < tonumber(state[2]) then
  redis.call('HINCRBY', KEYS[1], 'p', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'q', ARGV[2])
end
return 1
";
