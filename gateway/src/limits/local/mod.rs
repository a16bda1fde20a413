//! In-process counters: how a standalone gateway (and a clustered one whose Redis is down)
//! counts rate limits and quotas, and how a clustered one counts the units of plans without
//! either before adding them to Redis in batches.
//!
//! Customers are spread over [`SHARDS`] maps, each behind its own mutex. A request takes one
//! shard's lock for the check-and-count of its customer only (a few hundred nanoseconds, no
//! `.await` inside), which is what makes the count exact under concurrency: two requests of one
//! customer are decided one after the other, never both on the same remaining unit.
//!
//! `unshared` holds the units counted here for Redis, in batches, until Redis takes them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use super::period::Period;
use super::quota::{LedgerRead, QuotaCount};
use super::redis::{QUOTA_KEY_GRACE_MS, Via};
use super::window::{self, WindowCounts, WindowState};
use super::{Counted, Decision, FallbackUnit, Policy, Reservation, Verdict};
use crate::identity::index::{Id, Map};

mod unshared;

use unshared::Fallback;
pub use unshared::{
    FORGET_PER_CALL, Sent, Settled, Taken, UNKNOWN_GENERATION, Unshared, VIA_ANY, VIA_AWAITING,
};

/// Shards of the customer map.
pub const SHARDS: usize = 64;

/// A customer's count after [`LocalCounters::follow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Followed {
    /// Units used in the period, those this process counted that Redis may not hold included.
    pub used: u64,
    /// Whether units this process admitted that Redis' windows do not hold leave no room in a
    /// window for the request Redis admitted.
    pub window_full: bool,
}

/// One customer's counters.
#[derive(Debug)]
struct Counts {
    /// One per window length the customer's plans had, by length: a plan change keeps them.
    windows: Vec<WindowCounts>,
    quota: QuotaCount,
    /// The generation of the customer's quota count in Redis, seeded, when last counted there.
    generation: Option<(Period, i64)>,
    /// The generation of the count in Redis that `quota` follows (seeded or not): kept when
    /// `generation` is forgotten, so that a count Redis makes again learns this process's; and
    /// the newest version of it followed, so that an older answer (their calls overtake one
    /// another) does not take the count back.
    followed: Option<(Period, i64, i64)>,
    /// Units counted in process for Redis (while it failed, or for a plan without limits), and
    /// what is left to settle of them, and the marks of answered calls to delete; absent (one
    /// word) for the customers that never had any.
    fallback: Option<Box<Fallback>>,
}

impl Counts {
    fn new(period: Period) -> Self {
        Self {
            windows: Vec::new(),
            quota: QuotaCount::new(period),
            generation: None,
            followed: None,
            fallback: None,
        }
    }

    /// The generation of the customer's count in Redis this process knows for `period`.
    fn generation_of(&self, period: Period) -> Option<i64> {
        self.generation
            .and_then(|(known, generation)| (known == period).then_some(generation))
    }

    /// Batches not yet added to Redis (none without a fallback).
    fn unshared(&self) -> &[Unshared] {
        self.fallback.as_ref().map_or(&[], |f| &f.unshared)
    }

    /// The fallback state, made on first use.
    fn fallback(&mut self) -> &mut Fallback {
        self.fallback.get_or_insert_with(Box::default)
    }
}

/// The customer's counts in `shard`, made for `period` if it has none yet.
fn counts<'a>(shard: &'a mut Map<Id, Counts>, customer: &Id, period: Period) -> &'a mut Counts {
    shard
        .entry(*customer)
        .or_insert_with(|| Counts::new(period))
}

/// The shard of `customer`. Ids are UUIDv7 bytes: the first six are the time they were made
/// (alike for years), the last is random and spreads customers evenly.
fn shard_index(customer: &Id) -> usize {
    usize::from(customer[15]) % SHARDS
}

/// Counters of every customer that called, in this process.
#[derive(Debug)]
pub struct LocalCounters {
    shards: Box<[Mutex<Map<Id, Counts>>]>,
    /// Customers holding [`Unshared`] units: while none do (always, but after a Redis failure,
    /// or for plans without limits), a request does not look for any.
    unshared: AtomicUsize,
    /// Customers that came to hold [`Unshared`] units since the last
    /// [`take_pending`](Self::take_pending), for the task that adds them to Redis.
    pending: Mutex<Vec<Id>>,
}

impl Default for LocalCounters {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            unshared: AtomicUsize::new(0),
            pending: Mutex::default(),
        }
    }
}

impl LocalCounters {
    fn shard(&self, customer: &Id) -> std::sync::MutexGuard<'_, Map<Id, Counts>> {
        self.shards[shard_index(customer)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides a request of `units` by `customer` under `policy` at `now_ms`, counting it in
    /// every window and the quota when admitted, and in nothing when refused.
    pub fn admit(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
    ) -> Decision {
        let mut shard = self.shard(customer);
        decide(
            counts(&mut shard, customer, period),
            policy,
            period,
            units,
            now_ms,
        )
    }

    /// Decides a request of a plan with neither rate limits nor a quota (admitted: there is
    /// nothing to refuse on) and adds its units to the customer's batch for Redis, all under one
    /// lock; `None`, with nothing counted, when this process does not know the generation of
    /// the customer's count in Redis for `period` (it must ask Redis, which tells it).
    pub fn admit_batched(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
    ) -> Option<Decision> {
        debug_assert!(policy.is_empty());
        let mut shard = self.shard(customer);
        let counts = shard.get_mut(customer)?;
        let generation = counts.generation_of(period)?;
        let mut decision = decide(counts, policy, period, units, now_ms);
        decision.counted = Counted::Batched;
        if let Some(reservation) = &mut decision.reservation {
            reservation.counted = Counted::Batched;
            let token = self.add_unshared(counts, customer, reservation, generation);
            reservation.fallback = Some(FallbackUnit::Batch(token));
        }
        Some(decision)
    }

    /// Customers that came to hold units for Redis since the last call, once each or more.
    pub fn take_pending(&self) -> Vec<Id> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets the generation of the customer's count in Redis if it is still `generation` of
    /// `period`: Redis has another count now (it lost its data and rebuilt it), so units must
    /// not be batched for it until Redis has been asked again.
    pub fn forget_generation(&self, customer: &Id, period: Period, generation: i64) {
        if let Some(counts) = self.shard(customer).get_mut(customer)
            && counts.generation == Some((period, generation))
        {
            counts.generation = None;
        }
    }

    /// Gives back a reservation that must not count.
    pub fn refund(&self, customer: &Id, reservation: &Reservation) {
        if let Some(counts) = self.shard(customer).get_mut(customer) {
            counts.quota.refund(
                reservation.period,
                reservation.units,
                reservation.overage,
                reservation.at_ms,
            );
        }
    }

    /// Whether the customer's count in `period` still lacks what the ledger holds.
    pub fn needs_seed(&self, customer: &Id, period: Period) -> bool {
        self.shard(customer)
            .get(customer)
            .is_none_or(|counts| counts.quota.period != period || !counts.quota.seeded)
    }

    /// Adds what the ledger holds for the customer in `period` (`read`: its events before
    /// `read.until_ms`), once: a second seed of the same period adds nothing.
    pub fn seed(&self, customer: &Id, period: Period, read: LedgerRead) {
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, period);
        counts.quota.roll(period);
        if !counts.quota.seeded {
            counts.quota.used += read.used;
            counts.quota.overage += read.overage;
            counts.quota.seeded = true;
            counts.quota.ledger = Some(read);
        }
    }

    /// Raises a count seeded from the ledger to what the ledger holds now of the same events
    /// (those before the seed's `until_ms`) plus what was counted here since (see
    /// [`QuotaCount::reseed`]): the events that were still in a spool (this process's, or
    /// another's) count now. Nothing for a count seeded otherwise since.
    pub fn reseed(&self, customer: &Id, period: Period, read: LedgerRead) {
        if let Some(counts) = self.shard(customer).get_mut(customer)
            && counts.quota.period == period
        {
            counts.quota.reseed(read);
        }
    }

    /// Sets a customer's count in `period` to what the shared counters said, plus the units
    /// counted here that Redis may not hold yet (batches not added to it, units whose call may
    /// still run there), so that counting in process after Redis fails goes on from there rather
    /// than from nothing; and the generation of that count, when it was rebuilt from the
    /// ledger, which units counted here later are added to.
    /// `counted_in` is the generation of the count Redis said `used` of, seeded or not.
    /// The customer's windows are raised to what Redis counts in them, for the same reason: so
    /// that a window Redis had filled is not empty here. Units this process admitted whose call
    /// did not run before the answered one are not in Redis' windows (which never take units
    /// counted here): they are added to what Redis counts, here and in the room `shared`
    /// reports, so that a gateway admits no more than a window's limit however Redis' answers
    /// and timeouts alternate.
    /// Returns the customer's count after it (units used in the period, this process's pending
    /// ones included), and whether the units admitted here leave no room in a window for the
    /// request Redis admitted.
    pub fn follow(&self, customer: &Id, shared: &mut Decision, via: Via) -> Followed {
        let Decision {
            period,
            used,
            generation,
            counted_in,
            at_ms: now_ms,
            ..
        } = *shared;
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, period);
        // The answered call left when the request was decided, at `now_ms`.
        let sent = Sent { at_ms: now_ms, via };
        let mut in_windows = counts
            .fallback
            .as_deref_mut()
            .filter(|f| !f.in_windows.is_empty());
        if let Some(fallback) = &mut in_windows {
            let longest = shared
                .windows
                .iter()
                .map(|w| w.window_ms)
                .max()
                .unwrap_or(0);
            fallback.forget_in_windows(sent, longest, now_ms);
        }
        let mut window_full = false;
        for state in &mut shared.windows {
            let beyond = in_windows
                .as_ref()
                .map_or(0, |f| f.in_window(state.window_ms, now_ms));
            window_full |= beyond > state.remaining;
            state.remaining = state.remaining.saturating_sub(beyond);
            let counted = state.limit.saturating_sub(state.remaining);
            match counts
                .windows
                .iter_mut()
                .find(|w| w.window_ms() == state.window_ms)
            {
                Some(window) => window.follow(counted, now_ms),
                None if counted > 0 => {
                    let mut window = WindowCounts::new(state.window_ms);
                    window.follow(counted, now_ms);
                    counts.windows.push(window);
                }
                None => {}
            }
        }
        counts.quota.roll(period);
        let version = shared.count_version.unwrap_or(0);
        let older = counted_in.is_some_and(|counted_in| {
            counts
                .followed
                .is_some_and(|(p, g, newest)| p == period && g == counted_in && version < newest)
        });
        if older {
            // A newer answer set the count already, this call's units in it.
            return Followed {
                used: counts.quota.used,
                window_full,
            };
        }
        // Plus what this process counted that Redis may not hold yet: set to Redis' count alone,
        // a slow Redis answering some calls in time while others time out would take the units
        // counted here meanwhile out of the count that decides the next ones in process.
        let beyond = counts
            .fallback
            .as_mut()
            .map_or(0, |fallback| fallback.beyond_answer(period, version, sent));
        counts.quota.used = used.saturating_add(beyond);
        counts.quota.seeded = true;
        counts.quota.ledger = None;
        counts.quota.since_seed = (0, 0);
        if let Some(generation) = generation {
            counts.generation = Some((period, generation));
        }
        if let Some(counted_in) = counted_in {
            counts.followed = Some((period, counted_in, version));
        }
        Followed {
            used: counts.quota.used,
            window_full,
        }
    }

    /// Forgets what no longer counts, so that memory follows the customers counting now rather
    /// than every customer that ever called: windows with nothing left in them, and customers
    /// whose windows are all empty and whose quota period is over (a new period starts from the
    /// ledger anyway). A customer's count in a current period stays, however idle: dropped, it
    /// would be rebuilt from a ledger that may not hold the last second of usage yet. Returns
    /// how many customers are left. Each shard is locked in turn, for one pass over it.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut left = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, counts| {
                counts.windows.retain_mut(|w| !w.is_idle(now_ms));
                if let Some(fallback) = &mut counts.fallback {
                    let had_unshared = !fallback.unshared.is_empty();
                    // Kept as long as Redis keeps the count they belong in.
                    fallback
                        .unshared
                        .retain(|u| u.period.end_ms.saturating_add(QUOTA_KEY_GRACE_MS) > now_ms);
                    if had_unshared && fallback.unshared.is_empty() {
                        self.unshared.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                !(counts.windows.is_empty()
                    && counts.unshared().is_empty()
                    && counts
                        .fallback
                        .as_ref()
                        .is_none_or(|f| f.awaiting.is_empty())
                    && counts.quota.period.end_ms <= now_ms)
            });
            left += shard.len();
        }
        left
    }

    /// What this process knows of the customer's count in `period`: the shared count as Redis
    /// last said, and what it counted since.
    ///
    /// Units in batches not yet settled (unsent, or sent without an answer yet) are left out:
    /// such a batch may still be added to a count Redis made again ([`Sharing::AddedToLater`]),
    /// and a count raised to include them would then hold them twice. Once settled, the units
    /// of a batch Redis refused are in what is known again.
    ///
    /// [`Sharing::AddedToLater`]: super::redis::Sharing::AddedToLater
    pub fn known(&self, customer: &Id, period: Period) -> super::redis::Known {
        let shard = self.shard(customer);
        let Some(counts) = shard
            .get(customer)
            .filter(|counts| counts.quota.period == period)
        else {
            return Default::default();
        };
        // Units whose call may still run in Redis are left out too: counted there already, they
        // would be counted twice in a count Redis makes again from this.
        let ((units, overage), maybe) = counts.fallback.as_ref().map_or(((0, 0), 0), |fallback| {
            (fallback.batched(period), fallback.maybe_units(period))
        });
        super::redis::Known {
            used: counts
                .quota
                .used
                .saturating_sub(units)
                .saturating_sub(maybe),
            overage: counts.quota.overage.saturating_sub(overage),
            generation: counts
                .followed
                .and_then(|(known, generation, _)| (known == period).then_some(generation)),
            // Batches not added to it yet: a hard quota refuses as if they were.
            pending: units,
        }
    }

    /// A customer's units used in `period` so far.
    pub fn used(&self, customer: &Id, period: Period) -> (u64, u64) {
        self.shard(customer)
            .get(customer)
            .filter(|counts| counts.quota.period == period)
            .map_or((0, 0), |counts| (counts.quota.used, counts.quota.overage))
    }
}

/// [`LocalCounters::admit`] on one customer's counts.
fn decide(
    counts: &mut Counts,
    policy: &Policy<'_>,
    period: Period,
    units: u64,
    now_ms: i64,
) -> Decision {
    counts.quota.roll(period);
    // Forget windows the plan no longer has once nothing counts in them.
    counts
        .windows
        .retain_mut(|w| policy.window_ms().any(|ms| ms == w.window_ms()) || !w.is_idle(now_ms));
    for window_ms in policy.window_ms() {
        if !counts.windows.iter().any(|w| w.window_ms() == window_ms) {
            counts.windows.push(WindowCounts::new(window_ms));
        }
    }
    let quota_fits = counts.quota.fits(policy.quota, units);
    let mut selected: Vec<(&mut WindowCounts, u64)> = Vec::with_capacity(policy.rate_limits.len());
    for window in counts.windows.iter_mut() {
        if let Some(limit) = policy.limit_for(window.window_ms()) {
            selected.push((window, limit));
        }
    }
    let mut states: Vec<WindowState> = Vec::with_capacity(selected.len());
    let unit_count = u32::try_from(units).unwrap_or(u32::MAX);
    let verdict = if !quota_fits {
        // Refused: count nothing, but report the windows as they stand.
        window::peek(&mut selected, unit_count, now_ms, &mut states);
        Verdict::QuotaExceeded
    } else if window::admit(&mut selected, unit_count, now_ms, &mut states) {
        Verdict::Admitted
    } else {
        Verdict::RateLimited
    };
    let reservation = (verdict == Verdict::Admitted).then(|| {
        let reserved = counts.quota.reserve(policy.quota, units, now_ms);
        Reservation {
            period,
            at_ms: now_ms,
            units,
            overage: reserved.overage,
            counted: Counted::Local,
            fallback: None,
        }
    });
    Decision {
        verdict,
        windows: states,
        quota: policy.quota,
        period,
        at_ms: now_ms,
        used: counts.quota.used,
        reservation,
        counted: Counted::Local,
        generation: None,
        counted_in: None,
        count_version: None,
    }
}

#[cfg(test)]
mod tests;
