//! Usage: the one ledger quotas, the usage views and billing read. Gateways write one event per
//! proxied request to a local spool, then send them in batches; the store keeps each event id
//! once, so a replayed batch counts nothing twice.

use serde::{Deserialize, Serialize};

/// One metered request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageEvent {
    /// `evt_` and 32 hex digits, made once by the gateway: the store keeps each id once.
    pub id: String,
    /// The request's `X-Request-Id`.
    pub request_id: String,
    /// The customer who called.
    pub customer_id: String,
    /// The key used, when the call was made with an API key.
    pub key_id: Option<String>,
    /// The route's name.
    pub route: String,
    /// The request method.
    pub method: String,
    /// The status the client received.
    pub status: u16,
    /// From the request's arrival to its last response byte, in microseconds.
    pub latency_us: u64,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Unix milliseconds of the request's arrival: the period it counts in.
    pub at_ms: i64,
    /// Billable units counted against the quota (0 for a refunded request).
    pub units: u64,
    /// Of `units`, those past a soft quota (billed as overage).
    pub overage: u64,
}

/// A batch of events, as `POST /v1/gateway/usage` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageBatch {
    /// The events, in any order; ids already stored are skipped.
    pub events: Vec<UsageEvent>,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageStored {
    /// Events stored now.
    pub inserted: u64,
    /// Events whose id was already stored, skipped.
    pub duplicates: u64,
}

/// The units a customer used in one period, as a gateway rebuilds a quota counter from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeriodUsage {
    /// Period start, Unix ms, included.
    pub start_ms: i64,
    /// Period end, Unix ms, excluded.
    pub end_ms: i64,
    /// Units stored for events with `start_ms <= at_ms < end_ms`.
    pub units: u64,
    /// Of them, overage units.
    pub overage: u64,
}
