//! The admin API under `/v1`, and `/health`.
//!
//! # Layout
//! - [`error`]: errors to problem responses, in one place.
//! - [`auth`]: the admin-token extractor and role checks.
//! - [`body`]: reading and checking JSON bodies field by field.
//! - [`idempotency`]: `Idempotency-Key` on `POST`s.
//! - [`plans`]: the `/v1/plans` resource.
//! - [`customers`]: the `/v1/customers` resource.
//! - [`keys`]: API keys of customers: create, list, revoke, rotate.
//! - [`admin_tokens`]: the `/v1/admin-tokens` resource.
//! - [`audit_log`]: the `/v1/audit-log` listing.
//! - [`feed`]: the snapshot and the changes gateways follow.
//! - [`health`]: `/health`, `/health/ready`.
//! - [`metrics`]: `/metrics`, and the middleware that counts requests.

pub mod admin_tokens;
pub mod audit_log;
pub mod auth;
pub mod body;
pub mod customers;
pub mod error;
pub mod feed;
pub mod health;
pub mod idempotency;
pub mod keys;
pub mod metrics;
pub mod plans;

use axum::Router;
use axum::routing::{delete, get, post};

use crate::store::Store;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Request metrics.
    pub metrics: metrics::Metrics,
}

impl AppState {
    /// State over `store`, with fresh metrics.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            metrics: metrics::Metrics::new(),
        }
    }
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics::render))
        .route("/v1/plans", get(plans::list).post(plans::create))
        .route(
            "/v1/plans/{id}",
            get(plans::get).patch(plans::update).delete(plans::delete),
        )
        .route(
            "/v1/customers",
            get(customers::list).post(customers::create),
        )
        .route(
            "/v1/customers/{id}",
            get(customers::get).patch(customers::update),
        )
        .route(
            "/v1/customers/{id}/keys",
            get(keys::list).post(keys::create),
        )
        .route("/v1/keys/{id}/revoke", post(keys::revoke))
        .route("/v1/keys/{id}/rotate", post(keys::rotate))
        .route(
            "/v1/admin-tokens",
            get(admin_tokens::list).post(admin_tokens::create),
        )
        .route("/v1/admin-tokens/{id}", delete(admin_tokens::delete))
        .route("/v1/audit-log", get(audit_log::list))
        .route("/v1/gateway/snapshot", get(feed::snapshot))
        .route("/v1/gateway/changes", get(feed::changes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::layer,
        ))
        .with_state(state)
}
