//! What gateways are fed: the full snapshot at a version, and the changes after a version.

use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::AnyConnection;
use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::sync::mpsc::Sender;
use tollgate_model::customer::CustomerStatus;
use tollgate_model::feed::{Change, ChangedEntity, Changes, CustomerRecord, KeyRecord};

use super::{Backend, Store, StoreError};

const KEY_COLUMNS: &str = "id, customer_id, hash, expires_at, revoked_at, scopes";
const CUSTOMER_COLUMNS: &str = "id, plan_id, status, period_start, period_end";

impl Store {
    /// The latest config version (0 before any change).
    pub async fn latest_version(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM change_log")
                .fetch_one(self.pool())
                .await?
                .try_get("v")?,
        )
    }

    /// The latest config version and when its change was made (`(0, None)` before any change):
    /// two stores, or a store and its restored backup, at the same version differ in the time.
    pub async fn latest_mark(&self) -> Result<(i64, Option<i64>), StoreError> {
        latest_mark(&mut *self.pool().acquire().await?).await
    }

    /// Everything gateways enforce, read in one consistent transaction and written as the JSON
    /// of a [`Snapshot`](tollgate_model::feed::Snapshot) in chunks of about [`CHUNK`] bytes sent
    /// to `out`, row by row, so no more than a chunk is held whatever the number of keys.
    /// Returns the snapshot's version and when its change was made.
    pub async fn write_snapshot(
        &self,
        out: &Sender<Vec<u8>>,
    ) -> Result<(i64, Option<i64>), StoreError> {
        let mut tx = self.pool().begin().await?;
        if self.backend() == Backend::Postgres {
            // One consistent view of every table and of the version it corresponds to.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        let (version, at) = latest_mark(&mut tx).await?;
        let mut json = Chunks::new(out);
        let head = match at {
            Some(at) => format!("{{\"version\":{version},\"version_at_ms\":{at},\"plans\":["),
            None => format!("{{\"version\":{version},\"plans\":["),
        };
        json.push(head.as_bytes()).await?;
        let plan_ids: Vec<String> = sqlx::query("SELECT id FROM plans ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()?;
        for (i, id) in plan_ids.iter().enumerate() {
            let plan = super::plans::fetch(&mut tx, id).await?;
            json.item(i, &plan).await?;
        }
        json.push(b"],\"customers\":[").await?;
        {
            let query = format!("SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id");
            let mut rows = sqlx::query(&query).fetch(&mut *tx);
            let mut i = 0;
            while let Some(row) = rows.try_next().await? {
                json.item(i, &customer_record(&row)?).await?;
                i += 1;
            }
        }
        json.push(b"],\"keys\":[").await?;
        {
            let query = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id");
            let mut rows = sqlx::query(&query).fetch(&mut *tx);
            let mut i = 0;
            while let Some(row) = rows.try_next().await? {
                json.item(i, &key_record(&row)?).await?;
                i += 1;
            }
        }
        json.push(b"]}").await?;
        json.flush().await?;
        tx.commit().await?;
        Ok((version, at))
    }

    /// Up to `limit` changes after `since`, each with its entity as it is now.
    pub async fn changes_since(&self, since: i64, limit: u32) -> Result<Changes, StoreError> {
        let mut connection = self.pool().acquire().await?;
        let rows = sqlx::query("SELECT version, at, kind, entity_id FROM change_log WHERE version > $1 ORDER BY version LIMIT $2")
            .bind(since)
            .bind(i64::from(limit))
            .fetch_all(&mut *connection)
            .await?;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            let version: i64 = row.try_get("version")?;
            let kind: String = row.try_get("kind")?;
            let id: String = row.try_get("entity_id")?;
            let entity = match kind.as_str() {
                "plan" => ChangedEntity::Plan {
                    plan: match super::plans::fetch(&mut connection, &id).await {
                        Ok(plan) => Some(plan),
                        Err(StoreError::NotFound) => None,
                        Err(other) => return Err(other),
                    },
                    id,
                },
                "customer" => ChangedEntity::Customer {
                    customer: sqlx::query(&format!(
                        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
                    ))
                    .bind(&id)
                    .fetch_optional(&mut *connection)
                    .await?
                    .as_ref()
                    .map(customer_record)
                    .transpose()?,
                    id,
                },
                "key" => ChangedEntity::Key {
                    key: sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
                        .bind(&id)
                        .fetch_optional(&mut *connection)
                        .await?
                        .as_ref()
                        .map(key_record)
                        .transpose()?,
                    id,
                },
                other => {
                    return Err(StoreError::Database(sqlx::Error::Decode(
                        format!("change log kind {other:?}").into(),
                    )));
                }
            };
            changes.push(Change { version, entity });
        }
        let version = changes.last().map_or(since, |c| c.version);
        let version_at_ms = rows.last().map(|row| row.try_get("at")).transpose()?;
        Ok(Changes {
            version,
            version_at_ms,
            changes,
        })
    }

    /// When the change of `version` was made (`None`: no such change in this store).
    pub async fn version_at(&self, version: i64) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT at FROM change_log WHERE version = $1")
            .bind(version)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|row| row.try_get("at")).transpose()?)
    }
}

/// The latest change's version and time (`(0, None)` before any), read on `connection`.
async fn latest_mark(connection: &mut AnyConnection) -> Result<(i64, Option<i64>), StoreError> {
    let row = sqlx::query("SELECT version, at FROM change_log ORDER BY version DESC LIMIT 1")
        .fetch_optional(connection)
        .await?;
    Ok(match row {
        Some(row) => (row.try_get("version")?, Some(row.try_get("at")?)),
        None => (0, None),
    })
}

fn customer_record(row: &AnyRow) -> Result<CustomerRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(CustomerRecord {
        id: row.try_get("id")?,
        plan_id: row.try_get("plan_id")?,
        status: CustomerStatus::parse(&status).unwrap_or(CustomerStatus::Suspended),
        billing_period: super::customers::billing_period(row)?,
    })
}

fn key_record(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    let scopes: Option<String> = row.try_get("scopes")?;
    Ok(KeyRecord {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        hash: row.try_get("hash")?,
        expires_at_ms: row.try_get("expires_at")?,
        revoked_at_ms: row.try_get("revoked_at")?,
        scopes: scopes.and_then(|s| serde_json::from_str(&s).ok()),
    })
}

/// About how many bytes of JSON [`Store::write_snapshot`] sends at a time.
pub const CHUNK: usize = 64 * 1024;

/// JSON text gathered into chunks for a channel; a closed channel ends the snapshot.
struct Chunks<'a> {
    out: &'a Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl<'a> Chunks<'a> {
    fn new(out: &'a Sender<Vec<u8>>) -> Self {
        Self {
            out,
            buffer: Vec::with_capacity(CHUNK + 1024),
        }
    }

    async fn push(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// The `index`th element of an array.
    async fn item(&mut self, index: usize, value: &impl Serialize) -> Result<(), StoreError> {
        if index > 0 {
            self.buffer.push(b',');
        }
        serde_json::to_writer(&mut self.buffer, value)
            .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))?;
        self.push(&[]).await
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK + 1024));
        self.out.send(chunk).await.map_err(|_| {
            StoreError::Database(sqlx::Error::Protocol(
                "the snapshot's reader went away".into(),
            ))
        })
    }
}
