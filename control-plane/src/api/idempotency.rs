//! `Idempotency-Key` on `POST`s: a retried request with the same key (from the same admin token)
//! gets the first answer again, marked `Idempotent-Replayed: true`, and changes nothing; the
//! same key with a different request is refused with 422. Only successful answers are
//! remembered, so a request that failed can be retried under its key.
//!
//! Usage batches ([`NOT_REMEMBERED`]) pass through without it: their event ids already make a
//! retry count nothing twice, and their bodies are larger than what is remembered.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_model::FieldError;

use super::AppState;
use super::body::MAX_BODY;
use super::error::ApiError;
use crate::store::idempotency::Remembered;

/// The header.
pub const HEADER: &str = "idempotency-key";
/// Marks a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";

/// `POST` paths that do not read `Idempotency-Key`: idempotent by their content.
pub const NOT_REMEMBERED: [&str; 1] = ["/v1/gateway/usage"];

/// The middleware.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || NOT_REMEMBERED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER).cloned() else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            key.to_owned()
        }
        _ => {
            return ApiError::Invalid(vec![FieldError {
                path: "Idempotency-Key".into(),
                message: "must be 1 to 255 visible ASCII characters".into(),
            }])
            .into_response();
        }
    };
    // Keyed by the caller's token (hashed): keys of different admins never collide.
    let actor = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(crate::secret::hash)
        .unwrap_or_default();
    let path = request.uri().path().to_owned();
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ApiError::TooLarge(MAX_BODY).into_response();
    };
    let request_hash = hex::encode(
        Sha256::new()
            .chain_update(parts.method.as_str())
            .chain_update(b" ")
            .chain_update(&path)
            .chain_update(b"\n")
            .chain_update(&body)
            .finalize(),
    );
    match state.store.remembered(&actor, &key).await {
        Ok(Some(remembered)) if remembered.request_hash == request_hash => {
            return replay(&remembered);
        }
        Ok(Some(_)) => {
            return ApiError::Invalid(vec![FieldError {
                path: "Idempotency-Key".into(),
                message: "was already used for a different request".into(),
            }])
            .into_response();
        }
        Ok(None) => {}
        Err(error) => return ApiError::from(error).into_response(),
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ApiError::Internal("response body too large to remember".into()).into_response();
    };
    let header_text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let stored = json!({
        "content_type": header_text(header::CONTENT_TYPE),
        "location": header_text(header::LOCATION),
        "body": String::from_utf8_lossy(&body),
    });
    let answer = Remembered {
        request_hash,
        status: parts.status.as_u16(),
        response: stored.to_string(),
    };
    if let Err(error) = state.store.remember(&actor, &key, &path, &answer).await {
        tracing::warn!(%error, "cannot remember an idempotent answer");
    }
    Response::from_parts(parts, Body::from(body))
}

fn replay(remembered: &Remembered) -> Response {
    let stored: Value = serde_json::from_str(&remembered.response).unwrap_or(Value::Null);
    let status = StatusCode::from_u16(remembered.status).unwrap_or(StatusCode::OK);
    let body = stored["body"].as_str().unwrap_or("").to_owned();
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    for (name, field) in [
        (header::CONTENT_TYPE, "content_type"),
        (header::LOCATION, "location"),
    ] {
        if let Some(value) = stored[field]
            .as_str()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            headers.insert(name, value);
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
