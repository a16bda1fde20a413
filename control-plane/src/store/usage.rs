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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::OnceLock;

use serde::Serialize;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};
use tollgate_model::usage::{PeriodUsage, UsageEvent, UsageStored};
use utoipa::ToSchema;

use super::{Backend, Store, StoreError, customers, now_ms};
use crate::calendar;

/// Most events one batch may hold.
pub const MAX_BATCH: usize = 5000;
/// Raw events deleted per statement when pruning, so that other writers get the database
/// between two deletions (SQLite has one connection).
pub const PRUNE_CHUNK: i64 = 10_000;

const EVENT_COLUMNS: &str = "id, request_id, customer_id, key_id, route, method, status, \
                             latency_us, bytes_in, bytes_out, at_ms, units, overage, received_at";
/// Parameters per event row.
const EVENT_BINDS: usize = 14;
const DAILY_COLUMNS: &str = "customer_id, day, route, requests, units, overage, errors, bytes_in, bytes_out, latency_us_sum";
const DAILY_BINDS: usize = 10;

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

/// What a roll-up row gains from the events of one batch.
#[derive(Debug, Default)]
struct Totals {
    requests: i64,
    units: i64,
    overage: i64,
    errors: i64,
    bytes_in: i64,
    bytes_out: i64,
    latency_us: i64,
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

impl Totals {
    fn add(&mut self, event: &UsageEvent) -> Result<(), StoreError> {
        let sum = |total: i64, value: u64| {
            signed(value).and_then(|value| {
                total
                    .checked_add(value)
                    .ok_or_else(|| encode_error("a roll-up total past i64::MAX"))
            })
        };
        self.requests += 1;
        self.units = sum(self.units, event.units)?;
        self.overage = sum(self.overage, event.overage)?;
        self.errors += i64::from(event.status >= 500);
        self.bytes_in = sum(self.bytes_in, event.bytes_in)?;
        self.bytes_out = sum(self.bytes_out, event.bytes_out)?;
        self.latency_us = sum(self.latency_us, event.latency_us)?;
        Ok(())
    }
}

/// The last day the roll-up can name (9999-12-31): days are `YYYY-MM-DD`, compared as text. The
/// roll-up is read for days before it, events for it and after.
const LAST_DAY: i64 = 2_932_896;

/// Most rows of `binds` parameters one statement may carry on `backend`.
fn max_rows(backend: Backend, binds: usize) -> usize {
    let limit = match backend {
        Backend::Postgres => 65_535,
        Backend::Sqlite => 32_766,
    };
    limit / binds
}

/// Rows for the next statement: the largest power of two up to `max_rows` that `remaining`
/// fills, so that statement texts repeat across batches.
fn statement_rows(remaining: usize, max_rows: usize) -> usize {
    let cap = remaining.min(max_rows);
    1 << (usize::BITS - 1 - cap.leading_zeros())
}

/// `items` cut into statements of [`statement_rows`] each.
fn statements<T>(items: &[T], max_rows: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, after) = rest.split_at(statement_rows(rest.len(), max_rows));
        rest = after;
        Some(chunk)
    })
}

/// `rows` groups of `binds` parameters: `($1, $2), ($3, $4)` on Postgres, `(?, ?), (?, ?)` on
/// SQLite.
fn values(sql: &mut String, rows: usize, binds: usize, backend: Backend) {
    let mut number = 0;
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..binds {
            if column > 0 {
                sql.push_str(", ");
            }
            number += 1;
            match backend {
                Backend::Postgres => {
                    let _ = write!(sql, "${number}");
                }
                Backend::Sqlite => sql.push('?'),
            }
        }
        sql.push(')');
    }
}

/// Inserts every one of `events` (ids unique and sorted) or none: `false`, with nothing
/// inserted, when one of them is stored already. Every batch but a replay stores all its events,
/// and a statement that does not say which rows it inserted is much cheaper (SQLite hands each
/// returned row over from its worker thread): the rows inserted are counted, and a batch whose
/// count falls short is taken back to the savepoint and stored by [`insert_new`].
async fn insert_all(
    connection: &mut AnyConnection,
    backend: Backend,
    events: &[&UsageEvent],
    received_at: i64,
) -> Result<bool, StoreError> {
    sqlx::query("SAVEPOINT usage_batch")
        .execute(&mut *connection)
        .await?;
    for chunk in statements(events, max_rows(backend, EVENT_BINDS)) {
        let sql = insert_sql(backend, chunk.len(), false);
        let inserted = bind_events(sqlx::query(&sql), chunk, received_at)?
            .execute(&mut *connection)
            .await?
            .rows_affected();
        if inserted != chunk.len() as u64 {
            sqlx::query("ROLLBACK TO SAVEPOINT usage_batch")
                .execute(&mut *connection)
                .await?;
            return Ok(false);
        }
    }
    sqlx::query("RELEASE SAVEPOINT usage_batch")
        .execute(&mut *connection)
        .await?;
    Ok(true)
}

/// Inserts those of `events` (ids unique and sorted) not stored yet; returns them.
async fn insert_new<'e>(
    connection: &mut AnyConnection,
    backend: Backend,
    events: &[&'e UsageEvent],
    received_at: i64,
) -> Result<Vec<&'e UsageEvent>, StoreError> {
    let mut stored = Vec::new();
    for chunk in statements(events, max_rows(backend, EVENT_BINDS)) {
        let sql = insert_sql(backend, chunk.len(), true);
        let rows = bind_events(sqlx::query(&sql), chunk, received_at)?
            .fetch_all(&mut *connection)
            .await?;
        let ids = rows
            .iter()
            .map(|row| row.try_get::<String, _>("id"))
            .collect::<Result<HashSet<String>, _>>()?;
        stored.extend(chunk.iter().filter(|e| ids.contains(e.id.as_str())));
    }
    Ok(stored)
}

/// `INSERT` of `rows` events that skips ids stored already, `returning` the ids it inserted or
/// not. The text of a power of two of rows (every statement's, [`statement_rows`]) is made once
/// per process: it is one `?` or `$n` per parameter, so making it again for every statement cost
/// about as much per event as binding one more parameter.
fn insert_sql(backend: Backend, rows: usize, returning: bool) -> Cow<'static, str> {
    /// By backend, by `returning`, by the power of two of rows.
    static MADE: [[[OnceLock<String>; usize::BITS as usize]; 2]; 2] =
        [const { [const { [const { OnceLock::new() }; usize::BITS as usize] }; 2] }; 2];
    let make = || {
        let mut sql = format!("INSERT INTO usage_events ({EVENT_COLUMNS}) VALUES ");
        values(&mut sql, rows, EVENT_BINDS, backend);
        sql.push_str(" ON CONFLICT (id) DO NOTHING");
        if returning {
            sql.push_str(" RETURNING id");
        }
        sql
    };
    if !rows.is_power_of_two() {
        return Cow::Owned(make());
    }
    let by_backend = match backend {
        Backend::Sqlite => &MADE[0],
        Backend::Postgres => &MADE[1],
    };
    let slot = &by_backend[usize::from(returning)][rows.trailing_zeros() as usize];
    Cow::Borrowed(slot.get_or_init(make).as_str())
}

/// `query` with the parameters of `events`.
fn bind_events<'q>(
    mut query: Query<'q, Any, AnyArguments<'q>>,
    events: &[&'q UsageEvent],
    received_at: i64,
) -> Result<Query<'q, Any, AnyArguments<'q>>, StoreError> {
    for event in events {
        query = query
            .bind(event.id.as_str())
            .bind(event.request_id.as_str())
            .bind(event.customer_id.as_str())
            .bind(event.key_id.as_deref())
            .bind(event.route.as_str())
            .bind(event.method.as_str())
            .bind(i64::from(event.status))
            .bind(signed(event.latency_us)?)
            .bind(signed(event.bytes_in)?)
            .bind(signed(event.bytes_out)?)
            .bind(event.at_ms)
            .bind(signed(event.units)?)
            .bind(signed(event.overage)?)
            .bind(received_at);
    }
    Ok(query)
}

/// Adds `rows` (keys unique and sorted) to the roll-up.
async fn add_to_rollup(
    connection: &mut AnyConnection,
    backend: Backend,
    rows: &[((&str, i64, &str), Totals)],
) -> Result<(), StoreError> {
    let mut sql = format!("INSERT INTO usage_daily ({DAILY_COLUMNS}) VALUES ");
    values(&mut sql, rows.len(), DAILY_BINDS, backend);
    sql.push_str(
        " ON CONFLICT (customer_id, day, route) DO UPDATE SET \
         requests = usage_daily.requests + excluded.requests, \
         units = usage_daily.units + excluded.units, \
         overage = usage_daily.overage + excluded.overage, \
         errors = usage_daily.errors + excluded.errors, \
         bytes_in = usage_daily.bytes_in + excluded.bytes_in, \
         bytes_out = usage_daily.bytes_out + excluded.bytes_out, \
         latency_us_sum = usage_daily.latency_us_sum + excluded.latency_us_sum",
    );
    let mut query = sqlx::query(&sql);
    for ((customer_id, day, route), totals) in rows {
        query = query
            .bind(*customer_id)
            .bind(calendar::format_day(*day))
            .bind(*route)
            .bind(totals.requests)
            .bind(totals.units)
            .bind(totals.overage)
            .bind(totals.errors)
            .bind(totals.bytes_in)
            .bind(totals.bytes_out)
            .bind(totals.latency_us);
    }
    query.execute(&mut *connection).await?;
    Ok(())
}

fn signed(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| encode_error("a usage number past i64::MAX"))
}

fn encode_error(what: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Encode(what.to_owned().into()))
}

fn count(row: &AnyRow, name: &str) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(name)?;
    u64::try_from(value).map_err(|_| {
        StoreError::Database(sqlx::Error::Decode(
            format!("{name} = {value} is negative").into(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_take_the_largest_power_of_two_that_fits() {
        assert_eq!(statement_rows(5000, 4681), 4096);
        assert_eq!(statement_rows(904, 4681), 512);
        assert_eq!(statement_rows(5000, 2340), 2048);
        assert_eq!(statement_rows(1, 2340), 1);
        let items = vec![0_u8; 5000];
        let sizes: Vec<usize> = statements(&items, 2340).map(<[u8]>::len).collect();
        assert_eq!(sizes, vec![2048, 2048, 512, 256, 128, 8]);
    }

    #[test]
    fn rows_number_their_parameters_on_postgres_only() {
        let mut sql = String::new();
        values(&mut sql, 2, 3, Backend::Postgres);
        assert_eq!(sql, "($1, $2, $3), ($4, $5, $6)");
        let mut sql = String::new();
        values(&mut sql, 2, 2, Backend::Sqlite);
        assert_eq!(sql, "(?, ?), (?, ?)");
    }

    #[test]
    fn an_insert_is_made_once_per_backend_returning_and_power_of_two() {
        let count = |sql: &str, what: &str| sql.matches(what).count();
        // A row's parameters open with `(?` on SQLite, `($` on Postgres.
        let rows = |sql: &str| count(sql, "(?") + count(sql, "($");
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for returning in [false, true] {
                let first = insert_sql(backend, 4, returning);
                let again = insert_sql(backend, 4, returning);
                assert!(matches!(first, Cow::Borrowed(_)));
                assert!(std::ptr::eq(first.as_ptr(), again.as_ptr()));
                assert_eq!(rows(&first), 4, "{first}");
                assert_eq!(first.ends_with(" RETURNING id"), returning);
                let odd = insert_sql(backend, 3, returning);
                assert!(matches!(odd, Cow::Owned(_)));
                assert_eq!(rows(&odd), 3, "{odd}");
            }
            let other = insert_sql(backend, 8, false);
            assert_eq!(rows(&other), 8);
        }
        let sqlite = insert_sql(Backend::Sqlite, 1, false);
        let postgres = insert_sql(Backend::Postgres, 1, false);
        assert_eq!(count(&sqlite, "?"), EVENT_BINDS);
        assert_eq!(count(&postgres, "$"), EVENT_BINDS);
    }
}
