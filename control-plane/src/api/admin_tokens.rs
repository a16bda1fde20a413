//! `/v1/admin-tokens`: create (the token is shown once), list, delete.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::body::{Object, Page, Query, error, page, page_limit, unknown_fields};
use super::error::ApiError;
use super::openapi::{CreateProblems, DeleteProblems, ListProblems};
use super::plans::ListQuery;
use crate::secret::{PlainToken, Role, hash};
use crate::store::StoreError;
use crate::store::admin_tokens::{AdminToken, DeleteTokenError};

/// The fields of a new token's body.
pub const FIELDS: [&str; 2] = ["name", "role"];

/// Body of `POST /v1/admin-tokens`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "ci", "role": "viewer"}))]
pub struct NewTokenBody {
    /// 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// `admin` does everything, `viewer` only reads, `gateway` only follows the feed.
    pub role: Role,
}

/// A token just created: its metadata and, this one time, the token itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedToken {
    /// Metadata, as listed later.
    #[serde(flatten)]
    pub meta: AdminToken,
    /// The token (`tga_...`): shown in this answer only.
    pub token: String,
}

/// Creates an admin, viewer or gateway token; the answer is the only place it ever appears.
#[utoipa::path(post, operation_id = "createAdminToken", path = "/v1/admin-tokens", tag = "admin-tokens",
    request_body = NewTokenBody,
    responses((status = 201, description = "Created", body = IssuedToken), CreateProblems))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut errors = Vec::new();
    unknown_fields(&fields, &FIELDS, "", &mut errors);
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
    let issued = IssuedToken {
        meta: stored,
        token: token.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}

/// Lists tokens: ids, names, roles; never a token or a hash.
#[utoipa::path(get, operation_id = "listAdminTokens", path = "/v1/admin-tokens", tag = "admin-tokens", params(ListQuery),
    responses((status = 200, description = "A page of tokens", body = Page<AdminToken>), ListProblems))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<AdminToken>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let tokens = state
        .store
        .admin_tokens(limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(tokens, limit, |t| t.id.clone()))
}

/// Deletes a token; 409 for the last admin token.
#[utoipa::path(delete, operation_id = "deleteAdminToken", path = "/v1/admin-tokens/{id}", tag = "admin-tokens", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), DeleteProblems))]
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
