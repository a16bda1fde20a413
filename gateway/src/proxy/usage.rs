//! The calling customer's own usage, on routes with `usage = true`: requests used in the current
//! period as the usage ledger holds them, what is left of the quota, and when the period ends.

use serde_json::json;

use super::RequestCtx;
use crate::identity::index::format_id;
use crate::limits::{SEED_TIMEOUT, period};
use crate::state::Gateway;

/// The JSON body, or `None` when the ledger cannot be read.
pub async fn view(gateway: &Gateway, ctx: &RequestCtx) -> Option<Vec<u8>> {
    let (caller, _) = ctx.caller.as_ref()?;
    let ledger = gateway.limiter.ledger()?;
    let period = period::current(caller.billing_period, gateway.limiter.now_ms());
    let (used, overage) =
        match tokio::time::timeout(SEED_TIMEOUT, ledger.period_usage(&caller.customer, period))
            .await
        {
            Ok(Ok(usage)) => usage,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the usage ledger for a usage view");
                return None;
            }
            Err(_) => return None,
        };
    let quota = caller.plan.quota;
    let body = json!({
        "customer_id": format_id("cus", &caller.customer),
        "plan_id": caller.plan.id,
        "period": {"start": rfc3339(period.start_ms), "end": rfc3339(period.end_ms)},
        "quota": quota.map(|q| q.requests),
        "hard": quota.map(|q| q.hard),
        "used": used,
        "remaining": quota.map(|q| q.requests.saturating_sub(used)),
        "overage": overage,
        "rate_limits": caller.plan.rate_limits,
        "upgrade_url": caller.plan.upgrade_url,
    });
    serde_json::to_vec(&body).ok()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(String::new, |time| {
        time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    })
}
