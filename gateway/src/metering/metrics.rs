//! The metering metrics.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::{
    Metrics, USAGE_BATCHES_STORED_TOTAL, USAGE_EVENTS_RECOVERED_TOTAL, USAGE_EVENTS_REJECTED_TOTAL,
    USAGE_EVENTS_REPLAYED_TOTAL, USAGE_EVENTS_SPOOLED_TOTAL, USAGE_EVENTS_STORED_TOTAL,
    USAGE_SEND_FAILURES_TOTAL, USAGE_SPOOL_BYTES, USAGE_SPOOL_ERRORS_TOTAL,
    USAGE_SPOOL_FULL_REFUSALS_TOTAL, USAGE_SPOOL_MAX_BYTES, USAGE_VIEW_READS_TOTAL,
};

/// Handles of the metering metrics.
#[derive(Debug, Clone)]
pub struct MeteringMetrics {
    spool_bytes: IntGauge,
    spool_max_bytes: IntGauge,
    spooled: IntCounter,
    recovered: IntCounter,
    replayed: IntCounter,
    rejected: IntCounter,
    inserted: IntCounter,
    duplicates: IntCounter,
    batches: IntCounter,
    send_failures: IntCounter,
    spool_errors: IntCounter,
    full_refusals: IntCounter,
    view_reads: IntCounter,
}

impl MeteringMetrics {
    /// Registers them in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let spool_bytes = IntGauge::new(USAGE_SPOOL_BYTES, "Bytes of usage records in the spool.")?;
        let spool_max_bytes = IntGauge::new(
            USAGE_SPOOL_MAX_BYTES,
            "The spool's bound; at it, metered requests are refused (503).",
        )?;
        let spooled = IntCounter::new(
            USAGE_EVENTS_SPOOLED_TOTAL,
            "Usage events written to the spool.",
        )?;
        let recovered = IntCounter::new(
            USAGE_EVENTS_RECOVERED_TOTAL,
            "Usage events an earlier process left pending, recovered from the spool.",
        )?;
        let replayed = IntCounter::new(
            USAGE_EVENTS_REPLAYED_TOTAL,
            "Usage events sent to the ledger again: spooled by an earlier process (a restart), or \
             offered before while the ledger was unavailable (an outage).",
        )?;
        let rejected = IntCounter::new(
            USAGE_EVENTS_REJECTED_TOTAL,
            "Usage events the ledger refused for good, set aside in the spool's rejected/ directory.",
        )?;
        let stored = IntCounterVec::new(
            Opts::new(
                USAGE_EVENTS_STORED_TOTAL,
                "Usage events sent to the ledger, by result (inserted, or duplicate: already stored, a replay).",
            ),
            &["result"],
        )?;
        let batches = IntCounter::new(
            USAGE_BATCHES_STORED_TOTAL,
            "Batches of usage events the ledger stored, each of at most batch_size events (a closed spool segment's events, cut to that size).",
        )?;
        let send_failures = IntCounter::new(
            USAGE_SEND_FAILURES_TOTAL,
            "Batches the ledger did not accept (they stay in the spool and are sent again).",
        )?;
        let spool_errors = IntCounter::new(
            USAGE_SPOOL_ERRORS_TOTAL,
            "Usage records the disk refused to write.",
        )?;
        let full_refusals = IntCounter::new(
            USAGE_SPOOL_FULL_REFUSALS_TOTAL,
            "Metered requests refused because the spool was full.",
        )?;
        let view_reads = IntCounter::new(
            USAGE_VIEW_READS_TOTAL,
            "Ledger reads made for customers' usage views (at most one a second per customer).",
        )?;
        for collector in [&spool_bytes, &spool_max_bytes] {
            metrics.register(Box::new(collector.clone()))?;
        }
        for collector in [
            &spooled,
            &recovered,
            &replayed,
            &rejected,
            &batches,
            &send_failures,
            &spool_errors,
            &full_refusals,
            &view_reads,
        ] {
            metrics.register(Box::new(collector.clone()))?;
        }
        metrics.register(Box::new(stored.clone()))?;
        Ok(Self {
            spool_bytes,
            spool_max_bytes,
            spooled,
            recovered,
            replayed,
            rejected,
            inserted: stored.with_label_values(&["inserted"]),
            duplicates: stored.with_label_values(&["duplicate"]),
            batches,
            send_failures,
            spool_errors,
            full_refusals,
            view_reads,
        })
    }

    /// Sets the spool's fill and bound.
    pub fn spool_bytes(&self, bytes: u64) {
        self.spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the spool's bound.
    pub fn spool_max_bytes(&self, bytes: u64) {
        self.spool_max_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts an event written to the spool.
    pub fn spooled(&self) {
        self.spooled.inc();
    }

    /// Counts events recovered from an earlier process's pending records.
    pub fn recovered(&self, events: u64) {
        self.recovered.inc_by(events);
    }

    /// Counts events sent to the ledger again.
    pub fn replayed(&self, events: u64) {
        self.replayed.inc_by(events);
    }

    /// Events counted as sent again, for tests.
    #[cfg(test)]
    pub fn replayed_so_far(&self) -> u64 {
        self.replayed.get()
    }

    /// Counts events the ledger refused for good.
    pub fn rejected(&self, events: u64) {
        self.rejected.inc_by(events);
    }

    /// Counts a batch stored.
    pub fn sent(&self, inserted: u64, duplicates: u64) {
        self.batches.inc();
        self.inserted.inc_by(inserted);
        self.duplicates.inc_by(duplicates);
    }

    /// Counts a batch refused.
    pub fn send_failed(&self) {
        self.send_failures.inc();
    }

    /// Counts a record the disk refused.
    pub fn spool_error(&self) {
        self.spool_errors.inc();
    }

    /// Counts a request refused because the spool was full.
    pub fn full_refusal(&self) {
        self.full_refusals.inc();
    }

    /// Counts a ledger read for a usage view.
    pub fn view_read(&self) {
        self.view_reads.inc();
    }
}
