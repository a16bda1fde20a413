//! Following the control plane: the snapshot at start, then every change as it is made, and the
//! last good state kept on disk.
//!
//! - At start the stored snapshot (and the changes journaled after it) is loaded if there is
//!   one, so a gateway restarted while the control plane is down serves at once.
//! - Without identities, or when the feed says the version is unknown (409), or a change
//!   cannot be applied, the full snapshot is fetched. It is streamed: gzip bytes go to a
//!   temporary file and, decompressed, into the index entry by entry. Only a snapshot that
//!   reads and checks completely replaces the running identities and the stored file.
//! - Otherwise the feed is long-polled (`wait_ms`), so a change reaches the request path about
//!   as soon as it is committed. Each applied page of changes is appended to the journal.
//! - Failures are retried with a growing delay; the identities in use stay. A control plane
//!   that cannot be reached is tried again at least every 500 ms, so a change made as it comes
//!   back is enforced about as soon as one made while it was up; one that answers with an error
//!   status, after a delay growing to 2 s; one that sends what cannot be used (a snapshot that
//!   does not check), after a delay growing to 10 s. A feed request is given up 3 s after its
//!   long poll should have ended (a control plane that accepts connections and hangs).
//! - In standalone mode, a token the control plane in this process refuses (an admin deleted
//!   it) is replaced by a new one ([`Renewal`]).
//!
//! # Layout
//! - here: the service, its loop and its pace, and the restore at start.
//! - `fetch`: the snapshot and a page of changes, fetched and applied.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::index::{Identities, ScopeInterner};
pub use super::stored::{Restored, Stored};
use crate::state::Gateway;

mod fetch;

use fetch::SyncError;

/// How long one request to the change feed waits for a change: the control plane confirms the
/// identities current at least this often (`sync_age_seconds`), and a connection cut without a
/// word (or a control plane that hangs) shows after this and [`LONG_POLL_MARGIN`].
const LONG_POLL: Duration = Duration::from_secs(5);
/// How long past [`LONG_POLL`] a feed request waits for its answer before it is given up.
const LONG_POLL_MARGIN: Duration = Duration::from_secs(3);
/// Longest delay between failed attempts whose next one takes a full snapshot (one that did
/// not check): a costly transfer, for the control plane and the gateway.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest delay between attempts that a control plane answered with an error status (a
/// refused token, an overload, a restart behind a load balancer): a change made as it
/// recovers waits for the next.
const MAX_BACKOFF_REFUSED: Duration = Duration::from_secs(2);
/// Longest delay between attempts to reach a control plane that could not be reached: an
/// attempt costs it nothing, and a change made as it comes back waits for the next.
const MAX_BACKOFF_UNREACHABLE: Duration = Duration::from_millis(500);
/// Journaled change pages past which the next sync fetches a fresh snapshot instead.
const JOURNAL_LIMIT: usize = 10_000;
/// Least time between two snapshots taken because changes could not be journaled.
const STORAGE_RETRY: Duration = Duration::from_secs(300);

/// Where the feed comes from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The control plane's base URL.
    pub base_url: String,
    /// A token with role `gateway`.
    pub token: Token,
    /// For the control plane this process runs itself: how to make a new token when it
    /// refuses the one in use (an admin deleted it through the admin API).
    pub renewal: Option<Renewal>,
}

/// A control-plane token; `Debug` does not print it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// `token`, kept from `Debug`.
    pub fn new(token: String) -> Self {
        Self(token)
    }

    /// The token, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Makes a new `gateway` token for the control plane this process runs, once its own was
/// deleted, and gives it back.
#[derive(Clone)]
pub struct Renewal(Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<Token>> + Send + Sync>);

impl Renewal {
    /// A renewal that runs `renew`.
    pub fn new(
        renew: impl Fn() -> BoxFuture<'static, anyhow::Result<Token>> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(renew))
    }
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renewal")
    }
}

/// Least time between two renewals of the embedded control plane's token: one that is refused
/// again at once is not the token's fault, and is not renewed in a loop.
const RENEWAL_PAUSE: Duration = Duration::from_secs(10);

/// The follower, as a background service.
#[derive(Debug)]
pub struct Follower {
    gateway: Arc<Gateway>,
    /// The control plane's base URL.
    base_url: String,
    /// How to make a new token, for the control plane in this process.
    renewal: Option<Renewal>,
    /// The token in use: the source's, or the last one `renewal` made. Read by each request
    /// to the control plane and replaced by a renewal, which only the follow loop makes: a lock
    /// that is never contended.
    token: RwLock<Token>,
    stored: Stored,
    /// The version the stored state ends at (the snapshot's, or its journal's last page's):
    /// a page of changes is journaled only when it starts there. [`NOT_STORED`] while the
    /// running identities' snapshot could not be stored: their pages would not follow on.
    journal_base: AtomicI64,
    client: reqwest::Client,
}

/// [`Follower::journal_base`] while nothing the journal can follow on from is stored.
const NOT_STORED: i64 = i64::MIN;

impl Follower {
    /// Follows `source` for `gateway`, keeping the last good state in `stored`.
    pub fn new(gateway: Arc<Gateway>, source: Source, stored: Stored) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("tollgate-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            gateway,
            base_url: source.base_url,
            renewal: source.renewal,
            token: RwLock::new(source.token),
            stored,
            journal_base: AtomicI64::new(NOT_STORED),
            client,
        })
    }

    /// Loads the stored snapshot, if there is one and no identities are loaded yet.
    pub fn restore(&self) {
        if self.gateway.identity.current().is_some() {
            return;
        }
        let mut interner = ScopeInterner::default();
        match self.stored.restore(&mut interner) {
            Ok(Some(Restored {
                identities,
                pages,
                written_at_ms,
                journal_follows,
            })) => {
                let base = if journal_follows {
                    identities.version
                } else {
                    NOT_STORED
                };
                self.journal_base.store(base, Ordering::Relaxed);
                tracing::info!(
                    version = identities.version,
                    keys = identities.key_count(),
                    journaled_pages = pages,
                    file = %self.stored.snapshot.display(),
                    "serving with the stored snapshot until the control plane answers"
                );
                self.publish(identities, true);
                self.gateway.identity.restored_from(written_at_ms);
                self.gateway.metrics.identity_snapshot("restored");
            }
            Ok(None) => {}
            Err(invalid) => {
                tracing::warn!(file = %self.stored.snapshot.display(), %invalid, "the stored snapshot is unusable; waiting for the control plane");
                self.gateway.metrics.identity_snapshot("refused");
            }
        }
    }

    /// The token to send.
    fn token(&self) -> String {
        self.token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .expose()
            .to_owned()
    }

    /// After the control plane refused the token (`status`): a new one from the renewal, when
    /// there is one and none was made in the last [`RENEWAL_PAUSE`]; whether one was made.
    async fn renew_token(&self, status: u16, last: &mut Option<Instant>) -> bool {
        let Some(renewal) = &self.renewal else {
            return false;
        };
        if last.is_some_and(|at| at.elapsed() < RENEWAL_PAUSE) {
            return false;
        }
        *last = Some(Instant::now());
        match (renewal.0)().await {
            Ok(token) => {
                *self.token.write().unwrap_or_else(PoisonError::into_inner) = token;
                tracing::warn!(
                    status,
                    "the control plane in this process refused this gateway's token (deleted \
                     through the admin API?); it made a new one, and following goes on"
                );
                true
            }
            Err(error) => {
                tracing::warn!(error = %tollgate_control_plane::causes(&error), "cannot make a new token for the control plane in this process");
                false
            }
        }
    }

    fn publish(&self, identities: Identities, restored: bool) {
        self.gateway.metrics.set_identities(&identities);
        self.gateway.identity.set(identities, restored);
    }

    /// Runs until shutdown.
    async fn follow(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Duration::from_millis(250);
        let mut need_snapshot = self.gateway.identity.current().is_none();
        let mut journaled = 0usize;
        // The kind of failure the last attempts had (`None` while they succeed): a warning is
        // logged when it starts or changes (a control plane unreachable, then answering 401).
        let mut failing: Option<FailureKind> = None;
        // When the journal could last not be written, a snapshot stored instead (at most one
        // every STORAGE_RETRY: a disk that refuses every write must not cost a snapshot per
        // change; changes are applied all the same).
        let mut storage_failed: Option<Instant> = None;
        // Whether the last attempt took a snapshot: a control plane that refuses to follow on
        // from the snapshot it has just sent is not asked for another at once, in a loop.
        let mut fresh_snapshot = false;
        // When the token was last renewed (the control plane in this process only).
        let mut renewed: Option<Instant> = None;
        loop {
            let attempt = async {
                match self.gateway.identity.current() {
                    Some(current) if !need_snapshot && journaled < JOURNAL_LIMIT => {
                        fresh_snapshot = false;
                        self.follow_changes(&current).await.map(|applied| {
                            journaled += usize::from(applied);
                        })
                    }
                    _ => self.take_snapshot().await.map(|()| {
                        need_snapshot = false;
                        fresh_snapshot = true;
                        journaled = 0;
                    }),
                }
            };
            let result = tokio::select! {
                result = attempt => result,
                _ = shutdown.changed() => return,
            };
            let mut longest = MAX_BACKOFF;
            match result {
                Ok(()) => {
                    self.gateway.identity.contacted(super::unix_ms());
                    if failing.take().is_some() {
                        tracing::info!("control plane reachable again");
                    }
                    backoff = Duration::from_millis(250);
                    continue;
                }
                Err(SyncError::UnknownVersion) if !fresh_snapshot => {
                    tracing::warn!(
                        "the control plane does not know our version; taking a new snapshot"
                    );
                    need_snapshot = true;
                    continue;
                }
                Err(SyncError::UnknownVersion) => {
                    tracing::warn!(
                        "the control plane does not know the version of the snapshot it has just \
                         sent; taking another after a pause"
                    );
                    need_snapshot = true;
                }
                Err(SyncError::Storage(error)) => {
                    // The changes are applied; only their copy for restarts is missing.
                    self.gateway.identity.contacted(super::unix_ms());
                    if storage_failed.is_none_or(|at| at.elapsed() >= STORAGE_RETRY) {
                        tracing::warn!(%error, "cannot journal changes; storing a new snapshot instead");
                        storage_failed = Some(Instant::now());
                        need_snapshot = true;
                    }
                    backoff = Duration::from_millis(250);
                    continue;
                }
                Err(SyncError::Refused(status @ (401 | 403), _))
                    if self.renew_token(status, &mut renewed).await =>
                {
                    continue;
                }
                Err(SyncError::Invalid(invalid)) => {
                    tracing::error!(%invalid, "refused what the control plane sent; the last good identities stay");
                    self.gateway.metrics.identity_snapshot("refused");
                    need_snapshot = true;
                }
                Err(error) => {
                    // A control plane that answers with an error (a refused token, an overload)
                    // is pressed less than one that cannot be reached, which is tried at a
                    // short pace.
                    longest = match error {
                        SyncError::Unreachable(_) => MAX_BACKOFF_UNREACHABLE,
                        _ => MAX_BACKOFF_REFUSED,
                    };
                    let kind = FailureKind::of(&error);
                    if failing == Some(kind) {
                        tracing::debug!(%error, "sync still failing");
                    } else if self.gateway.identity.current().is_some() {
                        tracing::warn!(%error, "cannot sync with the control plane; the last good identities stay");
                    } else {
                        tracing::warn!(%error, "cannot sync with the control plane; no identities yet, so authenticated routes answer 503");
                    }
                    failing = Some(kind);
                }
            }
            self.gateway.metrics.identity_sync_failure();
            // A delay grown by failures of another kind is cut to this kind's longest.
            backoff = backoff.min(longest);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(longest);
        }
    }
}

/// What kind of failure a sync attempt had, to log a change of it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    Unreachable,
    Refused(u16),
    Other,
}

impl FailureKind {
    fn of(error: &SyncError) -> Self {
        match error {
            SyncError::Unreachable(_) => Self::Unreachable,
            SyncError::Refused(status, _) => Self::Refused(*status),
            _ => Self::Other,
        }
    }
}

#[async_trait]
impl BackgroundService for Follower {
    /// [`Follower::restore`] runs before the proxy starts; this follows the feed.
    async fn start(&self, shutdown: ShutdownWatch) {
        self.follow(shutdown).await;
    }
}

#[cfg(test)]
mod tests;
