//! The usage ledger: raw events (`usage_events`), a daily roll-up per customer and route
//! (`usage_daily`), a period's sums and pruning.
//!
//! **Exactly once.** [`Store::record_usage`] inserts a batch in one transaction, each row with
//! `ON CONFLICT (id) DO NOTHING`, and adds to the roll-up only the events that transaction
//! inserted. A batch is first inserted under a savepoint without asking which rows went in: when
//! the rows inserted are as many as its events (every batch but a replay), all of them count;
//! otherwise it is taken back to the savepoint and inserted again with `RETURNING id`, and only
//! the events whose ids come back count. A replayed batch returns no id and counts nothing. On
//! Postgres, a transaction inserting an id that another has inserted but not yet committed waits
//! on the primary key, then skips it when the other commits (or inserts it when the other rolls
//! back), so each id counts in exactly one transaction even when overlapping batches are stored
//! at the same time. Every batch inserts its events in id order and its roll-up rows in key
//! order, so two overlapping batches take their row locks in one order and cannot deadlock.
//! SQLite has one writer at a time, which serializes batches anyway.
//!
//! **Throughput.** Rows go in multi-row `INSERT`s: a batch of 5000 events is a handful of
//! statements, not 5000 round trips. Statement sizes are powers of two up to what the bind
//! limit allows (65,535 parameters on Postgres, 32,766 on SQLite; 14 per event), so a few
//! statement texts serve every batch size and stay in the prepared-statement cache. On SQLite the
//! parameters are anonymous (`?`): SQLite finds a named or numbered parameter (`$7`) by walking
//! a list, which made binding a 2048-row statement quadratic (2,200 events/s instead of about
//! 40,000). Ids made in time order (such as UUIDv7 bytes) insert faster than random ones, as
//! they land at the end of the primary-key index.
//!
//! **Reading.** A period's sums ([`Store::period_usage`]) take its whole UTC days from the
//! daily roll-up and only the parts of days at either end from the raw events (whose index on
//! `(customer_id, at_ms)` carries `units` and `overage`), so any period boundary is exact and a
//! month of millions of events reads a few dozen rows. The roll-up also serves the per-day view
//! ([`Store::daily_usage`]) and outlives the raw events, which [`Store::prune_usage`] deletes
//! once older than the retention.
//!
//! `insert` holds the writing of a batch: the multi-row statements and the roll-up rows.

mod insert;

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use tollgate_model::usage::{PeriodUsage, UsageEvent, UsageStored};
use utoipa::ToSchema;

use super::{Store, StoreError, customers, now_ms};
use crate::calendar;
use insert::{
    DAILY_BINDS, DAILY_COLUMNS, Totals, add_to_rollup, insert_all, insert_new, max_rows, statements,
};

/// Most events one batch may hold.
pub const MAX_BATCH: usize = 5000;
/// Raw events deleted per statement when pruning, so that other writers get the database
/// between two deletions (SQLite has one connection).
pub const PRUNE_CHUNK: i64 = 10_000;

/// One day's totals of a customer's calls to one route (days are UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct DailyUsage {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// The route's name.
    pub route: String,
    /// Requests metered.
    pub requests: u64,
    /// Billable units counted.
    pub units: u64,
    /// Of them, units past a soft quota.
    pub overage: u64,
    /// Requests answered with a status of 500 or more.
    pub errors: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
}

impl Store {
    /// Stores a batch of events, each id once, and adds the ones inserted to the daily roll-up,
    /// all in one transaction. An event whose id is stored already, or repeated in the batch, is
    /// a duplicate and counts nothing. Events of unknown customers are stored too: the ledger
    /// keeps whatever a gateway metered. Any number of events is taken (the API takes up to
    /// [`MAX_BATCH`]); fields are not checked here beyond numbers past `i64::MAX`, which are
    /// refused (the API's validation, `api::usage::batch`, holds every field to tighter bounds
    /// first).
    pub async fn record_usage(&self, events: &[UsageEvent]) -> Result<UsageStored, StoreError> {
        // One event per id, in id order: the order every batch takes its locks in.
        let mut unique: Vec<&UsageEvent> = events.iter().collect();
        unique.sort_by(|a, b| a.id.cmp(&b.id));
        unique.dedup_by(|later, earlier| later.id == earlier.id);
        let received_at = now_ms();
        let mut tx = self.pool().begin().await?;
        let stored = if insert_all(&mut tx, self.backend(), &unique, received_at).await? {
            unique
        } else {
            insert_new(&mut tx, self.backend(), &unique, received_at).await?
        };
        let inserted = stored.len() as u64;
        // Keyed by day number: formatted once per roll-up row, not once per event.
        let mut rollup: BTreeMap<(&str, i64, &str), Totals> = BTreeMap::new();
        for event in stored {
            rollup
                .entry((
                    event.customer_id.as_str(),
                    calendar::day_number(event.at_ms),
                    event.route.as_str(),
                ))
                .or_default()
                .add(event)?;
        }
        let rows: Vec<_> = rollup.into_iter().collect();
        for chunk in statements(&rows, max_rows(self.backend(), DAILY_BINDS)) {
            add_to_rollup(&mut tx, self.backend(), chunk).await?;
        }
        tx.commit().await?;
        Ok(UsageStored {
            inserted,
            duplicates: events.len() as u64 - inserted,
        })
    }

    /// The units and overage of `customer_id`'s events with `start_ms <= at_ms < end_ms`. The
    /// whole UTC days inside the period are read from the daily roll-up (a row per day and
    /// route, written in the same transaction as the events), and only the parts of days at
    /// either end from the events themselves: a quota rebuilt for a customer of millions of
    /// requests a month reads a few dozen rows and two days of events, not the month's.
    pub async fn period_usage(
        &self,
        customer_id: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<PeriodUsage, StoreError> {
        // The whole days: from the first that starts at or after `start_ms` to the last that
        // ends at or before `end_ms` (days of the roll-up's four-digit years only).
        let first_day = calendar::day_number(start_ms.saturating_add(calendar::MS_PER_DAY - 1))
            .clamp(0, LAST_DAY);
        let end_day = calendar::day_number(end_ms).clamp(0, LAST_DAY);
        let (head, tail, days) = if first_day < end_day {
            (
                (start_ms, first_day * calendar::MS_PER_DAY),
                (end_day * calendar::MS_PER_DAY, end_ms),
                (
                    calendar::format_day(first_day),
                    calendar::format_day(end_day),
                ),
            )
        } else {
            ((start_ms, end_ms), (0, 0), (String::new(), String::new()))
        };
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) AS units, \
             CAST(COALESCE(SUM(overage), 0) AS BIGINT) AS overage FROM (\
             SELECT units, overage FROM usage_events WHERE customer_id = $1 \
             AND ((at_ms >= $2 AND at_ms < $3) OR (at_ms >= $4 AND at_ms < $5)) \
             UNION ALL \
             SELECT units, overage FROM usage_daily WHERE customer_id = $1 \
             AND day >= $6 AND day < $7) AS parts",
        )
        .bind(customer_id)
        .bind(head.0)
        .bind(head.1)
        .bind(tail.0)
        .bind(tail.1)
        .bind(days.0)
        .bind(days.1)
        .fetch_one(self.pool())
        .await?;
        Ok(PeriodUsage {
            start_ms,
            end_ms,
            units: count(&row, "units")?,
            overage: count(&row, "overage")?,
        })
    }

    /// The roll-up rows of `customer_id` from day `from` to day `to` (`YYYY-MM-DD`, both
    /// included), by day then route.
    pub async fn daily_usage(
        &self,
        customer_id: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {DAILY_COLUMNS} FROM usage_daily \
             WHERE customer_id = $1 AND day >= $2 AND day <= $3 ORDER BY day, route"
        ))
        .bind(customer_id)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DailyUsage {
                    day: row.try_get("day")?,
                    route: row.try_get("route")?,
                    requests: count(row, "requests")?,
                    units: count(row, "units")?,
                    overage: count(row, "overage")?,
                    errors: count(row, "errors")?,
                    bytes_in: count(row, "bytes_in")?,
                    bytes_out: count(row, "bytes_out")?,
                })
            })
            .collect()
    }

    /// Where pruning may delete up to at `now_ms` with a retention of `retention_ms`: the
    /// retention's start, or earlier, the start of the earliest current billing period that
    /// began before it. A period's sum (a quota rebuilt after a restart or a flushed Redis, the
    /// usage views) reads the raw events of the partial days at its ends, and the raw events
    /// stay the ledger's record of each request, so none of a current period is pruned, however
    /// long the period (up to 366 days) and however short the retention.
    pub async fn prune_cutoff(&self, retention_ms: i64, now_ms: i64) -> Result<i64, StoreError> {
        let retention_start = now_ms.saturating_sub(retention_ms);
        // Only a stored period that began before the retention's start can hold it back: a
        // current period begins at or after the stored one.
        let rows = sqlx::query(
            "SELECT period_start, period_end FROM customers \
             WHERE period_start IS NOT NULL AND period_end IS NOT NULL AND period_start < $1",
        )
        .bind(retention_start)
        .fetch_all(self.pool())
        .await?;
        let mut cutoff = retention_start;
        for row in &rows {
            let current = calendar::current_period(customers::billing_period(row)?, now_ms);
            cutoff = cutoff.min(current.start_ms);
        }
        Ok(cutoff)
    }

    /// Deletes the raw events with `at_ms < before_ms`, [`PRUNE_CHUNK`] at a time; the roll-up
    /// stays. Returns how many were deleted.
    pub async fn prune_usage(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM usage_events WHERE id IN \
                 (SELECT id FROM usage_events WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_CHUNK)
            .execute(self.pool())
            .await?
            .rows_affected();
            deleted += done;
            if done < PRUNE_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// The last day the roll-up can name (9999-12-31): days are `YYYY-MM-DD`, compared as text. The
/// roll-up is read for days before it, events for it and after.
const LAST_DAY: i64 = 2_932_896;

fn count(row: &AnyRow, name: &str) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(name)?;
    u64::try_from(value).map_err(|_| {
        StoreError::Database(sqlx::Error::Decode(
            format!("{name} = {value} is negative").into(),
        ))
    })
}
