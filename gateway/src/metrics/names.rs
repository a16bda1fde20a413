//! The name of every metric the gateway exports, and the authentication decisions' label values,
//! in one place.

/// Requests answered, by route, method and status class.
pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
/// Whole-request latency, by route.
pub const REQUEST_DURATION: &str = "tollgate_request_duration_seconds";
/// Time from the first connect attempt to the upstream's response header, by upstream.
pub const UPSTREAM_DURATION: &str = "tollgate_upstream_duration_seconds";
/// 1 when a target is available, 0 when not, by upstream and target position.
pub const UPSTREAM_TARGET_HEALTHY: &str = "tollgate_upstream_target_healthy";
/// Failed connection attempts and timeouts towards targets, by upstream.
pub const UPSTREAM_FAILURES_TOTAL: &str = "tollgate_upstream_failures_total";
/// Requests retried on another target, by upstream.
pub const UPSTREAM_RETRIES_TOTAL: &str = "tollgate_upstream_retries_total";
/// Config reloads, by result (`ok`, `failed`).
pub const CONFIG_RELOADS_TOTAL: &str = "tollgate_config_reloads_total";
/// Version of the running config (1 at start, +1 per applied reload).
pub const CONFIG_VERSION: &str = "tollgate_config_version";
/// Unix time the running config was loaded.
pub const CONFIG_LOADED_TIMESTAMP: &str = "tollgate_config_loaded_timestamp_seconds";
/// Requests being processed now.
pub const REQUESTS_IN_FLIGHT: &str = "tollgate_requests_in_flight";
/// Config version of the identities (plans, customers, keys) in use; absent before any.
pub const IDENTITY_VERSION: &str = "tollgate_identity_version";
/// Keys in the identities in use.
pub const IDENTITY_KEYS: &str = "tollgate_identity_keys";
/// Seconds since the control plane last answered (the identities are at least that old).
pub const IDENTITY_SYNC_AGE: &str = "tollgate_identity_sync_age_seconds";
/// Failed attempts to reach or read the control plane.
pub const IDENTITY_SYNC_FAILURES_TOTAL: &str = "tollgate_identity_sync_failures_total";
/// Snapshots by result (`applied`, `restored` from disk, `refused`).
pub const IDENTITY_SNAPSHOTS_TOTAL: &str = "tollgate_identity_snapshots_total";
/// JWKS fetches, by JWT provider and result (`ok`, `failed`).
pub const JWKS_FETCHES_TOTAL: &str = "tollgate_jwks_fetches_total";
/// The results of authentication decisions, as labelled.
pub const AUTH_RESULTS: [&str; 14] = [
    "ok",
    "missing",
    "repeated",
    "malformed",
    "unknown",
    "revoked",
    "expired",
    "suspended",
    "out-of-scope",
    "unavailable",
    "invalid-token",
    "expired-token",
    "unknown-customer",
    "throttled",
];
/// Authentication decisions by result (`ok`, or why the credential was refused, or `throttled`).
pub const AUTH_DECISIONS_TOTAL: &str = "tollgate_auth_decisions_total";

/// Rate-limit and quota decisions, by result (`allowed`, `rate-limited`, `quota-exceeded`) and
/// by where they were counted (`local`, `redis`, `fallback`: locally because Redis failed, or
/// `batched`: locally for a plan without limits, added to Redis in batches).
pub const LIMIT_DECISIONS_TOTAL: &str = "tollgate_limit_decisions_total";
/// Quota units given back because the request must not count.
pub const QUOTA_REFUNDS_TOTAL: &str = "tollgate_quota_refunds_total";
/// Units admitted past a soft quota.
pub const QUOTA_OVERAGE_UNITS_TOTAL: &str = "tollgate_quota_overage_units_total";
/// Customers the in-process counters hold, as of the last sweep.
pub const LIMIT_CUSTOMERS_COUNTED: &str = "tollgate_limit_customers_counted";
/// Quota units counted in process without asking Redis (while it failed, or in batches for a
/// plan without limits), by what became of them.
pub const QUOTA_FALLBACK_UNITS_TOTAL: &str = "tollgate_quota_fallback_units_total";

/// Counter calls to Redis that failed, by kind (`timeout`, `error`, or `unavailable`: not tried,
/// within `retry_after` of a failure or before the first connection).
pub const REDIS_ERRORS_TOTAL: &str = "tollgate_redis_errors_total";
/// Time of answered counter calls to Redis.
pub const REDIS_CALL_DURATION: &str = "tollgate_redis_call_duration_seconds";
/// Admission calls that timed out, by what Redis answered them in the end (`redis`: `counted`,
/// `not_counted`, or `unknown` when the connection gave up on the call) and what the gateway
/// had decided meanwhile (`gateway`: `admitted` or `refused`).
pub const REDIS_LATE_ANSWERS_TOTAL: &str = "tollgate_redis_late_answers_total";
/// 1 while Redis answers the `PING` sent every 250 ms, within 1 s.
pub const REDIS_UP: &str = "tollgate_redis_up";

/// Bytes of usage records in the spool.
pub const USAGE_SPOOL_BYTES: &str = "tollgate_usage_spool_bytes";
/// The spool's bound: at it, metered requests are refused.
pub const USAGE_SPOOL_MAX_BYTES: &str = "tollgate_usage_spool_max_bytes";
/// Usage events written to the spool.
pub const USAGE_EVENTS_SPOOLED_TOTAL: &str = "tollgate_usage_events_spooled_total";
/// Usage events sent to the ledger, by result (`inserted`, `duplicate`).
pub const USAGE_EVENTS_STORED_TOTAL: &str = "tollgate_usage_events_stored_total";
/// Usage events an earlier process left pending (killed between a response and its end),
/// recovered from the spool.
pub const USAGE_EVENTS_RECOVERED_TOTAL: &str = "tollgate_usage_events_recovered_total";
/// Usage events sent to the ledger again: spooled by an earlier process (a restart), or offered
/// before while the ledger was unavailable (an outage).
pub const USAGE_EVENTS_REPLAYED_TOTAL: &str = "tollgate_usage_events_replayed_total";
/// Usage events the ledger refused for good, set aside in the spool's `rejected/` directory.
pub const USAGE_EVENTS_REJECTED_TOTAL: &str = "tollgate_usage_events_rejected_total";
/// Batches of usage events the ledger stored.
pub const USAGE_BATCHES_STORED_TOTAL: &str = "tollgate_usage_batches_stored_total";
/// Batches the ledger did not accept.
pub const USAGE_SEND_FAILURES_TOTAL: &str = "tollgate_usage_send_failures_total";
/// Usage records the disk refused to write.
pub const USAGE_SPOOL_ERRORS_TOTAL: &str = "tollgate_usage_spool_errors_total";
/// Metered requests refused because the spool was full.
pub const USAGE_SPOOL_FULL_REFUSALS_TOTAL: &str = "tollgate_usage_spool_full_refusals_total";
/// Ledger reads made for customers' usage views.
pub const USAGE_VIEW_READS_TOTAL: &str = "tollgate_usage_view_reads_total";

/// The route label of requests that matched no route (route names cannot contain parentheses).
pub const NO_ROUTE: &str = "(none)";
