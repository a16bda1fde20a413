//! `/health` (the process answers) and `/health/ready` (the store answers, migrations current).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, operation_id = "live", path = "/health", tag = "health", security(()),
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"}))))]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store answers and its migrations are current.
#[utoipa::path(get, operation_id = "ready", path = "/health/ready", tag = "health", security(()),
    responses(
        (status = 200, description = "Ready", body = Object,
            example = json!({"status": "ready", "store": "ok", "migrations": "current"})),
        (status = 503, description = "Not ready: the store is unreachable or migrations are pending", body = Object,
            example = json!({"status": "not ready", "store": "unreachable"}))))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.store.is_ready().await {
        Ok(true) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "store": "ok", "migrations": "current"})),
        ),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "store": "ok", "migrations": "pending"})),
        ),
        Err(error) => {
            tracing::warn!(%error, "store not reachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "not ready", "store": "unreachable"})),
            )
        }
    }
}
