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
//!   back is enforced about as soon as one made while it was up; one that answers with an error,
//!   or sends what cannot be used (a snapshot that does not check), is asked again after a delay
//!   growing to 10 s.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;
use tollgate_model::feed::Changes;

use super::index::{Applied, Identities, Invalid, ScopeInterner};
use super::snapshot;
use crate::state::Gateway;

/// How long one request to the change feed waits for a change: the control plane confirms the
/// identities current at least this often (`sync_age_seconds`), and a connection cut without a
/// word shows after this and 10 s.
const LONG_POLL: Duration = Duration::from_secs(5);
/// Longest delay between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
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
    pub token: String,
}

/// The stored snapshot and the changes applied after it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The snapshot as received (gzip or plain JSON).
    pub snapshot: PathBuf,
    /// One JSON `Changes` per line.
    pub journal: PathBuf,
}

impl Stored {
    /// The files for `snapshot`: the journal sits beside it.
    pub fn new(snapshot: PathBuf) -> Self {
        let mut journal = snapshot.clone().into_os_string();
        journal.push(".changes");
        Self {
            snapshot,
            journal: PathBuf::from(journal),
        }
    }

    /// Unix ms `path` was last modified, if it can be read.
    fn modified_ms(path: &Path) -> Option<i64> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    fn temporary(&self) -> PathBuf {
        let mut path = self.snapshot.clone().into_os_string();
        path.push(".partial");
        PathBuf::from(path)
    }

    /// Loads the stored snapshot and replays the journal. `Ok(None)` when nothing is stored.
    pub fn restore(&self, interner: &mut ScopeInterner) -> Result<Option<Restored>, Invalid> {
        let file = match File::open(&self.snapshot) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(Invalid(format!(
                    "cannot read {}: {error}",
                    self.snapshot.display()
                )));
            }
        };
        let mut identities = snapshot::read(decoded(file), interner)?;
        // How old the state is: when its snapshot was stored, or its last replayed page
        // written (the journal's time for a page of an earlier version, which wrote none; read
        // before a cut, which sets it to now).
        let mut written_at_ms = Self::modified_ms(&self.snapshot).unwrap_or(0);
        let journal_written_ms = Self::modified_ms(&self.journal).unwrap_or(0);
        let mut pages = 0;
        let mut journal_follows = true;
        if let Ok(journal) = File::open(&self.journal) {
            // Replay stops at a torn line (a crash mid-write) or a gap (a page that does not
            // start where the last one ended); the journal is cut there, so later appends
            // follow on from what was replayed, and the feed fills the rest.
            let mut kept = 0u64;
            let mut cut = false;
            for line in BufReader::new(journal).split(b'\n') {
                let Ok(line) = line else {
                    cut = true;
                    break;
                };
                let Ok(entry) = serde_json::from_slice::<JournalPage>(&line) else {
                    cut = true;
                    break;
                };
                if entry.page.version > identities.version {
                    if entry.since != identities.version {
                        cut = true;
                        break;
                    }
                    match apply(&identities, &entry.page, interner)? {
                        Applied::Next(next) => identities = next,
                        Applied::NeedsSnapshot(_) => {
                            cut = true;
                            break;
                        }
                    }
                }
                pages += 1;
                kept += line.len() as u64 + 1;
                written_at_ms = written_at_ms.max(entry.at_ms.unwrap_or(journal_written_ms));
            }
            if cut
                && let Err(error) = OpenOptions::new()
                    .write(true)
                    .open(&self.journal)
                    .and_then(|file| file.set_len(kept))
            {
                tracing::warn!(%error, file = %self.journal.display(), "cannot cut the journal");
                journal_follows = false;
            }
        }
        Ok(Some(Restored {
            identities,
            pages,
            written_at_ms,
            journal_follows,
        }))
    }

    fn append(&self, since: i64, page: &Changes) -> std::io::Result<()> {
        let entry = JournalPage {
            since,
            at_ms: Some(super::unix_ms()),
            page: page.clone(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)?;
        journal.write_all(&line)?;
        journal.sync_data()
    }
}

/// What a restart finds stored.
#[derive(Debug)]
pub struct Restored {
    /// The snapshot with the journal's pages applied.
    pub identities: Identities,
    /// Pages replayed.
    pub pages: usize,
    /// Unix ms that state was stored (its age).
    pub written_at_ms: i64,
    /// Whether pages appended to the journal follow on from it (false when what the replay
    /// stopped at could not be cut away: a page appended after it would never be replayed).
    pub journal_follows: bool,
}

/// One line of the journal: a page of changes and the version it was applied on.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JournalPage {
    /// The version the page starts from.
    since: i64,
    /// Unix ms it was written (absent in a journal of an earlier version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_ms: Option<i64>,
    /// The page.
    #[serde(flatten)]
    page: Changes,
}

/// A snapshot file as plain JSON, whether it was stored gzip-compressed or not.
fn decoded(mut file: File) -> Box<dyn Read + Send> {
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let file = Box::new(std::io::Cursor::new(magic).chain(file));
    if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        file
    }
}

fn apply(
    identities: &Identities,
    page: &Changes,
    interner: &mut ScopeInterner,
) -> Result<Applied, Invalid> {
    let entities = page.changes.iter().map(|change| &change.entity);
    // The page's mark of its version: none from a control plane of an earlier version, whose
    // changes are then asked for by version alone.
    identities.apply(page.version, page.version_at_ms, entities, interner)
}

/// Why one attempt to sync failed.
#[derive(Debug)]
enum SyncError {
    /// The control plane could not be reached or broke the exchange.
    Unreachable(String),
    /// It answered with an error status.
    Refused(u16, String),
    /// It says our version is not one of its versions: take a new snapshot.
    UnknownVersion,
    /// What it sent does not check.
    Invalid(Invalid),
    /// The journal cannot be written: take a snapshot, which stores a fresh base.
    Storage(String),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Unreachable(error) => write!(f, "control plane unreachable: {error}"),
            SyncError::Refused(status, detail) => {
                write!(f, "control plane answered {status}: {detail}")
            }
            SyncError::UnknownVersion => f.write_str("the control plane does not know our version"),
            SyncError::Invalid(invalid) => write!(f, "refused: {invalid}"),
            SyncError::Storage(error) => write!(f, "cannot journal changes: {error}"),
        }
    }
}

impl From<reqwest::Error> for SyncError {
    fn from(error: reqwest::Error) -> Self {
        SyncError::Unreachable(error.to_string())
    }
}

/// The follower, as a background service.
#[derive(Debug)]
pub struct Follower {
    gateway: Arc<Gateway>,
    source: Source,
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
            source,
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

    fn publish(&self, identities: Identities, restored: bool) {
        self.gateway.metrics.set_identities(&identities);
        self.gateway.identity.set(identities, restored);
    }

    /// Runs until shutdown.
    async fn follow(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Duration::from_millis(250);
        let mut need_snapshot = self.gateway.identity.current().is_none();
        let mut journaled = 0usize;
        let mut failing = false;
        // When the journal could last not be written, a snapshot stored instead (at most one
        // every STORAGE_RETRY: a disk that refuses every write must not cost a snapshot per
        // change; changes are applied all the same).
        let mut storage_failed: Option<Instant> = None;
        // Whether the last attempt took a snapshot: a control plane that refuses to follow on
        // from the snapshot it has just sent is not asked for another at once, in a loop.
        let mut fresh_snapshot = false;
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
                    if failing {
                        tracing::info!("control plane reachable again");
                        failing = false;
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
                Err(SyncError::Invalid(invalid)) => {
                    tracing::error!(%invalid, "refused what the control plane sent; the last good identities stay");
                    self.gateway.metrics.identity_snapshot("refused");
                    need_snapshot = true;
                }
                Err(error) => {
                    // A control plane that answers with an error (a refused token, an overload)
                    // is not pressed: only one that cannot be reached is tried at a short pace.
                    if matches!(error, SyncError::Unreachable(_)) {
                        longest = MAX_BACKOFF_UNREACHABLE;
                    }
                    if !failing {
                        tracing::warn!(%error, "cannot sync with the control plane; the last good identities stay");
                        failing = true;
                    } else {
                        tracing::debug!(%error, "sync still failing");
                    }
                }
            }
            self.gateway.metrics.identity_sync_failure();
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(longest);
        }
    }

    /// Notes the control plane's clock from `response` (sent by one of an earlier version
    /// without it: nothing).
    fn observe_clock(&self, response: &reqwest::Response) {
        if let Some(server_ms) = response
            .headers()
            .get(tollgate_control_plane::api::TIME_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
        {
            self.gateway
                .identity
                .observe_clock(server_ms, super::unix_ms());
        }
    }

    /// Fetches, checks and installs the full snapshot, then stores it.
    async fn take_snapshot(&self) -> Result<(), SyncError> {
        let response = self
            .client
            .get(format!("{}/v1/gateway/snapshot", self.source.base_url))
            .bearer_auth(&self.source.token)
            .header(http::header::ACCEPT_ENCODING, "gzip")
            .timeout(Duration::from_secs(600))
            .send()
            .await?;
        let response = check_status(response).await?;
        self.observe_clock(&response);
        let gzip = response
            .headers()
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let (sender, receiver) = mpsc::channel::<Bytes>(16);
        let partial = self.stored.temporary();
        let reader = tokio::task::spawn_blocking(move || read_streamed(receiver, &partial, gzip));
        let mut response = response;
        let streamed: Result<(), SyncError> = async {
            while let Some(chunk) = response.chunk().await? {
                if sender.send(chunk).await.is_err() {
                    break; // the reader stopped: its error says why
                }
            }
            Ok(())
        }
        .await;
        drop(sender);
        let read = reader
            .await
            .map_err(|e| SyncError::Invalid(Invalid(format!("snapshot reader failed: {e}"))))?;
        streamed?;
        let (identities, written) = read.map_err(SyncError::Invalid)?;
        // The control plane is the authority: a store restored from a backup goes back in
        // versions, and the gateway follows it there.
        if let Some(current) = self.gateway.identity.current()
            && identities.version < current.version
        {
            tracing::warn!(
                from = current.version,
                to = identities.version,
                "the control plane's version went back; following it"
            );
        }
        let (version, keys) = (identities.version, identities.key_count());
        self.publish(identities, false);
        self.gateway.metrics.identity_snapshot("applied");
        match written
            .map_err(std::io::Error::other)
            .and_then(|()| self.keep_snapshot())
        {
            Ok(()) => self.journal_base.store(version, Ordering::Relaxed),
            Err(error) => {
                // The stored state stays what it was (older, with its own age); changes to
                // these identities are not journaled on it.
                self.journal_base.store(NOT_STORED, Ordering::Relaxed);
                tracing::warn!(%error, file = %self.stored.snapshot.display(), "cannot store the snapshot; a restart will serve the older stored state, or need the control plane");
            }
        }
        tracing::info!(version, keys, "snapshot applied");
        Ok(())
    }

    fn keep_snapshot(&self) -> std::io::Result<()> {
        // On disk before it replaces the stored one, and the rename itself made durable.
        File::open(self.stored.temporary())?.sync_all()?;
        std::fs::rename(self.stored.temporary(), &self.stored.snapshot)?;
        if let Some(directory) = self.stored.snapshot.parent() {
            let directory = if directory.as_os_str().is_empty() {
                Path::new(".")
            } else {
                directory
            };
            File::open(directory)?.sync_all()?;
        }
        match std::fs::remove_file(&self.stored.journal) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Waits for the changes after the running version and applies them; returns whether any
    /// were applied.
    async fn follow_changes(&self, current: &Identities) -> Result<bool, SyncError> {
        let mut request = self
            .client
            .get(format!("{}/v1/gateway/changes", self.source.base_url))
            .query(&[
                ("since", current.version.to_string()),
                ("wait_ms", LONG_POLL.as_millis().to_string()),
            ]);
        if let Some(at) = current.version_at_ms {
            // Names the history the version is of: another store's is refused (409).
            request = request.query(&[("since_at_ms", at)]);
        }
        let response = request
            .bearer_auth(&self.source.token)
            .timeout(LONG_POLL + Duration::from_secs(10))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::CONFLICT {
            return Err(SyncError::UnknownVersion);
        }
        let response = check_status(response).await?;
        self.observe_clock(&response);
        let page: Changes = response.json().await?;
        if page.changes.is_empty() {
            return Ok(false);
        }
        let mut interner = ScopeInterner::default();
        match apply(current, &page, &mut interner).map_err(SyncError::Invalid)? {
            Applied::Next(next) => {
                let version = next.version;
                self.publish(next, false);
                if self.journal_base.load(Ordering::Relaxed) != current.version {
                    return Err(SyncError::Storage(format!(
                        "{} does not hold version {} to follow on from",
                        self.stored.snapshot.display(),
                        current.version
                    )));
                }
                if let Err(error) = self.stored.append(current.version, &page) {
                    self.journal_base.store(NOT_STORED, Ordering::Relaxed);
                    return Err(SyncError::Storage(format!(
                        "{}: {error}",
                        self.stored.journal.display()
                    )));
                }
                self.journal_base.store(version, Ordering::Relaxed);
                tracing::debug!(version, changes = page.changes.len(), "changes applied");
                Ok(true)
            }
            Applied::NeedsSnapshot(why) => {
                tracing::info!(%why, "taking a new snapshot");
                Err(SyncError::UnknownVersion)
            }
        }
    }
}

async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, SyncError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<tollgate_model::Problem>(&body)
        .ok()
        .and_then(|p| p.detail)
        .unwrap_or_else(|| body.chars().take(200).collect());
    Err(SyncError::Refused(status.as_u16(), detail))
}

/// Reads the streamed snapshot: every chunk is written to `partial` as received and read,
/// decompressed if `gzip`, into the index. Returns with it whether `partial` holds all of it:
/// a file that cannot be written (a full disk, a directory the gateway may not write) costs
/// the copy kept for restarts, never the snapshot itself.
fn read_streamed(
    receiver: mpsc::Receiver<Bytes>,
    partial: &Path,
    gzip: bool,
) -> Result<(Identities, Result<(), String>), Invalid> {
    let file =
        File::create(partial).map_err(|e| format!("cannot write {}: {e}", partial.display()));
    let mut tee = Tee {
        receiver,
        chunk: Bytes::new(),
        file,
    };
    let mut interner = ScopeInterner::default();
    let identities = if gzip {
        snapshot::read(flate2::read::GzDecoder::new(&mut tee), &mut interner)?
    } else {
        snapshot::read(&mut tee, &mut interner)?
    };
    let written = tee.file.map(drop);
    if written.is_err() {
        let _ = std::fs::remove_file(partial);
    }
    Ok((identities, written))
}

/// Reads chunks from a channel, writing each to a file on the way while it can; once a write
/// fails, `file` holds why and the rest is only read.
struct Tee {
    receiver: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    file: Result<File, String>,
}

impl Tee {
    fn write(&mut self, chunk: Option<&[u8]>) {
        if let Ok(file) = &mut self.file {
            let written = match chunk {
                Some(chunk) => file.write_all(chunk),
                None => file.sync_all(),
            };
            if let Err(error) = written {
                self.file = Err(format!("cannot write the snapshot's copy: {error}"));
            }
        }
    }
}

impl Read for &mut Tee {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => {
                    self.write(Some(&chunk));
                    self.chunk = chunk;
                }
                None => {
                    self.write(None);
                    return Ok(0);
                }
            }
        }
        let n = buffer.len().min(self.chunk.len());
        buffer[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
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
mod tests {
    use super::*;

    const CUSTOMER: &str = "cus_00000000000000000000000000000001";

    fn plan_json() -> serde_json::Value {
        serde_json::json!({
            "id": "plan_1", "name": "p", "rate_limits": [], "quota": null, "price": null,
            "status": "active", "created_at": "t", "updated_at": "t"
        })
    }

    fn key_change(version: i64, n: u8) -> serde_json::Value {
        serde_json::json!({
            "version": version, "kind": "key", "id": format!("key_{:032x}", n),
            "key": {
                "id": format!("key_{:032x}", n), "customer_id": CUSTOMER,
                "hash": format!("{:064x}", n), "expires_at_ms": null, "revoked_at_ms": null,
                "scopes": null
            }
        })
    }

    fn line(since: i64, version: i64, n: u8) -> String {
        serde_json::json!({"since": since, "version": version, "changes": [key_change(version, n)]})
            .to_string()
    }

    fn stored(journal: &str) -> (tempfile::TempDir, Stored) {
        let dir = tempfile::tempdir().unwrap();
        let stored = Stored::new(dir.path().join("snapshot.json"));
        let snapshot = serde_json::json!({
            "version": 7, "plans": [plan_json()],
            "customers": [{"id": CUSTOMER, "plan_id": "plan_1", "status": "active"}],
            "keys": []
        });
        std::fs::write(&stored.snapshot, snapshot.to_string()).unwrap();
        std::fs::write(&stored.journal, journal).unwrap();
        (dir, stored)
    }

    #[test]
    fn the_journal_is_replayed_in_order_and_cut_at_a_torn_line() {
        let good = format!("{}\n{}\n", line(7, 8, 1), line(8, 9, 2));
        let (_dir, stored) = stored(&format!("{good}{{\"since\": 9, \"vers"));
        let Restored {
            identities, pages, ..
        } = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (identities.version, pages, identities.key_count()),
            (9, 2, 2)
        );
        assert_eq!(std::fs::read_to_string(&stored.journal).unwrap(), good);
        // What is appended next follows on from the replayed pages.
        let page: Changes = serde_json::from_str(&line(9, 10, 3)).unwrap();
        stored.append(9, &page).unwrap();
        let identities = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap()
            .identities;
        assert_eq!((identities.version, identities.key_count()), (10, 3));
    }

    #[test]
    fn a_gap_in_the_journal_stops_the_replay_there() {
        // The page from 8 to 9 is missing: the page from 9 must not be applied on 8.
        let (_dir, stored) = stored(&format!("{}\n{}\n", line(7, 8, 1), line(9, 10, 3)));
        let Restored {
            identities, pages, ..
        } = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (identities.version, pages, identities.key_count()),
            (8, 1, 1)
        );
        assert_eq!(
            std::fs::read_to_string(&stored.journal).unwrap(),
            format!("{}\n", line(7, 8, 1))
        );
    }

    #[test]
    fn the_age_of_what_is_restored_is_when_it_was_written_not_when_the_journal_was_cut() {
        let hour_ago = super::super::unix_ms() - 3_600_000;
        let mut first: serde_json::Value = serde_json::from_str(&line(7, 8, 1)).unwrap();
        first["at_ms"] = serde_json::json!(hour_ago);
        // A page that does not follow on (journaled after a snapshot that was not stored) is
        // cut, which writes the journal now.
        let (_dir, cut) = stored(&format!("{first}\n{}\n", line(9, 10, 3)));
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7_200);
        File::options()
            .write(true)
            .open(&cut.snapshot)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let restored = cut.restore(&mut ScopeInterner::default()).unwrap().unwrap();
        assert_eq!((restored.identities.version, restored.pages), (8, 1));
        assert_eq!(restored.written_at_ms, hour_ago);
        // Nothing replayed from the journal: the snapshot's own time.
        let (_other, unreplayed) = stored(&format!("{}\n", line(9, 10, 3)));
        File::options()
            .write(true)
            .open(&unreplayed.snapshot)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let restored = unreplayed
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        let expected = two_hours_ago
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!((restored.pages, restored.written_at_ms), (0, expected));
    }

    #[test]
    fn nothing_stored_is_no_identities() {
        let dir = tempfile::tempdir().unwrap();
        let stored = Stored::new(dir.path().join("absent.json.gz"));
        assert!(
            stored
                .restore(&mut ScopeInterner::default())
                .unwrap()
                .is_none()
        );
    }
}
