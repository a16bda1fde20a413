//! `/health` (the process answers) and `/health/ready` (the store answers, migrations current).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Liveness.
pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness.
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
