//! Usage, the one ledger quotas, the usage view and billing read:
//! - `POST /v1/gateway/usage` (gateway tokens): a batch of metered requests.
//! - `GET /v1/gateway/usage/period` (gateway tokens): a customer's units in a period, from which
//!   a gateway rebuilds a quota counter.
//! - `GET /v1/customers/{id}/usage` (admins and viewers): the customer's current period, quota
//!   and use, and the daily roll-up.
//!
//! A batch is checked whole before anything is stored ([`batch`]): one bad event refuses the
//! batch with a 422 listing every bad field, so a gateway never has to work out which part went
//! in. A valid batch is stored in one transaction; event ids make it idempotent, so a gateway
//! retries a batch it got no answer for as is. For that reason this `POST` does not read
//! `Idempotency-Key` (see [`idempotency::NOT_REMEMBERED`](super::idempotency::NOT_REMEMBERED)):
//! remembering answers would add a write per batch and keep bodies of megabytes, for what the
//! ids already guarantee. Batches may be up to [`MAX_BATCH_BODY`] bytes: 5000 events do not fit
//! in the 1 MiB of the other endpoints.

pub mod batch;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use tollgate_model::customer::BillingPeriod;
use tollgate_model::feed::PeriodMs;
use tollgate_model::usage::{PeriodUsage, UsageStored};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, GatewayCaller};
use super::body::{LargeObject, Query, error, rfc3339_ms};
use super::customers::MAX_BILLING_PERIOD_MS;
use super::error::ApiError;
use super::openapi::{BatchProblems, PeriodProblems, UsageViewProblems};
use crate::calendar;
use crate::store::usage::DailyUsage;
use crate::store::{StoreError, now_ms, rfc3339};

/// Largest usage batch body read: 5000 events of the longest fields, with room to spare.
pub const MAX_BATCH_BODY: usize = 8 << 20;
/// Most days the usage view lists at once: the UTC days a billing period of the longest length
/// (366 days) touches when it starts inside a day.
pub const MAX_DAYS: i64 = 367;

/// Body of `POST /v1/gateway/usage`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatchBody {
    /// The events, in any order; ids already stored (or repeated) are skipped.
    #[schema(min_items = 1, max_items = 5000)]
    pub events: Vec<UsageEventBody>,
}

/// One metered request, as a gateway sends it.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageEventBody {
    /// `evt_` and 32 lowercase hex digits, made once by the gateway: stored once.
    #[schema(pattern = "^evt_[0-9a-f]{32}$")]
    pub id: String,
    /// The request's `X-Request-Id`.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub request_id: String,
    /// The customer who called; usage of an unknown customer is stored too.
    #[schema(pattern = "^cus_[0-9a-f]{32}$")]
    pub customer_id: String,
    /// The key used, when the call was made with an API key.
    #[schema(pattern = "^key_[0-9a-f]{32}$")]
    pub key_id: Option<String>,
    /// The route's name.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub route: String,
    /// The request method (an HTTP token).
    #[schema(
        min_length = 1,
        max_length = 32,
        pattern = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
    )]
    pub method: String,
    /// The status the client received.
    #[schema(minimum = 100, maximum = 599)]
    pub status: u16,
    /// From arrival to the last response byte, in microseconds.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub latency_us: u64,
    /// Request body bytes.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub bytes_in: u64,
    /// Response body bytes.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub bytes_out: u64,
    /// Unix milliseconds of the request's arrival: the period and the day it counts in.
    #[schema(minimum = 0, maximum = 253402300799999_i64)]
    pub at_ms: i64,
    /// Billable units counted against the quota (0 for a refunded request).
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    pub units: u64,
    /// Of `units`, those past a soft quota; at most `units`.
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    pub overage: u64,
}

/// Stores a batch of usage events, each id once.
#[utoipa::path(post, operation_id = "recordUsage", path = "/v1/gateway/usage", tag = "usage",
    request_body(content = UsageBatchBody, description = "Up to 5000 events and 8 MiB. Event ids \
        make a retry count nothing twice: `Idempotency-Key` is not read here."),
    responses((status = 200, description = "Stored: the events new to the ledger, and those it had already",
        body = UsageStored), BatchProblems))]
pub async fn record(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    LargeObject(fields): LargeObject<MAX_BATCH_BODY>,
) -> Result<Json<UsageStored>, ApiError> {
    let events = batch::events(fields).map_err(ApiError::Invalid)?;
    let stored = state.store.record_usage(&events).await?;
    state.metrics.count_usage(&stored);
    Ok(Json(stored))
}

/// Query of `GET /v1/gateway/usage/period`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PeriodQuery {
    /// The customer.
    #[param(pattern = "^cus_[0-9a-f]{32}$")]
    pub customer_id: String,
    /// Period start, Unix ms, included.
    #[param(minimum = 0)]
    pub start_ms: i64,
    /// Period end, Unix ms, excluded: after `start_ms`, at most 366 days after it.
    #[param(minimum = 1)]
    pub end_ms: i64,
}

/// A customer's units and overage in a period, summed from the stored events.
#[utoipa::path(get, operation_id = "getPeriodUsage", path = "/v1/gateway/usage/period", tag = "usage",
    params(PeriodQuery),
    responses((status = 200, description = "The period's sums (0 when nothing was stored)", body = PeriodUsage),
        PeriodProblems))]
pub async fn period(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    Query(query): Query<PeriodQuery>,
) -> Result<Json<PeriodUsage>, ApiError> {
    let mut errors = Vec::new();
    let hex = |s: &str| s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !query.customer_id.strip_prefix("cus_").is_some_and(hex) {
        errors.push(error(
            "customer_id",
            "must be cus_ and 32 lowercase hex digits",
        ));
    }
    if query.start_ms < 0 {
        errors.push(error("start_ms", "must not be negative"));
    }
    if query.end_ms <= query.start_ms {
        errors.push(error("end_ms", "must be after start_ms"));
    } else if query.end_ms.saturating_sub(query.start_ms) > MAX_BILLING_PERIOD_MS {
        errors.push(error("end_ms", "must be at most 366 days after start_ms"));
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let usage = state
        .store
        .period_usage(&query.customer_id, query.start_ms, query.end_ms)
        .await?;
    Ok(Json(usage))
}

/// Query of `GET /v1/customers/{id}/usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day listed, `YYYY-MM-DD` (UTC); default the period's first day.
    #[param(format = Date)]
    pub from: Option<String>,
    /// Last day listed, included; default the period's last day. At most 367 days from `from`
    /// (both included), so that a 366-day period starting inside a day is listed whole.
    #[param(format = Date)]
    pub to: Option<String>,
}

/// A customer's usage in the current period, and per day and route.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerUsage {
    /// The period the quota counts in now: the customer's billing period (continued in periods
    /// of its length once it ends without a new one), else the calendar month in UTC.
    pub period: BillingPeriod,
    /// The plan's quota in requests (units), or `null` without one.
    pub quota: Option<u64>,
    /// Whether the quota refuses calls once spent (`false`: overage is billed); `null`
    /// without a quota.
    pub hard: Option<bool>,
    /// Units used in the period.
    pub used: u64,
    /// Units left in the period, never negative; `null` without a quota.
    pub remaining: Option<u64>,
    /// Of `used`, units past a soft quota.
    pub overage: u64,
    /// The daily roll-up from `from` to `to`, by day then route; days without calls are left
    /// out.
    pub days: Vec<DailyUsage>,
}

/// A customer's current period: quota, use, and the daily roll-up.
#[utoipa::path(get, operation_id = "getCustomerUsage", path = "/v1/customers/{id}/usage", tag = "usage",
    params(("id" = String, Path), UsageQuery),
    responses((status = 200, description = "The customer's usage", body = CustomerUsage), UsageViewProblems))]
pub async fn customer(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<CustomerUsage>, ApiError> {
    let mut errors = Vec::new();
    let mut day = |name: &str, value: Option<&str>| {
        value.and_then(|text| {
            let day = calendar::parse_day(text);
            if day.is_none() {
                errors.push(error(name, "must be a date YYYY-MM-DD"));
            }
            day
        })
    };
    let (from, to) = (
        day("from", query.from.as_deref()),
        day("to", query.to.as_deref()),
    );
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let customer = state
        .store
        .customer(&id)
        .await
        .map_err(ApiError::from_store("customer"))?;
    let plan = state
        .store
        .plan(&customer.plan_id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::Internal(format!("customer {id} has no plan")),
            other => other.into(),
        })?;
    let billing_period = customer.billing_period.as_ref().and_then(|period| {
        Some(PeriodMs {
            start_ms: rfc3339_ms(&period.start)?,
            end_ms: rfc3339_ms(&period.end)?,
        })
    });
    let period = calendar::current_period(billing_period, now_ms());
    let given = (from.is_some(), to.is_some());
    let from = from.unwrap_or_else(|| calendar::day_number(period.start_ms));
    let to = to.unwrap_or_else(|| calendar::day_number(period.end_ms - 1));
    // Each refusal names a parameter the caller sent, and the default it was checked against.
    let default_from = || {
        format!(
            "from, which defaults to the period's first day, {}",
            calendar::format_day(from)
        )
    };
    let default_to = || {
        format!(
            "to, which defaults to the period's last day, {}",
            calendar::format_day(to)
        )
    };
    if to < from {
        let (path, message) = match given {
            (false, _) => ("to", format!("must not be before {}", default_from())),
            (true, false) => ("from", format!("must not be after {}", default_to())),
            (true, true) => ("to", "must not be before from".to_owned()),
        };
        return Err(ApiError::Invalid(vec![error(path, &message)]));
    }
    if to - from >= MAX_DAYS {
        let (path, message) = match given {
            (false, _) => (
                "to",
                format!("must be within {MAX_DAYS} days of {}", default_from()),
            ),
            (true, false) => (
                "from",
                format!("must be within {MAX_DAYS} days of {}", default_to()),
            ),
            (true, true) => (
                "to",
                format!("must be within {MAX_DAYS} days of from, both included"),
            ),
        };
        return Err(ApiError::Invalid(vec![error(path, &message)]));
    }
    let used = state
        .store
        .period_usage(&id, period.start_ms, period.end_ms)
        .await?;
    let days = state
        .store
        .daily_usage(&id, &calendar::format_day(from), &calendar::format_day(to))
        .await?;
    Ok(Json(CustomerUsage {
        period: BillingPeriod {
            start: rfc3339(period.start_ms),
            end: rfc3339(period.end_ms),
        },
        quota: plan.quota.map(|q| q.requests),
        hard: plan.quota.map(|q| q.hard),
        used: used.units,
        remaining: plan.quota.map(|q| q.requests.saturating_sub(used.units)),
        overage: used.overage,
        days,
    }))
}
