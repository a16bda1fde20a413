//! `GET /v1/audit-log`: every change, newest first, with actor, action, target, before/after,
//! time and request id.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::auth::Caller;
use super::body::{Page, Query, error, page, page_limit};
use super::error::ApiError;
use super::openapi::ListProblems;
use super::plans::ListQuery;
use crate::store::audit::AuditEntry;

/// Lists every change, newest first.
#[utoipa::path(get, operation_id = "listAuditLog", path = "/v1/audit-log", tag = "audit", params(ListQuery),
    responses((status = 200, description = "A page of entries", body = Page<AuditEntry>), ListProblems))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<ListQuery>,
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
