//! The feed gateways follow, for `gateway` tokens only:
//! - `GET /v1/gateway/snapshot`: everything enforced, at a config version.
//! - `GET /v1/gateway/changes?since=V&wait_ms=N`: the changes after `V`, in order; when there is
//!   none yet, the request waits up to `wait_ms` (at most 30 s) and answers as soon as one is
//!   committed. The store is polled every 100 ms while waiting, which also sees changes made by
//!   other control-plane processes on the same database.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use tollgate_model::feed::{Changes, Snapshot};

use super::AppState;
use super::auth::GatewayCaller;
use super::body::error;
use super::error::ApiError;

const MAX_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const MAX_CHANGES: u32 = 1000;

/// `GET /v1/gateway/snapshot`.
pub async fn snapshot(
    State(state): State<AppState>,
    _caller: GatewayCaller,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(state.store.snapshot().await?))
}

/// Query of `GET /v1/gateway/changes`.
#[derive(Debug, Deserialize)]
pub struct ChangesQuery {
    /// The version the gateway has.
    pub since: i64,
    /// How long to wait for a change, in milliseconds (default 0, at most 30000).
    pub wait_ms: Option<u64>,
    /// Most changes per answer (default and maximum 1000).
    pub limit: Option<u32>,
}

/// `GET /v1/gateway/changes`.
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
