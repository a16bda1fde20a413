//! Quota arithmetic: units counted in a period, against a hard or soft limit.

use super::period::Period;

/// A customer's count in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCount {
    /// The period counted.
    pub period: Period,
    /// Units reserved in it, overage included.
    pub used: u64,
    /// Of them, units past a soft quota.
    pub overage: u64,
    /// Whether what the ledger holds for the period was added (or the count came from Redis).
    pub seeded: bool,
    /// What was added from the ledger, when this count was seeded from it (not from Redis).
    pub ledger: Option<LedgerRead>,
    /// Of `used` and `overage`, the units counted since that seed at or after its `until_ms`:
    /// those a second read of the same events (the ledger's before `until_ms`) cannot hold.
    pub since_seed: (u64, u64),
}

/// The ledger's count of a period's events before `until_ms`, as read to seed a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerRead {
    /// Unix ms: the events read are those before then.
    pub until_ms: i64,
    /// Units, overage included.
    pub used: u64,
    /// Of them, overage.
    pub overage: u64,
}

/// A plan's quota, as the hot path applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimit {
    /// Units per period.
    pub limit: u64,
    /// `true`: refuse past the limit; `false`: admit and count the excess as overage.
    pub hard: bool,
}

/// The outcome of reserving units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// Of the units reserved, those past a soft quota.
    pub overage: u64,
}

impl QuotaCount {
    /// A count of nothing yet in `period`.
    pub fn new(period: Period) -> Self {
        Self {
            period,
            used: 0,
            overage: 0,
            seeded: false,
            ledger: None,
            since_seed: (0, 0),
        }
    }

    /// Moves to `period` when it is a new one, starting again from nothing.
    pub fn roll(&mut self, period: Period) {
        if self.period != period {
            *self = Self::new(period);
        }
    }

    /// Whether `units` more fit: always for a soft or absent quota.
    pub fn fits(&self, quota: Option<QuotaLimit>, units: u64) -> bool {
        match quota {
            Some(QuotaLimit { limit, hard: true }) => self.used + units <= limit,
            _ => true,
        }
    }

    /// Counts `units` decided at `at_ms` (the caller checked [`fits`](Self::fits)).
    pub fn reserve(&mut self, quota: Option<QuotaLimit>, units: u64, at_ms: i64) -> Reserved {
        let overage = match quota {
            Some(QuotaLimit { limit, hard: false }) => {
                (self.used + units).saturating_sub(limit.max(self.used))
            }
            _ => 0,
        };
        self.used += units;
        self.overage += overage;
        if self.after_seed(at_ms) {
            self.since_seed.0 += units;
            self.since_seed.1 += overage;
        }
        Reserved { overage }
    }

    /// Gives back a reservation of `units` (`overage` of them overage) made in `period` at
    /// `at_ms`; one made in an earlier period is not taken from this one.
    pub fn refund(&mut self, period: Period, units: u64, overage: u64, at_ms: i64) {
        if self.period == period {
            self.used = self.used.saturating_sub(units);
            self.overage = self.overage.saturating_sub(overage);
            if self.after_seed(at_ms) {
                self.since_seed.0 = self.since_seed.0.saturating_sub(units);
                self.since_seed.1 = self.since_seed.1.saturating_sub(overage);
            }
        }
    }

    /// Whether a unit decided at `at_ms` is one the ledger's read that seeded this count cannot
    /// hold, however late it is read.
    fn after_seed(&self, at_ms: i64) -> bool {
        self.ledger.is_some_and(|read| at_ms >= read.until_ms)
    }

    /// Raises the count to `read`, the ledger read again for the same events as the seed's,
    /// plus what was counted since that the read cannot hold: the events that were still in a
    /// spool at the seed count now. The units added.
    pub fn reseed(&mut self, read: LedgerRead) -> u64 {
        let Some(seed) = &mut self.ledger else {
            return 0;
        };
        if seed.until_ms != read.until_ms {
            return 0;
        }
        let used = read.used + self.since_seed.0;
        let added = used.saturating_sub(self.used);
        self.used = self.used.max(used);
        self.overage = self.overage.max(read.overage + self.since_seed.1);
        seed.used = seed.used.max(read.used);
        seed.overage = seed.overage.max(read.overage);
        added
    }

    /// Units left before the limit (never negative).
    pub fn remaining(&self, quota: QuotaLimit) -> u64 {
        quota.limit.saturating_sub(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Period = Period {
        start_ms: 0,
        end_ms: 1_000,
    };

    #[test]
    fn a_hard_quota_admits_exactly_its_limit() {
        let limit = QuotaLimit {
            limit: 3,
            hard: true,
        };
        let mut count = QuotaCount::new(PERIOD);
        let mut admitted = 0;
        for _ in 0..5 {
            if count.fits(Some(limit), 1) {
                count.reserve(Some(limit), 1, 0);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        assert_eq!(count.remaining(limit), 0);
    }

    #[test]
    fn a_soft_quota_admits_everything_and_counts_the_excess_as_overage() {
        let quota = Some(QuotaLimit {
            limit: 2,
            hard: false,
        });
        let mut count = QuotaCount::new(PERIOD);
        let overages: Vec<u64> = (0..4)
            .map(|_| {
                assert!(count.fits(quota, 1));
                count.reserve(quota, 1, 0).overage
            })
            .collect();
        assert_eq!(overages, [0, 0, 1, 1]);
        assert_eq!((count.used, count.overage), (4, 2));
        // A unit of 3 straddling the limit is partly overage.
        let mut count = QuotaCount::new(PERIOD);
        count.reserve(quota, 1, 0);
        assert_eq!(count.reserve(quota, 3, 0).overage, 2);
    }

    #[test]
    fn a_refund_gives_back_only_in_the_period_it_was_reserved() {
        let quota = Some(QuotaLimit {
            limit: 10,
            hard: false,
        });
        let mut count = QuotaCount::new(PERIOD);
        count.reserve(quota, 1, 0);
        count.reserve(quota, 1, 0);
        count.refund(PERIOD, 1, 0, 0);
        assert_eq!(count.used, 1);
        let next = Period {
            start_ms: 1_000,
            end_ms: 2_000,
        };
        count.roll(next);
        assert_eq!(count.used, 0);
        count.reserve(quota, 1, 0);
        count.refund(PERIOD, 1, 0, 0);
        assert_eq!(count.used, 1);
    }
}
