//! What gateways are fed: the full snapshot at a version, and the changes after a version.

use sqlx::Row;
use sqlx::any::AnyRow;
use tollgate_model::customer::CustomerStatus;
use tollgate_model::feed::{Change, ChangedEntity, Changes, CustomerRecord, KeyRecord, Snapshot};

use super::{Backend, Store, StoreError};

const KEY_COLUMNS: &str = "id, customer_id, hash, expires_at, revoked_at, scopes";

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

    /// Everything gateways enforce, read in one consistent transaction.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut tx = self.pool().begin().await?;
        if self.backend() == Backend::Postgres {
            // One consistent view of every table and of the version it corresponds to.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        let version: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM change_log")
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
        let plan_ids: Vec<String> = sqlx::query("SELECT id FROM plans ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut plans = Vec::with_capacity(plan_ids.len());
        for id in &plan_ids {
            plans.push(super::plans::fetch(&mut tx, id).await?);
        }
        let customers = sqlx::query("SELECT id, plan_id, status FROM customers ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(customer_record)
            .collect::<Result<_, _>>()?;
        let keys = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(key_record)
            .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(Snapshot {
            version,
            plans,
            customers,
            keys,
        })
    }

    /// Up to `limit` changes after `since`, each with its entity as it is now.
    pub async fn changes_since(&self, since: i64, limit: u32) -> Result<Changes, StoreError> {
        let mut connection = self.pool().acquire().await?;
        let rows = sqlx::query("SELECT version, kind, entity_id FROM change_log WHERE version > $1 ORDER BY version LIMIT $2")
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
                    customer: sqlx::query(
                        "SELECT id, plan_id, status FROM customers WHERE id = $1",
                    )
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
        Ok(Changes { version, changes })
    }
}

fn customer_record(row: &AnyRow) -> Result<CustomerRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(CustomerRecord {
        id: row.try_get("id")?,
        plan_id: row.try_get("plan_id")?,
        status: CustomerStatus::parse(&status).unwrap_or(CustomerStatus::Suspended),
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
