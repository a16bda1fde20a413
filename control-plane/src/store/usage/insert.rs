//! Writing a batch: multi-row `INSERT`s of events, sized in powers of two so that a few
//! statement texts serve every batch, and the daily roll-up's rows added to in key order.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write;
use std::sync::OnceLock;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};
use tollgate_model::usage::UsageEvent;

use super::super::{Backend, StoreError};
use crate::calendar;

const EVENT_COLUMNS: &str = "id, request_id, customer_id, key_id, route, method, status, \
                             latency_us, bytes_in, bytes_out, at_ms, units, overage, received_at";
/// Parameters per event row.
const EVENT_BINDS: usize = 14;
pub(super) const DAILY_COLUMNS: &str = "customer_id, day, route, requests, units, overage, errors, bytes_in, bytes_out, latency_us_sum";
pub(super) const DAILY_BINDS: usize = 10;

/// What a roll-up row gains from the events of one batch.
#[derive(Debug, Default)]
pub(super) struct Totals {
    requests: i64,
    units: i64,
    overage: i64,
    errors: i64,
    bytes_in: i64,
    bytes_out: i64,
    latency_us: i64,
}

impl Totals {
    pub(super) fn add(&mut self, event: &UsageEvent) -> Result<(), StoreError> {
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

/// Most rows of `binds` parameters one statement may carry on `backend`.
pub(super) fn max_rows(backend: Backend, binds: usize) -> usize {
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
pub(super) fn statements<T>(items: &[T], max_rows: usize) -> impl Iterator<Item = &[T]> {
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
pub(super) async fn insert_all(
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
pub(super) async fn insert_new<'e>(
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
pub(super) async fn add_to_rollup(
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
