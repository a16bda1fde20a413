//! API keys in the store: only SHA-256 hashes; the plaintext exists once, in the creation answer.

use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{self, Actor, Change};
use super::{Store, StoreError, new_id, now_ms, rfc3339};
use crate::secret::hash;

/// A key's metadata: never the key nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// `key_...`.
    pub id: String,
    /// Its customer.
    pub customer_id: String,
    /// Free text.
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub display_start: String,
    /// Route names the key may call; `None` is every route.
    pub scopes: Option<Vec<String>>,
    /// RFC 3339 expiry.
    pub expires_at: Option<String>,
    /// RFC 3339 time from which it no longer works (revoked, or the end of a rotation's grace).
    pub revoked_at: Option<String>,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Free text.
    pub name: String,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    /// Route names.
    pub scopes: Option<Vec<String>>,
}

/// A key just created: its metadata and, this once, the key itself.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// Metadata.
    pub key: ApiKey,
    /// The plaintext key.
    pub plaintext: String,
}

const COLUMNS: &str =
    "id, customer_id, name, display_start, scopes, expires_at, revoked_at, created_at";

impl Store {
    /// Creates a key for a customer (404 when the customer does not exist).
    pub async fn create_key(
        &self,
        customer_id: &str,
        new: NewKey,
        actor: &Actor,
    ) -> Result<CreatedKey, StoreError> {
        let mut tx = self.pool().begin().await?;
        let exists = sqlx::query("SELECT id FROM customers WHERE id = $1")
            .bind(customer_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let created = insert(&mut tx, customer_id, &new).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "key.create",
                target_type: "key",
                target_id: &created.key.id,
                before: None,
                after: Some(json!(created.key)),
                publish: true,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Up to `limit` keys of a customer with ids after `after`.
    pub async fn keys(
        &self,
        customer_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE customer_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(customer_id)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode).collect()
    }

    /// A key's metadata.
    pub async fn key(&self, id: &str) -> Result<ApiKey, StoreError> {
        let mut connection = self.pool().acquire().await?;
        fetch(&mut connection, id).await
    }

    /// Revokes a key now (a key already revoked earlier stays so).
    pub async fn revoke_key(&self, id: &str, actor: &Actor) -> Result<ApiKey, StoreError> {
        self.end_key(id, now_ms(), "key.revoke", actor).await
    }

    /// Issues a new key like `id` (same customer, name, scopes and expiry); the old one keeps
    /// working for `grace_seconds`. Returns the new key and the old one's metadata.
    pub async fn rotate_key(
        &self,
        id: &str,
        grace_seconds: u64,
        actor: &Actor,
    ) -> Result<(CreatedKey, ApiKey), StoreError> {
        let mut tx = self.pool().begin().await?;
        // A key that no longer works has nothing to hand over: rotating a revoked (perhaps
        // leaked) key must not mint a working one, nor an expired key one already expired. A
        // key rotated already (working until its grace ends) has its successor: rotated again,
        // it would have two. Checked by a write that holds the key's row to the end (a
        // revocation made meanwhile either comes first and is seen here, or waits and ends the
        // old key after this).
        let now = now_ms();
        let live = sqlx::query(
            "UPDATE api_keys SET id = id WHERE id = $1 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let old = fetch(&mut tx, id).await?;
        let expires_at_ms: Option<i64> =
            sqlx::query("SELECT expires_at FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("expires_at")?;
        if !live {
            // Ending in the future: a rotation's grace.
            let grace_until = old
                .revoked_at
                .as_deref()
                .filter(|at| crate::calendar::parse_rfc3339(at).is_some_and(|at| at > now));
            return Err(StoreError::Conflict(
                if expires_at_ms.is_some_and(|at| at <= now) {
                    format!("key {id} has expired; issue a new key instead")
                } else if let Some(until) = grace_until {
                    format!(
                        "key {id} was rotated already and works until {until}; rotate its \
                         successor instead"
                    )
                } else {
                    format!("key {id} is revoked; issue a new key instead")
                },
            ));
        }
        let new = NewKey {
            name: old.name.clone(),
            expires_at_ms,
            scopes: old.scopes.clone(),
        };
        let created = insert(&mut tx, &old.customer_id, &new).await?;
        let grace_ms = i64::try_from(grace_seconds.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
        let ended = end(&mut tx, id, now + grace_ms).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "key.rotate",
                target_type: "key",
                target_id: id,
                before: Some(json!(old)),
                after: Some(json!({"old": ended, "new": created.key})),
                publish: true,
            },
        )
        .await?;
        // Gateways learn of the new key as well as of the old one's end.
        audit::publish(&mut tx, "key", &created.key.id).await?;
        tx.commit().await?;
        Ok((created, ended))
    }

    async fn end_key(
        &self,
        id: &str,
        at: i64,
        action: &str,
        actor: &Actor,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.pool().begin().await?;
        let before = fetch(&mut tx, id).await?;
        let after = end(&mut tx, id, at).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action,
                target_type: "key",
                target_id: id,
                before: Some(json!(before)),
                after: Some(json!(after)),
                publish: true,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }
}

/// Sets the key's end to `at` unless it already ends earlier.
async fn end(
    connection: &mut sqlx::AnyConnection,
    id: &str,
    at: i64,
) -> Result<ApiKey, StoreError> {
    sqlx::query("UPDATE api_keys SET revoked_at = $1, grace_until = $1 WHERE id = $2 AND (revoked_at IS NULL OR revoked_at > $1)")
        .bind(at)
        .bind(id)
        .execute(&mut *connection)
        .await?;
    fetch(connection, id).await
}

async fn insert(
    connection: &mut sqlx::AnyConnection,
    customer_id: &str,
    new: &NewKey,
) -> Result<CreatedKey, StoreError> {
    let mut random = [0u8; 16];
    rand::fill(&mut random);
    let plaintext = tollgate_model::key::from_random(random);
    let id = new_id("key");
    sqlx::query(
        "INSERT INTO api_keys (id, customer_id, name, hash, display_start, scopes, expires_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(customer_id)
    .bind(&new.name)
    .bind(hash(&plaintext))
    .bind(tollgate_model::key::display_start(&plaintext))
    .bind(new.scopes.as_ref().map(|s| json!(s).to_string()))
    .bind(new.expires_at_ms)
    .bind(now_ms())
    .execute(&mut *connection)
    .await?;
    Ok(CreatedKey {
        key: fetch(connection, &id).await?,
        plaintext,
    })
}

async fn fetch(connection: &mut sqlx::AnyConnection, id: &str) -> Result<ApiKey, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(StoreError::NotFound)?;
    decode(&row)
}

fn decode(row: &AnyRow) -> Result<ApiKey, StoreError> {
    let scopes: Option<String> = row.try_get("scopes")?;
    let expires_at: Option<i64> = row.try_get("expires_at")?;
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        name: row.try_get("name")?,
        display_start: row.try_get("display_start")?,
        scopes: scopes.and_then(|s| serde_json::from_str(&s).ok()),
        expires_at: expires_at.map(rfc3339),
        revoked_at: revoked_at.map(rfc3339),
        created_at: rfc3339(row.try_get("created_at")?),
    })
}

impl Store {
    /// Inserts `count` keys spread over `customers` with multi-row inserts, without audit
    /// entries: only for loading a benchmark's store. Returns how many were inserted.
    pub async fn bulk_load_keys_for_benchmark(
        &self,
        customers: &[String],
        count: u64,
    ) -> Result<u64, StoreError> {
        const BATCH: u64 = 1000;
        let mut done = 0;
        while done < count {
            let batch = BATCH.min(count - done);
            let placeholders: Vec<String> = (0..batch)
                .map(|i| {
                    let base = i * 7;
                    format!(
                        "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                        base + 1,
                        base + 2,
                        base + 3,
                        base + 4,
                        base + 5,
                        base + 6,
                        base + 7
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO api_keys (id, customer_id, name, hash, display_start, created_at, scopes) VALUES {}",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql);
            let now = now_ms();
            for i in 0..batch {
                let mut random = [0u8; 16];
                rand::fill(&mut random);
                let plaintext = tollgate_model::key::from_random(random);
                let n = done + i;
                query = query
                    .bind(new_id("key"))
                    .bind(customers[(n % customers.len() as u64) as usize].clone())
                    .bind(format!("bulk {n}"))
                    .bind(hash(&plaintext))
                    .bind(tollgate_model::key::display_start(&plaintext))
                    .bind(now)
                    .bind(Option::<String>::None);
            }
            query.execute(self.pool()).await?;
            done += batch;
        }
        Ok(done)
    }
}
