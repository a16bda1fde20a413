//! The period a quota counts in: the customer's billing period, else the calendar month in UTC.
//! One rule, which the gateway enforces and the control plane's usage view shows.

use chrono::{DateTime, Datelike, NaiveDate};

pub use crate::feed::PeriodMs as Period;

impl Period {
    /// Whether `at_ms` is in it.
    pub fn contains(&self, at_ms: i64) -> bool {
        self.start_ms <= at_ms && at_ms < self.end_ms
    }

    /// Its length in whole seconds (at least 1).
    pub fn seconds(&self) -> i64 {
        ((self.end_ms - self.start_ms) / 1000).max(1)
    }
}

/// The period that `now_ms` falls in for a customer with `billing` (from its subscription).
///
/// A billing period that has ended without a new one arriving (billing has not caught up yet)
/// goes on in periods of the same length, so the customer's count still resets on time; one that
/// has not started, or none, gives the calendar month.
pub fn current(billing: Option<Period>, now_ms: i64) -> Period {
    match billing {
        Some(Period { start_ms, end_ms }) if start_ms < end_ms && start_ms <= now_ms => {
            let length = end_ms - start_ms;
            let skipped = (now_ms - start_ms) / length;
            let start_ms = start_ms + skipped * length;
            Period {
                start_ms,
                end_ms: start_ms + length,
            }
        }
        _ => calendar_month(now_ms),
    }
}

/// The calendar month in UTC that `now_ms` falls in.
pub fn calendar_month(now_ms: i64) -> Period {
    let Some(now) = DateTime::from_timestamp_millis(now_ms) else {
        // Out of chrono's range (hundreds of thousands of years): one period for all of it.
        return Period {
            start_ms: i64::MIN,
            end_ms: i64::MAX,
        };
    };
    let (year, month) = (now.year(), now.month());
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    Period {
        start_ms: month_start_ms(year, month),
        end_ms: month_start_ms(next_year, next_month),
    }
}

fn month_start_ms(year: i32, month: u32) -> i64 {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map_or(i64::MAX, |time| time.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn the_calendar_month_runs_from_its_first_midnight_to_the_next_months() {
        let period = calendar_month(ms("2026-11-26T11:21:19Z"));
        assert_eq!(period.start_ms, ms("2026-11-01T00:00:00Z"));
        assert_eq!(period.end_ms, ms("2026-12-01T00:00:00Z"));
        assert_eq!(period.seconds(), 30 * 86_400);
    }

    #[test]
    fn december_ends_in_january_and_february_has_its_leap_day() {
        let december = calendar_month(ms("2026-12-31T23:59:59.999Z"));
        assert_eq!(december.end_ms, ms("2027-01-01T00:00:00Z"));
        let february = calendar_month(ms("2028-02-29T12:00:00Z"));
        assert_eq!(february.seconds(), 29 * 86_400);
    }

    #[test]
    fn the_month_boundary_belongs_to_the_new_month() {
        let boundary = ms("2026-12-01T00:00:00Z");
        assert_eq!(calendar_month(boundary).start_ms, boundary);
        assert_eq!(calendar_month(boundary - 1).end_ms, boundary);
    }

    #[test]
    fn a_billing_period_that_covers_now_is_the_period() {
        let billing = Period {
            start_ms: ms("2026-11-15T08:30:00Z"),
            end_ms: ms("2026-12-15T08:30:00Z"),
        };
        let period = current(Some(billing), ms("2026-11-26T00:00:00Z"));
        assert_eq!(
            (period.start_ms, period.end_ms),
            (billing.start_ms, billing.end_ms)
        );
        assert!(period.contains(billing.start_ms));
        assert!(!period.contains(billing.end_ms));
    }

    #[test]
    fn an_ended_billing_period_goes_on_in_periods_of_its_length() {
        let billing = Period {
            start_ms: 1_000,
            end_ms: 2_000,
        };
        assert_eq!(
            current(Some(billing), 2_000),
            Period {
                start_ms: 2_000,
                end_ms: 3_000
            }
        );
        assert_eq!(current(Some(billing), 5_500).start_ms, 5_000);
    }

    #[test]
    fn a_billing_period_not_yet_started_gives_the_calendar_month() {
        let now = ms("2026-11-26T00:00:00Z");
        let billing = Period {
            start_ms: now + 1,
            end_ms: now + 1_000,
        };
        assert_eq!(current(Some(billing), now), calendar_month(now));
        assert_eq!(current(None, now), calendar_month(now));
    }
}
