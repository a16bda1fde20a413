//! One pass of the flusher: the closed segments read (a few at a time), their pending records
//! settled by final ones, their events sent in batches, and the segments done with deleted.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tollgate_model::usage::UsageEvent;

use crate::metering::Meter;
use crate::metering::ledger::{Ledger, LedgerError, take_refused};
use crate::metering::record::{Pending, Record};
use crate::metering::spool;

/// Closed segments read into memory and not yet sent, at most: after an outage the spool may
/// hold up to `spool_max_bytes` of them (a gigabyte by default), which read at once would take
/// a few times that in memory. The rest are read as these are sent (16 MiB of records here).
pub(super) const MAX_UNSENT_SEGMENTS: usize = 4;

/// What a pass came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Passed {
    /// Every closed segment was read and sent.
    AllSent,
    /// What was read was sent, and closed segments remain to be read: pass again at once.
    MoreToRead,
    /// The ledger did not take a batch: pass again later.
    NotTaken,
}

/// What the flusher knows of a closed segment.
#[derive(Debug)]
pub(super) struct Segment {
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

/// What a pass needs: the spool, how often segments close, the batch size.
#[derive(Debug)]
pub(super) struct Sender {
    pub(super) meter: Arc<Meter>,
    pub(super) interval: Duration,
    /// Events per batch: `batch_size`, or less once the ledger found a batch too large.
    pub(super) batch: AtomicUsize,
}

impl Sender {
    /// One pass: closes the active segment if due, reads new closed segments (oldest first, up
    /// to [`MAX_UNSENT_SEGMENTS`] unsent), settles pending records, sends what is unsent,
    /// deletes what is done.
    pub(super) async fn pass(
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
            // `offered` counts events of the list as the last pass sent it, which held those it
            // set aside: those before the mark leave the count with the list.
            let refused = &segment.refused;
            let (mut index, mut gone_before) = (0, 0);
            segment.finals.retain(|event| {
                let keep = !refused.contains(&event.id);
                gone_before += usize::from(!keep && index < segment.offered);
                index += 1;
                keep
            });
            segment.offered = segment.offered.saturating_sub(gone_before);
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
            // Of this batch, the events offered before: a replay if the ledger stores them.
            let replayed = segment.offered.saturating_sub(position).min(batch.len());
            // Offered now, whatever came of it (unless it is sent again in halves): when the
            // segment is sent again (the ledger unavailable, or the disk failing to set
            // refused events aside), that is a replay.
            if !matches!(&result, Err(LedgerError::TooLarge(_)) if batch.len() > 1) {
                segment.offered = segment.offered.max(position + batch.len());
            }
            match result {
                Ok(stored) => {
                    self.meter.metrics.sent(stored.inserted, stored.duplicates);
                    if replayed > 0 {
                        self.meter.metrics.replayed(replayed as u64);
                    }
                    position += batch.len();
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
                    let mut rest = batch.into_owned();
                    // Positions not of this batch: it is set aside whole.
                    let refused = take_refused(&mut rest, &positions)
                        .unwrap_or_else(|| std::mem::take(&mut rest));
                    let kept = self.set_aside(&mut segment.refused, &refused)?;
                    position += refused.len();
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
                    let kept = self.set_aside(&mut segment.refused, &batch)?;
                    position += batch.len();
                    tracing::error!(
                        %reason,
                        events = batch.len(),
                        kept = %kept.display(),
                        "the ledger refused a usage batch; it is set aside, not sent again"
                    );
                }
                Err(LedgerError::Unavailable(error)) => {
                    self.meter.metrics.send_failed();
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
    /// Keeps `events`, which the ledger refused for good, in the spool's `rejected/` directory,
    /// counts them, and notes them in `refused` (their segment's) as not to send again; the file
    /// kept.
    fn set_aside(
        &self,
        refused: &mut HashSet<String>,
        events: &[UsageEvent],
    ) -> anyhow::Result<PathBuf> {
        let kept = self.meter.spool.set_aside(events)?;
        self.meter.metrics.rejected(events.len() as u64);
        refused.extend(events.iter().map(|event| event.id.clone()));
        Ok(kept)
    }

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
    pub(super) async fn pass_all(
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
mod tests;
