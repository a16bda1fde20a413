//! API keys: `POST|GET /v1/customers/{id}/keys`, `POST /v1/keys/{id}/revoke`,
//! `POST /v1/keys/{id}/rotate`. The plaintext key appears only in the creation and rotation
//! answers; listings show its first characters.

use std::time::UNIX_EPOCH;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::body::{error, name, object, page, page_limit, unknown_fields};
use super::error::ApiError;
use super::plans::ListQuery;
use crate::store::keys::{CreatedKey, NewKey};
use crate::store::{StoreError, now_ms};

/// Longest rotation grace: 30 days.
const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;

/// `POST /v1/customers/{id}/keys`: `{"name", "expires_at"?, "scopes"?}`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let fields = object(&body)?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &["name", "expires_at", "scopes"], "", &mut errors);
    let key_name = match fields.get("name") {
        Some(value) => name(value, "name", &mut errors),
        None => {
            errors.push(error("name", "is required"));
            None
        }
    };
    let expires_at_ms = match fields.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(value) => {
            let parsed = value
                .as_str()
                .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
                .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_millis()).ok());
            match parsed {
                Some(ms) if ms > now_ms() => Some(ms),
                Some(_) => {
                    errors.push(error("expires_at", "must be in the future"));
                    None
                }
                None => {
                    errors.push(error(
                        "expires_at",
                        "must be an RFC 3339 time such as 2027-01-31T00:00:00Z",
                    ));
                    None
                }
            }
        }
    };
    let scopes = match fields.get("scopes") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut scopes = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(route) = name(item, &format!("scopes[{i}]"), &mut errors) {
                    scopes.push(route);
                }
            }
            if items.is_empty() {
                errors.push(error(
                    "scopes",
                    "must list at least one route (leave it out for every route)",
                ));
            }
            Some(scopes)
        }
        Some(_) => {
            errors.push(error("scopes", "must be an array of route names"));
            None
        }
    };
    let Some(key_name) = key_name.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    let new = NewKey {
        name: key_name,
        expires_at_ms,
        scopes,
    };
    let created = state
        .store
        .create_key(&customer_id, new, &caller.actor)
        .await
        .map_err(|e| not_found(e, "customer"))?;
    Ok((StatusCode::CREATED, Json(with_plaintext(&created))).into_response())
}

/// `GET /v1/customers/{id}/keys`.
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Path(customer_id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(query.limit)?;
    state
        .store
        .customer(&customer_id)
        .await
        .map_err(|e| not_found(e, "customer"))?;
    let keys = state
        .store
        .keys(&customer_id, limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(keys, limit, |k| k.id.clone()))
}

/// `POST /v1/keys/{id}/revoke`.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let key = state
        .store
        .revoke_key(&id, &caller.actor)
        .await
        .map_err(|e| not_found(e, "key"))?;
    Ok(Json(key).into_response())
}

/// `POST /v1/keys/{id}/rotate`: `{"grace_seconds": N}`; answers the new key (plaintext once) and
/// when the old one stops working.
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let fields = if body.is_empty() {
        Default::default()
    } else {
        object(&body)?
    };
    let mut errors = Vec::new();
    unknown_fields(&fields, &["grace_seconds"], "", &mut errors);
    let grace = match fields.get("grace_seconds") {
        None => Some(0),
        Some(value) => match value.as_u64() {
            Some(grace) if grace <= MAX_GRACE_SECONDS => Some(grace),
            _ => {
                errors.push(error(
                    "grace_seconds",
                    &format!("must be an integer from 0 to {MAX_GRACE_SECONDS}"),
                ));
                None
            }
        },
    };
    let Some(grace) = grace.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    let (created, old) = state
        .store
        .rotate_key(&id, grace, &caller.actor)
        .await
        .map_err(|e| not_found(e, "key"))?;
    let mut body = with_plaintext(&created);
    body["replaces"] = json!({"id": old.id, "works_until": old.revoked_at});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn with_plaintext(created: &CreatedKey) -> Value {
    let mut body = json!(created.key);
    body["key"] = json!(created.plaintext);
    body
}

fn not_found(error: StoreError, what: &'static str) -> ApiError {
    match error {
        StoreError::NotFound => ApiError::NotFound(what),
        other => other.into(),
    }
}
