//! The store: one code path over SQLite (embedded) or Postgres (clusters) through `sqlx::Any`.
//!
//! The schema is written so both backends read alike (see `migrations/README.md`): timestamps
//! are Unix milliseconds, JSON is text, ids are prefixed, time-ordered strings (so cursors are
//! ids). Every mutation runs in a transaction that also writes its audit entry and its change-log
//! row, whose auto-incremented key is the config version gateways follow.
//!
//! # Layout
//! - [`plans`]: plans, their creation, changes and deletion.
//! - [`customers`]: customers, their plan and state.
//! - [`keys`]: API keys (hashes), revocation and rotation.
//! - [`idempotency`]: remembered answers to idempotent `POST`s.
//! - [`feed`]: the snapshot and the changes gateways follow.
//! - [`admin_tokens`]: admin tokens (hashes only).
//! - [`audit`]: the audit log and the change log.
//! - [`usage`]: the usage ledger: raw events once each, the daily roll-up, period sums, pruning.

pub mod admin_tokens;
pub mod audit;
pub mod customers;
pub mod feed;
pub mod idempotency;
pub mod keys;
pub mod plans;
pub mod usage;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A Postgres server.
    Postgres,
}

/// Failures of the store, mapped to HTTP statuses in one place (`api::error`).
#[derive(Debug)]
pub enum StoreError {
    /// The row does not exist.
    NotFound,
    /// A unique constraint refused the change; the message names what collided.
    Conflict(String),
    /// The database failed; never shown to clients.
    Database(sqlx::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NotFound => f.write_str("not found"),
            StoreError::Conflict(what) => write!(f, "conflict: {what}"),
            StoreError::Database(error) => write!(f, "database: {error}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_owned())
            }
            _ => StoreError::Database(error),
        }
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects to `url` (`sqlite://file?mode=rwc` creates the file).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let options = AnyPoolOptions::new().max_connections(match backend {
            // One writer at a time is SQLite's own rule; more connections only queue on its lock.
            Backend::Sqlite => 1,
            Backend::Postgres => 16,
        });
        let pool = options.connect(url).await?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA foreign_keys = ON")
                .execute(&pool)
                .await?;
            // Write-ahead logging: a commit appends to `<file>-wal` and syncs it once, where the
            // default rollback journal writes and syncs a journal and the file itself (the usage
            // ledger commits a batch several times a second). Durability is the same (every
            // commit is synced); the setting stays with the file. An in-memory database keeps
            // its own mode.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Self { pool, backend })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations that have not run yet.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        self.migrator().run(&self.pool).await
    }

    fn migrator(&self) -> &'static Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// Whether the database answers and every migration has run.
    pub async fn is_ready(&self) -> Result<bool, sqlx::Error> {
        let applied: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
        Ok(applied as usize == self.migrator().iter().count())
    }

    /// The pool, for the modules of this store.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 (UTC, milliseconds) for a Unix-millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let time = UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// A new id: `prefix_` then 32 hex digits that sort by creation time (a UUIDv7's bytes; within
/// one millisecond too, as the uuid crate orders the UUIDv7s of one process).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        hex::encode(uuid::Uuid::now_v7().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_milliseconds_as_rfc3339() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn ids_are_prefixed_and_sort_by_time() {
        let first = new_id("plan");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = new_id("plan");
        assert!(first.starts_with("plan_") && first.len() == 37);
        assert!(first < second);
        // Many within one millisecond: still in the order they were made.
        let ids: Vec<String> = (0..1000).map(|_| new_id("adm")).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
