//! The calling customer's own usage, on routes with `usage = true`: requests used in the current
//! period as the usage ledger holds them, what is left of the quota, and when the period ends.
//!
//! A period's sum is a scan of the customer's events in the ledger, and a view is not metered,
//! so a customer calling it in a loop would keep the store busy for everyone. Reads are shared:
//! each customer's views cost at most one ledger read per [`VIEW_TTL`] on a gateway, callers
//! asking at the same moment wait for the same read, and a view is at most that old.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use pingora::Result;
use pingora::proxy::Session;
use serde_json::json;
use tokio::sync::OnceCell;

use super::problem::GatewayProblem;
use super::{RequestCtx, respond};
use crate::identity::index::{Id, format_id};
use crate::limits::{SEED_TIMEOUT, period};
use crate::state::Gateway;

/// How long a ledger read serves a customer's views.
pub const VIEW_TTL: Duration = Duration::from_secs(1);
/// Past this many reads kept, expired ones are dropped as new ones are made.
const READS_KEPT: usize = 4096;

/// One ledger read of a customer's period: units and overage, or `None` when it failed.
type Read = Arc<OnceCell<Option<(u64, u64)>>>;

/// The ledger reads of recent usage views, by customer and period start.
#[derive(Debug, Default)]
pub struct UsageViews {
    reads: Mutex<HashMap<(Id, i64), (Instant, Read)>>,
}

impl UsageViews {
    /// The read serving `customer`'s view of the period starting at `period_start`: the recent
    /// one, or a new one when it is older than [`VIEW_TTL`].
    fn read(&self, customer: &Id, period_start: i64, now: Instant) -> Read {
        // Held for a map lookup and insert; the ledger is read outside it.
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (*customer, period_start);
        if let Some((at, read)) = reads.get(&key)
            && now.saturating_duration_since(*at) < VIEW_TTL
        {
            return Arc::clone(read);
        }
        if reads.len() >= READS_KEPT {
            reads.retain(|_, (at, _)| now.saturating_duration_since(*at) < VIEW_TTL);
        }
        let read = Read::default();
        reads.insert(key, (now, Arc::clone(&read)));
        read
    }
}

/// Answers a usage view: the JSON body, or a 503 `usage-unavailable` problem when the ledger
/// cannot be read.
pub async fn answer(gateway: &Gateway, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    match view(gateway, ctx).await {
        Some(body) => {
            // One customer's usage: never kept by a shared cache (a key sent as `X-API-Key` is
            // not `Authorization`, which RFC 9111 keeps shared caches from storing answers to).
            let headers = [
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                (CACHE_CONTROL, HeaderValue::from_static("private, no-store")),
            ];
            respond::write(session, ctx, 200, &headers, Bytes::from(body)).await
        }
        None => respond::problem(session, ctx, &GatewayProblem::UsageUnavailable).await,
    }
}

/// The JSON body, or `None` when the ledger cannot be read.
async fn view(gateway: &Gateway, ctx: &RequestCtx) -> Option<Vec<u8>> {
    let (caller, _) = ctx.caller.as_ref()?;
    let ledger = gateway.limiter.ledger()?;
    let period = period::current(caller.billing_period, gateway.limiter.now_ms());
    let read = gateway
        .usage_views
        .read(&caller.customer, period.start_ms, Instant::now());
    let usage = read
        .get_or_init(|| async {
            if let Some(meter) = &gateway.meter {
                meter.metrics.view_read();
            }
            match tokio::time::timeout(SEED_TIMEOUT, ledger.period_usage(&caller.customer, period))
                .await
            {
                Ok(Ok(usage)) => Some(usage),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read the usage ledger for a usage view");
                    None
                }
                Err(_) => None,
            }
        })
        .await;
    let (used, overage) = (*usage)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_serves_one_customers_period_for_a_second_then_a_new_one_is_made() {
        let views = UsageViews::default();
        let (alice, bob) = ([1; 16], [2; 16]);
        let start = Instant::now();
        let first = views.read(&alice, 0, start);
        let later = start + VIEW_TTL - Duration::from_millis(1);
        assert!(Arc::ptr_eq(&first, &views.read(&alice, 0, later)));
        assert!(!Arc::ptr_eq(&first, &views.read(&bob, 0, later)));
        assert!(
            !Arc::ptr_eq(&first, &views.read(&alice, 1, later)),
            "another period"
        );
        let expired = views.read(&alice, 0, start + VIEW_TTL);
        assert!(!Arc::ptr_eq(&first, &expired));
        assert!(Arc::ptr_eq(
            &expired,
            &views.read(&alice, 0, start + VIEW_TTL)
        ));
    }

    #[test]
    fn expired_reads_are_dropped_once_many_are_kept() {
        let views = UsageViews::default();
        let start = Instant::now();
        for n in 0..READS_KEPT {
            let mut customer = [0; 16];
            customer[..8].copy_from_slice(&(n as u64).to_le_bytes());
            views.read(&customer, 0, start);
        }
        assert_eq!(views.reads.lock().unwrap().len(), READS_KEPT);
        views.read(&[9; 16], 0, start + VIEW_TTL);
        assert_eq!(views.reads.lock().unwrap().len(), 1);
    }
}
