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
//! The older `X-RateLimit-*` fields describe the window closest to refusing (fewest units left,
//! then longest wait), and `X-Quota-*` the quota; every `*-Reset` is in seconds from now, rounded up.

use std::fmt::Write;

use http::HeaderValue;
use pingora::Result;
use pingora::http::ResponseHeader;

use super::{Decision, ceil_seconds};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// `RateLimit`.
pub const RATELIMIT: &str = "ratelimit";
/// `X-RateLimit-Limit`.
pub const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
/// `X-RateLimit-Remaining`.
pub const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
/// `X-RateLimit-Reset`.
pub const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";
/// `X-Quota-Limit`.
pub const X_QUOTA_LIMIT: &str = "x-quota-limit";
/// `X-Quota-Remaining`.
pub const X_QUOTA_REMAINING: &str = "x-quota-remaining";
/// `X-Quota-Reset`.
pub const X_QUOTA_RESET: &str = "x-quota-reset";

/// The values of every limit header of `decision`, by name.
pub fn values(decision: &Decision) -> Vec<(&'static str, String)> {
    let mut policy = String::new();
    let mut state = String::new();
    for window in &decision.windows {
        let seconds = window.window_ms / 1000;
        let separator = if policy.is_empty() { "" } else { ", " };
        let _ = write!(
            policy,
            "{separator}\"rate-{seconds}s\";q={};w={seconds}",
            window.limit
        );
        let _ = write!(
            state,
            "{separator}\"rate-{seconds}s\";r={};t={}",
            window.remaining,
            ceil_seconds(window.reset_ms)
        );
    }
    let mut values = Vec::with_capacity(8);
    let quota_reset = ceil_seconds(decision.period.end_ms.saturating_sub(decision.at_ms));
    if let Some(quota) = decision.quota {
        let remaining = quota.limit.saturating_sub(decision.used);
        let separator = if policy.is_empty() { "" } else { ", " };
        let _ = write!(
            policy,
            "{separator}\"quota\";q={};w={}",
            quota.limit,
            decision.period.seconds()
        );
        let _ = write!(state, "{separator}\"quota\";r={remaining};t={quota_reset}");
    }
    if policy.is_empty() {
        return values;
    }
    values.push((RATELIMIT_POLICY, policy));
    values.push((RATELIMIT, state));
    let closest = decision.windows.iter().min_by(|a, b| {
        a.remaining
            .cmp(&b.remaining)
            .then(b.reset_ms.cmp(&a.reset_ms))
    });
    if let Some(window) = closest {
        values.push((X_RATELIMIT_LIMIT, window.limit.to_string()));
        values.push((X_RATELIMIT_REMAINING, window.remaining.to_string()));
        values.push((X_RATELIMIT_RESET, ceil_seconds(window.reset_ms).to_string()));
    }
    if let Some(quota) = decision.quota {
        values.push((X_QUOTA_LIMIT, quota.limit.to_string()));
        values.push((
            X_QUOTA_REMAINING,
            quota.limit.saturating_sub(decision.used).to_string(),
        ));
        values.push((X_QUOTA_RESET, quota_reset.to_string()));
    }
    values
}

/// Sets every limit header of `decision` on a response, replacing any the upstream sent.
pub fn write(header: &mut ResponseHeader, decision: &Decision) -> Result<()> {
    for (name, value) in values(decision) {
        // Digits, names and separators only: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&value) {
            header.insert_header(name, value)?;
        }
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
        }
    }

    #[test]
    fn every_window_and_the_quota_is_a_named_policy() {
        let values = values(&decision());
        let get = |name| {
            values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get(RATELIMIT_POLICY),
            Some("\"rate-1s\";q=10;w=1, \"rate-60s\";q=500;w=60, \"quota\";q=10000;w=2592000")
        );
        assert_eq!(
            get(RATELIMIT),
            Some("\"rate-1s\";r=9;t=2, \"rate-60s\";r=3;t=42, \"quota\";r=8766;t=86401")
        );
        // The minute window has the fewest units left.
        assert_eq!(get(X_RATELIMIT_LIMIT), Some("500"));
        assert_eq!(get(X_RATELIMIT_REMAINING), Some("3"));
        assert_eq!(get(X_RATELIMIT_RESET), Some("42"));
        assert_eq!(get(X_QUOTA_LIMIT), Some("10000"));
        assert_eq!(get(X_QUOTA_REMAINING), Some("8766"));
        assert_eq!(get(X_QUOTA_RESET), Some("86401"));
    }

    #[test]
    fn a_plan_without_limits_sends_no_headers() {
        let mut empty = decision();
        empty.windows.clear();
        empty.quota = None;
        assert!(values(&empty).is_empty());
    }

    #[test]
    fn a_soft_quota_past_its_limit_reports_zero_remaining() {
        let mut over = decision();
        over.quota = Some(QuotaLimit {
            limit: 100,
            hard: false,
        });
        over.windows.clear();
        let values = values(&over);
        assert!(values.contains(&(X_QUOTA_REMAINING, "0".to_owned())));
        assert!(!values.iter().any(|(n, _)| *n == X_RATELIMIT_LIMIT));
    }
}
