//! The admin listener: `/health`, `/health/ready` and `/metrics`, never on a proxy listener.
//!
//! It runs as a background service with a listener of its own rather than as a Pingora
//! listening service, because Pingora closes every listening service at SIGTERM: this one stays
//! open until the process exits, so load balancers can watch `/health/ready` turn 503 while the
//! proxy drains.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use tollgate_model::{PROBLEM_CONTENT_TYPE, Problem};

use crate::proxy::request_id;
use crate::state::Gateway;
use crate::upstream::health::now_ms;

/// How long an admin connection may take to send a request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

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

/// The admin listener as a background service.
#[derive(Debug)]
pub struct AdminServer {
    admin: Arc<Admin>,
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
}

impl AdminServer {
    /// Serves `admin` on `listener`, already bound (so port 0 is resolved before start-up ends).
    pub fn new(admin: Admin, listener: std::net::TcpListener) -> Self {
        Self {
            admin: Arc::new(admin),
            listener: std::sync::Mutex::new(Some(listener)),
        }
    }
}

#[async_trait]
impl BackgroundService for AdminServer {
    /// Deliberately ignores `shutdown`: see the module docs.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            });
        let listener = match listener {
            Some(Ok(listener)) => listener,
            Some(Err(error)) => {
                tracing::error!(%error, "admin listener cannot start");
                return;
            }
            None => return,
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let admin = self.admin.clone();
                    tokio::spawn(async move { admin.serve_connection(stream).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "admin listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Admin {
    /// Answers one request and closes the connection: admin traffic is a probe or a scrape every
    /// few seconds, where keep-alive saves nothing worth its bookkeeping.
    async fn serve_connection(&self, stream: tokio::net::TcpStream) {
        let stream: pingora::protocols::Stream =
            Box::new(pingora::protocols::l4::stream::Stream::from(stream));
        let mut session = ServerSession::new_http1(stream);
        session.set_read_timeout(Some(READ_TIMEOUT));
        if !matches!(session.read_request().await, Ok(true)) {
            return;
        }
        let id = request_id::from_header(
            session
                .req_header()
                .headers
                .get(request_id::HEADER)
                .map(http::HeaderValue::as_bytes),
        );
        let response = self.response(&mut session, &id).await;
        let (parts, body) = response.into_parts();
        let mut header: ResponseHeader = parts.into();
        if header.insert_header(request_id::HEADER, id).is_err() {
            return;
        }
        session.set_keepalive(None);
        let head_only = session.req_header().method == Method::HEAD;
        if session
            .write_response_header(Box::new(header))
            .await
            .is_err()
        {
            return;
        }
        if !head_only
            && session
                .write_response_body(body.into(), true)
                .await
                .is_err()
        {
            return;
        }
        let _ = session.finish().await;
    }

    /// The response to one admin request, whose id is `request_id`.
    pub async fn response(
        &self,
        session: &mut ServerSession,
        request_id: &str,
    ) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_owned());
        if method != Method::GET && method != Method::HEAD {
            let mut refusal = problem(
                Problem::new("method-not-allowed", "Method not allowed", 405)
                    .with_detail("the admin endpoints accept GET and HEAD")
                    .with_request_id(request_id),
            );
            refusal
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return refusal;
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
                    .with_detail("the admin listener serves /health, /health/ready and /metrics")
                    .with_request_id(request_id),
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
