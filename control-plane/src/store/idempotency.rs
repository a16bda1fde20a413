//! Remembered answers to `POST`s sent with an `Idempotency-Key`.

use sqlx::Row;

use super::{Store, StoreError, now_ms};

/// A remembered answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// SHA-256 of the request it answered (method, path, body).
    pub request_hash: String,
    /// Its status.
    pub status: u16,
    /// Its headers and body, as stored.
    pub response: String,
}

impl Store {
    /// The answer remembered for `key` of `actor`, unless older than `kept_ms`.
    pub async fn remembered(
        &self,
        actor: &str,
        key: &str,
        kept_ms: i64,
    ) -> Result<Option<Remembered>, StoreError> {
        let row = sqlx::query(
            "SELECT request_hash, status, response FROM idempotency_keys \
             WHERE actor = $1 AND key = $2 AND created_at > $3",
        )
        .bind(actor)
        .bind(key)
        .bind(now_ms() - kept_ms)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            let status: i64 = row.try_get("status")?;
            Ok(Remembered {
                request_hash: row.try_get("request_hash")?,
                status: u16::try_from(status).unwrap_or(500),
                response: row.try_get("response")?,
            })
        })
        .transpose()
    }

    /// Forgets the answer remembered for `key` of `actor`.
    pub async fn forget_remembered(&self, actor: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2")
            .bind(actor)
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Remembers an answer, after deleting those older than `kept_ms`; a concurrent first answer
    /// for the same key wins.
    pub async fn remember(
        &self,
        actor: &str,
        key: &str,
        path: &str,
        answer: &Remembered,
        kept_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= $1")
            .bind(now_ms() - kept_ms)
            .execute(self.pool())
            .await?;
        let result = sqlx::query(
            "INSERT INTO idempotency_keys (actor, key, path, request_hash, status, response, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(actor)
        .bind(key)
        .bind(path)
        .bind(&answer.request_hash)
        .bind(i64::from(answer.status))
        .bind(&answer.response)
        .bind(now_ms())
        .execute(self.pool())
        .await;
        match result.map_err(StoreError::from) {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(other) => Err(other),
        }
    }
}
