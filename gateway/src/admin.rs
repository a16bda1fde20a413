//! The admin listener: `/health`, `/health/ready` and `/metrics`, never on a proxy listener;
//! in standalone mode also the control plane's API (`/v1`, `/openapi.json`).
//!
//! It runs on a thread and runtime of its own rather than as a Pingora listening service,
//! because Pingora closes every listening service at SIGTERM: this one stays open until the
//! process exits, so load balancers can watch `/health/ready` turn 503 while the proxy drains.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tollgate_control_plane::api::AppState;
use tollgate_control_plane::secret::PlainToken;
use tollgate_control_plane::store::Store;
use tollgate_control_plane::{OtherTokens, embedded_gateway_token};
use tollgate_model::{PROBLEM_CONTENT_TYPE, Problem};

use crate::identity::follow::{Renewal, Token};
use crate::proxy::request_id;
use crate::state::Gateway;
use crate::upstream::health::now_ms;

/// Serves the admin endpoints.
#[derive(Debug)]
pub struct Admin {
    gateway: Arc<Gateway>,
    control_plane: Option<AppState>,
}

impl Admin {
    /// Admin endpoints over `gateway`, with the control plane's API when it runs here.
    pub fn new(gateway: Arc<Gateway>, control_plane: Option<AppState>) -> Self {
        Self {
            gateway,
            control_plane,
        }
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
        let identities = self.identities();
        let waiting =
            self.gateway.control_plane.is_some() && self.gateway.identity.current().is_none();
        let ready = !draining && !waiting;
        let status = if draining {
            "draining"
        } else if waiting {
            "waiting for identities"
        } else {
            "ready"
        };
        let body = json!({
            "status": status,
            "identities": identities,
            "counters": self.counters(),
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

    /// Where rate limits and quotas are counted: in process, or in Redis (and whether Redis
    /// answers, or requests are counted in process until it does).
    fn counters(&self) -> serde_json::Value {
        match self.gateway.limiter.redis() {
            None => json!({"store": "in_process"}),
            Some(redis) => {
                let failing = redis.is_failing(self.gateway.limiter.now_ms());
                json!({
                    "store": "redis",
                    "redis_connected": redis.is_answering(),
                    "counting": if redis.is_connected() && !failing { "redis" } else { "in_process_fallback" },
                })
            }
        }
    }

    /// The identities part of `/health/ready`: `null` without a control plane.
    fn identities(&self) -> serde_json::Value {
        if self.gateway.control_plane.is_none() {
            return serde_json::Value::Null;
        }
        let now = crate::identity::unix_ms();
        let current = self.gateway.identity.current();
        let last_contact = self.gateway.identity.last_contact_ms();
        json!({
            "version": current.as_ref().map(|i| i.version),
            "keys": current.as_ref().map(|i| i.key_count()),
            "applied_at_unix": current.as_ref().map(|i| unix_seconds(i.applied_at)),
            "source": match (&current, self.gateway.identity.is_restored()) {
                (None, _) => "none",
                (Some(_), true) => "stored snapshot",
                (Some(_), false) => "control plane",
            },
            "last_contact_unix": last_contact.map(|ms| ms / 1000),
            "sync_age_seconds": self
                .gateway
                .identity
                .current_as_of_ms()
                .map(|ms| (now - ms).max(0) / 1000),
            // The control plane's clock less this gateway's, as last seen: key times follow it.
            "control_plane_clock_offset_ms": self.gateway.identity.control_plane_now_ms(now) - now,
        })
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The admin router.
pub fn router(admin: Arc<Admin>) -> Router {
    let mut router = Router::new()
        .route("/health", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Arc::clone(&admin));
    let detail = if let Some(state) = &admin.control_plane {
        router = router.merge(tollgate_control_plane::api::api(state.clone()));
        "the admin listener serves /health, /health/ready, /metrics, /openapi.json and the control plane's /v1"
    } else {
        "the admin listener serves /health, /health/ready and /metrics"
    };
    router
        .fallback(move || async move {
            problem(Problem::new("not-found", "Not found", 404).with_detail(detail))
        })
        // axum adds `Allow` with the path's own methods.
        .method_not_allowed_fallback(|| async {
            problem(
                Problem::new("method-not-allowed", "Method not allowed", 405)
                    .with_detail("this path does not take this method"),
            )
        })
        .layer(axum::middleware::from_fn(with_request_id))
}

async fn live() -> Response {
    no_store(Json(json!({"status": "ok"})).into_response())
}

async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let (ready, body) = admin.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    no_store((status, Json(body)).into_response())
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let gateway = &admin.gateway;
    gateway.publish_health();
    if let Some(ms) = gateway.identity.current_as_of_ms() {
        gateway
            .metrics
            .identity_sync_age
            .set((crate::identity::unix_ms() - ms).max(0) / 1000);
    }
    if let Some(meter) = &gateway.meter {
        meter.metrics.spool_bytes(meter.spool.bytes());
    }
    let mut body = gateway.metrics.render();
    if let Some(state) = &admin.control_plane {
        body.extend(tollgate_control_plane::api::metrics::text(state).await);
    }
    no_store(
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            body,
        )
            .into_response(),
    )
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn problem(problem: Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        problem.to_json(),
    )
        .into_response()
}

/// Every admin answer carries the request id: the client's when valid, else a new one; the
/// control plane's audit log records the same id.
async fn with_request_id(mut request: Request, next: Next) -> Response {
    let id = request_id::from_header(
        request
            .headers()
            .get(request_id::HEADER)
            .map(HeaderValue::as_bytes),
    );
    let value = HeaderValue::from_str(&id).ok();
    if let Some(value) = &value {
        request
            .headers_mut()
            .insert(request_id::HEADER, value.clone());
    }
    let mut response = next.run(request).await;
    if let Some(value) = value {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

/// The control plane a standalone gateway runs in its own process.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// Its store.
    pub database_url: String,
    /// `TOLLGATE_ADMIN_TOKEN`, checked.
    pub admin_token: Option<String>,
    /// The admin listener's address, which names this gateway's own token.
    pub admin_listen: std::net::SocketAddr,
    /// `TOLLGATE_USAGE_RETENTION_DAYS`, checked: how long raw usage events are kept.
    pub usage_retention: std::time::Duration,
}

/// What starting the admin listener gives back.
#[derive(Debug)]
pub struct Started {
    /// With an embedded control plane: the token this gateway follows it with.
    pub gateway_token: Option<PlainToken>,
    /// With an embedded control plane: how to make that token again, should an admin delete it.
    pub renewal: Option<Renewal>,
    /// With an embedded control plane: its store, the usage ledger.
    pub store: Option<Store>,
}

/// Serves the admin listener on a thread and runtime of its own, after opening the embedded
/// control plane's store (migrated, first admin ensured) when there is one. Returns once it
/// serves, or with the reason it cannot.
pub fn start(
    listener: std::net::TcpListener,
    gateway: Arc<Gateway>,
    embedded: Option<Embedded>,
) -> anyhow::Result<Started> {
    listener.set_nonblocking(true)?;
    let (ready, started) = std::sync::mpsc::channel::<anyhow::Result<Started>>();
    std::thread::Builder::new()
        .name("tollgate-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("tollgate-admin")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready.send(Err(error.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let prepared = match embedded {
                    Some(embedded) => open_control_plane(embedded).await.map(Some),
                    None => Ok(None),
                };
                let (control_plane, gateway_token, renewal) = match prepared {
                    Ok(Some((state, token, renewal))) => (Some(state), Some(token), Some(renewal)),
                    Ok(None) => (None, None, None),
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = ready.send(Err(error.into()));
                        return;
                    }
                };
                let store = control_plane.as_ref().map(|state| state.store.clone());
                let router = router(Arc::new(Admin::new(gateway, control_plane)));
                let _ = ready.send(Ok(Started {
                    gateway_token,
                    renewal,
                    store,
                }));
                if let Err(error) = axum::serve(listener, router).await {
                    tracing::error!(%error, "the admin listener stopped");
                }
            });
        })?;
    started
        .recv()
        .context("the admin listener's thread ended before it started")?
}

async fn open_control_plane(embedded: Embedded) -> anyhow::Result<(AppState, PlainToken, Renewal)> {
    let redacted = tollgate_control_plane::settings::redact_url(&embedded.database_url);
    let store = Store::connect(&embedded.database_url)
        .await
        .with_context(|| format!("control_plane.database_url: cannot open {redacted}"))?;
    store
        .migrate()
        .await
        .with_context(|| format!("control_plane.database_url: cannot migrate {redacted}"))?;
    if let Some(token) =
        tollgate_control_plane::ensure_first_admin(&store, embedded.admin_token.as_deref()).await?
    {
        println!(
            "first admin token (shown once, store it now): {}",
            token.expose()
        );
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let instance = format!("{host} {}", embedded.admin_listen);
    let gateway_token = embedded_gateway_token(&store, &instance, OtherTokens::Replaced).await?;
    let renewal = {
        let store = store.clone();
        Renewal::new(move || {
            let (store, instance) = (store.clone(), instance.clone());
            Box::pin(async move {
                let token = embedded_gateway_token(&store, &instance, OtherTokens::Kept).await?;
                Ok(Token::new(token.expose().to_owned()))
            })
        })
    };
    tollgate_control_plane::spawn_usage_pruning(store.clone(), embedded.usage_retention);
    tracing::info!(store = %redacted, "control plane running in this process");
    Ok((AppState::new(store), gateway_token, renewal))
}
