//! The flusher: a background service that sends closed spool segments to the ledger in batches
//! and deletes them once sent.
//!
//! A pending record (written as a response header went out) whose request was still running when
//! its segment closed is settled by the final record of the same id, in a later segment (in
//! segments of earlier versions, which appended every final record, often the same one); a
//! segment is deleted only when it was sent and every pending record in it is settled, so a
//! request still running keeps its segment. Pending
//! records left unsettled by an earlier process (it died between a response and its end) are
//! sent as they are: the client got a response, so the request counts. Sending is idempotent
//! (the store keeps each event id once), so a segment sent twice (a crash between sending and
//! deleting it) counts once.
//!
//! # Layout
//! - here: the background service, its passes' pace, the pass at start-up and the last one at
//!   shutdown.
//! - `pass`: one pass over the closed segments.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use super::Meter;
use crate::state::Gateway;

mod pass;

use pass::{Passed, Segment, Sender};

/// The longest wait between passes while the ledger refuses.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The last pass at shutdown comes after the drain: requests that end while the gateway drains
/// write their usage then, and it is sent before the process exits (a spool on a disk that does
/// not outlive the process, as in a replaced container, would otherwise take it along). The
/// drain says when no request is left; the flusher says when it has sent what they wrote.
#[derive(Debug)]
pub struct FinalFlush {
    drained: watch::Sender<bool>,
    flushed: watch::Sender<bool>,
    /// Whether a flusher runs: without one there is nothing to wait for.
    expected: AtomicBool,
}

impl Default for FinalFlush {
    fn default() -> Self {
        Self {
            drained: watch::channel(false).0,
            flushed: watch::channel(false).0,
            expected: AtomicBool::new(false),
        }
    }
}

impl FinalFlush {
    /// No request is in flight any more (or none will be waited for).
    pub fn drained(&self) {
        self.drained.send_replace(true);
    }

    async fn until_drained(&self) {
        let _ = self.drained.subscribe().wait_for(|drained| *drained).await;
    }

    /// The flusher's last pass is over, whatever came of it.
    fn flushed(&self) {
        self.flushed.send_replace(true);
    }

    /// Until the flusher's last pass is over; at once when no flusher runs.
    pub async fn until_flushed(&self) {
        if self.expected.load(Ordering::SeqCst) {
            let _ = self.flushed.subscribe().wait_for(|flushed| *flushed).await;
        }
    }
}

/// Sends the spool to the ledger.
#[derive(Debug)]
pub struct Flusher {
    gateway: Arc<Gateway>,
    sender: Sender,
    /// What the start-up pass read and did not finish, for the background passes to go on from
    /// (so events it set aside are not set aside again).
    recovered: std::sync::Mutex<BTreeMap<u64, Segment>>,
}

impl Flusher {
    /// A flusher of `meter`'s spool every `interval`, `batch` events per call.
    pub fn new(gateway: Arc<Gateway>, meter: Arc<Meter>, interval: Duration, batch: usize) -> Self {
        gateway.final_flush.expected.store(true, Ordering::SeqCst);
        Self {
            gateway,
            sender: Sender {
                meter,
                interval,
                batch: AtomicUsize::new(batch),
            },
            recovered: std::sync::Mutex::default(),
        }
    }
}

impl Flusher {
    /// Sends what earlier processes left in the spool, before this one serves: a quota counter
    /// rebuilt from the ledger then includes it. What is not stored within `RECOVER_WAIT` (the
    /// control plane down or unreachable, or a long backlog) stays in the spool for the
    /// background passes: a restart while the control plane is away serves after that long.
    pub fn recover(&self) {
        let Some(ledger) = self.gateway.limiter.ledger().cloned() else {
            return;
        };
        let spool = &self.sender.meter.spool;
        let empty = |path: &std::path::PathBuf| std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
        if spool
            .closed(spool.first_own_seq())
            .is_ok_and(|earlier| earlier.iter().all(|(_, path)| empty(path)))
        {
            // Nothing left by an earlier process (a first start, or a clean shutdown, which
            // leaves an empty segment): the background passes delete what is there.
            return;
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::warn!(%error, "cannot send the spool left by an earlier process now");
                return;
            }
        };
        let mut segments = BTreeMap::new();
        let pass = runtime.block_on(async {
            tokio::time::timeout(
                RECOVER_WAIT,
                self.sender.pass_all(&mut segments, ledger.as_ref()),
            )
            .await
        });
        match pass {
            Ok(Ok(Passed::AllSent)) => tracing::info!("usage left by an earlier process is stored"),
            Ok(Ok(_)) | Err(_) => tracing::warn!(
                "usage left by an earlier process stays in the spool until the ledger takes it; \
                 quotas may count it late"
            ),
            Ok(Err(error)) => tracing::error!(%error, "the usage spool cannot be read"),
        }
        *self
            .recovered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = segments;
    }
}

/// The longest a start waits for the ledger to store what earlier processes left in the spool.
const RECOVER_WAIT: Duration = Duration::from_secs(3);

/// The wait after a pass that failed: twice the last one (at least twice the interval), up to
/// [`MAX_BACKOFF`].
fn backoff(last: Duration, interval: Duration) -> Duration {
    (last.max(interval) * 2).min(MAX_BACKOFF)
}

#[async_trait::async_trait]
impl BackgroundService for Flusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut segments = std::mem::take(
            &mut *self
                .recovered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut delay = self.sender.interval;
        let final_flush = &self.gateway.final_flush;
        let mut shutting_down = false;
        loop {
            if let Some(ledger) = self.gateway.limiter.ledger() {
                match self.sender.pass(&mut segments, ledger.as_ref()).await {
                    Ok(Passed::AllSent) => delay = self.sender.interval,
                    // A backlog (after an outage) is read and sent without waiting.
                    Ok(Passed::MoreToRead) => delay = Duration::ZERO,
                    Ok(Passed::NotTaken) => delay = backoff(delay, self.sender.interval),
                    Err(error) => {
                        tracing::error!(%error, "the usage spool cannot be read or written");
                        delay = backoff(delay, self.sender.interval);
                    }
                }
            }
            // On SIGTERM a pass at once (Pingora may end this task with the grace period),
            // then passes as usual while requests drain, and the last one once they have (or
            // the grace period is over): everything written is final then.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed(), if !shutting_down => shutting_down = true,
                () = final_flush.until_drained() => break,
            }
        }
        if let Some(ledger) = self.gateway.limiter.ledger() {
            let _ = self.sender.meter.spool.tick(i64::MAX, 0);
            match self.sender.pass_all(&mut segments, ledger.as_ref()).await {
                Ok(Passed::AllSent) => tracing::info!("usage sent before exiting"),
                Ok(_) => {
                    tracing::warn!("the ledger did not take all usage; it is sent at next start");
                }
                Err(error) => {
                    tracing::warn!(%error, "usage left in the spool at shutdown; sent at next start");
                }
            }
        }
        final_flush.flushed();
    }
}
