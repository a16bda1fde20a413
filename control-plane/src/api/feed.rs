//! The feed gateways follow, for `gateway` tokens only:
//! - `GET /v1/gateway/snapshot`: everything enforced, at a config version.
//! - `GET /v1/gateway/changes?since=V&wait_ms=N`: the changes after `V`, in order; when there is
//!   none yet, the request waits up to `wait_ms` (at most 30 s) and answers as soon as one is
//!   committed. The store is polled every 100 ms while waiting, which also sees changes made by
//!   other control-plane processes on the same database.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use tollgate_model::feed::{Changes, Snapshot};
use utoipa::IntoParams;

use super::AppState;
use super::auth::GatewayCaller;
use super::body::{Query, error};
use super::error::ApiError;
use super::openapi::FeedProblems;

const MAX_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const MAX_CHANGES: u32 = 1000;

/// Everything gateways enforce, at one config version.
#[utoipa::path(get, operation_id = "getSnapshot", path = "/v1/gateway/snapshot", tag = "gateway feed",
    responses((status = 200, description = "The snapshot", body = Snapshot), FeedProblems))]
pub async fn snapshot(
    State(state): State<AppState>,
    _caller: GatewayCaller,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(state.store.snapshot().await?))
}

/// Query of `GET /v1/gateway/changes`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// The version the gateway has.
    #[param(minimum = 0)]
    pub since: i64,
    /// How long to wait for a change, in milliseconds (default 0, at most 30000).
    #[param(minimum = 0, maximum = 30000)]
    pub wait_ms: Option<u64>,
    /// Most changes per answer (default and maximum 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The changes after `since`, in order; waits up to `wait_ms` for one when there is none yet.
#[utoipa::path(get, operation_id = "getChanges", path = "/v1/gateway/changes", tag = "gateway feed", params(ChangesQuery),
    responses((status = 200, description = "The changes, possibly none", body = Changes), FeedProblems))]
pub async fn changes(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    Query(query): Query<ChangesQuery>,
) -> Result<Json<Changes>, ApiError> {
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(ApiError::Invalid(vec![error(
            "wait_ms",
            "must be at most 30000",
        )]));
    }
    let limit = query.limit.unwrap_or(MAX_CHANGES);
    if !(1..=MAX_CHANGES).contains(&limit) {
        return Err(ApiError::Invalid(vec![error("limit", "must be 1 to 1000")]));
    }
    if query.since < 0 || query.since > state.store.latest_version().await? {
        return Err(ApiError::Conflict(
            "since is not a version of this store: fetch the snapshot again".into(),
        ));
    }
    let deadline = Instant::now() + wait;
    loop {
        let changes = state.store.changes_since(query.since, limit).await?;
        if !changes.changes.is_empty() || Instant::now() >= deadline {
            return Ok(Json(changes));
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}
