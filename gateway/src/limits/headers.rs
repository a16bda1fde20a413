//! The limit headers of a metered response.
//!
//! The IETF httpapi fields name one policy per window (`"rate-60s"`) and one for the quota
//! (`"quota"`, its window the period's length), and give each one's remaining units and seconds to
//! reset:
//!
//! ```text
//! RateLimit-Policy: "rate-1s";q=10;w=1, "rate-60s";q=500;w=60, "quota";q=10000;w=2592000
//! RateLimit: "rate-1s";r=9;t=2, "rate-60s";r=499;t=63, "quota";r=9999;t=1774800
//! ```
//!
//! The older fields describe the limit closest to refusing, a window or a hard quota (fewest
//! units left, then longest wait): `RateLimit-Limit`, `-Remaining` and `-Reset` of the earlier
//! IETF drafts and `X-RateLimit-*`, with the same values; `X-Quota-*` describe the quota. Every
//! `*-Reset` is in seconds from now, rounded up.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::Result;
use pingora::http::ResponseHeader;

use super::{Decision, ceil_seconds};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: &str = "RateLimit-Policy";
/// `RateLimit`.
pub const RATELIMIT: &str = "RateLimit";
/// `RateLimit-Limit`, of the IETF drafts before the `RateLimit` list (draft 03, as Kong and
/// client libraries read it).
pub const RATELIMIT_LIMIT: &str = "RateLimit-Limit";
/// `RateLimit-Remaining`, of the same drafts.
pub const RATELIMIT_REMAINING: &str = "RateLimit-Remaining";
/// `RateLimit-Reset`, of the same drafts.
pub const RATELIMIT_RESET: &str = "RateLimit-Reset";
/// `X-RateLimit-Limit`.
pub const X_RATELIMIT_LIMIT: &str = "X-RateLimit-Limit";
/// `X-RateLimit-Remaining`.
pub const X_RATELIMIT_REMAINING: &str = "X-RateLimit-Remaining";
/// `X-RateLimit-Reset`.
pub const X_RATELIMIT_RESET: &str = "X-RateLimit-Reset";
/// `X-Quota-Limit`.
pub const X_QUOTA_LIMIT: &str = "X-Quota-Limit";
/// `X-Quota-Remaining`.
pub const X_QUOTA_REMAINING: &str = "X-Quota-Remaining";
/// `X-Quota-Reset`.
pub const X_QUOTA_RESET: &str = "X-Quota-Reset";
/// Every limit header, in the order they are written.
pub const NAMES: [&str; 11] = [
    RATELIMIT_POLICY,
    RATELIMIT,
    RATELIMIT_LIMIT,
    RATELIMIT_REMAINING,
    RATELIMIT_RESET,
    X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING,
    X_RATELIMIT_RESET,
    X_QUOTA_LIMIT,
    X_QUOTA_REMAINING,
    X_QUOTA_RESET,
];

/// Appends one IETF list item to `list`: the policy's name (`"rate-<seconds>s"` for a window,
/// `"quota"` without one) and two parameters.
fn item(list: &mut Vec<u8>, window_seconds: Option<u64>, parameters: [(&str, u64); 2]) {
    let mut number = itoa::Buffer::new();
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    match window_seconds {
        Some(seconds) => {
            list.extend_from_slice(b"\"rate-");
            list.extend_from_slice(number.format(seconds).as_bytes());
            list.extend_from_slice(b"s\"");
        }
        None => list.extend_from_slice(b"\"quota\""),
    }
    for (key, value) in parameters {
        list.push(b';');
        list.extend_from_slice(key.as_bytes());
        list.push(b'=');
        list.extend_from_slice(number.format(value).as_bytes());
    }
}

/// Every limit header of `decision`; `given_back` units of the request are to be refunded (its
/// response will not count), so the quota is reported as the settlement will leave it.
pub fn values(decision: &Decision, given_back: u64) -> Vec<(&'static str, HeaderValue)> {
    let mut policy = Vec::with_capacity(96);
    let mut state = Vec::with_capacity(96);
    for window in &decision.windows {
        let seconds = u64::try_from(window.window_ms / 1000).unwrap_or(0);
        let reset = ceil_seconds(window.reset_ms);
        item(
            &mut policy,
            Some(seconds),
            [("q", window.limit), ("w", seconds)],
        );
        item(
            &mut state,
            Some(seconds),
            [("r", window.remaining), ("t", reset)],
        );
    }
    let mut values = Vec::with_capacity(8);
    let quota_reset = ceil_seconds(decision.period.end_ms.saturating_sub(decision.at_ms));
    let quota_remaining = decision.quota.map(|quota| {
        if quota.hard && decision.verdict == super::Verdict::QuotaExceeded {
            // Refused for it: none left, whatever the count says (Redis refuses on its count
            // plus units a gateway holds that it does not have yet).
            return 0;
        }
        quota
            .limit
            .saturating_sub(decision.used.saturating_sub(given_back))
    });
    if let (Some(quota), Some(remaining)) = (decision.quota, quota_remaining) {
        let period = u64::try_from(decision.period.seconds()).unwrap_or(0);
        item(&mut policy, None, [("q", quota.limit), ("w", period)]);
        item(&mut state, None, [("r", remaining), ("t", quota_reset)]);
    }
    if policy.is_empty() {
        return values;
    }
    // Digits, names and separators only: always valid header values.
    for (name, list) in [(RATELIMIT_POLICY, policy), (RATELIMIT, state)] {
        if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(list)) {
            values.push((name, value));
        }
    }
    // A soft quota refuses nothing: not a limit to tell clients to wait for.
    let hard_quota = match (decision.quota, quota_remaining) {
        (Some(quota), Some(remaining)) if quota.hard => Some((quota.limit, remaining, quota_reset)),
        _ => None,
    };
    let limiting = decision
        .windows
        .iter()
        .map(|w| (w.limit, w.remaining, ceil_seconds(w.reset_ms)))
        .chain(hard_quota)
        .min_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
    if let Some((limit, remaining, reset)) = limiting {
        values.push((RATELIMIT_LIMIT, limit.into()));
        values.push((RATELIMIT_REMAINING, remaining.into()));
        values.push((RATELIMIT_RESET, reset.into()));
        values.push((X_RATELIMIT_LIMIT, limit.into()));
        values.push((X_RATELIMIT_REMAINING, remaining.into()));
        values.push((X_RATELIMIT_RESET, reset.into()));
    }
    if let (Some(quota), Some(remaining)) = (decision.quota, quota_remaining) {
        values.push((X_QUOTA_LIMIT, quota.limit.into()));
        values.push((X_QUOTA_REMAINING, remaining.into()));
        values.push((X_QUOTA_RESET, quota_reset.into()));
    }
    values
}

/// Whether `name` (lower case) is a rate-limit or quota header of one of the usual spellings:
/// the IETF fields of any draft (`RateLimit`, `RateLimit-Policy`, `RateLimit-Remaining`, ...),
/// `X-RateLimit-*` (with Kong's `X-RateLimit-Limit-Minute` and the like) and `X-Quota-*`.
fn is_limit_header(name: &str) -> bool {
    name.starts_with("ratelimit") || name.starts_with("x-ratelimit") || name.starts_with("x-quota-")
}

/// Sets every limit header of `decision` on a response, after removing every limit header the
/// response had (an upstream's own limits, which are not the customer's plan): a client reads
/// the gateway's limits only, and none where the plan has no figure (say `X-Quota-*` for a plan
/// without a quota). `given_back` as in [`values`].
pub fn write(header: &mut ResponseHeader, decision: &Decision, given_back: u64) -> Result<()> {
    // One pass over the names; the common case finds none and allocates nothing.
    let theirs: Vec<HeaderName> = header
        .headers
        .keys()
        .filter(|name| is_limit_header(name.as_str()))
        .cloned()
        .collect();
    for name in &theirs {
        header.remove_header(name);
    }
    for (name, value) in values(decision, given_back) {
        // As written here on the wire (Pingora keeps a header's case), without copying the name.
        header.insert_header(Bytes::from_static(name.as_bytes()), value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Verdict;
    use crate::limits::period::Period;
    use crate::limits::quota::QuotaLimit;
    use crate::limits::window::WindowState;

    fn decision() -> Decision {
        Decision {
            verdict: Verdict::Admitted,
            windows: vec![
                WindowState {
                    limit: 10,
                    window_ms: 1_000,
                    remaining: 9,
                    reset_ms: 1_020,
                },
                WindowState {
                    limit: 500,
                    window_ms: 60_000,
                    remaining: 3,
                    reset_ms: 41_500,
                },
            ],
            quota: Some(QuotaLimit {
                limit: 10_000,
                hard: true,
            }),
            period: Period {
                start_ms: 0,
                end_ms: 2_592_000_000,
            },
            at_ms: 2_592_000_000 - 86_400_500,
            used: 1_234,
            reservation: None,
            counted: crate::limits::Counted::Local,
            generation: None,
            counted_in: None,
            count_version: None,
        }
    }

    #[test]
    fn every_window_and_the_quota_is_a_named_policy() {
        let values = values(&decision(), 0);
        let get = |name: &str| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap())
        };
        assert_eq!(
            get(RATELIMIT_POLICY),
            Some("\"rate-1s\";q=10;w=1, \"rate-60s\";q=500;w=60, \"quota\";q=10000;w=2592000")
        );
        assert_eq!(
            get(RATELIMIT),
            Some("\"rate-1s\";r=9;t=2, \"rate-60s\";r=3;t=42, \"quota\";r=8766;t=86401")
        );
        // The minute window has the fewest units left, in both older spellings.
        assert_eq!(get(RATELIMIT_LIMIT), Some("500"));
        assert_eq!(get(RATELIMIT_REMAINING), Some("3"));
        assert_eq!(get(RATELIMIT_RESET), Some("42"));
        assert_eq!(get(X_RATELIMIT_LIMIT), Some("500"));
        assert_eq!(get(X_RATELIMIT_REMAINING), Some("3"));
        assert_eq!(get(X_RATELIMIT_RESET), Some("42"));
        assert_eq!(get(X_QUOTA_LIMIT), Some("10000"));
        assert_eq!(get(X_QUOTA_REMAINING), Some("8766"));
        assert_eq!(get(X_QUOTA_RESET), Some("86401"));
    }

    #[test]
    fn a_response_that_will_not_count_reports_the_quota_with_its_unit_given_back() {
        let values = values(&decision(), 1);
        assert!(values.contains(&(X_QUOTA_REMAINING, HeaderValue::from_static("8767"))));
        assert!(values.contains(&(
            RATELIMIT,
            HeaderValue::from_static(
                "\"rate-1s\";r=9;t=2, \"rate-60s\";r=3;t=42, \"quota\";r=8767;t=86401"
            )
        )));
        // The windows keep the request: only the quota unit is given back.
        assert!(values.contains(&(X_RATELIMIT_REMAINING, HeaderValue::from_static("3"))));

        // A plan whose only limit is a hard quota: the older fields describe it, given back too.
        let mut quota_only = decision();
        quota_only.windows.clear();
        let values = super::values(&quota_only, 1);
        assert!(values.contains(&(X_RATELIMIT_REMAINING, HeaderValue::from_static("8767"))));
        assert!(values.contains(&(X_QUOTA_REMAINING, HeaderValue::from_static("8767"))));
    }

    #[test]
    fn a_plan_without_a_quota_sends_only_its_windows() {
        let mut windows = decision();
        windows.quota = None;
        let values = values(&windows, 0);
        let names: Vec<&str> = values.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                RATELIMIT_POLICY,
                RATELIMIT,
                RATELIMIT_LIMIT,
                RATELIMIT_REMAINING,
                RATELIMIT_RESET,
                X_RATELIMIT_LIMIT,
                X_RATELIMIT_REMAINING,
                X_RATELIMIT_RESET
            ]
        );
        assert_eq!(values[0].1, "\"rate-1s\";q=10;w=1, \"rate-60s\";q=500;w=60");
        assert_eq!(values[1].1, "\"rate-1s\";r=9;t=2, \"rate-60s\";r=3;t=42");
    }

    #[test]
    fn a_plan_without_limits_sends_no_headers() {
        let mut empty = decision();
        empty.windows.clear();
        empty.quota = None;
        assert!(values(&empty, 0).is_empty());
    }

    #[test]
    fn a_soft_quota_past_its_limit_reports_zero_remaining() {
        let mut over = decision();
        over.quota = Some(QuotaLimit {
            limit: 100,
            hard: false,
        });
        over.windows.clear();
        let values = values(&over, 0);
        assert!(values.contains(&(X_QUOTA_REMAINING, HeaderValue::from_static("0"))));
        // A soft quota refuses nothing: the older fields do not describe it.
        assert!(!values.iter().any(|(n, _)| *n == X_RATELIMIT_LIMIT));
        assert_eq!(values.len(), 5);
    }

    /// Before, a plan with windows told a request refused for its spent hard quota the room of a
    /// window ("Remaining: 10, Reset: 0"), and clients reading only these retried at once.
    #[test]
    fn the_older_fields_describe_a_hard_quota_closer_to_refusing_than_any_window() {
        let mut spent = decision();
        spent.quota = Some(QuotaLimit {
            limit: 1_234,
            hard: true,
        });
        let get = |values: &[(&str, HeaderValue)], name: &str| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        let values = values(&spent, 0);
        assert_eq!(get(&values, X_RATELIMIT_LIMIT).as_deref(), Some("1234"));
        assert_eq!(get(&values, X_RATELIMIT_REMAINING).as_deref(), Some("0"));
        assert_eq!(get(&values, X_RATELIMIT_RESET).as_deref(), Some("86401"));
        // A soft quota spent refuses nothing: the window closest to refusing stays.
        spent.quota = Some(QuotaLimit {
            limit: 1_234,
            hard: false,
        });
        let values = super::values(&spent, 0);
        assert_eq!(get(&values, X_RATELIMIT_LIMIT).as_deref(), Some("500"));
        assert_eq!(get(&values, X_RATELIMIT_REMAINING).as_deref(), Some("3"));
        // Refused for a hard quota whose count shows room (Redis counted units a gateway held
        // that it had not been given yet): none left, everywhere.
        let mut refused = decision();
        refused.verdict = Verdict::QuotaExceeded;
        let values = super::values(&refused, 0);
        assert_eq!(get(&values, X_QUOTA_REMAINING).as_deref(), Some("0"));
        assert_eq!(get(&values, X_RATELIMIT_REMAINING).as_deref(), Some("0"));
        assert_eq!(get(&values, X_RATELIMIT_LIMIT).as_deref(), Some("10000"));
    }

    #[test]
    fn without_windows_the_older_fields_describe_a_hard_quota() {
        let mut over = decision();
        over.quota = Some(QuotaLimit {
            limit: 100,
            hard: true,
        });
        over.windows.clear();
        let values = values(&over, 0);
        for (name, value) in [
            (X_RATELIMIT_LIMIT, "100"),
            (X_RATELIMIT_REMAINING, "0"),
            (X_RATELIMIT_RESET, "86401"),
        ] {
            assert!(
                values.contains(&(name, HeaderValue::from_static(value))),
                "{name}: {values:?}"
            );
        }
        assert!(values.contains(&(RATELIMIT_REMAINING, HeaderValue::from_static("0"))));
        assert_eq!(values.len(), NAMES.len());
    }

    #[test]
    fn the_upstreams_limit_headers_give_way_to_the_plans() {
        let mut upstream = ResponseHeader::build(200, None).unwrap();
        // Every name of ours (the plan has no quota: the last three are not written), then
        // spellings of others.
        let theirs: Vec<&str> = NAMES
            .into_iter()
            .chain([
                "RateLimit-Used",
                "X-RateLimit-Used",
                "X-RateLimit-Limit-Minute",
            ])
            .collect();
        for &name in &theirs {
            upstream.insert_header(name, "7").unwrap();
        }
        upstream.insert_header("X-Other", "kept").unwrap();
        upstream.insert_header("X-Quotas", "kept").unwrap();
        let mut no_quota = decision();
        no_quota.quota = None;
        write(&mut upstream, &no_quota, 0).unwrap();
        let get = |header: &ResponseHeader, name: &str| {
            header
                .headers
                .get(name)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        assert_eq!(get(&upstream, X_RATELIMIT_REMAINING).as_deref(), Some("3"));
        assert_eq!(get(&upstream, RATELIMIT_REMAINING).as_deref(), Some("3"));
        for name in &theirs[8..] {
            assert_eq!(get(&upstream, name), None, "{name}");
        }
        assert_eq!(get(&upstream, "X-Other").as_deref(), Some("kept"));
        assert_eq!(get(&upstream, "X-Quotas").as_deref(), Some("kept"));
        assert_eq!(upstream.headers.len(), 2 + 8);

        let mut none = decision();
        none.quota = None;
        none.windows.clear();
        write(&mut upstream, &none, 0).unwrap();
        for name in &theirs {
            assert_eq!(get(&upstream, name), None, "{name}");
        }
        assert_eq!(upstream.headers.len(), 2);
    }
}
