//! API keys: `POST|GET /v1/customers/{id}/keys`, `GET /v1/keys/{id}`,
//! `POST /v1/keys/{id}/revoke`, `POST /v1/keys/{id}/rotate`. The plaintext key appears only in the creation and rotation
//! answers; listings show its first characters.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::body::{
    Object, OptionalObject, Page, Query, error, name, page, page_limit, rfc3339_ms, unknown_fields,
};
use super::error::ApiError;
use super::openapi::{ListProblems, ReadProblems, UpdateProblems};
use super::plans::ListQuery;
use crate::store::keys::{ApiKey, CreatedKey, NewKey};
use crate::store::now_ms;

/// The fields of a new key's body.
pub const NEW_KEY_FIELDS: [&str; 3] = ["name", "expires_at", "scopes"];
/// The fields of a rotation's body.
pub const ROTATE_FIELDS: [&str; 1] = ["grace_seconds"];

/// Body of `POST /v1/customers/{id}/keys`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "production", "expires_at": "2027-01-31T00:00:00Z", "scopes": ["orders"]}))]
pub struct NewKeyBody {
    /// 1 to 64 letters, digits, `-`, `_` or `.`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub name: String,
    /// RFC 3339 time in the future after which the key stops working.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// Route names the key may call (at least one); leave out for every route.
    #[schema(min_items = 1)]
    pub scopes: Option<Vec<String>>,
}

/// Body of `POST /v1/keys/{id}/rotate` (may be empty).
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// Seconds the old key keeps working, 0 (default) to 2592000 (30 days).
    #[schema(required = false, minimum = 0, maximum = 2592000)]
    pub grace_seconds: u64,
}

/// A key just issued: its metadata and, this one time, the key itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKey {
    /// Metadata, as listed later.
    #[serde(flatten)]
    pub meta: ApiKey,
    /// The key (`tg_...`): shown in this answer only.
    pub key: String,
    /// For a rotation: the key replaced and when it stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<ReplacedKey>,
}

/// The key a rotation replaces.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplacedKey {
    /// Its id.
    pub id: String,
    /// RFC 3339 end of its grace.
    pub works_until: Option<String>,
}

/// Longest rotation grace: 30 days.
const MAX_GRACE_SECONDS: u64 = 30 * 24 * 3600;

/// Issues a key to a customer; the answer is the only place the key ever appears.
#[utoipa::path(post, operation_id = "createKey", path = "/v1/customers/{id}/keys", tag = "keys", params(("id" = String, Path)),
    request_body = NewKeyBody,
    responses((status = 201, description = "Issued", body = IssuedKey), UpdateProblems))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &NEW_KEY_FIELDS, "", &mut errors);
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
            let parsed = value.as_str().and_then(rfc3339_ms);
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
        .map_err(ApiError::from_store("customer"))?;
    Ok((StatusCode::CREATED, Json(issued(created, None))).into_response())
}

/// Lists a customer's keys: metadata and display start, never the key or its hash.
#[utoipa::path(get, operation_id = "listKeys", path = "/v1/customers/{id}/keys", tag = "keys", params(("id" = String, Path), ListQuery),
    responses((status = 200, description = "A page of keys", body = Page<ApiKey>), ListProblems,
        (status = 404, description = "No such customer", body = tollgate_model::Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Path(customer_id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    let limit = page_limit(query.limit)?;
    state
        .store
        .customer(&customer_id)
        .await
        .map_err(ApiError::from_store("customer"))?;
    let keys = state
        .store
        .keys(&customer_id, limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(keys, limit, |k| k.id.clone()))
}

/// Reads a key's metadata: never the key or its hash.
#[utoipa::path(get, operation_id = "getKey", path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, description = "The key", body = ApiKey), ReadProblems))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let key = state
        .store
        .key(&id)
        .await
        .map_err(ApiError::from_store("key"))?;
    Ok(Json(key))
}

/// Revokes a key at once. Takes no body (an empty object or none): a field such as a reason
/// would be dropped, so it is refused.
#[utoipa::path(post, operation_id = "revokeKey", path = "/v1/keys/{id}/revoke", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, description = "The key, revoked", body = ApiKey), UpdateProblems))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalObject(fields): OptionalObject,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &[], "", &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let key = state
        .store
        .revoke_key(&id, &caller.actor)
        .await
        .map_err(ApiError::from_store("key"))?;
    Ok(Json(key).into_response())
}

/// Issues a new key in place of this one; the old one keeps working for `grace_seconds`. A
/// revoked or expired key is not rotated (409): issue a new key instead.
#[utoipa::path(post, operation_id = "rotateKey", path = "/v1/keys/{id}/rotate", tag = "keys", params(("id" = String, Path)),
    request_body(content = RotateBody, description = "May be left out: no grace"),
    responses((status = 201, description = "The new key, and when the old one stops", body = IssuedKey), UpdateProblems))]
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalObject(fields): OptionalObject,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &ROTATE_FIELDS, "", &mut errors);
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
        .map_err(ApiError::from_store("key"))?;
    let replaced = ReplacedKey {
        id: old.id,
        works_until: old.revoked_at,
    };
    Ok((StatusCode::CREATED, Json(issued(created, Some(replaced)))).into_response())
}

fn issued(created: CreatedKey, replaces: Option<ReplacedKey>) -> IssuedKey {
    IssuedKey {
        meta: created.key,
        key: created.plaintext,
        replaces,
    }
}
