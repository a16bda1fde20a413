//! Counts rebuilt from the usage ledger: reading it (resting it after readings fail, so requests
//! do not each wait on an unreachable control plane), and the queue of counts to seed once more
//! after the spools have been flushed.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::period::Period;
use super::quota::LedgerRead;
use crate::identity::index::Id;
use crate::metering::ledger::Ledger;

/// The longest a request waits for the ledger to rebuild its customer's quota count.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a quota count is seeded from the ledger it reads the ledger again, unless set
/// ([`Limiter::reseed_after`](super::Limiter::reseed_after)).
pub(crate) const RESEED_AFTER: Duration = Duration::from_secs(3);

/// Quota counts seeded from the ledger, each to seed again once the spools have been flushed
/// ([`Limiter::reseed_after`](super::Limiter::reseed_after) after its seed): in process
/// ([`Limiter`](super::Limiter)'s) or in Redis ([`RedisCounters`](super::redis::RedisCounters)'s).
#[derive(Debug)]
pub(crate) struct ReseedQueue<T> {
    /// Each with when it is due and how many reads of the ledger failed.
    items: Mutex<Vec<(i64, u32, T)>>,
    after_ms: AtomicI64,
}

impl<T> Default for ReseedQueue<T> {
    fn default() -> Self {
        Self {
            items: Mutex::default(),
            after_ms: AtomicI64::new(RESEED_AFTER.as_millis() as i64),
        }
    }
}

impl<T> ReseedQueue<T> {
    pub(super) fn set_after(&self, after: Duration) {
        self.after_ms.store(
            i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Queues `item`, a count of `period` seeded with the ledger's events before `until_ms`:
    /// unless the period began so shortly before that no event of it could be in a spool then
    /// and not counted (a period's first count, say).
    pub(crate) fn push(&self, period: Period, until_ms: i64, item: T) {
        let after = self.after_ms.load(Ordering::Relaxed);
        if until_ms.saturating_sub(period.start_ms) >= after {
            self.items
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((until_ms.saturating_add(after), 0, item));
        }
    }

    /// Queues `item` again after a read that failed (its `attempts`-th), unless that was the
    /// last it may try.
    pub(crate) fn retry(&self, attempts: u32, now_ms: i64, item: T) {
        if attempts < RESEED_ATTEMPTS {
            let due = now_ms.saturating_add(self.after_ms.load(Ordering::Relaxed));
            self.items
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((due, attempts, item));
        }
    }

    /// The items due at `now_ms`, with their failed attempts so far.
    pub(crate) fn take_due(&self, now_ms: i64) -> Vec<(u32, T)> {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        if items.iter().all(|(due, _, _)| *due > now_ms) {
            return Vec::new();
        }
        let (due, later): (Vec<_>, Vec<_>) =
            items.drain(..).partition(|(due, _, _)| *due <= now_ms);
        *items = later;
        due.into_iter()
            .map(|(_, attempts, item)| (attempts, item))
            .collect()
    }
}

/// An in-process count seeded from the ledger's events before `until_ms`.
#[derive(Debug, Clone, Copy)]
pub(super) struct LocalReseed {
    pub(super) customer: Id,
    pub(super) period: Period,
    pub(super) until_ms: i64,
}

/// Reads of the ledger a re-seed tries before it gives up.
pub(super) const RESEED_ATTEMPTS: u32 = 3;
/// Re-seeds run at once.
pub(crate) const RESEED_CONCURRENCY: usize = 16;

/// The ledger's count of the customer's events in `period` before `until_ms`; `None` (logged)
/// when it cannot be read in [`SEED_TIMEOUT`].
pub(super) async fn read_ledger(
    ledger: &dyn Ledger,
    customer: &Id,
    period: Period,
    until_ms: i64,
) -> Option<LedgerRead> {
    let before = Period {
        start_ms: period.start_ms,
        end_ms: until_ms,
    };
    if before.end_ms <= before.start_ms {
        // No event of the period is that old.
        return Some(LedgerRead {
            until_ms,
            used: 0,
            overage: 0,
        });
    }
    match tokio::time::timeout(SEED_TIMEOUT, ledger.period_usage(customer, before)).await {
        Ok(Ok((used, overage))) => Some(LedgerRead {
            until_ms,
            used,
            overage,
        }),
        Ok(Err(error)) if error.is::<LedgerResting>() => {
            tracing::debug!(%error, "quota count not rebuilt from the ledger yet");
            None
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the ledger to rebuild a quota count");
            None
        }
        Err(_) => {
            tracing::warn!("the ledger did not answer in time to rebuild a quota count");
            None
        }
    }
}

/// How long requests rebuilding a quota count do not read the ledger once readings of it have
/// failed (`Resting`).
pub const LEDGER_REST: Duration = Duration::from_secs(5);

/// Readings failed in a row (failed, or no answer within [`SEED_TIMEOUT`]) that rest the ledger:
/// more than one, so that one customer whose reading fails (or is slow) does not rest it for
/// the others, whose readings, answered, start the count again.
const FAILED_READINGS_TO_REST: u32 = 2;

/// The ledger as requests read it to rebuild a quota count: once [`FAILED_READINGS_TO_REST`]
/// readings in a row failed or did not answer within [`SEED_TIMEOUT`], readings are refused at
/// once for [`LEDGER_REST`], so that while the control plane is unreachable (a network that drops
/// packets rather than refusing them) requests do not each wait a second for it; they count
/// from what the gateway has, and a reading after the rest tries again. The background reseeds
/// read the ledger itself.
#[derive(Debug)]
pub(super) struct Resting {
    pub(super) ledger: Arc<dyn Ledger>,
    /// How long readings are refused ([`LEDGER_REST`]).
    pub(super) rest: Duration,
    /// Readings failed in a row, and until when readings are refused.
    pub(super) state: Mutex<(u32, Option<std::time::Instant>)>,
}

impl Resting {
    fn state(&self) -> std::sync::MutexGuard<'_, (u32, Option<std::time::Instant>)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a reading as failed unless disarmed: a reading dropped before its answer (its
/// caller's own deadline passed first) failed too.
struct Reading<'a> {
    resting: &'a Resting,
    answered: bool,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut state = self.resting.state();
        if self.answered {
            *state = (0, None);
            return;
        }
        state.0 += 1;
        if state.0 >= FAILED_READINGS_TO_REST {
            state.1 = Some(std::time::Instant::now() + self.resting.rest);
            state.0 = 0;
        }
    }
}

/// A reading [`Resting`] refused.
#[derive(Debug, thiserror::Error)]
#[error("readings of the ledger failed just before; it is not read again yet")]
struct LedgerResting;

#[async_trait::async_trait]
impl Ledger for Resting {
    async fn record(
        &self,
        events: &[tollgate_model::usage::UsageEvent],
    ) -> Result<tollgate_model::usage::UsageStored, crate::metering::ledger::LedgerError> {
        self.ledger.record(events).await
    }

    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)> {
        if self
            .state()
            .1
            .is_some_and(|until| std::time::Instant::now() < until)
        {
            return Err(anyhow::Error::new(LedgerResting));
        }
        let mut reading = Reading {
            resting: self,
            answered: false,
        };
        // Its caller's deadline ([`read_ledger`]: SEED_TIMEOUT) drops a reading that does not
        // answer, which counts it as failed.
        let read = self.ledger.period_usage(customer, period).await;
        reading.answered = read.is_ok();
        read
    }
}
