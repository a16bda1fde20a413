//! What a decision is made of and comes to: a plan's limits borrowed for it, the verdict, the
//! reservation a request settles, and what the headers report.

use tollgate_model::plan::{Plan, RateLimit};

use super::metrics::Counted;
use super::period::Period;
use super::quota::QuotaLimit;
use super::window::WindowState;

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

pub(super) fn window_ms(seconds: u64) -> i64 {
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
    /// Its call timed out and is followed to its end, named by this token: what Redis answers
    /// says where the unit is ([`LocalCounters::late_answer`]), and so where a refund goes.
    ///
    /// [`LocalCounters::late_answer`]: super::local::LocalCounters::late_answer
    Awaiting(u128),
    /// Into the batch of this token, to be added to Redis.
    Batch(u128),
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
    /// Counted in Redis: the quota count's version when it decided (`v`, raised by every call
    /// that changes the count: an admission, a batch of units counted in process added, a
    /// rebuild's raise, a seed from the ledger, a refund). An answer of a lower version than one seen already is older than it,
    /// and a batch added at a higher version is not in its `used`.
    pub count_version: Option<i64>,
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
