//! Plans on the hot path: each plan's rate-limit windows and quota, decided per customer, and
//! told to the client in headers.
//!
//! A request on an authenticated route is decided once in `request_filter`: every window must
//! have room and the quota must not be spent (a hard one), then the request is counted in all of
//! them at once, or in none. The quota unit it reserves is settled in `logging`: a request that
//! must not count (refused later by the gateway, or answered 5xx by the upstream) gives it back.
//!
//! # Layout
//! - [`clock`]: the injectable clock every decision reads.
//! - [`window`]: sliding windows in sub-buckets (pure arithmetic).
//! - [`quota`]: counting units in a period against a hard or soft limit (pure arithmetic).
//! - [`period`]: the period a quota counts in (billing period or calendar month in UTC).
//! - [`local`]: the in-process counters.
//! - [`redis`]: the shared counters, one script call per request of a plan with limits.
//! - [`metrics`]: decisions, refunds and overage as metrics.
//! - [`headers`]: `RateLimit-Policy`, `RateLimit`, `X-RateLimit-*` and `X-Quota-*`.

pub mod clock;
pub mod headers;
pub mod local;
pub mod metrics;
pub mod period;
pub mod quota;
pub mod redis;
pub mod window;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tollgate_model::plan::{Plan, RateLimit};

use crate::identity::index::Id;
use crate::metering::ledger::Ledger;
use clock::Clock;
use local::{LocalCounters, Unshared};
pub use metrics::Counted;
use metrics::{FallbackUnits, LimitMetrics};
use period::Period;
use quota::{LedgerRead, QuotaLimit};
use redis::RedisCounters;
use redis::Sharing;
use window::WindowState;

/// A plan's limits, borrowed from it for one decision.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Windows that all apply.
    pub rate_limits: &'a [RateLimit],
    /// The quota, if any.
    pub quota: Option<QuotaLimit>,
}

impl<'a> Policy<'a> {
    /// The limits of `plan`.
    pub fn of(plan: &'a Plan) -> Self {
        Self {
            rate_limits: &plan.rate_limits,
            quota: plan.quota.map(|q| QuotaLimit {
                limit: q.requests,
                hard: q.hard,
            }),
        }
    }

    /// Window lengths in ms.
    pub fn window_ms(&self) -> impl Iterator<Item = i64> + '_ {
        self.rate_limits.iter().map(|w| window_ms(w.window_seconds))
    }

    /// The limit of the window of `window_ms`, if the plan has one.
    pub fn limit_for(&self, window_ms: i64) -> Option<u64> {
        self.rate_limits
            .iter()
            .find(|w| self::window_ms(w.window_seconds) == window_ms)
            .map(|w| w.requests)
    }

    /// Whether there is anything to count or tell: a plan with neither windows nor quota still
    /// counts usage, but sends no limit headers.
    pub fn is_empty(&self) -> bool {
        self.rate_limits.is_empty() && self.quota.is_none()
    }
}

fn window_ms(seconds: u64) -> i64 {
    i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// What was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; the request goes on.
    Admitted,
    /// A window is full (429).
    RateLimited,
    /// A hard quota is spent (429).
    QuotaExceeded,
}

/// A quota unit reserved by an admitted request, settled in `logging`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The period it counts in.
    pub period: Period,
    /// When it was decided, Unix ms.
    pub at_ms: i64,
    /// Units reserved.
    pub units: u64,
    /// Of them, units past a soft quota.
    pub overage: u64,
    /// Where it was counted, and so where it is given back.
    pub counted: Counted,
    /// Counted in process without asking Redis: where its unit went.
    pub fallback: Option<FallbackUnit>,
}

/// Where the unit of a request counted in process without asking Redis went, so that its
/// refund is given back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackUnit {
    /// Its call may have run in Redis after all (it timed out, or the connection broke).
    MaybeInRedis,
    /// Into the batch of this token, to be added to Redis.
    Batch(u128),
    /// Nowhere but the ledger: no count in Redis is known to lack it.
    Unplaced,
}

/// A decision and what the response headers say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Admitted or why not.
    pub verdict: Verdict,
    /// Each window of the plan, in the plan's order.
    pub windows: Vec<WindowState>,
    /// The plan's quota.
    pub quota: Option<QuotaLimit>,
    /// The period the quota counts in.
    pub period: Period,
    /// When it was decided, Unix ms.
    pub at_ms: i64,
    /// Units used in the period, this request included when admitted.
    pub used: u64,
    /// The reservation to settle, when admitted.
    pub reservation: Option<Reservation>,
    /// Where it was counted.
    pub counted: Counted,
    /// Counted in Redis: the generation of the customer's quota count there, once rebuilt from
    /// the ledger (units this process counts without asking Redis, while it fails or for a plan
    /// without limits, are added to that count only).
    pub generation: Option<i64>,
    /// Counted in Redis: the generation of the quota count it was counted in, seeded or not.
    pub counted_in: Option<i64>,
}

impl Decision {
    /// Seconds a refused client should wait (at least 1).
    pub fn retry_after(&self) -> u64 {
        let ms = match self.verdict {
            Verdict::Admitted => 0,
            Verdict::QuotaExceeded => self.period.end_ms.saturating_sub(self.at_ms),
            Verdict::RateLimited => self
                .windows
                .iter()
                .filter(|w| w.remaining == 0)
                .map(|w| w.reset_ms)
                .max()
                .unwrap_or(1000),
        };
        ceil_seconds(ms).max(1)
    }
}

/// Whole seconds, rounded up: a client told to wait never comes back too early.
pub fn ceil_seconds(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000)
}

/// The longest a request waits for the ledger to rebuild its customer's quota count.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a quota count is seeded from the ledger it reads the ledger again, unless set
/// ([`Limiter::reseed_after`]).
pub(crate) const RESEED_AFTER: Duration = Duration::from_secs(3);

/// Quota counts seeded from the ledger, each to seed again once the spools have been flushed
/// ([`Limiter::reseed_after`] after its seed): in process ([`Limiter`]'s) or in Redis
/// ([`RedisCounters`]'s).
#[derive(Debug)]
pub(crate) struct ReseedQueue<T> {
    /// Each with when it is due and how many reads of the ledger failed.
    items: Mutex<Vec<(i64, u32, T)>>,
    after_ms: AtomicI64,
}

impl<T> Default for ReseedQueue<T> {
    fn default() -> Self {
        Self {
            items: Mutex::default(),
            after_ms: AtomicI64::new(RESEED_AFTER.as_millis() as i64),
        }
    }
}

impl<T> ReseedQueue<T> {
    fn set_after(&self, after: Duration) {
        self.after_ms.store(
            i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Queues `item`, a count of `period` seeded with the ledger's events before `until_ms`:
    /// unless the period began so shortly before that no event of it could be in a spool then
    /// and not counted (a period's first count, say).
    pub(crate) fn push(&self, period: Period, until_ms: i64, item: T) {
        let after = self.after_ms.load(Ordering::Relaxed);
        if until_ms.saturating_sub(period.start_ms) >= after {
            self.items
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((until_ms.saturating_add(after), 0, item));
        }
    }

    /// Queues `item` again after a read that failed (its `attempts`-th), unless that was the
    /// last it may try.
    pub(crate) fn retry(&self, attempts: u32, now_ms: i64, item: T) {
        if attempts < RESEED_ATTEMPTS {
            let due = now_ms.saturating_add(self.after_ms.load(Ordering::Relaxed));
            self.items
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((due, attempts, item));
        }
    }

    /// The items due at `now_ms`, with their failed attempts so far.
    pub(crate) fn take_due(&self, now_ms: i64) -> Vec<(u32, T)> {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        if items.iter().all(|(due, _, _)| *due > now_ms) {
            return Vec::new();
        }
        let (due, later): (Vec<_>, Vec<_>) =
            items.drain(..).partition(|(due, _, _)| *due <= now_ms);
        *items = later;
        due.into_iter()
            .map(|(_, attempts, item)| (attempts, item))
            .collect()
    }
}

/// An in-process count seeded from the ledger's events before `until_ms`.
#[derive(Debug, Clone, Copy)]
struct LocalReseed {
    customer: Id,
    period: Period,
    until_ms: i64,
}

/// Reads of the ledger a re-seed tries before it gives up.
const RESEED_ATTEMPTS: u32 = 3;
/// Re-seeds run at once.
pub(crate) const RESEED_CONCURRENCY: usize = 16;

/// Where the counters live: in process, or in Redis with the in-process counters as fallback.
#[derive(Debug)]
pub struct Limiter {
    clock: Arc<dyn Clock>,
    local: LocalCounters,
    redis: Option<RedisCounters>,
    metrics: LimitMetrics,
    /// The usage ledger, once the control plane is reachable (set at start).
    ledger: OnceLock<Arc<dyn Ledger>>,
    /// The same, as requests read it to rebuild a quota count ([`Resting`]).
    seed_ledger: OnceLock<Resting>,
    /// Held by a pass of [`Limiter::share_pending`].
    sharing: tokio::sync::Mutex<()>,
    /// Held by a pass of [`Limiter::reseed_due`].
    reseeding: tokio::sync::Mutex<()>,
    /// In-process counts seeded from the ledger, to seed once more.
    reseeds: ReseedQueue<LocalReseed>,
    /// Units to give back in Redis whose call did not run (Redis failing then): given back by
    /// [`Limiter::share_pending`] once it answers.
    refunds: Mutex<Vec<(Id, Reservation)>>,
    /// Customers whose count is being read from the ledger ([`Limiter::seed_local`]): one read
    /// at a time per customer, when it last ended.
    seeding: Mutex<std::collections::HashMap<Id, SeedGate>>,
}

/// One customer's ledger reads: held while one runs; when the last one ended.
type SeedGate = Arc<tokio::sync::Mutex<Option<std::time::Instant>>>;

/// Most refunds waiting for Redis; past it, one is dropped with a warning (Redis then counts
/// its unit until the period ends, never more than the customer used plus it).
const MAX_PENDING_REFUNDS: usize = 100_000;

impl Limiter {
    /// Counters in this process, on `clock`, counted in `metrics`.
    pub fn local(clock: Arc<dyn Clock>, metrics: LimitMetrics) -> Self {
        Self {
            clock,
            local: LocalCounters::default(),
            redis: None,
            metrics,
            ledger: OnceLock::new(),
            seed_ledger: OnceLock::new(),
            sharing: tokio::sync::Mutex::new(()),
            reseeding: tokio::sync::Mutex::new(()),
            reseeds: ReseedQueue::default(),
            refunds: Mutex::new(Vec::new()),
            seeding: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Counters in Redis, falling back to this process's when Redis fails.
    pub fn shared(clock: Arc<dyn Clock>, metrics: LimitMetrics, redis: RedisCounters) -> Self {
        Self {
            redis: Some(redis),
            ..Self::local(clock, metrics)
        }
    }

    /// Sets the usage ledger (once).
    pub fn set_ledger(&self, ledger: Arc<dyn Ledger>) {
        self.set_ledger_resting(ledger, LEDGER_REST);
    }

    /// [`Self::set_ledger`], with requests resting from it `rest` after a failed reading.
    fn set_ledger_resting(&self, ledger: Arc<dyn Ledger>, rest: Duration) {
        let _ = self.seed_ledger.set(Resting {
            ledger: Arc::clone(&ledger),
            rest,
            state: Mutex::new((0, None)),
        });
        let _ = self.ledger.set(ledger);
    }

    /// The ledger as a request reads it to rebuild a quota count.
    fn seed_ledger(&self) -> Option<&dyn Ledger> {
        self.seed_ledger.get().map(|l| l as &dyn Ledger)
    }

    /// Sets how long after seeding a quota count from the ledger, in process or in Redis, it is
    /// seeded again: longer than it takes a request's usage event to reach the ledger (the flush
    /// interval, and more), so that the events that were still in a spool count then.
    pub fn reseed_after(&self, after: Duration) {
        self.reseeds.set_after(after);
        if let Some(redis) = &self.redis {
            redis.reseed_after(after);
        }
    }

    /// The usage ledger, once set.
    pub fn ledger(&self) -> Option<&Arc<dyn Ledger>> {
        self.ledger.get()
    }

    /// The shared counters, if configured.
    pub fn redis(&self) -> Option<&RedisCounters> {
        self.redis.as_ref()
    }

    /// The time decisions are made at.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Decides one request of `units` by `customer` under `plan`, in Redis when configured and
    /// reachable in time, else in process.
    pub async fn admit(
        &self,
        customer: &Id,
        plan: &Plan,
        billing: Option<tollgate_model::feed::PeriodMs>,
        units: u64,
    ) -> Decision {
        let now = self.clock.now_ms();
        let period = period::current(billing, now);
        let policy = Policy::of(plan);
        let mut decision = None;
        if let Some(redis) = &self.redis {
            redis.connect_near(now);
            if policy.is_empty() {
                // Nothing to decide: once this process knows the customer's count in Redis,
                // the unit waits in a batch that `share_pending` adds to it.
                decision = self
                    .local
                    .admit_batched(customer, &policy, period, units, now);
            }
        }
        if let Some(redis) = &self.redis
            && decision.is_none()
        {
            if !redis.is_failing(now) {
                let batches = self.local.take_unshared(customer);
                self.share_unshared(redis, customer, batches, now).await;
            }
            let rebuild = redis::Rebuild {
                known: self.local.known(customer, period),
                ledger: self.seed_ledger(),
            };
            match redis
                .admit(customer, &policy, period, units, now, rebuild)
                .await
            {
                Ok(shared) => {
                    // Remembered, so counting in process after a failure starts from here.
                    self.local.follow(customer, &shared);
                    decision = Some(shared);
                }
                Err(failure) => {
                    // A customer this process never counted in Redis starts from the ledger.
                    self.seed_local(customer, period).await;
                    let mut local = self.local.admit(customer, &policy, period, units, now);
                    local.counted = Counted::Fallback;
                    if let Some(reservation) = &mut local.reservation {
                        reservation.counted = Counted::Fallback;
                        // A call that timed out or broke may be counted by Redis all the same
                        // (documented); the others never ran, and their units are added to
                        // Redis once it answers.
                        let unit = if failure.may_have_run() {
                            FallbackUnit::MaybeInRedis
                        } else if let Some(token) = self.local.note_unshared(customer, reservation)
                        {
                            FallbackUnit::Batch(token)
                        } else {
                            self.metrics
                                .fallback_units(reservation.units, FallbackUnits::Unplaced);
                            FallbackUnit::Unplaced
                        };
                        reservation.fallback = Some(unit);
                    }
                    decision = Some(local);
                }
            }
        }
        let decision = match decision {
            Some(decision) => decision,
            None => {
                self.seed_local(customer, period).await;
                self.local.admit(customer, &policy, period, units, now)
            }
        };
        let overage = decision.reservation.map_or(0, |r| r.overage);
        self.metrics
            .decision(decision.verdict, decision.counted, overage);
        decision
    }

    /// Adds to Redis `batches`, quota units this process counted for `customer` without asking
    /// Redis (while it failed, or for a plan without limits): before Redis decides this
    /// customer's next request here, and every [`SHARE_INTERVAL`] ([`Self::share_pending`]).
    /// Otherwise an outage, or a slow Redis, would hand out quota for free, and a plan change
    /// would not go on from the customer's count. Kept for a later attempt when Redis fails
    /// again.
    async fn share_unshared(
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
                Ok(Sharing::Added) => {
                    self.metrics
                        .fallback_units(batch.units, FallbackUnits::Shared);
                    self.local.settle_unshared(customer, &batch, true);
                }
                Ok(Sharing::AddedToLater) => {
                    self.metrics
                        .fallback_units(batch.units, FallbackUnits::Shared);
                    self.local.settle_unshared(customer, &batch, true);
                    // Redis counts in another generation now: ask it before batching again.
                    self.local
                        .forget_generation(customer, batch.period, batch.generation);
                }
                Ok(Sharing::Refused) => {
                    // The marks of `forget` were deleted all the same.
                    self.metrics
                        .fallback_units(batch.units, FallbackUnits::Ledger);
                    self.local.settle_unshared(customer, &batch, false);
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

    /// Before the first decision of a customer's period in this process, adds what the ledger
    /// holds for it (what earlier processes counted), so a restart is no free reset. Requests
    /// wait at most [`SEED_TIMEOUT`] for it; without an answer they are counted from what this
    /// process has, and the next request tries again.
    async fn seed_local(&self, customer: &Id, period: Period) {
        let Some(ledger) = self.seed_ledger() else {
            return;
        };
        if !self.local.needs_seed(customer, period) {
            return;
        }
        // One read per customer at a time: a burst of a customer's first requests waits for
        // one read, not one each; those that waited while it ran take its outcome, even a
        // failure, instead of a second of their own each.
        let asked = std::time::Instant::now();
        let gate = Arc::clone(
            self.seeding
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(*customer)
                .or_default(),
        );
        let mut last_read = gate.lock().await;
        if last_read.is_none_or(|ended| ended < asked) && self.local.needs_seed(customer, period) {
            let until_ms = self.clock.now_ms().min(period.end_ms);
            if let Some(read) = read_ledger(ledger, customer, period, until_ms).await {
                self.local.seed(customer, period, read);
                let reseed = LocalReseed {
                    customer: *customer,
                    period,
                    until_ms,
                };
                self.reseeds.push(period, until_ms, reseed);
            }
            *last_read = Some(std::time::Instant::now());
        }
        drop(last_read);
        // Forgotten once no one else waits on it (they took their clone under this lock).
        let mut seeding = self.seeding.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::strong_count(&gate) == 2
            && seeding
                .get(customer)
                .is_some_and(|held| Arc::ptr_eq(held, &gate))
        {
            seeding.remove(customer);
        }
    }

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
    async fn give_back_held(&self, redis: &RedisCounters, now: i64) {
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

    /// Seeds again from the ledger the quota counts this process seeded from it a while ago,
    /// in process and in Redis ([`RedisCounters::reseed_due`]): the events that were still in a
    /// spool then are in the ledger now. Run in the background (one pass at a time), every
    /// [`SHARE_INTERVAL`]; a read of the ledger that fails is tried again, up to
    /// [`RESEED_ATTEMPTS`] times.
    pub async fn reseed_due(&self) {
        let Some(ledger) = self.ledger.get() else {
            return;
        };
        let Ok(_pass) = self.reseeding.try_lock() else {
            return;
        };
        let now = self.clock.now_ms();
        if let Some(redis) = &self.redis {
            redis.reseed_due(ledger.as_ref(), now).await;
        }
        futures_util::stream::iter(self.reseeds.take_due(now))
            .for_each_concurrent(RESEED_CONCURRENCY, |(attempts, reseed)| async move {
                let LocalReseed {
                    customer,
                    period,
                    until_ms,
                } = reseed;
                match read_ledger(ledger.as_ref(), &customer, period, until_ms).await {
                    Some(read) => self.local.reseed(&customer, period, read),
                    None => self.reseeds.retry(attempts + 1, now, reseed),
                }
            })
            .await;
    }

    /// Adds to Redis the batches of every customer that came to hold some since the last
    /// call (units of plans without limits, and units counted while Redis failed), unless Redis
    /// is failing: then they wait for the next call, or for their customer's next request that
    /// Redis decides. Run every [`SHARE_INTERVAL`].
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

    /// The in-process counters.
    pub fn counters(&self) -> &LocalCounters {
        &self.local
    }

    /// Forgets in-process counters that no longer count ([`LocalCounters::sweep`]).
    pub fn sweep(&self) {
        let left = self.local.sweep(self.clock.now_ms());
        self.metrics.customers_counted(left);
    }
}

/// How often the in-process counters are swept.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How often units counted in process are added to Redis ([`Limiter::share_pending`]): what
/// the shared quota count of a customer on a plan without limits may lag by.
pub const SHARE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Customers whose batches [`Limiter::share_pending`] sends at once.
const SHARE_CONCURRENCY: usize = 64;

/// The ledger's count of the customer's events in `period` before `until_ms`; `None` (logged)
/// when it cannot be read in [`SEED_TIMEOUT`].
async fn read_ledger(
    ledger: &dyn Ledger,
    customer: &Id,
    period: Period,
    until_ms: i64,
) -> Option<LedgerRead> {
    let before = Period {
        start_ms: period.start_ms,
        end_ms: until_ms,
    };
    if before.end_ms <= before.start_ms {
        // No event of the period is that old.
        return Some(LedgerRead {
            until_ms,
            used: 0,
            overage: 0,
        });
    }
    match tokio::time::timeout(SEED_TIMEOUT, ledger.period_usage(customer, before)).await {
        Ok(Ok((used, overage))) => Some(LedgerRead {
            until_ms,
            used,
            overage,
        }),
        Ok(Err(error)) if error.is::<LedgerResting>() => {
            tracing::debug!(%error, "quota count not rebuilt from the ledger yet");
            None
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the ledger to rebuild a quota count");
            None
        }
        Err(_) => {
            tracing::warn!("the ledger did not answer in time to rebuild a quota count");
            None
        }
    }
}

/// How long requests rebuilding a quota count do not read the ledger once readings of it have
/// failed ([`Resting`]).
pub const LEDGER_REST: Duration = Duration::from_secs(5);

/// Readings failed in a row (failed, or no answer within [`SEED_TIMEOUT`]) that rest the ledger:
/// more than one, so that one customer whose reading fails (or is slow) does not rest it for
/// the others, whose readings, answered, start the count again.
const FAILED_READINGS_TO_REST: u32 = 2;

/// The ledger as requests read it to rebuild a quota count: once [`FAILED_READINGS_TO_REST`]
/// readings in a row failed or did not answer within [`SEED_TIMEOUT`], readings are refused at
/// once for [`LEDGER_REST`], so that while the control plane is unreachable (a network that drops
/// packets rather than refusing them) requests do not each wait a second for it; they count
/// from what the gateway has, and a reading after the rest tries again. The background reseeds
/// read the ledger itself.
#[derive(Debug)]
struct Resting {
    ledger: Arc<dyn Ledger>,
    /// How long readings are refused ([`LEDGER_REST`]).
    rest: Duration,
    /// Readings failed in a row, and until when readings are refused.
    state: Mutex<(u32, Option<std::time::Instant>)>,
}

impl Resting {
    fn state(&self) -> std::sync::MutexGuard<'_, (u32, Option<std::time::Instant>)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a reading as failed unless disarmed: a reading dropped before its answer (its
/// caller's own deadline passed first) failed too.
struct Reading<'a> {
    resting: &'a Resting,
    answered: bool,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut state = self.resting.state();
        if self.answered {
            *state = (0, None);
            return;
        }
        state.0 += 1;
        if state.0 >= FAILED_READINGS_TO_REST {
            state.1 = Some(std::time::Instant::now() + self.resting.rest);
            state.0 = 0;
        }
    }
}

/// A reading [`Resting`] refused.
#[derive(Debug, thiserror::Error)]
#[error("readings of the ledger failed just before; it is not read again yet")]
struct LedgerResting;

#[async_trait::async_trait]
impl Ledger for Resting {
    async fn record(
        &self,
        events: &[tollgate_model::usage::UsageEvent],
    ) -> Result<tollgate_model::usage::UsageStored, crate::metering::ledger::LedgerError> {
        self.ledger.record(events).await
    }

    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)> {
        if self
            .state()
            .1
            .is_some_and(|until| std::time::Instant::now() < until)
        {
            return Err(anyhow::Error::new(LedgerResting));
        }
        let mut reading = Reading {
            resting: self,
            answered: false,
        };
        // Its caller's deadline ([`read_ledger`]: SEED_TIMEOUT) drops a reading that does not
        // answer, which counts it as failed.
        let read = self.ledger.period_usage(customer, period).await;
        reading.answered = read.is_ok();
        read
    }
}

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

#[cfg(test)]
mod tests {
    use tollgate_model::plan::{PlanStatus, Quota};

    use super::clock::ManualClock;
    use super::*;
    use crate::metrics::Metrics;

    fn plan(rate_limits: Vec<RateLimit>, quota: Option<Quota>) -> Plan {
        Plan {
            id: "plan_test".into(),
            name: "test".into(),
            rate_limits,
            quota,
            price: None,
            upgrade_url: None,
            status: PlanStatus::Active,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    /// 2026-11-26T00:00:00Z, on a 3 s bucket boundary.
    const START: i64 = 1_795_651_200_000;

    /// A ledger that holds `units` for every customer, answers after `delay` (or fails when
    /// `fails`), and counts its reads.
    #[derive(Debug)]
    struct SlowLedger {
        units: u64,
        delay: Duration,
        fails: bool,
        /// A customer whose readings fail even when the others' do not.
        failing_customer: Option<Id>,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Ledger for SlowLedger {
        async fn record(
            &self,
            _: &[tollgate_model::usage::UsageEvent],
        ) -> Result<tollgate_model::usage::UsageStored, crate::metering::ledger::LedgerError>
        {
            unreachable!("nothing is recorded here")
        }

        async fn period_usage(&self, customer: &Id, _: Period) -> anyhow::Result<(u64, u64)> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            anyhow::ensure!(!self.fails, "the ledger is down");
            anyhow::ensure!(
                self.failing_customer != Some(*customer),
                "this customer's reading fails"
            );
            Ok((self.units, 0))
        }
    }

    /// A burst of a customer's first requests after a start waits for one read of the ledger,
    /// not one each; a read that fails is not made again by the requests that waited for it.
    #[tokio::test]
    async fn a_burst_of_first_requests_reads_the_ledger_once() {
        let quota = plan(
            Vec::new(),
            Some(Quota {
                requests: 100,
                hard: true,
            }),
        );
        for fails in [false, true] {
            let limiter = Arc::new(Limiter::local(
                Arc::new(ManualClock::at(START)) as Arc<dyn Clock>,
                LimitMetrics::new(&Metrics::new()).unwrap(),
            ));
            let ledger = Arc::new(SlowLedger {
                units: 95,
                delay: Duration::from_millis(50),
                fails,
                failing_customer: None,
                reads: std::sync::atomic::AtomicUsize::new(0),
            });
            limiter.set_ledger_resting(
                Arc::clone(&ledger) as Arc<dyn Ledger>,
                Duration::from_secs(2),
            );
            let burst = (0..20).map(|_| {
                let limiter = Arc::clone(&limiter);
                let quota = quota.clone();
                tokio::spawn(async move { limiter.admit(&[3; 16], &quota, None, 1).await.verdict })
            });
            let verdicts = futures_util::future::join_all(burst).await;
            let admitted = verdicts
                .iter()
                .filter(|v| *v.as_ref().unwrap() == Verdict::Admitted)
                .count();
            assert_eq!(ledger.reads.load(Ordering::SeqCst), 1, "fails: {fails}");
            assert!(limiter.seeding.lock().unwrap().is_empty());
            if fails {
                // Counted from nothing (documented). The next request reads again; with that
                // second failure in a row the ledger rests: requests do not read it, whichever
                // customer they are for (a ledger that does not answer would cost each of them
                // a second); the first after the rest does.
                assert_eq!(admitted, 20);
                limiter.admit(&[3; 16], &quota, None, 1).await;
                assert_eq!(ledger.reads.load(Ordering::SeqCst), 2);
                limiter.admit(&[3; 16], &quota, None, 1).await;
                limiter.admit(&[4; 16], &quota, None, 1).await;
                assert_eq!(ledger.reads.load(Ordering::SeqCst), 2);
                tokio::time::sleep(Duration::from_millis(2_100)).await;
                limiter.admit(&[4; 16], &quota, None, 1).await;
                assert_eq!(ledger.reads.load(Ordering::SeqCst), 3);
            } else {
                assert_eq!(admitted, 5, "95 of 100 used before the start");
            }
        }
    }

    /// One customer whose readings fail does not rest the ledger for the others: a reading of
    /// another customer answered in between starts the count of failures again.
    #[tokio::test]
    async fn one_customers_failing_readings_do_not_rest_the_ledger_for_the_others() {
        let quota = plan(
            Vec::new(),
            Some(Quota {
                requests: 100,
                hard: true,
            }),
        );
        let limiter = Limiter::local(
            Arc::new(ManualClock::at(START)) as Arc<dyn Clock>,
            LimitMetrics::new(&Metrics::new()).unwrap(),
        );
        let ledger = Arc::new(SlowLedger {
            units: 95,
            delay: Duration::ZERO,
            fails: false,
            failing_customer: Some([5; 16]),
            reads: std::sync::atomic::AtomicUsize::new(0),
        });
        limiter.set_ledger_resting(
            Arc::clone(&ledger) as Arc<dyn Ledger>,
            Duration::from_secs(60),
        );
        for customer in [[5; 16], [6; 16], [5; 16], [7; 16]] {
            limiter.admit(&customer, &quota, None, 1).await;
        }
        assert_eq!(ledger.reads.load(Ordering::SeqCst), 4, "none refused");
        // Each of the others was seeded: 95 of 100 used.
        let decision = limiter.admit(&[7; 16], &quota, None, 1).await;
        assert_eq!(decision.used, 97);
    }

    #[tokio::test]
    async fn on_an_injected_clock_20_of_25_pass_and_all_come_back_after_the_window() {
        let clock = Arc::new(ManualClock::at(START));
        let limiter = Limiter::local(
            Arc::clone(&clock) as Arc<dyn Clock>,
            LimitMetrics::new(&Metrics::new()).unwrap(),
        );
        let plan = plan(
            vec![RateLimit {
                requests: 20,
                window_seconds: 60,
            }],
            None,
        );
        let mut remaining = Vec::new();
        for _ in 0..25 {
            let decision = limiter.admit(&[1; 16], &plan, None, 1).await;
            remaining.push((decision.verdict, decision.windows[0].remaining));
            clock.advance(10);
        }
        let expected: Vec<(Verdict, u64)> = (0..20)
            .rev()
            .map(|r| (Verdict::Admitted, r))
            .chain([(Verdict::RateLimited, 0); 5])
            .collect();
        assert_eq!(remaining, expected);
        // Every unit was counted in the bucket [START, START + 3 s): back at START + 63 s.
        clock.set(START + 62_999);
        let refused = limiter.admit(&[1; 16], &plan, None, 1).await;
        assert_eq!(refused.verdict, Verdict::RateLimited);
        assert_eq!(refused.retry_after(), 1);
        clock.set(START + 63_000);
        let back = limiter.admit(&[1; 16], &plan, None, 1).await;
        assert_eq!(back.verdict, Verdict::Admitted);
        assert_eq!(back.windows[0].remaining, 19);
    }

    #[tokio::test]
    async fn a_quota_starts_again_when_the_calendar_month_turns() {
        let clock = Arc::new(ManualClock::at(START));
        let limiter = Limiter::local(
            Arc::clone(&clock) as Arc<dyn Clock>,
            LimitMetrics::new(&Metrics::new()).unwrap(),
        );
        let plan = plan(
            Vec::new(),
            Some(Quota {
                requests: 2,
                hard: true,
            }),
        );
        for _ in 0..2 {
            assert_eq!(
                limiter.admit(&[2; 16], &plan, None, 1).await.verdict,
                Verdict::Admitted
            );
        }
        let refused = limiter.admit(&[2; 16], &plan, None, 1).await;
        assert_eq!(refused.verdict, Verdict::QuotaExceeded);
        // 2026-12-01T00:00:00Z is 5 days away: Retry-After says so.
        assert_eq!(refused.retry_after(), 5 * 86_400);
        clock.set(START + 5 * 86_400_000 - 1);
        assert_eq!(
            limiter.admit(&[2; 16], &plan, None, 1).await.verdict,
            Verdict::QuotaExceeded
        );
        clock.set(START + 5 * 86_400_000);
        let december = limiter.admit(&[2; 16], &plan, None, 1).await;
        assert_eq!(december.verdict, Verdict::Admitted);
        assert_eq!(december.used, 1);
    }
    #[tokio::test]
    async fn a_sweep_keeps_this_months_counts_and_reports_how_many_customers_are_counted() {
        let clock = Arc::new(ManualClock::at(START));
        let metrics = Metrics::new();
        let limiter = Limiter::local(
            Arc::clone(&clock) as Arc<dyn Clock>,
            LimitMetrics::new(&metrics).unwrap(),
        );
        let plan = plan(
            vec![RateLimit {
                requests: 10,
                window_seconds: 1,
            }],
            Some(Quota {
                requests: 5,
                hard: true,
            }),
        );
        let gauge = || {
            let text = String::from_utf8(metrics.render()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("tollgate_limit_customers_counted "))
                .map(str::to_owned)
        };
        for customer in [[3; 16], [4; 16]] {
            limiter.admit(&customer, &plan, None, 1).await;
        }
        // A minute on, within the month: both counts stay, and so does what they counted.
        clock.advance(60_000);
        limiter.sweep();
        assert_eq!(gauge().as_deref(), Some("2"));
        assert_eq!(limiter.admit(&[3; 16], &plan, None, 1).await.used, 2);
        // The month is over (2026-12-01): both go.
        clock.set(START + 5 * 86_400_000);
        limiter.sweep();
        assert_eq!(gauge().as_deref(), Some("0"));
        assert_eq!(limiter.admit(&[3; 16], &plan, None, 1).await.used, 1);
    }
}
