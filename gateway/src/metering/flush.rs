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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;
use tollgate_model::usage::UsageEvent;

use super::Meter;
use super::record::{Pending, Record};
use super::spool;
use crate::metering::ledger::{Ledger, LedgerError, take_refused};
use crate::state::Gateway;

/// The longest wait between passes while the ledger refuses.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Closed segments read into memory and not yet sent, at most: after an outage the spool may
/// hold up to `spool_max_bytes` of them (a gigabyte by default), which read at once would take
/// a few times that in memory. The rest are read as these are sent (16 MiB of records here).
const MAX_UNSENT_SEGMENTS: usize = 4;

/// What a pass came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passed {
    /// Every closed segment was read and sent.
    AllSent,
    /// What was read was sent, and closed segments remain to be read: pass again at once.
    MoreToRead,
    /// The ledger did not take a batch: pass again later.
    NotTaken,
}

/// What the flusher knows of a closed segment.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Its size on disk.
    bytes: u64,
    /// Final records, to send (dropped once sent).
    finals: Vec<UsageEvent>,
    /// Pending records by id, until settled.
    pending: HashMap<String, Pending>,
    sent: bool,
    /// Sent, and kept only for the pending records of requests still running: not counted
    /// against the spool's bound.
    held: bool,
    /// Ids of its events the ledger refused for good, set aside already: when the segment is
    /// sent again (a later batch found the ledger unavailable), they are not.
    refused: HashSet<String>,
    /// How many of its events (in order, of those not set aside) were offered to the ledger
    /// before: all of a segment an earlier process spooled (it may have sent them), and up to
    /// the batch the ledger was unavailable for otherwise. Sending them counts as a replay.
    offered: usize,
}

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

/// What a pass needs: the spool, how often segments close, the batch size.
#[derive(Debug)]
struct Sender {
    meter: Arc<Meter>,
    interval: Duration,
    /// Events per batch: `batch_size`, or less once the ledger found a batch too large.
    batch: AtomicUsize,
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

impl Sender {
    /// One pass: closes the active segment if due, reads new closed segments (oldest first, up
    /// to [`MAX_UNSENT_SEGMENTS`] unsent), settles pending records, sends what is unsent,
    /// deletes what is done.
    async fn pass(
        &self,
        segments: &mut BTreeMap<u64, Segment>,
        ledger: &dyn Ledger,
    ) -> anyhow::Result<Passed> {
        let now = crate::identity::unix_ms();
        let interval_ms = i64::try_from(self.interval.as_millis()).unwrap_or(i64::MAX);
        let active = self.meter.spool.tick(now, interval_ms)?;
        let first_unread = self.read_closed(segments, active)?;
        self.recover_orphans(segments, first_unread);
        for segment in segments.values_mut().filter(|s| !s.sent) {
            if !self.send(segment, ledger).await? {
                return Ok(Passed::NotTaken);
            }
        }
        self.remove_done(segments)?;
        self.meter.metrics.spool_bytes(self.meter.spool.bytes());
        Ok(if first_unread.is_some() {
            Passed::MoreToRead
        } else {
            Passed::AllSent
        })
    }

    /// Reads the closed segments before `active` not read yet, oldest first, while fewer than
    /// [`MAX_UNSENT_SEGMENTS`] are unsent, settling pending records by the final records read;
    /// the first segment left unread, if any.
    fn read_closed(
        &self,
        segments: &mut BTreeMap<u64, Segment>,
        active: u64,
    ) -> anyhow::Result<Option<u64>> {
        let mut first_unread = None;
        let mut unsent = segments.values().filter(|s| !s.sent).count();
        for (seq, path) in self.meter.spool.closed(active)? {
            if segments.contains_key(&seq) {
                continue;
            }
            if unsent >= MAX_UNSENT_SEGMENTS {
                first_unread = Some(seq);
                break;
            }
            unsent += 1;
            let (records, torn) = spool::read(&path)?;
            if torn > 0 {
                tracing::warn!(segment = %path.display(), torn, "skipped torn usage records (a crash mid-write)");
            }
            // Most records are final: sized once, not grown (and copied) record by record.
            let mut finals = Vec::with_capacity(records.len());
            let mut pending = Vec::new();
            for record in records {
                match record {
                    Record::Pending(record) => pending.push(record),
                    Record::Final(event) => finals.push(event),
                }
            }
            // A pending record is settled by the final record of its id, appended after it in
            // this segment or a later one. Most requests end while their segment is open, and
            // their final record is written over the pending one: most segments have no pending
            // record, and then nothing is looked up.
            let waiting = !pending.is_empty() || segments.values().any(|s| !s.pending.is_empty());
            let pending = if waiting {
                let settled: HashSet<&str> = finals.iter().map(|e| e.id.as_str()).collect();
                for earlier in segments.values_mut().filter(|s| !s.pending.is_empty()) {
                    earlier
                        .pending
                        .retain(|id, _| !settled.contains(id.as_str()));
                }
                pending
                    .into_iter()
                    .filter(|p| !settled.contains(p.id.as_str()))
                    .map(|p| (p.id.clone(), p))
                    .collect()
            } else {
                HashMap::new()
            };
            segments.insert(
                seq,
                Segment {
                    bytes: std::fs::metadata(&path)?.len(),
                    path,
                    finals,
                    pending,
                    sent: false,
                    held: false,
                    refused: HashSet::new(),
                    offered: if seq < self.meter.spool.first_own_seq() {
                        usize::MAX
                    } else {
                        0
                    },
                },
            );
        }
        Ok(first_unread)
    }

    /// Pending records an earlier process left and never settled: the response went out, so
    /// they count, sent as they are. Only once every segment it left is read: a later one may
    /// hold the final record.
    fn recover_orphans(&self, segments: &mut BTreeMap<u64, Segment>, first_unread: Option<u64>) {
        let first_own = self.meter.spool.first_own_seq();
        let earlier_read = first_unread.is_none_or(|unread| unread >= first_own);
        let orphaned = if earlier_read { first_own } else { 0 };
        for (_, segment) in segments.range_mut(..orphaned) {
            let left: Vec<Pending> = segment.pending.drain().map(|(_, p)| p).collect();
            let orphans: Vec<UsageEvent> = left.iter().filter_map(Pending::event).collect();
            if orphans.len() < left.len() {
                tracing::warn!(
                    segment = %segment.path.display(),
                    torn = left.len() - orphans.len(),
                    "skipped unreadable pending usage records (a crash mid-write)"
                );
            }
            if !orphans.is_empty() {
                self.meter.metrics.recovered(orphans.len() as u64);
                segment.finals.extend(orphans);
                segment.sent = false;
            }
        }
    }

    /// Sends `segment`'s unsent events in batches; false when the ledger did not take one
    /// (the segment is sent again, whole, by a later pass).
    async fn send(&self, segment: &mut Segment, ledger: &dyn Ledger) -> anyhow::Result<bool> {
        // Batches a proxy in front of the ledger finds too large are sent in halves, and
        // later ones no larger than what passed.
        if !segment.refused.is_empty() {
            let refused = &segment.refused;
            segment.finals.retain(|event| !refused.contains(&event.id));
        }
        let size = self.batch.load(Ordering::Relaxed).max(1);
        let mut batches: Vec<Cow<'_, [UsageEvent]>> = segment
            .finals
            .chunks(size)
            .rev()
            .map(Cow::Borrowed)
            .collect();
        // Where the batch being sent starts, among the segment's events in order.
        let mut position = 0;
        while let Some(batch) = batches.pop() {
            let result = ledger.record(&batch).await;
            match result {
                Ok(stored) => {
                    self.meter.metrics.sent(stored.inserted, stored.duplicates);
                    let replayed = segment.offered.saturating_sub(position).min(batch.len());
                    if replayed > 0 {
                        self.meter.metrics.replayed(replayed as u64);
                    }
                    position += batch.len();
                    // Stored: sent again only if a later step fails (the ledger, or the disk
                    // setting refused events aside), and then replayed.
                    segment.offered = segment.offered.max(position);
                }
                Err(LedgerError::TooLarge(reason)) if batch.len() > 1 => {
                    tracing::warn!(
                        %reason,
                        events = batch.len(),
                        "the ledger refused a usage batch as too large; sending it in halves \
                         (a lower [metering] batch_size avoids this)"
                    );
                    self.batch.fetch_min(batch.len() / 2, Ordering::Relaxed);
                    let (first, second) = halves(batch);
                    batches.push(second);
                    batches.push(first);
                }
                // Only the events the ledger named are set aside; the others go again.
                Err(LedgerError::RefusedEvents(positions, reason)) => {
                    let of = batch.len();
                    segment.offered = segment.offered.max(position + of);
                    let mut rest = batch.into_owned();
                    // Positions not of this batch: it is set aside whole.
                    let refused = take_refused(&mut rest, &positions)
                        .unwrap_or_else(|| std::mem::take(&mut rest));
                    let kept = self.meter.spool.set_aside(&refused)?;
                    self.meter.metrics.rejected(refused.len() as u64);
                    position += refused.len();
                    segment
                        .refused
                        .extend(refused.iter().map(|event| event.id.clone()));
                    tracing::error!(
                        %reason,
                        events = refused.len(),
                        of,
                        kept = %kept.display(),
                        "the ledger refused usage events; they are set aside, not sent \
                         again, and the rest of their batch is sent without them"
                    );
                    if !rest.is_empty() {
                        batches.push(Cow::Owned(rest));
                    }
                }
                Err(LedgerError::Rejected(reason) | LedgerError::TooLarge(reason)) => {
                    segment.offered = segment.offered.max(position + batch.len());
                    let kept = self.meter.spool.set_aside(&batch)?;
                    self.meter.metrics.rejected(batch.len() as u64);
                    position += batch.len();
                    segment
                        .refused
                        .extend(batch.iter().map(|event| event.id.clone()));
                    tracing::error!(
                        %reason,
                        events = batch.len(),
                        kept = %kept.display(),
                        "the ledger refused a usage batch; it is set aside, not sent again"
                    );
                }
                Err(LedgerError::Unavailable(error)) => {
                    self.meter.metrics.send_failed();
                    segment.offered = segment.offered.max(position + batch.len());
                    tracing::warn!(%error, "cannot store usage yet; it stays in the spool");
                    return Ok(false);
                }
            }
        }
        segment.sent = true;
        // Every pending record before this segment's final ones is settled in this pass;
        // the final ones are not needed any more.
        segment.finals = Vec::new();
        if !segment.pending.is_empty() && !segment.held {
            segment.held = true;
            self.meter.spool.hold(segment.bytes);
        }
        Ok(true)
    }

    /// Deletes the segments sent whose pending records are all settled.
    fn remove_done(&self, segments: &mut BTreeMap<u64, Segment>) -> anyhow::Result<()> {
        let done: Vec<u64> = segments
            .iter()
            .filter(|(_, s)| s.sent && s.pending.is_empty())
            .map(|(seq, _)| *seq)
            .collect();
        for seq in done {
            if let Some(segment) = segments.remove(&seq) {
                self.meter.spool.remove(&segment.path)?;
                if segment.held {
                    self.meter.spool.release(segment.bytes);
                }
            }
        }
        Ok(())
    }

    /// Passes until every closed segment is read and sent, or the ledger does not take a batch.
    async fn pass_all(
        &self,
        segments: &mut BTreeMap<u64, Segment>,
        ledger: &dyn Ledger,
    ) -> anyhow::Result<Passed> {
        loop {
            match self.pass(segments, ledger).await? {
                Passed::MoreToRead => {}
                done => return Ok(done),
            }
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

/// The two halves of a batch, borrowed where it is.
fn halves(batch: Cow<'_, [UsageEvent]>) -> (Cow<'_, [UsageEvent]>, Cow<'_, [UsageEvent]>) {
    let middle = batch.len() / 2;
    match batch {
        Cow::Borrowed(events) => {
            let (first, second) = events.split_at(middle);
            (Cow::Borrowed(first), Cow::Borrowed(second))
        }
        Cow::Owned(mut events) => {
            let second = events.split_off(middle);
            (Cow::Owned(events), Cow::Owned(second))
        }
    }
}

#[cfg(test)]
mod tests {
    use tollgate_control_plane::store::Store;

    use super::*;
    use crate::metering::ledger::{HttpLedger, StoreLedger};
    use crate::metering::metrics::MeteringMetrics;
    use crate::metering::record::{self, Kind, Usage};
    use crate::metering::spool::Spool;
    use crate::metering::spool::tests::event;
    use crate::metrics::Metrics;

    const CUSTOMER: &str = "cus_01010101010101010101010101010101";

    /// A spool of `segments` closed segments of `per_segment` final records each.
    /// A spool in `dir` holding `segments`, each a closed segment of these final records.
    fn spool_of(dir: &std::path::Path, segments: &[Vec<UsageEvent>]) -> Arc<Meter> {
        let meter = Meter {
            spool: Spool::open(dir, u64::MAX, 0).unwrap(),
            metrics: MeteringMetrics::new(&Metrics::new()).unwrap(),
        };
        for (at, events) in segments.iter().enumerate() {
            for usage in events {
                let mut line = Vec::new();
                record::encode(Kind::Final, &Usage::of(usage), &mut line);
                meter.spool.append(&line).unwrap();
            }
            meter.spool.tick(at as i64 + 1, 0).unwrap();
        }
        Arc::new(meter)
    }

    /// `segments` closed segments of `per_segment` events each, numbered from 0.
    fn backlog(dir: &std::path::Path, segments: u8, per_segment: u8) -> Arc<Meter> {
        let segments: Vec<Vec<UsageEvent>> = (0..segments)
            .map(|segment| {
                (0..per_segment)
                    .map(|n| event(segment * per_segment + n, 1))
                    .collect()
            })
            .collect();
        spool_of(dir, &segments)
    }

    /// A sender of `meter`'s spool in batches of `batch`, whose segments close only when a test
    /// ticks them.
    fn sender(meter: Arc<Meter>, batch: usize) -> Sender {
        Sender {
            meter,
            interval: Duration::from_secs(3600),
            batch: AtomicUsize::new(batch),
        }
    }

    /// A new SQLite store in `dir`, migrated.
    async fn sqlite_store(dir: &std::path::Path) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.join("ledger.db").display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// Event `n`, with a method longer than the control plane takes when `refused`.
    fn event_refused_if(n: u8, refused: bool) -> UsageEvent {
        let mut usage = event(n, 1);
        if refused {
            usage.method = "X".repeat(40);
        }
        usage
    }

    #[tokio::test]
    async fn a_request_left_pending_counts_as_its_final_record_says_however_long_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        // An earlier process: seven segments of three requests; before them, a request admitted
        // (pending, 1 unit) whose final record, refunded for an upstream 503, is in the last.
        let refunded = 200;
        {
            let earlier = Spool::open(&spool_dir, u64::MAX, 0).unwrap();
            let write = |kind: Kind, usage: &UsageEvent| {
                let mut line = Vec::new();
                record::encode(kind, &Usage::of(usage), &mut line);
                earlier.append(&line).unwrap();
            };
            write(Kind::Pending, &event(refunded, 1));
            for segment in 0..7u8 {
                for n in 0..3 {
                    write(Kind::Final, &event(segment * 3 + n, 1));
                }
                if segment == 6 {
                    let mut settled = event(refunded, 0);
                    settled.status = 503;
                    write(Kind::Final, &settled);
                }
                earlier.tick(i64::from(segment) + 1, 0).unwrap();
            }
        }
        // This process reads at most MAX_UNSENT_SEGMENTS of them at a time: the pending record
        // must wait for the last one rather than count as left unsettled.
        let sender = sender(spool_of(&spool_dir, &[]), 2);
        assert!(sender.meter.spool.closed(u64::MAX).unwrap().len() > MAX_UNSENT_SEGMENTS + 1);
        let store = sqlite_store(dir.path()).await;
        let ledger = StoreLedger(store.clone());
        let mut segments = BTreeMap::new();
        let passed = sender.pass_all(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
        assert_eq!(
            stored.units, 21,
            "the 21 requests, and the refunded one at 0 units"
        );
        assert_eq!(
            sender.meter.metrics.replayed_so_far(),
            22,
            "every event an earlier process spooled is sent again"
        );
    }

    #[tokio::test]
    async fn a_backlog_is_read_a_few_segments_at_a_time_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let sender = sender(backlog(&dir.path().join("spool"), 10, 3), 2);
        assert_eq!(sender.meter.spool.closed(u64::MAX).unwrap().len(), 11);

        // The ledger cannot be reached (nothing listens on port 1): no more than
        // MAX_UNSENT_SEGMENTS are read into memory, however long the backlog.
        let unreachable = HttpLedger::new("http://127.0.0.1:1", "tgw_token").unwrap();
        let mut segments = BTreeMap::new();
        for _ in 0..3 {
            let passed = sender.pass(&mut segments, &unreachable).await.unwrap();
            assert_eq!(passed, Passed::NotTaken);
            assert_eq!(segments.len(), MAX_UNSENT_SEGMENTS);
        }

        // The ledger back: a pass sends what it read and says more is left; the rest follows.
        let store = sqlite_store(dir.path()).await;
        let ledger = StoreLedger(store.clone());
        assert_eq!(sender.meter.metrics.replayed_so_far(), 0);
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::MoreToRead);
        let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
        assert_eq!(stored.units, 3 * MAX_UNSENT_SEGMENTS as u64);
        // Only the first segment's first batch (2 events) was offered while the ledger was
        // away: those were sent again; every other event's first sending was now.
        assert_eq!(sender.meter.metrics.replayed_so_far(), 2);
        let passed = sender.pass_all(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
        assert_eq!(stored.units, 30, "every event, once");
        assert!(segments.is_empty());
        assert_eq!(
            sender.meter.spool.closed(u64::MAX).unwrap().len(),
            1,
            "only the active segment is left"
        );
    }

    /// Stands in for a proxy in front of the control plane that takes request bodies of at
    /// most two events (413 above), and the control plane behind it: the ids it was given.
    async fn two_events_at_most() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        let given = Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = axum::Router::new().route(
            "/v1/gateway/usage",
            axum::routing::post({
                let given = Arc::clone(&given);
                move |axum::Json(batch): axum::Json<tollgate_model::usage::UsageBatch>| async move {
                    if batch.events.len() > 2 {
                        return Err(axum::http::StatusCode::PAYLOAD_TOO_LARGE);
                    }
                    let mut given = given.lock().unwrap();
                    given.extend(batch.events.iter().map(|e| e.id.clone()));
                    Ok(axum::Json(serde_json::json!({
                        "inserted": batch.events.len(),
                        "duplicates": 0
                    })))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), given)
    }

    /// The control plane's usage ingest as far as validation goes: each batch checked by the
    /// control plane's own code and refused with its own 422 when an event is invalid; valid
    /// batches stored; call number `unavailable_on` (counting from 1; 0: none) answered 503:
    /// (URL, ids stored, calls made).
    async fn validating(
        unavailable_on: usize,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>, Arc<AtomicUsize>) {
        use axum::response::IntoResponse;
        use tollgate_control_plane::api::error::ApiError;
        use tollgate_control_plane::api::usage::batch;
        let given = Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let app =
            axum::Router::new().route(
                "/v1/gateway/usage",
                axum::routing::post({
                    let (given, calls) = (Arc::clone(&given), Arc::clone(&calls));
                    move |axum::Json(fields): axum::Json<
                        serde_json::Map<String, serde_json::Value>,
                    >| async move {
                        if calls.fetch_add(1, Ordering::Relaxed) + 1 == unavailable_on {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                        }
                        match batch::events(fields) {
                            Err(errors) => ApiError::Invalid(errors).into_response(),
                            Ok(events) => {
                                let mut given = given.lock().unwrap();
                                given.extend(events.iter().map(|e| e.id.clone()));
                                axum::Json(serde_json::json!({
                                    "inserted": events.len(),
                                    "duplicates": 0
                                }))
                                .into_response()
                            }
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), given, calls)
    }

    #[tokio::test]
    async fn events_the_ledger_refuses_are_set_aside_alone_and_the_rest_of_their_batch_stored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        // Seven events in one segment; two with a method longer than the control plane takes.
        let bad = [2, 5];
        let events = (0..7)
            .map(|n| event_refused_if(n, bad.contains(&n)))
            .collect();
        let sender = sender(spool_of(&spool, &[events]), 1000);
        let (url, given, calls) = validating(0).await;
        let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
        let mut segments = BTreeMap::new();
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        let mut given = given.lock().unwrap().clone();
        given.sort();
        let expected: Vec<String> = [0, 1, 3, 4, 6].map(|n| event(n, 1).id).to_vec();
        assert_eq!(given, expected, "every other event, once");
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "refused once, then stored"
        );
        // The two refused events are kept together for an operator, and only they.
        let kept: Vec<String> = std::fs::read_dir(spool.join("rejected"))
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].lines().count(), 2, "{kept:?}");
        for n in bad {
            assert!(kept[0].contains(&event(n, 1).id), "{n} not kept: {kept:?}");
        }
        // The segment is done with: nothing is sent again.
        assert_eq!(
            sender.pass(&mut segments, &ledger).await.unwrap(),
            Passed::AllSent
        );
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn events_set_aside_are_not_refused_again_when_their_segment_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let events = (0..7).map(|n| event_refused_if(n, n == 1)).collect();
        let sender = sender(spool_of(&spool, &[events]), 3);
        // Call 1 refuses event 1 of the first batch; call 2, the rest of it, meets an outage.
        let (url, given, calls) = validating(2).await;
        let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
        let mut segments = BTreeMap::new();
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::NotTaken);
        // The next pass sends the segment again, without the event set aside.
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        let mut given = given.lock().unwrap().clone();
        given.sort();
        let expected: Vec<String> = [0, 2, 3, 4, 5, 6].map(|n| event(n, 1).id).to_vec();
        assert_eq!(given, expected);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            4,
            "refused, outage, then two batches"
        );
        let kept = std::fs::read_dir(spool.join("rejected")).unwrap().count();
        assert_eq!(kept, 1, "set aside once");
    }

    #[tokio::test]
    async fn a_segment_sent_again_after_a_disk_error_counts_what_it_had_offered_as_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let events = (0..7).map(|n| event_refused_if(n, n == 4)).collect();
        let sender = sender(spool_of(&spool, &[events]), 2);
        let (url, given, _) = validating(0).await;
        let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
        // Event 4 cannot be set aside: a file stands where its directory goes.
        std::fs::write(spool.join("rejected"), b"").unwrap();
        let mut segments = BTreeMap::new();
        assert!(sender.pass(&mut segments, &ledger).await.is_err());
        assert_eq!(given.lock().unwrap().len(), 4, "events 0 to 3 stored");
        std::fs::remove_file(spool.join("rejected")).unwrap();
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        // Sent again: events 0 to 3 (stored) and 5 (in the batch refused for event 4); 6 for
        // the first time.
        assert_eq!(sender.meter.metrics.replayed_so_far(), 5);
        assert_eq!(given.lock().unwrap().len(), 4 + 6);
    }

    #[tokio::test]
    async fn a_batch_too_large_for_a_proxy_is_sent_in_halves_and_nothing_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let sender = sender(backlog(&spool, 1, 7), 1000);
        let (url, given) = two_events_at_most().await;
        let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
        let mut segments = BTreeMap::new();
        let passed = sender.pass(&mut segments, &ledger).await.unwrap();
        assert_eq!(passed, Passed::AllSent);
        let mut given = given.lock().unwrap().clone();
        given.sort();
        let expected: Vec<String> = (0..7).map(|n| event(n, 1).id).collect();
        assert_eq!(given, expected, "every event, once");
        assert!(!spool.join("rejected").exists(), "nothing set aside");
        let size = sender.batch.load(Ordering::Relaxed);
        assert!(
            (1..=2).contains(&size),
            "later batches are no larger than what passes: {size}"
        );
    }
}
