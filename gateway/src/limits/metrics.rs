//! The metrics of limit decisions, resolved once so a decision costs one atomic add.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::Verdict;
use super::redis::LateAnswer;
use crate::metrics::{
    LIMIT_CUSTOMERS_COUNTED, LIMIT_DECISIONS_TOTAL, Metrics, QUOTA_FALLBACK_UNITS_TOTAL,
    QUOTA_OVERAGE_UNITS_TOTAL, QUOTA_REFUNDS_TOTAL, REDIS_LATE_ANSWERS_TOTAL,
};

/// What became of quota units counted in process without asking Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackUnits {
    /// Added to Redis' count once it answered.
    Shared = 0,
    /// Left to a count Redis rebuilt from the ledger since they were counted.
    Ledger = 1,
}

/// Where a decision was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// In this process, as configured.
    Local,
    /// In Redis.
    Redis,
    /// In this process because Redis could not be reached in time.
    Fallback,
    /// In this process, for a plan with neither rate limits nor a quota (nothing to decide):
    /// its units are added to the customer's count in Redis in batches.
    Batched,
}

/// Spelled as the problem types of the refusals (words joined by hyphens, as every label here).
const RESULTS: [&str; 3] = ["allowed", "rate-limited", "quota-exceeded"];
const COUNTED: [&str; 4] = ["local", "redis", "fallback", "batched"];

/// Handles of the limit metrics.
#[derive(Debug, Clone)]
pub struct LimitMetrics {
    decisions: Vec<IntCounter>,
    refunds: IntCounter,
    overage: IntCounter,
    /// Fallback units by [`FallbackUnits`].
    fallback_units: [IntCounter; 2],
    /// Customers with counters in this process, after the last sweep.
    customers: IntGauge,
    /// Late answers: counted, not counted, unknown; each for admitted, then refused here.
    late_answers: [IntCounter; 6],
}

impl LimitMetrics {
    /// Registers the limit metrics in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let decisions = IntCounterVec::new(
            Opts::new(
                LIMIT_DECISIONS_TOTAL,
                "Rate-limit and quota decisions, by result and where they were counted.",
            ),
            &["result", "counted"],
        )?;
        let refunds = IntCounter::new(
            QUOTA_REFUNDS_TOTAL,
            "Quota units given back because the request must not count.",
        )?;
        let overage = IntCounter::new(
            QUOTA_OVERAGE_UNITS_TOTAL,
            "Units admitted past a soft quota.",
        )?;
        let fallback_units = IntCounterVec::new(
            Opts::new(
                QUOTA_FALLBACK_UNITS_TOTAL,
                "Quota units counted in process without asking Redis: added to Redis' count once \
                 it answered (shared), or left to a count Redis rebuilt from the ledger since \
                 (ledger).",
            ),
            &["outcome"],
        )?;
        metrics.register(Box::new(fallback_units.clone()))?;
        let customers = IntGauge::new(
            LIMIT_CUSTOMERS_COUNTED,
            "Customers whose rate limits or quota this process counts, as of the last sweep \
             (every minute: customers idle in every window and past their quota period go).",
        )?;
        metrics.register(Box::new(customers.clone()))?;
        let late_answers = IntCounterVec::new(
            Opts::new(
                REDIS_LATE_ANSWERS_TOTAL,
                "Admission calls to Redis that timed out, by what Redis answered them in the end \
                 (counted, not_counted, unknown: the connection gave up) and what the gateway \
                 had decided in process meanwhile (admitted, refused).",
            ),
            &["redis", "gateway"],
        )?;
        metrics.register(Box::new(late_answers.clone()))?;
        let late = |redis: &str, gateway: &str| late_answers.with_label_values(&[redis, gateway]);
        metrics.register(Box::new(decisions.clone()))?;
        metrics.register(Box::new(refunds.clone()))?;
        metrics.register(Box::new(overage.clone()))?;
        Ok(Self {
            decisions: RESULTS
                .iter()
                .flat_map(|result| {
                    COUNTED
                        .iter()
                        .map(|counted| decisions.with_label_values(&[result, counted]))
                        .collect::<Vec<_>>()
                })
                .collect(),
            refunds,
            overage,
            fallback_units: [
                fallback_units.with_label_values(&["shared"]),
                fallback_units.with_label_values(&["ledger"]),
            ],
            customers,
            late_answers: [
                late("counted", "admitted"),
                late("counted", "refused"),
                late("not_counted", "admitted"),
                late("not_counted", "refused"),
                late("unknown", "admitted"),
                late("unknown", "refused"),
            ],
        })
    }

    /// Counts what Redis answered in the end a call that had timed out, and whether the request
    /// was `admitted` in process meanwhile.
    pub fn late_answer(&self, answer: LateAnswer, admitted: bool) {
        let redis = match answer.counted() {
            Some(true) => 0,
            Some(false) => 1,
            None => 2,
        };
        self.late_answers[redis * 2 + usize::from(!admitted)].inc();
    }

    /// Counts a decision.
    pub fn decision(&self, verdict: Verdict, counted: Counted, overage: u64) {
        let result = match verdict {
            Verdict::Admitted => 0,
            Verdict::RateLimited => 1,
            Verdict::QuotaExceeded => 2,
        };
        let counted = match counted {
            Counted::Local => 0,
            Counted::Redis => 1,
            Counted::Fallback => 2,
            Counted::Batched => 3,
        };
        self.decisions[result * COUNTED.len() + counted].inc();
        self.overage.inc_by(overage);
    }

    /// Counts quota units counted in process, by what became of them.
    pub fn fallback_units(&self, units: u64, outcome: FallbackUnits) {
        self.fallback_units[outcome as usize].inc_by(units);
    }

    /// Sets how many customers the in-process counters hold.
    pub fn customers_counted(&self, customers: usize) {
        self.customers
            .set(i64::try_from(customers).unwrap_or(i64::MAX));
    }

    /// Counts a refund.
    pub fn refund(&self) {
        self.refunds.inc();
    }
}
