//! UTC calendar arithmetic for the usage ledger: the day an event is rolled up under, and the
//! period a quota counts in.
//!
//! Three questions need a calendar (which UTC day holds this instant, when does its month start
//! and end, is `2026-02-30` a date), so instead of a date crate this module carries Howard
//! Hinnant's `days_from_civil` / `civil_from_days`: exact for the proleptic Gregorian calendar,
//! a few integer operations each, and unit-tested here against known dates.
//!
//! [`current_period`] is the rule quotas follow (DESIGN, "one ledger"): the customer's billing
//! period when it covers the instant, else the calendar month in UTC. Gateways that rebuild a
//! quota counter call the same function, so what is enforced and what is shown agree.

use tollgate_model::feed::PeriodMs;

/// Milliseconds in a day.
pub const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of the date `year-month-day` (month 1 to 12, day 1 to 31).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1 to 12, day 1 to 31) that is `days` days after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    // Both are small and non-negative by construction: day 1 to 31, month 1 to 12.
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400;
    (if month <= 2 { year + 1 } else { year }, month, day)
}

/// The UTC day holding the instant `ms`, as days since 1970-01-01.
pub fn day_number(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_DAY)
}

/// `YYYY-MM-DD` of a day number.
pub fn format_day(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `YYYY-MM-DD` of the UTC day holding the instant `ms`: the roll-up's day of an event.
pub fn day_of(ms: i64) -> String {
    format_day(day_number(ms))
}

/// The day number of a `YYYY-MM-DD` date, `None` unless it is exactly that form and a real
/// date (`2026-02-29` is not).
pub fn parse_day(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes[range.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| text[range].parse::<u32>().ok())
            .flatten()
    };
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if !(1..=12).contains(&month) || day == 0 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    // A day past the month's end lands in the next month: not a date.
    (civil_from_days(days) == (i64::from(year), month, day)).then_some(days)
}

/// Unix milliseconds of an RFC 3339 date-time (section 5.6): `2027-01-31T00:00:00Z`, with
/// fractional seconds (to the millisecond, further digits dropped), any offset
/// (`2027-01-31T01:00:00+01:00`), and `t` and `z` in either case. `None` for anything else: no
/// offset, a space for `T`, a date or time that does not exist, or an instant before 1970.
/// A leap second (`:60`, at the end of a UTC day only) is taken as the last millisecond of its
/// minute.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |at: usize, len: usize| -> Option<i64> {
        let digits = bytes.get(at..at + len)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| std::str::from_utf8(digits).ok()?.parse().ok())
            .flatten()
    };
    let separated = |at: usize, what: u8| bytes.get(at) == Some(&what);
    let shaped = separated(4, b'-')
        && separated(7, b'-')
        && matches!(bytes.get(10), Some(b'T' | b't'))
        && separated(13, b':')
        && separated(16, b':');
    if !shaped {
        return None;
    }
    let days = parse_day(text.get(..10)?)?;
    let (hour, minute, second) = (number(11, 2)?, number(14, 2)?, number(17, 2)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if separated(at, b'.') {
        at += 1;
        let digits = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        for (i, digit) in bytes[at..at + digits.min(3)].iter().enumerate() {
            millis += i64::from(digit - b'0') * [100, 10, 1][i];
        }
        at += digits;
    }
    let offset_minutes = match bytes.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if bytes.len() == at + 6 && separated(at + 3, b':') => {
            let (hours, minutes) = (number(at + 1, 2)?, number(at + 4, 2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    let utc_minute = (hour * 60 + minute - offset_minutes).rem_euclid(24 * 60);
    if second == 60 && utc_minute != 23 * 60 + 59 {
        // Leap seconds are inserted at the end of a UTC day only.
        return None;
    }
    let (second, millis) = if second == 60 {
        (59, 999)
    } else {
        (second, millis)
    };
    let ms = ((days * 24 + hour) * 60 + minute - offset_minutes) * 60_000 + second * 1000 + millis;
    (ms >= 0).then_some(ms)
}

/// The calendar month in UTC holding the instant `ms`: its first millisecond (included) to the
/// next month's first (excluded).
pub fn month_containing(ms: i64) -> PeriodMs {
    let (year, month, _) = civil_from_days(day_number(ms));
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    PeriodMs {
        start_ms: days_from_civil(year, month, 1) * MS_PER_DAY,
        end_ms: days_from_civil(next_year, next_month, 1) * MS_PER_DAY,
    }
}

/// The period a quota counts in at the instant `now_ms`, by the rule the gateways enforce
/// ([`tollgate_model::period::current`]): the customer's billing period when it covers `now_ms`,
/// periods of its length after it ends without a new one, else the calendar month in UTC.
pub fn current_period(billing_period: Option<PeriodMs>, now_ms: i64) -> PeriodMs {
    tollgate_model::period::current(billing_period, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_known_dates_both_ways() {
        for (days, date) in [
            (0, (1970, 1, 1)),
            (-1, (1969, 12, 31)),
            (11_016, (2000, 2, 29)),
            (19_782, (2024, 2, 29)),
            (20_513, (2026, 3, 1)),
            (2_932_896, (9999, 12, 31)),
        ] {
            assert_eq!(civil_from_days(days), date);
            assert_eq!(days_from_civil(date.0, date.1, date.2), days);
        }
    }

    #[test]
    fn rfc3339_date_times_are_read_with_any_offset_and_nothing_else_is() {
        let new_year_2027 = 1_798_761_600_000;
        for text in [
            "2027-01-01T00:00:00Z",
            "2027-01-01t00:00:00z",
            "2027-01-01T00:00:00+00:00",
            "2027-01-01T00:00:00-00:00",
            "2027-01-01T05:30:00+05:30",
            "2026-12-31T19:00:00-05:00",
            "2027-01-01T00:00:00.000Z",
        ] {
            assert_eq!(parse_rfc3339(text), Some(new_year_2027), "{text}");
        }
        assert_eq!(
            parse_rfc3339("2027-01-01T00:00:00.25Z"),
            Some(new_year_2027 + 250)
        );
        assert_eq!(
            parse_rfc3339("2027-01-01T00:00:00.123456Z"),
            Some(new_year_2027 + 123)
        );
        assert_eq!(
            parse_rfc3339("2026-12-31T23:59:60Z"),
            Some(new_year_2027 - 1)
        );
        assert_eq!(
            parse_rfc3339("2027-01-01T00:59:60+01:00"),
            Some(new_year_2027 - 1)
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        for text in [
            "2027-01-01T00:00:00",
            "2027-01-01 00:00:00Z",
            "2027-01-01",
            "2027-02-29T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:60:00Z",
            "2027-06-15T12:34:60Z",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00+0100",
            "2027-01-01T00:00:00+24:00",
            "2027-01-01T00:00:00Z ",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "2027-1-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }

    #[test]
    fn an_event_counts_in_its_utc_day() {
        // 2026-11-30T23:59:59.999Z and the millisecond after.
        assert_eq!(day_of(1_796_083_199_999), "2026-11-30");
        assert_eq!(day_of(1_796_083_200_000), "2026-12-01");
        assert_eq!(day_of(0), "1970-01-01");
    }

    #[test]
    fn parses_only_real_dates_in_the_exact_form() {
        assert_eq!(parse_day("2026-12-01"), Some(20_788));
        assert_eq!(parse_day("2024-02-29"), Some(19_782));
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-01-00",
            "2026-1-01",
            "2026-01-01T00:00:00Z",
            "+026-01-01",
            "2026/01/01",
            "",
            "２０２６-01-01",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_month_runs_from_its_first_millisecond_to_the_next_months() {
        // 2026-02-14T12:00:00Z: February 2026 has 28 days.
        assert_eq!(
            month_containing(1_771_070_400_000),
            PeriodMs {
                start_ms: 1_769_904_000_000,
                end_ms: 1_772_323_200_000
            }
        );
        // December runs into January of the next year.
        let december = month_containing(1_796_083_200_000);
        assert_eq!(
            (day_of(december.start_ms), day_of(december.end_ms)),
            ("2026-12-01".to_owned(), "2027-01-01".to_owned())
        );
        // The first millisecond of a month is in it; the last of the previous one is not.
        assert_eq!(month_containing(december.start_ms), december);
        assert_ne!(month_containing(december.start_ms - 1), december);
    }

    #[test]
    fn the_billing_period_counts_and_then_goes_on_in_periods_of_its_length() {
        let period = PeriodMs {
            start_ms: 1_000,
            end_ms: 2_000,
        };
        assert_eq!(current_period(Some(period), 1_000), period);
        assert_eq!(current_period(Some(period), 1_999), period);
        // Ended without a new one (billing is late): the next period of the same length.
        assert_eq!(
            current_period(Some(period), 2_000),
            PeriodMs {
                start_ms: 2_000,
                end_ms: 3_000
            }
        );
        assert_eq!(current_period(Some(period), 999), month_containing(999));
        assert_eq!(current_period(None, 1_500), month_containing(1_500));
    }
}
