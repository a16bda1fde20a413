//! Upstream servers for tests, each on its own runtime and thread so that stopping one closes
//! every socket it had, pooled keep-alive connections included.
//!
//! Endpoints:
//! - `GET /health`: 200, or 503 after `set_healthy(false)`.
//! - `/slow/{ms}`: answers after `ms` milliseconds.
//! - `/drip`: sends the header at once, then one byte every 100 ms for ever.
//! - `/stream`: sends `first\n`, then `last\n` once the test calls `release()`.
//! - `/status/{code}`: answers with that status.
//! - `/ws`: a WebSocket echo.
//! - `/own-limit-headers`: 200 with limit headers of its own (each of the gateway's eleven and
//!   two other spellings, `42`).
//! - `/own-cors`: 200 open to every origin by its own CORS headers (`*`, with credentials).
//! - anything else: a JSON echo of the request (upstream name, method, path with query,
//!   headers, body length).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, oneshot};

#[derive(Default)]
struct Shared {
    name: String,
    healthy: AtomicBool,
    requests: AtomicUsize,
    health_checks: AtomicUsize,
    connections: Mutex<HashSet<SocketAddr>>,
    release: Notify,
}

/// A running upstream; stopped when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Starts an upstream named `name` on a free port.
    pub fn start(name: &str) -> Upstream {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts an upstream on `addr` (to bring a stopped one back on its port).
    pub fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            healthy: AtomicBool::new(true),
            ..Shared::default()
        });
        let listener = std::net::TcpListener::bind(addr).expect("bind the upstream");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(shared.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                );
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_timeout(Duration::ZERO);
        });
        Upstream {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops it: the port refuses connections and open connections are closed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Makes `/health` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests served, health checks excluded.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` requests have arrived (health checks excluded).
    pub async fn wait_for_requests(&self, count: usize) {
        let started = std::time::Instant::now();
        while self.requests() < count {
            assert!(
                started.elapsed() < crate::gateway::PATIENCE,
                "only {} of {count} requests arrived",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Health checks served.
    pub fn health_checks(&self) -> usize {
        self.shared.health_checks.load(Ordering::SeqCst)
    }

    /// Distinct client connections that sent a request, health checks excluded.
    pub fn connections(&self) -> usize {
        self.shared.connections.lock().unwrap().len()
    }

    /// Lets `/stream` send its last chunk.
    pub fn release(&self) {
        self.shared.release.notify_one();
    }

    /// `"127.0.0.1:port"`.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/slow/{ms}", any(slow))
        .route("/drip", any(drip))
        .route("/stream", any(stream))
        .route("/status/{code}", any(status))
        .route("/ws", any(websocket))
        .route("/own-limit-headers", any(own_limit_headers))
        .route("/own-cors", any(own_cors))
        .fallback(echo)
        .with_state(shared)
}

fn count(shared: &Shared, peer: SocketAddr) {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    shared.connections.lock().unwrap().insert(peer);
}

async fn health(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.health_checks.fetch_add(1, Ordering::SeqCst);
    if shared.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn slow(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(ms): Path<u64>,
) -> String {
    count(&shared, peer);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("{} slept {ms} ms", shared.name)
}

async fn drip(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    count(&shared, peer);
    let chunks = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from_static(b".")), ()))
    });
    Body::from_stream(chunks).into_response()
}

async fn stream(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    count(&shared, peer);
    let chunks = futures_util::stream::unfold(0, move |step| {
        let shared = shared.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"first\n")), 1)),
                1 => {
                    shared.release.notified().await;
                    Some((Ok(Bytes::from_static(b"last\n")), 2))
                }
                _ => None,
            }
        }
    });
    Body::from_stream(chunks).into_response()
}

async fn status(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(code): Path<u16>,
) -> StatusCode {
    count(&shared, peer);
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Limit headers of other spellings than the gateway's, as an upstream might send them.
pub const OTHER_LIMIT_HEADERS: [&str; 2] = ["ratelimit-used", "x-ratelimit-used"];

async fn own_limit_headers(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    count(&shared, peer);
    let mut response = "limited upstream".into_response();
    for name in crate::LIMIT_HEADERS.into_iter().chain(OTHER_LIMIT_HEADERS) {
        response
            .headers_mut()
            .insert(name, axum::http::HeaderValue::from_static("42"));
    }
    response
}

async fn own_cors(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    count(&shared, peer);
    (
        [
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("access-control-expose-headers", "*"),
        ],
        "open to all",
    )
        .into_response()
}

async fn websocket(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: WebSocketUpgrade,
) -> Response {
    count(&shared, peer);
    let name = shared.name.clone();
    upgrade.on_upgrade(move |socket| async move {
        let (mut sink, mut stream) = socket.split();
        while let Some(Ok(message)) = stream.next().await {
            let reply = match message {
                Message::Text(text) => Message::Text(format!("{name}: {}", text.as_str()).into()),
                Message::Binary(data) => Message::Binary(data),
                Message::Close(_) => break,
                _ => continue,
            };
            if sink.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn echo(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    count(&shared, peer);
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = serde_json::json!({
        "upstream": shared.name,
        "method": method.as_str(),
        "path": uri.path_and_query().map_or("/", |pq| pq.as_str()),
        "headers": headers,
        "body_len": body.len(),
        // Enough text for compression to matter.
        "padding": "tollgate ".repeat(64),
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}
