//! The feed gateways follow, for `gateway` tokens only:
//! - `GET /v1/gateway/snapshot`: everything enforced, at a config version.
//! - `GET /v1/gateway/changes?since=V&wait_ms=N`: the changes after `V`, in order; when there is
//!   none yet, the request waits up to `wait_ms` (at most 30 s) and answers as soon as one is
//!   committed. The store is polled every 100 ms while waiting, which also sees changes made by
//!   other control-plane processes on the same database.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;
use tollgate_model::feed::{Changes, SNAPSHOT_VERSION_HEADER as VERSION_HEADER, Snapshot};
use utoipa::IntoParams;

use super::AppState;
use super::auth::GatewayCaller;
use super::body::{Query, error};
use super::error::ApiError;
use super::openapi::FeedProblems;

const MAX_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const MAX_CHANGES: u32 = 1000;

/// Everything gateways enforce, at one config version: streamed, gzip-compressed when the
/// request accepts it.
#[utoipa::path(get, operation_id = "getSnapshot", path = "/v1/gateway/snapshot", tag = "gateway feed",
    params(("Accept-Encoding" = Option<String>, Header, description = "`gzip` gets the snapshot compressed (Content-Encoding: gzip)")),
    responses((status = 200, description = "The snapshot", body = Snapshot,
        headers(("X-Tollgate-Config-Version" = i64, description = "The config version of the snapshot"))), FeedProblems))]
pub async fn snapshot(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let file = state.snapshots.current(&state.store).await?;
    let gzip = accepts_gzip(&headers);
    let chunks = file.stream(gzip);
    let body = Body::from_stream(futures_util::stream::unfold(chunks, |mut chunks| async {
        chunks.recv().await.map(|chunk| (chunk, chunks))
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(VERSION_HEADER, HeaderValue::from(file.version));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.gzip_bytes));
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.json_bytes));
    }
    Ok(response)
}

/// Whether `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let weight_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !weight_zero
        })
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
