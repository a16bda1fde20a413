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
//! - [`usage`]: usage batches from gateways, period sums, a customer's usage view.
//! - [`health`]: `/health`, `/health/ready`.
//! - [`metrics`]: `/metrics`, and the middleware that counts requests.
//! - [`openapi`]: the OpenAPI document, generated from the handlers.

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
pub mod openapi;
pub mod plans;
pub mod usage;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::ApiError;

use crate::snapshot::Snapshots;
use crate::store::Store;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Request metrics.
    pub metrics: metrics::Metrics,
    /// The latest gateway snapshot.
    pub snapshots: Snapshots,
    /// The store's latest version, for gateways waiting on the change feed.
    pub versions: feed::Versions,
}

impl AppState {
    /// State over `store`, with fresh metrics.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            metrics: metrics::Metrics::new(),
            snapshots: Snapshots::default(),
            versions: feed::Versions::default(),
        }
    }
}

/// The whole API: `/v1`, `/openapi.json`, `/health`, `/health/ready` and `/metrics`.
pub fn app(state: AppState) -> Router {
    let (health, _) = health_routes().split_for_parts();
    let health = health
        .route("/metrics", get(metrics::render))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::layer,
        ))
        .with_state(state.clone());
    api(state)
        .merge(health)
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// `/v1` and `/openapi.json` only, without a fallback: what a gateway running the control plane
/// in its own process serves beside its own `/health` and `/metrics`.
pub fn api(state: AppState) -> Router {
    let (router, _) = v1_routes().split_for_parts();
    let document = Json(openapi_document());
    router
        .route("/openapi.json", get(move || async move { document }))
        .layer(axum::middleware::map_response(stamp_time))
        .layer(DefaultBodyLimit::max(body::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            feed::written_layer,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::layer,
        ))
        .with_state(state)
}

/// The health routes, each registered with its OpenAPI operation.
fn health_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
}

/// The `/v1` routes, each registered with its OpenAPI operation.
fn v1_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(plans::list, plans::create))
        .routes(routes!(plans::get, plans::update, plans::delete))
        .routes(routes!(customers::list, customers::create))
        .routes(routes!(customers::get, customers::update))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::get))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::rotate))
        .routes(routes!(admin_tokens::list, admin_tokens::create))
        .routes(routes!(admin_tokens::delete))
        .routes(routes!(audit_log::list))
        .routes(routes!(feed::snapshot))
        .routes(routes!(feed::changes))
        .merge(
            // Usage batches are up to 8 MiB; this limit, set nearer the handler, wins over the
            // 1 MiB of every other route.
            OpenApiRouter::new()
                .routes(routes!(usage::record))
                .layer(DefaultBodyLimit::max(usage::MAX_BATCH_BODY)),
        )
        .routes(routes!(usage::period))
        .routes(routes!(usage::customer))
}

/// The OpenAPI document, as served at `/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    openapi::finish(v1_routes().merge(health_routes()).into_openapi())
}

/// The header with this control plane's clock (Unix ms) when it answered. Key expiries, ends
/// of rotation grace and revocations are times of this clock; a gateway compares them with its
/// own clock set off by the difference it sees here, so that a gateway whose clock is behind
/// does not accept a revoked key for as long.
pub const TIME_HEADER: &str = "tollgate-time-ms";

async fn stamp_time(mut response: axum::response::Response) -> axum::response::Response {
    response
        .headers_mut()
        .insert(TIME_HEADER, crate::store::now_ms().into());
    response
}
