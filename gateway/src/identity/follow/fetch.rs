//! The follower's exchanges with the control plane: the full snapshot (fetched, checked,
//! installed and stored) and a page of the change feed (applied and journaled).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tollgate_model::feed::Changes;

use super::{Follower, LONG_POLL, LONG_POLL_MARGIN, NOT_STORED};
use crate::identity::index::{Applied, Identities, Invalid, ScopeInterner};
use crate::identity::snapshot;
use crate::identity::stored::apply;

/// Why one attempt to sync failed.
#[derive(Debug)]
pub(super) enum SyncError {
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
            SyncError::Refused(status @ (401 | 403), detail) => write!(
                f,
                "control plane answered {status}: {detail} (following a separate control plane, \
                 the variable control_plane.token_env names must hold one of its tokens with role \
                 \"gateway\"; following the one in this process, the gateway makes itself a new \
                 token, at most every 10 s)"
            ),
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

impl Follower {
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
                .observe_clock(server_ms, crate::identity::unix_ms());
        }
    }

    /// Fetches, checks and installs the full snapshot, then stores it.
    pub(super) async fn take_snapshot(&self) -> Result<(), SyncError> {
        let response = self
            .client
            .get(format!("{}/v1/gateway/snapshot", self.base_url))
            .bearer_auth(self.token())
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
        let reader =
            tokio::task::spawn_blocking(move || snapshot::read_streamed(receiver, &partial, gzip));
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
    pub(super) async fn follow_changes(&self, current: &Identities) -> Result<bool, SyncError> {
        let mut request = self
            .client
            .get(format!("{}/v1/gateway/changes", self.base_url))
            .query(&[
                ("since", current.version.to_string()),
                ("wait_ms", LONG_POLL.as_millis().to_string()),
            ]);
        if let Some(at) = current.version_at_ms {
            // Names the history the version is of: another store's is refused (409).
            request = request.query(&[("since_at_ms", at)]);
        }
        let response = request
            .bearer_auth(self.token())
            .timeout(LONG_POLL + LONG_POLL_MARGIN)
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

#[cfg(test)]
mod tests {
    use super::SyncError;

    #[test]
    fn a_refused_token_is_told_which_token_the_gateway_needs() {
        let refused = SyncError::Refused(401, "no token".into()).to_string();
        assert_eq!(
            refused,
            "control plane answered 401: no token (following a separate control plane, the \
             variable control_plane.token_env names must hold one of its tokens with role \
             \"gateway\"; following the one in this process, the gateway makes itself a new \
             token, at most every 10 s)"
        );
        assert_eq!(
            SyncError::Refused(500, "down".into()).to_string(),
            "control plane answered 500: down"
        );
    }
}
