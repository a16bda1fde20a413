//! Plans on the hot path: each plan's rate-limit windows and quota, decided per customer, and
//! told to the client in headers.
//!
//! A request on an authenticated route is decided once in `request_filter`: every window must
//! have room and the quota must not be spent (a hard one), then the request is counted in all of
//! them at once, or in none. The quota unit it reserves is settled in `logging`: a request that
//! must not count (refused later by the gateway, or answered 5xx by the upstream) gives it back.
//!
//! # Layout
//! - here: the [`Limiter`], which decides in process or in Redis and settles.
//! - `decision`: a plan's limits for one decision, the verdict, the reservation, the headers'
//!   figures.
//! - [`clock`]: the injectable clock every decision reads.
//! - [`window`]: sliding windows in sub-buckets (pure arithmetic).
//! - [`quota`]: counting units in a period against a hard or soft limit (pure arithmetic).
//! - [`period`]: the period a quota counts in (billing period or calendar month in UTC).
//! - [`local`]: the in-process counters.
//! - [`redis`]: the shared counters, one script call per request of a plan with limits.
//! - [`metrics`]: decisions, refunds and overage as metrics.
//! - [`headers`]: `RateLimit-Policy`, `RateLimit`, `X-RateLimit-*` and `X-Quota-*`.
//! - `refund`: giving back a unit that must not count, where it was counted.
//! - `share`: adding to Redis the units counted in process without asking it.
//! - `reseed`: reading the ledger to rebuild a count, and seeding counts again later.
//! - `sweep`: the background sweep, sharing and re-seeding.

pub mod clock;
mod decision;
pub mod headers;
pub mod local;
pub mod metrics;
pub mod period;
pub mod quota;
pub mod redis;
mod refund;
mod reseed;
mod share;
mod sweep;
pub mod window;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tollgate_model::plan::Plan;

use crate::identity::index::Id;
use crate::metering::ledger::Ledger;
use clock::Clock;
use decision::window_ms;
pub use decision::{Decision, FallbackUnit, Policy, Reservation, Verdict, ceil_seconds};
use local::{LocalCounters, Sent, VIA_AWAITING};
pub use metrics::Counted;
use metrics::LimitMetrics;
use period::Period;
use redis::{HeldRefund, Late, LateAnswer, RedisCounters};
use reseed::read_ledger;
pub use reseed::{LEDGER_REST, SEED_TIMEOUT};
use reseed::{LocalReseed, Resting};
pub(crate) use reseed::{RESEED_CONCURRENCY, ReseedQueue};
pub use sweep::{CounterSweep, SHARE_INTERVAL, SWEEP_INTERVAL};

/// Where the counters live: in process, or in Redis with the in-process counters as fallback.
#[derive(Debug)]
pub struct Limiter {
    clock: Arc<dyn Clock>,
    local: Arc<LocalCounters>,
    redis: Option<RedisCounters>,
    metrics: LimitMetrics,
    /// The usage ledger, once the control plane is reachable (set at start).
    ledger: OnceLock<Arc<dyn Ledger>>,
    /// The same, as requests read it to rebuild a quota count ([`Resting`]).
    seed_ledger: OnceLock<Resting>,
    /// Held by a pass of [`Limiter::share_pending`].
    sharing: tokio::sync::Mutex<()>,
    /// Admission calls that timed out and are still followed ([`Limiter::follow_late`]).
    following: Arc<AtomicUsize>,
    /// Held by a pass of [`Limiter::reseed_due`].
    reseeding: tokio::sync::Mutex<()>,
    /// In-process counts seeded from the ledger, to seed once more.
    reseeds: ReseedQueue<LocalReseed>,
    /// Customers whose count is being read from the ledger ([`Limiter::seed_local`]): one read
    /// at a time per customer, when it last ended.
    seeding: Mutex<std::collections::HashMap<Id, SeedGate>>,
}

/// One customer's ledger reads: held while one runs; when the last one ended.
type SeedGate = Arc<tokio::sync::Mutex<Option<std::time::Instant>>>;

impl Limiter {
    /// Counters in this process, on `clock`, counted in `metrics`.
    pub fn local(clock: Arc<dyn Clock>, metrics: LimitMetrics) -> Self {
        Self {
            clock,
            local: Arc::default(),
            redis: None,
            metrics,
            ledger: OnceLock::new(),
            seed_ledger: OnceLock::new(),
            sharing: tokio::sync::Mutex::new(()),
            following: Arc::default(),
            reseeding: tokio::sync::Mutex::new(()),
            reseeds: ReseedQueue::default(),
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
                .decide(customer, &policy, period, units, now, rebuild)
                .await
            {
                Ok((mut shared, via)) => {
                    // Remembered, so counting in process after a failure starts from here.
                    let followed = self.local.follow(customer, &mut shared, via);
                    // Redis decided on the units this process had counted without it when the
                    // call left; those counted while it was on its way (other requests' calls
                    // failed meanwhile) may leave no room for it. Refused then.
                    if shared.verdict == Verdict::Admitted
                        && policy
                            .quota
                            .is_some_and(|q| q.hard && followed.used > q.limit)
                    {
                        shared.verdict = Verdict::QuotaExceeded;
                        shared.used = followed.used;
                        // Its unit in Redis is given back as the request settles (nothing is
                        // metered). The units counted here reach Redis' count: in a batch, or
                        // by their own call, which Redis runs or refuses in the end
                        // (`follow_late`).
                    } else if shared.verdict == Verdict::Admitted && followed.window_full {
                        // The same for a window: the requests this process admitted without
                        // Redis fill it. Redis' unit stays in its window; the quota's is given
                        // back as the request settles.
                        shared.verdict = Verdict::RateLimited;
                    }
                    decision = Some(shared);
                }
                Err(not_decided) => {
                    // A customer this process never counted in Redis starts from the ledger.
                    self.seed_local(customer, period).await;
                    // A call that timed out or broke may be counted by Redis all the same
                    // (documented); the others never ran, and their units are added to Redis
                    // once it answers.
                    let sent = not_decided.failure.may_have_run().then(|| Sent {
                        at_ms: self.clock.now_ms(),
                        via: match not_decided.late {
                            Some(_) => VIA_AWAITING,
                            None => not_decided.via,
                        },
                    });
                    let local = self
                        .local
                        .admit_fallback(customer, &policy, period, units, now, sent);
                    if let (Some(late), Some(sent)) = (not_decided.late, sent) {
                        self.follow_late(redis, customer, &local, units, late, sent);
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

    /// Follows to its end, in the background, the call of a request `decided` here because it
    /// timed out (`sent` as said), so that what Redis counted and what this process decided
    /// come to agree: a request refused here that Redis admitted all the same has its unit
    /// given back in Redis (the customer would otherwise pay for a request refused); for one
    /// admitted here, what Redis answered says whether its unit is in Redis' count now, or
    /// must be added to it ([`LocalCounters::late_answer`]).
    fn follow_late(
        &self,
        redis: &RedisCounters,
        customer: &Id,
        decided: &Decision,
        units: u64,
        late: Late<LateAnswer>,
        sent: Sent,
    ) {
        let local = Arc::clone(&self.local);
        let held = redis.refund_holder();
        let clock = Arc::clone(&self.clock);
        let customer = *customer;
        let admitted_here = decided.reservation;
        let period = decided.period;
        let at_ms = decided.at_ms;
        let metrics = self.metrics.clone();
        let following = Following::start(&self.following);
        tokio::spawn(async move {
            let _following = following;
            let answer = late.await;
            metrics.late_answer(answer, admitted_here.is_some());
            let give_back = match (admitted_here, answer) {
                // Admitted here: given back meanwhile (an upstream 5xx), Redis' unit is too.
                (Some(reservation), _) => {
                    local.late_answer(&customer, &reservation, sent, answer, clock.now_ms())
                }
                (None, LateAnswer::Admitted { overage }) => {
                    tracing::debug!(
                        "redis admitted a request refused here after its call timed out; its \
                         unit is given back there"
                    );
                    Some(overage)
                }
                (None, _) => None,
            };
            if let Some(overage) = give_back {
                let counted = Reservation {
                    period,
                    at_ms,
                    units,
                    overage,
                    counted: Counted::Redis,
                    fallback: None,
                };
                held.hold(HeldRefund::new(customer, counted));
            }
        });
    }

    /// The last [`share_pending`](Self::share_pending) of a draining gateway: once the calls
    /// still followed have ended, for at most 1 s (the units their answers put in batches go
    /// too).
    pub async fn share_last(&self) {
        let waited = std::time::Instant::now();
        while self.following.load(Ordering::Acquire) > 0
            && waited.elapsed() < Duration::from_secs(1)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.share_pending().await;
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

    /// Seeds again from the ledger the quota counts this process seeded from it a while ago,
    /// in process and in Redis ([`RedisCounters::reseed_due`]): the events that were still in a
    /// spool then are in the ledger now. Run in the background (one pass at a time), every
    /// [`SHARE_INTERVAL`]; a read of the ledger that fails is tried again, up to
    /// `RESEED_ATTEMPTS` times in all.
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

/// One admission call followed to its end, counted in [`Limiter::following`] while it lasts
/// (also when its task is dropped unfinished).
struct Following(Arc<AtomicUsize>);

impl Following {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use tollgate_model::plan::{PlanStatus, Quota};

    use std::sync::atomic::Ordering;

    use tollgate_model::plan::RateLimit;

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
