//! The feed gateways follow, for `gateway` tokens only:
//! - `GET /v1/gateway/snapshot`: everything enforced, at a config version.
//! - `GET /v1/gateway/changes?since=V&since_at_ms=T&wait_ms=N`: the changes after `V`, in order;
//!   when there is none yet, the request waits up to `wait_ms` (at most 30 s) and answers as soon
//!   as one is committed. `T`, when given, is when `V`'s change was made, as the snapshot or the
//!   last page said: a store whose change `V` was made at another time is another history (a
//!   replaced store, or one restored from a backup that has gone on since), answered 409.
//!
//! **Waiting.** However many gateways wait, one task per process reads the store's latest
//! version for all of them ([`Versions`]): every 100 ms while any waits, which sees changes made
//! by other control-plane processes on the same database, and at once after a write through this
//! process's API. A waiting request reads its changes again only when the version moved. (Each
//! waiting request polling the store itself cost 10 queries a second per gateway.) A request
//! with no `wait_ms` reads its changes once and does not involve the reader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tollgate_model::feed::{Changes, SNAPSHOT_VERSION_HEADER as VERSION_HEADER, Snapshot};
use utoipa::IntoParams;

use super::AppState;
use super::auth::GatewayCaller;
use super::body::{Query, error};
use super::error::ApiError;
use super::openapi::FeedProblems;
use crate::store::Store;

const MAX_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const MAX_CHANGES: u32 = 1000;

/// Everything gateways enforce, at one config version: streamed, gzip-compressed when the
/// request accepts it.
#[utoipa::path(get, operation_id = "getSnapshot", path = "/v1/gateway/snapshot", tag = "gateway feed",
    params(("Accept-Encoding" = Option<String>, Header, description = "`gzip` gets the snapshot compressed (Content-Encoding: gzip)")),
    responses((status = 200, description = "The snapshot", body = Snapshot,
        headers(("X-Tollgate-Config-Version" = i64, description = "The config version of the snapshot"))), FeedProblems))]
pub async fn snapshot(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let file = state.snapshots.current(&state.store).await?;
    let gzip = accepts_gzip(&headers);
    let chunks = file.stream(gzip);
    let body = Body::from_stream(futures_util::stream::unfold(chunks, |mut chunks| async {
        chunks.recv().await.map(|chunk| (chunk, chunks))
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(VERSION_HEADER, HeaderValue::from(file.version));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.gzip_bytes));
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.json_bytes));
    }
    Ok(response)
}

/// Whether `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let weight_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !weight_zero
        })
}

/// Query of `GET /v1/gateway/changes`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// The version the gateway has.
    #[param(minimum = 0)]
    pub since: i64,
    /// The `version_at_ms` of that version, as the snapshot or the last page gave it: when the
    /// store's change of `since` was made at another time (the store was replaced, or restored
    /// from a backup and has gone on since), the answer is 409 and the gateway takes a snapshot.
    pub since_at_ms: Option<i64>,
    /// How long to wait for a change, in milliseconds (default 0, at most 30000).
    #[param(minimum = 0, maximum = 30000)]
    pub wait_ms: Option<u64>,
    /// Most changes per answer (default and maximum 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The changes after `since`, in order; waits up to `wait_ms` for one when there is none yet.
#[utoipa::path(get, operation_id = "getChanges", path = "/v1/gateway/changes", tag = "gateway feed", params(ChangesQuery),
    responses((status = 200, description = "The changes, possibly none", body = Changes), FeedProblems))]
pub async fn changes(
    State(state): State<AppState>,
    _caller: GatewayCaller,
    Query(query): Query<ChangesQuery>,
) -> Result<Json<Changes>, ApiError> {
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(ApiError::Invalid(vec![error(
            "wait_ms",
            "must be at most 30000",
        )]));
    }
    let limit = query.limit.unwrap_or(MAX_CHANGES);
    if !(1..=MAX_CHANGES).contains(&limit) {
        return Err(ApiError::Invalid(vec![error("limit", "must be 1 to 1000")]));
    }
    if query.since < 0 || query.since > state.store.latest_version().await? {
        return Err(ApiError::Conflict(
            "since is not a version of this store: fetch the snapshot again".into(),
        ));
    }
    same_history(&state.store, &query).await?;
    if wait.is_zero() {
        return Ok(Json(state.store.changes_since(query.since, limit).await?));
    }
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before reading, so a version read after this read is not missed.
    let mut moved = state.versions.subscribe(&state.store);
    loop {
        let changes = state.store.changes_since(query.since, limit).await?;
        if !changes.changes.is_empty() {
            // Checked again: the store may have been restored, and have gone on past `since`,
            // while the request waited.
            same_history(&state.store, &query).await?;
            return Ok(Json(changes));
        }
        if tokio::time::timeout_at(deadline, moved.changed())
            .await
            .is_err()
        {
            return Ok(Json(changes));
        }
    }
}

/// 409 when the store's change of `since` was made at another time than `since_at_ms` says:
/// the gateway's state is of another history.
async fn same_history(store: &Store, query: &ChangesQuery) -> Result<(), ApiError> {
    if let Some(at) = query.since_at_ms
        && query.since > 0
        && store.version_at(query.since).await? != Some(at)
    {
        return Err(ApiError::Conflict(
            "since is a version of another history than this store's (the store was replaced \
             or restored from a backup): fetch the snapshot again"
                .into(),
        ));
    }
    Ok(())
}

/// The store's latest config version, read by one task for every waiting request.
#[derive(Debug, Clone, Default)]
pub struct Versions {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The latest version read; sent when it differs from the one before.
    latest: watch::Sender<i64>,
    /// Reads the version now: a write went through this process, or a request waits on an idle
    /// reader.
    read_now: Notify,
    /// How often the version is read while a request waits.
    poll: Duration,
    /// The reading task, once started (started again if its runtime ended).
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Whether the reader waits for a request to wait: set by the reader, under this lock, only
    /// when it saw none subscribed; taken by the next subscriber, who then wakes it.
    idle: Mutex<bool>,
    /// Reads of the store's version so far.
    reads: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Self::polling_every(POLL)
    }
}

impl Shared {
    fn idle(&self) -> std::sync::MutexGuard<'_, bool> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no request waits; if so, marks the reader idle (both under the lock).
    fn nobody_waits(&self) -> bool {
        let mut idle = self.idle();
        *idle = self.latest.receiver_count() == 0;
        *idle
    }

    fn polling_every(poll: Duration) -> Self {
        Self {
            latest: watch::Sender::new(0),
            read_now: Notify::new(),
            poll,
            reader: Mutex::new(None),
            idle: Mutex::new(false),
            reads: AtomicU64::new(0),
        }
    }
}

impl Versions {
    /// Versions read every `poll` while a request waits, instead of every 100 ms (a test's way
    /// of telling the two ways a change is seen apart).
    pub fn polling_every(poll: Duration) -> Self {
        Self {
            shared: Arc::new(Shared::polling_every(poll)),
        }
    }

    /// A receiver whose `changed` resolves when a version other than the one it has seen (the
    /// latest read, when subscribing) is read. Starts the reading task on the caller's runtime
    /// if it does not run, and wakes it if it was idle.
    pub fn subscribe(&self, store: &Store) -> VersionReceiver {
        let receiver = self.shared.latest.subscribe();
        {
            let mut reader = self
                .shared
                .reader
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if reader.as_ref().is_none_or(JoinHandle::is_finished) {
                *reader = Some(tokio::spawn(read_versions(
                    Arc::clone(&self.shared),
                    store.clone(),
                )));
            }
        }
        // Subscribed first: a reader that looks after this sees the receiver, and one that
        // looked before has set `idle` by now.
        let idle = std::mem::take(&mut *self.shared.idle());
        if idle {
            self.shared.read_now.notify_one();
        }
        VersionReceiver(receiver)
    }

    /// A write went through this process: waiting gateways learn of it now rather than at the
    /// next read.
    pub fn written(&self) {
        self.shared.read_now.notify_one();
    }

    /// How many times the store's version has been read.
    pub fn reads(&self) -> u64 {
        self.shared.reads.load(Ordering::Relaxed)
    }
}

/// Told when the store's version moves.
#[derive(Debug)]
pub struct VersionReceiver(watch::Receiver<i64>);

impl VersionReceiver {
    /// Resolves once a version other than the last one this receiver has seen is read.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            // The sender lives as long as the state; never reached while it does.
            std::future::pending::<()>().await;
        }
    }
}

/// Reads the version every `poll` while a request waits (and at once when told to), and sends
/// it when it moved; sleeps while none waits. Ends once its state is gone.
async fn read_versions(shared: Arc<Shared>, store: Store) {
    const IDLE_CHECK: Duration = Duration::from_secs(10);
    const READ_TIMEOUT: Duration = Duration::from_secs(1);
    let mut failing = false;
    loop {
        while shared.nobody_waits() {
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            let _ = tokio::time::timeout(IDLE_CHECK, shared.read_now.notified()).await;
        }
        shared.reads.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(READ_TIMEOUT, store.latest_version()).await {
            Ok(Ok(version)) => {
                // Moved either way: a database restored to an earlier version counts up again
                // past versions already seen.
                shared.latest.send_if_modified(|latest| {
                    let moved = version != *latest;
                    *latest = version;
                    moved
                });
                if failing {
                    failing = false;
                    tracing::info!("the config version for waiting gateways is read again");
                }
            }
            failed => {
                if !failing {
                    failing = true;
                    let error = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {} ms", READ_TIMEOUT.as_millis()),
                    };
                    tracing::warn!(%error, "cannot read the config version for waiting gateways; they get changes when their wait ends");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(shared.poll) => {}
            () = shared.read_now.notified() => {}
        }
    }
}

/// Tells waiting gateways at once about a write made through this API (any request but a read,
/// answered with success, outside the gateways' own routes).
pub async fn written_layer(
    State(state): State<super::AppState>,
    request: Request,
    next: Next,
) -> Response {
    let writes = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) && !request.uri().path().starts_with("/v1/gateway/");
    let response = next.run(request).await;
    if writes && response.status().is_success() {
        state.versions.written();
    }
    response
}
