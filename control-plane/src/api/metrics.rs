//! `/metrics` of the control plane (Prometheus text): requests by route, method and status
//! class, their latency, and the config version. Routes are the matched patterns
//! (`/v1/plans/{id}`), never the ids themselves.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use tollgate_model::usage::UsageStored;

use super::AppState;

/// Requests answered.
pub const REQUESTS_TOTAL: &str = "tollgate_control_plane_requests_total";
/// Request latency.
pub const REQUEST_DURATION: &str = "tollgate_control_plane_request_duration_seconds";
/// The latest config version in the change log.
pub const CONFIG_VERSION: &str = "tollgate_control_plane_config_version";
/// Usage events received from gateways, by outcome: `inserted` (new to the ledger) or
/// `duplicate` (stored already: a retried or overlapping batch).
pub const USAGE_EVENTS_TOTAL: &str = "tollgate_control_plane_usage_events_total";

/// The control plane's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    version: IntGauge,
    usage_events: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let build = || -> prometheus::Result<Metrics> {
            let registry = Registry::new();
            let requests = IntCounterVec::new(
                Opts::new(
                    REQUESTS_TOTAL,
                    "Requests answered, by route, method and status class.",
                ),
                &["route", "method", "status_class"],
            )?;
            let duration = HistogramVec::new(
                HistogramOpts::new(REQUEST_DURATION, "Time to answer a request, by route."),
                &["route"],
            )?;
            let version =
                IntGauge::new(CONFIG_VERSION, "Latest config version in the change log.")?;
            let usage_events = IntCounterVec::new(
                Opts::new(
                    USAGE_EVENTS_TOTAL,
                    "Usage events received from gateways, inserted or duplicate.",
                ),
                &["outcome"],
            )?;
            registry.register(Box::new(requests.clone()))?;
            registry.register(Box::new(duration.clone()))?;
            registry.register(Box::new(version.clone()))?;
            registry.register(Box::new(usage_events.clone()))?;
            Ok(Metrics {
                registry,
                requests,
                duration,
                version,
                usage_events,
            })
        };
        build().unwrap_or_else(|error| panic!("metric definitions are static and valid: {error}"))
    }
}

impl Metrics {
    /// Counts the events of a stored usage batch.
    pub fn count_usage(&self, stored: &UsageStored) {
        for (outcome, events) in [
            ("inserted", stored.inserted),
            ("duplicate", stored.duplicates),
        ] {
            self.usage_events
                .with_label_values(&[outcome])
                .inc_by(events);
        }
    }
}

/// Counts every request under its matched route.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(none)".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let class = format!("{}xx", response.status().as_u16() / 100);
    let metrics = &state.metrics;
    metrics
        .requests
        .with_label_values(&[&route, &method, &class])
        .inc();
    metrics
        .duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The Prometheus text of the control plane's metrics, the config version read first.
pub async fn text(state: &AppState) -> Vec<u8> {
    match state.store.latest_version().await {
        Ok(version) => state.metrics.version.set(version),
        Err(error) => tracing::warn!(%error, "cannot read the config version for /metrics"),
    }
    let mut out = Vec::new();
    if let Err(error) = TextEncoder::new().encode(&state.metrics.registry.gather(), &mut out) {
        tracing::error!(%error, "cannot encode metrics");
    }
    out
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    let out = text(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
