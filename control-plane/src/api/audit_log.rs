//! `GET /v1/audit-log`: every change, newest first, with actor, action, target, before/after,
//! time and request id.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::auth::Caller;
use super::body::{Page, Query, error, page, page_limit};
use super::error::ApiError;
use super::openapi::ListProblems;
use crate::store::audit::AuditEntry;
use serde::Deserialize;
use utoipa::IntoParams;

/// Query of `GET /v1/audit-log`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page: an entry's position.
    #[param(pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// Lists every change, newest first.
#[utoipa::path(get, operation_id = "listAuditLog", path = "/v1/audit-log", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "A page of entries", body = Page<AuditEntry>), ListProblems))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let before = match query.cursor.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => {
            return Err(ApiError::Invalid(vec![error(
                "cursor",
                "is not a cursor this API returned",
            )]));
        }
    };
    let entries = state.store.audit_log(limit + 1, before).await?;
    Ok(page(entries, limit, |e| e.seq.to_string()))
}
