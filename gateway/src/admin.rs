//! The admin listener: `/health`, `/health/ready` and `/metrics`, never on a proxy listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use tollgate_model::{PROBLEM_CONTENT_TYPE, Problem};

use crate::state::Gateway;
use crate::upstream::health::now_ms;

/// Serves the admin endpoints.
#[derive(Debug)]
pub struct Admin {
    gateway: Arc<Gateway>,
}

impl Admin {
    /// Admin endpoints over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// The `/health/ready` document and whether the gateway is ready.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let live = self.gateway.live();
        let draining = self.gateway.draining.load(Ordering::Relaxed);
        let now = now_ms();
        let upstreams: Vec<_> = live
            .pools
            .iter()
            .map(|pool| {
                let targets: Vec<_> = pool
                    .upstream
                    .targets
                    .iter()
                    .zip(&pool.health)
                    .enumerate()
                    .map(|(position, (target, health))| {
                        json!({
                            "target": position,
                            "address": target.name,
                            "healthy": health.is_available(now),
                            "active_check_healthy": health.is_active_healthy(),
                            "passively_marked_down": health.is_passively_down(now),
                        })
                    })
                    .collect();
                json!({
                    "name": pool.upstream.name,
                    "healthy_targets": pool.health.iter().filter(|h| h.is_available(now)).count(),
                    "targets": targets,
                })
            })
            .collect();
        let loaded_at = live
            .loaded_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ready = !draining;
        let body = json!({
            "status": if ready { "ready" } else { "draining" },
            "config": {
                "version": live.version,
                "loaded_at_unix": loaded_at,
                "age_seconds": live.loaded_at.elapsed().map_or(0, |d| d.as_secs()),
                "path": self.gateway.config_path.display().to_string(),
            },
            "uptime_seconds": self.gateway.started.elapsed().as_secs(),
            "upstreams": upstreams,
        });
        (ready, body)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_owned());
        if method != Method::GET && method != Method::HEAD {
            return problem(
                Problem::new("method-not-allowed", "Method not allowed", 405)
                    .with_detail("the admin endpoints accept GET and HEAD"),
            );
        }
        match path.as_str() {
            "/health" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/health/ready" => {
                let (ready, body) = self.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(status, &body)
            }
            "/metrics" => {
                self.gateway.publish_health();
                let body = self.gateway.metrics.render();
                response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                )
            }
            _ => problem(
                Problem::new("not-found", "Not found", 404)
                    .with_detail("the admin listener serves /health, /health/ready and /metrics"),
            ),
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Vec<u8>> {
    response(
        status,
        "application/json",
        serde_json::to_vec(body).unwrap_or_default(),
    )
}

fn problem(problem: Problem) -> Response<Vec<u8>> {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response(status, PROBLEM_CONTENT_TYPE, problem.to_json())
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    let length = response.body().len();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length.into());
    response
}
