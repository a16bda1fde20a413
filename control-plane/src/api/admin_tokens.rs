//! `/v1/admin-tokens`: create (the token is shown once), list, delete.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::body::{error, object, page, page_limit, unknown_fields};
use super::error::ApiError;
use super::plans::ListQuery;
use crate::secret::{PlainToken, Role, hash};
use crate::store::StoreError;
use crate::store::admin_tokens::DeleteTokenError;

/// `POST /v1/admin-tokens`: `{"name": ..., "role": "admin" | "viewer"}`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let fields = object(&body)?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &["name", "role"], "", &mut errors);
    let name = match fields.get("name").and_then(Value::as_str).map(str::trim) {
        Some(name) if (1..=200).contains(&name.chars().count()) => Some(name.to_owned()),
        _ => {
            errors.push(error("name", "must be 1 to 200 characters of text"));
            None
        }
    };
    let role = match fields
        .get("role")
        .and_then(Value::as_str)
        .and_then(Role::parse)
    {
        Some(role) => Some(role),
        None => {
            errors.push(error(
                "role",
                "must be \"admin\", \"viewer\" or \"gateway\"",
            ));
            None
        }
    };
    let (Some(name), Some(role), true) = (name, role, errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    let token = PlainToken::generate();
    let stored = state
        .store
        .create_admin_token_as(&name, role, &hash(token.expose()), &caller.actor)
        .await?;
    let mut body = json!(stored);
    body["token"] = json!(token.expose());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/admin-tokens`: ids, names, roles; never a token or a hash.
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(query.limit)?;
    let tokens = state
        .store
        .admin_tokens(limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(tokens, limit, |t| t.id.clone()))
}

/// `DELETE /v1/admin-tokens/{id}`: 204; 409 for the last admin token.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    match state.store.delete_admin_token(&id, &caller.actor).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(DeleteTokenError::LastAdmin) => Err(ApiError::Conflict(
            "this is the last admin token; create another admin token first".into(),
        )),
        Err(DeleteTokenError::Store(StoreError::NotFound)) => {
            Err(ApiError::NotFound("admin token"))
        }
        Err(DeleteTokenError::Store(other)) => Err(other.into()),
    }
}
